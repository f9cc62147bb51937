//! One scenario suite, two targets (issue 20): every scenario runs against
//! the in-process fake Agones (`fake::`, part of `cargo test`) and against a
//! real Kubernetes API server with Agones played by the harness (`real::`).
//! The real target needs the cluster scripts/k8s-e2e starts; without it each
//! `real::` test says so and passes at once. Where the two targets disagree,
//! the real API server is right.
//!
//! One scenario against the real API server:
//!   scripts/k8s-e2e -- real::release_deletes_the_gameserver_and_the_fleet_replaces_it

#[path = "support/agones_player.rs"]
mod agones_player;
#[path = "support/cluster.rs"]
mod cluster;
mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};
use session_router::allocator::agones::label::user_label_value;

use cluster::{Cluster, FakeCluster, RealCluster};
use support::{client, eventually, iap_head, pods, set_cookie, DemoPod, IapIssuer, TestRouter};

const ASSERTION: &str = "x-goog-iap-jwt-assertion";

/// The real target, or `None` (with the reason printed) without a cluster.
async fn real_cluster() -> Option<RealCluster> {
    if !agones_player::cluster_available() {
        eprintln!(
            "skipped: {} is not set; scripts/k8s-e2e runs this against a real Kubernetes API server",
            agones_player::KUBECONFIG_VAR
        );
        return None;
    }
    assert_eq!(
        std::env::var("KUBECONFIG").ok(),
        std::env::var(agones_player::KUBECONFIG_VAR).ok(),
        "the router must find its ServiceAccount's kubeconfig through KUBECONFIG"
    );
    static NAMESPACES: AtomicUsize = AtomicUsize::new(0);
    let namespace = format!("e2e-{}", NAMESPACES.fetch_add(1, Ordering::SeqCst) + 1);
    Some(RealCluster::start(&namespace).await)
}

/// Real scenarios share one API server; one that cuts every connection to
/// it runs alone (`exclusive`), the rest side by side.
static GATE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

macro_rules! scenarios {
    (shared: [$($scenario:ident),* $(,)?], exclusive: [$($alone:ident),* $(,)?] $(,)?) => {
        mod fake {
            $(
                #[tokio::test]
                async fn $scenario() {
                    super::$scenario(&super::FakeCluster::start().await).await;
                }
            )*
            $(
                #[tokio::test]
                async fn $alone() {
                    super::$alone(&super::FakeCluster::start().await).await;
                }
            )*
        }
        mod real {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    let _side_by_side = super::GATE.read().await;
                    if let Some(cluster) = super::real_cluster().await {
                        super::$scenario(&cluster).await;
                    }
                }
            )*
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $alone() {
                    let _alone = super::GATE.write().await;
                    if let Some(cluster) = super::real_cluster().await {
                        super::$alone(&cluster).await;
                    }
                }
            )*
        }
    };
}

scenarios!(
    shared: [
    the_first_request_allocates_a_labelled_gameserver_and_routes_to_its_pod,
    the_same_user_through_another_replica_reaches_the_same_pod,
    a_cookie_from_one_replica_reaches_the_same_pod_through_another,
    two_users_get_two_pods_and_a_third_waits_until_one_is_ready,
    a_server_that_becomes_ready_while_the_router_runs_is_routable,
    a_server_added_while_the_router_runs_enters_its_view,
    the_allocator_service_allocates_over_mutual_tls,
    the_allocator_service_with_no_ready_server_makes_the_user_wait,
    release_deletes_the_gameserver_and_the_user_gets_a_new_one,
    a_released_server_lingering_terminating_is_not_routed_to,
    a_released_server_lingering_is_not_re_found_by_another_replica,
    idle_release_deletes_the_gameserver,
    activity_on_one_replica_keeps_another_replicas_reaper_from_deleting,
    a_dead_pod_is_released_and_the_user_lands_on_a_new_one,
    a_gameserver_deleted_elsewhere_is_replaced_on_the_next_request,
    duplicate_allocations_across_replicas_are_cleaned_up_to_one,
    gameservers_without_a_user_label_are_never_touched,
    a_legacy_gameserver_is_adopted_by_the_user_whose_label_it_carries,
    of_two_legacy_gameservers_one_is_adopted_and_the_other_released,
    a_legacy_gameserver_beside_the_users_own_is_released,
    long_and_odd_emails_get_labels_the_api_server_accepts,
    the_activity_annotation_is_written_by_merge_patch,
    the_start_of_the_hold_is_recorded_on_the_gameserver,
    a_waiter_holds_one_lease_with_microsecond_times,
    two_replicas_share_one_line_through_leases,
    the_head_of_the_line_gets_the_next_ready_server,
    a_known_user_with_a_cookie_makes_no_api_call,
    a_replica_becomes_ready_with_the_fleet_in_every_state,
    a_server_stuck_before_scheduled_keeps_no_replica_from_serving,
    the_fresh_server_outlives_the_released_one_it_replaced,
    a_server_the_fleet_scales_down_is_never_handed_out,
    two_profiles_in_one_namespace_keep_their_fleets_lines_and_labels_apart,
    ],
    exclusive: [the_router_keeps_its_view_after_the_api_server_drops_its_connections],
);

