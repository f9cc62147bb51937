//! The session table: `sub` → the user's [`Session`].
//!
//! Lookups for a known user are one `DashMap` read. The first request of a
//! user inserts a per-user `OnceCell` and runs the allocation inside it,
//! outside any map guard, so ten concurrent first requests cause one
//! allocation and nobody holds a lock across the network call.
//!
//! What a request without a session may do is its [`Claim`]: re-attach
//! the backend its cookie names, or allocate, which only requests showing
//! the user's intent may ([`Intent`](super::Intent)). Releases made here
//! are remembered per user, so the user can be told why their GPU went.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::util::FastMap;
use tokio::sync::OnceCell;
use tokio::time::Instant;

use super::ended::Notice;
use super::line::{Admission, Leaving, Place};
use super::profile::{Outcome, Profile, Profiles};
use super::Session;
use crate::allocator::{AllocError, Lease, PinnedBackend};
use crate::allocator::{Ended, ReleaseReason};
use crate::auth::Identity;
use crate::metrics::Metrics;
use crate::telemetry;

/// A user's entry: their session, or the allocation that will make it
/// (which concurrent first requests wait on together). Once made, the
/// session replaces the cell, so a lookup follows one pointer fewer.
#[derive(Clone)]
enum Slot {
    Ready(Arc<Session>),
    Pending(Arc<OnceCell<Arc<Session>>>),
}

impl Slot {
    fn session(&self) -> Option<&Arc<Session>> {
        match self {
            Slot::Ready(session) => Some(session),
            Slot::Pending(cell) => cell.get(),
        }
    }

    fn holds(&self, session: &Arc<Session>) -> bool {
        self.session().is_some_and(|s| Arc::ptr_eq(s, session))
    }

