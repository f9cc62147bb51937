//! What a replica does when its view of the fleet is behind, broken or cut
//! off, and what a real cluster sends that the view must survive: GameServers
//! stuck before Scheduled (`null` lists), objects it cannot understand, and
//! deleted GameServers that linger behind their finalizer. Against the fake
//! API server shaped like the real cluster's captures; API calls are counted
//! there, not timed.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};
use session_router::allocator::agones::label::user_label_value;
use support::{client, eventually, pods, set_cookie, FakeAgones, IapIssuer, TestRouter};

const ASSERTION: &str = "x-goog-iap-jwt-assertion";

fn label(name: &str) -> String {
    user_label_value(&format!("{name}@example.com"))
}

async fn get(router: &TestRouter, path: &str, token: &str, cookie: Option<&str>) -> reqwest::Response {
    let mut request = client().get(router.url(path)).header(ASSERTION, token);
    if let Some(cookie) = cookie {
        request = request.header("cookie", cookie);
    }
    request.send().await.unwrap()
}

/// The pod that answered, or the router's refusal as `status <code>`.
async fn answered_by(router: &TestRouter, token: &str, cookie: Option<&str>) -> String {
    let response = get(router, "/whoami", token, cookie).await;
    if response.status() != 200 {
        return format!("status {}", response.status().as_u16());
    }
    let seen: Value = response.json().await.unwrap();
    seen["pod"].as_str().unwrap().to_string()
}

async fn readyz(addr: SocketAddr) -> u16 {
    client()
        .get(format!("http://{addr}/readyz"))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn metrics_text(router: &TestRouter) -> String {
    router.state.metrics.render()
}

/// Calls a request could have caused (not the watch, its lists, or the
/// reaper's activity writes).
fn allocations(calls: &[String]) -> usize {
    calls.iter().filter(|c| c.contains("gameserverallocations")).count()
}

#[tokio::test]
async fn a_user_never_reaches_a_pod_address_a_new_gameserver_took_over_while_the_watch_is_broken() {
    let issuer = IapIssuer::start().await;
    let pods = pods(2).await;
    let fake = FakeAgones::start().await;
    fake.add_ready("gs-1", pods[0].addr);
    fake.add_ready("gs-2", pods[1].addr);
    let served = TestRouter::agones(&issuer, &fake, "agones", "", "").await;
    let other = TestRouter::agones(&issuer, &fake, "agones", "", "").await;
    let alice = issuer.user("alice");
    let first = get(&served, "/whoami", &alice, None).await;
    let cookie = set_cookie(&first, "session_router").unwrap();
    assert_eq!(first.json::<Value>().await.unwrap()["pod"], "pod-1");

    // Both replicas' watches break; meanwhile alice's server is released
    // (through another replica) and a new GameServer gets its pod address,
    // allocated to bob.
    fake.break_watches(true);
    tokio::time::sleep(Duration::from_millis(300)).await;
    fake.set_linger(Duration::from_millis(50));
    fake.remove("gs-1");
    let gone = eventually(Duration::from_secs(2), || async { fake.server("gs-1").is_none() }).await;
    assert!(gone);
    fake.add_ready("gs-3", pods[0].addr);
    fake.allocate_directly("gs-3", "bob@example.com");

    for (router, which) in [(&served, "the replica that served her"), (&other, "another replica")] {
        let reached = answered_by(router, &issuer.user("alice"), Some(&cookie)).await;
        assert_ne!(reached, "pod-1", "{which} forwarded alice to bob's pod");
    }
    assert_eq!(fake.held_by(&label("bob")), vec!["gs-3"], "bob keeps his server");
}

#[tokio::test]
async fn with_the_api_server_stopped_a_known_user_is_served_and_readyz_says_the_replica_is_cut_off() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let fake = FakeAgones::start().await;
    fake.add_ready("gs-1", pods[0].addr);
    let router = TestRouter::agones(&issuer, &fake, "agones", "", "").await;
    let first = get(&router, "/whoami", &issuer.user("alice"), None).await;
    let cookie = set_cookie(&first, "session_router").unwrap();

    fake.set_down(true);
    let unready = eventually(Duration::from_secs(10), || async { readyz(router.addr).await == 503 }).await;
    assert!(unready, "/readyz stayed 200 with the API server unreachable");
    fake.clear_calls();
    for _ in 0..3 {
        let reached = answered_by(&router, &issuer.user("alice"), Some(&cookie)).await;
        assert_eq!(reached, "pod-1", "a known user during the outage");
    }
    let calls: Vec<String> = fake
        .calls()
        .into_iter()
        .filter(|c| !c.contains("gameservers?"))
        .collect();
    assert!(
        calls.iter().all(|c| c.starts_with("PATCH")),
        "a known user's requests called the API: {calls:?}"
    );

    fake.set_down(false);
    let ready = eventually(Duration::from_secs(10), || async { readyz(router.addr).await == 200 }).await;
    assert!(ready, "not ready again after the API came back");
}

