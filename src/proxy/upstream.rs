//! The HTTP/1.1 client side: one request at a time over pooled keep-alive
//! connections to the backends.
//!
//! Written for the proxy's needs instead of using a general client, which
//! runs every connection as a task of its own and hands each request and
//! response across a channel: two task wake-ups per request, a shared pool
//! behind a lock, and a task spawned per response to return the connection.
//! Here the request's own task writes the head, the response body is read
//! from the socket by whoever polls it (hyper's server, sending it on to the
//! client), and the connection goes back to the pool when the body ends.
//!
//! What it does, per RFC 9112:
//! - request bodies go with their `Content-Length`, or re-chunked when the
//!   client sent them chunked; a response that arrives while the body is
//!   still being sent is returned at once (and the connection not reused);
//! - `1xx` responses other than `101` are skipped; a `101` hands the raw
//!   socket, and any bytes already read past the head, to the caller;
//! - response bodies are framed by method and status (no body for `HEAD`,
//!   `204`, `304`), then `Transfer-Encoding: chunked`, then
//!   `Content-Length`, else by the connection closing; conflicting or
//!   unreadable framing is an error, never a guess;
//! - a connection is reused only after a complete response that did not
//!   ask to close, with nothing left over; an idle one the backend closed
//!   is noticed without a system call (the reactor saw the FIN), and a
//!   request without a body that meets a connection closed under it is
//!   sent once more on a new one.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::FutureExt;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::Authority;
use http::StatusCode;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::hop::{is_hop_by_hop, tokens};
use super::BoxError;
use crate::util::locked;

