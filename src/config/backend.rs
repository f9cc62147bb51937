//! `[backend]` and its `[backend.static]`, `[backend.agones]` and
//! `[backend.shared]` sections: the largest part of the configuration, read
//! here on its own; problems are named by key like everywhere else.

use std::time::Duration;

use http::Uri;
use serde::Serialize;

use super::reader::Section;
use super::{as_duration, as_uris, optional_url, parse_upstream, Problem};

/// Static upstream probes: more often than this is load, rarer leaves a
/// recovered box unused too long.
const MIN_PROBE_INTERVAL: Duration = Duration::from_millis(100);
const MAX_PROBE_INTERVAL: Duration = Duration::from_secs(3600);
/// Users of one shared WebUI beyond this is a typo: its one GPU would give
/// each a sliver.
const MAX_USERS_PER_BACKEND: u64 = 1000;

#[derive(Debug, Clone, Serialize)]
pub struct BackendConfig {
    pub kind: BackendKind,
    #[serde(serialize_with = "as_duration")]
    pub connect_timeout: Duration,
    #[serde(rename = "static")]
    pub static_pool: StaticConfig,
    pub agones: AgonesConfig,
    pub shared: SharedConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    /// A fixed list of upstreams.
    Static,
    /// GameServerAllocation through the Kubernetes API.
    Agones,
    /// The agones-allocator service's REST API (release still via Kubernetes).
    AgonesAllocator,
    /// Backends shared by several users each (one Deployment per model).
    Shared,
}

impl BackendKind {
    /// The config spelling, also the metrics label.
    pub fn label(self) -> &'static str {
        match self {
            BackendKind::Static => "static",
            BackendKind::Agones => "agones",
            BackendKind::AgonesAllocator => "agones-allocator",
            BackendKind::Shared => "shared",
        }
    }

    /// Whether this kind allocates Agones GameServers (and so reads
    /// `[backend.agones]`).
    pub fn is_agones(self) -> bool {
        matches!(self, BackendKind::Agones | BackendKind::AgonesAllocator)
    }
}

/// The pseudo-type naming `status.address`.
pub const PRIMARY_ADDRESS: &str = "address";
/// Address types Agones reports, plus [`PRIMARY_ADDRESS`]: what
/// `address_preference` may list. Declared with the setting it checks, so
/// validating needs nothing of the Agones backend.
pub const KNOWN_KINDS: [&str; 7] = [
    "PodIP",
    "InternalIP",
    "ExternalIP",
    "Hostname",
    "InternalDNS",
    "ExternalDNS",
    PRIMARY_ADDRESS,
];

/// `[backend.agones]`: used by both Agones backends.
#[derive(Debug, Clone, Serialize)]
pub struct AgonesConfig {
    pub namespace: String,
    /// The Fleets a user's server comes from, in order of preference: the
    /// first with a Ready server gives it (one allocation with ordered
    /// selectors). Written `fleet = "x"` or `fleets = ["x", "y"]`.
    pub fleets: Vec<String>,
    /// The GameServer port (by name) the WebUI listens on.
    pub port_name: String,
    /// Label key carrying the user on an allocated GameServer.
    pub user_label: String,
    /// Address types to try, in order; `address` = `status.address`.
    pub address_preference: Vec<String>,
    /// `Packed` or `Distributed`.
    pub scheduling: String,
    /// Timeout of one Kubernetes or allocator-service call.
    #[serde(serialize_with = "as_duration")]
    pub api_timeout: Duration,
    /// How long `Contention`/`UnAllocated` answers are retried (jittered
    /// backoff) before the user sees the waiting page.
    #[serde(serialize_with = "as_duration")]
    pub allocation_retry_window: Duration,
    /// How often, at most, a replica writes a user's last activity onto
    /// their GameServer for the other replicas' reapers.
    #[serde(serialize_with = "as_duration")]
    pub activity_sync_interval: Duration,
    /// Whether a user adopts a GameServer the original front end allocated
    /// to their label (no hash label yet); off, such servers are only swept.
    pub adopt_legacy: bool,
    /// Kubernetes API base URL; unset = in-cluster service account, else
    /// `KUBECONFIG` / `~/.kube/config`. E.g. `http://127.0.0.1:8001` for
    /// `kubectl proxy`.
    pub kube_api_url: Option<String>,
    /// agones-allocator base URL (`agones-allocator` backend only).
    pub allocator_url: Option<String>,
    /// PEM CA bundle that signed the allocator's server certificate.
    pub allocator_ca_file: Option<String>,
    /// PEM client certificate and key for mutual TLS.
    pub allocator_client_cert_file: Option<String>,
    pub allocator_client_key_file: Option<String>,
    /// `agones-allocator` only: let Agones' allocator place the user in
    /// another cluster, as its GameServerAllocationPolicy says
    /// (`multiClusterSetting.enabled`).
    pub multi_cluster: bool,
}

