//! Configuration: a TOML file plus one secret from the environment.
//!
//! [`Config::load`] reads the file, [`Config::from_toml`] validates it and
//! returns either a complete, typed config or a [`ConfigError`] listing every
//! problem as `key: reason`. Nothing else in the crate parses configuration.

mod backend;
mod profile;
mod reader;

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use http::Uri;
use serde::Serialize;

pub use backend::{AgonesConfig, BackendConfig, BackendKind, SharedConfig, StaticConfig, KNOWN_KINDS, PRIMARY_ADDRESS};
pub use profile::{ProfileConfig, IMPLICIT_PROFILE};
use reader::Section;

/// The environment variable holding the cookie-signing secret.
pub const COOKIE_SECRET_ENV: &str = "SESSION_ROUTER_COOKIE_SECRET";
/// The issuer every IAP token carries.
pub const IAP_ISSUER: &str = "https://cloud.google.com/iap";
const MIN_SECRET_BYTES: usize = 32;
/// More serving threads than this is a typo, not a machine.
const MAX_THREADS: usize = 256;
/// Connection time limits beyond this are a typo, not a policy.
const MAX_CONNECTION_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);
/// Replica counts beyond this are a typo, not a fleet (and stay far inside
/// the int32 Agones counts replicas in).
const MAX_REPLICAS: u64 = 100_000;

/// The validated configuration of one router process.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub server: ServerConfig,
    pub auth: AuthConfig,
    pub session: SessionConfig,
    /// The default profile's backend: for a config without `[[profiles]]`,
    /// `[backend]` itself.
    pub backend: BackendConfig,
    /// Never empty: `[[profiles]]`, or one made of `[backend]`.
    pub profiles: Vec<ProfileConfig>,
    /// Whether `[[profiles]]` was written (else the one profile is implicit).
    #[serde(skip)]
    pub profiles_listed: bool,
    pub log: LogConfig,
    pub admin: AdminConfig,
    pub autoscaler: AutoscalerConfig,
}

/// `[autoscaler]`: how the FleetAutoscaler webhook (served on
/// `server.autoscaler_listen`) sizes the Fleet.
#[derive(Debug, Clone, Serialize)]
pub struct AutoscalerConfig {
    /// Ready servers to keep on top of the demand (allocated + waiting):
    /// a cold WebUI takes minutes to load its models.
    pub buffer: u32,
    /// The Fleet never shrinks below this.
    pub min_replicas: u32,
    /// The Fleet never grows above this (the GPUs the node pool may have);
    /// 0 = no upper bound.
    pub max_replicas: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object a line, in Cloud Logging's shape.
    Json,
    Text,
}

#[derive(Debug, Clone, Serialize)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `session_router=debug`; `RUST_LOG` wins.
    pub level: String,
    /// Log emails as they are (else a short hash).
    pub include_email: bool,
    /// Google Cloud project id, to turn `X-Cloud-Trace-Context` into
    /// `projects/ID/traces/TRACE`.
    pub project_id: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AdminConfig {
    /// Lower-cased verified emails allowed on `/_router/admin`.
    pub emails: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// How long a shutdown waits for in-flight requests and open streams.
    #[serde(serialize_with = "as_duration")]
    pub drain_timeout: Duration,
    /// How long an idle keep-alive connection (and a request head being
    /// read) may take. Must exceed the Google load balancer's 600 s.
    #[serde(serialize_with = "as_duration")]
    pub keepalive_timeout: Duration,
    /// A request head must arrive completely within this time of its first byte.
    #[serde(serialize_with = "as_duration")]
    pub header_timeout: Duration,
    /// A request body may stall (no bytes) at most this long.
    #[serde(serialize_with = "as_duration")]
    pub body_timeout: Duration,
    /// Largest request head (request line + headers) accepted; larger → 431.
    pub max_header_bytes: usize,
    /// Longest request target (path + query) accepted; longer → 414.
    pub max_uri_bytes: usize,
    /// Where `/metrics` is served (never on `listen`); unset = off.
    pub metrics_listen: Option<SocketAddr>,
    /// Where the Agones FleetAutoscaler webhook is served (never on
    /// `listen` or `metrics_listen`); unset = off.
    pub autoscaler_listen: Option<SocketAddr>,
    /// Extra origins (scheme://host[:port]) allowed to open WebSockets and
    /// post to `/_router/*`, besides the request's own origin.
    pub allowed_origins: Vec<String>,
    /// Threads that serve connections, each with a runtime of its own.
    /// Defaults to the CPUs the process may use.
    pub threads: usize,
    /// The Google load balancer is in front: the client's address is the
    /// entry it adds to `X-Forwarded-For`, not the peer's. Defaults to on in
    /// `iap` mode (IAP only exists behind it), off in `dev` mode.
    pub behind_load_balancer: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Production: every request carries a Cloud IAP JWT, verified here.
    Iap,
    /// Local demos: a sign-in page asks for a name. Loopback only.
    Dev,
}

#[derive(Debug, Clone, Serialize)]
pub struct AuthConfig {
    pub mode: AuthMode,
    pub audiences: Vec<String>,
    pub jwks_url: String,
    #[serde(serialize_with = "as_duration")]
    pub leeway: Duration,
    /// Lower-cased exact addresses; empty = no restriction by address.
    pub allowed_emails: Vec<String>,
    /// Lower-cased domains; empty = no restriction by domain.
    pub allowed_domains: Vec<String>,
    /// Minimum spacing of JWKS refetches triggered by an unknown `kid`.
    #[serde(serialize_with = "as_duration")]
    pub jwks_refetch_interval: Duration,
    /// How many verified tokens are remembered (each until its `exp`).
    pub token_cache_entries: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct SessionConfig {
    pub cookie_name: String,
    #[serde(serialize_with = "as_duration")]
    pub idle_timeout: Duration,
    pub activity_ignore_paths: Vec<String>,
    /// Hard cap on one allocation's life; zero = off.
    #[serde(serialize_with = "as_duration")]
    pub max_lifetime: Duration,
    /// How long a pinning cookie stays valid after it is issued.
    #[serde(serialize_with = "as_duration")]
    pub cookie_ttl: Duration,
    /// The `Retry-After` sent with the waiting page.
    #[serde(serialize_with = "as_duration")]
    pub retry_after: Duration,
    /// A waiter who has not asked for this long leaves the line.
    #[serde(serialize_with = "as_duration")]
    pub queue_timeout: Duration,
    /// Path on the user's backend that says whether a job is running (the
    /// WebUI's `/sdapi/v1/progress`); a busy answer postpones idle release.
    pub busy_probe: Option<String>,
    /// The cookie-signing key, from [`COOKIE_SECRET_ENV`]. Never printed;
    /// not a config key either, so it is left out of the rendered config.
    #[serde(skip)]
    pub cookie_secret: Secret,
}

/// Key material that must never reach a log line or `check-config` output.
#[derive(Clone)]
pub struct Secret {
    bytes: Vec<u8>,
    /// Made up by [`Secret::random`], not given.
    random: bool,
}

impl Secret {
    pub fn new(bytes: Vec<u8>) -> Self {
        Secret { bytes, random: false }
    }

    /// A fresh random secret, for `dev` mode when none is configured:
    /// cookies then die with the process, which is what a demo wants.
    pub fn random() -> Self {
        use rand::RngCore;
        let mut bytes = vec![0u8; 32];
        rand::thread_rng().fill_bytes(&mut bytes);
        Secret { bytes, random: true }
    }

