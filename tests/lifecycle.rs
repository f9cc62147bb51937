//! The session lifecycle a user sees: only an intent (a navigation, an API
//! client, "Start again") takes a GPU; an open tab's background requests
//! never do, and once a GPU was released every replica tells the user when
//! and why.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{client, eventually, pods, set_cookie, DemoPod, IapIssuer, TestRouter};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const ASSERTION: &str = "x-goog-iap-jwt-assertion";
const COOKIE: &str = "session_router";
const ALICE: &str = "accounts.google.com:alice";

/// What a request looks like to the router, as a browser or a script sends it.
#[derive(Clone, Copy)]
enum Sent {
    /// The user opened a page (Chromium's headers for a typed address).
    Navigation,
    /// A page's own fetch()/XHR.
    Fetch,
    /// A script: no cookie jar, no fetch metadata.
    Script,
}

/// One browser tab of one user: their IAP token and the router cookie as
/// the router last set it (a real browser keeps `Secure` cookies on
/// localhost; reqwest's jar would not, hence this).
struct Tab {
    token: String,
    cookie: Option<String>,
}

impl Tab {
    fn new(issuer: &IapIssuer, name: &str) -> Tab {
        Tab {
            token: issuer.user(name),
            cookie: None,
        }
    }

    async fn send(&mut self, router: &TestRouter, method: &str, path: &str, sent: Sent) -> reqwest::Response {
        let mut request = client()
            .request(method.parse().unwrap(), router.url(path))
            .header(ASSERTION, &self.token);
        request = match sent {
            Sent::Navigation => request
                .header("sec-fetch-mode", "navigate")
                .header("sec-fetch-dest", "document")
                .header("sec-fetch-site", "none")
                .header("accept", "text/html,application/xhtml+xml,*/*;q=0.8"),
            Sent::Fetch => request
                .header("sec-fetch-mode", "cors")
                .header("sec-fetch-dest", "empty")
                .header("sec-fetch-site", "same-origin")
                .header("accept", "*/*"),
            Sent::Script => request,
        };
        if let Some(cookie) = &self.cookie {
            request = request.header("cookie", cookie);
        }
        let response = request.send().await.unwrap();
        if let Some(cookie) = set_cookie(&response, COOKIE) {
            self.cookie = Some(cookie).filter(|c| c != &format!("{COOKIE}="));
        }
        response
    }

    async fn get(&mut self, router: &TestRouter, path: &str, sent: Sent) -> reqwest::Response {
        self.send(router, "GET", path, sent).await
    }

    /// Presses "Start again" on the page the router showed.
    async fn start_again(&mut self, router: &TestRouter, next: &str) -> reqwest::Response {
        let mut request = client()
            .post(router.url("/_router/start"))
            .header(ASSERTION, &self.token)
            .header("origin", format!("http://{}", router.addr))
            .header("sec-fetch-mode", "navigate")
            .header("accept", "text/html")
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("next={next}"));
        if let Some(cookie) = &self.cookie {
            request = request.header("cookie", cookie);
        }
        let response = request.send().await.unwrap();
        if let Some(cookie) = set_cookie(&response, COOKIE) {
            self.cookie = Some(cookie);
        }
        response
    }
}

fn allocations(router: &TestRouter) -> u64 {
    router.state.metrics.allocations.with_label_values(&["allocated"]).get()
}

async fn released(router: &TestRouter) -> bool {
    eventually(Duration::from_secs(6), || async {
        router.state.registry.get(ALICE).is_none()
    })
    .await
}

