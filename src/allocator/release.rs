//! Why a backend was released: said by whoever releases it (the user, the
//! reaper, an operator, a backend found dead) and recorded by the backend
//! system for every replica, so it lives beside the [`Allocator`](super::Allocator)
//! that carries it, below the sessions that tell the user.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Why a backend was released. The strings are the `reason` label of the
/// release metrics and log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseReason {
    /// The user asked (`POST /_router/release`).
    User,
    /// Nothing moved for `idle_timeout`.
    Idle,
    /// Held for `max_lifetime`.
    MaxLifetime,
    /// The backend refused connections and was replaced.
    DeadPod,
    /// An operator released it from the admin page.
    Admin,
    /// The user held two backends; this one went.
    Duplicate,
}

impl ReleaseReason {
    pub const ALL: [ReleaseReason; 6] = [
        ReleaseReason::User,
        ReleaseReason::Idle,
        ReleaseReason::MaxLifetime,
        ReleaseReason::DeadPod,
        ReleaseReason::Admin,
        ReleaseReason::Duplicate,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ReleaseReason::User => "user",
            ReleaseReason::Idle => "idle",
            ReleaseReason::MaxLifetime => "max_lifetime",
            ReleaseReason::DeadPod => "dead_pod",
            ReleaseReason::Admin => "admin",
            ReleaseReason::Duplicate => "duplicate",
        }
    }

    /// Whether the release ends the user's session, so they are told and
    /// start again by choice; a dead pod or a duplicate is replaced on the
    /// user's next request instead.
    pub fn ends_session(self) -> bool {
        !matches!(self, ReleaseReason::DeadPod | ReleaseReason::Duplicate)
    }

    /// The end of "Your GPU was released …", for the user.
    pub fn sentence(self) -> &'static str {
        match self {
            ReleaseReason::User => "because you released it",
            ReleaseReason::Idle => "because it was idle",
            ReleaseReason::MaxLifetime => "because the session reached its maximum lifetime",
            ReleaseReason::DeadPod => "because its server stopped answering",
            ReleaseReason::Admin => "by an administrator",
            ReleaseReason::Duplicate => "because you held two",
        }
    }
}

/// A release as the user is told about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ended {
    #[serde(rename = "r")]
    pub reason: ReleaseReason,
    /// Unix seconds of the release (for `idle` found from the cookie's
    /// stamps: when the idle timeout ran out).
    #[serde(rename = "t")]
    pub at: u64,
}

/// How long a release is remembered where the cookie does not carry it
/// (this replica's memory, a replica's view of a released GameServer):
/// longer than a user stays away with a tab open on any ordinary day.
pub const REMEMBERED_FOR: Duration = Duration::from_secs(24 * 3600);

impl Ended {
    pub fn new(reason: ReleaseReason, at: SystemTime) -> Self {
        Ended {
            reason,
            at: crate::util::unix(at),
        }
    }

    pub fn at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.at)
    }

    /// Whether the release is past [`REMEMBERED_FOR`] at `now`.
    pub fn is_forgotten(&self, now: SystemTime) -> bool {
        now.duration_since(self.at()).is_ok_and(|age| age >= REMEMBERED_FOR)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_keep_their_metric_labels_in_the_cookie_too() {
        for reason in ReleaseReason::ALL {
            let json = serde_json::to_string(&reason).unwrap();
            assert_eq!(json, format!("\"{}\"", reason.as_str()));
            assert_eq!(serde_json::from_str::<ReleaseReason>(&json).unwrap(), reason);
        }
        assert_eq!(
            ReleaseReason::ALL.map(ReleaseReason::as_str),
            crate::metrics::RELEASE_REASONS
        );
    }
}
