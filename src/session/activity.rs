//! "Is anyone still using this backend?" Activity is a request, or bytes
//! moving on an open stream; an open socket with no traffic is idle. A
//! request still waiting for its response (a long generation) keeps the
//! session busy until the response starts.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::Session;

pub struct Activity {
    origin: Instant,
    /// Milliseconds after `origin` of the last activity. Relaxed atomics are
    /// enough: a reader only needs some recent value, never an ordering.
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    pub(super) fn new() -> Self {
        Activity {
            origin: Instant::now(),
            last_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        }
    }

    /// Records activity now. Called for every proxied chunk: two loads and
    /// at most one store, no lock.
    pub fn touch(&self) {
        let now = self.origin.elapsed().as_millis() as u64;
        if self.last_ms.load(Ordering::Relaxed) < now {
            self.last_ms.store(now, Ordering::Relaxed);
        }
    }

    /// Time since the last activity; zero while a request awaits its response.
    pub fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return Duration::ZERO;
        }
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.origin.elapsed().saturating_sub(last)
    }

    /// Marks a request as awaiting its response until the guard drops.
    pub fn begin(session: &Arc<Session>) -> InFlight {
        session.activity.in_flight.fetch_add(1, Ordering::AcqRel);
        session.activity.touch();
        InFlight(session.clone())
    }
}

/// Keeps a session busy while a request waits for its upstream's response.
pub struct InFlight(Arc<Session>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.activity.touch();
        self.0.activity.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::allocator::Lease;
    use crate::auth::Identity;

    fn session() -> Arc<Session> {
        Arc::new(Session::new(
            Identity::new("s", "s@example.com", None),
            Lease {
                backend: "b".into(),
                upstream: http::uri::Authority::from_static("127.0.0.1:1"),
            },
            std::time::SystemTime::now(),
        ))
    }

    #[tokio::test(start_paused = true)]
    async fn idle_time_grows_without_activity_and_resets_on_touch() {
        let s = session();
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(s.activity.idle_for() >= Duration::from_secs(10));
        s.activity.touch();
        assert!(s.activity.idle_for() < Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_awaiting_its_response_is_never_idle() {
        let s = session();
        let guard = Activity::begin(&s);
        tokio::time::advance(Duration::from_secs(600)).await;
        assert_eq!(s.activity.idle_for(), Duration::ZERO);
        drop(guard);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(s.activity.idle_for() >= Duration::from_secs(5));
    }
}
