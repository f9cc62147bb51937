//! Backends shared by several users each: the one-Deployment-per-model
//! design, where every replica of a model's WebUI Deployment serves up to
//! `backend.shared.max_users_per_backend` people at once.
//!
//! The backends are a fixed list or the ready endpoints of a Kubernetes
//! Service ([`endpoints`]). A user is pinned to the least-loaded backend
//! when they start (ties: the first in the list, which is sorted) and stays
//! on it: Gradio's queue and its generated files live in one process, so a
//! session must not wander. They move only when their backend disappears
//! (its endpoint is gone) or refuses connections (then, like the static
//! pool, it is skipped until a TCP probe finds it up again). Releasing a
//! user only frees their slot: nothing is deleted and no API is written,
//! the backend keeps serving its other users.
//!
//! Users are counted per router replica, in this process: with several
//! replicas each enforces the limit on its own users, so a backend may get
//! up to `replicas × max_users_per_backend`. Run one replica per shared
//! backend set, or divide the limit by the replica count.

pub mod endpoints;

pub use endpoints::Endpoints;

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use http::uri::Authority;
use http::Uri;
use tokio_util::sync::CancellationToken;

use super::static_pool::{accepts, every};
use super::{AllocError, Allocator, Capacity, Lease, PinnedBackend, Probe, ReleaseReason, SharedLoad};
use crate::auth::Identity;
use crate::metrics::Metrics;

use crate::util::locked;

/// The shared backends and who is on each.
pub struct Shared {
    max_users: usize,
    probe: Probe,
    /// A std mutex: every critical section is a short scan with no `.await`.
    backends: Mutex<Backends>,
    metrics: Option<Arc<Metrics>>,
    /// Where the backends come from when they are a Service's endpoints.
    source: Option<Endpoints>,
}

#[derive(Default)]
struct Backends {
    /// Sorted by backend id: the stable order ties are broken in.
    list: Vec<Backend>,
    /// Whether the list is known (a Service's endpoints were listed once).
    known: bool,
}

struct Backend {
    lease: Lease,
    /// The `sub`s of the users pinned here through this replica.
    users: Vec<Arc<str>>,
    /// Refused a connection or its last probe, and has not accepted one
    /// since: no new users.
    down: bool,
}

impl Backend {
    fn new(lease: Lease) -> Self {
        Backend {
            lease,
            users: Vec::new(),
            down: false,
        }
    }

    fn is(&self, lease: &Lease) -> bool {
        self.lease == *lease
    }

    fn holds(&self, sub: &str) -> bool {
        self.users.iter().any(|u| **u == *sub)
    }
}

impl Shared {
    /// No backends yet: they come from [`Shared::set_backends`] (a Service's
    /// endpoints) or [`Shared::listed`].
    pub fn new(max_users: usize, probe: Probe) -> Self {
        Shared {
            max_users: max_users.max(1),
            probe,
            backends: Mutex::new(Backends::default()),
            metrics: None,
            source: None,
        }
    }

    /// The ready endpoints `source` watches (from [`Allocator::maintain`]
    /// on): until it has listed them once, the router is not ready.
    pub fn watching(source: Endpoints, max_users: usize, probe: Probe) -> Self {
        Shared {
            source: Some(source),
            ..Shared::new(max_users, probe)
        }
    }

    /// A fixed list of backends, named `<prefix>-00`, `<prefix>-01`, … in
    /// order (zero-padded, so that sorting by name keeps the list's order).
    pub fn listed(prefix: &str, upstreams: &[Uri], max_users: usize, probe: Probe) -> Self {
        let shared = Shared::new(max_users, probe);
        let width = upstreams.len().to_string().len().max(2);
        shared.set_backends(
            upstreams
                .iter()
                .enumerate()
                .filter_map(|(i, uri)| {
                    Some(Lease {
                        backend: format!("{prefix}-{i:0width$}").into(),
                        upstream: uri.authority()?.clone(),
                    })
                })
                .collect(),
        );
        shared
    }

    /// Reports each backend's users in `metrics` (the per-backend gauge).
    pub fn reporting(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self.publish(&locked(&self.backends));
        self
    }

