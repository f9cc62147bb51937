//! The proxy is transparent: WebSockets, event streams and large uploads go
//! through as they are, as they happen.

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use sha2::{Digest, Sha256};
use support::{client, pods, IapIssuer, TestRouter};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const ASSERTION: &str = "x-goog-iap-jwt-assertion";

async fn open_socket(
    router: &TestRouter,
    token: &str,
    origin: Option<&str>,
) -> Result<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    tokio_tungstenite::tungstenite::Error,
> {
    let mut request = router.ws_url("/ws").into_client_request().unwrap();
    request.headers_mut().insert(ASSERTION, token.parse().unwrap());
    if let Some(origin) = origin {
        request.headers_mut().insert("origin", origin.parse().unwrap());
    }
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(None)
        .max_frame_size(None);
    tokio_tungstenite::connect_async_with_config(request, Some(config), false)
        .await
        .map(|(socket, _)| socket)
}

#[tokio::test]
async fn a_websocket_echoes_small_and_one_mebibyte_messages_through_the_router() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let router = TestRouter::iap(&issuer, &[&pods[0]], "").await;
    let origin = format!("http://{}", router.addr);
    let mut socket = open_socket(&router, &issuer.user("alice"), Some(&origin))
        .await
        .unwrap();
    socket.send(Message::text("hello")).await.unwrap();
    assert_eq!(socket.next().await.unwrap().unwrap(), Message::text("hello"));
    let big: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    socket.send(Message::binary(big.clone())).await.unwrap();
    match socket.next().await.unwrap().unwrap() {
        Message::Binary(echoed) => assert!(echoed[..] == big[..], "1 MiB message corrupted"),
        other => panic!("unexpected {other:?}"),
    }
    socket.close(None).await.unwrap();
}

#[tokio::test]
async fn a_cross_site_websocket_is_refused_with_403() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let router = TestRouter::iap(&issuer, &[&pods[0]], "").await;
    match open_socket(&router, &issuer.user("alice"), Some("https://evil.example")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403)
        }
        other => panic!("cross-site upgrade was not refused: {:?}", other.map(|_| "connected")),
    }
}

#[tokio::test]
async fn an_upgrade_the_upstream_refuses_comes_back_as_an_ordinary_response() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let router = TestRouter::iap(&issuer, &[&pods[0]], "").await;
    // The pod has no WebSocket at /whoami: it answers 200 JSON, not 101.
    let response = client()
        .get(router.url("/whoami"))
        .header(ASSERTION, issuer.user("alice"))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let seen: Value = response.json().await.unwrap();
    assert_eq!(seen["connection"], "upgrade", "the upstream saw the upgrade request");
}

#[tokio::test]
async fn an_sse_event_arrives_before_the_stream_ends() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let router = TestRouter::iap(&issuer, &[&pods[0]], "").await;
    // Two events five seconds apart: the first must arrive long before the second.
    let response = client()
        .get(router.url("/events?count=2&interval_ms=5000"))
        .header(ASSERTION, issuer.user("alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut stream = response.bytes_stream();
    let first = tokio::time::timeout(Duration::from_secs(3), stream.next())
        .await
        .expect("first event held back by the proxy")
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&first).contains("data: event 0"), "{first:?}");
}

#[tokio::test]
async fn a_large_streamed_upload_arrives_intact() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let router = TestRouter::iap(&issuer, &[&pods[0]], "").await;
    const CHUNKS: usize = 256;
    const CHUNK: usize = 256 * 1024; // 64 MiB in all, sent chunked as it is produced
    let mut expected = Sha256::new();
    for i in 0..CHUNKS {
        expected.update(chunk(i, CHUNK));
    }
    let expected: String = expected.finalize().iter().map(|b| format!("{b:02x}")).collect();
    let body = futures_util::stream::iter((0..CHUNKS).map(|i| Ok::<_, std::io::Error>(chunk(i, CHUNK))));
    let response = client()
        .post(router.url("/upload"))
        .header(ASSERTION, issuer.user("alice"))
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let report: Value = response.json().await.unwrap();
    assert_eq!(report["bytes"], (CHUNKS * CHUNK) as u64);
    assert_eq!(report["sha256"], expected);
}

fn chunk(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|j| ((i * 31 + j) % 253) as u8).collect()
}

#[tokio::test]
async fn a_large_download_streams_through() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let router = TestRouter::iap(&issuer, &[&pods[0]], "").await;
    let response = client()
        .get(router.url("/download?bytes=33554432"))
        .header(ASSERTION, issuer.user("alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut total = 0usize;
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        total += chunk.unwrap().len();
    }
    assert_eq!(total, 32 * 1024 * 1024);
}

#[tokio::test]
async fn an_unreachable_upstream_gets_a_readable_502_and_the_session_survives() {
    let issuer = IapIssuer::start().await;
    // A port that was just free: nothing listens there.
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let text = support::static_config(&issuer, "", "", "", &format!("\"http://{dead}\""));
    let router = TestRouter::start(&text).await;
    let token = issuer.user("alice");
    let page = client()
        .get(router.url("/"))
        .header(ASSERTION, &token)
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 502);
    let html = page.text().await.unwrap();
    assert!(html.contains("not answering"), "{html}");
    let status: Value = client()
        .get(router.url("/_router/status"))
        .header(ASSERTION, &token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        status["session"]["upstream"],
        dead.to_string(),
        "session kept: {status}"
    );
}

#[tokio::test]
async fn router_paths_are_never_proxied() {
    let issuer = IapIssuer::start().await;
    let pods = pods(1).await;
    let router = TestRouter::iap(&issuer, &[&pods[0]], "").await;
    let token = issuer.user("alice");
    for path in ["/_router/whoami", "/_router", "/_router/dev/login"] {
        let response = client()
            .get(router.url(path))
            .header(ASSERTION, &token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 404, "{path}");
    }
}
