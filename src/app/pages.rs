//! The pages the router itself serves: waiting, errors, the session status
//! page and the dev sign-in. Browsers (`Accept: text/html`) get small HTML
//! pages that reload themselves (no script: IAP would turn a fetch() into a
//! CORS failure once its session expires); everyone else gets JSON.

use std::time::Duration;

use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use http::header::{HeaderValue, CACHE_CONTROL, LOCATION, RETRY_AFTER};
use http::{StatusCode, Uri};
use serde_json::json;

use crate::allocator::Ended;
use crate::session::Place;

/// Where "Start again" posts to.
pub const START: &str = "/_router/start";
/// The profile chooser (HTML), or the profiles as JSON.
pub const PROFILES: &str = "/_router/profiles";

/// The chooser, which then goes on to `next`.
pub fn chooser_for(next: &str) -> String {
    if next == "/" {
        PROFILES.to_string()
    } else {
        format!("{PROFILES}?next={}", percent_encode(next))
    }
}

/// Escapes text for HTML element content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A complete HTML document; `refresh` makes the browser reload it.
pub fn document(title: &str, body: &str, refresh: Option<Duration>) -> String {
    let refresh = refresh
        .map(|d| format!(r#"<meta http-equiv="refresh" content="{}">"#, d.as_secs().max(1)))
        .unwrap_or_default();
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
{refresh}<title>{title}</title>
<style>
body{{font-family:system-ui,sans-serif;max-width:36rem;margin:4rem auto;padding:0 1rem;color:#222;line-height:1.5}}
h1{{font-size:1.4rem}} .muted{{color:#666;font-size:.9rem}} dt{{font-weight:600}} dd{{margin:0 0 .5rem 0}}
button,input{{font:inherit;padding:.4rem .8rem}}
</style></head>
<body>
<h1>{title}</h1>
{body}
</body></html>
"#,
        title = escape(title),
    )
}

fn html(status: StatusCode, title: &str, body: &str, refresh: Option<Duration>) -> Response {
    let mut response = (status, Html(document(title, body, refresh))).into_response();
    response
        .headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn json_error(status: StatusCode, error: &str, message: &str) -> Response {
    let mut response = (status, Json(json!({ "error": error, "message": message }))).into_response();
    response
        .headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn with_retry_after(mut response: Response, retry: Duration) -> Response {
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(retry.as_secs().max(1)));
    response
}

/// 503 while no backend is free: never a 200, always a `Retry-After`.
/// `pool`: the profile (name, title) whose line the user is in, when they
/// had a choice of several.
pub fn waiting(wants_html: bool, retry: Duration, place: Option<Place>, pool: Option<(&str, &str)>) -> Response {
    let seconds = retry.as_secs().max(1);
    let response = if wants_html {
        let standing = place.map_or_else(String::new, |p| format!("<p><strong>{}</strong></p>", line_sentence(p)));
        let pool_html = pool.map_or_else(String::new, |(name, title)| {
            format!(
                r#"<p id="pool" data-profile="{name}">In line for <strong>{title}</strong>. <a href="{PROFILES}">Choose another pool</a></p>"#,
                name = escape(name),
                title = escape(title),
            )
        });
        html(
            StatusCode::SERVICE_UNAVAILABLE,
            "Waiting for a free GPU",
            &format!(
                "{standing}{pool_html}<p>All GPUs are in use right now. This page tries again every {seconds} seconds and \
                 opens your WebUI as soon as one is free; keep it open to keep your place.</p>\
                 <p class=\"muted\">GPUs are given back when their users have been idle for a while.</p>"
            ),
            Some(retry),
        )
    } else {
        let mut body = json!({
            "error": "no_capacity",
            "message": "no backend is free; retry after the Retry-After delay to keep your place in line",
            "retry_after": seconds,
        });
        if let Some(p) = place {
            body["position"] = json!(p.position);
            body["waiting"] = json!(p.waiting);
        }
        if let Some((name, _)) = pool {
            body["profile"] = json!(name);
        }
        let mut response = (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
        response
            .headers_mut()
            .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
    };
    with_retry_after(response, retry)
}

/// 409 for a user who holds no backend and whose request does not start
/// one: `ended` says why their last one went, `None` that there was none
/// (a background request, a ping). A browser gets a page with a "Start
/// again" button that leads back to `uri`; nothing reloads by itself,
/// since an open tab must not take a GPU back on its own.
pub fn session_ended(wants_html: bool, ended: Option<&Ended>, uri: &Uri) -> Response {
    let at = ended.map(|e| humantime::format_rfc3339_seconds(e.at()).to_string());
    if !wants_html {
        let mut body = json!({
            "error": if ended.is_some() { "session_ended" } else { "no_session" },
            "reason": ended.map(|e| e.reason.as_str()),
            "start": START,
            "message": "you hold no GPU; open the WebUI or POST to `start` to get one",
        });
        if let Some(at) = at {
            body["released_at"] = json!(at);
        }
        let mut response = (StatusCode::CONFLICT, Json(body)).into_response();
        response
            .headers_mut()
            .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        return response;
    }
    let next = uri.path_and_query().map_or("/", |p| p.as_str());
    let (title, said) = match (ended, at) {
        (Some(ended), Some(at)) => (
            "Your GPU was released",
            format!(
                r#"<p>Your GPU was released <strong id="reason" data-reason="{reason}">{why}</strong>, at <time>{at}</time>.</p>"#,
                reason = ended.reason.as_str(),
                why = ended.reason.sentence(),
            ),
        ),
        _ => ("You hold no GPU", "<p>You hold no GPU right now.</p>".to_string()),
    };
    let body = format!(
        r#"{said}
<p>Your open WebUI page belonged to it. Start again to get a GPU and a fresh WebUI page.</p>
<form method="post" action="{START}"><input type="hidden" name="next" value="{next}"><button type="submit">Start again</button></form>
<p class="muted"><a href="/_router/status">Session status</a></p>"#,
        next = escape(next),
    );
    html(StatusCode::CONFLICT, title, &body, None)
}

/// "You are number 3 in line (2 people behind you)." — said the same way
/// on the waiting page and the status page.
pub fn line_sentence(place: Place) -> String {
    let head = if place.position == 1 {
        ": the next GPU freed is yours"
    } else {
        ""
    };
    let behind = match place.waiting - place.position {
        0 => String::new(),
        1 => " (1 person behind you)".to_string(),
        n => format!(" ({n} people behind you)"),
    };
    format!("You are number {} in line{head}{behind}.", place.position)
}

/// 503 when the backend system (Kubernetes, the allocator) failed: the user
/// is told it is a hiccup, not a queue.
pub fn backend_unavailable(wants_html: bool, retry: Duration) -> Response {
    let response = if wants_html {
        html(
            StatusCode::SERVICE_UNAVAILABLE,
            "GPU scheduler unavailable",
            "<p>The GPU scheduler did not answer. This page tries again by itself.</p>",
            Some(retry),
        )
    } else {
        json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "backend_unavailable",
            "the backend system did not answer; retry after the Retry-After delay",
        )
    };
    with_retry_after(response, retry)
}

/// 503 until the signing keys are loaded.
pub fn starting_up(wants_html: bool, retry: Duration) -> Response {
    let response = if wants_html {
        html(
            StatusCode::SERVICE_UNAVAILABLE,
            "Starting up",
            "<p>The router is still starting. This page reloads by itself.</p>",
            Some(retry),
        )
    } else {
        json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "starting",
            "the router is not ready yet",
        )
    };
    with_retry_after(response, retry)
}

/// 502 when the user's backend does not answer. The session is kept, so the
/// reload reaches the same backend once it is back.
pub fn bad_gateway(wants_html: bool, retry: Duration) -> Response {
    let response = if wants_html {
        html(
            StatusCode::BAD_GATEWAY,
            "Your WebUI is not answering",
            "<p>Your GPU server did not answer. It may still be starting, or restarting. \
             Your session is kept; this page tries again by itself.</p>\
             <p class=\"muted\"><a href=\"/_router/status\">Session status</a></p>",
            Some(retry),
        )
    } else {
        json_error(
            StatusCode::BAD_GATEWAY,
            "upstream_unavailable",
            "your backend did not answer; the session is kept",
        )
    };
    with_retry_after(response, retry)
}

/// 401 with nothing that says why.
pub fn unauthorized() -> Response {
    let mut response = (StatusCode::UNAUTHORIZED, "Unauthorized\n").into_response();
    response
        .headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

pub fn forbidden(wants_html: bool, message: &str) -> Response {
    if wants_html {
        html(
            StatusCode::FORBIDDEN,
            "Not allowed",
            &format!("<p>{}</p>", escape(message)),
            None,
        )
    } else {
        json_error(StatusCode::FORBIDDEN, "forbidden", message)
    }
}

/// A protocol-level refusal (400, 414): a short plain body, and the
/// connection is closed, since what follows on it cannot be trusted.
pub fn client_error(status: StatusCode) -> Response {
    let reason = status.canonical_reason().unwrap_or("Bad Request");
    let mut response = (status, format!("{reason}\n")).into_response();
    response
        .headers_mut()
        .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    response
}

pub fn not_found(wants_html: bool) -> Response {
    if wants_html {
        html(StatusCode::NOT_FOUND, "Not found", "<p>No such router page.</p>", None)
    } else {
        json_error(StatusCode::NOT_FOUND, "not_found", "no such router endpoint")
    }
}

/// Sends a browser that is not signed in (dev mode) to the sign-in form,
/// remembering where it was going.
pub fn sign_in_redirect(uri: &Uri) -> Response {
    let next = uri.path_and_query().map_or("/", |p| p.as_str());
    let location = format!("/_router/dev/login?next={}", percent_encode(next));
    redirect(&location)
}

/// One profile as the chooser shows it.
#[derive(Debug, serde::Serialize)]
pub struct Card {
    pub name: String,
    pub title: String,
    pub description: String,
    pub default: bool,
    /// The backend kind (`static`, `agones`, `agones-allocator`, `shared`).
    pub backend: &'static str,
    /// Backends (or, shared, users' slots) free right now.
    pub free: usize,
    /// People in its waiting line.
    pub waiting: usize,
}

/// The profile chooser: one card per profile the user may use, each with a
/// "Start" button (a same-origin POST to [`START`]) that goes on to
/// `next`. `current`: the profile of the GPU the user holds, whose card
/// opens it instead (one GPU a user: another means "Switch" first).
pub fn chooser(cards: &[Card], next: &str, current: Option<&str>) -> Response {
    let next = escape(next);
    let cards_html: String = cards
        .iter()
        .map(|card| {
            let name = escape(&card.name);
            let action = match current {
                Some(held) if held == card.name => {
                    format!(r#"<p><strong>You are using this one.</strong> <a href="{next}">Open it</a></p>"#)
                }
                Some(_) => r#"<p class="muted">Switch to use this one (you hold another GPU).</p>"#.to_string(),
                None => format!(
                    r#"<form method="post" action="{START}"><input type="hidden" name="profile" value="{name}"><input type="hidden" name="next" value="{next}"><button type="submit">Start</button></form>"#
                ),
            };
            format!(
                r#"<section class="card" id="profile-{name}" data-profile="{name}" style="border:1px solid #ccc;border-radius:.5rem;padding:.5rem 1rem;margin:1rem 0">
<h2 style="font-size:1.1rem">{title}{default}</h2>
<p>{description}</p>
<p class="muted"><span class="free">{free}</span> free now · <span class="waiting">{waiting}</span> waiting</p>
{action}
</section>"#,
                title = escape(&card.title),
                default = if card.default { " <small class=\"muted\">(default)</small>" } else { "" },
                description = escape(&card.description),
                free = card.free,
                waiting = card.waiting,
            )
        })
        .collect();
    let switch = match current {
        Some(_) => format!(
            r#"<form method="post" action="{SWITCH}"><button type="submit">Switch: release my GPU and choose again</button></form>"#
        ),
        None => String::new(),
    };
    let body = if cards.is_empty() {
        "<p>No GPU pool is open to your account. Ask the administrator for access.</p>".to_string()
    } else {
        format!("<p>Choose the GPU pool for your WebUI.</p>\n{cards_html}\n{switch}")
    };
    html(StatusCode::OK, "Choose a GPU", &body, None)
}

/// Where "Switch" posts to: releases the user's GPU, then the chooser.
pub const SWITCH: &str = "/_router/switch";

/// A 303 to a local path.
pub fn redirect(location: &str) -> Response {
    let mut response = StatusCode::SEE_OTHER.into_response();
    if let Ok(value) = HeaderValue::from_str(location) {
        response.headers_mut().insert(LOCATION, value);
    }
    response
}

pub fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_is_escaped() {
        assert_eq!(escape("<a href=\"x\">&'"), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;");
    }

    async fn body_of(response: Response) -> String {
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn the_chooser_escapes_what_it_shows_and_says_so_when_no_pool_is_open() {
        let card = Card {
            name: "sdxl".into(),
            title: "<b>SDXL</b>".into(),
            description: "\"quoted\" & more".into(),
            default: true,
            backend: "agones",
            free: 2,
            waiting: 1,
        };
        let page = body_of(chooser(&[card], "/?a=\"><script>", None)).await;
        assert!(
            page.contains("&lt;b&gt;SDXL&lt;/b&gt;") && page.contains("&quot;quoted&quot; &amp; more"),
            "{page}"
        );
        assert!(page.contains(r#"value="/?a=&quot;&gt;&lt;script&gt;""#), "{page}");
        assert!(page.contains(r#"<span class="free">2</span> free now · <span class="waiting">1</span> waiting"#));
        let none = body_of(chooser(&[], "/", None)).await;
        assert!(
            none.contains("No GPU pool is open to your account") && !none.contains("<form"),
            "{none}"
        );
    }

    #[test]
    fn the_waiting_page_is_a_503_with_retry_after_in_both_forms() {
        for html in [true, false] {
            let r = waiting(
                html,
                Duration::from_secs(7),
                Some(Place {
                    position: 2,
                    waiting: 3,
                }),
                None,
            );
            assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(r.headers()[RETRY_AFTER], "7");
        }
    }

    #[test]
    fn an_ended_session_is_a_409_that_says_why_and_offers_to_start_again() {
        let ended = Ended::new(crate::allocator::ReleaseReason::Idle, std::time::UNIX_EPOCH);
        let uri = Uri::from_static("/");
        for wants_html in [true, false] {
            for ended in [Some(&ended), None] {
                assert_eq!(session_ended(wants_html, ended, &uri).status(), StatusCode::CONFLICT);
            }
        }
    }

    #[test]
    fn the_place_in_line_is_said_in_words() {
        let at = |position, waiting| line_sentence(Place { position, waiting });
        assert_eq!(at(3, 5), "You are number 3 in line (2 people behind you).");
        assert_eq!(at(2, 3), "You are number 2 in line (1 person behind you).");
        assert_eq!(at(1, 1), "You are number 1 in line: the next GPU freed is yours.");
    }
}
