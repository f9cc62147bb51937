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
mod stderr;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::config::{LogConfig, LogFormat};
use crate::metrics::Metrics;
use cloud_logging::CloudLogging;

static INCLUDE_EMAIL: AtomicBool = AtomicBool::new(false);
/// Set once this module's own JSON subscriber is installed: the access log
/// then writes its lines itself, in the same shape, without going through
/// `tracing`'s field machinery (see [`access`]).
static OWN_JSON_LINES: AtomicBool = AtomicBool::new(false);
static PROJECT_ID: OnceLock<String> = OnceLock::new();

/// Installs the global subscriber. `RUST_LOG`, when set, wins over
/// `log.level`. Lines reach stderr within 100 ms (see `stderr`); call
/// [`flush`] before the process exits.
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
    if result.is_ok() && config.format == LogFormat::Json {
        OWN_JSON_LINES.store(true, Ordering::Release);
    }
}

/// Writes every log line still buffered.
pub fn flush() {
    stderr::flush();
}

fn own_json_lines() -> bool {
    OWN_JSON_LINES.load(Ordering::Acquire)
}

/// A confirmed release: what GPU-hours per user are summed from.
pub struct Released<'a> {
    /// The user's IAP `sub`, when the releasing replica knows it.
    pub sub: Option<&'a str>,
    pub email: Option<&'a str>,
    pub backend: &'a str,
    pub reason: &'static str,
    /// Allocation → release, when known.
    pub held: Option<Duration>,
    /// Time with activity, when this replica saw the session.
    pub active: Option<Duration>,
}

/// Counts a confirmed release and writes its one `session released` line
/// (`held_seconds`, `active_seconds`; the README's GPU-hours query reads it).
pub fn released(metrics: &Metrics, release: &Released<'_>) {
    metrics.release(release.reason, true);
    if let Some(held) = release.held {
        metrics.held(release.reason, held);
    }
    tracing::info!(
        user_id = release.sub.map(user_id),
        email = release.email.map(email),
        backend = release.backend,
        reason = release.reason,
        held_seconds = release.held.map(|d| d.as_secs()),
        active_seconds = release.active.map(|d| d.as_secs()),
        "session released"
    );
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

/// Renders the one event `emit` makes through the JSON formatter, as the
/// subscriber would, and parses the line back.
#[cfg(test)]
fn render_with_cloud_logging(emit: impl FnOnce()) -> serde_json::Value {
    use std::sync::{Arc, Mutex};
    #[derive(Clone)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buffer = Buffer(Arc::new(Mutex::new(Vec::new())));
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .event_format(CloudLogging)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::with_default(subscriber, emit);
    let bytes = buffer.0.lock().unwrap().clone();
    let text = String::from_utf8(bytes).unwrap();
    assert_eq!(text.matches('\n').count(), 1, "one line: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
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
