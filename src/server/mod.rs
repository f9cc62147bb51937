//! The HTTP server: shared state, the accept loop and the drain on
//! shutdown.
//!
//! - [`service`]: the request path, from hyper to a handler and back.
//! - [`connection`]: per-connection time limits and head hygiene under hyper.
//! - [`limits`]: request-level refusals (over-long URI).

pub(crate) mod connection;
mod limits;
pub mod service;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::{get, post};
use axum::Router;
use http::{HeaderMap, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::allocator::Allocator;
use crate::auth::{AuthError, Authenticator, Identity};
use crate::config::Config;
use crate::error::{render_errors, ErrorPages};
use crate::metrics::Metrics;
use crate::proxy::Forwarder;
use crate::reaper;
use crate::routes;
use crate::session::cookie::CookieCodec;
use crate::session::Registry;
use crate::telemetry::access::{self, Peer};
use crate::util::seal::Signer;
use connection::{ConnState, GuardedIo, Limits, Timeouts};
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
    pub fn new(config: Config, allocator: Arc<dyn Allocator>, metrics: Arc<Metrics>) -> Self {
        let session = &config.session;
        let dev_cookie = format!("{}_dev", session.cookie_name);
        let signer = Signer::new(&session.cookie_secret);
        let cookies = CookieCodec::new(signer, session.cookie_name.clone(), session.cookie_ttl);
        let forwarder = Forwarder::new(
            config.backend.connect_timeout,
            vec![session.cookie_name.clone(), dev_cookie.clone()],
            metrics.clone(),
        );
        metrics
            .backend_info
            .with_label_values(&[config.backend.kind.label()])
            .set(1);
        let backends = Arc::downgrade(&allocator);
        metrics
            .upstreams_down
            .read_from(move || backends.upgrade().map_or(0, |a| a.down().len() as i64));
        AppState {
            auth: Authenticator::new(&config.auth, &session.cookie_secret, dev_cookie, metrics.clone()),
            registry: Registry::new(allocator, metrics.clone(), config.session.queue_timeout),
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
        .route("/_router/admin", get(crate::admin::view))
        .route("/_router/admin/release", post(crate::admin::release))
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
        tasks.spawn(crate::autoscaler::serve(
            autoscaler_listener,
            state.clone(),
            background.clone(),
        ));
    }
    if let Some(keys) = state.auth.key_store() {
        tasks.spawn(keys.clone().keep_fresh(background.clone()));
    }
    tasks.spawn(reaper::run(state.clone(), background.clone()));
    let allocator = state.registry.allocator().clone();
    let stop = background.clone();
    tasks.spawn(async move { allocator.maintain(stop).await });

    let server_config = &state.config.server;
    let acceptor = Acceptor {
        endpoints: endpoints(state.clone()),
        connections: TaskTracker::new(),
        drain: CancellationToken::new(),
        force_close: CancellationToken::new(),
        threads_done: CancellationToken::new(),
        limits: Limits {
            timeouts: Timeouts {
                keepalive: server_config.keepalive_timeout,
                header: server_config.header_timeout,
                body: server_config.body_timeout,
            },
            max_uri_bytes: server_config.max_uri_bytes,
        },
        max_header_bytes: server_config.max_header_bytes,
        state: state.clone(),
    };
    // However this future ends (even dropped mid-way), the other threads
    // exit once their connections are gone.
    let _release_threads = acceptor.threads_done.clone().drop_guard();
    let mut threads = Vec::new();
    let mut handoffs = Vec::new();
    for index in 1..server_config.threads {
        let (handoff, done) = acceptor.start_thread(index)?;
        handoffs.push(handoff);
        threads.push(done);
    }

    tokio::pin!(shutdown);
    let mut next = 0usize;
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
        next = (next + 1) % (handoffs.len() + 1);
        if next == 0 {
            acceptor.serve_connection(stream, peer);
            continue;
        }
        // Another thread's runtime takes the socket over.
        match stream.into_std() {
            Ok(stream) => {
                if let Err(mpsc::error::SendError((stream, peer))) = handoffs[next - 1].send((stream, peer)) {
                    tracing::error!(thread = next, "a serving thread is gone; serving its share here");
                    match tokio::net::TcpStream::from_std(stream) {
                        Ok(stream) => acceptor.serve_connection(stream, peer),
                        Err(e) => tracing::warn!(error = %e, %peer, "cannot take a connection back"),
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, %peer, "cannot hand a connection over"),
        }
    }

    let drain_timeout = state.config.server.drain_timeout;
    let connections = &acceptor.connections;
    tracing::info!(
        open_connections = connections.len(),
        open_relays = state.forwarder.open_relays(),
        ?drain_timeout,
        "draining"
    );
    drop(listener);
    drop(handoffs);
    acceptor.drain.cancel();
    connections.close();
    let started = tokio::time::Instant::now();
    if tokio::time::timeout(drain_timeout, connections.wait()).await.is_err() {
        tracing::warn!(
            open = connections.len(),
            "connections still open after the drain period; closing them"
        );
        acceptor.force_close.cancel();
        connections.wait().await;
    }
    state
        .forwarder
        .drain_relays(drain_timeout.saturating_sub(started.elapsed()))
        .await;
    acceptor.threads_done.cancel();
    for thread in threads {
        let _ = thread.await;
    }
    background.cancel();
    tasks.close();
    tasks.wait().await;
    Ok(())
}

/// Binds the listener the config `key` asks for; a failure names both.
async fn bind(addr: SocketAddr, key: &str) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr} ({key}): {e}")))
}

