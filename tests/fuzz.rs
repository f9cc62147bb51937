//! Property-based fuzzing of what reads untrusted (or operator-typed) text:
//! the cookie decoder, the token front end (everything before a signature
//! check), the config loader and the user-label derivation. No input may
//! panic, and none may make them allocate more than a small bound: every
//! allocation in this test binary is counted.
//!
//! Case counts are bounded so the file runs in well under a minute in a
//! debug build; `PROPTEST_CASES=N` raises (or lowers) them all, e.g. for a
//! longer run before a release.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderValue};
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use session_router::allocator::agones::label::user_label_value;
use session_router::auth::iap::IapVerifier;
use session_router::auth::jwks::KeyStore;
use session_router::config::{Config, Secret};
use session_router::session::cookie::CookieCodec;
use session_router::util::cookies::{cookies_without, find_cookie, Lookup};
use session_router::util::label::{check_key, is_valid_value};
use session_router::util::seal::Signer;

// ---------------------------------------------------------------------------
// Allocation accounting: bytes requested on this thread, per measurement.

struct Counting;

thread_local! {
    static ALLOCATED: Cell<usize> = const { Cell::new(0) };
}

fn count(bytes: usize) {
    let _ = ALLOCATED.try_with(|a| a.set(a.get().saturating_add(bytes)));
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        System.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        System.realloc(ptr, layout, new_size)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` and returns its result with the bytes it allocated (in all,
/// not just at its peak: an upper bound on its peak).
fn allocated_by<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let before = ALLOCATED.with(Cell::get);
    let result = f();
    let after = ALLOCATED.with(Cell::get);
    (result, after - before)
}

/// `cases` unless `PROPTEST_CASES` says otherwise; failures are reported,
/// not written to a regressions file.
fn config(cases: u32) -> ProptestConfig {
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = cases;
    }
    config.failure_persistence = None;
    config
}

// ---------------------------------------------------------------------------
// The cookie decoder

const SECRET: &[u8] = b"fuzz-secret-fuzz-secret-fuzz-secret!";
const COOKIE: &str = "session_router";

fn codec() -> CookieCodec {
    CookieCodec::new(
        Signer::new(Secret::new(SECRET.to_vec())),
        COOKIE.into(),
        Duration::from_secs(3600),
    )
}

fn cookie_headers(values: &[Vec<u8>]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for value in values {
        if let Ok(v) = HeaderValue::from_bytes(value) {
            headers.append(http::header::COOKIE, v);
        }
    }
    headers
}

/// Text that looks like cookie headers: pairs of our name, other names and
/// junk, with the separators and base64 alphabet a forger would use.
fn cookie_line() -> impl Strategy<Value = String> {
    let name = prop_oneof![
        Just(COOKIE.to_string()),
        Just(format!("{COOKIE}_dev")),
        Just(format!(" {COOKIE} ")),
        "[a-z_]{1,8}",
        Just(String::new()),
    ];
    let value = prop_oneof![
        "v1\\.[A-Za-z0-9_-]{0,120}\\.[A-Za-z0-9_-]{0,60}",
        "[A-Za-z0-9_.=-]{0,40}",
        Just("v1.".to_string()),
        Just("v1..".to_string()),
        "[ -~]{0,40}",
    ];
    let pair = (name, value, any::<bool>()).prop_map(|(n, v, eq)| if eq { format!("{n}={v}") } else { n });
    proptest::collection::vec(pair, 0..6).prop_map(|pairs| pairs.join("; "))
}

proptest! {
    #![proptest_config(config(4000))]

    #[test]
    fn any_cookie_bytes_are_ignored_without_panic_or_large_allocation(
        values in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..600), 0..4),
        subject in "[ -~]{0,40}",
    ) {
        let headers = cookie_headers(&values);
        let codec = codec();
        let (pin, bytes) = allocated_by(|| codec.read(&headers, &subject, SystemTime::now()));
        prop_assert!(pin.is_none());
        prop_assert!(bytes < 16 * 1024, "{bytes} bytes allocated");
    }

    #[test]
    fn cookie_shaped_text_never_verifies(lines in proptest::collection::vec(cookie_line(), 1..3)) {
        let values: Vec<Vec<u8>> = lines.iter().map(|l| l.clone().into_bytes()).collect();
        let headers = cookie_headers(&values);
        let codec = codec();
        let (pin, bytes) = allocated_by(|| codec.read(&headers, "accounts.google.com:alice", SystemTime::now()));
        prop_assert!(pin.is_none());
        prop_assert!(bytes < 16 * 1024, "{bytes} bytes allocated");
    }

    #[test]
    fn removing_router_cookies_leaves_none_of_them_and_never_panics(lines in proptest::collection::vec(cookie_line(), 0..3)) {
        let values: Vec<Vec<u8>> = lines.iter().map(|l| l.clone().into_bytes()).collect();
        let headers = cookie_headers(&values);
        let names = [COOKIE, "session_router_dev"];
        let had_ours = names.iter().any(|n| find_cookie(&headers, n) != Lookup::None);
        // What the backend receives: the kept pairs in one header.
        let kept = cookies_without(&headers, &names).map(|kept| kept.collect::<Vec<_>>().join("; "));
        match kept {
            Some(line) => {
                prop_assert!(had_ours);
                let mut forwarded = HeaderMap::new();
                if let Ok(value) = HeaderValue::from_str(&line) {
                    forwarded.insert(http::header::COOKIE, value);
                }
                for name in names {
                    prop_assert_eq!(find_cookie(&forwarded, name), Lookup::None);
                }
            }
            None => prop_assert!(!had_ours, "a router cookie would go through untouched"),
        }
    }
}

proptest! {
    #![proptest_config(config(300))]

    #[test]
    fn an_issued_cookie_opens_only_for_its_user_and_any_one_character_change_breaks_it(
        subject in "accounts\\.google\\.com:[0-9]{1,20}",
        other in "accounts\\.google\\.com:[0-9]{1,20}",
        backend in "[a-z0-9-]{1,40}",
        port in 1u16..,
        position in any::<proptest::sample::Index>(),
        replacement in "[A-Za-z0-9_.=-]",
    ) {
        let codec = codec();
        let now = SystemTime::now();
        let upstream = format!("10.0.0.1:{port}");
        let lease = session_router::allocator::Lease {
            backend: backend.as_str().into(),
            upstream: upstream.parse().unwrap(),
        };
        let pinned = session_router::session::cookie::Pin::new(&lease, "default", now, now);
        let (issued, _) = codec.issue(&subject, pinned, now);
        let cookie = issued.to_str().unwrap().split(';').next().unwrap().to_string();
        let headers = cookie_headers(&[cookie.clone().into_bytes()]);
        let pin = codec.read(&headers, &subject, now).expect("opens for its user");
        prop_assert_eq!(&pin.backend.backend, &backend);
        prop_assert_eq!(&pin.backend.upstream, &upstream);
        if other != subject {
            prop_assert!(codec.read(&headers, &other, now).is_none(), "opened for another user");
        }
        // Change one character of the value (after `name=`).
        let value_start = COOKIE.len() + 1;
        let at = value_start + position.index(cookie.len() - value_start);
        let mut changed = cookie.clone();
        changed.replace_range(at..at + 1, &replacement);
        if changed != cookie {
            let headers = cookie_headers(&[changed.clone().into_bytes()]);
            prop_assert!(codec.read(&headers, &subject, now).is_none(), "{changed} still opens");
        }
    }
}

#[test]
fn a_huge_cookie_is_refused_before_any_decoding() {
    let codec = codec();
    let value = format!("{COOKIE}=v1.{}.{}", "A".repeat(1 << 20), "B".repeat(43));
    let headers = cookie_headers(&[value.into_bytes()]);
    let (pin, bytes) = allocated_by(|| codec.read(&headers, "accounts.google.com:alice", SystemTime::now()));
    assert!(pin.is_none());
    assert!(bytes < 4096, "{bytes} bytes allocated for a 1 MiB cookie");
    let signer = Signer::new(Secret::new(SECRET.to_vec()));
    let sealed = format!("{}.{}", "A".repeat(1 << 20), "B".repeat(43));
    let (opened, bytes) = allocated_by(|| signer.open("ctx", "sub", &sealed));
    assert!(opened.is_none());
    assert!(bytes < 4096, "{bytes} bytes allocated for a 1 MiB sealed value");
}

// ---------------------------------------------------------------------------
// The token front end: everything up to (and including) the signature check,
// with no key ever loaded and the JWKS URL refusing connections.

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    })
}

fn verifier() -> &'static IapVerifier {
    static VERIFIER: OnceLock<IapVerifier> = OnceLock::new();
    VERIFIER.get_or_init(|| {
        let text = "[auth]\naudiences = [\"/projects/1/global/backendServices/2\"]\n[backend.static]\nupstreams = [\"http://127.0.0.1:1\"]\n";
        let config = Config::from_toml(text, Some(SECRET.to_vec())).unwrap();
        // Port 9 on loopback refuses: the one refetch an unknown kid may
        // cause fails at once, and the next hour's are rate-limited away.
        let keys = Arc::new(KeyStore::new(
            "http://127.0.0.1:9/jwk".into(),
            Duration::from_secs(3600),
        ));
        let verifier = IapVerifier::new(&config.auth, keys);
        let warm = format!("{}.e30.AA", b64(r#"{"alg":"ES256","kid":"warm-up"}"#));
        assert!(runtime().block_on(verifier.verify(&warm)).is_err());
        verifier
    })
}

fn b64(bytes: impl AsRef<[u8]>) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Verifies `token`; it must fail, and allocate at most `limit` bytes.
fn refused(token: &str, limit: usize) -> Result<(), TestCaseError> {
    let verifier = verifier();
    let (result, bytes) = allocated_by(|| runtime().block_on(verifier.verify(token)));
    prop_assert!(result.is_err(), "accepted: {token:.80}");
    prop_assert!(
        bytes < limit,
        "{bytes} bytes allocated for a {}-byte token",
        token.len()
    );
    Ok(())
}

/// A JSON value of any shape, for header fields and claims.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(|f| serde_json::json!(f)),
        "[ -~]{0,30}".prop_map(serde_json::Value::from),
        prop_oneof![Just("ES256"), Just("none"), Just("HS256"), Just("RS256"), Just("key-1")]
            .prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            proptest::collection::btree_map("[a-z]{1,6}", inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

fn header() -> impl Strategy<Value = String> {
    let alg = prop_oneof![
        Just(serde_json::json!("ES256")),
        Just(serde_json::json!("es256")),
        Just(serde_json::json!("none")),
        Just(serde_json::json!("HS256")),
        Just(serde_json::json!("RS256")),
        json_value(),
    ];
    let kid = prop_oneof![
        Just(serde_json::json!("key-1")),
        "[ -~]{0,60}".prop_map(serde_json::Value::from),
        Just(serde_json::json!("http://127.0.0.1:9/evil")),
        json_value(),
    ];
    let extra = proptest::collection::btree_map(
        prop_oneof![
            Just("jku"),
            Just("x5u"),
            Just("jwk"),
            Just("x5c"),
            Just("crit"),
            Just("typ"),
            Just("zip")
        ],
        json_value(),
        0..3,
    );
    (alg, proptest::option::of(kid), extra).prop_map(|(alg, kid, extra)| {
        let mut header = serde_json::Map::new();
        header.insert("alg".into(), alg);
        if let Some(kid) = kid {
            header.insert("kid".into(), kid);
        }
        for (k, v) in extra {
            header.insert(k.into(), v);
        }
        serde_json::Value::Object(header).to_string()
    })
}

proptest! {
    #![proptest_config(config(3000))]

    #[test]
    fn any_string_is_refused_without_panic(token in "[ -~]{0,300}") {
        refused(&token, 64 * 1024)?;
    }

    #[test]
    fn three_base64_segments_of_anything_are_refused(
        a in proptest::collection::vec(any::<u8>(), 0..200),
        b in proptest::collection::vec(any::<u8>(), 0..200),
        c in proptest::collection::vec(any::<u8>(), 0..80),
    ) {
        refused(&format!("{}.{}.{}", b64(a), b64(b), b64(c)), 64 * 1024)?;
    }

    #[test]
    fn tokens_with_any_header_and_claims_are_refused_before_a_key_is_used(
        header in header(),
        claims in json_value(),
        signature in proptest::collection::vec(any::<u8>(), 0..80),
    ) {
        refused(&format!("{}.{}.{}", b64(header), b64(claims.to_string()), b64(signature)), 64 * 1024)?;
    }
}

#[test]
fn a_well_formed_header_gets_as_far_as_the_key_lookup() {
    // So the generated headers above do exercise the later stages too.
    let token = format!("{}.e30.AA", b64(r#"{"alg":"ES256","kid":"key-1","typ":"JWT"}"#));
    let result = runtime().block_on(verifier().verify(&token));
    assert!(
        matches!(result, Err(session_router::auth::AuthError::KeysUnavailable)),
        "{result:?}"
    );
}

#[test]
fn huge_and_deeply_nested_tokens_are_refused_cheaply() {
    // Far over the size limit: refused before it is decoded.
    let huge = format!("{}.{}.{}", "a".repeat(5 << 20), "b".repeat(10), "c".repeat(10));
    refused(&huge, 4096).unwrap();
    // Nesting within the size limit: the JSON parser's depth limit holds.
    let nested = format!("{}{}", "[".repeat(4000), "]".repeat(4000));
    refused(&format!("{}.e30.AA", b64(&nested[..5000])), 256 * 1024).unwrap();
    let objects = format!("{}1{}", r#"{"a":"#.repeat(1000), "}".repeat(1000));
    refused(
        &format!("{}.{}.AA", b64(r#"{"alg":"ES256","kid":"k"}"#), b64(objects)),
        256 * 1024,
    )
    .unwrap();
}

// ---------------------------------------------------------------------------
// The config loader

/// A TOML value of an interesting kind, as text.
fn toml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        prop_oneof![
            Just("0s"),
            Just("1ns"),
            Just("30s"),
            Just("1h 30m"),
            Just("-1s"),
            Just("1000000000y"),
            Just("500000000000y"),
            Just("99999999999999999999s"),
            Just(""),
            Just("iap"),
            Just("dev"),
            Just("static"),
            Just("agones"),
            Just("agones-allocator"),
            Just("shared"),
            Just("sd15"),
            Just("http://127.0.0.1:1"),
            Just("http://127.0.0.1:99999"),
            Just("https://x"),
            Just("/projects/1/global/backendServices/2"),
            Just("0.0.0.0:8080"),
            Just("127.0.0.1:0"),
            Just("user"),
            Just("a/b/c"),
        ]
        .prop_map(|s| format!("{s:?}")),
        "[ -~]{0,24}".prop_map(|s| format!("{s:?}")),
        any::<i64>().prop_map(|n| n.to_string()),
        prop_oneof![Just("0"), Just("1024"), Just("65000"), Just("1048576"), Just("-1")].prop_map(String::from),
        any::<bool>().prop_map(|b| b.to_string()),
        any::<f64>().prop_map(|f| if f.is_finite() { format!("{f:?}") } else { "nan".into() }),
        proptest::collection::vec("[ -~]{0,16}", 0..3).prop_map(|v| format!("{v:?}")),
        Just("[\"http://127.0.0.1:1\", \"http://127.0.0.1:1\"]".to_string()),
        Just("{ a = 1 }".to_string()),
    ]
}

const SECTIONS: &[(&str, &[&str])] = &[
    (
        "server",
        &[
            "listen",
            "drain_timeout",
            "keepalive_timeout",
            "header_timeout",
            "body_timeout",
            "max_header_bytes",
            "max_uri_bytes",
            "allowed_origins",
            "autoscaler_listen",
            "behind_load_balancer",
            "typo",
        ],
    ),
    (
        "auth",
        &[
            "mode",
            "audiences",
            "jwks_url",
            "leeway",
            "allowed_emails",
            "allowed_domains",
            "jwks_refetch_interval",
            "token_cache_entries",
        ],
    ),
    (
        "session",
        &[
            "cookie_name",
            "idle_timeout",
            "activity_ignore_paths",
            "max_lifetime",
            "cookie_ttl",
            "retry_after",
            "queue_timeout",
            "busy_probe",
        ],
    ),
    ("autoscaler", &["buffer", "min_replicas", "max_replicas"]),
    ("backend", &["kind", "connect_timeout"]),
    ("backend.static", &["upstreams", "probe_interval"]),
    (
        "backend.shared",
        &[
            "upstreams",
            "service",
            "namespace",
            "port_name",
            "max_users_per_backend",
            "probe_interval",
            "kube_api_url",
        ],
    ),
    (
        "backend.agones",
        &[
            "namespace",
            "fleet",
            "port_name",
            "user_label",
            "address_preference",
            "scheduling",
            "api_timeout",
            "allocation_retry_window",
            "activity_sync_interval",
            "adopt_legacy",
            "kube_api_url",
            "allocator_url",
            "allocator_ca_file",
        ],
    ),
];

fn config_document() -> impl Strategy<Value = String> {
    let entry = (0..SECTIONS.len(), any::<proptest::sample::Index>(), toml_value());
    proptest::collection::vec(entry, 0..14).prop_map(|entries| {
        let mut by_section: Vec<Vec<String>> = vec![Vec::new(); SECTIONS.len()];
        let mut used = std::collections::HashSet::new();
        for (section, key, value) in entries {
            let keys = SECTIONS[section].1;
            let key = keys[key.index(keys.len())];
            if used.insert((section, key)) {
                by_section[section].push(format!("{key} = {value}"));
            }
        }
        let mut text = String::new();
        for (i, lines) in by_section.iter().enumerate() {
            if !lines.is_empty() {
                text.push_str(&format!("[{}]\n{}\n", SECTIONS[i].0, lines.join("\n")));
            }
        }
        text
    })
}

proptest! {
    #![proptest_config(config(3000))]

    #[test]
    fn any_text_loads_or_is_refused_without_panic(text in "[ -~\n]{0,400}") {
        let (_, bytes) = allocated_by(|| Config::from_toml(&text, Some(SECRET.to_vec())));
        prop_assert!(bytes < 1 << 20, "{bytes} bytes for {} bytes of config", text.len());
    }

    #[test]
    fn config_shaped_documents_load_or_name_their_problems(
        text in config_document(),
        secret in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..48)),
    ) {
        let (loaded, bytes) = allocated_by(|| Config::from_toml(&text, secret.clone()));
        prop_assert!(bytes < 1 << 20, "{bytes} bytes for {} bytes of config", text.len());
        match loaded {
            Ok(config) => {
                // What check-config prints is a config meaning the same.
                let rendered = config.render();
                match Config::from_toml(&rendered, secret) {
                    Ok(again) => prop_assert_eq!(again.render(), rendered),
                    Err(e) => prop_assert!(false, "{e}\nin the rendering of\n{text}\n---\n{rendered}"),
                }
            }
            Err(e) => {
                // Every problem names a key and a reason.
                let report = e.to_string();
                prop_assert!(!report.trim().is_empty());
            }
        }
    }
}

#[test]
fn deeply_nested_toml_is_refused_without_overflowing_the_stack() {
    for text in [
        format!("a = {}{}", "[".repeat(100_000), "]".repeat(100_000)),
        format!("a = {}1{}", "{ b = ".repeat(50_000), " }".repeat(50_000)),
        format!("[{}]", "a.".repeat(50_000) + "a"),
    ] {
        // Runs on a thread with a small stack: unbounded recursion aborts.
        let handle = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || Config::from_toml(&text, Some(SECRET.to_vec())).is_err())
            .unwrap();
        assert!(handle.join().unwrap());
    }
}

// ---------------------------------------------------------------------------
// The user-label derivation

proptest! {
    #![proptest_config(config(5000))]

    #[test]
    fn every_email_gets_a_valid_stable_bounded_label(email in "\\PC{0,120}") {
        let (label, bytes) = allocated_by(|| user_label_value(&email));
        prop_assert!(is_valid_value(&label), "{email:?} → {label:?}");
        prop_assert!(!label.is_empty() && label.len() <= 63);
        prop_assert_eq!(&label, &user_label_value(&email));
        prop_assert!(bytes < 4096 + 8 * email.len(), "{bytes} bytes");
        // The original front end's form is kept whenever it is valid.
        let original = format!("accounts.google.com.{}", email.replace([':', '@'], "."));
        if is_valid_value(&original) {
            prop_assert_eq!(label, original);
        }
    }

    #[test]
    fn emails_with_different_original_forms_get_different_labels(
        a in "[a-z0-9._+'-]{1,40}@[a-z0-9.-]{1,40}",
        b in "[a-z0-9._+'-]{1,40}@[a-z0-9.-]{1,40}",
    ) {
        let original = |e: &str| e.replace([':', '@'], ".");
        prop_assume!(original(&a) != original(&b));
        prop_assert_ne!(user_label_value(&a), user_label_value(&b));
    }

    #[test]
    fn label_keys_are_checked_without_panic(key in "\\PC{0,300}") {
        let (result, bytes) = allocated_by(|| check_key(&key));
        prop_assert!(bytes < 4096 + 4 * key.len());
        if result.is_ok() {
            prop_assert!(key.len() <= 253 + 1 + 63);
        }
    }
}
