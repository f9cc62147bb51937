//! Backends: where a user's WebUI runs, and how one is obtained and given
//! back. The proxy only sees [`Lease`]s; which [`Allocator`] made them is
//! configuration.

pub mod agones;
mod busy_probe;
mod line;
mod release;
pub mod shared;
mod static_pool;

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use http::uri::Authority;
use tokio_util::sync::CancellationToken;

pub use busy_probe::BusyProbe;
pub use line::{SharedLine, SharedWaiter};
pub use release::{Ended, ReleaseReason, REMEMBERED_FOR};
pub use shared::Shared;
pub use static_pool::{Probe, StaticPool};

use crate::auth::Identity;

/// One user's hold on one backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Stable id of the backend (a static slot, later a GameServer name).
    pub backend: Arc<str>,
    /// Where requests go: `host:port`, spoken to over plain HTTP/1.1.
    pub upstream: Authority,
}

/// What the pinning cookie remembers about a user's backend: what
/// [`Allocator::adopt`] re-attaches the user to. Serialised inside the cookie.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PinnedBackend {
    /// The backend's id (a static slot or a GameServer name).
    #[serde(rename = "b")]
    pub backend: String,
    /// `host:port` the backend was reached at.
    #[serde(rename = "u")]
    pub upstream: String,
    /// Unix seconds when the backend was allocated.
    #[serde(rename = "a")]
    pub allocated_at: u64,
    /// Unix seconds after which the cookie is ignored.
    #[serde(rename = "e")]
    pub expires: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum AllocError {
    /// Every backend is taken: the user waits and retries.
    #[error("no free backend")]
    NoCapacity,
    /// The backend system failed; detail is in the source.
    #[error("backend {backend}: {message}")]
    Backend { backend: &'static str, message: String },
    /// The backend changed since it was looked at (a precondition failed):
    /// the operation was not done and should be reconsidered.
    #[error("backend changed concurrently")]
    Conflict,
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

    /// Gives the backend back. `Ok` means the release is confirmed (or the
    /// backend is already gone). An [`ReleaseReason::Idle`] release must
    /// abort if the backend changed since the idle decision (another replica
    /// saw activity).
    async fn release(&self, user: &Identity, lease: &Lease, reason: ReleaseReason) -> Result<(), AllocError>;

    /// Why and when `backend`, which the user's cookie names, was released,
    /// if the backend system recorded that where every replica sees it,
    /// without a network call: it lets a replica that did not make the
    /// release (or has restarted since) tell the user "by an
    /// administrator". `None`: the reason is worked out from the cookie.
    fn released(&self, _user: &Identity, _backend: &str) -> Option<Ended> {
        None
    }

    /// Whether new allocations can currently be attempted.
    fn is_ready(&self) -> bool {
        true
    }

    /// Whether the lease is still the user's, as far as is known without a
    /// network call. `false` makes the session be forgotten and allocated
    /// again (the backend was deleted or replaced elsewhere).
    fn still_held(&self, _user: &Identity, _lease: &Lease) -> bool {
        true
    }

    /// Whether what [`Allocator::still_held`] says may be out of date (a
    /// broken watch): then [`Allocator::confirm_held`] asks.
    fn view_in_doubt(&self) -> bool {
        false
    }

    /// [`Allocator::still_held`], confirmed through the backend system while
    /// its view is in doubt: never forward a user to an address nobody has
    /// confirmed is still theirs (a released pod's address goes to the next
    /// pod).
    async fn confirm_held(&self, user: &Identity, lease: &Lease) -> bool {
        self.still_held(user, lease)
    }

    /// The user's own backend, if they hold one (through any replica), as
    /// the backend system records it: looked up before the waiting line, so
    /// a user never waits for what they already have. `None`: they hold
    /// none, or this backend kind re-finds it only by allocating.
    async fn find_own(&self, _user: &Identity) -> Result<Option<Lease>, AllocError> {
        Ok(None)
    }

    /// How many backends are free right now, asked of the backend system
    /// itself (a shared waiting line must not decide from one replica's
    /// view).
    async fn ready_now(&self) -> Result<usize, AllocError> {
        Ok(self.capacity().ready)
    }

    /// Work that follows an allocation but that its answer does not need
    /// (on Agones: releasing a second server replicas raced to give the
    /// user, recording when the hold began). Run after the user is served.
    async fn settle(&self, _user: &Identity, _lease: &Lease) {}

    /// Whether a backend that refuses connections should be released and
    /// replaced (a dead pod) rather than kept (a fixed host that may return).
    fn replaces_unreachable(&self) -> bool {
        false
    }

    /// The lease's backend refused a connection. Records it (a pool skips
    /// a backend that is down for new users) and says whether its user
    /// should be moved off it — released, and given another — rather than
    /// kept on it until it answers again.
    fn refused(&self, _lease: &Lease) -> bool {
        self.replaces_unreachable()
    }

    /// Backends known not to answer right now (skipped for new users), for
    /// `/readyz`, the admin page and the metrics.
    fn down(&self) -> Vec<Lease> {
        Vec::new()
    }

    /// The backend's own background work (health probes), until `stop`.
    async fn maintain(&self, _stop: CancellationToken) {}

    /// Since when the user has held this backend, if the backend system
    /// records it (so every replica counts held time and `max_lifetime`
    /// from the same moment).
    fn held_since(&self, _lease: &Lease) -> Option<SystemTime> {
        None
    }

    /// Where the waiting line lives when it spans replicas; `None`: in
    /// this process.
    fn shared_line(&self) -> Option<Arc<dyn SharedLine>> {
        None
    }

    /// The newest activity other replicas recorded for this lease.
    fn activity_elsewhere(&self, _lease: &Lease) -> Option<SystemTime> {
        None
    }

    /// Records this replica's latest activity on the lease, for the others.
    async fn record_activity(&self, _lease: &Lease, _at: SystemTime) -> Result<(), AllocError> {
        Ok(())
    }

    /// Every user's backend across the whole deployment (all replicas), as
    /// far as the backend system records it, without a network call.
    /// `None`: only this process knows (use the session table).
    fn deployment_sessions(&self) -> Option<Vec<BackendSession>> {
        None
    }

    /// How many backends are free, taken and in total.
    fn capacity(&self) -> Capacity;

    /// Each backend that several users share, with how many this replica
    /// has on it, for the admin page. Empty: every backend is one user's.
    fn shared_load(&self) -> Vec<SharedLoad> {
        Vec::new()
    }

    /// Releases a backend by name for an operator, whichever replica holds
    /// it. `Ok(false)` if there is no such user backend.
    async fn release_backend(&self, _backend: &str, _reason: ReleaseReason) -> Result<bool, AllocError> {
        Ok(false)
    }

    /// Releases backends no replica is using any more: idle ones whose
    /// session lives on no replica here (`held_here` names this replica's)
    /// and whose backend does not report a job running (`probe`, when
    /// configured), and duplicates. Run by every replica's reaper.
    async fn sweep(&self, _idle_timeout: Duration, _held_here: &HashSet<Arc<str>>, _probe: Option<&BusyProbe>) {}
}

/// One user's backend as the backend system records it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackendSession {
    pub backend: String,
    /// Deleted, and lingering until its pod is gone: no longer anyone's.
    pub releasing: bool,
    /// The user's email when recorded, else their label.
    pub user: String,
    pub node: Option<String>,
    #[serde(skip)]
    pub allocated_at: Option<SystemTime>,
    #[serde(skip)]
    pub last_activity: Option<SystemTime>,
}

/// One shared backend's load as this replica counts it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SharedLoad {
    pub backend: String,
    pub upstream: String,
    /// Users this replica has pinned to it.
    pub users: usize,
    /// `backend.shared.max_users_per_backend`.
    pub max_users: usize,
    /// Refused a connection or its last probe: no new users.
    pub down: bool,
}

/// Backend counts for the admin view.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Capacity {
    pub ready: usize,
    pub allocated: usize,
    pub reserved: usize,
    pub total: usize,
}

impl fmt::Display for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.backend, self.upstream)
    }
}

/// What the backends' unit tests share: a user and the pin a cookie would
/// carry for a lease.
#[cfg(test)]
pub(crate) mod testing {
    use super::{Lease, PinnedBackend};
    use crate::auth::Identity;

    pub fn user(name: &str) -> Identity {
        Identity::new(name, &format!("{name}@example.com"), None)
    }

    pub fn pin_for(lease: &Lease) -> PinnedBackend {
        PinnedBackend {
            backend: lease.backend.to_string(),
            upstream: lease.upstream.to_string(),
            allocated_at: 0,
            expires: u64::MAX,
        }
    }
}
