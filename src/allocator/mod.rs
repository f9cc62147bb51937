//! Backends: where a user's WebUI runs, and how one is obtained and given
//! back. The proxy only sees [`Lease`]s; which [`Allocator`] made them is
//! configuration.

mod static_pool;

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use http::uri::Authority;

pub use static_pool::StaticPool;

use crate::auth::Identity;
use crate::session::cookie::PinnedBackend;

/// One user's hold on one backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Stable id of the backend (a static slot, later a GameServer name).
    pub backend: Arc<str>,
    /// Where requests go: `host:port`, spoken to over plain HTTP/1.1.
    pub upstream: Authority,
}

#[derive(Debug, thiserror::Error)]
pub enum AllocError {
    /// Every backend is taken: the user waits and retries.
    #[error("no free backend")]
    NoCapacity,
    /// The backend system failed; detail is in the source.
    #[error("backend {backend}: {message}")]
    Backend {
        backend: &'static str,
        message: String,
    },
}

/// Finds, hands out and takes back backends, one user per backend.
///
/// Implementations must be safe to call concurrently; the session registry
/// already guarantees at most one `allocate` in flight per user.
#[async_trait]
pub trait Allocator: Send + Sync + 'static {
    /// The user's existing backend, or a free one now dedicated to them.
    async fn allocate(&self, user: &Identity) -> Result<Lease, AllocError>;

    /// Re-attaches a user to the backend their signed cookie names, without
    /// any network call, if that backend is still theirs to have. `None`
    /// means: allocate normally.
    fn adopt(&self, user: &Identity, pin: &PinnedBackend) -> Option<Lease>;

    /// Gives the backend back. `Ok` means the release is confirmed.
    async fn release(&self, user: &Identity, lease: &Lease) -> Result<(), AllocError>;

    /// Whether new allocations can currently be attempted.
    fn is_ready(&self) -> bool {
        true
    }
}

impl fmt::Display for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.backend, self.upstream)
    }
}
