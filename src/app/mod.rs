//! The application: shared state, the route table, the handlers and the
//! background work, on top of `net`'s accept loop.
//!
//! - [`service`]: the request path, from hyper to a handler and back.
//! - [`routes`]: the proxy path and the router's own endpoints.
//! - [`choose`]: which profile a request for a new backend is for.
//! - [`admin`]: the operator's sessions view and forced release.
//! - [`reaper`]: idle and max-lifetime release.
//! - [`autoscaler`]: the Agones FleetAutoscaler webhook.
//! - [`error`]: `RouterError` and its single mapping to HTTP.
//! - [`pages`]: the HTML/JSON pages the router serves itself.

pub mod admin;
pub mod autoscaler;
pub mod choose;
pub mod error;
pub mod pages;
pub mod reaper;
pub mod routes;
pub mod service;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::routing::{get, post};
use axum::Router;
use http::HeaderMap;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::allocator::Allocator;
use crate::auth::{AuthError, Authenticator, Identity};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::net::connection::{Limits, Timeouts};
use crate::net::{bind, Server, Settings};
use crate::proxy::Forwarder;
use crate::session::cookie::CookieCodec;
use crate::session::{Profile, Profiles, Registry};
use crate::telemetry::access;
use crate::util::seal::Signer;
use error::{render_errors, ErrorPages};
use service::Handler;

/// Everything a request handler needs, shared by all connections.
pub struct AppState {
    pub config: Arc<Config>,
    pub auth: Authenticator,
    pub registry: Registry,
    pub cookies: CookieCodec,
    pub forwarder: Forwarder,
    pub metrics: Arc<Metrics>,
    /// Where `/metrics` ended up listening, once bound.
    metrics_addr: std::sync::OnceLock<SocketAddr>,
    /// Where the FleetAutoscaler webhook ended up listening, once bound.
    autoscaler_addr: std::sync::OnceLock<SocketAddr>,
}

impl AppState {
    /// The state of a router whose profiles have these allocators (one
    /// each, in the config's order).
    pub fn new(config: Config, allocators: Vec<Arc<dyn Allocator>>, metrics: Arc<Metrics>) -> Self {
        let session = &config.session;
        let dev_cookie = format!("{}_dev", session.cookie_name);
        let signer = Signer::new(&session.cookie_secret);
        let cookies = CookieCodec::new(signer, session.cookie_name.clone(), session.cookie_ttl);
        // One upstream pool for every profile: the most patient profile's
        // connect timeout.
        let connect_timeout = config.profiles.iter().map(|p| p.backend.connect_timeout).max();
        let forwarder = Forwarder::new(
            connect_timeout.unwrap_or(config.backend.connect_timeout),
            vec![session.cookie_name.clone(), dev_cookie.clone()],
            metrics.clone(),
        );
        let profiles: Vec<Profile> = config
            .profiles
            .iter()
            .zip(allocators)
            .map(|(profile, allocator)| Profile::new(profile.clone(), allocator, &metrics, session.queue_timeout))
            .collect();
        for profile in &profiles {
            metrics
                .backend_info
                .with_label_values(&[profile.config.backend.kind.label()])
                .set(1);
        }
        let profiles = Profiles::new(profiles);
        let backends: Vec<_> = profiles.iter().map(|p| Arc::downgrade(&p.allocator)).collect();
        metrics.upstreams_down.read_from(move || {
            let down = backends.iter().filter_map(|b| b.upgrade()).map(|a| a.down().len());
            down.sum::<usize>() as i64
        });
        let waiting: Vec<_> = profiles
            .iter()
            .map(|p| metrics.profile_users_waiting.with_label_values(&[p.name()]))
            .collect();
        metrics
            .users_waiting
            .read_from(move || waiting.iter().map(|gauge| gauge.get()).sum());
        AppState {
            auth: Authenticator::new(&config.auth, &session.cookie_secret, dev_cookie, metrics.clone()),
            registry: Registry::new(profiles, metrics.clone()),
            cookies,
            forwarder,
            metrics,
            metrics_addr: std::sync::OnceLock::new(),
            autoscaler_addr: std::sync::OnceLock::new(),
            config: Arc::new(config),
        }
    }

    /// The address `/metrics` is served on, once the server started.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr.get().copied()
    }

    /// The address the FleetAutoscaler webhook is served on, once the
    /// server started.
    pub fn autoscaler_addr(&self) -> Option<SocketAddr> {
        self.autoscaler_addr.get().copied()
    }

    /// The verified user of a request, also noted for its access-log line.
    pub async fn identify(&self, headers: &HeaderMap) -> Result<Arc<Identity>, AuthError> {
        let identity = self.auth.identify(headers).await?;
        access::identified(&identity.user_id);
        Ok(identity)
    }

    /// Requests to `activity_ignore_paths` (exact, or a prefix when the entry
    /// ends in `*`) do not keep a backend alive.
    pub fn counts_as_activity(&self, path: &str) -> bool {
        !self
            .config
            .session
            .activity_ignore_paths
            .iter()
            .any(|rule| match rule.strip_suffix('*') {
                Some(prefix) => path.starts_with(prefix),
                None => path == rule,
            })
    }
}

