//! Agones backends: one dedicated GameServer per user.
//!
//! Allocation asks for `{Allocated, fleet + user label}` first and
//! `{Ready, fleet}` second, so a user always gets back their own server — from
//! any replica, after any restart — and never a second one. It goes either
//! through the Kubernetes API (`agones`) or the agones-allocator service
//! (`agones-allocator`); everything else (finding, watching, releasing,
//! activity) goes through the Kubernetes API.
//!
//! A watched cache of the fleet's GameServers keeps Kubernetes off the hot
//! path: a signed cookie is checked against it, dead or re-assigned servers
//! are noticed from it, and the reaper sweeps from it. While the watch is
//! out of step, what the cache says of a user's server is confirmed with a
//! GET before anyone is forwarded there ([`watch`]).
//!
//! A deleted GameServer lingers until its finalizer is removed (its pod
//! gone), `deletionTimestamp` set and its state unchanged: it is gone for
//! every purpose here ([`types::TERMINATING`]).
//!
//! Release deletes the GameServer (the Fleet replaces it with a fresh one),
//! with a `resourceVersion` precondition so a concurrent change — another
//! replica recording activity — aborts an idle release.

pub mod address;
pub mod label;
mod line;
mod transport;
pub mod types;
mod watch;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, Preconditions};
use kube::runtime::reflector::{ObjectRef, Store};
use rand::Rng;

use super::{AllocError, Allocator, BackendSession, BusyProbe, Capacity, Ended, Lease, PinnedBackend, ReleaseReason};
use crate::auth::Identity;
use crate::config::{AgonesConfig, BackendKind};
use crate::metrics::Metrics;

use transport::{Outcome, Transport};
use types::GameServer;
use watch::{Trust, ViewHealth};

pub const FLEET_LABEL: &str = "agones.dev/fleet";
pub const LAST_ALLOCATED: &str = "agones.dev/last-allocated";
pub const LAST_ACTIVITY: &str = "session-router.dev/last-activity";
pub const EMAIL_ANNOTATION: &str = "session-router.dev/email";
/// When the user was given the GameServer: `agones.dev/last-allocated`
/// moves on every re-allocation (a replica re-finding the user's server),
/// so the start of the hold is recorded once, here.
pub const ALLOCATED_AT: &str = "session-router.dev/allocated-at";
/// Label carrying [`label::user_hash`], which tells apart users whose user
/// label values coincide.
pub const USER_HASH_LABEL: &str = "session-router.dev/user-hash";
/// The label naming the profile a GameServer was allocated for, so every
/// replica (and the operator) sees whose pool it came from.
pub const PROFILE_LABEL: &str = "session-router.dev/profile";
/// Why and when the router released a GameServer (an [`Ended`] as JSON),
/// written onto it right after the DELETE: behind its finalizer the object
/// lingers while its pod stops, so every replica's view can tell the user
/// "released by an administrator" while their open page still asks.
pub const RELEASED: &str = "session-router.dev/released";
const BACKEND: &str = "agones";

pub struct Agones {
    config: AgonesConfig,
    /// The profile this backend serves, written on each server it allocates.
    profile: String,
    /// The profile's Fleets as a label selector (`agones.dev/fleet in (…)`).
    fleets: String,
    gameservers: Api<GameServer>,
    transport: Transport,
    cache: Store<GameServer>,
    /// Whether `cache` is loaded and how far it can be trusted.
    view: Arc<ViewHealth>,
    /// GameServers this replica deleted that `cache` may not show as
    /// terminating yet: gone here meanwhile, so a user is never given back
    /// the server just released (a dead pod's). Forgotten once the view
    /// has caught up.
    deleted_here: std::sync::Mutex<HashSet<String>>,
    /// GameServer name → (user hash label, why it was released), for every
    /// [`RELEASED`] record the view showed while its server lingered: the
    /// reason outlives the object, on every replica, for
    /// [`crate::allocator::REMEMBERED_FOR`].
    releases_seen: std::sync::Mutex<HashMap<String, (String, Ended)>>,
    /// The waiting line every replica shares.
    line: Arc<line::LeaseLine>,
    /// The watch feeding `cache`; stopped when the allocator is dropped.
    watch: tokio::task::JoinHandle<()>,
    metrics: Arc<Metrics>,
}

impl Drop for Agones {
    fn drop(&mut self) {
        self.watch.abort();
    }
}

fn backend_error(message: impl Into<String>) -> AllocError {
    AllocError::Backend {
        backend: BACKEND,
        message: message.into(),
    }
}

/// How a Kubernetes call failed, for callers that treat some answers as
/// outcomes rather than errors.
enum CallError {
    NotFound,
    Conflict,
    Failed(AllocError),
}

impl From<CallError> for AllocError {
    fn from(e: CallError) -> AllocError {
        match e {
            CallError::NotFound => backend_error("not found"),
            CallError::Conflict => AllocError::Conflict,
            CallError::Failed(e) => e,
        }
    }
}

