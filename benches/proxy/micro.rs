//! Micro-benchmarks through the library's public API: the session lookup a
//! known user's request makes, and a token check from the cache against a
//! full ES256 verification.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_trait::async_trait;
use futures_util::FutureExt;
use rand::seq::SliceRandom;
use session_router::allocator::PinnedBackend;
use session_router::allocator::{AllocError, Allocator, Capacity, Lease, ReleaseReason};
use session_router::auth::iap::IapVerifier;
use session_router::auth::jwks::KeyStore;
use session_router::auth::Identity;
use session_router::config::Config;
use session_router::metrics::Metrics;
use session_router::session::{Claim, Profile, Profiles, Registry};

use crate::contenders::AUDIENCE;

/// Every user gets the same backend: the registry, not the allocator, is
/// what is measured.
struct OneBackend(Lease);

#[async_trait]
impl Allocator for OneBackend {
    async fn allocate(&self, _user: &Identity) -> Result<Lease, AllocError> {
        Ok(self.0.clone())
    }
    fn adopt(&self, _user: &Identity, _pin: &PinnedBackend) -> Option<Lease> {
        None
    }
    async fn release(&self, _user: &Identity, _lease: &Lease, _reason: ReleaseReason) -> Result<(), AllocError> {
        Ok(())
    }
    fn capacity(&self) -> Capacity {
        Capacity::default()
    }
}

/// Median over `repeats` of the mean time per call of `op` over `iterations`.
fn time_ns(repeats: usize, iterations: usize, mut op: impl FnMut(usize)) -> f64 {
    let mut means: Vec<f64> = (0..repeats)
        .map(|_| {
            let started = Instant::now();
            for i in 0..iterations {
                op(i);
            }
            started.elapsed().as_nanos() as f64 / iterations as f64
        })
        .collect();
    means.sort_by(f64::total_cmp);
    means[means.len() / 2]
}

pub struct SessionLookup {
    /// `Registry::get`: the read-only lookup.
    pub get_ns: f64,
    /// `Registry::get_or_allocate` for a known user: what the proxy path calls.
    pub get_or_allocate_ns: f64,
}

/// Session lookups of random known users among `users`, through the
/// public `Registry` API.
pub fn session_lookup(users: usize, lookups: usize, repeats: usize) -> SessionLookup {
    let lease = Lease {
        backend: "static-0".into(),
        upstream: http::uri::Authority::from_static("127.0.0.1:7860"),
    };
    let config = Config::from_toml(
        "[auth]\nmode = \"dev\"\n[server]\nlisten = \"127.0.0.1:0\"\n[backend.static]\nupstreams = [\"http://127.0.0.1:7860\"]\n",
        None,
    )
    .expect("a valid config");
    let metrics = Metrics::new();
    let profile = config.profiles.into_iter().next().expect("one profile");
    let profile = Profile::new(profile, Arc::new(OneBackend(lease)), &metrics, Duration::from_secs(10));
    let registry = Registry::new(Profiles::new(vec![profile]), metrics);
    let profile = registry.profiles().default_profile().clone();
    // An allocation hands its follow-up work (`Allocator::settle`) to a
    // task, which needs a runtime to be spawned on; it is never driven here
    // (this backend has none), so the lookups are timed alone.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    let _inside = runtime.enter();
    // IAP subjects look like `accounts.google.com:` and 21 digits.
    let identities: Vec<Identity> = (0..users)
        .map(|i| {
            Identity::new(
                &format!("accounts.google.com:{:021}", 104_729 * i as u64 + 1),
                &format!("user{i}@example.com"),
                None,
            )
        })
        .collect();
    for identity in &identities {
        registry
            .get_or_allocate(identity, || Ok(Claim::Allocate(profile.clone())))
            .now_or_never()
            .expect("allocation completes without waiting")
            .expect("allocation succeeds");
    }
    let mut order: Vec<usize> = (0..lookups).map(|i| i % users).collect();
    order.shuffle(&mut rand::thread_rng());
    let get_ns = time_ns(repeats, lookups, |i| {
        let sub = &identities[order[i]].sub;
        black_box(registry.get(black_box(sub)).expect("known user"));
    });
    let get_or_allocate_ns = time_ns(repeats, lookups, |i| {
        let identity = &identities[order[i]];
        black_box(
            registry
                .get_or_allocate(black_box(identity), || Ok(Claim::Allocate(profile.clone())))
                .now_or_never()
                .expect("a known user never waits")
                .expect("known user"),
        );
    });
    SessionLookup {
        get_ns,
        get_or_allocate_ns,
    }
}

pub struct TokenCheck {
    pub cached_ns: f64,
    pub full_ns: f64,
}

fn verifier(jwks_url: &str, cache_entries: usize, keys: Arc<KeyStore>) -> anyhow::Result<IapVerifier> {
    let text = format!(
        r#"
[auth]
mode = "iap"
audiences = ["{AUDIENCE}"]
jwks_url = "{jwks_url}"
token_cache_entries = {cache_entries}
[backend.static]
upstreams = ["http://127.0.0.1:7860"]
"#
    );
    let config = Config::from_toml(&text, Some(b"micro-benchmark-secret-0123456789abcdef".to_vec()))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(IapVerifier::new(&config.auth, keys))
}

/// `IapVerifier::verify` of one valid token: answered from the cache, and
/// with the cache off (every call a full ES256 verification).
pub async fn token_check(jwks_url: &str, token: &str, budget: Duration) -> anyhow::Result<TokenCheck> {
    let keys = Arc::new(KeyStore::new(jwks_url.to_string(), Duration::from_secs(30)));
    keys.refresh().await.context("loading the JWKS")?;
    let cached = verifier(jwks_url, 10_000, keys.clone())?;
    let full = verifier(jwks_url, 0, keys)?;
    let verify = |v: &IapVerifier| {
        v.verify(black_box(token))
            .now_or_never()
            .expect("the key is cached: verify never waits")
            .expect("the token is valid")
    };
    verify(&cached);
    verify(&full);
    // Size the loops from one timed full verification.
    let started = Instant::now();
    for _ in 0..20 {
        black_box(verify(&full));
    }
    let one_full = started.elapsed().as_secs_f64() / 20.0;
    let full_iterations = ((budget.as_secs_f64() / 2.0 / 5.0 / one_full) as usize).max(20);
    let full_ns = time_ns(5, full_iterations, |_| {
        black_box(verify(&full));
    });
    let cached_ns = time_ns(5, 200_000, |_| {
        black_box(verify(&cached));
    });
    Ok(TokenCheck { cached_ns, full_ns })
}
