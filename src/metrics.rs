//! Prometheus metrics, served on their own listener (`server.metrics_listen`)
//! and never on the main port.
//!
//! Names follow Prometheus conventions: a `session_router_` prefix, base
//! units (seconds, bytes), `_total` counters. Labels are bounded sets —
//! never a user, an email, a path or a backend name.

use std::sync::{Arc, Mutex};

use axum::routing::get;
use axum::Router;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    CounterVec, Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::util::locked;

/// Latency buckets (seconds) from 1 ms to 2 min: upstream answers range
/// from a cached asset to a long generation.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
/// Waiting for a GPU can take many minutes.
const WAIT_BUCKETS: &[f64] = &[1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 3600.0];

/// Every `kind` label of `requests`; `unparsed`: refused before the
/// request could be read (malformed or over-long heads).
pub const REQUEST_KINDS: [&str; 4] = ["proxied", "router", "health", "unparsed"];
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Every `outcome` of `autoscaler_reviews`: answered with a new size, answered
/// with the current one, refused as malformed.
pub const AUTOSCALER_OUTCOMES: [&str; 3] = ["scale", "hold", "invalid"];

/// Every reason a backend is released for.
pub const RELEASE_REASONS: [&str; 6] = ["user", "idle", "max_lifetime", "dead_pod", "admin", "duplicate"];

pub struct Metrics {
    registry: Registry,
    /// By `kind` (proxied, router, health) and status `class` (2xx, …).
    pub requests: IntCounterVec,
    pub upstream_header_seconds: Histogram,
    pub open_websockets: IntGauge,
    /// Streamed (proxied) response bodies still being sent.
    pub open_streams: IntGauge,
    /// By `direction`: `to_upstream` (request bodies), `to_client` (responses).
    pub proxied_bytes: IntCounterVec,
    pub sessions_active: IntGauge,
    /// By `outcome`: allocated, unallocated, contention, error.
    pub allocations: IntCounterVec,
    /// Sessions held here, by `profile` (bounded by the config).
    pub profile_sessions: IntGaugeVec,
    /// Allocation attempts by `profile` and `outcome` (allocated,
    /// unallocated, error).
    pub profile_allocations: IntCounterVec,
    /// Users in each `profile`'s waiting line.
    pub profile_users_waiting: IntGaugeVec,
    pub allocation_seconds: Histogram,
    /// By `reason`: user, idle, max_lifetime, dead_pod, admin, duplicate.
    pub releases: IntCounterVec,
    pub release_failures: IntCounterVec,
    /// Allocation → confirmed release, summed, by release `reason`: GPU time.
    pub backend_held_seconds: CounterVec,
    /// Every profile's line together, read when scraped.
    pub users_waiting: Arc<Sampled>,
    pub wait_seconds: Histogram,
    /// By `result`: cached, verified, rejected; and `reason` class for rejections.
    pub token_checks: IntCounterVec,
    /// By `outcome`: ok, error.
    pub jwks_refreshes: IntCounterVec,
    /// Seconds since the signing keys were last fetched successfully.
    pub jwks_key_age_seconds: IntGauge,
    /// By `verb` (create, get, list, watch, patch, delete) and `outcome`.
    pub kube_api_calls: IntCounterVec,
    /// Objects from Kubernetes that could not be understood and were
    /// skipped (counted as nothing), by kind.
    pub kube_objects_skipped: IntCounterVec,
    /// Per-backend-kind flag, for dashboards: 1 for the configured kind.
    pub backend_info: IntGaugeVec,
    /// Upstream connections kept open for reuse, read from the pool when
    /// scraped.
    pub upstream_idle_connections: Arc<Sampled>,
    /// Backends known not to answer (static upstreams that refused a
    /// connection or a probe), read from the allocator when scraped.
    pub upstreams_down: Arc<Sampled>,
    /// Users this replica has pinned to each `shared` backend, by
    /// `backend` (bounded by the backends the config or Service has).
    pub shared_backend_users: IntGaugeVec,
    /// The Fleet size the FleetAutoscaler webhook last answered.
    pub autoscaler_desired_replicas: IntGauge,
    /// FleetAutoscaler reviews, by `outcome`: [`AUTOSCALER_OUTCOMES`].
    pub autoscaler_reviews: IntCounterVec,
    /// The series every request increments, looked up once: a
    /// `with_label_values` hashes the labels and takes a lock each time.
    hot: HotSeries,
}

