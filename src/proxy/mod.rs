//! Forwarding one request to the user's backend: streaming both ways,
//! never buffering, with WebSocket (any `Upgrade`) relayed as raw bytes.
//!
//! - [`headers`]: hop-by-hop removal, identity and `X-Forwarded-*` headers.
//! - [`activity_io`]: body and socket wrappers that report activity.

pub mod activity_io;
pub mod headers;

use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri};
use http_body::Frame;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{copy_bidirectional_with_sizes, AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;
use crate::server::connection::GuardedIo;
use crate::session::cookie::remove_cookies;
use crate::session::Session;
use activity_io::{ActivityBody, ActivityIo};
use headers::Forwarded;

/// Per-direction buffer of a WebSocket relay, held only while bytes move:
/// an idle socket holds none (see [`pipe`]).
const RELAY_BUFFER_BYTES: usize = 8 * 1024;
/// Pooled upstream connections idle longer than this are closed.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// Nothing was sent: the upstream could not be reached.
    #[error("cannot connect to upstream {upstream}: {source}")]
    Connect {
        upstream: String,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    /// The exchange failed after the request was (partly) sent.
    #[error("upstream {upstream} failed: {source}")]
    Exchange {
        upstream: String,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    /// The client's own request body failed (malformed chunking, a reset):
    /// the client's fault, not the upstream's.
    #[error("client request body failed while forwarding to {upstream}")]
    ClientBody { upstream: String },
    #[error("upstream {upstream} switched protocols without being asked")]
    UnrequestedUpgrade { upstream: String },
    #[error("cannot build an upstream URI: {0}")]
    Uri(#[from] http::Error),
}

/// Any error a body can fail with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// A request body on its way upstream, boxed once whatever the client sent.
type Outgoing = UnsyncBoxBody<Bytes, BoxError>;

/// The request-independent part of forwarding: the pooled client, and the
/// relays of upgraded connections (which the HTTP server no longer tracks).
pub struct Forwarder {
    client: Client<HttpConnector, Outgoing>,
    relays: TaskTracker,
    /// Cancelled at the end of a drain: every relay still open closes.
    stop_relays: CancellationToken,
    strip_cookies: Vec<String>,
    metrics: Arc<Metrics>,
}

/// What the caller knows about the request being forwarded.
pub struct Exchange<'a> {
    pub session: &'a Arc<Session>,
    pub client_ip: IpAddr,
    /// Whether bytes of this exchange count as user activity.
    pub counts_as_activity: bool,
}

impl Forwarder {
    /// `strip_cookies` are the router's own cookie names, never forwarded.
    pub fn new(connect_timeout: Duration, strip_cookies: Vec<String>, metrics: Arc<Metrics>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .build(connector);
        Forwarder {
            client,
            relays: TaskTracker::new(),
            stop_relays: CancellationToken::new(),
            strip_cookies,
            metrics,
        }
    }

    /// Open WebSocket (and other upgraded) relays.
    pub fn open_relays(&self) -> usize {
        self.relays.len()
    }

    /// Waits for relays to end by themselves for up to `grace`, then closes
    /// the rest.
    pub async fn drain_relays(&self, grace: Duration) {
        self.relays.close();
        if tokio::time::timeout(grace, self.relays.wait()).await.is_err() {
            tracing::info!(
                open = self.relays.len(),
                "closing relays still open after the drain period"
            );
            self.stop_relays.cancel();
            self.relays.wait().await;
        }
    }

    pub async fn forward<B>(
        &self,
        mut request: Request<B>,
        exchange: Exchange<'_>,
    ) -> Result<Response<UpstreamBody>, ProxyError>
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        let session = exchange.session;
        let upstream = &session.lease.upstream;
        let wants_upgrade = headers::is_upgrade(request.headers());
        let client_upgrade = wants_upgrade.then(|| hyper::upgrade::on(&mut request));

        let (mut parts, body) = request.into_parts();
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        parts.uri = Uri::builder()
            .scheme("http")
            .authority(upstream.clone())
            .path_and_query(path)
            .build()?;
        parts.version = http::Version::HTTP_11;
        headers::to_upstream(
            &mut parts.headers,
            &Forwarded {
                client_ip: exchange.client_ip,
                identity: &session.identity,
            },
        );
        let names: Vec<&str> = self.strip_cookies.iter().map(String::as_str).collect();
        remove_cookies(&mut parts.headers, &names);
        let client_body_failed = Arc::new(AtomicBool::new(false));
        let activity = exchange.counts_as_activity.then(|| session.clone());
        let body = ActivityBody::request(body, activity, client_body_failed.clone())
            .map_err(Into::into)
            .boxed_unsync();

        let in_flight = exchange
            .counts_as_activity
            .then(|| crate::session::Activity::begin(session));
        let sent = tokio::time::Instant::now();
        let result = self.client.request(Request::from_parts(parts, body)).await;
        drop(in_flight);
        if result.is_ok() {
            self.metrics
                .upstream_header_seconds
                .observe(sent.elapsed().as_secs_f64());
        }
        let mut response = result.map_err(|source| {
            let upstream = upstream.to_string();
            if client_body_failed.load(Ordering::Acquire) {
                ProxyError::ClientBody { upstream }
            } else if source.is_connect() {
                ProxyError::Connect { upstream, source }
            } else {
                ProxyError::Exchange { upstream, source }
            }
        })?;

        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            let Some(client_upgrade) = client_upgrade else {
                return Err(ProxyError::UnrequestedUpgrade {
                    upstream: upstream.to_string(),
                });
            };
            let upstream_upgrade = hyper::upgrade::on(&mut response);
            self.relays.spawn(relay(
                client_upgrade,
                upstream_upgrade,
                session.clone(),
                self.stop_relays.clone(),
                self.metrics.clone(),
            ));
            let (mut parts, _) = response.into_parts();
            headers::to_client(&mut parts.headers, true);
            return Ok(Response::from_parts(parts, UpstreamBody(None)));
        }

        let (mut parts, body) = response.into_parts();
        headers::to_client(&mut parts.headers, false);
        let activity = exchange.counts_as_activity.then(|| session.clone());
        Ok(Response::from_parts(
            parts,
            UpstreamBody(Some(ActivityBody::response(body, activity))),
        ))
    }
}