#[tokio::test]
async fn a_replica_started_while_gameservers_are_stuck_starting_or_not_understood_is_ready_at_once() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let fake = FakeAgones::start().await;
    // Pods Pending for want of a GPU node: ports and addresses are null.
    fake.add_starting("gs-stuck-1", 7001);
    fake.add_starting("gs-stuck-2", 7002);
    fake.add_ready("gs-1", pods[0].addr);
    fake.add_raw(
        "gs-odd",
        json!({
            "apiVersion": "agones.dev/v1", "kind": "GameServer",
            "metadata": {"name": "gs-odd", "namespace": "default", "labels": {"agones.dev/fleet": support::fake_agones::FLEET}},
            "status": {"state": "Ready", "ports": "seven"},
        }),
    );
    // TestRouter::agones waits at most 2 s for /readyz.
    let router = TestRouter::agones(&issuer, &fake, "agones", "", "").await;
    assert_eq!(answered_by(&router, &issuer.user("alice"), None).await, "pod-1");
    // A GameServer that starts later goes by on the watch without a hitch.
    fake.add_starting("gs-stuck-3", 7003);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(readyz(router.addr).await, 200);
    let metrics = metrics_text(&router).await;
    assert!(
        metrics.contains(r#"session_router_kube_objects_skipped_total{kind="GameServer"} 1"#),
        "{metrics}"
    );
    let capacity = router.capacity();
    assert_eq!((capacity.ready, capacity.allocated, capacity.total), (0, 1, 4));
}

#[tokio::test]
async fn every_api_request_names_the_router_as_its_user_agent() {
    let issuer = IapIssuer::start().await;
    let pods = pods(2).await;
    let fake = FakeAgones::start().await;
    fake.add_ready("gs-1", pods[0].addr);
    fake.add_ready("gs-2", pods[1].addr);
    let kubernetes = TestRouter::agones(&issuer, &fake, "agones", "", "").await;
    let service = TestRouter::agones(&issuer, &fake, "agones-allocator", "", "").await;
    assert_eq!(answered_by(&kubernetes, &issuer.user("alice"), None).await, "pod-1");
    assert_eq!(answered_by(&service, &issuer.user("bob"), None).await, "pod-2");
    let calls = fake.calls();
    assert!(calls.iter().any(|c| c.starts_with("POST /gameserverallocation")));
    let expected = concat!("session-router/", env!("CARGO_PKG_VERSION"));
    for (call, agent) in calls.iter().zip(fake.user_agents()) {
        assert_eq!(agent, expected, "{call}");
    }
}

