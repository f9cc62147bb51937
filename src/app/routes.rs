//! Request handlers: the proxy path and the router's own endpoints.
//!
//! Every handler that needs a user starts from [`AppState::identify`]; none
//! reads an identity header directly.
//!
//! Only an intent allocates: a user without a backend gets one from a
//! navigation, an API client or "Start again" (`POST /_router/start`);
//! anything else an open page sends gets a 409 that says the session ended
//! or never started (see `claim`).

use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::rejection::FormRejection;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::{Form, Json};
use bytes::Bytes;
use http::header::SET_COOKIE;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::Empty;
use serde::Deserialize;
use serde_json::json;

use crate::allocator::Lease;
use crate::allocator::{Ended, ReleaseReason};
use crate::app::choose;
use crate::app::error::RouterError;
use crate::app::pages::{self, escape};
use crate::app::AppState;
use crate::auth::{origin, Identity};
use crate::proxy::{headers::is_upgrade, BoxError, Exchange, ProxyError, UpstreamBody};
use crate::session::cookie::{set_cookie, Pin};
use crate::session::ended::{self, Notice};
use crate::session::{Claim, Intent, Place, Profile, Session, SessionError};
use crate::telemetry;
use crate::util::unix;

type Shared = State<Arc<AppState>>;

/// Everything not claimed by a router endpoint goes to the user's backend.
pub async fn proxy<B>(
    state: &AppState,
    request: Request<B>,
    client_ip: &str,
) -> Result<Response<UpstreamBody>, RouterError>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let identity = state.identify(request.headers()).await?;
    let upgrade = is_upgrade(request.headers());
    if upgrade {
        check_origin(state, request.headers())?;
    }
    let now = SystemTime::now();
    let counts_as_activity = state.counts_as_activity(request.uri().path());
    let mut session = state
        .registry
        .get_or_allocate(&identity, || claim(state, &identity, &request, counts_as_activity, now))
        .await?;
    let headers = request.headers();
    // An active user's cookie is stamped again now and then, so that any
    // replica can later tell "idle" from the cookie alone.
    let stamp = ended::stamp_interval(session.profile.idle_timeout());
    let stamped_since = counts_as_activity.then(|| unix(now).saturating_sub(stamp.as_secs()));
    let mut pin_is_fresh = session.with_issued_pin(|last| {
        state
            .cookies
            .is_fresh(headers, &identity.sub, &session.lease.backend, last, now, stamped_since)
    });
    // Backends that can be replaced (pods) are replaced when they refuse
    // connections; a request that can be sent again is, once.
    // Only a request that may start a session is sent to a replacement: a
    // page's poll or ping finding its pod dead takes no new GPU.
    let replaceable = session.profile.allocator.replaces_unreachable();
    let replay = if replaceable && may_start_session(&request, counts_as_activity) {
        replayable(&request)
    } else {
        None
    };
    let exchange = Exchange {
        session: &session,
        client_ip,
        counts_as_activity,
        upgrade,
    };
    let first = state.forwarder.forward(request, exchange).await;
    let mut response = match first {
        // The allocator learns of every refusal (a static pool marks the box
        // down) and says whether the user moves off it.
        Err(unreachable @ ProxyError::Connect { .. }) if session.profile.allocator.refused(&session.lease) => {
            // Boxed: rare, and it would make every request's future larger.
            let (replaced, response) =
                Box::pin(replace_dead_backend(state, &identity, exchange, unreachable, replay)).await?;
            (session, pin_is_fresh) = (replaced, false);
            response
        }
        result => result?,
    };
    if !pin_is_fresh {
        let last_active = if counts_as_activity {
            now
        } else {
            now - session.activity.idle_for()
        };
        let pin = Pin::of(&session, last_active);
        let (cookie, issued) = state.cookies.issue(&identity.sub, pin, now);
        session.remember_pin(issued);
        response.headers_mut().append(SET_COOKIE, cookie);
    }
    Ok(response)
}