    pub fn expose(&self) -> &[u8] {
        &self.bytes
    }

    /// Where the secret came from, as `check-config` tells the operator.
    fn origin(&self) -> String {
        if self.random {
            format!("{COOKIE_SECRET_ENV} is not set: a random secret for this process only (cookies die with it)")
        } else {
            format!("{} bytes from {COOKIE_SECRET_ENV} (redacted)", self.bytes.len())
        }
    }
}

/// The key bytes, for [`Signer`](crate::util::seal::Signer), which takes
/// any bytes so that sealing needs nothing of the configuration.
impl AsRef<[u8]> for Secret {
    fn as_ref(&self) -> &[u8] {
        self.expose()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(<{} bytes redacted>)", self.bytes.len())
    }
}

/// One thing wrong with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub reason: String,
}

impl Problem {
    fn new(key: &str, reason: String) -> Self {
        Problem {
            key: key.to_string(),
            reason,
        }
    }
}

/// Every problem found in a configuration, printed one `key: reason` a line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", render_problems(.0))]
    Invalid(Vec<Problem>),
}

fn render_problems(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("{}: {}", p.key, p.reason))
        .collect::<Vec<_>>()
        .join("\n")
}

impl Config {
    /// Reads and validates `path`, taking the secret from the process
    /// environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let secret = std::env::var_os(COOKIE_SECRET_ENV).map(|v| v.into_encoded_bytes());
        Config::from_toml(&text, secret)
    }

    /// Validates a config text. `cookie_secret` is the raw value of
    /// [`COOKIE_SECRET_ENV`], passed in so tests never touch the environment.
    pub fn from_toml(text: &str, cookie_secret: Option<Vec<u8>>) -> Result<Config, ConfigError> {
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Invalid(vec![syntax_problem(text, &e)]))?;
        let mut problems = Vec::new();
        let mut root = Section::root(&table);

        let mut server = root.section("server", &mut problems);
        let listen_key = server.key("listen");
        let listen_text = server.string("listen", "0.0.0.0:8080", &mut problems);
        let listen = listen_text.parse::<SocketAddr>().unwrap_or_else(|_| {
            problems.push(Problem::new(
                &listen_key,
                format!("{listen_text:?} is not an address:port such as \"0.0.0.0:8080\""),
            ));
            SocketAddr::from(([127, 0, 0, 1], 0))
        });
        let drain_timeout = server.duration("drain_timeout", Duration::from_secs(30), &mut problems);
        let keepalive_timeout = server.duration("keepalive_timeout", Duration::from_secs(620), &mut problems);
        let header_timeout = server.duration("header_timeout", Duration::from_secs(30), &mut problems);
        let body_timeout = server.duration("body_timeout", Duration::from_secs(60), &mut problems);
        for (key, value) in [
            ("keepalive_timeout", keepalive_timeout),
            ("header_timeout", header_timeout),
            ("body_timeout", body_timeout),
        ] {
            if value.is_zero() || value > MAX_CONNECTION_TIMEOUT {
                problems.push(Problem::new(
                    &server.key(key),
                    "must be more than 0s and at most 7d".into(),
                ));
            }
        }
        let max_header_bytes = server.integer("max_header_bytes", 64 * 1024, &mut problems) as usize;
        if !(1024..=1024 * 1024).contains(&max_header_bytes) {
            problems.push(Problem::new(
                &server.key("max_header_bytes"),
                "must be between 1024 and 1048576".into(),
            ));
        }
        let max_uri_bytes = server.integer("max_uri_bytes", 16 * 1024, &mut problems) as usize;
        if !(256..=65_000).contains(&max_uri_bytes) {
            problems.push(Problem::new(
                &server.key("max_uri_bytes"),
                "must be between 256 and 65000".into(),
            ));
        }
        if max_uri_bytes + 1024 > max_header_bytes {
            problems.push(Problem::new(
                &server.key("max_uri_bytes"),
                format!("must be at least 1024 less than server.max_header_bytes ({max_header_bytes}): the URI is part of the head, with room left for its headers"),
            ));
        }
        let metrics_key = server.key("metrics_listen");
        let metrics_text = server.string("metrics_listen", "", &mut problems);
        let metrics_listen = if metrics_text.is_empty() {
            None
        } else {
            match metrics_text.parse::<SocketAddr>() {
                Ok(addr) if addr == listen && addr.port() != 0 => {
                    problems.push(Problem::new(
                        &metrics_key,
                        "must differ from server.listen: metrics are never on the main port".into(),
                    ));
                    None
                }
                Ok(addr) => Some(addr),
                Err(_) => {
                    problems.push(Problem::new(
                        &metrics_key,
                        format!("{metrics_text:?} is not an address:port such as \"0.0.0.0:9090\""),
                    ));
                    None
                }
            }
        };
        // Set but invalid is reported once, under its own key.
        let autoscaler_listen_set = server.is_present("autoscaler_listen");
        let autoscaler_listen = read_autoscaler_listen(&mut server, listen, metrics_listen, &mut problems);
        let allowed_origins = read_origins(&mut server, &mut problems);
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = server.integer("threads", cpus as u64, &mut problems);
        if !(1..=MAX_THREADS as u64).contains(&threads) {
            problems.push(Problem::new(
                &server.key("threads"),
                format!("must be between 1 and {MAX_THREADS}"),
            ));
        }
        let threads = threads.clamp(1, MAX_THREADS as u64) as usize;
        // Its default depends on auth.mode, read below.
        let behind_load_balancer = server
            .is_present("behind_load_balancer")
            .then(|| server.boolean("behind_load_balancer", false, &mut problems));
        server.finish(&mut problems);
        let mut server = ServerConfig {
            threads,
            metrics_listen,
            autoscaler_listen,
            listen,
            drain_timeout,
            keepalive_timeout,
            header_timeout,
            body_timeout,
            max_header_bytes,
            max_uri_bytes,
            allowed_origins,
            behind_load_balancer: false,
        };

        let auth = read_auth(&mut root, &mut problems);
        server.behind_load_balancer = behind_load_balancer.unwrap_or(auth.mode == AuthMode::Iap);
        if auth.mode == AuthMode::Dev && !server.listen.ip().is_loopback() {
            problems.push(Problem::new(
                "server.listen",
                format!(
                    "{} is not a loopback address; auth.mode = \"dev\" trusts any name typed in and may only listen on 127.0.0.1 or [::1]",
                    server.listen
                ),
            ));
        }
        let session = read_session(&mut root, auth.mode, cookie_secret, &mut problems);
        let profiles = profile::read_profiles(&mut root, &session, &mut problems);
        let log = read_log(&mut root, &mut problems);
        let mut admin_section = root.section("admin", &mut problems);
        let admin = AdminConfig {
            emails: admin_section
                .strings("emails", &mut problems)
                .into_iter()
                .map(|e| e.trim().to_ascii_lowercase())
                .collect(),
        };
        admin_section.finish(&mut problems);
        let autoscaler = read_autoscaler(&mut root, autoscaler_listen_set, &mut problems);
        root.finish(&mut problems);

        if problems.is_empty() {
            let default = profiles.list.iter().find(|p| p.default).unwrap_or(&profiles.list[0]);
            Ok(Config {
                server,
                auth,
                session,
                backend: default.backend.clone(),
                profiles_listed: profiles.listed,
                profiles: profiles.list,
                log,
                admin,
                autoscaler,
            })
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// The effective configuration as TOML, for `check-config`: every key
    /// with the value in force, itself a valid config meaning the same. The
    /// cookie secret is not a key: a comment says where it came from.
    pub fn render(&self) -> String {
        let mut table = match toml::Value::try_from(self) {
            Ok(toml::Value::Table(table)) => table,
            Ok(other) => return format!("# cannot render: not a table but {}", other.type_str()),
            Err(e) => return format!("# cannot render: {e}"),
        };
        // Without its listener an [autoscaler] section is an error: the
        // webhook is off, and its settings are moot.
        if self.server.autoscaler_listen.is_none() {
            table.remove("autoscaler");
        }
        // The profiles as written: listed, or the one `[backend]` makes.
        table.remove(if self.profiles_listed { "backend" } else { "profiles" });
        let text = toml::to_string_pretty(&table).unwrap_or_else(|e| format!("# cannot render: {e}"));
        format!(
            "# session cookie secret: {}\n{text}",
            self.session.cookie_secret.origin()
        )
    }
}

