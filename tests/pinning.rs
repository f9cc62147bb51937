//! One backend per user, pinned by a signed cookie that is worthless to
//! anyone else.

mod support;

use serde_json::Value;
use support::{client, pods, set_cookie, IapIssuer, TestRouter};

const ASSERTION: &str = "x-goog-iap-jwt-assertion";
const COOKIE: &str = "session_router";

async fn get(router: &TestRouter, path: &str, token: &str, cookie: Option<&str>) -> reqwest::Response {
    let mut request = client().get(router.url(path)).header(ASSERTION, token);
    if let Some(cookie) = cookie {
        request = request.header("cookie", cookie);
    }
    request.send().await.unwrap()
}

async fn pod_of(router: &TestRouter, token: &str, cookie: Option<&str>) -> String {
    let response = get(router, "/whoami", token, cookie).await;
    assert_eq!(response.status(), 200);
    let seen: Value = response.json().await.unwrap();
    seen["pod"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn two_users_get_two_backends_and_a_third_gets_the_waiting_page() {
    let issuer = IapIssuer::start().await;
    let pods = pods(2).await;
    let router = TestRouter::iap(&issuer, &[&pods[0], &pods[1]], "").await;
    let alice = pod_of(&router, &issuer.user("alice"), None).await;
    let bob = pod_of(&router, &issuer.user("bob"), None).await;
    assert_ne!(alice, bob);

    let carol = issuer.user("carol");
    let page = client()
        .get(router.url("/"))
        .header(ASSERTION, &carol)
        .header("accept", "text/html,application/xhtml+xml")
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 503);
    assert_eq!(page.headers()["retry-after"], "2");
    let html = page.text().await.unwrap();
    assert!(
        html.contains("http-equiv=\"refresh\""),
        "the waiting page reloads itself: {html}"
    );
    assert!(html.contains("Waiting for a free GPU"));

    let api = get(&router, "/sdapi/v1/txt2img", &carol, None).await;
    assert_eq!(api.status(), 503);
    assert!(api.headers().contains_key("retry-after"));
    let body: Value = api.json().await.unwrap();
    assert_eq!(body["error"], "no_capacity");

    // Alice and Bob still reach their own pods.
    assert_eq!(pod_of(&router, &issuer.user("alice"), None).await, alice);
    assert_eq!(pod_of(&router, &issuer.user("bob"), None).await, bob);
}

#[tokio::test]
async fn the_pinning_cookie_is_signed_http_only_secure_and_lax() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let router = TestRouter::iap(&issuer, &[&pods[0]], "").await;
    let response = get(&router, "/whoami", &issuer.user("alice"), None).await;
    let header = response
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .find(|v| v.starts_with("session_router="))
        .expect("a pinning cookie");
    for attribute in ["HttpOnly", "Secure", "SameSite=Lax", "Path=/"] {
        assert!(header.contains(attribute), "{attribute} missing in {header}");
    }
    // A request that already carries a fresh cookie is not sent a new one.
    let cookie = set_cookie(&response, COOKIE).unwrap();
    let again = get(&router, "/whoami", &issuer.user("alice"), Some(&cookie)).await;
    assert_eq!(set_cookie(&again, COOKIE), None);
}

#[tokio::test]
async fn another_users_cookie_never_routes_to_their_backend() {
    let issuer = IapIssuer::start().await;
    let pods = pods(2).await;
    let router = TestRouter::iap(&issuer, &[&pods[0], &pods[1]], "").await;
    let alice_response = get(&router, "/whoami", &issuer.user("alice"), None).await;
    let alice_cookie = set_cookie(&alice_response, COOKIE).unwrap();
    let alice_pod = alice_response.json::<Value>().await.unwrap()["pod"].clone();

    let bob_pod = pod_of(&router, &issuer.user("bob"), Some(&alice_cookie)).await;
    assert_ne!(
        Value::from(bob_pod.clone()),
        alice_pod,
        "Bob was routed to Alice's pod by her cookie"
    );
    assert_eq!(pod_of(&router, &issuer.user("bob"), None).await, bob_pod);
}

