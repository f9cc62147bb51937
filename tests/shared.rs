//! The `shared` backend kind: several users per WebUI process, each pinned
//! to the least-loaded one and kept there, waiting in line when every
//! backend is full, moved when theirs disappears, unpinned (nothing
//! deleted) when idle. Backends are stand-in pods, listed in the config or
//! found as a Service's ready endpoints through a fake API server.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::fake_endpoints::{Condition, FakeEndpoints, NAMESPACE, SERVICE};
use support::gpu_box::GpuBox;
use support::{client, eventually, iap_head, pods, set_cookie, upstream_list, DemoPod, IapIssuer, TestRouter};

const ASSERTION: &str = "x-goog-iap-jwt-assertion";
const COOKIE: &str = "session_router";

/// An `iap` router whose `shared` backends are `pods`, `max` users each;
/// `session` adds lines to `[session]`.
async fn listed(issuer: &IapIssuer, pods: &[&DemoPod], max: usize, session: &str) -> TestRouter {
    TestRouter::start(&config(
        issuer,
        session,
        &format!("upstreams = [{}]\nmax_users_per_backend = {max}", upstream_list(pods)),
    ))
    .await
}

/// An `iap` router whose `shared` backends are the ready endpoints `api`
/// serves, `max` users each.
async fn watching(issuer: &IapIssuer, api: &FakeEndpoints, max: usize, session: &str) -> TestRouter {
    TestRouter::start(&config(
        issuer,
        session,
        &format!(
            "service = \"{SERVICE}\"\nnamespace = \"{NAMESPACE}\"\nport_name = \"http\"\nkube_api_url = \"{}\"\nmax_users_per_backend = {max}",
            api.url()
        ),
    ))
    .await
}

fn config(issuer: &IapIssuer, session: &str, shared: &str) -> String {
    format!(
        "{head}\n[admin]\nemails = [\"boss@example.com\"]\n[session]\nretry_after = \"2s\"\n{session}\n[backend]\nkind = \"shared\"\nconnect_timeout = \"1s\"\n[backend.shared]\n{shared}\n",
        head = iap_head(issuer, "metrics_listen = \"127.0.0.1:0\"", ""),
    )
}

