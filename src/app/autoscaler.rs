//! The Agones FleetAutoscaler webhook, on its own listener
//! (`server.autoscaler_listen`) and never on the main port.
//!
//! Agones' Buffer policy keeps `allocated + buffer` GameServers. It cannot
//! see the users on the waiting page: they hold no server, so when five
//! people sign in at once the Fleet grows by one server per cold start (each
//! takes minutes to load its models) and the last one waits five times as
//! long. With a `Webhook` policy the Agones controller asks this router
//! instead, once per sync period (30 s by default), and the answer counts
//! them:
//!
//! ```text
//! desired = allocatedReplicas + users waiting + autoscaler.buffer,
//!           clamped to [autoscaler.min_replicas, autoscaler.max_replicas]
//! ```
//!
//! The wire format is Agones' `FleetAutoscaleReview`
//! (`pkg/apis/autoscaling/v1/fleetautoscaler.go`): the controller POSTs
//! `{"request": {"uid", "name", "namespace", "status": {"replicas",
//! "readyReplicas", "reservedReplicas", "allocatedReplicas", …}}}` to the
//! path in `policy.webhook.service.path` (any path is answered here) and
//! reads `{"response": {"uid", "scale", "replicas"}}` from a 200 answer. It
//! resizes the Fleet to `replicas` only when `scale` is true; any other
//! status, or a body it cannot read, leaves the Fleet as it is until the
//! next sync.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use http::StatusCode;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::app::AppState;
use crate::config::AutoscalerConfig;

/// The API version and kind of every answer, as Agones names the type.
const API_VERSION: &str = "autoscaling.agones.dev/v1";
const KIND: &str = "FleetAutoscaleReview";
/// A review is a few hundred bytes (more with the Fleet's labels and
/// annotations); anything far larger is not one.
const MAX_REVIEW_BYTES: usize = 64 * 1024;

/// Serves the webhook on `listener` until `stop`: `POST` on any path;
/// other methods get 405.
pub async fn serve(listener: TcpListener, state: Arc<AppState>, stop: CancellationToken) {
    let webhook = post(review)
        .layer(DefaultBodyLimit::max(MAX_REVIEW_BYTES))
        .with_state(state);
    let app = Router::new().fallback_service(webhook);
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await;
}

/// Why a review was refused (400). Agones sends none of these; the answer
/// says which, for whoever is testing the webhook by hand.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("not a FleetAutoscaleReview: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("the review has no request")]
    NoRequest,
    #[error("the request has no uid")]
    NoUid,
}

/// The webhook's own error mapping: Agones reads JSON, not the router's
/// pages, and only the status matters to it.
impl IntoResponse for ReviewError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.to_string() });
        (StatusCode::BAD_REQUEST, Json(body)).into_response()
    }
}

/// What Agones sends. Only the fields the answer needs are read; the rest
/// (`apiVersion` and `kind` when a person adds them, the Fleet's metadata,
/// players, counters, lists) is ignored.
#[derive(Debug, Deserialize)]
struct Review {
    request: Option<ReviewRequest>,
}

#[derive(Debug, Deserialize)]
struct ReviewRequest {
    uid: Option<String>,
    /// The Fleet's name and namespace, for the log line.
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: String,
    status: FleetStatus,
}

/// The Fleet's status (Agones `FleetStatus`). Counts are int32 there;
/// negative ones are refused as malformed.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct FleetStatus {
    /// Every GameServer of the Fleet, whatever its state.
    replicas: u32,
    #[serde(default)]
    ready_replicas: u32,
    #[serde(default)]
    reserved_replicas: u32,
    allocated_replicas: u32,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Answer {
    api_version: &'static str,
    kind: &'static str,
    response: ReviewResponse,
}

#[derive(Debug, Serialize)]
struct ReviewResponse {
    /// The request's, so that Agones can match the two.
    uid: String,
    /// Whether Agones should resize the Fleet at all.
    scale: bool,
    /// The size to resize it to (int32 in Agones).
    replicas: i32,
}

