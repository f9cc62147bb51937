//! The operator's view: every session of the deployment and a way to take a
//! GPU back. Only verified identities listed in `admin.emails` get in.
//!
//! On Agones the list comes from the fleet's Allocated GameServers (so it
//! spans all replicas), merged with this replica's own activity; on the
//! static pool it is this process's table. Forced releases take the same
//! confirmed path as idle ones, with reason `admin`.

use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::State;
use axum::response::{Html, IntoResponse, Response};
use axum::{Form, Json};
use http::HeaderMap;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::allocator::ReleaseReason;
use crate::allocator::{BackendSession, Capacity, SharedLoad};
use crate::app::error::RouterError;
use crate::app::pages::{self, escape};
use crate::app::AppState;
use crate::auth::{origin, Identity};
use crate::session::Profile;

type Shared = State<Arc<AppState>>;

/// One row of the admin table.
#[derive(Serialize)]
struct Row {
    /// The profile the backend came from.
    profile: String,
    user: String,
    backend: String,
    node: Option<String>,
    allocated_at: Option<String>,
    last_activity: Option<String>,
    idle_seconds: Option<u64>,
    /// How long the user has held the backend (its GPU time so far).
    held_seconds: Option<u64>,
    /// Whether this replica holds the session (others only in the fleet).
    on_this_replica: bool,
    /// Deleted and lingering until its pod is gone: held by nobody now.
    releasing: bool,
}

async fn admin(state: &AppState, headers: &HeaderMap) -> Result<Arc<Identity>, RouterError> {
    let identity = state.identify(headers).await?;
    let email = identity.email.to_ascii_lowercase();
    if state.config.admin.emails.contains(&email) {
        Ok(identity)
    } else {
        Err(RouterError::NotAdmin)
    }
}

fn stamp(t: Option<SystemTime>) -> Option<String> {
    t.map(|t| humantime::format_rfc3339_seconds(t).to_string())
}

fn seconds_since(t: Option<SystemTime>, now: SystemTime) -> Option<u64> {
    t.map(|t| now.duration_since(t).unwrap_or_default().as_secs())
}

/// `2 h 05 min`, `12 min 30 s`, `40 s`: GPU time at a glance.
fn held_text(seconds: u64) -> String {
    let (h, m, s) = (seconds / 3600, seconds / 60 % 60, seconds % 60);
    match (h, m) {
        (0, 0) => format!("{s} s"),
        (0, _) => format!("{m} min {s:02} s"),
        _ => format!("{h} h {m:02} min"),
    }
}

fn rows(state: &AppState) -> Vec<Row> {
    state
        .registry
        .profiles()
        .iter()
        .flat_map(|profile| profile_rows(state, profile))
        .collect()
}

/// The sessions of one profile: as its backend system records them across
/// replicas, else this replica's.
fn profile_rows(state: &AppState, profile: &Arc<Profile>) -> Vec<Row> {
    let now = SystemTime::now();
    let mut local = state.registry.sessions();
    local.retain(|s| Arc::ptr_eq(&s.profile, profile));
    let recorded: Vec<BackendSession> = profile.allocator.deployment_sessions().unwrap_or_else(|| {
        local
            .iter()
            .map(|s| BackendSession {
                backend: s.lease.backend.to_string(),
                releasing: s.is_releasing(),
                user: s.identity.email.to_string(),
                node: None,
                allocated_at: Some(s.allocated_at),
                last_activity: None,
            })
            .collect()
    });
    recorded
        .into_iter()
        .map(|r| {
            // A shared backend has several users: theirs is the session.
            let mut on_backend = local.iter().filter(|s| *s.lease.backend == r.backend);
            let here = on_backend
                .clone()
                .find(|s| s.identity.email.eq_ignore_ascii_case(&r.user))
                .or_else(|| on_backend.next());
            let local_activity = here.map(|s| now - s.activity.idle_for());
            let last_activity = r.last_activity.max(local_activity);
            Row {
                profile: profile.name().to_string(),
                on_this_replica: here.is_some(),
                releasing: r.releasing,
                user: r.user,
                backend: r.backend,
                node: r.node,
                allocated_at: stamp(r.allocated_at),
                last_activity: stamp(last_activity),
                idle_seconds: seconds_since(last_activity, now),
                held_seconds: seconds_since(r.allocated_at, now),
            }
        })
        .collect()
}

