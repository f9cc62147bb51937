//! The two ways to ask Agones for a GameServer: a `GameServerAllocation`
//! through the Kubernetes API, or the agones-allocator service's REST API
//! (plain HTTP, TLS or mutual TLS).

use std::collections::BTreeMap;

use kube::api::{Api, PostParams};

use super::types::{
    AllocationSpec, AllocationStatus, AllocatorServiceRequest, GameServerAllocation, MultiClusterSetting, RpcStatus,
    Selector,
};
use super::{allocation_metadata, backend_error, user_labels, FLEET_LABEL};
use crate::allocator::AllocError;
use crate::config::AgonesConfig;

/// What one allocation request came back with.
pub(super) enum Outcome {
    Allocated(AllocationStatus),
    /// Nothing matched: no free server (possibly transient, agones#2788).
    UnAllocated,
    /// Too many concurrent requests; try again shortly.
    Contention,
}

pub(super) enum Transport {
    Kubernetes(Box<Api<GameServerAllocation>>),
    AllocatorService { http: reqwest::Client, url: String },
}

/// The selectors, in order: the user's own Allocated server in each of the
/// profile's fleets, then a Ready one of each fleet, in the order the
/// profile lists them: one allocation call picks the first fleet that has
/// one. `allocated`/`ready` are the state spellings of the API in use.
/// One fleet per selector: the allocator service's selectors carry labels
/// only, no set expressions.
fn selectors(config: &AgonesConfig, email: &str, allocated: &str, ready: &str) -> Vec<Selector> {
    let fleet = |name: &str| (FLEET_LABEL.to_string(), name.to_string());
    let own = config.fleets.iter().map(|name| {
        let mut labels = user_labels(config, email);
        labels.extend([fleet(name)]);
        Selector {
            game_server_state: allocated.into(),
            match_labels: labels,
        }
    });
    let free = config.fleets.iter().map(|name| Selector {
        game_server_state: ready.into(),
        match_labels: BTreeMap::from([fleet(name)]),
    });
    own.chain(free).collect()
}

impl Transport {
    pub(super) fn kubernetes(client: kube::Client, config: &AgonesConfig) -> Transport {
        Transport::Kubernetes(Box::new(Api::namespaced(client, &config.namespace)))
    }

    pub(super) fn allocator_service(config: &AgonesConfig) -> Result<Transport, AllocError> {
        let url = config
            .allocator_url
            .clone()
            .ok_or_else(|| backend_error("backend.agones.allocator_url is not set"))?;
        let read = |path: &str| std::fs::read(path).map_err(|e| backend_error(format!("cannot read {path}: {e}")));
        let mut builder = reqwest::Client::builder()
            .user_agent(super::user_agent())
            .timeout(config.api_timeout)
            .redirect(reqwest::redirect::Policy::none());
        if let Some(ca) = &config.allocator_ca_file {
            let certificate = reqwest::Certificate::from_pem(&read(ca)?)
                .map_err(|e| backend_error(format!("{ca}: not a PEM certificate: {e}")))?;
            builder = builder.add_root_certificate(certificate);
        }
        if let (Some(cert), Some(key)) = (&config.allocator_client_cert_file, &config.allocator_client_key_file) {
            let mut pem = read(cert)?;
            pem.push(b'\n');
            pem.extend(read(key)?);
            let identity = reqwest::Identity::from_pem(&pem)
                .map_err(|e| backend_error(format!("{cert} + {key}: not a PEM certificate and key: {e}")))?;
            builder = builder.identity(identity);
        }
        let http = builder
            .build()
            .map_err(|e| backend_error(format!("allocator client: {e}")))?;
        Ok(Transport::AllocatorService { http, url })
    }

    /// The metrics verb of an allocation call.
    pub(super) fn verb(&self) -> &'static str {
        match self {
            Transport::Kubernetes(_) => "create",
            Transport::AllocatorService { .. } => "allocator_service",
        }
    }

    pub(super) async fn allocate(
        &self,
        config: &AgonesConfig,
        profile: &str,
        email: &str,
    ) -> Result<Outcome, AllocError> {
        match self {
            Transport::Kubernetes(api) => kubernetes_allocate(api, config, profile, email).await,
            Transport::AllocatorService { http, url } => service_allocate(http, url, config, profile, email).await,
        }
    }
}

async fn kubernetes_allocate(
    api: &Api<GameServerAllocation>,
    config: &AgonesConfig,
    profile: &str,
    email: &str,
) -> Result<Outcome, AllocError> {
    let request = GameServerAllocation {
        api_version: "allocation.agones.dev/v1".into(),
        kind: "GameServerAllocation".into(),
        spec: AllocationSpec {
            selectors: selectors(config, email, "Allocated", "Ready"),
            scheduling: config.scheduling.clone(),
            metadata: allocation_metadata(config, profile, email),
        },
        ..GameServerAllocation::default()
    };
    let created = match tokio::time::timeout(config.api_timeout, api.create(&PostParams::default(), &request)).await {
        Err(_) => {
            return Err(backend_error(format!(
                "allocation: no answer within {:?}",
                config.api_timeout
            )))
        }
        // An update conflict that survived Agones' own retries.
        Ok(Err(kube::Error::Api(status))) if status.code == 409 => return Ok(Outcome::Contention),
        Ok(Err(e)) => return Err(backend_error(format!("allocation: {}", super::error_summary(&e)))),
        Ok(Ok(created)) => created,
    };
    // 201 even when nothing was allocated: the state says what happened.
    let status = created.status.unwrap_or_default();
    match status.state.as_str() {
        "Allocated" if !status.game_server_name.is_empty() => Ok(Outcome::Allocated(status)),
        "UnAllocated" => Ok(Outcome::UnAllocated),
        "Contention" => Ok(Outcome::Contention),
        other => Err(backend_error(format!("allocation answered state {other:?}"))),
    }
}

async fn service_allocate(
    http: &reqwest::Client,
    url: &str,
    config: &AgonesConfig,
    profile: &str,
    email: &str,
) -> Result<Outcome, AllocError> {
    let request = AllocatorServiceRequest {
        namespace: config.namespace.clone(),
        game_server_selectors: selectors(config, email, "ALLOCATED", "READY"),
        scheduling: config.scheduling.clone(),
        metadata: allocation_metadata(config, profile, email),
        multi_cluster_setting: config.multi_cluster.then_some(MultiClusterSetting { enabled: true }),
    };
    let endpoint = format!("{url}/gameserverallocation");
    let response = http
        .post(&endpoint)
        .json(&request)
        .send()
        .await
        .map_err(|e| backend_error(format!("allocator service {endpoint}: {e}")))?;
    let status = response.status().as_u16();
    let body = response
        .bytes()
        .await
        .map_err(|e| backend_error(format!("allocator service {endpoint}: {e}")))?;
    match status {
        200 => {
            let allocation: AllocationStatus = serde_json::from_slice(&body)
                .map_err(|e| backend_error(format!("allocator service answer not understood: {e}")))?;
            if allocation.game_server_name.is_empty() {
                return Err(backend_error("allocator service answered 200 without a gameServerName"));
            }
            Ok(Outcome::Allocated(allocation))
        }
        429 => Ok(Outcome::UnAllocated),
        409 => Ok(Outcome::Contention),
        _ => {
            let rpc: RpcStatus = serde_json::from_slice(&body).unwrap_or_default();
            Err(backend_error(format!(
                "allocator service answered {status} (code {}): {}",
                rpc.code,
                super::clip(rpc.message, super::ERROR_TEXT)
            )))
        }
    }
}
