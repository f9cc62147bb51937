//! A fixed list of upstreams, each serving at most one user at a time: for
//! people with a few GPU boxes, and the demo. All state is in this process.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use http::uri::Authority;
use http::Uri;

use super::{AllocError, Allocator, Capacity, Lease};
use crate::auth::Identity;
use crate::session::cookie::PinnedBackend;

pub struct StaticPool {
    leases: Vec<Lease>,
    /// `holders[i]` is the `sub` of the user holding `leases[i]`. A std mutex:
    /// every critical section is a short scan with no `.await`.
    holders: Mutex<Vec<Option<Arc<str>>>>,
}

impl StaticPool {
    pub fn new(upstreams: &[Uri]) -> Self {
        let leases: Vec<Lease> = upstreams
            .iter()
            .enumerate()
            .map(|(i, uri)| Lease {
                backend: format!("static-{i}").into(),
                upstream: uri
                    .authority()
                    .cloned()
                    .unwrap_or_else(|| Authority::from_static("invalid")),
            })
            .collect();
        let holders = Mutex::new(vec![None; leases.len()]);
        StaticPool { leases, holders }
    }

    fn holders(&self) -> std::sync::MutexGuard<'_, Vec<Option<Arc<str>>>> {
        self.holders.lock().expect("holder lock poisoned")
    }

    /// Number of backends nobody holds.
    pub fn free(&self) -> usize {
        self.holders().iter().filter(|h| h.is_none()).count()
    }
}

#[async_trait]
impl Allocator for StaticPool {
    async fn allocate(&self, user: &Identity) -> Result<Lease, AllocError> {
        let mut holders = self.holders();
        let index = holders
            .iter()
            .position(|h| h.as_deref() == Some(&*user.sub))
            .or_else(|| holders.iter().position(Option::is_none))
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
            _ => {
                holders[index] = Some(user.sub.clone());
                Some(self.leases[index].clone())
            }
        }
    }

    fn capacity(&self) -> Capacity {
        let free = self.free();
        Capacity {
            ready: free,
            allocated: self.leases.len() - free,
            reserved: 0,
            total: self.leases.len(),
        }
    }

    async fn release(&self, user: &Identity, lease: &Lease, _reason: &'static str) -> Result<(), AllocError> {
        let mut holders = self.holders();
        if let Some(index) = self.leases.iter().position(|l| l.backend == lease.backend) {
            if holders[index].as_deref() == Some(&*user.sub) {
                holders[index] = None;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(n: usize) -> StaticPool {
        let uris: Vec<Uri> = (0..n)
            .map(|i| format!("http://127.0.0.1:{}", 7860 + i).parse().unwrap())
            .collect();
        StaticPool::new(&uris)
    }

    fn user(name: &str) -> Identity {
        Identity::new(name, &format!("{name}@example.com"), None)
    }

    fn pin_for(lease: &Lease) -> PinnedBackend {
        PinnedBackend {
            backend: lease.backend.to_string(),
            upstream: lease.upstream.to_string(),
            allocated_at: 0,
            expires: u64::MAX,
        }
    }

    #[tokio::test]
    async fn each_backend_serves_one_user_and_a_user_keeps_theirs() {
        let pool = pool(2);
        let a = pool.allocate(&user("a")).await.unwrap();
        let b = pool.allocate(&user("b")).await.unwrap();
        assert_ne!(a.backend, b.backend);
        assert_eq!(pool.allocate(&user("a")).await.unwrap(), a);
        assert!(matches!(pool.allocate(&user("c")).await, Err(AllocError::NoCapacity)));
        pool.release(&user("a"), &a, "user").await.unwrap();
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
    async fn releasing_someone_elses_lease_does_nothing() {
        let pool = pool(1);
        let a = pool.allocate(&user("a")).await.unwrap();
        pool.release(&user("b"), &a, "user").await.unwrap();
        assert_eq!(pool.free(), 0);
    }
}
