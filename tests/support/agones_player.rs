//! Agones, played on a real Kubernetes API server (scripts/k8s-e2e starts
//! one): what the Agones controller, its allocation API and the
//! agones-allocator service would do, shaped exactly like the captures of a
//! real Agones 1.57 cluster in ../shared/reference/agones-captures/.
//!
//! - [`AgonesPlayer::add_ready`] creates a GameServer of the player's Fleet
//!   and walks it through the captured states (PortAllocation, Creating,
//!   Starting with `null` ports and addresses, then Scheduled, RequestReady,
//!   Ready), each status copied from the capture of that state;
//! - every GameServer carries the finalizer `agones.dev/controller`: a
//!   DELETE only sets `deletionTimestamp`, and the player removes the
//!   finalizer `linger` later (the pod's grace period), so a released server
//!   stays, terminating, as it does for real;
//! - `POST …/gameserverallocations` is served behind an `APIService`, in the
//!   network namespace the script made (the API server refuses loopback
//!   endpoints), so the router's allocation goes through the API server and
//!   its RBAC; the agones-allocator's `POST /gameserverallocation` is served
//!   over mutual TLS on loopback.
//!
//! The API server, etcd, the garbage collector and RBAC are real; nodes,
//! pods and the WebUI are the tests' stand-in pods.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

/// Set by scripts/k8s-e2e: the router's kubeconfig (its ServiceAccount's
/// token). Unset, the real-API-server scenarios skip themselves.
pub const KUBECONFIG_VAR: &str = "SESSION_ROUTER_E2E_KUBECONFIG";
/// The Fleet's name, the same in each scenario's namespace.
pub const FLEET: &str = "sd-agones-fleet";
const FINALIZER: &str = "agones.dev/controller";

fn gameservers(namespace: &str) -> String {
    format!("/apis/agones.dev/v1/namespaces/{namespace}/gameservers")
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run scripts/k8s-e2e"))
}

/// Whether scripts/k8s-e2e started a cluster for this run.
pub fn cluster_available() -> bool {
    std::env::var_os(KUBECONFIG_VAR).is_some()
}

