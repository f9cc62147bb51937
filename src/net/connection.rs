//! Per-connection time limits and head hygiene, below hyper.
//!
//! hyper has one timer for "waiting for a request head", which runs both
//! while a keep-alive connection sits idle and while a head trickles in. The
//! Google load balancer keeps idle backend connections for 600 s, so that
//! timer must be long; a slowloris client must be cut short. So the socket
//! is wrapped in a [`GuardedIo`] that knows which phase the connection is
//! in ([`Phase`], moved along by the per-request service, `app::service`) and
//! enforces a separate deadline for each:
//!
//! | phase | deadline |
//! |---|---|
//! | idle, between requests | `keepalive_timeout` after the last response |
//! | reading a head | `header_timeout` after its first byte |
//! | reading a body | `body_timeout` after the last body byte |
//! | request in progress, upgraded | none |
//!
//! It also refuses heads with a bare LF line ending (a request-smuggling
//! ingredient the HTTP parser tolerates): such a byte is replaced by NUL, so
//! the parser rejects the head with a 400; and a request line too long for
//! `max_uri_bytes` is answered 414 before the parser sees it.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::refusal::{Refusal, REQUEST_LINE_SLACK};
use crate::body::Watch;
use crate::telemetry::access::{self, Peer};

/// Where a connection is in its request cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    Idle = 0,
    Head = 1,
    Body = 2,
    Busy = 3,
    Upgraded = 4,
}

impl Phase {
    fn from_u8(v: u8) -> Phase {
        match v {
            0 => Phase::Idle,
            1 => Phase::Head,
            2 => Phase::Body,
            3 => Phase::Busy,
            _ => Phase::Upgraded,
        }
    }
}

/// The connection-wide time limits.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub keepalive: Duration,
    pub header: Duration,
    pub body: Duration,
}

/// A socket's limits: its time limits and the longest URI.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub timeouts: Timeouts,
    pub max_uri_bytes: usize,
}

/// Shared between the socket wrapper and the request/response wrappers.
pub struct ConnState {
    origin: Instant,
    phase: AtomicU8,
    /// Milliseconds after `origin` when the current phase's clock started.
    since_ms: AtomicU64,
}

impl ConnState {
    pub fn new() -> Arc<ConnState> {
        Arc::new(ConnState {
            origin: Instant::now(),
            phase: AtomicU8::new(Phase::Idle as u8),
            since_ms: AtomicU64::new(0),
        })
    }

    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Acquire))
    }

    pub fn enter(&self, phase: Phase) {
        // Phases without a deadline need no start time (nor a clock read).
        if matches!(phase, Phase::Idle | Phase::Head | Phase::Body) {
            self.since_ms.store(self.now_ms(), Ordering::Release);
        }
        self.phase.store(phase as u8, Ordering::Release);
    }

    /// Moves `from` → `to` only if the connection is still in `from`.
    pub fn advance(&self, from: Phase, to: Phase) {
        if self
            .phase
            .compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.since_ms.store(self.now_ms(), Ordering::Release);
        }
    }

    /// How long the connection has been in its current phase (for a head:
    /// since its first byte).
    pub fn in_phase_for(&self) -> Duration {
        Duration::from_millis(self.now_ms().saturating_sub(self.since_ms.load(Ordering::Acquire)))
    }

    fn on_bytes_read(&self) {
        match self.phase() {
            Phase::Idle => self.advance(Phase::Idle, Phase::Head),
            Phase::Body => self.since_ms.store(self.now_ms(), Ordering::Release),
            _ => {}
        }
    }

    fn deadline(&self, timeouts: &Timeouts) -> Option<Instant> {
        let limit = match self.phase() {
            Phase::Idle => timeouts.keepalive,
            Phase::Head => timeouts.header,
            Phase::Body => timeouts.body,
            Phase::Busy | Phase::Upgraded => return None,
        };
        let since = Duration::from_millis(self.since_ms.load(Ordering::Acquire));
        // An unrepresentable deadline is no deadline (config bounds it anyway).
        self.origin.checked_add(since)?.checked_add(limit)
    }
}

