//! The request head as the upstream receives it, written straight from the
//! client's request into the bytes that go on the wire.
//!
//! Hop-by-hop headers describe one connection and are not forwarded
//! (RFC 9110 §7.6.1): `Connection` and every header it names, plus the
//! well-known `Keep-Alive`, `Proxy-Connection`, `TE`, `Trailer`,
//! `Transfer-Encoding` and `Upgrade`. An upgrade request is the exception:
//! `Connection: upgrade` and `Upgrade` are re-added so the upstream sees it.
//! `Expect` is answered by the router's own server (a `100 Continue` when
//! the body is first read), so it goes no further either. Identity headers
//! a client could forge are dropped and the verified ones written instead;
//! the router's own cookies never leave it.
//! (The response side is filtered as it is parsed, in `upstream`.)

use http::header::{self, HeaderMap, HeaderName};
use http::request::Parts;
use http::uri::Authority;

use super::hop::connection_tokens;
use super::upstream::RequestFraming;
use crate::auth::Identity;
use crate::util::cookies::cookies_without;

/// Identity headers a client could forge if it bypassed IAP. Never
/// forwarded as received.
const SPOOFABLE_PREFIX: &str = "x-goog-authenticated-";
/// Headers the router sets to the verified identity, for the backend.
pub const USER_HEADER: &str = "x-session-router-user";
pub const EMAIL_HEADER: &str = "x-session-router-email";

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// True for a request asking to switch protocols (WebSocket and friends).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE) && connection_tokens(headers).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

/// What the router adds to every request it forwards.
pub struct Forwarded<'a> {
    /// The peer's address, as text.
    pub client_ip: &'a str,
    pub identity: &'a Identity,
    /// The router's own cookie names.
    pub router_cookies: &'a [String],
    /// The request asks to switch protocols ([`is_upgrade`]).
    pub upgrade: bool,
}

/// Headers the router writes itself (from what it knows, not from what
/// the client said), or that go no further than the router.
fn written_here(name: &HeaderName) -> bool {
    let name = name.as_str();
    // By first letter, so that the common headers (accept…, host, sec-…,
    // user-agent) are passed after one comparison.
    match name.as_bytes().first() {
        Some(b'c') => matches!(name, "connection" | "cookie"),
        Some(b'e') => name == "expect",
        Some(b'k') => name == "keep-alive",
        Some(b'p') => matches!(name, "proxy-connection" | "proxy-authorization"),
        Some(b't') => matches!(name, "te" | "trailer" | "transfer-encoding"),
        Some(b'u') => name == "upgrade",
        Some(b'x') => {
            matches!(
                name,
                "x-forwarded-for" | "x-forwarded-proto" | "x-forwarded-host" | USER_HEADER | EMAIL_HEADER
            ) || name.starts_with(SPOOFABLE_PREFIX)
        }
        _ => false,
    }
}

