//! The waiting line shared by every replica, kept in Kubernetes: one
//! `coordination.k8s.io/v1` Lease per waiting user, named from the fleet
//! and the hash of their email (each profile's line is its own: a fleet is
//! one profile's), labelled with the fleet. `acquireTime` is when they joined,
//! `renewTime` when they last asked; the order is by `acquireTime`. A Lease
//! is created when a user joins, renewed (merge patch) when they ask again,
//! and deleted when they get a backend or, by any replica, once stale.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};

use super::{call_api, label, CallError};
use crate::allocator::{AllocError, SharedLine, SharedWaiter};
use crate::auth::Identity;
use crate::metrics::Metrics;

/// The label that marks a Lease as a place in this fleet's line.
pub const LINE_LABEL: &str = "session-router.dev/line";
const NAME_PREFIX: &str = "session-router-line-";

pub struct LeaseLine {
    leases: Api<Lease>,
    fleet: String,
    timeout: Duration,
    metrics: Arc<Metrics>,
}

impl LeaseLine {
    pub fn new(leases: Api<Lease>, fleet: &str, timeout: Duration, metrics: Arc<Metrics>) -> LeaseLine {
        LeaseLine {
            leases,
            fleet: fleet.to_string(),
            timeout,
            metrics,
        }
    }

    async fn call<T>(
        &self,
        verb: &str,
        what: &str,
        call: impl std::future::Future<Output = kube::Result<T>>,
    ) -> Result<T, CallError> {
        call_api(self.timeout, &self.metrics, verb, what, call).await
    }

    fn lease(&self, name: String, now: SystemTime) -> Lease {
        let stamp = micro_time(now);
        Lease {
            metadata: ObjectMeta {
                name: Some(name),
                labels: Some(BTreeMap::from([(LINE_LABEL.to_string(), self.fleet.clone())])),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                acquire_time: stamp.clone(),
                renew_time: stamp,
                ..LeaseSpec::default()
            }),
        }
    }
}

fn micro_time(at: SystemTime) -> Option<MicroTime> {
    k8s_openapi::jiff::Timestamp::try_from(at).ok().map(MicroTime)
}

fn system_time(time: &Option<MicroTime>) -> Option<SystemTime> {
    time.as_ref().map(|t| SystemTime::from(t.0))
}

#[async_trait]
impl SharedLine for LeaseLine {
    fn key(&self, user: &Identity) -> String {
        format!("{NAME_PREFIX}{}-{}", self.fleet, label::user_hash(&user.email))
    }

    async fn waiters(&self) -> Result<Vec<SharedWaiter>, AllocError> {
        let selector = format!("{LINE_LABEL}={}", self.fleet);
        let list = self
            .call(
                "list",
                "list the waiting line",
                self.leases.list(&ListParams::default().labels(&selector)),
            )
            .await?;
        Ok(list
            .items
            .into_iter()
            .filter_map(|lease| {
                let spec = lease.spec.as_ref()?;
                let joined = system_time(&spec.acquire_time)?;
                Some(SharedWaiter {
                    key: lease.metadata.name.clone()?,
                    joined,
                    last_asked: system_time(&spec.renew_time).unwrap_or(joined),
                })
            })
            .collect())
    }

    async fn join(&self, user: &Identity, now: SystemTime) -> Result<bool, AllocError> {
        let lease = self.lease(self.key(user), now);
        let params = PostParams::default();
        let created = self.leases.create(&params, &lease);
        match self.call("create", "join the waiting line", created).await {
            Ok(_) => Ok(true),
            // In line already (asked through another replica): keep the place.
            Err(CallError::Conflict) => self.renew(user, now).await.map(|()| false),
            Err(e) => Err(e.into()),
        }
    }

    async fn renew(&self, user: &Identity, now: SystemTime) -> Result<(), AllocError> {
        let patch = serde_json::json!({ "spec": { "renewTime": micro_time(now) } });
        let (params, patch) = (PatchParams::default(), Patch::Merge(&patch));
        let key = self.key(user);
        match self
            .call(
                "patch",
                "keep a place in the waiting line",
                self.leases.patch(&key, &params, &patch),
            )
            .await
        {
            Ok(_) => Ok(()),
            // Cleared out as stale meanwhile: the next ask joins again.
            Err(CallError::NotFound) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn leave(&self, key: &str) -> Result<Option<SystemTime>, AllocError> {
        let params = DeleteParams::default();
        let deleted = self.leases.delete(key, &params);
        match self.call("delete", "leave the waiting line", deleted).await {
            Ok(either) => Ok(either
                .left()
                .and_then(|lease| lease.spec.and_then(|s| system_time(&s.acquire_time)))
                .or(Some(SystemTime::now()))),
            Err(CallError::NotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}
