//! A stand-in for one WebUI pod: enough of the traffic shapes the real one
//! produces (page loads, a WebSocket, an event stream, large uploads) to
//! show and test the router without a GPU. Each page names its pod and the
//! user the router says it is serving.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::response::sse::{Event, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::{Stream, StreamExt};
use http::HeaderMap;
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

use crate::app::pages::{document, escape};
use crate::proxy::headers::{EMAIL_HEADER, USER_HEADER};

struct Pod {
    name: String,
    requests: AtomicU64,
}

type Shared = State<Arc<Pod>>;

/// A running stand-in pod on loopback.
pub struct DemoPod {
    pub name: String,
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl DemoPod {
    /// Starts a pod named `name` on an ephemeral loopback port.
    pub async fn start(name: &str) -> std::io::Result<DemoPod> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let app = app(name);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(DemoPod {
            name: name.to_string(),
            addr,
            task,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for DemoPod {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn app(name: &str) -> Router {
    let pod = Arc::new(Pod {
        name: name.to_string(),
        requests: AtomicU64::new(0),
    });
    Router::new()
        .route("/", get(home))
        .route("/whoami", get(whoami))
        .route("/ws", get(echo_socket))
        .route("/events", get(events))
        .route("/upload", post(upload))
        .route("/download", get(download))
        .route("/internal/ping", get(|| async { "pong" }))
        .with_state(pod)
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

async fn home(State(pod): Shared, headers: HeaderMap) -> Html<String> {
    let served = pod.requests.fetch_add(1, Ordering::Relaxed) + 1;
    let user = header(&headers, EMAIL_HEADER).unwrap_or("(unknown)");
    let body = format!(
        r#"<p>This is <strong id="pod">{pod}</strong>, serving <strong id="user">{user}</strong>.</p>
<p class="muted">Page loads served by this pod: {served}. A real pod runs Stable Diffusion WebUI here.</p>
<p>WebSocket echo through the router: <span id="ws">connecting…</span></p>
<div><a href="/_router/status">Your session</a> · <form style="display:inline" method="post" action="/_router/dev/logout"><button>Sign in as someone else</button></form></div>
<script>
const ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws");
ws.onopen = () => ws.send("hello from the browser");
ws.onmessage = (m) => {{ document.getElementById("ws").textContent = "echoed: " + m.data; }};
ws.onerror = () => {{ document.getElementById("ws").textContent = "failed"; }};
</script>"#,
        pod = escape(&pod.name),
        user = escape(user),
    );
    Html(document(&format!("{} — demo WebUI", pod.name), &body, None))
}

/// What this pod was told about the request: lets tests check what the
/// router forwards and strips.
async fn whoami(State(pod): Shared, headers: HeaderMap) -> Json<serde_json::Value> {
    pod.requests.fetch_add(1, Ordering::Relaxed);
    Json(json!({
        "pod": pod.name,
        "user": header(&headers, USER_HEADER),
        "email": header(&headers, EMAIL_HEADER),
        "cookie": header(&headers, "cookie"),
        "x_forwarded_for": header(&headers, "x-forwarded-for"),
        "x_forwarded_proto": header(&headers, "x-forwarded-proto"),
        "x_forwarded_host": header(&headers, "x-forwarded-host"),
        "goog_email": header(&headers, "x-goog-authenticated-user-email"),
        "goog_id": header(&headers, "x-goog-authenticated-user-id"),
        "connection": header(&headers, "connection"),
    }))
}

async fn echo_socket(upgrade: WebSocketUpgrade) -> Response {
    upgrade
        .max_message_size(usize::MAX)
        .max_frame_size(usize::MAX)
        .on_upgrade(echo)
}

async fn echo(mut socket: WebSocket) {
    while let Some(Ok(message)) = socket.recv().await {
        let reply = match message {
            Message::Text(_) | Message::Binary(_) => message,
            Message::Close(_) => break,
            _ => continue,
        };
        if socket.send(reply).await.is_err() {
            break;
        }
    }
}

#[derive(Deserialize)]
struct EventsQuery {
    count: Option<u32>,
    interval_ms: Option<u64>,
}

/// `count` events (default 5), `interval_ms` apart (default 1000), the
/// first one immediately.
async fn events(Query(q): Query<EventsQuery>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let count = q.count.unwrap_or(5).min(10_000);
    let interval = Duration::from_millis(q.interval_ms.unwrap_or(1000));
    let stream = futures_util::stream::unfold(0u32, move |n| async move {
        if n >= count {
            return None;
        }
        if n > 0 {
            tokio::time::sleep(interval).await;
        }
        Some((Ok(Event::default().data(format!("event {n}"))), n + 1))
    });
    Sse::new(stream)
}

/// Reads the whole body as it streams in and reports its size and SHA-256.
async fn upload(body: Body) -> Response {
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(chunk) => {
                bytes += chunk.len() as u64;
                hasher.update(&chunk);
            }
            Err(e) => return (http::StatusCode::BAD_REQUEST, e.to_string()).into_response(),
        }
    }
    let digest: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Json(json!({ "bytes": bytes, "sha256": digest })).into_response()
}

#[derive(Deserialize)]
struct DownloadQuery {
    bytes: u64,
}

/// Streams `bytes` bytes in 64 KiB chunks.
async fn download(Query(q): Query<DownloadQuery>) -> Body {
    const CHUNK: u64 = 64 * 1024;
    let chunk = bytes::Bytes::from(vec![b'x'; CHUNK as usize]);
    let stream = futures_util::stream::unfold(q.bytes, move |left| {
        let chunk = chunk.clone();
        async move {
            if left == 0 {
                return None;
            }
            let n = left.min(CHUNK);
            Some((Ok::<_, Infallible>(chunk.slice(..n as usize)), left - n))
        }
    });
    Body::from_stream(stream)
}