/// The released page's reason and time, after checking it offers "Start
/// again" back to `next`.
async fn released_page(response: reqwest::Response, next: &str) -> (String, String) {
    assert_eq!(response.status(), 409);
    let html = response.text().await.unwrap();
    assert!(html.contains("Your GPU was released"), "{html}");
    assert!(
        html.contains(r#"<form method="post" action="/_router/start">"#),
        "{html}"
    );
    assert!(
        html.contains(&format!(r#"name="next" value="{next}""#)),
        "Start again leads back to {next}: {html}"
    );
    assert!(
        !html.contains("http-equiv=\"refresh\""),
        "the page must not start a GPU by itself"
    );
    let between = |start: &str, end: &str| {
        let from = html.find(start).unwrap_or_else(|| panic!("no {start} in {html}")) + start.len();
        html[from..from + html[from..].find(end).unwrap()].to_string()
    };
    (between("data-reason=\"", "\""), between("<time>", "</time>"))
}

async fn one_pod_router(issuer: &IapIssuer, pod: &DemoPod, session: &str) -> TestRouter {
    TestRouter::iap(issuer, &[pod], session).await
}

#[tokio::test]
async fn a_navigation_allocates_from_a_browser_and_from_one_that_sends_no_fetch_metadata() {
    let issuer = IapIssuer::start().await;
    let pods = pods(2).await;
    let router = TestRouter::iap(&issuer, &[&pods[0], &pods[1]], "").await;
    let mut alice = Tab::new(&issuer, "alice");
    assert_eq!(alice.get(&router, "/", Sent::Navigation).await.status(), 200);
    assert!(alice.cookie.is_some(), "pinned");
    let old_browser = client()
        .get(router.url("/"))
        .header(ASSERTION, issuer.user("bob"))
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(old_browser.status(), 200);
    assert_eq!(allocations(&router), 2);
}

#[tokio::test]
async fn a_background_fetch_without_a_backend_gets_409_no_session_and_allocates_nothing() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let router = one_pod_router(&issuer, &pods[0], "").await;
    let mut alice = Tab::new(&issuer, "alice");
    for (method, path) in [
        ("GET", "/config"),
        ("POST", "/run/predict"),
        ("POST", "/internal/progress"),
    ] {
        let response = alice.send(&router, method, path, Sent::Fetch).await;
        assert_eq!(response.status(), 409, "{method} {path}");
        assert_eq!(response.headers()["cache-control"], "no-store");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"], "no_session");
        assert_eq!(body["reason"], Value::Null);
        assert_eq!(body["start"], "/_router/start");
    }
    assert_eq!(allocations(&router), 0);
    assert!(router.state.registry.is_empty());
}

/// A WebSocket handshake to `/ws`, from a page when `browser`, else from a
/// script.
fn socket_request(
    router: &TestRouter,
    token: &str,
    browser: bool,
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    let mut request = router.ws_url("/ws").into_client_request().unwrap();
    let headers = request.headers_mut();
    headers.insert(ASSERTION, token.parse().unwrap());
    if browser {
        headers.insert("sec-fetch-mode", "websocket".parse().unwrap());
        headers.insert("sec-fetch-site", "same-origin".parse().unwrap());
        headers.insert("origin", format!("http://{}", router.addr).parse().unwrap());
    }
    request
}

#[tokio::test]
async fn a_pages_websocket_without_a_backend_is_refused_with_409_never_101() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let router = one_pod_router(&issuer, &pods[0], "").await;
    let alice = issuer.user("alice");
    match tokio_tungstenite::connect_async(socket_request(&router, &alice, true)).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => assert_eq!(response.status(), 409),
        other => panic!("expected a 409, got {other:?}"),
    }
    assert_eq!(allocations(&router), 0);
    // A script's socket is an API client's request: it gets a backend.
    let (_, response) = tokio_tungstenite::connect_async(socket_request(&router, &alice, false))
        .await
        .unwrap();
    assert_eq!(response.status(), 101);
    assert_eq!(allocations(&router), 1);
}

#[tokio::test]
async fn an_open_tabs_pings_never_take_the_gpu_back_after_its_idle_release() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let router = one_pod_router(
        &issuer,
        &pods[0],
        "idle_timeout = \"1s\"\nactivity_ignore_paths = [\"/internal/ping\"]",
    )
    .await;
    let mut alice = Tab::new(&issuer, "alice");
    // Pings before the page was opened allocate nothing, even as navigations.
    assert_eq!(
        alice.get(&router, "/internal/ping", Sent::Navigation).await.status(),
        409
    );
    assert_eq!(alice.get(&router, "/internal/ping", Sent::Script).await.status(), 409);
    assert_eq!(allocations(&router), 0);
    assert_eq!(alice.get(&router, "/", Sent::Navigation).await.status(), 200);
    // The open tab pings every 200 ms for four idle timeouts.
    let mut ended = None;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let ping = alice.get(&router, "/internal/ping", Sent::Fetch).await;
        if ping.status() == 409 {
            let body: Value = ping.json().await.unwrap();
            assert_eq!(body["error"], "session_ended");
            ended = Some(body);
        } else {
            assert_eq!(ping.status(), 200);
            assert!(ended.is_none(), "a ping got a backend again after the release");
        }
    }
    let ended = ended.expect("never released: pings kept the GPU");
    assert_eq!(ended["reason"], "idle");
    assert!(ended["released_at"].is_string());
    assert_eq!(allocations(&router), 1, "a ping took the GPU back");
    assert!(router.state.registry.is_empty());
}