/// What deleting a GameServer came to.
enum Deleted {
    Now,
    AlreadyGone,
}

impl Agones {
    /// Connects to Kubernetes (and the allocator service, for that kind) and
    /// starts watching the fleet's GameServers.
    pub async fn connect(
        config: &AgonesConfig,
        kind: BackendKind,
        profile: &str,
        metrics: Arc<Metrics>,
    ) -> Result<Agones, AllocError> {
        let mut kube_config = match &config.kube_api_url {
            Some(url) => {
                let uri = url
                    .parse()
                    .map_err(|e| backend_error(format!("kube_api_url {url}: {e}")))?;
                let mut c = kube::Config::new(uri);
                c.default_namespace = config.namespace.clone();
                c
            }
            None => kube::Config::infer()
                .await
                .map_err(|e| backend_error(format!("no Kubernetes configuration (in-cluster or kubeconfig): {e}")))?,
        };
        // Named in the API server's audit log.
        kube_config.headers.push((http::header::USER_AGENT, user_agent()));
        let client =
            kube::Client::try_from(kube_config).map_err(|e| backend_error(format!("Kubernetes client: {e}")))?;
        let gameservers: Api<GameServer> = Api::namespaced(client.clone(), &config.namespace);
        let line = Arc::new(line::LeaseLine::new(
            Api::namespaced(client.clone(), &config.namespace),
            config.fleet(),
            config.api_timeout,
            metrics.clone(),
        ));
        let transport = match kind {
            BackendKind::AgonesAllocator => Transport::allocator_service(config)?,
            _ => Transport::kubernetes(client, config),
        };

        let fleets = fleets_selector(config);
        let (cache, view, watch) =
            watch::start(gameservers.clone(), fleets.clone(), config.api_timeout, metrics.clone());
        Ok(Agones {
            config: config.clone(),
            profile: profile.to_string(),
            fleets,
            gameservers,
            transport,
            line,
            cache,
            view,
            deleted_here: Default::default(),
            releases_seen: Default::default(),
            watch,
            metrics,
        })
    }

    fn cached(&self, name: &str) -> Option<Arc<GameServer>> {
        self.cache.get(&ObjectRef::new(name).within(&self.config.namespace))
    }

    fn lease_for(
        &self,
        gs: Option<&GameServer>,
        allocation: Option<&types::AllocationStatus>,
    ) -> Result<Lease, AllocError> {
        let name = gs
            .map(GameServer::name)
            .or(allocation.map(|a| a.game_server_name.as_str()))
            .unwrap_or_default();
        let upstream = address::upstream(gs, allocation, &self.config.port_name, &self.config.address_preference)
            .map_err(backend_error)?;
        Ok(Lease {
            backend: name.into(),
            upstream,
        })
    }

    /// One Kubernetes call, bounded by `api_timeout` and counted by verb.
    async fn call<T>(
        &self,
        verb: &str,
        what: &str,
        call: impl std::future::Future<Output = kube::Result<T>>,
    ) -> Result<T, CallError> {
        call_api(self.config.api_timeout, &self.metrics, verb, what, call).await
    }

    async fn get(&self, name: &str) -> Result<Option<GameServer>, AllocError> {
        Ok(self
            .call("get", &format!("get GameServer {name}"), self.gameservers.get_opt(name))
            .await?)
    }

    /// Deletes `name` if it still has `resource_version` (when given).
    async fn delete(&self, name: &str, resource_version: Option<String>) -> Result<Deleted, AllocError> {
        let params = DeleteParams {
            preconditions: resource_version.map(|rv| Preconditions {
                resource_version: Some(rv),
                uid: None,
            }),
            ..DeleteParams::default()
        };
        let what = format!("delete GameServer {name}");
        let deleted = match self.call("delete", &what, self.gameservers.delete(name, &params)).await {
            Ok(_) => Deleted::Now,
            Err(CallError::NotFound) => Deleted::AlreadyGone,
            Err(e) => return Err(e.into()),
        };
        crate::util::locked(&self.deleted_here).insert(name.to_string());
        Ok(deleted)
    }

    /// Whether `gs` is alive as far as this replica knows: not terminating,
    /// and not deleted here.
    fn is_live(&self, gs: &GameServer) -> bool {
        !gs.is_terminating() && !crate::util::locked(&self.deleted_here).contains(gs.name())
    }

    /// Forgets deletions the view now shows.
    fn forget_deleted(&self) {
        let mut deleted = crate::util::locked(&self.deleted_here);
        deleted.retain(|name| self.cached(name).is_some_and(|gs| !gs.is_terminating()));
    }

