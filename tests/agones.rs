//! Agones backends, end to end: the router's real `kube` and allocator
//! clients against the fake API server, GameServers pointing at real
//! stand-in pods.

mod support;

use std::time::{Duration, SystemTime};

use serde_json::Value;
use session_router::allocator::agones::label::{self, user_label_value};
use session_router::allocator::agones::Agones;
use session_router::allocator::ReleaseReason;
use session_router::allocator::{AllocError, Allocator};
use session_router::auth::Identity;
use session_router::config::Config;
use session_router::metrics::Metrics;
use support::{client, eventually, pods, set_cookie, FakeAgones, IapIssuer, TestRouter};

const ASSERTION: &str = "x-goog-iap-jwt-assertion";

fn label(name: &str) -> String {
    user_label_value(&format!("{name}@example.com"))
}

/// `n` stand-in pods and a fake Agones whose Ready GameServers `gs-1` …
/// `gs-n` point at them.
async fn fleet(n: usize) -> (Vec<support::DemoPod>, FakeAgones) {
    let pods = pods(n).await;
    let fake = FakeAgones::start().await;
    for (i, pod) in pods.iter().enumerate() {
        fake.add_ready(&format!("gs-{}", i + 1), pod.addr);
    }
    (pods, fake)
}

async fn whoami(router: &TestRouter, token: &str, cookie: Option<&str>) -> reqwest::Response {
    let mut request = client().get(router.url("/whoami")).header(ASSERTION, token);
    if let Some(cookie) = cookie {
        request = request.header("cookie", cookie);
    }
    request.send().await.unwrap()
}

