//! Operating the router: Prometheus metrics that move with the traffic,
//! Cloud Logging JSON lines with nothing secret in them, and the admin view.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use support::{client, eventually, pods, set_cookie, FakeAgones, IapIssuer, TestRouter};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const ASSERTION: &str = "x-goog-iap-jwt-assertion";

/// Scrapes and parses `/metrics` with a real Prometheus text parser.
async fn scrape(router: &TestRouter) -> prometheus_parse::Scrape {
    let addr = router.state.metrics_addr().expect("metrics listener");
    let text = support::text_of(client().get(format!("http://{addr}/metrics"))).await;
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("valid exposition text")
}

/// The value of `name` whose labels include every `(key, value)` given.
fn sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            prometheus_parse::Value::Histogram(ref buckets) => buckets.last().map_or(0.0, |b| b.count),
            _ => 0.0,
        })
        .sum()
}

/// A static-pool router in front of `pod` with its metrics listener on.
async fn metered_router(issuer: &IapIssuer, pod: &support::DemoPod, more: &str) -> TestRouter {
    let text = support::static_config(
        issuer,
        r#"metrics_listen = "127.0.0.1:0""#,
        "",
        more,
        &support::upstream_list(&[pod]),
    );
    TestRouter::start(&text).await
}

#[tokio::test]
async fn metrics_move_with_the_traffic_and_live_only_on_their_own_port() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let router = metered_router(&issuer, &pods[0], "[session]\nidle_timeout = \"1s\"").await;
    let alice = issuer.user("alice");

    // An allocation and a proxied request.
    let ok = client()
        .get(router.url("/whoami"))
        .header(ASSERTION, &alice)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    // A 401.
    assert_eq!(client().get(router.url("/whoami")).send().await.unwrap().status(), 401);
    let pooled = scrape(&router).await;
    assert_eq!(
        sample(&pooled, "session_router_upstream_idle_connections", &[]),
        1.0,
        "the GET's connection waits in the pool"
    );
    // A WebSocket open and close.
    let mut request = router.ws_url("/ws").into_client_request().unwrap();
    request.headers_mut().insert(ASSERTION, alice.parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    socket.send(Message::text("hi")).await.unwrap();
    socket.next().await.unwrap().unwrap();
    let during = scrape(&router).await;
    assert_eq!(sample(&during, "session_router_open_websockets", &[]), 1.0);
    assert_eq!(
        sample(&during, "session_router_upstream_idle_connections", &[]),
        0.0,
        "the WebSocket took the pooled connection for its relay"
    );
    socket.close(None).await.unwrap();
    drop(socket);

    // The idle release.
    let released = eventually(Duration::from_secs(6), || async { router.state.registry.is_empty() }).await;
    assert!(released);
    let after = eventually(Duration::from_secs(3), || async {
        sample(&scrape(&router).await, "session_router_open_websockets", &[]) == 0.0
    })
    .await;
    assert!(after, "the WebSocket gauge never went back to 0");

    let m = scrape(&router).await;
    assert_eq!(
        sample(&m, "session_router_allocations_total", &[("outcome", "allocated")]),
        1.0
    );
    assert_eq!(sample(&m, "session_router_releases_total", &[("reason", "idle")]), 1.0);
    assert!(
        sample(
            &m,
            "session_router_requests_total",
            &[("kind", "proxied"), ("class", "2xx")]
        ) >= 1.0
    );
    assert_eq!(
        sample(
            &m,
            "session_router_requests_total",
            &[("kind", "proxied"), ("class", "4xx")]
        ),
        1.0
    );
    assert_eq!(
        sample(
            &m,
            "session_router_token_checks_total",
            &[("result", "rejected"), ("reason", "missing")]
        ),
        1.0
    );
    assert!(sample(&m, "session_router_token_checks_total", &[("result", "verified")]) >= 1.0);
    assert!(
        sample(&m, "session_router_token_checks_total", &[("result", "cached")]) >= 1.0,
        "the same token came twice"
    );
    assert!(sample(&m, "session_router_upstream_response_header_seconds_count", &[]) >= 2.0);
    assert!(sample(&m, "session_router_proxied_bytes_total", &[("direction", "to_client")]) > 0.0);
    assert!(sample(&m, "session_router_jwks_refreshes_total", &[("outcome", "ok")]) >= 1.0);
    assert_eq!(sample(&m, "session_router_sessions_active", &[]), 0.0);
    // No unbounded label anywhere.
    for s in &m.samples {
        for (key, value) in s.labels.iter() {
            assert!(
                !["user", "email", "path", "backend"].contains(&key.as_str()),
                "{} has label {key}",
                s.metric
            );
            assert!(
                !value.contains('@') && !value.contains('/'),
                "{} label {key}={value}",
                s.metric
            );
        }
    }

    // The main port never serves the metrics: /metrics there is an ordinary
    // proxied path (here the pod's 404).
    let main = client()
        .get(router.url("/metrics"))
        .header(ASSERTION, &alice)
        .send()
        .await
        .unwrap();
    assert!(!main.text().await.unwrap().contains("session_router_"));
}