#[tokio::test]
async fn a_released_server_that_lingers_behind_its_finalizer_is_nobodys() {
    let issuer = IapIssuer::start().await;
    let pods = pods(2).await;
    let fake = FakeAgones::start().await;
    fake.set_linger(Duration::from_secs(30));
    fake.add_ready("gs-1", pods[0].addr);
    fake.add_ready("gs-2", pods[1].addr);
    // Reaper passes every 300 ms; nobody is idle for 3 s in this test.
    let quick = r#"idle_timeout = "3s""#;
    let router = TestRouter::agones(&issuer, &fake, "agones", quick, "").await;
    let other = TestRouter::agones(&issuer, &fake, "agones", quick, "").await;
    let first = get(&router, "/whoami", &issuer.user("alice"), None).await;
    let cookie = set_cookie(&first, "session_router").unwrap();
    let released = client()
        .post(router.url("/_router/release"))
        .header(ASSERTION, issuer.user("alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(released.json::<Value>().await.unwrap()["released"], true);
    assert!(fake.is_terminating("gs-1"), "the finalizer keeps it");

    // Coming back, with the old cookie and without, through either replica:
    // never to the terminating server. The replica that released it says so
    // (the released page, nothing allocated); a request that starts a
    // session gets the fresh server, which the old cookie then finds too.
    assert_eq!(
        answered_by(&router, &issuer.user("alice"), Some(&cookie)).await,
        "status 409"
    );
    assert_eq!(answered_by(&other, &issuer.user("alice"), None).await, "pod-2");
    assert_eq!(answered_by(&other, &issuer.user("alice"), Some(&cookie)).await, "pod-2");
    // Several reaper passes later: the fresh server is not taken for a
    // duplicate, the terminating one is not deleted or released again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(fake.held_by(&label("alice")), vec!["gs-2"]);
    let deletes = fake.calls().iter().filter(|c| c.starts_with("DELETE")).count();
    assert_eq!(deletes, 1, "{:?}", fake.calls());
    for replica in [&router, &other] {
        let capacity = replica.capacity();
        assert_eq!(
            (capacity.allocated, capacity.total),
            (1, 1),
            "the terminating one is no capacity"
        );
        let sessions = replica
            .state
            .registry
            .profiles()
            .default_profile()
            .allocator
            .deployment_sessions()
            .unwrap();
        let releasing: Vec<(&str, bool)> = sessions.iter().map(|s| (s.backend.as_str(), s.releasing)).collect();
        assert_eq!(releasing, vec![("gs-1", true), ("gs-2", false)]);
    }
    let metrics = metrics_text(&router).await + &metrics_text(&other).await;
    let released_lines = metrics
        .lines()
        .filter(|l| l.starts_with("session_router_releases_total{") && !l.ends_with(" 0"))
        .count();
    assert_eq!(released_lines, 1, "one release, counted once:\n{metrics}");
}

#[tokio::test]
async fn a_waiting_ask_costs_at_most_three_calls_and_never_allocates() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let fake = FakeAgones::start().await;
    fake.add_ready("gs-1", pods[0].addr);
    let router = TestRouter::agones(&issuer, &fake, "agones", "", "").await;
    assert_eq!(answered_by(&router, &issuer.user("alice"), None).await, "pod-1");
    tokio::time::sleep(Duration::from_millis(200)).await;

    // A fleet with no Ready server: nobody allocates, first ask or later.
    for name in ["bob", "carol", "bob", "carol"] {
        fake.clear_calls();
        let answer = answered_by(&router, &issuer.user(name), None).await;
        assert_eq!(answer, "status 503");
        let calls: Vec<String> = fake.calls().into_iter().filter(|c| !c.contains("watch=")).collect();
        assert_eq!(allocations(&calls), 0, "{name}: {calls:?}");
        assert!(calls.len() <= 3, "{name}'s ask cost {} calls: {calls:?}", calls.len());
    }
    // A Ready server appears; bob (ahead) is served, carol keeps waiting
    // without allocating.
    let spare = support::DemoPod::start("pod-2").await.unwrap();
    fake.add_ready("gs-2", spare.addr);
    fake.clear_calls();
    assert_eq!(answered_by(&router, &issuer.user("carol"), None).await, "status 503");
    assert_eq!(allocations(&fake.calls()), 0, "carol, second in line, tried");
    assert_eq!(answered_by(&router, &issuer.user("bob"), None).await, "pod-2");
}

#[tokio::test]
async fn an_unallocated_answer_is_not_retried_but_contention_is() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let fake = FakeAgones::start().await;
    fake.add_ready("gs-1", pods[0].addr);
    let router = TestRouter::agones(&issuer, &fake, "agones", "", "").await;
    fake.unallocate(1);
    fake.clear_calls();
    assert_eq!(answered_by(&router, &issuer.user("alice"), None).await, "status 503");
    assert_eq!(allocations(&fake.calls()), 1, "{:?}", fake.calls());
    fake.contend(1);
    fake.clear_calls();
    assert_eq!(answered_by(&router, &issuer.user("alice"), None).await, "pod-1");
    assert_eq!(allocations(&fake.calls()), 2, "contention retried once");
}

