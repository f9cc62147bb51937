//! A fixed list of upstreams, each serving at most one user at a time: for
//! people with a few GPU boxes, and the demo. All state is in this process.
//!
//! Each upstream is up or down. A box that refuses a connection to a user's
//! request is marked down at once (passive), and every upstream is probed
//! with a TCP connect every `backend.static.probe_interval` (active), which
//! marks it up again once it accepts. A down upstream is never given to a
//! new user, and its user is moved to a free healthy one on their next
//! request (see [`Allocator::refused`]); with none free they keep it, and
//! get it back working as soon as it answers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use http::uri::Authority;
use http::Uri;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::{AllocError, Allocator, Capacity, Lease, PinnedBackend, ReleaseReason};
use crate::auth::Identity;

pub struct StaticPool {
    leases: Vec<Lease>,
    /// `holders[i]` is the `sub` of the user holding `leases[i]`. A std mutex:
    /// every critical section is a short scan with no `.await`.
    holders: Mutex<Vec<Option<Arc<str>>>>,
    /// `down[i]`: `leases[i]` refused a connection or its last probe, and
    /// has not accepted one since. Read without the holders' lock.
    down: Vec<AtomicBool>,
    probe: Probe,
}

/// How the upstreams are probed.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    /// Time between two rounds of probes.
    pub interval: Duration,
    /// How long one connect may take before the upstream counts as down.
    pub timeout: Duration,
}

impl Probe {
    /// Probes every `interval`, each no longer than a connection to a user's
    /// backend may take (`connect_timeout`) nor than the interval itself.
    pub fn every(interval: Duration, connect_timeout: Duration) -> Probe {
        Probe {
            interval,
            timeout: connect_timeout.min(interval),
        }
    }
}

impl Default for Probe {
    fn default() -> Self {
        Probe {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(5),
        }
    }
}

impl StaticPool {
    /// The upstreams as backends `static-0`, `static-1`, … in order.
    pub fn new(upstreams: &[Uri]) -> Self {
        StaticPool::named("static", upstreams)
    }

    /// The upstreams as backends `<prefix>-0`, `<prefix>-1`, … in order:
    /// each profile's pool names its own, so no two profiles' backends
    /// share a name (on the admin page, in logs, in a release).
    pub fn named(prefix: &str, upstreams: &[Uri]) -> Self {
        let leases: Vec<Lease> = upstreams
            .iter()
            .enumerate()
            .map(|(i, uri)| Lease {
                backend: format!("{prefix}-{i}").into(),
                upstream: uri
                    .authority()
                    .cloned()
                    .unwrap_or_else(|| Authority::from_static("invalid")),
            })
            .collect();
        let holders = Mutex::new(vec![None; leases.len()]);
        let down = leases.iter().map(|_| AtomicBool::new(false)).collect();
        StaticPool {
            leases,
            holders,
            down,
            probe: Probe::default(),
        }
    }

    /// Probes the upstreams as `probe` says (instead of every 10 s, 5 s each).
    pub fn probing(self, probe: Probe) -> Self {
        StaticPool { probe, ..self }
    }

    fn holders(&self) -> std::sync::MutexGuard<'_, Vec<Option<Arc<str>>>> {
        self.holders.lock().expect("holder lock poisoned")
    }

    fn is_down(&self, index: usize) -> bool {
        self.down[index].load(Ordering::Acquire)
    }

    fn index_of(&self, lease: &Lease) -> Option<usize> {
        self.leases.iter().position(|l| l.backend == lease.backend)
    }

    /// Records what was just learnt about upstream `index`; a change is
    /// logged once, when it happens.
    fn set_down(&self, index: usize, down: bool, why: &'static str) {
        if self.down[index].swap(down, Ordering::AcqRel) == down {
            return;
        }
        let lease = &self.leases[index];
        if down {
            tracing::warn!(backend = %lease.backend, upstream = %lease.upstream, why, "upstream down: skipped for new users until it accepts connections again");
        } else {
            tracing::info!(backend = %lease.backend, upstream = %lease.upstream, "upstream up again");
        }
    }

    /// Number of backends nobody holds (what the tests check; capacity
    /// counts only those that are up).
    #[cfg(test)]
    pub(crate) fn free(&self) -> usize {
        self.holders().iter().filter(|h| h.is_none()).count()
    }

    /// Number of backends nobody holds that are up: what a new user can get.
    fn free_and_up(&self, holders: &[Option<Arc<str>>]) -> usize {
        holders
            .iter()
            .enumerate()
            .filter(|(i, h)| h.is_none() && !self.is_down(*i))
            .count()
    }

    /// One round of probes, all at once: each upstream is up if a TCP
    /// connection to it opens within the probe's timeout.
    async fn probe_all(&self) {
        let probes = self
            .leases
            .iter()
            .map(|lease| accepts(&lease.upstream, self.probe.timeout));
        for (index, accepted) in futures_util::future::join_all(probes).await.into_iter().enumerate() {
            self.set_down(index, !accepted, "probe failed");
        }
    }
}

