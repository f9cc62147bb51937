//! The HTTP server: shared state, the route table with its layers, the
//! accept loop and the drain on shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::{any, get, post};
use axum::Router;
use http::HeaderMap;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::allocator::Allocator;
use crate::auth::{AuthError, Authenticator, Identity};
use crate::config::Config;
use crate::error::{render_errors, ErrorPages};
use crate::proxy::Forwarder;
use crate::reaper;
use crate::routes;
use crate::session::cookie::{CookieCodec, Signer};
use crate::session::Registry;

/// The peer address of the connection a request came in on.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

/// Everything a request handler needs, shared by all connections.
pub struct AppState {
    pub config: Arc<Config>,
    pub auth: Authenticator,
    pub registry: Registry,
    pub cookies: CookieCodec,
    pub forwarder: Forwarder,
}

impl AppState {
    pub fn new(config: Config, allocator: Arc<dyn Allocator>) -> Self {
        let session = &config.session;
        let dev_cookie = format!("{}_dev", session.cookie_name);
        let signer = Signer::new(&session.cookie_secret);
        let cookies = CookieCodec::new(signer, session.cookie_name.clone(), session.cookie_ttl);
        let forwarder = Forwarder::new(
            config.backend.connect_timeout,
            vec![session.cookie_name.clone(), dev_cookie.clone()],
        );
        AppState {
            auth: Authenticator::new(&config.auth, &session.cookie_secret, dev_cookie),
            registry: Registry::new(allocator),
            cookies,
            forwarder,
            config: Arc::new(config),
        }
    }

    pub async fn identify(&self, headers: &HeaderMap) -> Result<Identity, AuthError> {
        self.auth.identify(headers).await
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

/// The route table. Router endpoints live at `/healthz`, `/readyz` and under
/// `/_router/`; everything else is proxied.
pub fn app(state: Arc<AppState>) -> Router {
    let error_pages = ErrorPages {
        retry_after: state.config.session.retry_after,
    };
    Router::new()
        .route("/healthz", get(routes::healthz))
        .route("/readyz", get(routes::readyz))
        .route("/_router/status", get(routes::status))
        .route("/_router/release", post(routes::release))
        .route(
            "/_router/dev/login",
            get(routes::dev_sign_in_form).post(routes::dev_sign_in),
        )
        .route("/_router/dev/logout", post(routes::dev_sign_out))
        .route("/_router", any(routes::not_found))
        .route("/_router/{*rest}", any(routes::not_found))
        .fallback(routes::proxy)
        // Outermost: turns every RouterError below into a logged, rendered page.
        .layer(axum::middleware::from_fn_with_state(error_pages, render_errors))
        .with_state(state)
}

/// Runs the router on `listener` until `shutdown` resolves, then drains:
/// stops accepting, lets in-flight requests and open streams finish for up
/// to `server.drain_timeout`, and closes what is left.
pub async fn serve(listener: TcpListener, state: Arc<AppState>, shutdown: impl Future<Output = ()>) {
    let background = CancellationToken::new();
    let tasks = TaskTracker::new();
    if let Some(keys) = state.auth.key_store() {
        tasks.spawn(keys.clone().keep_fresh(background.clone()));
    }
    tasks.spawn(reaper::run(state.clone(), background.clone()));

    let app = app(state.clone());
    let connections = TaskTracker::new();
    let drain = CancellationToken::new();
    let force_close = CancellationToken::new();
    let keepalive = state.config.server.keepalive_timeout;

    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = app.clone().map_request(move |mut request: http::Request<Incoming>| {
            request.extensions_mut().insert(ClientAddr(peer));
            request
        });
        let drain = drain.clone();
        let force_close = force_close.clone();
        connections.spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                // hyper starts this timer whenever it waits for a request
                // head, including on an idle keep-alive connection, so it is
                // also the idle timeout: it must outlast the Google load
                // balancer's 600 s keep-alive or clients see random 502s.
                .header_read_timeout(keepalive)
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service))
                .with_upgrades();
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                _ = drain.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    tokio::select! {
                        result = connection.as_mut() => result,
                        _ = force_close.cancelled() => return,
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
        });
    }

    let drain_timeout = state.config.server.drain_timeout;
    tracing::info!(
        open_connections = connections.len(),
        open_relays = state.forwarder.open_relays(),
        ?drain_timeout,
        "draining"
    );
    drop(listener);
    drain.cancel();
    connections.close();
    let started = tokio::time::Instant::now();
    if tokio::time::timeout(drain_timeout, connections.wait()).await.is_err() {
        tracing::warn!(
            open = connections.len(),
            "connections still open after the drain period; closing them"
        );
        force_close.cancel();
        connections.wait().await;
    }
    state
        .forwarder
        .drain_relays(drain_timeout.saturating_sub(started.elapsed()))
        .await;
    background.cancel();
    tasks.close();
    tasks.wait().await;
}