#[tokio::test]
async fn the_line_is_fair_across_replicas_whose_views_lag() {
    let issuer = IapIssuer::start().await;
    let pods = pods(3).await;
    let fake = FakeAgones::start().await;
    fake.add_ready("gs-1", pods[0].addr);
    fake.add_ready("gs-2", pods[1].addr);
    let first = TestRouter::agones(&issuer, &fake, "agones", "", "").await;
    let second = TestRouter::agones(&issuer, &fake, "agones", "", "").await;
    // Both views stop here: they keep showing two Ready servers.
    fake.pause_watch();
    assert_eq!(answered_by(&first, &issuer.user("alice"), None).await, "pod-1");
    assert_eq!(answered_by(&first, &issuer.user("dave"), None).await, "pod-2");
    assert_eq!(answered_by(&first, &issuer.user("bob"), None).await, "status 503");
    assert_eq!(answered_by(&second, &issuer.user("carol"), None).await, "status 503");
    // One server comes free: the head of the line, bob, gets it even when
    // carol asks first, through the replica whose view lags most.
    fake.remove("gs-2");
    fake.add_ready("gs-3", pods[2].addr);
    assert_eq!(answered_by(&second, &issuer.user("carol"), None).await, "status 503");
    assert_eq!(answered_by(&first, &issuer.user("bob"), None).await, "pod-3");
    fake.resume_watch();
}

#[tokio::test]
async fn a_user_holding_a_server_through_another_replica_is_served_it_while_others_wait() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let fake = FakeAgones::start().await;
    fake.add_ready("gs-1", pods[0].addr);
    let first = TestRouter::agones(&issuer, &fake, "agones", "", "").await;
    let second = TestRouter::agones(&issuer, &fake, "agones", "", "").await;
    assert_eq!(answered_by(&first, &issuer.user("alice"), None).await, "pod-1");
    assert_eq!(answered_by(&first, &issuer.user("bob"), None).await, "status 503");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(answered_by(&second, &issuer.user("alice"), None).await, "pod-1");
    assert_eq!(fake.line().len(), 1, "alice took no place in line: {:?}", fake.line());
}

#[tokio::test]
async fn release_through_another_replica_with_only_the_cookie_releases_the_users_server() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let fake = FakeAgones::start().await;
    fake.add_ready("gs-1", pods[0].addr);
    let first = TestRouter::agones(&issuer, &fake, "agones", "", "").await;
    let second = TestRouter::agones(&issuer, &fake, "agones", "", "").await;
    let served = get(&first, "/whoami", &issuer.user("alice"), None).await;
    let cookie = set_cookie(&served, "session_router").unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let released = client()
        .post(second.url("/_router/release"))
        .header(ASSERTION, issuer.user("alice"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(released.json::<Value>().await.unwrap()["released"], true);
    assert!(fake.deleted("gs-1"));
    assert!(fake.held_by(&label("alice")).is_empty());
}

#[tokio::test]
async fn the_first_request_with_a_ready_server_waits_for_no_call_its_answer_does_not_need() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let fake = FakeAgones::start().await;
    fake.add_ready("gs-1", pods[0].addr);
    let router = TestRouter::agones(&issuer, &fake, "agones", "", "").await;
    // The duplicate check (the user's servers by label) and the
    // allocated-at patch hang: the answer must not wait for them.
    fake.stall("user%3D", Duration::from_secs(30));
    fake.clear_calls();
    let began = std::time::Instant::now();
    assert_eq!(answered_by(&router, &issuer.user("alice"), None).await, "pod-1");
    assert!(began.elapsed() < Duration::from_secs(3), "took {:?}", began.elapsed());
    let calls: Vec<String> = fake
        .calls()
        .into_iter()
        .filter(|c| !c.contains("watch=") && !c.contains("user%3D"))
        .collect();
    assert!(calls.len() <= 2, "{calls:?}");
}

