//! Backends go back to the pool when their users stop using them, or ask.

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use support::api_pod::ApiPod;
use support::{client, eventually, pods, set_cookie, IapIssuer, TestRouter};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const ASSERTION: &str = "x-goog-iap-jwt-assertion";

async fn pod_of(router: &TestRouter, token: &str) -> reqwest::Response {
    client()
        .get(router.url("/whoami"))
        .header(ASSERTION, token)
        .send()
        .await
        .unwrap()
}

async fn status(router: &TestRouter, token: &str) -> Value {
    client()
        .get(router.url("/_router/status"))
        .header(ASSERTION, token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn an_idle_backend_is_released_and_serves_the_next_user() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let router = TestRouter::iap(&issuer, &[&pods[0]], "idle_timeout = \"1s\"").await;
    let alice = issuer.user("alice");
    let bob = issuer.user("bob");
    assert_eq!(pod_of(&router, &alice).await.status(), 200);
    assert_eq!(pod_of(&router, &bob).await.status(), 503, "pool of one is taken");
    let freed = eventually(Duration::from_secs(5), || async {
        pod_of(&router, &bob).await.status() == 200
    })
    .await;
    assert!(freed, "Alice's idle backend was never released");
    assert_eq!(status(&router, &alice).await["session"], Value::Null);
}

#[tokio::test]
async fn ignored_paths_do_not_keep_a_backend_but_other_requests_do() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let router = TestRouter::iap(
        &issuer,
        &[&pods[0]],
        "idle_timeout = \"1s\"\nactivity_ignore_paths = [\"/internal/ping\"]",
    )
    .await;
    let alice = issuer.user("alice");
    assert_eq!(pod_of(&router, &alice).await.status(), 200);
    // Busy: a real request every 300 ms keeps the backend for 2.5 s.
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(pod_of(&router, &alice).await.status(), 200);
        assert!(
            status(&router, &alice).await["session"].is_object(),
            "released while in use"
        );
    }
    // Only pings from now on: the session must be released meanwhile, and
    // pings never allocate a new one.
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let ping = client()
            .get(router.url("/internal/ping"))
            .header(ASSERTION, &alice)
            .send()
            .await
            .unwrap();
        assert!(ping.status() == 200 || ping.status() == 409, "{}", ping.status());
    }
    assert!(
        router.state.registry.get("accounts.google.com:alice").is_none(),
        "pings kept the backend alive, or took a new one"
    );
}

async fn socket(
    router: &TestRouter,
    token: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let mut request = router.ws_url("/ws").into_client_request().unwrap();
    request.headers_mut().insert(ASSERTION, token.parse().unwrap());
    tokio_tungstenite::connect_async(request).await.unwrap().0
}

#[tokio::test]
async fn traffic_on_an_open_websocket_keeps_the_backend() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let router = TestRouter::iap(&issuer, &[&pods[0]], "idle_timeout = \"1s\"").await;
    let alice = issuer.user("alice");
    let mut ws = socket(&router, &alice).await;
    for i in 0..10 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        ws.send(Message::text(format!("tick {i}"))).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text(format!("tick {i}")));
    }
    assert_eq!(
        router.state.registry.len(),
        1,
        "released despite 3 s of WebSocket traffic"
    );
}

#[tokio::test]
async fn a_silent_open_websocket_does_not_keep_the_backend_and_is_closed_on_release() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let router = TestRouter::iap(&issuer, &[&pods[0]], "idle_timeout = \"1s\"").await;
    let mut ws = socket(&router, &issuer.user("alice")).await;
    let released = eventually(Duration::from_secs(5), || async { router.state.registry.is_empty() }).await;
    assert!(released, "an idle open socket kept the backend");
    let closed = tokio::time::timeout(Duration::from_secs(2), ws.next())
        .await
        .expect("socket left open after release");
    assert!(!matches!(closed, Some(Ok(Message::Text(_)))), "{closed:?}");
}

