//! IAP's signing keys: fetched from the JWKS URL, cached by `kid`, refreshed
//! on the `Cache-Control` schedule and, rate-limited and single-flight, when a
//! token names a key we have not seen (keys rotate without notice).
//!
//! A failed fetch never evicts keys already cached: a JWKS outage must not
//! log everybody out.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use jsonwebtoken::DecodingKey;

use crate::metrics::Metrics;
use serde::Deserialize;
use tokio::time::Instant;

/// Bounds on the refresh period taken from `Cache-Control: max-age`.
const MIN_REFRESH: Duration = Duration::from_secs(10);
const MAX_REFRESH: Duration = Duration::from_secs(6 * 3600);
/// Used when the response carries no usable `max-age`.
const DEFAULT_REFRESH: Duration = Duration::from_secs(3600);
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("fetching {url}: {source}")]
    Fetch {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url} answered {status}")]
    Status { url: String, status: u16 },
    #[error("{url} holds no usable ES256 P-256 key")]
    NoKeys { url: String },
}

type KeyMap = HashMap<String, Arc<DecodingKey>>;

/// The cached key set. Cheap to read: one uncontended read lock and an `Arc`
/// clone, never held across an `.await`.
pub struct KeyStore {
    url: String,
    http: reqwest::Client,
    keys: RwLock<Arc<KeyMap>>,
    loaded: AtomicBool,
    /// Serialises fetches and remembers when the last one started, so a burst
    /// of tokens with an unknown `kid` costs at most one fetch per interval.
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
    refetch_interval: Duration,
    /// When the current key set was fetched, in ms since `created`.
    loaded_at_ms: std::sync::atomic::AtomicU64,
    created: Instant,
    metrics: Option<Arc<Metrics>>,
}

#[derive(Deserialize)]
struct JwkSet {
    keys: Vec<Jwk>,
}

#[derive(Deserialize)]
struct Jwk {
    kid: Option<String>,
    kty: Option<String>,
    crv: Option<String>,
    alg: Option<String>,
    x: Option<String>,
    y: Option<String>,
}

impl KeyStore {
    pub fn new(url: String, refetch_interval: Duration) -> Self {
        KeyStore {
            url,
            http: reqwest::Client::builder()
                .timeout(FETCH_TIMEOUT)
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("a TLS backend is compiled in"),
            keys: RwLock::new(Arc::new(KeyMap::new())),
            loaded: AtomicBool::new(false),
            last_fetch: tokio::sync::Mutex::new(None),
            refetch_interval,
            loaded_at_ms: std::sync::atomic::AtomicU64::new(0),
            created: Instant::now(),
            metrics: None,
        }
    }

    /// Counts fetches and reports the key set's age in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// How long ago the cached key set was fetched, if ever.
    pub fn age(&self) -> Option<Duration> {
        self.is_loaded().then(|| {
            let loaded = Duration::from_millis(self.loaded_at_ms.load(Ordering::Acquire));
            self.created.elapsed().saturating_sub(loaded)
        })
    }

    /// Updates the key-age gauge; called periodically.
    pub fn report_age(&self) {
        if let (Some(metrics), Some(age)) = (&self.metrics, self.age()) {
            metrics.jwks_key_age_seconds.set(age.as_secs() as i64);
        }
    }

    /// True once at least one key set has been loaded.
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    pub fn cached(&self, kid: &str) -> Option<Arc<DecodingKey>> {
        self.keys.read().expect("key lock poisoned").get(kid).cloned()
    }

    /// The key for `kid`, refetching the set first if it is unknown and the
    /// last fetch is older than the refetch interval.
    pub async fn key(&self, kid: &str) -> Option<Arc<DecodingKey>> {
        if let Some(key) = self.cached(kid) {
            return Some(key);
        }
        let mut last = self.last_fetch.lock().await;
        // Another request may have fetched while we queued for the lock.
        if let Some(key) = self.cached(kid) {
            return Some(key);
        }
        if last.is_some_and(|at| at.elapsed() < self.refetch_interval) {
            return None;
        }
        *last = Some(Instant::now());
        if let Err(e) = self.fetch().await {
            tracing::warn!(error = %e, "JWKS refetch for an unknown kid failed; keeping cached keys");
        }
        drop(last);
        self.cached(kid)
    }