/// The router's own endpoints: `/healthz`, `/readyz` and everything under
/// `/_router`. Every other path is proxied (see [`service`]).
pub fn endpoints(state: Arc<AppState>) -> Router {
    let error_pages = ErrorPages {
        retry_after: state.config.session.retry_after,
    };
    Router::new()
        .route("/healthz", get(routes::healthz))
        .route("/readyz", get(routes::readyz))
        .route("/_router/status", get(routes::status))
        .route("/_router/release", post(routes::release))
        .route("/_router/start", post(routes::start))
        .route("/_router/profiles", get(routes::profiles))
        .route("/_router/switch", post(routes::switch))
        .route("/_router/admin", get(admin::view))
        .route("/_router/admin/release", post(admin::release))
        .route(
            "/_router/dev/login",
            get(routes::dev_sign_in_form).post(routes::dev_sign_in),
        )
        .route("/_router/dev/logout", post(routes::dev_sign_out))
        .fallback(routes::not_found)
        // Turns every RouterError below into a logged, rendered page.
        .layer(axum::middleware::from_fn_with_state(error_pages, render_errors))
        .with_state(state)
}

/// Runs the router on `listener` until `shutdown` resolves, then drains:
/// stops accepting, lets in-flight requests and open streams finish for up
/// to `server.drain_timeout`, and closes what is left.
///
/// Connections are spread over `server.threads` threads, round robin: this
/// task's, and one more on each extra thread, every one with a
/// single-threaded runtime of its own. A connection stays on the thread it
/// was given, so its requests never wait for another thread to be woken,
/// its tasks never move between cores, and it shares nothing per request
/// with the other threads but the session table. The background tasks
/// (reaper, key refresh, metrics, the autoscaler webhook) run here; the
/// binary runs this on a single-threaded runtime too.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let background = CancellationToken::new();
    let tasks = TaskTracker::new();
    if let Some(addr) = state.config.server.metrics_listen {
        let metrics_listener = bind(addr, "server.metrics_listen").await?;
        let bound = metrics_listener.local_addr()?;
        let _ = state.metrics_addr.set(bound);
        tracing::info!(listen = %bound, "metrics listening");
        tasks.spawn(crate::metrics::serve(
            metrics_listener,
            state.metrics.clone(),
            background.clone(),
        ));
    }
    if let Some(addr) = state.config.server.autoscaler_listen {
        let autoscaler_listener = bind(addr, "server.autoscaler_listen").await?;
        let bound = autoscaler_listener.local_addr()?;
        let _ = state.autoscaler_addr.set(bound);
        tracing::info!(listen = %bound, "autoscaler webhook listening");
        tasks.spawn(autoscaler::serve(
            autoscaler_listener,
            state.clone(),
            background.clone(),
        ));
    }
    if let Some(keys) = state.auth.key_store() {
        tasks.spawn(keys.clone().keep_fresh(background.clone()));
    }
    tasks.spawn(reaper::run(state.clone(), background.clone()));
    for profile in state.registry.profiles().iter() {
        let (allocator, stop) = (profile.allocator.clone(), background.clone());
        tasks.spawn(async move { allocator.maintain(stop).await });
    }

    let server_config = &state.config.server;
    let settings = Settings {
        limits: Limits {
            timeouts: Timeouts {
                keepalive: server_config.keepalive_timeout,
                header: server_config.header_timeout,
                body: server_config.body_timeout,
            },
            max_uri_bytes: server_config.max_uri_bytes,
        },
        max_header_bytes: server_config.max_header_bytes,
        threads: server_config.threads,
        behind_load_balancer: server_config.behind_load_balancer,
        metrics: state.metrics.clone(),
    };
    let endpoints = endpoints(state.clone());
    let handler_state = state.clone();
    let mut server = Server::start(settings, move |client, conn| {
        Handler::new(handler_state.clone(), endpoints.clone(), client, conn)
    })?;
    server.accept(listener, shutdown).await;

    let drain_timeout = state.config.server.drain_timeout;
    tracing::info!(
        open_connections = server.open_connections(),
        open_relays = state.forwarder.open_relays(),
        ?drain_timeout,
        "draining"
    );
    let started = tokio::time::Instant::now();
    server.drain(drain_timeout).await;
    // Relays run on the serving threads' runtimes: they go before the threads.
    state
        .forwarder
        .drain_relays(drain_timeout.saturating_sub(started.elapsed()))
        .await;
    server.stop_threads().await;
    background.cancel();
    tasks.close();
    tasks.wait().await;
    Ok(())
}