#[tokio::test]
async fn after_an_idle_release_a_navigation_shows_why_and_start_again_leads_to_a_new_gpu() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let router = one_pod_router(&issuer, &pods[0], "idle_timeout = \"1s\"").await;
    let mut alice = Tab::new(&issuer, "alice");
    assert_eq!(alice.get(&router, "/whoami", Sent::Navigation).await.status(), 200);
    assert!(released(&router).await);
    let page = alice.get(&router, "/whoami", Sent::Navigation).await;
    let (reason, _) = released_page(page, "/whoami").await;
    assert_eq!(reason, "idle");
    assert_eq!(allocations(&router), 1, "the released page took no GPU");

    let forged = client()
        .post(router.url("/_router/start"))
        .header(ASSERTION, &alice.token)
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 403, "a cross-site Start again is refused");
    assert_eq!(allocations(&router), 1);

    let started = alice.start_again(&router, "/whoami").await;
    assert_eq!(started.status(), 303);
    assert_eq!(started.headers()["location"], "/whoami");
    assert_eq!(allocations(&router), 2);
    let webui = alice.get(&router, "/whoami", Sent::Navigation).await;
    assert_eq!(webui.status(), 200);
    assert_eq!(webui.json::<Value>().await.unwrap()["email"], "alice@example.com");
}

#[tokio::test]
async fn a_user_who_released_their_gpu_is_told_they_did() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let router = one_pod_router(&issuer, &pods[0], "").await;
    let mut alice = Tab::new(&issuer, "alice");
    assert_eq!(alice.get(&router, "/", Sent::Navigation).await.status(), 200);
    let release = alice.send(&router, "POST", "/_router/release", Sent::Script).await;
    assert_eq!(release.status(), 200);
    let page = alice.get(&router, "/", Sent::Navigation).await;
    let (reason, _) = released_page(page, "/").await;
    assert_eq!(reason, "user");
    let fetch = alice.get(&router, "/config", Sent::Fetch).await;
    assert_eq!(fetch.status(), 409);
    assert_eq!(fetch.json::<Value>().await.unwrap()["reason"], "user");
    // The status page, where the release button leads, says so too.
    let status: Value = alice
        .get(&router, "/_router/status", Sent::Script)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(status["session"], Value::Null);
    assert_eq!(status["ended"]["reason"], "user");
    let page = alice
        .get(&router, "/_router/status", Sent::Navigation)
        .await
        .text()
        .await
        .unwrap();
    assert!(page.contains(r#"data-reason="user""#), "{page}");
    assert!(page.contains(r#"action="/_router/start""#), "{page}");
    assert_eq!(allocations(&router), 1);
}

#[tokio::test]
async fn a_user_whose_session_reached_its_lifetime_is_told_so_though_busy() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    // A 10 s idle timeout makes the reaper look every second.
    let router = one_pod_router(&issuer, &pods[0], "max_lifetime = \"2s\"\nidle_timeout = \"10s\"").await;
    let mut alice = Tab::new(&issuer, "alice");
    assert_eq!(alice.get(&router, "/", Sent::Navigation).await.status(), 200);
    let mut last = None;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let status = alice.get(&router, "/whoami", Sent::Fetch).await.status();
        last = Some(status);
        if status == 409 {
            break;
        }
    }
    assert_eq!(last, Some(reqwest::StatusCode::CONFLICT), "never ended");
    let (reason, _) = released_page(alice.get(&router, "/", Sent::Navigation).await, "/").await;
    assert_eq!(reason, "max_lifetime");
    assert_eq!(allocations(&router), 1);
}

#[tokio::test]
async fn a_user_whose_gpu_an_administrator_released_is_told_so() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let router = one_pod_router(&issuer, &pods[0], "\n[admin]\nemails = [\"boss@example.com\"]").await;
    let mut alice = Tab::new(&issuer, "alice");
    assert_eq!(alice.get(&router, "/", Sent::Navigation).await.status(), 200);
    let forced = client()
        .post(router.url("/_router/admin/release"))
        .header(ASSERTION, issuer.user("boss"))
        .form(&[("target", "alice@example.com")])
        .send()
        .await
        .unwrap();
    assert_eq!(forced.status(), 200);
    let (reason, _) = released_page(alice.get(&router, "/", Sent::Navigation).await, "/").await;
    assert_eq!(reason, "admin");
    assert_eq!(allocations(&router), 1);
}

