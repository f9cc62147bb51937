//! session-router: one dedicated GPU backend per signed-in user, behind
//! Cloud IAP.
//!
//! A request's path: [`server`] accepts it → [`auth`] verifies the IAP JWT
//! (or the dev sign-in) → [`session`] finds the user's backend, allocating
//! one through an [`allocator::Allocator`] on first use → [`proxy`] streams
//! it there and back → [`reaper`] gives the backend back once the user has
//! been idle. Failures become pages in one place, [`error`].
//!
//! # Layout
//!
//! | module | concern |
//! |---|---|
//! | [`config`] | TOML + environment → a validated [`config::Config`]; every problem named by key |
//! | [`auth`] | IAP JWT verification (`iap`, `jwks`), dev sign-in, allowlists, origin checks |
//! | [`session`] | the session table (single-flight allocation), signed pinning cookie, activity, which requests may allocate, why a backend was released |
//! | [`allocator`] | the `Allocator` trait and its backends: `static` pool, Agones (Kubernetes API or allocator service), `shared` (several users per backend: a list or a Service's endpoints) |
//! | [`proxy`] | streaming forwarder, header rules, WebSocket relay |
//! | [`reaper`] | idle and max-lifetime release |
//! | [`admin`] | the operator's sessions view and forced release |
//! | [`routes`] | request handlers: the proxy path and `/_router/*`, `/healthz`, `/readyz` |
//! | [`server`] | shared state, route table and layers, accept loop, drain |
//! | [`error`] | `RouterError` and its single mapping to HTTP |
//! | [`pages`] | the HTML/JSON pages the router serves itself |
//! | [`metrics`] | Prometheus metrics on their own listener |
//! | [`autoscaler`] | the Agones FleetAutoscaler webhook on its own listener: allocated + waiting + buffer |
//! | [`telemetry`] | Cloud Logging JSON logs, the access log, request metrics |
//! | [`body`] | the body wrapper through which those watch bytes go by |
//! | [`demo`] | stand-in WebUI pods and the one-command demo |

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
use crate::config::{BackendKind, Config};
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

/// The router's shared state for `config`, its backend connected.
pub async fn build(config: Config) -> Result<AppState, AllocError> {
    let metrics = Metrics::new();
    let allocator: Arc<dyn Allocator> = match config.backend.kind {
        BackendKind::Static => {
            let pool = &config.backend.static_pool;
            Arc::new(
                StaticPool::new(&pool.upstreams)
                    .probing(Probe::every(pool.probe_interval, config.backend.connect_timeout)),
            )
        }
        BackendKind::Shared => {
            let shared = &config.backend.shared;
            let probe = Probe::every(shared.probe_interval, config.backend.connect_timeout);
            let max = shared.max_users_per_backend;
            let backends = match &shared.service {
                Some(service) => Shared::watching(Endpoints::connect(shared, service).await?, max, probe),
                None => Shared::listed(&shared.upstreams, max, probe),
            };
            Arc::new(backends.reporting(metrics.clone()))
        }
        kind @ (BackendKind::Agones | BackendKind::AgonesAllocator) => {
            Arc::new(Agones::connect(&config.backend.agones, kind, metrics.clone()).await?)
        }
    };
    Ok(AppState::new(config, allocator, metrics))
}
