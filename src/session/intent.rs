//! Which requests show that the user wants a GPU. Only those allocate one:
//! an open tab's background requests (polls, pings, WebSocket reconnects)
//! would otherwise take a GPU back the moment idle release gave it up,
//! for a page whose state belonged to the old one.
//!
//! Browsers say what a request is in `Sec-Fetch-Mode` (every current
//! engine sends it over HTTP and on localhost): `navigate` for a page the
//! user opened, `cors`/`no-cors`/`same-origin` for what a page fetches,
//! `websocket` for its sockets. Clients that send no `Sec-Fetch-*` header
//! at all are scripts (gradio_client, `curl` on `/sdapi/v1/txt2img`, a
//! WebSocket client) or old browsers; their requests are intents too.

use http::{HeaderMap, Method};

use crate::util::wants_html;

/// What a request says about the user's intent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    /// A page the user opened: a top-level (or frame) navigation.
    Navigation,
    /// A client that is no browser, or a browser too old to say.
    ApiClient,
    /// Something an open page does by itself.
    Background,
}

impl Intent {
    /// Classifies a request by its method and headers.
    pub fn of(method: &Method, headers: &HeaderMap) -> Intent {
        match headers.get("sec-fetch-mode").map(|mode| mode.as_bytes()) {
            Some(b"navigate") if is_top_level_page(method, headers) => Intent::Navigation,
            Some(_) => Intent::Background,
            None if headers.keys().any(|name| name.as_str().starts_with("sec-fetch-")) => Intent::Background,
            None if (method == Method::GET || method == Method::HEAD) && wants_html(headers) => Intent::Navigation,
            None => Intent::ApiClient,
        }
    }

    /// Whether the request may allocate a backend.
    pub fn starts_a_session(self) -> bool {
        self != Intent::Background
    }
}

/// A navigation the user made to a page of their own: a GET of a document,
/// not a frame another site embeds (its cookies, `SameSite=Lax`, are not
/// sent, so it would look like a first visit) and not a prefetch or
/// prerender the browser guessed at.
fn is_top_level_page(method: &Method, headers: &HeaderMap) -> bool {
    let document = headers
        .get("sec-fetch-dest")
        .is_none_or(|dest| dest.as_bytes() == b"document");
    let guessed = ["sec-purpose", "purpose"].iter().any(|name| {
        headers.get(*name).is_some_and(|purpose| {
            purpose
                .as_bytes()
                .windows(8)
                .any(|w| w.eq_ignore_ascii_case(b"prefetch"))
        })
    });
    (method == Method::GET || method == Method::HEAD) && document && !guessed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classify(method: Method, headers: &[(&'static str, &'static str)]) -> Intent {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(*name, value.parse().unwrap());
        }
        Intent::of(&method, &map)
    }

    #[test]
    fn a_browser_navigation_starts_a_session_and_its_page_fetches_do_not() {
        let navigate = [("sec-fetch-mode", "navigate"), ("sec-fetch-dest", "document")];
        assert_eq!(classify(Method::GET, &navigate), Intent::Navigation);
        for mode in ["cors", "no-cors", "same-origin", "websocket"] {
            let fetch = [("sec-fetch-mode", mode), ("accept", "text/html")];
            assert_eq!(classify(Method::GET, &fetch), Intent::Background, "{mode}");
        }
        assert_eq!(
            classify(Method::GET, &[("sec-fetch-site", "same-origin")]),
            Intent::Background,
            "a browser that says anything about the fetch is a browser"
        );
    }

    #[test]
    fn frames_prefetches_and_form_posts_are_no_intent_to_start() {
        let iframe = [("sec-fetch-mode", "navigate"), ("sec-fetch-dest", "iframe")];
        assert_eq!(classify(Method::GET, &iframe), Intent::Background);
        let prefetch = [
            ("sec-fetch-mode", "navigate"),
            ("sec-fetch-dest", "document"),
            ("sec-purpose", "prefetch;prerender"),
        ];
        assert_eq!(classify(Method::GET, &prefetch), Intent::Background);
        let form = [("sec-fetch-mode", "navigate"), ("sec-fetch-dest", "document")];
        assert_eq!(classify(Method::POST, &form), Intent::Background);
        assert_eq!(classify(Method::GET, &form), Intent::Navigation);
    }

    #[test]
    fn clients_without_fetch_metadata_are_navigations_or_scripts() {
        assert_eq!(
            classify(Method::GET, &[("accept", "text/html,*/*")]),
            Intent::Navigation
        );
        assert_eq!(classify(Method::POST, &[("accept", "text/html")]), Intent::ApiClient);
        assert_eq!(
            classify(Method::POST, &[("content-type", "application/json")]),
            Intent::ApiClient
        );
        assert_eq!(
            classify(Method::GET, &[("upgrade", "websocket"), ("connection", "upgrade")]),
            Intent::ApiClient,
            "a WebSocket client"
        );
        assert!(Intent::ApiClient.starts_a_session() && Intent::Navigation.starts_a_session());
        assert!(!Intent::Background.starts_a_session());
    }
}
