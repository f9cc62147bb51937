//! session-router: one dedicated GPU backend per signed-in user, behind
//! Cloud IAP.
//!
//! A request's path: [`net`] accepts it → [`app`] runs it in one function
//! (`app::service`) → [`auth`] verifies the IAP JWT (or the dev sign-in) →
//! [`session`] finds the user's backend, allocating one through an
//! [`allocator::Allocator`] on first use → [`proxy`] streams it there and
//! back → the app's reaper gives the backend back once the user has been
//! idle. Failures become pages in one place, `app::error`.
//!
//! # Layout
//!
//! Top to bottom: each layer imports only those below it, and no two files
//! import each other (`tests/layout.rs` keeps it so).
//!
//! | module | concern |
//! |---|---|
//! | [`demo`] | stand-in WebUI pods and the one-command demo |
//! | this file | [`run`] and [`build`]: each profile's backend, as the config chooses it |
//! | [`app`] | shared state, route table, background tasks; the request path (`service`), handlers (`routes`), `admin`, `reaper`, `autoscaler`, `error` (`RouterError` and its single mapping to HTTP), `pages` |
//! | [`proxy`] | streaming forwarder, header rules (`hop`: hop-by-hop, both directions), upstream client, WebSocket relay |
//! | [`session`] | the session table (single-flight allocation, one backend a user across profiles), the profiles (each pool's allocator, line and limits), signed pinning cookie, activity, the waiting line, which requests may allocate, how a release is told |
//! | [`allocator`] | the `Allocator` trait, what it is given and says (pinned backend, release reasons, the shared-line contract) and its backends: `static` pool, Agones (Kubernetes API or allocator service), `shared` (several users per backend: a list or a Service's endpoints) |
//! | [`auth`] | IAP JWT verification (`iap`, `jwks`), dev sign-in, allowlists, origin checks |
//! | [`net`] | accept loop, serving threads and drain, generic over the per-request service; guarded sockets and the raw 414 |
//! | [`telemetry`] | Cloud Logging JSON logs, the access log, request metrics |
//! | [`config`] | TOML + environment → a validated [`config::Config`]; every problem named by key |
//! | [`metrics`] | Prometheus metrics on their own listener |
//! | [`body`] | the body wrapper through which those watch bytes go by |
//! | [`util`] | `locked`, `FastMap`, HMAC sealing, Cookie-header parsing, label syntax: the bottom, importing nothing of ours |

pub mod allocator;
pub mod app;
pub mod auth;
pub mod body;
pub mod config;
pub mod demo;
pub mod metrics;
pub mod net;
pub mod proxy;
pub mod session;
pub mod telemetry;
pub mod util;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::allocator::agones::Agones;
use crate::allocator::shared::Endpoints;
use crate::allocator::{AllocError, Allocator, Probe, Shared, StaticPool};
use crate::app::AppState;
use crate::config::{BackendConfig, BackendKind, Config};
use crate::metrics::Metrics;

/// Why the router could not run. Each variant says what failed and leaves
/// the cause to its `source()`: the binary prints the whole chain
/// (`cannot serve: cannot listen on …: Address already in use`), and a
/// cause also written into the message would be printed twice.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot connect the backend")]
    Backend(#[from] AllocError),
    #[error("cannot serve")]
    Io(#[from] std::io::Error),
}

/// Runs the router described by `config` on an already bound `listener`
/// until `shutdown` resolves, then drains.
pub async fn run(listener: TcpListener, config: Config, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    let state = Arc::new(build(config).await?);
    app::serve(listener, state, shutdown).await?;
    Ok(())
}

/// The router's shared state for `config`, every profile's backend
/// connected.
pub async fn build(config: Config) -> Result<AppState, AllocError> {
    let metrics = Metrics::new();
    let mut allocators = Vec::with_capacity(config.profiles.len());
    for profile in &config.profiles {
        // Listed profiles name their fixed backends after themselves (no
        // two profiles' `static-0`); the implicit one as it always did.
        let prefix = config.profiles_listed.then_some(profile.name.as_str());
        allocators.push(connect(&profile.name, prefix, &profile.backend, &metrics).await?);
    }
    Ok(AppState::new(config, allocators, metrics))
}

/// The allocator a profile's backend section describes, connected;
/// `prefix` names a fixed list's backends (else `static-N` / `shared-NN`).
async fn connect(
    profile: &str,
    prefix: Option<&str>,
    backend: &BackendConfig,
    metrics: &Arc<Metrics>,
) -> Result<Arc<dyn Allocator>, AllocError> {
    Ok(match backend.kind {
        BackendKind::Static => {
            let pool = &backend.static_pool;
            let probe = Probe::every(pool.probe_interval, backend.connect_timeout);
            Arc::new(StaticPool::named(prefix.unwrap_or("static"), &pool.upstreams).probing(probe))
        }
        BackendKind::Shared => {
            let shared = &backend.shared;
            let probe = Probe::every(shared.probe_interval, backend.connect_timeout);
            let max = shared.max_users_per_backend;
            let backends = match &shared.service {
                Some(service) => Shared::watching(Endpoints::connect(shared, service).await?, max, probe),
                None => Shared::listed(prefix.unwrap_or("shared"), &shared.upstreams, max, probe),
            };
            Arc::new(backends.reporting(metrics.clone()))
        }
        kind @ (BackendKind::Agones | BackendKind::AgonesAllocator) => {
            Arc::new(Agones::connect(&backend.agones, kind, profile, metrics.clone()).await?)
        }
    })
}
