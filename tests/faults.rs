//! Faults: upstreams dying mid-response and mid-WebSocket, the JWKS
//! endpoint and the Kubernetes API down, slow or losing answers. In each the
//! router must fail visibly for the request that was hit, keep everything
//! else working, and recover without a restart.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use session_router::allocator::agones::label::user_label_value;
use session_router::app::{serve, AppState};
use session_router::config::Config;
use support::iap::SigningKey;
use support::{client, eventually, pods, set_cookie, FakeAgones, IapIssuer, TestRouter, AUDIENCE, SECRET};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const ASSERTION: &str = "x-goog-iap-jwt-assertion";

fn label(name: &str) -> String {
    user_label_value(&format!("{name}@example.com"))
}

async fn get(router_addr: SocketAddr, path: &str, token: &str, cookie: Option<&str>) -> reqwest::Response {
    let mut request = client()
        .get(format!("http://{router_addr}{path}"))
        .header(ASSERTION, token);
    if let Some(cookie) = cookie {
        request = request.header("cookie", cookie);
    }
    request.send().await.unwrap()
}

async fn pod_of(router: &TestRouter, token: &str) -> String {
    let response = get(router.addr, "/whoami", token, None).await;
    assert_eq!(response.status(), 200);
    let seen: Value = response.json().await.unwrap();
    seen["pod"].as_str().unwrap().to_string()
}

