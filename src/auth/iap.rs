//! Verification of the `x-goog-iap-jwt-assertion` header, as Google's
//! "Securing your app with signed headers" prescribes: ES256 only, key by
//! `kid`, `iss`, `aud`, `exp` and `iat` checked with a small leeway.
//!
//! A repeated token costs a hash-map lookup, not a signature check: verified
//! tokens are remembered, keyed by the whole token string, until their `exp`.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::util::FastMap;
use jsonwebtoken::{Algorithm, Validation};
use serde::Deserialize;

use super::jwks::KeyStore;
use super::{AuthError, Identity};
use crate::config::{AuthConfig, IAP_ISSUER};

/// The header IAP signs every request with.
pub const ASSERTION_HEADER: &str = "x-goog-iap-jwt-assertion";
/// Real IAP tokens are well under 2 KiB; anything far larger is not one.
const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// How a token was found good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Seen and verified before; still before its `exp`.
    Cached,
    /// Signature and claims checked now.
    Verified,
}

impl Check {
    pub fn label(self) -> &'static str {
        match self {
            Check::Cached => "cached",
            Check::Verified => "verified",
        }
    }
}

pub struct IapVerifier {
    keys: Arc<KeyStore>,
    validation: Validation,
    leeway_secs: u64,
    cache: TokenCache,
}

#[derive(Deserialize)]
struct Claims {
    /// Also checked by jsonwebtoken, which accepts a list too; IAP sends
    /// one string, and anything else is refused here.
    #[allow(dead_code)]
    iss: String,
    sub: String,
    email: String,
    iat: u64,
    exp: u64,
    #[serde(default)]
    hd: Option<String>,
}

impl IapVerifier {
    pub fn new(config: &AuthConfig, keys: Arc<KeyStore>) -> Self {
        let mut validation = Validation::new(Algorithm::ES256);
        validation.leeway = config.leeway.as_secs();
        validation.set_issuer(&[IAP_ISSUER]);
        validation.set_audience(&config.audiences);
        validation.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub"]);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        IapVerifier {
            keys,
            validation,
            leeway_secs: config.leeway.as_secs(),
            cache: TokenCache::new(config.token_cache_entries),
        }
    }

    pub fn keys(&self) -> &Arc<KeyStore> {
        &self.keys
    }

    /// Drops expired verified tokens; called periodically.
    pub fn purge_expired(&self) {
        self.cache.purge(unix_now());
    }

    /// The identity in the request's single assertion header, and whether
    /// it came from the verified-token cache.
    pub async fn verify_headers(&self, headers: &http::HeaderMap) -> Result<(Arc<Identity>, Check), AuthError> {
        static ASSERTION: http::HeaderName = http::HeaderName::from_static(ASSERTION_HEADER);
        let mut values = headers.get_all(&ASSERTION).iter();
        let token = match (values.next(), values.next()) {
            (None, _) => return Err(AuthError::Missing),
            (Some(_), Some(_)) => return Err(AuthError::Duplicated),
            (Some(v), None) => v.to_str().map_err(|_| AuthError::Malformed("not ASCII"))?,
        };
        self.check(token).await
    }

    pub async fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        self.check(token).await.map(|(identity, _)| Identity::clone(&identity))
    }

    async fn check(&self, token: &str) -> Result<(Arc<Identity>, Check), AuthError> {
        let now = unix_now();
        if let Some(identity) = self.cache.get(token, now) {
            return Ok((identity, Check::Cached));
        }
        // Boxed: a full verification (which may fetch keys) is rare, and its
        // state would otherwise make every request's future larger.
        Box::pin(self.verify_uncached(token, now)).await
    }

    async fn verify_uncached(&self, token: &str, now: u64) -> Result<(Arc<Identity>, Check), AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Malformed("too long"));
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed("bad header"))?;
        if header.alg != Algorithm::ES256 {
            return Err(AuthError::Algorithm(format!("{:?}", header.alg)));
        }
        let kid = header.kid.ok_or(AuthError::Malformed("no kid"))?;
        let key = match self.keys.key(&kid).await {
            Some(key) => key,
            None if !self.keys.is_loaded() => return Err(AuthError::KeysUnavailable),
            None => return Err(AuthError::UnknownKey),
        };
        let claims = jsonwebtoken::decode::<Claims>(token, &key, &self.validation)
            .map_err(|e| AuthError::Rejected(e.kind().clone()))?
            .claims;
        if claims.iat > now + self.leeway_secs {
            return Err(AuthError::IssuedInFuture);
        }
        if claims.sub.is_empty() || claims.email.is_empty() {
            return Err(AuthError::Malformed("empty sub or email"));
        }
        let identity = Arc::new(Identity::new(&claims.sub, &claims.email, claims.hd.as_deref()));
        self.cache.insert(token, identity.clone(), claims.exp, now);
        Ok((identity, Check::Verified))
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Verified tokens, bounded. Entries die at the token's own `exp`.
struct TokenCache {
    /// Shared identities: a cache hit clones one `Arc`, not three.
    entries: FastMap<Box<str>, (Arc<Identity>, u64)>,
    capacity: usize,
}

