//! "The cluster" the scenarios of tests/k8s_e2e.rs run against, written
//! once: the in-process fake ([`FakeCluster`], over fake_agones.rs's public
//! API) or a real Kubernetes API server with Agones played by the harness
//! ([`RealCluster`], agones_player.rs). Names are the scenario's short names
//! (`gs-1`); the real cluster puts its Fleet's name before them.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use serde_json::Value;

use crate::agones_player::{legacy_metadata, router_metadata, AgonesPlayer};
use crate::support::fake_agones::{self, FakeAgones};

#[async_trait]
pub trait Cluster: Send + Sync {
    /// The `[backend.agones]` lines that point a router at this cluster.
    fn backend_lines(&self) -> String;
    /// The name of the cluster's Fleet (other Fleets are named after it).
    fn fleet(&self) -> String;
    /// Adds a Ready GameServer of `fleet` whose port `sd` is `upstream`.
    async fn add_ready_in(&self, fleet: &str, name: &str, upstream: SocketAddr);
    /// Adds a Ready GameServer of the Fleet whose port `sd` is `upstream`.
    async fn add_ready(&self, name: &str, upstream: SocketAddr) {
        self.add_ready_in(&self.fleet(), name, upstream).await;
    }
    /// Adds a GameServer whose pod is never scheduled (no free GPU node):
    /// it stays in Starting.
    async fn add_unscheduled(&self, name: &str, upstream: SocketAddr);
    /// The GameServer as the API has it (a terminating one too).
    async fn server(&self, name: &str) -> Option<Value>;
    /// Allocated, non-terminating GameServers labelled `user=<label>`.
    async fn held_by(&self, label: &str) -> Vec<String>;
    /// Its pod dies, or someone deletes it: Agones deletes the GameServer.
    async fn kill_pod(&self, name: &str);
    /// The Fleet scales down: `name` goes Shutdown, then is deleted.
    async fn scale_down(&self, name: &str);
    /// The API server drops every open connection: watches must resume.
    async fn drop_connections(&self);
    /// Another replica allocated `name` to `email`.
    async fn allocate_directly(&self, name: &str, email: &str);
    /// The original front end allocated `name` to `email` at `at`.
    async fn allocate_legacy(&self, name: &str, email: &str, at: SystemTime);
    /// `name` became Allocated at `at` without any user label (another
    /// tool's allocation).
    async fn allocate_unlabelled(&self, name: &str, at: SystemTime);
    /// The waiting line's Leases, oldest first.
    async fn line(&self) -> Vec<String>;
    /// Allocation requests that reached Agones so far.
    async fn allocations(&self) -> usize;

    /// Whether `name` was released: deleted, or terminating (a real
    /// GameServer lingers until its pod is gone).
    async fn released(&self, name: &str) -> bool {
        match self.server(name).await {
            None => true,
            Some(gs) => !gs["metadata"]["deletionTimestamp"].is_null(),
        }
    }
}

/// The in-process fake Agones.
pub struct FakeCluster(pub FakeAgones);

impl FakeCluster {
    pub async fn start() -> FakeCluster {
        FakeCluster(FakeAgones::start().await)
    }
}

#[async_trait]
impl Cluster for FakeCluster {
    fn backend_lines(&self) -> String {
        format!(
            "fleet = \"{}\"\nnamespace = \"{}\"\nkube_api_url = \"{url}\"\nallocator_url = \"{url}\"\n",
            fake_agones::FLEET,
            fake_agones::NAMESPACE,
            url = self.0.url()
        )
    }

    fn fleet(&self) -> String {
        fake_agones::FLEET.to_string()
    }

    async fn add_ready_in(&self, fleet: &str, name: &str, upstream: SocketAddr) {
        self.0.add_ready_in(fleet, name, upstream);
    }

    /// The fake has no `null` ports: its Starting server keeps them.
    async fn add_unscheduled(&self, name: &str, upstream: SocketAddr) {
        self.0.add_ready(name, upstream);
        self.0.set_state(name, "Starting");
    }

    async fn server(&self, name: &str) -> Option<Value> {
        self.0.server(name)
    }

    async fn held_by(&self, label: &str) -> Vec<String> {
        self.0.held_by(label)
    }

    async fn kill_pod(&self, name: &str) {
        self.0.remove(name);
    }

    /// The fake's nearest: an instant outage, which ends open watches.
    async fn drop_connections(&self) {
        self.0.set_down(true);
        self.0.set_down(false);
    }

    async fn scale_down(&self, name: &str) {
        self.0.set_state(name, "Shutdown");
        self.0.remove(name);
    }

    async fn allocate_directly(&self, name: &str, email: &str) {
        self.0.allocate_directly(name, email);
    }

    async fn allocate_legacy(&self, name: &str, email: &str, at: SystemTime) {
        self.0.allocate_legacy(name, email, at);
    }

    async fn allocate_unlabelled(&self, name: &str, at: SystemTime) {
        self.0.set_state(name, "Allocated");
        let at = humantime::format_rfc3339_nanos(at).to_string();
        self.0.annotate(name, "agones.dev/last-allocated", &at);
    }

    async fn line(&self) -> Vec<String> {
        self.0.line()
    }

    async fn allocations(&self) -> usize {
        let calls = self.0.calls();
        calls.iter().filter(|c| c.contains("gameserverallocation")).count()
    }
}

/// A real API server with Agones played by [`AgonesPlayer`].
pub struct RealCluster(pub AgonesPlayer);

impl RealCluster {
    /// A Fleet in a namespace of its own; deleted servers linger 2 s (a
    /// real WebUI pod's grace period is 30 s: 2 s is long enough to be seen).
    pub async fn start(namespace: &str) -> RealCluster {
        RealCluster(AgonesPlayer::start(namespace, Duration::from_secs(2)).await)
    }
}

#[async_trait]
impl Cluster for RealCluster {
    fn backend_lines(&self) -> String {
        self.0.backend_lines()
    }

    fn fleet(&self) -> String {
        crate::agones_player::FLEET.to_string()
    }

    async fn add_ready_in(&self, fleet: &str, name: &str, upstream: SocketAddr) {
        self.0.add_ready_in(fleet, name, upstream).await;
    }

    async fn add_unscheduled(&self, name: &str, upstream: SocketAddr) {
        self.0.add_until(name, upstream, "Starting").await;
    }

    async fn server(&self, name: &str) -> Option<Value> {
        self.0.server(name).await
    }

    async fn held_by(&self, label: &str) -> Vec<String> {
        self.0.held_by(label).await
    }

    async fn kill_pod(&self, name: &str) {
        self.0.kill_pod(name).await;
    }

    async fn drop_connections(&self) {
        crate::agones_player::drop_api_server_connections();
    }

    async fn scale_down(&self, name: &str) {
        self.0.scale_down(name).await;
    }

    async fn allocate_directly(&self, name: &str, email: &str) {
        self.0
            .allocate_with(name, &router_metadata(email), SystemTime::now())
            .await;
    }

    async fn allocate_legacy(&self, name: &str, email: &str, at: SystemTime) {
        self.0.allocate_with(name, &legacy_metadata(email), at).await;
    }

    async fn allocate_unlabelled(&self, name: &str, at: SystemTime) {
        let nothing = serde_json::json!({"labels": {}, "annotations": {}});
        self.0.allocate_with(name, &nothing, at).await;
    }

    async fn line(&self) -> Vec<String> {
        self.0.line().await
    }

    async fn allocations(&self) -> usize {
        self.0.allocations()
    }
}