/// A capture from the real cluster (the ground truth the player copies).
pub fn capture(file: &str) -> Value {
    let path = format!(
        "{}/../shared/reference/agones-captures/{file}",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// An admin client of the API server (the script's client certificate in
/// system:masters): the player acts as Agones' controller does.
async fn admin_client() -> kube::Client {
    let kubeconfig = kube::config::Kubeconfig::read_from(env("SESSION_ROUTER_E2E_ADMIN_KUBECONFIG")).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    kube::Client::try_from(config).unwrap()
}

/// One raw JSON request: the player writes objects exactly as captured,
/// `null`s included, which typed clients would drop. A dropped connection
/// (a scenario cuts them all) is tried again; an API server's answer is not.
async fn call(client: &kube::Client, method: &str, path: &str, body: Option<&Value>) -> Result<Value, kube::Error> {
    let content_type = if method == "PATCH" {
        "application/merge-patch+json"
    } else {
        "application/json"
    };
    let body = body.map(|b| serde_json::to_vec(b).unwrap()).unwrap_or_default();
    let mut tries = 0;
    loop {
        let request = http::Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", content_type)
            .body(body.clone())
            .unwrap();
        match client.request::<Value>(request).await {
            Err(e) if !matches!(e, kube::Error::Api(_)) && tries < 5 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            answer => return answer,
        }
    }
}

/// Cuts every TCP connection to the API server (as its restart or a load
/// balancer's reset would): every client, the routers' watches included,
/// must reconnect. Needs root, as the script runs.
pub fn drop_api_server_connections() {
    let port = env("SESSION_ROUTER_E2E_APISERVER_PORT");
    let status = std::process::Command::new("ss")
        .args(["-K", "dst", "127.0.0.1", "dport", "=", &port])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("ss (iproute2) runs");
    assert!(status.success(), "ss -K failed");
}

/// The GameServers of `namespace` that `selector` matches.
async fn list_fleet(client: &kube::Client, namespace: &str, selector: &str) -> Vec<Value> {
    let path = format!("{}?labelSelector={}", gameservers(namespace), urlencode(selector));
    let list = call(client, "GET", &path, None).await.unwrap();
    list["items"].as_array().cloned().unwrap_or_default()
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Waits until the API server's authorizer has seen the RoleBinding just
/// made (its RBAC cache follows a watch): a router started before would be
/// refused its first calls, which the audit check counts as a missing verb.
/// Asked as the administrator, so the wait itself leaves no refusal behind.
async fn granted(client: &kube::Client, namespace: &str, subject: &Value) {
    let user = format!(
        "system:serviceaccount:{}:{}",
        subject["namespace"].as_str().unwrap_or("default"),
        subject["name"].as_str().unwrap_or("session-router")
    );
    let review = json!({
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {"user": user, "resourceAttributes": {
            "namespace": namespace, "verb": "list", "group": "agones.dev", "resource": "gameservers"}},
    });
    for _ in 0..100 {
        let path = "/apis/authorization.k8s.io/v1/subjectaccessreviews";
        if let Ok(answer) = call(client, "POST", path, Some(&review)).await {
            if answer["status"]["allowed"] == json!(true) {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{user} was never granted the Role in {namespace}");
}

fn name_of(gs: &Value) -> &str {
    gs["metadata"]["name"].as_str().unwrap_or_default()
}

/// One Fleet on the real API server, in a namespace of its own (the waiting
/// line's Leases are named by user, so scenarios side by side on one cluster
/// need separate namespaces).
pub struct AgonesPlayer {
    pub namespace: String,
    client: kube::Client,
    sweeper: tokio::task::JoinHandle<()>,
}

impl Drop for AgonesPlayer {
    fn drop(&mut self) {
        self.sweeper.abort();
    }
}

impl AgonesPlayer {
    /// A new, empty Fleet in a new `namespace`, where the router's
    /// ServiceAccount gets the project's Role (copied from `default`, where
    /// the script applied it); deleted servers linger `linger`.
    pub async fn start(namespace: &str, linger: Duration) -> AgonesPlayer {
        allocation_service();
        let client = admin_client().await;
        let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}});
        call(&client, "POST", "/api/v1/namespaces", Some(&ns)).await.unwrap();
        let mut subject = Value::Null;
        for kind in ["roles", "rolebindings"] {
            let from = format!("/apis/rbac.authorization.k8s.io/v1/namespaces/default/{kind}/session-router");
            let mut object = call(&client, "GET", &from, None).await.unwrap();
            object["metadata"] = json!({"name": "session-router", "namespace": namespace,
                                        "labels": object["metadata"]["labels"]});
            let to = format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/{kind}");
            call(&client, "POST", &to, Some(&object)).await.unwrap();
            if let Some(first) = object["subjects"].get(0) {
                subject = first.clone();
            }
        }
        granted(&client, namespace, &subject).await;
        let sweeper = tokio::spawn(finalize_deleted(client.clone(), namespace.to_string(), linger));
        AgonesPlayer {
            namespace: namespace.to_string(),
            client,
            sweeper,
        }
    }

    fn path(&self, name: &str) -> String {
        format!("{}/{name}", gameservers(&self.namespace))
    }

    /// Creates GameServer `name` of the Fleet and moves it, state by
    /// captured state, to Ready at `upstream` (address and port `sd`).
    pub async fn add_ready(&self, name: &str, upstream: SocketAddr) {
        self.add_until(name, upstream, "Ready").await;
    }

    /// As [`AgonesPlayer::add_ready`], for a GameServer of `fleet`.
    pub async fn add_ready_in(&self, fleet: &str, name: &str, upstream: SocketAddr) {
        self.add_in_until(fleet, name, upstream, "Ready").await;
    }

    /// As [`AgonesPlayer::add_ready`], stopping at state `last`.
    pub async fn add_until(&self, name: &str, upstream: SocketAddr, last: &str) {
        self.add_in_until(FLEET, name, upstream, last).await;
    }

    async fn add_in_until(&self, fleet: &str, name: &str, upstream: SocketAddr, last: &str) {
        let template = capture("gameserver-state-PortAllocation.json");
        let mut labels = template["metadata"]["labels"].clone();
        labels["agones.dev/fleet"] = json!(fleet);
        labels["agones.dev/gameserverset"] = json!(format!("{fleet}-e2e"));
        // The stand-in pod listens on one port, which is both the PodIP's
        // container port and the node's host port here.
        let mut spec = template["spec"].clone();
        spec["ports"][0]["containerPort"] = json!(upstream.port());
        // No ownerReferences: there is no GameServerSet here, and the real
        // garbage collector would delete a GameServer whose owner is missing.
        let object = json!({
            "apiVersion": "agones.dev/v1",
            "kind": "GameServer",
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "labels": labels,
                "annotations": template["metadata"]["annotations"],
                "finalizers": [FINALIZER],
            },
            "spec": spec,
            "status": template["status"],
        });
        call(&self.client, "POST", &gameservers(&self.namespace), Some(&object))
            .await
            .unwrap_or_else(|e| panic!("creating GameServer {name}: {e}"));
        for state in ["Creating", "Starting", "Scheduled", "RequestReady", "Ready"] {
            let mut status = capture(&format!("gameserver-state-{state}.json"))["status"].clone();
            if !status["ports"].is_null() {
                status["address"] = json!(upstream.ip().to_string());
                status["addresses"] = json!([
                    {"address": upstream.ip().to_string(), "type": "InternalIP"},
                    {"address": upstream.ip().to_string(), "type": "ExternalIP"},
                    {"address": "e2e-node", "type": "Hostname"},
                    {"address": upstream.ip().to_string(), "type": "PodIP"},
                ]);
                status["nodeName"] = json!("e2e-node");
                status["ports"] = json!([{"name": "sd", "port": upstream.port()}]);
            }
            self.replace(name, |gs| gs["status"] = status.clone()).await;
            if state == last {
                break;
            }
        }
    }

    /// Reads, changes and writes back GameServer `name` with its
    /// resourceVersion (a conflict is retried), as Agones' controller does.
    async fn replace(&self, name: &str, change: impl Fn(&mut Value)) {
        let path = self.path(name);
        for _ in 0..20 {
            let mut gs = call(&self.client, "GET", &path, None).await.unwrap();
            change(&mut gs);
            match call(&self.client, "PUT", &path, Some(&gs)).await {
                Ok(_) => return,
                Err(kube::Error::Api(status)) if status.code == 409 => continue,
                Err(e) => panic!("updating {path}: {e}"),
            }
        }
        panic!("updating {path}: conflict after 20 tries");
    }

    /// The GameServer as the API server has it.
    pub async fn server(&self, name: &str) -> Option<Value> {
        let path = self.path(name);
        match call(&self.client, "GET", &path, None).await {
            Ok(gs) => Some(gs),
            Err(kube::Error::Api(status)) if status.code == 404 => None,
            Err(e) => panic!("GET {path}: {e}"),
        }
    }

    async fn servers(&self) -> Vec<Value> {
        list_fleet(&self.client, &self.namespace, &format!("agones.dev/fleet={FLEET}")).await
    }

    /// The (short) names of the Allocated, non-terminating GameServers
    /// labelled `user=<label>`.
    pub async fn held_by(&self, label: &str) -> Vec<String> {
        self.servers()
            .await
            .iter()
            .filter(|gs| {
                gs["status"]["state"] == "Allocated"
                    && gs["metadata"]["labels"]["user"] == label
                    && gs["metadata"]["deletionTimestamp"].is_null()
            })
            .map(|gs| name_of(gs).to_string())
            .collect()
    }

    /// The pod of `name` dies: Agones marks the GameServer Unhealthy and its
    /// GameServerSet deletes it (it then lingers like any deleted one).
    pub async fn kill_pod(&self, name: &str) {
        self.replace(name, |gs| gs["status"]["state"] = json!("Unhealthy"))
            .await;
        self.delete(name).await;
    }

    /// The Fleet scales down: `name` goes Shutdown and is deleted, and
    /// lingers terminating in state Shutdown (watch-gameservers.jsonl).
    pub async fn scale_down(&self, name: &str) {
        self.replace(name, |gs| gs["status"]["state"] = json!("Shutdown")).await;
        self.delete(name).await;
    }

    /// Deletes `name` as the router's release does (the finalizer keeps it).
    pub async fn delete(&self, name: &str) {
        call(&self.client, "DELETE", &self.path(name), None).await.unwrap();
    }

    /// Labels and annotates `name` as `metadata` says and makes it
    /// Allocated, as an allocation (by another replica) does.
    pub async fn allocate_with(&self, name: &str, metadata: &Value, allocated_at: SystemTime) {
        let metadata = metadata.clone();
        self.replace(name, move |gs| apply_allocation(gs, &metadata, allocated_at))
            .await;
    }

    /// Names of the waiting line's Leases of this Fleet, oldest first.
    pub async fn line(&self) -> Vec<String> {
        let path = format!(
            "/apis/coordination.k8s.io/v1/namespaces/{}/leases?labelSelector={}",
            self.namespace,
            urlencode(&format!("session-router.dev/line={FLEET}"))
        );
        let list = call(&self.client, "GET", &path, None).await.unwrap();
        let mut leases = list["items"].as_array().cloned().unwrap_or_default();
        leases.sort_by_key(|l| l["spec"]["acquireTime"].as_str().unwrap_or_default().to_string());
        leases.iter().map(|l| name_of(l).to_string()).collect()
    }

    /// How many allocations of this Fleet were asked for, through the API
    /// server and the allocator service together.
    pub fn allocations(&self) -> usize {
        allocation_counts()
            .lock()
            .unwrap()
            .get(&self.namespace)
            .copied()
            .unwrap_or(0)
    }

    /// The `[backend.agones]` lines of a router of `kind` on this Fleet:
    /// the router finds the API server through `KUBECONFIG` (its
    /// ServiceAccount's token), and the allocator service on loopback.
    pub fn backend_lines(&self) -> String {
        let pki = env("SESSION_ROUTER_E2E_PKI");
        format!(
            "fleet = \"{FLEET}\"\nnamespace = \"{namespace}\"\nallocator_url = \"https://{allocator}\"\n\
             allocator_ca_file = \"{pki}/allocator-ca.crt\"\n\
             allocator_client_cert_file = \"{pki}/allocator-client.crt\"\n\
             allocator_client_key_file = \"{pki}/allocator-client.key\"\n",
            namespace = self.namespace,
            allocator = allocation_service().allocator,
        )
    }
}

/// Agones' finalizer, played: a deleted GameServer in `namespace` loses its
/// finalizer `linger` after the player first saw it terminating.
async fn finalize_deleted(client: kube::Client, namespace: String, linger: Duration) {
    let mut seen: HashMap<String, Instant> = HashMap::new();
    loop {
        for gs in list_fleet(&client, &namespace, &format!("agones.dev/fleet={FLEET}")).await {
            if gs["metadata"]["deletionTimestamp"].is_null() {
                continue;
            }
            let name = name_of(&gs).to_string();
            let since = *seen.entry(name.clone()).or_insert_with(Instant::now);
            if since.elapsed() >= linger {
                let path = format!("{}/{name}", gameservers(&namespace));
                let _ = call(
                    &client,
                    "PATCH",
                    &path,
                    Some(&json!({"metadata": {"finalizers": null}})),
                )
                .await;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What an allocation does to the GameServer: the request's labels and
/// annotations, `agones.dev/last-allocated` in nanoseconds, state Allocated.
fn apply_allocation(gs: &mut Value, metadata: &Value, at: SystemTime) {
    for key in ["labels", "annotations"] {
        if gs["metadata"][key].is_null() {
            gs["metadata"][key] = json!({});
        }
        if let Some(extra) = metadata[key].as_object() {
            for (k, v) in extra {
                gs["metadata"][key][k] = v.clone();
            }
        }
    }
    gs["metadata"]["annotations"]["agones.dev/last-allocated"] = json!(humantime::format_rfc3339_nanos(at).to_string());
    gs["status"]["state"] = json!("Allocated");
}

// === the allocation service (one per test process) ===

/// The listeners of the allocation API: behind the API server's APIService
/// (in the script's network namespace) and the agones-allocator service.
pub struct AllocationService {
    pub allocator: SocketAddr,
}

fn allocation_counts() -> &'static Mutex<HashMap<String, usize>> {
    static COUNTS: OnceLock<Mutex<HashMap<String, usize>>> = OnceLock::new();
    COUNTS.get_or_init(Default::default)
}

/// Starts the allocation service once, on a thread and runtime of its own
/// (each test has its own runtime, and the APIService's address is fixed).
pub fn allocation_service() -> &'static AllocationService {
    static SERVICE: OnceLock<AllocationService> = OnceLock::new();
    SERVICE.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let pki = env("SESSION_ROUTER_E2E_PKI");
                let aggregated_addr: SocketAddr = env("SESSION_ROUTER_E2E_AGGREGATED_ADDR").parse().unwrap();
                let netns = env("SESSION_ROUTER_E2E_NETNS");
                let aggregated = tls::listener(
                    tls::bind_in_netns(&netns, aggregated_addr),
                    &format!("{pki}/aggregated"),
                    None,
                );
                let allocator = tls::listener(
                    std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
                    &format!("{pki}/allocator"),
                    Some(&format!("{pki}/allocator-ca.crt")),
                );
                let allocator_addr = allocator.local_addr();
                let client = admin_client().await;
                let app = Router::new()
                    .route("/apis", get(api_group_list))
                    .route("/apis/allocation.agones.dev", get(api_group))
                    .route("/apis/allocation.agones.dev/v1", get(api_resource_list))
                    .route(
                        "/apis/allocation.agones.dev/v1/namespaces/{ns}/gameserverallocations",
                        post(kubernetes_allocation),
                    )
                    .route("/gameserverallocation", post(service_allocation))
                    .with_state(client);
                let aggregated_app = app.clone();
                let a = tokio::spawn(async move { axum::serve(aggregated, aggregated_app).await });
                wait_until_available(&admin_client().await).await;
                tx.send(allocator_addr).unwrap();
                let _ = axum::serve(allocator, app).await;
                let _ = a.await;
            });
        });
        AllocationService {
            allocator: rx.recv().expect("the allocation service starts"),
        }
    })
}

