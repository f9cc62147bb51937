//! A fake Kubernetes + Agones API server speaking the documented wire
//! format (see ../shared/reference/agones.md), so the router's real `kube`
//! client and allocator-service client can be driven over HTTP:
//!
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
}

struct World {
    inner: Mutex<Inner>,
    events: broadcast::Sender<Event>,
    /// While true, watch streams hold back new events (a slow watch).
    watch_paused: tokio::sync::watch::Sender<bool>,
    /// Flips to true when the API goes down: open watch streams end.
    outage: tokio::sync::watch::Sender<bool>,
}

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
            inner: Mutex::new(Inner::default()),
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
    /// port and host port alike) is `upstream`'s port on 127.0.0.1.
    pub fn add_ready(&self, name: &str, upstream: SocketAddr) {
        let mut inner = self.inner();
        inner.created += 1;
        let created =
            humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(1_790_000_000 + inner.created));
        let port = upstream.port();
        let mut status = json!({
            "state": "Ready",
            "address": "127.0.0.1",
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "PodIP", "address": "127.0.0.1"}],
            "ports": [{"name": "default", "port": 7001}, {"name": "sd", "port": port}],
            "nodeName": "node-1",
        });
        if inner.without_addresses {
            status.as_object_mut().unwrap().remove("addresses");
        }
        let object = json!({
            "apiVersion": "agones.dev/v1",
            "kind": "GameServer",
            "metadata": {
                "name": name, "namespace": NAMESPACE, "uid": format!("uid-{name}"),
                "creationTimestamp": created.to_string(),
                "labels": {"agones.dev/fleet": FLEET},
                "annotations": {},
            },
            "spec": {"ports": [
                {"name": "default", "containerPort": 9357, "portPolicy": "Dynamic"},
                {"name": "sd", "containerPort": port, "portPolicy": "Dynamic"},
            ]},
            "status": status,
        });
        change(&self.world, &mut inner, "ADDED", name, Some(object));
    }

    pub fn server(&self, name: &str) -> Option<Value> {
        self.inner().servers.get(name).cloned()
    }

    /// Names of GameServers in state `state` carrying `user=<label>`.
    pub fn held_by(&self, label: &str) -> Vec<String> {
        self.inner()
            .servers
            .values()
            .filter(|gs| gs["status"]["state"] == "Allocated" && gs["metadata"]["labels"]["user"] == label)
            .map(|gs| gs["metadata"]["name"].as_str().unwrap().to_string())
            .collect()
    }

    pub fn names(&self) -> Vec<String> {
        self.inner().servers.keys().cloned().collect()
    }

    /// Someone (a node drain, Spot preemption, an operator) deletes it.
    pub fn remove(&self, name: &str) {
        let mut inner = self.inner();
        change(&self.world, &mut inner, "DELETED", name, None);
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
    let delay = {
        let mut inner = world.inner.lock().unwrap();
        inner.calls.push(line);
        inner.api_delay
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

fn status_error(code: u16, reason: &str, message: &str) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code,
    });
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

/// Kubernetes equality-based label selectors: `k=v`, `k==v`, `k!=v`, `k`, `!k`.
fn selector_matches(gs: &Value, selector: &str) -> bool {
    selector
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .all(|term| {
            let labels = &gs["metadata"]["labels"];
            if let Some((k, v)) = term.split_once("!=") {
                labels[k.trim()] != json!(v.trim())
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                labels[k.trim()] == json!(v.trim())
            } else if let Some(k) = term.strip_prefix('!') {
                labels[k.trim()].is_null()
            } else {
                !labels[term].is_null()
            }
        })
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
    for (state, wanted) in selectors {
        let found = inner
            .servers
            .values()
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
                "source": "local",
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
    let selector = query.get("labelSelector").cloned().unwrap_or_default();
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
    let since: u64 = query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
    let timeout = Duration::from_secs(query.get("timeoutSeconds").and_then(|v| v.parse().ok()).unwrap_or(290));
    let mut events = world.events.subscribe();
    let mut paused = world.watch_paused.subscribe();
    let mut outage = world.outage.subscribe();
    let backlog: Vec<Event> = {
        let inner = world.inner.lock().unwrap();
        inner.log.iter().filter(|e| e.rv > since).cloned().collect()
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(64);
    tokio::spawn(async move {
        let line = |e: &Event| Bytes::from(format!("{}\n", json!({"type": e.kind, "object": e.object})));
        let mut last = since;
        for e in &backlog {
            last = e.rv;
            if in_scope(&e.object) && tx.send(Ok(line(e))).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => return,
                _ = async { let _ = outage.wait_for(|down| *down).await; } => return,
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
        None => status_error(404, "NotFound", &format!("gameservers.agones.dev {name:?} not found")),
    }
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
    if !content_type.starts_with("application/merge-patch+json") {
        return status_error(
            415,
            "UnsupportedMediaType",
            &format!("the body of the request was in an unknown format: {content_type}"),
        );
    }
    let Ok(patch) = serde_json::from_slice::<Value>(&body) else {
        return status_error(400, "BadRequest", "invalid JSON");
    };
    let mut inner = world.inner.lock().unwrap();
    let Some(mut gs) = inner.servers.get(&name).filter(|_| ns == NAMESPACE).cloned() else {
        return status_error(404, "NotFound", &format!("gameservers.agones.dev {name:?} not found"));
    };
    if let Some(rv) = patch["metadata"]["resourceVersion"].as_str() {
        if gs["metadata"]["resourceVersion"] != json!(rv) {
            return status_error(
                409,
                "Conflict",
                "the object has been modified; please apply your changes to the latest version and try again",
            );
        }
    }
    merge(&mut gs, &patch);
    change(&world, &mut inner, "MODIFIED", &name, Some(gs));
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
        return status_error(404, "NotFound", &format!("gameservers.agones.dev {name:?} not found"));
    };
    if let Some(rv) = options["preconditions"]["resourceVersion"].as_str() {
        let current = gs["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if current != rv {
            return status_error(
                409,
                "Conflict",
                &format!("Operation cannot be fulfilled on gameservers.agones.dev {name:?}: Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {current}"),
            );
        }
    }
    change(&world, &mut inner, "DELETED", &name, None);
    axum::Json(gs).into_response()
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
    let selector = query.get("labelSelector").cloned().unwrap_or_default();
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