#[tokio::test]
async fn json_logs_have_cloud_logging_fields_and_nothing_secret() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let secret = "log-test-secret-0123456789-abcdefghijklmnop";
    let config_path =
        std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("operate-{}.toml", std::process::id()));
    std::fs::write(
        &config_path,
        format!(
            r#"
[server]
listen = "127.0.0.1:0"
drain_timeout = "1s"
[auth]
audiences = ["{aud}"]
jwks_url = "{jwks}"
[log]
format = "json"
project_id = "my-project"
[backend.static]
upstreams = [{up}]
"#,
            aud = support::AUDIENCE,
            jwks = issuer.jwks_url(),
            up = support::upstream_list(&[&pods[0]]),
        ),
    )
    .unwrap();
    let RouterProcess {
        mut child,
        rx,
        mut lines,
        addr,
    } = RouterProcess::start(&config_path, secret);

    let token = issuer.user("alice");
    let first = client()
        .get(format!("http://{addr}/whoami?token=query-secret&x=1"))
        .header(ASSERTION, &token)
        .header("user-agent", "operate-test/1.0")
        .header("authorization", "Bearer authorization-secret")
        .header("x-cloud-trace-context", "105445aa7843bc8bf206b12000100000/1;o=1")
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    let cookie = set_cookie(&first, "session_router").unwrap();
    first.bytes().await.unwrap();
    let again = client()
        .get(format!("http://{addr}/whoami"))
        .header(ASSERTION, &token)
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    again.bytes().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = child.wait();
    while let Ok(line) = rx.recv_timeout(Duration::from_millis(500)) {
        lines.push(line);
    }
    let _ = std::fs::remove_file(&config_path);

    let parsed: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
        .collect();
    for line in &parsed {
        for field in ["severity", "message", "time"] {
            assert!(line.get(field).is_some(), "{field} missing in {line}");
        }
    }
    let access = parsed
        .iter()
        .find(|l| {
            l["httpRequest"]["requestUrl"]
                .as_str()
                .is_some_and(|u| u.starts_with("/whoami?"))
        })
        .expect("an access log line for the request");
    let http = &access["httpRequest"];
    assert_eq!(http["requestMethod"], "GET");
    assert_eq!(http["requestUrl"], "/whoami?token=REDACTED&x=1");
    assert_eq!(http["status"], 200);
    assert_eq!(http["userAgent"], "operate-test/1.0");
    assert_eq!(http["remoteIp"], "127.0.0.1");
    assert!(http["latency"].as_str().unwrap().ends_with('s'));
    assert!(http["responseSize"].as_str().unwrap().parse::<u64>().unwrap() > 0);
    assert_eq!(
        access["logging.googleapis.com/trace"],
        "projects/my-project/traces/105445aa7843bc8bf206b12000100000"
    );
    assert!(parsed.iter().any(|l| l["message"]
        .as_str()
        .is_some_and(|m| m.starts_with("session allocated"))));

    let everything = lines.join("\n");
    let cookie_value = cookie.split_once('=').unwrap().1;
    for secret_text in [
        token.as_str(),
        cookie_value,
        secret,
        "query-secret",
        "authorization-secret",
        "alice@example.com",
    ] {
        assert!(!everything.contains(secret_text), "logs contain {secret_text:.20}…");
    }
}

/// The router binary serving a config file, with its stderr read line by line.
struct RouterProcess {
    child: std::process::Child,
    rx: std::sync::mpsc::Receiver<String>,
    /// Lines up to and including "session-router listening".
    lines: Vec<String>,
    addr: String,
}

