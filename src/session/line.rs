//! The waiting line: users who got no backend, first come, first served.
//!
//! Without it, whoever refreshes first after a release wins, and someone who
//! has waited ten minutes loses to someone who arrived ten seconds ago. With
//! it, a user may try to allocate only while they stand within the number
//! of free backends from the head; everyone else keeps their place and is
//! told it. Asking again keeps one's place; a waiter silent for longer than
//! `session.queue_timeout` (closed the tab) leaves, and joins at the end if
//! they come back.
//!
//! The line is this process's: on `static` that is the whole deployment;
//! with several Agones replicas each replica keeps its own line.
//!
//! Waiters are few (a line longer than the fleet is rare), so the line is a
//! short vector under a lock held for a scan, never across an `.await`; a
//! user who holds a backend never touches it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::auth::Identity;
use crate::locked;
use crate::metrics::Metrics;
use crate::telemetry;

/// Where a waiting user stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    /// 1-based: 1 is the head of the line.
    pub position: usize,
    /// Everyone waiting, this user included.
    pub waiting: usize,
}

struct Waiter {
    sub: Arc<str>,
    email: Arc<str>,
    joined: Instant,
    last_asked: Instant,
}

pub struct Line {
    waiters: Mutex<Vec<Waiter>>,
    queue_timeout: Duration,
    metrics: Arc<Metrics>,
}

impl Line {
    pub fn new(queue_timeout: Duration, metrics: Arc<Metrics>) -> Line {
        Line {
            waiters: Mutex::new(Vec::new()),
            queue_timeout,
            metrics,
        }
    }

    /// Whether the user may try to allocate now, with `free` backends free:
    /// the line is empty, or they stand among the first `free`. A user in
    /// the line who asks keeps their place (and is not timed out).
    pub fn may_try(&self, sub: &str, free: usize) -> bool {
        let now = Instant::now();
        let mut waiters = locked(&self.waiters);
        self.drop_stale(&mut waiters, now);
        if waiters.is_empty() {
            return true;
        }
        let index = match waiters.iter().position(|w| &*w.sub == sub) {
            Some(index) => {
                waiters[index].last_asked = now;
                index
            }
            None => waiters.len(),
        };
        index < free
    }

    /// Puts the user at the end of the line, or keeps their place if they
    /// are in it, and says where they stand.
    pub fn join(&self, identity: &Identity) -> Place {
        let now = Instant::now();
        let mut waiters = locked(&self.waiters);
        self.drop_stale(&mut waiters, now);
        let index = match waiters.iter().position(|w| w.sub == identity.sub) {
            Some(index) => {
                waiters[index].last_asked = now;
                index
            }
            None => {
                waiters.push(Waiter {
                    sub: identity.sub.clone(),
                    email: identity.email.clone(),
                    joined: now,
                    last_asked: now,
                });
                tracing::info!(
                    user_id = %telemetry::user_id(&identity.sub),
                    email = %telemetry::email(&identity.email),
                    position = waiters.len(),
                    "session queued: no backend free"
                );
                waiters.len() - 1
            }
        };
        self.metrics.users_waiting.set(waiters.len() as i64);
        Place {
            position: index + 1,
            waiting: waiters.len(),
        }
    }

    /// Where the user stands, if they are in the line.
    pub fn place(&self, sub: &str) -> Option<Place> {
        let waiters = locked(&self.waiters);
        let stale = self.stale_before(Instant::now());
        let live: Vec<&Waiter> = waiters.iter().filter(|w| w.last_asked > stale).collect();
        let index = live.iter().position(|w| &*w.sub == sub)?;
        Some(Place {
            position: index + 1,
            waiting: live.len(),
        })
    }