#[tokio::test]
async fn a_user_can_release_their_backend_now() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let router = TestRouter::iap(&issuer, &[&pods[0]], "").await;
    let alice = issuer.user("alice");
    let first = pod_of(&router, &alice).await;
    let cookie = set_cookie(&first, "session_router").unwrap();
    let before = status(&router, &alice).await;
    assert_eq!(before["session"]["backend"], "static-0");
    assert_eq!(before["session"]["idle_timeout_seconds"], 900);

    let released = client()
        .post(router.url("/_router/release"))
        .header(ASSERTION, &alice)
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(released.status(), 200);
    let ended = set_cookie(&released, "session_router").unwrap();
    assert_ne!(ended, cookie, "the cookie now says the backend was released");
    assert_eq!(released.json::<Value>().await.unwrap()["released"], true);
    let after = client()
        .get(router.url("/whoami"))
        .header(ASSERTION, &alice)
        .header("cookie", &ended)
        .send()
        .await
        .unwrap();
    assert_eq!(after.status(), 409, "the released cookie takes no backend");
    assert_eq!(
        pod_of(&router, &issuer.user("bob")).await.status(),
        200,
        "the backend went to the next user"
    );
}

#[tokio::test]
async fn a_cross_site_release_is_refused() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let router = TestRouter::iap(&issuer, &[&pods[0]], "").await;
    let alice = issuer.user("alice");
    assert_eq!(pod_of(&router, &alice).await.status(), 200);
    let forged = client()
        .post(router.url("/_router/release"))
        .header(ASSERTION, &alice)
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 403);
    assert_eq!(router.state.registry.len(), 1);
}

#[tokio::test]
async fn the_status_page_shows_the_session_with_a_release_button() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let router = TestRouter::iap(&issuer, &[&pods[0]], "").await;
    let alice = issuer.user("alice");
    pod_of(&router, &alice).await;
    let page = support::text_of(
        client()
            .get(router.url("/_router/status"))
            .header(ASSERTION, &alice)
            .header("accept", "text/html"),
    )
    .await;
    assert!(page.contains("alice@example.com"));
    assert!(page.contains("static-0"));
    assert!(page.contains(r#"action="/_router/release""#));
}

async fn probing_router(issuer: &IapIssuer, pod: &ApiPod, session: &str) -> TestRouter {
    let more = format!("[session]\nidle_timeout = \"1s\"\nbusy_probe = \"/sdapi/v1/progress\"\n{session}");
    TestRouter::start(&support::static_config(
        issuer,
        "",
        "",
        &more,
        &format!("{:?}", pod.url),
    ))
    .await
}

#[tokio::test]
async fn a_running_generation_postpones_the_idle_release_until_it_is_done() {
    let issuer = IapIssuer::start().await;
    let pod = ApiPod::start(Some(1)).await;
    let router = probing_router(&issuer, &pod, "").await;
    let alice = issuer.user("alice");
    assert_eq!(pod_of(&router, &alice).await.status(), 200);
    // Alice closed the tab; her batch runs on for three idle timeouts.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        router.state.registry.get("accounts.google.com:alice").is_some(),
        "released while the backend reported a job running"
    );
    assert!(
        pod.probes() >= 2,
        "the backend was asked on each pass ({} probes)",
        pod.probes()
    );
    pod.set_jobs(Some(0));
    let released = eventually(Duration::from_secs(3), || async {
        router.state.registry.get("accounts.google.com:alice").is_none()
    })
    .await;
    assert!(released, "never released after the job finished");
}

#[tokio::test]
async fn a_probe_that_fails_does_not_postpone() {
    let issuer = IapIssuer::start().await;
    let pod = ApiPod::start(None).await;
    let router = probing_router(&issuer, &pod, "").await;
    let alice = issuer.user("alice");
    assert_eq!(pod_of(&router, &alice).await.status(), 200);
    let released = eventually(Duration::from_secs(4), || async {
        router.state.registry.get("accounts.google.com:alice").is_none()
    })
    .await;
    assert!(released, "a 404 from the probe kept the backend");
    assert!(pod.probes() >= 1, "the probe was never asked");
}

#[tokio::test]
async fn a_busy_backend_is_released_at_max_lifetime() {
    let issuer = IapIssuer::start().await;
    let pod = ApiPod::start(Some(3)).await;
    let router = probing_router(&issuer, &pod, "max_lifetime = \"3s\"").await;
    let alice = issuer.user("alice");
    assert_eq!(pod_of(&router, &alice).await.status(), 200);
    let started = std::time::Instant::now();
    let released = eventually(Duration::from_secs(6), || async {
        router.state.registry.get("accounts.google.com:alice").is_none()
    })
    .await;
    assert!(released, "max_lifetime did not end a busy session");
    assert!(
        started.elapsed() >= Duration::from_millis(2500),
        "released before max_lifetime"
    );
}