/// The API server answers 503 for the allocation API until its availability
/// check has reached this listener; the scenarios start after that.
async fn wait_until_available(client: &kube::Client) {
    let path = "/apis/apiregistration.k8s.io/v1/apiservices/v1.allocation.agones.dev";
    for _ in 0..600 {
        let service = call(client, "GET", path, None).await.unwrap();
        let conditions = service["status"]["conditions"].as_array().cloned().unwrap_or_default();
        if conditions
            .iter()
            .any(|c| c["type"] == "Available" && c["status"] == "True")
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the APIService v1.allocation.agones.dev never became Available");
}

async fn api_group_list() -> Json<Value> {
    Json(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [group()]}))
}

async fn api_group() -> Json<Value> {
    let mut g = group();
    g["kind"] = json!("APIGroup");
    g["apiVersion"] = json!("v1");
    Json(g)
}

fn group() -> Value {
    let version = json!({"groupVersion": "allocation.agones.dev/v1", "version": "v1"});
    json!({"name": "allocation.agones.dev", "versions": [version], "preferredVersion": version})
}

async fn api_resource_list() -> Json<Value> {
    Json(json!({
        "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "allocation.agones.dev/v1",
        "resources": [{"name": "gameserverallocations", "singularName": "gameserverallocation",
                       "namespaced": true, "kind": "GameServerAllocation", "verbs": ["create"]}],
    }))
}

