//! Profiles: several GPU pools behind one front end, chosen by the user.
//! Static and shared pools of stand-in pods for the choosing, the access
//! rules, the per-profile lines and the one-backend-a-user rule; the fake
//! Agones API for ordered fleets, the profile label, the user's server and
//! profile a second replica re-finds, `multi_cluster` and the autoscaler
//! answering per fleet.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::{
    client, eventually, iap_head, pods, set_cookie, upstream_list, DemoPod, FakeAgones, IapIssuer, TestRouter,
};

const ASSERTION: &str = "x-goog-iap-jwt-assertion";
const COOKIE: &str = "session_router";
const PROFILE_HEADER: &str = "x-session-router-profile";

/// A router with [`three_pools`] on four stand-in pods, and the issuer of
/// its users' tokens.
struct Pools {
    issuer: IapIssuer,
    router: TestRouter,
    _pods: Vec<DemoPod>,
}

impl Pools {
    async fn start(shared_idle: &str) -> Pools {
        let issuer = IapIssuer::start().await;
        let pods = pods(4).await;
        let router = three_pools(&issuer, &pods.iter().collect::<Vec<_>>(), shared_idle).await;
        Pools {
            issuer,
            router,
            _pods: pods,
        }
    }
}

/// Three profiles on stand-in pods: `sd15` (the default, `a` and `b`),
/// `sdxl` (`c`, only for corp.example people) and `shared` (`d`, two users
/// at once, idle after `shared_idle`).
async fn three_pools(issuer: &IapIssuer, pods: &[&DemoPod], shared_idle: &str) -> TestRouter {
    let text = format!(
        r#"{head}
[admin]
emails = ["boss@example.com"]
[session]
retry_after = "2s"

[[profiles]]
name = "sd15"
title = "SD 1.5 on T4"
description = "Fast, 512 px."
default = true
[profiles.backend]
kind = "static"
connect_timeout = "1s"
[profiles.backend.static]
upstreams = [{sd15}]

[[profiles]]
name = "sdxl"
title = "SDXL on L4"
description = "1024 px, for the design team."
allowed_domains = ["corp.example"]
[profiles.backend]
kind = "static"
[profiles.backend.static]
upstreams = [{sdxl}]

[[profiles]]
name = "shared"
title = "Shared SD 1.5"
idle_timeout = "{shared_idle}"
[profiles.backend]
kind = "shared"
[profiles.backend.shared]
upstreams = [{shared}]
max_users_per_backend = 2
"#,
        head = iap_head(issuer, "metrics_listen = \"127.0.0.1:0\"", ""),
        sd15 = upstream_list(&pods[..2]),
        sdxl = upstream_list(&pods[2..3]),
        shared = upstream_list(&pods[3..4]),
    );
    TestRouter::start(&text).await
}

fn corp(issuer: &IapIssuer, name: &str) -> String {
    issuer
        .token(&format!("accounts.google.com:{name}"), &format!("{name}@corp.example"))
        .sign()
}

/// A browser navigation to `path` (with `cookie`): the response.
async fn navigate(router: &TestRouter, token: &str, path: &str, cookie: Option<&str>) -> reqwest::Response {
    let mut request = client()
        .get(router.url(path))
        .header(ASSERTION, token)
        .header("sec-fetch-mode", "navigate")
        .header("sec-fetch-dest", "document")
        .header("accept", "text/html");
    if let Some(cookie) = cookie {
        request = request.header("cookie", cookie);
    }
    request.send().await.unwrap()
}