// === helpers ===

fn email(user: &str) -> String {
    format!("{user}@example.com")
}

fn label(user: &str) -> String {
    user_label_value(&email(user))
}

/// `n` stand-in pods, `pod-1` … `pod-n`, and Ready GameServers `gs-1` …
/// `gs-n` of the cluster pointing at them.
async fn fleet(cluster: &dyn Cluster, n: usize) -> Vec<DemoPod> {
    let pods = pods(n).await;
    for (i, pod) in pods.iter().enumerate() {
        cluster.add_ready(&format!("gs-{}", i + 1), pod.addr).await;
    }
    pods
}

/// A router of backend `kind` on the cluster; `session` adds lines to its
/// `[session]` section.
async fn router(issuer: &IapIssuer, cluster: &dyn Cluster, kind: &str, session: &str) -> TestRouter {
    let text = format!(
        r#"{head}
[session]
retry_after = "2s"
{session}
[backend]
kind = "{kind}"
connect_timeout = "1s"
[backend.agones]
{backend}
allocation_retry_window = "500ms"
activity_sync_interval = "200ms"
api_timeout = "3s"
"#,
        head = iap_head(issuer, "", ""),
        backend = cluster.backend_lines(),
    );
    TestRouter::start(&text).await
}

async fn agones(issuer: &IapIssuer, cluster: &dyn Cluster) -> TestRouter {
    router(issuer, cluster, "agones", "").await
}

async fn whoami(router: &TestRouter, token: &str, cookie: Option<&str>) -> reqwest::Response {
    let mut request = client().get(router.url("/whoami")).header(ASSERTION, token);
    if let Some(cookie) = cookie {
        request = request.header("cookie", cookie);
    }
    request.send().await.unwrap()
}

/// The pod that answered the user (panics on anything but 200).
async fn pod_of(router: &TestRouter, token: &str) -> String {
    let response = whoami(router, token, None).await;
    assert_eq!(response.status(), 200, "{:?}", response.text().await);
    let seen: Value = response.json().await.unwrap();
    seen["pod"].as_str().unwrap().to_string()
}

/// Status and place in line of an API client's request.
async fn position(router: &TestRouter, token: &str) -> (u16, Option<u64>) {
    let response = whoami(router, token, None).await;
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    (status, body["position"].as_u64())
}

async fn release(router: &TestRouter, token: &str) {
    let released = client()
        .post(router.url("/_router/release"))
        .header(ASSERTION, token)
        .send()
        .await
        .unwrap();
    assert_eq!(released.json::<Value>().await.unwrap()["released"], true);
}

async fn annotation(cluster: &dyn Cluster, name: &str, key: &str) -> Value {
    cluster
        .server(name)
        .await
        .map(|gs| gs["metadata"]["annotations"][key].clone())
        .unwrap_or(Value::Null)
}

fn a_while_ago(seconds: u64) -> SystemTime {
    SystemTime::now() - Duration::from_secs(seconds)
}

// === allocation and routing ===

async fn the_first_request_allocates_a_labelled_gameserver_and_routes_to_its_pod(cluster: &dyn Cluster) {
    let issuer = IapIssuer::start().await;
    let _pods = fleet(cluster, 2).await;
    let router = agones(&issuer, cluster).await;
    assert_eq!(pod_of(&router, &issuer.user("alice")).await, "pod-1");
    assert_eq!(cluster.held_by(&label("alice")).await, vec!["gs-1"]);
    assert_eq!(
        annotation(cluster, "gs-1", "session-router.dev/email").await,
        "alice@example.com"
    );
    assert_eq!(cluster.allocations().await, 1);
}

async fn the_same_user_through_another_replica_reaches_the_same_pod(cluster: &dyn Cluster) {
    let issuer = IapIssuer::start().await;
    let _pods = fleet(cluster, 2).await;
    let a = agones(&issuer, cluster).await;
    let b = agones(&issuer, cluster).await;
    assert_eq!(pod_of(&a, &issuer.user("bob")).await, "pod-1");
    assert_eq!(pod_of(&a, &issuer.user("alice")).await, "pod-2");
    // b learns of a's allocations from its watch, a moment later; until
    // then, with no server Ready, it would send alice to the line.
    let seen = eventually(Duration::from_secs(5), || async { b.capacity().allocated == 2 }).await;
    assert!(seen, "b's view never showed both servers allocated");
    assert_eq!(
        pod_of(&b, &issuer.user("alice")).await,
        "pod-2",
        "no cookie, other replica"
    );
    assert_eq!(cluster.held_by(&label("alice")).await, vec!["gs-2"]);
}

