//! `session-router demo`: the router in `dev` mode in front of a few
//! stand-in WebUI pods, all on loopback, started with one command.

pub mod pod;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::app::serve;
use crate::config::{Config, ConfigError};
pub use pod::DemoPod;

/// Knobs of the demo, all with defaults from the command line.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub listen: SocketAddr,
    pub pods: usize,
    pub idle_timeout: Duration,
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

/// The demo's configuration: dev sign-in, the given pods as a static pool.
pub fn config(options: &DemoOptions, pods: &[DemoPod]) -> Result<Config, ConfigError> {
    let upstreams: Vec<String> = pods.iter().map(|p| format!("{:?}", p.url())).collect();
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
[backend]
kind = "static"
[backend.static]
upstreams = [{upstreams}]
"#,
        listen = options.listen,
        idle = humantime::format_duration(options.idle_timeout),
        upstreams = upstreams.join(", "),
    );
    Config::from_toml(&text, None)
}

/// Starts the pods and the router, prints where to go, and runs until
/// `shutdown` resolves.
pub async fn run(options: DemoOptions, shutdown: impl std::future::Future<Output = ()>) -> Result<(), DemoError> {
    let mut pods = Vec::with_capacity(options.pods);
    for i in 0..options.pods {
        pods.push(DemoPod::start(&format!("demo-pod-{}", i + 1)).await?);
    }
    let config = config(&options, &pods)?;
    let listener = TcpListener::bind(config.server.listen).await?;
    let addr = listener.local_addr()?;
    let state = Arc::new(
        crate::build(config)
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?,
    );
    println!(
        "session-router demo: {} stand-in WebUI pods, idle timeout {}",
        pods.len(),
        humantime::format_duration(options.idle_timeout)
    );
    for pod in &pods {
        println!("  {} at {}", pod.name, pod.url());
    }
    println!();
    println!("Open http://{addr}/ in a browser and sign in with any name.");
    println!("Each name gets its own pod; when all are taken you see the waiting page.");
    println!("Press Ctrl-C to stop.");
    serve(listener, state, shutdown).await?;
    Ok(())
}
