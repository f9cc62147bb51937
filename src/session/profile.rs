//! Profiles: the GPU pools a user chooses from (`[[profiles]]`), each with
//! its backend, waiting line and session limits. A config without
//! profiles has one, and nothing asks the user to choose.
//!
//! A user holds at most one backend across all profiles: the session
//! table is keyed by user, and a session remembers its profile.

use std::sync::Arc;
use std::time::Duration;

use prometheus::{IntCounter, IntGauge};

use super::line::Line;
use crate::allocator::Allocator;
use crate::auth::{Allowlist, Identity};
use crate::config::ProfileConfig;
use crate::metrics::Metrics;

/// One pool users may choose.
pub struct Profile {
    pub config: ProfileConfig,
    /// Who may use it, on top of `auth`'s allowlist.
    access: Allowlist,
    pub allocator: Arc<dyn Allocator>,
    /// Users waiting for one of this profile's backends.
    pub line: Line,
    /// This profile's series of the per-profile metrics.
    sessions: IntGauge,
    allocated: IntCounter,
    unallocated: IntCounter,
    failed: IntCounter,
}

/// What an allocation came to, for the per-profile counter.
#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    Allocated,
    Unallocated,
    Error,
}

impl std::fmt::Debug for Profile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Profile").field(&self.config.name).finish()
    }
}

impl Profile {
    pub fn new(
        config: ProfileConfig,
        allocator: Arc<dyn Allocator>,
        metrics: &Arc<Metrics>,
        queue_timeout: Duration,
    ) -> Self {
        let name = config.name.as_str();
        let waiting = metrics.profile_users_waiting.with_label_values(&[name]);
        let allocations = |outcome| metrics.profile_allocations.with_label_values(&[name, outcome]);
        Profile {
            access: Allowlist::new(&config.allowed_emails, &config.allowed_domains),
            line: Line::new(queue_timeout, metrics.clone(), allocator.shared_line(), waiting),
            sessions: metrics.profile_sessions.with_label_values(&[name]),
            allocated: allocations("allocated"),
            unallocated: allocations("unallocated"),
            failed: allocations("error"),
            allocator,
            config,
        }
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Whether `user` may use this profile (`auth` let them in already).
    pub fn permits(&self, user: &Identity) -> bool {
        self.access.permits(user)
    }

    pub fn idle_timeout(&self) -> Duration {
        self.config.idle_timeout
    }

    pub fn max_lifetime(&self) -> Duration {
        self.config.max_lifetime
    }

    pub(super) fn count_allocation(&self, outcome: Outcome) {
        match outcome {
            Outcome::Allocated => &self.allocated,
            Outcome::Unallocated => &self.unallocated,
            Outcome::Error => &self.failed,
        }
        .inc();
    }

    pub(super) fn count_sessions(&self, sessions: usize) {
        self.sessions.set(sessions as i64);
    }
}

/// Every profile of the config, in its order. Never empty.
pub struct Profiles {
    list: Vec<Arc<Profile>>,
}

impl Profiles {
    /// `list` in config order; the config made sure it is not empty and
    /// one is the default.
    pub fn new(list: Vec<Profile>) -> Self {
        assert!(!list.is_empty(), "a config has at least one profile");
        Profiles {
            list: list.into_iter().map(Arc::new).collect(),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Profile>> {
        self.list.iter()
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The profile called `name`.
    pub fn named(&self, name: &str) -> Option<&Arc<Profile>> {
        self.list.iter().find(|p| p.name() == name)
    }

    /// `name`, if `user` may use it: an unknown profile and a forbidden
    /// one look the same to them.
    pub fn usable(&self, name: &str, user: &Identity) -> Option<&Arc<Profile>> {
        self.named(name).filter(|p| p.permits(user))
    }

    /// The profiles `user` may use, in config order.
    pub fn for_user<'a>(&'a self, user: &'a Identity) -> impl Iterator<Item = &'a Arc<Profile>> + 'a {
        self.list.iter().filter(|p| p.permits(user))
    }

    /// What a user who names no profile gets: the default if they may use
    /// it, else the first they may.
    pub fn default_for(&self, user: &Identity) -> Option<&Arc<Profile>> {
        let default = self.list.iter().find(|p| p.config.default).filter(|p| p.permits(user));
        default.or_else(|| self.list.iter().find(|p| p.permits(user)))
    }

    /// The default profile (the one a profile-less config has).
    pub fn default_profile(&self) -> &Arc<Profile> {
        self.list.iter().find(|p| p.config.default).unwrap_or(&self.list[0])
    }
}

/// Profiles for unit tests: the implicit one of a one-box static config.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Arc;
    use std::time::Duration;

    use super::Profile;
    use crate::allocator::{Allocator, StaticPool};
    use crate::config::Config;
    use crate::metrics::Metrics;

    /// The implicit profile of a one-box static config, on `allocator`.
    pub fn with(allocator: Arc<dyn Allocator>) -> Profile {
        let text = "[auth]\nmode = \"dev\"\n[server]\nlisten = \"127.0.0.1:0\"\n[backend.static]\nupstreams = [\"http://127.0.0.1:1\"]\n";
        let config = Config::from_toml(text, None).expect("a valid config");
        let profile = config.profiles.into_iter().next().expect("one profile");
        Profile::new(profile, allocator, &Metrics::new(), Duration::from_secs(10))
    }

    pub fn profile() -> Arc<Profile> {
        let uri: http::Uri = "http://127.0.0.1:1".parse().expect("a URI");
        Arc::new(with(Arc::new(StaticPool::new(&[uri]))))
    }
}
