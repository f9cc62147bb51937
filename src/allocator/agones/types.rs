//! The Agones wire types session-router reads and writes: only the fields it
//! uses, tolerant of everything else (Agones 1.30 through 1.56 differ in
//! optional fields such as `status.addresses`).

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::NamespaceResourceScope;
use serde::{Deserialize, Serialize};

/// `agones.dev/v1` GameServer.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct GameServer {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: GameServerSpec,
    #[serde(default)]
    pub status: Option<GameServerStatus>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct GameServerSpec {
    #[serde(default)]
    pub ports: Vec<SpecPort>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SpecPort {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub container_port: Option<u16>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GameServerStatus {
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub addresses: Vec<NodeAddress>,
    #[serde(default)]
    pub ports: Vec<StatusPort>,
    #[serde(default)]
    pub node_name: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct NodeAddress {
    #[serde(rename = "type")]
    pub kind: String,
    pub address: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct StatusPort {
    #[serde(default)]
    pub name: String,
    pub port: u16,
}

impl kube::Resource for GameServer {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "GameServer".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "agones.dev".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "gameservers".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl GameServer {
    pub fn state(&self) -> &str {
        self.status.as_ref().map_or("", |s| s.state.as_str())
    }

    pub fn label(&self, key: &str) -> Option<&str> {
        self.metadata.labels.as_ref()?.get(key).map(String::as_str)
    }

    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.metadata.annotations.as_ref()?.get(key).map(String::as_str)
    }

    pub fn name(&self) -> &str {
        self.metadata.name.as_deref().unwrap_or("")
    }
}

/// `allocation.agones.dev/v1` GameServerAllocation: create-only.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct GameServerAllocation {
    #[serde(rename = "apiVersion", default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: AllocationSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<AllocationStatus>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct AllocationSpec {
    #[serde(default)]
    pub selectors: Vec<Selector>,
    #[serde(default)]
    pub scheduling: String,
    #[serde(default)]
    pub metadata: AllocationMetadata,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Selector {
    pub game_server_state: String,
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct AllocationMetadata {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// The result of an allocation, as both the Kubernetes API (`status`) and
/// the allocator service (the whole body) report it.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AllocationStatus {
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub game_server_name: String,
    #[serde(default)]
    pub ports: Vec<StatusPort>,
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub addresses: Vec<NodeAddress>,
    #[serde(default)]
    pub node_name: String,
}

impl kube::Resource for GameServerAllocation {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "GameServerAllocation".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "allocation.agones.dev".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "gameserverallocations".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The allocator service's REST request (grpc-gateway JSON of
/// `AllocationRequest`). Its state enum is spelled `READY` / `ALLOCATED`.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AllocatorServiceRequest {
    pub namespace: String,
    pub game_server_selectors: Vec<Selector>,
    pub scheduling: String,
    pub metadata: AllocationMetadata,
}

/// The allocator service's error body (`google.rpc.Status`).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct RpcStatus {
    #[serde(default)]
    pub code: i32,
    #[serde(default)]
    pub message: String,
}
