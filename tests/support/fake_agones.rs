//! A fake Kubernetes + Agones API server speaking the wire format a real
//! cluster speaks (../shared/reference/agones-captures: GameServers are
//! shaped like those captures), so the router's real `kube` client and
//! allocator-service client can be driven over HTTP:
//!
//! - GameServers go through Agones' states; before Scheduled their
//!   `status.ports` and `status.addresses` are `null` ([`FakeAgones::add_starting`]);
//! - every GameServer carries the finalizer `agones.dev/controller`: a DELETE
//!   sets `deletionTimestamp`, answers 200 with the object and leaves it
//!   (state unchanged) until the finalizer goes after [`FakeAgones::set_linger`];
//!   a DELETE of a terminating object changes nothing;
//! - watches send `BOOKMARK` events when asked (`allowWatchBookmarks=true`),
//!   and one `ERROR` event with a 410 Gone Status from a version older than
//!   the last [`FakeAgones::compact`];
//! - label selectors are parsed as the API server does: a syntax error or a
//!   value over 63 characters is a 400 Status, as is a `fieldSelector` on
//!   `status.state`;
//! - `POST …/gameserverallocations`: selectors in order (state,
//!   matchLabels), metadata applied, `agones.dev/last-allocated` stamped with
//!   nanoseconds, **201 even when nothing was allocated** (`status.state`),
//!   422 for a label value that is not a valid label;
//! - GameServer get / list (label selectors) / watch (newline-delimited
//!   events from a `resourceVersion`) / merge patch (other patch types 415) /
//!   delete (with a `resourceVersion` precondition → 409 on mismatch);
//! - `resourceVersion` bumped on every change, errors as JSON `Status`;
//! - the allocator service's `POST /gameserverallocation` with its 200 /
//!   429 / 409 / 400 bodies;
//! - `coordination.k8s.io/v1` Leases (the shared waiting line): list (label
//!   selectors), create (409 `AlreadyExists` for a taken name), merge patch,
//!   delete (the deleted object back).
//!
//! Every request is recorded, so tests can assert which calls were made.
//! Faults can be switched on: an outage (`set_down`), a slow server
//! (`set_api_delay`), allocations applied but answered too late
//! (`lose_allocation_responses`).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::broadcast;

pub const NAMESPACE: &str = "default";
pub const FLEET: &str = "sd-fleet";

