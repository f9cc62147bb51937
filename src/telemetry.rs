//! Logs for Cloud Logging and the per-request observation layer.
//!
//! - [`init`]: `tracing` to stderr, as JSON lines in Cloud Logging's shape
//!   (`severity`, `message`, `time`, `httpRequest`,
//!   `logging.googleapis.com/trace`) or as text.
//! - [`observe`]: the outermost layer: counts every request by kind and
//!   status class, counts proxied bytes, and writes one access-log line per
//!   request when its response body ends, with the real sizes and latency.
//!
//! Never logged: tokens, cookies, `Authorization`, the cookie secret. Emails
//! only with `log.include_email`; otherwise a short hash stands in.

use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use http::header::{CONTENT_LENGTH, USER_AGENT};
use http_body::{Frame, SizeHint};
use prometheus::IntCounter;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use tokio::time::Instant;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::config::{LogConfig, LogFormat};
use crate::metrics::{self, Metrics};
use crate::server::{AppState, ClientAddr};

static INCLUDE_EMAIL: AtomicBool = AtomicBool::new(false);
static PROJECT_ID: OnceLock<String> = OnceLock::new();

/// Installs the global subscriber. `RUST_LOG`, when set, wins over
/// `log.level`.
pub fn init(config: &LogConfig) {
    INCLUDE_EMAIL.store(config.include_email, Ordering::Relaxed);
    if let Some(project) = &config.project_id {
        let _ = PROJECT_ID.set(project.clone());
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match config.format {
        LogFormat::Json => builder.event_format(CloudLogging).try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
    };
    // Already installed (tests, embedders): keep theirs.
    let _ = result;
}

/// A stable, non-reversible id for a user (from their IAP `sub`).
pub fn user_id(sub: &str) -> String {
    short_hash("user", sub)
}

/// The email as logs may show it: itself with `log.include_email`, else a
/// short hash.
pub fn email(email: &str) -> String {
    if INCLUDE_EMAIL.load(Ordering::Relaxed) {
        email.to_string()
    } else {
        short_hash("email", email)
    }
}

fn short_hash(context: &str, value: &str) -> String {
    let digest = Sha256::new()
        .chain_update(context)
        .chain_update([0])
        .chain_update(value)
        .finalize();
    digest[..6].iter().map(|b| format!("{b:02x}")).collect()
}

/// JSON lines as Cloud Logging reads them.
struct CloudLogging;

impl<S, N> FormatEvent<S, N> for CloudLogging
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, _ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let mut fields = JsonFields(Map::new());
        event.record(&mut fields);
        let mut line = Map::new();
        let severity = match *event.metadata().level() {
            Level::ERROR => "ERROR",
            Level::WARN => "WARNING",
            Level::INFO => "INFO",
            Level::DEBUG | Level::TRACE => "DEBUG",
        };
        line.insert("severity".into(), json!(severity));
        line.insert(
            "time".into(),
            json!(humantime::format_rfc3339_micros(SystemTime::now()).to_string()),
        );
        line.insert("message".into(), fields.0.remove("message").unwrap_or(json!("")));
        line.insert("target".into(), json!(event.metadata().target()));
        for (key, value) in fields.0 {
            // Structured values travel as JSON text through tracing's fields.
            let value = match (key.as_str(), &value) {
                ("httpRequest", Value::String(text)) => serde_json::from_str(text).unwrap_or(value),
                _ => value,
            };
            line.insert(key, value);
        }
        writeln!(writer, "{}", Value::Object(line))
    }
}

struct JsonFields(Map<String, Value>);

impl Visit for JsonFields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), json!(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), json!(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), json!(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), json!(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), json!(value));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().into(), json!(format!("{value:?}")));
    }
}

/// What a request is, for metrics and log levels.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Proxied,
    Router,
    Health,
}

impl Kind {
    fn of(path: &str) -> Kind {
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
        }
    }
}

/// Query parameters whose values never reach a log line.
const SECRET_PARAMS: [&str; 8] = ["token", "key", "secret", "password", "auth", "code", "sig", "session"];

/// Path and query, with the values of secret-looking parameters redacted.
fn loggable_url(uri: &http::Uri) -> String {
    let path = uri.path();
    let Some(query) = uri.query() else {
        return path.to_string();
    };
    let redacted: Vec<String> = query
        .split('&')
        .map(|pair| {
            let (name, _) = pair.split_once('=').unwrap_or((pair, ""));
            let lower = name.to_ascii_lowercase();
            if SECRET_PARAMS.iter().any(|s| lower.contains(s)) {
                format!("{name}=REDACTED")
            } else {
                pair.to_string()
            }
        })
        .collect();
    format!("{path}?{}", redacted.join("&"))
}

/// The Cloud Trace resource for an `X-Cloud-Trace-Context` value
/// (`TRACE_ID/SPAN_ID;o=1`).
fn trace_resource(header: &str) -> Option<String> {
    let trace_id = header.split('/').next()?.trim();
    if trace_id.is_empty() || !trace_id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some(match PROJECT_ID.get() {
        Some(project) => format!("projects/{project}/traces/{trace_id}"),
        None => trace_id.to_string(),
    })
}

/// What the access-log line needs, gathered when the request arrives.
struct Exchange {
    kind: Kind,
    method: String,
    url: String,
    user_agent: Option<String>,
    remote_ip: Option<String>,
    trace: Option<String>,
    started: Instant,
    request_bytes: Arc<AtomicU64>,
    status: u16,
}

