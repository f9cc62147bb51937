//! `session-router demo` as people see it: the real binary, in real headless
//! Chromium browsers, one per person so that nobody shares cookies.
//!
//! Needs Debian's `chromium` package. Without it the test is skipped, except
//! on CI (`CI` set), where it fails.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::browser::{chromium_available, Browser, CHROMIUM};
use support::demo_process::Demo;

const ECHO: &str = "echoed: hello from the browser";

/// Opens the demo, lands on the sign-in form, types `name` and submits it,
/// then waits for whatever page the router sends the browser on to.
async fn sign_in(browser: &Browser, demo: &Demo, name: &str) {
    sign_in_to(browser, demo, name, "/").await;
}

/// [`sign_in`], the browser ending up at `landing` (a path).
async fn sign_in_to(browser: &Browser, demo: &Demo, name: &str, landing: &str) {
    browser.goto(&demo.url("/")).await;
    // Not signed in: the router sends the browser to its sign-in form,
    // remembering where it was heading.
    browser
        .wait_for(
            "location.pathname === '/_router/dev/login' \
             && new URLSearchParams(location.search).get('next') === '/' \
             && document.querySelector('input[name=name]')",
            Duration::from_secs(10),
        )
        .await;
    browser
        .eval("document.querySelector('input[name=name]').focus(); true")
        .await;
    browser.call("Input.insertText", json!({ "text": name })).await;
    browser
        .eval(
            "document.querySelector('form[action=\"/_router/dev/login\"] button[type=submit]')\
             .click(); true",
        )
        .await;
    browser
        .wait_for(
            &format!(
                "location.pathname === {} && document.readyState === 'complete'",
                json!(landing)
            ),
            Duration::from_secs(10),
        )
        .await;
}

/// Whether `chromium` can run this test (on CI it must).
fn browser_available() -> bool {
    if chromium_available() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{CHROMIUM} is missing; CI must install the `chromium` package");
    }
    eprintln!("SKIPPED: {CHROMIUM} not found; `apt-get install chromium` to run this test");
    false
}

/// The HTTP status the current page was served with.
async fn status(browser: &Browser) -> u64 {
    browser
        .eval("performance.getEntriesByType('navigation')[0].responseStatus")
        .await
        .as_u64()
        .unwrap_or(0)
}

/// Checks the browser shows a pod page for `name` whose WebSocket echoed
/// through the router, and returns the pod's name.
async fn assert_on_own_pod(browser: &Browser, name: &str) -> String {
    browser
        .wait_for("document.querySelector('#pod')", Duration::from_secs(10))
        .await;
    assert_eq!(status(browser).await, 200, "{name}'s pod page status");
    let pod = browser.text("#pod").await.unwrap_or_default();
    assert!(
        pod.starts_with("demo-pod-") || pod.starts_with("demo-shared-"),
        "{name} is on {pod:?}"
    );
    assert_eq!(
        browser.text("#user").await.as_deref(),
        Some(format!("{name}@dev.localhost").as_str()),
        "the pod says whom the router told it it serves"
    );
    browser
        .wait_for(
            &format!("document.querySelector('#ws').textContent === {}", json!(ECHO)),
            Duration::from_secs(10),
        )
        .await;
    pod
}

/// Keeps the page busy like a person at work: a message over its WebSocket
/// every half second, so its pod is not idle.
async fn keep_busy(browser: &Browser) {
    browser
        .eval("setInterval(() => ws.send('still here'), 500); true")
        .await;
}