async fn idle_router(issuer: &IapIssuer, pod: &DemoPod) -> TestRouter {
    one_pod_router(issuer, pod, "idle_timeout = \"1s\"").await
}

#[tokio::test]
async fn another_replica_and_a_restarted_router_say_the_same_reason_and_time() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let a = idle_router(&issuer, &pods[0]).await;
    let b = idle_router(&issuer, &pods[0]).await;
    let mut alice = Tab::new(&issuer, "alice");
    assert_eq!(alice.get(&a, "/", Sent::Navigation).await.status(), 200);
    assert!(released(&a).await);
    let on_a = released_page(alice.get(&a, "/", Sent::Navigation).await, "/").await;
    assert_eq!(on_a.0, "idle");
    let on_b = released_page(alice.get(&b, "/", Sent::Navigation).await, "/").await;
    assert_eq!(on_b, on_a);
    a.shutdown().await;
    let restarted = idle_router(&issuer, &pods[0]).await;
    let after_restart = released_page(alice.get(&restarted, "/", Sent::Navigation).await, "/").await;
    assert_eq!(after_restart, on_a);
    assert_eq!(allocations(&b) + allocations(&restarted), 0);
}

#[tokio::test]
async fn a_replica_that_did_not_release_the_gpu_tells_idle_from_the_cookie_alone() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let a = idle_router(&issuer, &pods[0]).await;
    let b = idle_router(&issuer, &pods[0]).await;
    let mut alice = Tab::new(&issuer, "alice");
    assert_eq!(alice.get(&a, "/", Sent::Navigation).await.status(), 200);
    assert!(released(&a).await);
    // The cookie's last-active stamp lags by up to a stamp interval (1 s).
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let fetch = alice.get(&b, "/config", Sent::Fetch).await;
    assert_eq!(fetch.status(), 409);
    assert_eq!(fetch.json::<Value>().await.unwrap()["reason"], "idle");
    let (reason, _) = released_page(alice.get(&b, "/", Sent::Navigation).await, "/").await;
    assert_eq!(reason, "idle");
    assert_eq!(allocations(&b), 0, "the other replica took the GPU back");
}

#[tokio::test]
async fn an_api_client_without_cookie_or_fetch_metadata_allocates_and_is_served() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let router = one_pod_router(&issuer, &pods[0], "").await;
    let response = client()
        .get(router.url("/whoami"))
        .header(ASSERTION, issuer.user("alice"))
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap()["email"], "alice@example.com");
    assert_eq!(allocations(&router), 1);
}

#[tokio::test]
async fn background_requests_do_not_join_the_line_but_a_navigation_does() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let router = one_pod_router(&issuer, &pods[0], "").await;
    let mut alice = Tab::new(&issuer, "alice");
    assert_eq!(alice.get(&router, "/", Sent::Navigation).await.status(), 200);
    let mut bob = Tab::new(&issuer, "bob");
    let in_line = |router: &TestRouter| {
        let status = client()
            .get(router.url("/_router/status"))
            .header(ASSERTION, issuer.user("bob"))
            .send();
        async move { status.await.unwrap().json::<Value>().await.unwrap()["line"].clone() }
    };
    assert_eq!(bob.get(&router, "/config", Sent::Fetch).await.status(), 409);
    assert_eq!(in_line(&router).await, Value::Null, "a fetch joined the line");
    let waiting = bob.get(&router, "/", Sent::Navigation).await;
    assert_eq!(waiting.status(), 503, "the waiting page");
    assert_eq!(in_line(&router).await["position"], 1);
    assert_eq!(bob.get(&router, "/config", Sent::Fetch).await.status(), 409);
    let socket = socket_request(&router, &bob.token, true);
    assert!(tokio_tungstenite::connect_async(socket).await.is_err());
    assert_eq!(in_line(&router).await["waiting"], 1, "nobody else queued");
}