impl RouterProcess {
    fn start(config_path: &std::path::Path, secret: &str) -> RouterProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_session-router"))
            .args(["serve", "--config"])
            .arg(config_path)
            .env("SESSION_ROUTER_COOKIE_SECRET", secret)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut lines = Vec::new();
        let addr = loop {
            let line = rx.recv_timeout(Duration::from_secs(10)).expect("router started");
            let parsed: Value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line}"));
            lines.push(line);
            if parsed["message"] == "session-router listening" {
                break parsed["listen"].as_str().unwrap().to_string();
            }
        };
        RouterProcess { child, rx, lines, addr }
    }
}

#[tokio::test]
async fn a_release_logs_the_held_and_active_seconds_for_gpu_hours() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let secret = "log-test-secret-0123456789-abcdefghijklmnop";
    let config_path =
        std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("gpu-hours-{}.toml", std::process::id()));
    std::fs::write(
        &config_path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ndrain_timeout = \"1s\"\n[auth]\naudiences = [\"{aud}\"]\njwks_url = \"{jwks}\"\n[session]\nidle_timeout = \"10s\"\n[log]\nformat = \"json\"\ninclude_email = true\n[backend.static]\nupstreams = [{up}]\n",
            aud = support::AUDIENCE,
            jwks = issuer.jwks_url(),
            up = support::upstream_list(&[&pods[0]]),
        ),
    )
    .unwrap();
    let RouterProcess {
        mut child,
        rx,
        mut lines,
        addr,
    } = RouterProcess::start(&config_path, secret);
    let token = issuer.user("alice");
    // Active for about 2.5 s: a request every half second.
    for _ in 0..6 {
        let seen = client()
            .get(format!("http://{addr}/whoami"))
            .header(ASSERTION, &token)
            .send()
            .await
            .unwrap();
        assert_eq!(seen.status(), 200);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let released = client()
        .post(format!("http://{addr}/_router/release"))
        .header(ASSERTION, &token)
        .send()
        .await
        .unwrap();
    assert_eq!(released.status(), 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = child.wait();
    while let Ok(line) = rx.recv_timeout(Duration::from_millis(500)) {
        lines.push(line);
    }
    let _ = std::fs::remove_file(&config_path);

    let releases: Vec<Value> = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["message"] == "session released")
        .collect();
    assert_eq!(releases.len(), 1, "one line per release: {releases:?}");
    let line = &releases[0];
    assert_eq!(line["reason"], "user");
    assert_eq!(line["email"], "alice@example.com");
    assert!(line["user_id"].as_str().is_some_and(|id| !id.is_empty()), "{line}");
    assert!(line["backend"].is_string(), "{line}");
    let held = line["held_seconds"]
        .as_u64()
        .unwrap_or_else(|| panic!("held_seconds: {line}"));
    let active = line["active_seconds"]
        .as_u64()
        .unwrap_or_else(|| panic!("active_seconds: {line}"));
    assert!((2..=5).contains(&held), "held {held} s: {line}");
    assert!(
        active >= 2 && active <= held,
        "active {active} s of {held} s held: {line}"
    );
}

#[tokio::test]
async fn held_time_is_counted_by_release_reason() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let router = metered_router(&issuer, &pods[0], "").await;
    let token = issuer.user("alice");
    let seen = client()
        .get(router.url("/whoami"))
        .header(ASSERTION, &token)
        .send()
        .await
        .unwrap();
    assert_eq!(seen.status(), 200);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let before = sample(
        &scrape(&router).await,
        "session_router_backend_held_seconds_total",
        &[("reason", "user")],
    );
    assert_eq!(before, 0.0);
    let released = client()
        .post(router.url("/_router/release"))
        .header(ASSERTION, &token)
        .send()
        .await
        .unwrap();
    assert_eq!(released.status(), 200);
    let after = sample(
        &scrape(&router).await,
        "session_router_backend_held_seconds_total",
        &[("reason", "user")],
    );
    assert!((1.0..5.0).contains(&after), "held {after} s");
    let idle = sample(
        &scrape(&router).await,
        "session_router_backend_held_seconds_total",
        &[("reason", "idle")],
    );
    assert_eq!(idle, 0.0, "the idle series exists at zero");
}

