//! The access log and the request metrics: one line per request, written
//! when its response body ends (or the exchange breaks off), with the real
//! sizes and latency.
//!
//! Everything the line needs is kept as received (cheap clones of the
//! method, URI and header values) and only rendered when the line is
//! written, with secret query values redacted then.
//!
//! Who made the request is the `user_id` (a hash of the IAP `sub`, the one
//! the session events carry), never the email: whatever identifies the user
//! while the request is served ([`identified`]) is noted for its line.
//! `httpRequest.remoteIp` is the client: the peer address, or behind the
//! Google load balancer (`server.behind_load_balancer`) the entry it added
//! to `X-Forwarded-For` (see [`forwarded_client`]).

use std::cell::RefCell;
use std::fmt::{self, Write};
use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::header::{CONTENT_LENGTH, USER_AGENT};
use http::HeaderMap;
use http::{HeaderName, HeaderValue, Method, Request, Response, Uri};
use tokio::time::Instant;
use tracing::Level;

use super::cloud_logging::{self, write_json_str, Escaped};
use super::{stderr, PROJECT_ID};
use crate::body::{Watch, Watched};
use crate::metrics::Metrics;

/// What a request is, for metrics, log levels and routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Goes to the user's backend.
    Proxied,
    /// One of the router's own endpoints under `/_router`.
    Router,
    /// `/healthz` and `/readyz`: logged at debug level only.
    Health,
    /// Refused before it could be read: a malformed or over-long head,
    /// answered below the HTTP layer (see [`refused`]).
    Unparsed,
}

impl Kind {
    pub fn of(path: &str) -> Kind {
        match path {
            "/healthz" | "/readyz" => Kind::Health,
            p if p == "/_router" || p.starts_with("/_router/") => Kind::Router,
            _ => Kind::Proxied,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Kind::Proxied => "proxied",
            Kind::Router => "router",
            Kind::Health => "health",
            Kind::Unparsed => "unparsed",
        }
    }
}

/// Query parameters whose values never reach a log line.
const SECRET_PARAMS: [&str; 8] = ["token", "key", "secret", "password", "auth", "code", "sig", "session"];

/// Path and query, with the values of secret-looking parameters redacted.
struct LoggableUrl<'a>(&'a Uri);

impl LoggableUrl<'_> {
    fn write_to(&self, out: &mut impl Write) -> fmt::Result {
        out.write_str(self.0.path())?;
        let Some(query) = self.0.query() else {
            return Ok(());
        };
        for (i, pair) in query.split('&').enumerate() {
            out.write_str(if i == 0 { "?" } else { "&" })?;
            let name = pair.split_once('=').map_or(pair, |(name, _)| name);
            if SECRET_PARAMS.iter().any(|secret| contains_ignore_case(name, secret)) {
                out.write_str(name)?;
                out.write_str("=REDACTED")?;
            } else {
                out.write_str(pair)?;
            }
        }
        Ok(())
    }
}

impl fmt::Display for LoggableUrl<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write_to(f)
    }
}

fn contains_ignore_case(haystack: &str, needle: &str) -> bool {
    haystack
        .as_bytes()
        .windows(needle.len())
        .any(|window| window.eq_ignore_ascii_case(needle.as_bytes()))
}

/// The Cloud Trace resource for an `X-Cloud-Trace-Context` value
/// (`TRACE_ID/SPAN_ID;o=1`): `projects/P/traces/TRACE_ID` once
/// `log.project_id` is known, else the bare id.
struct TraceResource<'a>(&'a str);

impl<'a> TraceResource<'a> {
    fn parse(header: &'a str) -> Option<Self> {
        let trace_id = header.split('/').next()?.trim();
        (!trace_id.is_empty() && trace_id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(TraceResource(trace_id))
    }
}

impl TraceResource<'_> {
    fn write_to(&self, out: &mut impl Write) -> fmt::Result {
        if let Some(project) = PROJECT_ID.get() {
            out.write_str("projects/")?;
            out.write_str(project)?;
            out.write_str("/traces/")?;
        }
        out.write_str(self.0)
    }
}

