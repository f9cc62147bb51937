//! The listening side: the accept loop, the serving threads and the drain
//! on shutdown, over guarded sockets. Generic over the per-request service
//! it is given for each connection: it knows no handler and no router
//! error, so every layer above can use it and none below needs to.
//!
//! - [`connection`]: per-connection time limits and head hygiene under hyper.
//! - `refusal`: the 414 written on the raw socket for an over-long request line.

pub mod connection;
mod refusal;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;
use crate::telemetry::access::{self, Peer};
use connection::{ConnState, GuardedIo, Limits};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How connections are served, whatever serves their requests.
#[derive(Clone)]
pub struct Settings {
    pub limits: Limits,
    pub max_header_bytes: usize,
    /// Serving threads, this one included.
    pub threads: usize,
    /// Whether the peer's address comes from `X-Forwarded-For`.
    pub behind_load_balancer: bool,
    pub metrics: Arc<Metrics>,
}

/// The accept loop and its serving threads. `make_service` gives each
/// connection its request handler, from its peer and its state.
pub struct Server<F> {
    acceptor: Acceptor<F>,
    handoffs: Vec<mpsc::UnboundedSender<Handoff>>,
    threads: Vec<oneshot::Receiver<()>>,
    /// However the server ends (even dropped mid-way), the other threads
    /// exit once their connections are gone.
    _release_threads: DropGuard,
}

impl<F, S, B> Server<F>
where
    F: Fn(Arc<Peer>, Arc<ConnState>) -> S + Clone + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    /// Starts the serving threads beyond this one: each with a
    /// single-threaded runtime of its own (see `app::serve` for why).
    pub fn start(settings: Settings, make_service: F) -> std::io::Result<Self> {
        let acceptor = Acceptor {
            make_service,
            connections: TaskTracker::new(),
            drain: CancellationToken::new(),
            force_close: CancellationToken::new(),
            threads_done: CancellationToken::new(),
            settings,
        };
        let release_threads = acceptor.threads_done.clone().drop_guard();
        let mut threads = Vec::new();
        let mut handoffs = Vec::new();
        for index in 1..acceptor.settings.threads {
            let (handoff, done) = acceptor.start_thread(index)?;
            handoffs.push(handoff);
            threads.push(done);
        }
        Ok(Server {
            acceptor,
            handoffs,
            threads,
            _release_threads: release_threads,
        })
    }

    /// Accepts connections on `listener`, round robin over the threads,
    /// until `shutdown` resolves; then closes the listener.
    pub async fn accept(&mut self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        let acceptor = &self.acceptor;
        let handoffs = &self.handoffs;
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
        drop(listener);
        self.handoffs.clear();
    }
}

impl<F> Server<F> {
    /// Connections open now, on every thread.
    pub fn open_connections(&self) -> usize {
        self.acceptor.connections.len()
    }

    /// Lets every connection finish its current request and close, for up
    /// to `within`; then closes what is left.
    pub async fn drain(&self, within: Duration) {
        let connections = &self.acceptor.connections;
        self.acceptor.drain.cancel();
        connections.close();
        if tokio::time::timeout(within, connections.wait()).await.is_err() {
            tracing::warn!(
                open = connections.len(),
                "connections still open after the drain period; closing them"
            );
            self.acceptor.force_close.cancel();
            connections.wait().await;
        }
    }

    /// Lets the other threads exit, and waits until they have. Their
    /// runtimes also run what connections started on them (relays): call
    /// this once those are done too.
    pub async fn stop_threads(self) {
        self.acceptor.threads_done.cancel();
        for thread in self.threads {
            let _ = thread.await;
        }
    }
}

/// Binds the listener the config `key` asks for; a failure names both.
pub async fn bind(addr: SocketAddr, key: &str) -> std::io::Result<TcpListener> {
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
struct Acceptor<F> {
    make_service: F,
    /// Every connection, whichever thread serves it.
    connections: TaskTracker,
    /// Connections finish their current request and close.
    drain: CancellationToken,
    /// Connections close now (the drain period is over).
    force_close: CancellationToken,
    /// The extra threads may exit: their connections and relays are done.
    threads_done: CancellationToken,
    settings: Settings,
}

impl<F, S, B> Acceptor<F>
where
    F: Fn(Arc<Peer>, Arc<ConnState>) -> S + Clone + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
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
        let settings = &self.settings;
        let client = Peer::new(peer.ip(), settings.behind_load_balancer, settings.metrics.clone());
        let io = TokioIo::new(GuardedIo::new(stream, conn.clone(), settings.limits, client.clone()));
        let service = (self.make_service)(client.clone(), conn.clone());
        let drain = self.drain.clone();
        let force_close = self.force_close.clone();
        let max_header_bytes = settings.max_header_bytes;
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
