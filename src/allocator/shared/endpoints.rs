//! A Service's ready endpoints as the shared backends: the
//! `discovery.k8s.io/v1` EndpointSlices labelled
//! `kubernetes.io/service-name=<service>`, listed and watched (kube-runtime's
//! watcher: relists after a broken watch, with backoff), each change
//! handed to [`Shared::set_backends`].
//!
//! An endpoint is a backend while `conditions.ready` is not `false` and
//! `conditions.terminating` is not `true` (absent means ready, as the API
//! documents). Every field is read leniently: `null` and absence read as
//! empty, and an endpoint that cannot be understood is skipped on its own,
//! so one odd object never fails the watch. While the watch is broken the
//! last view stands: a backend that has gone meanwhile refuses connections,
//! and its users move (as `Shared`'s `Allocator::refused` says).

use std::borrow::Cow;
use std::collections::BTreeMap;

use futures_util::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::NamespaceResourceScope;
use kube::api::Api;
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use serde::{Deserialize, Deserializer};
use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::allocator::{AllocError, Lease};
use crate::config::SharedConfig;

/// The label EndpointSlices carry naming their Service.
const SERVICE_LABEL: &str = "kubernetes.io/service-name";

/// Reads `null` as the type's default, like an absent field.
fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Option::<T>::deserialize(d).map(Option::unwrap_or_default)
}

/// Decodes what it can: a value of the wrong shape reads as the default
/// (an endpoint with no address, skipped) instead of failing its slice.
fn lenient<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: serde::de::DeserializeOwned + Default,
{
    let value = serde_json::Value::deserialize(d)?;
    Ok(serde_json::from_value(value).unwrap_or_default())
}

