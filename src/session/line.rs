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
//! On `static` the line is this process's (the whole deployment). On Agones
//! it is shared through Kubernetes, the only shared state ([`SharedLine`], declared by the allocator that implements it:
//! one `coordination.k8s.io` Lease per waiter, acquired when they joined,
//! renewed when they last asked), so every replica sees the same order.
//!
//! Waiters are few (a line longer than the fleet is rare): the local line is
//! a short vector under a lock held for a scan, never across an `.await`,
//! and the shared one is listed when a decision needs it. A user who holds
//! a backend never touches either.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use prometheus::IntGauge;
use tokio::time::Instant;

use crate::allocator::{AllocError, Allocator, SharedLine, SharedWaiter};
use crate::auth::Identity;
use crate::metrics::Metrics;
use crate::telemetry;
use crate::util::locked;

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

/// Why a user leaves a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leaving {
    /// They got a backend.
    Served,
    /// They wait in another profile's line now: one place a user.
    Moved,
}

/// What the line says to a user without a backend.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    /// Try to allocate.
    Try,
    /// Wait: others come first, or nothing is free.
    Wait(Place),
}

pub struct Line {
    waiters: Mutex<Vec<Waiter>>,
    shared: Option<Shared>,
    queue_timeout: Duration,
    metrics: Arc<Metrics>,
    /// How many wait in this line (its profile's series).
    waiting: IntGauge,
}

/// The shared line, and what this replica knows of it.
struct Shared {
    line: Arc<dyn SharedLine>,
    /// Users this replica has seen in the line: only they can need taking
    /// out of it when they get a backend here, so nobody else's new session
    /// costs an API call.
    seen: Mutex<HashSet<String>>,
    /// When stale waiters were last cleared out.
    pruned: Mutex<Option<Instant>>,
}

impl Line {
    pub fn new(
        queue_timeout: Duration,
        metrics: Arc<Metrics>,
        shared: Option<Arc<dyn SharedLine>>,
        waiting: IntGauge,
    ) -> Line {
        Line {
            waiters: Mutex::new(Vec::new()),
            shared: shared.map(|line| Shared {
                line,
                seen: Mutex::new(HashSet::new()),
                pruned: Mutex::new(None),
            }),
            queue_timeout,
            metrics,
            waiting,
        }
    }

    /// Whether the user may try to allocate now, or where they wait.
    ///
    /// In this process's line (see [`Line::may_try_here`]) with the free
    /// backends `allocator` counts. In the shared line every replica must
    /// agree, so nobody decides from their own view of the fleet: with
    /// nobody waiting the user may try if the view shows a free backend;
    /// otherwise the first as many as [`Allocator::ready_now`] counts right
    /// now may. A waiting ask costs three calls: the line, the count, and
    /// keeping (or taking) the place; a user the line does not let try
    /// never allocates.
    pub async fn admit(&self, user: &Identity, allocator: &dyn Allocator) -> Result<Admission, AllocError> {
        let Some(shared) = &self.shared else {
            if self.may_try_here(&user.sub, allocator.capacity().ready) {
                return Ok(Admission::Try);
            }
            return Ok(Admission::Wait(self.join_here(user)));
        };
        let order = self.shared_order(shared).await?;
        if order.is_empty() && allocator.capacity().ready > 0 {
            return Ok(Admission::Try);
        }
        let key = shared.line.key(user);
        let index = order.iter().position(|w| w.key == key);
        let free = match order.len() {
            0 => 0,
            _ => allocator.ready_now().await?,
        };
        if index.unwrap_or(order.len()) < free {
            if index.is_some() {
                locked(&shared.seen).insert(key);
            }
            return Ok(Admission::Try);
        }
        let place = match index {
            Some(index) => {
                locked(&shared.seen).insert(key);
                shared.line.renew(user, SystemTime::now()).await?;
                Place {
                    position: index + 1,
                    waiting: order.len(),
                }
            }
            None => {
                let fresh = shared.line.join(user, SystemTime::now()).await?;
                locked(&shared.seen).insert(key);
                let place = Place {
                    position: order.len() + 1,
                    waiting: order.len() + 1,
                };
                if fresh {
                    queued(user, place.position);
                }
                place
            }
        };
        self.waiting.set(place.waiting as i64);
        Ok(Admission::Wait(place))
    }