/// A router started without waiting for it to be ready.
struct Unready {
    addr: SocketAddr,
    state: Arc<AppState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Unready {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start_unready(text: &str) -> Unready {
    let config = Config::from_toml(text, Some(SECRET.to_vec())).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = Arc::new(session_router::build(config).await.unwrap());
    let serving = state.clone();
    let task = tokio::spawn(async move {
        serve(listener, serving, std::future::pending())
            .await
            .expect("router serves");
    });
    Unready { addr, state, task }
}

async fn readyz(addr: SocketAddr) -> u16 {
    client()
        .get(format!("http://{addr}/readyz"))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

// ---------------------------------------------------------------------------
// Upstreams that die

/// A raw upstream whose responses die half-way, as a crashing WebUI's do:
///
/// | path | answer |
/// |---|---|
/// | `/die-length` | `Content-Length: 100000`, 1000 bytes, then FIN |
/// | `/die-chunked` | chunked, one 1000-byte chunk, then FIN (no last chunk) |
/// | `/die-reset` | close-delimited, 1000 bytes, then RST |
/// | anything else | `200 ok` |
///
/// [`DyingUpstream::kill`] stops it altogether (the port then refuses).
struct DyingUpstream {
    addr: SocketAddr,
    tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl DyingUpstream {
    async fn start() -> DyingUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tasks = Arc::new(Mutex::new(Vec::new()));
        let registry = tasks.clone();
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let task = tokio::spawn(die_half_way(stream));
                registry.lock().unwrap().push(task);
            }
        });
        tasks.lock().unwrap().push(accept);
        DyingUpstream { addr, tasks }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The process is gone: the listener and every open connection close.
    fn kill(&self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

impl Drop for DyingUpstream {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn die_half_way(mut stream: TcpStream) {
    let mut head = Vec::new();
    let mut buf = [0u8; 8192];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let path = head.split(' ').nth(1).unwrap_or("/").to_string();
    let data = vec![b'x'; 1000];
    match path.as_str() {
        "/die-length" => {
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n")
                .await;
            let _ = stream.write_all(&data).await;
        }
        "/die-chunked" => {
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3e8\r\n")
                .await;
            let _ = stream.write_all(&data).await;
            let _ = stream.write_all(b"\r\n").await;
        }
        "/die-reset" => {
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n").await;
            let _ = stream.write_all(&data).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            // A zero linger makes the close a RST (and never blocks).
            #[allow(deprecated)]
            let _ = stream.set_linger(Some(Duration::ZERO));
            return;
        }
        _ => {
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
                .await;
        }
    }
    let _ = stream.flush().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// True when the response for `path` did not arrive as a complete success:
/// an error status, or a body that ended in an error.
async fn ends_in_error(router: SocketAddr, path: &str, token: &str) -> bool {
    let response = match client()
        .get(format!("http://{router}{path}"))
        .header(ASSERTION, token)
        .send()
        .await
    {
        Ok(response) => response,
        Err(_) => return true,
    };
    if response.status() != 200 {
        return true;
    }
    response.bytes().await.is_err()
}

#[tokio::test]
async fn an_upstream_dying_mid_response_ends_the_clients_response_as_an_error_and_the_session_stays() {
    let issuer = IapIssuer::start().await;
    let upstream = DyingUpstream::start().await;
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
[auth]
audiences = ["{AUDIENCE}"]
jwks_url = "{jwks}"
[backend.static]
upstreams = ["{upstream}"]
"#,
        jwks = issuer.jwks_url(),
        upstream = upstream.url(),
    );
    let router = TestRouter::start(&text).await;
    let token = issuer.user("alice");
    for path in ["/die-length", "/die-chunked", "/die-reset"] {
        assert!(
            ends_in_error(router.addr, path, &token).await,
            "{path}: a truncated response was delivered as a success"
        );
        // The next request works, on the same backend.
        let next = get(router.addr, "/fine", &token, None).await;
        assert_eq!(next.status(), 200, "{path}");
        assert_eq!(next.text().await.unwrap(), "ok");
        let status: Value = get(router.addr, "/_router/status", &token, None)
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(
            status["session"]["upstream"],
            upstream.addr.to_string(),
            "{path}: {status}"
        );
    }
}

#[tokio::test]
async fn an_agones_pod_dying_mid_response_fails_that_response_and_the_next_request_lands_on_a_new_pod() {
    let issuer = IapIssuer::start().await;
    let dying = DyingUpstream::start().await;
    let healthy = pods(1).await;
    let fake = FakeAgones::start().await;
    fake.add_ready("gs-1", dying.addr);
    fake.add_ready("gs-2", healthy[0].addr);
    let router = TestRouter::agones(&issuer, &fake, "agones", "", "").await;
    let token = issuer.user("alice");
    assert!(ends_in_error(router.addr, "/die-length", &token).await);
    assert_eq!(fake.held_by(&label("alice")), vec!["gs-1"], "the session stays");
    // The pod's process is gone now: its port refuses.
    dying.kill();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(pod_of(&router, &token).await, "pod-1", "re-allocated and retried");
    assert!(fake.deleted("gs-1"), "the dead GameServer was released");
    assert_eq!(fake.held_by(&label("alice")), vec!["gs-2"]);
}

/// A WebSocket echo upstream whose connections can be cut.
struct WsUpstream {
    addr: SocketAddr,
    connections: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    /// Set when a connection's client side went away.
    peer_gone: Arc<AtomicBool>,
    accept: tokio::task::JoinHandle<()>,
}

impl WsUpstream {
    async fn start() -> WsUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(Mutex::new(Vec::new()));
        let peer_gone = Arc::new(AtomicBool::new(false));
        let (list, gone) = (connections.clone(), peer_gone.clone());
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let gone = gone.clone();
                let task = tokio::spawn(async move {
                    let Ok(mut socket) = tokio_tungstenite::accept_async(stream).await else {
                        return;
                    };
                    loop {
                        match socket.next().await {
                            Some(Ok(message @ (Message::Text(_) | Message::Binary(_)))) => {
                                if socket.send(message).await.is_err() {
                                    break;
                                }
                            }
                            Some(Ok(_)) => {}
                            Some(Err(_)) | None => break,
                        }
                    }
                    gone.store(true, Ordering::SeqCst);
                });
                list.lock().unwrap().push(task);
            }
        });
        WsUpstream {
            addr,
            connections,
            peer_gone,
            accept,
        }
    }

