//! Connections are dealt out to `server.threads` serving threads, each with
//! a runtime of its own: every thread serves its connections whole, and a
//! shutdown drains all of them.

mod support;

use std::time::Duration;

use support::{client, iap_head, pods, upstream_list, IapIssuer, TestRouter};

const ASSERTION: &str = "x-goog-iap-jwt-assertion";
const THREADS: usize = 3;

async fn router(issuer: &IapIssuer, pods: &[&support::DemoPod]) -> TestRouter {
    TestRouter::start(&format!(
        "{head}\n[backend.static]\nupstreams = [{upstreams}]\n",
        head = iap_head(issuer, &format!("threads = {THREADS}"), ""),
        upstreams = upstream_list(pods),
    ))
    .await
}

#[tokio::test]
async fn requests_on_connections_of_every_serving_thread_reach_the_users_backend() {
    let issuer = IapIssuer::start().await;
    let pods = pods(2).await;
    let router = router(&issuer, &[&pods[0], &pods[1]]).await;
    let token = issuer.user("alice");
    let mut backends = Vec::new();
    // Two connections per thread, several requests on each.
    for _ in 0..2 * THREADS {
        let connection = client();
        for _ in 0..3 {
            let response = connection
                .get(router.url("/whoami"))
                .header(ASSERTION, &token)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            let body: serde_json::Value = response.json().await.unwrap();
            backends.push(body["pod"].as_str().unwrap().to_string());
        }
    }
    assert!(
        backends.iter().all(|b| *b == backends[0]),
        "one user, one backend, whichever thread served: {backends:?}"
    );
}

#[tokio::test]
async fn streams_on_every_serving_thread_finish_during_the_drain() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let router = router(&issuer, &[&pods[0]]).await;
    let addr = router.addr;
    let token = issuer.user("alice");
    // Six event streams on six connections: two on each thread. Each takes
    // 0.6 s, well inside the 1 s drain.
    let mut streams = Vec::new();
    for _ in 0..2 * THREADS {
        let mut response = client()
            .get(router.url("/events?count=4&interval_ms=200"))
            .header(ASSERTION, &token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let first = response.chunk().await.unwrap().unwrap();
        assert!(String::from_utf8_lossy(&first).contains("event 0"));
        streams.push(response);
    }
    let stopping = tokio::spawn(router.shutdown());
    for (i, mut response) in streams.into_iter().enumerate() {
        let mut rest = String::new();
        while let Some(chunk) = tokio::time::timeout(Duration::from_secs(5), response.chunk())
            .await
            .expect("the stream goes on during the drain")
            .unwrap_or_else(|e| panic!("stream {i} was cut: {e}"))
        {
            rest.push_str(&String::from_utf8_lossy(&chunk));
        }
        assert!(rest.contains("event 3"), "stream {i} ended early: {rest:?}");
    }
    tokio::time::timeout(Duration::from_secs(5), stopping)
        .await
        .expect("the shutdown finishes")
        .unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "nothing listens after the shutdown"
    );
}