async fn pod_of(router: &TestRouter, token: &str) -> String {
    let response = whoami(router, token, None).await;
    assert_eq!(response.status(), 200, "{:?}", response.text().await);
    let seen: Value = response.json().await.unwrap();
    seen["pod"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn the_first_request_allocates_a_labelled_gameserver_and_routes_to_its_pod() {
    let issuer = IapIssuer::start().await;
    let (_pods, fake) = fleet(2).await;
    let router = TestRouter::agones(&issuer, &fake, "agones", "", "").await;
    assert_eq!(pod_of(&router, &issuer.user("alice")).await, "pod-1");
    assert_eq!(fake.held_by("accounts.google.com.alice.example.com"), vec!["gs-1"]);
    let gs = fake.server("gs-1").unwrap();
    assert_eq!(
        gs["metadata"]["annotations"]["session-router.dev/email"],
        "alice@example.com"
    );
    let allocations = fake
        .calls()
        .iter()
        .filter(|c| c.contains("gameserverallocations"))
        .count();
    assert_eq!(allocations, 1);
}

#[tokio::test]
async fn the_same_user_through_another_replica_reaches_the_same_pod() {
    let issuer = IapIssuer::start().await;
    let (_pods, fake) = fleet(2).await;
    let a = TestRouter::agones(&issuer, &fake, "agones", "", "").await;
    let b = TestRouter::agones(&issuer, &fake, "agones", "", "").await;
    // Bob first so Alice's pod is not simply "the first Ready one".
    assert_eq!(pod_of(&a, &issuer.user("bob")).await, "pod-1");
    assert_eq!(pod_of(&a, &issuer.user("alice")).await, "pod-2");
    // Replica B has never seen Alice and she brings no cookie (an API client).
    assert_eq!(pod_of(&b, &issuer.user("alice")).await, "pod-2");
    assert_eq!(
        fake.held_by(&label("alice")),
        vec!["gs-2"],
        "never a second pod for the same user"
    );
}

#[tokio::test]
async fn a_valid_cookie_costs_no_api_call_even_on_a_fresh_replica() {
    let issuer = IapIssuer::start().await;
    let (_pods, fake) = fleet(1).await;
    let a = TestRouter::agones(&issuer, &fake, "agones", "", "").await;
    let first = whoami(&a, &issuer.user("alice"), None).await;
    let cookie = set_cookie(&first, "session_router").unwrap();
    let b = TestRouter::agones(&issuer, &fake, "agones", "", "").await;
    // Let B's cache see the allocation.
    tokio::time::sleep(Duration::from_millis(200)).await;
    fake.clear_calls();
    for _ in 0..5 {
        let response = whoami(&b, &issuer.user("alice"), Some(&cookie)).await;
        assert_eq!(response.status(), 200);
    }
    let api_calls: Vec<String> = fake.calls().into_iter().filter(|c| !c.contains("watch=")).collect();
    assert!(
        api_calls.is_empty(),
        "requests with a valid cookie called the API: {api_calls:?}"
    );
}

#[tokio::test]
async fn two_users_get_two_pods_and_a_third_waits_until_one_is_ready() {
    let issuer = IapIssuer::start().await;
    let pods = pods(3).await;
    let fake = FakeAgones::start().await;
    fake.add_ready("gs-1", pods[0].addr);
    fake.add_ready("gs-2", pods[1].addr);
    let router = TestRouter::agones(&issuer, &fake, "agones", "", "").await;
    assert_ne!(
        pod_of(&router, &issuer.user("alice")).await,
        pod_of(&router, &issuer.user("bob")).await
    );
    let carol = issuer.user("carol");
    let waiting = client()
        .get(router.url("/"))
        .header(ASSERTION, &carol)
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(waiting.status(), 503);
    assert!(waiting.headers().contains_key("retry-after"));
    fake.add_ready("gs-3", pods[2].addr);
    assert_eq!(pod_of(&router, &carol).await, "pod-3");
}

#[tokio::test]
async fn contention_is_retried_and_allocation_succeeds() {
    let issuer = IapIssuer::start().await;
    let (_pods, fake) = fleet(1).await;
    let router = TestRouter::agones(&issuer, &fake, "agones", "", "").await;
    fake.contend(2);
    assert_eq!(pod_of(&router, &issuer.user("alice")).await, "pod-1");
    let allocations = fake
        .calls()
        .iter()
        .filter(|c| c.contains("gameserverallocations"))
        .count();
    assert_eq!(allocations, 3, "two Contention answers, then success");
}

#[tokio::test]
async fn the_allocator_service_mode_handles_200_429_and_409() {
    let issuer = IapIssuer::start().await;
    let pods = pods(2).await;
    let fake = FakeAgones::start().await;
    // Agones 1.30, as the seed runs: no `addresses`, only `address` + host port.
    fake.without_addresses();
    fake.add_ready("gs-1", pods[0].addr);
    let router = TestRouter::agones(&issuer, &fake, "agones-allocator", "", "").await;
    fake.contend(1);
    assert_eq!(
        pod_of(&router, &issuer.user("alice")).await,
        "pod-1",
        "409 is retried, 200 routes"
    );
    assert!(fake.calls().iter().any(|c| c == "POST /gameserverallocation"));
    assert!(
        !fake.calls().iter().any(|c| c.contains("gameserverallocations")),
        "no Kubernetes allocation"
    );
    let bob = client()
        .get(router.url("/"))
        .header(ASSERTION, issuer.user("bob"))
        .send()
        .await
        .unwrap();
    assert_eq!(bob.status(), 503, "429 → the waiting page");
    fake.add_ready("gs-2", pods[1].addr);
    assert_eq!(pod_of(&router, &issuer.user("bob")).await, "pod-2");
    // Release still goes through Kubernetes.
    let released = client()
        .post(router.url("/_router/release"))
        .header(ASSERTION, issuer.user("bob"))
        .send()
        .await
        .unwrap();
    assert_eq!(released.status(), 200);
    assert!(fake.deleted("gs-2"));
}

#[tokio::test]
async fn long_and_odd_emails_get_valid_stable_labels_and_the_default_is_the_originals() {
    let issuer = IapIssuer::start().await;
    let (_pods, fake) = fleet(2).await;
    let router = TestRouter::agones(&issuer, &fake, "agones", "", "").await;
    pod_of(&router, &issuer.user("alice")).await;
    assert_eq!(fake.held_by("accounts.google.com.alice.example.com").len(), 1);
    let odd_email = format!("{}+o'neil@example.com", "x".repeat(70));
    let odd = issuer.token("accounts.google.com:42", &odd_email).sign();
    // The fake answers 422 for an invalid label value, as Agones does.
    let first = pod_of(&router, &odd).await;
    let value = user_label_value(&odd_email);
    assert!(value.len() <= 63);
    assert_eq!(fake.held_by(&value).len(), 1);
    // Stable: a second replica derives the same label and finds the same pod.
    let other = TestRouter::agones(&issuer, &fake, "agones", "", "").await;
    assert_eq!(pod_of(&other, &odd).await, first);
}

#[tokio::test]
async fn a_dead_pod_is_released_and_the_user_lands_on_a_new_one() {
    let issuer = IapIssuer::start().await;
    let (mut pods, fake) = fleet(2).await;
    let router = TestRouter::agones(&issuer, &fake, "agones", "", "").await;
    let alice = issuer.user("alice");
    assert_eq!(pod_of(&router, &alice).await, "pod-1");
    // The WebUI in gs-1 dies (its port now refuses connections).
    drop(pods.remove(0));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(pod_of(&router, &alice).await, "pod-2", "retried on a fresh pod");
    assert!(fake.deleted("gs-1"), "the dead GameServer was deleted");
    assert_eq!(fake.held_by(&label("alice")), vec!["gs-2"]);
}

#[tokio::test]
async fn a_post_to_a_dead_pod_is_not_replayed_but_gets_a_reload_page() {
    let issuer = IapIssuer::start().await;
    let (mut pods, fake) = fleet(2).await;
    let router = TestRouter::agones(&issuer, &fake, "agones", "", "").await;
    let alice = issuer.user("alice");
    assert_eq!(pod_of(&router, &alice).await, "pod-1");
    drop(pods.remove(0));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let post = client()
        .post(router.url("/upload"))
        .header(ASSERTION, &alice)
        .header("accept", "text/html")
        .body("payload")
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 502);
    assert!(post.text().await.unwrap().contains("tries again by itself"));
    assert!(fake.deleted("gs-1"));
    assert_eq!(pod_of(&router, &alice).await, "pod-2", "the reload lands on a new pod");
}

#[tokio::test]
async fn a_gameserver_deleted_elsewhere_is_replaced_on_the_next_request() {
    let issuer = IapIssuer::start().await;
    let (_pods, fake) = fleet(2).await;
    let router = TestRouter::agones(&issuer, &fake, "agones", "", "").await;
    let alice = issuer.user("alice");
    assert_eq!(pod_of(&router, &alice).await, "pod-1");
    fake.remove("gs-1");
    let moved = eventually(Duration::from_secs(5), || async {
        pod_of(&router, &alice).await == "pod-2"
    })
    .await;
    assert!(moved, "still routed to a deleted GameServer");
}

#[tokio::test]
async fn release_and_idle_release_delete_the_gameserver() {
    let issuer = IapIssuer::start().await;
    let (_pods, fake) = fleet(2).await;
    let router = TestRouter::agones(&issuer, &fake, "agones", "idle_timeout = \"1s\"", "").await;
    let alice = issuer.user("alice");
    assert_eq!(pod_of(&router, &alice).await, "pod-1");
    let released = client()
        .post(router.url("/_router/release"))
        .header(ASSERTION, &alice)
        .send()
        .await
        .unwrap();
    assert_eq!(released.json::<Value>().await.unwrap()["released"], true);
    assert!(fake.deleted("gs-1"), "release deletes the GameServer");

    assert_eq!(pod_of(&router, &issuer.user("bob")).await, "pod-2");
    let deleted = eventually(Duration::from_secs(6), || async { fake.deleted("gs-2") }).await;
    assert!(deleted, "idle GameServer never deleted");
    // The session goes once the DELETE's answer is back, a moment after the
    // API server saw it.
    let forgotten = eventually(Duration::from_secs(2), || async { router.state.registry.is_empty() }).await;
    assert!(forgotten, "the released session is still held");
}

#[tokio::test]
async fn activity_on_one_replica_keeps_another_replicas_reaper_from_deleting() {
    let issuer = IapIssuer::start().await;
    let (_pods, fake) = fleet(1).await;
    let a = TestRouter::agones(&issuer, &fake, "agones", "idle_timeout = \"1s\"", "").await;
    let b = TestRouter::agones(&issuer, &fake, "agones", "idle_timeout = \"1s\"", "").await;
    let alice = issuer.user("alice");
    // B serves Alice once, then only A sees her: B's own view goes idle.
    assert_eq!(pod_of(&b, &alice).await, "pod-1");
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(pod_of(&a, &alice).await, "pod-1");
        assert!(
            !fake.deleted("gs-1"),
            "deleted while Alice was active on the other replica"
        );
    }
    assert!(fake.server("gs-1").unwrap()["metadata"]["annotations"]["session-router.dev/last-activity"].is_string());
    // Now she stops: some replica releases it.
    let deleted = eventually(Duration::from_secs(6), || async { fake.deleted("gs-1") }).await;
    assert!(deleted, "never released after Alice went idle everywhere");
}