    /// Puts the user in line (or keeps their place) and says where they stand.
    pub async fn join(&self, user: &Identity) -> Result<Place, AllocError> {
        let Some(shared) = &self.shared else {
            return Ok(self.join_here(user));
        };
        let key = shared.line.key(user);
        // Seen in line here (its `may_try` just renewed the place): one list
        // says where; only a place cleared meanwhile is taken anew.
        let known = locked(&shared.seen).contains(&key);
        let mut order = if known {
            self.shared_order(shared).await?
        } else {
            Vec::new()
        };
        let mut fresh = false;
        if !order.iter().any(|w| w.key == key) {
            fresh = shared.line.join(user, SystemTime::now()).await?;
            locked(&shared.seen).insert(key.clone());
            order = self.shared_order(shared).await?;
        }
        let index = order.iter().position(|w| w.key == key).unwrap_or(order.len());
        let place = Place {
            position: index + 1,
            waiting: order.len().max(index + 1),
        };
        if fresh {
            queued(user, place.position);
        }
        Ok(place)
    }

    /// Where the user stands, if they are in the line.
    pub async fn place(&self, user: &Identity) -> Option<Place> {
        let Some(shared) = &self.shared else {
            return self.place_here(&user.sub);
        };
        let order = match self.shared_order(shared).await {
            Ok(order) => order,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the waiting line");
                return None;
            }
        };
        let key = shared.line.key(user);
        let index = order.iter().position(|w| w.key == key)?;
        Some(Place {
            position: index + 1,
            waiting: order.len(),
        })
    }

    /// The user leaves the line: they got a backend, or wait in another
    /// profile's line now.
    pub async fn leave(&self, user: &Identity, why: Leaving) {
        let Some(shared) = &self.shared else {
            return self.leave_here(&user.sub, why);
        };
        let key = shared.line.key(user);
        if !locked(&shared.seen).remove(&key) {
            return;
        }
        match shared.line.leave(&key).await {
            Ok(Some(joined)) => {
                let waited = SystemTime::now().duration_since(joined).unwrap_or_default();
                self.left(&user.sub, &user.email, waited, why);
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "cannot leave the waiting line; it lapses after queue_timeout"),
        }
    }

    /// Lets go of waiters who stopped asking. In the shared line any
    /// replica may clear out anyone's stale entry, at most once per
    /// `queue_timeout`.
    pub async fn prune(&self) {
        let Some(shared) = &self.shared else {
            let mut waiters = locked(&self.waiters);
            return self.drop_stale(&mut waiters, Instant::now());
        };
        {
            let mut pruned = locked(&shared.pruned);
            if pruned.is_some_and(|at| at.elapsed() < self.queue_timeout) {
                return;
            }
            *pruned = Some(Instant::now());
        }
        let stale = SystemTime::now() - self.queue_timeout;
        let waiters = match shared.line.waiters().await {
            Ok(waiters) => waiters,
            Err(e) => return tracing::warn!(error = %e, "cannot read the waiting line"),
        };
        for waiter in waiters.into_iter().filter(|w| w.last_asked <= stale) {
            if let Ok(Some(_)) = shared.line.leave(&waiter.key).await {
                let waited = waiter.last_asked.duration_since(waiter.joined).unwrap_or_default();
                dequeued(None, &waiter.key, waited, "gone");
            }
        }
    }

    /// How many are waiting (the shared line's length when there is one).
    pub async fn waiting(&self) -> usize {
        let Some(shared) = &self.shared else {
            return self.len_here();
        };
        match self.shared_order(shared).await {
            Ok(order) => order.len(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the waiting line");
                0
            }
        }
    }

    /// The live waiters of the shared line, first come first: by joining
    /// time, then key, so every replica sees one order.
    async fn shared_order(&self, shared: &Shared) -> Result<Vec<SharedWaiter>, AllocError> {
        let stale = SystemTime::now() - self.queue_timeout;
        let mut order: Vec<SharedWaiter> = shared
            .line
            .waiters()
            .await?
            .into_iter()
            .filter(|w| w.last_asked > stale)
            .collect();
        order.sort_by(|a, b| (a.joined, &a.key).cmp(&(b.joined, &b.key)));
        self.waiting.set(order.len() as i64);
        Ok(order)
    }

    /// Logs a user leaving; a wait that ended with a backend is measured.
    fn left(&self, sub: &str, email: &str, waited: Duration, why: Leaving) {
        let reason = match why {
            Leaving::Served => {
                self.metrics.wait_seconds.observe(waited.as_secs_f64());
                "served"
            }
            Leaving::Moved => "moved",
        };
        dequeued(Some((sub, email)), "", waited, reason);
    }

    /// Whether the user may try to allocate now, with `free` backends free:
    /// the line is empty, or they stand among the first `free`. A user in
    /// the line who asks keeps their place (and is not timed out).
    fn may_try_here(&self, sub: &str, free: usize) -> bool {
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

    fn join_here(&self, identity: &Identity) -> Place {
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
                queued(identity, waiters.len());
                waiters.len() - 1
            }
        };
        self.waiting.set(waiters.len() as i64);
        Place {
            position: index + 1,
            waiting: waiters.len(),
        }
    }

    fn place_here(&self, sub: &str) -> Option<Place> {
        let waiters = locked(&self.waiters);
        let stale = self.stale_before(Instant::now());
        let live: Vec<&Waiter> = waiters.iter().filter(|w| w.last_asked > stale).collect();
        let index = live.iter().position(|w| &*w.sub == sub)?;
        Some(Place {
            position: index + 1,
            waiting: live.len(),
        })
    }

    fn leave_here(&self, sub: &str, why: Leaving) {
        let mut waiters = locked(&self.waiters);
        let Some(index) = waiters.iter().position(|w| &*w.sub == sub) else {
            return;
        };
        let waiter = waiters.remove(index);
        self.waiting.set(waiters.len() as i64);
        drop(waiters);
        self.left(&waiter.sub, &waiter.email, waiter.joined.elapsed(), why);
    }

    fn len_here(&self) -> usize {
        let stale = self.stale_before(Instant::now());
        locked(&self.waiters).iter().filter(|w| w.last_asked > stale).count()
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
                dequeued(Some((&w.sub, &w.email)), "", w.joined.elapsed(), "gone");
            }
            live
        });
        if waiters.len() != before {
            self.waiting.set(waiters.len() as i64);
        }
    }
}