#[tokio::test]
async fn demo_routes_each_signed_in_person_to_their_own_pod_in_a_real_browser() {
    if !browser_available() {
        return;
    }
    let demo = Demo::start(&["--pods", "2", "--idle-timeout", "3s"]).await;
    let (alice, bob, carol) = tokio::join!(
        Browser::launch("alice"),
        Browser::launch("bob"),
        Browser::launch("carol"),
    );

    sign_in(&alice, &demo, "alice").await;
    let alice_pod = assert_on_own_pod(&alice, "alice").await;
    keep_busy(&alice).await;
    let screenshot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser_demo_alice.png");
    std::fs::write(&screenshot, alice.screenshot_png().await).unwrap();
    println!("alice's pod page: {}", screenshot.display());

    sign_in(&bob, &demo, "bob").await;
    let bob_pod = assert_on_own_pod(&bob, "bob").await;
    keep_busy(&bob).await;
    assert_ne!(alice_pod, bob_pod, "alice and bob share a pod");

    // Both pods are taken: carol waits, on a page that refreshes itself.
    sign_in(&carol, &demo, "carol").await;
    assert_eq!(
        carol.eval("document.title").await,
        Value::from("Waiting for a free GPU")
    );
    assert_eq!(carol.text("h1").await.as_deref(), Some("Waiting for a free GPU"));
    assert_eq!(status(&carol).await, 503, "the waiting page's status");
    assert!(
        carol.eval("!!document.querySelector('meta[http-equiv=refresh]')").await == Value::Bool(true),
        "the waiting page refreshes itself"
    );
    assert_eq!(
        alice.text("#user").await.as_deref(),
        Some("alice@dev.localhost"),
        "alice keeps her pod while carol waits"
    );

    // Alice and bob leave. Once their pods have been idle for 3 s, carol's
    // next automatic refresh gets one; nobody touches her browser.
    drop(alice);
    drop(bob);
    carol
        .wait_for(
            "document.querySelector('#user') \
             && document.querySelector('#user').textContent === 'carol@dev.localhost'",
            Duration::from_secs(15),
        )
        .await;
    let carol_pod = assert_on_own_pod(&carol, "carol").await;
    assert!(
        carol_pod == alice_pod || carol_pod == bob_pod,
        "carol got {carol_pod}, not one of the demo's pods"
    );

    // Carol leaves her tab alone with its socket open: after 3 s idle her
    // GPU is released. Opening the WebUI again says so, and takes no GPU
    // until she presses "Start again".
    tokio::time::sleep(Duration::from_secs(5)).await;
    carol.goto(&demo.url("/")).await;
    carol
        .wait_for("document.querySelector('#reason')", Duration::from_secs(10))
        .await;
    assert_eq!(carol.eval("document.title").await, Value::from("Your GPU was released"));
    assert_eq!(status(&carol).await, 409, "the released page's status");
    assert_eq!(
        carol.eval("document.querySelector('#reason').dataset.reason").await,
        Value::from("idle")
    );
    carol
        .eval("document.querySelector('form[action=\"/_router/start\"] button[type=submit]').click(); true")
        .await;
    carol
        .wait_for(
            "location.pathname === '/' && document.querySelector('#user') \
             && document.querySelector('#user').textContent === 'carol@dev.localhost'",
            Duration::from_secs(10),
        )
        .await;
    assert_on_own_pod(&carol, "carol").await;
}

/// Clicks the submit button of the form posting to `action` (inside
/// `scope`, a CSS selector, when given).
async fn submit(browser: &Browser, scope: &str, action: &str) {
    let js = format!(
        "document.querySelector({}).click(); true",
        json!(format!("{scope} form[action=\"{action}\"] button[type=submit]"))
    );
    browser.eval(&js).await;
}

#[tokio::test]
async fn with_profiles_a_person_chooses_a_pool_starts_it_and_switches_in_a_real_browser() {
    if !browser_available() {
        return;
    }
    let demo = Demo::start(&["--pods", "2", "--idle-timeout", "3s", "--profiles"]).await;
    let dana = Browser::launch("dana").await;

    // Signed in, the WebUI's address leads to the chooser: nothing taken yet.
    sign_in_to(&dana, &demo, "dana", "/_router/profiles").await;
    assert_eq!(dana.eval("document.title").await, Value::from("Choose a GPU"));
    let cards = dana
        .eval("[...document.querySelectorAll('[data-profile]')].map(c => c.dataset.profile).join(' ')")
        .await;
    assert_eq!(cards, Value::from("dedicated shared"));
    assert_eq!(
        dana.text("#profile-shared h2").await.as_deref(),
        Some("Shared SD 1.5"),
        "each card shows its profile's title"
    );

    // Start on the shared card: the shared pod, its WebSocket through the router.
    submit(&dana, "#profile-shared", "/_router/start").await;
    dana.wait_for(
        "location.pathname === '/' && document.querySelector('#pod')",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(assert_on_own_pod(&dana, "dana").await, "demo-shared-1");

    // The status page names the profile and offers Switch, which gives the
    // pod back and shows the chooser again.
    dana.goto(&demo.url("/_router/status")).await;
    dana.wait_for("document.querySelector('#profile')", Duration::from_secs(10))
        .await;
    assert_eq!(
        dana.eval("document.querySelector('#profile').dataset.profile").await,
        Value::from("shared")
    );
    submit(&dana, "", "/_router/switch").await;
    dana.wait_for(
        "location.pathname === '/_router/profiles' && document.querySelector('[data-profile=dedicated] form')",
        Duration::from_secs(10),
    )
    .await;

    // And now the dedicated pool: a pod of dana's own.
    submit(&dana, "#profile-dedicated", "/_router/start").await;
    dana.wait_for(
        "location.pathname === '/' && document.querySelector('#pod')",
        Duration::from_secs(10),
    )
    .await;
    let pod = assert_on_own_pod(&dana, "dana").await;
    assert!(pod.starts_with("demo-pod-"), "dana is on {pod}");
}