/// Read buffer of a connection; a body streams through it in reads of up
/// to this size.
const READ_BUFFER_BYTES: usize = 16 * 1024;
/// A response head larger than this is refused (hyper's server default is
/// about as large for requests).
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Response headers beyond this many are refused.
const MAX_HEADERS: usize = 128;
/// A chunk-size line longer than this is not one.
const MAX_CHUNK_LINE: usize = 1024;
/// Request bodies whose first part is at most this large go out in the
/// same write as the head.
const COALESCE_BYTES: usize = 16 * 1024;
/// Below the shortest keep-alive timeout a backend is likely to have
/// (uvicorn, which serves Gradio, closes idle connections after 5 s), so a
/// connection this fresh is not being closed as a request is written to it.
const SAFE_IDLE: Duration = Duration::from_secs(4);
/// Idle connections kept per backend; more are closed.
const MAX_IDLE_PER_UPSTREAM: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Nothing was sent.
    #[error("connect: {0}")]
    Connect(#[source] io::Error),
    #[error("connect: timed out after {0:?}")]
    ConnectTimeout(Duration),
    /// The connection failed after (part of) the request was written.
    #[error("{0}")]
    Io(#[source] io::Error),
    #[error("closed the connection before answering")]
    ClosedBeforeResponse,
    #[error("closed the connection in the middle of the response body")]
    ClosedInBody,
    #[error("malformed response: {0}")]
    Malformed(&'static str),
    /// The client's request body failed while it was being forwarded.
    #[error("client body: {0}")]
    ClientBody(#[source] BoxError),
}

impl UpstreamError {
    /// True when the backend cannot have seen any of the request.
    pub fn is_connect(&self) -> bool {
        matches!(self, UpstreamError::Connect(_) | UpstreamError::ConnectTimeout(_))
    }
}

/// The pooled connections: one pool per serving thread, so that checking
/// a connection out and back in touches nothing another core touches (the
/// threads serve their own connections, see `app::serve`), and a
/// socket is only ever used from the thread whose runtime registered it.
pub struct Upstreams {
    /// Tells this instance's pools apart from another's in a thread's list.
    id: usize,
    /// Every thread's pool, for pruning.
    pools: Mutex<Vec<Arc<ThreadPool>>>,
    connect_timeout: Duration,
    idle_timeout: Duration,
}

/// One thread's idle connections, by the backend's `host:port` as the
/// lease spells it. Locked by its own thread (uncontended) and, briefly,
/// by the pruner.
#[derive(Default)]
struct ThreadPool {
    idle: Mutex<HashMap<Arc<str>, Vec<Idle>, foldhash::fast::RandomState>>,
}

thread_local! {
    /// This thread's pools, by `Upstreams::id`.
    static POOLS: RefCell<Vec<(usize, Weak<ThreadPool>)>> = const { RefCell::new(Vec::new()) };
}

static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

struct Idle {
    conn: Conn,
    since: Instant,
}

/// One connection to a backend and the bytes read from it so far.
struct Conn {
    io: TcpStream,
    buf: BytesMut,
    /// Came from the pool (so the backend may have closed it meanwhile).
    reused: bool,
    /// Where it goes back to: its thread's pool (weak: the pool holds
    /// its idle connections), under the backend's key.
    home: (Weak<ThreadPool>, Arc<str>),
}

/// The head of a response, and what the response body needs.
pub struct ResponseHead {
    pub status: StatusCode,
    /// Without hop-by-hop headers (a 101 keeps `Connection`/`Upgrade`).
    pub headers: HeaderMap,
    body: Option<BodyReader>,
    upgraded: Option<Upgraded>,
}

/// The raw socket after a `101`, and what was read past the head.
pub struct Upgraded {
    pub io: TcpStream,
    pub pending: Bytes,
}

/// A request as it goes up: its head in wire form, and what the client
/// needs to know about it.
pub struct Outgoing {
    pub head: Vec<u8>,
    pub framing: RequestFraming,
    /// Safe to send twice (RFC 9110 §9.2.2).
    pub idempotent: bool,
    /// `HEAD`: the response has no body whatever its headers say.
    pub head_request: bool,
}

/// How the request body is framed on the way up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFraming {
    /// No body.
    Empty,
    /// `Content-Length` is among the headers already written.
    Length,
    /// The head says `Transfer-Encoding: chunked`; the body is re-chunked.
    Chunked,
}

impl Upstreams {
    pub fn new(connect_timeout: Duration, idle_timeout: Duration) -> Self {
        Upstreams {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            pools: Mutex::new(Vec::new()),
            connect_timeout,
            idle_timeout,
        }
    }

    /// The calling thread's pool, made on its first use.
    fn local_pool(&self) -> Arc<ThreadPool> {
        POOLS.with(|pools| {
            let mut pools = pools.borrow_mut();
            if let Some(pool) = pools
                .iter()
                .find(|(id, _)| *id == self.id)
                .and_then(|(_, p)| p.upgrade())
            {
                return pool;
            }
            // Forget pools of instances that are gone, then make this one's.
            pools.retain(|(_, pool)| pool.strong_count() > 0);
            let pool = Arc::new(ThreadPool::default());
            locked(&self.pools).push(pool.clone());
            pools.push((self.id, Arc::downgrade(&pool)));
            pool
        })
    }

    /// Sends one request — its head already serialised, `body` framed as
    /// `framing` says — and reads the response head.
    pub async fn send<B>(
        self: &Arc<Self>,
        upstream: &Authority,
        request: Outgoing,
        body: B,
    ) -> Result<ResponseHead, UpstreamError>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        let Outgoing {
            mut head,
            framing,
            idempotent,
            head_request,
        } = request;
        let mut body = Some(body);
        // An idempotent request without a body can go again if a pooled
        // connection turns out to have been closed under it (before a byte
        // of the response); any other request cannot.
        let mut may_resend = framing == RequestFraming::Empty && idempotent;
        loop {
            // Connecting and sending a body are boxed: they are the rarer
            // paths, and inline their state would enlarge every request's
            // future (moved at each await above it).
            let mut conn = match self.checkout(upstream, may_resend) {
                Some(conn) => conn,
                None => Box::pin(self.connect(upstream)).await?,
            };
            let result = match (framing, body.take()) {
                (RequestFraming::Empty, _) | (_, None) => conn.send_head(&head).await,
                (framing, Some(body)) => Box::pin(conn.send_with_body(&mut head, body, framing)).await,
            };
            let early = match result {
                Ok(early) => early,
                Err(e) if conn.reused && may_resend && conn.buf.is_empty() => {
                    tracing::debug!(%upstream, error = %e, "pooled connection was closed; sending again");
                    may_resend = false;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let reused = conn.reused;
            match conn.read_head(head_request).await {
                Ok(mut response) => {
                    if let Some(reader) = &mut response.body {
                        reader.reusable &= !early;
                    }
                    return Ok(response);
                }
                Err(e @ (UpstreamError::ClosedBeforeResponse | UpstreamError::Io(_))) if reused && may_resend => {
                    tracing::debug!(%upstream, error = %e, "pooled connection was closed; sending again");
                    may_resend = false;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// An idle connection of this thread's that still looks open, if there
    /// is one. A request that could not be sent again (`may_resend` false)
    /// only takes one idle for less than [`SAFE_IDLE`]: a backend may be
    /// closing an older one at this very moment.
    fn checkout(&self, upstream: &Authority, may_resend: bool) -> Option<Conn> {
        let pool = self.local_pool();
        let mut idle = locked(&pool.idle);
        let idle = idle.get_mut(upstream.as_str())?;
        let limit = if may_resend {
            self.idle_timeout
        } else {
            self.idle_timeout.min(SAFE_IDLE)
        };
        while let Some(Idle { mut conn, since }) = idle.pop() {
            if since.elapsed() < limit && conn.looks_open() {
                conn.reused = true;
                return Some(conn);
            }
        }
        None
    }

    async fn connect(&self, upstream: &Authority) -> Result<Conn, UpstreamError> {
        let port = upstream.port_u16().unwrap_or(80);
        // An IPv6 authority is `[::1]:7860`; the address is what is inside.
        let host = upstream.host().trim_start_matches('[').trim_end_matches(']');
        let connecting = TcpStream::connect((host, port));
        let io = match tokio::time::timeout(self.connect_timeout, connecting).await {
            Ok(Ok(io)) => io,
            Ok(Err(e)) => return Err(UpstreamError::Connect(e)),
            Err(_) => return Err(UpstreamError::ConnectTimeout(self.connect_timeout)),
        };
        let _ = io.set_nodelay(true);
        let pool = self.local_pool();
        let key = {
            let idle = locked(&pool.idle);
            idle.get_key_value(upstream.as_str()).map(|(key, _)| key.clone())
        };
        let key = key.unwrap_or_else(|| upstream.as_str().into());
        Ok(Conn {
            io,
            buf: BytesMut::with_capacity(READ_BUFFER_BYTES),
            reused: false,
            home: (Arc::downgrade(&pool), key),
        })
    }

    /// Closes connections idle past the idle timeout, and forgets the pools
    /// of threads that have exited once they are empty. Called
    /// periodically.
    pub fn prune_idle(&self) {
        locked(&self.pools).retain(|pool| {
            let mut idle = locked(&pool.idle);
            idle.retain(|_, conns| {
                conns.retain(|i| i.since.elapsed() < self.idle_timeout);
                !conns.is_empty()
            });
            // Its thread (and any connection checked out from it) still
            // holds it weakly, or the thread is gone.
            !idle.is_empty() || Arc::weak_count(pool) > 0
        });
    }

    /// Idle pooled connections, all threads and backends together.
    pub fn idle_connections(&self) -> usize {
        locked(&self.pools)
            .iter()
            .map(|pool| locked(&pool.idle).values().map(Vec::len).sum::<usize>())
            .sum()
    }
}

impl Conn {
    /// Puts a connection with a complete exchange behind it back into its
    /// thread's pool.
    fn check_in(self) {
        let (pool, key) = self.home.clone();
        // The pool's instance is gone: the connection closes.
        let Some(pool) = pool.upgrade() else {
            return;
        };
        let mut idle = locked(&pool.idle);
        let conns = idle.entry(key).or_default();
        if conns.len() < MAX_IDLE_PER_UPSTREAM {
            conns.push(Idle {
                conn: self,
                since: Instant::now(),
            });
        }
    }
}

impl Conn {
    /// Whether an idle connection can take a request: the reactor has seen
    /// nothing on it (no FIN, no stray bytes), which costs no system call;
    /// if it has, one read tells.
    fn looks_open(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match self.io.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                matches!(self.io.try_read(&mut [0u8; 1]), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }

    async fn send_head(&mut self, head: &[u8]) -> Result<bool, UpstreamError> {
        self.io.write_all(head).await.map_err(UpstreamError::Io)?;
        Ok(false)
    }

    /// Writes the head and streams the body, watching for a response that
    /// comes before the body is done (then `Ok(true)`: the rest of the body
    /// is not sent and the connection will not be reused).
    async fn send_with_body<B>(
        &mut self,
        head: &mut Vec<u8>,
        mut body: B,
        framing: RequestFraming,
    ) -> Result<bool, UpstreamError>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        let chunked = framing == RequestFraming::Chunked;
        // The first part of a small body usually is there already: one
        // write for head and body.
        let mut ended = false;
        if let Some(first) = body.frame().now_or_never() {
            match first {
                None => ended = true,
                Some(Err(e)) => return Err(UpstreamError::ClientBody(e.into())),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        if data.len() <= COALESCE_BYTES {
                            encode_chunk(head, &data, chunked);
                        } else {
                            self.io.write_all(head).await.map_err(UpstreamError::Io)?;
                            head.clear();
                            write_chunk(&mut self.io, data, chunked).await?;
                        }
                    }
                }
            }
        }
        if ended && chunked {
            head.extend_from_slice(b"0\r\n\r\n");
        }
        self.io.write_all(head).await.map_err(UpstreamError::Io)?;
        if ended {
            return Ok(false);
        }

        let (mut reader, mut writer) = self.io.split();
        let buf = &mut self.buf;
        let sending = async {
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| UpstreamError::ClientBody(e.into()))?;
                if let Ok(data) = frame.into_data() {
                    write_chunk(&mut writer, data, chunked).await?;
                }
            }
            if chunked {
                writer.write_all(b"0\r\n\r\n").await.map_err(UpstreamError::Io)?;
            }
            Ok::<(), UpstreamError>(())
        };
        // A final response head (or the connection ending) before the body
        // is sent: the backend answered early. Interim 1xx heads are
        // dropped here; `read_head` parses the final one.
        let answered = std::future::poll_fn(|cx| loop {
            match head_status(buf) {
                Ok(Some((len, status))) if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS => {
                    buf.advance(len);
                    continue;
                }
                Ok(Some(_)) | Err(_) => return Poll::Ready(()),
                Ok(None) => {}
            }
            match poll_fill(&mut reader, buf, cx) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Ready(Ok(_)) => {}
                Poll::Pending => return Poll::Pending,
            }
        });
        tokio::select! {
            biased;
            sent = sending => match sent {
                Ok(()) => Ok(false),
                // The backend may have answered and closed: let the
                // response (if any) speak for itself.
                Err(UpstreamError::Io(_)) => Ok(true),
                Err(e) => Err(e),
            },
            _ = answered => Ok(true),
        }
    }

    /// Reads until a final response head (skipping `1xx` but `101`).
    async fn read_head(mut self, head_request: bool) -> Result<ResponseHead, UpstreamError> {
        loop {
            if let Some(parsed) = take_head(&mut self.buf)? {
                if parsed.status.is_informational() && parsed.status != StatusCode::SWITCHING_PROTOCOLS {
                    continue;
                }
                return Ok(self.into_response(parsed, head_request));
            }
            if self.buf.len() > MAX_HEAD_BYTES {
                return Err(UpstreamError::Malformed("response head too large"));
            }
            if self.read_more().await.map_err(UpstreamError::Io)? == 0 {
                return Err(if self.buf.is_empty() {
                    UpstreamError::ClosedBeforeResponse
                } else {
                    UpstreamError::Malformed("connection closed inside the response head")
                });
            }
        }
    }

    async fn read_more(&mut self) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_read_more(cx)).await
    }

    fn poll_read_more(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        poll_fill(&mut self.io, &mut self.buf, cx)
    }

    fn into_response(mut self, parsed: ParsedHead, head_request: bool) -> ResponseHead {
        let ParsedHead {
            status,
            headers,
            framing,
            keep_alive,
        } = parsed;
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return ResponseHead {
                status,
                headers,
                body: None,
                upgraded: Some(Upgraded {
                    pending: self.buf.split().freeze(),
                    io: self.io,
                }),
            };
        }
        let no_body = head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
        let framing = if no_body { BodyFraming::Length(0) } else { framing };
        let reusable = keep_alive && framing != BodyFraming::UntilClose;
        ResponseHead {
            status,
            headers,
            body: Some(BodyReader {
                conn: Some(self),
                framing,
                reusable,
            }),
            upgraded: None,
        }
    }
}

