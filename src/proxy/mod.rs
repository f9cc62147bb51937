//! Forwarding one request to the user's backend: streaming both ways,
//! never buffering, with WebSocket (any `Upgrade`) relayed as raw bytes.
//!
//! - [`headers`]: the request head as forwarded: hop-by-hop removal, identity and `X-Forwarded-*` headers.
//! - `hop`: which headers are hop-by-hop, shared by both directions.
//! - [`upstream`]: the pooled HTTP/1.1 client that talks to the backend.
//! - [`activity_io`]: body and socket wrappers that report activity.

pub mod activity_io;
pub mod headers;
mod hop;
pub mod upstream;

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body::Frame;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::io::{copy_bidirectional_with_sizes, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;
use crate::net::connection::GuardedIo;
use crate::session::Session;
use activity_io::{ActivityBody, ActivityIo, Touch};
use headers::Forwarded;
use upstream::{BodyReader, Outgoing, UpstreamError, Upstreams};

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
        source: UpstreamError,
    },
    /// The exchange failed after the request was (partly) sent.
    #[error("upstream {upstream} failed: {source}")]
    Exchange {
        upstream: String,
        #[source]
        source: UpstreamError,
    },
    /// The client's own request body failed (malformed chunking, a reset):
    /// the client's fault, not the upstream's.
    #[error("client request body failed while forwarding to {upstream}")]
    ClientBody { upstream: String },
    #[error("upstream {upstream} switched protocols without being asked")]
    UnrequestedUpgrade { upstream: String },
}

/// Any error a body can fail with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The request-independent part of forwarding: the pooled connections, and
/// the relays of upgraded connections (which the HTTP server no longer
/// tracks).
pub struct Forwarder {
    upstreams: Arc<Upstreams>,
    relays: TaskTracker,
    /// Cancelled at the end of a drain: every relay still open closes.
    stop_relays: CancellationToken,
    router_cookies: Vec<String>,
    metrics: Arc<Metrics>,
}

/// What the caller knows about the request being forwarded.
#[derive(Clone, Copy)]
pub struct Exchange<'a> {
    pub session: &'a Arc<Session>,
    pub client_ip: &'a str,
    /// Whether bytes of this exchange count as user activity.
    pub counts_as_activity: bool,
    /// The request asks to switch protocols (see [`headers::is_upgrade`]).
    pub upgrade: bool,
}

impl Forwarder {
    /// `router_cookies` are the router's own cookie names, never forwarded.
    pub fn new(connect_timeout: Duration, router_cookies: Vec<String>, metrics: Arc<Metrics>) -> Self {
        let upstreams = Arc::new(Upstreams::new(connect_timeout, POOL_IDLE_TIMEOUT));
        let pool = Arc::downgrade(&upstreams);
        metrics
            .upstream_idle_connections
            .read_from(move || pool.upgrade().map_or(0, |pool| pool.idle_connections() as i64));
        Forwarder {
            upstreams,
            relays: TaskTracker::new(),
            stop_relays: CancellationToken::new(),
            router_cookies,
            metrics,
        }
    }

    /// Open WebSocket (and other upgraded) relays.
    pub fn open_relays(&self) -> usize {
        self.relays.len()
    }

    /// Closes pooled connections idle too long. Called periodically.
    pub fn prune_idle(&self) {
        self.upstreams.prune_idle();
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
        let client_upgrade = exchange.upgrade.then(|| hyper::upgrade::on(&mut request));
        let (parts, body) = request.into_parts();
        let has_body = !body.is_end_stream();
        let mut head = Vec::with_capacity(1024);
        let framing = headers::write_request_head(
            &mut head,
            &parts,
            upstream,
            &Forwarded {
                client_ip: exchange.client_ip,
                identity: &session.identity,
                router_cookies: &self.router_cookies,
                upgrade: exchange.upgrade,
            },
            has_body,
        );
        let counts = exchange.counts_as_activity;
        let body = ActivityBody::new(body, Touch((counts && has_body).then(|| session.clone())));

        let in_flight = exchange
            .counts_as_activity
            .then(|| crate::session::Activity::begin(session));
        let sent = tokio::time::Instant::now();
        let outgoing = Outgoing {
            head,
            framing,
            idempotent: parts.method.is_idempotent(),
            head_request: parts.method == Method::HEAD,
        };
        let result = self.upstreams.send(upstream, outgoing, body).await;
        if let Some(in_flight) = in_flight {
            match &result {
                // The backend never saw it: not activity, or the 502 page's
                // reloads would keep a dead backend held forever.
                Err(source) if source.is_connect() => in_flight.unanswered(),
                _ => drop(in_flight),
            }
        }
        let mut response = result.map_err(|source| {
            let upstream = upstream.to_string();
            match source {
                UpstreamError::ClientBody(_) => ProxyError::ClientBody { upstream },
                source if source.is_connect() => ProxyError::Connect { upstream, source },
                source => ProxyError::Exchange { upstream, source },
            }
        })?;
        self.metrics
            .upstream_header_seconds
            .observe(sent.elapsed().as_secs_f64());

        let mut answer = Response::new(UpstreamBody(None));
        *answer.status_mut() = response.status;
        *answer.headers_mut() = std::mem::take(&mut response.headers);
        if let Some(upgraded) = response.take_upgraded() {
            let Some(client_upgrade) = client_upgrade else {
                return Err(ProxyError::UnrequestedUpgrade {
                    upstream: upstream.to_string(),
                });
            };
            self.relays.spawn(relay(
                client_upgrade,
                upgraded,
                session.clone(),
                self.stop_relays.clone(),
                self.metrics.clone(),
            ));
            return Ok(answer);
        }
        *answer.body_mut() = UpstreamBody(
            response
                .take_body()
                .map(|body| ActivityBody::new(body, Touch(counts.then(|| session.clone())))),
        );
        Ok(answer)
    }
}

/// A response body from the upstream as the client receives it, touching
/// the session while its bytes move. Empty after a 101.
pub struct UpstreamBody(Option<ActivityBody<BodyReader>>);

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = UpstreamError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
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
    upstream: upstream::Upgraded,
    session: Arc<Session>,
    stop: CancellationToken,
    metrics: Arc<Metrics>,
) {
    let client = match client.await {
        Ok(client) => client,
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

/// Relays both ways until both directions are closed. On the plain socket
/// the server produces (always, in practice), no buffer is held while a
/// socket is silent: one is taken when it becomes readable and given back
/// once it has nothing more to read. Anything else falls back to a
/// buffered copy.
async fn copy_both_ways(client: Upgraded, upstream: upstream::Upgraded, session: &Arc<Session>) -> io::Result<()> {
    let upstream::Upgraded { io: upstream, pending } = upstream;
    match client.downcast::<ClientSocket>() {
        Ok(client) => {
            let (client_read, client_write) = client.io.into_inner().into_inner().into_split();
            let (upstream_read, upstream_write) = upstream.into_split();
            tokio::try_join!(
                pipe(client_read, upstream_write, client.read_buf, session),
                pipe(upstream_read, client_write, pending, session),
            )?;
            Ok(())
        }
        Err(client) => {
            let mut client = ActivityIo::new(TokioIo::new(client), session.clone());
            let mut upstream = ActivityIo::new(upstream, session.clone());
            client.write_all(&pending).await?;
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