struct HotSeries {
    /// `requests` by [`REQUEST_KINDS`] index, then status class.
    requests: [[IntCounter; 5]; 4],
    to_upstream: IntCounter,
    to_client: IntCounter,
    token_cached: IntCounter,
    token_verified: IntCounter,
}

impl HotSeries {
    fn new(requests: &IntCounterVec, proxied_bytes: &IntCounterVec, token_checks: &IntCounterVec) -> Self {
        HotSeries {
            requests: REQUEST_KINDS.map(|kind| STATUS_CLASSES.map(|class| requests.with_label_values(&[kind, class]))),
            to_upstream: proxied_bytes.with_label_values(&["to_upstream"]),
            to_client: proxied_bytes.with_label_values(&["to_client"]),
            token_cached: token_checks.with_label_values(&["cached", ""]),
            token_verified: token_checks.with_label_values(&["verified", ""]),
        }
    }
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry.register(Box::new(metric.clone())).expect("unique metric");
    metric
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let metric = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry.register(Box::new(metric.clone())).expect("unique metric");
    metric
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let metric = IntGauge::new(name, help).expect("valid metric");
    registry.register(Box::new(metric.clone())).expect("unique metric");
    metric
}

/// A gauge read from its source when scraped: for a figure the code keeps
/// anyway, which counting at every change would make the request path pay
/// for.
pub struct Sampled {
    gauge: IntGauge,
    source: Mutex<Option<Box<dyn Fn() -> i64 + Send + Sync>>>,
}

impl Sampled {
    /// Reads the gauge from `source` from now on (replacing any earlier one).
    pub fn read_from(&self, source: impl Fn() -> i64 + Send + Sync + 'static) {
        *locked(&self.source) = Some(Box::new(source));
    }
}

/// What the registry holds of a [`Sampled`] gauge.
struct SampledCollector(Arc<Sampled>);

impl Collector for SampledCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.0.gauge.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        if let Some(source) = &*locked(&self.0.source) {
            self.0.gauge.set(source());
        }
        self.0.gauge.collect()
    }
}