impl ResponseHead {
    /// The response body, streamed from the connection.
    pub fn take_body(&mut self) -> Option<BodyReader> {
        self.body.take()
    }

    /// The raw socket after a `101`.
    pub fn take_upgraded(&mut self) -> Option<Upgraded> {
        self.upgraded.take()
    }
}

/// Reads once from `io` into the spare capacity of `buf` (grown by
/// [`READ_BUFFER_BYTES`] when little is left), without zeroing it first;
/// how many bytes came, 0 at end of stream. The one place that reads a
/// backend's bytes into a buffer, for the head while a body is still being
/// sent and for everything after.
fn poll_fill<R: AsyncRead + Unpin>(io: &mut R, buf: &mut BytesMut, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < READ_BUFFER_BYTES / 4 {
        buf.reserve(READ_BUFFER_BYTES);
    }
    let mut spare = ReadBuf::uninit(buf.spare_capacity_mut());
    ready!(Pin::new(io).poll_read(cx, &mut spare))?;
    let n = spare.filled().len();
    // SAFETY: `n` bytes of the spare capacity were just initialised by the read.
    unsafe { buf.set_len(buf.len() + n) };
    Poll::Ready(Ok(n))
}

/// Appends `data` to `out`, as a chunk when `chunked`.
fn encode_chunk(out: &mut Vec<u8>, data: &[u8], chunked: bool) {
    if chunked {
        if data.is_empty() {
            return;
        }
        out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
    } else {
        out.extend_from_slice(data);
    }
}