impl fmt::Display for TraceResource<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write_to(f)
    }
}

/// A duration as Cloud Logging's `latency` wants it: seconds with an `s`,
/// to the microsecond.
struct Latency(Duration);

impl Latency {
    fn write_to(&self, out: &mut impl Write) -> fmt::Result {
        out.write_str(itoa::Buffer::new().format(self.0.as_secs()))?;
        let mut micros = *b".000000s";
        let mut rest = self.0.subsec_micros();
        for digit in micros[1..7].iter_mut().rev() {
            *digit = b'0' + (rest % 10) as u8;
            rest /= 10;
        }
        out.write_str(std::str::from_utf8(&micros).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Display for Latency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write_to(f)
    }
}

/// Google's load balancer's trace header (`TRACE_ID/SPAN_ID;o=1`).
static TRACE_CONTEXT: HeaderName = HeaderName::from_static("x-cloud-trace-context");

/// The client end of one connection, as the access log and the request
/// metrics need it. Made once per connection: a request then clones this
/// `Arc`, which only the connection's own thread touches, instead of
/// references shared by every request on every core.
pub struct Peer {
    /// The address as text (for the log and `X-Forwarded-For`).
    pub ip: Box<str>,
    /// The peer is the Google load balancer, which names the client in
    /// `X-Forwarded-For`.
    behind_load_balancer: bool,
    metrics: Arc<Metrics>,
}

impl Peer {
    pub fn new(ip: IpAddr, behind_load_balancer: bool, metrics: Arc<Metrics>) -> Arc<Peer> {
        Arc::new(Peer {
            ip: ip.to_string().into(),
            behind_load_balancer,
            metrics,
        })
    }
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// The client's address as the Google load balancer reports it: it appends
/// `<client>, <load balancer>` to whatever `X-Forwarded-For` the client
/// sent, so the client is the second entry from the end, and every entry
/// before it is the client's own writing. Nothing when there are fewer
/// than two entries, or that one is not an address (then the request did
/// not come through the load balancer, and the peer address stands).
fn forwarded_client(headers: &HeaderMap) -> Option<IpAddr> {
    let mut entries = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .rev()
        .flat_map(|value| value.as_bytes().rsplit(|&b| b == b','));
    let _load_balancer = entries.next()?;
    let client = entries.next()?;
    std::str::from_utf8(client).ok()?.trim().parse().ok()
}

/// The address `httpRequest.remoteIp` shows.
enum RemoteIp<'a> {
    Forwarded(IpAddr),
    Peer(&'a str),
}

impl fmt::Display for RemoteIp<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RemoteIp::Forwarded(ip) => ip.fmt(f),
            RemoteIp::Peer(ip) => f.write_str(ip),
        }
    }
}

tokio::task_local! {
    /// The `user_id` of whoever the request being served was identified as.
    static USER: RefCell<Option<Arc<str>>>;
}

/// Notes that the request being served comes from the user `user_id`
/// ([`super::user_id`]), for its access-log line. Outside [`noting_user`],
/// nothing.
pub fn identified(user_id: &Arc<str>) {
    let _ = USER.try_with(|user| *user.borrow_mut() = Some(user_id.clone()));
}

/// Serves a request with `serve`, and returns its answer with the user it
/// was [`identified`] as, if any. A task-local rather than an argument: the
/// identity is found deep in the handlers, and a failed request (a 502, a
/// 503) needs its user on the line as much as a served one.
pub async fn noting_user<F: Future>(serve: F) -> (F::Output, Option<Arc<str>>) {
    let mut scoped = std::pin::pin!(USER.scope(RefCell::new(None), serve));
    let output = scoped.as_mut().await;
    let user = scoped.as_mut().take_value().and_then(RefCell::into_inner);
    (output, user)
}

/// Where a body's bytes are counted in `proxied_bytes`.
#[derive(Clone, Copy)]
enum Direction {
    ToUpstream,
    ToClient,
}