    /// Fetches the key set now, replacing the cache only on success.
    /// Returns how long the response may be cached.
    pub async fn refresh(&self) -> Result<Duration, JwksError> {
        let mut last = self.last_fetch.lock().await;
        *last = Some(Instant::now());
        self.fetch().await
    }

    async fn fetch(&self) -> Result<Duration, JwksError> {
        let result = self.fetch_once().await;
        if let Some(metrics) = &self.metrics {
            let outcome = if result.is_ok() { "ok" } else { "error" };
            metrics.jwks_refreshes.with_label_values(&[outcome]).inc();
        }
        if result.is_ok() {
            self.loaded_at_ms
                .store(self.created.elapsed().as_millis() as u64, Ordering::Release);
        }
        self.report_age();
        result
    }

    async fn fetch_once(&self) -> Result<Duration, JwksError> {
        let url = &self.url;
        let fetch_error = |source| JwksError::Fetch {
            url: url.clone(),
            source,
        };
        let response = self.http.get(url).send().await.map_err(fetch_error)?;
        if !response.status().is_success() {
            return Err(JwksError::Status {
                url: url.clone(),
                status: response.status().as_u16(),
            });
        }
        let max_age = response
            .headers()
            .get_all(http::header::CACHE_CONTROL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(parse_max_age);
        let set: JwkSet = response.json().await.map_err(fetch_error)?;
        let keys: KeyMap = set.keys.into_iter().filter_map(usable_key).collect();
        if keys.is_empty() {
            return Err(JwksError::NoKeys { url: url.clone() });
        }
        tracing::info!(kids = ?keys.keys().collect::<Vec<_>>(), "loaded IAP signing keys");
        *self.keys.write().expect("key lock poisoned") = Arc::new(keys);
        self.loaded.store(true, Ordering::Release);
        Ok(max_age.unwrap_or(DEFAULT_REFRESH).clamp(MIN_REFRESH, MAX_REFRESH))
    }

    /// Keeps the cache fresh until `shutdown` fires: refetches when the
    /// previous response's `max-age` runs out, and retries failures with a
    /// capped exponential backoff.
    pub async fn keep_fresh(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let mut backoff = Duration::from_millis(500);
        loop {
            let wait = match self.refresh().await {
                Ok(max_age) => {
                    backoff = Duration::from_millis(500);
                    max_age
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "JWKS refresh failed; keeping cached keys");
                    let wait = backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                    wait
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

/// Only ES256 keys on P-256 are kept: IAP signs with nothing else, and a key
/// of any other type must not become usable by accident.
fn usable_key(jwk: Jwk) -> Option<(String, Arc<DecodingKey>)> {
    let kid = jwk.kid?;
    if jwk.kty.as_deref() != Some("EC") || jwk.crv.as_deref() != Some("P-256") {
        return None;
    }
    if jwk.alg.as_deref().is_some_and(|alg| alg != "ES256") {
        return None;
    }
    let key = DecodingKey::from_ec_components(jwk.x.as_deref()?, jwk.y.as_deref()?).ok()?;
    Some((kid, Arc::new(key)))
}

fn parse_max_age(header: &str) -> Option<Duration> {
    header.split(',').find_map(|directive| {
        let (name, value) = directive.trim().split_once('=')?;
        if name.trim().eq_ignore_ascii_case("max-age") {
            value.trim().trim_matches('"').parse().ok().map(Duration::from_secs)
        } else {
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_age_is_read_from_a_cache_control_list() {
        assert_eq!(
            parse_max_age("public, max-age=22040, must-revalidate"),
            Some(Duration::from_secs(22040))
        );
        assert_eq!(parse_max_age("no-cache"), None);
        assert_eq!(parse_max_age("max-age=abc"), None);
    }

    #[test]
    fn keys_that_are_not_es256_p256_are_ignored() {
        let rsa = Jwk {
            kid: Some("r".into()),
            kty: Some("RSA".into()),
            crv: None,
            alg: Some("RS256".into()),
            x: None,
            y: None,
        };
        assert!(usable_key(rsa).is_none());
        let p384 = Jwk {
            kid: Some("p".into()),
            kty: Some("EC".into()),
            crv: Some("P-384".into()),
            alg: Some("ES384".into()),
            x: Some("AA".into()),
            y: Some("AA".into()),
        };
        assert!(usable_key(p384).is_none());
    }
}
