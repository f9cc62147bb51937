//! `dev` mode sign-in: a small form asks for a name and a signed cookie
//! remembers it. For demos and local work only; the config refuses this mode
//! on anything but a loopback address.

use http::HeaderMap;

use super::{AuthError, Identity};
use crate::util::cookies::{find_cookie, Lookup};
use crate::util::seal::Signer;

const CONTEXT: &str = "session-router/dev-sign-in/v1";
/// Longest name the sign-in form accepts.
pub const MAX_NAME_CHARS: usize = 64;

pub struct DevSignIn {
    signer: Signer,
    cookie_name: String,
}

impl DevSignIn {
    pub fn new(signer: Signer, cookie_name: String) -> Self {
        DevSignIn { signer, cookie_name }
    }

    pub fn cookie_name(&self) -> &str {
        &self.cookie_name
    }

    /// The cookie value that signs `name` in, or `None` for an unusable name.
    pub fn sign_in(&self, name: &str) -> Option<String> {
        let name = normalise(name)?;
        Some(self.signer.seal(CONTEXT, "", name.as_bytes()))
    }

    pub fn identify(&self, headers: &HeaderMap) -> Result<Identity, AuthError> {
        let Lookup::One(value) = find_cookie(headers, &self.cookie_name) else {
            return Err(AuthError::SignInRequired);
        };
        let name = self
            .signer
            .open(CONTEXT, "", value)
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .ok_or(AuthError::SignInRequired)?;
        Ok(identity_for(&name))
    }
}

/// A dev user's identity: `dev:NAME`, with NAME as the address when it looks
/// like one, else `NAME@dev.localhost`.
fn identity_for(name: &str) -> Identity {
    let email = if name.contains('@') {
        name.to_string()
    } else {
        format!("{name}@dev.localhost")
    };
    Identity::new(&format!("dev:{name}"), &email, None)
}

/// Lower-case letters, digits and `.-_@+`, trimmed, 1–64 characters.
fn normalise(name: &str) -> Option<String> {
    let name = name.trim().to_ascii_lowercase();
    let ok = !name.is_empty()
        && name.chars().count() <= MAX_NAME_CHARS
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '@' | '+'));
    ok.then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn dev() -> DevSignIn {
        DevSignIn::new(Signer::new(Secret::random()), "sr_dev".into())
    }

    #[test]
    fn a_signed_in_name_is_recognised() {
        let dev = dev();
        let value = dev.sign_in(" Alice ").unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(http::header::COOKIE, format!("sr_dev={value}").parse().unwrap());
        let id = dev.identify(&headers).unwrap();
        assert_eq!(&*id.sub, "dev:alice");
        assert_eq!(&*id.email, "alice@dev.localhost");
    }

    #[test]
    fn a_forged_name_is_not() {
        let dev = dev();
        let value = dev.sign_in("alice").unwrap();
        let forged = value.replacen(&value[..4], "Ym9i", 1);
        let mut headers = HeaderMap::new();
        headers.insert(http::header::COOKIE, format!("sr_dev={forged}").parse().unwrap());
        assert!(dev.identify(&headers).is_err());
    }

    #[test]
    fn odd_names_are_refused() {
        let dev = dev();
        assert!(dev.sign_in("").is_none());
        assert!(dev.sign_in("<script>").is_none());
        assert!(dev.sign_in(&"a".repeat(65)).is_none());
    }
}