#[async_trait]
impl Allocator for StaticPool {
    async fn allocate(&self, user: &Identity) -> Result<Lease, AllocError> {
        let mut holders = self.holders();
        let index = holders
            .iter()
            .position(|h| h.as_deref() == Some(&*user.sub))
            .or_else(|| (0..holders.len()).find(|&i| holders[i].is_none() && !self.is_down(i)))
            .ok_or(AllocError::NoCapacity)?;
        holders[index] = Some(user.sub.clone());
        Ok(self.leases[index].clone())
    }

    fn adopt(&self, user: &Identity, pin: &PinnedBackend) -> Option<Lease> {
        let index = self
            .leases
            .iter()
            .position(|l| *l.backend == *pin.backend && l.upstream.as_str() == pin.upstream)?;
        let mut holders = self.holders();
        let holds_another = holders
            .iter()
            .enumerate()
            .any(|(i, h)| i != index && h.as_deref() == Some(&*user.sub));
        match &holders[index] {
            Some(holder) if **holder != *user.sub => None,
            // Never a second backend for one user: allocate returns theirs.
            _ if holds_another => None,
            // A cookie does not lead back to a box that is not answering.
            None if self.is_down(index) => None,
            _ => {
                holders[index] = Some(user.sub.clone());
                Some(self.leases[index].clone())
            }
        }
    }

    fn capacity(&self) -> Capacity {
        let holders = self.holders();
        let free = holders.iter().filter(|h| h.is_none()).count();
        Capacity {
            ready: self.free_and_up(&holders),
            allocated: self.leases.len() - free,
            reserved: 0,
            total: self.leases.len(),
        }
    }

    async fn release(&self, user: &Identity, lease: &Lease, _reason: ReleaseReason) -> Result<(), AllocError> {
        let mut holders = self.holders();
        if let Some(index) = self.index_of(lease) {
            if holders[index].as_deref() == Some(&*user.sub) {
                holders[index] = None;
            }
        }
        Ok(())
    }

    /// Ready while any upstream is up: with every box down no user can be
    /// served.
    fn is_ready(&self) -> bool {
        (0..self.leases.len()).any(|i| !self.is_down(i))
    }

    /// Marks the upstream down; its user moves if a healthy one is free
    /// (else they keep theirs: a fixed box may come back).
    fn refused(&self, lease: &Lease) -> bool {
        let Some(index) = self.index_of(lease) else {
            return false;
        };
        self.set_down(index, true, "refused a connection");
        self.free_and_up(&self.holders()) > 0
    }

    fn down(&self) -> Vec<Lease> {
        (0..self.leases.len())
            .filter(|&i| self.is_down(i))
            .map(|i| self.leases[i].clone())
            .collect()
    }

    async fn maintain(&self, stop: CancellationToken) {
        every(self.probe.interval, stop, || self.probe_all()).await;
    }
}

/// Whether `upstream` accepts a TCP connection within `timeout`: the health
/// probe of a backend that is a fixed address.
pub(super) async fn accepts(upstream: &Authority, timeout: Duration) -> bool {
    matches!(
        tokio::time::timeout(timeout, TcpStream::connect(upstream.as_str())).await,
        Ok(Ok(_))
    )
}

