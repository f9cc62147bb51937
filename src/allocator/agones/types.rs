//! The Agones wire types session-router reads and writes: only the fields it
//! uses, tolerant of everything else. Every field read accepts `null`,
//! absence and values it does not know (Agones sends `status.ports` and
//! `status.addresses` as `null` until a GameServer is Scheduled; versions
//! differ in optional fields such as `status.addresses`), and a GameServer
//! that still cannot be understood decodes anyway, marked
//! [`GameServer::undecodable`]: one odd object must never fail a whole list
//! or watch (a list is decoded in one piece).

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::NamespaceResourceScope;
use serde::{Deserialize, Deserializer, Serialize};

/// What [`GameServer::state`] says of a GameServer being deleted: it carries
/// `metadata.deletionTimestamp` and stays, its Agones state unchanged, only
/// until its finalizer is removed (its pod gone). It is gone for every
/// purpose: nobody is routed to it, it counts as nobody's and as no capacity.
pub const TERMINATING: &str = "Terminating";

/// Reads `null` as the type's default, like an absent field.
fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Option::<T>::deserialize(d).map(Option::unwrap_or_default)
}

/// `agones.dev/v1` GameServer. Decoding never fails (see the module doc).
#[derive(Clone, Debug, Default, Serialize)]
pub struct GameServer {
    pub metadata: ObjectMeta,
    pub spec: GameServerSpec,
    pub status: Option<GameServerStatus>,
    /// Why the object could not be understood, if it could not. It then
    /// keeps only what its metadata could give and has no state: it is
    /// nobody's and no capacity, and names itself in the log.
    #[serde(skip)]
    pub undecodable: Option<String>,
}

/// The strict shape of a GameServer, lenient in every field.
#[derive(Deserialize)]
struct WireGameServer {
    #[serde(default, deserialize_with = "nullable")]
    metadata: ObjectMeta,
    #[serde(default, deserialize_with = "nullable")]
    spec: GameServerSpec,
    #[serde(default)]
    status: Option<GameServerStatus>,
}

impl<'de> Deserialize<'de> for GameServer {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(GameServer::from_value(serde_json::Value::deserialize(d)?))
    }
}

impl GameServer {
    /// The GameServer `value` describes, or what can be told of it.
    pub fn from_value(value: serde_json::Value) -> GameServer {
        let metadata = value.get("metadata").cloned();
        match serde_json::from_value::<WireGameServer>(value) {
            Ok(wire) => GameServer {
                metadata: wire.metadata,
                spec: wire.spec,
                status: wire.status,
                undecodable: None,
            },
            Err(e) => GameServer {
                metadata: metadata.map(lenient_metadata).unwrap_or_default(),
                undecodable: Some(e.to_string()),
                ..GameServer::default()
            },
        }
    }
}