/// One `session dequeued` line: the user as logs may show them, or (a
/// stale place in the shared line) only its key.
fn dequeued(user: Option<(&str, &str)>, line_key: &str, waited: Duration, reason: &'static str) {
    tracing::info!(
        user_id = user.map(|(sub, _)| telemetry::user_id(sub)),
        email = user.map(|(_, email)| telemetry::email(email)),
        line_key = (!line_key.is_empty()).then_some(line_key),
        waited_seconds = waited.as_secs(),
        reason,
        "session dequeued"
    );
}

fn queued(user: &Identity, position: usize) {
    tracing::info!(
        user_id = %telemetry::user_id(&user.sub),
        email = %telemetry::email(&user.email),
        position,
        "session queued: no backend free"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str) -> Identity {
        Identity::new(&format!("sub-{name}"), &format!("{name}@example.com"), None)
    }

    fn line() -> Line {
        Line::new(
            Duration::from_secs(10),
            Metrics::new(),
            None,
            IntGauge::new("w", "w").unwrap(),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_stand_in_the_order_they_came_and_asking_again_keeps_the_place() {
        let line = line();
        let (a, b, c) = (user("a"), user("b"), user("c"));
        assert_eq!(
            line.join_here(&a),
            Place {
                position: 1,
                waiting: 1
            }
        );
        assert_eq!(
            line.join_here(&b),
            Place {
                position: 2,
                waiting: 2
            }
        );
        assert_eq!(
            line.join_here(&c),
            Place {
                position: 3,
                waiting: 3
            }
        );
        assert_eq!(
            line.join_here(&b),
            Place {
                position: 2,
                waiting: 3
            },
            "asking again"
        );
        line.leave_here(&a.sub, Leaving::Served);
        assert_eq!(
            line.place_here(&c.sub),
            Some(Place {
                position: 2,
                waiting: 2
            })
        );
    }

    #[tokio::test(start_paused = true)]
    async fn only_the_first_as_many_as_are_free_may_try() {
        let line = line();
        assert!(line.may_try_here("sub-new", 0), "an empty line holds nobody up");
        let (a, b) = (user("a"), user("b"));
        line.join_here(&a);
        line.join_here(&b);
        assert!(!line.may_try_here(&b.sub, 1), "the second waits while one is free");
        assert!(line.may_try_here(&a.sub, 1), "the head takes it");
        assert!(line.may_try_here(&b.sub, 2), "with two free, the first two");
        assert!(!line.may_try_here("sub-newcomer", 2), "a newcomer queues behind them");
        assert!(line.may_try_here("sub-newcomer", 3));
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_who_stops_asking_leaves_and_comes_back_at_the_end() {
        let line = line();
        let (a, b) = (user("a"), user("b"));
        line.join_here(&a);
        line.join_here(&b);
        for _ in 0..3 {
            tokio::time::advance(Duration::from_secs(6)).await;
            assert!(!line.may_try_here(&b.sub, 0), "b keeps asking");
        }
        assert_eq!(
            line.place_here(&b.sub),
            Some(Place {
                position: 1,
                waiting: 1
            }),
            "a timed out"
        );
        assert_eq!(
            line.join_here(&a),
            Place {
                position: 2,
                waiting: 2
            },
            "a rejoins at the end"
        );
    }
}