impl AgonesConfig {
    /// The first-choice Fleet: the one a single-Fleet profile names.
    pub fn fleet(&self) -> &str {
        self.fleets.first().map_or("", String::as_str)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct StaticConfig {
    #[serde(serialize_with = "as_uris")]
    pub upstreams: Vec<Uri>,
    /// Every upstream gets a TCP connect this often; a down one that
    /// accepts is used again.
    #[serde(serialize_with = "as_duration")]
    pub probe_interval: Duration,
}

/// `[backend.shared]`: WebUI processes each serving several users at once,
/// listed here or found as the ready endpoints of a Kubernetes Service.
#[derive(Debug, Clone, Serialize)]
pub struct SharedConfig {
    /// A fixed list of backends; exactly one of this and `service`.
    #[serde(serialize_with = "as_uris")]
    pub upstreams: Vec<Uri>,
    /// The Service whose ready endpoints (EndpointSlices) are the backends.
    pub service: Option<String>,
    /// The Service's namespace; unset = the router's own (in a cluster),
    /// else the kubeconfig's.
    pub namespace: Option<String>,
    /// The EndpointSlice port (by name) the WebUI listens on; unset = the
    /// slice's first port (a Service with one port).
    pub port_name: Option<String>,
    /// How many users one backend serves at once, counted per replica.
    pub max_users_per_backend: usize,
    /// Every backend gets a TCP connect this often; one that refused a
    /// connection is used again once it accepts.
    #[serde(serialize_with = "as_duration")]
    pub probe_interval: Duration,
    /// Kubernetes API base URL; unset = in-cluster service account, else
    /// `KUBECONFIG` / `~/.kube/config`.
    pub kube_api_url: Option<String>,
}

/// One backend section: `[backend]`, or a profile's `[profiles.backend]`.
pub(super) fn read_backend(
    mut backend: Section<'_>,
    idle_timeout: Duration,
    problems: &mut Vec<Problem>,
) -> BackendConfig {
    let kind_key = backend.key("kind");
    let kind = match backend.string("kind", "static", problems).as_str() {
        "static" => BackendKind::Static,
        "agones" => BackendKind::Agones,
        "agones-allocator" => BackendKind::AgonesAllocator,
        "shared" => BackendKind::Shared,
        other => {
            problems.push(Problem::new(
                &kind_key,
                format!("{other:?} is not one of \"static\", \"agones\", \"agones-allocator\", \"shared\""),
            ));
            BackendKind::Static
        }
    };
    let connect_timeout = backend.duration("connect_timeout", Duration::from_secs(5), problems);
    let mut pool = backend.section("static", problems);
    let upstreams_key = pool.key("upstreams");
    let pool_present = pool.is_present("upstreams");
    let upstreams = read_upstreams(&mut pool, problems);
    if kind == BackendKind::Static
        && upstreams.is_empty()
        && !problems.iter().any(|p| p.key.starts_with(&upstreams_key))
    {
        let reason = if pool_present {
            "must list at least one upstream"
        } else {
            "required when backend.kind = \"static\""
        };
        problems.push(Problem::new(&upstreams_key, reason.into()));
    }
    let probe_interval = read_probe_interval(&mut pool, problems);
    pool.finish(problems);
    let agones = read_agones(&mut backend, kind, idle_timeout, problems);
    let shared = read_shared(&mut backend, kind, problems);
    backend.finish(problems);
    BackendConfig {
        kind,
        connect_timeout,
        static_pool: StaticConfig {
            upstreams,
            probe_interval,
        },
        agones,
        shared,
    }
}

/// `upstreams`: http:// URLs of backends, each listed once (a second entry
/// would count one box twice).
fn read_upstreams(section: &mut Section<'_>, problems: &mut Vec<Problem>) -> Vec<Uri> {
    let key = section.key("upstreams");
    let mut upstreams = Vec::new();
    for (i, text) in section.strings("upstreams", problems).into_iter().enumerate() {
        match parse_upstream(&text) {
            Ok(uri) if upstreams.contains(&uri) => problems.push(Problem::new(
                &format!("{key}[{i}]"),
                format!("{text:?} is listed twice; each upstream is one backend"),
            )),
            Ok(uri) => upstreams.push(uri),
            Err(reason) => problems.push(Problem::new(&format!("{key}[{i}]"), reason)),
        }
    }
    upstreams
}

/// `probe_interval` of a pool whose backends are probed with a TCP connect.
fn read_probe_interval(section: &mut Section<'_>, problems: &mut Vec<Problem>) -> Duration {
    let probe_interval = section.duration("probe_interval", Duration::from_secs(10), problems);
    if !(MIN_PROBE_INTERVAL..=MAX_PROBE_INTERVAL).contains(&probe_interval) {
        problems.push(Problem::new(
            &section.key("probe_interval"),
            "must be between 100ms and 1h: a down upstream is used again only once a probe finds it up".into(),
        ));
    }
    probe_interval
}

/// `[backend.shared]`. Its rules apply only when `backend.kind = "shared"`;
/// otherwise its keys are still read (a typo is still reported).
fn read_shared(backend: &mut Section<'_>, kind: BackendKind, problems: &mut Vec<Problem>) -> SharedConfig {
    let in_use = kind == BackendKind::Shared;
    let mut shared = backend.section("shared", problems);
    let upstreams_key = shared.key("upstreams");
    let service_key = shared.key("service");
    let listed = shared.is_present("upstreams");
    let upstreams = read_upstreams(&mut shared, problems);
    let service = Some(shared.string("service", "", problems)).filter(|s| !s.is_empty());
    if let Some(name) = &service {
        if !is_dns_label(name) {
            problems.push(Problem::new(
                &service_key,
                format!("{name:?} is not a Service name (lower-case letters, digits and '-', at most 63)"),
            ));
        }
    }
    let upstream_problem = problems.iter().any(|p| p.key.starts_with(&upstreams_key));
    if in_use && !upstream_problem {
        match (upstreams.is_empty(), &service) {
            (false, Some(_)) => problems.push(Problem::new(
                &service_key,
                format!("set together with {upstreams_key}: give the backends either as a list or as a Service, not both"),
            )),
            (true, None) if listed => problems.push(Problem::new(
                &upstreams_key,
                format!("must list at least one upstream, or leave it out and set {service_key}"),
            )),
            (true, None) => problems.push(Problem::new(
                &service_key,
                format!("required when backend.kind = \"shared\" (or {upstreams_key}): the Service whose ready endpoints are the backends"),
            )),
            _ => {}
        }
    }
    let namespace = Some(shared.string("namespace", "", problems)).filter(|s| !s.is_empty());
    if let Some(name) = namespace.as_ref().filter(|n| !is_dns_label(n)) {
        problems.push(Problem::new(
            &shared.key("namespace"),
            format!("{name:?} is not a namespace name (lower-case letters, digits and '-', at most 63)"),
        ));
    }
    let port_name = Some(shared.string("port_name", "", problems)).filter(|s| !s.is_empty());
    let max_key = shared.key("max_users_per_backend");
    let max_users = shared.integer("max_users_per_backend", 4, problems);
    if !(1..=MAX_USERS_PER_BACKEND).contains(&max_users) {
        problems.push(Problem::new(
            &max_key,
            format!("must be between 1 and {MAX_USERS_PER_BACKEND}: how many users one WebUI serves at once"),
        ));
    }
    let probe_interval = read_probe_interval(&mut shared, problems);
    let url_key = shared.key("kube_api_url");
    let kube_api_url = optional_url(&mut shared, "kube_api_url", &url_key, problems);
    shared.finish(problems);
    SharedConfig {
        upstreams,
        service,
        namespace,
        port_name,
        max_users_per_backend: max_users.clamp(1, MAX_USERS_PER_BACKEND) as usize,
        probe_interval,
        kube_api_url,
    }
}

/// An RFC 1123 label as Kubernetes names Services and namespaces: at most
/// 63 lower-case letters, digits and '-', neither first nor last a '-'.
pub(super) fn is_dns_label(name: &str) -> bool {
    name.len() <= 63
        && !name.starts_with('-')
        && !name.ends_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.is_empty()
}

fn read_agones(
    backend: &mut Section<'_>,
    kind: BackendKind,
    idle_timeout: Duration,
    problems: &mut Vec<Problem>,
) -> AgonesConfig {
    let in_use = kind.is_agones();
    let mut agones = backend.section("agones", problems);
    let namespace = agones.string("namespace", "default", problems);
    let fleets = read_fleets(&mut agones, in_use, problems);
    let port_name = agones.string("port_name", "sd", problems);
    let label_key = agones.key("user_label");
    let user_label = agones.string("user_label", "user", problems);
    if let Err(reason) = crate::util::label::check_key(&user_label) {
        problems.push(Problem::new(&label_key, format!("invalid label key {reason}")));
    }
    let preference_key = agones.key("address_preference");
    let address_preference = if agones.is_present("address_preference") {
        agones.strings("address_preference", problems)
    } else {
        vec!["PodIP".into(), "InternalIP".into(), "address".into()]
    };
    for (i, kind) in address_preference.iter().enumerate() {
        if !KNOWN_KINDS.contains(&kind.as_str()) {
            problems.push(Problem::new(
                &format!("{preference_key}[{i}]"),
                format!("{kind:?} is not one of {:?}", KNOWN_KINDS),
            ));
        }
    }
    if in_use && address_preference.is_empty() {
        problems.push(Problem::new(
            &preference_key,
            "must list at least one address type".into(),
        ));
    }
    let scheduling_key = agones.key("scheduling");
    let scheduling = agones.string("scheduling", "Packed", problems);
    if !matches!(scheduling.as_str(), "Packed" | "Distributed") {
        problems.push(Problem::new(
            &scheduling_key,
            format!("{scheduling:?} is not \"Packed\" or \"Distributed\""),
        ));
    }
    let api_timeout = agones.duration("api_timeout", Duration::from_secs(10), problems);
    let allocation_retry_window = agones.duration("allocation_retry_window", Duration::from_secs(3), problems);
    // Unset, it follows the idle timeout, so no default ever conflicts with
    // what the user chose; set, it must leave the other replicas' reapers
    // time to see the activity.
    let activity_sync_interval = if agones.is_present("activity_sync_interval") {
        let set = agones.duration("activity_sync_interval", Duration::from_secs(30), problems);
        if in_use && set >= idle_timeout {
            problems.push(Problem::new(
                &agones.key("activity_sync_interval"),
                format!(
                    "{} is not shorter than session.idle_timeout ({}), so other replicas would release pods that are in use; make it shorter, or leave it unset to use the smaller of 30s and a third of idle_timeout",
                    humantime::format_duration(set),
                    humantime::format_duration(idle_timeout)
                ),
            ));
        }
        set
    } else {
        default_activity_sync_interval(idle_timeout)
    };
    let adopt_legacy = agones.boolean("adopt_legacy", true, problems);
    let url_key = agones.key("kube_api_url");
    let kube_api_url = optional_url(&mut agones, "kube_api_url", &url_key, problems);
    let allocator_key = agones.key("allocator_url");
    let allocator_url = optional_url(&mut agones, "allocator_url", &allocator_key, problems);
    if kind == BackendKind::AgonesAllocator && allocator_url.is_none() {
        problems.push(Problem::new(
            &allocator_key,
            "required when backend.kind = \"agones-allocator\", e.g. \"https://agones-allocator.agones-system.svc:443\"".into(),
        ));
    }
    let file = |name: &'static str, agones: &mut Section<'_>, problems: &mut Vec<Problem>| {
        let key = agones.key(name);
        let path = agones.string(name, "", problems);
        if path.is_empty() {
            return None;
        }
        if kind == BackendKind::AgonesAllocator {
            if let Err(e) = std::fs::metadata(&path) {
                problems.push(Problem::new(&key, format!("cannot read {path:?}: {e}")));
            }
        }
        Some(path)
    };
    let allocator_ca_file = file("allocator_ca_file", &mut agones, problems);
    let allocator_client_cert_file = file("allocator_client_cert_file", &mut agones, problems);
    let allocator_client_key_file = file("allocator_client_key_file", &mut agones, problems);
    if allocator_client_cert_file.is_some() != allocator_client_key_file.is_some() {
        problems.push(Problem::new(
            &agones.key("allocator_client_key_file"),
            "allocator_client_cert_file and allocator_client_key_file go together (mutual TLS)".into(),
        ));
    }
    let multi_cluster = agones.boolean("multi_cluster", false, problems);
    if multi_cluster && kind != BackendKind::AgonesAllocator {
        problems.push(Problem::new(
            &agones.key("multi_cluster"),
            "only for backend.kind = \"agones-allocator\": the Kubernetes API allocates in its own cluster".into(),
        ));
    }
    agones.finish(problems);
    AgonesConfig {
        namespace,
        fleets,
        multi_cluster,
        port_name,
        user_label,
        address_preference,
        scheduling,
        api_timeout,
        allocation_retry_window,
        activity_sync_interval,
        adopt_legacy,
        kube_api_url,
        allocator_url,
        allocator_ca_file,
        allocator_client_cert_file,
        allocator_client_key_file,
    }
}

/// `fleet = "x"` or `fleets = ["x", "y"]` (in order of preference), never
/// both; each a Fleet name, none twice.
fn read_fleets(agones: &mut Section<'_>, in_use: bool, problems: &mut Vec<Problem>) -> Vec<String> {
    let fleet_key = agones.key("fleet");
    let fleets_key = agones.key("fleets");
    let one = agones.is_present("fleet").then(|| agones.string("fleet", "", problems));
    let several = agones.is_present("fleets").then(|| agones.strings("fleets", problems));
    let (fleets, key) = match (one, several) {
        (Some(_), Some(_)) => {
            problems.push(Problem::new(
                &fleets_key,
                format!("set together with {fleet_key}: name one Fleet with fleet, or several in order with fleets"),
            ));
            return Vec::new();
        }
        (_, Some(several)) => (several, fleets_key),
        (one, None) => (one.filter(|f| !f.is_empty()).into_iter().collect(), fleet_key),
    };
    if in_use && fleets.is_empty() && !problems.iter().any(|p| p.key.starts_with(&key)) {
        problems.push(Problem::new(
            &key,
            "required for the Agones backends: the Fleet's name (or fleets = [...], in order of preference)".into(),
        ));
    }
    for (i, name) in fleets.iter().enumerate() {
        let at = if key.ends_with("fleets") {
            format!("{key}[{i}]")
        } else {
            key.clone()
        };
        if !is_dns_label(name) {
            problems.push(Problem::new(
                &at,
                format!("{name:?} is not a Fleet name (lower-case letters, digits and '-', at most 63)"),
            ));
        } else if fleets[..i].contains(name) {
            problems.push(Problem::new(&at, format!("{name:?} is listed twice")));
        }
    }
    fleets
}

/// The smaller of 30 s and a third of the idle timeout (whole milliseconds,
/// so `dump-config` shows a readable value).
fn default_activity_sync_interval(idle_timeout: Duration) -> Duration {
    let third = Duration::from_millis((idle_timeout / 3).as_millis() as u64);
    Duration::from_secs(30).min(third)
}