/// The socket as hyper sees it.
pub struct GuardedIo<T> {
    inner: T,
    state: Arc<ConnState>,
    timeouts: Timeouts,
    timer: Pin<Box<Sleep>>,
    head: HeadScan,
    /// Set once a request is refused here: from then on it answers reads.
    refusal: Option<Refusal>,
    /// Where a refusal is logged and counted.
    peer: Arc<Peer>,
}

impl<T> GuardedIo<T> {
    /// The socket itself, once the connection is upgraded and its bytes
    /// are relayed without hyper (and without time limits).
    pub fn into_inner(self) -> T {
        self.inner
    }

    pub fn new(inner: T, state: Arc<ConnState>, limits: Limits, peer: Arc<Peer>) -> Self {
        GuardedIo {
            inner,
            state,
            timeouts: limits.timeouts,
            timer: Box::pin(tokio::time::sleep(limits.timeouts.keepalive)),
            head: HeadScan::new(limits.max_uri_bytes + REQUEST_LINE_SLACK),
            refusal: None,
            peer,
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for GuardedIo<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(refusal) = &mut this.refusal {
            return refusal.poll(&mut this.inner, cx);
        }
        if let Some(deadline) = this.state.deadline(&this.timeouts) {
            // The timer may run early, never late: it is re-armed when the
            // limit moves closer, and when it fires before the limit (which
            // moves later as the connection goes through its requests).
            // Re-arming takes the runtime's timer lock, so not doing it at
            // every phase change keeps requests from contending on it.
            if deadline < this.timer.deadline() {
                this.timer.as_mut().reset(deadline);
            }
            while this.timer.as_mut().poll(cx).is_ready() {
                if this.timer.deadline() >= deadline {
                    let phase = this.state.phase();
                    tracing::debug!(?phase, "closing connection: time limit reached");
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("{phase:?} time limit"),
                    )));
                }
                this.timer.as_mut().reset(deadline);
            }
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            if buf.filled().len() > before {
                this.state.on_bytes_read();
                // Every byte of the request stream, pipelined ones too; an
                // upgraded connection carries another protocol.
                let phase = this.state.phase();
                if phase != Phase::Upgraded {
                    let line_too_long = this.head.scan(&mut buf.filled_mut()[before..]);
                    // Answered here only while hyper writes nothing itself
                    // (a pipelined head behind a response gets its 431).
                    if line_too_long && matches!(phase, Phase::Idle | Phase::Head) {
                        access::refused(&this.peer, http::StatusCode::URI_TOO_LONG, this.state.in_phase_for());
                        buf.set_filled(before);
                        let refusal = this.refusal.insert(Refusal::uri_too_long());
                        return refusal.poll(&mut this.inner, cx);
                    }
                }
            }
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for GuardedIo<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Watches a request body: at its end the connection goes from reading a
/// body to busy.
pub struct RequestPhase(pub Arc<ConnState>);

impl Watch for RequestPhase {
    fn end(&mut self) {
        self.0.advance(Phase::Body, Phase::Busy);
    }
}

/// Watches a response body: once it is dropped (sent, or the exchange broke
/// off) the connection is idle, unless it was upgraded.
pub struct ResponsePhase(pub Arc<ConnState>);

impl Watch for ResponsePhase {}

impl Drop for ResponsePhase {
    fn drop(&mut self) {
        if self.0.phase() != Phase::Upgraded {
            self.0.enter(Phase::Idle);
        }
    }
}

/// Follows the request stream — each head, then its body by its framing,
/// then the next head — and poisons (replaces by NUL, so the parser answers
/// 400):
/// - any LF in a head not preceded by CR;
/// - a head's final LF when it carried both `Content-Length` and
///   `Transfer-Encoding` — hyper would silently drop the former, but which
///   one an upstream believes is how requests get smuggled.
///
/// Bodies are skipped, never altered. Whatever it cannot follow (an upgrade,
/// a framing the parser will refuse anyway) ends the scan for the
/// connection rather than risk touching body bytes. It looks at each byte
/// of a head once, jumping from line feed to line feed, and allocates
/// nothing.
struct HeadScan {
    at: Framing,
    last: u8,
    line: LinePrefix,
    content_length: Option<u64>,
    length_seen: bool,
    chunked: bool,
    upgrade: bool,
    /// The current line is a head's first: the request line.
    in_request_line: bool,
    /// Bytes of the request line so far, and the most it may have.
    request_line_len: usize,
    max_request_line: usize,
}

#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum Framing {
    #[default]
    Head,
    /// Body bytes still to skip.
    Body(u64),
    ChunkSize,
    ChunkData(u64),
    /// The CRLF after a chunk's data.
    ChunkEnd(u8),
    Trailers,
    Stop,
}