async fn a_cookie_from_one_replica_reaches_the_same_pod_through_another(cluster: &dyn Cluster) {
    let issuer = IapIssuer::start().await;
    let _pods = fleet(cluster, 2).await;
    let a = agones(&issuer, cluster).await;
    let alice = issuer.user("alice");
    let first = whoami(&a, &alice, None).await;
    let cookie = set_cookie(&first, "session_router").expect("a session cookie");
    let b = agones(&issuer, cluster).await;
    let again = whoami(&b, &alice, Some(&cookie)).await;
    assert_eq!(again.json::<Value>().await.unwrap()["pod"], "pod-1");
}

async fn two_users_get_two_pods_and_a_third_waits_until_one_is_ready(cluster: &dyn Cluster) {
    let issuer = IapIssuer::start().await;
    let pods = pods(3).await;
    cluster.add_ready("gs-1", pods[0].addr).await;
    cluster.add_ready("gs-2", pods[1].addr).await;
    let router = agones(&issuer, cluster).await;
    assert_ne!(
        pod_of(&router, &issuer.user("alice")).await,
        pod_of(&router, &issuer.user("bob")).await
    );
    let carol = issuer.user("carol");
    assert_eq!(position(&router, &carol).await, (503, Some(1)));
    cluster.add_ready("gs-3", pods[2].addr).await;
    let served = eventually(Duration::from_secs(10), || async {
        position(&router, &carol).await.0 == 200
    })
    .await;
    assert!(served, "Carol never got the new server");
    assert_eq!(pod_of(&router, &carol).await, "pod-3");
}

/// A GameServer created after the router started passes through the states
/// with `null` ports and addresses on the router's watch.
async fn a_server_that_becomes_ready_while_the_router_runs_is_routable(cluster: &dyn Cluster) {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let router = agones(&issuer, cluster).await;
    cluster.add_ready("gs-1", pods[0].addr).await;
    let alice = issuer.user("alice");
    let served = eventually(Duration::from_secs(10), || async {
        position(&router, &alice).await.0 == 200
    })
    .await;
    assert!(served, "the new server was never handed out");
    assert_eq!(pod_of(&router, &alice).await, "pod-1");
}

/// The watch carries the new server's states, the first three with `null`
/// ports and addresses: the router's view (its Ready count, which the line
/// and the autoscaler read) must take them all in.
async fn a_server_added_while_the_router_runs_enters_its_view(cluster: &dyn Cluster) {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let router = agones(&issuer, cluster).await;
    cluster.add_ready("gs-1", pods[0].addr).await;
    let seen = eventually(Duration::from_secs(10), || async { router.capacity().ready == 1 }).await;
    assert!(seen, "the router's view never counted the new Ready server");
}

async fn the_allocator_service_allocates_over_mutual_tls(cluster: &dyn Cluster) {
    let issuer = IapIssuer::start().await;
    let _pods = fleet(cluster, 1).await;
    let router = router(&issuer, cluster, "agones-allocator", "").await;
    assert_eq!(pod_of(&router, &issuer.user("alice")).await, "pod-1");
    assert_eq!(cluster.held_by(&label("alice")).await, vec!["gs-1"]);
    assert_eq!(cluster.allocations().await, 1);
}

async fn the_allocator_service_with_no_ready_server_makes_the_user_wait(cluster: &dyn Cluster) {
    let issuer = IapIssuer::start().await;
    let _pods = fleet(cluster, 1).await;
    let router = router(&issuer, cluster, "agones-allocator", "").await;
    assert_eq!(pod_of(&router, &issuer.user("alice")).await, "pod-1");
    assert_eq!(position(&router, &issuer.user("bob")).await, (503, Some(1)));
    assert_eq!(cluster.held_by(&label("bob")).await, Vec::<String>::new());
}

// === release, lingering, dead pods ===

async fn release_deletes_the_gameserver_and_the_user_gets_a_new_one(cluster: &dyn Cluster) {
    let issuer = IapIssuer::start().await;
    let _pods = fleet(cluster, 2).await;
    let router = agones(&issuer, cluster).await;
    let alice = issuer.user("alice");
    assert_eq!(pod_of(&router, &alice).await, "pod-1");
    release(&router, &alice).await;
    assert!(cluster.released("gs-1").await, "release deletes the GameServer");
    assert_eq!(pod_of(&router, &alice).await, "pod-2");
}

