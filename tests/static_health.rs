//! The static pool's health: a box that refuses connections is skipped for
//! new users and its user moved to a healthy one, a probe brings it back,
//! the 502 page's reloads do not keep it held, and operators see it.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::gpu_box::{closed_port, GpuBox};
use support::{client, eventually, IapIssuer, TestRouter};

const ASSERTION: &str = "x-goog-iap-jwt-assertion";

/// A static-pool router in front of `upstreams` (TOML strings), probing
/// them every `probe_interval`, with metrics on and `boss` an admin;
/// `more` adds sections.
async fn router(issuer: &IapIssuer, upstreams: &[String], probe_interval: &str, more: &str) -> TestRouter {
    let text = support::static_config(
        issuer,
        r#"metrics_listen = "127.0.0.1:0""#,
        "",
        &format!("[admin]\nemails = [\"boss@example.com\"]\n{more}"),
        &upstreams.join(", "),
    );
    // The pool's section comes last.
    TestRouter::start(&format!("{text}probe_interval = \"{probe_interval}\"\n")).await
}

/// Status and body of `GET path` as `user`.
async fn get(router: &TestRouter, user: &str, path: &str) -> (u16, String) {
    let response = client()
        .get(router.url(path))
        .header(ASSERTION, user)
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

async fn readyz(router: &TestRouter) -> (u16, String) {
    let response = client().get(router.url("/readyz")).send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

/// Waits until `/readyz` does (`true`) or does not (`false`) name `backend`
/// as down.
async fn reported_down(router: &TestRouter, backend: &str, down: bool) -> bool {
    eventually(Duration::from_secs(5), || async {
        let (_, body) = readyz(router).await;
        body.lines()
            .any(|l| l.starts_with("down:") && l.split(' ').any(|b| b == backend))
            == down
    })
    .await
}

#[tokio::test]
async fn a_dead_first_upstream_is_probed_down_and_new_users_get_the_healthy_ones() {
    let issuer = IapIssuer::start().await;
    let (a, b) = (GpuBox::start("box-a").await, GpuBox::start("box-b").await);
    let dead = closed_port();
    let upstreams = [format!("\"http://{dead}\""), a.url(), b.url()];
    let router = router(&issuer, &upstreams, "200ms", "").await;
    assert!(
        reported_down(&router, "static-0", true).await,
        "the probe never marked it down"
    );

    assert_eq!(get(&router, &issuer.user("alice"), "/").await, (200, "box-a".into()));
    assert_eq!(get(&router, &issuer.user("bob"), "/").await, (200, "box-b".into()));
    // The dead box is not free capacity: the third user waits.
    let (status, _) = get(&router, &issuer.user("carol"), "/").await;
    assert_eq!(status, 503);
}

#[tokio::test]
async fn without_a_probe_the_first_refusal_marks_an_upstream_down_and_its_user_moves_on_the_next_request() {
    let issuer = IapIssuer::start().await;
    let a = GpuBox::start("box-a").await;
    let dead = closed_port();
    let router = router(&issuer, &[format!("\"http://{dead}\""), a.url()], "1h", "").await;
    let alice = issuer.user("alice");

    let (status, page) = get(&router, &alice, "/").await;
    assert_eq!(status, 502, "{page}");
    assert_eq!(
        get(&router, &alice, "/").await,
        (200, "box-a".into()),
        "the 502 page's reload lands on the healthy box"
    );
    // Nobody is sent to the dead box again.
    let (status, _) = get(&router, &issuer.user("bob"), "/").await;
    assert_eq!(status, 503);
}

#[tokio::test]
async fn a_user_whose_box_dies_moves_to_a_free_healthy_one_on_their_next_navigation() {
    let issuer = IapIssuer::start().await;
    let (a, b) = (GpuBox::start("box-a").await, GpuBox::start("box-b").await);
    let router = router(&issuer, &[a.url(), b.url()], "1h", "").await;
    let alice = issuer.user("alice");
    assert_eq!(get(&router, &alice, "/").await, (200, "box-a".into()));

    a.stop().await;
    let (status, _) = get(&router, &alice, "/").await;
    assert_eq!(status, 502, "the request that found the box dead");
    assert_eq!(get(&router, &alice, "/").await, (200, "box-b".into()));
    assert!(reported_down(&router, "static-0", true).await);
}

#[tokio::test]
async fn a_box_that_comes_back_is_used_again_after_the_probe_finds_it_up() {
    let issuer = IapIssuer::start().await;
    let b = GpuBox::start("box-b").await;
    let dead = closed_port();
    let router = router(&issuer, &[format!("\"http://{dead}\""), b.url()], "200ms", "").await;
    assert!(reported_down(&router, "static-0", true).await);
    assert_eq!(get(&router, &issuer.user("alice"), "/").await, (200, "box-b".into()));
    assert_eq!(get(&router, &issuer.user("bob"), "/").await.0, 503);

    let _back = GpuBox::start_on("box-a", dead).await;
    assert!(
        reported_down(&router, "static-0", false).await,
        "the probe never found it up"
    );
    assert_eq!(get(&router, &issuer.user("bob"), "/").await, (200, "box-a".into()));
}

#[tokio::test]
async fn the_502_pages_reloads_do_not_keep_a_dead_box_held() {
    let issuer = IapIssuer::start().await;
    let a = GpuBox::start("box-a").await;
    let router = router(&issuer, &[a.url()], "1h", "[session]\nidle_timeout = \"1s\"").await;
    let alice = issuer.user("alice");
    assert_eq!(get(&router, &alice, "/").await, (200, "box-a".into()));
    a.stop().await;

    // The 502 page reloads itself; here a reload every 200 ms for 3 s.
    let mut released = false;
    for _ in 0..15 {
        let (status, _) = get(&router, &alice, "/").await;
        assert!(status == 502 || status == 503, "{status}");
        released |= router.state.registry.is_empty();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        released,
        "the dead box stayed held while only the 502 page asked for it"
    );
    let scraped = router.state.metrics.render();
    assert!(
        scraped.contains(r#"session_router_releases_total{reason="idle"} 1"#),
        "{scraped}"
    );
}

#[tokio::test]
async fn a_down_upstream_shows_in_the_metric_the_admin_page_and_readyz_which_stays_200() {
    let issuer = IapIssuer::start().await;
    let a = GpuBox::start("box-a").await;
    let dead = closed_port();
    let router = router(&issuer, &[format!("\"http://{dead}\""), a.url()], "200ms", "").await;
    assert!(reported_down(&router, "static-0", true).await);
    let (status, body) = readyz(&router).await;
    assert_eq!(status, 200, "one upstream is still up: {body}");
    assert_eq!(body, "ready\ndown: static-0\n");

    let addr = router.state.metrics_addr().unwrap();
    let metrics = support::text_of(client().get(format!("http://{addr}/metrics"))).await;
    assert!(
        metrics.lines().any(|l| l == "session_router_upstreams_down 1"),
        "{metrics}"
    );

    let boss = issuer.user("boss");
    let view: Value = client()
        .get(router.url("/_router/admin"))
        .header(ASSERTION, &boss)
        .header("accept", "application/json")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        view["down"],
        serde_json::json!([format!("static-0 ({dead})")]),
        "{view}"
    );
    assert_eq!(view["capacity"]["ready"], 1, "{view}");
    let (_, html) = get(&router, &boss, "/_router/admin").await;
    assert!(
        html.contains("Not answering") && html.contains(&format!("static-0 ({dead})")),
        "{html}"
    );
}