#[tokio::test]
async fn tampered_duplicated_or_garbage_cookies_are_ignored_not_errors() {
    let issuer = IapIssuer::start().await;
    let pods = pods(2).await;
    let router = TestRouter::iap(&issuer, &[&pods[0], &pods[1]], "").await;
    let alice = issuer.user("alice");
    let first = get(&router, "/whoami", &alice, None).await;
    let cookie = set_cookie(&first, COOKIE).unwrap();
    let home = first.json::<Value>().await.unwrap()["pod"]
        .as_str()
        .unwrap()
        .to_string();
    let tampered = format!("{}A", &cookie[..cookie.len() - 1]);
    let cases = [
        tampered.clone(),
        format!("{cookie}; {cookie}"),
        format!("{COOKIE}=garbage"),
        format!("{COOKIE}=v1.{}.{}", "A".repeat(6000), "B".repeat(40)),
        format!("{COOKIE}="),
    ];
    for case in &cases {
        assert_eq!(pod_of(&router, &alice, Some(case)).await, home, "cookie {case:.40}…");
    }
}

#[tokio::test]
async fn api_clients_without_cookies_reach_the_same_backend() {
    let issuer = IapIssuer::start().await;
    let pods = pods(3).await;
    let router = TestRouter::iap(&issuer, &[&pods[0], &pods[1], &pods[2]], "").await;
    let first = pod_of(&router, &issuer.user("alice"), None).await;
    for _ in 0..5 {
        // A new token each time, as IAP would mint, and never a cookie.
        assert_eq!(pod_of(&router, &issuer.user("alice"), None).await, first);
    }
}

#[tokio::test]
async fn ten_concurrent_first_requests_from_one_user_take_one_backend() {
    let issuer = IapIssuer::start().await;
    let pods = pods(2).await;
    let router = TestRouter::iap(&issuer, &[&pods[0], &pods[1]], "").await;
    let token = issuer.user("alice");
    let requests: Vec<_> = (0..10).map(|_| pod_of(&router, &token, None)).collect();
    let seen = futures_util::future::join_all(requests).await;
    assert!(seen.iter().all(|p| *p == seen[0]), "{seen:?}");
    // The other backend is still free for somebody else.
    let bob = pod_of(&router, &issuer.user("bob"), None).await;
    assert_ne!(bob, seen[0]);
}

#[tokio::test]
async fn the_router_cookie_and_spoofable_headers_never_reach_the_backend() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let router = TestRouter::iap(&issuer, &[&pods[0]], "").await;
    let token = issuer.user("alice");
    let first = get(&router, "/whoami", &token, None).await;
    let cookie = set_cookie(&first, COOKIE).unwrap();
    let response = get(
        &router,
        "/whoami",
        &token,
        Some(&format!("theme=dark; {cookie}; session_router_dev=x; lang=en")),
    )
    .await;
    let seen: Value = response.json().await.unwrap();
    assert_eq!(seen["cookie"], "theme=dark; lang=en");
    assert_eq!(seen["x_forwarded_for"], "127.0.0.1");
    assert_eq!(seen["x_forwarded_proto"], "http");
    assert_eq!(seen["x_forwarded_host"], router.addr.to_string());
}

#[tokio::test]
async fn a_cookie_re_attaches_a_user_to_their_backend_after_a_restart() {
    let issuer = IapIssuer::start().await;
    let pods = pods(2).await;
    let pool = [&pods[0], &pods[1]];
    let router = TestRouter::iap(&issuer, &pool, "").await;
    // Bob first, so Alice gets the second pod: a fresh allocation after a
    // restart would hand her the first one instead.
    pod_of(&router, &issuer.user("bob"), None).await;
    let alice_first = get(&router, "/whoami", &issuer.user("alice"), None).await;
    let cookie = set_cookie(&alice_first, COOKIE).unwrap();
    let alice_pod = alice_first.json::<Value>().await.unwrap()["pod"]
        .as_str()
        .unwrap()
        .to_string();
    router.shutdown().await;

    let restarted = TestRouter::iap(&issuer, &pool, "").await;
    assert_eq!(
        pod_of(&restarted, &issuer.user("alice"), Some(&cookie)).await,
        alice_pod
    );
}
