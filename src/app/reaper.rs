//! Gives idle backends back. A session is due when nothing has moved for
//! `idle_timeout` here (and no request awaits a response) nor, as far as the
//! backend records, on any other replica; or when it has lived past
//! `max_lifetime`. The registry confirms each release before it forgets the
//! session; a failed release is retried on the next pass.
//!
//! With `session.busy_probe` set, an idle session is released only once its
//! backend reports no job running ([`BusyProbe`]); until then each pass
//! asks again, and other replicas are told the backend is in use (their
//! sweeps ask the backend too).
//!
//! Each pass also shares this replica's recent activity with the others
//! (at most once per `activity_sync_interval` per user) and lets the
//! allocator sweep backends no replica holds.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;

use tokio_util::sync::CancellationToken;

use crate::allocator::BusyProbe;
use crate::allocator::ReleaseReason;
use crate::app::AppState;
use crate::session::Session;
use crate::telemetry;

/// At most this many backend calls (activity records, releases) at once.
const CONCURRENT_CALLS: usize = 8;

/// Why a session is due for release, if it is. `elsewhere` is the newest
/// activity other replicas recorded.
fn due(
    session: &Session,
    elsewhere: Option<SystemTime>,
    idle_timeout: Duration,
    max_lifetime: Duration,
    now: SystemTime,
) -> Option<ReleaseReason> {
    let age = now.duration_since(session.allocated_at).unwrap_or_default();
    if !max_lifetime.is_zero() && age >= max_lifetime {
        return Some(ReleaseReason::MaxLifetime);
    }
    let idle_here = session.activity.idle_for() >= idle_timeout;
    let idle_elsewhere = elsewhere.is_none_or(|seen| now.duration_since(seen).unwrap_or_default() >= idle_timeout);
    (idle_here && idle_elsewhere).then_some(ReleaseReason::Idle)
}

/// How often sessions are checked: a tenth of the idle timeout, within
/// 100 ms..10 s, so a release happens at most ~10 % late.
fn period(idle_timeout: Duration) -> Duration {
    (idle_timeout / 10).clamp(Duration::from_millis(100), Duration::from_secs(10))
}

pub async fn run(state: Arc<AppState>, stop: CancellationToken) {
    let probe = state.config.session.busy_probe.as_deref().map(BusyProbe::new);
    // Often enough for the profile with the shortest idle timeout.
    let shortest = state.config.profiles.iter().map(|p| p.idle_timeout).min();
    let mut ticker = tokio::time::interval(period(shortest.unwrap_or(state.config.session.idle_timeout)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.cancelled() => return,
        }
        pass(&state, probe.as_ref()).await;
    }
}

async fn pass(state: &AppState, probe: Option<&BusyProbe>) {
    let now = SystemTime::now();
    let sessions = state.registry.sessions();
    futures_util::stream::iter(&sessions)
        .for_each_concurrent(CONCURRENT_CALLS, |session| async move {
            session.activity.account();
            let profile = &session.profile;
            let allocator = &profile.allocator;
            let elsewhere = allocator.activity_elsewhere(&session.lease);
            let mut reason = due(session, elsewhere, profile.idle_timeout(), profile.max_lifetime(), now);
            if let (Some(ReleaseReason::Idle), Some(probe)) = (reason, probe) {
                if probe.is_busy(&session.lease.upstream).await {
                    tracing::info!(user_id = %telemetry::user_id(&session.identity.sub), backend = %session.lease.backend, "idle release postponed: the backend reports a job in progress");
                    session.activity.note_busy();
                    reason = None;
                }
            }
            if let Some(reason) = reason {
                // Errors are logged by the registry; the session stays and
                // the next pass retries.
                let _ = state.registry.release(session, reason).await;
            } else if let Some(at) = session
                .activity
                .unshared(profile.config.backend.agones.activity_sync_interval)
            {
                if let Err(e) = allocator.record_activity(&session.lease, at).await {
                    tracing::warn!(backend = %session.lease, error = %e, "could not record activity");
                }
            }
        })
        .await;
    for profile in state.registry.profiles().iter() {
        profile.line.prune().await;
    }
    state.registry.forget_old_releases(SystemTime::now());
    if let Some(keys) = state.auth.key_store() {
        keys.report_age();
    }
    state.auth.purge_expired();
    state.forwarder.prune_idle();
    let held_here: HashSet<Arc<str>> = state
        .registry
        .sessions()
        .iter()
        .map(|s| s.lease.backend.clone())
        .collect();
    for profile in state.registry.profiles().iter() {
        profile.allocator.sweep(profile.idle_timeout(), &held_here, probe).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::allocator::Lease;
    use crate::auth::Identity;

    fn session(allocated_at: SystemTime) -> Session {
        Session::new(
            Identity::new("s", "s@example.com", None),
            crate::session::profile::testing::profile(),
            Lease {
                backend: "b".into(),
                upstream: http::uri::Authority::from_static("127.0.0.1:1"),
            },
            allocated_at,
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_is_due_after_its_idle_timeout() {
        let s = session(SystemTime::now());
        assert_eq!(
            due(&s, None, Duration::from_secs(60), Duration::ZERO, SystemTime::now()),
            None
        );
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(
            due(&s, None, Duration::from_secs(60), Duration::ZERO, SystemTime::now()),
            Some(ReleaseReason::Idle)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_active_session_is_due_after_its_max_lifetime_only_when_set() {
        let s = session(SystemTime::now() - Duration::from_secs(7200));
        s.activity.touch();
        assert_eq!(
            due(&s, None, Duration::from_secs(60), Duration::ZERO, SystemTime::now()),
            None
        );
        assert_eq!(
            due(
                &s,
                None,
                Duration::from_secs(60),
                Duration::from_secs(3600),
                SystemTime::now()
            ),
            Some(ReleaseReason::MaxLifetime)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn activity_on_another_replica_keeps_a_session() {
        let s = session(SystemTime::now());
        tokio::time::advance(Duration::from_secs(61)).await;
        let now = SystemTime::now();
        let minute = Duration::from_secs(60);
        assert_eq!(
            due(&s, Some(now - Duration::from_secs(10)), minute, Duration::ZERO, now),
            None
        );
        assert_eq!(
            due(&s, Some(now - Duration::from_secs(120)), minute, Duration::ZERO, now),
            Some(ReleaseReason::Idle)
        );
    }

    #[test]
    fn the_check_period_follows_the_idle_timeout_within_bounds() {
        assert_eq!(period(Duration::from_secs(1)), Duration::from_millis(100));
        assert_eq!(period(Duration::from_secs(60)), Duration::from_secs(6));
        assert_eq!(period(Duration::from_secs(3600)), Duration::from_secs(10));
    }
}