    fn is_cell(&self, cell: &Arc<OnceCell<Arc<Session>>>) -> bool {
        matches!(self, Slot::Pending(c) if Arc::ptr_eq(c, cell))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Alloc(#[from] AllocError),
    /// The user's backend is being given back right now.
    #[error("session is being released")]
    Releasing,
    /// No backend for the user now: they stand in the waiting line (of
    /// this profile, when the user had a choice of several).
    #[error("no backend free; number {} of {} in line", .0.position, .0.waiting)]
    Waiting(Place, Option<Arc<Profile>>),
    /// The backend the user's cookie names was released; nothing was
    /// allocated.
    #[error("session ended ({})", .0.ended.reason.as_str())]
    Ended(Box<Notice>),
    /// The user holds no backend and the request does not start one.
    #[error("no session, and the request does not start one")]
    NoSession,
    /// The user may use several profiles and named none: they choose
    /// (the request came to `next`).
    #[error("no profile chosen")]
    ChooseProfile { next: String },
    /// The profile named does not exist, or is not for this user: the two
    /// look the same to them.
    #[error("profile {0:?} is not one the user may use")]
    ProfileNotAllowed(String),
}

/// What a request of a user without a session here may do.
pub enum Claim {
    /// Re-attach the backend the user's cookie names (of `profile`),
    /// without a network call; if it is not theirs any more, look for the
    /// user's own backend (held through another replica), and failing that
    /// allocate from `profile` when `or_allocate`, else fail with
    /// [`SessionError::NoSession`].
    Adopt {
        pin: PinnedBackend,
        profile: Arc<Profile>,
        or_allocate: bool,
    },
    /// Get the user a backend from this profile (the request shows they
    /// want one), unless they hold one already, in any profile.
    Allocate(Arc<Profile>),
    /// The user wants a backend but has a choice of profiles to make: the
    /// one they hold (through another replica), else
    /// [`SessionError::ChooseProfile`] with `next`.
    Choose { next: String },
}

pub struct Registry {
    sessions: FastMap<Arc<str>, Slot>,
    profiles: Profiles,
    metrics: Arc<Metrics>,
    /// `sub` → the last backend released here for that user and why,
    /// until they get a new one. At most one small entry per user.
    ended: FastMap<Arc<str>, (Arc<str>, Ended)>,
}

impl Registry {
    pub fn new(profiles: Profiles, metrics: Arc<Metrics>) -> Self {
        Registry {
            sessions: FastMap::default(),
            profiles,
            metrics,
            ended: FastMap::default(),
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn profiles(&self) -> &Profiles {
        &self.profiles
    }

    /// The user's live session, without allocating.
    pub fn get(&self, sub: &str) -> Option<Arc<Session>> {
        self.sessions.get(sub)?.value().session().cloned()
    }

    /// The user's session; when they have none here, what `claim` says
    /// (re-attach the backend their cookie names, or allocate one).
    /// `claim` reads the user's pinning cookie; it is only called when the
    /// user has no session here yet (the common case costs no MAC check).
    pub async fn get_or_allocate(
        &self,
        identity: &Identity,
        claim: impl FnOnce() -> Result<Claim, SessionError>,
    ) -> Result<Arc<Session>, SessionError> {
        if let Some(session) = self.get(&identity.sub) {
            if session.is_releasing() {
                return Err(SessionError::Releasing);
            }
            // One map read and a look at the view; the API only while the
            // view is in doubt.
            let allocator = &session.profile.allocator;
            if allocator.still_held(identity, &session.lease)
                && (!allocator.view_in_doubt() || allocator.confirm_held(identity, &session.lease).await)
            {
                return Ok(session);
            }
            tracing::info!(user_id = %telemetry::user_id(&identity.sub), backend = %session.lease.backend, "backend gone or reassigned; allocating again");
            self.forget(&session);
        }
        let slot = self
            .sessions
            .entry(identity.sub.clone())
            .or_insert_with(|| Slot::Pending(Arc::new(OnceCell::new())))
            .value()
            .clone();
        let cell = match slot {
            Slot::Pending(cell) => cell,
            // Made by a concurrent request since the lookup above.
            Slot::Ready(session) if session.is_releasing() => return Err(SessionError::Releasing),
            Slot::Ready(session) => return Ok(session),
        };
        let result = cell
            .get_or_try_init(|| async {
                let user_id = telemetry::user_id(&identity.sub);
                let email = telemetry::email(&identity.email);
                let mut choose = None;
                let (profile, adopted, pinned_since, may_allocate) = match claim()? {
                    Claim::Adopt {
                        pin,
                        profile,
                        or_allocate,
                    } => {
                        let since = (pin.allocated_at > 0)
                            .then(|| std::time::UNIX_EPOCH + Duration::from_secs(pin.allocated_at));
                        match profile.allocator.adopt(identity, &pin) {
                            Some(lease) => (profile, Some(lease), since, false),
                            None => (profile, None, None, or_allocate),
                        }
                    }
                    Claim::Allocate(profile) => (profile, None, None, true),
                    Claim::Choose { next } => {
                        choose = Some(next);
                        (self.profiles.default_profile().clone(), None, None, false)
                    }
                };
                let pinned = adopted.is_some();
                // Their own server, held through another replica (in any
                // profile: one backend a user), before the line: nobody
                // waits for what they already have.
                let own = match adopted {
                    Some(lease) => Some((profile.clone(), lease)),
                    None => self.find_own(identity, &profile).await?,
                };
                let (profile, lease) = match own {
                    Some((profile, lease)) if pinned => {
                        tracing::info!(%user_id, %email, profile = profile.name(), backend = %lease.backend, "session pinned: re-attached the backend named by the cookie");
                        (profile, lease)
                    }
                    Some((profile, lease)) => {
                        tracing::info!(%user_id, %email, profile = profile.name(), backend = %lease.backend, "session found: the user's backend, held through another replica");
                        settle_later(&profile, identity, &lease);
                        (profile, lease)
                    }
                    // Only an intent allocates: an open tab's background
                    // request must not take a GPU back.
                    None if !may_allocate => {
                        return Err(choose.map_or(SessionError::NoSession, |next| SessionError::ChooseProfile { next }))
                    }
                    None => {
                        let lease = self.allocate(identity, &profile).await?;
                        tracing::info!(%user_id, %email, profile = profile.name(), backend = %lease.backend, upstream = %lease.upstream, "session allocated");
                        settle_later(&profile, identity, &lease);
                        (profile, lease)
                    }
                };
                // Held since the backend system says, else since the cookie
                // that re-attached it says, else since now.
                let since = profile
                    .allocator
                    .held_since(&lease)
                    .or(pinned_since.filter(|_| pinned))
                    .unwrap_or_else(SystemTime::now);
                Ok::<_, SessionError>(Arc::new(Session::new(identity.clone(), profile, lease, since)))
            })
            .await;
        match result {
            Ok(session) if session.is_releasing() => Err(SessionError::Releasing),
            Ok(session) => {
                if let Some(mut slot) = self.sessions.get_mut(&identity.sub) {
                    if slot.is_cell(&cell) {
                        *slot = Slot::Ready(session.clone());
                    }
                }
                self.ended.remove(&identity.sub);
                // Out of every line: they may have waited in another
                // profile's before choosing this one.
                for profile in self.profiles.iter() {
                    profile.line.leave(identity, Leaving::Served).await;
                }
                self.count_sessions();
                Ok(session.clone())
            }
            Err(e) => {
                // Leave no empty slot behind, unless a concurrent request
                // has meanwhile filled it.
                self.sessions
                    .remove_if(&identity.sub, |_, s| s.is_cell(&cell) && s.session().is_none());
                Err(e)
            }
        }
    }

    /// A new backend from `profile`, when its line lets the user try; when
    /// none is free the user takes (or keeps) their place in its line.
    async fn allocate(&self, identity: &Identity, profile: &Arc<Profile>) -> Result<Lease, SessionError> {
        // Fair: nobody overtakes the line for a free backend.
        if let Admission::Wait(place) = profile.line.admit(identity, &*profile.allocator).await? {
            return Err(self.waiting(identity, place, profile).await);
        }
        let started = Instant::now();
        let allocated = profile.allocator.allocate(identity).await;
        self.metrics.allocation_seconds.observe(started.elapsed().as_secs_f64());
        let (outcome, counted) = match &allocated {
            Ok(_) => ("allocated", Outcome::Allocated),
            Err(AllocError::NoCapacity) => ("unallocated", Outcome::Unallocated),
            Err(_) => ("error", Outcome::Error),
        };
        self.metrics.allocations.with_label_values(&[outcome]).inc();
        profile.count_allocation(counted);
        match allocated {
            Err(AllocError::NoCapacity) => {
                let place = profile.line.join(identity).await?;
                Err(self.waiting(identity, place, profile).await)
            }
            other => Ok(other?),
        }
    }

    /// The user waits at `place` in `profile`'s line: named when there are
    /// several lines to wait in.
    async fn waiting(&self, identity: &Identity, place: Place, profile: &Arc<Profile>) -> SessionError {
        // One place a user: out of any other profile's line (a tab still
        // asking for the first choice takes its place there again).
        for other in self.profiles.iter().filter(|p| !Arc::ptr_eq(p, profile)) {
            other.line.leave(identity, Leaving::Moved).await;
        }
        SessionError::Waiting(place, (self.profiles.len() > 1).then(|| profile.clone()))
    }

    /// The user's own backend, held through another replica: looked for in
    /// `first`, then in every other profile (a user holds one backend).
    async fn find_own(
        &self,
        identity: &Identity,
        first: &Arc<Profile>,
    ) -> Result<Option<(Arc<Profile>, Lease)>, AllocError> {
        let others = self.profiles.iter().filter(|p| !Arc::ptr_eq(p, first));
        for profile in std::iter::once(first).chain(others) {
            if let Some(lease) = profile.allocator.find_own(identity).await? {
                return Ok(Some((profile.clone(), lease)));
            }
        }
        Ok(None)
    }

    /// The profile of the backend the user holds, here or (as its backend
    /// system records it) through another replica.
    pub async fn held_profile(&self, identity: &Identity) -> Result<Option<Arc<Profile>>, AllocError> {
        Ok(self.held(identity).await?.map(|session| session.profile.clone()))
    }

    /// The user's session here or, served through another replica, one for
    /// the backend the backend system says they hold. `None`: they hold none.
    async fn held(&self, identity: &Identity) -> Result<Option<Arc<Session>>, AllocError> {
        if let Some(session) = self.get(&identity.sub) {
            return Ok(Some(session));
        }
        let Some((profile, lease)) = self.find_own(identity, self.profiles.default_profile()).await? else {
            return Ok(None);
        };
        let since = profile.allocator.held_since(&lease).unwrap_or_else(SystemTime::now);
        Ok(Some(Arc::new(Session::new(identity.clone(), profile, lease, since))))
    }

    /// Where the user waits, if in a line: the profile's, and their place.
    pub async fn place(&self, identity: &Identity) -> Option<(Arc<Profile>, Place)> {
        for profile in self.profiles.iter() {
            if let Some(place) = profile.line.place(identity).await {
                return Some((profile.clone(), place));
            }
        }
        None
    }

    /// Sets the session gauges, in total and per profile.
    fn count_sessions(&self) {
        self.metrics.sessions_active.set(self.sessions.len() as i64);
        if self.profiles.len() == 1 {
            self.profiles.default_profile().count_sessions(self.sessions.len());
            return;
        }
        for profile in self.profiles.iter() {
            let held = self
                .sessions
                .iter()
                .filter(|slot| slot.value().session().is_some_and(|s| Arc::ptr_eq(&s.profile, profile)))
                .count();
            profile.count_sessions(held);
        }
    }

    /// Releases the session's backend, and only once that is confirmed
    /// drops the record and closes the session's open streams. Returns
    /// `false` if another release of this session is already running.
    pub async fn release(&self, session: &Arc<Session>, why: ReleaseReason) -> Result<bool, SessionError> {
        if session.releasing.swap(true, Ordering::AcqRel) {
            return Ok(false);
        }
        let user_id = telemetry::user_id(&session.identity.sub);
        let backend = &session.lease.backend;
        let reason = why.as_str();
        if let Err(e) = session
            .profile
            .allocator
            .release(&session.identity, &session.lease, why)
            .await
        {
            session.releasing.store(false, Ordering::Release);
            self.metrics.release(reason, false);
            tracing::warn!(%user_id, %backend, reason, error = %e, "release failed; will retry");
            return Err(e.into());
        }
        if why.ends_session() {
            self.ended.insert(
                session.identity.sub.clone(),
                (backend.clone(), Ended::new(why, SystemTime::now())),
            );
        }
        self.forget(session);
        telemetry::released(
            &self.metrics,
            &telemetry::Released {
                sub: Some(&session.identity.sub),
                email: Some(&session.identity.email),
                backend,
                reason,
                held: Some(session.held()),
                active: Some(session.activity.account()),
            },
        );
        Ok(true)
    }

    /// Forgets the releases made here that are too old to tell anyone of.
    pub fn forget_old_releases(&self, now: SystemTime) {
        self.ended.retain(|_, (_, ended)| !ended.is_forgotten(now));
    }

    /// Why `backend` of `profile`, which the user's cookie names, was
    /// released, if this replica released it or the backend system
    /// recorded the release.
    pub fn ended(&self, identity: &Identity, profile: &Profile, backend: &str) -> Option<Ended> {
        let here = self
            .ended
            .get(&identity.sub)
            .filter(|entry| &*entry.value().0 == backend)
            .map(|entry| entry.value().1);
        here.or_else(|| profile.allocator.released(identity, backend))
    }

    /// Releases the user's backend, held here or (served by another
    /// replica) found through the backend system. The released session, or
    /// `None`: they hold none.
    pub async fn release_users(
        &self,
        identity: &Identity,
        reason: ReleaseReason,
    ) -> Result<Option<Arc<Session>>, SessionError> {
        let Some(session) = self.held(identity).await? else {
            return Ok(None);
        };
        Ok(self.release(&session, reason).await?.then_some(session))
    }

    /// Drops the session without releasing anything (its backend is gone)
    /// and closes its open streams.
    pub fn forget(&self, session: &Arc<Session>) {
        self.sessions
            .remove_if(&session.identity.sub, |_, slot| slot.holds(session));
        self.count_sessions();
        session.closed.cancel();
    }

    /// A snapshot of every live session (for the reaper and admin views).
    pub fn sessions(&self) -> Vec<Arc<Session>> {
        self.sessions
            .iter()
            .filter_map(|entry| entry.value().session().cloned())
            .collect()
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }
}

/// Runs [`Allocator::settle`](crate::allocator::Allocator::settle) for a
/// lease just obtained, after the answer: the user does not wait for it.
fn settle_later(profile: &Arc<Profile>, identity: &Identity, lease: &Lease) {
    let (profile, user, lease) = (profile.clone(), identity.clone(), lease.clone());
    tokio::spawn(async move { profile.allocator.settle(&user, &lease).await });
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use async_trait::async_trait;

    use super::*;
    use crate::allocator::{Allocator, StaticPool};
    use crate::session::profile::testing;

    /// A real static pool that also counts calls and is slow to allocate,
    /// so concurrent first requests really overlap.
    struct SlowCountingPool {
        pool: StaticPool,
        allocations: AtomicUsize,
        fail_releases: std::sync::atomic::AtomicBool,
    }

    #[async_trait]
    impl Allocator for SlowCountingPool {
        async fn allocate(&self, user: &Identity) -> Result<Lease, AllocError> {
            self.allocations.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            self.pool.allocate(user).await
        }
        fn adopt(&self, user: &Identity, pin: &PinnedBackend) -> Option<Lease> {
            self.pool.adopt(user, pin)
        }
        fn capacity(&self) -> crate::allocator::Capacity {
            self.pool.capacity()
        }
        fn released(&self, _user: &Identity, backend: &str) -> Option<Ended> {
            (backend == "static-9").then_some(Ended {
                reason: ReleaseReason::Admin,
                at: 7,
            })
        }
        async fn release(&self, user: &Identity, lease: &Lease, reason: ReleaseReason) -> Result<(), AllocError> {
            if self.fail_releases.load(Ordering::SeqCst) {
                return Err(AllocError::Backend {
                    backend: "test",
                    message: "release refused".into(),
                });
            }
            self.pool.release(user, lease, reason).await
        }
    }

    fn registry(n: usize) -> (Registry, Arc<SlowCountingPool>, Arc<Profile>) {
        let uris: Vec<http::Uri> = (0..n)
            .map(|i| format!("http://127.0.0.1:{}", 9000 + i).parse().unwrap())
            .collect();
        let pool = Arc::new(SlowCountingPool {
            pool: StaticPool::new(&uris),
            allocations: AtomicUsize::new(0),
            fail_releases: false.into(),
        });
        let registry = Registry::new(Profiles::new(vec![testing::with(pool.clone())]), Metrics::new());
        let profile = registry.profiles().default_profile().clone();
        (registry, pool, profile)
    }

    fn user(name: &str) -> Identity {
        Identity::new(name, &format!("{name}@example.com"), None)
    }

    #[tokio::test]
    async fn ten_concurrent_first_requests_cause_one_allocation() {
        let (registry, pool, profile) = registry(3);
        let registry = Arc::new(registry);
        let tasks: Vec<_> = (0..10)
            .map(|_| {
                let (registry, profile) = (registry.clone(), profile.clone());
                tokio::spawn(async move {
                    registry
                        .get_or_allocate(&user("alice"), || Ok(Claim::Allocate(profile.clone())))
                        .await
                        .unwrap()
                })
            })
            .collect();
        let mut backends = Vec::new();
        for task in tasks {
            backends.push(task.await.unwrap().lease.backend.clone());
        }
        assert_eq!(pool.allocations.load(Ordering::SeqCst), 1);
        assert!(backends.iter().all(|b| *b == backends[0]));
        assert_eq!(pool.pool.free(), 2);
    }

    #[tokio::test]
    async fn a_failed_allocation_leaves_no_record_and_can_be_retried() {
        let (registry, _, profile) = registry(1);
        registry
            .get_or_allocate(&user("a"), || Ok(Claim::Allocate(profile.clone())))
            .await
            .unwrap();
        assert!(matches!(
            registry
                .get_or_allocate(&user("b"), || Ok(Claim::Allocate(profile.clone())))
                .await,
            Err(SessionError::Waiting(
                Place {
                    position: 1,
                    waiting: 1
                },
                None
            ))
        ));
        assert_eq!(registry.len(), 1);
        let a = registry.get("a").unwrap();
        assert!(registry.release(&a, ReleaseReason::Idle).await.unwrap());
        registry
            .get_or_allocate(&user("b"), || Ok(Claim::Allocate(profile.clone())))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_record_is_kept_until_its_release_is_confirmed() {
        let (registry, pool, profile) = registry(1);
        let a = registry
            .get_or_allocate(&user("a"), || Ok(Claim::Allocate(profile.clone())))
            .await
            .unwrap();
        pool.fail_releases.store(true, Ordering::SeqCst);
        assert!(registry.release(&a, ReleaseReason::Idle).await.is_err());
        assert!(registry.get("a").is_some(), "record survives a failed release");
        assert!(!a.is_releasing());
        pool.fail_releases.store(false, Ordering::SeqCst);
        assert!(registry.release(&a, ReleaseReason::Idle).await.unwrap());
        assert!(registry.get("a").is_none());
        assert!(a.closed.is_cancelled());
    }

    #[tokio::test]
    async fn a_release_made_here_is_forgotten_a_day_later() {
        let (registry, _, profile) = registry(1);
        let alice = user("a");
        let a = registry
            .get_or_allocate(&alice, || Ok(Claim::Allocate(profile.clone())))
            .await
            .unwrap();
        assert!(registry.release(&a, ReleaseReason::User).await.unwrap());
        let now = SystemTime::now();
        registry.forget_old_releases(now + Duration::from_secs(3600));
        assert!(
            registry.ended(&alice, &profile, "static-0").is_some(),
            "an hour later: kept"
        );
        registry.forget_old_releases(now + crate::allocator::REMEMBERED_FOR + Duration::from_secs(2));
        assert!(registry.ended.is_empty(), "a day later: forgotten");
    }

    #[tokio::test]
    async fn a_release_is_remembered_with_its_reason_until_the_user_gets_a_backend_again() {
        let (registry, _, profile) = registry(1);
        let alice = user("a");
        let a = registry
            .get_or_allocate(&alice, || Ok(Claim::Allocate(profile.clone())))
            .await
            .unwrap();
        assert_eq!(registry.ended(&alice, &profile, "static-0"), None);
        assert!(registry.release(&a, ReleaseReason::Idle).await.unwrap());
        let ended = registry.ended(&alice, &profile, "static-0").unwrap();
        assert_eq!(ended.reason, ReleaseReason::Idle);
        assert_eq!(registry.ended(&alice, &profile, "static-1"), None, "another backend");
        assert_eq!(registry.ended(&user("b"), &profile, "static-0"), None, "another user");
        assert_eq!(
            registry.ended(&alice, &profile, "static-9").map(|e| e.reason),
            Some(ReleaseReason::Admin),
            "else the backend system's record"
        );
        let again = registry
            .get_or_allocate(&alice, || Ok(Claim::Allocate(profile.clone())))
            .await
            .unwrap();
        assert_eq!(registry.ended(&alice, &profile, "static-0"), None);
        // A dead pod is replaced on the next request, not an ended session.
        assert!(registry.release(&again, ReleaseReason::DeadPod).await.unwrap());
        assert_eq!(registry.ended(&alice, &profile, "static-0"), None);
    }

    #[tokio::test]
    async fn a_claim_that_may_not_allocate_gets_nothing_when_its_pin_is_not_the_users() {
        let (registry, pool, profile) = registry(2);
        let a = registry
            .get_or_allocate(&user("a"), || Ok(Claim::Allocate(profile.clone())))
            .await
            .unwrap();
        let pin = PinnedBackend {
            backend: a.lease.backend.to_string(),
            upstream: a.lease.upstream.to_string(),
            allocated_at: 0,
            expires: u64::MAX,
        };
        let claim = || {
            Ok(Claim::Adopt {
                pin: pin.clone(),
                profile: profile.clone(),
                or_allocate: false,
            })
        };
        assert!(matches!(
            registry.get_or_allocate(&user("b"), claim).await,
            Err(SessionError::NoSession)
        ));
        assert_eq!(registry.len(), 1, "no record left behind");
        assert_eq!(pool.allocations.load(Ordering::SeqCst), 1, "nothing allocated");
        let or_allocate = || {
            Ok(Claim::Adopt {
                pin,
                profile: profile.clone(),
                or_allocate: true,
            })
        };
        let b = registry.get_or_allocate(&user("b"), or_allocate).await.unwrap();
        assert_ne!(b.lease, a.lease);
    }
}