/// What the access-log line needs, kept from when the request arrived.
struct Exchange {
    kind: Kind,
    method: Method,
    uri: Uri,
    user_agent: Option<HeaderValue>,
    peer: Arc<Peer>,
    /// The client as the load balancer named it, when the peer is one.
    forwarded_for: Option<IpAddr>,
    /// The user's `user_id`, once identified.
    user: Option<Arc<str>>,
    trace: Option<HeaderValue>,
    started: Instant,
    /// The request body's count; `None` when it had no body.
    request_bytes: Option<Arc<AtomicU64>>,
    status: u16,
}

/// One event, at the level given, with the access line's fields.
macro_rules! access_event {
    ($level:expr, $exchange:expr, $response_bytes:expr, $completed:expr) => {{
        let e = $exchange;
        let url = LoggableUrl(&e.uri);
        let trace = e.trace.as_ref().and_then(|t| TraceResource::parse(t.to_str().ok()?));
        tracing::event!(
            target: "access",
            $level,
            httpRequest.requestMethod = e.method.as_str(),
            httpRequest.requestUrl = %url,
            httpRequest.status = u64::from(e.status),
            httpRequest.latency = %Latency(e.started.elapsed()),
            httpRequest.requestSize = %e.request_size(),
            httpRequest.responseSize = %$response_bytes,
            httpRequest.userAgent = e.user_agent.as_ref().and_then(|v| v.to_str().ok()),
            httpRequest.remoteIp = %e.remote_ip(),
            httpRequest.protocol = "HTTP/1.1",
            kind = e.kind.label(),
            user_id = e.user.as_deref(),
            completed = $completed,
            "logging.googleapis.com/trace" = trace.map(display),
            "{} {url} {}",
            e.method,
            e.status
        )
    }};
}

