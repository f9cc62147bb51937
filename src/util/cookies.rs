//! Reading the `Cookie` request headers: one name looked up across all of
//! them, and the pairs a backend may see. Generic, so the sign-in (auth),
//! the pinning cookie (session) and the forwarded headers (proxy) share it.

use http::HeaderMap;

/// The result of looking a cookie name up across all `Cookie` headers.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup<'a> {
    None,
    One(&'a str),
    /// The name appears more than once: which one is meant is unknowable, so
    /// none is trusted.
    Ambiguous,
}

pub fn find_cookie<'a>(headers: &'a HeaderMap, name: &str) -> Lookup<'a> {
    let mut found = Lookup::None;
    for (key, value) in cookie_pairs(headers) {
        if key == name {
            found = match found {
                Lookup::None => Lookup::One(value),
                _ => return Lookup::Ambiguous,
            };
        }
    }
    found
}

fn cookie_pairs(headers: &HeaderMap) -> impl Iterator<Item = (&str, &str)> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|line| line.split(';'))
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            Some((k.trim(), v.trim()))
        })
}

/// The cookies a backend may see: every pair of the `Cookie` headers but
/// the `names`d ones (the router's own), in order. `None` when none of
/// those is present, so the headers can go as they are.
pub fn cookies_without<'a, S: AsRef<str>>(
    headers: &'a HeaderMap,
    names: &'a [S],
) -> Option<impl Iterator<Item = &'a str> + 'a> {
    let named = move |key: &str| names.iter().any(|n| n.as_ref() == key);
    if !cookie_pairs(headers).any(|(k, _)| named(k)) {
        return None;
    }
    Some(
        headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|line| line.split(';'))
            .filter(|pair| {
                let key = pair.split_once('=').map_or(pair.trim(), |(k, _)| k.trim());
                !key.is_empty() && !names.iter().any(|n| n.as_ref() == key)
            })
            .map(str::trim),
    )
}