async fn write_chunk<W: AsyncWrite + Unpin>(io: &mut W, data: Bytes, chunked: bool) -> Result<(), UpstreamError> {
    if !chunked {
        return io.write_all(&data).await.map_err(UpstreamError::Io);
    }
    if data.is_empty() {
        // A zero-size chunk would end the body.
        return Ok(());
    }
    let size = format!("{:x}\r\n", data.len());
    let mut parts = [
        IoSlice::new(size.as_bytes()),
        IoSlice::new(&data),
        IoSlice::new(b"\r\n"),
    ];
    let mut parts = &mut parts[..];
    while !parts.is_empty() {
        let n = io.write_vectored(parts).await.map_err(UpstreamError::Io)?;
        if n == 0 {
            return Err(UpstreamError::Io(io::ErrorKind::WriteZero.into()));
        }
        IoSlice::advance_slices(&mut parts, n);
    }
    Ok(())
}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyFraming {
    Length(u64),
    Chunked(Chunk),
    UntilClose,
}

/// Where a chunked body's reader is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Size,
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    Trailers,
}

struct ParsedHead {
    status: StatusCode,
    headers: HeaderMap,
    framing: BodyFraming,
    keep_alive: bool,
}

/// Parses the response head at the start of `buf`, if it is complete.
/// `parse` sees the headers, which borrow `buf`; it returns the length.
fn parse_with<'b, T>(
    buf: &'b [u8],
    parse: impl FnOnce(&httparse::Response<'_, 'b>) -> Result<T, UpstreamError>,
) -> Result<Option<(usize, T)>, UpstreamError> {
    if buf.is_empty() {
        return Ok(None);
    }
    let mut raw = [const { MaybeUninit::<httparse::Header<'b>>::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut response, buf, &mut raw) {
        Ok(httparse::Status::Complete(len)) => Ok(Some((len, parse(&response)?))),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(UpstreamError::Malformed("too many headers")),
        Err(_) => Err(UpstreamError::Malformed("unparsable head")),
    }
}

fn status_of(response: &httparse::Response<'_, '_>) -> Result<StatusCode, UpstreamError> {
    response
        .code
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or(UpstreamError::Malformed("bad status"))
}

/// The length and status of a complete head at the start of `buf`.
fn head_status(buf: &[u8]) -> Result<Option<(usize, StatusCode)>, UpstreamError> {
    parse_with(buf, status_of)
}

/// A header kept for the client: its name, and where its value is in the
/// head.
struct Kept {
    name: HeaderName,
    value: std::ops::Range<usize>,
}

/// Everything read off a head while it still borrows the read buffer.
struct HeadFacts {
    status: StatusCode,
    kept: Vec<Kept>,
    framing: BodyFraming,
    keep_alive: bool,
}

/// Splits a complete response head off `buf` and parses it; header values
/// share the head's memory (no copies).
fn take_head(buf: &mut BytesMut) -> Result<Option<ParsedHead>, UpstreamError> {
    let start = buf.as_ptr() as usize;
    let Some((len, facts)) = parse_with(buf, |response| head_facts(response, start))? else {
        return Ok(None);
    };
    let head = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(facts.kept.len() + 1);
    for Kept { name, value } in facts.kept {
        let value = HeaderValue::from_maybe_shared(head.slice(value))
            .map_err(|_| UpstreamError::Malformed("bad header value"))?;
        headers.append(name, value);
    }
    if facts.status == StatusCode::SWITCHING_PROTOCOLS {
        // Only the handshake pair: `Connection: upgrade` and the protocol.
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    Ok(Some(ParsedHead {
        status: facts.status,
        headers,
        framing: facts.framing,
        keep_alive: facts.keep_alive,
    }))
}

/// Framing, reuse and the headers to keep, from a parsed head that starts
/// at address `start`.
fn head_facts(response: &httparse::Response<'_, '_>, start: usize) -> Result<HeadFacts, UpstreamError> {
    let status = status_of(response)?;
    let http10 = response.version == Some(0);

    let mut keep_alive = !http10;
    // Headers the Connection header names are hop-by-hop too.
    let mut named: Vec<&str> = Vec::new();
    for h in response
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
    {
        for token in tokens(std::str::from_utf8(h.value).unwrap_or("")) {
            if token.eq_ignore_ascii_case("close") {
                keep_alive = false;
            } else if token.eq_ignore_ascii_case("keep-alive") {
                keep_alive |= http10;
            }
            named.push(token);
        }
    }

    let mut kept = Vec::with_capacity(response.headers.len());
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut transfer_encoded = false;
    for h in response.headers.iter() {
        let name =
            HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| UpstreamError::Malformed("bad header name"))?;
        if name == header::CONTENT_LENGTH {
            let value = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or(UpstreamError::Malformed("bad content-length"))?;
            if length.is_some_and(|seen| seen != value) {
                return Err(UpstreamError::Malformed("conflicting content-length"));
            }
            length = Some(value);
        } else if name == header::TRANSFER_ENCODING {
            transfer_encoded = true;
            let last = std::str::from_utf8(h.value)
                .unwrap_or("")
                .rsplit(',')
                .next()
                .unwrap_or("");
            chunked = last.trim().eq_ignore_ascii_case("chunked");
        }
        let keep_for_upgrade = status == StatusCode::SWITCHING_PROTOCOLS && name == header::UPGRADE;
        if !keep_for_upgrade && (is_hop_by_hop(&name) || named.iter().any(|n| n.eq_ignore_ascii_case(name.as_str()))) {
            continue;
        }
        let offset = h.value.as_ptr() as usize - start;
        kept.push(Kept {
            name,
            value: offset..offset + h.value.len(),
        });
    }
    let framing = if transfer_encoded {
        // Framed by the encoding; a Content-Length beside it is ignored
        // (RFC 9112 §6.3), and such a response is not followed by another.
        if length.is_some() {
            keep_alive = false;
            kept.retain(|k| k.name != header::CONTENT_LENGTH);
        }
        if chunked {
            BodyFraming::Chunked(Chunk::Size)
        } else {
            BodyFraming::UntilClose
        }
    } else {
        match length {
            Some(n) => BodyFraming::Length(n),
            None => BodyFraming::UntilClose,
        }
    };
    Ok(HeadFacts {
        status,
        kept,
        framing,
        keep_alive,
    })
}

/// A response body read straight from its connection, which goes back to
/// the pool after the last byte.
pub struct BodyReader {
    conn: Option<Conn>,
    framing: BodyFraming,
    reusable: bool,
}

impl BodyReader {
    fn done(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        if self.reusable && conn.buf.is_empty() {
            conn.check_in();
        }
    }

    fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, UpstreamError>>> {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match &mut self.framing {
                BodyFraming::Length(0) => {
                    self.done();
                    return Poll::Ready(None);
                }
                BodyFraming::Length(left) => {
                    if conn.buf.is_empty() && ready!(conn.poll_read_more(cx)).map_err(UpstreamError::Io)? == 0 {
                        self.conn = None;
                        return Poll::Ready(Some(Err(UpstreamError::ClosedInBody)));
                    }
                    let take = (*left).min(conn.buf.len() as u64) as usize;
                    *left -= take as u64;
                    let data = conn.buf.split_to(take).freeze();
                    if *left == 0 {
                        self.done();
                    }
                    return Poll::Ready(Some(Ok(data)));
                }
                BodyFraming::UntilClose => {
                    if conn.buf.is_empty() && ready!(conn.poll_read_more(cx)).map_err(UpstreamError::Io)? == 0 {
                        self.conn = None;
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Ok(conn.buf.split().freeze())));
                }
                BodyFraming::Chunked(chunk) => match *chunk {
                    Chunk::Data(left) => {
                        if conn.buf.is_empty() && ready!(conn.poll_read_more(cx)).map_err(UpstreamError::Io)? == 0 {
                            self.conn = None;
                            return Poll::Ready(Some(Err(UpstreamError::ClosedInBody)));
                        }
                        let take = left.min(conn.buf.len() as u64) as usize;
                        *chunk = if take as u64 == left {
                            Chunk::DataEnd
                        } else {
                            Chunk::Data(left - take as u64)
                        };
                        return Poll::Ready(Some(Ok(conn.buf.split_to(take).freeze())));
                    }
                    Chunk::Size | Chunk::DataEnd | Chunk::Trailers => {
                        let Some(end) = memchr::memchr(b'\n', &conn.buf) else {
                            if conn.buf.len() > MAX_CHUNK_LINE {
                                self.conn = None;
                                return Poll::Ready(Some(Err(UpstreamError::Malformed("chunk line too long"))));
                            }
                            if ready!(conn.poll_read_more(cx)).map_err(UpstreamError::Io)? == 0 {
                                self.conn = None;
                                return Poll::Ready(Some(Err(UpstreamError::ClosedInBody)));
                            }
                            continue;
                        };
                        let line = conn.buf.split_to(end + 1);
                        let line = line.strip_suffix(b"\r\n").unwrap_or(&line[..end]);
                        *chunk = match *chunk {
                            Chunk::DataEnd if line.is_empty() => Chunk::Size,
                            Chunk::DataEnd => {
                                self.conn = None;
                                return Poll::Ready(Some(Err(UpstreamError::Malformed("chunk without CRLF"))));
                            }
                            Chunk::Size => match chunk_size(line) {
                                Some(0) => Chunk::Trailers,
                                Some(n) => Chunk::Data(n),
                                None => {
                                    self.conn = None;
                                    return Poll::Ready(Some(Err(UpstreamError::Malformed("bad chunk size"))));
                                }
                            },
                            // Trailer fields are dropped; the empty line ends the body.
                            Chunk::Trailers if line.is_empty() => {
                                self.done();
                                return Poll::Ready(None);
                            }
                            Chunk::Trailers | Chunk::Data(_) => Chunk::Trailers,
                        };
                    }
                },
            }
        }
    }
}