/// Writes the upstream request head for `parts` into `out` and says how its
/// body (`has_body`: the client sent one) is framed.
pub fn write_request_head(
    out: &mut Vec<u8>,
    parts: &Parts,
    upstream: &Authority,
    forwarded: &Forwarded<'_>,
    has_body: bool,
) -> RequestFraming {
    let headers = &parts.headers;
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    write_parts(
        out,
        &[
            parts.method.as_str().as_bytes(),
            b" ",
            path.as_bytes(),
            b" HTTP/1.1\r\n",
        ],
    );

    // Headers the Connection header names are hop-by-hop too (the usual
    // tokens are not header names, or are removed anyway).
    let named: Vec<&str> = connection_tokens(headers)
        .filter(|t| {
            !["keep-alive", "close", "upgrade"]
                .iter()
                .any(|usual| t.eq_ignore_ascii_case(usual))
        })
        .collect();
    for (name, value) in headers {
        if written_here(name) || named.iter().any(|n| n.eq_ignore_ascii_case(name.as_str())) {
            continue;
        }
        write_header(out, name.as_str(), value.as_bytes());
    }
    if !headers.contains_key(header::HOST) {
        write_header(out, "host", upstream.as_str().as_bytes());
    }

    match cookies_without(headers, forwarded.router_cookies) {
        None => {
            for value in headers.get_all(header::COOKIE) {
                write_header(out, "cookie", value.as_bytes());
            }
        }
        Some(kept) => {
            let start = out.len();
            for (i, pair) in kept.enumerate() {
                let separator: &[u8] = if i == 0 { b"cookie: " } else { b"; " };
                write_parts(out, &[separator, pair.as_bytes()]);
            }
            if out.len() > start {
                out.extend_from_slice(b"\r\n");
            }
        }
    }

    // The client address is appended to what earlier proxies recorded.
    out.extend_from_slice(b"x-forwarded-for: ");
    for prior in headers.get_all(&X_FORWARDED_FOR) {
        let prior = prior.as_bytes().trim_ascii();
        if !prior.is_empty() {
            write_parts(out, &[prior, b", "]);
        }
    }
    write_parts(out, &[forwarded.client_ip.as_bytes(), b"\r\n"]);
    // The Google load balancer terminates TLS and says so; a request that
    // did not come through it arrived over plain HTTP.
    let https = headers.get(&X_FORWARDED_PROTO).map(|v| v.as_bytes()) == Some(b"https");
    write_header(out, "x-forwarded-proto", if https { b"https" } else { b"http" });
    if let Some(host) = headers.get(header::HOST) {
        write_header(out, "x-forwarded-host", host.as_bytes());
    }
    for (name, value) in [
        (USER_HEADER, &forwarded.identity.sub),
        (EMAIL_HEADER, &forwarded.identity.email),
    ] {
        // A value that cannot be a header value is left out, never mangled.
        if value.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b)) {
            write_header(out, name, value.as_bytes());
        }
    }

    if forwarded.upgrade {
        if let Some(protocol) = headers.get(header::UPGRADE) {
            out.extend_from_slice(b"connection: upgrade\r\n");
            write_header(out, "upgrade", protocol.as_bytes());
        }
    }
    let framing = if !has_body {
        RequestFraming::Empty
    } else if headers.contains_key(header::CONTENT_LENGTH) {
        RequestFraming::Length
    } else {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        RequestFraming::Chunked
    };
    out.extend_from_slice(b"\r\n");
    framing
}

fn write_header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    write_parts(out, &[name.as_bytes(), b": ", value, b"\r\n"]);
}

