//! How every replica can tell why a user's backend was given back (the
//! reasons themselves, [`ReleaseReason`], belong to the allocator).
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

use std::time::{Duration, SystemTime};

use crate::allocator::{Ended, ReleaseReason};

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
    use std::time::UNIX_EPOCH;

    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

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