/// A real GameServer keeps its finalizer after the DELETE: it stays,
/// Allocated and labelled for its old user, until its pod is gone.
async fn a_released_server_lingering_terminating_is_not_routed_to(cluster: &dyn Cluster) {
    let issuer = IapIssuer::start().await;
    let _pods = fleet(cluster, 2).await;
    let router = agones(&issuer, cluster).await;
    let alice = issuer.user("alice");
    let first = whoami(&router, &alice, None).await;
    let cookie = set_cookie(&first, "session_router").unwrap();
    release(&router, &alice).await;
    // With the old cookie: told it was released (nothing allocated, never
    // the lingering server); a request that starts a session gets a new one.
    let again = whoami(&router, &alice, Some(&cookie)).await;
    assert_eq!(again.status(), 409, "the released page, not the released server");
    let told = again.json::<Value>().await.unwrap();
    assert_eq!(
        (&told["error"], &told["reason"]),
        (&json!("session_ended"), &json!("user"))
    );
    for _ in 0..5 {
        assert_eq!(pod_of(&router, &alice).await, "pod-2");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(cluster.held_by(&label("alice")).await, vec!["gs-2"]);
}

async fn a_released_server_lingering_is_not_re_found_by_another_replica(cluster: &dyn Cluster) {
    let issuer = IapIssuer::start().await;
    let _pods = fleet(cluster, 2).await;
    let a = agones(&issuer, cluster).await;
    let alice = issuer.user("alice");
    assert_eq!(pod_of(&a, &alice).await, "pod-1");
    release(&a, &alice).await;
    let b = agones(&issuer, cluster).await;
    assert_eq!(pod_of(&b, &alice).await, "pod-2", "B re-found the released server");
}

/// The released server, still labelled for Alice while it terminates, is
/// not her duplicate: the fresh one she was given stays hers, and she stays
/// on it, through the old server's lingering and after it is gone.
async fn the_fresh_server_outlives_the_released_one_it_replaced(cluster: &dyn Cluster) {
    let issuer = IapIssuer::start().await;
    let _pods = fleet(cluster, 2).await;
    let router = agones(&issuer, cluster).await;
    let alice = issuer.user("alice");
    assert_eq!(pod_of(&router, &alice).await, "pod-1");
    release(&router, &alice).await;
    let moved = eventually(Duration::from_secs(5), || async {
        position(&router, &alice).await.0 == 200
    })
    .await;
    assert!(moved, "no new server after the release");
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !cluster.released("gs-2").await,
            "the fresh server was released as a duplicate"
        );
    }
    assert_eq!(cluster.held_by(&label("alice")).await, vec!["gs-2"]);
}

async fn idle_release_deletes_the_gameserver(cluster: &dyn Cluster) {
    let issuer = IapIssuer::start().await;
    let _pods = fleet(cluster, 1).await;
    let router = router(&issuer, cluster, "agones", "idle_timeout = \"1s\"").await;
    assert_eq!(pod_of(&router, &issuer.user("alice")).await, "pod-1");
    let deleted = eventually(Duration::from_secs(8), || async { cluster.released("gs-1").await }).await;
    assert!(deleted, "the idle GameServer was never deleted");
}

async fn activity_on_one_replica_keeps_another_replicas_reaper_from_deleting(cluster: &dyn Cluster) {
    let issuer = IapIssuer::start().await;
    let _pods = fleet(cluster, 1).await;
    let a = router(&issuer, cluster, "agones", "idle_timeout = \"1s\"").await;
    let b = router(&issuer, cluster, "agones", "idle_timeout = \"1s\"").await;
    let alice = issuer.user("alice");
    assert_eq!(pod_of(&b, &alice).await, "pod-1");
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(pod_of(&a, &alice).await, "pod-1");
        assert!(!cluster.released("gs-1").await, "deleted while Alice was active on A");
    }
    let deleted = eventually(Duration::from_secs(8), || async { cluster.released("gs-1").await }).await;
    assert!(deleted, "never released once idle everywhere");
}

async fn a_dead_pod_is_released_and_the_user_lands_on_a_new_one(cluster: &dyn Cluster) {
    let issuer = IapIssuer::start().await;
    let mut pods = fleet(cluster, 2).await;
    let router = agones(&issuer, cluster).await;
    let alice = issuer.user("alice");
    assert_eq!(pod_of(&router, &alice).await, "pod-1");
    drop(pods.remove(0));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(pod_of(&router, &alice).await, "pod-2", "retried on a fresh pod");
    assert!(cluster.released("gs-1").await, "the dead GameServer was deleted");
    assert_eq!(cluster.held_by(&label("alice")).await, vec!["gs-2"]);
}

async fn a_gameserver_deleted_elsewhere_is_replaced_on_the_next_request(cluster: &dyn Cluster) {
    let issuer = IapIssuer::start().await;
    let _pods = fleet(cluster, 2).await;
    let router = agones(&issuer, cluster).await;
    let alice = issuer.user("alice");
    assert_eq!(pod_of(&router, &alice).await, "pod-1");
    cluster.kill_pod("gs-1").await;
    let moved = eventually(Duration::from_secs(8), || async {
        pod_of(&router, &alice).await == "pod-2"
    })
    .await;
    assert!(moved, "still routed to a deleted GameServer");
}

