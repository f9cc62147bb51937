//! A stand-in for Cloud IAP's signing side: real P-256 keys, real ES256
//! tokens with IAP's claims, and a JWKS endpoint whose key set can rotate
//! and whose availability can be switched off.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use p256::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
use serde_json::{json, Map, Value};

use super::AUDIENCE;

/// One IAP-style signing key.
#[derive(Clone)]
pub struct SigningKey {
    pub kid: String,
    secret: p256::SecretKey,
}

impl SigningKey {
    pub fn generate(kid: &str) -> SigningKey {
        SigningKey {
            kid: kid.to_string(),
            secret: p256::SecretKey::random(&mut rand::rngs::OsRng),
        }
    }

    /// The JWKS entry, exactly as IAP publishes its keys.
    pub fn jwk(&self) -> Value {
        let point = self.secret.public_key().to_encoded_point(false);
        json!({
            "alg": "ES256", "crv": "P-256", "kid": self.kid, "kty": "EC", "use": "sig",
            "x": B64.encode(point.x().unwrap()),
            "y": B64.encode(point.y().unwrap()),
        })
    }

    pub fn public_pem(&self) -> String {
        self.secret.public_key().to_public_key_pem(LineEnding::LF).unwrap()
    }

    fn encoding_key(&self) -> EncodingKey {
        EncodingKey::from_ec_der(self.secret.to_pkcs8_der().unwrap().as_bytes())
    }
}

struct Jwks {
    keys: Mutex<Vec<Value>>,
    fetches: AtomicUsize,
    failing: AtomicBool,
}

/// The issuer and its JWKS server.
pub struct IapIssuer {
    pub key: SigningKey,
    addr: SocketAddr,
    jwks: Arc<Jwks>,
    task: tokio::task::JoinHandle<()>,
}

impl IapIssuer {
    /// An issuer publishing one key, `key-1`.
    pub async fn start() -> IapIssuer {
        let key = SigningKey::generate("key-1");
        let jwks = Arc::new(Jwks {
            keys: Mutex::new(vec![key.jwk()]),
            fetches: AtomicUsize::new(0),
            failing: AtomicBool::new(false),
        });
        let app = Router::new().route("/jwk", get(serve_jwks)).with_state(jwks.clone());
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        IapIssuer { key, addr, jwks, task }
    }

    pub fn jwks_url(&self) -> String {
        format!("http://{}/jwk", self.addr)
    }

    /// Adds a key to the published set (a rotation in progress).
    pub fn publish(&self, key: &SigningKey) {
        self.jwks.keys.lock().unwrap().push(key.jwk());
    }

    /// How many times the JWKS has been fetched.
    pub fn fetches(&self) -> usize {
        self.jwks.fetches.load(Ordering::SeqCst)
    }

    /// Makes the JWKS endpoint answer 503 (or recover).
    pub fn set_failing(&self, failing: bool) {
        self.jwks.failing.store(failing, Ordering::SeqCst);
    }

    /// A valid token for `sub`/`email`, to be adjusted before signing.
    pub fn token(&self, sub: &str, email: &str) -> TokenBuilder {
        let now = now();
        let mut claims = Map::new();
        claims.insert("iss".into(), json!("https://cloud.google.com/iap"));
        claims.insert("aud".into(), json!(AUDIENCE));
        claims.insert("sub".into(), json!(sub));
        claims.insert("email".into(), json!(email));
        claims.insert("iat".into(), json!(now));
        claims.insert("exp".into(), json!(now + 600));
        TokenBuilder {
            key: self.key.clone(),
            kid: Some(self.key.kid.clone()),
            claims,
        }
    }

    /// A signed token for a user called `name` (`accounts.google.com:name`,
    /// `name@example.com`).
    pub fn user(&self, name: &str) -> String {
        self.token(&format!("accounts.google.com:{name}"), &format!("{name}@example.com"))
            .sign()
    }
}

impl Drop for IapIssuer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_jwks(State(jwks): State<Arc<Jwks>>) -> axum::response::Response {
    jwks.fetches.fetch_add(1, Ordering::SeqCst);
    if jwks.failing.load(Ordering::SeqCst) {
        return (http::StatusCode::SERVICE_UNAVAILABLE, "down").into_response();
    }
    let keys = jwks.keys.lock().unwrap().clone();
    (
        [("cache-control", "public, max-age=3600")],
        axum::Json(json!({ "keys": keys })),
    )
        .into_response()
}

pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

pub struct TokenBuilder {
    key: SigningKey,
    kid: Option<String>,
    claims: Map<String, Value>,
}

impl TokenBuilder {
    pub fn claim(mut self, name: &str, value: Value) -> Self {
        self.claims.insert(name.into(), value);
        self
    }

    pub fn without(mut self, name: &str) -> Self {
        self.claims.remove(name);
        self
    }

    pub fn signed_by(mut self, key: &SigningKey) -> Self {
        self.kid = Some(key.kid.clone());
        self.key = key.clone();
        self
    }

    pub fn kid(mut self, kid: &str) -> Self {
        self.kid = Some(kid.into());
        self
    }

    pub fn sign(self) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = self.kid;
        jsonwebtoken::encode(&header, &Value::Object(self.claims), &self.key.encoding_key()).unwrap()
    }

    /// The classic confusion attack: HS256 with the public key as the secret.
    pub fn sign_hs256_with_public_key(self) -> String {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = self.kid;
        let secret = EncodingKey::from_secret(self.key.public_pem().as_bytes());
        jsonwebtoken::encode(&header, &Value::Object(self.claims), &secret).unwrap()
    }

    /// An unsigned token (`alg: none`).
    pub fn unsigned(self) -> String {
        let header = json!({ "alg": "none", "typ": "JWT", "kid": self.kid });
        format!(
            "{}.{}.",
            B64.encode(header.to_string()),
            B64.encode(Value::Object(self.claims).to_string())
        )
    }
}