/// Runs `round` every `interval` until `stop`, the first time one interval
/// from now: backends start out up.
pub(super) async fn every<F, Fut>(interval: Duration, stop: CancellationToken, mut round: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut rounds = tokio::time::interval(interval);
    rounds.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    rounds.tick().await;
    loop {
        tokio::select! {
            _ = rounds.tick() => {}
            _ = stop.cancelled() => return,
        }
        round().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::allocator::testing::{pin_for, user};

    fn pool(n: usize) -> StaticPool {
        let uris: Vec<Uri> = (0..n)
            .map(|i| format!("http://127.0.0.1:{}", 7860 + i).parse().unwrap())
            .collect();
        StaticPool::new(&uris)
    }

    #[tokio::test]
    async fn each_backend_serves_one_user_and_a_user_keeps_theirs() {
        let pool = pool(2);
        let a = pool.allocate(&user("a")).await.unwrap();
        let b = pool.allocate(&user("b")).await.unwrap();
        assert_ne!(a.backend, b.backend);
        assert_eq!(pool.allocate(&user("a")).await.unwrap(), a);
        assert!(matches!(pool.allocate(&user("c")).await, Err(AllocError::NoCapacity)));
        pool.release(&user("a"), &a, ReleaseReason::User).await.unwrap();
        assert_eq!(pool.allocate(&user("c")).await.unwrap(), a);
    }

    #[tokio::test]
    async fn a_cookie_cannot_adopt_someone_elses_backend() {
        let pool = pool(2);
        let a = pool.allocate(&user("a")).await.unwrap();
        assert_eq!(pool.adopt(&user("b"), &pin_for(&a)), None);
        assert_eq!(pool.adopt(&user("a"), &pin_for(&a)), Some(a.clone()));
    }

    #[tokio::test]
    async fn a_cookie_never_gives_a_user_a_second_backend() {
        let pool = pool(2);
        let a = pool.allocate(&user("a")).await.unwrap();
        let other = pool.leases.iter().find(|l| l.backend != a.backend).unwrap().clone();
        assert_eq!(pool.adopt(&user("a"), &pin_for(&other)), None);
        assert_eq!(pool.free(), 1);
    }

    #[tokio::test]
    async fn a_down_upstream_is_skipped_for_new_users_and_not_counted_as_ready() {
        let pool = pool(3);
        let first = pool.leases[0].clone();
        assert!(pool.refused(&first), "others are free: its user should move");
        assert_eq!(pool.down(), vec![first.clone()]);
        assert_eq!(pool.capacity().ready, 2);
        let a = pool.allocate(&user("a")).await.unwrap();
        let b = pool.allocate(&user("b")).await.unwrap();
        assert!(a != first && b != first);
        assert!(matches!(pool.allocate(&user("c")).await, Err(AllocError::NoCapacity)));
        assert_eq!(
            pool.adopt(&user("c"), &pin_for(&first)),
            None,
            "a cookie does not lead back to it"
        );
    }

    #[tokio::test]
    async fn with_no_healthy_upstream_free_the_user_keeps_theirs() {
        let pool = pool(2);
        let a = pool.allocate(&user("a")).await.unwrap();
        pool.allocate(&user("b")).await.unwrap();
        assert!(!pool.refused(&a));
        assert_eq!(pool.allocate(&user("a")).await.unwrap(), a);
    }

    #[tokio::test]
    async fn a_probe_marks_closed_ports_down_and_open_ones_up() {
        let open = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let uris: Vec<Uri> = [open.local_addr().unwrap(), closed]
            .iter()
            .map(|addr| format!("http://{addr}").parse().unwrap())
            .collect();
        let pool = StaticPool::new(&uris);
        pool.refused(&pool.leases[0].clone());
        pool.probe_all().await;
        assert_eq!(pool.down(), vec![pool.leases[1].clone()]);
        assert!(pool.is_down(1) && !pool.is_down(0));
    }

    #[tokio::test]
    async fn releasing_someone_elses_lease_does_nothing() {
        let pool = pool(1);
        let a = pool.allocate(&user("a")).await.unwrap();
        pool.release(&user("b"), &a, ReleaseReason::User).await.unwrap();
        assert_eq!(pool.free(), 0);
    }
}