/// What a request of a user who has no session on this replica may do.
/// Called only then: a user with a session costs no MAC check here.
///
/// - No (valid) pinning cookie: allocate if the request shows intent (a
///   navigation or an API client) and is not to an activity-ignored path,
///   from the profile it names or, naming none, the only one the user may
///   use; a browser may choose among several (the chooser), an API client
///   gets the default. Else nothing.
/// - A cookie naming a backend that was released (the cookie says so, this
///   replica or the backend system remembers, or its stamps show the user
///   idle or the lifetime run out): nothing; the answer says why, and its
///   cookie records that for every replica.
/// - A cookie of a user active a moment ago: re-attach the backend it
///   names. Should this replica not see it as theirs (its view lagging, or
///   the pod gone), the user's own backend is looked for; failing that,
///   only a request that shows intent and counts as activity allocates
///   (a dead pod's user gets a new one on their next navigation), from the
///   same profile.
fn claim<B>(
    state: &AppState,
    identity: &Identity,
    request: &Request<B>,
    counts_as_activity: bool,
    now: SystemTime,
) -> Result<Claim, SessionError> {
    let headers = request.headers();
    // A cookie of a profile gone from the config, or no longer the user's,
    // pins nothing.
    let pinned = state
        .cookies
        .read(headers, &identity.sub, now)
        .and_then(|pin| Some((choose::pinned(state.registry.profiles(), identity, &pin)?, pin)));
    let Some((profile, pin)) = pinned else {
        if !may_start_session(request, counts_as_activity) {
            return Err(SessionError::NoSession);
        }
        let browser = Intent::of(request.method(), request.headers()) == Intent::Navigation;
        let next = || request.uri().path_and_query().map_or("/", |p| p.as_str()).to_string();
        let named = choose::named(headers, request.uri());
        return choose::claim(state.registry.profiles(), identity, named, None, browser, next);
    };
    if let Some(ended) = pin.ended {
        return Err(SessionError::Ended(Box::new(Notice { ended, cookie: None })));
    }
    if let Some(ended) = released(state, identity, &profile, &pin, now) {
        let (cookie, _) = state.cookies.issue(
            &identity.sub,
            Pin {
                ended: Some(ended),
                ..pin
            },
            now,
        );
        let cookie = Some(cookie);
        return Err(SessionError::Ended(Box::new(Notice { ended, cookie })));
    }
    Ok(Claim::Adopt {
        pin: pin.backend,
        profile,
        or_allocate: may_start_session(request, counts_as_activity),
    })
}

/// Whether `request` may get its user a backend: it shows intent (a
/// navigation, an API client) and is not to an activity-ignored path.
fn may_start_session<B>(request: &Request<B>, counts_as_activity: bool) -> bool {
    counts_as_activity && Intent::of(request.method(), request.headers()).starts_a_session()
}

/// Why the backend `pin` names (of `profile`) is not the user's any more,
/// if the cookie, this replica, the backend system or the cookie's stamps
/// say so.
fn released(state: &AppState, identity: &Identity, profile: &Profile, pin: &Pin, now: SystemTime) -> Option<Ended> {
    pin.ended
        .or_else(|| state.registry.ended(identity, profile, &pin.backend.backend))
        .or_else(|| {
            let elsewhere = pinned_lease(pin).and_then(|lease| profile.allocator.activity_elsewhere(&lease));
            ended::presumed(
                pin.backend.allocated_at,
                pin.last_active,
                elsewhere,
                profile.idle_timeout(),
                profile.max_lifetime(),
                now,
            )
        })
}

/// The lease a pin names, to look its backend up by.
fn pinned_lease(pin: &Pin) -> Option<Lease> {
    Some(Lease {
        backend: pin.backend.backend.as_str().into(),
        upstream: pin.backend.upstream.parse().ok()?,
    })
}

/// The user's backend refused the connection: gives it back, and sends the
/// request (when it can go again) to a new one, which the cookie cannot
/// name yet.
async fn replace_dead_backend(
    state: &AppState,
    identity: &Identity,
    first: Exchange<'_>,
    unreachable: ProxyError,
    replay: Option<Request<Empty<Bytes>>>,
) -> Result<(Arc<Session>, Response<UpstreamBody>), RouterError> {
    let dead = first.session;
    tracing::warn!(user_id = %telemetry::user_id(&identity.sub), backend = %dead.lease, error = %unreachable, "backend unreachable; replacing it");
    state.registry.release(dead, ReleaseReason::DeadPod).await?;
    let Some(request) = replay else {
        return Err(unreachable.into());
    };
    let profile = dead.profile.clone();
    let session = state
        .registry
        .get_or_allocate(identity, || Ok(Claim::Allocate(profile)))
        .await?;
    let exchange = Exchange {
        session: &session,
        ..first
    };
    let response = state.forwarder.forward(request, exchange).await?;
    Ok((session, response))
}