/// One profile's pool at a glance.
#[derive(Serialize)]
struct PoolSummary {
    name: String,
    title: String,
    backend: &'static str,
    capacity: Capacity,
    /// Its waiting line (every replica's, on Agones).
    waiting: usize,
    idle_timeout_seconds: u64,
    /// Backends that do not answer, as `name (host:port)`.
    down: Vec<String>,
    /// Each shared backend's load (empty unless backends are shared).
    shared_backends: Vec<SharedLoad>,
}

async fn summary(profile: &Profile) -> PoolSummary {
    let allocator = &profile.allocator;
    PoolSummary {
        name: profile.name().to_string(),
        title: profile.config.title.clone(),
        backend: profile.config.backend.kind.label(),
        capacity: allocator.capacity(),
        waiting: profile.line.waiting().await,
        idle_timeout_seconds: profile.idle_timeout().as_secs(),
        down: allocator.down().iter().map(ToString::to_string).collect(),
        shared_backends: allocator.shared_load(),
    }
}

/// `GET /_router/admin`: the sessions table, and each profile's capacity
/// and waiting users.
pub async fn view(State(state): Shared, headers: HeaderMap) -> Result<Response, RouterError> {
    admin(&state, &headers).await?;
    let rows = rows(&state);
    let mut pools = Vec::new();
    for profile in state.registry.profiles().iter() {
        pools.push(summary(profile).await);
    }
    if !crate::util::wants_html(&headers) {
        // The totals first, as before profiles; then each profile's.
        let total = pools.iter().fold(Capacity::default(), |sum, p| Capacity {
            ready: sum.ready + p.capacity.ready,
            allocated: sum.allocated + p.capacity.allocated,
            reserved: sum.reserved + p.capacity.reserved,
            total: sum.total + p.capacity.total,
        });
        return Ok(Json(json!({
            "backend": state.config.backend.kind.label(),
            "sessions": rows,
            "capacity": total,
            "waiting_on_this_replica": pools.iter().map(|p| p.waiting).sum::<usize>(),
            "down": pools.iter().flat_map(|p| p.down.iter()).collect::<Vec<_>>(),
            "shared_backends": pools.iter().flat_map(|p| p.shared_backends.iter()).collect::<Vec<_>>(),
            "profiles": pools,
        }))
        .into_response());
    }
    Ok(Html(page(&rows, &pools)).into_response())
}

fn page(rows: &[Row], pools: &[PoolSummary]) -> String {
    let dash = || "—".to_string();
    let several = pools.len() > 1;
    let any_shared = pools.iter().any(|p| !p.shared_backends.is_empty());
    let body_rows: String = rows
        .iter()
        .map(|r| {
            format!(
                r#"<tr>{profile}<td>{user}</td><td>{backend}</td><td>{node}</td><td>{allocated}</td><td>{last}</td><td>{idle}</td><td>{held}</td><td>{here}</td>
<td>{action}</td></tr>"#,
                profile = if several { format!("<td>{}</td>", escape(&r.profile)) } else { String::new() },
                user = escape(&r.user),
                backend = escape(&r.backend),
                node = escape(r.node.as_deref().unwrap_or("—")),
                allocated = r.allocated_at.clone().unwrap_or_else(dash),
                last = r.last_activity.clone().unwrap_or_else(dash),
                idle = r.idle_seconds.map_or_else(dash, |s| format!("{s} s")),
                held = r.held_seconds.map_or_else(dash, held_text),
                here = if r.on_this_replica { "yes" } else { "" },
                action = if r.releasing {
                    "releasing".to_string()
                } else {
                    format!(
                        r#"<form method="post" action="/_router/admin/release"><input type="hidden" name="target" value="{}"><button type="submit">Release</button></form>"#,
                        // A shared backend's name is several users': name the user.
                        escape(if any_shared { &r.user } else { &r.backend })
                    )
                },
            )
        })
        .collect();
    let table = if rows.is_empty() {
        "<p>No sessions.</p>".to_string()
    } else {
        format!(
            r#"<table border="1" cellpadding="4" cellspacing="0">
<tr>{profile}<th>User</th><th>Backend</th><th>Node</th><th>Allocated at</th><th>Last activity</th><th>Idle</th><th>Held</th><th>This replica</th><th></th></tr>
{body_rows}</table>"#,
            profile = if several { "<th>Profile</th>" } else { "" },
        )
    };
    let pools_html: String = pools.iter().map(|pool| pool_html(pool, several)).collect();
    let release = if any_shared {
        "frees the user's slot now (reason <code>admin</code>) on a shared backend, which keeps serving the others; a dedicated backend is deleted and its fleet replaces it"
    } else {
        "deletes the user's backend now (reason <code>admin</code>); the fleet replaces it"
    };
    let body = format!(
        r#"{pools_html}{table}
<p class="muted">Release {release}.</p>"#
    );
    pages::document("Sessions", &body, None).replace("max-width:36rem", "max-width:72rem")
}

