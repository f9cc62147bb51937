//! The waiting line: when every backend is taken, users queue first come,
//! first served, are told where they stand, and a freed backend goes to the
//! head of the line.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{client, eventually, pods, FakeAgones, IapIssuer, TestRouter};

const ASSERTION: &str = "x-goog-iap-jwt-assertion";

/// A request as an API client (JSON answers): status and body.
async fn ask(router: &TestRouter, token: &str) -> (u16, Value) {
    let response = client()
        .get(router.url("/whoami"))
        .header(ASSERTION, token)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn position(router: &TestRouter, token: &str) -> (u16, Option<u64>) {
    let (status, body) = ask(router, token).await;
    (status, body["position"].as_u64())
}

async fn release(router: &TestRouter, token: &str) {
    let released = client()
        .post(router.url("/_router/release"))
        .header(ASSERTION, token)
        .send()
        .await
        .unwrap();
    assert_eq!(released.status(), 200);
}

#[tokio::test]
async fn waiters_are_told_their_place_and_a_freed_backend_goes_to_the_head() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let router = TestRouter::iap(&issuer, &[&pods[0]], "").await;
    let [alice, bob, carol, dave] = ["alice", "bob", "carol", "dave"].map(|u| issuer.user(u));
    assert_eq!(ask(&router, &alice).await.0, 200);

    let (status, body) = ask(&router, &bob).await;
    assert_eq!(status, 503);
    assert_eq!(body["error"], "no_capacity");
    assert_eq!(body["position"], 1);
    assert_eq!(body["waiting"], 1);
    assert_eq!(body["retry_after"], 2);
    assert_eq!(position(&router, &carol).await, (503, Some(2)));
    let (_, body) = ask(&router, &dave).await;
    assert_eq!(
        (body["position"].as_u64(), body["waiting"].as_u64()),
        (Some(3), Some(3))
    );
    assert_eq!(
        position(&router, &bob).await,
        (503, Some(1)),
        "asking again keeps one's place"
    );

    // The browser's page says it in words, and so does the status page.
    let html = support::text_of(
        client()
            .get(router.url("/"))
            .header(ASSERTION, &carol)
            .header("accept", "text/html"),
    )
    .await;
    assert!(html.contains("You are number 2 in line"), "{html}");
    let status: Value = client()
        .get(router.url("/_router/status"))
        .header(ASSERTION, &dave)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["line"]["position"], 3);
    assert_eq!(status["line"]["waiting"], 3);

    // Alice gives her GPU back. Carol asks first, but Bob is ahead of her.
    release(&router, &alice).await;
    assert_eq!(position(&router, &carol).await, (503, Some(2)), "no overtaking");
    assert_eq!(position(&router, &dave).await, (503, Some(3)));
    assert_eq!(ask(&router, &bob).await.0, 200, "the head of the line gets it");
    assert_eq!(position(&router, &carol).await, (503, Some(1)), "Bob left the line");
    assert_eq!(position(&router, &dave).await, (503, Some(2)));
}

#[tokio::test]
async fn a_waiter_who_stops_asking_loses_their_place_and_rejoins_at_the_end() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let router = TestRouter::iap(&issuer, &[&pods[0]], "queue_timeout = \"3s\"").await;
    let [alice, bob, carol] = ["alice", "bob", "carol"].map(|u| issuer.user(u));
    assert_eq!(ask(&router, &alice).await.0, 200);
    assert_eq!(position(&router, &bob).await, (503, Some(1)));
    assert_eq!(position(&router, &carol).await, (503, Some(2)));
    // Bob closed the tab; Carol keeps asking.
    let moved_up = eventually(Duration::from_secs(6), || async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        position(&router, &carol).await == (503, Some(1))
    })
    .await;
    assert!(moved_up, "a silent waiter held the line");
    assert_eq!(position(&router, &bob).await, (503, Some(2)), "back at the end");
}

#[tokio::test]
async fn on_agones_the_first_in_line_take_the_free_servers_in_order() {
    let issuer = IapIssuer::start().await;
    let pods = pods(2).await;
    let fake = FakeAgones::start().await;
    fake.add_ready("gs-1", pods[0].addr);
    fake.add_ready("gs-2", pods[1].addr);
    let router = TestRouter::agones(&issuer, &fake, "agones", "", "").await;
    let [alice, bob, carol, dave, erin] = ["alice", "bob", "carol", "dave", "erin"].map(|u| issuer.user(u));
    assert_eq!(ask(&router, &alice).await.0, 200);
    assert_eq!(ask(&router, &bob).await.0, 200);
    assert_eq!(position(&router, &carol).await, (503, Some(1)));
    assert_eq!(position(&router, &dave).await, (503, Some(2)));
    assert_eq!(position(&router, &erin).await, (503, Some(3)));
    // Both servers are released; the Fleet replaces them.
    release(&router, &alice).await;
    release(&router, &bob).await;
    fake.add_ready("gs-3", pods[0].addr);
    fake.add_ready("gs-4", pods[1].addr);
    let seen = eventually(Duration::from_secs(3), || async { router.capacity().ready == 2 }).await;
    assert!(seen, "the cache never saw the new servers");
    assert_eq!(
        position(&router, &erin).await,
        (503, Some(3)),
        "two free, but two ahead of Erin"
    );
    assert_eq!(
        ask(&router, &dave).await.0,
        200,
        "the second in line may take the second server"
    );
    assert_eq!(ask(&router, &carol).await.0, 200);
    assert_eq!(position(&router, &erin).await, (503, Some(1)));
}

