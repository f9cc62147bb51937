//! `session-router demo --profiles`: two profiles on loopback stand-in
//! pods, "dedicated" (one user a pod, the default) and "shared" (several
//! users on one pod), driven over real HTTP like a browser and like an API
//! client, with the dev sign-in.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue, LOCATION, SET_COOKIE};
use reqwest::{RequestBuilder, Response, StatusCode};
use serde_json::Value;
use session_router::config::{BackendKind, IMPLICIT_PROFILE};
use session_router::demo::{
    self, DemoOptions, DemoPods, DEDICATED_PROFILE, SHARED_PODS, SHARED_PROFILE, SHARED_USERS_PER_POD,
};
use support::demo_process::Demo;

/// One person: an HTTP client that follows no redirect, with the cookies
/// the router set for them (kept by hand, as a browser would).
struct Person {
    http: reqwest::Client,
    origin: String,
    cookies: BTreeMap<String, String>,
}

impl Person {
    /// Signs `name` in through the dev sign-in form.
    async fn sign_in(demo: &Demo, name: &str) -> Person {
        let mut person = Person {
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            origin: demo.origin.clone(),
            cookies: BTreeMap::new(),
        };
        let response = person
            .post(demo, "/_router/dev/login", &format!("name={name}&next=/"))
            .await;
        assert_eq!(response.status(), StatusCode::SEE_OTHER, "the dev sign-in");
        assert!(
            person.cookies.contains_key("session_router_dev"),
            "the sign-in set its cookie: {:?}",
            person.cookies
        );
        person
    }

    fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Sends `request` with this person's cookies and keeps the ones the
    /// answer sets (an empty value deletes one).
    async fn send(&mut self, request: RequestBuilder) -> Response {
        let request = if self.cookies.is_empty() {
            request
        } else {
            request.header("cookie", self.cookie_header())
        };
        let response = request.send().await.expect("the demo answers");
        for set in response.headers().get_all(SET_COOKIE) {
            let pair = set.to_str().unwrap().split(';').next().unwrap_or_default();
            if let Some((name, value)) = pair.split_once('=') {
                if value.is_empty() {
                    self.cookies.remove(name);
                } else {
                    self.cookies.insert(name.to_string(), value.to_string());
                }
            }
        }
        response
    }

    /// A page the person opens in the address bar, as a browser asks for it.
    async fn navigate(&mut self, demo: &Demo, path: &str) -> Response {
        let request = self.http.get(demo.url(path)).headers(navigation());
        self.send(request).await
    }

    /// A same-origin form post, as a button on one of the router's pages
    /// sends it.
    async fn post(&mut self, demo: &Demo, path: &str, form: &str) -> Response {
        let request = self
            .http
            .post(demo.url(path))
            .headers(navigation())
            .header("origin", &self.origin)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form.to_string());
        self.send(request).await
    }

    /// What a script asks: no `Sec-Fetch-*`, no HTML.
    async fn api(&mut self, demo: &Demo, path: &str, profile: Option<&str>) -> Response {
        let mut request = self.http.get(demo.url(path)).header("accept", "application/json");
        if let Some(profile) = profile {
            request = request.header("x-session-router-profile", profile);
        }
        self.send(request).await
    }
}

/// The headers of a top-level navigation in a current browser.
fn navigation() -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("sec-fetch-mode", HeaderValue::from_static("navigate"));
    headers.insert("sec-fetch-dest", HeaderValue::from_static("document"));
    headers.insert("sec-fetch-site", HeaderValue::from_static("same-origin"));
    headers.insert("accept", HeaderValue::from_static("text/html,application/xhtml+xml"));
    headers
}