async fn a_server_the_fleet_scales_down_is_never_handed_out(cluster: &dyn Cluster) {
    let issuer = IapIssuer::start().await;
    let _pods = fleet(cluster, 2).await;
    let router = agones(&issuer, cluster).await;
    cluster.scale_down("gs-1").await;
    assert_eq!(pod_of(&router, &issuer.user("alice")).await, "pod-2");
    assert_eq!(position(&router, &issuer.user("bob")).await, (503, Some(1)));
}

/// The router's view comes from a watch: after the API server cuts its
/// connections, the watch resumes and new servers are seen (on the real API
/// server this needs the previous scenario to pass first).
async fn the_router_keeps_its_view_after_the_api_server_drops_its_connections(cluster: &dyn Cluster) {
    let issuer = IapIssuer::start().await;
    let pods = pods(2).await;
    cluster.add_ready("gs-1", pods[0].addr).await;
    let router = agones(&issuer, cluster).await;
    assert_eq!(pod_of(&router, &issuer.user("alice")).await, "pod-1");
    cluster.drop_connections().await;
    cluster.add_ready("gs-2", pods[1].addr).await;
    let seen = eventually(Duration::from_secs(10), || async { router.capacity().ready == 1 }).await;
    assert!(seen, "the router's view never saw the server added after the cut");
    assert_eq!(pod_of(&router, &issuer.user("bob")).await, "pod-2");
}

// === several allocations of one user; legacy servers ===

async fn duplicate_allocations_across_replicas_are_cleaned_up_to_one(cluster: &dyn Cluster) {
    let issuer = IapIssuer::start().await;
    let _pods = fleet(cluster, 3).await;
    cluster.allocate_directly("gs-2", &email("alice")).await;
    cluster.allocate_directly("gs-1", &email("alice")).await;
    let router = agones(&issuer, cluster).await;
    let pod = pod_of(&router, &issuer.user("alice")).await;
    let cleaned = eventually(Duration::from_secs(8), || async {
        cluster.held_by(&label("alice")).await.len() == 1
    })
    .await;
    assert!(cleaned, "held: {:?}", cluster.held_by(&label("alice")).await);
    let kept = cluster.held_by(&label("alice")).await;
    assert_eq!(pod, kept[0].replace("gs-", "pod-"), "routed to the server it kept");
}

async fn gameservers_without_a_user_label_are_never_touched(cluster: &dyn Cluster) {
    let issuer = IapIssuer::start().await;
    let _pods = fleet(cluster, 1).await;
    cluster.allocate_unlabelled("gs-1", a_while_ago(3600)).await;
    let _router = router(&issuer, cluster, "agones", "idle_timeout = \"1s\"").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !cluster.released("gs-1").await,
        "a server of no known user was released"
    );
}

async fn a_legacy_gameserver_is_adopted_by_the_user_whose_label_it_carries(cluster: &dyn Cluster) {
    let issuer = IapIssuer::start().await;
    let _pods = fleet(cluster, 2).await;
    cluster.allocate_legacy("gs-2", &email("alice"), a_while_ago(20)).await;
    let a = router(&issuer, cluster, "agones", "idle_timeout = \"30s\"").await;
    let b = router(&issuer, cluster, "agones", "idle_timeout = \"30s\"").await;
    assert_eq!(pod_of(&a, &issuer.user("alice")).await, "pod-2");
    assert_eq!(
        annotation(cluster, "gs-2", "session-router.dev/email").await,
        "alice@example.com"
    );
    assert_eq!(cluster.allocations().await, 0, "adopting allocates nothing");
    assert_eq!(pod_of(&b, &issuer.user("alice")).await, "pod-2");
    assert_eq!(pod_of(&b, &issuer.user("bob")).await, "pod-1");
}

async fn of_two_legacy_gameservers_one_is_adopted_and_the_other_released(cluster: &dyn Cluster) {
    let issuer = IapIssuer::start().await;
    let _pods = fleet(cluster, 3).await;
    cluster.allocate_legacy("gs-3", &email("alice"), a_while_ago(60)).await;
    cluster.allocate_legacy("gs-2", &email("alice"), a_while_ago(60)).await;
    let router = agones(&issuer, cluster).await;
    pod_of(&router, &issuer.user("alice")).await;
    let one = eventually(Duration::from_secs(8), || async {
        cluster.held_by(&label("alice")).await.len() == 1
    })
    .await;
    assert!(one, "held: {:?}", cluster.held_by(&label("alice")).await);
    assert_eq!(cluster.server("gs-1").await.unwrap()["status"]["state"], "Ready");
}