#[tokio::test]
async fn an_idle_delete_aborts_when_the_gameserver_changed_meanwhile() {
    let fake = FakeAgones::start().await;
    let pods = pods(1).await;
    fake.add_ready("gs-1", pods[0].addr);
    let config = agones_config(&fake);
    let agones = Agones::connect(&config.backend.agones, config.backend.kind, "default", Metrics::new())
        .await
        .unwrap();
    assert!(eventually(Duration::from_secs(5), || async { agones.is_ready() }).await);
    let alice = Identity::new("accounts.google.com:alice", "alice@example.com", None);
    let lease = agones.allocate(&alice).await.unwrap();
    // Let the cache catch up with the allocation, then freeze it.
    assert!(eventually(Duration::from_secs(5), || async { agones.adopt_check(&alice, &lease) }).await);
    fake.pause_watch();
    // Another replica records activity: the resourceVersion moves on.
    fake.annotate("gs-1", "session-router.dev/last-activity", "2099-01-01T00:00:00Z");
    let idle = agones.release(&alice, &lease, ReleaseReason::Idle).await;
    assert!(matches!(idle, Err(AllocError::Conflict)), "{idle:?}");
    assert!(!fake.deleted("gs-1"), "the idle delete went through despite the change");
    assert!(
        !fake.calls().iter().any(|c| c.starts_with("DELETE")),
        "the fresh copy shows the activity: no delete is even attempted"
    );
    // The user's own release insists with the fresh version.
    agones.release(&alice, &lease, ReleaseReason::User).await.unwrap();
    assert!(fake.deleted("gs-1"));
    fake.resume_watch();
}

