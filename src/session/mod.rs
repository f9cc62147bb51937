//! Sessions: which user holds which backend, since when, and whether they
//! are still using it.
//!
//! - [`registry`]: the table of sessions, single-flight allocation per user.
//! - [`cookie`]: the signed pinning cookie.
//! - [`activity`]: last-activity tracking shared by the proxy and the reaper.
//! - [`line`]: the waiting line of users who got no backend.
//! - [`intent`]: which requests may allocate (only those showing intent).
//! - [`ended`]: why a backend was released, as every replica can tell.

pub mod activity;
pub mod cookie;
pub mod ended;
pub mod intent;
pub mod line;
pub mod profile;
pub mod registry;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio_util::sync::CancellationToken;

pub use activity::{Activity, InFlight};
pub use intent::Intent;
pub use line::Place;
pub use profile::{Profile, Profiles};
pub use registry::{Claim, Registry, SessionError};

use crate::allocator::Lease;
use crate::auth::Identity;
use crate::util::locked;

/// One user's hold on one backend.
pub struct Session {
    pub identity: Identity,
    /// The pool the backend came from: its limits and allocator apply.
    pub profile: Arc<Profile>,
    pub lease: Lease,
    pub allocated_at: SystemTime,
    pub activity: Activity,
    /// Cancelled once the backend is released, so relays still open to it
    /// close instead of leaking into the next user's session.
    closed: CancellationToken,
    /// Set while a release is in progress: the session is no longer handed
    /// to requests, but stays in the table until the release is confirmed.
    releasing: AtomicBool,
    /// The pinning cookie last issued for this session. Locked only to
    /// compare or replace it, never across an `.await`.
    issued_pin: Mutex<Option<cookie::Issued>>,
}

impl Session {
    pub fn new(identity: Identity, profile: Arc<Profile>, lease: Lease, allocated_at: SystemTime) -> Self {
        Session {
            identity,
            profile,
            lease,
            allocated_at,
            activity: Activity::new(),
            closed: CancellationToken::new(),
            releasing: AtomicBool::new(false),
            issued_pin: Mutex::new(None),
        }
    }

    /// Runs `f` with the pinning cookie last issued for this session.
    pub fn with_issued_pin<R>(&self, f: impl FnOnce(Option<&cookie::Issued>) -> R) -> R {
        let issued = locked(&self.issued_pin);
        f(issued.as_ref())
    }

    pub fn remember_pin(&self, issued: cookie::Issued) {
        *locked(&self.issued_pin) = Some(issued);
    }

    /// Resolves when the session's backend has been released.
    pub fn closed(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.closed.cancelled()
    }

    /// How long the user has held the backend.
    pub fn held(&self) -> std::time::Duration {
        SystemTime::now().duration_since(self.allocated_at).unwrap_or_default()
    }

    pub fn is_releasing(&self) -> bool {
        self.releasing.load(Ordering::Acquire)
    }
}