/// A response body from the upstream as the client receives it, touching
/// the session while its bytes move. Empty after a 101.
pub struct UpstreamBody(Option<ActivityBody<Incoming>>);

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match &mut self.0 {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.as_ref().is_none_or(http_body::Body::is_end_stream)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match &self.0 {
            Some(body) => body.size_hint(),
            None => http_body::SizeHint::with_exact(0),
        }
    }
}

/// Copies bytes both ways between the client and the upstream after a 101,
/// until either side closes, the session's backend is released, or the
/// drain period ends. Bytes are copied as they come: no framing, no size cap.
async fn relay(
    client: OnUpgrade,
    upstream: OnUpgrade,
    session: Arc<Session>,
    stop: CancellationToken,
    metrics: Arc<Metrics>,
) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade did not complete");
            return;
        }
    };
    metrics.open_websockets.inc();
    let _open = scopeguard(|| metrics.open_websockets.dec());
    tokio::select! {
        copied = copy_both_ways(client, upstream, &session) => {
            if let Err(e) = copied {
                tracing::debug!(error = %e, backend = %session.lease, "relay ended with an error");
            }
        }
        _ = session.closed() => {
            tracing::debug!(backend = %session.lease, "relay closed: backend released");
        }
        _ = stop.cancelled() => {}
    }
}

/// The client side of an upgrade, as the accept loop wrapped it.
type ClientSocket = TokioIo<GuardedIo<TcpStream>>;
/// The upstream side, as the connector made it.
type UpstreamSocket = TokioIo<TcpStream>;

