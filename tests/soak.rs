//! Soak: the real `session-router` binary, as its own process, under a
//! bounded churn of simulated users on loopback — allocate, browse, stream,
//! upload, download, WebSocket, release — against a static pool of many
//! stand-in pods, plus users who hold a pod and open and close WebSockets on
//! it. After a warm-up of the same size (so connection pools and allocator
//! arenas are at their working size) the baseline is taken; after the load
//! the router's memory (RSS) and open file descriptors must be back within
//! 10 % of it, every pod must be free again, no response may have been an
//! error except the expected 503s of users waiting for a pod, and the
//! router must stop cleanly on SIGTERM.
//!
//! The verified-token cache is bounded state, not a leak: each distinct
//! token costs about 1.2 KiB until the cache is full (`token_cache_entries`,
//! 10 000 by default, so about 12 MiB), and expired entries are only dropped
//! once it is full. The soak runs with a small cache (`SOAK_TOKEN_CACHE`,
//! 128) that the warm-up fills, so what is measured is everything else.
//! Pooled upstream connections are bounded state too: each serving thread
//! keeps its own, closed after 90 s idle, so how many are open after a
//! round depends on which thread served which pod. The descriptors compared
//! are the ones not in the pool (`session_router_upstream_idle_connections`).
//!
//! Sizes come from the environment; the defaults are the short run `cargo
//! test` does (a few seconds in debug): `SOAK_USERS` (200 a round),
//! `SOAK_WS_OPENS` (300 a round), `SOAK_PODS` (40), `SOAK_CONCURRENCY` (48),
//! `SOAK_ROUNDS` (1) and `SOAK_SECONDS` (0: rounds repeat, up to
//! `SOAK_ROUNDS`, until this much time has passed). `scripts/soak.sh` runs
//! the long one.

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use session_router::demo::DemoPod;
use support::{pods, set_cookie, IapIssuer, AUDIENCE, SECRET};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const ASSERTION: &str = "x-goog-iap-jwt-assertion";
const COOKIE: &str = "session_router";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The router process; killed (by its own pid) if the test ends early.
struct Router {
    child: Child,
    addr: SocketAddr,
    metrics: SocketAddr,
    log: PathBuf,
    config: PathBuf,
}