async fn review(State(state): State<Arc<AppState>>, body: Bytes) -> Result<Json<Answer>, ReviewError> {
    let answer = answer(&state, &body).await;
    let outcome = match &answer {
        Ok(a) if a.response.scale => "scale",
        Ok(_) => "hold",
        Err(e) => {
            tracing::warn!(error = %e, "autoscaler review refused");
            "invalid"
        }
    };
    state.metrics.autoscaler_reviews.with_label_values(&[outcome]).inc();
    answer.map(Json)
}

async fn answer(state: &AppState, body: &[u8]) -> Result<Answer, ReviewError> {
    let review: Review = serde_json::from_slice(body)?;
    let request = review.request.ok_or(ReviewError::NoRequest)?;
    let uid = request.uid.filter(|u| !u.is_empty()).ok_or(ReviewError::NoUid)?;
    let status = &request.status;
    let waiting = users_waiting(state, &request.namespace, &request.name).await;
    let desired = desired_replicas(status.allocated_replicas, waiting, &state.config.autoscaler);
    let scale = i64::from(desired) != i64::from(status.replicas);
    state.metrics.autoscaler_desired_replicas.set(desired.into());
    tracing::info!(
        fleet = %request.name,
        namespace = %request.namespace,
        current = status.replicas,
        allocated = status.allocated_replicas,
        ready = status.ready_replicas,
        reserved = status.reserved_replicas,
        waiting,
        desired,
        scale,
        %uid,
        "autoscaler review"
    );
    Ok(Answer {
        api_version: API_VERSION,
        kind: KIND,
        response: ReviewResponse {
            uid,
            scale,
            replicas: desired,
        },
    })
}

/// The users waiting for a GameServer of `fleet`: the demand it has not
/// met. The review names the Fleet; its profile's line is the demand.
///
/// The one place the webhook learns it: the waiting line, which on Agones
/// is shared by every replica, so whichever one Agones calls knows it all.
/// A profile's line is counted for its first-choice Fleet only (the one
/// its users would get first); the fallback Fleets serve what reaches
/// them. A router with one profile counts its line for any Fleet.
async fn users_waiting(state: &AppState, namespace: &str, fleet: &str) -> usize {
    let profiles = state.registry.profiles();
    let listing = profiles.iter().find(|p| {
        let agones = &p.config.backend.agones;
        p.config.backend.kind.is_agones()
            && agones.fleets.iter().any(|f| f == fleet)
            && (namespace.is_empty() || agones.namespace == namespace)
    });
    let profile = match listing {
        Some(profile) if profile.config.backend.agones.fleet() == fleet => profile,
        // A fallback Fleet: its profile's line is its first choice's demand.
        Some(_) => return 0,
        None if profiles.len() == 1 => profiles.default_profile(),
        None => return 0,
    };
    profile.line.waiting().await
}

/// The Fleet size that serves every allocated server, one more per waiting
/// user and `buffer` spare ones, within the configured bounds (and int32).
pub fn desired_replicas(allocated: u32, waiting: usize, config: &AutoscalerConfig) -> i32 {
    let demand = u64::from(allocated)
        .saturating_add(waiting as u64)
        .saturating_add(u64::from(config.buffer));
    let mut desired = demand.max(u64::from(config.min_replicas));
    if config.max_replicas != 0 {
        desired = desired.min(u64::from(config.max_replicas));
    }
    desired.min(i32::MAX as u64) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(buffer: u32, min_replicas: u32, max_replicas: u32) -> AutoscalerConfig {
        AutoscalerConfig {
            buffer,
            min_replicas,
            max_replicas,
        }
    }

    #[test]
    fn demand_is_allocated_plus_waiting_plus_buffer() {
        assert_eq!(desired_replicas(3, 2, &limits(1, 0, 0)), 6);
        assert_eq!(desired_replicas(0, 0, &limits(0, 0, 0)), 0);
    }

    #[test]
    fn demand_is_clamped_to_the_bounds_and_zero_max_is_unbounded() {
        assert_eq!(desired_replicas(0, 0, &limits(1, 2, 5)), 2);
        assert_eq!(desired_replicas(10, 4, &limits(1, 2, 5)), 5);
        assert_eq!(desired_replicas(10, 4, &limits(1, 2, 0)), 15);
    }

    #[test]
    fn an_absurd_demand_still_fits_agones_int32() {
        assert_eq!(desired_replicas(u32::MAX, usize::MAX, &limits(1, 0, 0)), i32::MAX);
    }
}
