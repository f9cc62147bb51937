//! "Is anyone still using this backend?" Activity is a request, or bytes
//! moving on an open stream; an open socket with no traffic is idle. A
//! request still waiting for its response (a long generation) keeps the
//! session busy until the response starts.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::Session;

/// `published_ms` before the first share, `accounted_ms` before the first count.
const NEVER: u64 = u64::MAX;

pub struct Activity {
    origin: Instant,
    /// Milliseconds after `origin` of the last activity. Relaxed atomics are
    /// enough: a reader only needs some recent value, never an ordering.
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
    /// Milliseconds after `origin` when the backend last reported a job
    /// running ([`Activity::note_busy`]): shared with other replicas like
    /// activity, but not activity here (the user may have gone).
    busy_ms: AtomicU64,
    /// `last_ms` as of the last time activity was shared with other
    /// replicas, and when (ms after `origin`) that was.
    published_ms: AtomicU64,
    published_at_ms: AtomicU64,
    /// Time with activity so far (ms), counted by [`Activity::account`] up
    /// to `accounted_ms` after `origin`.
    active_ms: AtomicU64,
    accounted_ms: AtomicU64,
}

impl Activity {
    pub(super) fn new() -> Self {
        Activity {
            origin: Instant::now(),
            last_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            busy_ms: AtomicU64::new(0),
            published_ms: AtomicU64::new(NEVER),
            published_at_ms: AtomicU64::new(0),
            active_ms: AtomicU64::new(0),
            accounted_ms: AtomicU64::new(NEVER),
        }
    }

    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    /// Records activity now. Called for every proxied chunk: two loads and
    /// at most one store, no lock.
    pub fn touch(&self) {
        let now = self.now_ms();
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

    /// If there was activity since it was last shared and at least
    /// `interval` has passed since then, marks it shared and returns when it
    /// happened. Only the reaper calls this.
    pub fn unshared(&self, interval: Duration) -> Option<std::time::SystemTime> {
        let now = self.now_ms();
        let last = self
            .last_ms
            .load(Ordering::Relaxed)
            .max(self.busy_ms.load(Ordering::Relaxed));
        let busy = self.in_flight.load(Ordering::Acquire) > 0;
        let published = self.published_ms.load(Ordering::Relaxed);
        let new = busy || published == NEVER || last > published;
        let published_at = self.published_at_ms.load(Ordering::Relaxed);
        let due = published_at == 0 || now.saturating_sub(published_at) >= interval.as_millis() as u64;
        if !new || !due {
            return None;
        }
        self.published_ms.store(last, Ordering::Relaxed);
        self.published_at_ms.store(now.max(1), Ordering::Relaxed);
        let since = if busy { 0 } else { now.saturating_sub(last) };
        Some(std::time::SystemTime::now() - Duration::from_millis(since))
    }

    /// Counts the time since the last call as active if there was activity
    /// in it (a request or stream bytes, a request awaiting its response, a
    /// job the backend reported), and returns the total so far. The reaper
    /// calls it every pass, so the total is exact to one reaper period; the
    /// hot path pays nothing for it.
    pub fn account(&self) -> Duration {
        let now = self.now_ms();
        // A session is made for a request: its first period is active.
        let (from, first) = match self.accounted_ms.swap(now, Ordering::Relaxed) {
            NEVER => (0, true),
            from => (from, false),
        };
        let last = self
            .last_ms
            .load(Ordering::Relaxed)
            .max(self.busy_ms.load(Ordering::Relaxed));
        let busy = self.in_flight.load(Ordering::Acquire) > 0;
        let active = if first || busy || last > from {
            now.saturating_sub(from)
        } else {
            0
        };
        Duration::from_millis(self.active_ms.fetch_add(active, Ordering::Relaxed) + active)
    }

    /// Records that the backend reported a job running now: the session
    /// stays idle here, but other replicas are told it is in use.
    pub fn note_busy(&self) {
        self.busy_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Marks a request as awaiting its response until the guard drops
    /// (meanwhile the session is never idle; the drop records the time).
    pub fn begin(session: &Session) -> InFlight<'_> {
        session.activity.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(session)
    }
}

/// Keeps a session busy while a request waits for its upstream's response.
pub struct InFlight<'a>(&'a Session);

impl InFlight<'_> {
    /// Ends the wait without recording activity: the request never reached
    /// the backend.
    pub fn unanswered(self) {
        self.0.activity.in_flight.fetch_sub(1, Ordering::AcqRel);
        std::mem::forget(self);
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.activity.touch();
        self.0.activity.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::allocator::Lease;
    use crate::auth::Identity;

    fn session() -> Arc<Session> {
        Arc::new(Session::new(
            Identity::new("s", "s@example.com", None),
            crate::session::profile::testing::profile(),
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
    async fn activity_is_shared_at_most_once_per_interval_and_only_when_new() {
        let s = session();
        s.activity.touch();
        assert!(
            s.activity.unshared(Duration::from_secs(30)).is_some(),
            "first activity is shared"
        );
        s.activity.touch();
        assert!(
            s.activity.unshared(Duration::from_secs(30)).is_none(),
            "not again within the interval"
        );
        tokio::time::advance(Duration::from_secs(31)).await;
        s.activity.touch();
        assert!(s.activity.unshared(Duration::from_secs(30)).is_some());
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(
            s.activity.unshared(Duration::from_secs(30)).is_none(),
            "nothing new to share"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_backend_is_shared_as_in_use_without_ending_idleness_here() {
        let s = session();
        s.activity.touch();
        assert!(s.activity.unshared(Duration::from_secs(30)).is_some());
        tokio::time::advance(Duration::from_secs(100)).await;
        s.activity.note_busy();
        assert!(s.activity.idle_for() >= Duration::from_secs(100), "still idle here");
        let shared = s.activity.unshared(Duration::from_secs(30)).expect("busy is news");
        let age = std::time::SystemTime::now().duration_since(shared).unwrap();
        assert!(age < Duration::from_secs(1), "shared as in use now, not {age:?} ago");
    }

    #[tokio::test(start_paused = true)]
    async fn active_time_counts_the_periods_with_activity_only() {
        let s = session();
        s.activity.touch();
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(s.activity.account(), Duration::from_secs(10), "a period with a request");
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(
            s.activity.account(),
            Duration::from_secs(10),
            "a silent period adds nothing"
        );
        let guard = Activity::begin(&s);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(
            s.activity.account(),
            Duration::from_secs(20),
            "a request awaiting its response"
        );
        drop(guard);
        tokio::time::advance(Duration::from_secs(10)).await;
        s.activity.note_busy();
        assert_eq!(
            s.activity.account(),
            Duration::from_secs(30),
            "a job the backend reports"
        );
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