/// Tries the selectors in order (state and labels), each over its matching
/// non-terminating GameServers in name order; applies the allocation to the
/// first it can update.
async fn allocate(client: &kube::Client, namespace: &str, selectors: &[Value], metadata: &Value) -> Option<Value> {
    *allocation_counts()
        .lock()
        .unwrap()
        .entry(namespace.to_string())
        .or_default() += 1;
    for selector in selectors {
        let state = selector["gameServerState"].as_str().unwrap_or("Ready");
        let labels: Vec<String> = selector["matchLabels"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                    .collect()
            })
            .unwrap_or_default();
        let mut candidates: Vec<Value> = list_fleet(client, namespace, &labels.join(","))
            .await
            .into_iter()
            .filter(|gs| {
                gs["status"]["state"]
                    .as_str()
                    .is_some_and(|s| s.eq_ignore_ascii_case(state))
                    && gs["metadata"]["deletionTimestamp"].is_null()
            })
            .collect();
        candidates.sort_by(|a, b| name_of(a).cmp(name_of(b)));
        for mut gs in candidates {
            apply_allocation(&mut gs, metadata, SystemTime::now());
            let path = format!("{}/{}", gameservers(namespace), name_of(&gs));
            if let Ok(updated) = call(client, "PUT", &path, Some(&gs)).await {
                return Some(updated);
            }
        }
    }
    None
}