/// `discovery.k8s.io/v1` EndpointSlice: only the fields read here.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct EndpointSlice {
    #[serde(default, deserialize_with = "lenient")]
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "nullable")]
    pub endpoints: Vec<Endpoint>,
    #[serde(default, deserialize_with = "nullable")]
    pub ports: Vec<EndpointPort>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct Endpoint {
    #[serde(deserialize_with = "lenient")]
    pub addresses: Vec<String>,
    #[serde(deserialize_with = "lenient")]
    pub conditions: Conditions,
    #[serde(rename = "targetRef", deserialize_with = "lenient")]
    pub target_ref: Option<TargetRef>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct Conditions {
    pub ready: Option<bool>,
    pub terminating: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct TargetRef {
    pub name: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct EndpointPort {
    pub name: Option<String>,
    pub port: Option<i32>,
}

impl kube::Resource for EndpointSlice {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "EndpointSlice".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "discovery.k8s.io".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "endpointslices".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl EndpointSlice {
    /// The slice's ready endpoints as backends on `port_name` (unset: the
    /// first port), named by their pod (else their address).
    pub fn backends(&self, port_name: Option<&str>) -> Vec<Lease> {
        let port = self
            .ports
            .iter()
            .find(|p| port_name.is_none_or(|name| p.name.as_deref() == Some(name)))
            .and_then(|p| p.port)
            .filter(|p| (1..=65535).contains(p));
        let Some(port) = port else {
            return Vec::new();
        };
        self.endpoints
            .iter()
            .filter(|e| e.conditions.ready != Some(false) && e.conditions.terminating != Some(true))
            .filter_map(|e| {
                let address = e.addresses.first()?;
                let host = if address.contains(':') {
                    format!("[{address}]")
                } else {
                    address.clone()
                };
                let name = e.target_ref.as_ref().and_then(|t| t.name.clone());
                Some(Lease {
                    backend: name.unwrap_or_else(|| address.clone()).into(),
                    upstream: format!("{host}:{port}").parse().ok()?,
                })
            })
            .collect()
    }
}

/// Watches the Service's EndpointSlices into a [`Shared`].
pub struct Endpoints {
    api: Api<EndpointSlice>,
    service: String,
    port_name: Option<String>,
}

impl Endpoints {
    /// Connects to Kubernetes as `config` says (nothing is called yet).
    pub async fn connect(config: &SharedConfig, service: &str) -> Result<Endpoints, AllocError> {
        let failed = |message: String| AllocError::Backend {
            backend: "shared",
            message,
        };
        let kube_config = match &config.kube_api_url {
            Some(url) => kube::Config::new(url.parse().map_err(|e| failed(format!("kube_api_url {url}: {e}")))?),
            None => kube::Config::infer()
                .await
                .map_err(|e| failed(format!("no Kubernetes configuration (in-cluster or kubeconfig): {e}")))?,
        };
        let namespace = config
            .namespace
            .clone()
            .unwrap_or_else(|| kube_config.default_namespace.clone());
        let client = kube::Client::try_from(kube_config).map_err(|e| failed(format!("Kubernetes client: {e}")))?;
        Ok(Endpoints {
            api: Api::namespaced(client, &namespace),
            service: service.to_string(),
            port_name: config.port_name.clone(),
        })
    }

    /// Keeps `shared`'s backends equal to the Service's ready endpoints
    /// until `stop`.
    pub async fn run(&self, shared: &Shared, stop: CancellationToken) {
        let selector = format!("{SERVICE_LABEL}={}", self.service);
        let events = watcher(self.api.clone(), watcher::Config::default().labels(&selector)).default_backoff();
        let mut events = std::pin::pin!(events);
        let mut view = View::default();
        loop {
            let event = tokio::select! {
                event = events.next() => event,
                _ = stop.cancelled() => return,
            };
            match event {
                Some(Ok(event)) => {
                    if let Some(backends) = view.apply(event, self.port_name.as_deref()) {
                        shared.set_backends(backends);
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(service = %self.service, error = %e, "EndpointSlice watch failed; keeping the last view and retrying")
                }
                None => return,
            }
        }
    }
}

/// The slices seen so far, by name, each as its backends.
#[derive(Default)]
struct View {
    slices: BTreeMap<String, Vec<Lease>>,
    /// A relist in progress: replaces `slices` when done.
    relisting: Option<BTreeMap<String, Vec<Lease>>>,
}

impl View {
    /// Applies one watch event; the backends, when they may have changed.
    fn apply(&mut self, event: Event<EndpointSlice>, port_name: Option<&str>) -> Option<Vec<Lease>> {
        let name = |slice: &EndpointSlice| slice.metadata.name.clone().unwrap_or_default();
        match event {
            Event::Init => {
                self.relisting = Some(BTreeMap::new());
                return None;
            }
            Event::InitApply(slice) => {
                let backends = slice.backends(port_name);
                self.relisting.get_or_insert_default().insert(name(&slice), backends);
                return None;
            }
            Event::InitDone => self.slices = self.relisting.take().unwrap_or_default(),
            Event::Apply(slice) => {
                self.slices.insert(name(&slice), slice.backends(port_name));
            }
            Event::Delete(slice) => {
                self.slices.remove(&name(&slice));
            }
        }
        Some(self.slices.values().flatten().cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(json: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(json).unwrap()
    }

    fn names(leases: &[Lease]) -> Vec<String> {
        leases.iter().map(|l| format!("{}={}", l.backend, l.upstream)).collect()
    }

    #[test]
    fn only_ready_endpoints_that_are_not_terminating_are_backends() {
        let s = slice(serde_json::json!({
            "metadata": {"name": "sd15-abc", "labels": {SERVICE_LABEL: "sd15"}, "ownerReferences": null},
            "addressType": "IPv4",
            "ports": [{"name": "metrics", "port": 9100}, {"name": "http", "port": 7860, "protocol": "TCP", "appProtocol": null}],
            "endpoints": [
                {"addresses": ["10.0.0.1"], "conditions": {"ready": true, "serving": true, "terminating": false}, "targetRef": {"kind": "Pod", "name": "sd15-1"}, "nodeName": null, "zone": null},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": null}, "targetRef": null},
                {"addresses": ["10.0.0.3"], "conditions": {"ready": false}},
                {"addresses": ["10.0.0.4"], "conditions": {"ready": true, "terminating": true}},
                {"addresses": null, "conditions": null},
                {"addresses": "not a list"}
            ]
        }));
        assert_eq!(
            names(&s.backends(Some("http"))),
            ["sd15-1=10.0.0.1:7860", "10.0.0.2=10.0.0.2:7860"]
        );
        assert_eq!(
            names(&s.backends(None))[0],
            "sd15-1=10.0.0.1:9100",
            "unset: the first port"
        );
        assert!(s.backends(Some("grpc")).is_empty(), "no such port");
    }

    #[test]
    fn a_slice_of_nulls_decodes_to_no_backends() {
        let s = slice(serde_json::json!({"metadata": null, "endpoints": null, "ports": null}));
        assert!(s.backends(None).is_empty());
        let v6 = slice(serde_json::json!({
            "metadata": {"name": "v6"}, "ports": [{"port": 7860}],
            "endpoints": [{"addresses": ["fd00::1"]}]
        }));
        assert_eq!(names(&v6.backends(None)), ["fd00::1=[fd00::1]:7860"]);
    }

    #[test]
    fn the_view_is_the_union_of_slices_and_a_relist_replaces_it() {
        let one = |name: &str, ip: &str| {
            slice(serde_json::json!({
                "metadata": {"name": name}, "ports": [{"port": 7860}],
                "endpoints": [{"addresses": [ip], "targetRef": {"name": ip}}]
            }))
        };
        let mut view = View::default();
        assert_eq!(view.apply(Event::Init, None), None);
        assert_eq!(view.apply(Event::InitApply(one("a", "10.0.0.1")), None), None);
        assert_eq!(names(&view.apply(Event::InitDone, None).unwrap()).len(), 1);
        let both = view.apply(Event::Apply(one("b", "10.0.0.2")), None).unwrap();
        assert_eq!(both.len(), 2);
        let left = view.apply(Event::Delete(one("a", "10.0.0.1")), None).unwrap();
        assert_eq!(names(&left), ["10.0.0.2=10.0.0.2:7860"]);
        view.apply(Event::Init, None);
        view.apply(Event::InitApply(one("c", "10.0.0.3")), None);
        assert_eq!(
            names(&view.apply(Event::InitDone, None).unwrap()),
            ["10.0.0.3=10.0.0.3:7860"]
        );
    }
}