/// A TOML syntax error, with the line and column it was found at (1-based,
/// the column counted in characters) so the operator can go there.
fn syntax_problem(text: &str, error: &toml::de::Error) -> Problem {
    let at = error.span().and_then(|span| text.get(..span.start)).map(|before| {
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        format!(" at line {line}, column {column}")
    });
    Problem::new(
        "(file)",
        format!(
            "not valid TOML{}: {}",
            at.unwrap_or_default(),
            error.message().trim_end()
        ),
    )
}

fn read_log(root: &mut Section<'_>, problems: &mut Vec<Problem>) -> LogConfig {
    let mut log = root.section("log", problems);
    let format_key = log.key("format");
    let format = match log.string("format", "json", problems).as_str() {
        "json" => LogFormat::Json,
        "text" => LogFormat::Text,
        other => {
            problems.push(Problem::new(
                &format_key,
                format!("{other:?} is not \"json\" or \"text\""),
            ));
            LogFormat::Json
        }
    };
    let level_key = log.key("level");
    let level = log.string("level", "info", problems);
    if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
        problems.push(Problem::new(
            &level_key,
            format!("{level:?} is not a log filter such as \"info\" or \"session_router=debug\""),
        ));
    }
    let include_email = log.boolean("include_email", false, problems);
    let project_id = log.string("project_id", "", problems);
    log.finish(problems);
    LogConfig {
        format,
        level,
        include_email,
        project_id: (!project_id.is_empty()).then_some(project_id),
    }
}

/// `server.autoscaler_listen`: an address:port of its own. Sharing the main
/// port would put the webhook behind the load balancer (and IAP would turn
/// Agones away); sharing the metrics port would make one of the two binds
/// fail at start.
fn read_autoscaler_listen(
    server: &mut Section<'_>,
    listen: SocketAddr,
    metrics_listen: Option<SocketAddr>,
    problems: &mut Vec<Problem>,
) -> Option<SocketAddr> {
    let key = server.key("autoscaler_listen");
    let text = server.string("autoscaler_listen", "", problems);
    if text.is_empty() {
        return None;
    }
    let Ok(addr) = text.parse::<SocketAddr>() else {
        problems.push(Problem::new(
            &key,
            format!("{text:?} is not an address:port such as \"0.0.0.0:9091\""),
        ));
        return None;
    };
    for (other, name) in [
        (Some(listen), "server.listen"),
        (metrics_listen, "server.metrics_listen"),
    ] {
        if other.is_some_and(|other| same_port(addr, other)) {
            problems.push(Problem::new(
                &key,
                format!("must differ from {name}: the webhook has a port of its own"),
            ));
            return None;
        }
    }
    Some(addr)
}