fn location(response: &Response) -> String {
    response
        .headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// The name of the demo pod a pod page says it is (`<strong id="pod">`).
fn pod_of(page: &str) -> Option<&str> {
    let start = page.find(r#"<strong id="pod">"#)? + r#"<strong id="pod">"#.len();
    let end = start + page[start..].find('<')?;
    Some(&page[start..end])
}

#[tokio::test]
async fn a_browser_with_two_profiles_is_sent_to_the_chooser_and_starting_shared_lands_on_the_shared_pod() {
    let demo = Demo::start(&["--profiles", "--pods", "1"]).await;
    let printed = demo.printed();
    assert!(
        printed.contains(DEDICATED_PROFILE) && printed.contains("demo-pod-1 at http://127.0.0.1:"),
        "the demo says what runs in the dedicated profile:\n{printed}"
    );
    assert!(
        printed.contains(SHARED_PROFILE) && printed.contains("demo-shared-1 at http://127.0.0.1:"),
        "the demo says what runs in the shared profile:\n{printed}"
    );
    let mut alice = Person::sign_in(&demo, "alice").await;

    // Opening the WebUI with two profiles to choose from: the chooser.
    let opened = alice.navigate(&demo, "/").await;
    assert_eq!(opened.status(), StatusCode::SEE_OTHER);
    assert!(
        location(&opened).starts_with("/_router/profiles"),
        "sent to {:?}",
        location(&opened)
    );
    assert!(
        !alice.cookies.contains_key("session_router"),
        "nothing is pinned before a choice"
    );

    let chooser = alice.navigate(&demo, &location(&opened)).await;
    assert_eq!(chooser.status(), StatusCode::OK);
    let page = chooser.text().await.unwrap();
    for profile in [DEDICATED_PROFILE, SHARED_PROFILE] {
        assert!(
            page.contains(&format!(r#"data-profile="{profile}""#)),
            "the chooser has a card for {profile}:\n{page}"
        );
        assert!(
            page.contains(&format!(r#"name="profile" value="{profile}""#)),
            "the {profile} card has a Start button:\n{page}"
        );
    }
    assert!(
        page.contains("Dedicated GPU") && page.contains("Shared SD 1.5"),
        "{page}"
    );
    assert!(page.contains(r#"action="/_router/start""#), "{page}");

    // "Start" on the shared card.
    let started = alice
        .post(&demo, "/_router/start", &format!("profile={SHARED_PROFILE}&next=/"))
        .await;
    assert_eq!(started.status(), StatusCode::SEE_OTHER, "Start answers a redirect");
    assert_eq!(location(&started), "/", "and leads back to the WebUI");
    assert!(alice.cookies.contains_key("session_router"), "Start pins the backend");

    let webui = alice.navigate(&demo, "/").await;
    assert_eq!(webui.status(), StatusCode::OK, "the WebUI is proxied now");
    let page = webui.text().await.unwrap();
    assert_eq!(pod_of(&page), Some("demo-shared-1"), "{page}");
    assert!(page.contains("alice@dev.localhost"), "the pod serves alice:\n{page}");

    // The router knows which profile she holds.
    let status: Value = alice.api(&demo, "/_router/status", None).await.json().await.unwrap();
    assert_eq!(status["session"]["profile"], SHARED_PROFILE, "{status}");
    assert_eq!(status["profiles"], 2, "{status}");
    let profiles: Value = alice.api(&demo, "/_router/profiles", None).await.json().await.unwrap();
    assert_eq!(profiles["current"], SHARED_PROFILE, "{profiles}");
}

#[tokio::test]
async fn the_chooser_json_lists_both_profiles_with_what_is_free_and_the_dedicated_one_as_default() {
    let demo = Demo::start(&["--profiles", "--pods", "2"]).await;
    let mut bob = Person::sign_in(&demo, "bob").await;
    let answer = bob.api(&demo, "/_router/profiles", None).await;
    assert_eq!(answer.status(), StatusCode::OK);
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body["current"], Value::Null, "bob holds no GPU yet: {body}");
    let cards = body["profiles"].as_array().expect("a list of profiles");
    let names: Vec<&str> = cards.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, [DEDICATED_PROFILE, SHARED_PROFILE], "in config order: {body}");
    assert_eq!(cards[0]["default"], true, "{body}");
    assert_eq!(cards[0]["backend"], "static", "{body}");
    assert_eq!(cards[0]["free"], 2, "two dedicated pods: {body}");
    assert_eq!(cards[1]["default"], false, "{body}");
    assert_eq!(cards[1]["backend"], "shared", "{body}");
    assert_eq!(
        cards[1]["free"],
        SHARED_PODS * SHARED_USERS_PER_POD,
        "each shared pod has a slot per user: {body}"
    );
    assert_eq!(cards[1]["waiting"], 0, "{body}");
}

#[tokio::test]
async fn an_api_client_gets_the_default_profile_or_the_one_its_header_names() {
    let demo = Demo::start(&["--profiles", "--pods", "1"]).await;

    let mut script = Person::sign_in(&demo, "script").await;
    let answer = script.api(&demo, "/whoami", None).await;
    assert_eq!(
        answer.status(),
        StatusCode::OK,
        "an API client allocates without choosing"
    );
    let whoami: Value = answer.json().await.unwrap();
    assert_eq!(
        whoami["pod"], "demo-pod-1",
        "the default profile is dedicated: {whoami}"
    );

    let mut other = Person::sign_in(&demo, "other-script").await;
    let answer = other.api(&demo, "/whoami", Some(SHARED_PROFILE)).await;
    assert_eq!(answer.status(), StatusCode::OK);
    let whoami: Value = answer.json().await.unwrap();
    assert_eq!(whoami["pod"], "demo-shared-1", "the header chose shared: {whoami}");
}

#[tokio::test]
async fn a_link_naming_a_profile_skips_the_chooser_and_one_that_does_not_exist_is_forbidden() {
    let demo = Demo::start(&["--profiles", "--pods", "1"]).await;
    let mut carol = Person::sign_in(&demo, "carol").await;

    let unknown = carol.navigate(&demo, "/?profile=no-such-gpu").await;
    assert_eq!(unknown.status(), StatusCode::FORBIDDEN);
    let page = unknown.text().await.unwrap();
    assert!(
        page.contains("This GPU profile does not exist, or is not one you may use."),
        "{page}"
    );

    let chosen = carol.navigate(&demo, &format!("/?profile={SHARED_PROFILE}")).await;
    assert_eq!(chosen.status(), StatusCode::OK, "straight in, no chooser");
    let page = chosen.text().await.unwrap();
    assert_eq!(pod_of(&page), Some("demo-shared-1"), "{page}");
}

#[tokio::test]
async fn switch_gives_the_gpu_back_and_the_next_start_can_pick_the_other_profile() {
    let demo = Demo::start(&["--profiles", "--pods", "1"]).await;
    let mut dave = Person::sign_in(&demo, "dave").await;
    let started = dave
        .post(&demo, "/_router/start", &format!("profile={DEDICATED_PROFILE}&next=/"))
        .await;
    assert_eq!(started.status(), StatusCode::SEE_OTHER);
    let page = dave.navigate(&demo, "/").await.text().await.unwrap();
    assert_eq!(pod_of(&page), Some("demo-pod-1"), "{page}");

    // The status page names the profile and offers Switch.
    let status = dave.navigate(&demo, "/_router/status").await.text().await.unwrap();
    assert!(
        status.contains(&format!(r#"data-profile="{DEDICATED_PROFILE}""#)),
        "{status}"
    );
    assert!(status.contains(r#"action="/_router/switch""#), "{status}");

    let switched = dave.post(&demo, "/_router/switch", "").await;
    assert_eq!(switched.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(&switched), "/_router/profiles");
    assert!(!dave.cookies.contains_key("session_router"), "the pin is cleared");
    let profiles: Value = dave.api(&demo, "/_router/profiles", None).await.json().await.unwrap();
    assert_eq!(profiles["current"], Value::Null, "{profiles}");
    assert_eq!(
        profiles["profiles"][0]["free"], 1,
        "the dedicated pod is free again: {profiles}"
    );

    dave.post(&demo, "/_router/start", &format!("profile={SHARED_PROFILE}&next=/"))
        .await;
    let page = dave.navigate(&demo, "/").await.text().await.unwrap();
    assert_eq!(pod_of(&page), Some("demo-shared-1"), "{page}");
}

#[tokio::test]
async fn without_the_flag_the_demo_has_no_chooser_and_a_navigation_lands_on_a_pod() {
    let demo = Demo::start(&["--pods", "1"]).await;
    assert!(!demo.printed().contains(SHARED_PROFILE), "{}", demo.printed());
    let mut erin = Person::sign_in(&demo, "erin").await;
    let opened = erin.navigate(&demo, "/").await;
    assert_eq!(opened.status(), StatusCode::OK);
    let page = opened.text().await.unwrap();
    assert_eq!(pod_of(&page), Some("demo-pod-1"), "{page}");
}

fn options(profiles: bool) -> DemoOptions {
    DemoOptions {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        pods: 2,
        idle_timeout: Duration::from_secs(60),
        profiles,
    }
}

#[tokio::test]
async fn the_profiles_config_has_a_default_dedicated_static_profile_and_a_shared_one() {
    let options = options(true);
    let pods = DemoPods::start(&options).await.unwrap();
    assert_eq!(pods.dedicated.len(), 2);
    assert_eq!(pods.shared.len(), SHARED_PODS);
    let config = demo::config(&options, &pods).unwrap();
    assert_eq!(config.profiles.len(), 2);

    let dedicated = &config.profiles[0];
    assert_eq!(dedicated.name, DEDICATED_PROFILE);
    assert!(dedicated.default);
    assert_eq!(dedicated.backend.kind, BackendKind::Static);
    let upstreams: Vec<String> = dedicated
        .backend
        .static_pool
        .upstreams
        .iter()
        .map(|u| u.to_string())
        .collect();
    let urls: Vec<String> = pods.dedicated.iter().map(|p| format!("{}/", p.url())).collect();
    assert_eq!(upstreams, urls);
    assert_eq!(dedicated.idle_timeout, Duration::from_secs(60));

    let shared = &config.profiles[1];
    assert_eq!(shared.name, SHARED_PROFILE);
    assert!(!shared.default);
    assert_eq!(shared.backend.kind, BackendKind::Shared);
    assert_eq!(shared.backend.shared.max_users_per_backend, SHARED_USERS_PER_POD);
    assert_eq!(shared.backend.shared.upstreams.len(), SHARED_PODS);
    assert_eq!(
        config.backend.kind,
        BackendKind::Static,
        "[backend] is the default profile's"
    );
}

#[tokio::test]
async fn without_profiles_the_config_is_the_one_implicit_static_profile_as_before() {
    let options = options(false);
    let pods = DemoPods::start(&options).await.unwrap();
    assert!(pods.shared.is_empty(), "no shared pod is started");
    let config = demo::config(&options, &pods).unwrap();
    assert_eq!(config.profiles.len(), 1);
    assert_eq!(config.profiles[0].name, IMPLICIT_PROFILE);
    assert_eq!(config.backend.kind, BackendKind::Static);
    assert_eq!(config.backend.static_pool.upstreams.len(), 2);
}

#[tokio::test]
async fn a_fourth_user_of_the_shared_pod_waits_in_its_line_while_a_dedicated_pod_is_free() {
    let demo = Demo::start(&["--profiles", "--pods", "1"]).await;
    for name in ["ann", "ben", "cy"] {
        let mut person = Person::sign_in(&demo, name).await;
        person
            .post(&demo, "/_router/start", &format!("profile={SHARED_PROFILE}&next=/"))
            .await;
        let page = person.navigate(&demo, "/").await.text().await.unwrap();
        assert_eq!(pod_of(&page), Some("demo-shared-1"), "{name}: {page}");
    }

    let mut dee = Person::sign_in(&demo, "dee").await;
    let started = dee
        .post(&demo, "/_router/start", &format!("profile={SHARED_PROFILE}&next=/"))
        .await;
    assert_eq!(started.status(), StatusCode::SEE_OTHER);
    let next = location(&started);
    assert_eq!(
        next,
        format!("/?profile={SHARED_PROFILE}"),
        "its reloads keep asking for shared"
    );
    let waiting = dee.navigate(&demo, &next).await;
    assert_eq!(waiting.status(), StatusCode::SERVICE_UNAVAILABLE, "the waiting page");
    let status: Value = dee.api(&demo, "/_router/status", None).await.json().await.unwrap();
    assert_eq!(status["line"]["profile"], SHARED_PROFILE, "{status}");
    assert_eq!(status["line"]["position"], 1, "{status}");

    let profiles: Value = dee.api(&demo, "/_router/profiles", None).await.json().await.unwrap();
    assert_eq!(
        profiles["profiles"][0]["free"], 1,
        "the dedicated pod is still free: {profiles}"
    );
    assert_eq!(profiles["profiles"][1]["free"], 0, "{profiles}");
    assert_eq!(profiles["profiles"][1]["waiting"], 1, "{profiles}");
}
