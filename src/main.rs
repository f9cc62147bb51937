//! The `session-router` binary: command line, logging, signals. Everything
//! else is in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use session_router::config::{Config, ConfigError, LogConfig, LogFormat};
use session_router::demo::{self, DemoOptions};
use session_router::telemetry;

#[derive(Parser)]
#[command(version, about = "One dedicated GPU backend per signed-in user, behind Cloud IAP.")]
struct Cli {
    /// Overrides `[log] format`: `json` (Cloud Logging) or `text`.
    #[arg(long, global = true, value_parser = ["json", "text"])]
    log_format: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the router (production).
    Serve {
        /// The TOML config file (keys: README, "Configuration"); the cookie
        /// secret comes from SESSION_ROUTER_COOKIE_SECRET.
        #[arg(long, default_value = "/etc/session-router/config.toml")]
        config: PathBuf,
    },
    /// Validate a config file and print the effective configuration.
    CheckConfig {
        /// The TOML config file to check, with SESSION_ROUTER_COOKIE_SECRET
        /// from the environment as `serve` would read it.
        #[arg(long)]
        config: PathBuf,
    },
    /// Run a local demo: dev sign-in and stand-in WebUI pods on loopback.
    Demo {
        /// Address:port the demo router listens on; loopback only (its
        /// sign-in page trusts any name).
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Number of stand-in pods.
        #[arg(long, default_value_t = 2)]
        pods: usize,
        /// Idle time after which a pod is given back, e.g. "60s".
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        idle_timeout: Duration,
        /// Two profiles to choose from: "dedicated" (the --pods pods, one
        /// user each, the default) and "shared" (one more pod serving up
        /// to 3 users at once).
        #[arg(long)]
        profiles: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let format_override = cli
        .log_format
        .as_deref()
        .map(|f| if f == "json" { LogFormat::Json } else { LogFormat::Text });
    match cli.command {
        Command::CheckConfig { config } => check_config(&config),
        Command::Serve { config } => exit(serve(&config, format_override)),
        Command::Demo {
            listen,
            pods,
            idle_timeout,
            profiles,
        } => {
            // A demo runs for the person at the terminal: readable text,
            // and the names they typed in.
            telemetry::init(&LogConfig {
                format: format_override.unwrap_or(LogFormat::Text),
                level: "info".into(),
                include_email: true,
                project_id: None,
            });
            exit(run_demo(DemoOptions {
                listen,
                pods: pods.max(1),
                idle_timeout,
                profiles,
            }))
        }
    }
}

fn check_config(path: &std::path::Path) -> ExitCode {
    match Config::load(path) {
        Ok(config) => {
            println!("# {}: valid\n{}", path.display(), config.render());
            ExitCode::SUCCESS
        }
        Err(e @ ConfigError::Read { .. }) | Err(e @ ConfigError::Invalid(_)) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(path: &std::path::Path, format_override: Option<LogFormat>) -> anyhow::Result<()> {
    let mut config =
        Config::load(path).map_err(|e| anyhow::anyhow!("invalid configuration {}:\n{e}", path.display()))?;
    if let Some(format) = format_override {
        config.log.format = format;
    }
    telemetry::init(&config.log);
    runtime()?.block_on(async {
        let listener = tokio::net::TcpListener::bind(config.server.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.server.listen))?;
        let bound = listener.local_addr().context("cannot read the bound address")?;
        let profiles: Vec<String> = config
            .profiles
            .iter()
            .map(|p| format!("{}={}", p.name, p.backend.kind.label()))
            .collect();
        tracing::info!(listen = %bound, auth = ?config.auth.mode, backend = ?config.backend.kind, profiles = %profiles.join(" "), "session-router listening");
        session_router::run(listener, config, shutdown_signal()).await?;
        Ok(())
    })
}

fn run_demo(options: DemoOptions) -> anyhow::Result<()> {
    runtime()?.block_on(demo::run(options, shutdown_signal()))?;
    Ok(())
}

/// Single-threaded: the server starts one runtime per `server.threads`, and
/// this one is the first (see `app::serve`).
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn exit(result: anyhow::Result<()>) -> ExitCode {
    // Log lines wait briefly in buffers (telemetry::stderr); none is lost,
    // and they come before the final error.
    telemetry::flush();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("session-router: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM (Kubernetes) or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
    tracing::info!("shutdown requested");
}
