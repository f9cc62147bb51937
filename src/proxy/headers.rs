//! Header rewriting between client and upstream.
//!
//! Hop-by-hop headers describe one connection and must not be forwarded
//! (RFC 9110 §7.6.1): `Connection` and every header it names, plus the
//! well-known `Keep-Alive`, `Proxy-Connection`, `TE`, `Trailer`,
//! `Transfer-Encoding` and `Upgrade`. An upgrade request is the exception:
//! `Connection: upgrade` and `Upgrade` are re-added so the upstream sees it.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::auth::Identity;

/// Identity headers a client could forge if it bypassed IAP. Never
/// forwarded as received.
const SPOOFABLE_PREFIX: &str = "x-goog-authenticated-";
/// Headers the router sets to the verified identity, for the backend.
pub const USER_HEADER: &str = "x-session-router-user";
pub const EMAIL_HEADER: &str = "x-session-router-email";

const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// True for a request asking to switch protocols (WebSocket and friends).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE) && connection_tokens(headers).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = connection_tokens(headers)
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

/// What the proxy knows about the client connection.
pub struct Forwarded<'a> {
    pub client_ip: IpAddr,
    pub identity: &'a Identity,
}

/// Prepares request headers for the upstream, in place.
pub fn to_upstream(headers: &mut HeaderMap, forwarded: &Forwarded<'_>) {
    let upgrade = is_upgrade(headers)
        .then(|| headers.get(header::UPGRADE).cloned())
        .flatten();
    remove_hop_by_hop(headers);
    headers.remove(header::PROXY_AUTHORIZATION);
    let spoofable: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with(SPOOFABLE_PREFIX))
        .cloned()
        .collect();
    for name in spoofable {
        headers.remove(name);
    }

    let client_ip = forwarded.client_ip.to_string();
    let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prior) if !prior.trim().is_empty() => format!("{prior}, {client_ip}"),
        _ => client_ip,
    };
    set(headers, "x-forwarded-for", &xff);
    // The Google load balancer terminates TLS and says so; a request that
    // did not come through it arrived over plain HTTP.
    let proto = match headers.get("x-forwarded-proto").map(HeaderValue::as_bytes) {
        Some(b"https") => "https",
        _ => "http",
    };
    set(headers, "x-forwarded-proto", proto);
    if let Some(host) = headers.get(header::HOST).cloned() {
        headers.insert("x-forwarded-host", host);
    }
    set(headers, USER_HEADER, &forwarded.identity.sub);
    set(headers, EMAIL_HEADER, &forwarded.identity.email);

    if let Some(protocol) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, protocol);
    }
}

/// Prepares response headers for the client, in place. A 101 keeps its
/// `Connection`/`Upgrade` pair: it is the handshake itself.
pub fn to_client(headers: &mut HeaderMap, switching_protocols: bool) {
    let upgrade = switching_protocols
        .then(|| headers.get(header::UPGRADE).cloned())
        .flatten();
    remove_hop_by_hop(headers);
    if let Some(protocol) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, protocol);
    }
}

fn set(headers: &mut HeaderMap, name: &'static str, value: &str) {
    match HeaderValue::from_str(value) {
        Ok(v) => {
            headers.insert(name, v);
        }
        Err(_) => {
            headers.remove(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> Identity {
        Identity::new("accounts.google.com:1", "alice@example.com", None)
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        h
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut h = headers(&[
            ("connection", "keep-alive, x-secret-hop"),
            ("keep-alive", "timeout=5"),
            ("x-secret-hop", "1"),
            ("te", "trailers"),
            ("proxy-authorization", "Bearer x"),
            ("accept", "text/html"),
        ]);
        to_upstream(
            &mut h,
            &Forwarded {
                client_ip: [10, 0, 0, 1].into(),
                identity: &identity(),
            },
        );
        for gone in ["connection", "keep-alive", "x-secret-hop", "te", "proxy-authorization"] {
            assert!(!h.contains_key(gone), "{gone} forwarded");
        }
        assert_eq!(h["accept"], "text/html");
    }

    #[test]
    fn spoofed_identity_headers_are_replaced_by_verified_ones() {
        let mut h = headers(&[
            (
                "x-goog-authenticated-user-email",
                "accounts.google.com:boss@example.com",
            ),
            ("x-goog-authenticated-user-id", "accounts.google.com:999"),
            (EMAIL_HEADER, "boss@example.com"),
        ]);
        to_upstream(
            &mut h,
            &Forwarded {
                client_ip: [10, 0, 0, 1].into(),
                identity: &identity(),
            },
        );
        assert!(!h.contains_key("x-goog-authenticated-user-email"));
        assert!(!h.contains_key("x-goog-authenticated-user-id"));
        assert_eq!(h[EMAIL_HEADER], "alice@example.com");
        assert_eq!(h[USER_HEADER], "accounts.google.com:1");
    }

    #[test]
    fn forwarded_headers_are_appended_and_set() {
        let mut h = headers(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-proto", "https"),
            ("host", "sd.example.com"),
        ]);
        to_upstream(
            &mut h,
            &Forwarded {
                client_ip: [35, 191, 0, 1].into(),
                identity: &identity(),
            },
        );
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 35.191.0.1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "sd.example.com");
    }

    #[test]
    fn an_upgrade_request_keeps_its_handshake_headers() {
        let mut h = headers(&[("connection", "keep-alive, Upgrade"), ("upgrade", "websocket")]);
        assert!(is_upgrade(&h));
        to_upstream(
            &mut h,
            &Forwarded {
                client_ip: [127, 0, 0, 1].into(),
                identity: &identity(),
            },
        );
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
    }
}