    fn cut(&self) {
        for task in self.connections.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

impl Drop for WsUpstream {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

async fn open_socket(router: &TestRouter, token: &str) -> Socket {
    let mut request = router.ws_url("/ws").into_client_request().unwrap();
    request.headers_mut().insert(ASSERTION, token.parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    socket.send(Message::text("hello")).await.unwrap();
    assert_eq!(socket.next().await.unwrap().unwrap(), Message::text("hello"));
    socket
}

async fn ws_router(issuer: &IapIssuer, upstream: &WsUpstream) -> TestRouter {
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
[auth]
audiences = ["{AUDIENCE}"]
jwks_url = "{jwks}"
[backend.static]
upstreams = ["http://{upstream}"]
"#,
        jwks = issuer.jwks_url(),
        upstream = upstream.addr,
    );
    TestRouter::start(&text).await
}

#[tokio::test]
async fn an_upstream_dying_mid_websocket_closes_the_clients_socket_promptly() {
    let issuer = IapIssuer::start().await;
    let upstream = WsUpstream::start().await;
    let router = ws_router(&issuer, &upstream).await;
    let mut socket = open_socket(&router, &issuer.user("alice")).await;
    assert_eq!(router.state.forwarder.open_relays(), 1);
    upstream.cut();
    let began = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match socket.next().await {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the client's socket stayed open after the upstream died");
    assert!(
        began.elapsed() < Duration::from_secs(2),
        "closed after {:?}",
        began.elapsed()
    );
    // The client, told the socket ended, lets go of it too.
    drop(socket);
    let freed = eventually(Duration::from_secs(3), || async {
        router.state.forwarder.open_relays() == 0
    })
    .await;
    assert!(freed, "the relay outlived both sockets");
}

#[tokio::test]
async fn a_client_vanishing_mid_websocket_closes_the_upstream_socket_promptly() {
    let issuer = IapIssuer::start().await;
    let upstream = WsUpstream::start().await;
    let router = ws_router(&issuer, &upstream).await;
    let socket = open_socket(&router, &issuer.user("alice")).await;
    // No close handshake: the browser tab is simply gone.
    drop(socket);
    let gone = eventually(Duration::from_secs(2), || async {
        upstream.peer_gone.load(Ordering::SeqCst)
    })
    .await;
    assert!(gone, "the upstream socket stayed open after the client vanished");
    let freed = eventually(Duration::from_secs(3), || async {
        router.state.forwarder.open_relays() == 0
    })
    .await;
    assert!(freed, "the relay outlived both sockets");
}

// ---------------------------------------------------------------------------
// The JWKS endpoint down, slow, or answering nonsense

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum JwksMode {
    Up,
    Down,
    /// Answers 503 after 3 s.
    Slow,
    /// 200 with a body that is not JSON.
    Garbage,
    /// 200 with an empty key set.
    Empty,
}

struct Jwks {
    addr: SocketAddr,
    mode: Arc<Mutex<JwksMode>>,
    keys: Arc<Mutex<Vec<Value>>>,
    fetches: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Jwks {
    async fn start(keys: Vec<Value>, mode: JwksMode) -> Jwks {
        let mode = Arc::new(Mutex::new(mode));
        let keys = Arc::new(Mutex::new(keys));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (m, k, f) = (mode.clone(), keys.clone(), fetches.clone());
        let app = axum::Router::new().route(
            "/jwk",
            axum::routing::get(move || {
                let (m, k, f) = (m.clone(), k.clone(), f.clone());
                async move {
                    use axum::response::IntoResponse;
                    f.fetch_add(1, Ordering::SeqCst);
                    let mode = *m.lock().unwrap();
                    match mode {
                        JwksMode::Up => {
                            let keys = k.lock().unwrap().clone();
                            axum::Json(json!({ "keys": keys })).into_response()
                        }
                        JwksMode::Down => (http::StatusCode::SERVICE_UNAVAILABLE, "down").into_response(),
                        JwksMode::Slow => {
                            tokio::time::sleep(Duration::from_secs(3)).await;
                            (http::StatusCode::SERVICE_UNAVAILABLE, "slow").into_response()
                        }
                        JwksMode::Garbage => ([("content-type", "application/json")], "<html>").into_response(),
                        JwksMode::Empty => axum::Json(json!({ "keys": [] })).into_response(),
                    }
                }
            }),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Jwks {
            addr,
            mode,
            keys,
            fetches,
            task,
        }
    }

    fn set(&self, mode: JwksMode) {
        *self.mode.lock().unwrap() = mode;
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

impl Drop for Jwks {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn jwks_outages_at_start_and_later_never_log_anyone_out_or_need_a_restart() {
    let issuer = IapIssuer::start().await;
    let jwks = Jwks::start(vec![issuer.key.jwk()], JwksMode::Down).await;
    let pods = pods(3).await;
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
[auth]
audiences = ["{AUDIENCE}"]
jwks_url = "http://{jwks}/jwk"
jwks_refetch_interval = "200ms"
[session]
retry_after = "2s"
[backend.static]
upstreams = [{upstreams}]
"#,
        jwks = jwks.addr,
        upstreams = support::upstream_list(&[&pods[0], &pods[1], &pods[2]]),
    );
    let router = start_unready(&text).await;
    let addr = router.addr;
    // Each token distinct (a nonce claim), so none is a verified-token
    // cache hit: every one is checked against the cached keys.
    let nonce = AtomicUsize::new(0);
    let user = |name: &str| {
        issuer
            .token(&format!("accounts.google.com:{name}"), &format!("{name}@example.com"))
            .claim("jti", json!(nonce.fetch_add(1, Ordering::SeqCst)))
            .sign()
    };
    let whoami = |token: String| async move { get(addr, "/whoami", &token, None).await };

    // Down at start: not ready, and a user is asked to come back, not refused.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(readyz(addr).await, 503);
    let early = whoami(user("alice")).await;
    assert_eq!(early.status(), 503);
    assert_eq!(early.headers()["retry-after"], "2");

    // Up: ready without a restart.
    jwks.set(JwksMode::Up);
    let ready = eventually(Duration::from_secs(10), || async { readyz(addr).await == 200 }).await;
    assert!(ready, "never became ready after the JWKS recovered");
    assert_eq!(whoami(user("alice")).await.status(), 200);

    // Down, answering garbage, answering no keys, slow: cached keys keep
    // every user in, even while an unknown kid forces a refetch of each.
    let rotated = SigningKey::generate("key-2");
    let unpublished = issuer
        .token("accounts.google.com:mallory", "mallory@example.com")
        .signed_by(&rotated)
        .sign();
    for mode in [JwksMode::Down, JwksMode::Garbage, JwksMode::Empty] {
        jwks.set(mode);
        // Past the refetch interval (200 ms) since the last fetch.
        tokio::time::sleep(Duration::from_millis(250)).await;
        let before = jwks.fetches();
        assert_eq!(whoami(unpublished.clone()).await.status(), 401, "{mode:?}");
        assert!(jwks.fetches() > before, "{mode:?}: the unknown kid caused no refetch");
        assert_eq!(whoami(user("alice")).await.status(), 200, "{mode:?}: cached keys lost");
        assert_eq!(readyz(addr).await, 200, "{mode:?}");
    }
    jwks.set(JwksMode::Slow);
    tokio::time::sleep(Duration::from_millis(250)).await;
    let before = jwks.fetches();
    let stuck = tokio::spawn({
        let token = unpublished.clone();
        async move {
            let began = Instant::now();
            let status = get(addr, "/whoami", &token, None).await.status();
            (status, began.elapsed())
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(jwks.fetches(), before + 1, "a refetch is in flight");
    let began = Instant::now();
    assert_eq!(
        whoami(user("bob")).await.status(),
        200,
        "slow JWKS: a known key must not wait"
    );
    assert!(
        began.elapsed() < Duration::from_secs(1),
        "a known-kid request waited {:?} on a slow JWKS fetch",
        began.elapsed()
    );
    let (status, waited) = stuck.await.unwrap();
    assert_eq!(status, 401);
    assert!(
        waited >= Duration::from_secs(2),
        "the unknown kid did wait for the slow fetch"
    );

    // Back up, with a rotated key: picked up without a restart.
    jwks.keys.lock().unwrap().push(rotated.jwk());
    jwks.set(JwksMode::Up);
    let rotated_in = eventually(Duration::from_secs(10), || {
        let token = unpublished.clone();
        async move { whoami(token).await.status() == 200 }
    })
    .await;
    assert!(rotated_in, "a key published after the outage was never accepted");
    assert_eq!(whoami(user("alice")).await.status(), 200);
    drop(router);
}

// ---------------------------------------------------------------------------
// The Kubernetes API down, slow, or losing an answer

/// Calls a request could have caused: allocations, GameServer gets and
/// deletes. Watches, lists (the watch's re-list) and activity patches are
/// background work.
fn request_path_calls(calls: &[String]) -> Vec<String> {
    calls
        .iter()
        .filter(|c| !c.starts_with("PATCH ") && !c.contains("/gameservers?"))
        .cloned()
        .collect()
}

#[tokio::test]
async fn kubernetes_api_down_known_users_keep_working_new_users_wait_briefly_and_it_recovers() {
    let issuer = IapIssuer::start().await;
    let pods = pods(2).await;
    let fake = FakeAgones::start().await;
    fake.add_ready("gs-1", pods[0].addr);
    fake.add_ready("gs-2", pods[1].addr);
    let router = TestRouter::agones(&issuer, &fake, "agones", "", "").await;
    let alice = issuer.user("alice");
    let first = get(router.addr, "/whoami", &alice, None).await;
    let cookie = set_cookie(&first, "session_router").unwrap();
    assert_eq!(first.json::<Value>().await.unwrap()["pod"], "pod-1");

    fake.set_down(true);
    fake.clear_calls();
    for i in 0..10 {
        let began = Instant::now();
        let token = issuer.user("alice");
        // A browser (with the pinning cookie) and an API client (without).
        let cookie = (i % 2 == 0).then_some(cookie.as_str());
        let response = get(router.addr, "/whoami", &token, cookie).await;
        assert_eq!(response.status(), 200, "request {i} of a known user during the outage");
        assert_eq!(response.json::<Value>().await.unwrap()["pod"], "pod-1");
        assert!(began.elapsed() < Duration::from_secs(1), "took {:?}", began.elapsed());
    }
    let calls = request_path_calls(&fake.calls());
    assert!(calls.is_empty(), "a known user's requests called the API: {calls:?}");

    let began = Instant::now();
    let waiting = get(router.addr, "/", &issuer.user("bob"), None).await;
    assert_eq!(waiting.status(), 503, "a new user during the outage");
    assert!(waiting.headers().contains_key("retry-after"));
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "the waiting page took {:?}",
        began.elapsed()
    );

    fake.set_down(false);
    let bob = eventually(Duration::from_secs(10), || async {
        get(router.addr, "/whoami", &issuer.user("bob"), None).await.status() == 200
    })
    .await;
    assert!(bob, "no recovery after the API came back");
    assert_eq!(fake.held_by(&label("bob")), vec!["gs-2"]);
    assert_eq!(pod_of(&router, &alice).await, "pod-1");
}

#[tokio::test]
async fn a_slow_kubernetes_api_gives_new_users_the_waiting_page_within_the_api_timeout() {
    let issuer = IapIssuer::start().await;
    let pods = pods(3).await;
    let fake = FakeAgones::start().await;
    for (i, pod) in pods.iter().enumerate() {
        fake.add_ready(&format!("gs-{}", i + 1), pod.addr);
    }
    // api_timeout is 3s in this router.
    let router = TestRouter::agones(&issuer, &fake, "agones", "", "").await;
    assert_eq!(pod_of(&router, &issuer.user("alice")).await, "pod-1");

    fake.set_api_delay(Duration::from_secs(20));
    let began = Instant::now();
    assert_eq!(pod_of(&router, &issuer.user("alice")).await, "pod-1");
    assert!(
        began.elapsed() < Duration::from_secs(1),
        "a known user waited {:?}",
        began.elapsed()
    );
    let began = Instant::now();
    let waiting = get(router.addr, "/", &issuer.user("bob"), None).await;
    let waited = began.elapsed();
    assert_eq!(waiting.status(), 503);
    assert!(
        waited < Duration::from_secs(6),
        "a new user waited {waited:?} (api_timeout 3s)"
    );

    fake.set_api_delay(Duration::ZERO);
    let bob = eventually(Duration::from_secs(10), || async {
        get(router.addr, "/whoami", &issuer.user("bob"), None).await.status() == 200
    })
    .await;
    assert!(bob, "no recovery after the API sped up");
    assert_eq!(fake.held_by(&label("bob")).len(), 1, "bob holds one GameServer");
}

#[tokio::test]
async fn kubernetes_api_down_at_start_keeps_readyz_503_until_the_cache_loads() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let fake = FakeAgones::start().await;
    fake.add_ready("gs-1", pods[0].addr);
    fake.set_down(true);
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
[auth]
audiences = ["{AUDIENCE}"]
jwks_url = "{jwks}"
[backend]
kind = "agones"
[backend.agones]
fleet = "{fleet}"
kube_api_url = "{api}"
api_timeout = "2s"
allocation_retry_window = "500ms"
"#,
        jwks = issuer.jwks_url(),
        fleet = support::fake_agones::FLEET,
        api = fake.url(),
    );
    let router = start_unready(&text).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(readyz(router.addr).await, 503, "ready without a GameServer cache");
    let began = Instant::now();
    assert_eq!(get(router.addr, "/", &issuer.user("alice"), None).await.status(), 503);
    assert!(began.elapsed() < Duration::from_secs(4));
    fake.set_down(false);
    let ready = eventually(Duration::from_secs(20), || async { readyz(router.addr).await == 200 }).await;
    assert!(ready, "never became ready after the API came back");
    let response = get(router.addr, "/whoami", &issuer.user("alice"), None).await;
    assert_eq!(response.status(), 200);
    assert!(router.state.registry.get("accounts.google.com:alice").is_some());
}

#[tokio::test]
async fn a_lost_allocation_answer_is_found_again_by_the_user_label_with_no_orphan() {
    for kind in ["agones", "agones-allocator"] {
        let issuer = IapIssuer::start().await;
        let pods = pods(2).await;
        let fake = FakeAgones::start().await;
        fake.add_ready("gs-1", pods[0].addr);
        fake.add_ready("gs-2", pods[1].addr);
        let router = TestRouter::agones(&issuer, &fake, kind, "", "").await;
        let alice = issuer.user("alice");
        // The API allocates gs-1 but its answer never arrives (api_timeout 3s).
        fake.lose_allocation_responses(1);
        let began = Instant::now();
        let lost = get(router.addr, "/", &alice, None).await;
        assert_eq!(lost.status(), 503, "{kind}: the user is asked to retry");
        assert!(
            began.elapsed() < Duration::from_secs(6),
            "{kind}: took {:?}",
            began.elapsed()
        );
        assert_eq!(
            fake.held_by(&label("alice")),
            vec!["gs-1"],
            "{kind}: allocated regardless"
        );

        assert_eq!(
            pod_of(&router, &alice).await,
            "pod-1",
            "{kind}: found again by its label"
        );
        assert_eq!(
            fake.held_by(&label("alice")),
            vec!["gs-1"],
            "{kind}: no second GameServer"
        );
        assert_eq!(
            fake.server("gs-2").map(|gs| gs["status"]["state"].clone()),
            Some(json!("Ready")),
            "{kind}: gs-2 was allocated too (then deleted as a duplicate)"
        );
    }
}

#[tokio::test]
async fn an_allocation_whose_answer_was_lost_and_whose_user_never_returns_is_released_when_idle() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let fake = FakeAgones::start().await;
    fake.add_ready("gs-1", pods[0].addr);
    // Longer than api_timeout (3s), so the allocation is seen before it is swept.
    let router = TestRouter::agones(&issuer, &fake, "agones", "idle_timeout = \"5s\"", "").await;
    fake.lose_allocation_responses(1);
    assert_eq!(get(router.addr, "/", &issuer.user("alice"), None).await.status(), 503);
    assert_eq!(fake.held_by(&label("alice")), vec!["gs-1"]);
    // Alice never comes back; no replica holds a session for gs-1.
    let swept = eventually(Duration::from_secs(10), || async { fake.deleted("gs-1") }).await;
    assert!(swept, "an orphaned allocation was never released");
}