/// A copy of the request to send again if the first attempt never reached
/// the backend: only for idempotent methods without a body.
fn replayable<B: http_body::Body>(request: &Request<B>) -> Option<Request<Empty<Bytes>>> {
    if !request.method().is_idempotent() || !http_body::Body::is_end_stream(request.body()) {
        return None;
    }
    let mut copy = Request::new(Empty::new());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    *copy.extensions_mut() = request.extensions().clone();
    Some(copy)
}

/// Load-balancer and kubelet liveness: no token, no detail.
pub async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready once tokens can be verified and a profile's backend can be asked. The
/// body names the backends that do not answer (by their ids only): one
/// dead box among several is news for the operator, not a reason to take
/// this replica out of the load balancer.
pub async fn readyz(State(state): Shared) -> Response {
    let profiles = state.registry.profiles();
    // One pool that cannot be asked (its API unreachable, its Service not
    // listed yet) must not take the others' users out of the load
    // balancer: ready while any profile is; the rest are named.
    let unready: Vec<&str> = profiles
        .iter()
        .filter(|p| !p.allocator.is_ready())
        .map(|p| p.name())
        .collect();
    let ready = state.auth.is_ready() && unready.len() < profiles.len();
    let (status, mut body) = if ready {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n".to_string())
    };
    if ready && !unready.is_empty() {
        body.push_str(&format!("profiles not ready: {}\n", unready.join(" ")));
    }
    let down: Vec<Lease> = profiles.iter().flat_map(|p| p.allocator.down()).collect();
    if !down.is_empty() {
        let names: Vec<&str> = down.iter().map(|lease| &*lease.backend).collect();
        body.push_str(&format!("down: {}\n", names.join(" ")));
    }
    (status, body).into_response()
}

/// The signed-in user's session, as JSON or as a small page.
pub async fn status(State(state): Shared, headers: HeaderMap) -> Result<Response, RouterError> {
    let identity = state.identify(&headers).await?;
    let session = state.registry.get(&identity.sub);
    let waiting = state.registry.place(&identity).await;
    let retry_after = state.config.session.retry_after.as_secs().max(1);
    let now = SystemTime::now();
    // Holding none, the user is told why their last one went.
    let ended = session
        .is_none()
        .then(|| state.cookies.read(&headers, &identity.sub, now))
        .flatten()
        .and_then(|pin| {
            released(
                &state,
                &identity,
                &*choose::pinned(state.registry.profiles(), &identity, &pin)?,
                &pin,
                now,
            )
        });
    let choices = state.registry.profiles().for_user(&identity).count();
    if !crate::util::wants_html(&headers) {
        let line = waiting.as_ref().map(|(profile, p)| json!({ "profile": profile.name(), "position": p.position, "waiting": p.waiting, "retry_after": retry_after }));
        let session = session.map(|s| {
            json!({
                "profile": s.profile.name(),
                "backend": &*s.lease.backend,
                "upstream": s.lease.upstream.as_str(),
                "allocated_at": humantime::format_rfc3339_seconds(s.allocated_at).to_string(),
                "idle_seconds": s.activity.idle_for().as_secs(),
                "idle_timeout_seconds": s.profile.idle_timeout().as_secs(),
            })
        });
        let ended = ended.map(|e| {
            json!({
                "reason": e.reason.as_str(),
                "released_at": humantime::format_rfc3339_seconds(e.at()).to_string(),
            })
        });
        return Ok(Json(
            json!({ "user": &*identity.email, "session": session, "line": line, "ended": ended, "profiles": choices }),
        )
        .into_response());
    }
    Ok(status_page(
        &identity,
        session.as_deref(),
        waiting.map(|(_, place)| place),
        ended,
        choices,
    )
    .into_response())
}