impl Exchange {
    fn remote_ip(&self) -> RemoteIp<'_> {
        match self.forwarded_for {
            Some(ip) => RemoteIp::Forwarded(ip),
            None => RemoteIp::Peer(&self.peer.ip),
        }
    }

    fn request_size(&self) -> u64 {
        self.request_bytes
            .as_ref()
            .map_or(0, |bytes| bytes.load(Ordering::Relaxed))
    }

    fn log(&self, response_bytes: u64, completed: bool) {
        let level = if self.kind == Kind::Health {
            Level::DEBUG
        } else {
            Level::INFO
        };
        let enabled = match level {
            Level::DEBUG => tracing::enabled!(target: "access", Level::DEBUG),
            _ => tracing::enabled!(target: "access", Level::INFO),
        };
        if !enabled {
            return;
        }
        if super::own_json_lines() {
            stderr::write_with(|out| {
                let _ = self.write_json_line(out, level, response_bytes, completed);
            });
        } else if level == Level::DEBUG {
            access_event!(Level::DEBUG, self, response_bytes, completed);
        } else {
            access_event!(Level::INFO, self, response_bytes, completed);
        }
    }

    /// The line `CloudLogging` makes of `access_event!`, written directly:
    /// a tenth of the cost, once per request.
    fn write_json_line(&self, out: &mut String, level: Level, response_bytes: u64, completed: bool) -> fmt::Result {
        let url = LoggableUrl(&self.uri);
        let mut number = itoa::Buffer::new();
        cloud_logging::write_preamble(out, level, "access")?;
        out.push_str(r#","message":""#);
        Escaped(&mut *out).write_str(self.method.as_str())?;
        out.push(' ');
        url.write_to(&mut Escaped(&mut *out))?;
        out.push(' ');
        out.push_str(number.format(self.status));
        out.push_str(r#"","kind":""#);
        out.push_str(self.kind.label());
        out.push_str(if completed {
            r#"","completed":true"#
        } else {
            r#"","completed":false"#
        });
        if let Some(user_id) = &self.user {
            out.push_str(r#","user_id":"#);
            write_json_str(out, user_id)?;
        }
        if let Some(trace) = self.trace.as_ref().and_then(|t| TraceResource::parse(t.to_str().ok()?)) {
            out.push_str(r#","logging.googleapis.com/trace":""#);
            trace.write_to(&mut Escaped(&mut *out))?;
            out.push('"');
        }
        out.push_str(r#","httpRequest":{"requestMethod":"#);
        write_json_str(out, self.method.as_str())?;
        out.push_str(r#","requestUrl":""#);
        url.write_to(&mut Escaped(&mut *out))?;
        out.push_str(r#"","status":"#);
        out.push_str(number.format(self.status));
        out.push_str(r#","latency":""#);
        Latency(self.started.elapsed()).write_to(out)?;
        out.push_str(r#"","requestSize":""#);
        out.push_str(number.format(self.request_size()));
        out.push_str(r#"","responseSize":""#);
        out.push_str(number.format(response_bytes));
        out.push('"');
        if let Some(agent) = self.user_agent.as_ref().and_then(|v| v.to_str().ok()) {
            out.push_str(r#","userAgent":"#);
            write_json_str(out, agent)?;
        }
        out.push_str(r#","remoteIp":""#);
        write!(out, "{}", self.remote_ip())?;
        out.push('"');
        out.push_str(r#","protocol":"HTTP/1.1"}}"#);
        out.push('\n');
        Ok(())
    }
}

/// Counts and logs a request refused below the HTTP layer, which no handler
/// saw: a malformed head (400) or one too large (431), answered by the HTTP
/// parser, or a URI too long (414), answered by the socket wrapper. Its
/// line has no method, URL or user (none was read); `latency` runs from the
/// head's first byte. Rare, so it goes through `tracing`'s formatter.
pub fn refused(peer: &Peer, status: http::StatusCode, latency: Duration) {
    peer.metrics.count_request(Kind::Unparsed.label(), status);
    tracing::event!(
        target: "access",
        Level::INFO,
        httpRequest.status = u64::from(status.as_u16()),
        httpRequest.latency = %Latency(latency),
        httpRequest.remoteIp = &*peer.ip,
        httpRequest.protocol = "HTTP/1.1",
        kind = Kind::Unparsed.label(),
        completed = true,
        "unreadable request {}",
        status.as_u16()
    );
}

/// A request being observed: its metrics wait for the final response, its
/// access-log line for the end of the response body.
pub struct Observed {
    exchange: Exchange,
}

/// Starts observing `request` from `peer`; its body is counted from now on.
pub fn observe<B: http_body::Body>(request: Request<B>, peer: &Arc<Peer>) -> (Observed, Request<Counted<B>>) {
    let kind = Kind::of(request.uri().path());
    // A request without a body needs no shared count (nearly every GET).
    let request_bytes = (!http_body::Body::is_end_stream(request.body())).then(|| Arc::new(AtomicU64::new(0)));
    let headers = request.headers();
    let exchange = Exchange {
        kind,
        method: request.method().clone(),
        uri: request.uri().clone(),
        user_agent: headers.get(USER_AGENT).cloned(),
        peer: peer.clone(),
        forwarded_for: peer.behind_load_balancer.then(|| forwarded_client(headers)).flatten(),
        user: None,
        trace: headers.get(&TRACE_CONTEXT).cloned(),
        started: Instant::now(),
        request_bytes: request_bytes.clone(),
        status: 0,
    };
    let to_upstream = (kind == Kind::Proxied).then(|| (peer.clone(), Direction::ToUpstream));
    let request = request.map(|body| Watched::new(body, Tally::new(request_bytes, to_upstream)));
    (Observed { exchange }, request)
}

impl Observed {
    pub fn kind(&self) -> Kind {
        self.exchange.kind
    }

    /// Counts the final response now; its body writes the access-log line
    /// when it ends (a 101 is logged at once: what follows is not HTTP).
    /// `user`: the `user_id` the request was identified as.
    pub fn finish<B: http_body::Body>(self, response: Response<B>, user: Option<Arc<str>>) -> Response<Logged<B>> {
        let Observed { mut exchange } = self;
        exchange.user = user;
        let kind = exchange.kind;
        let metrics = &exchange.peer.metrics;
        exchange.status = response.status().as_u16();
        metrics.count_request(kind.label(), response.status());
        let upgraded = response.status() == http::StatusCode::SWITCHING_PROTOCOLS;
        let streaming = !upgraded && kind == Kind::Proxied && !http_body::Body::is_end_stream(response.body());
        if streaming {
            metrics.open_streams.inc();
        }
        // A body of known size is complete once that much went out: the
        // server stops polling a body that says it has ended, so its end
        // is never seen (an empty 401, a 303, a page made here).
        let declared = response
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .or_else(|| response.body().size_hint().exact());
        let to_client = (kind == Kind::Proxied).then(|| (exchange.peer.clone(), Direction::ToClient));
        if upgraded {
            exchange.log(0, true);
        }
        let line = LogLine {
            tally: Tally::new(None, to_client),
            exchange: (!upgraded).then_some(exchange),
            declared,
            open_stream: streaming,
        };
        response.map(|body| Watched::new(body, line))
    }
}

/// Counts a body's data bytes, into `proxied_bytes` too when `metric`
/// says which way they go.
pub struct Tally {
    seen: u64,
    /// Where someone else reads the count (the request's, for the line the
    /// response writes).
    shared: Option<Arc<AtomicU64>>,
    metric: Option<(Arc<Peer>, Direction)>,
    ended: bool,
}

impl Tally {
    fn new(shared: Option<Arc<AtomicU64>>, metric: Option<(Arc<Peer>, Direction)>) -> Self {
        Tally {
            seen: 0,
            shared,
            metric,
            ended: false,
        }
    }
}

impl Watch for Tally {
    fn data(&mut self, bytes: u64) {
        self.seen += bytes;
        if let Some(shared) = &self.shared {
            shared.fetch_add(bytes, Ordering::Relaxed);
        }
        if let Some((peer, direction)) = &self.metric {
            let counter = match direction {
                Direction::ToUpstream => peer.metrics.to_upstream_bytes(),
                Direction::ToClient => peer.metrics.to_client_bytes(),
            };
            counter.inc_by(bytes);
        }
    }

    fn end(&mut self) {
        self.ended = true;
    }
}

/// A request body, counted for the access log and the metrics.
pub type Counted<B> = Watched<B, Tally>;

/// Counts a response body and writes the access-log line when the body is
/// dropped: after the last byte, or when the exchange broke off.
pub struct LogLine {
    tally: Tally,
    /// `None` once logged.
    exchange: Option<Exchange>,
    declared: Option<u64>,
    /// Counted in `open_streams` until dropped.
    open_stream: bool,
}

impl Watch for LogLine {
    fn data(&mut self, bytes: u64) {
        self.tally.data(bytes);
    }

    fn end(&mut self) {
        self.tally.end();
    }
}

impl Drop for LogLine {
    fn drop(&mut self) {
        if self.open_stream {
            if let Some((peer, _)) = &self.tally.metric {
                peer.metrics.open_streams.dec();
            }
        }
        if let Some(exchange) = &self.exchange {
            let sent = self.tally.seen;
            let completed = self.tally.ended || self.declared == Some(sent);
            exchange.log(sent, completed);
        }
    }
}

/// A response body that writes its access-log line when it is done.
pub type Logged<B> = Watched<B, LogLine>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_written_directly_is_the_line_the_formatter_makes_of_the_event() {
        let exchange = Exchange {
            kind: Kind::Proxied,
            method: Method::POST,
            uri: "/run/predict?session_hash=abc&fn_index=3".parse().unwrap(),
            user_agent: Some(HeaderValue::from_static("agent \"quoted\" \\ 1.0")),
            peer: Peer::new([10, 0, 0, 1].into(), true, Metrics::new()),
            forwarded_for: Some([203, 0, 113, 7].into()),
            user: Some(super::super::user_id("accounts.google.com:1").into()),
            trace: Some(HeaderValue::from_static("105445aa7843bc8bf206b12000100000/1;o=1")),
            started: Instant::now(),
            request_bytes: Some(Arc::new(AtomicU64::new(42))),
            status: 200,
        };
        let formatted = super::super::render_with_cloud_logging(|| {
            access_event!(Level::INFO, &exchange, 1234u64, false);
        });
        let mut direct = String::new();
        exchange.write_json_line(&mut direct, Level::INFO, 1234, false).unwrap();
        assert!(direct.ends_with("}\n") && direct.matches('\n').count() == 1);
        let direct: serde_json::Value = serde_json::from_str(&direct).unwrap();
        let timeless = |mut line: serde_json::Value| {
            assert!(line["time"].is_string() && line["httpRequest"]["latency"].as_str().unwrap().ends_with('s'));
            line.as_object_mut().unwrap().remove("time");
            line["httpRequest"].as_object_mut().unwrap().remove("latency");
            line
        };
        let direct = timeless(direct);
        assert_eq!(direct, timeless(formatted));
        assert_eq!(
            direct["httpRequest"]["requestUrl"],
            "/run/predict?session_hash=REDACTED&fn_index=3"
        );
        assert_eq!(direct["httpRequest"]["userAgent"], "agent \"quoted\" \\ 1.0");
        assert_eq!(direct["httpRequest"]["requestSize"], "42");
        assert_eq!(direct["httpRequest"]["remoteIp"], "203.0.113.7");
        assert_eq!(direct["user_id"], super::super::user_id("accounts.google.com:1"));
    }

    fn forwarded(values: &[&str]) -> Option<IpAddr> {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(&X_FORWARDED_FOR, HeaderValue::from_str(value).unwrap());
        }
        forwarded_client(&headers)
    }

    #[test]
    fn the_client_is_the_entry_the_load_balancer_added_before_its_own() {
        let client = Some("203.0.113.7".parse().unwrap());
        assert_eq!(forwarded(&["203.0.113.7, 130.211.0.5"]), client);
        assert_eq!(
            forwarded(&["6.6.6.6, 7.7.7.7,203.0.113.7, 130.211.0.5"]),
            client,
            "what the client wrote before it is not the client"
        );
        assert_eq!(forwarded(&["6.6.6.6", "203.0.113.7, 130.211.0.5"]), client);
        assert_eq!(
            forwarded(&["6.6.6.6, 203.0.113.7", "130.211.0.5"]),
            client,
            "across header lines"
        );
        assert_eq!(
            forwarded(&["2001:db8::1, 130.211.0.5"]),
            Some("2001:db8::1".parse().unwrap())
        );
        assert_eq!(
            forwarded(&["6.6.6.6"]),
            None,
            "one entry: not through the load balancer"
        );
        assert_eq!(forwarded(&[]), None);
        assert_eq!(forwarded(&["not-an-address, 130.211.0.5"]), None);
    }

    #[test]
    fn latency_is_seconds_to_the_microsecond() {
        assert_eq!(Latency(Duration::from_micros(1_234_567)).to_string(), "1.234567s");
        assert_eq!(Latency(Duration::from_nanos(999)).to_string(), "0.000000s");
    }

    #[test]
    fn secret_query_values_are_redacted_and_the_rest_kept() {
        let uri: Uri = "/file=out.png?token=abc&__theme=dark&api_KEY=x&flag".parse().unwrap();
        assert_eq!(
            LoggableUrl(&uri).to_string(),
            "/file=out.png?token=REDACTED&__theme=dark&api_KEY=REDACTED&flag"
        );
        let plain: Uri = "/queue/join".parse().unwrap();
        assert_eq!(LoggableUrl(&plain).to_string(), "/queue/join");
    }

    #[test]
    fn trace_headers_become_trace_resources() {
        let trace = TraceResource::parse("105445aa7843bc8bf206b12000100000/1;o=1").unwrap();
        assert_eq!(trace.to_string(), "105445aa7843bc8bf206b12000100000");
        assert!(TraceResource::parse("not a trace").is_none());
        assert!(TraceResource::parse("/1;o=1").is_none());
    }
}