/// Would binding `a` and `b` collide? Port 0 (any free port) never does; an
/// unspecified address (`0.0.0.0`) takes the port on every interface.
fn same_port(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0 && a.port() == b.port() && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// `[autoscaler]`. A section without `server.autoscaler_listen` to use it
/// is reported: the operator meant the webhook to run.
fn read_autoscaler(root: &mut Section<'_>, listen_set: bool, problems: &mut Vec<Problem>) -> AutoscalerConfig {
    if root.is_present("autoscaler") && !listen_set {
        problems.push(Problem::new(
            "server.autoscaler_listen",
            "required with an [autoscaler] section: the address the FleetAutoscaler webhook listens on, e.g. \"0.0.0.0:9091\"".into(),
        ));
    }
    let mut section = root.section("autoscaler", problems);
    let count = |name: &'static str, default: u64, section: &mut Section<'_>, problems: &mut Vec<Problem>| {
        let value = section.integer(name, default, problems);
        if value > MAX_REPLICAS {
            problems.push(Problem::new(&section.key(name), format!("at most {MAX_REPLICAS}")));
            return default as u32;
        }
        value as u32
    };
    let buffer = count("buffer", 1, &mut section, problems);
    let min_replicas = count("min_replicas", 0, &mut section, problems);
    let max_replicas = count("max_replicas", 0, &mut section, problems);
    if max_replicas != 0 && max_replicas < min_replicas {
        problems.push(Problem::new(
            &section.key("max_replicas"),
            format!("{max_replicas} is less than autoscaler.min_replicas ({min_replicas}); 0 means no upper bound"),
        ));
    }
    section.finish(problems);
    AutoscalerConfig {
        buffer,
        min_replicas,
        max_replicas,
    }
}

fn read_origins(server: &mut Section<'_>, problems: &mut Vec<Problem>) -> Vec<String> {
    let key = server.key("allowed_origins");
    let origins = server.strings("allowed_origins", problems);
    for (i, origin) in origins.iter().enumerate() {
        let valid = origin.parse::<Uri>().ok().filter(|u| {
            u.scheme().is_some()
                && u.authority().is_some()
                && invalid_port(u).is_none()
                && u.path() == "/"
                && !origin.ends_with('/')
        });
        if valid.is_none() {
            problems.push(Problem::new(
                &format!("{key}[{i}]"),
                format!("{origin:?} is not an origin such as \"https://sd.example.com\""),
            ));
        }
    }
    origins.into_iter().map(|o| o.to_ascii_lowercase()).collect()
}

fn read_auth(root: &mut Section<'_>, problems: &mut Vec<Problem>) -> AuthConfig {
    let mut auth = root.section("auth", problems);
    let mode_key = auth.key("mode");
    let mode = match auth.string("mode", "iap", problems).as_str() {
        "iap" => AuthMode::Iap,
        "dev" => AuthMode::Dev,
        other => {
            problems.push(Problem::new(
                &mode_key,
                format!("{other:?} is not one of \"iap\", \"dev\""),
            ));
            AuthMode::Iap
        }
    };
    let audiences_key = auth.key("audiences");
    let audiences = auth.strings("audiences", problems);
    if mode == AuthMode::Iap && audiences.is_empty() {
        problems.push(Problem::new(
            &audiences_key,
            "required in iap mode: the backend service's audience, e.g. \"/projects/123/global/backendServices/456\""
                .into(),
        ));
    }
    for (i, aud) in audiences.iter().enumerate() {
        if !aud.starts_with("/projects/") {
            problems.push(Problem::new(
                &format!("{audiences_key}[{i}]"),
                format!("{aud:?} does not look like an IAP audience (\"/projects/NUMBER/global/backendServices/ID\" or \"/projects/NUMBER/apps/ID\")"),
            ));
        }
    }
    let jwks_key = auth.key("jwks_url");
    let jwks_url = auth.string(
        "jwks_url",
        "https://www.gstatic.com/iap/verify/public_key-jwk",
        problems,
    );
    if let Err(reason) = http_url(&jwks_url) {
        problems.push(Problem::new(&jwks_key, reason));
    }
    let leeway = auth.duration("leeway", Duration::from_secs(30), problems);
    let leeway_key = auth.key("leeway");
    if leeway > Duration::from_secs(300) {
        problems.push(Problem::new(
            &leeway_key,
            "more than 5m would accept long-expired tokens".into(),
        ));
    }
    let allowed_emails = auth
        .strings("allowed_emails", problems)
        .into_iter()
        .map(|e| e.trim().to_ascii_lowercase())
        .collect();
    let allowed_domains = auth
        .strings("allowed_domains", problems)
        .into_iter()
        .map(|d| d.trim().trim_start_matches('@').to_ascii_lowercase())
        .collect();
    let jwks_refetch_interval = auth.duration("jwks_refetch_interval", Duration::from_secs(30), problems);
    let cache_key = auth.key("token_cache_entries");
    let token_cache_entries = auth.integer("token_cache_entries", 10_000, problems) as usize;
    if token_cache_entries > 1_000_000 {
        problems.push(Problem::new(&cache_key, "at most 1000000".into()));
    }
    auth.finish(problems);
    AuthConfig {
        mode,
        audiences,
        jwks_url,
        leeway,
        allowed_emails,
        allowed_domains,
        jwks_refetch_interval,
        token_cache_entries,
    }
}

fn read_session(
    root: &mut Section<'_>,
    mode: AuthMode,
    cookie_secret: Option<Vec<u8>>,
    problems: &mut Vec<Problem>,
) -> SessionConfig {
    let mut session = root.section("session", problems);
    let cookie_key = session.key("cookie_name");
    let cookie_name = session.string("cookie_name", "session_router", problems);
    if cookie_name.is_empty()
        || !cookie_name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        problems.push(Problem::new(
            &cookie_key,
            format!("{cookie_name:?} must be non-empty and use only letters, digits, '_' and '-'"),
        ));
    }
    let idle_key = session.key("idle_timeout");
    let idle_timeout = session.duration("idle_timeout", Duration::from_secs(15 * 60), problems);
    if idle_timeout < Duration::from_secs(1) {
        problems.push(Problem::new(&idle_key, "must be at least 1s".into()));
    }
    let paths_key = session.key("activity_ignore_paths");
    // The WebUI's own liveness probe is never a person: ignored unless the
    // operator lists the paths themselves.
    let activity_ignore_paths = if session.is_present("activity_ignore_paths") {
        session.strings("activity_ignore_paths", problems)
    } else {
        vec!["/internal/ping".to_string()]
    };
    for (i, p) in activity_ignore_paths.iter().enumerate() {
        if !p.starts_with('/') {
            problems.push(Problem::new(
                &format!("{paths_key}[{i}]"),
                format!("{p:?} must start with '/'"),
            ));
        }
    }
    let max_lifetime = session.duration("max_lifetime", Duration::ZERO, problems);
    let cookie_ttl = session.duration("cookie_ttl", Duration::from_secs(12 * 3600), problems);
    let retry_after = session.duration("retry_after", Duration::from_secs(5), problems);
    // Waiting pages ask again every retry_after: three missed refreshes
    // (and never under 10 s) mean the tab is closed.
    let queue_key = session.key("queue_timeout");
    let queue_timeout = session.duration(
        "queue_timeout",
        retry_after.saturating_mul(3).max(Duration::from_secs(10)),
        problems,
    );
    if queue_timeout <= retry_after {
        problems.push(Problem::new(
            &queue_key,
            format!(
                "must be longer than session.retry_after ({}), or waiters who keep asking lose their place",
                humantime::format_duration(retry_after)
            ),
        ));
    }
    let probe_key = session.key("busy_probe");
    let probe = session.string("busy_probe", "", problems);
    let busy_probe = (!probe.is_empty()).then_some(probe);
    if let Some(path) = &busy_probe {
        if !path.starts_with('/') || path.parse::<http::uri::PathAndQuery>().is_err() {
            problems.push(Problem::new(
                &probe_key,
                format!("{path:?} must be a path on the backend starting with '/', e.g. \"/sdapi/v1/progress\""),
            ));
        }
    }
    session.finish(problems);

    let cookie_secret = match (cookie_secret, mode) {
        (Some(bytes), _) if bytes.len() >= MIN_SECRET_BYTES => Secret::new(bytes),
        (Some(bytes), _) => {
            problems.push(Problem::new(
                COOKIE_SECRET_ENV,
                format!("must be at least {MIN_SECRET_BYTES} bytes (got {})", bytes.len()),
            ));
            Secret::random()
        }
        (None, AuthMode::Dev) => Secret::random(),
        (None, AuthMode::Iap) => {
            problems.push(Problem::new(
                COOKIE_SECRET_ENV,
                format!("required in iap mode: set it to at least {MIN_SECRET_BYTES} random bytes (e.g. `openssl rand -base64 48`), the same on every replica"),
            ));
            Secret::random()
        }
    };
    SessionConfig {
        cookie_name,
        idle_timeout,
        activity_ignore_paths,
        max_lifetime,
        cookie_ttl,
        retry_after,
        queue_timeout,
        busy_probe,
        cookie_secret,
    }
}

fn optional_url(
    section: &mut Section<'_>,
    name: &'static str,
    key: &str,
    problems: &mut Vec<Problem>,
) -> Option<String> {
    let text = section.string(name, "", problems);
    if text.is_empty() {
        return None;
    }
    match http_url(&text) {
        Ok(_) => Some(text.trim_end_matches('/').to_string()),
        Err(reason) => {
            problems.push(Problem::new(key, reason));
            None
        }
    }
}

/// The port a URL names after its host, when it is not one a connection can
/// go to (`:99999`, `:0`, `:`): `Uri` accepts those, and connecting would
/// fail at run time, on every request.
fn invalid_port(uri: &Uri) -> Option<&str> {
    let authority = uri.authority()?.as_str();
    let host_port = authority.rsplit('@').next().unwrap_or(authority);
    // After an IPv6 literal's closing bracket, or after the host name.
    let after_host = host_port.rsplit_once(']').map_or(host_port, |(_, rest)| rest);
    let (_, port) = after_host.rsplit_once(':')?;
    match port.parse::<u16>() {
        Ok(p) if p != 0 => None,
        _ => Some(port),
    }
}

/// The reason a URL's port is not one (see [`invalid_port`]).
fn port_problem(text: &str, uri: &Uri) -> Option<String> {
    invalid_port(uri).map(|port| format!("{text:?}: {port:?} is not a port (1 to 65535)"))
}

/// An `http://` or `https://` URL with a host and, if it names one, a port.
fn http_url(text: &str) -> Result<Uri, String> {
    let not_url = || format!("{text:?} is not an http(s) URL");
    let uri: Uri = text.parse().map_err(|_| not_url())?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
        return Err(not_url());
    }
    match port_problem(text, &uri) {
        Some(reason) => Err(reason),
        None => Ok(uri),
    }
}