async fn admin_get(router: &TestRouter, token: &str) -> reqwest::Response {
    client()
        .get(router.url("/_router/admin"))
        .header(ASSERTION, token)
        .header("accept", "application/json")
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn an_admin_sees_every_replicas_sessions_and_can_release_one() {
    let issuer = IapIssuer::start().await;
    let pods = pods(3).await;
    let fake = FakeAgones::start().await;
    for (i, pod) in pods.iter().enumerate() {
        fake.add_ready(&format!("gs-{}", i + 1), pod.addr);
    }
    let admins = "[admin]\nemails = [\"Boss@example.com\"]";
    let a = TestRouter::agones(&issuer, &fake, "agones", "", &format!("\n{admins}")).await;
    let b = TestRouter::agones(&issuer, &fake, "agones", "", &format!("\n{admins}")).await;
    for (router, user) in [(&a, "alice"), (&b, "bob")] {
        let r = client()
            .get(router.url("/whoami"))
            .header(ASSERTION, issuer.user(user))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let boss = issuer.user("boss");
    let seen = eventually(Duration::from_secs(5), || async {
        let view: Value = admin_get(&a, &boss).await.json().await.unwrap();
        view["sessions"].as_array().map_or(0, Vec::len) == 2
    })
    .await;
    assert!(seen, "replica A does not list Bob's session from replica B");
    let view: Value = admin_get(&a, &boss).await.json().await.unwrap();
    assert_eq!(view["capacity"]["allocated"], 2);
    assert_eq!(view["capacity"]["ready"], 1);
    for session in view["sessions"].as_array().unwrap() {
        assert!(session["held_seconds"].is_u64(), "how long it has been held: {session}");
    }
    let bobs = view["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["user"] == "bob@example.com")
        .unwrap()["backend"]
        .as_str()
        .unwrap()
        .to_string();

    // The HTML page works too, with a release form per row.
    let html = support::text_of(
        client()
            .get(a.url("/_router/admin"))
            .header(ASSERTION, &boss)
            .header("accept", "text/html"),
    )
    .await;
    assert!(html.contains("bob@example.com") && html.contains(r#"action="/_router/admin/release""#));
    assert!(html.contains("<th>Held</th>"), "{html}");

    // Not an admin: 403. Cross-site form post: 403, nothing released.
    assert_eq!(admin_get(&a, &issuer.user("alice")).await.status(), 403);
    let forged = client()
        .post(a.url("/_router/admin/release"))
        .header(ASSERTION, &boss)
        .header("origin", "https://evil.example")
        .form(&[("target", bobs.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 403);
    assert!(fake.server(&bobs).is_some());

    // Release Bob's GameServer (held by replica B) from replica A.
    let released = client()
        .post(a.url("/_router/admin/release"))
        .header(ASSERTION, &boss)
        .header("origin", format!("http://{}", a.addr))
        .form(&[("target", bobs.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(released.status(), 200);
    assert!(fake.deleted(&bobs), "the GameServer was not deleted");
    let scraped = a.state.metrics.render();
    assert!(
        scraped.contains(r#"session_router_releases_total{reason="admin"} 1"#),
        "{scraped}"
    );
}

/// Sends `raw` on a fresh connection and returns the status of the answer.
async fn raw_status(addr: &str, raw: &[u8]) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(raw).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    text.get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"))
}

#[tokio::test]
async fn access_lines_name_the_user_the_client_behind_the_load_balancer_and_every_refusal() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let secret = "log-test-secret-0123456789-abcdefghijklmnop";
    let config_path =
        std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("access-{}.toml", std::process::id()));
    std::fs::write(
        &config_path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\ndrain_timeout = \"1s\"\nmax_uri_bytes = 2048\n[auth]\naudiences = [\"{aud}\"]\njwks_url = \"{jwks}\"\n[log]\nformat = \"json\"\n[backend.static]\nupstreams = [{up}]\n",
            aud = support::AUDIENCE,
            jwks = issuer.jwks_url(),
            up = support::upstream_list(&[&pods[0]]),
        ),
    )
    .unwrap();
    let RouterProcess {
        mut child,
        rx,
        mut lines,
        addr,
    } = RouterProcess::start(&config_path, secret);
    // Logged once the router runs, after "session-router listening".
    let metrics_addr = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("metrics address logged");
        let parsed: Value = serde_json::from_str(&line).unwrap();
        lines.push(line);
        if parsed["message"] == "metrics listening" {
            break parsed["listen"].as_str().unwrap().to_string();
        }
    };
    let alice = issuer.user("alice");
    let get = |path: &str, token: Option<&str>, forwarded: &str| {
        let mut request = client().get(format!("http://{addr}{path}"));
        if let Some(token) = token {
            request = request.header(ASSERTION, token);
        }
        if !forwarded.is_empty() {
            request = request.header("x-forwarded-for", forwarded);
        }
        request.send()
    };
    // Through the load balancer, which appends `<client>, <itself>` to what
    // the client wrote (here a forged address).
    let served = get("/whoami?n=1", Some(&alice), "6.6.6.6, 203.0.113.7, 130.211.0.5")
        .await
        .unwrap();
    assert_eq!(served.status(), 200);
    served.bytes().await.unwrap();
    // Straight from a client that names itself: not believed.
    let direct = get("/whoami?n=2", Some(&alice), "6.6.6.6").await.unwrap();
    direct.bytes().await.unwrap();
    // A 401, a 503 (the one backend is Alice's) and a 303.
    assert_eq!(get("/whoami?n=3", None, "").await.unwrap().status(), 401);
    let waiting = get("/whoami?n=4", Some(&issuer.user("bob")), "").await.unwrap();
    assert_eq!(waiting.status(), 503);
    let released = client()
        .post(format!("http://{addr}/_router/release"))
        .header(ASSERTION, &alice)
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(released.status(), 303);
    // Refused below the HTTP layer: a bare LF (400), a URI over the limit
    // (414), a head over the limit (431).
    assert_eq!(raw_status(&addr, b"GET / HTTP/1.1\nHost: x\r\n\r\n").await, 400);
    let long = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(4096));
    assert_eq!(raw_status(&addr, long.as_bytes()).await, 414);
    let large = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "b".repeat(70_000));
    assert_eq!(raw_status(&addr, large.as_bytes()).await, 431);
    let metrics = support::text_of(client().get(format!("http://{metrics_addr}/metrics"))).await;

    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = child.wait();
    while let Ok(line) = rx.recv_timeout(Duration::from_millis(500)) {
        lines.push(line);
    }
    let _ = std::fs::remove_file(&config_path);

    let access: Vec<Value> = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["target"] == "access")
        .collect();
    let line = |url: &str| {
        access
            .iter()
            .find(|l| l["httpRequest"]["requestUrl"] == url)
            .unwrap_or_else(|| panic!("no access line for {url}: {access:?}"))
    };
    let alice_id = session_router::telemetry::user_id("accounts.google.com:alice");
    let first = line("/whoami?n=1");
    assert_eq!(first["user_id"], alice_id.as_str(), "{first}");
    assert_eq!(first["httpRequest"]["remoteIp"], "203.0.113.7", "{first}");
    assert_eq!(line("/whoami?n=2")["httpRequest"]["remoteIp"], "127.0.0.1");
    let rejected = line("/whoami?n=3");
    assert!(rejected.get("user_id").is_none(), "{rejected}");
    let bob = line("/whoami?n=4");
    assert_eq!(
        bob["user_id"],
        session_router::telemetry::user_id("accounts.google.com:bob").as_str(),
        "who got the 503: {bob}"
    );
    let release = line("/_router/release");
    assert_eq!(release["user_id"], alice_id.as_str());
    for (l, status) in [(rejected, 401), (bob, 503), (release, 303)] {
        assert_eq!(l["httpRequest"]["status"], status);
        assert_eq!(l["completed"], true, "a complete {status} answer: {l}");
    }
    for status in [400, 414, 431] {
        let refusal = access
            .iter()
            .find(|l| l["httpRequest"]["status"] == status && l["kind"] == "unparsed")
            .unwrap_or_else(|| panic!("no access line for the {status}: {access:?}"));
        assert_eq!(refusal["httpRequest"]["remoteIp"], "127.0.0.1");
    }
    assert!(
        metrics
            .lines()
            .any(|l| l == r#"session_router_requests_total{class="4xx",kind="unparsed"} 3"#),
        "{metrics}"
    );
    let everything = lines.join("\n");
    assert!(!everything.contains("alice@example.com") && !everything.contains("bob@example.com"));
}
