//! The FleetAutoscaler webhook, end to end: a router on an Agones backend
//! (the fake API server) with `server.autoscaler_listen` on a loopback port,
//! sent `FleetAutoscaleReview`s the way the Agones controller sends them.

mod support;

use serde_json::{json, Value};
use support::{client, FakeAgones, IapIssuer, TestRouter};

const ASSERTION: &str = "x-goog-iap-jwt-assertion";

/// A router on `fake` serving the webhook and metrics on ports of their
/// own; `autoscaler` is the body of its `[autoscaler]` section.
async fn webhook_router(issuer: &IapIssuer, fake: &FakeAgones, autoscaler: &str) -> TestRouter {
    let server = "autoscaler_listen = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"";
    let text = format!(
        "{}\n[autoscaler]\n{autoscaler}\n",
        support::agones_config(issuer, fake, "agones", server, "", "")
    );
    TestRouter::start(&text).await
}

/// A review as the Agones controller marshals it (no apiVersion or kind:
/// its Go type has none) for a Fleet of `replicas` with `allocated` of them
/// allocated.
fn review(uid: &str, replicas: u32, allocated: u32) -> Value {
    json!({
        "request": {
            "uid": uid,
            "name": support::fake_agones::FLEET,
            "namespace": "default",
            "status": {
                "replicas": replicas,
                "readyReplicas": replicas - allocated,
                "reservedReplicas": 0,
                "allocatedReplicas": allocated,
            }
        },
        "response": null
    })
}

