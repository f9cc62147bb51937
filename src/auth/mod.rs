//! Who is asking: the verified identity behind a request.
//!
//! In `iap` mode the only thing trusted is IAP's signature on
//! `x-goog-iap-jwt-assertion` ([`iap`], keys from [`jwks`]). The plain
//! `x-goog-authenticated-*` headers are never read. In `dev` mode a signed
//! sign-in cookie names the user ([`dev`]); that mode only listens on
//! loopback. Either way the [`Allowlist`] has the last word.

pub mod dev;
pub mod iap;
pub mod jwks;
pub mod origin;

use std::collections::HashSet;
use std::sync::Arc;

use http::HeaderMap;

use crate::config::{AuthConfig, AuthMode, Secret};
use crate::metrics::Metrics;
use crate::util::seal::Signer;

/// A verified user. Cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// IAP's stable subject (`accounts.google.com:1234…`): the session key.
    pub sub: Arc<str>,
    /// The verified address, without IAP's `accounts.google.com:` prefix.
    pub email: Arc<str>,
    /// The Workspace hosted domain (`hd`), when the token carries one.
    pub hosted_domain: Option<Arc<str>>,
    /// The pseudonym logs name the user by ([`crate::telemetry::user_id`]
    /// of `sub`): made once, as a verified identity is cached with its
    /// token, rather than hashed again for every access-log line.
    pub user_id: Arc<str>,
}

impl Identity {
    pub fn new(sub: &str, email: &str, hosted_domain: Option<&str>) -> Self {
        Identity {
            sub: sub.into(),
            email: email.into(),
            hosted_domain: hosted_domain.map(Into::into),
            user_id: crate::telemetry::user_id(sub).into(),
        }
    }
}

/// Why a request has no usable identity. The variant goes to the log; the
/// client only ever sees the status code.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no identity assertion")]
    Missing,
    #[error("more than one identity assertion header")]
    Duplicated,
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    #[error("token algorithm {0} is not ES256")]
    Algorithm(String),
    #[error("token signed with an unknown key id")]
    UnknownKey,
    #[error("signing keys not loaded yet")]
    KeysUnavailable,
    #[error("token rejected: {0:?}")]
    Rejected(jsonwebtoken::errors::ErrorKind),
    #[error("token issued in the future")]
    IssuedInFuture,
    /// The verified email, kept for the admin of the allowlist, never shown
    /// in the message (logs hash emails unless configured otherwise).
    #[error("account is not on the allowlist")]
    NotAllowed(Arc<str>),
    #[error("dev mode: not signed in")]
    SignInRequired,
}

impl AuthError {
    /// Every value [`AuthError::class`] returns.
    pub const CLASSES: [&'static str; 7] = [
        "missing",
        "malformed",
        "algorithm",
        "unknown_key",
        "keys_unavailable",
        "claims",
        "not_allowed",
    ];

    /// A short, fixed label for logs and metrics (never user data).
    pub fn class(&self) -> &'static str {
        match self {
            AuthError::Missing | AuthError::SignInRequired => "missing",
            AuthError::Duplicated | AuthError::Malformed(_) => "malformed",
            AuthError::Algorithm(_) => "algorithm",
            AuthError::UnknownKey => "unknown_key",
            AuthError::KeysUnavailable => "keys_unavailable",
            AuthError::Rejected(_) | AuthError::IssuedInFuture => "claims",
            AuthError::NotAllowed(_) => "not_allowed",
        }
    }
}

/// Restricts who may use the router beyond what IAP already allows.
pub struct Allowlist {
    emails: HashSet<String>,
    domains: HashSet<String>,
}

impl Allowlist {
    pub fn new(emails: &[String], domains: &[String]) -> Self {
        Allowlist {
            emails: emails.iter().cloned().collect(),
            domains: domains.iter().cloned().collect(),
        }
    }