#[derive(Clone)]
struct Event {
    rv: u64,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct Inner {
    rv: u64,
    created: u64,
    servers: BTreeMap<String, Value>,
    log: Vec<Event>,
    calls: Vec<String>,
    contention: u32,
    /// Simulate Agones 1.30: no `addresses` anywhere.
    without_addresses: bool,
    /// Delay before answering allocations (to make races overlap).
    allocation_delay: Duration,
    /// Delay before answering any request (a slow API server).
    api_delay: Duration,
    /// While true, every request is answered 503 (an API outage).
    down: bool,
    /// The next this-many allocations are applied but never answered in
    /// time (the response is lost: the caller times out).
    lose_allocations: u32,
    /// Right after answering the next list, this GameServer is adopted by
    /// this email, as another replica racing the lister would.
    adopt_after_list: Option<(String, String)>,
    leases: BTreeMap<String, Value>,
    /// How long a deleted GameServer lingers before its finalizer is removed.
    linger: Duration,
    /// Watches from a version older than this get 410 Gone (etcd compacted).
    compacted: u64,
    /// While true, watch requests are answered 500 (the API answers, the
    /// watch does not work) and open watch streams end.
    watch_broken: bool,
    /// The `User-Agent` of every request.
    user_agents: Vec<String>,
    /// The next this-many allocations answer UnAllocated whatever is free
    /// (agones#2788: a burst the allocator cache has not caught up with).
    unallocated: u32,
    /// Requests whose `METHOD /path?query` contains this wait this long.
    stall: Option<(String, Duration)>,
    /// The body of every allocation request (either API), in order.
    allocations: Vec<Value>,
    /// The cluster the allocator service says it placed servers in
    /// (`source`); unset: `local`.
    placed_in: Option<String>,
}

struct World {
    inner: Mutex<Inner>,
    events: broadcast::Sender<Event>,
    /// While true, watch streams hold back new events (a slow watch).
    watch_paused: tokio::sync::watch::Sender<bool>,
    /// Flips to true when the API goes down (or the watch breaks): open
    /// watch streams end.
    outage: tokio::sync::watch::Sender<bool>,
}

/// How long a deleted GameServer lingers by default: long enough for a
/// test to see it terminating, short enough not to slow the others (a
/// WebUI pod's grace period is 30 s).
const DEFAULT_LINGER: Duration = Duration::from_millis(500);
/// How often an open watch sends a BOOKMARK when asked for them.
const BOOKMARK_EVERY: Duration = Duration::from_secs(1);

pub struct FakeAgones {
    pub addr: SocketAddr,
    world: Arc<World>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeAgones {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeAgones {
    pub async fn start() -> FakeAgones {
        let (events, _) = broadcast::channel(1024);
        let world = Arc::new(World {
            inner: Mutex::new(Inner {
                linger: DEFAULT_LINGER,
                ..Inner::default()
            }),
            events,
            watch_paused: tokio::sync::watch::channel(false).0,
            outage: tokio::sync::watch::channel(false).0,
        });
        let app = Router::new()
            .route(
                "/apis/allocation.agones.dev/v1/namespaces/{ns}/gameserverallocations",
                post(kubernetes_allocation),
            )
            .route("/apis/agones.dev/v1/namespaces/{ns}/gameservers", get(list_or_watch))
            .route(
                "/apis/agones.dev/v1/namespaces/{ns}/gameservers/{name}",
                get(get_one).patch(patch_one).delete(delete_one),
            )
            .route("/gameserverallocation", post(service_allocation))
            .route(
                "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases",
                get(list_leases).post(create_lease),
            )
            .route(
                "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{name}",
                axum::routing::patch(patch_lease).delete(delete_lease),
            )
            .fallback(|| async { status_error(404, "NotFound", "the server could not find the requested resource") })
            .layer(axum::middleware::from_fn_with_state(world.clone(), record))
            .with_state(world.clone());
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeAgones { addr, world, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.world.inner.lock().unwrap()
    }

    /// Adds a Ready GameServer of the fleet whose WebUI port `sd` (container
    /// port and host port alike) is `upstream`'s port on 127.0.0.1, going
    /// through Agones' states on the way as a real one does.
    pub fn add_ready(&self, name: &str, upstream: SocketAddr) {
        self.add_ready_in(FLEET, name, upstream);
    }

    /// [`FakeAgones::add_ready`] for a GameServer of `fleet`.
    pub fn add_ready_in(&self, fleet: &str, name: &str, upstream: SocketAddr) {
        self.add_starting_in(fleet, name, upstream.port());
        self.become_ready(name);
    }

    /// Adds a GameServer of the fleet whose pod is not yet scheduled, as
    /// Agones creates one (PortAllocation → Creating → Starting): no node,
    /// no address, `status.ports` and `status.addresses` `null`. It stays
    /// Starting (a pod Pending for want of a GPU node) until
    /// [`FakeAgones::become_ready`]. Its WebUI will listen on `port`.
    pub fn add_starting(&self, name: &str, port: u16) {
        self.add_starting_in(FLEET, name, port);
    }

    /// [`FakeAgones::add_starting`] for a GameServer of `fleet`.
    pub fn add_starting_in(&self, fleet: &str, name: &str, port: u16) {
        let mut inner = self.inner();
        inner.created += 1;
        let created =
            humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(1_790_000_000 + inner.created));
        let mut object = json!({
            "apiVersion": "agones.dev/v1",
            "kind": "GameServer",
            "metadata": {
                "name": name, "namespace": NAMESPACE, "uid": format!("uid-{name}"),
                "generateName": format!("{fleet}-set-"),
                "generation": 1,
                "creationTimestamp": created.to_string(),
                "finalizers": ["agones.dev/controller"],
                "labels": {"agones.dev/fleet": fleet, "agones.dev/gameserverset": format!("{fleet}-set")},
                "annotations": {"agones.dev/sdk-version": "1.57.0"},
                "ownerReferences": [{
                    "apiVersion": "agones.dev/v1", "kind": "GameServerSet", "name": format!("{fleet}-set"),
                    "uid": "uid-set", "controller": true, "blockOwnerDeletion": true,
                }],
            },
            "spec": {
                "container": "agones-sidecar",
                "eviction": {"safe": "Never"},
                "immutableReplicas": 1,
                "ports": [{
                    "container": "stable-diffusion-webui", "containerPort": port, "hostPort": port,
                    "name": "sd", "portPolicy": "Dynamic", "protocol": "TCP", "range": "default",
                }],
                "scheduling": "Packed",
                "sdkServer": {"grpcPort": 9357, "httpPort": 9358, "logLevel": "Info"},
            },
            "status": {
                "state": "PortAllocation", "address": "", "addresses": null, "nodeName": "",
                "ports": null, "players": null, "reservedUntil": null,
                "eviction": {"safe": "Never"}, "immutableReplicas": 1,
            },
        });
        change(&self.world, &mut inner, "ADDED", name, Some(object.clone()));
        for state in ["Creating", "Starting"] {
            object["status"]["state"] = json!(state);
            change(&self.world, &mut inner, "MODIFIED", name, Some(object.clone()));
        }
    }

    /// The GameServer's pod is scheduled and its WebUI says Ready
    /// (Scheduled → RequestReady → Ready): node, addresses and ports filled.
    pub fn become_ready(&self, name: &str) {
        let mut inner = self.inner();
        let mut gs = inner.servers.get(name).cloned().unwrap();
        let port = gs["spec"]["ports"][0]["hostPort"].clone();
        gs["status"]["address"] = json!("127.0.0.1");
        gs["status"]["nodeName"] = json!("node-1");
        gs["status"]["ports"] = json!([{"name": "sd", "port": port}]);
        gs["status"]["addresses"] = if inner.without_addresses {
            Value::Null
        } else {
            json!([
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": "node-1"},
                {"type": "PodIP", "address": "127.0.0.1"},
            ])
        };
        if inner.without_addresses {
            gs["status"].as_object_mut().unwrap().remove("addresses");
        }
        for state in ["Scheduled", "RequestReady", "Ready"] {
            gs["status"]["state"] = json!(state);
            change(&self.world, &mut inner, "MODIFIED", name, Some(gs.clone()));
        }
    }

    /// Adds an object to the fleet exactly as given (a GameServer the router
    /// may not understand).
    pub fn add_raw(&self, name: &str, object: Value) {
        change(&self.world, &mut self.inner(), "ADDED", name, Some(object));
    }

    /// How long a deleted GameServer lingers (terminating) before it goes.
    pub fn set_linger(&self, linger: Duration) {
        self.inner().linger = linger;
    }

    /// Forgets the change history as etcd compaction does: a watch from an
    /// older version is answered with a 410 Gone ERROR event.
    pub fn compact(&self) {
        let mut inner = self.inner();
        inner.compacted = inner.rv;
        inner.log.clear();
    }

    /// Breaks watching while everything else keeps working: open watch
    /// streams end and new ones are answered 500, until `false`.
    pub fn break_watches(&self, broken: bool) {
        self.inner().watch_broken = broken;
        self.world.outage.send_replace(broken);
    }

    /// The `User-Agent` of every request so far.
    pub fn user_agents(&self) -> Vec<String> {
        self.inner().user_agents.clone()
    }

    pub fn server(&self, name: &str) -> Option<Value> {
        self.inner().servers.get(name).cloned()
    }

    /// Names of the Allocated GameServers carrying `user=<label>` that are
    /// not being deleted.
    pub fn held_by(&self, label: &str) -> Vec<String> {
        self.inner()
            .servers
            .values()
            .filter(|gs| gs["metadata"]["deletionTimestamp"].is_null())
            .filter(|gs| gs["status"]["state"] == "Allocated" && gs["metadata"]["labels"]["user"] == label)
            .map(|gs| gs["metadata"]["name"].as_str().unwrap().to_string())
            .collect()
    }

    pub fn names(&self) -> Vec<String> {
        self.inner().servers.keys().cloned().collect()
    }

    /// Someone (a node drain, Spot preemption, an operator, another
    /// replica) deletes it: it terminates, lingers, then goes.
    pub fn remove(&self, name: &str) {
        delete_gameserver(&self.world, &mut self.inner(), name);
    }

    /// Whether `name` has been deleted: gone, or terminating until its
    /// finalizer is removed.
    pub fn deleted(&self, name: &str) -> bool {
        self.server(name)
            .is_none_or(|gs| !gs["metadata"]["deletionTimestamp"].is_null())
    }

    /// Whether `name` exists and is being deleted (lingering).
    pub fn is_terminating(&self, name: &str) -> bool {
        self.server(name)
            .is_some_and(|gs| !gs["metadata"]["deletionTimestamp"].is_null())
    }

    /// Allocates `name` to the user with `email` as another replica would
    /// have (the same labels the router sets).
    pub fn allocate_directly(&self, name: &str, email: &str) {
        allocate_as_router(&self.world, &mut self.inner(), name, email);
    }

    /// Allocates `name` as the original nginx+lua front end did: the user
    /// label only (no hash label, no email annotation), at `allocated_at`.
    pub fn allocate_legacy(&self, name: &str, email: &str, allocated_at: SystemTime) {
        use session_router::allocator::agones::label;
        let labels = BTreeMap::from([("user".to_string(), label::user_label_value(email))]);
        let mut inner = self.inner();
        let mut gs = inner.servers.get(name).cloned().unwrap();
        apply_allocation(&mut gs, &labels, &BTreeMap::new());
        gs["metadata"]["annotations"]["agones.dev/last-allocated"] =
            json!(humantime::format_rfc3339_nanos(allocated_at).to_string());
        change(&self.world, &mut inner, "MODIFIED", name, Some(gs));
    }

    /// Right after the next list is answered, `name` gets `email`'s labels
    /// (as [`FakeAgones::allocate_directly`]): another replica won a race.
    pub fn adopt_after_next_list(&self, name: &str, email: &str) {
        self.inner().adopt_after_list = Some((name.to_string(), email.to_string()));
    }

    /// Names of the Leases in the waiting line, in the order they joined.
    pub fn line(&self) -> Vec<String> {
        let inner = self.inner();
        let mut leases: Vec<&Value> = inner.leases.values().collect();
        leases.sort_by_key(|l| l["spec"]["acquireTime"].as_str().unwrap_or_default().to_string());
        leases
            .iter()
            .map(|l| l["metadata"]["name"].as_str().unwrap().to_string())
            .collect()
    }

    /// Sets an annotation as another replica (or operator) would.
    pub fn annotate(&self, name: &str, key: &str, value: &str) {
        let mut inner = self.inner();
        let mut gs = inner.servers.get(name).cloned().unwrap();
        gs["metadata"]["annotations"][key] = json!(value);
        change(&self.world, &mut inner, "MODIFIED", name, Some(gs));
    }

    pub fn set_state(&self, name: &str, state: &str) {
        let mut inner = self.inner();
        let mut gs = inner.servers.get(name).cloned().unwrap();
        gs["status"]["state"] = json!(state);
        change(&self.world, &mut inner, "MODIFIED", name, Some(gs));
    }

    /// The next `n` allocations answer UnAllocated (429 on the allocator service).
    pub fn unallocate(&self, n: u32) {
        self.inner().unallocated = n;
    }

    /// Requests whose `METHOD /path?query` contains `pattern` wait `delay`
    /// before they are answered.
    pub fn stall(&self, pattern: &str, delay: Duration) {
        self.inner().stall = Some((pattern.to_string(), delay));
    }

    /// The next `n` allocations answer Contention (409 on the allocator service).
    pub fn contend(&self, n: u32) {
        self.inner().contention = n;
    }

    /// Holds back watch events until [`FakeAgones::resume_watch`]: the
    /// router's cache then lags behind the API, as it can in a real cluster.
    pub fn pause_watch(&self) {
        self.world.watch_paused.send_replace(true);
    }

    pub fn resume_watch(&self) {
        self.world.watch_paused.send_replace(false);
    }

    pub fn without_addresses(&self) {
        self.inner().without_addresses = true;
    }

    pub fn delay_allocations(&self, delay: Duration) {
        self.inner().allocation_delay = delay;
    }

    /// An API outage: while `down`, every request (watches included) is
    /// answered 503 and open watch streams end; `false` recovers.
    pub fn set_down(&self, down: bool) {
        self.inner().down = down;
        self.world.outage.send_replace(down);
    }

    /// A slow API server: every request waits `delay` before it is handled.
    pub fn set_api_delay(&self, delay: Duration) {
        self.inner().api_delay = delay;
    }

    /// The next `n` allocations are applied (the GameServer becomes
    /// Allocated to the user) but their response never arrives in time: the
    /// handler holds it back for a minute, so the caller times out.
    pub fn lose_allocation_responses(&self, n: u32) {
        self.inner().lose_allocations = n;
    }

    /// From now on the allocator service answers that it placed servers
    /// in cluster `name` (multi-cluster allocation), as its `source` says.
    pub fn place_in_cluster(&self, name: &str) {
        self.inner().placed_in = Some(name.to_string());
    }

    /// The body of every allocation request so far (either API), in order.
    pub fn allocation_requests(&self) -> Vec<Value> {
        self.inner().allocations.clone()
    }

    /// Every request so far, as `METHOD /path?query`.
    pub fn calls(&self) -> Vec<String> {
        self.inner().calls.clone()
    }

    pub fn clear_calls(&self) {
        self.inner().calls.clear();
    }
}

fn allocate_as_router(world: &World, inner: &mut Inner, name: &str, email: &str) {
    use session_router::allocator::agones::{label, USER_HASH_LABEL};
    let labels = BTreeMap::from([
        ("user".to_string(), label::user_label_value(email)),
        (USER_HASH_LABEL.to_string(), label::user_hash(email)),
    ]);
    let mut gs = inner.servers.get(name).cloned().unwrap();
    apply_allocation(&mut gs, &labels, &BTreeMap::new());
    change(world, inner, "MODIFIED", name, Some(gs));
}

async fn record(State(world): State<Arc<World>>, request: Request, next: Next) -> Response {
    let line = format!("{} {}", request.method(), request.uri());
    let user_agent = request
        .headers()
        .get("user-agent")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let delay = {
        let mut inner = world.inner.lock().unwrap();
        let stalled = inner
            .stall
            .as_ref()
            .filter(|(pattern, _)| line.contains(pattern.as_str()))
            .map(|(_, delay)| *delay);
        inner.calls.push(line);
        inner.user_agents.push(user_agent);
        stalled.unwrap_or(inner.api_delay)
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if world.inner.lock().unwrap().down {
        return status_error(
            503,
            "ServiceUnavailable",
            "the server is currently unable to handle the request",
        );
    }
    next.run(request).await
}

/// Whether this allocation's response is to be lost (see
/// [`FakeAgones::lose_allocation_responses`]); counts it down.
fn take_lost_response(world: &World) -> bool {
    let mut inner = world.inner.lock().unwrap();
    if inner.lose_allocations == 0 {
        return false;
    }
    inner.lose_allocations -= 1;
    true
}

/// Holds a lost response back far longer than any caller waits.
async fn withhold_response() {
    tokio::time::sleep(Duration::from_secs(60)).await;
}

/// Applies a change: bumps the resourceVersion, stores or removes the
/// object, logs and broadcasts the event.
fn change(world: &World, inner: &mut Inner, kind: &'static str, name: &str, object: Option<Value>) {
    inner.rv += 1;
    let rv = inner.rv;
    let mut object = match object {
        Some(o) => o,
        None => match inner.servers.get(name) {
            Some(o) => o.clone(),
            None => return,
        },
    };
    object["metadata"]["resourceVersion"] = json!(rv.to_string());
    if kind == "DELETED" {
        inner.servers.remove(name);
    } else {
        inner.servers.insert(name.to_string(), object.clone());
    }
    let event = Event { rv, kind, object };
    inner.log.push(event.clone());
    let _ = world.events.send(event);
}

/// Marks `name` deleted: with its finalizer it stays, terminating, and goes
/// after the linger. Deleting a terminating object changes nothing.
fn delete_gameserver(world: &Arc<World>, inner: &mut Inner, name: &str) -> Option<Value> {
    let mut gs = inner.servers.get(name).cloned()?;
    if !gs["metadata"]["deletionTimestamp"].is_null() {
        return Some(gs);
    }
    gs["metadata"]["deletionTimestamp"] = json!(humantime::format_rfc3339_seconds(SystemTime::now()).to_string());
    gs["metadata"]["deletionGracePeriodSeconds"] = json!(0);
    change(world, inner, "MODIFIED", name, Some(gs));
    let (world, gone, linger) = (world.clone(), name.to_string(), inner.linger);
    let uid = inner.servers[name]["metadata"]["uid"].clone();
    tokio::spawn(async move {
        tokio::time::sleep(linger).await;
        let mut inner = world.inner.lock().unwrap();
        // The controller removes its finalizer once the pod is gone.
        if inner.servers.get(&gone).is_some_and(|gs| gs["metadata"]["uid"] == uid) {
            change(&world, &mut inner, "DELETED", &gone, None);
        }
    });
    inner.servers.get(name).cloned()
}

fn status_error(code: u16, reason: &str, message: &str) -> Response {
    status_with(code, reason, message, None)
}

/// A `Status` about one GameServer (with `details`, as the API server sends).
fn gameserver_status(code: u16, reason: &str, message: &str, name: &str) -> Response {
    let details = json!({"name": name, "group": "agones.dev", "kind": "gameservers"});
    status_with(code, reason, message, Some(details))
}

fn status_with(code: u16, reason: &str, message: &str, details: Option<Value>) -> Response {
    let mut body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code,
    });
    if let Some(details) = details {
        body["details"] = details;
    }
    (StatusCode::from_u16(code).unwrap(), axum::Json(body)).into_response()
}

fn is_valid_label_value(v: &str) -> bool {
    v.len() <= 63
        && (v.is_empty()
            || (v.as_bytes()[0].is_ascii_alphanumeric()
                && v.as_bytes()[v.len() - 1].is_ascii_alphanumeric()
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))))
}