/// Enough of a header line to read the headers that decide framing.
const LINE_PREFIX: usize = 64;

/// The first [`LINE_PREFIX`] bytes of the current line, lower-cased, CRs
/// left out; in a head, only of lines that may be a framing header (by
/// their first letter), so most header lines cost nothing but the search
/// for their end.
#[derive(Clone, Copy)]
struct LinePrefix {
    bytes: [u8; LINE_PREFIX],
    len: usize,
    /// The line has a byte other than CR (an empty line ends a head).
    has_content: bool,
    /// A head line that cannot be `Content-Length`, `Transfer-Encoding` or
    /// `Upgrade`.
    ignored: bool,
}

impl Default for LinePrefix {
    fn default() -> Self {
        LinePrefix {
            bytes: [0; LINE_PREFIX],
            len: 0,
            has_content: false,
            ignored: false,
        }
    }
}

/// The header names that decide a request's framing.
const FRAMING_HEADERS: [&[u8]; 3] = [b"content-length:", b"transfer-encoding:", b"upgrade:"];

/// Whether a head line that starts with `start` may be one of the
/// [`FRAMING_HEADERS`] (as far as `start` shows).
fn may_frame(start: &[u8]) -> bool {
    FRAMING_HEADERS.iter().any(|name| {
        let n = start.len().min(name.len());
        start[..n].eq_ignore_ascii_case(&name[..n])
    })
}