/// Relays both ways until both directions are closed. On the plain sockets
/// the server and the connector produce (always, in practice), no buffer is
/// held while a socket is silent: one is taken when it becomes readable and
/// given back once it has nothing more to read. Anything else falls back to
/// a buffered copy.
async fn copy_both_ways(client: Upgraded, upstream: Upgraded, session: &Arc<Session>) -> io::Result<()> {
    match (client.downcast::<ClientSocket>(), upstream.downcast::<UpstreamSocket>()) {
        (Ok(client), Ok(upstream)) => {
            let (client_read, client_write) = client.io.into_inner().into_inner().into_split();
            let (upstream_read, upstream_write) = upstream.io.into_inner().into_split();
            tokio::try_join!(
                pipe(client_read, upstream_write, client.read_buf, session),
                pipe(upstream_read, client_write, upstream.read_buf, session),
            )?;
            Ok(())
        }
        (client, upstream) => {
            let client = client.map(|p| Prefixed::new(p.read_buf, p.io.into_inner().into_inner()));
            let upstream = upstream.map(|p| Prefixed::new(p.read_buf, p.io.into_inner()));
            let mut client = ActivityIo::new(Either::from(client), session.clone());
            let mut upstream = ActivityIo::new(Either::from(upstream), session.clone());
            copy_bidirectional_with_sizes(&mut client, &mut upstream, RELAY_BUFFER_BYTES, RELAY_BUFFER_BYTES).await?;
            Ok(())
        }
    }
}

/// One direction: `pending` (bytes read past the handshake) first, then
/// whatever `from` delivers until it closes; then `to` is shut down, which
/// passes the half-close on.
async fn pipe(from: OwnedReadHalf, mut to: OwnedWriteHalf, pending: Bytes, session: &Arc<Session>) -> io::Result<()> {
    if !pending.is_empty() {
        session.activity.touch();
        to.write_all(&pending).await?;
    }
    drop(pending);
    loop {
        from.readable().await?;
        let mut buf = Vec::with_capacity(RELAY_BUFFER_BYTES);
        loop {
            buf.clear();
            match from.try_read_buf(&mut buf) {
                Ok(0) => return to.shutdown().await,
                Ok(n) => {
                    session.activity.touch();
                    to.write_all(&buf[..n]).await?;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
    }
}

/// A socket some of whose bytes were already read (past the handshake).
struct Prefixed {
    pending: Bytes,
    io: TcpStream,
}

impl Prefixed {
    fn new(pending: Bytes, io: TcpStream) -> Self {
        Prefixed { pending, io }
    }
}

/// Either a plain socket or whatever else an upgrade produced.
enum Either {
    Plain(Prefixed),
    Other(TokioIo<Upgraded>),
}

impl From<Result<Prefixed, Upgraded>> for Either {
    fn from(side: Result<Prefixed, Upgraded>) -> Self {
        match side {
            Ok(plain) => Either::Plain(plain),
            Err(other) => Either::Other(TokioIo::new(other)),
        }
    }
}

impl AsyncRead for Either {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Either::Plain(p) => {
                if !p.pending.is_empty() {
                    let n = p.pending.len().min(buf.remaining());
                    buf.put_slice(&p.pending.split_to(n));
                    return Poll::Ready(Ok(()));
                }
                Pin::new(&mut p.io).poll_read(cx, buf)
            }
            Either::Other(o) => Pin::new(o).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Either {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Either::Plain(p) => Pin::new(&mut p.io).poll_write(cx, buf),
            Either::Other(o) => Pin::new(o).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Either::Plain(p) => Pin::new(&mut p.io).poll_flush(cx),
            Either::Other(o) => Pin::new(o).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Either::Plain(p) => Pin::new(&mut p.io).poll_shutdown(cx),
            Either::Other(o) => Pin::new(o).poll_shutdown(cx),
        }
    }
}

/// Runs `f` when dropped, however the scope ends.
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}