    /// Empty lists admit everyone; otherwise the address or its domain (or
    /// the verified hosted domain) must be listed.
    pub fn permits(&self, identity: &Identity) -> bool {
        if self.emails.is_empty() && self.domains.is_empty() {
            return true;
        }
        let email = identity.email.to_ascii_lowercase();
        if self.emails.contains(&email) {
            return true;
        }
        let email_domain = email.rsplit_once('@').map(|(_, d)| d.to_string());
        let hosted = identity.hosted_domain.as_deref().map(str::to_ascii_lowercase);
        [email_domain, hosted]
            .into_iter()
            .flatten()
            .any(|d| self.domains.contains(&d))
    }
}

enum Method {
    Iap(iap::IapVerifier),
    Dev(dev::DevSignIn),
}

/// Turns request headers into an [`Identity`].
pub struct Authenticator {
    method: Method,
    allowlist: Allowlist,
    metrics: Arc<Metrics>,
}

impl Authenticator {
    pub fn new(config: &AuthConfig, secret: &Secret, dev_cookie_name: String, metrics: Arc<Metrics>) -> Self {
        metrics.start_token_rejections_at_zero(&AuthError::CLASSES);
        let method = match config.mode {
            AuthMode::Iap => {
                let keys = jwks::KeyStore::new(config.jwks_url.clone(), config.jwks_refetch_interval)
                    .with_metrics(metrics.clone());
                Method::Iap(iap::IapVerifier::new(config, Arc::new(keys)))
            }
            AuthMode::Dev => Method::Dev(dev::DevSignIn::new(Signer::new(secret), dev_cookie_name)),
        };
        Authenticator {
            method,
            allowlist: Allowlist::new(&config.allowed_emails, &config.allowed_domains),
            metrics,
        }
    }

    pub async fn identify(&self, headers: &HeaderMap) -> Result<Arc<Identity>, AuthError> {
        let checked = match &self.method {
            Method::Iap(verifier) => verifier.verify_headers(headers).await,
            Method::Dev(dev) => dev
                .identify(headers)
                .map(|identity| (Arc::new(identity), iap::Check::Verified)),
        };
        let result = checked.and_then(|(identity, check)| {
            if self.allowlist.permits(&identity) {
                Ok((identity, check))
            } else {
                Err(AuthError::NotAllowed(identity.email.clone()))
            }
        });
        let (result_label, reason) = match &result {
            Ok((_, check)) => (check.label(), ""),
            Err(e) => ("rejected", e.class()),
        };
        self.metrics.count_token_check(result_label, reason);
        result.map(|(identity, _)| identity)
    }

    /// The IAP key store, which needs a background refresher; `None` in dev mode.
    pub fn key_store(&self) -> Option<&Arc<jwks::KeyStore>> {
        match &self.method {
            Method::Iap(verifier) => Some(verifier.keys()),
            Method::Dev(_) => None,
        }
    }

    /// Periodic housekeeping: drops expired verified tokens.
    pub fn purge_expired(&self) {
        if let Method::Iap(verifier) = &self.method {
            verifier.purge_expired();
        }
    }

    /// The dev sign-in, when this router runs in dev mode.
    pub fn dev(&self) -> Option<&dev::DevSignIn> {
        match &self.method {
            Method::Dev(dev) => Some(dev),
            Method::Iap(_) => None,
        }
    }

    /// Ready once requests can be verified: always in dev mode, after the
    /// first key set loaded in iap mode.
    pub fn is_ready(&self) -> bool {
        self.key_store().is_none_or(|keys| keys.is_loaded())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_allowlists_admit_everyone() {
        let list = Allowlist::new(&[], &[]);
        assert!(list.permits(&Identity::new("s", "anyone@anywhere.org", None)));
    }

    #[test]
    fn allowlists_match_address_email_domain_or_hosted_domain() {
        let list = Allowlist::new(&["boss@other.org".into()], &["example.com".into()]);
        assert!(list.permits(&Identity::new("s", "Boss@Other.org", None)));
        assert!(list.permits(&Identity::new("s", "alice@example.com", None)));
        assert!(list.permits(&Identity::new("s", "alice@alias.net", Some("example.com"))));
        assert!(!list.permits(&Identity::new("s", "mallory@evil.com", None)));
        assert!(!list.permits(&Identity::new("s", "mallory@notexample.com", None)));
    }
}