async fn a_legacy_gameserver_beside_the_users_own_is_released(cluster: &dyn Cluster) {
    let issuer = IapIssuer::start().await;
    let _pods = fleet(cluster, 2).await;
    cluster.allocate_legacy("gs-1", &email("alice"), a_while_ago(60)).await;
    cluster.allocate_directly("gs-2", &email("alice")).await;
    let router = agones(&issuer, cluster).await;
    assert_eq!(pod_of(&router, &issuer.user("alice")).await, "pod-2");
    let released = eventually(Duration::from_secs(8), || async { cluster.released("gs-1").await }).await;
    assert!(released, "the legacy duplicate was kept");
    assert_eq!(cluster.held_by(&label("alice")).await, vec!["gs-2"]);
}

/// The API server validates label values (63 characters, the alphabet):
/// what the router derives from any email must pass.
async fn long_and_odd_emails_get_labels_the_api_server_accepts(cluster: &dyn Cluster) {
    let issuer = IapIssuer::start().await;
    let _pods = fleet(cluster, 1).await;
    let router = agones(&issuer, cluster).await;
    let odd_email = format!("{}+o'neil@example.com", "x".repeat(70));
    let odd = issuer.token("accounts.google.com:42", &odd_email).sign();
    assert_eq!(pod_of(&router, &odd).await, "pod-1");
    assert_eq!(cluster.held_by(&user_label_value(&odd_email)).await, vec!["gs-1"]);
}

async fn the_activity_annotation_is_written_by_merge_patch(cluster: &dyn Cluster) {
    let issuer = IapIssuer::start().await;
    let _pods = fleet(cluster, 1).await;
    let router = router(&issuer, cluster, "agones", "idle_timeout = \"30s\"").await;
    let alice = issuer.user("alice");
    assert_eq!(pod_of(&router, &alice).await, "pod-1");
    let written = eventually(Duration::from_secs(5), || async {
        let _ = pod_of(&router, &alice).await;
        annotation(cluster, "gs-1", "session-router.dev/last-activity")
            .await
            .is_string()
    })
    .await;
    assert!(written, "no last-activity annotation on the GameServer");
}

async fn the_start_of_the_hold_is_recorded_on_the_gameserver(cluster: &dyn Cluster) {
    let issuer = IapIssuer::start().await;
    let _pods = fleet(cluster, 1).await;
    let router = agones(&issuer, cluster).await;
    assert_eq!(pod_of(&router, &issuer.user("alice")).await, "pod-1");
    let recorded = eventually(Duration::from_secs(5), || async {
        annotation(cluster, "gs-1", "session-router.dev/allocated-at")
            .await
            .is_string()
    })
    .await;
    assert!(recorded, "the start of the hold is not on the GameServer");
}

// === the waiting line on Leases ===

async fn a_waiter_holds_one_lease_with_microsecond_times(cluster: &dyn Cluster) {
    let issuer = IapIssuer::start().await;
    let _pods = fleet(cluster, 1).await;
    let router = agones(&issuer, cluster).await;
    assert_eq!(pod_of(&router, &issuer.user("alice")).await, "pod-1");
    assert_eq!(position(&router, &issuer.user("bob")).await, (503, Some(1)));
    assert_eq!(
        position(&router, &issuer.user("bob")).await,
        (503, Some(1)),
        "asking again keeps one's place"
    );
    assert_eq!(cluster.line().await.len(), 1, "one Lease per waiter");
}

async fn two_replicas_share_one_line_through_leases(cluster: &dyn Cluster) {
    let issuer = IapIssuer::start().await;
    let _pods = fleet(cluster, 1).await;
    let a = agones(&issuer, cluster).await;
    let b = agones(&issuer, cluster).await;
    let [alice, bob, carol] = ["alice", "bob", "carol"].map(|u| issuer.user(u));
    assert_eq!(pod_of(&a, &alice).await, "pod-1");
    assert_eq!(position(&a, &bob).await, (503, Some(1)));
    assert_eq!(position(&b, &carol).await, (503, Some(2)));
    assert_eq!(
        position(&b, &bob).await,
        (503, Some(1)),
        "Bob's place holds on the other replica"
    );
    assert_eq!(cluster.line().await.len(), 2);
}

async fn the_head_of_the_line_gets_the_next_ready_server(cluster: &dyn Cluster) {
    let issuer = IapIssuer::start().await;
    let pods = pods(2).await;
    cluster.add_ready("gs-1", pods[0].addr).await;
    let a = agones(&issuer, cluster).await;
    let b = agones(&issuer, cluster).await;
    let [alice, bob, carol] = ["alice", "bob", "carol"].map(|u| issuer.user(u));
    assert_eq!(pod_of(&a, &alice).await, "pod-1");
    assert_eq!(position(&a, &bob).await, (503, Some(1)));
    assert_eq!(position(&b, &carol).await, (503, Some(2)));
    cluster.add_ready("gs-2", pods[1].addr).await;
    let seen = eventually(Duration::from_secs(10), || async {
        a.capacity().ready == 1 && b.capacity().ready == 1
    })
    .await;
    assert!(seen, "the replicas never saw the new server");
    assert_eq!(
        position(&b, &carol).await,
        (503, Some(2)),
        "Carol asks first, but Bob is ahead"
    );
    assert_eq!(pod_of(&b, &bob).await, "pod-2");
    assert_eq!(position(&a, &carol).await, (503, Some(1)), "Bob left the line");
}