/// The allocation's result fields, as both APIs report them.
fn result_of(gs: &Value) -> Value {
    json!({
        "gameServerName": name_of(gs),
        "ports": gs["status"]["ports"],
        "address": gs["status"]["address"],
        "addresses": gs["status"]["addresses"],
        "nodeName": gs["status"]["nodeName"],
        "source": "local",
        "metadata": {"labels": gs["metadata"]["labels"], "annotations": gs["metadata"]["annotations"]},
    })
}

/// `POST …/gameserverallocations` as Agones' extension API server answers
/// it: 201 whether or not anything was allocated (allocation-*.json).
async fn kubernetes_allocation(
    State(client): State<kube::Client>,
    Path(ns): Path<String>,
    Json(request): Json<Value>,
) -> Response {
    let spec = &request["spec"];
    let selectors = spec["selectors"].as_array().cloned().unwrap_or_default();
    let allocated = allocate(&client, &ns, &selectors, &spec["metadata"]).await;
    let mut echoed = spec.clone();
    echoed["multiClusterSetting"] = json!({"policySelector": {}});
    echoed["required"] = json!({});
    let created = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let (metadata, status) = match &allocated {
        Some(gs) => {
            let mut status = result_of(gs);
            status["state"] = json!("Allocated");
            (
                json!({"name": name_of(gs), "namespace": ns, "creationTimestamp": created}),
                status,
            )
        }
        None => (
            json!({"namespace": ns, "creationTimestamp": created}),
            json!({"state": "UnAllocated", "gameServerName": "", "source": ""}),
        ),
    };
    let body = json!({
        "kind": "GameServerAllocation", "apiVersion": "allocation.agones.dev/v1",
        "metadata": metadata, "spec": echoed, "status": status,
    });
    (StatusCode::CREATED, Json(body)).into_response()
}