/// The answer hyper wrote by itself when it ended a connection with `error`
/// (see hyper's `role::Server::on_error`): 431 for a head over
/// `max_header_bytes`, 400 for any other unparsable head (bare LFs and
/// double framing included: `connection` makes the parser refuse them).
/// `None` when it wrote nothing (an HTTP/2 preface) or the error was no
/// parse error.
fn parser_refusal(error: &hyper::Error) -> Option<StatusCode> {
    if !error.is_parse() || error.is_parse_version_h2() {
        None
    } else if error.is_parse_too_large() {
        Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
    } else {
        Some(StatusCode::BAD_REQUEST)
    }
}

/// A connection accepted on one thread, for another to serve.
type Handoff = (std::net::TcpStream, SocketAddr);

/// What every serving thread shares.
#[derive(Clone)]
struct Acceptor {
    state: Arc<AppState>,
    endpoints: Router,
    /// Every connection, whichever thread serves it.
    connections: TaskTracker,
    /// Connections finish their current request and close.
    drain: CancellationToken,
    /// Connections close now (the drain period is over).
    force_close: CancellationToken,
    /// The extra threads may exit: their connections and relays are done.
    threads_done: CancellationToken,
    limits: Limits,
    max_header_bytes: usize,
}

impl Acceptor {
    /// Starts serving thread `index`: it serves the connections sent to it,
    /// and the receiver resolves once the thread has exited.
    fn start_thread(&self, index: usize) -> std::io::Result<(mpsc::UnboundedSender<Handoff>, oneshot::Receiver<()>)> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let (handoff, mut handed) = mpsc::unbounded_channel::<Handoff>();
        let (done, finished) = oneshot::channel();
        let acceptor = self.clone();
        std::thread::Builder::new()
            .name(format!("serve-{index}"))
            .spawn(move || {
                runtime.block_on(async move {
                    // Until the accept loop stops handing connections over.
                    while let Some((stream, peer)) = handed.recv().await {
                        match tokio::net::TcpStream::from_std(stream) {
                            Ok(stream) => acceptor.serve_connection(stream, peer),
                            Err(e) => tracing::warn!(error = %e, %peer, "cannot take a connection over"),
                        }
                    }
                    // This runtime runs its connections and the relays
                    // started on it: it lives until the drain is over.
                    acceptor.threads_done.cancelled().await;
                });
                drop(runtime);
                let _ = done.send(());
            })?;
        Ok((handoff, finished))
    }

    /// Serves one connection on the calling thread's runtime.
    fn serve_connection(&self, stream: tokio::net::TcpStream, peer: SocketAddr) {
        let _ = stream.set_nodelay(true);
        let conn = ConnState::new();
        let client = Peer::new(
            peer.ip(),
            self.state.config.server.behind_load_balancer,
            self.state.metrics.clone(),
        );
        let io = TokioIo::new(GuardedIo::new(stream, conn.clone(), self.limits, client.clone()));
        let service = Handler::new(self.state.clone(), self.endpoints.clone(), client.clone(), conn.clone());
        let drain = self.drain.clone();
        let force_close = self.force_close.clone();
        let max_header_bytes = self.max_header_bytes;
        self.connections.spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                // hyper's own head timer also runs on idle keep-alive
                // connections; GuardedIo enforces both limits separately.
                .header_read_timeout(None)
                .max_header_size(max_header_bytes)
                .keep_alive(true)
                .serve_connection(io, service)
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
                if let Some(status) = parser_refusal(&e) {
                    access::refused(&client, status, conn.in_phase_for());
                }
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
        });
    }
}