    /// The backends are now `leases`. Users of a backend that is still
    /// there (same id, same address) stay on it; those of one that is gone
    /// are no longer counted, and move on their next request.
    pub fn set_backends(&self, mut leases: Vec<Lease>) {
        leases.sort_by(|a, b| a.backend.cmp(&b.backend));
        leases.dedup_by(|a, b| a.backend == b.backend);
        let mut backends = locked(&self.backends);
        let mut old = std::mem::take(&mut backends.list);
        backends.list = leases
            .into_iter()
            .map(|lease| match old.iter().position(|b| b.is(&lease)) {
                Some(i) => old.swap_remove(i),
                None => Backend::new(lease),
            })
            .collect();
        backends.known = true;
        for gone in old.iter().filter(|b| !b.users.is_empty()) {
            tracing::warn!(backend = %gone.lease, users = gone.users.len(), "shared backend gone; its users move on their next request");
        }
        self.publish(&backends);
    }

    /// Sets the per-backend user gauge to what `backends` says.
    fn publish(&self, backends: &Backends) {
        if let Some(metrics) = &self.metrics {
            metrics.shared_backend_users.reset();
            for b in &backends.list {
                metrics
                    .shared_backend_users
                    .with_label_values(&[&b.lease.backend])
                    .set(b.users.len() as i64);
            }
        }
    }

    fn free_slots(&self, backends: &Backends) -> usize {
        backends
            .list
            .iter()
            .filter(|b| !b.down)
            .map(|b| self.max_users.saturating_sub(b.users.len()))
            .sum()
    }

    /// One round of TCP probes: each backend is up if it accepts.
    async fn probe_all(&self) {
        let upstreams: Vec<Authority> = locked(&self.backends)
            .list
            .iter()
            .map(|b| b.lease.upstream.clone())
            .collect();
        let probes = upstreams.iter().map(|u| accepts(u, self.probe.timeout));
        let results = futures_util::future::join_all(probes).await;
        let mut backends = locked(&self.backends);
        for (upstream, accepted) in upstreams.iter().zip(results) {
            // The list may have changed during the probes: matched by address.
            for b in backends.list.iter_mut().filter(|b| b.lease.upstream == *upstream) {
                if b.down == accepted {
                    tracing::info!(backend = %b.lease, up = accepted, "shared backend probed");
                }
                b.down = !accepted;
            }
        }
    }
}

#[async_trait]
impl Allocator for Shared {
    async fn allocate(&self, user: &Identity) -> Result<Lease, AllocError> {
        let mut backends = locked(&self.backends);
        if let Some(own) = backends.list.iter().find(|b| b.holds(&user.sub)) {
            return Ok(own.lease.clone());
        }
        let max = self.max_users;
        // `min_by_key` keeps the first of equals: ties go in list order.
        let least = backends
            .list
            .iter_mut()
            .filter(|b| !b.down && b.users.len() < max)
            .min_by_key(|b| b.users.len())
            .ok_or(AllocError::NoCapacity)?;
        least.users.push(user.sub.clone());
        let lease = least.lease.clone();
        self.publish(&backends);
        Ok(lease)
    }

    /// The backend the cookie names, if it is still there, up, and has
    /// room (or already counts the user): a restarted replica or another
    /// one takes the user back to the process that has their queue.
    fn adopt(&self, user: &Identity, pin: &PinnedBackend) -> Option<Lease> {
        let mut backends = locked(&self.backends);
        let index = backends
            .list
            .iter()
            .position(|b| *b.lease.backend == *pin.backend && b.lease.upstream.as_str() == pin.upstream)?;
        if let Some(other) = backends.list.iter().position(|b| b.holds(&user.sub)) {
            return (other == index).then(|| backends.list[index].lease.clone());
        }
        let max = self.max_users;
        let backend = &mut backends.list[index];
        if backend.down || backend.users.len() >= max {
            return None;
        }
        backend.users.push(user.sub.clone());
        let lease = backend.lease.clone();
        self.publish(&backends);
        Some(lease)
    }

    /// Frees the user's slot; the backend itself is untouched.
    async fn release(&self, user: &Identity, lease: &Lease, _reason: ReleaseReason) -> Result<(), AllocError> {
        let mut backends = locked(&self.backends);
        if let Some(backend) = backends.list.iter_mut().find(|b| b.is(lease)) {
            backend.users.retain(|u| **u != *user.sub);
        }
        self.publish(&backends);
        Ok(())
    }

