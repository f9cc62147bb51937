//! Hop-by-hop headers (RFC 9110 §7.6.1): what describes one connection and
//! is never forwarded, on the request side (`headers`) and the response side
//! (`upstream`) alike. One list and one reading of `Connection`, so the two
//! directions cannot drift apart.

use http::header::{self, HeaderMap, HeaderName};

/// `Connection` and the well-known headers that are hop-by-hop without
/// being named in it.
pub(super) const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Header names that describe one connection.
pub(super) fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name)
}

/// The tokens of one `Connection` value: comma-separated, trimmed, none
/// empty.
pub(super) fn tokens(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|t| !t.is_empty())
}

/// The tokens of every `Connection` header of `headers`.
pub(super) fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(tokens)
}
