//! The pinning cookie: which backend a browser was given, signed with HMAC and
//! bound to the verified user, so that a cookie is worthless to anyone else.
//!
//! Wire form: `v1.<base64url(json pin)>.<base64url(hmac)>`. The MAC covers
//! a context label, the user's `sub` and the payload, each length-prefixed so
//! no two inputs can produce the same MAC input. The `sub` itself is not in
//! the cookie. Anything that does not verify is simply ignored: the request is
//! then routed by the verified identity alone.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderValue};
use serde::{Deserialize, Serialize};

use super::Session;
use crate::allocator::{Ended, Lease, PinnedBackend};
use crate::util::cookies::{find_cookie, Lookup};
use crate::util::seal::Signer;
use crate::util::unix;

const VERSION: &str = "v1";

/// The pinning cookie's payload: the backend, the user's last activity as
/// far as the issuing replica knew, and, once the backend was released,
/// why. Cookies issued before the stamp existed read as "last active: at
/// allocation", "not ended".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pin {
    #[serde(flatten)]
    pub backend: PinnedBackend,
    /// Unix seconds of the user's last activity when the cookie was issued.
    #[serde(rename = "l", default)]
    pub last_active: u64,
    /// Set once the backend was released: the cookie then pins nothing and
    /// says why to whichever replica reads it.
    #[serde(rename = "x", default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<Ended>,
    /// The profile the backend came from; cookies issued before profiles
    /// existed name none: the default profile's.
    #[serde(rename = "p", default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
}

impl Pin {
    /// A pin of the session's backend, its user last active at
    /// `last_active`. [`CookieCodec::issue`] sets its expiry.
    pub fn of(session: &Session, last_active: SystemTime) -> Pin {
        Pin::new(
            &session.lease,
            session.profile.name(),
            session.allocated_at,
            last_active,
        )
    }

    /// A pin of `lease` of `profile`, held since `allocated_at`, its user
    /// last active at `last_active`.
    pub fn new(lease: &Lease, profile: &str, allocated_at: SystemTime, last_active: SystemTime) -> Pin {
        Pin {
            backend: PinnedBackend {
                backend: lease.backend.to_string(),
                upstream: lease.upstream.to_string(),
                allocated_at: unix(allocated_at),
                expires: 0,
            },
            last_active: unix(last_active),
            ended: None,
            profile: Some(profile.to_string()),
        }
    }
}

/// Issues and reads the pinning cookie.
#[derive(Clone)]
pub struct CookieCodec {
    signer: Signer,
    name: String,
    ttl: Duration,
}

const CONTEXT: &str = "session-router/pin/v1";

impl CookieCodec {
    pub fn new(signer: Signer, name: String, ttl: Duration) -> Self {
        CookieCodec { signer, name, ttl }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A `Set-Cookie` value carrying `pin` for `subject`, issued at `now`,
    /// and the cookie as the session remembers it.
    pub fn issue(&self, subject: &str, mut pin: Pin, now: SystemTime) -> (HeaderValue, Issued) {
        pin.backend.expires = unix(now) + self.ttl.as_secs();
        let payload = serde_json::to_vec(&pin).expect("plain struct serialises");
        let value = format!("{VERSION}.{}", self.signer.seal(CONTEXT, subject, &payload));
        let header = set_cookie(&self.name, &value, Some(self.ttl));
        let issued = Issued {
            value: value.into(),
            expires: pin.backend.expires,
            last_active: pin.last_active,
        };
        (header, issued)
    }

    /// Whether the request carries a pin for `subject` naming `backend`
    /// that stays valid past half its lifetime and, when `stamped_since`
    /// is given (the request is activity), was stamped active since then;
    /// else a new one is due. `last` is the cookie issued for this very
    /// session: the browser sending it back is recognised by comparison,
    /// without a MAC.
    pub fn is_fresh(
        &self,
        headers: &HeaderMap,
        subject: &str,
        backend: &str,
        last: Option<&Issued>,
        now: SystemTime,
        stamped_since: Option<u64>,
    ) -> bool {
        let Lookup::One(value) = find_cookie(headers, &self.name) else {
            return false;
        };
        let renew_after = unix(now) + self.ttl.as_secs() / 2;
        let stamped = |last_active: u64| stamped_since.is_none_or(|since| last_active >= since);
        if let Some(last) = last.filter(|last| constant_time_eq(value.as_bytes(), last.value.as_bytes())) {
            return last.expires > renew_after && stamped(last.last_active);
        }
        self.open(value, subject, now).is_some_and(|pin| {
            pin.ended.is_none()
                && pin.backend.backend == backend
                && pin.backend.expires > renew_after
                && stamped(pin.last_active)
        })
    }

    /// A `Set-Cookie` value that deletes the cookie.
    pub fn clear(&self) -> HeaderValue {
        set_cookie(&self.name, "", Some(Duration::ZERO))
    }

    /// The pin in the request's cookie, if there is exactly one such cookie
    /// and it verifies for `subject` and has not expired at `now`.
    pub fn read(&self, headers: &HeaderMap, subject: &str, now: SystemTime) -> Option<Pin> {
        let value = match find_cookie(headers, &self.name) {
            Lookup::One(value) => value,
            Lookup::None | Lookup::Ambiguous => return None,
        };
        self.open(value, subject, now)
    }

    fn open(&self, value: &str, subject: &str, now: SystemTime) -> Option<Pin> {
        let sealed = value.strip_prefix(VERSION)?.strip_prefix('.')?;
        let payload = self.signer.open(CONTEXT, subject, sealed)?;
        let pin: Pin = serde_json::from_slice(&payload).ok()?;
        (pin.backend.expires > unix(now)).then_some(pin)
    }
}

/// A pinning cookie as issued: what the browser will send back, and when it
/// stops counting.
#[derive(Debug, Clone)]
pub struct Issued {
    value: Box<str>,
    expires: u64,
    last_active: u64,
}

/// Compares without stopping at the first difference, so the time taken
/// says nothing about how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    // Eight bytes at a time; every byte is looked at whatever differs.
    let (a_words, a_rest) = a.split_at(a.len() - a.len() % 8);
    let (b_words, b_rest) = b.split_at(b.len() - b.len() % 8);
    let word = |chunk: &[u8]| u64::from_ne_bytes(chunk.try_into().expect("chunks of eight"));
    let words = a_words
        .chunks_exact(8)
        .zip(b_words.chunks_exact(8))
        .fold(0u64, |acc, (x, y)| acc | (word(x) ^ word(y)));
    let rest = a_rest.iter().zip(b_rest).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    words == 0 && rest == 0
}

