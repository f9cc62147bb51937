//! Cross-site protection for the requests a browser could be tricked into
//! sending with the user's IAP session: WebSocket upgrades (not covered by
//! CORS) and the router's own `POST`s. A request without `Origin` comes from
//! a non-browser client and is let through; a browser always sends it here.

use http::header::{HOST, ORIGIN};
use http::HeaderMap;

/// `Err(origin)` when the request's `Origin` is neither the request's own
/// origin nor one of `allowed` (lower-case `scheme://host[:port]`).
pub fn check(headers: &HeaderMap, allowed: &[String]) -> Result<(), String> {
    let Some(origin) = headers.get(ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or("<not ascii>").to_ascii_lowercase();
    if allowed.contains(&origin) {
        return Ok(());
    }
    let host = headers
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_ascii_lowercase);
    let scheme = match headers.get("x-forwarded-proto").map(|v| v.as_bytes()) {
        Some(b"https") => "https",
        _ => "http",
    };
    match host {
        Some(host) if origin == format!("{scheme}://{host}") => Ok(()),
        _ => Err(origin),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (k.parse().unwrap(), v.parse().unwrap()))
            .collect()
    }

    #[test]
    fn same_origin_and_no_origin_pass() {
        assert!(check(
            &headers(&[
                ("host", "sd.example.com"),
                ("x-forwarded-proto", "https"),
                ("origin", "https://sd.example.com")
            ]),
            &[]
        )
        .is_ok());
        assert!(check(
            &headers(&[("host", "127.0.0.1:8080"), ("origin", "http://127.0.0.1:8080")]),
            &[]
        )
        .is_ok());
        assert!(check(&headers(&[("host", "sd.example.com")]), &[]).is_ok());
    }

    #[test]
    fn other_origins_fail_unless_allowed() {
        let h = headers(&[
            ("host", "sd.example.com"),
            ("x-forwarded-proto", "https"),
            ("origin", "https://evil.example"),
        ]);
        assert_eq!(check(&h, &[]), Err("https://evil.example".to_string()));
        assert!(check(&h, &["https://evil.example".to_string()]).is_ok());
        let null = headers(&[("host", "sd.example.com"), ("origin", "null")]);
        assert!(check(&null, &[]).is_err());
        let scheme_downgrade = headers(&[
            ("host", "sd.example.com"),
            ("x-forwarded-proto", "https"),
            ("origin", "http://sd.example.com"),
        ]);
        assert!(check(&scheme_downgrade, &[]).is_err());
    }
}