fn status_page(
    identity: &Identity,
    session: Option<&Session>,
    place: Option<Place>,
    ended: Option<Ended>,
    choices: usize,
) -> axum::response::Html<String> {
    let user = escape(&identity.email);
    let choose = if choices > 1 {
        format!(r#"<p><a href="{}">Choose a GPU pool</a></p>"#, pages::PROFILES)
    } else {
        String::new()
    };
    let body = match session {
        Some(s) => format!(
            r#"<p>Signed in as <strong>{user}</strong>.</p>
<dl><dt>Profile</dt><dd id="profile" data-profile="{profile}">{title}</dd>
<dt>Backend</dt><dd>{backend}</dd>
<dt>Allocated at</dt><dd>{allocated}</dd>
<dt>Idle for</dt><dd>{idle} s (released after {idle_timeout} s idle)</dd></dl>
<form method="post" action="/_router/release"><button type="submit">Release my GPU now</button></form>{switch}
<p><a href="/">Back to the WebUI</a></p>"#,
            profile = escape(s.profile.name()),
            title = escape(&s.profile.config.title),
            backend = escape(&s.lease.to_string()),
            allocated = humantime::format_rfc3339_seconds(s.allocated_at),
            idle = s.activity.idle_for().as_secs(),
            idle_timeout = s.profile.idle_timeout().as_secs(),
            switch = if choices > 1 {
                format!(
                    r#"
<form method="post" action="{}"><button type="submit">Switch: release it and choose another GPU pool</button></form>"#,
                    pages::SWITCH
                )
            } else {
                String::new()
            },
        ),
        None => match place {
            Some(place) => format!(
                r#"<p>Signed in as <strong>{user}</strong>. All GPUs are in use.</p>
<p><strong>{standing}</strong></p>
<p><a href="/">Keep the WebUI tab open</a> to keep your place.</p>"#,
                standing = pages::line_sentence(place),
            ),
            None => format!(
                r#"<p>Signed in as <strong>{user}</strong>. You hold no GPU right now.</p>{why}
<form method="post" action="{start}"><input type="hidden" name="next" value="/"><button type="submit">Start again</button></form>{choose}"#,
                why = ended.map_or_else(String::new, |e| format!(
                    r#"<p>Your last one was released <strong id="reason" data-reason="{reason}">{sentence}</strong>, at <time>{at}</time>.</p>"#,
                    reason = e.reason.as_str(),
                    sentence = e.reason.sentence(),
                    at = humantime::format_rfc3339_seconds(e.at()),
                )),
                start = pages::START,
            ),
        },
    };
    axum::response::Html(pages::document(
        "Your session",
        &body,
        Some(std::time::Duration::from_secs(30)),
    ))
}

/// Gives the user's backend back now. The cookie then says "released by
/// you", to whichever replica the user's next request reaches.
pub async fn release(State(state): Shared, headers: HeaderMap) -> Result<Response, RouterError> {
    check_origin(&state, &headers)?;
    let identity = state.identify(&headers).await?;
    // Held here, or found through the backend system (served by another
    // replica): either way the cookie then says "released by you".
    let session = state.registry.release_users(&identity, ReleaseReason::User).await?;
    let released = session.is_some();
    let mut response = if crate::util::wants_html(&headers) {
        pages::redirect("/_router/status")
    } else {
        Json(json!({ "released": released })).into_response()
    };
    let cookie = match session {
        Some(session) => {
            let now = SystemTime::now();
            let mut pin = Pin::of(&session, now);
            pin.ended = Some(Ended::new(ReleaseReason::User, now));
            state.cookies.issue(&identity.sub, pin, now).0
        }
        None => state.cookies.clear(),
    };
    response.headers_mut().append(SET_COOKIE, cookie);
    Ok(response)
}

#[derive(Deserialize)]
pub struct StartForm {
    next: Option<String>,
    /// The profile to start; unset: the one the user's last GPU came from,
    /// or the only one they may use.
    profile: Option<String>,
}

/// "Start" and "Start again": gets the user a backend (their own if they
/// still hold one, in any profile) and sends the browser on to `next`, the
/// WebUI. Waiting in line, or on any other failure, the browser goes there
/// too (naming the profile when there is a choice): the page it then gets
/// (the waiting page, "try again") refreshes itself with a GET of `next`,
/// not of this POST-only address.
pub async fn start(
    State(state): Shared,
    headers: HeaderMap,
    form: Result<Form<StartForm>, FormRejection>,
) -> Result<Response, RouterError> {
    check_origin(&state, &headers)?;
    let identity = state.identify(&headers).await?;
    let (next, named) = match form {
        Ok(Form(form)) => (safe_next(form.next.as_deref()), form.profile),
        Err(_) => (safe_next(None), None),
    };
    let wants_html = crate::util::wants_html(&headers);
    let now = SystemTime::now();
    let profiles = state.registry.profiles();
    let pinned = state
        .cookies
        .read(&headers, &identity.sub, now)
        .and_then(|pin| Some((choose::pinned(profiles, &identity, &pin)?, pin)));
    // A backend the cookie says the user still holds is theirs, whatever
    // they name: one backend a user. Else the profile named, or the one of
    // their last backend.
    let claim = match pinned {
        Some((profile, pin)) if released(&state, &identity, &profile, &pin, now).is_none() => Claim::Adopt {
            pin: pin.backend,
            profile,
            or_allocate: true,
        },
        Some((profile, _)) => choose::claim(profiles, &identity, named, Some(profile), wants_html, || next.clone())?,
        None => choose::claim(profiles, &identity, named, None, wants_html, || next.clone())?,
    };
    // Where a browser whose start did not succeed goes: `next`, naming the
    // profile it asked for when there is a choice, so its reloads ask again.
    let retry = match (&claim, profiles.len() > 1) {
        (Claim::Allocate(profile), true) => with_profile(&next, profile.name()),
        (Claim::Adopt { profile, .. }, true) => with_profile(&next, profile.name()),
        _ => next.clone(),
    };
    let session = match state.registry.get_or_allocate(&identity, || Ok(claim)).await {
        Ok(session) => session,
        Err(e @ SessionError::ChooseProfile { .. }) => return Err(e.into()),
        Err(_) if wants_html => {
            let mut response = pages::redirect(&retry);
            response.headers_mut().append(SET_COOKIE, state.cookies.clear());
            return Ok(response);
        }
        Err(e) => return Err(e.into()),
    };
    let pin = Pin::of(&session, now);
    let (cookie, issued) = state.cookies.issue(&identity.sub, pin, now);
    session.remember_pin(issued);
    let mut response = if wants_html {
        pages::redirect(&next)
    } else {
        Json(json!({ "backend": &*session.lease.backend, "profile": session.profile.name() })).into_response()
    };
    response.headers_mut().append(SET_COOKIE, cookie);
    Ok(response)
}

/// `next` with `profile=NAME` in its query: where a browser that started
/// a profile but waits goes, so its reloads keep asking for that profile.
fn with_profile(next: &str, profile: &str) -> String {
    let separator = if next.contains('?') { '&' } else { '?' };
    format!("{next}{separator}profile={}", pages::percent_encode(profile))
}

#[derive(Deserialize)]
pub struct ChooserQuery {
    next: Option<String>,
}

/// `GET /_router/profiles`: the profiles the user may use, each with what
/// is free and who waits: the chooser page for a browser, JSON otherwise.
/// A profile the user may not use is never listed.
pub async fn profiles(
    State(state): Shared,
    headers: HeaderMap,
    Query(query): Query<ChooserQuery>,
) -> Result<Response, RouterError> {
    let identity = state.identify(&headers).await?;
    let held = state
        .registry
        .held_profile(&identity)
        .await
        .map_err(SessionError::from)?;
    let current = held.map(|profile| profile.name().to_string());
    let mut cards = Vec::new();
    for profile in state.registry.profiles().for_user(&identity) {
        cards.push(pages::Card {
            name: profile.name().to_string(),
            title: profile.config.title.clone(),
            description: profile.config.description.clone(),
            default: profile.config.default,
            backend: profile.config.backend.kind.label(),
            free: profile.allocator.capacity().ready,
            waiting: profile.line.waiting().await,
        });
    }
    if !crate::util::wants_html(&headers) {
        return Ok(Json(json!({ "profiles": cards, "current": current })).into_response());
    }
    let next = safe_next(query.next.as_deref());
    Ok(pages::chooser(&cards, &next, current.as_deref()))
}

/// "Switch": releases the user's GPU (wherever it is held) and sends a
/// browser to the chooser. The cookie is cleared rather than marked
/// "released": the user is choosing again, not told their GPU went.
pub async fn switch(State(state): Shared, headers: HeaderMap) -> Result<Response, RouterError> {
    check_origin(&state, &headers)?;
    let identity = state.identify(&headers).await?;
    let session = state.registry.release_users(&identity, ReleaseReason::User).await?;
    let mut response = if crate::util::wants_html(&headers) {
        pages::redirect(pages::PROFILES)
    } else {
        Json(json!({ "released": session.is_some(), "choose": pages::PROFILES })).into_response()
    };
    response.headers_mut().append(SET_COOKIE, state.cookies.clear());
    Ok(response)
}

/// Any other `/_router/…` path: reserved, never proxied.
pub async fn not_found() -> RouterError {
    RouterError::NotFound
}

#[derive(Deserialize)]
pub struct SignInQuery {
    next: Option<String>,
}

#[derive(Deserialize)]
pub struct SignInForm {
    name: String,
    next: Option<String>,
}

/// Dev mode: the sign-in form.
pub async fn dev_sign_in_form(State(state): Shared, Query(query): Query<SignInQuery>) -> Response {
    if state.auth.dev().is_none() {
        return RouterError::NotFound.into_response();
    }
    sign_in_page(StatusCode::OK, &safe_next(query.next.as_deref()), None)
}

/// Dev mode: signs the typed name in and goes on to where the browser was
/// heading.
pub async fn dev_sign_in(
    State(state): Shared,
    headers: HeaderMap,
    Form(form): Form<SignInForm>,
) -> Result<Response, RouterError> {
    let Some(dev) = state.auth.dev() else {
        return Err(RouterError::NotFound);
    };
    check_origin(&state, &headers)?;
    let next = safe_next(form.next.as_deref());
    let Some(value) = dev.sign_in(&form.name) else {
        return Ok(sign_in_page(
            StatusCode::BAD_REQUEST,
            &next,
            Some("Use 1 to 64 letters, digits or . - _ @ +"),
        ));
    };
    let mut response = pages::redirect(&next);
    let cookie = set_cookie(dev.cookie_name(), &value, Some(state.config.session.cookie_ttl));
    response.headers_mut().append(SET_COOKIE, cookie);
    Ok(response)
}

/// Dev mode: forgets the signed-in name (the backend stays until idle).
pub async fn dev_sign_out(State(state): Shared, headers: HeaderMap) -> Result<Response, RouterError> {
    let Some(dev) = state.auth.dev() else {
        return Err(RouterError::NotFound);
    };
    check_origin(&state, &headers)?;
    let mut response = pages::redirect("/_router/dev/login");
    response.headers_mut().append(
        SET_COOKIE,
        set_cookie(dev.cookie_name(), "", Some(std::time::Duration::ZERO)),
    );
    Ok(response)
}

fn sign_in_page(status: StatusCode, next: &str, error: Option<&str>) -> Response {
    let error = error
        .map(|e| format!(r#"<p style="color:#b00">{}</p>"#, escape(e)))
        .unwrap_or_default();
    let body = format!(
        r#"<p>Demo sign-in: type any name. Each name gets its own backend.</p>{error}
<form method="post" action="/_router/dev/login">
<input type="hidden" name="next" value="{next}">
<input name="name" autofocus required maxlength="64" placeholder="alice">
<button type="submit">Sign in</button></form>
<p class="muted">This page exists only in <code>auth.mode = "dev"</code>. In production, Cloud IAP signs users in.</p>"#,
        next = escape(next),
    );
    (status, axum::response::Html(pages::document("Sign in", &body, None))).into_response()
}

/// Only a local absolute path may be a redirect target (no `//host`).
fn safe_next(next: Option<&str>) -> String {
    match next {
        // Browsers drop tabs and newlines from a URL and read `\` as `/`:
        // `/\t/evil.example` would leave the site as `//evil.example`.
        Some(n)
            if n.starts_with('/')
                && !n.starts_with("//")
                && !n.contains('\\')
                && !n.bytes().any(|b| b.is_ascii_control()) =>
        {
            n.to_string()
        }
        _ => "/".to_string(),
    }
}

fn check_origin(state: &AppState, headers: &HeaderMap) -> Result<(), RouterError> {
    origin::check(headers, &state.config.server.allowed_origins).map_err(RouterError::CrossOrigin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_after_sign_in_stay_on_this_site() {
        assert_eq!(safe_next(Some("/queue?x=1")), "/queue?x=1");
        assert_eq!(safe_next(Some("//evil.example/")), "/");
        assert_eq!(safe_next(Some("https://evil.example/")), "/");
        assert_eq!(safe_next(Some("/\\evil.example")), "/");
        assert_eq!(safe_next(Some("/\t/evil.example/")), "/");
        assert_eq!(safe_next(Some("/\t\\evil.example")), "/");
        assert_eq!(safe_next(Some("/\n/evil.example")), "/");
        assert_eq!(safe_next(Some("/x\\..\\/evil")), "/");
        assert_eq!(safe_next(None), "/");
    }
}