/// `n` stand-in pods and a fake Agones whose Ready GameServers `gs-1` …
/// `gs-n` point at them.
/// Alice, served by pod-1 of a fleet of two, whose pod has just died.
async fn alice_whose_pod_died(issuer: &IapIssuer) -> (Vec<DemoPod>, support::FakeAgones, TestRouter, Tab) {
    let (mut pods, fake) = fleet(2).await;
    let router = TestRouter::agones(issuer, &fake, "agones", "", "").await;
    let mut alice = Tab::new(issuer, "alice");
    let first = alice.get(&router, "/whoami", Sent::Navigation).await;
    assert_eq!(first.json::<Value>().await.unwrap()["pod"], "pod-1");
    drop(pods.remove(0));
    (pods, fake, router, alice)
}

fn assert_alice_holds_no_gameserver(fake: &support::FakeAgones) {
    let label = session_router::allocator::agones::label::user_label_value("alice@example.com");
    assert!(fake.held_by(&label).is_empty(), "a GameServer was allocated to alice");
}

async fn fleet(n: usize) -> (Vec<DemoPod>, support::FakeAgones) {
    let pods = pods(n).await;
    let fake = support::FakeAgones::start().await;
    for (i, pod) in pods.iter().enumerate() {
        fake.add_ready(&format!("gs-{}", i + 1), pod.addr);
    }
    (pods, fake)
}

#[tokio::test]
async fn on_agones_a_replica_that_did_not_release_the_gpu_shows_the_released_page_and_allocates_nothing() {
    let issuer = IapIssuer::start().await;
    let (_pods, fake) = fleet(2).await;
    let idle = "idle_timeout = \"1s\"";
    let a = TestRouter::agones(&issuer, &fake, "agones", idle, "").await;
    let b = TestRouter::agones(&issuer, &fake, "agones", idle, "").await;
    let mut alice = Tab::new(&issuer, "alice");
    assert_eq!(alice.get(&a, "/", Sent::Navigation).await.status(), 200);
    assert!(released(&a).await);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let ping = alice.get(&b, "/internal/ping", Sent::Fetch).await;
    assert_eq!(ping.status(), 409);
    let (reason, _) = released_page(alice.get(&b, "/", Sent::Navigation).await, "/").await;
    assert_eq!(reason, "idle");
    assert_eq!(allocations(&b), 0);
    assert_alice_holds_no_gameserver(&fake);
}

#[tokio::test]
async fn a_dead_pods_open_page_allocates_nothing_until_the_user_reloads_onto_a_new_pod() {
    let issuer = IapIssuer::start().await;
    let (_pods, fake, router, mut alice) = alice_whose_pod_died(&issuer).await;
    // A POST is not sent again: the page gets a 502 and its pod is released.
    let post = alice.send(&router, "POST", "/upload", Sent::Fetch).await;
    assert_eq!(post.status(), 502);
    // The open page keeps polling: its fetches find no backend and take none.
    for _ in 0..3 {
        let poll = alice.get(&router, "/whoami", Sent::Fetch).await;
        assert_eq!(poll.status(), 409);
        assert_eq!(poll.json::<Value>().await.unwrap()["error"], "no_session");
    }
    assert_alice_holds_no_gameserver(&fake);
    let reload = alice.get(&router, "/whoami", Sent::Navigation).await;
    assert_eq!(reload.json::<Value>().await.unwrap()["pod"], "pod-2");
}

