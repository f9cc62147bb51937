//! Logs for Cloud Logging and the per-request access log.
//!
//! - [`init`]: `tracing` to stderr, as JSON lines in Cloud Logging's shape
//!   ([`cloud_logging`]) or as text, through a writer that never makes one
//!   request wait for another's log line ([`stderr`]).
//! - [`access`]: per request, counts it by kind and status class, counts
//!   proxied bytes, and writes one access-log line when its response body
//!   ends, with the real sizes and latency.
//!
//! Never logged: tokens, cookies, `Authorization`, the cookie secret. Emails
//! only with `log.include_email`; otherwise a short hash stands in.

pub mod access;
mod cloud_logging;
pub mod stderr;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use sha2::{Digest, Sha256};

use crate::config::{LogConfig, LogFormat};
use cloud_logging::CloudLogging;

static INCLUDE_EMAIL: AtomicBool = AtomicBool::new(false);
static PROJECT_ID: OnceLock<String> = OnceLock::new();

/// Installs the global subscriber. `RUST_LOG`, when set, wins over
/// `log.level`. Runtimes that serve requests should call
/// [`stderr::flush_before_park`] from `on_thread_park`.
pub fn init(config: &LogConfig) {
    INCLUDE_EMAIL.store(config.include_email, Ordering::Relaxed);
    if let Some(project) = &config.project_id {
        let _ = PROJECT_ID.set(project.clone());
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(stderr::Stderr);
    let result = match config.format {
        LogFormat::Json => builder.event_format(CloudLogging).try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
    };
    // Already installed (tests, embedders): keep theirs.
    let _ = result;
}

/// A stable, non-reversible id for a user (from their IAP `sub`).
pub fn user_id(sub: &str) -> String {
    short_hash("user", sub)
}

/// The email as logs may show it: itself with `log.include_email`, else a
/// short hash.
pub fn email(email: &str) -> String {
    if INCLUDE_EMAIL.load(Ordering::Relaxed) {
        email.to_string()
    } else {
        short_hash("email", email)
    }
}

fn short_hash(context: &str, value: &str) -> String {
    let digest = Sha256::new()
        .chain_update(context)
        .chain_update([0])
        .chain_update(value)
        .finalize();
    digest[..6].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_and_email_hashes_are_stable_and_short() {
        assert_eq!(user_id("accounts.google.com:1"), user_id("accounts.google.com:1"));
        assert_ne!(user_id("accounts.google.com:1"), user_id("accounts.google.com:2"));
        assert_eq!(email("alice@example.com").len(), 12);
        assert!(!email("alice@example.com").contains('@'));
    }
}