fn labels_match(gs: &Value, wanted: &BTreeMap<String, String>) -> bool {
    wanted.iter().all(|(k, v)| gs["metadata"]["labels"][k] == json!(v))
}

/// One requirement of a label selector.
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    Absent(String),
}

/// Parses a label selector as the API server does (`k=v`, `k==v`, `k!=v`,
/// `k in (a,b)`, `k notin (a,b)`, `k`, `!k`); the error is the message of
/// its 400 answer.
fn parse_selector(selector: &str) -> Result<Vec<Requirement>, String> {
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0usize, 0);
    for (i, c) in selector.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                terms.push(&selector[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth > 0 {
        return Err("unable to parse requirement: found '', expected: ',' or ')'".into());
    }
    terms.push(&selector[start..]);
    let value = |key: &str, v: &str| -> Result<String, String> {
        let v = v.trim();
        if v.len() > 63 {
            return Err(format!(
                "unable to parse requirement: values[0][{key}]: Invalid value: {v:?}: must be no more than 63 characters"
            ));
        }
        if !is_valid_label_value(v) {
            return Err(format!("unable to parse requirement: values[0][{key}]: Invalid value: {v:?}: a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"));
        }
        Ok(v.to_string())
    };
    let set = |key: &str, rest: &str| -> Result<Vec<String>, String> {
        let inner = rest
            .trim()
            .strip_prefix('(')
            .and_then(|r| r.strip_suffix(')'))
            .ok_or_else(|| "unable to parse requirement: found '', expected: '('".to_string())?;
        inner.split(',').map(|v| value(key, v)).collect()
    };
    let mut requirements = Vec::new();
    for term in terms.iter().map(|t| t.trim()).filter(|t| !t.is_empty()) {
        let requirement = if let Some((k, v)) = term.split_once("!=") {
            Requirement::NotEquals(k.trim().into(), value(k.trim(), v)?)
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            Requirement::Equals(k.trim().into(), value(k.trim(), v)?)
        } else if let Some((k, rest)) = term.split_once(" notin ") {
            Requirement::NotIn(k.trim().into(), set(k.trim(), rest)?)
        } else if let Some((k, rest)) = term.split_once(" in ") {
            Requirement::In(k.trim().into(), set(k.trim(), rest)?)
        } else if let Some(k) = term.strip_prefix('!') {
            Requirement::Absent(k.trim().into())
        } else if term.contains(|c: char| c.is_whitespace() || c == '(' || c == ')') {
            return Err(format!(
                "unable to parse requirement: found {term:?}, expected: identifier"
            ));
        } else {
            Requirement::Exists(term.into())
        };
        requirements.push(requirement);
    }
    Ok(requirements)
}

fn selector_matches(object: &Value, requirements: &[Requirement]) -> bool {
    let labels = &object["metadata"]["labels"];
    let label = |k: &str| labels[k].as_str().map(str::to_string);
    requirements.iter().all(|r| match r {
        Requirement::Equals(k, v) => label(k).as_ref() == Some(v),
        Requirement::NotEquals(k, v) => label(k).as_ref() != Some(v),
        Requirement::In(k, vs) => label(k).is_some_and(|l| vs.contains(&l)),
        Requirement::NotIn(k, vs) => label(k).is_none_or(|l| !vs.contains(&l)),
        Requirement::Exists(k) => label(k).is_some(),
        Requirement::Absent(k) => label(k).is_none(),
    })
}

/// The query's label selector, or the 400 the API server answers; a field
/// selector on `status.state` is refused as it is there.
fn selector_of(query: &BTreeMap<String, String>) -> Result<Vec<Requirement>, Box<Response>> {
    let refuse = |message: &str| Box::new(status_error(400, "BadRequest", message));
    if let Some(fields) = query.get("fieldSelector") {
        if let Some(field) = fields
            .split(',')
            .find_map(|t| t.split('=').next().filter(|f| f.starts_with("status.")))
        {
            return Err(refuse(&format!("field label not supported: {field}")));
        }
    }
    parse_selector(query.get("labelSelector").map_or("", String::as_str)).map_err(|message| refuse(&message))
}

fn apply_allocation(gs: &mut Value, labels: &BTreeMap<String, String>, annotations: &BTreeMap<String, String>) {
    for (k, v) in labels {
        gs["metadata"]["labels"][k] = json!(v);
    }
    for (k, v) in annotations {
        gs["metadata"]["annotations"][k] = json!(v);
    }
    let stamp = humantime::format_rfc3339_nanos(SystemTime::now()).to_string();
    gs["metadata"]["annotations"]["agones.dev/last-allocated"] = json!(stamp);
    gs["status"]["state"] = json!("Allocated");
}

enum Allocation {
    Allocated(Value),
    UnAllocated,
    Contention,
}

/// Tries the selectors in order; the first match wins.
fn allocate(
    world: &World,
    selectors: &[(String, BTreeMap<String, String>)],
    labels: &BTreeMap<String, String>,
    annotations: &BTreeMap<String, String>,
) -> Allocation {
    let mut inner = world.inner.lock().unwrap();
    if inner.contention > 0 {
        inner.contention -= 1;
        return Allocation::Contention;
    }
    if inner.unallocated > 0 {
        inner.unallocated -= 1;
        return Allocation::UnAllocated;
    }
    for (state, wanted) in selectors {
        let found = inner
            .servers
            .values()
            .filter(|gs| gs["metadata"]["deletionTimestamp"].is_null())
            .find(|gs| gs["status"]["state"] == json!(state) && labels_match(gs, wanted))
            .cloned();
        if let Some(mut gs) = found {
            apply_allocation(&mut gs, labels, annotations);
            let name = gs["metadata"]["name"].as_str().unwrap().to_string();
            change(world, &mut inner, "MODIFIED", &name, Some(gs.clone()));
            return Allocation::Allocated(inner.servers[&name].clone());
        }
    }
    Allocation::UnAllocated
}

fn string_map(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

async fn pause(world: &World) {
    let delay = world.inner.lock().unwrap().allocation_delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
}

async fn kubernetes_allocation(State(world): State<Arc<World>>, Path(ns): Path<String>, body: Bytes) -> Response {
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return status_error(400, "BadRequest", "invalid JSON");
    };
    if request["apiVersion"] != "allocation.agones.dev/v1" || request["kind"] != "GameServerAllocation" {
        return status_error(
            400,
            "BadRequest",
            "apiVersion/kind must be allocation.agones.dev/v1 GameServerAllocation",
        );
    }
    world.inner.lock().unwrap().allocations.push(request.clone());
    let spec = &request["spec"];
    let labels = string_map(&spec["metadata"]["labels"]);
    if let Some((k, v)) = labels.iter().find(|(_, v)| !is_valid_label_value(v)) {
        return status_error(
            422,
            "Invalid",
            &format!("metadata.labels: Invalid value: {v:?} for {k}"),
        );
    }
    let selectors: Vec<(String, BTreeMap<String, String>)> = spec["selectors"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|s| {
            (
                s["gameServerState"].as_str().unwrap_or("Ready").to_string(),
                string_map(&s["matchLabels"]),
            )
        })
        .collect();
    pause(&world).await;
    let outcome = if ns == NAMESPACE {
        allocate(
            &world,
            &selectors,
            &labels,
            &string_map(&spec["metadata"]["annotations"]),
        )
    } else {
        Allocation::UnAllocated
    };
    if matches!(outcome, Allocation::Allocated(_)) && take_lost_response(&world) {
        withhold_response().await;
    }
    let status = match outcome {
        Allocation::Allocated(gs) => json!({
            "state": "Allocated",
            "gameServerName": gs["metadata"]["name"],
            "ports": gs["status"]["ports"],
            "address": gs["status"]["address"],
            "addresses": gs["status"].get("addresses").cloned().unwrap_or(json!([])),
            "nodeName": gs["status"]["nodeName"],
            "source": "local",
        }),
        Allocation::UnAllocated => json!({"state": "UnAllocated", "gameServerName": ""}),
        Allocation::Contention => json!({"state": "Contention", "gameServerName": ""}),
    };
    let mut answer = request.clone();
    answer["status"] = status;
    (StatusCode::CREATED, axum::Json(answer)).into_response()
}

async fn service_allocation(State(world): State<Arc<World>>, body: Bytes) -> Response {
    let rpc = |status: u16, code: i32, message: &str| {
        (
            StatusCode::from_u16(status).unwrap(),
            axum::Json(json!({"code": code, "message": message, "details": []})),
        )
            .into_response()
    };
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return rpc(400, 3, "invalid JSON");
    };
    world.inner.lock().unwrap().allocations.push(request.clone());
    let mut selectors = Vec::new();
    for s in request["gameServerSelectors"].as_array().cloned().unwrap_or_default() {
        let state = match s["gameServerState"].as_str().unwrap_or("READY") {
            "READY" => "Ready",
            "ALLOCATED" => "Allocated",
            other => return rpc(400, 3, &format!("invalid value for enum type: {other:?}")),
        };
        selectors.push((state.to_string(), string_map(&s["matchLabels"])));
    }
    let labels = string_map(&request["metadata"]["labels"]);
    if labels.values().any(|v| !is_valid_label_value(v)) {
        return rpc(400, 3, "invalid label value");
    }
    pause(&world).await;
    if request["namespace"] != NAMESPACE {
        // Exactly what a missing namespace looks like: nothing to allocate.
        return rpc(429, 8, "there is no available GameServer to allocate");
    }
    let outcome = allocate(
        &world,
        &selectors,
        &labels,
        &string_map(&request["metadata"]["annotations"]),
    );
    if matches!(outcome, Allocation::Allocated(_)) && take_lost_response(&world) {
        withhold_response().await;
    }
    match outcome {
        Allocation::Allocated(gs) => {
            let mut answer = json!({
                "gameServerName": gs["metadata"]["name"],
                "ports": gs["status"]["ports"],
                "address": gs["status"]["address"],
                "nodeName": gs["status"]["nodeName"],
                "source": world.inner.lock().unwrap().placed_in.clone().unwrap_or_else(|| "local".into()),
            });
            if let Some(addresses) = gs["status"].get("addresses") {
                answer["addresses"] = addresses.clone();
            }
            (StatusCode::OK, axum::Json(answer)).into_response()
        }
        Allocation::UnAllocated => rpc(429, 8, "there is no available GameServer to allocate"),
        Allocation::Contention => rpc(409, 10, "too many concurrent requests have overwhelmed the system"),
    }
}