#[tokio::test]
async fn duplicate_allocations_across_replicas_are_cleaned_up_to_the_oldest() {
    let issuer = IapIssuer::start().await;
    let (_pods, fake) = fleet(2).await;
    // Two replicas raced and each allocated a server to Alice.
    fake.allocate_directly("gs-2", "alice@example.com");
    fake.allocate_directly("gs-1", "alice@example.com");
    let router = TestRouter::agones(&issuer, &fake, "agones", "", "").await;
    assert_eq!(
        pod_of(&router, &issuer.user("alice")).await,
        "pod-1",
        "the older server is kept"
    );
    let cleaned = eventually(Duration::from_secs(5), || async {
        fake.held_by(&label("alice")) == ["gs-1"]
    })
    .await;
    assert!(cleaned, "held: {:?}", fake.held_by(&label("alice")));
}

#[tokio::test]
async fn gameservers_without_a_user_label_are_never_touched() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let fake = FakeAgones::start().await;
    fake.add_ready("gs-other", pods[0].addr);
    // Allocated long ago by something else: no user label.
    fake.set_state("gs-other", "Allocated");
    fake.annotate("gs-other", "agones.dev/last-allocated", "2000-01-01T00:00:00Z");
    let _router = TestRouter::agones(&issuer, &fake, "agones", "idle_timeout = \"1s\"", "").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!fake.deleted("gs-other"));
}