/// `GET /whoami` as an API client (which may start a session), with
/// `cookie` if given: the status and the pod that answered.
async fn whoami(router: &TestRouter, token: &str, cookie: Option<&str>) -> (u16, Option<String>, Option<String>) {
    let mut request = client().get(router.url("/whoami")).header(ASSERTION, token);
    if let Some(cookie) = cookie {
        request = request.header("cookie", cookie);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let cookie = set_cookie(&response, COOKIE);
    let body: Value = response.json().await.unwrap_or(Value::Null);
    (status, body["pod"].as_str().map(String::from), cookie)
}

/// The pod `token`'s user reaches (panics unless answered 200).
async fn pod_of(router: &TestRouter, token: &str) -> String {
    let (status, pod, _) = whoami(router, token, None).await;
    assert_eq!(status, 200);
    pod.unwrap()
}

/// A browser navigation to `/whoami` carrying `cookie`: status and pod.
async fn navigate(router: &TestRouter, token: &str, cookie: &str) -> (u16, Option<String>) {
    let response = client()
        .get(router.url("/whoami"))
        .header(ASSERTION, token)
        .header("cookie", cookie)
        .header("sec-fetch-mode", "navigate")
        .header("sec-fetch-dest", "document")
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    (status, body["pod"].as_str().map(String::from))
}

/// Waiting-line position `token`'s user is told (`None`: served).
async fn position(router: &TestRouter, token: &str) -> (u16, Option<u64>) {
    let response = client()
        .get(router.url("/whoami"))
        .header(ASSERTION, token)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    (status, body["position"].as_u64())
}

/// The admin view's capacity: slots free (`ready`), taken, in all.
async fn capacity(router: &TestRouter, issuer: &IapIssuer) -> Value {
    let admin: Value = client()
        .get(router.url("/_router/admin"))
        .header(ASSERTION, issuer.token("boss", "boss@example.com").sign())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    admin["capacity"].clone()
}

#[tokio::test]
async fn three_users_on_two_backends_of_two_each_are_pinned_two_and_one() {
    let issuer = IapIssuer::start().await;
    let pods = pods(2).await;
    let router = listed(&issuer, &[&pods[0], &pods[1]], 2, "").await;
    let mut on = Vec::new();
    for user in ["alice", "bob", "carol"] {
        on.push(pod_of(&router, &issuer.user(user)).await);
    }
    assert_eq!(on, ["pod-1", "pod-2", "pod-1"], "least loaded first, ties in order");
    let capacity = capacity(&router, &issuer).await;
    assert_eq!(
        (
            capacity["allocated"].as_u64(),
            capacity["ready"].as_u64(),
            capacity["total"].as_u64()
        ),
        (Some(3), Some(1), Some(4))
    );
    let fourth = pod_of(&router, &issuer.user("dave")).await;
    assert_eq!(fourth, "pod-2", "the one free slot");
}

#[tokio::test]
async fn a_pinned_user_stays_on_their_backend_across_requests_and_router_replicas() {
    let issuer = IapIssuer::start().await;
    let pods = pods(2).await;
    let a = listed(&issuer, &[&pods[0], &pods[1]], 3, "").await;
    let b = listed(&issuer, &[&pods[0], &pods[1]], 3, "").await;
    // Dave takes pod-1 on replica A, so Alice is pinned to pod-2 there.
    assert_eq!(pod_of(&a, &issuer.user("dave")).await, "pod-1");
    let alice = issuer.user("alice");
    let (_, pod, cookie) = whoami(&a, &alice, None).await;
    assert_eq!(pod.as_deref(), Some("pod-2"));
    let cookie = cookie.expect("a pinning cookie");
    // Others arrive and make pod-2 the busier one; Alice stays.
    for user in ["erin", "frank"] {
        pod_of(&a, &issuer.user(user)).await;
    }
    for _ in 0..3 {
        assert_eq!(whoami(&a, &alice, Some(&cookie)).await.1.as_deref(), Some("pod-2"));
    }
    // Replica B has never seen her; least-loaded there would be pod-1.
    assert_eq!(whoami(&b, &alice, Some(&cookie)).await.1.as_deref(), Some("pod-2"));
    assert_eq!(
        pod_of(&b, &issuer.user("gina")).await,
        "pod-1",
        "B counts only its own users"
    );
}

#[tokio::test]
async fn when_every_backend_is_full_users_wait_in_line_and_a_freed_slot_goes_to_the_head() {
    let issuer = IapIssuer::start().await;
    let pods = pods(2).await;
    let router = listed(&issuer, &[&pods[0], &pods[1]], 1, "").await;
    let [alice, bob, carol, dave] = ["alice", "bob", "carol", "dave"].map(|u| issuer.user(u));
    pod_of(&router, &alice).await;
    pod_of(&router, &bob).await;
    assert_eq!(position(&router, &carol).await, (503, Some(1)));
    assert_eq!(position(&router, &dave).await, (503, Some(2)));
    let page = client()
        .get(router.url("/"))
        .header(ASSERTION, &dave)
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 503);
    assert_eq!(page.headers()["retry-after"], "2");
    assert!(page.text().await.unwrap().contains("You are number 2 in line"));

    let released = client()
        .post(router.url("/_router/release"))
        .header(ASSERTION, &alice)
        .send()
        .await
        .unwrap();
    assert_eq!(released.status(), 200);
    assert_eq!(position(&router, &dave).await, (503, Some(2)), "no overtaking");
    assert_eq!(pod_of(&router, &carol).await, "pod-1", "the head gets Alice's slot");
    assert_eq!(position(&router, &dave).await, (503, Some(1)));
}

