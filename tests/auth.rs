//! Identity: only a valid IAP signature gets a request through.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::iap::{now, SigningKey};
use support::{client, pods, IapIssuer, TestRouter};

const ASSERTION: &str = "x-goog-iap-jwt-assertion";

async fn whoami(router: &TestRouter, token: Option<&str>) -> reqwest::Response {
    let mut request = client().get(router.url("/whoami"));
    if let Some(token) = token {
        request = request.header(ASSERTION, token);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn a_valid_token_reaches_the_users_backend_with_the_verified_identity() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let router = TestRouter::iap(&issuer, &[&pods[0]], "").await;
    let response = whoami(&router, Some(&issuer.user("alice"))).await;
    assert_eq!(response.status(), 200);
    let seen: Value = response.json().await.unwrap();
    assert_eq!(seen["pod"], "pod-1");
    assert_eq!(seen["email"], "alice@example.com");
    assert_eq!(seen["user"], "accounts.google.com:alice");
}

#[tokio::test]
async fn every_kind_of_bad_token_gets_the_same_bare_401() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let router = TestRouter::iap(&issuer, &[&pods[0]], "").await;
    let stranger = SigningKey::generate("key-1");
    let alice = || issuer.token("accounts.google.com:alice", "alice@example.com");
    let valid = alice().sign();
    let tampered = {
        let mut parts: Vec<String> = valid.split('.').map(String::from).collect();
        let payload = String::from_utf8(
            base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, &parts[1]).unwrap(),
        )
        .unwrap()
        .replace("alice", "mallory");
        parts[1] = base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, payload);
        parts.join(".")
    };
    let cases: Vec<(&str, String)> = vec![
        (
            "expired",
            alice()
                .claim("exp", json!(now() - 120))
                .claim("iat", json!(now() - 720))
                .sign(),
        ),
        (
            "wrong audience",
            alice()
                .claim("aud", json!("/projects/123/global/backendServices/999"))
                .sign(),
        ),
        (
            "wrong issuer",
            alice().claim("iss", json!("https://evil.example")).sign(),
        ),
        ("alg none", alice().unsigned()),
        ("HS256 keyed with the public key", alice().sign_hs256_with_public_key()),
        ("unknown kid", alice().kid("no-such-key").sign()),
        (
            "signed by a stranger's key under a known kid",
            alice().signed_by(&stranger).sign(),
        ),
        ("tampered payload", tampered),
        ("issued in the future", alice().claim("iat", json!(now() + 3600)).sign()),
        ("no exp", alice().without("exp").sign()),
        ("no iat", alice().without("iat").sign()),
        ("no aud", alice().without("aud").sign()),
        (
            "exp as a string",
            alice().claim("exp", json!((now() + 600).to_string())).sign(),
        ),
        ("not a jwt", "garbage".to_string()),
    ];
    let mut bodies = Vec::new();
    for (case, token) in &cases {
        let response = whoami(&router, Some(token)).await;
        assert_eq!(response.status(), 401, "{case}");
        bodies.push(response.text().await.unwrap());
    }
    let missing = whoami(&router, None).await;
    assert_eq!(missing.status(), 401, "missing token");
    let missing_body = missing.text().await.unwrap();
    assert!(
        bodies.iter().all(|b| *b == missing_body),
        "401 bodies differ, leaking the reason: {bodies:?}"
    );
    assert!(!missing_body.to_lowercase().contains("token"), "{missing_body}");
    // And the valid one still works.
    assert_eq!(whoami(&router, Some(&valid)).await.status(), 200);
}

#[tokio::test]
async fn a_spoofed_email_header_without_a_token_is_rejected_and_never_forwarded() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let router = TestRouter::iap(&issuer, &[&pods[0]], "").await;
    let spoofed = client()
        .get(router.url("/whoami"))
        .header(
            "x-goog-authenticated-user-email",
            "accounts.google.com:boss@example.com",
        )
        .header("x-goog-authenticated-user-id", "accounts.google.com:1")
        .send()
        .await
        .unwrap();
    assert_eq!(spoofed.status(), 401);

    let with_token = client()
        .get(router.url("/whoami"))
        .header(ASSERTION, issuer.user("alice"))
        .header(
            "x-goog-authenticated-user-email",
            "accounts.google.com:boss@example.com",
        )
        .header("x-goog-authenticated-user-id", "accounts.google.com:1")
        .send()
        .await
        .unwrap();
    let seen: Value = with_token.json().await.unwrap();
    assert_eq!(seen["goog_email"], Value::Null);
    assert_eq!(seen["goog_id"], Value::Null);
    assert_eq!(seen["email"], "alice@example.com");
}