#[tokio::test]
async fn a_generation_running_behind_one_replica_keeps_every_replica_from_releasing() {
    let issuer = IapIssuer::start().await;
    let pod = support::api_pod::ApiPod::start(Some(1)).await;
    let fake = FakeAgones::start().await;
    fake.add_ready("gs-1", pod.addr);
    let session = "idle_timeout = \"1s\"\nbusy_probe = \"/sdapi/v1/progress\"";
    let a = TestRouter::agones(&issuer, &fake, "agones", session, "").await;
    let _b = TestRouter::agones(&issuer, &fake, "agones", session, "").await;
    let alice = issuer.user("alice");
    let first = whoami(&a, &alice, None).await;
    assert_eq!(first.status(), 200);
    // The tab is closed; the batch runs for three idle timeouts while B sweeps.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!fake.deleted("gs-1"), "released during a running generation");
    pod.set_jobs(Some(0));
    let released = eventually(Duration::from_secs(5), || async { fake.deleted("gs-1") }).await;
    assert!(released, "never released after the generation finished");
}

#[tokio::test]
async fn every_replica_counts_the_hold_from_the_first_allocation() {
    let issuer = IapIssuer::start().await;
    let (_pods, fake) = fleet(1).await;
    let a = TestRouter::agones(&issuer, &fake, "agones", "", "").await;
    let alice = issuer.user("alice");
    assert_eq!(pod_of(&a, &alice).await, "pod-1");
    let recorded = eventually(Duration::from_secs(3), || async {
        fake.server("gs-1").unwrap()["metadata"]["annotations"]["session-router.dev/allocated-at"].is_string()
    })
    .await;
    assert!(recorded, "the start of the hold is recorded on the GameServer");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Replica B meets Alice (no cookie) after the allocation was re-done.
    let b = TestRouter::agones(&issuer, &fake, "agones", "", "").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(pod_of(&b, &alice).await, "pod-1");
    let held_on_b = b.state.registry.get("accounts.google.com:alice").unwrap().held();
    assert!(
        held_on_b >= Duration::from_millis(1500),
        "B counts from its own first sight: {held_on_b:?}"
    );
}

// ---------------------------------------------------------------------------
// Migration: servers the original front end allocated carry the user label only.

const HASH_LABEL: &str = "session-router.dev/user-hash";

fn a_while_ago(seconds: u64) -> SystemTime {
    SystemTime::now() - Duration::from_secs(seconds)
}

fn allocation_calls(fake: &FakeAgones) -> usize {
    fake.calls()
        .iter()
        .filter(|c| c.contains("gameserverallocations"))
        .count()
}

#[tokio::test]
async fn a_legacy_gameserver_is_adopted_by_the_user_whose_label_it_carries() {
    let issuer = IapIssuer::start().await;
    let (_pods, fake) = fleet(2).await;
    // Allocated before the cut-over (not yet idle: an idle one may be swept
    // before she returns); adoption stamps it as active.
    fake.allocate_legacy("gs-2", "alice@example.com", a_while_ago(20));
    let a = TestRouter::agones(&issuer, &fake, "agones", "idle_timeout = \"30s\"", "").await;
    let b = TestRouter::agones(&issuer, &fake, "agones", "idle_timeout = \"30s\"", "").await;
    assert_eq!(pod_of(&a, &issuer.user("alice")).await, "pod-2");
    let gs = fake.server("gs-2").unwrap();
    assert_eq!(
        gs["metadata"]["labels"][HASH_LABEL],
        label::user_hash("alice@example.com")
    );
    assert_eq!(
        gs["metadata"]["annotations"]["session-router.dev/email"],
        "alice@example.com"
    );
    assert!(gs["metadata"]["annotations"]["session-router.dev/last-activity"].is_string());
    assert_eq!(allocation_calls(&fake), 0, "adopting allocates nothing");
    // Another replica, no cookie: the same pod; and nobody else takes it.
    assert_eq!(pod_of(&b, &issuer.user("alice")).await, "pod-2");
    assert_eq!(pod_of(&b, &issuer.user("bob")).await, "pod-1");
    assert_eq!(fake.held_by(&label("alice")), vec!["gs-2"]);
}