impl Router {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Open file descriptors other than pooled upstream connections (see
    /// the top of this file). `http` keeps its connection to the metrics
    /// listener open, so that one counts the same every time.
    async fn held_fds(&self, http: &reqwest::Client) -> usize {
        let text = support::text_of(http.get(format!("http://{}/metrics", self.metrics))).await;
        let pooled: usize = text
            .lines()
            .find_map(|l| l.strip_prefix("session_router_upstream_idle_connections "))
            .and_then(|v| v.trim().parse().ok())
            .expect("the pool's idle connections in /metrics");
        fds(self.pid()) - pooled
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// SIGTERM, then waits for the drain; true on a clean exit.
    fn stop(&mut self) -> bool {
        let _ = Command::new("kill").arg("-TERM").arg(self.pid().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.config);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start_router(issuer: &IapIssuer, pods: &[DemoPod]) -> Router {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let upstreams: Vec<String> = pods.iter().map(|p| format!("{:?}", p.url())).collect();
    let text = format!(
        r#"
[server]
listen = "{addr}"
metrics_listen = "{metrics}"
drain_timeout = "2s"
[auth]
audiences = ["{AUDIENCE}"]
jwks_url = "{jwks}"
token_cache_entries = {cache}
[session]
idle_timeout = "10m"
retry_after = "1s"
[backend.static]
upstreams = [{upstreams}]
"#,
        jwks = issuer.jwks_url(),
        upstreams = upstreams.join(", "),
        cache = env_usize("SOAK_TOKEN_CACHE", 128),
    );
    let dir = std::env::temp_dir();
    let tag = format!("session-router-soak-{}-{}", std::process::id(), addr.port());
    let config = dir.join(format!("{tag}.toml"));
    let log = dir.join(format!("{tag}.log"));
    std::fs::write(&config, text).unwrap();
    // Logging as in production: JSON, an access-log line per request.
    let child = Command::new(env!("CARGO_BIN_EXE_session-router"))
        .arg("--log-format")
        .arg("json")
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .env("SESSION_ROUTER_COOKIE_SECRET", std::str::from_utf8(SECRET).unwrap())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("the session-router binary starts");
    let router = Router {
        child,
        addr,
        metrics,
        log,
        config,
    };
    let http = reqwest::Client::new();
    for _ in 0..400 {
        if let Ok(r) = http.get(router.url("/readyz")).send().await {
            if r.status() == 200 {
                return router;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the router never became ready:\n{}", router.log_tail());
}

/// Resident memory of `pid`, KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Open file descriptors of `pid`.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

/// What the load saw.
#[derive(Default)]
struct Tally {
    requests: AtomicU64,
    expected_503: AtomicU64,
    ws_opened: AtomicU64,
    users_served: AtomicU64,
    errors: Mutex<Vec<String>>,
}

impl Tally {
    fn error(&self, what: String) {
        self.errors.lock().unwrap().push(what);
    }

    fn error_count(&self) -> usize {
        self.errors.lock().unwrap().len()
    }
}

struct Load {
    router: SocketAddr,
    issuer: Arc<IapIssuer>,
    tally: Tally,
}

impl Load {
    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.router, path)
    }

    fn token(&self, name: &str) -> String {
        self.issuer.user(name)
    }

    /// Checks a response's status; anything but `expected` is an error.
    fn check(
        &self,
        what: &str,
        user: &str,
        response: &Result<reqwest::Response, reqwest::Error>,
        expected: u16,
    ) -> bool {
        self.tally.requests.fetch_add(1, Ordering::Relaxed);
        match response {
            Ok(r) if r.status().as_u16() == expected => true,
            Ok(r) => {
                self.tally.error(format!("{user}: {what} answered {}", r.status()));
                false
            }
            Err(e) => {
                self.tally.error(format!("{user}: {what} failed: {e}"));
                false
            }
        }
    }

    /// Gets a pod for `user`, waiting (503, then retry) as a browser on the
    /// waiting page does. Returns the pinning cookie.
    async fn allocate(&self, http: &reqwest::Client, user: &str, token: &str) -> Option<String> {
        for _ in 0..600 {
            self.tally.requests.fetch_add(1, Ordering::Relaxed);
            let response = match http.get(self.url("/whoami")).header(ASSERTION, token).send().await {
                Ok(r) => r,
                Err(e) => {
                    self.tally.error(format!("{user}: allocation failed: {e}"));
                    return None;
                }
            };
            match response.status().as_u16() {
                200 => {
                    let cookie = set_cookie(&response, COOKIE);
                    let seen: Value = response.json().await.ok()?;
                    if seen["email"] != format!("{user}@example.com") {
                        self.tally.error(format!("{user}: routed as {}", seen["email"]));
                    }
                    if cookie.is_none() {
                        self.tally.error(format!("{user}: no pinning cookie"));
                    }
                    return cookie;
                }
                503 => {
                    let body: Value = response.json().await.unwrap_or_default();
                    if body["error"] != "no_capacity" {
                        self.tally
                            .error(format!("{user}: a 503 that is not the waiting page: {body}"));
                        return None;
                    }
                    self.tally.expected_503.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => {
                    self.tally.error(format!("{user}: allocation answered {other}"));
                    return None;
                }
            }
        }
        self.tally.error(format!("{user}: never got a pod"));
        None
    }

    /// One WebSocket: open, echo `messages` messages, close.
    async fn websocket(&self, user: &str, token: &str, cookie: &str, messages: usize) {
        let mut request = format!("ws://{}/ws", self.router).into_client_request().unwrap();
        let headers = request.headers_mut();
        headers.insert(ASSERTION, token.parse().unwrap());
        headers.insert("cookie", cookie.parse().unwrap());
        headers.insert("origin", format!("http://{}", self.router).parse().unwrap());
        self.tally.requests.fetch_add(1, Ordering::Relaxed);
        let mut socket = match tokio_tungstenite::connect_async(request).await {
            Ok((socket, _)) => socket,
            Err(e) => return self.tally.error(format!("{user}: websocket refused: {e}")),
        };
        self.tally.ws_opened.fetch_add(1, Ordering::Relaxed);
        for i in 0..messages {
            let text = format!("{user} message {i}");
            if socket.send(Message::text(text.clone())).await.is_err() {
                return self.tally.error(format!("{user}: websocket send failed"));
            }
            match tokio::time::timeout(Duration::from_secs(10), socket.next()).await {
                Ok(Some(Ok(Message::Text(echo)))) if echo.as_str() == text => {}
                other => return self.tally.error(format!("{user}: bad websocket echo: {other:?}")),
            }
        }
        let _ = socket.close(None).await;
    }

    /// One user's visit: allocate, browse, stream, upload, download, a
    /// WebSocket, then release.
    async fn visit(&self, user: String) {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        let token = self.token(&user);
        let Some(cookie) = self.allocate(&http, &user, &token).await else {
            return;
        };
        let get = |path: &str| {
            http.get(self.url(path))
                .header(ASSERTION, &token)
                .header("cookie", &cookie)
                .send()
        };
        let page = get("/").await;
        if self.check("GET /", &user, &page, 200) {
            let html = page.unwrap().text().await.unwrap_or_default();
            if !html.contains(&format!("{user}@example.com")) {
                self.tally.error(format!("{user}: the page names someone else"));
            }
        }
        let events = get("/events?count=2&interval_ms=10").await;
        if self.check("GET /events", &user, &events, 200) {
            let text = events.unwrap().text().await.unwrap_or_default();
            if !text.contains("event 1") {
                self.tally.error(format!("{user}: event stream cut short: {text:?}"));
            }
        }
        let body = vec![b'u'; 64 * 1024];
        let upload = http
            .post(self.url("/upload"))
            .header(ASSERTION, &token)
            .header("cookie", &cookie)
            .body(body)
            .send()
            .await;
        if self.check("POST /upload", &user, &upload, 200) {
            let report: Value = upload.unwrap().json().await.unwrap_or_default();
            if report["bytes"] != 64 * 1024 {
                self.tally.error(format!("{user}: upload arrived as {report}"));
            }
        }
        let download = get("/download?bytes=262144").await;
        if self.check("GET /download", &user, &download, 200) {
            match download.unwrap().bytes().await {
                Ok(b) if b.len() == 262_144 => {}
                other => self
                    .tally
                    .error(format!("{user}: download: {:?}", other.map(|b| b.len()))),
            }
        }
        self.websocket(&user, &token, &cookie, 2).await;
        let release = http
            .post(self.url("/_router/release"))
            .header(ASSERTION, &token)
            .header("cookie", &cookie)
            .send()
            .await;
        if self.check("POST /_router/release", &user, &release, 200) {
            let answer: Value = release.unwrap().json().await.unwrap_or_default();
            if answer["released"] != true {
                self.tally.error(format!("{user}: release answered {answer}"));
            }
        }
        self.tally.users_served.fetch_add(1, Ordering::Relaxed);
    }

    /// A user who keeps a pod and opens and closes `opens` WebSockets on it.
    async fn socket_churn(&self, user: String, opens: usize) {
        let http = reqwest::Client::new();
        let token = self.token(&user);
        let Some(cookie) = self.allocate(&http, &user, &token).await else {
            return;
        };
        for _ in 0..opens {
            self.websocket(&user, &token, &cookie, 1).await;
        }
        let release = http
            .post(self.url("/_router/release"))
            .header(ASSERTION, &token)
            .send()
            .await;
        self.check("POST /_router/release", &user, &release, 200);
    }

    /// `users` visits, `concurrency` at a time, alongside `holders` users
    /// opening `ws_opens` WebSockets between them.
    async fn run(&self, prefix: &str, users: usize, concurrency: usize, holders: usize, ws_opens: usize) {
        let churn = futures_util::stream::iter((0..users).map(|i| self.visit(format!("{prefix}-user-{i}"))))
            .buffer_unordered(concurrency)
            .collect::<Vec<()>>();
        let sockets = futures_util::future::join_all((0..holders).map(|h| {
            let opens = ws_opens / holders + usize::from(h < ws_opens % holders);
            self.socket_churn(format!("{prefix}-holder-{h}"), opens)
        }));
        tokio::join!(churn, sockets);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soak_leaves_no_leaked_memory_descriptors_or_pods_and_no_unexpected_errors() {
    let users = env_usize("SOAK_USERS", 200);
    let ws_opens = env_usize("SOAK_WS_OPENS", 300);
    let pod_count = env_usize("SOAK_PODS", 40).max(4);
    let concurrency = env_usize("SOAK_CONCURRENCY", 48).max(1);
    let holders = (pod_count / 4).clamp(1, 8);

    let issuer = Arc::new(IapIssuer::start().await);
    let pods = pods(pod_count).await;
    let mut router = start_router(&issuer, &pods).await;
    let pid = router.pid();
    let load = Load {
        router: router.addr,
        issuer: issuer.clone(),
        tally: Tally::default(),
    };

    // Warm-up: every pod used once, sockets opened, so connection pools
    // and allocator arenas are at their working size before the baseline.
    let warmup_users = env_usize("SOAK_WARMUP_USERS", users);
    let warmup_ws = env_usize("SOAK_WARMUP_WS_OPENS", ws_opens);
    load.run("warmup", warmup_users, concurrency, holders, warmup_ws).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let metrics_http = reqwest::Client::new();
    let (rss_before, fds_before) = (rss_kib(pid), router.held_fds(&metrics_http).await);

    // One round, or (SOAK_SECONDS) rounds until that much time has passed,
    // at most SOAK_ROUNDS.
    let began = Instant::now();
    let max_rounds = env_usize("SOAK_ROUNDS", 1).max(1);
    let duration = Duration::from_secs(env_usize("SOAK_SECONDS", 0) as u64);
    let mut rounds = 0;
    while rounds < max_rounds && (rounds == 0 || began.elapsed() < duration) {
        load.run(&format!("soak{rounds}"), users, concurrency, holders, ws_opens)
            .await;
        rounds += 1;
        if max_rounds > 1 {
            println!(
                "soak: round {rounds} done at {:.0}s: rss_kib={} fds={}",
                began.elapsed().as_secs_f64(),
                rss_kib(pid),
                fds(pid)
            );
        }
    }
    let took = began.elapsed();

    // Let closed connections finish closing, then measure.
    let settled = Instant::now();
    while router.held_fds(&metrics_http).await as f64 > fds_before as f64 * 1.10
        && settled.elapsed() < Duration::from_secs(30)
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (rss_after, fds_after) = (rss_kib(pid), router.held_fds(&metrics_http).await);
    let errors = load.tally.errors.lock().unwrap().clone();
    let t = &load.tally;
    println!(
        "soak: rounds={rounds} users={users} ws_opens={ws_opens} (per round) pods={pod_count} concurrency={concurrency} took={:.1}s \
         requests={} users_served={} ws_opened={} expected_503={} errors={} \
         rss_kib={rss_before}->{rss_after} ({:+.1}%) fds={fds_before}->{fds_after} ({:+.1}%)",
        took.as_secs_f64(),
        t.requests.load(Ordering::Relaxed),
        t.users_served.load(Ordering::Relaxed),
        t.ws_opened.load(Ordering::Relaxed),
        t.expected_503.load(Ordering::Relaxed),
        errors.len(),
        (rss_after as f64 / rss_before as f64 - 1.0) * 100.0,
        (fds_after as f64 / fds_before as f64 - 1.0) * 100.0,
    );
    assert!(
        errors.is_empty(),
        "{} unexpected errors, first ones: {:#?}\nrouter log:\n{}",
        errors.len(),
        &errors[..errors.len().min(20)],
        router.log_tail()
    );
    assert_eq!(
        t.users_served.load(Ordering::Relaxed) as usize,
        users * rounds + warmup_users,
        "every user was served"
    );
    assert!(
        fds_after as f64 <= fds_before as f64 * 1.10,
        "open file descriptors outside the upstream pool {fds_before} → {fds_after}"
    );
    assert!(
        rss_after as f64 <= rss_before as f64 * 1.10,
        "resident memory {rss_before} KiB → {rss_after} KiB"
    );

    // Every pod is free again: as many new users as pods each get one.
    let check = Load {
        router: router.addr,
        issuer,
        tally: Tally::default(),
    };
    let http = reqwest::Client::new();
    let claimed = futures_util::future::join_all((0..pod_count).map(|i| {
        let (check, http) = (&check, &http);
        async move {
            let user = format!("final-{i}");
            let token = check.token(&user);
            let response = http.get(check.url("/whoami")).header(ASSERTION, token).send().await;
            match response {
                Ok(r) if r.status() == 200 => r.json::<Value>().await.ok().map(|v| v["pod"].to_string()),
                _ => None,
            }
        }
    }))
    .await;
    let mut distinct: Vec<String> = claimed.into_iter().flatten().collect();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), pod_count, "a pod was still held after the soak");
    assert_eq!(check.tally.error_count(), 0);
    assert!(router.stop(), "no clean stop on SIGTERM:\n{}", router.log_tail());
    let _ = std::fs::remove_file(&router.log);
}