impl LinePrefix {
    fn extend(&mut self, content: &[u8], in_head: bool) {
        if !self.has_content {
            let Some(first) = content.iter().position(|&b| b != b'\r') else {
                return;
            };
            self.has_content = true;
            self.ignored = in_head && !may_frame(&content[first..]);
        }
        if self.ignored {
            return;
        }
        for &byte in content {
            if self.len == LINE_PREFIX {
                return;
            }
            if byte != b'\r' {
                self.bytes[self.len] = byte.to_ascii_lowercase();
                self.len += 1;
            }
        }
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl HeadScan {
    fn new(max_request_line: usize) -> HeadScan {
        HeadScan {
            at: Framing::Head,
            last: 0,
            line: LinePrefix::default(),
            content_length: None,
            length_seen: false,
            chunked: false,
            upgrade: false,
            in_request_line: true,
            request_line_len: 0,
            max_request_line,
        }
    }

    /// Scans the next bytes of the stream; true when a request line grew
    /// past its limit (the scan then stops).
    fn scan(&mut self, bytes: &mut [u8]) -> bool {
        let mut i = 0;
        while i < bytes.len() {
            match self.at {
                Framing::Stop => return false,
                Framing::Body(left) => {
                    let take = left.min((bytes.len() - i) as u64);
                    i += take as usize;
                    self.at = if take == left {
                        Framing::Head
                    } else {
                        Framing::Body(left - take)
                    };
                }
                Framing::ChunkData(left) => {
                    let take = left.min((bytes.len() - i) as u64);
                    i += take as usize;
                    self.at = if take == left {
                        Framing::ChunkEnd(0)
                    } else {
                        Framing::ChunkData(left - take)
                    };
                }
                Framing::ChunkEnd(seen) => {
                    let expected = if seen == 0 { b'\r' } else { b'\n' };
                    self.at = match (bytes[i] == expected, seen) {
                        (true, 0) => Framing::ChunkEnd(1),
                        (true, _) => Framing::ChunkSize,
                        (false, _) => Framing::Stop,
                    };
                    i += 1;
                }
                Framing::Head | Framing::Trailers | Framing::ChunkSize => {
                    // Everything up to the next LF belongs to the current line.
                    let rest = &bytes[i..];
                    let content = memchr::memchr(b'\n', rest).unwrap_or(rest.len());
                    if self.in_request_line && self.at == Framing::Head {
                        self.request_line_len += content;
                        if self.request_line_len > self.max_request_line {
                            self.at = Framing::Stop;
                            return true;
                        }
                    }
                    if content > 0 {
                        self.line.extend(&rest[..content], self.at == Framing::Head);
                        self.last = rest[content - 1];
                    }
                    i += content;
                    if i < bytes.len() {
                        self.line_feed(&mut bytes[i]);
                        i += 1;
                    }
                }
            }
        }
        false
    }

    fn line_feed(&mut self, lf: &mut u8) {
        if self.last != b'\r' && self.at == Framing::Head {
            *lf = 0;
            self.at = Framing::Stop;
            return;
        }
        self.last = b'\n';
        let prefix = std::mem::take(&mut self.line);
        let line = prefix.as_slice();
        self.request_line_len = 0;
        // Blank lines before a request line are skipped by the parser.
        self.in_request_line &= !prefix.has_content;
        match self.at {
            Framing::Head if !prefix.has_content => self.end_head(lf),
            Framing::Head => self.header(line),
            Framing::Trailers if !prefix.has_content => {
                self.at = Framing::Head;
                self.in_request_line = true;
            }
            Framing::Trailers => {}
            Framing::ChunkSize => {
                let size = std::str::from_utf8(line)
                    .ok()
                    .and_then(|l| u64::from_str_radix(l.split(';').next()?.trim(), 16).ok());
                self.at = match size {
                    Some(0) => Framing::Trailers,
                    Some(n) => Framing::ChunkData(n),
                    None => Framing::Stop,
                };
            }
            _ => {}
        }
    }

    fn header(&mut self, line: &[u8]) {
        if let Some(value) = line.strip_prefix(b"content-length:") {
            self.length_seen = true;
            self.content_length = std::str::from_utf8(value).ok().and_then(|v| v.trim().parse().ok());
        } else if let Some(value) = line.strip_prefix(b"transfer-encoding:") {
            self.chunked |= value.windows(7).any(|w| w == b"chunked");
        } else if line.starts_with(b"upgrade:") {
            self.upgrade = true;
        }
    }

    fn end_head(&mut self, final_lf: &mut u8) {
        let both = self.length_seen && self.chunked;
        if both {
            *final_lf = 0;
        }
        self.at = if both || self.upgrade {
            Framing::Stop
        } else if self.chunked {
            Framing::ChunkSize
        } else {
            match (self.length_seen, self.content_length) {
                (false, _) | (true, Some(0)) => Framing::Head,
                (true, Some(n)) => Framing::Body(n),
                // An unreadable length: the parser refuses the request.
                (true, None) => Framing::Stop,
            }
        };
        self.length_seen = false;
        self.content_length = None;
        self.chunked = false;
        self.upgrade = false;
        self.in_request_line = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scanned(parts: &[&[u8]]) -> Vec<u8> {
        let mut scan = HeadScan::new(usize::MAX);
        let mut out = Vec::new();
        for part in parts {
            let mut bytes = part.to_vec();
            scan.scan(&mut bytes);
            out.extend(bytes);
        }
        out
    }

    /// Streams with every kind of framing the scanner follows.
    const STREAMS: [&[u8]; 5] = [
        b"GET / HTTP/1.1\r\nHost: x\r\nCookie: a=b\r\n\r\nGET /2 HTTP/1.1\nHost: x\r\n\r\n",
        b"POST /a HTTP/1.1\r\nContent-Length: 9\r\n\r\nline\nfeedGET /b HTTP/1.1\nHost: x\r\n\r\n",
        b"POST /a HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n5;x=1\r\nab\ncd\r\n0\r\nT: 1\r\n\r\nPOST /b HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n\x81\x05hel\nlo",
        b"GET / HTTP/1.1\r\nX-Long: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n",
    ];

    proptest::proptest! {
        #[test]
        fn where_the_reads_split_the_stream_changes_nothing(
            stream in proptest::sample::select(&STREAMS[..]),
            cuts in proptest::collection::vec(0usize..200, 0..6),
        ) {
            let whole = scanned(&[stream]);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (stream.len() + 1)).collect();
            cuts.sort_unstable();
            let mut parts = Vec::new();
            let mut from = 0;
            for cut in cuts.into_iter().chain([stream.len()]) {
                parts.push(&stream[from..cut]);
                from = cut;
            }
            proptest::prop_assert_eq!(scanned(&parts), whole);
        }
    }

    #[test]
    fn crlf_heads_pass_untouched_even_split_across_reads() {
        let head: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(scanned(&[head]), head);
        assert_eq!(scanned(&[&head[..15], &head[15..]]), head);
    }

    #[test]
    fn a_bare_lf_in_the_head_is_poisoned() {
        let out = scanned(&[b"GET / HTTP/1.1\nHost: x\r\n\r\n"]);
        assert_eq!(out[14], 0);
    }

    #[test]
    fn bodies_are_skipped_untouched_and_the_next_head_is_checked() {
        let body = b"POST /a HTTP/1.1\r\nContent-Length: 9\r\n\r\nline\nfeed";
        let next = b"GET /b HTTP/1.1\nHost: x\r\n\r\n";
        let mut stream = body.to_vec();
        stream.extend_from_slice(next);
        let out = scanned(&[&stream[..30], &stream[30..]]);
        assert_eq!(&out[..body.len()], body, "the body is not touched");
        assert_eq!(out[body.len() + 15], 0, "the pipelined head's bare LF is poisoned");
    }

    #[test]
    fn chunked_bodies_are_followed_to_the_next_head() {
        let first = b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab\ncd\r\n0\r\n\r\n";
        let second = b"POST /b HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut stream = first.to_vec();
        stream.extend_from_slice(second);
        let out = scanned(&[&stream]);
        assert_eq!(&out[..first.len()], first);
        assert_eq!(out[out.len() - 1], 0, "the second head's framing conflict is poisoned");
    }

    #[test]
    fn a_request_line_over_its_limit_is_reported_wherever_the_reads_split() {
        let long = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(100));
        for cut in [1, 50, 104, long.len()] {
            let mut scan = HeadScan::new(100);
            let (a, b) = long.as_bytes().split_at(cut);
            let reported = scan.scan(&mut a.to_vec()) || scan.scan(&mut b.to_vec());
            assert!(reported, "cut at {cut}");
        }
        let fits = "GET /short HTTP/1.1\r\nX-Header: ".to_string() + &"h".repeat(500) + "\r\n\r\n";
        assert!(
            !HeadScan::new(100).scan(&mut fits.into_bytes()),
            "header lines are not request lines"
        );
    }

    #[test]
    fn a_pipelined_request_line_is_measured_after_the_body() {
        let first = b"POST /a HTTP/1.1\r\nContent-Length: 200\r\n\r\n".to_vec();
        let mut stream = first.clone();
        stream.extend(std::iter::repeat_n(b'b', 200));
        let mut scan = HeadScan::new(100);
        assert!(!scan.scan(&mut stream), "a long body is not a request line");
        let next = format!("\r\nGET /{} HTTP/1.1\r\n\r\n", "a".repeat(100));
        assert!(scan.scan(&mut next.into_bytes()));
    }

    #[test]
    fn an_upgrade_ends_the_scan() {
        let stream = b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n\x81\x05hel\nlo";
        assert_eq!(scanned(&[stream]), stream);
    }

    #[test]
    fn a_head_framed_by_both_length_and_chunking_is_poisoned_at_its_end() {
        let head: &[u8] = b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
        let out = scanned(&[&head[..30], &head[30..]]);
        assert_eq!(out[out.len() - 1], 0);
        assert_eq!(&out[..out.len() - 1], &head[..head.len() - 1]);
        let one: &[u8] = b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\n";
        assert_eq!(scanned(&[one]), one);
    }

    #[tokio::test(start_paused = true)]
    async fn each_phase_has_its_own_deadline() {
        let state = ConnState::new();
        let t = Timeouts {
            keepalive: Duration::from_secs(620),
            header: Duration::from_secs(30),
            body: Duration::from_secs(60),
        };
        let start = Instant::now();
        assert_eq!(state.deadline(&t), Some(start + t.keepalive));
        state.on_bytes_read();
        assert_eq!(state.phase(), Phase::Head);
        assert_eq!(state.deadline(&t), Some(start + t.header));
        state.enter(Phase::Busy);
        assert_eq!(state.deadline(&t), None);
        tokio::time::advance(Duration::from_secs(100)).await;
        state.enter(Phase::Idle);
        assert_eq!(state.deadline(&t), Some(start + Duration::from_secs(100) + t.keepalive));
    }
}