#[tokio::test]
async fn an_idle_release_is_confirmed_against_activity_recorded_through_another_replica() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let fake = FakeAgones::start().await;
    fake.add_ready("gs-1", pods[0].addr);
    let idle = r#"idle_timeout = "2s""#;
    let first = TestRouter::agones(&issuer, &fake, "agones", idle, "").await;
    let second = TestRouter::agones(&issuer, &fake, "agones", idle, "").await;
    // Neither view follows from here on.
    fake.pause_watch();
    assert_eq!(answered_by(&first, &issuer.user("alice"), None).await, "pod-1");
    // From now on alice only uses the other replica, every 300 ms.
    for _ in 0..15 {
        assert_eq!(answered_by(&second, &issuer.user("alice"), None).await, "pod-1");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        !fake.deleted("gs-1"),
        "released as idle while in use: {:?}",
        fake.calls()
    );
    fake.resume_watch();
}

#[tokio::test]
async fn the_admin_page_through_any_replica_lists_the_whole_fleet_while_servers_are_stuck_starting() {
    let issuer = IapIssuer::start().await;
    let pods = pods(3).await;
    let fake = FakeAgones::start().await;
    for (i, pod) in pods.iter().enumerate() {
        fake.add_ready(&format!("gs-{}", i + 1), pod.addr);
    }
    fake.add_starting("gs-stuck", 7009);
    let admins = "\n[admin]\nemails = [\"boss@example.com\"]";
    let a = TestRouter::agones(&issuer, &fake, "agones", "", admins).await;
    let b = TestRouter::agones(&issuer, &fake, "agones", "", admins).await;
    assert_eq!(answered_by(&a, &issuer.user("alice"), None).await, "pod-1");
    assert_eq!(answered_by(&b, &issuer.user("bob"), None).await, "pod-2");
    assert_eq!(answered_by(&a, &issuer.user("carol"), None).await, "pod-3");
    tokio::time::sleep(Duration::from_millis(300)).await;
    for router in [&a, &b] {
        let view: Value = get(router, "/_router/admin", &issuer.user("boss"), None)
            .await
            .json()
            .await
            .unwrap();
        let sessions = view["sessions"].as_array().unwrap();
        assert_eq!(sessions.len(), 3, "{view}");
        assert_eq!(view["capacity"]["allocated"], 3, "{view}");
        assert_eq!(view["capacity"]["ready"], 0, "{view}");
        assert_eq!(view["capacity"]["total"], 4, "{view}");
    }
}

#[tokio::test]
async fn no_activity_is_written_onto_a_server_being_deleted() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let fake = FakeAgones::start().await;
    fake.set_linger(Duration::from_secs(30));
    fake.add_ready("gs-1", pods[0].addr);
    // Reaper passes every 300 ms, activity shared every 200 ms.
    let router = TestRouter::agones(&issuer, &fake, "agones", r#"idle_timeout = "3s""#, "").await;
    assert_eq!(answered_by(&router, &issuer.user("alice"), None).await, "pod-1");
    // Alice stays active on an open WebSocket, without another request.
    let mut request = router.ws_url("/ws").into_client_request().unwrap();
    let headers = request.headers_mut();
    headers.insert(ASSERTION, issuer.user("alice").parse().unwrap());
    headers.insert("origin", format!("http://{}", router.addr).parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let chatter = tokio::spawn(async move {
        while socket.send(Message::text("still here")).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The server is deleted elsewhere; once the view shows it terminating,
    // nothing more is written onto it.
    fake.remove("gs-1");
    tokio::time::sleep(Duration::from_millis(200)).await;
    fake.clear_calls();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    chatter.abort();
    let writes: Vec<String> = fake
        .calls()
        .into_iter()
        .filter(|c| c.starts_with("PATCH") && c.contains("gs-1"))
        .collect();
    assert!(
        writes.is_empty(),
        "activity written onto a terminating server: {writes:?}"
    );
}