impl Exchange {
    fn log(&self, response_bytes: u64, completed: bool) {
        let latency = self.started.elapsed();
        let request = json!({
            "requestMethod": self.method,
            "requestUrl": self.url,
            "status": self.status,
            "latency": format!("{:.3}s", latency.as_secs_f64()),
            "requestSize": self.request_bytes.load(Ordering::Relaxed).to_string(),
            "responseSize": response_bytes.to_string(),
            "userAgent": self.user_agent,
            "remoteIp": self.remote_ip,
            "protocol": "HTTP/1.1",
        });
        let message = format!("{} {} {}", self.method, self.url, self.status);
        let kind = self.kind.label();
        match (&self.trace, self.kind) {
            (_, Kind::Health) => {
                tracing::debug!(target: "access", httpRequest = %request, kind, completed, "{message}")
            }
            (Some(trace), _) => {
                tracing::info!(target: "access", httpRequest = %request, kind, completed, "logging.googleapis.com/trace" = %trace, "{message}")
            }
            (None, _) => tracing::info!(target: "access", httpRequest = %request, kind, completed, "{message}"),
        }
    }
}

/// Outermost layer: metrics and the access log for every request.
pub async fn observe(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let metrics = state.metrics.clone();
    let kind = Kind::of(request.uri().path());
    let request_bytes = Arc::new(AtomicU64::new(0));
    let headers = request.headers();
    let header = |name| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let mut exchange = Exchange {
        kind,
        method: request.method().to_string(),
        url: loggable_url(request.uri()),
        user_agent: header(USER_AGENT),
        remote_ip: request.extensions().get::<ClientAddr>().map(|c| c.0.ip().to_string()),
        trace: header(http::HeaderName::from_static("x-cloud-trace-context")).and_then(|t| trace_resource(&t)),
        started: Instant::now(),
        request_bytes: request_bytes.clone(),
        status: 0,
    };
    let upstream_bytes = (kind == Kind::Proxied).then(|| metrics.proxied_bytes.with_label_values(&["to_upstream"]));
    let request = request.map(|body| Body::new(Counted::new(body, request_bytes, upstream_bytes)));

    let response = next.run(request).await;
    exchange.status = response.status().as_u16();
    metrics
        .requests
        .with_label_values(&[kind.label(), metrics::class(response.status())])
        .inc();
    if response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
        exchange.log(0, true);
        return response;
    }
    let streaming = kind == Kind::Proxied && !http_body::Body::is_end_stream(response.body());
    let declared = response
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let client_bytes = (kind == Kind::Proxied).then(|| metrics.proxied_bytes.with_label_values(&["to_client"]));
    response.map(|body| {
        Body::new(Logged {
            body: Counted::new(body, Arc::new(AtomicU64::new(0)), client_bytes),
            exchange,
            declared,
            open_stream: streaming.then(|| {
                metrics.open_streams.inc();
                metrics.clone()
            }),
        })
    })
}

/// A body that counts its data bytes (and feeds a metric).
struct Counted<B> {
    inner: B,
    bytes: Arc<AtomicU64>,
    metric: Option<IntCounter>,
    ended: bool,
}

impl<B> Counted<B> {
    fn new(inner: B, bytes: Arc<AtomicU64>, metric: Option<IntCounter>) -> Self {
        Counted {
            inner,
            bytes,
            metric,
            ended: false,
        }
    }
}

impl<B: http_body::Body + Unpin> http_body::Body for Counted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = bytes::Buf::remaining(data) as u64;
                    self.bytes.fetch_add(n, Ordering::Relaxed);
                    if let Some(metric) = &self.metric {
                        metric.inc_by(n);
                    }
                }
            }
            Poll::Ready(None) => self.ended = true,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that writes the access-log line when it is dropped:
/// after the last byte, or when the exchange broke off.
struct Logged<B> {
    body: Counted<B>,
    exchange: Exchange,
    declared: Option<u64>,
    open_stream: Option<Arc<Metrics>>,
}

impl<B: http_body::Body + Unpin> http_body::Body for Logged<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl<B> Drop for Logged<B> {
    fn drop(&mut self) {
        if let Some(metrics) = &self.open_stream {
            metrics.open_streams.dec();
        }
        let sent = self.body.bytes.load(Ordering::Relaxed);
        let completed = self.body.ended || self.declared == Some(sent);
        self.exchange.log(sent, completed);
    }
}

/// How long ago `at` was, in whole seconds (0 for the future).
pub fn seconds_since(at: SystemTime) -> u64 {
    SystemTime::now().duration_since(at).unwrap_or(Duration::ZERO).as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_query_values_are_redacted_and_the_rest_kept() {
        let uri: http::Uri = "/file=out.png?token=abc&__theme=dark&api_key=x".parse().unwrap();
        assert_eq!(
            loggable_url(&uri),
            "/file=out.png?token=REDACTED&__theme=dark&api_key=REDACTED"
        );
    }

    #[test]
    fn trace_headers_become_trace_resources() {
        assert_eq!(
            trace_resource("105445aa7843bc8bf206b12000100000/1;o=1").as_deref(),
            Some("105445aa7843bc8bf206b12000100000")
        );
        assert_eq!(trace_resource("not a trace"), None);
    }

    #[test]
    fn user_ids_and_email_hashes_are_stable_and_short() {
        assert_eq!(user_id("accounts.google.com:1"), user_id("accounts.google.com:1"));
        assert_ne!(user_id("accounts.google.com:1"), user_id("accounts.google.com:2"));
        assert_eq!(email("alice@example.com").len(), 12);
        assert!(!email("alice@example.com").contains('@'));
    }
}