#[tokio::test]
async fn two_replicas_share_one_line_through_kubernetes_leases() {
    let issuer = IapIssuer::start().await;
    let pods = pods(2).await;
    let fake = FakeAgones::start().await;
    fake.add_ready("gs-1", pods[0].addr);
    let a = TestRouter::agones(&issuer, &fake, "agones", "", "").await;
    let b = TestRouter::agones(&issuer, &fake, "agones", "", "").await;
    let [alice, bob, carol, dave] = ["alice", "bob", "carol", "dave"].map(|u| issuer.user(u));
    assert_eq!(ask(&a, &alice).await.0, 200);
    // Waiters arrive through either replica; each sees the one line.
    assert_eq!(position(&a, &bob).await, (503, Some(1)));
    assert_eq!(position(&b, &carol).await, (503, Some(2)));
    let (_, body) = ask(&a, &dave).await;
    assert_eq!(
        (body["position"].as_u64(), body["waiting"].as_u64()),
        (Some(3), Some(3))
    );
    assert_eq!(
        position(&b, &bob).await,
        (503, Some(1)),
        "Bob's place holds on the other replica"
    );
    assert_eq!(fake.line().len(), 3, "one Lease per waiter: {:?}", fake.line());
    assert_eq!(b.waiting().await, 3);

    // Alice's server goes back; the Fleet brings a fresh one.
    release(&a, &alice).await;
    fake.add_ready("gs-2", pods[1].addr);
    let ready = eventually(Duration::from_secs(3), || async {
        a.capacity().ready == 1 && b.capacity().ready == 1
    })
    .await;
    assert!(ready, "the caches never saw the new server");
    assert_eq!(
        position(&b, &carol).await,
        (503, Some(2)),
        "Carol asks first, on B, but Bob is ahead"
    );
    assert_eq!(position(&a, &dave).await, (503, Some(3)));
    assert_eq!(ask(&b, &bob).await.0, 200, "the head gets it, through either replica");
    assert_eq!(fake.line().len(), 2, "Bob left the line: {:?}", fake.line());
    assert_eq!(position(&a, &carol).await, (503, Some(1)));
    assert_eq!(position(&b, &dave).await, (503, Some(2)));
}

#[tokio::test]
async fn a_known_user_with_a_cookie_never_touches_the_shared_line() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let fake = FakeAgones::start().await;
    fake.add_ready("gs-1", pods[0].addr);
    let a = TestRouter::agones(&issuer, &fake, "agones", "", "").await;
    let alice = issuer.user("alice");
    let first = client()
        .get(a.url("/whoami"))
        .header(ASSERTION, &alice)
        .send()
        .await
        .unwrap();
    let cookie = support::set_cookie(&first, "session_router").unwrap();
    assert_eq!(position(&a, &issuer.user("bob")).await, (503, Some(1)));
    let b = TestRouter::agones(&issuer, &fake, "agones", "", "").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    fake.clear_calls();
    let again = client()
        .get(b.url("/whoami"))
        .header(ASSERTION, &alice)
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 200);
    let calls: Vec<String> = fake.calls().into_iter().filter(|c| !c.contains("watch=")).collect();
    assert!(calls.is_empty(), "a pinned user's request called the API: {calls:?}");
}

#[tokio::test]
async fn a_stale_place_in_the_shared_line_is_skipped_and_cleared_by_any_replica() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let fake = FakeAgones::start().await;
    fake.add_ready("gs-1", pods[0].addr);
    let session = "queue_timeout = \"3s\"";
    let a = TestRouter::agones(&issuer, &fake, "agones", session, "").await;
    let b = TestRouter::agones(&issuer, &fake, "agones", session, "").await;
    let [alice, bob, carol] = ["alice", "bob", "carol"].map(|u| issuer.user(u));
    assert_eq!(ask(&a, &alice).await.0, 200);
    assert_eq!(position(&a, &bob).await, (503, Some(1)));
    assert_eq!(position(&b, &carol).await, (503, Some(2)));
    // Bob closed his tab; Carol keeps asking through B.
    let moved_up = eventually(Duration::from_secs(6), || async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        position(&b, &carol).await == (503, Some(1))
    })
    .await;
    assert!(moved_up, "a silent waiter held the shared line");
    let cleared = eventually(Duration::from_secs(8), || async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let _ = position(&b, &carol).await;
        fake.line().len() == 1
    })
    .await;
    assert!(cleared, "the stale Lease was never deleted: {:?}", fake.line());
}