fn sampled(registry: &Registry, name: &str, help: &str) -> Arc<Sampled> {
    let sampled = Arc::new(Sampled {
        gauge: IntGauge::new(name, help).expect("valid metric"),
        source: Mutex::new(None),
    });
    registry
        .register(Box::new(SampledCollector(sampled.clone())))
        .expect("unique metric");
    sampled
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    let metric = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec())).expect("valid metric");
    registry.register(Box::new(metric.clone())).expect("unique metric");
    metric
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let r = Registry::new();
        let backend_info = IntGaugeVec::new(
            Opts::new("session_router_backend_info", "The configured backend kind (value 1)."),
            &["kind"],
        )
        .expect("valid metric");
        r.register(Box::new(backend_info.clone())).expect("unique metric");
        let requests = counter(
            &r,
            "session_router_requests_total",
            "HTTP requests answered, by kind and status class.",
            &["kind", "class"],
        );
        let proxied_bytes = counter(
            &r,
            "session_router_proxied_bytes_total",
            "Body bytes proxied, by direction.",
            &["direction"],
        );
        let token_checks = counter(
            &r,
            "session_router_token_checks_total",
            "Identity checks, by result and rejection reason class.",
            &["result", "reason"],
        );
        let metrics = Metrics {
            hot: HotSeries::new(&requests, &proxied_bytes, &token_checks),
            requests,
            proxied_bytes,
            token_checks,
            upstream_header_seconds: histogram(
                &r,
                "session_router_upstream_response_header_seconds",
                "Time from sending a request upstream to its response headers.",
                LATENCY_BUCKETS,
            ),
            open_websockets: gauge(
                &r,
                "session_router_open_websockets",
                "Upgraded connections being relayed.",
            ),
            open_streams: gauge(
                &r,
                "session_router_open_streams",
                "Proxied response bodies still streaming.",
            ),
            sessions_active: gauge(
                &r,
                "session_router_sessions_active",
                "Sessions (user → backend) held by this replica.",
            ),
            allocations: counter(
                &r,
                "session_router_allocations_total",
                "Allocation attempts, by outcome.",
                &["outcome"],
            ),
            allocation_seconds: histogram(
                &r,
                "session_router_allocation_seconds",
                "Time to obtain a backend for a user, successful or not.",
                LATENCY_BUCKETS,
            ),
            releases: counter(
                &r,
                "session_router_releases_total",
                "Confirmed backend releases, by reason.",
                &["reason"],
            ),
            release_failures: counter(
                &r,
                "session_router_release_failures_total",
                "Failed release attempts, by reason.",
                &["reason"],
            ),
            backend_held_seconds: {
                let opts = Opts::new(
                    "session_router_backend_held_seconds_total",
                    "Seconds backends were held by users, from allocation to confirmed release, by release reason.",
                );
                let metric = CounterVec::new(opts, &["reason"]).expect("valid metric");
                r.register(Box::new(metric.clone())).expect("unique metric");
                metric
            },
            users_waiting: sampled(
                &r,
                "session_router_users_waiting",
                "Users in the waiting line (every profile's).",
            ),
            profile_users_waiting: gauge_vec(
                &r,
                "session_router_profile_users_waiting",
                "Users in each profile's waiting line.",
                &["profile"],
            ),
            profile_sessions: gauge_vec(
                &r,
                "session_router_profile_sessions",
                "Sessions held by this replica, by profile.",
                &["profile"],
            ),
            profile_allocations: counter(
                &r,
                "session_router_profile_allocations_total",
                "Allocation attempts, by profile and outcome.",
                &["profile", "outcome"],
            ),
            wait_seconds: histogram(
                &r,
                "session_router_wait_seconds",
                "Time users spent on the waiting page before getting a backend.",
                WAIT_BUCKETS,
            ),
            jwks_refreshes: counter(
                &r,
                "session_router_jwks_refreshes_total",
                "JWKS fetches, by outcome.",
                &["outcome"],
            ),
            jwks_key_age_seconds: gauge(
                &r,
                "session_router_jwks_key_age_seconds",
                "Seconds since the signing keys were last fetched successfully.",
            ),
            kube_api_calls: counter(
                &r,
                "session_router_kube_api_calls_total",
                "Kubernetes and allocator-service calls, by verb and outcome.",
                &["verb", "outcome"],
            ),
            kube_objects_skipped: counter(
                &r,
                "session_router_kube_objects_skipped_total",
                "Kubernetes objects (or watch events) not understood and skipped, by kind.",
                &["kind"],
            ),
            backend_info,
            upstream_idle_connections: sampled(
                &r,
                "session_router_upstream_idle_connections",
                "Upstream connections kept open for reuse.",
            ),
            upstreams_down: sampled(
                &r,
                "session_router_upstreams_down",
                "Backends known not to answer (skipped for new users).",
            ),
            shared_backend_users: {
                let opts = Opts::new(
                    "session_router_shared_backend_users",
                    "Users this replica has pinned to each shared backend.",
                );
                let metric = IntGaugeVec::new(opts, &["backend"]).expect("valid metric");
                r.register(Box::new(metric.clone())).expect("unique metric");
                metric
            },
            autoscaler_desired_replicas: gauge(
                &r,
                "session_router_autoscaler_desired_replicas",
                "The Fleet size this replica's FleetAutoscaler webhook last answered.",
            ),
            autoscaler_reviews: counter(
                &r,
                "session_router_autoscaler_reviews_total",
                "FleetAutoscaler webhook reviews, by outcome.",
                &["outcome"],
            ),
            registry: r,
        };
        metrics.start_at_zero();
        Arc::new(metrics)
    }

    /// Creates every series of the bounded label sets at 0, so dashboards
    /// and alerts see them before the first event (a missing series is not
    /// a zero in PromQL).
    /// (`requests`, `proxied_bytes` and the accepted `token_checks` already
    /// exist: [`HotSeries`] made them; the rejected ones are the
    /// authenticator's, [`Metrics::start_token_rejections_at_zero`].)
    fn start_at_zero(&self) {
        for outcome in ["allocated", "unallocated", "contention", "error"] {
            self.allocations.with_label_values(&[outcome]);
        }
        for reason in RELEASE_REASONS {
            self.releases.with_label_values(&[reason]);
            self.release_failures.with_label_values(&[reason]);
            self.backend_held_seconds.with_label_values(&[reason]);
        }
        for outcome in AUTOSCALER_OUTCOMES {
            self.autoscaler_reviews.with_label_values(&[outcome]);
        }
        for outcome in ["ok", "error"] {
            self.jwks_refreshes.with_label_values(&[outcome]);
            for verb in ["create", "allocator_service", "get", "list", "watch", "patch", "delete"] {
                self.kube_api_calls.with_label_values(&[verb, outcome]);
            }
        }
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        String::from_utf8(out).expect("metrics text is UTF-8")
    }

    /// Counts one answered request; `kind` is one of [`REQUEST_KINDS`].
    pub fn count_request(&self, kind: &str, status: http::StatusCode) {
        let kind = REQUEST_KINDS.iter().position(|k| *k == kind).unwrap_or(0);
        let class = (status.as_u16() / 100).clamp(1, 5) as usize - 1;
        self.hot.requests[kind][class].inc();
    }

    /// `proxied_bytes` towards the upstream (request bodies).
    pub fn to_upstream_bytes(&self) -> &IntCounter {
        &self.hot.to_upstream
    }

    /// `proxied_bytes` towards the client (response bodies).
    pub fn to_client_bytes(&self) -> &IntCounter {
        &self.hot.to_client
    }

    /// Creates the rejected `token_checks` series of every `reason` class at
    /// 0, as [`Metrics::new`] does for the other bounded label sets. The
    /// classes are the authenticator's, so it passes them in: metrics knows
    /// no layer above it.
    pub fn start_token_rejections_at_zero(&self, reasons: &[&str]) {
        for reason in reasons {
            self.token_checks.with_label_values(&["rejected", reason]);
        }
    }

    /// Counts one identity check: `result` cached, verified or rejected,
    /// with the rejection's `reason` class.
    pub fn count_token_check(&self, result: &str, reason: &str) {
        match (result, reason) {
            ("cached", "") => self.hot.token_cached.inc(),
            ("verified", "") => self.hot.token_verified.inc(),
            _ => self.token_checks.with_label_values(&[result, reason]).inc(),
        }
    }

    /// Counts one Kubernetes/allocator call.
    pub fn kube_call(&self, verb: &str, outcome: &str) {
        self.kube_api_calls.with_label_values(&[verb, outcome]).inc();
    }

    /// Adds a released backend's held time.
    pub fn held(&self, reason: &str, held: std::time::Duration) {
        self.backend_held_seconds
            .with_label_values(&[reason])
            .inc_by(held.as_secs_f64());
    }

    pub fn release(&self, reason: &str, ok: bool) {
        if ok {
            self.releases.with_label_values(&[reason]).inc();
        } else {
            self.release_failures.with_label_values(&[reason]).inc();
        }
    }
}

/// Serves `GET /metrics` on `listener` until `stop`.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, stop: CancellationToken) {
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
                    metrics.render(),
                )
            }
        }),
    );
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await;
}