    /// The user got a backend (or gave one back): they leave the line.
    pub fn leave(&self, sub: &str) {
        let mut waiters = locked(&self.waiters);
        let Some(index) = waiters.iter().position(|w| &*w.sub == sub) else {
            return;
        };
        let waiter = waiters.remove(index);
        let waited = waiter.joined.elapsed();
        self.metrics.wait_seconds.observe(waited.as_secs_f64());
        self.metrics.users_waiting.set(waiters.len() as i64);
        tracing::info!(
            user_id = %telemetry::user_id(&waiter.sub),
            email = %telemetry::email(&waiter.email),
            waited_seconds = waited.as_secs(),
            reason = "served",
            "session dequeued"
        );
    }

    /// Lets go of waiters who stopped asking (run by the reaper, and before
    /// every decision, so a stale waiter never holds the line up).
    pub fn prune(&self) {
        let mut waiters = locked(&self.waiters);
        self.drop_stale(&mut waiters, Instant::now());
    }

    pub fn len(&self) -> usize {
        let stale = self.stale_before(Instant::now());
        locked(&self.waiters).iter().filter(|w| w.last_asked > stale).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn stale_before(&self, now: Instant) -> Instant {
        now.checked_sub(self.queue_timeout).unwrap_or(now)
    }

    fn drop_stale(&self, waiters: &mut Vec<Waiter>, now: Instant) {
        let stale = self.stale_before(now);
        let before = waiters.len();
        waiters.retain(|w| {
            let live = w.last_asked > stale;
            if !live {
                tracing::info!(
                    user_id = %telemetry::user_id(&w.sub),
                    email = %telemetry::email(&w.email),
                    waited_seconds = w.joined.elapsed().as_secs(),
                    reason = "gone",
                    "session dequeued"
                );
            }
            live
        });
        if waiters.len() != before {
            self.metrics.users_waiting.set(waiters.len() as i64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str) -> Identity {
        Identity::new(&format!("sub-{name}"), &format!("{name}@example.com"), None)
    }

    fn line() -> Line {
        Line::new(Duration::from_secs(10), Metrics::new())
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_stand_in_the_order_they_came_and_asking_again_keeps_the_place() {
        let line = line();
        let (a, b, c) = (user("a"), user("b"), user("c"));
        assert_eq!(
            line.join(&a),
            Place {
                position: 1,
                waiting: 1
            }
        );
        assert_eq!(
            line.join(&b),
            Place {
                position: 2,
                waiting: 2
            }
        );
        assert_eq!(
            line.join(&c),
            Place {
                position: 3,
                waiting: 3
            }
        );
        assert_eq!(
            line.join(&b),
            Place {
                position: 2,
                waiting: 3
            },
            "asking again"
        );
        line.leave(&a.sub);
        assert_eq!(
            line.place(&c.sub),
            Some(Place {
                position: 2,
                waiting: 2
            })
        );
    }

    #[tokio::test(start_paused = true)]
    async fn only_the_first_as_many_as_are_free_may_try() {
        let line = line();
        assert!(line.may_try("sub-new", 0), "an empty line holds nobody up");
        let (a, b) = (user("a"), user("b"));
        line.join(&a);
        line.join(&b);
        assert!(!line.may_try(&b.sub, 1), "the second waits while one is free");
        assert!(line.may_try(&a.sub, 1), "the head takes it");
        assert!(line.may_try(&b.sub, 2), "with two free, the first two");
        assert!(!line.may_try("sub-newcomer", 2), "a newcomer queues behind them");
        assert!(line.may_try("sub-newcomer", 3));
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_who_stops_asking_leaves_and_comes_back_at_the_end() {
        let line = line();
        let (a, b) = (user("a"), user("b"));
        line.join(&a);
        line.join(&b);
        for _ in 0..3 {
            tokio::time::advance(Duration::from_secs(6)).await;
            assert!(!line.may_try(&b.sub, 0), "b keeps asking");
        }
        assert_eq!(
            line.place(&b.sub),
            Some(Place {
                position: 1,
                waiting: 1
            }),
            "a timed out"
        );
        assert_eq!(
            line.join(&a),
            Place {
                position: 2,
                waiting: 2
            },
            "a rejoins at the end"
        );
    }
}