/// A chunk-size line: hex digits, then optional `;extensions`.
fn chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line.split(|&b| b == b';').next()?;
    let digits = std::str::from_utf8(digits).ok()?.trim_matches([' ', '\t']);
    if digits.is_empty() || digits.len() > 15 {
        return None;
    }
    u64::from_str_radix(digits, 16).ok()
}

impl Body for BodyReader {
    type Data = Bytes;
    type Error = UpstreamError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        self.get_mut()
            .poll_body(cx)
            .map(|polled| polled.map(|data| data.map(Frame::data)))
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none() || self.framing == BodyFraming::Length(0)
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            BodyFraming::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

impl Drop for BodyReader {
    /// A body nobody polls to its end may still be complete (a zero length,
    /// or hyper stopped at `is_end_stream`): then the connection is reused.
    fn drop(&mut self) {
        if self.framing == BodyFraming::Length(0) {
            self.done();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::{Empty, Full};
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    use super::*;

    /// A backend speaking raw bytes: each accepted connection runs
    /// `script` with the connection's index. Counts connections.
    struct RawBackend {
        authority: Authority,
        connections: Arc<AtomicUsize>,
    }

    impl RawBackend {
        async fn start<F, Fut>(script: F) -> RawBackend
        where
            F: Fn(usize, TcpStream) -> Fut + Send + Sync + 'static,
            Fut: std::future::Future<Output = ()> + Send,
        {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let authority = listener.local_addr().unwrap().to_string().parse().unwrap();
            let connections = Arc::new(AtomicUsize::new(0));
            let count = connections.clone();
            let script = Arc::new(script);
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let index = count.fetch_add(1, Ordering::SeqCst);
                    let script = script.clone();
                    tokio::spawn(async move { script(index, stream).await });
                }
            });
            RawBackend { authority, connections }
        }

        fn connections(&self) -> usize {
            self.connections.load(Ordering::SeqCst)
        }
    }

