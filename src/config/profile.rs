//! `[[profiles]]`: the GPU pools a user may choose from, each with its own
//! backend section. A config without any is one implicit profile built
//! from `[backend]`, so every config written before profiles keeps its
//! meaning.

use std::collections::HashSet;
use std::time::Duration;

use serde::Serialize;

use super::backend::{is_dns_label, read_backend, BackendConfig, BackendKind};
use super::reader::Section;
use super::{as_duration, Problem, SessionConfig};

/// The name of the profile a config without `[[profiles]]` has.
pub const IMPLICIT_PROFILE: &str = "default";
/// Profiles beyond this are a typo, not a choice a person makes on a page
/// (and each adds a label value to the metrics).
const MAX_PROFILES: usize = 32;
/// A profile's name is a label value and part of Kubernetes object names.
const MAX_NAME_BYTES: usize = 40;

/// One `[[profiles]]` entry, its session limits resolved against
/// `[session]`.
#[derive(Debug, Clone, Serialize)]
pub struct ProfileConfig {
    /// A slug: lower-case letters, digits and '-'. Chosen by it
    /// (`/?profile=`, `X-Session-Router-Profile`), recorded by it (cookie,
    /// GameServer label), counted by it (metrics).
    pub name: String,
    pub title: String,
    pub description: String,
    /// Given to API clients that name no profile. Exactly one profile is.
    pub default: bool,
    /// Lower-cased addresses allowed on top of `auth.allowed_*`; both
    /// empty = everyone `auth` lets in.
    pub allowed_emails: Vec<String>,
    pub allowed_domains: Vec<String>,
    #[serde(serialize_with = "as_duration")]
    pub idle_timeout: Duration,
    #[serde(serialize_with = "as_duration")]
    pub max_lifetime: Duration,
    pub backend: BackendConfig,
}

/// The profiles of a config: `[[profiles]]`, or the implicit one made of
/// `[backend]` (`listed` false). Never empty.
pub(super) struct Profiles {
    pub list: Vec<ProfileConfig>,
    pub listed: bool,
}

pub(super) fn read_profiles(root: &mut Section<'_>, session: &SessionConfig, problems: &mut Vec<Problem>) -> Profiles {
    let listed = root.is_present("profiles");
    if !listed {
        let backend = read_backend(root.section("backend", problems), session.idle_timeout, problems);
        let implicit = ProfileConfig {
            name: IMPLICIT_PROFILE.into(),
            title: "Stable Diffusion WebUI".into(),
            description: String::new(),
            default: true,
            allowed_emails: Vec::new(),
            allowed_domains: Vec::new(),
            idle_timeout: session.idle_timeout,
            max_lifetime: session.max_lifetime,
            backend,
        };
        return Profiles {
            list: vec![implicit],
            listed,
        };
    }
    if root.is_present("backend") {
        let _ = root.section("backend", problems);
        problems.push(Problem::new(
            "backend",
            "not allowed beside [[profiles]]: each profile has its own [profiles.backend]".into(),
        ));
    }
    let sections = root.tables("profiles", problems);
    if sections.is_empty() && !problems.iter().any(|p| p.key.starts_with("profiles")) {
        problems.push(Problem::new(
            "profiles",
            "must list at least one profile (or leave [[profiles]] out and use [backend])".into(),
        ));
    }
    if sections.len() > MAX_PROFILES {
        problems.push(Problem::new("profiles", format!("at most {MAX_PROFILES} profiles")));
    }
    let mut names = HashSet::new();
    let mut list: Vec<ProfileConfig> = sections
        .into_iter()
        .map(|section| read_profile(section, session, &mut names, problems))
        .collect();
    let defaults: Vec<&str> = list.iter().filter(|p| p.default).map(|p| p.name.as_str()).collect();
    if defaults.len() > 1 {
        problems.push(Problem::new(
            "profiles",
            format!(
                "{} are all default = true: at most one profile is the default",
                defaults.join(", ")
            ),
        ));
    }
    if defaults.is_empty() {
        if let Some(first) = list.first_mut() {
            first.default = true;
        }
    }
    check_fleets_apart(&list, problems);
    check_backends_apart(&list, problems);
    Profiles { list, listed }
}