/// The agones-allocator service's REST API: 200 with the result, 429 with
/// gRPC code 8 when nothing matched, 400 with code 3 for a bad body
/// (allocator-rest-*.json).
async fn service_allocation(State(client): State<kube::Client>, body: axum::body::Bytes) -> Response {
    let request: Value = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => {
            let body = json!({"code": 3, "message": e.to_string(), "details": []});
            return (StatusCode::BAD_REQUEST, Json(body)).into_response();
        }
    };
    let selectors = request["gameServerSelectors"].as_array().cloned().unwrap_or_default();
    let namespace = request["namespace"].as_str().unwrap_or("default");
    match allocate(&client, namespace, &selectors, &request["metadata"]).await {
        Some(gs) => {
            let mut body = result_of(&gs);
            body["counters"] = json!({});
            body["lists"] = json!({});
            Json(body).into_response()
        }
        None => {
            let body = json!({"code": 8, "message": "there is no available GameServer to allocate", "details": []});
            (StatusCode::TOO_MANY_REQUESTS, Json(body)).into_response()
        }
    }
}

/// TLS listeners for axum, from the script's PEM files.
mod tls {
    use std::net::SocketAddr;
    use std::os::fd::AsRawFd;
    use std::sync::Arc;

    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::server::TlsStream;
    use tokio_rustls::TlsAcceptor;