    /// Ready once the backends are known (a Service's endpoints listed)
    /// and, for a list, while any of them is up. A Service with no ready
    /// endpoint is ready: its users get the waiting page while it scales.
    fn is_ready(&self) -> bool {
        let backends = locked(&self.backends);
        backends.known && (backends.list.is_empty() || backends.list.iter().any(|b| !b.down))
    }

    /// Whether the backend is still there with the user on it: a backend
    /// whose endpoint went makes the user's next request start over.
    fn still_held(&self, user: &Identity, lease: &Lease) -> bool {
        locked(&self.backends)
            .list
            .iter()
            .any(|b| b.is(lease) && b.holds(&user.sub))
    }

    /// Marks the backend down; its user moves if another backend has room
    /// (else they keep theirs: it may answer again).
    fn refused(&self, lease: &Lease) -> bool {
        let mut backends = locked(&self.backends);
        let Some(backend) = backends.list.iter_mut().find(|b| b.is(lease)) else {
            return true;
        };
        if !backend.down {
            tracing::warn!(backend = %backend.lease, "shared backend refused a connection: no new users until it accepts again");
        }
        backend.down = true;
        self.free_slots(&backends) > 0
    }

    fn shared_load(&self) -> Vec<SharedLoad> {
        locked(&self.backends)
            .list
            .iter()
            .map(|b| SharedLoad {
                backend: b.lease.backend.to_string(),
                upstream: b.lease.upstream.to_string(),
                users: b.users.len(),
                max_users: self.max_users,
                down: b.down,
            })
            .collect()
    }

    fn down(&self) -> Vec<Lease> {
        locked(&self.backends)
            .list
            .iter()
            .filter(|b| b.down)
            .map(|b| b.lease.clone())
            .collect()
    }

    async fn maintain(&self, stop: CancellationToken) {
        let probes = every(self.probe.interval, stop.clone(), || self.probe_all());
        match &self.source {
            Some(source) => {
                tokio::join!(probes, source.run(self, stop));
            }
            None => probes.await,
        }
    }