/// `GET /whoami` as an API client naming `profile` (or none): the status
/// and the pod that answered.
async fn api_whoami(router: &TestRouter, token: &str, profile: Option<&str>) -> (u16, Option<String>) {
    let mut request = client().get(router.url("/whoami")).header(ASSERTION, token);
    if let Some(profile) = profile {
        request = request.header(PROFILE_HEADER, profile);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    (status, body["pod"].as_str().map(String::from))
}

/// A browser's same-origin POST of `form` to `path`.
async fn post_form(
    router: &TestRouter,
    token: &str,
    path: &str,
    form: &[(&str, &str)],
    cookie: Option<&str>,
) -> reqwest::Response {
    let mut request = client()
        .post(router.url(path))
        .header(ASSERTION, token)
        .header("origin", format!("http://{}", router.addr))
        .header("accept", "text/html")
        .form(form);
    if let Some(cookie) = cookie {
        request = request.header("cookie", cookie);
    }
    request.send().await.unwrap()
}

/// The JSON `token`'s user gets from `path`.
async fn json_of(router: &TestRouter, token: &str, path: &str) -> Value {
    client()
        .get(router.url(path))
        .header(ASSERTION, token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// A browser's Start of `profile`, going on to `next` (no cookie).
async fn start(router: &TestRouter, token: &str, profile: &str, next: &str) -> reqwest::Response {
    post_form(
        router,
        token,
        "/_router/start",
        &[("profile", profile), ("next", next)],
        None,
    )
    .await
}

/// The profiles the chooser's JSON lists for `token`'s user.
async fn listed(router: &TestRouter, token: &str) -> Value {
    json_of(router, token, "/_router/profiles").await
}

fn names(listing: &Value) -> Vec<String> {
    listing["profiles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect()
}

/// The Fleet size the router's autoscaler webhook answers for an empty
/// `fleet`.
async fn desired(router: &TestRouter, fleet: &str) -> i64 {
    let addr = router.state.autoscaler_addr().unwrap();
    let review = json!({"request": {"uid": "u-1", "name": fleet, "namespace": "default",
        "status": {"replicas": 0, "readyReplicas": 0, "reservedReplicas": 0, "allocatedReplicas": 0}}});
    let answer: Value = client()
        .post(format!("http://{addr}/scale"))
        .json(&review)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    answer["response"]["replicas"].as_i64().unwrap()
}

fn location(response: &reqwest::Response) -> String {
    response.headers()["location"].to_str().unwrap().to_string()
}

async fn metrics(router: &TestRouter) -> String {
    let addr = router.state.metrics_addr().unwrap();
    client()
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_browser_of_a_user_with_several_profiles_is_sent_to_a_chooser_that_lists_only_theirs() {
    let Pools { issuer, router, _pods } = Pools::start("15m").await;

    let first = navigate(&router, &issuer.user("ann"), "/", None).await;
    assert_eq!(first.status(), 303, "no GPU is taken before the user chooses");
    assert_eq!(location(&first), "/_router/profiles");
    let deep = navigate(&router, &issuer.user("ann"), "/?tab=img2img", None).await;
    assert_eq!(location(&deep), "/_router/profiles?next=/%3Ftab%3Dimg2img");
    assert_eq!(router.state.registry.len(), 0);

    let page = navigate(&router, &issuer.user("ann"), "/_router/profiles", None).await;
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(
        html.contains(r#"data-profile="sd15""#) && html.contains(r#"data-profile="shared""#),
        "{html}"
    );
    assert!(
        !html.contains("sdxl") && !html.contains("SDXL"),
        "a profile ann may not use is never shown: {html}"
    );
    assert!(html.contains("SD 1.5 on T4") && html.contains("Fast, 512 px."));
    assert!(html.contains(r#"action="/_router/start""#) && html.contains(r#"name="profile" value="shared""#));

    let json = listed(&router, &issuer.user("ann")).await;
    assert_eq!(names(&json), ["sd15", "shared"]);
    assert_eq!(json["profiles"][0]["free"], 2);
    assert_eq!(json["profiles"][0]["default"], true);
    assert_eq!(json["profiles"][1]["free"], 2, "two users' slots on the shared backend");
    assert_eq!(json["profiles"][1]["waiting"], 0);
    assert_eq!(json["current"], Value::Null);
    assert_eq!(
        names(&listed(&router, &corp(&issuer, "cy")).await),
        ["sd15", "sdxl", "shared"]
    );
}

#[tokio::test]
async fn start_allocates_from_the_chosen_profile_and_the_cookie_keeps_the_user_there() {
    let Pools { issuer, router, _pods } = Pools::start("15m").await;
    let ann = issuer.user("ann");

    let started = start(&router, &ann, "shared", "/whoami").await;
    assert_eq!(started.status(), 303);
    assert_eq!(location(&started), "/whoami");
    let cookie = set_cookie(&started, COOKIE).expect("the pin");
    let page = navigate(&router, &ann, "/whoami", Some(&cookie)).await;
    assert_eq!(page.status(), 200);
    let body: Value = page.json().await.unwrap();
    assert_eq!(body["pod"], "pod-4", "the shared profile's backend");

    let status = json_of(&router, &ann, "/_router/status").await;
    assert_eq!(status["session"]["profile"], "shared");
    assert_eq!(listed(&router, &ann).await["current"], "shared");
}

#[tokio::test]
async fn a_profile_the_user_may_not_use_or_that_does_not_exist_is_refused_with_403() {
    let Pools { issuer, router, _pods } = Pools::start("15m").await;
    let ann = issuer.user("ann");

    for profile in ["sdxl", "nope"] {
        let refused = start(&router, &ann, profile, "/").await;
        assert_eq!(refused.status(), 403, "start {profile}");
        let html = refused.text().await.unwrap();
        assert!(html.contains("not one you may use"), "{html}");
        let link = navigate(&router, &ann, &format!("/?profile={profile}"), None).await;
        assert_eq!(link.status(), 403, "a link to {profile}");
        assert_eq!(
            api_whoami(&router, &ann, Some(profile)).await.0,
            403,
            "the header naming {profile}"
        );
    }
    assert_eq!(router.state.registry.len(), 0, "nothing was allocated");
    let (status, pod) = api_whoami(&router, &corp(&issuer, "cy"), Some("sdxl")).await;
    assert_eq!((status, pod.as_deref()), (200, Some("pod-3")), "corp.example may");
}

#[tokio::test]
async fn api_clients_get_the_default_profile_or_the_one_their_header_names_and_a_link_preselects() {
    let Pools { issuer, router, _pods } = Pools::start("15m").await;

    let (status, pod) = api_whoami(&router, &issuer.user("ann"), None).await;
    assert_eq!(status, 200);
    assert!(
        matches!(pod.as_deref(), Some("pod-1" | "pod-2")),
        "the default profile: {pod:?}"
    );
    assert_eq!(
        api_whoami(&router, &issuer.user("bob"), Some("shared")).await,
        (200, Some("pod-4".to_string()))
    );
    let link = navigate(&router, &issuer.user("eve"), "/whoami?profile=shared", None).await;
    assert_eq!(link.status(), 200, "a link naming a profile starts it, no chooser");
    assert_eq!(link.json::<Value>().await.unwrap()["pod"], "pod-4");
}

#[tokio::test]
async fn a_user_holds_one_backend_across_all_profiles() {
    let Pools { issuer, router, _pods } = Pools::start("15m").await;
    let ann = issuer.user("ann");

    let (_, first) = api_whoami(&router, &ann, Some("sd15")).await;
    let (status, again) = api_whoami(&router, &ann, Some("shared")).await;
    assert_eq!(
        (status, &again),
        (200, &first),
        "asking another profile gives the backend held"
    );
    let started: Value = client()
        .post(router.url("/_router/start"))
        .header(ASSERTION, &ann)
        .header("origin", format!("http://{}", router.addr))
        .form(&[("profile", "shared")])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(started["profile"], "sd15");
    let shared = router.state.registry.profiles().named("shared").unwrap();
    assert_eq!(shared.allocator.capacity().allocated, 0, "no second backend");
    assert_eq!(router.state.registry.len(), 1);

    // Served through another replica (this one forgets her session), her
    // cookie still pins her backend: Start naming another profile gives
    // her that one, not a second.
    let started = post_form(&router, &ann, "/_router/start", &[("profile", "sd15")], None).await;
    let cookie = set_cookie(&started, COOKIE).unwrap();
    let session = router.state.registry.get("accounts.google.com:ann").unwrap();
    router.state.registry.forget(&session);
    let again = post_form(
        &router,
        &ann,
        "/_router/start",
        &[("profile", "shared"), ("next", "/")],
        Some(&cookie),
    )
    .await;
    assert_eq!(again.status(), 303);
    let held = router.state.registry.get("accounts.google.com:ann").unwrap();
    assert_eq!(held.profile.name(), "sd15");
    assert_eq!(held.lease, session.lease);
    assert_eq!(shared.allocator.capacity().allocated, 0, "still no second backend");
}

#[tokio::test]
async fn switch_releases_the_gpu_and_leads_to_the_chooser() {
    let Pools { issuer, router, _pods } = Pools::start("15m").await;
    let ann = issuer.user("ann");
    let started = start(&router, &ann, "sd15", "/").await;
    let cookie = set_cookie(&started, COOKIE).unwrap();

    let status = navigate(&router, &ann, "/_router/status", Some(&cookie))
        .await
        .text()
        .await
        .unwrap();
    assert!(
        status.contains(r#"data-profile="sd15""#) && status.contains("SD 1.5 on T4"),
        "{status}"
    );
    assert!(status.contains(r#"action="/_router/switch""#), "{status}");

    let switched = post_form(&router, &ann, "/_router/switch", &[], Some(&cookie)).await;
    assert_eq!(switched.status(), 303);
    assert_eq!(location(&switched), "/_router/profiles");
    let cleared = set_cookie(&switched, COOKIE).unwrap();
    assert_eq!(
        cleared,
        format!("{COOKIE}="),
        "the pin is cleared: the user chooses again"
    );
    let sd15 = router.state.registry.profiles().named("sd15").unwrap();
    assert_eq!(sd15.allocator.capacity().ready, 2, "the GPU went back");
    assert_eq!(router.state.registry.len(), 0);

    let again = navigate(&router, &ann, "/", None).await;
    assert_eq!(
        location(&again),
        "/_router/profiles",
        "next time: the chooser, not the released page"
    );
    let started = start(&router, &ann, "shared", "/").await;
    assert_eq!(started.status(), 303);
    assert_eq!(
        router
            .state
            .registry
            .get("accounts.google.com:ann")
            .unwrap()
            .profile
            .name(),
        "shared"
    );
}

#[tokio::test]
async fn each_profile_has_its_own_line_capacity_and_metrics() {
    let Pools { issuer, router, _pods } = Pools::start("15m").await;

    assert_eq!(api_whoami(&router, &corp(&issuer, "cy"), Some("sdxl")).await.0, 200);
    let waiting = client()
        .get(router.url("/whoami"))
        .header(ASSERTION, corp(&issuer, "dee"))
        .header(PROFILE_HEADER, "sdxl")
        .send()
        .await
        .unwrap();
    assert_eq!(waiting.status(), 503, "sdxl's one GPU is taken");
    let body: Value = waiting.json().await.unwrap();
    assert_eq!(
        (body["position"].clone(), body["waiting"].clone()),
        (json!(1), json!(1))
    );
    assert_eq!(body["profile"], "sdxl", "the waiting answer names the line");
    let page = navigate(&router, &corp(&issuer, "dee"), "/?profile=sdxl", None).await;
    assert_eq!(page.status(), 503);
    let html = page.text().await.unwrap();
    assert!(
        html.contains(r#"id="pool" data-profile="sdxl""#) && html.contains("In line for <strong>SDXL on L4</strong>"),
        "the waiting page names the pool: {html}"
    );
    // sdxl's line does not hold up sd15's free GPUs.
    assert_eq!(api_whoami(&router, &issuer.user("ann"), Some("sd15")).await.0, 200);

    let choices = listed(&router, &corp(&issuer, "eli")).await;
    let sdxl = &choices["profiles"][1];
    assert_eq!(
        (sdxl["name"].as_str(), sdxl["free"].clone(), sdxl["waiting"].clone()),
        (Some("sdxl"), json!(0), json!(1))
    );
    assert_eq!(choices["profiles"][0]["free"], 1);

    let text = metrics(&router).await;
    for line in [
        r#"session_router_profile_users_waiting{profile="sdxl"} 1"#,
        r#"session_router_profile_users_waiting{profile="sd15"} 0"#,
        r#"session_router_profile_sessions{profile="sdxl"} 1"#,
        r#"session_router_profile_sessions{profile="sd15"} 1"#,
        r#"session_router_profile_sessions{profile="shared"} 0"#,
        r#"session_router_profile_allocations_total{outcome="allocated",profile="sdxl"} 1"#,
        "session_router_users_waiting 1",
    ] {
        assert!(text.contains(line), "{line} in\n{text}");
    }

    let admin = json_of(&router, &issuer.user("boss"), "/_router/admin").await;
    let pools = admin["profiles"].as_array().unwrap();
    assert_eq!(pools.len(), 3);
    assert_eq!(pools[1]["name"], "sdxl");
    assert_eq!(pools[1]["capacity"]["allocated"], 1);
    assert_eq!(pools[1]["waiting"], 1);
    assert_eq!(pools[0]["capacity"]["ready"], 1);
    let profiles: Vec<&str> = admin["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["profile"].as_str().unwrap())
        .collect();
    assert_eq!(profiles, ["sd15", "sdxl"]);
    let backends: Vec<&str> = admin["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["backend"].as_str().unwrap())
        .collect();
    assert!(
        backends.iter().all(|b| b.starts_with("sd15-") || b == &"sdxl-0"),
        "each profile names its own backends, so no two share a name: {backends:?}"
    );
}

#[tokio::test]
async fn a_profiles_own_idle_timeout_releases_its_users_and_not_the_others() {
    let Pools { issuer, router, _pods } = Pools::start("1s").await;
    assert_eq!(api_whoami(&router, &issuer.user("ann"), Some("shared")).await.0, 200);
    assert_eq!(api_whoami(&router, &issuer.user("bob"), Some("sd15")).await.0, 200);
    assert!(
        eventually(Duration::from_secs(5), || async {
            router.state.registry.get("accounts.google.com:ann").is_none()
        })
        .await,
        "the shared profile's 1 s idle timeout"
    );
    assert!(
        router.state.registry.get("accounts.google.com:bob").is_some(),
        "sd15 keeps [session]'s 15 min"
    );
}

/// A router on `fake` with two Agones profiles: `fast` (fleets `l4` then
/// `t4`, the default) and `slow` (fleet `cpu`); `kind` and `agones` (extra
/// lines for each backend.agones) as for the one-profile routers.
async fn agones_pools(issuer: &IapIssuer, fake: &FakeAgones, kind: &str, server: &str, agones: &str) -> TestRouter {
    let backend = |fleets: &str| {
        format!(
            r#"[profiles.backend]
kind = "{kind}"
connect_timeout = "1s"
[profiles.backend.agones]
fleets = [{fleets}]
kube_api_url = "{api}"
allocator_url = "{api}"
allocation_retry_window = "300ms"
activity_sync_interval = "200ms"
api_timeout = "3s"
{agones}
"#,
            api = fake.url(),
        )
    };
    let text = format!(
        r#"{head}
[session]
retry_after = "2s"
[[profiles]]
name = "fast"
title = "SDXL"
{fast}
[[profiles]]
name = "slow"
title = "SD 1.5"
{slow}
"#,
        head = iap_head(issuer, server, ""),
        fast = backend(r#""l4", "t4""#),
        slow = backend(r#""cpu""#),
    );
    TestRouter::start(&text).await
}

#[tokio::test]
async fn ordered_fleets_are_one_allocation_whose_selectors_prefer_the_first_fleet() {
    let issuer = IapIssuer::start().await;
    let fake = FakeAgones::start().await;
    let pods = pods(2).await;
    fake.add_ready_in("t4", "gs-t4", pods[0].addr);
    let router = agones_pools(&issuer, &fake, "agones", "", "").await;

    assert_eq!(
        api_whoami(&router, &issuer.user("ann"), None).await,
        (200, Some("pod-1".to_string())),
        "no L4 free: the T4 fleet serves"
    );
    let requests = fake.allocation_requests();
    assert_eq!(requests.len(), 1, "one allocation call, not a loop over fleets");
    let selectors: Vec<(String, String)> = requests[0]["spec"]["selectors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["gameServerState"].as_str().unwrap().to_string(),
                s["matchLabels"]["agones.dev/fleet"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let expected = [
        ("Allocated", "l4"),
        ("Allocated", "t4"),
        ("Ready", "l4"),
        ("Ready", "t4"),
    ];
    assert_eq!(selectors, expected.map(|(s, f)| (s.to_string(), f.to_string())));
    assert!(requests[0]["spec"]["selectors"][0]["matchLabels"]["session-router.dev/user-hash"].is_string());
    let server = fake.server("gs-t4").unwrap();
    assert_eq!(server["metadata"]["labels"]["session-router.dev/profile"], "fast");

    fake.add_ready_in("l4", "gs-l4", pods[1].addr);
    fake.add_ready_in("t4", "gs-t4-b", pods[0].addr);
    assert!(
        eventually(Duration::from_secs(3), || async {
            router
                .state
                .registry
                .profiles()
                .named("fast")
                .unwrap()
                .allocator
                .capacity()
                .ready
                == 2
        })
        .await
    );
    assert_eq!(
        api_whoami(&router, &issuer.user("bob"), None).await,
        (200, Some("pod-2".to_string())),
        "an L4 free: the first fleet wins"
    );
    assert!(fake.server("gs-l4").unwrap()["metadata"]["labels"]["session-router.dev/user-hash"].is_string());
}

#[tokio::test]
async fn a_second_replica_refinds_the_users_server_and_its_profile() {
    let issuer = IapIssuer::start().await;
    let fake = FakeAgones::start().await;
    let pods = pods(2).await;
    fake.add_ready_in("l4", "gs-fast", pods[0].addr);
    fake.add_ready_in("cpu", "gs-slow", pods[1].addr);
    let a = agones_pools(&issuer, &fake, "agones", "", "").await;
    let b = agones_pools(&issuer, &fake, "agones", "", "").await;
    let ann = issuer.user("ann");

    assert_eq!(
        api_whoami(&a, &ann, Some("slow")).await,
        (200, Some("pod-2".to_string()))
    );
    assert_eq!(
        fake.server("gs-slow").unwrap()["metadata"]["labels"]["session-router.dev/profile"],
        "slow"
    );
    assert!(
        eventually(Duration::from_secs(3), || async {
            b.state
                .registry
                .profiles()
                .named("slow")
                .unwrap()
                .allocator
                .capacity()
                .allocated
                == 1
        })
        .await
    );
    assert_eq!(
        listed(&b, &ann).await["current"],
        "slow",
        "the chooser of replica b knows what ann holds through replica a"
    );
    // Her browser without the cookie (another device) opens the WebUI on
    // replica b: her own server, not the chooser (whose "open it" would
    // lead back to the chooser).
    let page = navigate(&b, &ann, "/whoami", None).await;
    assert_eq!(page.status(), 200);
    assert_eq!(page.json::<Value>().await.unwrap()["pod"], "pod-2");
    // No cookie, no header: the default profile would be `fast`, but ann
    // holds a server of `slow`, and a user holds one.
    assert_eq!(api_whoami(&b, &ann, None).await, (200, Some("pod-2".to_string())));
    assert_eq!(
        b.state.registry.get("accounts.google.com:ann").unwrap().profile.name(),
        "slow"
    );
    assert_eq!(fake.allocation_requests().len(), 1, "replica b allocated nothing");
    assert_eq!(
        b.state
            .registry
            .profiles()
            .named("fast")
            .unwrap()
            .allocator
            .capacity()
            .ready,
        1,
        "the fast pool's server is still free"
    );
}

#[tokio::test]
async fn multi_cluster_asks_the_allocator_service_to_place_the_user_by_its_policy() {
    let issuer = IapIssuer::start().await;
    let fake = FakeAgones::start().await;
    let pods = pods(1).await;
    fake.add_ready_in("l4", "gs-fast", pods[0].addr);
    let router = agones_pools(&issuer, &fake, "agones-allocator", "", "multi_cluster = true").await;
    assert_eq!(api_whoami(&router, &issuer.user("ann"), None).await.0, 200);
    let requests = fake.allocation_requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0]["multiClusterSetting"], json!({"enabled": true}));
    assert_eq!(requests[0]["metadata"]["labels"]["session-router.dev/profile"], "fast");
    assert_eq!(requests[0]["gameServerSelectors"].as_array().unwrap().len(), 4);

    // Placed in a cluster this router does not manage: refused, not served
    // from an address nobody can confirm or release.
    fake.add_ready_in("l4", "gs-remote", pods[0].addr);
    fake.place_in_cluster("us-east1");
    let refused = client()
        .get(router.url("/whoami"))
        .header(ASSERTION, issuer.user("bob"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"], "backend_unavailable", "{body}");
    assert!(router.state.registry.get("accounts.google.com:bob").is_none());
}

#[tokio::test]
async fn the_autoscaler_answers_each_fleet_with_its_own_profiles_line() {
    let issuer = IapIssuer::start().await;
    let fake = FakeAgones::start().await;
    let server = "autoscaler_listen = \"127.0.0.1:0\"";
    let router = agones_pools(&issuer, &fake, "agones", server, "").await;
    for name in ["ann", "bob"] {
        assert_eq!(
            api_whoami(&router, &issuer.user(name), Some("slow")).await.0,
            503,
            "{name} waits"
        );
    }
    assert_eq!(api_whoami(&router, &issuer.user("cy"), Some("fast")).await.0, 503);
    // The default buffer is one spare server.
    assert_eq!(desired(&router, "cpu").await, 3, "slow's two waiters + the buffer");
    assert_eq!(
        desired(&router, "l4").await,
        2,
        "fast's one waiter, on its first-choice fleet"
    );
    assert_eq!(desired(&router, "t4").await, 1, "a fallback fleet: the buffer only");
    assert_eq!(desired(&router, "elsewhere").await, 1, "a fleet of no profile");
}

#[tokio::test]
async fn a_profiles_short_idle_timeout_keeps_an_active_users_cookie_stamped_for_every_replica() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let text = format!(
        r#"{head}
[session]
idle_timeout = "15m"
[[profiles]]
name = "quick"
idle_timeout = "4s"
[profiles.backend.static]
upstreams = [{upstreams}]
"#,
        head = iap_head(&issuer, "", ""),
        upstreams = upstream_list(&[&pods[0]]),
    );
    let a = TestRouter::start(&text).await;
    let b = TestRouter::start(&text).await;
    let ann = issuer.user("ann");
    let first = navigate(&a, &ann, "/whoami", None).await;
    let mut cookie = set_cookie(&first, COOKIE).unwrap();
    // Busy for longer than the profile's idle timeout, through replica a.
    for _ in 0..14 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let page = navigate(&a, &ann, "/whoami", Some(&cookie)).await;
        assert_eq!(page.status(), 200);
        if let Some(newer) = set_cookie(&page, COOKIE) {
            cookie = newer;
        }
    }
    // Replica a gives the box up as a restart would, so replica b may adopt it.
    let session = a.state.registry.get("accounts.google.com:ann").unwrap();
    a.state.registry.forget(&session);
    let there = navigate(&b, &ann, "/whoami", Some(&cookie)).await;
    assert_eq!(
        there.status(),
        200,
        "active a moment ago: not presumed idle by replica b"
    );
    assert_eq!(there.json::<Value>().await.unwrap()["pod"], "pod-1");
}

#[tokio::test]
async fn with_one_profile_of_two_fleets_the_autoscaler_counts_the_line_for_the_first_only() {
    let issuer = IapIssuer::start().await;
    let fake = FakeAgones::start().await;
    let text = format!(
        r#"{head}
[session]
retry_after = "2s"
[backend]
kind = "agones"
[backend.agones]
fleets = ["l4", "t4"]
kube_api_url = "{api}"
allocation_retry_window = "300ms"
"#,
        head = iap_head(&issuer, "autoscaler_listen = \"127.0.0.1:0\"", ""),
        api = fake.url(),
    );
    let router = TestRouter::start(&text).await;
    assert_eq!(api_whoami(&router, &issuer.user("ann"), None).await.0, 503);
    assert_eq!(desired(&router, "l4").await, 2, "the waiter and the buffer");
    assert_eq!(desired(&router, "t4").await, 1, "the fallback: the buffer only");
    assert_eq!(
        desired(&router, "other").await,
        2,
        "one profile: its line for any other Fleet, as before"
    );
}

#[tokio::test]
async fn a_profile_that_cannot_be_asked_keeps_the_others_in_service() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let text = format!(
        r#"{head}
[[profiles]]
name = "boxes"
[profiles.backend.static]
upstreams = [{upstreams}]
[[profiles]]
name = "models"
[profiles.backend]
kind = "shared"
[profiles.backend.shared]
service = "sd15"
namespace = "default"
kube_api_url = "http://127.0.0.1:9"
"#,
        head = iap_head(&issuer, "", ""),
        upstreams = upstream_list(&[&pods[0]]),
    );
    let router = TestRouter::start(&text).await;
    let ready = client().get(router.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200, "the boxes still serve");
    assert_eq!(ready.text().await.unwrap(), "ready\nprofiles not ready: models\n");
    assert_eq!(
        api_whoami(&router, &issuer.user("ann"), Some("boxes")).await,
        (200, Some("pod-1".to_string()))
    );
}

#[tokio::test]
async fn a_user_waits_in_one_line_at_a_time() {
    let Pools { issuer, router, _pods } = Pools::start("15m").await;
    for name in ["ann", "bob"] {
        assert_eq!(api_whoami(&router, &issuer.user(name), Some("shared")).await.0, 200);
    }
    assert_eq!(api_whoami(&router, &corp(&issuer, "cy"), Some("sdxl")).await.0, 200);
    let dee = corp(&issuer, "dee");
    assert_eq!(api_whoami(&router, &dee, Some("sdxl")).await.0, 503);
    let waiting = |listing: &Value, name: &str| {
        let profiles = listing["profiles"].as_array().unwrap();
        profiles.iter().find(|p| p["name"] == name).unwrap()["waiting"].clone()
    };
    let before = listed(&router, &dee).await;
    assert_eq!(
        (waiting(&before, "sdxl"), waiting(&before, "shared")),
        (json!(1), json!(0))
    );

    // Full too: she waits there now, and sdxl's line (its autoscaling
    // demand) no longer counts her.
    assert_eq!(api_whoami(&router, &dee, Some("shared")).await.0, 503);
    let after = listed(&router, &dee).await;
    assert_eq!(
        (waiting(&after, "sdxl"), waiting(&after, "shared")),
        (json!(0), json!(1))
    );
    let status = json_of(&router, &dee, "/_router/status").await;
    assert_eq!(status["line"]["profile"], "shared");
}

#[tokio::test]
async fn a_user_allowed_one_profile_of_several_goes_straight_in() {
    let issuer = IapIssuer::start().await;
    let pods = pods(3).await;
    let text = format!(
        r#"{head}
[[profiles]]
name = "design"
default = true
allowed_domains = ["corp.example"]
[profiles.backend.static]
upstreams = [{design}]
[[profiles]]
name = "everyone"
allowed_domains = ["example.com"]
[profiles.backend.static]
upstreams = [{everyone}]
"#,
        head = iap_head(&issuer, "", ""),
        design = upstream_list(&[&pods[0]]),
        everyone = upstream_list(&[&pods[1], &pods[2]]),
    );
    let router = TestRouter::start(&text).await;
    let page = navigate(&router, &issuer.user("ann"), "/whoami", None).await;
    assert_eq!(page.status(), 200, "no chooser for one choice");
    assert_eq!(page.json::<Value>().await.unwrap()["pod"], "pod-2");
    assert_eq!(
        api_whoami(&router, &issuer.user("bob"), None).await,
        (200, Some("pod-3".to_string())),
        "an API client that may not use the default gets the profile it may use"
    );
    let status = json_of(&router, &issuer.user("ann"), "/_router/status").await;
    assert_eq!(status["profiles"], 1);
}