    /// Binds `addr` inside network namespace `netns`: a socket stays in the
    /// namespace it was made in, so a short-lived thread enters it, binds
    /// and hands the listener back.
    pub fn bind_in_netns(netns: &str, addr: SocketAddr) -> std::net::TcpListener {
        let path = format!("/var/run/netns/{netns}");
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: setns only changes this thread's network namespace; the
            // thread ends right after binding.
            let entered = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(entered, 0, "setns {path}: {}", std::io::Error::last_os_error());
            std::net::TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr} in {path}: {e}"))
        })
        .join()
        .unwrap()
    }

    /// A TLS listener serving `<stem>.crt`/`<stem>.key`; with `client_ca`,
    /// it demands a client certificate signed by it (mutual TLS).
    pub fn listener(tcp: std::net::TcpListener, stem: &str, client_ca: Option<&str>) -> Tls {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(format!("{stem}.crt"))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let key = PrivateKeyDer::from_pem_file(format!("{stem}.key")).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_file_iter(ca).unwrap() {
                    roots.add(cert.unwrap()).unwrap();
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(certs, key).unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        tcp.set_nonblocking(true).unwrap();
        Tls {
            tcp: TcpListener::from_std(tcp).unwrap(),
            acceptor: TlsAcceptor::from(Arc::new(config)),
        }
    }

    pub struct Tls {
        tcp: TcpListener,
        acceptor: TlsAcceptor,
    }

    impl Tls {
        pub fn local_addr(&self) -> SocketAddr {
            self.tcp.local_addr().unwrap()
        }
    }

    impl axum::serve::Listener for Tls {
        type Io = TlsStream<TcpStream>;
        type Addr = SocketAddr;

        /// A failed handshake (a client without a certificate) is dropped;
        /// the next connection is accepted.
        async fn accept(&mut self) -> (Self::Io, Self::Addr) {
            loop {
                let Ok((tcp, addr)) = self.tcp.accept().await else {
                    continue;
                };
                if let Ok(stream) = self.acceptor.accept(tcp).await {
                    return (stream, addr);
                }
            }
        }

        fn local_addr(&self) -> std::io::Result<Self::Addr> {
            self.tcp.local_addr()
        }
    }
}

/// The user labels the router gives `email` (`user`, the hash label) and
/// its email annotation: what another replica's allocation writes.
pub fn router_metadata(email: &str) -> Value {
    use session_router::allocator::agones::{label, USER_HASH_LABEL};
    json!({
        "labels": {"user": label::user_label_value(email), USER_HASH_LABEL: label::user_hash(email)},
        "annotations": {"session-router.dev/email": email},
    })
}

/// The legacy front end's allocation: the user label only.
pub fn legacy_metadata(email: &str) -> Value {
    use session_router::allocator::agones::label;
    json!({"labels": {"user": label::user_label_value(email)}, "annotations": {}})
}
