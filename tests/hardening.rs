//! Attacks, each against real sockets: forged identities, forged cookies,
//! cross-site requests, request smuggling and malformed HTTP, oversize and
//! slow clients. Where the attack is below HTTP (framing, timing) the client
//! is a raw TCP socket; where "the upstream never sees it" matters the
//! upstream is a raw socket that records every byte it receives.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::serve::ListenerExt;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use p256::ecdsa::signature::{RandomizedSigner, Signer as _};
use p256::ecdsa::{Signature, SigningKey};
use serde_json::{json, Value};
use session_router::config::{Config, Secret};
use session_router::demo::DemoPod;
use session_router::session::cookie::CookieCodec;
use session_router::util::seal::Signer;
use support::{client, pods, FakeAgones, IapIssuer, TestRouter, AUDIENCE, SECRET};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const ASSERTION: &str = "x-goog-iap-jwt-assertion";
const COOKIE: &str = "session_router";
const ISSUER: &str = "https://cloud.google.com/iap";

// ---------------------------------------------------------------------------
// Fixtures: an ES256 signer with full control of header and signature bytes,
// a JWKS server that records every connection and path, raw HTTP.

fn b64(bytes: impl AsRef<[u8]>) -> String {
    B64.encode(bytes)
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// A P-256 key under a `kid`, signing whatever header it is given.
struct Key {
    kid: String,
    signing: SigningKey,
}

impl Key {
    fn new(kid: &str) -> Key {
        Key {
            kid: kid.to_string(),
            signing: SigningKey::random(&mut rand::rngs::OsRng),
        }
    }

    fn jwk(&self) -> Value {
        let point = self.signing.verifying_key().to_encoded_point(false);
        json!({
            "alg": "ES256", "crv": "P-256", "kid": self.kid, "kty": "EC", "use": "sig",
            "x": b64(point.x().unwrap()), "y": b64(point.y().unwrap()),
        })
    }

    fn header(&self) -> Value {
        json!({ "alg": "ES256", "typ": "JWT", "kid": self.kid })
    }

    /// `header.claims.signature` with a raw r‖s ES256 signature, as JWS wants.
    fn sign(&self, header: &Value, claims: &Value) -> String {
        self.sign_raw(header, claims, |input| {
            let signature: Signature = self.signing.sign(input);
            signature.to_bytes().to_vec()
        })
    }

    /// Like [`Key::sign`] but with a fresh random nonce: another valid
    /// signature of the same bytes.
    fn sign_randomized(&self, header: &Value, claims: &Value) -> String {
        self.sign_raw(header, claims, |input| {
            let signature: Signature = self.signing.sign_with_rng(&mut rand::rngs::OsRng, input);
            signature.to_bytes().to_vec()
        })
    }

    /// The signature bytes are whatever `signature` makes of the signing input.
    fn sign_raw(&self, header: &Value, claims: &Value, signature: impl FnOnce(&[u8]) -> Vec<u8>) -> String {
        let input = format!("{}.{}", b64(header.to_string()), b64(claims.to_string()));
        let sig = signature(input.as_bytes());
        format!("{input}.{}", b64(sig))
    }

    fn der_signature(&self, input: &[u8]) -> Vec<u8> {
        let signature: Signature = self.signing.sign(input);
        signature.to_der().as_bytes().to_vec()
    }
}

/// IAP's claims for `name`, valid for ten minutes.
fn claims(name: &str) -> Value {
    let now = unix_now();
    json!({
        "iss": ISSUER, "aud": AUDIENCE,
        "sub": format!("accounts.google.com:{name}"), "email": format!("{name}@example.com"),
        "iat": now, "exp": now + 600,
    })
}

fn with(mut value: Value, key: &str, v: Value) -> Value {
    value[key] = v;
    value
}

fn without(mut value: Value, key: &str) -> Value {
    value.as_object_mut().unwrap().remove(key);
    value
}

/// An HTTP server that serves a key set on every path and remembers every
/// TCP connection and every request line it got. Stands for IAP's JWKS
/// endpoint, and for an attacker's server a token may point at.
struct KeyServer {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl KeyServer {
    async fn start(keys: Vec<Value>) -> KeyServer {
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let body = json!({ "keys": keys });
        let seen = requests.clone();
        let app = axum::Router::new().fallback(move |request: axum::extract::Request| {
            let seen = seen.clone();
            let body = body.clone();
            async move {
                seen.lock()
                    .unwrap()
                    .push(format!("{} {}", request.method(), request.uri()));
                ([("cache-control", "public, max-age=3600")], axum::Json(body))
            }
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let counter = connections.clone();
        let listener = listener.tap_io(move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        KeyServer {
            addr,
            connections,
            requests,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/jwk", self.addr)
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for KeyServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A router in `iap` mode trusting `jwks`, with `pods` as its static pool.
/// `auth` and `server` are extra lines for those sections.
async fn router(jwks: &str, upstreams: &[String], auth: &str, server: &str) -> TestRouter {
    let list: Vec<String> = upstreams.iter().map(|u| format!("{u:?}")).collect();
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
drain_timeout = "1s"
{server}
[auth]
audiences = ["{AUDIENCE}"]
jwks_url = "{jwks}"
jwks_refetch_interval = "200ms"
{auth}
[backend.static]
upstreams = [{list}]
"#,
        list = list.join(", "),
    );
    TestRouter::start(&text).await
}

async fn whoami(router: &TestRouter, token: &str) -> reqwest::Response {
    client()
        .get(router.url("/whoami"))
        .header(ASSERTION, token)
        .send()
        .await
        .unwrap()
}

async fn status_of(router: &TestRouter, token: &str) -> u16 {
    whoami(router, token).await.status().as_u16()
}

/// Reads from `stream` until the peer closes or `wait` passes. Returns what
/// was read and whether the peer closed (EOF or reset).
async fn read_for(stream: &mut TcpStream, wait: Duration) -> (Vec<u8>, bool) {
    let deadline = tokio::time::Instant::now() + wait;
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return (out, false),
            Ok(Ok(0)) | Ok(Err(_)) => return (out, true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Sends `request` on a new connection and returns what came back within
/// `wait` and whether the router closed the connection.
async fn raw(addr: SocketAddr, request: &[u8], wait: Duration) -> (String, bool) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let (bytes, closed) = read_for(&mut stream, wait).await;
    (String::from_utf8_lossy(&bytes).into_owned(), closed)
}

/// The status codes of every response in `text`, in order.
fn statuses(text: &str) -> Vec<u16> {
    text.match_indices("HTTP/1.1 ")
        .filter(|(i, _)| text.get(i + 12..i + 13) == Some(" "))
        .filter_map(|(i, _)| text.get(i + 9..i + 12)?.parse().ok())
        .collect()
}

/// A raw upstream: answers every request head with a small 200 and closes,
/// after reading the body the head announces; records every byte received.
struct RawUpstream {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<u8>>>,
    task: tokio::task::JoinHandle<()>,
}

impl RawUpstream {
    async fn start() -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let log = received.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let log = log.clone();
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    let mut buf = [0u8; 16 * 1024];
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                    // Head, then as much body as announced (or until the router gives up).
                    loop {
                        let head_end = find(&seen, b"\r\n\r\n");
                        if let Some(end) = head_end {
                            let head = String::from_utf8_lossy(&seen[..end]).to_ascii_lowercase();
                            let body = &seen[end + 4..];
                            let complete = if head.contains("transfer-encoding: chunked") {
                                body.ends_with(b"0\r\n\r\n")
                            } else {
                                let length = head
                                    .lines()
                                    .find_map(|l| l.strip_prefix("content-length:"))
                                    .and_then(|v| v.trim().parse::<usize>().ok())
                                    .unwrap_or(0);
                                body.len() >= length
                            };
                            if complete {
                                break;
                            }
                        }
                        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
                            Ok(Ok(n)) if n > 0 => {
                                seen.extend_from_slice(&buf[..n]);
                                log.lock().unwrap().extend_from_slice(&buf[..n]);
                            }
                            _ => return,
                        }
                    }
                    let _ = stream
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
                        .await;
                    // Anything sent after the request (a smuggled one) is recorded too.
                    let (rest, _) = read_for(&mut stream, Duration::from_millis(200)).await;
                    log.lock().unwrap().extend_from_slice(&rest);
                });
            }
        });
        RawUpstream { addr, received, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn received(&self) -> String {
        String::from_utf8_lossy(&self.received.lock().unwrap()).into_owned()
    }

    /// How many request lines the upstream has seen.
    fn requests(&self) -> usize {
        self.received().matches(" HTTP/1.1\r\n").count()
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

// ---------------------------------------------------------------------------
// 1. Identity

/// A test-only RSA key (PKCS#1 DER, base64), generated for this file; it
/// protects nothing. Used to sign a genuine RS256 token, and published (as a
/// JWK) alongside the real ES256 key, to show that an RSA key in the set
/// never becomes usable.
const RSA_TEST_KEY: [&str; 16] = [
    "MIIEpQIBAAKCAQEAw9ifLoR3xFZKFym2Jg90Ga6Ou5Z9ZXbjMToxrrsYqflneHeKzS26pbNbFLBE7B22pwJ/8IGDvmpzgVdG7H+O",
    "AagkGzlNKsQ4ES5ZknuHyaaa9g9zKD4BQ7P7iQndBUQB0clfhGOg4RQ+cd3n2bXyqEasYDrQFhlCiAn25DTmLLpo0Xk0m69Pd/Xh",
    "+8046LK0AFREiiQRTSqCWeOcIJClv5Gs34YOa3Wiyowtom00ktHzICQENRnjwxFb5OdiPXipljPRn9LucOsgMTjgrOhi4qGFc9zJ",
    "5Aln8eiwso7D7WtJ6mvksSyL5fC5nEps4KupYxZpNI38APv2WPoiOCb0cwIDAQABAoIBAB8MGNQhiPEVsuIwKSGogoHNw+/mIBP1",
    "QHgd3yFxpKvRj38wCE+Vp8i8AbzqYsrBvSKFyW2BwrZtnskK4oH8iLEnjC3KrDqS58aFgAqyTakAogFPGrTu+3lVr5MefqzmhplQ",
    "4LUWrDryYCHiCW7gosrdhVcuC63tLDhvx/WOk0zUq2JENVjY0rGl+mLCs04tvWo36ZMmm0vAPL3xz+IrrMzeydWeXHZZU3/e1wMG",
    "KNIunWLFpKQg7K/OgdiTLSoFomaFPEv64wjk95yF+wbukm8eE61E6e4t/mUrNW3YYVcHKGVNeXfS8/+UsbBgWBbw0OT73wMcZYxO",
    "Uw9Q20U8lfUCgYEA5nINb10gmu8YnqUMl72RNqPDYVjjbJv4iK3k2JHpiXouHRuX4gsdqnb0TlXR5nSXQHeSgsqZqnj7rlBQ26cf",
    "3Q2LFc1CMLRlmJvHRQWenFPUHxmq/JZSRFoPPWKPhxoTMSJis9XpopnEKqLpFhigliOU6Ics7vw3h3XDXe8BaHUCgYEA2ZBasSYc",
    "MEdam3JSokFxA4qJYJXK6dk8HWufBB16hkwG+6rXfXAISYLoESANh2X1a4ypnkAxIhKT5N8Dat/ajnYQj1du+KgbaouiexGiE8m9",
    "2DTZmOQ1KOlVCygiPzF7eENs2qIC/I2W1m3dwsXNpqz526yXxeCPxJU6xMa3jEcCgYEA4a1uFNKZ3MEsVikC1ROTw3PLIml/h1yT",
    "n57Uz3bNw5HA2UatjnQeYFNQW+rVvaAOg9bVx3qL1JPYvlPva70Wik/6FqbGHJZ+LF7aXnDrbOL3iGGFvwmjlUaxSAde0gsqImMv",
    "UDi8Lj3yC2Mxay9BDOfZq4K98WlVJDai1jn7IgUCgYEAzSehTaDZPfFbEHAaWeSJ1EQDzS8TG7Z8SGXemfvOOOtiPljYQPGu7trh",
    "SJzIBSBw74zBuXdgnXeVPGHLkDEsn9/XN8PD4fhreenYOmLjSfOX8FPNyK2RL1Xvmsiqmppnin1SHUxespY1YVhSoELz7LL6HVq/",
    "95kNGNt7gmi8VisCgYEAttfpIUxEmglL9UQfD/f0UcY+n2I7nWNMEQDN3c1m+8pacyeDHtKWtSMZd++biqFtyI7ImiBRl+70ol+d",
    "Kkjxt6rkj0xHaXY5bgogHv8PfmIqNEfn8iIxqLoAqrf7UTkpjSuuCl08YsbEKiGx/kptFqThjyvH2531xbamWKIm0zA=",
];
/// Its modulus, base64url, for the JWK.
const RSA_TEST_MODULUS: &str = "w9ifLoR3xFZKFym2Jg90Ga6Ou5Z9ZXbjMToxrrsYqflneHeKzS26pbNbFLBE7B22pwJ_8IGDvmpzgVdG7H-OAagkGzlNKsQ4ES5ZknuHyaaa9g9zKD4BQ7P7iQndBUQB0clfhGOg4RQ-cd3n2bXyqEasYDrQFhlCiAn25DTmLLpo0Xk0m69Pd_Xh-8046LK0AFREiiQRTSqCWeOcIJClv5Gs34YOa3Wiyowtom00ktHzICQENRnjwxFb5OdiPXipljPRn9LucOsgMTjgrOhi4qGFc9zJ5Aln8eiwso7D7WtJ6mvksSyL5fC5nEps4KupYxZpNI38APv2WPoiOCb0cw";

/// The real key (`key-1`) and an RSA key (`rsa-1`) published side by side.
async fn identity_setup() -> (Key, KeyServer, DemoPod, TestRouter) {
    let key = Key::new("key-1");
    let rsa = json!({"kty": "RSA", "kid": "rsa-1", "alg": "RS256", "use": "sig", "n": RSA_TEST_MODULUS, "e": "AQAB"});
    let jwks = KeyServer::start(vec![key.jwk(), rsa]).await;
    let pod = DemoPod::start("pod-1").await.unwrap();
    let router = router(&jwks.url(), &[pod.url()], "", "").await;
    (key, jwks, pod, router)
}

fn rs256(kid: &str, claims: &Value) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some(kid.into());
    let der = base64::engine::general_purpose::STANDARD
        .decode(RSA_TEST_KEY.concat())
        .unwrap();
    let key = jsonwebtoken::EncodingKey::from_rsa_der(&der);
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

#[tokio::test]
async fn tokens_in_any_algorithm_but_es256_get_401() {
    let (key, _jwks, _pod, router) = identity_setup().await;
    let alice = claims("alice");
    let body = |header: Value| key.sign_raw(&header, &alice, |_| vec![7u8; 256]);
    let cases: Vec<(&str, String)> = vec![
        ("RS256, genuinely signed by a key in the JWKS", rs256("rsa-1", &alice)),
        ("RS256 signed by the RSA key under the EC kid", rs256("key-1", &alice)),
        ("PS256", body(json!({"alg": "PS256", "kid": "key-1"}))),
        ("ES384", body(json!({"alg": "ES384", "kid": "key-1"}))),
        ("ES512", body(json!({"alg": "ES512", "kid": "key-1"}))),
        ("EdDSA", body(json!({"alg": "EdDSA", "kid": "key-1"}))),
        ("HS256", body(json!({"alg": "HS256", "kid": "key-1"}))),
        (
            "lower-case es256",
            key.sign(&json!({"alg": "es256", "kid": "key-1"}), &alice),
        ),
        (
            "none",
            format!(
                "{}.{}.",
                b64(json!({"alg": "none", "kid": "key-1"}).to_string()),
                b64(alice.to_string())
            ),
        ),
        ("no alg", key.sign(&json!({"kid": "key-1"}), &alice)),
        (
            "alg as an array",
            key.sign(&json!({"alg": ["ES256"], "kid": "key-1"}), &alice),
        ),
        ("no kid", key.sign(&json!({"alg": "ES256"}), &alice)),
        (
            "ES256 under the RSA key's kid",
            key.sign(&json!({"alg": "ES256", "kid": "rsa-1"}), &alice),
        ),
        (
            "header not JSON",
            format!("{}.{}.{}", b64("not json"), b64(alice.to_string()), b64([1u8; 64])),
        ),
        ("four segments", format!("{}.x", key.sign(&key.header(), &alice))),
    ];
    for (case, token) in &cases {
        assert_eq!(status_of(&router, token).await, 401, "{case}");
    }
    assert_eq!(
        status_of(&router, &key.sign(&key.header(), &alice)).await,
        200,
        "control"
    );
}

#[tokio::test]
async fn malformed_es256_signatures_get_401() {
    let (key, _jwks, _pod, router) = identity_setup().await;
    let alice = claims("alice");
    let header = key.header();
    let valid = |input: &[u8]| {
        let signature: Signature = key.signing.sign(input);
        signature.to_bytes().to_vec()
    };
    // The curve order n: r or s equal to it (or 0) is out of range.
    let order = hex("ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551");
    let cases: Vec<(&str, String)> = vec![
        ("r = s = 0", key.sign_raw(&header, &alice, |_| vec![0u8; 64])),
        (
            "r = 0, s valid",
            key.sign_raw(&header, &alice, |i| [vec![0u8; 32], valid(i)[32..].to_vec()].concat()),
        ),
        (
            "r = s = n",
            key.sign_raw(&header, &alice, |_| [order.clone(), order.clone()].concat()),
        ),
        ("63 bytes", key.sign_raw(&header, &alice, |i| valid(i)[..63].to_vec())),
        (
            "65 bytes",
            key.sign_raw(&header, &alice, |i| [valid(i), vec![0]].concat()),
        ),
        (
            "128 bytes (doubled)",
            key.sign_raw(&header, &alice, |i| [valid(i), valid(i)].concat()),
        ),
        ("empty", key.sign_raw(&header, &alice, |_| Vec::new())),
        (
            "DER instead of raw r‖s",
            key.sign_raw(&header, &alice, |i| key.der_signature(i)),
        ),
        (
            "r and s swapped",
            key.sign_raw(&header, &alice, |i| {
                let v = valid(i);
                [v[32..].to_vec(), v[..32].to_vec()].concat()
            }),
        ),
        (
            "signature not base64url",
            format!("{}.{}.{}", b64(header.to_string()), b64(alice.to_string()), "!!!!"),
        ),
        ("padded base64", format!("{}=", key.sign(&header, &alice))),
    ];
    for (case, token) in &cases {
        assert_eq!(status_of(&router, token).await, 401, "{case}");
    }
    assert_eq!(status_of(&router, &key.sign(&header, &alice)).await, 200, "control");
}

fn hex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}

#[tokio::test]
async fn jku_x5u_and_jwk_headers_are_ignored_and_never_fetched() {
    let (key, jwks, _pod, router) = identity_setup().await;
    let attacker = Key::new("attacker");
    let evil = KeyServer::start(vec![attacker.jwk()]).await;
    let alice = claims("alice");
    let pointers = |kid: &str| {
        json!({
            "alg": "ES256", "kid": kid,
            "jku": format!("http://{}/jwks.json", evil.addr),
            "x5u": format!("http://{}/cert.pem", evil.addr),
            "jwk": attacker.jwk(),
        })
    };
    let forged: Vec<(&str, String)> = vec![
        (
            "attacker's kid, jku/x5u/jwk to the attacker",
            attacker.sign(&pointers("attacker"), &alice),
        ),
        (
            "real kid, attacker's signature",
            attacker.sign(&pointers("key-1"), &alice),
        ),
        (
            "only jku",
            attacker.sign(
                &json!({"alg": "ES256", "kid": "attacker", "jku": format!("http://{}/", evil.addr)}),
                &alice,
            ),
        ),
        (
            "only x5u",
            attacker.sign(
                &json!({"alg": "ES256", "kid": "attacker", "x5u": format!("http://{}/", evil.addr)}),
                &alice,
            ),
        ),
        (
            "only an embedded jwk",
            attacker.sign(
                &json!({"alg": "ES256", "kid": "attacker", "jwk": attacker.jwk()}),
                &alice,
            ),
        ),
        (
            "embedded jwk, no kid",
            attacker.sign(&json!({"alg": "ES256", "jwk": attacker.jwk()}), &alice),
        ),
    ];
    for (case, token) in &forged {
        assert_eq!(status_of(&router, token).await, 401, "{case}");
        // Let any rate-limited refetch for the unknown kid happen.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Signed by the real key, the same fields are simply ignored.
    let genuine = key.sign(&pointers("key-1"), &alice);
    assert_eq!(
        status_of(&router, &genuine).await,
        200,
        "the pointers are ignored, not fatal"
    );
    assert_eq!(
        evil.connections(),
        0,
        "the router contacted a URL from a token: {:?}",
        evil.requests()
    );
    let fetched = jwks.requests();
    assert!(
        fetched.iter().all(|r| r == "GET /jwk"),
        "only the configured JWKS URL: {fetched:?}"
    );
}

#[tokio::test]
async fn a_kid_holding_a_url_or_a_path_is_only_an_unknown_kid() {
    let (key, jwks, _pod, router) = identity_setup().await;
    let evil = KeyServer::start(vec![]).await;
    let alice = claims("alice");
    let kids = [
        format!("http://{}/jwk", evil.addr),
        format!("https://{}/jwk", evil.addr),
        format!("//{}/jwk", evil.addr),
        format!("{}", evil.addr),
        "file:///etc/passwd".to_string(),
        "../../../../etc/passwd".to_string(),
        "/jwk".to_string(),
        "/jwk?kid=key-1".to_string(),
        "key-1/../key-1".to_string(),
        "key-1\u{0}".to_string(),
        "key-1 ".to_string(),
        "KEY-1".to_string(),
        "x".repeat(4000),
    ];
    for kid in &kids {
        let token = key.sign(&json!({"alg": "ES256", "kid": kid}), &alice);
        assert_eq!(status_of(&router, &token).await, 401, "kid {kid:.60}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        evil.connections(),
        0,
        "a kid was used as an address: {:?}",
        evil.requests()
    );
    let fetched = jwks.requests();
    assert!(fetched.len() > 1, "unknown kids do cause (rate-limited) refetches");
    assert!(
        fetched.iter().all(|r| r == "GET /jwk"),
        "only the configured JWKS URL: {fetched:?}"
    );
}

/// Runs `attempt` with the current Unix second until the whole attempt
/// stays within that second (so "exactly at the leeway" is exact).
async fn within_one_second<F, Fut>(mut attempt: F) -> u16
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = u16>,
{
    for _ in 0..8 {
        let into_second = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().subsec_millis();
        tokio::time::sleep(Duration::from_millis(u64::from(1010 - into_second))).await;
        let start = unix_now();
        let status = attempt(start).await;
        if unix_now() == start {
            return status;
        }
    }
    panic!("could not fit one request into one second");
}

#[tokio::test]
async fn exp_and_iat_exactly_at_the_leeway_pass_and_one_second_past_fail() {
    let key = Key::new("key-1");
    let jwks = KeyServer::start(vec![key.jwk()]).await;
    let pod = DemoPod::start("pod-1").await.unwrap();
    let router = router(&jwks.url(), &[pod.url()], "leeway = \"30s\"", "").await;
    let token = |exp: u64, iat: u64| {
        let c = with(with(claims("alice"), "exp", json!(exp)), "iat", json!(iat));
        key.sign(&key.header(), &c)
    };
    let at = |exp_offset: i64, iat_offset: i64| {
        let router = &router;
        let token = &token;
        move |now: u64| async move {
            let t = token(
                now.saturating_add_signed(exp_offset),
                now.saturating_add_signed(iat_offset),
            );
            status_of(router, &t).await
        }
    };
    assert_eq!(within_one_second(at(-30, -600)).await, 200, "exp = now - leeway");
    assert_eq!(within_one_second(at(-31, -600)).await, 401, "exp = now - leeway - 1");
    assert_eq!(within_one_second(at(600, 30)).await, 200, "iat = now + leeway");
    assert_eq!(within_one_second(at(600, 31)).await, 401, "iat = now + leeway + 1");
}

#[tokio::test]
async fn claims_of_the_wrong_type_or_missing_get_401() {
    let (key, _jwks, _pod, router) = identity_setup().await;
    let alice = claims("alice");
    let now = unix_now();
    let cases: Vec<(&str, Value)> = vec![
        (
            "exp as a string",
            with(alice.clone(), "exp", json!((now + 600).to_string())),
        ),
        (
            "exp as a float",
            with(alice.clone(), "exp", json!((now + 600) as f64 + 0.5)),
        ),
        ("exp as a bool", with(alice.clone(), "exp", json!(true))),
        ("exp null", with(alice.clone(), "exp", Value::Null)),
        ("exp negative", with(alice.clone(), "exp", json!(-1))),
        (
            "exp as an object",
            with(alice.clone(), "exp", json!({"$numberLong": now + 600})),
        ),
        ("iat as a string", with(alice.clone(), "iat", json!(now.to_string()))),
        ("iat negative", with(alice.clone(), "iat", json!(-5))),
        ("nbf in the future", with(alice.clone(), "nbf", json!(now + 3600))),
        ("nbf as a string", with(alice.clone(), "nbf", json!("0"))),
        ("aud as a number", with(alice.clone(), "aud", json!(456))),
        (
            "aud a list without ours",
            with(alice.clone(), "aud", json!(["/projects/1/apps/x"])),
        ),
        (
            "iss with a trailing slash",
            with(alice.clone(), "iss", json!(format!("{ISSUER}/"))),
        ),
        ("sub as a number", with(alice.clone(), "sub", json!(42))),
        ("sub empty", with(alice.clone(), "sub", json!(""))),
        (
            "email as a list",
            with(alice.clone(), "email", json!(["alice@example.com"])),
        ),
        ("email empty", with(alice.clone(), "email", json!(""))),
        ("no exp", without(alice.clone(), "exp")),
        ("no iat", without(alice.clone(), "iat")),
        ("no aud", without(alice.clone(), "aud")),
        ("no iss", without(alice.clone(), "iss")),
        ("no sub", without(alice.clone(), "sub")),
        ("no email", without(alice.clone(), "email")),
        ("claims not an object", json!(["iss", ISSUER])),
    ];
    for (case, claims) in &cases {
        assert_eq!(
            status_of(&router, &key.sign(&key.header(), claims)).await,
            401,
            "{case}"
        );
    }
    assert_eq!(
        status_of(&router, &key.sign(&key.header(), &alice)).await,
        200,
        "control"
    );
}

#[tokio::test]
async fn an_iss_claim_that_is_not_a_string_gets_401() {
    let (key, _jwks, _pod, router) = identity_setup().await;
    let listed = with(claims("alice"), "iss", json!([ISSUER]));
    assert_eq!(status_of(&router, &key.sign(&key.header(), &listed)).await, 401);
}

#[tokio::test]
async fn two_assertion_headers_get_401_even_when_identical() {
    let (key, _jwks, _pod, router) = identity_setup().await;
    let token = key.sign(&key.header(), &claims("alice"));
    let request = |values: &[&str]| {
        let mut text = format!("GET /whoami HTTP/1.1\r\nhost: {}\r\nconnection: close\r\n", router.addr);
        for v in values {
            text.push_str(&format!("{ASSERTION}: {v}\r\n"));
        }
        text.push_str("\r\n");
        text
    };
    let comma = format!("{token}, {token}");
    let cases: Vec<(&str, String)> = vec![
        ("the same token twice", request(&[&token, &token])),
        ("valid then garbage", request(&[&token, "garbage"])),
        ("garbage then valid", request(&["garbage", &token])),
        ("valid then empty", request(&[&token, ""])),
        ("two in one value", request(&[&comma])),
        (
            "second one in another case",
            request(&[&token]).replace("\r\n\r\n", &format!("\r\nX-Goog-IAP-JWT-Assertion: {token}\r\n\r\n")),
        ),
    ];
    for (case, text) in &cases {
        let (response, _) = raw(router.addr, text.as_bytes(), Duration::from_secs(5)).await;
        assert_eq!(statuses(&response), vec![401], "{case}: {response:.200}");
    }
    let (response, _) = raw(router.addr, request(&[&token]).as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(statuses(&response), vec![200], "control: {response:.200}");
}

#[tokio::test]
async fn the_token_cache_is_keyed_by_the_whole_token() {
    let (key, _jwks, _pod, router) = identity_setup().await;
    let alice = claims("alice");
    let token = key.sign(&key.header(), &alice);
    assert_eq!(status_of(&router, &token).await, 200, "verified, now cached");
    let (signed, signature) = token.rsplit_once('.').unwrap();
    let mut flipped = B64.decode(signature).unwrap();
    flipped[10] ^= 1;
    let forged: Vec<(&str, String)> = vec![
        (
            "same header and claims, zero signature",
            format!("{signed}.{}", b64([0u8; 64])),
        ),
        (
            "same header and claims, one bit flipped",
            format!("{signed}.{}", b64(&flipped)),
        ),
        ("same header and claims, no signature", format!("{signed}.")),
        ("token with a byte appended", format!("{token}A")),
        ("token with a trailing dot", format!("{token}.")),
    ];
    for (case, t) in &forged {
        assert_eq!(status_of(&router, t).await, 401, "{case}");
    }
    // Another valid signature of the same bytes is its own entry, and valid.
    let other = key.sign_randomized(&key.header(), &alice);
    assert_ne!(other, token);
    assert_eq!(status_of(&router, &other).await, 200);
    assert_eq!(status_of(&router, &token).await, 200, "the cached one still works");
}

#[tokio::test]
async fn a_cached_token_is_refused_once_its_exp_has_passed() {
    let key = Key::new("key-1");
    let jwks = KeyServer::start(vec![key.jwk()]).await;
    let pod = DemoPod::start("pod-1").await.unwrap();
    // No leeway: a token is good up to its exp second and not after.
    let router = router(&jwks.url(), &[pod.url()], "leeway = \"0s\"", "").await;
    let exp = unix_now() + 2;
    let token = key.sign(&key.header(), &with(claims("alice"), "exp", json!(exp)));
    assert_eq!(status_of(&router, &token).await, 200);
    assert_eq!(status_of(&router, &token).await, 200, "a cache hit");
    while unix_now() <= exp {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        status_of(&router, &token).await,
        401,
        "served from the cache after its exp"
    );
}

#[test]
fn jsonwebtoken_is_pinned_at_10_3_or_later_with_an_explicit_crypto_backend() {
    let root = env!("CARGO_MANIFEST_DIR");
    let lock = std::fs::read_to_string(format!("{root}/Cargo.lock")).unwrap();
    let version = lock
        .split("[[package]]")
        .find(|p| p.contains("name = \"jsonwebtoken\""))
        .and_then(|p| p.lines().find_map(|l| l.strip_prefix("version = ")))
        .expect("jsonwebtoken in Cargo.lock")
        .trim_matches('"')
        .to_string();
    let parts: Vec<u64> = version.split('.').map(|n| n.parse().unwrap_or(0)).collect();
    assert!(
        (parts[0], parts[1]) >= (10, 3),
        "jsonwebtoken {version}: versions before 10.3 skip exp/nbf of the wrong type (CVE-2026-25537)"
    );
    let manifest = std::fs::read_to_string(format!("{root}/Cargo.toml")).unwrap();
    let line = manifest
        .lines()
        .find(|l| l.trim_start().starts_with("jsonwebtoken"))
        .expect("jsonwebtoken in Cargo.toml");
    assert!(
        line.contains("rust_crypto") || line.contains("aws_lc_rs"),
        "no explicit crypto backend: verification would panic at run time: {line}"
    );
    // And the backend is really there: a signature verifies in this build.
    let key = Key::new("k");
    let token = key.sign(&key.header(), &claims("alice"));
    let jwk = key.jwk();
    let decoding =
        jsonwebtoken::DecodingKey::from_ec_components(jwk["x"].as_str().unwrap(), jwk["y"].as_str().unwrap()).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    validation.set_audience(&[AUDIENCE]);
    assert!(jsonwebtoken::decode::<Value>(&token, &decoding, &validation).is_ok());
}

// ---------------------------------------------------------------------------
// 2. Cookies

fn codec(secret: &[u8], ttl: Duration) -> CookieCodec {
    CookieCodec::new(Signer::new(Secret::new(secret.to_vec())), COOKIE.into(), ttl)
}

/// `session_router=…` pinning `sub` to `backend` at `upstream`, issued at `now`.
fn pin_cookie(codec: &CookieCodec, sub: &str, backend: &str, upstream: SocketAddr, now: SystemTime) -> String {
    let lease = session_router::allocator::Lease {
        backend: backend.into(),
        upstream: upstream.to_string().parse().unwrap(),
    };
    let pin = session_router::session::cookie::Pin::new(&lease, "default", now, now);
    let (header, _) = codec.issue(sub, pin, now);
    header.to_str().unwrap().split(';').next().unwrap().to_string()
}

#[tokio::test]
async fn forged_expired_foreign_oversized_or_duplicated_cookies_are_ignored_never_a_500() {
    let issuer = IapIssuer::start().await;
    let pods = pods(2).await;
    let router = TestRouter::iap(&issuer, &[&pods[0], &pods[1]], "").await;
    let alice_sub = "accounts.google.com:alice";
    let now = SystemTime::now();
    let ours = codec(SECRET, Duration::from_secs(3600));
    // Every cookie below points at static-1 (pod-2). Honoured, it would move
    // Alice there; ignored, she gets the first free backend, pod-1.
    let pinned = |sub: &str, at: SystemTime| pin_cookie(&ours, sub, "static-1", pods[1].addr, at);
    let valid = pinned(alice_sub, now);
    let (prefix, rest) = valid.split_once("v1.").unwrap();
    let (payload, tag) = rest.split_once('.').unwrap();
    assert!(String::from_utf8(B64.decode(payload).unwrap())
        .unwrap()
        .contains("static-1"));
    // Alice's genuine pin for static-0 with its payload swapped for static-1's.
    let tampered = {
        let genuine = pin_cookie(&ours, alice_sub, "static-0", pods[0].addr, now);
        let (_, genuine_rest) = genuine.split_once("v1.").unwrap();
        let (_, genuine_tag) = genuine_rest.split_once('.').unwrap();
        format!("{prefix}v1.{payload}.{genuine_tag}")
    };
    let cases: Vec<(&str, String)> = vec![
        ("expired", pinned(alice_sub, now - Duration::from_secs(7200))),
        ("another user's", pinned("accounts.google.com:bob", now)),
        (
            "signed with another secret",
            pin_cookie(
                &codec(b"another-secret-another-secret-another!!", Duration::from_secs(3600)),
                alice_sub,
                "static-1",
                pods[1].addr,
                now,
            ),
        ),
        ("payload swapped under a genuine tag", tampered),
        (
            "tag truncated",
            format!("{prefix}v1.{payload}.{}", &tag[..tag.len() - 2]),
        ),
        ("oversized", format!("{valid}{}", "A".repeat(5000))),
        ("duplicated", format!("{valid}; {valid}")),
        (
            "duplicated with whitespace",
            format!("{valid};{COOKIE} = {}", &valid[COOKIE.len() + 1..]),
        ),
        ("wrong version", valid.replacen("v1.", "v2.", 1)),
        ("no version", format!("{COOKIE}={payload}.{tag}")),
        ("payload not JSON", format!("{COOKIE}=v1.{}.{tag}", b64("static-1"))),
    ];
    // Control: a valid pin for Alice is honoured, so "ignored" below means something.
    let response = client()
        .get(router.url("/whoami"))
        .header(ASSERTION, issuer.user("alice"))
        .header("cookie", &valid)
        .send()
        .await
        .unwrap();
    assert_eq!(response.json::<Value>().await.unwrap()["pod"], "pod-2", "control");
    release(&router, &issuer.user("alice")).await;

    for (case, cookie) in &cases {
        let response = client()
            .get(router.url("/whoami"))
            .header(ASSERTION, issuer.user("alice"))
            .header("cookie", cookie)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{case}");
        assert_eq!(response.json::<Value>().await.unwrap()["pod"], "pod-1", "{case}");
        release(&router, &issuer.user("alice")).await;
    }

    // Two Cookie headers, each with a valid pin: ambiguous, so neither.
    let token = issuer.user("alice");
    let request = format!(
        "GET /whoami HTTP/1.1\r\nhost: {}\r\n{ASSERTION}: {token}\r\ncookie: {valid}\r\ncookie: {valid}\r\nconnection: close\r\n\r\n",
        router.addr
    );
    let (response, _) = raw(router.addr, request.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(statuses(&response), vec![200], "{response:.300}");
    assert!(response.contains("\"pod-1\""), "two Cookie headers: {response:.400}");
    release(&router, &token).await;

    // Bytes that are not UTF-8 in a Cookie header.
    let mut request = format!(
        "GET /whoami HTTP/1.1\r\nhost: {}\r\n{ASSERTION}: {token}\r\ncookie: {COOKIE}=v1.",
        router.addr
    )
    .into_bytes();
    request.extend_from_slice(&[0xff, 0xfe, 0x80, b'.', 0xc3]);
    request.extend_from_slice(b"\r\nconnection: close\r\n\r\n");
    let (response, _) = raw(router.addr, &request, Duration::from_secs(5)).await;
    assert_eq!(statuses(&response), vec![200], "{response:.300}");
}

async fn release(router: &TestRouter, token: &str) {
    let response = client()
        .post(router.url("/_router/release"))
        .header(ASSERTION, token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn a_valid_cookie_cannot_take_a_backend_someone_else_holds_now() {
    let issuer = IapIssuer::start().await;
    let pods = pods(2).await;
    let router = TestRouter::iap(&issuer, &[&pods[0], &pods[1]], "").await;
    // Alice once held static-0 and kept the cookie; now Bob holds it.
    let old = pin_cookie(
        &codec(SECRET, Duration::from_secs(3600)),
        "accounts.google.com:alice",
        "static-0",
        pods[0].addr,
        SystemTime::now(),
    );
    let bob = whoami(&router, &issuer.user("bob")).await;
    assert_eq!(bob.json::<Value>().await.unwrap()["pod"], "pod-1");
    let response = client()
        .get(router.url("/whoami"))
        .header(ASSERTION, issuer.user("alice"))
        .header("cookie", &old)
        .send()
        .await
        .unwrap();
    assert_eq!(response.json::<Value>().await.unwrap()["pod"], "pod-2");
    let bob_again = whoami(&router, &issuer.user("bob")).await;
    assert_eq!(
        bob_again.json::<Value>().await.unwrap()["pod"],
        "pod-1",
        "Bob kept his backend"
    );
}

// ---------------------------------------------------------------------------
// 3. Cross-site requests

/// Extra request headers, by name.
type Headers = Vec<(&'static str, String)>;

/// Opens a WebSocket through the router; `Ok(())` once switched (then
/// echoes one message), `Err(status)` when refused.
async fn websocket(router: &TestRouter, token: &str, headers: &Headers) -> Result<(), u16> {
    let mut request = router.ws_url("/ws").into_client_request().unwrap();
    request.headers_mut().insert(ASSERTION, token.parse().unwrap());
    for (name, value) in headers {
        request.headers_mut().insert(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((mut socket, _)) => {
            socket.send(Message::text("ping")).await.unwrap();
            assert_eq!(socket.next().await.unwrap().unwrap(), Message::text("ping"));
            let _ = socket.close(None).await;
            Ok(())
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => Err(response.status().as_u16()),
        Err(e) => panic!("websocket failed: {e}"),
    }
}

#[tokio::test]
async fn websocket_upgrades_need_their_own_origin_or_an_allowed_one() {
    let key = Key::new("key-1");
    let jwks = KeyServer::start(vec![key.jwk()]).await;
    let pod = DemoPod::start("pod-1").await.unwrap();
    let router = router(
        &jwks.url(),
        &[pod.url()],
        "",
        "allowed_origins = [\"https://trusted.example\"]",
    )
    .await;
    let token = key.sign(&key.header(), &claims("alice"));
    let own = format!("http://{}", router.addr);
    let origin = |o: &str| vec![("origin", o.to_string())];
    let https = |o: &str| vec![("origin", o.to_string()), ("x-forwarded-proto", "https".to_string())];
    let cases: Vec<(&str, Headers, Result<(), u16>)> = vec![
        ("own origin", origin(&own), Ok(())),
        (
            "own origin behind TLS",
            https(&format!("https://{}", router.addr)),
            Ok(()),
        ),
        ("allowed origin", origin("https://trusted.example"), Ok(())),
        ("allowed origin in capitals", origin("HTTPS://TRUSTED.EXAMPLE"), Ok(())),
        ("no origin (not a browser)", vec![], Ok(())),
        ("another site", origin("https://evil.example"), Err(403)),
        ("null", origin("null"), Err(403)),
        ("allowed host, other scheme", origin("http://trusted.example"), Err(403)),
        (
            "allowed host, other port",
            origin("https://trusted.example:8443"),
            Err(403),
        ),
        (
            "a suffix of the allowed one",
            origin("https://trusted.example.evil.example"),
            Err(403),
        ),
        (
            "own host over http when the request came over https",
            https(&own),
            Err(403),
        ),
        (
            "own host, other port",
            origin(&format!("http://127.0.0.1:{}", router.addr.port() + 1)),
            Err(403),
        ),
    ];
    for (case, headers, expected) in cases {
        assert_eq!(websocket(&router, &token, &headers).await, expected, "{case}");
    }
}

#[tokio::test]
async fn posts_to_router_endpoints_follow_the_same_origin_rule() {
    let key = Key::new("key-1");
    let jwks = KeyServer::start(vec![key.jwk()]).await;
    let pod = DemoPod::start("pod-1").await.unwrap();
    let router = router(
        &jwks.url(),
        &[pod.url()],
        "",
        "allowed_origins = [\"https://trusted.example\"]",
    )
    .await;
    let token = key.sign(&key.header(), &claims("alice"));
    let has_session = || async {
        let status: Value = client()
            .get(router.url("/_router/status"))
            .header(ASSERTION, &token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        !status["session"].is_null()
    };
    let post = |origin: Option<String>| {
        let mut request = client().post(router.url("/_router/release")).header(ASSERTION, &token);
        if let Some(origin) = origin {
            request = request.header("origin", origin);
        }
        async move { request.send().await.unwrap().status().as_u16() }
    };
    for evil in ["https://evil.example", "null", "http://trusted.example"] {
        assert_eq!(status_of(&router, &token).await, 200);
        assert_eq!(post(Some(evil.to_string())).await, 403, "{evil}");
        assert!(has_session().await, "a refused release released anyway ({evil})");
    }
    for fine in [
        Some(format!("http://{}", router.addr)),
        Some("https://trusted.example".into()),
        None,
    ] {
        assert_eq!(status_of(&router, &token).await, 200);
        assert_eq!(post(fine.clone()).await, 200, "{fine:?}");
        assert!(!has_session().await, "{fine:?}");
    }
}

#[tokio::test]
async fn a_refused_upgrade_is_an_ordinary_response_and_never_a_raw_tunnel() {
    let key = Key::new("key-1");
    let jwks = KeyServer::start(vec![key.jwk()]).await;
    let pod = DemoPod::start("pod-1").await.unwrap();
    let router = router(&jwks.url(), &[pod.url()], "", "").await;
    let token = key.sign(&key.header(), &claims("alice"));
    let mut stream = TcpStream::connect(router.addr).await.unwrap();
    // The pod has no WebSocket at /whoami: it answers 200, not 101.
    let upgrade = format!(
        "GET /whoami HTTP/1.1\r\nhost: {}\r\n{ASSERTION}: {token}\r\nconnection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        router.addr
    );
    stream.write_all(upgrade.as_bytes()).await.unwrap();
    let (first, _) = read_for(&mut stream, Duration::from_millis(1500)).await;
    let first = String::from_utf8_lossy(&first).into_owned();
    assert_eq!(statuses(&first), vec![200], "{first}");
    // Were the connection now a tunnel, these bytes would reach the pod
    // without any identity check.
    let sneaky = format!(
        "GET /whoami HTTP/1.1\r\nhost: {}\r\nconnection: close\r\n\r\n",
        router.addr
    );
    let _ = stream.write_all(sneaky.as_bytes()).await;
    let (second, _) = read_for(&mut stream, Duration::from_secs(3)).await;
    let second = String::from_utf8_lossy(&second).into_owned();
    assert!(
        !second.contains("pod-1"),
        "the second request went through a raw tunnel: {second}"
    );
    assert!(
        second.is_empty() || statuses(&second) == vec![401],
        "expected a 401 (or a closed connection): {second}"
    );
}

#[tokio::test]
async fn an_upstream_switching_protocols_unasked_gets_a_502_and_no_tunnel() {
    let key = Key::new("key-1");
    let jwks = KeyServer::start(vec![key.jwk()]).await;
    // An upstream that answers every request with a 101 and then talks.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 8192];
                let _ = stream.read(&mut buf).await;
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: evil\r\n\r\nTUNNEL-DATA",
                    )
                    .await;
                tokio::time::sleep(Duration::from_secs(2)).await;
            });
        }
    });
    let router = router(&jwks.url(), &[format!("http://{upstream}")], "", "").await;
    let token = key.sign(&key.header(), &claims("alice"));
    let request = format!(
        "GET / HTTP/1.1\r\nhost: {}\r\n{ASSERTION}: {token}\r\n\r\n",
        router.addr
    );
    let (response, _) = raw(router.addr, request.as_bytes(), Duration::from_millis(1500)).await;
    assert_eq!(statuses(&response), vec![502], "{response}");
    assert!(!response.contains("TUNNEL-DATA"), "{response}");
    server.abort();
}

// ---------------------------------------------------------------------------
// 4. Request smuggling and malformed HTTP

#[tokio::test]
async fn ambiguous_or_malformed_framing_gets_400_and_nothing_reaches_the_upstream() {
    let key = Key::new("key-1");
    let jwks = KeyServer::start(vec![key.jwk()]).await;
    let upstream = RawUpstream::start().await;
    let router = router(&jwks.url(), &[upstream.url()], "", "").await;
    let token = key.sign(&key.header(), &claims("alice"));
    let host = router.addr;
    let auth = format!("{ASSERTION}: {token}");
    let smuggled = format!("GET /smuggled HTTP/1.1\r\nhost: {host}\r\n{auth}\r\n\r\n");
    let post = |framing: &str, body: &str| {
        format!("POST /upload HTTP/1.1\r\nhost: {host}\r\n{auth}\r\n{framing}\r\n\r\n{body}{smuggled}")
    };
    let cases: Vec<(&str, String)> = vec![
        (
            "Content-Length and Transfer-Encoding",
            post("content-length: 5\r\ntransfer-encoding: chunked", "0\r\n\r\n"),
        ),
        (
            "Transfer-Encoding then Content-Length",
            post("Transfer-Encoding: chunked\r\nContent-Length: 5", "0\r\n\r\n"),
        ),
        (
            "two different Content-Lengths",
            post("content-length: 4\r\ncontent-length: 40", "abcd"),
        ),
        (
            "two Content-Lengths in one value",
            post("content-length: 4, 40", "abcd"),
        ),
        ("Content-Length: +4", post("content-length: +4", "abcd")),
        ("Content-Length: -4", post("content-length: -4", "abcd")),
        ("Content-Length: 0x4", post("content-length: 0x4", "abcd")),
        (
            "Content-Length with a space inside",
            post("content-length: 4 0", "abcd"),
        ),
        (
            "absurd chunk size",
            post(
                "transfer-encoding: chunked",
                "fffffffffffffffffffff\r\nabcd\r\n0\r\n\r\n",
            ),
        ),
        (
            "chunk size not hex",
            post("transfer-encoding: chunked", "zz\r\nabcd\r\n0\r\n\r\n"),
        ),
        (
            "Transfer-Encoding not ending in chunked",
            post("transfer-encoding: chunked, identity", "0\r\n\r\n"),
        ),
        (
            "Transfer-Encoding: xchunked",
            post("transfer-encoding: xchunked", "0\r\n\r\n"),
        ),
        (
            "bare LF line endings",
            format!("GET /whoami HTTP/1.1\nhost: {host}\n{auth}\n\n{smuggled}"),
        ),
        (
            "one bare LF hiding a Transfer-Encoding",
            post("x-pad: a\ntransfer-encoding: chunked\r\ncontent-length: 5", "0\r\n\r\n"),
        ),
        ("a space before the colon", post("content-length : 4", "abcd")),
        (
            "a space before the colon of Transfer-Encoding",
            post("transfer-encoding : chunked", "0\r\n\r\n"),
        ),
        ("a tab before the colon", post("content-length\t: 4", "abcd")),
        (
            "obs-fold continuation line",
            post("content-length: 4\r\nx-folded: a\r\n b", "abcd"),
        ),
        (
            "a header line starting with a space",
            post(" transfer-encoding: chunked\r\ncontent-length: 4", "abcd"),
        ),
        (
            "NUL in a header value",
            post("content-length: 4\r\nx-nul: a\0b", "abcd"),
        ),
        (
            "bare CR",
            format!("GET /whoami HTTP/1.1\rhost: {host}\r\n{auth}\r\n\r\n{smuggled}"),
        ),
    ];
    for (case, request) in &cases {
        let (response, closed) = raw(router.addr, request.as_bytes(), Duration::from_secs(5)).await;
        assert_eq!(statuses(&response), vec![400], "{case}: {response:.300}");
        assert!(closed, "{case}: connection left open after a 400");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = upstream.received();
    assert!(
        !seen.contains("smuggled"),
        "a smuggled request reached the upstream:\n{seen}"
    );
    // Only the chunked case has a well-formed head; its broken body is refused.
    assert!(upstream.requests() <= 1, "the upstream saw:\n{seen}");

    // Control: the same upstream sees a well-formed request.
    let fine = format!("GET /fine HTTP/1.1\r\nhost: {host}\r\n{auth}\r\nconnection: close\r\n\r\n");
    let (response, _) = raw(router.addr, fine.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(statuses(&response), vec![200], "{response:.300}");
    assert!(upstream.received().contains("GET /fine HTTP/1.1"));
}

#[tokio::test]
async fn a_pipelined_second_request_is_checked_like_the_first() {
    let key = Key::new("key-1");
    let jwks = KeyServer::start(vec![key.jwk()]).await;
    let upstream = RawUpstream::start().await;
    let router = router(&jwks.url(), &[upstream.url()], "", "").await;
    let token = key.sign(&key.header(), &claims("alice"));
    let host = router.addr;
    let auth = format!("{ASSERTION}: {token}");
    let first = format!("GET /first HTTP/1.1\r\nhost: {host}\r\n{auth}\r\n\r\n");
    let smuggled = format!("GET /smuggled HTTP/1.1\r\nhost: {host}\r\n{auth}\r\n\r\n");
    let seconds: Vec<(&str, String)> = vec![
        (
            "Content-Length and Transfer-Encoding",
            format!("POST /second HTTP/1.1\r\nhost: {host}\r\n{auth}\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"),
        ),
        ("bare LF", format!("GET /second HTTP/1.1\nhost: {host}\n{auth}\n\n{smuggled}")),
    ];
    for (case, second) in &seconds {
        // Both requests in one write, so they arrive in one read.
        let both = format!("{first}{second}");
        let (response, _) = raw(router.addr, both.as_bytes(), Duration::from_secs(3)).await;
        assert_eq!(statuses(&response), vec![200, 400], "{case}: {response:.600}");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = upstream.received();
    assert!(
        !seen.contains("smuggled"),
        "a smuggled request reached the upstream:\n{seen}"
    );
    assert!(
        !seen.contains("/second"),
        "the malformed second request reached the upstream:\n{seen}"
    );
}

// ---------------------------------------------------------------------------
// 5. Size and time limits

#[tokio::test]
async fn oversized_heads_get_431_and_over_long_uris_414_at_the_configured_limits() {
    let key = Key::new("key-1");
    let jwks = KeyServer::start(vec![key.jwk()]).await;
    let pod = DemoPod::start("pod-1").await.unwrap();
    let token = key.sign(&key.header(), &claims("alice"));
    let request = |host: SocketAddr, path: &str, pad: usize, headers: usize| {
        let mut text = format!("GET {path} HTTP/1.1\r\nhost: {host}\r\n{ASSERTION}: {token}\r\nconnection: close\r\n");
        if pad > 0 {
            text.push_str(&format!("x-pad: {}\r\n", "a".repeat(pad)));
        }
        for i in 0..headers {
            text.push_str(&format!("x-h{i}: v\r\n"));
        }
        text.push_str("\r\n");
        text
    };
    let status = |text: String, addr: SocketAddr| async move {
        let (response, _) = raw(addr, text.as_bytes(), Duration::from_secs(5)).await;
        statuses(&response)
    };

    let small = router(
        &jwks.url(),
        &[pod.url()],
        "",
        "max_header_bytes = 4096\nmax_uri_bytes = 1024",
    )
    .await;
    let a = small.addr;
    let query = |n: usize| format!("/whoami?q={}", "a".repeat(n));
    assert_eq!(
        status(request(a, "/whoami", 2500, 0), a).await,
        vec![200],
        "head under the limit"
    );
    assert_eq!(
        status(request(a, "/whoami", 5000, 0), a).await,
        vec![431],
        "head over the limit"
    );
    assert_eq!(
        status(request(a, &query(900), 0, 0), a).await,
        vec![200],
        "URI under the limit"
    );
    assert_eq!(
        status(request(a, &query(1100), 0, 0), a).await,
        vec![414],
        "URI over the limit"
    );
    assert_eq!(
        status(request(a, "/whoami", 0, 150), a).await,
        vec![431],
        "more than 100 header fields"
    );

    let defaults = router(&jwks.url(), &[pod.url()], "", "").await;
    let d = defaults.addr;
    assert_eq!(
        status(request(d, "/whoami", 60_000, 0), d).await,
        vec![200],
        "60 KB head"
    );
    assert_eq!(
        status(request(d, "/whoami", 70_000, 0), d).await,
        vec![431],
        "default limit 64 KiB"
    );
    assert_eq!(
        status(request(d, &query(16_000), 0, 0), d).await,
        vec![200],
        "16 000-byte URI"
    );
    assert_eq!(
        status(request(d, &query(17_000), 0, 0), d).await,
        vec![414],
        "default limit 16 KiB"
    );
}

#[tokio::test]
async fn a_uri_longer_than_the_head_limit_gets_414_and_a_clean_close() {
    let key = Key::new("key-1");
    let jwks = KeyServer::start(vec![key.jwk()]).await;
    let pod = DemoPod::start("pod-1").await.unwrap();
    let router = router(&jwks.url(), &[pod.url()], "", "").await;
    for size in [20_000, 70_000, 200_000] {
        let request = format!(
            "GET /whoami?q={} HTTP/1.1\r\nhost: {}\r\nconnection: keep-alive\r\n\r\n",
            "a".repeat(size),
            router.addr
        );
        let mut stream = TcpStream::connect(router.addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        let ended = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
        let text = String::from_utf8_lossy(&answer);
        let ended = ended.unwrap_or_else(|_| panic!("{size}-byte URI: connection left open; got {text:.300}"));
        assert!(
            ended.is_ok(),
            "{size}-byte URI: the connection was reset, not closed: {ended:?}; got {text:.300}"
        );
        assert_eq!(statuses(&text), vec![414], "{size}-byte URI: {text:.300}");
        assert!(text.contains("URI Too Long"), "{text:.300}");
    }
}

#[test]
fn the_documented_defaults_hold() {
    let text =
        format!("[auth]\naudiences = [\"{AUDIENCE}\"]\n[backend.static]\nupstreams = [\"http://127.0.0.1:1\"]\n");
    let config = Config::from_toml(&text, Some(SECRET.to_vec())).unwrap();
    let s = &config.server;
    assert!(
        s.keepalive_timeout > Duration::from_secs(600),
        "must outlive the load balancer's 600 s"
    );
    assert_eq!(s.keepalive_timeout, Duration::from_secs(620));
    assert_eq!(s.header_timeout, Duration::from_secs(30));
    assert_eq!(s.body_timeout, Duration::from_secs(60));
    assert_eq!(s.max_header_bytes, 65_536);
    assert_eq!(s.max_uri_bytes, 16_384);
    assert!(s.allowed_origins.is_empty());
    assert_eq!(config.auth.leeway, Duration::from_secs(30));
}

/// Opens a connection and sends `start`, then one header line every
/// `every`, never finishing the head. Returns how long after the first
/// byte the router closed the connection (or `None` within `limit`), and
/// what it sent back.
async fn trickle(addr: SocketAddr, start: &[u8], every: Duration, limit: Duration) -> (Option<Duration>, String) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let began = Instant::now();
    write.write_all(start).await.unwrap();
    let writer = tokio::spawn(async move {
        for _ in 0..1000 {
            tokio::time::sleep(every).await;
            if write.write_all(b"x-slow: 1\r\n").await.is_err() {
                return;
            }
        }
    });
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match tokio::time::timeout(limit.saturating_sub(began.elapsed()), read.read(&mut buf)).await {
            Err(_) => break None,
            Ok(Ok(0)) | Ok(Err(_)) => break Some(began.elapsed()),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    };
    writer.abort();
    (closed, String::from_utf8_lossy(&got).into_owned())
}

#[tokio::test]
async fn a_slowloris_client_is_cut_off_after_the_header_timeout_while_others_are_served() {
    let key = Key::new("key-1");
    let jwks = KeyServer::start(vec![key.jwk()]).await;
    let pod = DemoPod::start("pod-1").await.unwrap();
    let router = router(&jwks.url(), &[pod.url()], "", "header_timeout = \"1s\"").await;
    let token = key.sign(&key.header(), &claims("alice"));
    let addr = router.addr;
    let slow: Vec<_> = (0..20)
        .map(|_| {
            tokio::spawn(async move {
                trickle(
                    addr,
                    b"GET /whoami HTTP/1.1\r\n",
                    Duration::from_millis(150),
                    Duration::from_secs(8),
                )
                .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    assert_eq!(status_of(&router, &token).await, 200);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "a normal client was held up by slow ones"
    );
    for task in slow {
        let (closed, response) = task.await.unwrap();
        let closed = closed.expect("a slowloris connection was never closed");
        assert!(closed >= Duration::from_millis(900), "closed early, after {closed:?}");
        assert!(closed < Duration::from_secs(4), "closed only after {closed:?}");
        assert!(!response.contains(" 200 "), "{response}");
    }
}

#[tokio::test]
async fn the_header_clock_starts_at_the_first_byte_of_a_head_not_at_the_last_response() {
    let key = Key::new("key-1");
    let jwks = KeyServer::start(vec![key.jwk()]).await;
    let pod = DemoPod::start("pod-1").await.unwrap();
    let router = router(
        &jwks.url(),
        &[pod.url()],
        "",
        "header_timeout = \"1s\"\nkeepalive_timeout = \"10s\"",
    )
    .await;
    let token = key.sign(&key.header(), &claims("alice"));
    let mut stream = TcpStream::connect(router.addr).await.unwrap();
    let request = format!(
        "GET /whoami HTTP/1.1\r\nhost: {}\r\n{ASSERTION}: {token}\r\n\r\n",
        router.addr
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let (first, closed) = read_for(&mut stream, Duration::from_millis(1500)).await;
    assert!(!closed);
    assert_eq!(statuses(&String::from_utf8_lossy(&first)), vec![200]);
    // Idle for longer than the header timeout: still open (keep-alive).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Now trickle a head: cut off about 1 s after its first byte.
    let (mut read, mut write) = stream.into_split();
    let began = Instant::now();
    write.write_all(b"GET /whoami HTTP/1.1\r\n").await.unwrap();
    let writer = tokio::spawn(async move {
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            if write.write_all(b"x-slow: 1\r\n").await.is_err() {
                return;
            }
        }
    });
    let mut buf = [0u8; 1024];
    let result = tokio::time::timeout(Duration::from_secs(6), read.read(&mut buf)).await;
    let elapsed = began.elapsed();
    writer.abort();
    assert!(matches!(result, Ok(Ok(0)) | Ok(Err(_))), "not closed: {result:?}");
    assert!(
        elapsed >= Duration::from_millis(900),
        "closed after {elapsed:?}: the clock ran while idle"
    );
    assert!(elapsed < Duration::from_secs(4), "closed after {elapsed:?}");
}

#[tokio::test]
async fn a_stalled_body_is_cut_off_after_the_body_timeout_but_a_slow_steady_one_is_not() {
    let key = Key::new("key-1");
    let jwks = KeyServer::start(vec![key.jwk()]).await;
    let pod = DemoPod::start("pod-1").await.unwrap();
    let router = router(&jwks.url(), &[pod.url()], "", "body_timeout = \"1s\"").await;
    let token = key.sign(&key.header(), &claims("alice"));
    let head = |length: usize| {
        format!(
            "POST /upload HTTP/1.1\r\nhost: {}\r\n{ASSERTION}: {token}\r\ncontent-length: {length}\r\n\r\n",
            router.addr
        )
    };
    // Stalled: 10 of 100 bytes, then nothing.
    let mut stream = TcpStream::connect(router.addr).await.unwrap();
    stream.write_all(head(100).as_bytes()).await.unwrap();
    stream.write_all(b"0123456789").await.unwrap();
    let began = Instant::now();
    let (response, closed) = read_for(&mut stream, Duration::from_secs(6)).await;
    let elapsed = began.elapsed();
    let response = String::from_utf8_lossy(&response);
    assert!(closed, "a stalled body kept its connection: {response}");
    assert!(elapsed >= Duration::from_millis(900), "cut off after {elapsed:?}");
    assert!(elapsed < Duration::from_secs(4), "cut off only after {elapsed:?}");
    assert!(!response.contains(" 200 "), "{response}");

    // Slow but steady: one byte every 400 ms, 4 s in all, is never stalled 1 s.
    let mut stream = TcpStream::connect(router.addr).await.unwrap();
    stream.write_all(head(10).as_bytes()).await.unwrap();
    for byte in b"0123456789" {
        tokio::time::sleep(Duration::from_millis(400)).await;
        stream.write_all(&[*byte]).await.unwrap();
    }
    let (response, _) = read_for(&mut stream, Duration::from_secs(3)).await;
    let response = String::from_utf8_lossy(&response);
    assert_eq!(statuses(&response), vec![200], "{response}");
    assert!(response.contains("\"bytes\":10"), "{response}");
}

#[tokio::test]
async fn idle_keep_alive_connections_outlive_the_header_timeout_and_close_at_the_keepalive_timeout() {
    let key = Key::new("key-1");
    let jwks = KeyServer::start(vec![key.jwk()]).await;
    let pod = DemoPod::start("pod-1").await.unwrap();
    let router = router(
        &jwks.url(),
        &[pod.url()],
        "",
        "header_timeout = \"500ms\"\nkeepalive_timeout = \"3s\"",
    )
    .await;
    let token = key.sign(&key.header(), &claims("alice"));
    let request = format!(
        "GET /whoami HTTP/1.1\r\nhost: {}\r\n{ASSERTION}: {token}\r\n\r\n",
        router.addr
    );
    let mut stream = TcpStream::connect(router.addr).await.unwrap();
    for round in 0..2 {
        stream.write_all(request.as_bytes()).await.unwrap();
        let (response, closed) = read_for(&mut stream, Duration::from_millis(700)).await;
        assert!(!closed, "round {round}");
        assert_eq!(
            statuses(&String::from_utf8_lossy(&response)),
            vec![200],
            "round {round}"
        );
        // Idle three times the header timeout: a keep-alive connection stays.
        if round == 0 {
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
    }
    let began = Instant::now();
    let (_, closed) = read_for(&mut stream, Duration::from_secs(8)).await;
    let idle = began.elapsed();
    assert!(closed, "an idle connection was never closed");
    assert!(
        idle >= Duration::from_millis(2200),
        "closed after {idle:?} idle, before keepalive_timeout"
    );
    assert!(idle < Duration::from_secs(5), "closed only after {idle:?}");
}

#[tokio::test]
async fn an_absurd_server_timeout_is_refused_by_the_config_or_harmless() {
    let key = Key::new("key-1");
    let jwks = KeyServer::start(vec![key.jwk()]).await;
    let pod = DemoPod::start("pod-1").await.unwrap();
    let token = key.sign(&key.header(), &claims("alice"));
    for name in ["keepalive_timeout", "header_timeout", "body_timeout"] {
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n{name} = \"500000000000y\"\n[auth]\naudiences = [\"{AUDIENCE}\"]\njwks_url = \"{}\"\n[backend.static]\nupstreams = [\"{}\"]\n",
            jwks.url(),
            pod.url()
        );
        if Config::from_toml(&text, Some(SECRET.to_vec())).is_err() {
            continue; // refused with a named problem: fine
        }
        // Accepted: then it must work. (TestRouter::start waits for /readyz.)
        let router = tokio::time::timeout(Duration::from_secs(10), TestRouter::start(&text))
            .await
            .unwrap_or_else(|_| panic!("{name}: the router never answered"));
        let upload = client()
            .post(router.url("/upload"))
            .header(ASSERTION, &token)
            .body("0123456789")
            .send()
            .await;
        assert!(upload.is_ok_and(|r| r.status() == 200), "{name}");
    }
}

// ---------------------------------------------------------------------------
// Isolation on Agones: the user label

#[tokio::test]
async fn two_emails_that_differ_only_in_where_the_at_sign_is_get_two_gameservers() {
    let issuer = IapIssuer::start().await;
    let pods = pods(2).await;
    let fake = FakeAgones::start().await;
    fake.add_ready("gs-1", pods[0].addr);
    fake.add_ready("gs-2", pods[1].addr);
    let router = TestRouter::agones(&issuer, &fake, "agones", "", "").await;
    let victim = issuer.token("accounts.google.com:1", "alice.smith@example.com").sign();
    let other = issuer.token("accounts.google.com:2", "alice@smith.example.com").sign();
    let pod_of = |token: String| {
        let router = &router;
        async move {
            let response = whoami(router, &token).await;
            assert_eq!(response.status(), 200);
            response.json::<Value>().await.unwrap()["pod"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    assert_eq!(pod_of(victim).await, "pod-1");
    assert_eq!(
        pod_of(other).await,
        "pod-2",
        "another person was routed to alice.smith's GameServer"
    );
}