impl TokenCache {
    fn new(capacity: usize) -> Self {
        TokenCache {
            entries: FastMap::default(),
            capacity,
        }
    }

    fn get(&self, token: &str, now: u64) -> Option<Arc<Identity>> {
        let hit = self.entries.get(token).and_then(|entry| {
            let (identity, exp) = entry.value();
            (*exp > now).then(|| identity.clone())
        });
        if hit.is_none() {
            self.entries.remove_if(token, |_, (_, exp)| *exp <= now);
        }
        hit
    }

    fn insert(&self, token: &str, identity: Arc<Identity>, exp: u64, now: u64) {
        if self.capacity == 0 || exp <= now {
            return;
        }
        if self.entries.len() >= self.capacity {
            self.purge(now);
            // Still full of live tokens: make room by dropping the one that
            // expires first, so new tokens keep being cached.
            if self.entries.len() >= self.capacity {
                let soonest = self
                    .entries
                    .iter()
                    .min_by_key(|entry| entry.value().1)
                    .map(|entry| entry.key().clone());
                if let Some(key) = soonest {
                    self.entries.remove(&key);
                }
            }
        }
        self.entries.insert(token.into(), (identity, exp));
    }

    /// Drops every expired entry, so the cache shrinks back after a burst.
    fn purge(&self, now: u64) {
        self.entries.retain(|_, (_, exp)| *exp > now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alice() -> Arc<Identity> {
        Arc::new(Identity::new("accounts.google.com:1", "alice@example.com", None))
    }

    #[test]
    fn a_cached_token_dies_at_its_exp() {
        let cache = TokenCache::new(10);
        cache.insert("t", alice(), 100, 50);
        assert!(cache.get("t", 99).is_some());
        assert!(cache.get("t", 100).is_none());
        assert_eq!(cache.entries.len(), 0, "expired entry is dropped on lookup");
    }

    #[test]
    fn the_cache_is_keyed_by_the_whole_token() {
        let cache = TokenCache::new(10);
        cache.insert("header.payload.sig1", alice(), 100, 50);
        assert!(cache.get("header.payload.sig2", 60).is_none());
        assert!(cache.get("header.payload.sig1", 60).is_some());
    }

    #[test]
    fn a_full_cache_stays_bounded() {
        let cache = TokenCache::new(2);
        cache.insert("a", alice(), 100, 0);
        cache.insert("b", alice(), 100, 0);
        cache.insert("c", alice(), 90, 0);
        assert_eq!(cache.entries.len(), 2);
        assert!(cache.get("c", 10).is_some(), "a new token still gets cached");
        cache.purge(95);
        assert_eq!(cache.entries.len(), 1, "the expired entry is purged");
    }
}