#[tokio::test]
async fn on_agones_every_replica_tells_a_user_an_administrator_released_their_gpu() {
    let issuer = IapIssuer::start().await;
    let (_pods, fake) = fleet(2).await;
    // A released server lingers behind its finalizer while its pod stops;
    // reaper passes every 300 ms (nobody is idle for 3 s here).
    fake.set_linger(Duration::from_millis(1500));
    let admin = "idle_timeout = \"3s\"\n[admin]\nemails = [\"boss@example.com\"]";
    let a = TestRouter::agones(&issuer, &fake, "agones", admin, "").await;
    let b = TestRouter::agones(&issuer, &fake, "agones", admin, "").await;
    let mut alice = Tab::new(&issuer, "alice");
    assert_eq!(alice.get(&b, "/", Sent::Navigation).await.status(), 200);
    let forced = client()
        .post(a.url("/_router/admin/release"))
        .header(ASSERTION, issuer.user("boss"))
        .form(&[("target", "alice@example.com")])
        .send()
        .await
        .unwrap();
    assert_eq!(forced.status(), 200);
    let recorded = eventually(Duration::from_secs(5), || async {
        fake.server("gs-1")
            .is_some_and(|gs| gs["metadata"]["annotations"]["session-router.dev/released"].is_string())
    })
    .await;
    assert!(recorded, "the reason is written on the lingering GameServer");
    // Alice comes back after the server is gone: every replica remembers.
    let gone = eventually(Duration::from_secs(5), || async { fake.server("gs-1").is_none() }).await;
    assert!(gone, "the finalizer is removed after the linger");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Alice's tab was served by b, which did not make the release.
    let ping = alice.get(&b, "/whoami", Sent::Fetch).await;
    assert_eq!(ping.status(), 409);
    let (reason, _) = released_page(alice.get(&b, "/", Sent::Navigation).await, "/").await;
    assert_eq!(reason, "admin");
    assert_alice_holds_no_gameserver(&fake);
}

#[tokio::test]
async fn a_dead_pods_page_polls_and_pings_take_no_new_gpu() {
    let issuer = IapIssuer::start().await;
    let (_pods, fake, router, mut alice) = alice_whose_pod_died(&issuer).await;
    // A poll that could be sent again is not: it is no intent to start.
    let poll = alice.get(&router, "/whoami", Sent::Fetch).await;
    assert_eq!(poll.status(), 502);
    let ping = alice.get(&router, "/internal/ping", Sent::Fetch).await;
    assert_eq!(ping.status(), 409);
    assert_alice_holds_no_gameserver(&fake);
    let reload = alice.get(&router, "/whoami", Sent::Navigation).await;
    assert_eq!(reload.json::<Value>().await.unwrap()["pod"], "pod-2");
}

#[tokio::test]
async fn on_agones_a_release_through_another_replica_is_remembered_as_the_users_own() {
    let issuer = IapIssuer::start().await;
    let (_pods, fake) = fleet(2).await;
    let a = TestRouter::agones(&issuer, &fake, "agones", "", "").await;
    let b = TestRouter::agones(&issuer, &fake, "agones", "", "").await;
    let mut alice = Tab::new(&issuer, "alice");
    assert_eq!(alice.get(&a, "/", Sent::Navigation).await.status(), 200);
    let release = alice.send(&b, "POST", "/_router/release", Sent::Script).await;
    assert_eq!(release.json::<Value>().await.unwrap()["released"], true);
    let (reason, _) = released_page(alice.get(&b, "/", Sent::Navigation).await, "/").await;
    assert_eq!(reason, "user");
    assert_alice_holds_no_gameserver(&fake);
}

#[tokio::test]
async fn a_start_again_that_fails_leads_the_browser_to_the_webui_whose_page_can_refresh() {
    let issuer = IapIssuer::start().await;
    let (_pods, fake) = fleet(1).await;
    let router = TestRouter::agones(&issuer, &fake, "agones", "", "").await;
    fake.set_down(true);
    let mut alice = Tab::new(&issuer, "alice");
    let pressed = alice.start_again(&router, "/queue").await;
    // Not an error page at /_router/start, whose self-refresh (a GET)
    // would meet a 405: the WebUI's own address answers the failure.
    assert_eq!(pressed.status(), 303);
    assert_eq!(pressed.headers()["location"], "/queue");
}
