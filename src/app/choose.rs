//! Which profile a request for a new backend is for: the one it names
//! (`X-Session-Router-Profile`, `?profile=`, the chooser's form), the one
//! the user's last backend came from, or — with a choice to make — the
//! chooser for a browser and the default for an API client. A profile the
//! user may not use is refused the same as one that does not exist.

use std::sync::Arc;

use http::{HeaderMap, Uri};

use crate::auth::Identity;
use crate::session::cookie::Pin;
use crate::session::{Claim, Profile, Profiles, SessionError};

/// The header an API client names its profile with.
pub const PROFILE_HEADER: &str = "x-session-router-profile";

/// The profile a request names: its [`PROFILE_HEADER`], else `profile=`
/// in its query (a link to a profile).
pub fn named(headers: &HeaderMap, uri: &Uri) -> Option<String> {
    let header = headers
        .get(PROFILE_HEADER)
        .map(|value| String::from_utf8_lossy(value.as_bytes()).trim().to_string());
    header.or_else(|| {
        form_urlencoded::parse(uri.query()?.as_bytes())
            .find(|(key, _)| key == "profile")
            .map(|(_, value)| value.into_owned())
    })
}

/// What a request for a new backend claims: a backend of `named` (one the
/// user may use, or 403), else of `last` (the user's previous profile),
/// else of the only one they may use; with several to choose from a
/// `browser` is to choose (and then go on to `next`) unless they hold a
/// backend already, anyone else gets the default.
pub fn claim(
    profiles: &Profiles,
    identity: &Identity,
    named: Option<String>,
    last: Option<Arc<Profile>>,
    browser: bool,
    next: impl FnOnce() -> String,
) -> Result<Claim, SessionError> {
    if browser && named.is_none() && last.is_none() && profiles.for_user(identity).nth(1).is_some() {
        return Ok(Claim::Choose { next: next() });
    }
    profile_for(profiles, identity, named, last).map(Claim::Allocate)
}

/// The profile to allocate from: `named` (one the user may use, or 403),
/// else `last`, else the default (or the first the user may use).
fn profile_for(
    profiles: &Profiles,
    identity: &Identity,
    named: Option<String>,
    last: Option<Arc<Profile>>,
) -> Result<Arc<Profile>, SessionError> {
    if let Some(name) = named {
        return profiles
            .usable(&name, identity)
            .cloned()
            .ok_or(SessionError::ProfileNotAllowed(name));
    }
    if let Some(last) = last {
        return Ok(last);
    }
    profiles
        .default_for(identity)
        .cloned()
        .ok_or_else(|| SessionError::ProfileNotAllowed(profiles.default_profile().name().to_string()))
}

/// The profile a pin's backend came from (a pin of before profiles: the
/// default), if it is still configured and the user may still use it.
pub fn pinned(profiles: &Profiles, identity: &Identity, pin: &Pin) -> Option<Arc<Profile>> {
    let profile = match &pin.profile {
        Some(name) => profiles.named(name)?,
        None => profiles.default_profile(),
    };
    profile.permits(identity).then(|| profile.clone())
}