/// A `Set-Cookie` header value with the attributes every router cookie gets.
pub fn set_cookie(name: &str, value: &str, max_age: Option<Duration>) -> HeaderValue {
    let mut text = format!("{name}={value}; Path=/; HttpOnly; Secure; SameSite=Lax");
    if let Some(age) = max_age {
        text.push_str(&format!("; Max-Age={}", age.as_secs()));
    }
    HeaderValue::from_str(&text).expect("cookie names and values are validated ASCII")
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use base64::Engine;

    use crate::config::Secret;
    use crate::util::cookies::cookies_without;

    fn codec() -> CookieCodec {
        let secret = Secret::new(b"0123456789abcdef0123456789abcdef".to_vec());
        CookieCodec::new(Signer::new(&secret), "session_router".into(), Duration::from_secs(3600))
    }

    fn request_with(cookie: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::COOKIE, HeaderValue::from_str(cookie).unwrap());
        headers
    }

    fn pin(now: SystemTime) -> Pin {
        let lease = Lease {
            backend: "static-0".into(),
            upstream: http::uri::Authority::from_static("127.0.0.1:7860"),
        };
        Pin::new(&lease, "default", now, now)
    }

    fn issued_value(codec: &CookieCodec, subject: &str, now: SystemTime) -> String {
        let (header, _) = codec.issue(subject, pin(now), now);
        let text = header.to_str().unwrap();
        text.split(';').next().unwrap().to_string()
    }

    #[test]
    fn a_returned_cookie_is_fresh_until_half_its_lifetime_whether_or_not_it_was_issued_here() {
        let codec = codec();
        let now = SystemTime::now();
        let (header, issued) = codec.issue("alice", pin(now), now);
        let headers = request_with(header.to_str().unwrap().split(';').next().unwrap());
        for last in [Some(&issued), None] {
            assert!(codec.is_fresh(&headers, "alice", "static-0", last, now, None));
            assert!(!codec.is_fresh(
                &headers,
                "alice",
                "static-0",
                last,
                now + Duration::from_secs(1801),
                None
            ));
        }
        assert!(
            !codec.is_fresh(&headers, "alice", "static-1", None, now, None),
            "names another backend"
        );
        assert!(
            !codec.is_fresh(&headers, "bob", "static-0", None, now, None),
            "issued to another user"
        );
        assert!(!codec.is_fresh(&request_with("a=1"), "alice", "static-0", Some(&issued), now, None));
    }

    #[test]
    fn a_cookie_that_differs_from_the_issued_one_is_verified_not_trusted() {
        let codec = codec();
        let now = SystemTime::now();
        let (header, issued) = codec.issue("alice", pin(now), now);
        let value = header.to_str().unwrap().split(';').next().unwrap().to_string();
        // Same length, last character changed: not the issued cookie, and
        // its MAC fails.
        let mut forged = value.clone();
        let last = forged.pop().unwrap();
        forged.push(if last == 'A' { 'B' } else { 'A' });
        assert!(!codec.is_fresh(&request_with(&forged), "alice", "static-0", Some(&issued), now, None));
        assert!(constant_time_eq(b"same", b"same"));
        assert!(!constant_time_eq(b"same", b"sane"));
        assert!(!constant_time_eq(b"same", b"same!"));
        let long = b"0123456789abcdef0123456789abcdef-and-a-tail";
        assert!(constant_time_eq(long, long));
        for at in 0..long.len() {
            let mut changed = *long;
            changed[at] ^= 1;
            assert!(!constant_time_eq(long, &changed), "a difference at byte {at} is seen");
        }
    }

    #[test]
    fn a_cookie_opens_for_the_user_it_was_issued_to() {
        let codec = codec();
        let now = SystemTime::now();
        let cookie = issued_value(&codec, "alice", now);
        let pin = codec.read(&request_with(&cookie), "alice", now).unwrap();
        assert_eq!(pin.backend.backend, "static-0");
        assert_eq!(pin.backend.upstream, "127.0.0.1:7860");
    }

    #[test]
    fn another_users_cookie_is_ignored() {
        let codec = codec();
        let now = SystemTime::now();
        let cookie = issued_value(&codec, "alice", now);
        assert_eq!(codec.read(&request_with(&cookie), "bob", now), None);
    }

    #[test]
    fn a_tampered_cookie_is_ignored() {
        let codec = codec();
        let now = SystemTime::now();
        let cookie = issued_value(&codec, "alice", now);
        let (prefix, rest) = cookie.split_once("v1.").unwrap();
        let (payload, tag) = rest.split_once('.').unwrap();
        let forged_payload = B64.encode(
            String::from_utf8(B64.decode(payload).unwrap())
                .unwrap()
                .replace("static-0", "static-1"),
        );
        let forged = format!("{prefix}v1.{forged_payload}.{tag}");
        assert_eq!(codec.read(&request_with(&forged), "alice", now), None);
        let mut flipped = cookie.clone().into_bytes();
        let last = flipped.len() - 2;
        flipped[last] = if flipped[last] == b'A' { b'B' } else { b'A' };
        assert_eq!(
            codec.read(&request_with(&String::from_utf8(flipped).unwrap()), "alice", now),
            None
        );
    }

    #[test]
    fn an_expired_cookie_is_ignored() {
        let codec = codec();
        let then = SystemTime::now() - Duration::from_secs(7200);
        let cookie = issued_value(&codec, "alice", then);
        assert_eq!(codec.read(&request_with(&cookie), "alice", SystemTime::now()), None);
    }

    #[test]
    fn a_duplicated_or_oversized_cookie_is_ignored() {
        let codec = codec();
        let now = SystemTime::now();
        let cookie = issued_value(&codec, "alice", now);
        assert_eq!(
            codec.read(&request_with(&format!("{cookie}; {cookie}")), "alice", now),
            None
        );
        let huge = format!("session_router=v1.{}.AAAA", "A".repeat(10_000));
        assert_eq!(codec.read(&request_with(&huge), "alice", now), None);
    }

    #[test]
    fn an_active_users_cookie_is_due_again_once_its_stamp_is_older_than_asked() {
        let codec = codec();
        let now = SystemTime::now();
        let (header, issued) = codec.issue("alice", pin(now), now);
        let headers = request_with(header.to_str().unwrap().split(';').next().unwrap());
        let stamp = unix(now);
        for last in [Some(&issued), None] {
            assert!(codec.is_fresh(&headers, "alice", "static-0", last, now, Some(stamp)));
            assert!(!codec.is_fresh(&headers, "alice", "static-0", last, now, Some(stamp + 1)));
        }
    }

    #[test]
    fn a_cookie_that_says_its_backend_ended_pins_nothing_but_says_why() {
        let codec = codec();
        let now = SystemTime::now();
        let mut ended = pin(now);
        ended.ended = Some(Ended::new(crate::allocator::ReleaseReason::Idle, now));
        let (header, _) = codec.issue("alice", ended.clone(), now);
        let headers = request_with(header.to_str().unwrap().split(';').next().unwrap());
        assert!(!codec.is_fresh(&headers, "alice", "static-0", None, now, None));
        let read = codec.read(&headers, "alice", now).unwrap();
        assert_eq!(read.ended, ended.ended);
        // A cookie from before the stamps still reads.
        let old = br#"{"b":"static-0","u":"127.0.0.1:7860","a":5,"e":99999999999}"#;
        let value = format!("{VERSION}.{}", codec.signer.seal(CONTEXT, "alice", old));
        let read = codec
            .read(&request_with(&format!("session_router={value}")), "alice", now)
            .unwrap();
        assert_eq!((read.last_active, read.ended), (0, None));
    }

    fn without(headers: &HeaderMap, names: &[&str]) -> Option<Vec<String>> {
        cookies_without(headers, names).map(|kept| kept.map(str::to_string).collect())
    }

    #[test]
    fn the_router_cookies_are_left_out_and_the_others_kept_in_order() {
        let mut headers = request_with("a=1; session_router=xyz; b=2");
        headers.append(
            http::header::COOKIE,
            HeaderValue::from_static("session_router_dev=q; c=3"),
        );
        assert_eq!(
            without(&headers, &["session_router", "session_router_dev"]).unwrap(),
            ["a=1", "b=2", "c=3"]
        );
        assert_eq!(
            without(&request_with("session_router=xyz"), &["session_router"]).unwrap(),
            Vec::<String>::new()
        );
        assert!(
            without(&request_with("a=1; b=2"), &["session_router"]).is_none(),
            "no router cookie: the headers go untouched"
        );
    }
}
