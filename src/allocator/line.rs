//! The contract of a waiting line kept where every replica sees it: a backend
//! system that can hold one (Agones, through Kubernetes Leases) implements
//! it, and the session's waiting line uses it. Declared here, beside
//! [`Allocator::shared_line`](super::Allocator::shared_line) that hands it out.

use std::time::SystemTime;

use async_trait::async_trait;

use super::AllocError;
use crate::auth::Identity;

/// One waiter of a line kept outside this process.
#[derive(Debug, Clone)]
pub struct SharedWaiter {
    pub key: String,
    pub joined: SystemTime,
    pub last_asked: SystemTime,
}

/// A line kept where every replica sees it.
#[async_trait]
pub trait SharedLine: Send + Sync + 'static {
    /// The user's key in the line.
    fn key(&self, user: &Identity) -> String;
    /// Everyone in line, stale ones included, in no particular order.
    async fn waiters(&self) -> Result<Vec<SharedWaiter>, AllocError>;
    /// Puts the user in line at `now`; `false` if they were in it already
    /// (then only renewed).
    async fn join(&self, user: &Identity, now: SystemTime) -> Result<bool, AllocError>;
    /// Records that the user asked again at `now`.
    async fn renew(&self, user: &Identity, now: SystemTime) -> Result<(), AllocError>;
    /// Takes `key` out of the line; when it was in it, since when.
    async fn leave(&self, key: &str) -> Result<Option<SystemTime>, AllocError>;
}