/// POSTs `body` to the webhook at `path`: the status and the JSON answer.
async fn ask(router: &TestRouter, path: &str, body: String) -> (u16, Value) {
    let addr = router.state.autoscaler_addr().expect("the webhook is listening");
    let response = client()
        .post(format!("http://{addr}{path}"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string());
    let text = response.text().await.unwrap();
    assert_eq!(content_type.as_deref(), Some("application/json"), "{status}: {text}");
    (status, serde_json::from_str(&text).unwrap())
}

/// The `response` part of the webhook's answer to `review`.
async fn decide(router: &TestRouter, review: Value) -> Value {
    let (status, answer) = ask(router, "/scale", review.to_string()).await;
    assert_eq!(status, 200, "{answer}");
    answer["response"].clone()
}

/// Makes `name` request a page and get the waiting page (no GameServer free).
async fn wait_for_a_server(router: &TestRouter, issuer: &IapIssuer, name: &str) {
    let waiting = client()
        .get(router.url("/"))
        .header(ASSERTION, issuer.user(name))
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(waiting.status(), 503, "{name} waits for a server");
}

#[tokio::test]
async fn with_nobody_waiting_the_fleet_is_sized_to_its_allocated_servers_plus_the_buffer() {
    let issuer = IapIssuer::start().await;
    let fake = FakeAgones::start().await;
    let router = webhook_router(&issuer, &fake, "buffer = 2").await;
    assert_eq!(router.waiting().await, 0);
    let response = decide(&router, review("u-1", 3, 2)).await;
    assert_eq!(response["replicas"], 4, "2 allocated + 2 spare: {response}");
    assert_eq!(response["scale"], true);
    // Whatever path the FleetAutoscaler names.
    for path in ["/", "/scale", "/any/path"] {
        let (status, answer) = ask(&router, path, review("u-2", 4, 2).to_string()).await;
        assert_eq!(status, 200, "{path}: {answer}");
        assert_eq!(answer["response"]["replicas"], 4, "{path}");
    }
}

#[tokio::test]
async fn a_waiting_user_makes_the_fleet_grow_and_then_gets_a_server() {
    let issuer = IapIssuer::start().await;
    let fake = FakeAgones::start().await;
    let router = webhook_router(&issuer, &fake, "buffer = 0").await;
    wait_for_a_server(&router, &issuer, "alice").await;
    let response = decide(&router, review("u-1", 0, 0)).await;
    assert_eq!(
        (response["scale"].as_bool(), response["replicas"].as_u64()),
        (Some(true), Some(1))
    );
    // Agones scales the Fleet to 1: its new GameServer becomes Ready.
    let pod = support::DemoPod::start("pod-new").await.unwrap();
    fake.add_ready("gs-new", pod.addr);
    let served = support::eventually(std::time::Duration::from_secs(5), || async {
        client()
            .get(router.url("/whoami"))
            .header(ASSERTION, issuer.user("alice"))
            .send()
            .await
            .unwrap()
            .status()
            == 200
    })
    .await;
    assert!(served, "the waiting user never got the new server");
    assert_eq!(router.waiting().await, 0);
    let settled = decide(&router, review("u-2", 1, 1)).await;
    assert_eq!(
        (settled["scale"].as_bool(), settled["replicas"].as_u64()),
        (Some(false), Some(1))
    );
}

#[tokio::test]
async fn users_waiting_on_another_replica_count_too() {
    let issuer = IapIssuer::start().await;
    let fake = FakeAgones::start().await;
    let answering = webhook_router(&issuer, &fake, "buffer = 0").await;
    let other = webhook_router(&issuer, &fake, "buffer = 0").await;
    wait_for_a_server(&other, &issuer, "alice").await;
    wait_for_a_server(&other, &issuer, "bob").await;
    wait_for_a_server(&answering, &issuer, "carol").await;
    let response = decide(&answering, review("u-1", 0, 0)).await;
    assert_eq!(response["replicas"], 3, "every replica's waiters: {response}");
}

#[tokio::test]
async fn each_user_on_the_waiting_page_adds_one_replica() {
    let issuer = IapIssuer::start().await;
    // A Fleet with no Ready GameServer: every allocation is UnAllocated.
    let fake = FakeAgones::start().await;
    let router = webhook_router(&issuer, &fake, "buffer = 1").await;
    wait_for_a_server(&router, &issuer, "alice").await;
    wait_for_a_server(&router, &issuer, "bob").await;
    assert_eq!(router.waiting().await, 2);

    let response = decide(&router, review("u-1", 1, 0)).await;
    assert_eq!(response["replicas"], 3, "0 allocated + 2 waiting + 1 spare: {response}");
    assert_eq!(response["scale"], true);

    let addr = router.state.metrics_addr().expect("metrics listener");
    let metrics = support::text_of(client().get(format!("http://{addr}/metrics"))).await;
    for line in [
        "session_router_autoscaler_desired_replicas 3",
        "session_router_autoscaler_reviews_total{outcome=\"scale\"} 1",
        "session_router_autoscaler_reviews_total{outcome=\"hold\"} 0",
    ] {
        assert!(metrics.lines().any(|l| l == line), "no {line:?} in:\n{metrics}");
    }
}

#[tokio::test]
async fn the_desired_size_is_clamped_to_min_and_max_replicas() {
    let issuer = IapIssuer::start().await;
    let fake = FakeAgones::start().await;
    let router = webhook_router(&issuer, &fake, "buffer = 1\nmin_replicas = 2\nmax_replicas = 4").await;
    let idle = decide(&router, review("u-1", 0, 0)).await;
    assert_eq!(idle["replicas"], 2, "never below min_replicas: {idle}");
    assert_eq!(idle["scale"], true);
    let busy = decide(&router, review("u-2", 4, 4)).await;
    assert_eq!(busy["replicas"], 4, "never above max_replicas: {busy}");
    assert_eq!(busy["scale"], false, "already at the ceiling");
}

#[tokio::test]
async fn a_fleet_already_at_the_desired_size_is_not_scaled() {
    let issuer = IapIssuer::start().await;
    let fake = FakeAgones::start().await;
    let router = webhook_router(&issuer, &fake, "buffer = 1").await;
    let response = decide(&router, review("u-1", 3, 2)).await;
    assert_eq!(response["scale"], false, "{response}");
    assert_eq!(response["replicas"], 3);
}

#[tokio::test]
async fn the_answer_echoes_the_uid_in_agones_review_format() {
    let issuer = IapIssuer::start().await;
    let fake = FakeAgones::start().await;
    let router = webhook_router(&issuer, &fake, "").await;
    // apiVersion and kind, which a person testing by hand may add, are fine.
    let mut sent = review("6f1c9a0e-1b2d-4c3e-9f80-123456789abc", 1, 1);
    sent["apiVersion"] = json!("autoscaling.agones.dev/v1");
    sent["kind"] = json!("FleetAutoscaleReview");
    let (status, answer) = ask(&router, "/scale", sent.to_string()).await;
    assert_eq!(status, 200);
    assert_eq!(
        answer,
        json!({
            "apiVersion": "autoscaling.agones.dev/v1",
            "kind": "FleetAutoscaleReview",
            "response": {"uid": "6f1c9a0e-1b2d-4c3e-9f80-123456789abc", "scale": true, "replicas": 2}
        })
    );
}

#[tokio::test]
async fn a_body_that_is_not_a_review_gets_400_and_a_json_error() {
    let issuer = IapIssuer::start().await;
    let fake = FakeAgones::start().await;
    let router = webhook_router(&issuer, &fake, "").await;
    let status = json!({"replicas": 1, "allocatedReplicas": 0});
    for (body, reason) in [
        ("not json".to_string(), "not a FleetAutoscaleReview"),
        ("{}".to_string(), "no request"),
        (json!({"request": null}).to_string(), "no request"),
        (json!({"request": {"status": status}}).to_string(), "no uid"),
        (json!({"request": {"uid": "", "status": status}}).to_string(), "no uid"),
        (json!({"request": {"uid": "u-1"}}).to_string(), "status"),
        (
            json!({"request": {"uid": "u-1", "status": {"replicas": -1, "allocatedReplicas": 0}}}).to_string(),
            "not a FleetAutoscaleReview",
        ),
    ] {
        let (code, answer) = ask(&router, "/scale", body.clone()).await;
        assert_eq!(code, 400, "{body}: {answer}");
        let error = answer["error"].as_str().unwrap_or_else(|| panic!("{body}: {answer}"));
        assert!(error.contains(reason), "{body}: {error}");
    }
}

#[tokio::test]
async fn only_post_is_answered() {
    let issuer = IapIssuer::start().await;
    let fake = FakeAgones::start().await;
    let router = webhook_router(&issuer, &fake, "").await;
    let addr = router.state.autoscaler_addr().unwrap();
    for method in [reqwest::Method::GET, reqwest::Method::PUT, reqwest::Method::DELETE] {
        let response = client()
            .request(method.clone(), format!("http://{addr}/scale"))
            .body(review("u-1", 1, 0).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 405, "{method}");
    }
}

#[tokio::test]
async fn the_webhook_is_not_served_on_the_main_port_nor_without_its_listener() {
    let issuer = IapIssuer::start().await;
    let fake = FakeAgones::start().await;
    let router = webhook_router(&issuer, &fake, "").await;
    assert_ne!(
        router.state.autoscaler_addr().map(|a| a.port()),
        Some(router.addr.port())
    );
    for path in ["/", "/scale"] {
        let response = client()
            .post(router.url(path))
            .header("content-type", "application/json")
            .body(review("u-1", 1, 0).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.status(),
            401,
            "{path} on the main port is an ordinary path behind IAP"
        );
        assert!(!response.text().await.unwrap().contains("FleetAutoscaleReview"));
    }

    let off = TestRouter::agones(&issuer, &fake, "agones", "", "").await;
    assert_eq!(off.state.autoscaler_addr(), None, "off unless autoscaler_listen is set");
}