/// An upstream is `http://host:port` with nothing after the authority: the
/// router forwards each request's own path.
fn parse_upstream(text: &str) -> Result<Uri, String> {
    let uri: Uri = text
        .parse()
        .map_err(|_| format!("{text:?} is not a URL such as \"http://10.0.0.5:7860\""))?;
    if let Some(problem) = port_problem(text, &uri) {
        return Err(problem);
    }
    if uri.scheme_str() != Some("http") {
        return Err(format!("{text:?}: only http:// upstreams are supported"));
    }
    if uri.host().is_none() {
        return Err(format!("{text:?} has no host"));
    }
    if uri.path() != "/" || uri.query().is_some() {
        return Err(format!("{text:?} must not have a path or query"));
    }
    Ok(uri)
}

fn as_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

fn as_uris<S: serde::Serializer>(uris: &[Uri], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(uris.iter().map(|u| u.to_string().trim_end_matches('/').to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn problems(text: &str, secret: Option<&[u8]>) -> Vec<String> {
        match Config::from_toml(text, secret.map(<[u8]>::to_vec)) {
            Ok(_) => Vec::new(),
            Err(ConfigError::Invalid(p)) => p.into_iter().map(|p| format!("{}: {}", p.key, p.reason)).collect(),
            Err(e) => vec![e.to_string()],
        }
    }

    const MINIMAL_IAP: &str = r#"
        [auth]
        audiences = ["/projects/1/global/backendServices/2"]
        [backend.static]
        upstreams = ["http://127.0.0.1:7860"]
    "#;

    #[test]
    fn minimal_iap_config_gets_documented_defaults() {
        let c = Config::from_toml(MINIMAL_IAP, Some(SECRET.to_vec())).unwrap();
        assert_eq!(c.server.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(c.auth.mode, AuthMode::Iap);
        assert_eq!(c.auth.leeway, Duration::from_secs(30));
        assert_eq!(c.session.idle_timeout, Duration::from_secs(900));
        assert_eq!(c.session.cookie_name, "session_router");
        assert_eq!(c.session.activity_ignore_paths, vec!["/internal/ping".to_string()]);
        assert_eq!(c.backend.static_pool.upstreams.len(), 1);
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let text = r#"
            [server]
            listen = "nowhere"
            colour = "blue"
            [auth]
            mode = "trust-me"
            leeway = "soon"
            [session]
            idle_timeout = 15
            [backend.static]
            upstreams = ["https://a:1", "http://b:2/path"]
        "#;
        let found = problems(text, Some(SECRET));
        for key in [
            "server.listen: ",
            "server.colour: unknown key",
            "auth.mode: ",
            "auth.leeway: ",
            "session.idle_timeout: expected a duration",
            "backend.static.upstreams[0]: ",
            "backend.static.upstreams[1]: ",
        ] {
            assert!(
                found.iter().any(|p| p.starts_with(key)),
                "missing {key:?} in {found:#?}"
            );
        }
    }

    #[test]
    fn the_queue_timeout_follows_retry_after_and_must_outlast_it() {
        let c = Config::from_toml(MINIMAL_IAP, Some(SECRET.to_vec())).unwrap();
        assert_eq!(c.session.queue_timeout, Duration::from_secs(15), "3 × the 5s default");
        let with = |lines: &str| format!("[session]\n{lines}\n{MINIMAL_IAP}");
        let c = Config::from_toml(&with("retry_after = \"2s\""), Some(SECRET.to_vec())).unwrap();
        assert_eq!(c.session.queue_timeout, Duration::from_secs(10), "at least 10s");
        let huge = Config::from_toml(&with("retry_after = \"500000000000y\""), Some(SECRET.to_vec()));
        assert!(huge.is_ok(), "a huge retry_after saturates instead of overflowing");
        let found = problems(&with("retry_after = \"5s\"\nqueue_timeout = \"5s\""), Some(SECRET));
        assert!(
            found
                .iter()
                .any(|p| p.starts_with("session.queue_timeout: must be longer")),
            "{found:?}"
        );
    }

    #[test]
    fn the_busy_probe_is_off_by_default_and_must_be_a_path() {
        let c = Config::from_toml(MINIMAL_IAP, Some(SECRET.to_vec())).unwrap();
        assert_eq!(c.session.busy_probe, None);
        let with = |probe: &str| format!("[session]\nbusy_probe = {probe:?}\n{MINIMAL_IAP}");
        let c = Config::from_toml(&with("/sdapi/v1/progress"), Some(SECRET.to_vec())).unwrap();
        assert_eq!(c.session.busy_probe.as_deref(), Some("/sdapi/v1/progress"));
        for bad in ["sdapi/v1/progress", "/a b", "http://elsewhere/progress"] {
            let found = problems(&with(bad), Some(SECRET));
            assert!(
                found.iter().any(|p| p.starts_with("session.busy_probe: ")),
                "{bad}: {found:?}"
            );
        }
    }

    #[test]
    fn the_uri_limit_must_leave_room_in_the_head_limit() {
        let with = |limits: &str| format!("[server]\n{limits}\n{MINIMAL_IAP}");
        let found = problems(&with("max_header_bytes = 8192\nmax_uri_bytes = 8000"), Some(SECRET));
        assert!(
            found.iter().any(|p| p
                .starts_with("server.max_uri_bytes: must be at least 1024 less than server.max_header_bytes (8192)")),
            "{found:#?}"
        );
        assert!(problems(&with("max_header_bytes = 8192\nmax_uri_bytes = 7168"), Some(SECRET)).is_empty());
    }

    #[test]
    fn serving_threads_default_to_the_cpus_and_are_bounded() {
        let c = Config::from_toml(MINIMAL_IAP, Some(SECRET.to_vec())).unwrap();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(c.server.threads, cpus);
        let with = |threads: &str| format!("[server]\nthreads = {threads}\n{MINIMAL_IAP}");
        let c = Config::from_toml(&with("3"), Some(SECRET.to_vec())).unwrap();
        assert_eq!(c.server.threads, 3);
        for bad in ["0", "257", "\"two\""] {
            let found = problems(&with(bad), Some(SECRET));
            assert!(
                found.iter().any(|p| p.starts_with("server.threads: ")),
                "{bad}: {found:?}"
            );
        }
    }

    #[test]
    fn the_autoscaler_webhook_is_off_by_default_with_documented_defaults() {
        let c = Config::from_toml(MINIMAL_IAP, Some(SECRET.to_vec())).unwrap();
        assert_eq!(c.server.autoscaler_listen, None);
        assert_eq!(
            (
                c.autoscaler.buffer,
                c.autoscaler.min_replicas,
                c.autoscaler.max_replicas
            ),
            (1, 0, 0)
        );
        let on = format!("[server]\nautoscaler_listen = \"0.0.0.0:9091\"\n{MINIMAL_IAP}");
        let c = Config::from_toml(&on, Some(SECRET.to_vec())).unwrap();
        assert_eq!(c.server.autoscaler_listen, Some("0.0.0.0:9091".parse().unwrap()));
        let set = format!("{on}\n[autoscaler]\nbuffer = 0\nmin_replicas = 2\nmax_replicas = 2\n");
        let c = Config::from_toml(&set, Some(SECRET.to_vec())).unwrap();
        assert_eq!(
            (
                c.autoscaler.buffer,
                c.autoscaler.min_replicas,
                c.autoscaler.max_replicas
            ),
            (0, 2, 2)
        );
    }

    #[test]
    fn the_autoscaler_listener_must_be_an_address_of_its_own() {
        let with = |server: &str| format!("[server]\n{server}\n{MINIMAL_IAP}");
        for (server, reason) in [
            ("autoscaler_listen = \"9091\"", "is not an address:port"),
            ("autoscaler_listen = 9091", "expected a string"),
            (
                "listen = \"0.0.0.0:8080\"\nautoscaler_listen = \"127.0.0.1:8080\"",
                "must differ from server.listen",
            ),
            (
                "metrics_listen = \"0.0.0.0:9090\"\nautoscaler_listen = \"0.0.0.0:9090\"",
                "must differ from server.metrics_listen",
            ),
        ] {
            let found = problems(&with(server), Some(SECRET));
            assert!(
                found
                    .iter()
                    .any(|p| p.starts_with("server.autoscaler_listen: ") && p.contains(reason)),
                "{server}: {found:#?}"
            );
        }
        // Port 0 (tests) never collides; other ports on other addresses neither.
        let apart = "listen = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\nautoscaler_listen = \"127.0.0.1:0\"";
        assert_eq!(problems(&with(apart), Some(SECRET)), Vec::<String>::new());
    }

    #[test]
    fn autoscaler_bounds_are_validated_and_named_by_key() {
        let with = |section: &str| {
            format!("[server]\nautoscaler_listen = \"0.0.0.0:9091\"\n{MINIMAL_IAP}\n[autoscaler]\n{section}\n")
        };
        for (section, expected) in [
            ("buffer = -1", "autoscaler.buffer: must not be negative"),
            ("buffer = \"one\"", "autoscaler.buffer: expected an integer"),
            ("min_replicas = 100001", "autoscaler.min_replicas: at most 100000"),
            ("max_replicas = 1.5", "autoscaler.max_replicas: expected an integer"),
            (
                "min_replicas = 3\nmax_replicas = 2",
                "autoscaler.max_replicas: 2 is less than autoscaler.min_replicas (3)",
            ),
            ("bufer = 2", "autoscaler.bufer: unknown key"),
        ] {
            let found = problems(&with(section), Some(SECRET));
            assert!(
                found.iter().any(|p| p.starts_with(expected)),
                "{section}: missing {expected:?} in {found:#?}"
            );
        }
        // 0 is no upper bound, whatever the minimum.
        assert!(problems(&with("min_replicas = 3\nmax_replicas = 0"), Some(SECRET)).is_empty());
    }

    #[test]
    fn an_autoscaler_section_without_its_listener_is_reported() {
        let text = format!("{MINIMAL_IAP}\n[autoscaler]\nbuffer = 2\n");
        let found = problems(&text, Some(SECRET));
        assert!(
            found
                .iter()
                .any(|p| p.starts_with("server.autoscaler_listen: required with an [autoscaler] section")),
            "{found:#?}"
        );
        // A listener that is set but wrong is reported once, for what is wrong.
        let wrong = format!("[server]\nautoscaler_listen = \"nowhere\"\n{text}");
        let found = problems(&wrong, Some(SECRET));
        assert_eq!(found.len(), 1, "{found:#?}");
        assert!(found[0].contains("is not an address:port"), "{found:#?}");
    }

    #[test]
    fn iap_mode_refuses_to_start_without_a_long_enough_secret() {
        assert!(problems(MINIMAL_IAP, None)
            .iter()
            .any(|p| p.starts_with("SESSION_ROUTER_COOKIE_SECRET: required")));
        assert!(problems(MINIMAL_IAP, Some(b"short"))
            .iter()
            .any(|p| p.contains("at least 32 bytes")));
    }

    const AGONES_20S_IDLE: &str = r#"
        [auth]
        audiences = ["/projects/1/global/backendServices/2"]
        [session]
        idle_timeout = "20s"
        [backend]
        kind = "agones"
        [backend.agones]
        fleet = "webui"
    "#;

    #[test]
    fn an_unset_activity_sync_interval_follows_a_short_idle_timeout() {
        let c = Config::from_toml(AGONES_20S_IDLE, Some(SECRET.to_vec())).unwrap();
        assert_eq!(c.backend.agones.activity_sync_interval, Duration::from_millis(6666));
        let long = AGONES_20S_IDLE.replace("\"20s\"", "\"1h\"");
        let c = Config::from_toml(&long, Some(SECRET.to_vec())).unwrap();
        assert_eq!(c.backend.agones.activity_sync_interval, Duration::from_secs(30));
    }

    #[test]
    fn an_explicit_activity_sync_interval_must_be_shorter_than_the_idle_timeout() {
        let set = |value: &str| format!("{AGONES_20S_IDLE}\nactivity_sync_interval = \"{value}\"\n");
        let found = problems(&set("30s"), Some(SECRET));
        assert!(
            found.iter().any(|p| p.starts_with(
                "backend.agones.activity_sync_interval: 30s is not shorter than session.idle_timeout (20s)"
            )),
            "{found:#?}"
        );
        let c = Config::from_toml(&set("5s"), Some(SECRET.to_vec())).unwrap();
        assert_eq!(c.backend.agones.activity_sync_interval, Duration::from_secs(5));
    }

    #[test]
    fn legacy_adoption_is_on_by_default_and_can_be_turned_off() {
        let c = Config::from_toml(AGONES_20S_IDLE, Some(SECRET.to_vec())).unwrap();
        assert!(c.backend.agones.adopt_legacy);
        let off = format!("{AGONES_20S_IDLE}\nadopt_legacy = false\n");
        assert!(
            !Config::from_toml(&off, Some(SECRET.to_vec()))
                .unwrap()
                .backend
                .agones
                .adopt_legacy
        );
        let bad = format!("{AGONES_20S_IDLE}\nadopt_legacy = \"yes\"\n");
        assert!(problems(&bad, Some(SECRET))
            .iter()
            .any(|p| p.starts_with("backend.agones.adopt_legacy: ")));
    }

    #[test]
    fn agones_settings_are_validated() {
        let text = r#"
            [auth]
            audiences = ["/projects/1/global/backendServices/2"]
            [backend]
            kind = "agones"
            [backend.agones]
            user_label = "Bad Key/user"
            address_preference = ["PodIP", "Carrier pigeon"]
            scheduling = "Random"
        "#;
        let found = problems(text, Some(SECRET));
        for key in [
            "backend.agones.fleet: required",
            "backend.agones.user_label: invalid label key",
            "backend.agones.address_preference[1]: ",
            "backend.agones.scheduling: ",
        ] {
            assert!(
                found.iter().any(|p| p.starts_with(key)),
                "missing {key:?} in {found:#?}"
            );
        }
        assert!(
            !found.iter().any(|p| p.starts_with("backend.static")),
            "static pool not required: {found:#?}"
        );
        let allocator = text.replace("\"agones\"", "\"agones-allocator\"");
        assert!(problems(&allocator, Some(SECRET))
            .iter()
            .any(|p| p.starts_with("backend.agones.allocator_url: required")));
    }

    #[test]
    fn dev_mode_refuses_a_non_loopback_listener() {
        let text = r#"
            [server]
            listen = "0.0.0.0:8080"
            [auth]
            mode = "dev"
            [backend.static]
            upstreams = ["http://127.0.0.1:7860"]
        "#;
        assert!(problems(text, None)
            .iter()
            .any(|p| p.starts_with("server.listen: ") && p.contains("loopback")));
        let loopback = text.replace("0.0.0.0", "127.0.0.1");
        assert_eq!(problems(&loopback, None), Vec::<String>::new());
    }

    #[test]
    fn the_load_balancer_is_trusted_by_default_only_in_iap_mode() {
        let iap = Config::from_toml(MINIMAL_IAP, Some(SECRET.to_vec())).unwrap();
        assert!(iap.server.behind_load_balancer);
        let dev = "[auth]\nmode = \"dev\"\n[server]\nlisten = \"127.0.0.1:8080\"\n[backend.static]\nupstreams = [\"http://127.0.0.1:7860\"]\n";
        assert!(!Config::from_toml(dev, None).unwrap().server.behind_load_balancer);
        let off = format!("{MINIMAL_IAP}\n[server]\nbehind_load_balancer = false\n");
        assert!(
            !Config::from_toml(&off, Some(SECRET.to_vec()))
                .unwrap()
                .server
                .behind_load_balancer
        );
        assert_eq!(
            problems(
                &format!("{MINIMAL_IAP}\n[server]\nbehind_load_balancer = \"yes\"\n"),
                Some(SECRET)
            ),
            ["server.behind_load_balancer: expected true or false, found string"]
        );
    }

    #[test]
    fn static_upstreams_are_probed_every_ten_seconds_unless_set() {
        let c = Config::from_toml(MINIMAL_IAP, Some(SECRET.to_vec())).unwrap();
        assert_eq!(c.backend.static_pool.probe_interval, Duration::from_secs(10));
        let set = |value: &str| {
            problems(
                &MINIMAL_IAP.replace(
                    "upstreams =",
                    &format!("probe_interval = \"{value}\"\n        upstreams ="),
                ),
                Some(SECRET),
            )
        };
        assert!(set("500ms").is_empty());
        for bad in ["0s", "10ms", "2h"] {
            assert_eq!(
                set(bad),
                ["backend.static.probe_interval: must be between 100ms and 1h: a down upstream is used again only once a probe finds it up"]
            );
        }
    }

    #[test]
    fn urls_naming_an_impossible_port_are_refused_by_key() {
        let text = r#"
            [auth]
            audiences = ["/projects/1/global/backendServices/2"]
            jwks_url = "https://keys.example:70000/jwk"
            [server]
            allowed_origins = ["https://sd.example.com:0"]
            [backend.static]
            upstreams = ["http://10.0.0.5:99999", "http://10.0.0.6:", "http://[::1]:7860"]
            [backend.agones]
            kube_api_url = "http://127.0.0.1:65536"
        "#;
        let found = problems(text, Some(SECRET));
        for key in [
            "auth.jwks_url: \"https://keys.example:70000/jwk\": \"70000\" is not a port",
            "server.allowed_origins[0]: ",
            "backend.static.upstreams[0]: \"http://10.0.0.5:99999\": \"99999\" is not a port",
            "backend.static.upstreams[1]: ",
            "backend.agones.kube_api_url: \"http://127.0.0.1:65536\": \"65536\" is not a port",
        ] {
            assert!(found.iter().any(|p| p.starts_with(key)), "{key} not in {found:#?}");
        }
        assert_eq!(found.len(), 5, "{found:#?}");
    }

    const SHARED: &str = r#"
        [auth]
        audiences = ["/projects/1/global/backendServices/2"]
        [backend]
        kind = "shared"
        [backend.shared]
    "#;

    #[test]
    fn shared_backends_are_a_list_or_a_service_never_both_nor_neither() {
        let with = |lines: &str| problems(&format!("{SHARED}{lines}\n"), Some(SECRET));
        assert_eq!(
            with(""),
            ["backend.shared.service: required when backend.kind = \"shared\" (or backend.shared.upstreams): the Service whose ready endpoints are the backends"]
        );
        assert_eq!(
            with("upstreams = []"),
            ["backend.shared.upstreams: must list at least one upstream, or leave it out and set backend.shared.service"]
        );
        let both = with("upstreams = [\"http://10.0.0.5:7860\"]\nservice = \"sd15\"");
        assert_eq!(both.len(), 1, "{both:#?}");
        assert!(both[0].starts_with("backend.shared.service: set together with backend.shared.upstreams"));
        assert!(with("service = \"sd15\"").is_empty());
        assert!(with("upstreams = [\"http://10.0.0.5:7860\"]").is_empty());
        // Not in use: its rules are moot, its typos are not.
        let static_kind = MINIMAL_IAP.to_string() + "\n[backend.shared]\nmax_user = 3\n";
        assert_eq!(
            problems(&static_kind, Some(SECRET)),
            ["backend.shared.max_user: unknown key"]
        );
    }

    #[test]
    fn every_bad_shared_key_is_named_at_once() {
        let text = format!(
            "{SHARED}upstreams = [\"http://10.0.0.5:7860\", \"ftp://x\", \"http://10.0.0.5:7860\"]\nmax_users_per_backend = 0\nnamespace = \"Bad_NS\"\nprobe_interval = \"1ms\"\nkube_api_url = \"nope\"\n"
        );
        let found = problems(&text, Some(SECRET));
        for key in [
            "backend.shared.upstreams[1]: \"ftp://x\": only http:// upstreams",
            "backend.shared.upstreams[2]: \"http://10.0.0.5:7860\" is listed twice",
            "backend.shared.max_users_per_backend: must be between 1 and 1000",
            "backend.shared.namespace: \"Bad_NS\" is not a namespace name",
            "backend.shared.probe_interval: must be between 100ms and 1h",
            "backend.shared.kube_api_url: \"nope\" is not an http(s) URL",
        ] {
            assert!(found.iter().any(|p| p.starts_with(key)), "{key} not in {found:#?}");
        }
        assert_eq!(found.len(), 6, "{found:#?}");
        let service = problems(&format!("{SHARED}service = \"SD 1.5\"\n"), Some(SECRET));
        assert!(
            service[0].starts_with("backend.shared.service: \"SD 1.5\" is not a Service name"),
            "{service:#?}"
        );
    }

    #[test]
    fn shared_defaults_are_four_users_a_backend_and_the_routers_namespace() {
        let c = Config::from_toml(&format!("{SHARED}service = \"sd15\"\n"), Some(SECRET.to_vec())).unwrap();
        let shared = &c.backend.shared;
        assert_eq!(shared.max_users_per_backend, 4);
        assert_eq!((shared.namespace.as_deref(), shared.port_name.as_deref()), (None, None));
        assert!(
            problems(&format!("{SHARED}service = \"sd15\"\n"), Some(SECRET))
                .iter()
                .all(|p| !p.starts_with("backend.agones")),
            "no fleet is required"
        );
    }

    #[test]
    fn a_rendered_shared_config_reads_back_the_same() {
        for lines in [
            "service = \"sd15\"\nnamespace = \"models\"\nport_name = \"http\"\nmax_users_per_backend = 2",
            "upstreams = [\"http://10.0.0.5:7860\", \"http://10.0.0.6:7860\"]",
        ] {
            let c = Config::from_toml(&format!("{SHARED}{lines}\n"), Some(SECRET.to_vec())).unwrap();
            let text = c.render();
            let again = Config::from_toml(&text, Some(SECRET.to_vec())).unwrap_or_else(|e| panic!("{e}\n{text}"));
            assert_eq!(again.render(), text);
            assert_eq!(again.backend.kind, BackendKind::Shared);
        }
    }

    #[test]
    fn a_toml_syntax_error_keeps_its_line_and_column() {
        assert_eq!(
            problems("[server]\n  listen = \"x\n", None),
            ["(file): not valid TOML at line 2, column 14: invalid basic string"]
        );
    }

    const DEV: &str = "[auth]\nmode = \"dev\"\n[server]\nlisten = \"127.0.0.1:0\"\n";

    #[test]
    fn a_config_without_profiles_has_one_made_of_its_backend() {
        let c = Config::from_toml(
            &format!("{DEV}[backend.static]\nupstreams = [\"http://127.0.0.1:7860\"]\n"),
            None,
        )
        .unwrap();
        assert_eq!(c.profiles.len(), 1);
        let only = &c.profiles[0];
        assert_eq!((only.name.as_str(), only.default), (IMPLICIT_PROFILE, true));
        assert_eq!(only.idle_timeout, c.session.idle_timeout);
        assert_eq!(only.backend.static_pool.upstreams, c.backend.static_pool.upstreams);
        let rendered = c.render();
        assert!(
            !rendered.contains("[[profiles]]") && rendered.contains("[backend.static]"),
            "{rendered}"
        );
    }

    #[test]
    fn every_bad_profile_key_is_named_with_its_profile() {
        let text = format!(
            r#"{DEV}
[[profiles]]
name = "sdxl"
default = true
idle_timeout = "soon"
[profiles.backend]
kind = "agones"
[profiles.backend.agones]
fleets = ["l4", "L4!"]
multi_cluster = true
colour = "blue"

[[profiles]]
name = "Bad Name"
[profiles.backend.static]
upstreams = ["http://127.0.0.1:1"]

[[profiles]]
name = "sd15"
default = true
[profiles.backend]
kind = "agones"
[profiles.backend.agones]
fleet = "l4"

[[profiles]]
name = "sd15"
"#
        );
        let found = problems(&text, None);
        for expected in [
            "profiles.sdxl.idle_timeout: \"soon\" is not a duration",
            "profiles.sdxl.backend.agones.fleets[1]: \"L4!\" is not a Fleet name",
            "profiles.sdxl.backend.agones.multi_cluster: only for backend.kind = \"agones-allocator\"",
            "profiles.sdxl.backend.agones.colour: unknown key",
            "profiles[1].name: \"Bad Name\" is not a slug",
            "profiles.sd15.backend.agones.fleets: \"l4\" is already profile \"sdxl\"'s",
            "profiles[3].name: \"sd15\" names two profiles",
            "profiles[3].backend: required",
            "profiles: sdxl, sd15 are all default = true",
        ] {
            assert!(
                found.iter().any(|p| p.starts_with(expected)),
                "{expected} in {found:#?}"
            );
        }
    }

    #[test]
    fn a_backend_fleet_or_service_belongs_to_one_profile() {
        let text = format!(
            r#"{DEV}
[[profiles]]
name = "a"
[profiles.backend.static]
upstreams = ["http://10.0.0.5:7860"]
[[profiles]]
name = "b"
[profiles.backend]
kind = "shared"
[profiles.backend.shared]
upstreams = ["http://10.0.0.5:7860/"]
[[profiles]]
name = "c"
[profiles.backend]
kind = "shared"
[profiles.backend.shared]
service = "sd15"
namespace = "models"
[[profiles]]
name = "d"
[profiles.backend]
kind = "shared"
[profiles.backend.shared]
service = "sd15"
namespace = "models"
[[profiles]]
name = "e"
[profiles.backend]
kind = "agones"
[profiles.backend.agones]
fleet = "webui"
[[profiles]]
name = "f"
[profiles.backend]
kind = "agones"
[profiles.backend.agones]
fleet = "webui"
kube_api_url = "https://other-cluster:443"
"#
        );
        let found = problems(&text, None);
        assert_eq!(
            found,
            [
                "profiles.b.backend.shared.upstreams: \"http://10.0.0.5:7860\" is already profile \"a\"'s: a backend serves one profile",
                "profiles.d.backend.shared.service: \"sd15\" is already profile \"c\"'s: a Service's WebUIs serve one profile",
            ],
            "the same Fleet name in another cluster is another Fleet"
        );
    }

    #[test]
    fn profiles_and_a_backend_section_do_not_go_together() {
        let text = format!(
            "{DEV}[backend.static]\nupstreams = [\"http://127.0.0.1:1\"]\n[[profiles]]\nname = \"a\"\n[profiles.backend.static]\nupstreams = [\"http://127.0.0.1:2\"]\n"
        );
        let found = problems(&text, None);
        assert!(
            found
                .iter()
                .any(|p| p.starts_with("backend: not allowed beside [[profiles]]")),
            "{found:#?}"
        );
        assert_eq!(found.len(), 1, "{found:#?}");
    }

    #[test]
    fn profiles_inherit_the_session_limits_and_the_first_is_the_default_unless_one_says_so() {
        let text = format!(
            r#"{DEV}
[session]
idle_timeout = "20m"
max_lifetime = "8h"
[[profiles]]
name = "a"
[profiles.backend.static]
upstreams = ["http://127.0.0.1:1"]
[[profiles]]
name = "b"
idle_timeout = "5m"
allowed_emails = [" Ann@Example.com "]
allowed_domains = ["@Corp.Example"]
[profiles.backend]
kind = "agones-allocator"
[profiles.backend.agones]
fleets = ["l4", "t4"]
allocator_url = "https://allocator:443"
multi_cluster = true
"#
        );
        let c = Config::from_toml(&text, None).unwrap();
        let (a, b) = (&c.profiles[0], &c.profiles[1]);
        assert!(a.default && !b.default);
        assert_eq!(
            (a.idle_timeout, a.max_lifetime),
            (Duration::from_secs(1200), Duration::from_secs(8 * 3600))
        );
        assert_eq!(b.idle_timeout, Duration::from_secs(300));
        assert_eq!(b.allowed_emails, ["ann@example.com"]);
        assert_eq!(b.allowed_domains, ["corp.example"]);
        assert_eq!(b.backend.agones.fleets, ["l4", "t4"]);
        assert!(b.backend.agones.multi_cluster);
        assert_eq!(
            c.backend.kind,
            BackendKind::Static,
            "config.backend is the default profile's"
        );
        let again = Config::from_toml(&c.render(), None).unwrap();
        assert_eq!(again.render(), c.render(), "the rendered profiles read back the same");
        assert_eq!(again.profiles.len(), 2);
    }

    #[test]
    fn rendered_config_never_contains_the_secret() {
        let c = Config::from_toml(MINIMAL_IAP, Some(b"super-secret-value-that-is-long-enough".to_vec())).unwrap();
        let text = c.render();
        assert!(!text.contains("super-secret"), "{text}");
        assert!(text.contains("redacted"));
        assert!(text.contains("idle_timeout = \"15m\""), "{text}");
        assert!(!format!("{c:?}").contains("super-secret"));
    }
}