/// The metadata, or at least its name, namespace and resourceVersion (what
/// the cache keys and the watch resumes on).
fn lenient_metadata(value: serde_json::Value) -> ObjectMeta {
    let text = |key: &str| value.get(key).and_then(|v| v.as_str()).map(str::to_string);
    let fallback = ObjectMeta {
        name: text("name"),
        namespace: text("namespace"),
        resource_version: text("resourceVersion"),
        ..ObjectMeta::default()
    };
    serde_json::from_value(value).unwrap_or(fallback)
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct GameServerSpec {
    #[serde(default, deserialize_with = "nullable")]
    pub ports: Vec<SpecPort>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SpecPort {
    #[serde(default, deserialize_with = "nullable")]
    pub name: String,
    #[serde(default)]
    pub container_port: Option<u16>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GameServerStatus {
    #[serde(default, deserialize_with = "nullable")]
    pub state: String,
    #[serde(default, deserialize_with = "nullable")]
    pub address: String,
    #[serde(default, deserialize_with = "nullable")]
    pub addresses: Vec<NodeAddress>,
    #[serde(default, deserialize_with = "nullable")]
    pub ports: Vec<StatusPort>,
    #[serde(default, deserialize_with = "nullable")]
    pub node_name: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct NodeAddress {
    #[serde(rename = "type", default, deserialize_with = "nullable")]
    pub kind: String,
    #[serde(default, deserialize_with = "nullable")]
    pub address: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct StatusPort {
    #[serde(default, deserialize_with = "nullable")]
    pub name: String,
    #[serde(default, deserialize_with = "nullable")]
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
    /// The Agones state (`Ready`, `Allocated`, … or one this code does not
    /// know), [`TERMINATING`] once the GameServer is being deleted, and
    /// empty when unknown.
    pub fn state(&self) -> &str {
        if self.is_terminating() {
            return TERMINATING;
        }
        self.status.as_ref().map_or("", |s| s.state.as_str())
    }

    /// Whether a DELETE has been accepted and only a finalizer keeps it.
    pub fn is_terminating(&self) -> bool {
        self.metadata.deletion_timestamp.is_some()
    }

    /// The state Agones reports, whether or not it is being deleted.
    pub fn agones_state(&self) -> &str {
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
    #[serde(rename = "apiVersion", default, deserialize_with = "nullable")]
    pub api_version: String,
    #[serde(default, deserialize_with = "nullable")]
    pub kind: String,
    #[serde(default, deserialize_with = "nullable")]
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "nullable")]
    pub spec: AllocationSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<AllocationStatus>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct AllocationSpec {
    #[serde(default, deserialize_with = "nullable")]
    pub selectors: Vec<Selector>,
    #[serde(default, deserialize_with = "nullable")]
    pub scheduling: String,
    #[serde(default, deserialize_with = "nullable")]
    pub metadata: AllocationMetadata,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Selector {
    #[serde(default, deserialize_with = "nullable")]
    pub game_server_state: String,
    #[serde(default, deserialize_with = "nullable")]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct AllocationMetadata {
    #[serde(default, deserialize_with = "nullable")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "nullable")]
    pub annotations: BTreeMap<String, String>,
}

/// The result of an allocation, as both the Kubernetes API (`status`) and
/// the allocator service (the whole body) report it.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AllocationStatus {
    #[serde(default, deserialize_with = "nullable")]
    pub state: String,
    #[serde(default, deserialize_with = "nullable")]
    pub game_server_name: String,
    #[serde(default, deserialize_with = "nullable")]
    pub ports: Vec<StatusPort>,
    #[serde(default, deserialize_with = "nullable")]
    pub address: String,
    #[serde(default, deserialize_with = "nullable")]
    pub addresses: Vec<NodeAddress>,
    #[serde(default, deserialize_with = "nullable")]
    pub node_name: String,
    /// The cluster that placed it: `local` (both APIs say so), or with
    /// multi-cluster allocation another cluster's name.
    #[serde(default, deserialize_with = "nullable")]
    pub source: String,
}

impl AllocationStatus {
    /// The other cluster the server was placed in, if not this one.
    pub fn remote_cluster(&self) -> Option<&str> {
        Some(self.source.as_str()).filter(|source| !source.is_empty() && *source != "local")
    }
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
    /// Set: Agones' allocator may place the user in another cluster, as
    /// its GameServerAllocationPolicy says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multi_cluster_setting: Option<MultiClusterSetting>,
}

/// `multiClusterSetting` of an allocation request.
#[derive(Clone, Debug, Serialize)]
pub struct MultiClusterSetting {
    pub enabled: bool,
}

/// The allocator service's error body (`google.rpc.Status`).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct RpcStatus {
    #[serde(default, deserialize_with = "nullable")]
    pub code: i32,
    #[serde(default, deserialize_with = "nullable")]
    pub message: String,
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use k8s_openapi::api::coordination::v1::Lease;
    use kube::core::{ObjectList, Status, WatchEvent};
    use serde::de::DeserializeOwned;
    use serde_json::{json, Value};

    use super::*;

    /// What a real Kubernetes v1.34 + Agones 1.57 cluster sent (see the
    /// README there): beside the repository, as in CI's checkout.
    fn captures() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/reference/agones-captures")
    }

    fn decode<T: DeserializeOwned>(file: &str, text: &str) -> T {
        serde_json::from_str(text).unwrap_or_else(|e| panic!("{file} does not decode: {e}"))
    }

    /// A GameServer from a capture must be understood, not merely skipped.
    fn understood(file: &str, gs: &GameServer) {
        assert!(gs.undecodable.is_none(), "{file}: {:?}", gs.undecodable);
        assert!(!gs.name().is_empty(), "{file}: a GameServer without a name");
        assert!(!gs.state().is_empty(), "{file}: {} has no state", gs.name());
    }

    #[test]
    fn every_capture_from_a_real_cluster_decodes() {
        let mut decoded = 0;
        let mut entries: Vec<_> = std::fs::read_dir(captures())
            .expect("the captures directory (../shared/reference/agones-captures)")
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for path in entries {
            let file = path.file_name().unwrap().to_string_lossy().to_string();
            let text = std::fs::read_to_string(&path).unwrap();
            if file.ends_with(".jsonl") {
                for line in text.lines().filter(|l| !l.trim().is_empty()) {
                    match decode::<WatchEvent<GameServer>>(&file, line) {
                        WatchEvent::Added(gs) | WatchEvent::Modified(gs) | WatchEvent::Deleted(gs) => {
                            understood(&file, &gs)
                        }
                        WatchEvent::Bookmark(b) => assert!(!b.metadata.resource_version.is_empty()),
                        WatchEvent::Error(status) => assert_eq!(status.code, 410, "{file}"),
                    }
                }
                decoded += 1;
                continue;
            }
            if !file.ends_with(".json") {
                continue;
            }
            let value: Value = decode(&file, &text);
            match value["kind"].as_str() {
                Some("GameServer") => understood(&file, &decode::<GameServer>(&file, &text)),
                Some("GameServerList") => {
                    let list: ObjectList<GameServer> = decode(&file, &text);
                    assert!(!list.items.is_empty(), "{file}");
                    list.items.iter().for_each(|gs| understood(&file, gs));
                }
                Some("Status") => assert!(decode::<Status>(&file, &text).code >= 400, "{file}"),
                Some("GameServerAllocation") => {
                    let allocation: GameServerAllocation = decode(&file, &text);
                    assert!(!allocation.spec.selectors.is_empty(), "{file}");
                }
                Some("Lease") => assert!(decode::<Lease>(&file, &text).spec.is_some(), "{file}"),
                Some("LeaseList") => assert!(!decode::<ObjectList<Lease>>(&file, &text).items.is_empty()),
                // The allocator service's answers: an allocation, or a google.rpc.Status.
                None if value.get("gameServerName").is_some() => {
                    assert!(!decode::<AllocationStatus>(&file, &text).game_server_name.is_empty());
                }
                None if value.get("code").is_some() => assert!(decode::<RpcStatus>(&file, &text).code > 0),
                // The index of the captures themselves.
                None if value.is_array() => {}
                other => panic!("{file}: a capture of an unexpected kind {other:?}"),
            }
            decoded += 1;
        }
        assert!(decoded >= 40, "only {decoded} captures found");
    }

    #[test]
    fn before_scheduled_ports_and_addresses_are_null_and_read_as_none() {
        for state in ["PortAllocation", "Creating", "Starting"] {
            let file = format!("gameserver-state-{state}.json");
            let text = std::fs::read_to_string(captures().join(&file)).unwrap();
            let raw: Value = serde_json::from_str(&text).unwrap();
            assert!(raw["status"]["ports"].is_null(), "{file}: the capture shows null");
            let gs: GameServer = decode(&file, &text);
            assert_eq!(gs.state(), state);
            let status = gs.status.unwrap();
            assert!(status.ports.is_empty() && status.addresses.is_empty());
        }
    }

    #[test]
    fn a_deleted_gameserver_kept_by_its_finalizer_is_terminating_whatever_its_state() {
        let text = std::fs::read_to_string(captures().join("gameserver-terminating.json")).unwrap();
        let gs: GameServer = decode("gameserver-terminating.json", &text);
        assert_eq!(gs.agones_state(), "Allocated");
        assert_eq!(gs.state(), TERMINATING);
    }

    #[test]
    fn a_gameserver_that_cannot_be_understood_is_marked_and_does_not_fail_its_list() {
        let list = json!({
            "apiVersion": "agones.dev/v1", "kind": "GameServerList", "metadata": {"resourceVersion": "7"},
            "items": [
                {"metadata": {"name": "odd", "resourceVersion": "5"}, "status": {"state": "Ready", "ports": "seven"}},
                {"metadata": {"name": "fine"}, "status": {"state": "Ready", "ports": null, "futureField": 1}},
            ],
        });
        let list: ObjectList<GameServer> = serde_json::from_value(list).unwrap();
        let (odd, fine) = (&list.items[0], &list.items[1]);
        assert_eq!(odd.name(), "odd");
        assert_eq!(odd.metadata.resource_version.as_deref(), Some("5"));
        assert!(odd.undecodable.is_some());
        assert_eq!(odd.state(), "", "an object not understood counts as nothing");
        assert!(fine.undecodable.is_none());
        assert_eq!(fine.state(), "Ready");
    }
}