/// One profile's capacity, line, down backends and shared loads.
fn pool_html(pool: &PoolSummary, named: bool) -> String {
    let capacity = pool.capacity;
    let heading = if named {
        format!(
            "<h2 id=\"profile-{name}\">{title} <small>({name}, {kind})</small></h2>\n",
            name = escape(&pool.name),
            title = escape(&pool.title),
            kind = pool.backend,
        )
    } else {
        String::new()
    };
    let down = if pool.down.is_empty() {
        String::new()
    } else {
        let names: Vec<String> = pool.down.iter().map(|d| escape(d)).collect();
        format!(
            "<p><strong>Not answering</strong> (skipped for new users until a probe finds them up): {}</p>\n",
            names.join(", ")
        )
    };
    let loads = if pool.shared_backends.is_empty() {
        String::new()
    } else {
        shared_table(&pool.shared_backends)
    };
    format!(
        r#"{heading}<p>Backends: {ready} ready, {allocated} allocated, {reserved} reserved, {total} in all. Users waiting on this replica: {waiting}. Idle timeout: {idle_timeout} s.</p>
{down}{loads}"#,
        ready = capacity.ready,
        allocated = capacity.allocated,
        reserved = capacity.reserved,
        total = capacity.total,
        waiting = pool.waiting,
        idle_timeout = pool.idle_timeout_seconds,
    )
}

/// Shared backends (slots, not servers) with this replica's users on each.
fn shared_table(shared: &[SharedLoad]) -> String {
    let rows: String = shared
        .iter()
        .map(|b| {
            format!(
                "<tr><td>{}</td><td>{}</td><td>{} of {}</td><td>{}</td></tr>\n",
                escape(&b.backend),
                escape(&b.upstream),
                b.users,
                b.max_users,
                if b.down { "not answering" } else { "" }
            )
        })
        .collect();
    format!(
        r#"<p>Shared backends (users counted by this replica):</p>
<table border="1" cellpadding="4" cellspacing="0">
<tr><th>Backend</th><th>Address</th><th>Users</th><th></th></tr>
{rows}</table>
"#
    )
}

/// Releases `target` (a backend, or a user's email) held through another
/// replica: found in whichever profile's backend system records it.
async fn release_elsewhere(state: &AppState, target: &str) -> Result<Option<String>, RouterError> {
    for profile in state.registry.profiles().iter() {
        let by_user = profile
            .allocator
            .deployment_sessions()
            .unwrap_or_default()
            .into_iter()
            .filter(|r| !r.releasing)
            .find(|r| r.backend == target || r.user.eq_ignore_ascii_case(target))
            .map(|r| r.backend);
        let backend = by_user.unwrap_or_else(|| target.to_string());
        let done = profile
            .allocator
            .release_backend(&backend, ReleaseReason::Admin)
            .await
            .map_err(crate::session::SessionError::from)?;
        if done {
            return Ok(Some(backend));
        }
    }
    Ok(None)
}

#[derive(Deserialize)]
pub struct ReleaseForm {
    /// A backend (GameServer) name or a user's email.
    target: String,
}

/// `POST /_router/admin/release`: releases one user's backend now.
pub async fn release(
    State(state): Shared,
    headers: HeaderMap,
    Form(form): Form<ReleaseForm>,
) -> Result<Response, RouterError> {
    origin::check(&headers, &state.config.server.allowed_origins).map_err(RouterError::CrossOrigin)?;
    let operator = admin(&state, &headers).await?;
    let target = form.target.trim();
    let local = state
        .registry
        .sessions()
        .into_iter()
        .find(|s| *s.lease.backend == *target || s.identity.email.eq_ignore_ascii_case(target));
    let released = match local {
        Some(session) => {
            state.registry.release(&session, ReleaseReason::Admin).await?;
            Some(session.lease.backend.to_string())
        }
        None => release_elsewhere(&state, target).await?,
    };
    let Some(backend) = released else {
        return Err(RouterError::NotFound);
    };
    tracing::info!(
        operator = %crate::telemetry::user_id(&operator.sub),
        %backend,
        reason = ReleaseReason::Admin.as_str(),
        "admin released a backend"
    );
    if crate::util::wants_html(&headers) {
        Ok(pages::redirect("/_router/admin"))
    } else {
        Ok(Json(json!({ "released": backend })).into_response())
    }
}
