//! Sealing a value to a context and a subject with HMAC, so that it is
//! worthless under any other: the pinning cookie and the dev sign-in cookie
//! both use it, and neither needs to know of the other.
//!
//! The MAC covers the context label, the subject and the payload, each
//! length-prefixed so no two inputs can produce the same MAC input.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Browsers cap a cookie near 4 KiB; a longer value is not ours.
const MAX_COOKIE_BYTES: usize = 4096;

/// HMAC-SHA256 with the router's secret. Verification is constant-time.
#[derive(Clone)]
pub struct Signer {
    key: Hmac<Sha256>,
}

impl Signer {
    /// `secret` is the router's `config::Secret` (or, in tests, any bytes):
    /// taken as bytes so that sealing needs nothing of the configuration.
    pub fn new(secret: impl AsRef<[u8]>) -> Self {
        Signer {
            key: Hmac::new_from_slice(secret.as_ref()).expect("HMAC takes any key length"),
        }
    }

    fn mac(&self, context: &str, subject: &str, payload: &[u8]) -> Hmac<Sha256> {
        let mut mac = self.key.clone();
        for part in [context.as_bytes(), subject.as_bytes(), payload] {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        mac
    }

    /// `payload.tag`, both base64url.
    pub fn seal(&self, context: &str, subject: &str, payload: &[u8]) -> String {
        let tag = self.mac(context, subject, payload).finalize().into_bytes();
        format!("{}.{}", B64.encode(payload), B64.encode(tag))
    }

    /// The payload of a value made by [`Signer::seal`] with the same context
    /// and subject, or `None`.
    pub fn open(&self, context: &str, subject: &str, sealed: &str) -> Option<Vec<u8>> {
        if sealed.len() > MAX_COOKIE_BYTES {
            return None;
        }
        let (payload, tag) = sealed.split_once('.')?;
        let payload = B64.decode(payload).ok()?;
        let tag = B64.decode(tag).ok()?;
        self.mac(context, subject, &payload).verify_slice(&tag).ok()?;
        Some(payload)
    }
}