#[tokio::test]
async fn of_two_legacy_gameservers_the_older_is_adopted_and_the_newer_released() {
    let issuer = IapIssuer::start().await;
    let (_pods, fake) = fleet(3).await;
    fake.allocate_legacy("gs-3", "alice@example.com", a_while_ago(60));
    fake.allocate_legacy("gs-2", "alice@example.com", a_while_ago(60));
    let router = TestRouter::agones(&issuer, &fake, "agones", "", "").await;
    assert_eq!(
        pod_of(&router, &issuer.user("alice")).await,
        "pod-2",
        "gs-2 was created first"
    );
    assert!(fake.deleted("gs-3"), "the newer legacy server is released");
    assert_eq!(fake.held_by(&label("alice")), vec!["gs-2"]);
    assert_eq!(fake.server("gs-1").unwrap()["status"]["state"], "Ready");
}

#[tokio::test]
async fn a_legacy_gameserver_beside_the_users_own_is_released() {
    let issuer = IapIssuer::start().await;
    let (_pods, fake) = fleet(2).await;
    // The legacy one is older, but the user already has a server of their own.
    fake.allocate_legacy("gs-1", "alice@example.com", a_while_ago(60));
    fake.allocate_directly("gs-2", "alice@example.com");
    let router = TestRouter::agones(&issuer, &fake, "agones", "", "").await;
    assert_eq!(pod_of(&router, &issuer.user("alice")).await, "pod-2");
    let released = eventually(Duration::from_secs(5), || async { fake.deleted("gs-1") }).await;
    assert!(released, "the legacy duplicate is released");
    assert_eq!(fake.held_by(&label("alice")), vec!["gs-2"]);
}

#[tokio::test]
async fn replicas_adopting_at_once_adopt_one_gameserver() {
    let issuer = IapIssuer::start().await;
    let (_pods, fake) = fleet(3).await;
    fake.allocate_legacy("gs-1", "alice@example.com", a_while_ago(60));
    let a = TestRouter::agones(&issuer, &fake, "agones", "", "").await;
    let b = TestRouter::agones(&issuer, &fake, "agones", "", "").await;
    let alice = issuer.user("alice");
    let requests = (0..6).map(|i| {
        let router = if i % 2 == 0 { &a } else { &b };
        pod_of(router, &alice)
    });
    let pods = futures_util::future::join_all(requests).await;
    assert!(pods.iter().all(|p| p == "pod-1"), "{pods:?}");
    assert_eq!(fake.held_by(&label("alice")), vec!["gs-1"]);
    for other in ["gs-2", "gs-3"] {
        assert_eq!(fake.server(other).unwrap()["status"]["state"], "Ready", "{other} taken");
    }
}

#[tokio::test]
async fn an_adoption_that_loses_the_race_uses_the_winners_adoption() {
    let fake = FakeAgones::start().await;
    let pods = pods(2).await;
    fake.add_ready("gs-1", pods[0].addr);
    fake.add_ready("gs-2", pods[1].addr);
    fake.allocate_legacy("gs-1", "alice@example.com", a_while_ago(60));
    let config = agones_config(&fake);
    let agones = Agones::connect(&config.backend.agones, config.backend.kind, "default", Metrics::new())
        .await
        .unwrap();
    // The watch has made its list; the next one is the adoption's look.
    assert!(eventually(Duration::from_secs(5), || async { agones.is_ready() }).await);
    // Another replica adopts gs-1 between this one's look and its claim.
    fake.adopt_after_next_list("gs-1", "alice@example.com");
    let alice = Identity::new("accounts.google.com:alice", "alice@example.com", None);
    let lease = agones.allocate(&alice).await.unwrap();
    assert_eq!(&*lease.backend, "gs-1");
    // Claims come before the fall-back allocation (later patches record
    // the start of the hold).
    let refused = fake
        .calls()
        .iter()
        .take_while(|c| !c.contains("gameserverallocations"))
        .filter(|c| c.starts_with("PATCH") && c.contains("gs-1"))
        .count();
    assert_eq!(refused, 1, "the stale claim was sent (and refused by its precondition)");
    assert_eq!(fake.held_by(&label("alice")), vec!["gs-1"]);
    assert_eq!(fake.server("gs-2").unwrap()["status"]["state"], "Ready");
}

