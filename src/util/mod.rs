//! Small helpers every layer may use, importing nothing of the router's own:
//! the bottom of the stack, so that using them never ties two layers.

pub mod cookies;
pub mod label;
pub mod seal;

use std::time::{SystemTime, UNIX_EPOCH};

use http::header::ACCEPT;
use http::HeaderMap;

/// A concurrent map with a fast hash. Only for keys an attacker cannot
/// choose freely (verified tokens and subjects, the router's own backend
/// addresses), so flooding it with colliding keys is not possible: the
/// default SipHash costs a third of a microsecond on a 600-byte token.
pub(crate) type FastMap<K, V> = dashmap::DashMap<K, V, foldhash::fast::RandomState>;

/// Locks `mutex`, also after a panic elsewhere poisoned it: what these
/// mutexes guard (buffers, pools, a cached value) stays usable, and a
/// request must not fail because another one panicked.
pub(crate) fn locked<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Unix seconds of `t` (0 before 1970), as cookies and release records
/// carry time.
pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// True when the client prefers an HTML page to JSON: pages answer so,
/// and only a browser's navigation may start a session.
pub fn wants_html(headers: &HeaderMap) -> bool {
    headers
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/html"))
}