async fn list_or_watch(
    State(world): State<Arc<World>>,
    Path(ns): Path<String>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Response {
    let selector = match selector_of(&query) {
        Ok(selector) => selector,
        Err(refused) => return *refused,
    };
    let in_scope = move |gs: &Value| ns == NAMESPACE && selector_matches(gs, &selector);
    let watching = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    if !watching {
        let mut inner = world.inner.lock().unwrap();
        let items: Vec<Value> = inner.servers.values().filter(|gs| in_scope(gs)).cloned().collect();
        let list = json!({
            "apiVersion": "agones.dev/v1", "kind": "GameServerList",
            "metadata": {"resourceVersion": inner.rv.to_string()},
            "items": items,
        });
        if let Some((name, email)) = inner.adopt_after_list.take() {
            allocate_as_router(&world, &mut inner, &name, &email);
        }
        return axum::Json(list).into_response();
    }
    if world.inner.lock().unwrap().watch_broken {
        return status_error(
            500,
            "InternalError",
            "Internal error occurred: watch chan error: etcdserver: no leader",
        );
    }
    let since: u64 = query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
    let timeout = Duration::from_secs(query.get("timeoutSeconds").and_then(|v| v.parse().ok()).unwrap_or(290));
    let bookmarks = query.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let mut events = world.events.subscribe();
    let mut paused = world.watch_paused.subscribe();
    let mut outage = world.outage.subscribe();
    let (backlog, expired): (Vec<Event>, bool) = {
        let inner = world.inner.lock().unwrap();
        let backlog = inner.log.iter().filter(|e| e.rv > since).cloned().collect();
        (backlog, since < inner.compacted)
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(64);
    let current = {
        let world = world.clone();
        move || world.inner.lock().unwrap().rv
    };
    tokio::spawn(async move {
        let line = |e: &Event| Bytes::from(format!("{}\n", json!({"type": e.kind, "object": e.object})));
        if expired {
            // As the API server answers a version etcd has compacted away.
            let gone = json!({"type": "ERROR", "object": {
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": format!("too old resource version: {since} ({})", current()),
                "reason": "Expired", "code": 410,
            }});
            let _ = tx.send(Ok(Bytes::from(format!("{gone}\n")))).await;
            return;
        }
        let bookmark = |rv: u64| {
            let event = json!({"type": "BOOKMARK", "object": {
                "apiVersion": "agones.dev/v1", "kind": "GameServer",
                "metadata": {"resourceVersion": rv.to_string()},
            }});
            Bytes::from(format!("{event}\n"))
        };
        let mut last = since;
        for e in &backlog {
            last = e.rv;
            if in_scope(&e.object) && tx.send(Ok(line(e))).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut ticks = tokio::time::interval(BOOKMARK_EVERY);
        loop {
            tokio::select! {
                _ = &mut deadline => return,
                _ = async { let _ = outage.wait_for(|down| *down).await; } => return,
                _ = ticks.tick(), if bookmarks => {
                    if tx.send(Ok(bookmark(last))).await.is_err() {
                        return;
                    }
                }
                received = events.recv() => match received {
                    Ok(e) if e.rv > last => {
                        last = e.rv;
                        if paused.wait_for(|p| !*p).await.is_err() {
                            return;
                        }
                        if in_scope(&e.object) && tx.send(Ok(line(&e))).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => return,
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap()
}

async fn get_one(State(world): State<Arc<World>>, Path((ns, name)): Path<(String, String)>) -> Response {
    let inner = world.inner.lock().unwrap();
    match inner.servers.get(&name).filter(|_| ns == NAMESPACE) {
        Some(gs) => axum::Json(gs.clone()).into_response(),
        None => not_found(&name),
    }
}

fn not_found(name: &str) -> Response {
    gameserver_status(
        404,
        "NotFound",
        &format!("gameservers.agones.dev {name:?} not found"),
        name,
    )
}

/// RFC 6902 JSON patch: `add`, `replace`, `remove` and `test`.
fn apply_json_patch(target: &mut Value, patch: &Value) -> Result<(), String> {
    for op in patch.as_array().ok_or("a JSON patch is an array")? {
        let path = op["path"].as_str().ok_or("op without a path")?;
        let (parent, key) = path.rsplit_once('/').ok_or("path must start with /")?;
        let key = key.replace("~1", "/").replace("~0", "~");
        match op["op"].as_str() {
            Some("test") if target.pointer(path) != Some(&op["value"]) => {
                return Err(format!("the test at {path} failed"))
            }
            Some("test") => {}
            Some(verb @ ("add" | "replace" | "remove")) => {
                let object = target
                    .pointer_mut(parent)
                    .and_then(Value::as_object_mut)
                    .ok_or_else(|| format!("no object at {parent}"))?;
                if verb == "remove" {
                    object.remove(&key).ok_or_else(|| format!("nothing at {path}"))?;
                } else {
                    object.insert(key, op["value"].clone());
                }
            }
            other => return Err(format!("unsupported op {other:?}")),
        }
    }
    Ok(())
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(fields) => {
            if !target.is_object() {
                *target = json!({});
            }
            for (k, v) in fields {
                if v.is_null() {
                    target.as_object_mut().unwrap().remove(k);
                } else {
                    merge(
                        target.as_object_mut().unwrap().entry(k.clone()).or_insert(Value::Null),
                        v,
                    );
                }
            }
        }
        other => *target = other.clone(),
    }
}

async fn patch_one(
    State(world): State<Arc<World>>,
    Path((ns, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let json_patch = content_type.starts_with("application/json-patch+json");
    if !json_patch && !content_type.starts_with("application/merge-patch+json") {
        // A GameServer is a custom resource: no strategic merge patch.
        return status_error(
            415,
            "UnsupportedMediaType",
            "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml",
        );
    }
    let Ok(patch) = serde_json::from_slice::<Value>(&body) else {
        return status_error(400, "BadRequest", "invalid JSON");
    };
    let mut inner = world.inner.lock().unwrap();
    let Some(mut gs) = inner.servers.get(&name).filter(|_| ns == NAMESPACE).cloned() else {
        return not_found(&name);
    };
    if let Some(rv) = patch["metadata"]["resourceVersion"].as_str() {
        if gs["metadata"]["resourceVersion"] != json!(rv) {
            return gameserver_status(
                409,
                "Conflict",
                &format!("Operation cannot be fulfilled on gameservers.agones.dev {name:?}: the object has been modified; please apply your changes to the latest version and try again"),
                &name,
            );
        }
    }
    let before = gs.clone();
    if json_patch {
        if let Err(message) = apply_json_patch(&mut gs, &patch) {
            return status_error(422, "Invalid", &message);
        }
    } else {
        merge(&mut gs, &patch);
    }
    // A patch that changes nothing keeps the resourceVersion (no event).
    if gs != before {
        change(&world, &mut inner, "MODIFIED", &name, Some(gs));
    }
    axum::Json(inner.servers[&name].clone()).into_response()
}

async fn delete_one(
    State(world): State<Arc<World>>,
    Path((ns, name)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let options: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let mut inner = world.inner.lock().unwrap();
    let Some(gs) = inner.servers.get(&name).filter(|_| ns == NAMESPACE).cloned() else {
        return not_found(&name);
    };
    if let Some(rv) = options["preconditions"]["resourceVersion"].as_str() {
        let current = gs["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if current != rv {
            let details = json!({"name": name, "group": "agones.dev", "kind": "GameServer"});
            return status_with(
                409,
                "Conflict",
                &format!("Operation cannot be fulfilled on GameServer.agones.dev {name:?}: the ResourceVersion in the precondition ({rv}) does not match the ResourceVersion in record ({current}). The object might have been modified"),
                Some(details),
            );
        }
    }
    // The finalizer keeps it: 200 with the object, now terminating.
    let terminating = delete_gameserver(&world, &mut inner, &name).unwrap_or(gs);
    axum::Json(terminating).into_response()
}

fn lease_not_found(name: &str) -> Response {
    status_error(
        404,
        "NotFound",
        &format!("leases.coordination.k8s.io {name:?} not found"),
    )
}

async fn list_leases(
    State(world): State<Arc<World>>,
    Path(ns): Path<String>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Response {
    let selector = match selector_of(&query) {
        Ok(selector) => selector,
        Err(refused) => return *refused,
    };
    let inner = world.inner.lock().unwrap();
    let items: Vec<Value> = inner
        .leases
        .values()
        .filter(|l| ns == NAMESPACE && selector_matches(l, &selector))
        .cloned()
        .collect();
    axum::Json(json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "LeaseList",
        "metadata": {"resourceVersion": inner.rv.to_string()},
        "items": items,
    }))
    .into_response()
}

async fn create_lease(State(world): State<Arc<World>>, Path(ns): Path<String>, body: Bytes) -> Response {
    let Ok(mut lease) = serde_json::from_slice::<Value>(&body) else {
        return status_error(400, "BadRequest", "invalid JSON");
    };
    let Some(name) = lease["metadata"]["name"].as_str().map(str::to_string) else {
        return status_error(
            422,
            "Invalid",
            "Lease.coordination.k8s.io is invalid: metadata.name: Required value",
        );
    };
    let mut inner = world.inner.lock().unwrap();
    if inner.leases.contains_key(&name) {
        return status_error(
            409,
            "AlreadyExists",
            &format!("leases.coordination.k8s.io {name:?} already exists"),
        );
    }
    inner.rv += 1;
    lease["apiVersion"] = json!("coordination.k8s.io/v1");
    lease["kind"] = json!("Lease");
    lease["metadata"]["namespace"] = json!(ns);
    lease["metadata"]["uid"] = json!(format!("uid-lease-{name}"));
    lease["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
    inner.leases.insert(name, lease.clone());
    (StatusCode::CREATED, axum::Json(lease)).into_response()
}

async fn patch_lease(
    State(world): State<Arc<World>>,
    Path((ns, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let merge_patch = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("application/merge-patch+json"));
    if !merge_patch {
        return status_error(415, "UnsupportedMediaType", "only merge patches are served here");
    }
    let Ok(patch) = serde_json::from_slice::<Value>(&body) else {
        return status_error(400, "BadRequest", "invalid JSON");
    };
    let mut inner = world.inner.lock().unwrap();
    inner.rv += 1;
    let rv = inner.rv;
    let Some(lease) = inner.leases.get_mut(&name).filter(|_| ns == NAMESPACE) else {
        return lease_not_found(&name);
    };
    merge(lease, &patch);
    lease["metadata"]["resourceVersion"] = json!(rv.to_string());
    axum::Json(lease.clone()).into_response()
}

async fn delete_lease(State(world): State<Arc<World>>, Path((ns, name)): Path<(String, String)>) -> Response {
    let mut inner = world.inner.lock().unwrap();
    match inner.leases.remove(&name).filter(|_| ns == NAMESPACE) {
        Some(lease) => axum::Json(lease).into_response(),
        None => lease_not_found(&name),
    }
}
