//! A minimal Kubernetes API server over real HTTP for one Service's
//! `discovery.k8s.io/v1` EndpointSlices: LIST (label selector honoured)
//! and WATCH (newline-delimited events from a `resourceVersion`). Slices
//! are shaped like the API server's, `null` fields included. Every call is
//! recorded, so a test can show the router never writes.
//!
//! Each stand-in pod gets a slice of its own: a slice carries one port, and
//! every stand-in listens on a port of its own.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::Method;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use super::DemoPod;

pub const NAMESPACE: &str = "models";
pub const SERVICE: &str = "sd15";
const SELECTOR: &str = "kubernetes.io/service-name=sd15";

#[derive(Default)]
struct Inner {
    slices: BTreeMap<String, Value>,
    /// Every change: (resourceVersion, ADDED/MODIFIED/DELETED, object).
    log: Vec<(u64, &'static str, Value)>,
    /// `METHOD path?query` of every request.
    calls: Vec<String>,
}

struct World {
    inner: Mutex<Inner>,
    /// The latest resourceVersion; open watches wait on it.
    rv: tokio::sync::watch::Sender<u64>,
}

pub struct FakeEndpoints {
    addr: SocketAddr,
    world: Arc<World>,
    task: tokio::task::JoinHandle<()>,
}

/// How a stand-in pod's endpoint reports itself.
#[derive(Clone, Copy)]
pub enum Condition {
    Ready,
    NotReady,
    Terminating,
}

impl FakeEndpoints {
    pub async fn start() -> FakeEndpoints {
        let world = Arc::new(World {
            inner: Mutex::new(Inner::default()),
            rv: tokio::sync::watch::channel(1).0,
        });
        let app = Router::new()
            .route(
                "/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices",
                get(list_or_watch),
            )
            .fallback(|| async { axum::http::StatusCode::NOT_FOUND })
            .layer(axum::middleware::from_fn_with_state(world.clone(), record))
            .with_state(world.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeEndpoints { addr, world, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Creates or updates `pod`'s slice with its endpoint in `condition`.
    pub fn set(&self, pod: &DemoPod, condition: Condition) {
        let (ready, terminating) = match condition {
            Condition::Ready => (Value::Bool(true), false),
            // As the API server writes a pod whose readiness probe fails.
            Condition::NotReady => (Value::Bool(false), false),
            Condition::Terminating => (Value::Bool(false), true),
        };
        let endpoint = json!({
            "addresses": [pod.addr.ip().to_string()],
            "conditions": {"ready": ready, "serving": ready, "terminating": terminating},
            "targetRef": {"kind": "Pod", "namespace": NAMESPACE, "name": pod.name, "uid": format!("uid-{}", pod.name)},
            "nodeName": "gpu-node-1",
            "zone": null,
            "hints": null,
            "deprecatedTopology": null,
        });
        self.put(pod, json!([endpoint]));
    }

    /// Empties `pod`'s slice as the API server does when its last endpoint
    /// goes: `endpoints: null`.
    pub fn empty(&self, pod: &DemoPod) {
        self.put(pod, Value::Null);
    }

    /// Deletes `pod`'s slice.
    pub fn delete(&self, pod: &DemoPod) {
        let mut inner = self.world.inner.lock().unwrap();
        let name = slice_name(pod);
        if let Some(slice) = inner.slices.remove(&name) {
            self.log(&mut inner, "DELETED", slice);
        }
    }

    /// `METHOD path?query` of every request so far.
    pub fn calls(&self) -> Vec<String> {
        self.world.inner.lock().unwrap().calls.clone()
    }

    fn put(&self, pod: &DemoPod, endpoints: Value) {
        let mut inner = self.world.inner.lock().unwrap();
        let name = slice_name(pod);
        let kind = if inner.slices.contains_key(&name) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let slice = json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": name,
                "namespace": NAMESPACE,
                "generateName": format!("{SERVICE}-"),
                "labels": {"kubernetes.io/service-name": SERVICE, "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
                "annotations": null,
                "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": SERVICE, "uid": "svc-uid", "controller": true, "blockOwnerDeletion": true}],
            },
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": [{"name": "http", "port": pod.addr.port(), "protocol": "TCP", "appProtocol": null}],
        });
        inner.slices.insert(name, slice.clone());
        self.log(&mut inner, kind, slice);
    }

    fn log(&self, inner: &mut Inner, kind: &'static str, mut object: Value) {
        let rv = *self.world.rv.borrow() + 1;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        if let Some(slice) = object["metadata"]["name"]
            .as_str()
            .and_then(|n| inner.slices.get_mut(n))
        {
            slice["metadata"]["resourceVersion"] = json!(rv.to_string());
        }
        inner.log.push((rv, kind, object));
        self.world.rv.send_replace(rv);
    }
}

impl Drop for FakeEndpoints {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn slice_name(pod: &DemoPod) -> String {
    format!("{SERVICE}-{}", pod.name)
}

async fn record(
    State(world): State<Arc<World>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let target = request.uri().path_and_query().map_or("", |p| p.as_str()).to_string();
    world
        .inner
        .lock()
        .unwrap()
        .calls
        .push(format!("{} {target}", request.method()));
    if request.method() != Method::GET {
        return axum::http::StatusCode::METHOD_NOT_ALLOWED.into_response();
    }
    next.run(request).await
}

async fn list_or_watch(
    State(world): State<Arc<World>>,
    Path(ns): Path<String>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Response {
    // Another namespace or selector sees nothing, as on a real cluster.
    let in_scope = ns == NAMESPACE && query.get("labelSelector").map(String::as_str) == Some(SELECTOR);
    if !matches!(query.get("watch").map(String::as_str), Some("true" | "1")) {
        let inner = world.inner.lock().unwrap();
        let items: Vec<Value> = if in_scope {
            inner.slices.values().cloned().collect()
        } else {
            Vec::new()
        };
        return axum::Json(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSliceList",
            "metadata": {"resourceVersion": world.rv.borrow().to_string(), "continue": null},
            "items": items,
        }))
        .into_response();
    }
    let since: u64 = query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
    let timeout = Duration::from_secs(query.get("timeoutSeconds").and_then(|v| v.parse().ok()).unwrap_or(290));
    let mut changes = world.rv.subscribe();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(64);
    tokio::spawn(async move {
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut last = since;
        loop {
            // Seen before reading the log: a change after this wakes us.
            changes.borrow_and_update();
            let lines: Vec<Bytes> = {
                let inner = world.inner.lock().unwrap();
                let new: Vec<_> = inner.log.iter().filter(|(rv, _, _)| *rv > last).collect();
                last = new.last().map_or(last, |(rv, _, _)| *rv);
                new.iter()
                    .filter(|_| in_scope)
                    .map(|(_, kind, object)| Bytes::from(format!("{}\n", json!({"type": kind, "object": object}))))
                    .collect()
            };
            for line in lines {
                if tx.send(Ok(line)).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                _ = &mut deadline => return,
                changed = changes.changed() => if changed.is_err() { return },
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap()
}