#[tokio::test]
async fn a_legacy_gameserver_nobody_adopts_is_released_once_idle() {
    let issuer = IapIssuer::start().await;
    let (_pods, fake) = fleet(2).await;
    fake.allocate_legacy("gs-1", "gone@example.com", a_while_ago(3600));
    fake.allocate_legacy("gs-2", "busy@example.com", SystemTime::now());
    let _router = TestRouter::agones(&issuer, &fake, "agones", "idle_timeout = \"3s\"", "").await;
    let swept = eventually(Duration::from_secs(5), || async { fake.deleted("gs-1") }).await;
    assert!(swept, "an idle legacy server was left Allocated");
    assert!(
        !fake.deleted("gs-2"),
        "a legacy server allocated just now is not idle yet"
    );
}

#[tokio::test]
async fn with_adoption_off_a_legacy_gameserver_is_only_swept() {
    let issuer = IapIssuer::start().await;
    let (_pods, fake) = fleet(2).await;
    fake.allocate_legacy("gs-1", "alice@example.com", SystemTime::now());
    let router = TestRouter::agones(
        &issuer,
        &fake,
        "agones",
        "idle_timeout = \"3s\"",
        "adopt_legacy = false",
    )
    .await;
    assert_eq!(
        pod_of(&router, &issuer.user("alice")).await,
        "pod-2",
        "a server of her own"
    );
    assert!(
        fake.server("gs-1").unwrap()["metadata"]["labels"][HASH_LABEL].is_null(),
        "not adopted"
    );
    assert!(!fake.deleted("gs-1"), "not released as a duplicate");
    let swept = eventually(Duration::from_secs(6), || async { fake.deleted("gs-1") }).await;
    assert!(swept, "released by the idle rule once idle");
}

#[tokio::test]
async fn a_server_adopted_by_one_email_is_not_taken_by_another_email_with_the_same_label() {
    let issuer = IapIssuer::start().await;
    let (_pods, fake) = fleet(2).await;
    let (first, second) = ("alice.smith@example.com", "alice@smith.example.com");
    assert_eq!(
        user_label_value(first),
        user_label_value(second),
        "the original form collides"
    );
    fake.allocate_legacy("gs-1", first, a_while_ago(60));
    let router = TestRouter::agones(&issuer, &fake, "agones", "", "").await;
    let token = |email: &str| issuer.token(&format!("accounts.google.com:{email}"), email).sign();
    assert_eq!(pod_of(&router, &token(first)).await, "pod-1");
    assert_eq!(
        pod_of(&router, &token(second)).await,
        "pod-2",
        "the hash label keeps the other out"
    );
    assert!(!fake.deleted("gs-1") && !fake.deleted("gs-2"));
}

/// An Agones config pointing at `fake`, for tests that use the allocator directly.
fn agones_config(fake: &FakeAgones) -> Config {
    let text = format!(
        r#"
[auth]
mode = "dev"
[server]
listen = "127.0.0.1:0"
[backend]
kind = "agones"
[backend.agones]
fleet = "{fleet}"
kube_api_url = "{api}"
allocation_retry_window = "500ms"
"#,
        fleet = support::fake_agones::FLEET,
        api = fake.url(),
    );
    Config::from_toml(&text, None).unwrap()
}

trait AdoptCheck {
    fn adopt_check(&self, user: &Identity, lease: &session_router::allocator::Lease) -> bool;
}

impl AdoptCheck for Agones {
    /// True once the cache shows the lease as the user's Allocated server.
    fn adopt_check(&self, user: &Identity, lease: &session_router::allocator::Lease) -> bool {
        let pin = session_router::allocator::PinnedBackend {
            backend: lease.backend.to_string(),
            upstream: lease.upstream.to_string(),
            allocated_at: 0,
            expires: u64::MAX,
        };
        self.adopt(user, &pin).is_some()
    }
}

