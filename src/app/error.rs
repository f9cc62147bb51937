//! The one place where failures become HTTP responses.
//!
//! Handlers return [`RouterError`]. Its `IntoResponse` only picks the status
//! and parks the error in a response extension; [`render_errors`], a layer
//! that knows the request (does it want HTML?), logs the full reason and
//! renders the page. Clients never see the reason: a rejected token is a bare
//! 401, an unreachable pod a readable 502 that keeps the session.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{StatusCode, Uri};

use crate::allocator::AllocError;
use crate::app::pages;
use crate::auth::AuthError;
use crate::proxy::ProxyError;
use crate::session::SessionError;

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("authentication: {0}")]
    Auth(#[from] AuthError),
    #[error("session: {0}")]
    Session(#[from] SessionError),
    #[error("proxy: {0}")]
    Proxy(#[from] ProxyError),
    #[error("cross-origin request from {0:?}")]
    CrossOrigin(String),
    #[error("no such router endpoint")]
    NotFound,
    #[error("not an admin")]
    NotAdmin,
    #[error("request URI of {0} bytes is over the limit")]
    UriTooLong(usize),
}

/// What a response needs to carry for [`render_errors`] to render it.
#[derive(Clone)]
struct Failure(Arc<RouterError>);

impl RouterError {
    pub fn status(&self) -> StatusCode {
        match self {
            RouterError::Auth(AuthError::NotAllowed(_)) | RouterError::CrossOrigin(_) | RouterError::NotAdmin => {
                StatusCode::FORBIDDEN
            }
            RouterError::Auth(AuthError::KeysUnavailable) => StatusCode::SERVICE_UNAVAILABLE,
            RouterError::Auth(AuthError::SignInRequired) => StatusCode::SEE_OTHER,
            RouterError::Auth(_) => StatusCode::UNAUTHORIZED,
            RouterError::Session(SessionError::Ended(_) | SessionError::NoSession) => StatusCode::CONFLICT,
            RouterError::Session(SessionError::ChooseProfile { .. }) => StatusCode::SEE_OTHER,
            RouterError::Session(SessionError::ProfileNotAllowed(_)) => StatusCode::FORBIDDEN,
            RouterError::Session(_) => StatusCode::SERVICE_UNAVAILABLE,
            RouterError::Proxy(ProxyError::ClientBody { .. }) => StatusCode::BAD_REQUEST,
            RouterError::Proxy(_) => StatusCode::BAD_GATEWAY,
            RouterError::NotFound => StatusCode::NOT_FOUND,
            RouterError::UriTooLong(_) => StatusCode::URI_TOO_LONG,
        }
    }
}

impl IntoResponse for RouterError {
    fn into_response(self) -> Response {
        let mut response = self.status().into_response();
        response.extensions_mut().insert(Failure(Arc::new(self)));
        response
    }
}

/// Settings the error pages need.
#[derive(Clone)]
pub struct ErrorPages {
    pub retry_after: Duration,
}

/// Logs and renders every [`RouterError`] returned below this layer (the
/// router's own endpoints; the proxy path calls [`render`] itself).
pub async fn render_errors(State(settings): State<ErrorPages>, request: Request, next: Next) -> Response {
    let wants_html = crate::util::wants_html(request.headers());
    let uri = request.uri().clone();
    let mut response = next.run(request).await;
    let Some(Failure(error)) = response.extensions_mut().remove::<Failure>() else {
        return response;
    };
    let mut page = render(&error, wants_html, &uri, &settings);
    // Keep any cookie the handler already set.
    for value in response.headers().get_all(http::header::SET_COOKIE) {
        page.headers_mut().append(http::header::SET_COOKIE, value.clone());
    }
    page
}

/// Logs `error` with its full reason and renders the page the client gets
/// (HTML when it asked for it), which never carries the reason.
pub fn render(error: &RouterError, wants_html: bool, uri: &Uri, settings: &ErrorPages) -> Response {
    match error {
        RouterError::Proxy(ProxyError::ClientBody { .. }) => {
            tracing::info!(path = uri.path(), error = %error, "request refused")
        }
        RouterError::Proxy(_) | RouterError::Session(SessionError::Alloc(AllocError::Backend { .. })) => {
            tracing::warn!(path = uri.path(), error = %error, "request failed")
        }
        RouterError::Auth(e) => {
            tracing::info!(path = uri.path(), class = e.class(), reason = %e, "request rejected")
        }
        _ => tracing::info!(path = uri.path(), error = %error, "request refused"),
    }
    let retry = settings.retry_after;
    match error {
        RouterError::Auth(AuthError::SignInRequired) if wants_html => pages::sign_in_redirect(uri),
        RouterError::Auth(AuthError::NotAllowed(_)) => {
            pages::forbidden(wants_html, "Your account is not allowed to use this service.")
        }
        RouterError::CrossOrigin(_) => pages::forbidden(wants_html, "Cross-site requests are not allowed."),
        RouterError::NotAdmin => pages::forbidden(wants_html, "This page is for administrators."),
        RouterError::Auth(AuthError::KeysUnavailable) => pages::starting_up(wants_html, retry),
        RouterError::Auth(_) => pages::unauthorized(),
        RouterError::Session(SessionError::Alloc(AllocError::Backend { .. } | AllocError::Conflict)) => {
            pages::backend_unavailable(wants_html, retry)
        }
        RouterError::Session(SessionError::Waiting(place, profile)) => {
            let pool = profile.as_ref().map(|p| (p.name(), p.config.title.as_str()));
            pages::waiting(wants_html, retry, Some(*place), pool)
        }
        RouterError::Session(SessionError::Ended(notice)) => {
            let mut page = pages::session_ended(wants_html, Some(&notice.ended), uri);
            if let Some(cookie) = &notice.cookie {
                page.headers_mut().append(http::header::SET_COOKIE, cookie.clone());
            }
            page
        }
        RouterError::Session(SessionError::NoSession) => pages::session_ended(wants_html, None, uri),
        RouterError::Session(SessionError::ChooseProfile { next }) => pages::redirect(&pages::chooser_for(next)),
        RouterError::Session(SessionError::ProfileNotAllowed(_)) => pages::forbidden(
            wants_html,
            "This GPU profile does not exist, or is not one you may use.",
        ),
        RouterError::Session(_) => pages::waiting(wants_html, retry, None, None),
        RouterError::UriTooLong(_) | RouterError::Proxy(ProxyError::ClientBody { .. }) => {
            pages::client_error(error.status())
        }
        RouterError::Proxy(_) => pages::bad_gateway(wants_html, retry),
        RouterError::NotFound => pages::not_found(wants_html),
    }
}