#[tokio::test]
async fn users_of_a_backend_that_disappears_are_re_pinned_on_their_next_navigation() {
    let issuer = IapIssuer::start().await;
    let pods = pods(2).await;
    let api = FakeEndpoints::start().await;
    api.set(&pods[0], Condition::Ready);
    api.set(&pods[1], Condition::Ready);
    let router = watching(&issuer, &api, 2, "").await;
    let alice = issuer.user("alice");
    let (_, pod, cookie) = whoami(&router, &alice, None).await;
    assert_eq!(pod.as_deref(), Some("pod-1"));
    let cookie = cookie.unwrap();
    let bob = issuer.user("bob");
    assert_eq!(pod_of(&router, &bob).await, "pod-2");

    // pod-1 is scaled away: its slice is deleted (the pod still answers,
    // so only the endpoint view can move Alice).
    api.delete(&pods[0]);
    let moved = eventually(Duration::from_secs(5), || async {
        navigate(&router, &alice, &cookie).await == (200, Some("pod-2".to_string()))
    })
    .await;
    assert!(moved, "Alice was never re-pinned to pod-2");
    assert_eq!(pod_of(&router, &bob).await, "pod-2", "Bob never moved");
}

#[tokio::test]
async fn an_idle_user_is_unpinned_nothing_is_deleted_and_the_backend_keeps_serving_others() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let api = FakeEndpoints::start().await;
    api.set(&pods[0], Condition::Ready);
    let router = watching(&issuer, &api, 2, "idle_timeout = \"1s\"").await;
    let (alice, bob, carol) = (issuer.user("alice"), issuer.user("bob"), issuer.user("carol"));
    pod_of(&router, &alice).await;
    pod_of(&router, &bob).await;
    assert_eq!(position(&router, &carol).await, (503, Some(1)), "both slots taken");
    // Bob keeps working; Alice goes quiet and loses her slot to Carol.
    let carol_in = eventually(Duration::from_secs(6), || async {
        assert_eq!(pod_of(&router, &bob).await, "pod-1");
        position(&router, &carol).await.0 == 200
    })
    .await;
    assert!(carol_in, "Alice's idle slot was never freed");
    assert_eq!(capacity(&router, &issuer).await["allocated"], 2);
    let writes: Vec<String> = api.calls().into_iter().filter(|c| !c.starts_with("GET ")).collect();
    assert_eq!(writes, Vec::<String>::new(), "an idle release writes nothing");
}

#[tokio::test]
async fn the_endpoint_watch_follows_slices_appearing_becoming_not_ready_and_emptied() {
    let issuer = IapIssuer::start().await;
    let pods = pods(3).await;
    let api = FakeEndpoints::start().await;
    api.set(&pods[0], Condition::Ready);
    api.set(&pods[1], Condition::NotReady);
    let router = watching(&issuer, &api, 1, "").await;
    let total = || async { capacity(&router, &issuer).await["total"].as_u64() };
    assert_eq!(total().await, Some(1), "a not-ready endpoint is no backend");
    assert_eq!(pod_of(&router, &issuer.user("alice")).await, "pod-1");

    api.set(&pods[2], Condition::Ready);
    assert!(
        eventually(Duration::from_secs(5), || async { total().await == Some(2) }).await,
        "a new slice was never seen"
    );
    assert_eq!(pod_of(&router, &issuer.user("bob")).await, "pod-3");

    api.set(&pods[1], Condition::Ready);
    assert!(eventually(Duration::from_secs(5), || async { total().await == Some(3) }).await);
    api.set(&pods[1], Condition::Terminating);
    assert!(
        eventually(Duration::from_secs(5), || async { total().await == Some(2) }).await,
        "a terminating endpoint is no backend"
    );
    api.empty(&pods[2]);
    assert!(
        eventually(Duration::from_secs(5), || async { total().await == Some(1) }).await,
        "`endpoints: null` is none"
    );
    assert_eq!(
        capacity(&router, &issuer).await["allocated"],
        1,
        "Bob's backend went with its endpoint"
    );
    assert!(
        api.calls()
            .iter()
            .any(|c| c.contains("labelSelector=kubernetes.io%2Fservice-name%3Dsd15")),
        "{:?}",
        api.calls()
    );
}

