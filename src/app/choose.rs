//! Which profile a request for a new backend is for: the one it names
//! (`X-Session-Router-Profile`, `?profile=`, the chooser's form), the one
//! the user's last backend came from, or — with a choice to make — the
//! chooser for a browser and the default for an API client. A profile the
//! user may not use is refused the same as one that does not exist.

use std::sync::Arc;

use http::{HeaderMap, Uri};

use crate::auth::Identity;
use crate::session::cookie::Pin;
use crate::session::{Profile, Profiles, SessionError};

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

/// The profile to allocate from: `named` (one the user may use, or 403),
/// else `last` (the user's previous one), else the only one they may use;
/// with several to choose from a `browser` goes to the chooser (and then
/// on to `next`), anyone else gets the default.
pub fn profile_for(
    profiles: &Profiles,
    identity: &Identity,
    named: Option<String>,
    last: Option<Arc<Profile>>,
    browser: bool,
    next: impl FnOnce() -> String,
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
    if browser && profiles.for_user(identity).nth(1).is_some() {
        return Err(SessionError::ChooseProfile { next: next() });
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
