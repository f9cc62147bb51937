//! Gives idle backends back. A session is due when nothing has moved for
//! `idle_timeout` (and no request awaits a response), or when it has lived
//! past `max_lifetime`. The registry confirms each release before it forgets
//! the session; a failed release is retried on the next pass.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::server::AppState;
use crate::session::Session;

/// Why a session is due for release, if it is.
fn due(
    session: &Session,
    idle_timeout: Duration,
    max_lifetime: Duration,
    now: SystemTime,
) -> Option<&'static str> {
    let age = now.duration_since(session.allocated_at).unwrap_or_default();
    if !max_lifetime.is_zero() && age >= max_lifetime {
        return Some("max_lifetime");
    }
    (session.activity.idle_for() >= idle_timeout).then_some("idle")
}

/// How often sessions are checked: a tenth of the idle timeout, within
/// 100 ms..10 s, so a release happens at most ~10 % late.
fn period(idle_timeout: Duration) -> Duration {
    (idle_timeout / 10).clamp(Duration::from_millis(100), Duration::from_secs(10))
}

pub async fn run(state: Arc<AppState>, stop: CancellationToken) {
    let session_config = &state.config.session;
    let mut ticker = tokio::time::interval(period(session_config.idle_timeout));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.cancelled() => return,
        }
        let now = SystemTime::now();
        for session in state.registry.sessions() {
            let Some(reason) = due(
                &session,
                session_config.idle_timeout,
                session_config.max_lifetime,
                now,
            ) else {
                continue;
            };
            // Errors are logged by the registry; the session stays and the
            // next pass retries.
            let _ = state.registry.release(&session, reason).await;
        }
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
            due(
                &s,
                Duration::from_secs(60),
                Duration::ZERO,
                SystemTime::now()
            ),
            None
        );
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(
            due(
                &s,
                Duration::from_secs(60),
                Duration::ZERO,
                SystemTime::now()
            ),
            Some("idle")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_active_session_is_due_after_its_max_lifetime_only_when_set() {
        let s = session(SystemTime::now() - Duration::from_secs(7200));
        s.activity.touch();
        assert_eq!(
            due(
                &s,
                Duration::from_secs(60),
                Duration::ZERO,
                SystemTime::now()
            ),
            None
        );
        assert_eq!(
            due(
                &s,
                Duration::from_secs(60),
                Duration::from_secs(3600),
                SystemTime::now()
            ),
            Some("max_lifetime")
        );
    }

    #[test]
    fn the_check_period_follows_the_idle_timeout_within_bounds() {
        assert_eq!(period(Duration::from_secs(1)), Duration::from_millis(100));
        assert_eq!(period(Duration::from_secs(60)), Duration::from_secs(6));
        assert_eq!(period(Duration::from_secs(3600)), Duration::from_secs(10));
    }
}