/// A router with two profiles on the cluster: `slow` (the Fleet's `-cpu`
/// sibling, the default) and `fast` (its `-l4` sibling first, then the
/// Fleet itself).
async fn two_profiles(issuer: &IapIssuer, cluster: &dyn Cluster) -> TestRouter {
    let fleet = cluster.fleet();
    let lines = cluster.backend_lines();
    let backend = |fleets: String| {
        format!(
            "[profiles.backend]\nkind = \"agones\"\nconnect_timeout = \"1s\"\n[profiles.backend.agones]\n{}\
             allocation_retry_window = \"500ms\"\nactivity_sync_interval = \"200ms\"\napi_timeout = \"3s\"\n",
            lines.replace(&format!("fleet = \"{fleet}\""), &format!("fleets = [{fleets}]"))
        )
    };
    let text = format!(
        "{head}\n[session]\nretry_after = \"2s\"\n[[profiles]]\nname = \"slow\"\n{slow}\n[[profiles]]\nname = \"fast\"\n{fast}",
        head = iap_head(issuer, "", ""),
        slow = backend(format!("\"{fleet}-cpu\"")),
        fast = backend(format!("\"{fleet}-l4\", \"{fleet}\"")),
    );
    TestRouter::start(&text).await
}

/// An API client's request naming `profile`: status and place in line.
async fn position_in(router: &TestRouter, token: &str, profile: &str) -> (u16, Option<u64>, Option<String>) {
    let response = client()
        .get(router.url("/whoami"))
        .header(ASSERTION, token)
        .header("x-session-router-profile", profile)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    (
        status,
        body["position"].as_u64(),
        body["pod"].as_str().map(String::from),
    )
}

async fn two_profiles_in_one_namespace_keep_their_fleets_lines_and_labels_apart(cluster: &dyn Cluster) {
    let issuer = IapIssuer::start().await;
    let pods = pods(3).await;
    let fleet = cluster.fleet();
    cluster.add_ready("gs-1", pods[0].addr).await;
    cluster
        .add_ready_in(&format!("{fleet}-cpu"), "gs-2", pods[1].addr)
        .await;
    let a = two_profiles(&issuer, cluster).await;
    let [ann, bob, cy, dee] = ["ann", "bob", "cy", "dee"].map(|u| issuer.user(u));

    // No L4 server: fast's fallback Fleet serves, in one allocation.
    let before = cluster.allocations().await;
    assert_eq!(position_in(&a, &ann, "fast").await, (200, None, Some("pod-1".into())));
    assert_eq!(
        cluster.allocations().await,
        before + 1,
        "one allocation call for two Fleets"
    );
    let gs = cluster.server("gs-1").await.unwrap();
    assert_eq!(gs["metadata"]["labels"]["session-router.dev/profile"], "fast");
    assert_eq!(position_in(&a, &bob, "slow").await, (200, None, Some("pod-2".into())));

    // Each profile's line is its own (Leases named after its first Fleet).
    assert_eq!(position_in(&a, &cy, "slow").await.0, 503);
    assert_eq!(position_in(&a, &dee, "fast").await, (503, Some(1), None));
    cluster.add_ready_in(&format!("{fleet}-l4"), "gs-3", pods[2].addr).await;
    let seen = eventually(Duration::from_secs(10), || async {
        let fast = a.state.registry.profiles().named("fast").unwrap();
        fast.allocator.capacity().ready == 1
    })
    .await;
    assert!(seen, "the fast profile never saw its L4 server");
    assert_eq!(
        position_in(&a, &dee, "fast").await,
        (200, None, Some("pod-3".into())),
        "fast's head gets fast's server"
    );
    assert_eq!(position_in(&a, &cy, "slow").await.0, 503, "slow's line still waits");

    // Another replica re-finds ann's server and its profile, though its
    // default profile is slow.
    let b = two_profiles(&issuer, cluster).await;
    assert_eq!(pod_of(&b, &ann).await, "pod-1");
    assert_eq!(
        b.state.registry.get("accounts.google.com:ann").unwrap().profile.name(),
        "fast"
    );
}