fn write_parts(out: &mut Vec<u8>, parts: &[&[u8]]) {
    for part in parts {
        out.extend_from_slice(part);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::hop::HOP_BY_HOP;

    fn identity() -> Identity {
        Identity::new("accounts.google.com:1", "alice@example.com", None)
    }

    /// The head `write_request_head` writes for `request` with these
    /// headers, and how it frames the body.
    fn head_for(
        request: http::request::Builder,
        pairs: &[(&str, &str)],
        identity: &Identity,
        has_body: bool,
    ) -> (RequestFraming, String) {
        let mut request = request;
        for (k, v) in pairs {
            request = request.header(*k, *v);
        }
        let (parts, ()) = request.body(()).unwrap().into_parts();
        let mut out = Vec::new();
        let framing = write_request_head(
            &mut out,
            &parts,
            &Authority::from_static("10.0.0.7:7860"),
            &Forwarded {
                client_ip: "35.191.0.1",
                identity,
                router_cookies: &["session_router".into(), "session_router_dev".into()],
                upgrade: is_upgrade(&parts.headers),
            },
            has_body,
        );
        (framing, String::from_utf8(out).unwrap())
    }

    /// The head the upstream receives for a GET with these headers, parsed
    /// back as the upstream would.
    fn forwarded(pairs: &[(&str, &str)]) -> (String, HeaderMap) {
        let (framing, out) = head_for(http::Request::get("/queue/join?x=1"), pairs, &identity(), false);
        assert_eq!(framing, RequestFraming::Empty);
        let mut raw = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Request::new(&mut raw);
        assert!(parsed.parse(out.as_bytes()).unwrap().is_complete(), "{out}");
        assert_eq!(parsed.path, Some("/queue/join?x=1"));
        let mut headers = HeaderMap::new();
        for h in parsed.headers.iter() {
            headers.append(
                HeaderName::from_bytes(h.name.as_bytes()).unwrap(),
                h.value.try_into().unwrap(),
            );
        }
        (out, headers)
    }

    #[test]
    fn every_hop_by_hop_header_is_written_here_and_ordinary_ones_are_not() {
        for name in &HOP_BY_HOP {
            assert!(written_here(name), "{name}");
        }
        for name in [
            "accept",
            "host",
            "user-agent",
            "content-type",
            "content-length",
            "cache-control",
            "x-request-id",
        ] {
            assert!(!written_here(&HeaderName::from_static(name)), "{name}");
        }
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let (_, h) = forwarded(&[
            ("connection", "keep-alive, x-secret-hop"),
            ("keep-alive", "timeout=5"),
            ("x-secret-hop", "1"),
            ("te", "trailers"),
            ("proxy-authorization", "Bearer x"),
            ("expect", "100-continue"),
            ("accept", "text/html"),
        ]);
        for gone in [
            "connection",
            "keep-alive",
            "x-secret-hop",
            "te",
            "proxy-authorization",
            "expect",
        ] {
            assert!(!h.contains_key(gone), "{gone} forwarded");
        }
        assert_eq!(h["accept"], "text/html");
    }

    #[test]
    fn spoofed_identity_headers_are_replaced_by_verified_ones() {
        let (_, h) = forwarded(&[
            (
                "x-goog-authenticated-user-email",
                "accounts.google.com:boss@example.com",
            ),
            ("x-goog-authenticated-user-id", "accounts.google.com:999"),
            (EMAIL_HEADER, "boss@example.com"),
        ]);
        assert!(!h.contains_key("x-goog-authenticated-user-email"));
        assert!(!h.contains_key("x-goog-authenticated-user-id"));
        assert_eq!(h.get_all(EMAIL_HEADER).iter().count(), 1);
        assert_eq!(h[EMAIL_HEADER], "alice@example.com");
        assert_eq!(h[USER_HEADER], "accounts.google.com:1");
    }

    #[test]
    fn forwarded_headers_are_appended_and_set() {
        let (_, h) = forwarded(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-proto", "https"),
            ("host", "sd.example.com"),
        ]);
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 35.191.0.1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "sd.example.com");
        assert_eq!(h["host"], "sd.example.com", "the client's Host goes on");
        let (_, bare) = forwarded(&[("x-forwarded-proto", "javascript")]);
        assert_eq!(bare["x-forwarded-for"], "35.191.0.1");
        assert_eq!(bare["x-forwarded-proto"], "http");
        assert_eq!(
            bare["host"], "10.0.0.7:7860",
            "a request without Host gets the upstream's"
        );
    }

    #[test]
    fn the_router_cookies_never_go_upstream_and_the_others_do() {
        let (_, h) = forwarded(&[("cookie", "a=1; session_router=v1.x.y; b=2")]);
        assert_eq!(h["cookie"], "a=1; b=2");
        let (_, only_ours) = forwarded(&[("cookie", "session_router=v1.x.y")]);
        assert!(!only_ours.contains_key("cookie"));
        let (_, others) = forwarded(&[("cookie", "a=1"), ("cookie", "b=2")]);
        assert_eq!(
            others.get_all("cookie").iter().count(),
            2,
            "untouched when none is ours"
        );
    }

    #[test]
    fn an_upgrade_request_keeps_its_handshake_headers() {
        let (_, h) = forwarded(&[("connection", "keep-alive, Upgrade"), ("upgrade", "websocket")]);
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
    }

    #[test]
    fn an_identity_that_cannot_be_a_header_value_is_left_out() {
        let odd = Identity::new("accounts.google.com:1", "ünï@example.com", None);
        let (_, text) = head_for(http::Request::get("/"), &[], &odd, false);
        assert!(!text.contains(EMAIL_HEADER), "{text}");
        assert!(text.contains(USER_HEADER));
    }

    #[test]
    fn a_body_keeps_its_length_or_is_chunked() {
        let post = |headers: &[(&str, &str)]| head_for(http::Request::post("/upload"), headers, &identity(), true);
        let (framing, head) = post(&[("content-length", "5")]);
        assert_eq!(framing, RequestFraming::Length);
        assert!(head.contains("content-length: 5\r\n") && !head.contains("transfer-encoding"));
        let (framing, head) = post(&[("transfer-encoding", "chunked")]);
        assert_eq!(framing, RequestFraming::Chunked);
        assert_eq!(head.matches("transfer-encoding: chunked\r\n").count(), 1);
    }
}
