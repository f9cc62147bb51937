//! Why a user's backend was given back, and how every replica can tell.
//!
//! A user whose GPU was released must be told so, not silently given a new
//! one by the next background request of their open tab. Several replicas
//! serve one user and a restart forgets everything in memory, so the
//! reason is found, in this order, from:
//!
//! 1. the pinning cookie itself, when the release was answered to the user
//!    (`/_router/release`), or once any replica has worked the reason out:
//!    every answer that says "session ended" records it in the cookie;
//! 2. this replica's memory of the releases it made (idle, lifetime,
//!    administrator), or the backend system's record of them
//!    ([`Allocator::released`](crate::allocator::Allocator::released));
//! 3. the cookie's time stamps, which any replica reads alike: the pin
//!    carries when the backend was allocated and when the user was last
//!    active (refreshed at most every [`stamp_interval`]), so "lifetime
//!    reached" and "idle" follow from the configuration.

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

/// A release as answered to one of the user's requests: what to say, and
/// the cookie that records it for every replica (none when the user's
/// cookie says so already).
#[derive(Debug)]
pub struct Notice {
    pub ended: Ended,
    pub cookie: Option<http::HeaderValue>,
}

/// How often an active user's cookie gets a new last-active stamp: often
/// enough that "idle" can be told from the stamp a quarter of the idle
/// timeout late at worst, rarely enough that a busy page is not sent a
/// new cookie with every request (at most once a minute).
pub fn stamp_interval(idle_timeout: Duration) -> Duration {
    (idle_timeout / 4).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// What the session settings say happened to a backend the cookie
/// describes, from its stamps alone: `max_lifetime` ran out (the reaper
/// releases at that moment on every replica), or the user has been idle
/// for longer than `idle_timeout` even counting a stamp that lags by up
/// to [`stamp_interval`]. `elsewhere` is activity other replicas recorded.
pub fn presumed(
    allocated_at: u64,
    last_active: u64,
    elsewhere: Option<SystemTime>,
    idle_timeout: Duration,
    max_lifetime: Duration,
    now: SystemTime,
) -> Option<Ended> {
    let unix = crate::util::unix;
    let now = unix(now);
    let last = allocated_at.max(last_active).max(elsewhere.map_or(0, unix));
    let lag = stamp_interval(idle_timeout).as_secs();
    // Idle for sure from here on; unknown without any stamp.
    let idle_end = (last > 0).then_some(last + idle_timeout.as_secs());
    let lifetime_end = (!max_lifetime.is_zero() && allocated_at > 0).then_some(allocated_at + max_lifetime.as_secs());
    match (lifetime_end, idle_end) {
        // Ran out while the user may still have been busy.
        (Some(end), idle) if end <= now && idle.is_none_or(|idle| end <= idle + lag) => Some(Ended {
            reason: ReleaseReason::MaxLifetime,
            at: end,
        }),
        (_, Some(idle)) if idle + lag <= now => Some(Ended {
            reason: ReleaseReason::Idle,
            at: idle,
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

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

    #[test]
    fn the_stamp_is_refreshed_a_quarter_of_the_idle_timeout_apart_within_bounds() {
        assert_eq!(stamp_interval(Duration::from_secs(1)), Duration::from_secs(1));
        assert_eq!(stamp_interval(MINUTE), Duration::from_secs(15));
        assert_eq!(stamp_interval(15 * MINUTE), MINUTE);
    }

    #[test]
    fn stamps_tell_idle_from_lifetime_and_from_still_in_use() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let a = crate::util::unix(t0);
        let idle = 10 * MINUTE;
        // Active a minute ago: nothing can be said.
        assert_eq!(presumed(a, a + 540, None, idle, Duration::ZERO, t0 + idle), None);
        // Last active at allocation, the idle timeout and a stamp's lag gone.
        let later = t0 + idle + Duration::from_secs(150);
        assert_eq!(
            presumed(a, a, None, idle, Duration::ZERO, later),
            Some(Ended {
                reason: ReleaseReason::Idle,
                at: a + 600
            })
        );
        // Another replica saw the user since: still in use.
        assert_eq!(presumed(a, a, Some(later - MINUTE), idle, Duration::ZERO, later), None);
        // The lifetime ran out while the user was busy.
        let lifetime = 60 * MINUTE;
        assert_eq!(
            presumed(a, a + 3590, None, idle, lifetime, t0 + lifetime),
            Some(Ended {
                reason: ReleaseReason::MaxLifetime,
                at: a + 3600
            })
        );
        // Idle long before the lifetime ran out: idle it was.
        assert_eq!(
            presumed(a, a, None, idle, lifetime, t0 + 2 * lifetime),
            Some(Ended {
                reason: ReleaseReason::Idle,
                at: a + 600
            })
        );
        assert_eq!(
            presumed(0, 0, None, idle, Duration::ZERO, later),
            None,
            "a cookie without stamps"
        );
    }
}