#[tokio::test]
async fn the_admin_page_and_metrics_show_each_backends_users_and_release_frees_the_right_one() {
    let issuer = IapIssuer::start().await;
    let pods = pods(2).await;
    let router = listed(&issuer, &[&pods[0], &pods[1]], 3, "").await;
    for user in ["alice", "bob", "carol"] {
        pod_of(&router, &issuer.user(user)).await;
    }
    let boss = issuer.token("boss", "boss@example.com").sign();
    let admin: Value = client()
        .get(router.url("/_router/admin"))
        .header(ASSERTION, &boss)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let loads: Vec<(String, u64, u64)> = admin["shared_backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["backend"].as_str().unwrap().to_string(),
                b["users"].as_u64().unwrap(),
                b["max_users"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        loads,
        [("shared-00".to_string(), 2, 3), ("shared-01".to_string(), 1, 3)]
    );
    let html = support::text_of(
        client()
            .get(router.url("/_router/admin"))
            .header(ASSERTION, &boss)
            .header("accept", "text/html"),
    )
    .await;
    assert!(html.contains("<td>shared-00</td>") && html.contains("2 of 3"), "{html}");
    let metrics_addr = router.state.metrics_addr().expect("metrics listener");
    let metrics = support::text_of(client().get(format!("http://{metrics_addr}/metrics"))).await;
    assert!(
        metrics.contains("session_router_shared_backend_users{backend=\"shared-00\"} 2"),
        "{metrics}"
    );

    // Carol shares shared-00 with Alice: the page's Release names Carol.
    assert!(html.contains(r#"name="target" value="carol@example.com""#), "{html}");
    let released = client()
        .post(router.url("/_router/admin/release"))
        .header(ASSERTION, &boss)
        .header("origin", router.url(""))
        .form(&[("target", "carol@example.com")])
        .send()
        .await
        .unwrap();
    assert_eq!(released.status(), 200, "{}", released.text().await.unwrap());
    let status: Value = client()
        .get(router.url("/_router/status"))
        .header(ASSERTION, issuer.user("alice"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_ne!(status["session"], Value::Null, "Alice keeps her slot");
    assert_eq!(capacity(&router, &issuer).await["allocated"], 2);
}

#[tokio::test]
async fn a_listed_backend_that_refuses_connections_moves_its_users_while_another_has_room() {
    let issuer = IapIssuer::start().await;
    let (a, b) = (GpuBox::start("box-a").await, GpuBox::start("box-b").await);
    let router = TestRouter::start(&config(
        &issuer,
        "",
        &format!(
            "upstreams = [{}, {}]\nmax_users_per_backend = 2\nprobe_interval = \"1h\"",
            a.url(),
            b.url()
        ),
    ))
    .await;
    let answer = |user: &str| {
        let request = client().get(router.url("/")).header(ASSERTION, issuer.user(user));
        async move {
            let response = request.send().await.unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        }
    };
    assert_eq!(answer("alice").await, (200, "box-a".to_string()));
    assert_eq!(answer("bob").await, (200, "box-b".to_string()));
    assert_eq!(answer("carol").await, (200, "box-a".to_string()));

    a.stop().await;
    // As on `static`: the request that found the box dead gets the 502
    // page, and the next one lands on a backend with room.
    assert_eq!(answer("alice").await.0, 502);
    assert_eq!(
        answer("alice").await,
        (200, "box-b".to_string()),
        "moved: box-b had room"
    );
    for _ in 0..2 {
        let (status, _) = answer("carol").await;
        assert_eq!(status, 502, "box-b is full now: Carol keeps hers until it answers");
    }
    assert_eq!(answer("bob").await, (200, "box-b".to_string()));
    assert_eq!(answer("dave").await.0, 503, "no slot left that answers");
}