/// The message of a captured `Status` from the real cluster.
fn captured_message(file: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/reference/agones-captures")
        .join(file);
    let status: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    status["message"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn the_fake_answers_as_the_captured_api_server_does() {
    let (_pods, fake) = fleet(1).await;
    let gameservers = format!("{}/apis/agones.dev/v1/namespaces/default/gameservers", fake.url());
    let http = client();
    let list = |query: &str| http.get(format!("{gameservers}?{query}")).send();
    let refused = list("labelSelector=user+in+%28a%2Cb").await.unwrap();
    assert_eq!(refused.status(), 400);
    let message = refused.json::<Value>().await.unwrap()["message"].clone();
    assert_eq!(message, captured_message("list-bad-selector-400.json"));
    let long = format!("labelSelector=user%3D{}", "x".repeat(70));
    let refused = list(&long).await.unwrap();
    assert_eq!(refused.status(), 400);
    let message = refused.json::<Value>().await.unwrap()["message"].clone();
    assert_eq!(message, captured_message("list-bad-label-value-400.json"));
    let refused = list("fieldSelector=status.state%3DReady").await.unwrap();
    let message = refused.json::<Value>().await.unwrap()["message"].clone();
    assert_eq!(message, captured_message("list-fieldselector-state-400.json"));

    let strategic = http
        .patch(format!("{gameservers}/gs-1"))
        .header("content-type", "application/strategic-merge-patch+json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(strategic.status(), 415);
    let message = strategic.json::<Value>().await.unwrap()["message"].clone();
    assert_eq!(message, captured_message("patch-strategic-415.json"));
    let stale = http
        .patch(format!("{gameservers}/gs-1"))
        .header("content-type", "application/merge-patch+json")
        .body(r#"{"metadata":{"resourceVersion":"1","labels":{"a":"b"}}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(stale.status(), 409);

    // Before Scheduled, the lists are null; every server carries the finalizer.
    fake.add_starting("gs-2", 7002);
    let starting = fake.server("gs-2").unwrap();
    assert!(starting["status"]["ports"].is_null() && starting["status"]["addresses"].is_null());
    assert_eq!(
        starting["metadata"]["finalizers"],
        serde_json::json!(["agones.dev/controller"])
    );

    // A DELETE terminates: 200 with the object, which stays; again, nothing changes.
    fake.set_linger(Duration::from_secs(30));
    let deleted: Value = http
        .delete(format!("{gameservers}/gs-1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(deleted["metadata"]["deletionTimestamp"].is_string());
    assert_eq!(deleted["status"]["state"], "Ready", "the state is unchanged");
    let again: Value = http
        .delete(format!("{gameservers}/gs-1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        again["metadata"]["resourceVersion"],
        deleted["metadata"]["resourceVersion"]
    );
    assert!(fake.is_terminating("gs-1"));

    // Watches: BOOKMARKs when asked; 410 Gone from a compacted version.
    let mut watch = http
        .get(format!(
            "{gameservers}?watch=true&allowWatchBookmarks=true&resourceVersion=0"
        ))
        .send()
        .await
        .unwrap();
    let mut seen = String::new();
    while !seen.contains("BOOKMARK") {
        let chunk = tokio::time::timeout(Duration::from_secs(3), watch.chunk()).await;
        seen.push_str(&String::from_utf8_lossy(&chunk.unwrap().unwrap().unwrap()));
    }
    fake.compact();
    let expired = list("watch=true&resourceVersion=1")
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let event: Value = serde_json::from_str(expired.trim()).unwrap();
    assert_eq!(
        (event["type"].as_str(), event["object"]["code"].as_u64()),
        (Some("ERROR"), Some(410))
    );
}

#[tokio::test]
async fn a_watch_that_cannot_resume_after_compaction_lists_again() {
    let issuer = IapIssuer::start().await;
    let (pods, fake) = fleet(1).await;
    let router = TestRouter::agones(&issuer, &fake, "agones", "", "").await;
    fake.break_watches(true);
    tokio::time::sleep(Duration::from_millis(200)).await;
    fake.allocate_directly("gs-1", "bob@example.com");
    fake.compact();
    fake.break_watches(false);
    let seen = eventually(Duration::from_secs(10), || async { router.capacity().allocated == 1 }).await;
    assert!(seen, "the view never caught up after a 410");
    drop(pods);
}