async fn a_known_user_with_a_cookie_makes_no_api_call(cluster: &dyn Cluster) {
    let issuer = IapIssuer::start().await;
    let _pods = fleet(cluster, 1).await;
    let a = agones(&issuer, cluster).await;
    let alice = issuer.user("alice");
    let first = whoami(&a, &alice, None).await;
    let cookie = set_cookie(&first, "session_router").unwrap();
    assert_eq!(position(&a, &issuer.user("bob")).await, (503, Some(1)));
    let before = cluster.allocations().await;
    let b = agones(&issuer, cluster).await;
    let again = whoami(&b, &alice, Some(&cookie)).await;
    assert_eq!(again.status(), 200);
    assert_eq!(cluster.allocations().await, before, "a pinned user allocated again");
}

/// A replica starting while GameServers are in every state of their life,
/// a terminating one among them, lists them all and becomes ready.
async fn a_replica_becomes_ready_with_the_fleet_in_every_state(cluster: &dyn Cluster) {
    let issuer = IapIssuer::start().await;
    let _pods = fleet(cluster, 3).await;
    cluster.allocate_directly("gs-2", &email("bob")).await;
    cluster.kill_pod("gs-3").await;
    let router = agones(&issuer, cluster).await;
    assert_eq!(pod_of(&router, &issuer.user("alice")).await, "pod-1");
    assert_eq!(pod_of(&router, &issuer.user("bob")).await, "pod-2");
}

/// A GPU node pool scaling up leaves GameServers in Starting, with `null`
/// ports and addresses, for minutes: the replicas must serve meanwhile.
async fn a_server_stuck_before_scheduled_keeps_no_replica_from_serving(cluster: &dyn Cluster) {
    let issuer = IapIssuer::start().await;
    let pods = pods(2).await;
    cluster.add_ready("gs-1", pods[0].addr).await;
    cluster.add_unscheduled("gs-2", pods[1].addr).await;
    let router = agones(&issuer, cluster).await;
    assert_eq!(pod_of(&router, &issuer.user("alice")).await, "pod-1");
    assert_eq!(position(&router, &issuer.user("bob")).await, (503, Some(1)));
}

// === the harness itself, against the captures ===

/// The harness plays Agones as the captures show it, or the real target
/// proves nothing: `null` ports and addresses before Scheduled, the
/// finalizer, and a DELETE that leaves the object terminating, state kept,
/// until the finalizer goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_gameservers_are_shaped_and_deleted_as_the_captures_show() {
    let _side_by_side = GATE.read().await;
    let Some(cluster) = real_cluster().await else { return };
    let player = &cluster.0;
    let pods = pods(1).await;
    player.add_until("gs-1", pods[0].addr, "Starting").await;
    let starting = player.server("gs-1").await.unwrap();
    let captured = agones_player::capture("gameserver-state-Starting.json");
    assert_eq!(
        starting["status"], captured["status"],
        "a Starting server's status as captured"
    );
    assert!(starting["status"]["ports"].is_null() && starting["status"]["addresses"].is_null());
    assert_eq!(
        starting["metadata"]["finalizers"],
        serde_json::json!(["agones.dev/controller"])
    );

    player.add_ready("gs-2", pods[0].addr).await;
    player.delete("gs-2").await;
    let terminating = player.server("gs-2").await.expect("a deleted GameServer lingers");
    assert!(terminating["metadata"]["deletionTimestamp"].is_string());
    assert_eq!(
        terminating["status"]["state"], "Ready",
        "the state is kept while terminating"
    );
    let gone = eventually(Duration::from_secs(5), || async {
        player.server("gs-2").await.is_none()
    })
    .await;
    assert!(gone, "the finalizer was never removed");
}

/// The allocator service is served over mutual TLS as Agones serves it: a
/// client without the certificate is turned away at the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_played_allocator_service_demands_a_client_certificate() {
    let _side_by_side = GATE.read().await;
    let Some(_cluster) = real_cluster().await else { return };
    let pki = std::env::var("SESSION_ROUTER_E2E_PKI").unwrap();
    let url = format!(
        "https://{}/gameserverallocation",
        agones_player::allocation_service().allocator
    );
    let ca = reqwest::Certificate::from_pem(&std::fs::read(format!("{pki}/allocator-ca.crt")).unwrap()).unwrap();
    let body = r#"{"namespace":"default","gameServerSelectors":[]}"#;
    let anonymous = reqwest::Client::builder()
        .add_root_certificate(ca.clone())
        .build()
        .unwrap();
    assert!(
        anonymous.post(&url).body(body).send().await.is_err(),
        "served without a client certificate"
    );
    let mut pem = std::fs::read(format!("{pki}/allocator-client.crt")).unwrap();
    pem.extend(std::fs::read(format!("{pki}/allocator-client.key")).unwrap());
    let router = reqwest::Client::builder()
        .add_root_certificate(ca)
        .identity(reqwest::Identity::from_pem(&pem).unwrap())
        .build()
        .unwrap();
    let answer = router.post(&url).body(body).send().await.unwrap();
    assert_eq!(
        answer.status(),
        429,
        "nothing to allocate: gRPC ResourceExhausted as 429"
    );
}