fn read_profile(
    section: Section<'_>,
    session: &SessionConfig,
    names: &mut HashSet<String>,
    problems: &mut Vec<Problem>,
) -> ProfileConfig {
    let mut section = section;
    let name_key = section.key("name");
    let name = section.string("name", "", problems);
    if let Err(reason) = check_name(&name) {
        problems.push(Problem::new(&name_key, reason));
    } else if !names.insert(name.clone()) {
        problems.push(Problem::new(&name_key, format!("{name:?} names two profiles")));
    } else {
        section = section.renamed(format!("profiles.{name}"));
    }
    let title = section.string("title", &name, problems);
    let description = section.string("description", "", problems);
    let default = section.boolean("default", false, problems);
    let allowed_emails = section
        .strings("allowed_emails", problems)
        .into_iter()
        .map(|e| e.trim().to_ascii_lowercase())
        .collect();
    let allowed_domains = section
        .strings("allowed_domains", problems)
        .into_iter()
        .map(|d| d.trim().trim_start_matches('@').to_ascii_lowercase())
        .collect();
    let idle_key = section.key("idle_timeout");
    let idle_timeout = section.duration("idle_timeout", session.idle_timeout, problems);
    if idle_timeout < Duration::from_secs(1) {
        problems.push(Problem::new(&idle_key, "must be at least 1s".into()));
    }
    let max_lifetime = section.duration("max_lifetime", session.max_lifetime, problems);
    let backend_key = section.key("backend");
    let present = section.is_present("backend");
    let backend = read_backend(section.section("backend", problems), idle_timeout, problems);
    if !present {
        problems.push(Problem::new(
            &backend_key,
            "required: the profile's own backend section (the same keys as [backend])".into(),
        ));
    }
    section.finish(problems);
    ProfileConfig {
        name,
        title,
        description,
        default,
        allowed_emails,
        allowed_domains,
        idle_timeout,
        max_lifetime,
        backend,
    }
}

fn check_name(name: &str) -> Result<(), String> {
    if name.len() <= MAX_NAME_BYTES && is_dns_label(name) {
        Ok(())
    } else if name.is_empty() {
        Err("required: the profile's slug, e.g. \"sdxl-l4\"".into())
    } else {
        Err(format!(
            "{name:?} is not a slug: 1 to {MAX_NAME_BYTES} lower-case letters, digits and '-', not starting or ending with '-'"
        ))
    }
}

/// What a profile claims as its own: `id` names it across profiles,
/// `shown` is how a problem names it, `key` where the profile sets it.
struct Claimed<'a> {
    id: (String, String, String),
    shown: String,
    profile: &'a ProfileConfig,
    key: &'static str,
}

/// A Fleet is one profile's: its servers, line and autoscaling answer
/// belong to the profile that allocates from it. (The same name in another
/// cluster, another `kube_api_url`, is another Fleet.)
fn check_fleets_apart(list: &[ProfileConfig], problems: &mut Vec<Problem>) {
    let fleets = list.iter().filter(|p| p.backend.kind.is_agones()).flat_map(|profile| {
        let agones = &profile.backend.agones;
        let cluster = agones.kube_api_url.clone().unwrap_or_default();
        agones.fleets.iter().map(move |fleet| Claimed {
            id: (cluster.clone(), agones.namespace.clone(), fleet.clone()),
            shown: fleet.clone(),
            profile,
            key: "backend.agones.fleets",
        })
    });
    report_twice_claimed(fleets, "a Fleet serves one profile", problems);
}

/// A fixed backend, or a Service, is one profile's: in two, one WebUI
/// would be counted twice (a "dedicated" box handed to two users at once,
/// a shared one given twice its users).
fn check_backends_apart(list: &[ProfileConfig], problems: &mut Vec<Problem>) {
    let listed = list.iter().flat_map(|profile| {
        let backend = &profile.backend;
        let (key, upstreams) = match backend.kind {
            BackendKind::Static => ("backend.static.upstreams", &backend.static_pool.upstreams[..]),
            BackendKind::Shared => ("backend.shared.upstreams", &backend.shared.upstreams[..]),
            _ => ("", &[][..]),
        };
        upstreams.iter().map(move |uri| Claimed {
            id: (
                uri.authority()
                    .map_or_else(String::new, |a| a.as_str().to_ascii_lowercase()),
                String::new(),
                String::new(),
            ),
            shown: uri.to_string().trim_end_matches('/').to_string(),
            profile,
            key,
        })
    });
    report_twice_claimed(listed, "a backend serves one profile", problems);
    let services = list
        .iter()
        .filter(|p| p.backend.kind == BackendKind::Shared)
        .filter_map(|profile| {
            let shared = &profile.backend.shared;
            let service = shared.service.clone()?;
            Some(Claimed {
                id: (
                    shared.kube_api_url.clone().unwrap_or_default(),
                    shared.namespace.clone().unwrap_or_default(),
                    service.clone(),
                ),
                shown: service,
                profile,
                key: "backend.shared.service",
            })
        });
    report_twice_claimed(services, "a Service's WebUIs serve one profile", problems);
}

/// A problem for each thing a second profile claims.
fn report_twice_claimed<'a>(claimed: impl Iterator<Item = Claimed<'a>>, rule: &str, problems: &mut Vec<Problem>) {
    let mut owners: Vec<((String, String, String), &str)> = Vec::new();
    for item in claimed {
        match owners.iter().find(|(id, _)| *id == item.id) {
            Some((_, owner)) => problems.push(Problem::new(
                &format!("profiles.{}.{}", item.profile.name, item.key),
                format!("{:?} is already profile {owner:?}'s: {rule}", item.shown),
            )),
            None => owners.push((item.id, &item.profile.name)),
        }
    }
}