#[tokio::test]
async fn two_assertion_headers_are_rejected() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let router = TestRouter::iap(&issuer, &[&pods[0]], "").await;
    let response = client()
        .get(router.url("/whoami"))
        .header(ASSERTION, issuer.user("alice"))
        .header(ASSERTION, issuer.user("bob"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
}

#[tokio::test]
async fn a_rotated_in_key_is_picked_up_without_a_restart() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let router = TestRouter::iap(&issuer, &[&pods[0]], "").await;
    let rotated = SigningKey::generate("key-2");
    let token = issuer
        .token("accounts.google.com:alice", "alice@example.com")
        .signed_by(&rotated)
        .sign();
    assert_eq!(whoami(&router, Some(&token)).await.status(), 401, "not yet published");
    issuer.publish(&rotated);
    // The refetch for an unknown kid is rate-limited to one per 200 ms here.
    let ok = support::eventually(Duration::from_secs(5), || async {
        whoami(&router, Some(&token)).await.status() == 200
    })
    .await;
    assert!(ok, "new key never accepted");
}

#[tokio::test]
async fn unknown_kids_cannot_make_the_router_hammer_the_jwks_endpoint() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let router = TestRouter::iap(&issuer, &[&pods[0]], "").await;
    let before = issuer.fetches();
    let bogus = issuer
        .token("accounts.google.com:x", "x@example.com")
        .kid("bogus")
        .sign();
    let requests: Vec<_> = (0..50).map(|_| whoami(&router, Some(&bogus))).collect();
    for response in futures_util::future::join_all(requests).await {
        assert_eq!(response.status(), 401);
    }
    let extra = issuer.fetches() - before;
    assert!(
        extra <= 2,
        "{extra} JWKS fetches for 50 concurrent unknown-kid requests"
    );
}

#[tokio::test]
async fn cached_keys_keep_working_when_the_jwks_endpoint_fails() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let router = TestRouter::iap(&issuer, &[&pods[0]], "").await;
    issuer.set_failing(true);
    // Force refetches (an unknown kid) while the endpoint is down.
    let bogus = issuer
        .token("accounts.google.com:x", "x@example.com")
        .kid("bogus")
        .sign();
    for _ in 0..3 {
        assert_eq!(whoami(&router, Some(&bogus)).await.status(), 401);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let fresh = issuer.token("accounts.google.com:bob", "bob@example.com").sign();
    assert_eq!(whoami(&router, Some(&fresh)).await.status(), 200);
}

#[tokio::test]
async fn allowlists_admit_listed_users_and_refuse_others_with_403() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let text = support::static_config(
        &issuer,
        "",
        r#"allowed_domains = ["example.com"]"#,
        "",
        &support::upstream_list(&[&pods[0]]),
    );
    let router = TestRouter::start(&text).await;
    assert_eq!(whoami(&router, Some(&issuer.user("alice"))).await.status(), 200);
    let outsider = issuer.token("accounts.google.com:9", "eve@elsewhere.org").sign();
    assert_eq!(whoami(&router, Some(&outsider)).await.status(), 403);
}

#[tokio::test]
async fn health_answers_without_a_token_and_reveals_nothing() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let router = TestRouter::iap(&issuer, &[&pods[0]], "").await;
    let health = client().get(router.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(health.text().await.unwrap(), "ok\n");
    assert_eq!(client().get(router.url("/readyz")).send().await.unwrap().status(), 200);
    assert_eq!(
        client()
            .get(router.url("/_router/status"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
}

#[tokio::test]
async fn readiness_waits_for_the_signing_keys() {
    let issuer = IapIssuer::start().await;
    issuer.set_failing(true);
    let pods = pods(1).await;
    let text = support::static_config(&issuer, "", "", "", &support::upstream_list(&[&pods[0]]));
    let config = session_router::config::Config::from_toml(&text, Some(support::SECRET.to_vec())).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(session_router::run(listener, config, std::future::pending()));
    let readyz = format!("http://{addr}/readyz");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(client().get(&readyz).send().await.unwrap().status(), 503);
    let token = issuer.user("alice");
    let early = client()
        .get(format!("http://{addr}/"))
        .header(ASSERTION, &token)
        .send()
        .await
        .unwrap();
    assert_eq!(early.status(), 503, "no keys yet: try again later, not 401");
    assert!(early.headers().contains_key("retry-after"));
    issuer.set_failing(false);
    let ready = support::eventually(Duration::from_secs(10), || async {
        client().get(&readyz).send().await.unwrap().status() == 200
    })
    .await;
    assert!(ready, "never became ready after the JWKS recovered");
    server.abort();
}
