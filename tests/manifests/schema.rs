//! Typed views of the rendered objects: Kubernetes kinds through k8s-openapi,
//! the CRDs (GKE's BackendConfig and ManagedCertificate, Agones' Fleet and
//! FleetAutoscaler) through the structs below, which name only the fields
//! these manifests may use and refuse any other.
//!
//! k8s-openapi ignores unknown fields when deserializing, so every object is
//! also serialized back and compared with what was written: a field that did
//! not survive the trip is one the schema does not have (a typo, or a field
//! at the wrong level) and fails the test.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, PodTemplateSpec, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::{Ingress, NetworkPolicy};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::kustomize::Object;

/// `cloud.google.com/v1` BackendConfig (GKE Ingress), the fields used here.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BackendConfig {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: BackendConfigSpec,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BackendConfigSpec {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_sec: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_draining: Option<ConnectionDraining>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iap: Option<Iap>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConnectionDraining {
    pub draining_timeout_sec: i64,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HealthCheck {
    #[serde(rename = "type")]
    pub protocol: String,
    pub request_path: String,
    pub port: i32,
    pub check_interval_sec: i64,
    pub timeout_sec: i64,
    pub healthy_threshold: i64,
    pub unhealthy_threshold: i64,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Iap {
    pub enabled: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oauthclient_credentials: Option<OAuthClientCredentials>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OAuthClientCredentials {
    pub secret_name: String,
}

/// `networking.gke.io/v1` ManagedCertificate.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ManagedCertificate {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: ManagedCertificateSpec,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ManagedCertificateSpec {
    pub domains: Vec<String>,
}

/// `agones.dev/v1` Fleet, the fields used here.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Fleet {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: FleetSpec,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FleetSpec {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheduling: Option<String>,
    pub template: GameServerTemplate,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GameServerTemplate {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<ObjectMeta>,
    pub spec: GameServerSpec,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GameServerSpec {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    pub ports: Vec<GameServerPort>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,
    pub template: PodTemplateSpec,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GameServerPort {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    pub container_port: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port_policy: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Health {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initial_delay_seconds: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub period_seconds: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure_threshold: Option<i32>,
}

/// `autoscaling.agones.dev/v1` FleetAutoscaler with a Buffer or a Webhook policy.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FleetAutoscaler {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: FleetAutoscalerSpec,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FleetAutoscalerSpec {
    pub fleet_name: String,
    pub policy: AutoscalerPolicy,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync: Option<AutoscalerSync>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AutoscalerPolicy {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub buffer: Option<BufferPolicy>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookPolicy>,
}

/// Agones' WebhookPolicy (a Kubernetes WebhookClientConfig), without `caBundle`:
/// the router's webhook is plain HTTP inside the cluster.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WebhookPolicy {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<WebhookService>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WebhookService {
    pub name: String,
    pub namespace: String,
    /// Agones calls port 8000 when this is unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BufferPolicy {
    pub buffer_size: IntOrString,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_replicas: Option<i32>,
    pub max_replicas: i32,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AutoscalerSync {
    #[serde(rename = "type")]
    pub kind: String,
    pub fixed_interval: FixedInterval,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FixedInterval {
    pub seconds: i32,
}

/// `monitoring.googleapis.com/v1` PodMonitoring (Google Managed Prometheus).
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PodMonitoring {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: PodMonitoringSpec,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PodMonitoringSpec {
    pub selector: LabelSelector,
    pub endpoints: Vec<ScrapeEndpoint>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ScrapeEndpoint {
    pub port: String,
    pub path: String,
    pub interval: String,
}

/// Every object of a rendering, by kind.
#[derive(Default)]
pub struct Bundle {
    pub service_accounts: Vec<ServiceAccount>,
    pub roles: Vec<Role>,
    pub role_bindings: Vec<RoleBinding>,
    pub config_maps: Vec<ConfigMap>,
    pub deployments: Vec<Deployment>,
    pub pdbs: Vec<PodDisruptionBudget>,
    pub services: Vec<Service>,
    pub ingresses: Vec<Ingress>,
    pub network_policies: Vec<NetworkPolicy>,
    pub backend_configs: Vec<BackendConfig>,
    pub certificates: Vec<ManagedCertificate>,
    pub fleets: Vec<Fleet>,
    pub autoscalers: Vec<FleetAutoscaler>,
    pub pod_monitorings: Vec<PodMonitoring>,
    pub horizontal_autoscalers: Vec<HorizontalPodAutoscaler>,
}

impl Bundle {
    /// Types every object; panics on an unknown kind, a field the schema
    /// rejects, or a field it would silently drop.
    pub fn parse(objects: &[Object]) -> Bundle {
        let mut b = Bundle::default();
        for o in objects {
            let api_version = o.value["apiVersion"].as_str().unwrap_or("");
            match (api_version, o.kind()) {
                ("v1", "ServiceAccount") => b.service_accounts.push(typed(o)),
                ("rbac.authorization.k8s.io/v1", "Role") => b.roles.push(typed(o)),
                ("rbac.authorization.k8s.io/v1", "RoleBinding") => b.role_bindings.push(typed(o)),
                ("v1", "ConfigMap") => b.config_maps.push(typed(o)),
                ("apps/v1", "Deployment") => b.deployments.push(typed(o)),
                ("policy/v1", "PodDisruptionBudget") => b.pdbs.push(typed(o)),
                ("v1", "Service") => b.services.push(typed(o)),
                ("networking.k8s.io/v1", "Ingress") => b.ingresses.push(typed(o)),
                ("networking.k8s.io/v1", "NetworkPolicy") => b.network_policies.push(typed(o)),
                ("cloud.google.com/v1", "BackendConfig") => b.backend_configs.push(typed(o)),
                ("networking.gke.io/v1", "ManagedCertificate") => b.certificates.push(typed(o)),
                ("agones.dev/v1", "Fleet") => b.fleets.push(typed(o)),
                ("autoscaling.agones.dev/v1", "FleetAutoscaler") => b.autoscalers.push(typed(o)),
                ("monitoring.googleapis.com/v1", "PodMonitoring") => b.pod_monitorings.push(typed(o)),
                ("autoscaling/v2", "HorizontalPodAutoscaler") => b.horizontal_autoscalers.push(typed(o)),
                (v, k) => panic!("{}: {v} {k} has no typed schema in this test; add one", o.source),
            }
        }
        b
    }
}

/// The single element of `items`, or a panic naming what was expected.
pub fn one<'a, T>(items: &'a [T], what: &str) -> &'a T {
    assert_eq!(items.len(), 1, "expected exactly one {what}, found {}", items.len());
    &items[0]
}

fn typed<T: DeserializeOwned + Serialize>(o: &Object) -> T {
    let what = format!("{}: {} {}", o.source, o.kind(), o.name());
    let parsed: T = serde_json::from_value(o.value.clone()).unwrap_or_else(|e| panic!("{what}: {e}"));
    let back = serde_json::to_value(&parsed).expect("typed objects serialize");
    let mut dropped = Vec::new();
    dropped_fields(&o.value, &back, "", &mut dropped);
    assert!(
        dropped.is_empty(),
        "{what}: not in the schema (misspelt or misplaced?): {}",
        dropped.join(", ")
    );
    parsed
}

/// Paths present in `written` that did not come back the same in `back`.
pub fn dropped_fields(written: &Value, back: &Value, path: &str, out: &mut Vec<String>) {
    match (written, back) {
        (Value::Object(w), Value::Object(b)) => {
            for (key, value) in w {
                let child = format!("{path}.{key}");
                match b.get(key) {
                    Some(other) => dropped_fields(value, other, &child, out),
                    None => out.push(child),
                }
            }
        }
        (Value::Array(w), Value::Array(b)) if w.len() == b.len() => {
            for (i, (x, y)) in w.iter().zip(b).enumerate() {
                dropped_fields(x, y, &format!("{path}[{i}]"), out);
            }
        }
        (Value::Number(w), Value::Number(b)) if w.as_f64() == b.as_f64() => {}
        (w, b) if w == b => {}
        (w, b) => out.push(format!("{path} (wrote {w}, read back {b})")),
    }
}