    /// Reads one request head (and nothing more) from `stream`.
    async fn read_request_head(stream: &mut TcpStream) -> Option<String> {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if stream.read(&mut byte).await.ok()? == 0 {
                return None;
            }
            head.push(byte[0]);
        }
        Some(String::from_utf8(head).unwrap())
    }

    /// Answers every request on the connection with `answer`.
    fn answering(answer: &'static [u8]) -> impl Fn(usize, TcpStream) -> std::future::Ready<()> + Send + Sync + 'static {
        move |_, stream| {
            tokio::spawn(async move {
                let mut stream = stream;
                while read_request_head(&mut stream).await.is_some() {
                    if stream.write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
            std::future::ready(())
        }
    }

    fn pool() -> Arc<Upstreams> {
        Arc::new(Upstreams::new(Duration::from_secs(2), Duration::from_secs(90)))
    }

    fn request(method: &str, framing: RequestFraming, extra: &str) -> Outgoing {
        let method: http::Method = method.parse().unwrap();
        Outgoing {
            head: format!("{method} /x HTTP/1.1\r\nhost: backend\r\n{extra}\r\n").into_bytes(),
            framing,
            idempotent: method.is_idempotent(),
            head_request: method == http::Method::HEAD,
        }
    }

    fn get() -> Outgoing {
        request("GET", RequestFraming::Empty, "")
    }

    /// A GET with no body, as most tests send.
    async fn get_from(pool: &Arc<Upstreams>, backend: &RawBackend) -> Result<ResponseHead, UpstreamError> {
        pool.send(&backend.authority, get(), Empty::<Bytes>::new()).await
    }

    async fn body_of(mut response: ResponseHead) -> Result<Bytes, UpstreamError> {
        let body = response.take_body().expect("a body");
        Ok(body.collect().await?.to_bytes())
    }

    #[tokio::test]
    async fn a_length_framed_response_streams_and_its_connection_is_reused() {
        let backend = RawBackend::start(answering(
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: 1\r\n\r\nhello",
        ))
        .await;
        let pool = pool();
        for _ in 0..3 {
            let response = get_from(&pool, &backend).await.unwrap();
            assert_eq!(response.status, 200);
            assert_eq!(response.headers["x-a"], "1");
            assert_eq!(response.headers["content-length"], "5");
            assert_eq!(body_of(response).await.unwrap(), "hello");
        }
        assert_eq!(backend.connections(), 1, "one connection for three requests");
    }

    #[tokio::test]
    async fn a_chunked_response_is_decoded_its_trailers_dropped_and_its_connection_reused() {
        let backend = RawBackend::start(answering(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-trailer: 1\r\n\r\n",
        ))
        .await;
        let pool = pool();
        for _ in 0..2 {
            let response = get_from(&pool, &backend).await.unwrap();
            assert!(!response.headers.contains_key("transfer-encoding"), "hop-by-hop");
            assert_eq!(body_of(response).await.unwrap(), "hello world");
        }
        assert_eq!(backend.connections(), 1);
    }

    #[tokio::test]
    async fn a_response_without_a_length_ends_when_the_connection_closes_and_is_not_reused() {
        let backend = RawBackend::start(|_, mut stream: TcpStream| async move {
            read_request_head(&mut stream).await;
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\n\r\nall of it").await;
        })
        .await;
        let pool = pool();
        for _ in 0..2 {
            let response = get_from(&pool, &backend).await.unwrap();
            assert_eq!(body_of(response).await.unwrap(), "all of it");
        }
        assert_eq!(backend.connections(), 2);
    }

    #[tokio::test]
    async fn interim_responses_are_skipped() {
        let backend = RawBackend::start(answering(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok",
        ))
        .await;
        let response = get_from(&pool(), &backend).await.unwrap();
        assert_eq!(response.status, 201);
        assert!(!response.headers.contains_key("link"));
        assert_eq!(body_of(response).await.unwrap(), "ok");
    }

    #[tokio::test]
    async fn head_204_and_304_responses_have_no_body_and_keep_their_connection() {
        let backend = RawBackend::start(|_, mut stream: TcpStream| async move {
            let answers: [&[u8]; 3] = [
                b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n",
                b"HTTP/1.1 204 No Content\r\n\r\n",
                b"HTTP/1.1 304 Not Modified\r\ncontent-length: 9\r\n\r\n",
            ];
            for answer in answers {
                read_request_head(&mut stream).await;
                stream.write_all(answer).await.unwrap();
            }
        })
        .await;
        let pool = pool();
        let head = pool
            .send(
                &backend.authority,
                request("HEAD", RequestFraming::Empty, ""),
                Empty::<Bytes>::new(),
            )
            .await
            .unwrap();
        assert_eq!(
            head.headers["content-length"], "1000",
            "a HEAD answer keeps its length header"
        );
        assert_eq!(body_of(head).await.unwrap(), "");
        for status in [204, 304] {
            let response = get_from(&pool, &backend).await.unwrap();
            assert_eq!(response.status, status);
            assert_eq!(body_of(response).await.unwrap(), "");
        }
        assert_eq!(backend.connections(), 1);
    }

    #[tokio::test]
    async fn conflicting_or_unreadable_framing_is_an_error_never_a_guess() {
        for answer in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: five\r\n\r\nhello",
            b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            b"HTTP/1.1 2000 Weird\r\n\r\n",
            b"NOT HTTP AT ALL\r\n\r\n",
        ] {
            let backend = RawBackend::start(answering(answer)).await;
            let result = get_from(&pool(), &backend).await;
            assert!(
                matches!(result, Err(UpstreamError::Malformed(_))),
                "{}",
                String::from_utf8_lossy(answer)
            );
        }
    }

    #[tokio::test]
    async fn length_and_chunking_together_are_read_as_chunked_and_the_connection_closed() {
        let backend = RawBackend::start(answering(
            b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        ))
        .await;
        let pool = pool();
        let response = get_from(&pool, &backend).await.unwrap();
        assert!(!response.headers.contains_key("content-length"));
        assert_eq!(body_of(response).await.unwrap(), "ok");
        get_from(&pool, &backend).await.unwrap();
        assert_eq!(backend.connections(), 2, "not reused after an ambiguous response");
    }

    #[tokio::test]
    async fn a_body_cut_short_is_an_error() {
        let backend = RawBackend::start(|_, mut stream: TcpStream| async move {
            read_request_head(&mut stream).await;
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf!")
                .await;
        })
        .await;
        let response = get_from(&pool(), &backend).await.unwrap();
        assert!(matches!(body_of(response).await, Err(UpstreamError::ClosedInBody)));
    }

    #[tokio::test]
    async fn a_head_over_the_limit_is_refused() {
        let backend = RawBackend::start(|_, mut stream: TcpStream| async move {
            read_request_head(&mut stream).await;
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\n").await;
            let filler = format!("x-filler: {}\r\n", "a".repeat(1000));
            for _ in 0..100 {
                if stream.write_all(filler.as_bytes()).await.is_err() {
                    return;
                }
            }
        })
        .await;
        let result = get_from(&pool(), &backend).await;
        assert!(matches!(result, Err(UpstreamError::Malformed(_))));
    }

    #[tokio::test]
    async fn an_idle_connection_the_backend_closed_is_not_used_again() {
        let backend = RawBackend::start(|_, mut stream: TcpStream| async move {
            read_request_head(&mut stream).await;
            stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await
                .unwrap();
            // Then close the idle connection, as a keep-alive timeout does.
        })
        .await;
        let pool = pool();
        let response = get_from(&pool, &backend).await.unwrap();
        body_of(response).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Not a retry: the closed connection was seen before sending. A POST
        // shows it, as it would fail rather than go twice.
        let post = request("POST", RequestFraming::Empty, "content-length: 0\r\n");
        let response = pool
            .send(&backend.authority, post, Empty::<Bytes>::new())
            .await
            .unwrap();
        body_of(response).await.unwrap();
        assert_eq!(backend.connections(), 2);
    }

    /// A backend that answers the first request on each connection and
    /// closes the connection when the second request arrives, unanswered:
    /// the race between reusing a connection and the backend closing it.
    async fn closes_on_second_request() -> RawBackend {
        RawBackend::start(|_, mut stream: TcpStream| async move {
            read_request_head(&mut stream).await;
            stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await
                .unwrap();
            read_request_head(&mut stream).await;
        })
        .await
    }

    #[tokio::test]
    async fn a_get_that_meets_a_connection_closed_under_it_goes_again_once() {
        let backend = closes_on_second_request().await;
        let pool = pool();
        for _ in 0..2 {
            let response = get_from(&pool, &backend).await.unwrap();
            assert_eq!(body_of(response).await.unwrap(), "ok");
        }
        assert_eq!(backend.connections(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_cannot_go_twice_takes_no_connection_idle_for_seconds() {
        let backend = RawBackend::start(answering(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")).await;
        let pool = pool();
        body_of(get_from(&pool, &backend).await.unwrap()).await.unwrap();
        tokio::time::advance(SAFE_IDLE + Duration::from_millis(1)).await;
        let post = request("POST", RequestFraming::Empty, "content-length: 0\r\n");
        body_of(
            pool.send(&backend.authority, post, Empty::<Bytes>::new())
                .await
                .unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(backend.connections(), 2, "a fresh connection for the POST");
        tokio::time::advance(SAFE_IDLE + Duration::from_millis(1)).await;
        body_of(get_from(&pool, &backend).await.unwrap()).await.unwrap();
        assert_eq!(backend.connections(), 2, "a GET, which can go again, reuses one");
    }

    #[tokio::test]
    async fn a_post_that_meets_a_connection_closed_under_it_fails_rather_than_going_twice() {
        let backend = closes_on_second_request().await;
        let pool = pool();
        body_of(get_from(&pool, &backend).await.unwrap()).await.unwrap();
        let post = request("POST", RequestFraming::Empty, "content-length: 0\r\n");
        let result = pool.send(&backend.authority, post, Empty::<Bytes>::new()).await;
        assert!(
            matches!(result, Err(UpstreamError::ClosedBeforeResponse)),
            "{result:?}",
            result = result.err()
        );
        assert_eq!(backend.connections(), 1);
    }

    /// A request body that yields its parts, then waits forever if `stall`.
    struct Parts {
        parts: VecDeque<Bytes>,
        stall: bool,
    }

    impl Body for Parts {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            match self.parts.pop_front() {
                Some(part) => Poll::Ready(Some(Ok(Frame::data(part)))),
                None if self.stall => Poll::Pending,
                None => Poll::Ready(None),
            }
        }
    }

    #[tokio::test]
    async fn a_chunked_request_body_goes_up_re_chunked() {
        let (seen_tx, seen_rx) = tokio::sync::oneshot::channel();
        let seen_tx = std::sync::Mutex::new(Some(seen_tx));
        let backend = RawBackend::start(move |_, mut stream: TcpStream| {
            let tx = seen_tx.lock().unwrap().take();
            async move {
                read_request_head(&mut stream).await;
                let mut body = Vec::new();
                while !body.ends_with(b"0\r\n\r\n") {
                    let mut buf = [0u8; 256];
                    let n = stream.read(&mut buf).await.unwrap();
                    body.extend_from_slice(&buf[..n]);
                }
                stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                    .await
                    .unwrap();
                let _ = tx.unwrap().send(body);
            }
        })
        .await;
        let body = Parts {
            parts: [&b"abc"[..], b"", b"defgh"]
                .into_iter()
                .map(Bytes::from_static)
                .collect(),
            stall: false,
        };
        let post = request("POST", RequestFraming::Chunked, "transfer-encoding: chunked\r\n");
        let response = pool().send(&backend.authority, post, body).await.unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(seen_rx.await.unwrap(), b"3\r\nabc\r\n5\r\ndefgh\r\n0\r\n\r\n");
    }

    #[tokio::test]
    async fn a_response_that_comes_before_the_body_is_sent_is_returned_at_once() {
        let backend = RawBackend::start(|_, mut stream: TcpStream| async move {
            read_request_head(&mut stream).await;
            let _ = stream
                .write_all(
                    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 413 Payload Too Large\r\ncontent-length: 3\r\n\r\nbig",
                )
                .await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        })
        .await;
        // The body never ends: only an early answer lets `send` return.
        let body = Parts {
            parts: [Bytes::from_static(b"first part")].into(),
            stall: true,
        };
        let post = request("POST", RequestFraming::Length, "content-length: 1000000\r\n");
        let pool = pool();
        let response = tokio::time::timeout(Duration::from_secs(2), pool.send(&backend.authority, post, body))
            .await
            .expect("answered without waiting for the body")
            .unwrap();
        assert_eq!(response.status, 413);
        assert_eq!(body_of(response).await.unwrap(), "big");
        assert_eq!(
            pool.idle_connections(),
            0,
            "a connection with half a body on it is not reused"
        );
    }

    #[tokio::test]
    async fn a_length_framed_body_and_a_small_first_part_go_out_with_the_head() {
        let (seen_tx, seen_rx) = tokio::sync::oneshot::channel();
        let seen_tx = std::sync::Mutex::new(Some(seen_tx));
        let backend = RawBackend::start(move |_, mut stream: TcpStream| {
            let tx = seen_tx.lock().unwrap().take();
            async move {
                let mut buf = vec![0u8; 4096];
                let n = stream.read(&mut buf).await.unwrap();
                let _ = stream.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").await;
                let _ = tx.unwrap().send(buf[..n].to_vec());
            }
        })
        .await;
        let post = request("POST", RequestFraming::Length, "content-length: 5\r\n");
        let response = pool()
            .send(&backend.authority, post, Full::new(Bytes::from_static(b"hello")))
            .await
            .unwrap();
        assert_eq!(response.status, 204);
        let first_read = seen_rx.await.unwrap();
        assert!(
            first_read.ends_with(b"content-length: 5\r\n\r\nhello"),
            "one write: {:?}",
            String::from_utf8_lossy(&first_read)
        );
    }

    #[tokio::test]
    async fn a_101_hands_over_the_socket_and_the_bytes_read_past_the_head() {
        let backend = RawBackend::start(|_, mut stream: TcpStream| async move {
            read_request_head(&mut stream).await;
            stream
                .write_all(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\nsec-websocket-accept: x\r\n\r\nearly")
                .await
                .unwrap();
            let mut buf = [0u8; 4];
            stream.read_exact(&mut buf).await.unwrap();
            stream.write_all(&buf).await.unwrap();
        })
        .await;
        let upgrade = request(
            "GET",
            RequestFraming::Empty,
            "connection: upgrade\r\nupgrade: websocket\r\n",
        );
        let mut response = pool()
            .send(&backend.authority, upgrade, Empty::<Bytes>::new())
            .await
            .unwrap();
        assert_eq!(response.status, 101);
        assert_eq!(response.headers["upgrade"], "websocket");
        assert_eq!(response.headers["connection"], "upgrade");
        assert_eq!(response.headers["sec-websocket-accept"], "x");
        let Upgraded { mut io, pending } = response.take_upgraded().expect("the socket");
        assert_eq!(pending, "early");
        io.write_all(b"ping").await.unwrap();
        let mut echoed = [0u8; 4];
        io.read_exact(&mut echoed).await.unwrap();
        assert_eq!(&echoed, b"ping");
    }

    #[test]
    fn each_thread_reuses_only_the_connections_it_made() {
        let backend_runtime = tokio::runtime::Runtime::new().unwrap();
        let backend = backend_runtime.block_on(RawBackend::start(answering(
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        )));
        let pool = pool();
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (pool, authority) = (pool.clone(), backend.authority.clone());
                std::thread::spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    runtime.block_on(async {
                        for _ in 0..5 {
                            let response = pool.send(&authority, get(), Empty::<Bytes>::new()).await.unwrap();
                            assert_eq!(body_of(response).await.unwrap(), "ok");
                        }
                    });
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(backend.connections(), 2, "one connection per thread, each reused");
        assert_eq!(pool.idle_connections(), 2);
        pool.prune_idle();
        assert_eq!(pool.idle_connections(), 2, "not idle long enough to be closed");
    }

    #[tokio::test]
    async fn connections_idle_past_the_timeout_are_closed_by_the_pruner() {
        let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
        let closed_tx = std::sync::Mutex::new(Some(closed_tx));
        let backend = RawBackend::start(move |_, mut stream: TcpStream| {
            let tx = closed_tx.lock().unwrap().take();
            async move {
                read_request_head(&mut stream).await;
                stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await
                    .unwrap();
                // The next read ends only when the router closes the socket.
                let closed = read_request_head(&mut stream).await.is_none();
                let _ = tx.unwrap().send(closed);
            }
        })
        .await;
        let pool = Arc::new(Upstreams::new(Duration::from_secs(2), Duration::from_millis(50)));
        body_of(get_from(&pool, &backend).await.unwrap()).await.unwrap();
        assert_eq!(pool.idle_connections(), 1);
        tokio::time::sleep(Duration::from_millis(100)).await;
        pool.prune_idle();
        assert_eq!(pool.idle_connections(), 0);
        let closed = tokio::time::timeout(Duration::from_secs(2), closed_rx)
            .await
            .unwrap()
            .unwrap();
        assert!(closed, "the backend saw the idle connection close");
    }

    #[tokio::test]
    async fn an_unreachable_backend_is_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let authority: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        drop(listener);
        let error = pool()
            .send(&authority, get(), Empty::<Bytes>::new())
            .await
            .err()
            .unwrap();
        assert!(error.is_connect(), "{error}");
    }

    #[test]
    fn chunk_sizes_are_hex_with_optional_extensions() {
        assert_eq!(chunk_size(b"1f"), Some(31));
        assert_eq!(chunk_size(b"A;name=value"), Some(10));
        assert_eq!(chunk_size(b" 0 "), Some(0));
        assert_eq!(chunk_size(b""), None);
        assert_eq!(chunk_size(b"-1"), None);
        assert_eq!(chunk_size(b"fffffffffffffffff"), None, "overflow");
        assert_eq!(chunk_size(b"zz"), None);
    }
}