    /// Asks for the user's server until one is allocated, retrying
    /// contention with jittered exponential backoff within the retry
    /// window. "Nothing free" is an answer, not retried: the line decides
    /// who tries, and a retry would only hold the user up.
    async fn allocate_with_retries(&self, user: &Identity) -> Result<types::AllocationStatus, AllocError> {
        let deadline = tokio::time::Instant::now() + self.config.allocation_retry_window;
        let mut backoff = Duration::from_millis(100);
        loop {
            let outcome = self.transport.allocate(&self.config, &self.profile, &user.email).await;
            let verb = self.transport.verb();
            let counted = match &outcome {
                Ok(Outcome::Allocated(_)) => "ok",
                Ok(Outcome::UnAllocated) => "unallocated",
                Ok(Outcome::Contention) => "contention",
                Err(_) => "error",
            };
            self.metrics.kube_call(verb, counted);
            match outcome? {
                Outcome::Allocated(status) => return Ok(status),
                Outcome::UnAllocated => return Err(AllocError::NoCapacity),
                Outcome::Contention => self.metrics.allocations.with_label_values(&["contention"]).inc(),
            }
            let jittered = backoff.mul_f64(rand::thread_rng().gen_range(0.5..1.5));
            if tokio::time::Instant::now() + jittered > deadline {
                tracing::info!(user_id = %crate::telemetry::user_id(&user.sub), "allocation still contended at the end of the retry window");
                return Err(AllocError::NoCapacity);
            }
            tokio::time::sleep(jittered).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// The user's Allocated servers as the API lists them: their own (both
    /// labels) and legacy ones (the user label only, as the original front
    /// end left them). Servers whose hash label is another user's — the
    /// label values of two emails can coincide — are neither.
    async fn holdings(&self, email: &str) -> Result<Holdings, AllocError> {
        let label = label::user_label_value(email);
        let selector = format!("{},{}={label}", self.fleets, self.config.user_label);
        let list = self
            .call(
                "list",
                "list the user's GameServers",
                self.gameservers.list(&ListParams::default().labels(&selector)),
            )
            .await?;
        let hash = label::user_hash(email);
        let mut holdings = Holdings::default();
        for gs in list.items.into_iter().filter(|gs| gs.state() == "Allocated") {
            match gs.label(USER_HASH_LABEL) {
                Some(h) if h == hash => holdings.own.push(gs),
                Some(_) => {}
                None => holdings.legacy.push(gs),
            }
        }
        holdings.own.sort_by_key(age_key);
        holdings.legacy.sort_by_key(age_key);
        Ok(holdings)
    }

    /// Gives the user the oldest server the original front end allocated to
    /// their label, if they have none of their own: it gets the hash label,
    /// the email and a fresh activity stamp (so no replica's sweep takes it
    /// as idle), with a `resourceVersion` precondition so that of replicas
    /// adopting at once exactly one wins; the others see it as the user's
    /// own on their next look. The user's other legacy servers are released.
    async fn adopt_legacy(&self, user: &Identity) -> Result<Option<Lease>, AllocError> {
        for _ in 0..3 {
            let Holdings { own, legacy } = self.holdings(&user.email).await?;
            let mut legacy = legacy.into_iter();
            let Some(oldest) = legacy.next().filter(|_| own.is_empty()) else {
                return Ok(None);
            };
            let mut metadata = allocation_metadata(&self.config, &self.profile, &user.email);
            let now = SystemTime::now();
            metadata.annotations.insert(LAST_ACTIVITY.into(), activity_stamp(now));
            let since = oldest.annotation(LAST_ALLOCATED).and_then(parse_time).unwrap_or(now);
            metadata.annotations.insert(ALLOCATED_AT.into(), activity_stamp(since));
            let patch = serde_json::json!({ "metadata": {
                "resourceVersion": oldest.metadata.resource_version,
                "labels": metadata.labels,
                "annotations": metadata.annotations,
            } });
            let what = format!("adopt GameServer {}", oldest.name());
            let (params, patch) = (PatchParams::default(), Patch::Merge(&patch));
            let claim = self.gameservers.patch(oldest.name(), &params, &patch);
            let adopted = match self.call("patch", &what, claim).await {
                Ok(adopted) => adopted,
                // Changed or gone meanwhile (another replica adopting it): look again.
                Err(CallError::Conflict | CallError::NotFound) => continue,
                Err(CallError::Failed(e)) => return Err(e),
            };
            tracing::info!(user = %user.email, gameserver = adopted.name(), "adopted a GameServer the original front end allocated");
            self.release_extras(adopted.name(), legacy).await;
            return self.lease_for(Some(&adopted), None).map(Some);
        }
        Ok(None)
    }

    /// If replicas raced and the user holds several Allocated servers, keeps
    /// the oldest of their own and releases the rest, legacy ones included
    /// (unless adoption is off: then legacy servers are left to the sweep).
    /// Returns the one kept.
    async fn settle_duplicates(&self, email: &str, allocated: GameServer) -> Result<GameServer, AllocError> {
        let Holdings { own, legacy } = self.holdings(email).await?;
        let mut own = own.into_iter();
        let Some(keep) = own.next() else {
            return Ok(allocated);
        };
        let legacy = legacy.into_iter().filter(|_| self.config.adopt_legacy);
        self.release_extras(keep.name(), own.chain(legacy)).await;
        Ok(keep)
    }

    /// Releases a user's servers other than `kept`, each only if unchanged
    /// since it was listed.
    async fn release_extras(&self, kept: &str, extras: impl Iterator<Item = GameServer>) {
        for extra in extras {
            let legacy = extra.label(USER_HASH_LABEL).is_none();
            tracing::warn!(
                kept,
                released = extra.name(),
                legacy,
                "user held two GameServers; releasing the other"
            );
            let deleted = self.delete(extra.name(), extra.metadata.resource_version.clone()).await;
            if matches!(deleted, Ok(Deleted::Now)) {
                self.count_release(&extra, ReleaseReason::Duplicate);
            }
        }
    }

    /// Counts and logs the confirmed release of a server no session here
    /// held: its hold as the server records it; its activity is unknown.
    fn count_release(&self, gs: &GameServer, reason: ReleaseReason) {
        let held = held_since(gs).map(|since| SystemTime::now().duration_since(since).unwrap_or_default());
        crate::telemetry::released(
            &self.metrics,
            &crate::telemetry::Released {
                sub: None,
                email: gs.annotation(EMAIL_ANNOTATION),
                backend: gs.name(),
                reason: reason.as_str(),
                held,
                active: None,
            },
        );
    }

    /// Keeps the [`RELEASED`] records the view shows (a server lingers far
    /// longer than a reaper period), and forgets the old ones.
    fn remember_releases(&self) {
        let now = SystemTime::now();
        let mut seen = crate::util::locked(&self.releases_seen);
        for gs in self.cache.state() {
            let record = gs
                .annotation(RELEASED)
                .and_then(|r| serde_json::from_str::<Ended>(r).ok());
            if let (Some(ended), Some(owner)) = (record, gs.label(USER_HASH_LABEL)) {
                seen.insert(gs.name().to_string(), (owner.to_string(), ended));
            }
        }
        seen.retain(|_, (_, ended)| !ended.is_forgotten(now));
    }

    /// Writes why `name` was released onto it (see [`RELEASED`]), for
    /// releases that end the user's session. A failure only costs the
    /// reason: another replica then works it out from the user's cookie.
    async fn record_release(&self, name: &str, reason: ReleaseReason) {
        if !reason.ends_session() {
            return;
        }
        let record = serde_json::to_string(&Ended::new(reason, SystemTime::now())).unwrap_or_default();
        let patch = serde_json::json!({ "metadata": { "annotations": { RELEASED: record } } });
        let (params, patch) = (PatchParams::default(), Patch::Merge(&patch));
        let what = format!("record the release of GameServer {name}");
        if let Err(CallError::Failed(e)) = self
            .call("patch", &what, self.gameservers.patch(name, &params, &patch))
            .await
        {
            tracing::warn!(gameserver = name, error = %e, "could not record why it was released");
        }
    }

    /// Records on a freshly allocated server when its hold began (its
    /// allocation stamp). A failure only costs accuracy: the hold is then
    /// counted from when each replica first saw it.
    async fn mark_held_since(&self, gs: &GameServer) {
        let since = gs
            .annotation(LAST_ALLOCATED)
            .and_then(parse_time)
            .unwrap_or_else(SystemTime::now);
        let patch = serde_json::json!({ "metadata": { "annotations": { ALLOCATED_AT: activity_stamp(since) } } });
        let (params, patch) = (PatchParams::default(), Patch::Merge(&patch));
        let what = format!("record the allocation time on GameServer {}", gs.name());
        if let Err(CallError::Failed(e)) = self
            .call("patch", &what, self.gameservers.patch(gs.name(), &params, &patch))
            .await
        {
            tracing::warn!(gameserver = gs.name(), error = %e, "could not record when the hold began");
        }
    }

    /// Whether the view shows `gs` as `lease`, held by `user`: not
    /// terminating, at the lease's address, and the user's by both labels —
    /// or, just allocated, not yet showing the allocation (still Ready,
    /// unlabelled: a GameServer never returns to Ready once allocated).
    fn shows_held(&self, gs: &GameServer, user: &Identity, lease: &Lease) -> bool {
        if !self.is_live(gs) {
            return false;
        }
        let labelled = gs.label(&self.config.user_label).is_some();
        let owned = match gs.state() {
            "Allocated" | "Reserved" => labelled && self.is_users(gs, &user.email),
            "Ready" | "RequestReady" => !labelled || self.is_users(gs, &user.email),
            _ => false,
        };
        owned
            && self
                .lease_for(Some(gs), None)
                .is_ok_and(|current| current.upstream == lease.upstream)
    }

    /// Whether the user may hold a server the original front end labelled
    /// (their label, no hash label): as the view shows, or — out of step —
    /// possibly.
    fn may_hold_legacy(&self, email: &str) -> bool {
        if !self.view.is_synced() || self.view.trust() == Trust::Resyncing {
            return true;
        }
        let label = label::user_label_value(email);
        self.cache.state().iter().any(|gs| {
            gs.state() == "Allocated"
                && gs.label(USER_HASH_LABEL).is_none()
                && gs.label(&self.config.user_label) == Some(label.as_str())
        })
    }

    /// Whether `gs` carries this user's labels (value and hash).
    fn is_users(&self, gs: &GameServer, email: &str) -> bool {
        user_labels(&self.config, email)
            .iter()
            .all(|(key, value)| gs.label(key) == Some(value.as_str()))
    }
}

/// One Kubernetes call, bounded by `timeout` and counted by verb; 404 and
/// 409 are told apart for callers that take them as outcomes.
async fn call_api<T>(
    timeout: Duration,
    metrics: &Metrics,
    verb: &str,
    what: &str,
    call: impl std::future::Future<Output = kube::Result<T>>,
) -> Result<T, CallError> {
    let result = tokio::time::timeout(timeout, call).await;
    let (outcome, error) = match result {
        Ok(Ok(value)) => {
            metrics.kube_call(verb, "ok");
            return Ok(value);
        }
        Ok(Err(kube::Error::Api(status))) if status.code == 404 => ("not_found", CallError::NotFound),
        Ok(Err(kube::Error::Api(status))) if status.code == 409 => ("conflict", CallError::Conflict),
        Ok(Err(e)) => (
            "error",
            CallError::Failed(backend_error(format!("{what}: {}", error_summary(&e)))),
        ),
        Err(_) => (
            "timeout",
            CallError::Failed(backend_error(format!("{what}: no answer within {timeout:?}"))),
        ),
    };
    metrics.kube_call(verb, outcome);
    Err(error)
}

/// `session-router/<version>`: how the router names itself to the API
/// server and the allocator service.
pub(crate) fn user_agent() -> http::HeaderValue {
    http::HeaderValue::from_static(concat!("session-router/", env!("CARGO_PKG_VERSION")))
}

/// At most this much of an error's text goes into a log line: a failed
/// list once logged its whole 21 KB body.
const ERROR_TEXT: usize = 300;

/// An error as a log line may carry it: the API's status code, reason and
/// message, or the error's own text — cut short, never a response body.
fn error_summary(error: &kube::Error) -> String {
    let text = match error {
        kube::Error::Api(status) => format!("{} {}: {}", status.code, status.reason, status.message),
        other => other.to_string(),
    };
    clip(text, ERROR_TEXT)
}

fn clip(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

/// Whether `error` means the API server cannot be reached (no connection,
/// no answer, or it says it is unavailable), rather than an answer.
fn unreachable(error: &kube::Error) -> bool {
    match error {
        kube::Error::Api(status) => matches!(status.code, 502..=504),
        kube::Error::SerdeError(_) => false,
        _ => true,
    }
}

/// A user's Allocated servers, oldest first.
#[derive(Default)]
struct Holdings {
    own: Vec<GameServer>,
    legacy: Vec<GameServer>,
}

/// Oldest first; ties broken by name so every replica picks the same one.
fn age_key(gs: &GameServer) -> (Option<k8s_openapi::jiff::Timestamp>, String) {
    (
        gs.metadata.creation_timestamp.as_ref().map(|t| t.0),
        gs.name().to_string(),
    )
}

fn activity_stamp(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

fn parse_time(text: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(text.trim()).ok()
}

/// When the hold on a GameServer began: as recorded, else its allocation.
fn held_since(gs: &GameServer) -> Option<SystemTime> {
    [ALLOCATED_AT, LAST_ALLOCATED]
        .into_iter()
        .find_map(|key| gs.annotation(key).and_then(parse_time))
}

/// The newest activity recorded on a GameServer: ours, or its allocation.
fn last_seen(gs: &GameServer) -> Option<SystemTime> {
    [LAST_ACTIVITY, LAST_ALLOCATED]
        .into_iter()
        .filter_map(|key| gs.annotation(key).and_then(parse_time))
        .max()
}

#[async_trait]
impl Allocator for Agones {
    async fn allocate(&self, user: &Identity) -> Result<Lease, AllocError> {
        if self.config.adopt_legacy && self.may_hold_legacy(&user.email) {
            if let Some(lease) = self.adopt_legacy(user).await? {
                return Ok(lease);
            }
        }
        let status = self.allocate_with_retries(user).await?;
        let name = status.game_server_name.clone();
        if let Some(cluster) = status.remote_cluster() {
            // multi_cluster: the policy placed the user in a cluster whose
            // API this router does not reach, so it could neither confirm,
            // watch nor release the server. Said loudly, never served.
            tracing::error!(
                user_id = %crate::telemetry::user_id(&user.sub),
                gameserver = %name,
                cluster,
                "allocated in another cluster, which this router does not manage: the server stays Allocated there until released in that cluster; point the GameServerAllocationPolicy only at clusters whose routers serve these users"
            );
            return Err(backend_error(format!(
                "GameServer {name} was placed in cluster {cluster:?}, which this router does not manage"
            )));
        }
        let gs = match self.cached(&name) {
            Some(gs) => (*gs).clone(),
            None => self
                .get(&name)
                .await?
                .ok_or_else(|| backend_error(format!("allocated GameServer {name} vanished")))?,
        };
        self.lease_for(Some(&gs), Some(&status))
    }

    /// Releases a second server replicas raced to give the user (keeping
    /// the oldest: if that is not `lease`, the session notices it is gone
    /// and re-finds the kept one), and records when the hold began.
    async fn settle(&self, user: &Identity, lease: &Lease) {
        let gs = match self.cached(&lease.backend) {
            Some(gs) => (*gs).clone(),
            None => match self.get(&lease.backend).await {
                Ok(Some(gs)) => gs,
                Ok(None) => return,
                Err(e) => return tracing::warn!(error = %e, "could not check for a second GameServer"),
            },
        };
        let kept = match self.settle_duplicates(&user.email, gs).await {
            Ok(kept) => kept,
            Err(e) => return tracing::warn!(error = %e, "could not check for a second GameServer"),
        };
        if kept.annotation(ALLOCATED_AT).is_none() {
            self.mark_held_since(&kept).await;
        }
    }

    async fn find_own(&self, user: &Identity) -> Result<Option<Lease>, AllocError> {
        let own = if self.view.is_synced() && self.view.trust() != Trust::Resyncing {
            let mut own: Vec<Arc<GameServer>> = self
                .cache
                .state()
                .into_iter()
                .filter(|gs| gs.state() == "Allocated" && self.is_users(gs, &user.email) && self.is_live(gs))
                .collect();
            own.sort_by_key(|gs| age_key(gs));
            own.first().map(|gs| (**gs).clone())
        } else {
            self.holdings(&user.email).await?.own.into_iter().next()
        };
        own.map(|gs| self.lease_for(Some(&gs), None)).transpose()
    }

    async fn ready_now(&self) -> Result<usize, AllocError> {
        let list = self
            .call(
                "list",
                "count the Ready GameServers",
                self.gameservers.list(&ListParams::default().labels(&self.fleets)),
            )
            .await?;
        Ok(list.items.iter().filter(|gs| gs.state() == "Ready").count())
    }

    fn adopt(&self, user: &Identity, pin: &PinnedBackend) -> Option<Lease> {
        // Out of step, the view cannot vouch for the cookie: the caller
        // looks the user's server up through the API instead.
        if !self.view.is_synced() || self.view.trust() == Trust::Resyncing {
            return None;
        }
        let gs = self.cached(&pin.backend)?;
        if gs.state() != "Allocated" || !self.is_users(&gs, &user.email) || !self.is_live(&gs) {
            return None;
        }
        let lease = self.lease_for(Some(&gs), None).ok()?;
        (lease.upstream.as_str() == pin.upstream).then_some(lease)
    }

    async fn release(&self, user: &Identity, lease: &Lease, reason: ReleaseReason) -> Result<(), AllocError> {
        let email = &user.email;
        let cached = self.cached(&lease.backend).filter(|gs| self.is_users(gs, email));
        let known = match (&cached, reason) {
            // An idle decision was made on the cached copy, which may lag
            // behind activity another replica recorded: confirm it on a
            // fresh copy, released only if unchanged since (precondition).
            (_, ReleaseReason::Idle) | (None, _) => self.get(&lease.backend).await?,
            (Some(gs), _) => Some((**gs).clone()),
        };
        let Some(gs) = known else { return Ok(()) };
        if reason == ReleaseReason::Idle && last_seen(&gs) > cached.as_deref().and_then(last_seen) {
            tracing::debug!(
                gameserver = gs.name(),
                "activity recorded elsewhere since the idle decision; kept"
            );
            return Err(AllocError::Conflict);
        }
        // Someone else's now, or already being deleted: nothing to give back.
        if !self.is_users(&gs, email) || gs.is_terminating() {
            return Ok(());
        }
        let deleted = match self.delete(&lease.backend, gs.metadata.resource_version.clone()).await {
            Ok(deleted) => Ok(deleted),
            // An idle release decided on what it saw; if that changed,
            // someone was active: abort. Other releases insist.
            Err(AllocError::Conflict) if reason != ReleaseReason::Idle => {
                let Some(fresh) = self.get(&lease.backend).await? else {
                    return Ok(());
                };
                if !self.is_users(&fresh, email) || fresh.is_terminating() {
                    return Ok(());
                }
                self.delete(&lease.backend, fresh.metadata.resource_version.clone())
                    .await
            }
            Err(e) => Err(e),
        };
        if let Deleted::Now = deleted? {
            self.record_release(&lease.backend, reason).await;
        }
        Ok(())
    }

    /// This replica can serve: the fleet is listed and the API answers.
    fn is_ready(&self) -> bool {
        self.view.is_synced() && self.view.trust() != Trust::Unreachable
    }

    fn still_held(&self, user: &Identity, lease: &Lease) -> bool {
        if !self.view.is_synced() {
            return true;
        }
        self.cached(&lease.backend)
            .is_some_and(|gs| self.shows_held(&gs, user, lease))
    }

    fn view_in_doubt(&self) -> bool {
        self.view.trust() == Trust::Resyncing
    }

    async fn confirm_held(&self, user: &Identity, lease: &Lease) -> bool {
        if !self.view_in_doubt() {
            return self.still_held(user, lease);
        }
        match self.get(&lease.backend).await {
            Ok(found) => found.is_some_and(|gs| self.shows_held(&gs, user, lease)),
            // The API failing now: the last view stands.
            Err(_) => self.still_held(user, lease),
        }
    }

    fn replaces_unreachable(&self) -> bool {
        true
    }

    fn deployment_sessions(&self) -> Option<Vec<BackendSession>> {
        let mut sessions: Vec<BackendSession> = self
            .cache
            .state()
            .iter()
            .filter(|gs| gs.agones_state() == "Allocated")
            .filter_map(|gs| {
                let label = gs.label(&self.config.user_label)?;
                Some(BackendSession {
                    releasing: !self.is_live(gs),
                    backend: gs.name().to_string(),
                    user: gs.annotation(EMAIL_ANNOTATION).unwrap_or(label).to_string(),
                    node: gs
                        .status
                        .as_ref()
                        .map(|s| s.node_name.clone())
                        .filter(|n| !n.is_empty()),
                    allocated_at: held_since(gs),
                    last_activity: last_seen(gs),
                })
            })
            .collect();
        sessions.sort_by(|a, b| a.backend.cmp(&b.backend));
        Some(sessions)
    }

    fn capacity(&self) -> Capacity {
        let mut capacity = Capacity::default();
        // Terminating servers and ones not understood are no capacity.
        for gs in self.cache.state() {
            match gs.state() {
                "Ready" => capacity.ready += 1,
                "Allocated" => capacity.allocated += 1,
                "Reserved" => capacity.reserved += 1,
                types::TERMINATING | "" => continue,
                _ => {}
            }
            capacity.total += 1;
        }
        capacity
    }

    async fn release_backend(&self, backend: &str, reason: ReleaseReason) -> Result<bool, AllocError> {
        let Some(gs) = self.get(backend).await? else {
            return Ok(false);
        };
        // Only user backends: a server without the user label is not ours.
        if gs.label(&self.config.user_label).is_none() || gs.state() != "Allocated" {
            return Ok(false);
        }
        let deleted = self.delete(backend, gs.metadata.resource_version.clone()).await;
        match &deleted {
            Ok(Deleted::Now) => {
                self.record_release(backend, reason).await;
                self.count_release(&gs, reason)
            }
            Ok(Deleted::AlreadyGone) => {}
            Err(_) => self.metrics.release(reason.as_str(), false),
        }
        deleted.map(|d| matches!(d, Deleted::Now))
    }

    /// What [`Agones::record_release`] wrote on the user's server: read off
    /// the view while the server lingers, remembered after.
    fn released(&self, user: &Identity, backend: &str) -> Option<Ended> {
        let lingering = self
            .cached(backend)
            .filter(|gs| self.is_users(gs, &user.email))
            .and_then(|gs| serde_json::from_str(gs.annotation(RELEASED)?).ok());
        lingering.or_else(|| {
            let hash = label::user_hash(&user.email);
            let seen = crate::util::locked(&self.releases_seen);
            seen.get(backend)
                .filter(|(owner, _)| *owner == hash)
                .map(|(_, ended)| *ended)
        })
    }

    fn shared_line(&self) -> Option<Arc<dyn super::SharedLine>> {
        Some(self.line.clone())
    }

    fn held_since(&self, lease: &Lease) -> Option<SystemTime> {
        self.cached(&lease.backend).and_then(|gs| held_since(&gs))
    }

    fn activity_elsewhere(&self, lease: &Lease) -> Option<SystemTime> {
        self.cached(&lease.backend).and_then(|gs| last_seen(&gs))
    }

    async fn record_activity(&self, lease: &Lease, at: SystemTime) -> Result<(), AllocError> {
        // A server being deleted needs no activity: the write would only
        // bump its version under a concurrent release.
        if self.cached(&lease.backend).is_some_and(|gs| gs.is_terminating()) {
            return Ok(());
        }
        let patch = serde_json::json!({ "metadata": { "annotations": { LAST_ACTIVITY: activity_stamp(at) } } });
        self.call(
            "patch",
            &format!("record activity on GameServer {}", lease.backend),
            self.gameservers
                .patch(&lease.backend, &PatchParams::default(), &Patch::Merge(&patch)),
        )
        .await
        .map(|_| ())
        .map_err(AllocError::from)
    }

    async fn sweep(&self, idle_timeout: Duration, held_here: &HashSet<Arc<str>>, probe: Option<&BusyProbe>) {
        if !self.view.is_synced() {
            return;
        }
        self.forget_deleted();
        self.remember_releases();
        let now = SystemTime::now();
        let mut by_user: HashMap<String, Vec<Arc<GameServer>>> = HashMap::new();
        for gs in self.cache.state() {
            if gs.state() != "Allocated" || !self.is_live(&gs) {
                continue;
            }
            // Servers allocated by someone else carry no user label: never
            // ours to touch. A legacy server (no hash label) may share its
            // label with another user's, so it stands alone: only the idle
            // rule releases it.
            if gs.label(&self.config.user_label).is_some() {
                let key = match gs.label(USER_HASH_LABEL) {
                    Some(hash) => hash.to_string(),
                    None => format!("legacy/{}", gs.name()),
                };
                by_user.entry(key).or_default().push(gs);
            }
        }
        for (_, mut servers) in by_user {
            servers.sort_by_key(|gs| age_key(gs));
            for (i, gs) in servers.iter().enumerate() {
                let reason = if i > 0 {
                    ReleaseReason::Duplicate
                } else if held_here.contains(gs.name()) {
                    continue;
                } else {
                    let idle = last_seen(gs).and_then(|seen| now.duration_since(seen).ok());
                    if idle.is_none_or(|idle| idle < idle_timeout) {
                        continue;
                    }
                    if let (Some(probe), Ok(lease)) = (probe, self.lease_for(Some(gs), None)) {
                        if probe.is_busy(&lease.upstream).await {
                            tracing::debug!(gameserver = gs.name(), "idle by its record, but a job is running: kept");
                            continue;
                        }
                    }
                    // Confirmed on a fresh copy: another replica may have
                    // recorded activity the view does not show yet.
                    match self.get(gs.name()).await {
                        Ok(Some(fresh)) if fresh.metadata.resource_version == gs.metadata.resource_version => {}
                        Ok(_) => continue,
                        Err(e) => {
                            tracing::warn!(gameserver = gs.name(), error = %e, "cannot confirm idleness; not released");
                            continue;
                        }
                    }
                    ReleaseReason::Idle
                };
                match self.delete(gs.name(), gs.metadata.resource_version.clone()).await {
                    Ok(Deleted::Now) => {
                        self.record_release(gs.name(), reason).await;
                        self.count_release(gs, reason)
                    }
                    Ok(Deleted::AlreadyGone) => {}
                    Err(AllocError::Conflict) => {
                        tracing::debug!(gameserver = gs.name(), "GameServer changed meanwhile; not released")
                    }
                    Err(e) => {
                        self.metrics.release(reason.as_str(), false);
                        tracing::warn!(gameserver = gs.name(), error = %e, "release failed; will retry")
                    }
                }
            }
        }
    }
}

/// The labels that mark a GameServer as this user's: the configured user
/// label (the original front end's value) and the exact-email hash.
fn user_labels(config: &AgonesConfig, email: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (config.user_label.clone(), label::user_label_value(email)),
        (USER_HASH_LABEL.to_string(), label::user_hash(email)),
    ])
}

/// The profile's fleets as a label selector (`agones.dev/fleet in (…)`).
fn fleets_selector(config: &AgonesConfig) -> String {
    match config.fleets.as_slice() {
        [one] => format!("{FLEET_LABEL}={one}"),
        several => format!("{FLEET_LABEL} in ({})", several.join(",")),
    }
}

/// Labels and annotations an allocation puts on the user's GameServer.
fn allocation_metadata(config: &AgonesConfig, profile: &str, email: &str) -> types::AllocationMetadata {
    let mut labels = user_labels(config, email);
    labels.insert(PROFILE_LABEL.to_string(), profile.to_string());
    types::AllocationMetadata {
        labels,
        annotations: BTreeMap::from([(EMAIL_ANNOTATION.to_string(), email.to_string())]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_seen_takes_the_newest_of_activity_and_allocation() {
        let mut gs = GameServer::default();
        gs.metadata.annotations = Some(BTreeMap::from([
            (LAST_ALLOCATED.to_string(), "2026-01-01T10:00:00.123456789Z".to_string()),
            (LAST_ACTIVITY.to_string(), "2026-01-01T10:05:00.000Z".to_string()),
        ]));
        let seen = last_seen(&gs).unwrap();
        assert_eq!(
            humantime::format_rfc3339_seconds(seen).to_string(),
            "2026-01-01T10:05:00Z"
        );
    }

    #[test]
    fn an_error_in_a_log_line_never_carries_a_whole_response_body() {
        let body = "x".repeat(21_000);
        let status = kube::core::Status::failure(&body, "InternalError");
        let summary = error_summary(&kube::Error::Api(Box::new(status)));
        assert!(summary.len() <= ERROR_TEXT + '…'.len_utf8(), "{} bytes", summary.len());
        assert!(summary.contains("InternalError"));
    }

    #[test]
    fn nanosecond_allocation_stamps_parse() {
        assert!(parse_time("2023-03-01T12:34:56.789012345Z").is_some());
    }
}