    /// Slots, not backends: `ready` is the free slots on backends that are
    /// up, `total` every backend's `max_users_per_backend`.
    fn capacity(&self) -> Capacity {
        let backends = locked(&self.backends);
        Capacity {
            ready: self.free_slots(&backends),
            allocated: backends.list.iter().map(|b| b.users.len()).sum(),
            reserved: 0,
            total: backends.list.len() * self.max_users,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::allocator::testing::{pin_for, user};

    fn lease(name: &str, port: u16) -> Lease {
        Lease {
            backend: name.into(),
            upstream: format!("127.0.0.1:{port}").parse().unwrap(),
        }
    }

    fn shared(n: u16, max: usize) -> Shared {
        let shared = Shared::new(max, Probe::default());
        shared.set_backends((0..n).map(|i| lease(&format!("b{i}"), 7860 + i)).collect());
        shared
    }

    fn counts(shared: &Shared) -> Vec<usize> {
        shared.shared_load().into_iter().map(|b| b.users).collect()
    }

    fn nth(shared: &Shared, i: usize) -> Lease {
        locked(&shared.backends).list[i].lease.clone()
    }

    #[tokio::test]
    async fn users_go_to_the_least_loaded_backend_first_in_order_on_ties() {
        let shared = shared(2, 2);
        let a = shared.allocate(&user("a")).await.unwrap();
        let b = shared.allocate(&user("b")).await.unwrap();
        let c = shared.allocate(&user("c")).await.unwrap();
        assert_eq!((&*a.backend, &*b.backend, &*c.backend), ("b0", "b1", "b0"));
        assert_eq!(counts(&shared), [2, 1]);
        assert_eq!(shared.allocate(&user("a")).await.unwrap(), a, "a user keeps theirs");
        assert_eq!(
            shared.capacity().ready,
            1,
            "free slots, not backends: {:?}",
            shared.capacity()
        );
    }

    #[tokio::test]
    async fn every_backend_full_means_no_capacity_until_a_slot_is_freed() {
        let shared = shared(1, 2);
        let a = shared.allocate(&user("a")).await.unwrap();
        shared.allocate(&user("b")).await.unwrap();
        assert!(matches!(shared.allocate(&user("c")).await, Err(AllocError::NoCapacity)));
        shared.release(&user("a"), &a, ReleaseReason::Idle).await.unwrap();
        assert_eq!(shared.allocate(&user("c")).await.unwrap(), a);
    }

    #[tokio::test]
    async fn a_cookie_adopts_its_backend_only_while_it_exists_and_has_room() {
        let shared = shared(2, 1);
        let b1 = nth(&shared, 1);
        assert_eq!(shared.adopt(&user("a"), &pin_for(&b1)), Some(b1.clone()));
        assert_eq!(shared.adopt(&user("a"), &pin_for(&b1)), Some(b1.clone()), "again: same");
        assert_eq!(shared.adopt(&user("b"), &pin_for(&b1)), None, "full");
        let b0 = nth(&shared, 0);
        assert_eq!(shared.adopt(&user("a"), &pin_for(&b0)), None, "never a second backend");
        shared.set_backends(vec![b0.clone()]);
        assert_eq!(shared.adopt(&user("c"), &pin_for(&b1)), None, "gone");
    }

    #[tokio::test]
    async fn a_backend_that_disappears_drops_its_users_and_the_others_keep_theirs() {
        let shared = shared(2, 2);
        let a = shared.allocate(&user("a")).await.unwrap();
        let b = shared.allocate(&user("b")).await.unwrap();
        shared.set_backends(vec![b.clone(), lease("b2", 9000)]);
        assert!(!shared.still_held(&user("a"), &a));
        assert!(shared.still_held(&user("b"), &b));
        let moved = shared.allocate(&user("a")).await.unwrap();
        assert_eq!(&*moved.backend, "b2", "the least loaded of what is left");
    }

    #[tokio::test]
    async fn a_backend_at_a_new_address_is_a_new_backend() {
        let shared = shared(1, 2);
        let a = shared.allocate(&user("a")).await.unwrap();
        shared.set_backends(vec![lease("b0", 9999)]);
        assert!(!shared.still_held(&user("a"), &a));
        assert_eq!(counts(&shared), [0]);
    }

    #[tokio::test]
    async fn a_refusing_backend_gets_no_new_users_and_its_users_move_only_if_there_is_room() {
        let shared = shared(2, 1);
        let a = shared.allocate(&user("a")).await.unwrap();
        assert!(shared.refused(&a), "b1 has room");
        assert_eq!(shared.capacity().ready, 1);
        let b = shared.allocate(&user("b")).await.unwrap();
        assert_ne!(b, a);
        assert!(!shared.refused(&b), "nowhere to go");
        assert_eq!(shared.down().len(), 2);
    }

    #[tokio::test]
    async fn a_probe_brings_a_refusing_backend_back() {
        let open = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let shared = Shared::new(1, Probe::default());
        let up = lease("up", open.local_addr().unwrap().port());
        shared.set_backends(vec![up.clone()]);
        shared.refused(&up);
        assert!(!shared.is_ready());
        shared.probe_all().await;
        assert!(shared.down().is_empty() && shared.is_ready());
    }

    #[tokio::test]
    async fn releasing_frees_only_that_users_slot() {
        let shared = shared(1, 3);
        let a = shared.allocate(&user("a")).await.unwrap();
        shared.allocate(&user("b")).await.unwrap();
        shared.release(&user("c"), &a, ReleaseReason::User).await.unwrap();
        assert_eq!(counts(&shared), [2]);
        shared.release(&user("a"), &a, ReleaseReason::User).await.unwrap();
        assert_eq!(counts(&shared), [1]);
        assert!(shared.still_held(&user("b"), &a));
    }

    #[tokio::test]
    async fn a_long_list_is_filled_in_its_own_order() {
        let uris: Vec<Uri> = (0..120)
            .map(|i| format!("http://10.0.{}.{}:7860", i / 100, i % 100).parse().unwrap())
            .collect();
        let shared = Shared::listed("shared", &uris, 1, Probe::default());
        for i in 0..12 {
            let lease = shared.allocate(&user(&format!("u{i}"))).await.unwrap();
            assert_eq!(lease.upstream.as_str(), format!("10.0.0.{i}:7860"));
        }
        assert_eq!(&*nth(&shared, 0).backend, "shared-000");
    }

    #[test]
    fn an_unknown_endpoint_list_is_not_ready_and_an_empty_known_one_is() {
        let shared = Shared::new(2, Probe::default());
        assert!(!shared.is_ready());
        shared.set_backends(Vec::new());
        assert!(shared.is_ready());
        assert_eq!(shared.capacity().ready, 0);
    }
}
