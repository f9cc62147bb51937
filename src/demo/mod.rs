//! `session-router demo`: the router in `dev` mode in front of a few
//! stand-in WebUI pods, all on loopback, started with one command.
//!
//! With `--profiles` it shows the chooser: two profiles, "dedicated" (the
//! pods, one user each, as without the flag) and "shared" (one more pod
//! serving several users at once, the `shared` kind).

pub mod pod;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::app::serve;
use crate::config::{Config, ConfigError};
pub use pod::DemoPod;

/// The profile of the `--pods` pods, one user each: the default.
pub const DEDICATED_PROFILE: &str = "dedicated";
/// The profile of the shared pods (`--profiles` only).
pub const SHARED_PROFILE: &str = "shared";
/// Pods of the shared profile.
pub const SHARED_PODS: usize = 1;
/// Users one shared pod serves at once: a fourth waits in line.
pub const SHARED_USERS_PER_POD: usize = 3;

/// Knobs of the demo, all with defaults from the command line.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub listen: SocketAddr,
    /// Pods of one user each.
    pub pods: usize,
    pub idle_timeout: Duration,
    /// Two profiles to choose from: the pods ("dedicated") and
    /// [`SHARED_PODS`] pod(s) shared by [`SHARED_USERS_PER_POD`] users
    /// ("shared"). Off, one static pool and no chooser.
    pub profiles: bool,
}

/// The stand-in pods the demo routes to.
pub struct DemoPods {
    /// One user each: the static pool (the "dedicated" profile).
    pub dedicated: Vec<DemoPod>,
    /// Several users each (the "shared" profile); empty without profiles.
    pub shared: Vec<DemoPod>,
}

impl DemoPods {
    /// Starts the pods `options` asks for: `demo-pod-1` … and, with
    /// profiles, `demo-shared-1` ….
    pub async fn start(options: &DemoOptions) -> std::io::Result<DemoPods> {
        let mut dedicated = Vec::with_capacity(options.pods);
        for i in 0..options.pods {
            dedicated.push(DemoPod::start(&format!("demo-pod-{}", i + 1)).await?);
        }
        let mut shared = Vec::new();
        if options.profiles {
            for i in 0..SHARED_PODS {
                shared.push(DemoPod::start(&format!("demo-shared-{}", i + 1)).await?);
            }
        }
        Ok(DemoPods { dedicated, shared })
    }
}

/// Why the demo could not run; the cause is the `source()` (see
/// [`crate::RunError`]).
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot start")]
    Io(#[from] std::io::Error),
    #[error("invalid demo settings")]
    Config(#[from] ConfigError),
}

/// The demo's configuration: dev sign-in, the dedicated pods as a static
/// pool; with `options.profiles`, that pool and the shared pods as two
/// `[[profiles]]`.
pub fn config(options: &DemoOptions, pods: &DemoPods) -> Result<Config, ConfigError> {
    let dedicated = upstream_list(&pods.dedicated);
    let backends = if options.profiles {
        format!(
            r#"
[[profiles]]
name = "{DEDICATED_PROFILE}"
title = "Dedicated GPU"
description = "A stand-in pod of your own: nobody else's work shares it."
default = true
[profiles.backend]
kind = "static"
[profiles.backend.static]
upstreams = [{dedicated}]

[[profiles]]
name = "{SHARED_PROFILE}"
title = "Shared SD 1.5"
description = "One stand-in pod serving up to {SHARED_USERS_PER_POD} people at once."
[profiles.backend]
kind = "shared"
[profiles.backend.shared]
upstreams = [{shared}]
max_users_per_backend = {SHARED_USERS_PER_POD}
"#,
            shared = upstream_list(&pods.shared),
        )
    } else {
        format!(
            r#"
[backend]
kind = "static"
[backend.static]
upstreams = [{dedicated}]
"#
        )
    };
    let text = format!(
        r#"
[server]
listen = "{listen}"
drain_timeout = "2s"
[auth]
mode = "dev"
[log]
format = "text"
[session]
idle_timeout = "{idle}"
activity_ignore_paths = ["/internal/ping"]
retry_after = "3s"
{backends}"#,
        listen = options.listen,
        idle = humantime::format_duration(options.idle_timeout),
    );
    Config::from_toml(&text, None)
}

fn upstream_list(pods: &[DemoPod]) -> String {
    pods.iter()
        .map(|p| format!("{:?}", p.url()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Starts the pods and the router, prints where to go, and runs until
/// `shutdown` resolves.
pub async fn run(options: DemoOptions, shutdown: impl std::future::Future<Output = ()>) -> Result<(), DemoError> {
    let pods = DemoPods::start(&options).await?;
    let config = config(&options, &pods)?;
    let listener = TcpListener::bind(config.server.listen).await?;
    let addr = listener.local_addr()?;
    let state = Arc::new(
        crate::build(config)
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?,
    );
    let idle = humantime::format_duration(options.idle_timeout);
    if options.profiles {
        println!("session-router demo: two profiles, idle timeout {idle}");
        println!(
            "  {DEDICATED_PROFILE} (\"Dedicated GPU\", the default): {}, one user each",
            count_pods(pods.dedicated.len())
        );
        print_pods("    ", &pods.dedicated);
        println!(
            "  {SHARED_PROFILE} (\"Shared SD 1.5\"): {}, up to {SHARED_USERS_PER_POD} users each at once",
            count_pods(pods.shared.len())
        );
        print_pods("    ", &pods.shared);
    } else {
        println!(
            "session-router demo: {} stand-in WebUI pods, idle timeout {idle}",
            pods.dedicated.len()
        );
        print_pods("  ", &pods.dedicated);
    }
    println!();
    println!("Open http://{addr}/ in a browser and sign in with any name.");
    if options.profiles {
        println!(
            "You choose a profile on the chooser page, or open http://{addr}/?profile={SHARED_PROFILE} to skip it."
        );
        println!(
            "Each name holds one pod at a time; \"Switch\" on /_router/status gives it back and shows the chooser again."
        );
        println!("When a profile's pods are all taken you see its waiting page.");
    } else {
        println!("Each name gets its own pod; when all are taken you see the waiting page.");
    }
    println!("Press Ctrl-C to stop.");
    serve(listener, state, shutdown).await?;
    Ok(())
}

fn print_pods(indent: &str, pods: &[DemoPod]) {
    for pod in pods {
        println!("{indent}{} at {}", pod.name, pod.url());
    }
}

fn count_pods(n: usize) -> String {
    match n {
        1 => "1 stand-in WebUI pod".to_string(),
        n => format!("{n} stand-in WebUI pods"),
    }
}
