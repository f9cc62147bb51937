//! What is measured: the upstream (in this process), the router (the real
//! release binary, a separate process) and nginx (a separate process), plus
//! the IAP stand-in that signs the token and serves the JWKS.

use std::fs;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use axum::body::Body;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::Router;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use futures_util::StreamExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use p256::pkcs8::EncodePrivateKey;
use serde_json::json;
use tokio::net::TcpListener;

use crate::client::{self, Endpoint};
use crate::sys;

pub const AUDIENCE: &str = "/projects/123/global/backendServices/456";
pub const ISSUER: &str = "https://cloud.google.com/iap";
/// The small static response: about the size of a small JSON API answer.
pub const SMALL_BODY: &str = concat!(
    r#"{"status":"ok","queue":{"pending":0,"running":1},"progress":0.42,"#,
    r#""eta_seconds":12.5,"job":"txt2img","id":"task(abcdefghijklmnop)","#,
    r#""textinfo":null,"live_preview":null,"active":true,"queued":false,"#,
    r#""completed":false,"id_live_preview":-1}"#
);

/// Reads the body and answers its size, keeping nothing: a sink that is
/// never the bottleneck, so an upload measures the path to it.
async fn sink(body: Body) -> axum::response::Response {
    let mut bytes = 0u64;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(chunk) => bytes += chunk.len() as u64,
            Err(e) => {
                return (http::StatusCode::BAD_REQUEST, e.to_string()).into_response();
            }
        }
    }
    axum::Json(json!({ "bytes": bytes })).into_response()
}

async fn bind(app: Router) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(addr)
}

/// The upstream every contender forwards to: the library's stand-in WebUI
/// pod (`/ws` echo, `/events` SSE, `/upload` hashing sink, …) plus `/small`
/// (a fixed small response) and `/sink` (a byte-counting upload sink).
fn upstream_app() -> Router {
    session_router::demo::pod::app("bench-pod")
        .route("/small", get(|| async { SMALL_BODY }))
        .route("/sink", post(sink))
}

/// The argument that makes the benchmark binary serve the upstream instead.
pub const UPSTREAM_CHILD: &str = "--upstream-child";

/// Body of the upstream process (`proxy --upstream-child ADDR`): serves
/// until killed. A process of its own, so its sockets and CPU are not the
/// load generator's (each idle WebSocket is a descriptor on both sides).
pub fn upstream_child(addr: &str) -> anyhow::Result<()> {
    let addr: SocketAddr = addr.parse()?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let listener = TcpListener::bind(addr).await?.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            axum::serve(listener, upstream_app()).await?;
            Ok(())
        })
}

/// Starts the upstream process on a free loopback port.
pub async fn start_upstream(dir: &Path) -> anyhow::Result<(Process, SocketAddr)> {
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let mut command = Command::new(std::env::current_exe()?);
    command.arg(UPSTREAM_CHILD).arg(addr.to_string());
    let process = Process::spawn("upstream", command, &dir.join("upstream.log"))?;
    let probe = Endpoint {
        addr,
        headers: String::new(),
    };
    wait_until_answers(&probe, "/small", "the upstream").await?;
    Ok((process, addr))
}

/// Cloud IAP's signing side: one P-256 key, its JWKS endpoint, and tokens.
pub struct Issuer {
    kid: String,
    secret: p256::SecretKey,
    pub jwks_url: String,
}

impl Issuer {
    pub async fn start() -> anyhow::Result<Issuer> {
        let kid = "bench-key-1".to_string();
        let secret = p256::SecretKey::random(&mut rand::rngs::OsRng);
        let point = secret.public_key().to_encoded_point(false);
        let jwks = json!({ "keys": [{
            "alg": "ES256", "crv": "P-256", "kid": kid, "kty": "EC", "use": "sig",
            "x": B64.encode(point.x().context("no x")?),
            "y": B64.encode(point.y().context("no y")?),
        }]});
        let body = Arc::new(jwks.to_string());
        let app = Router::new().route(
            "/jwk",
            get(move || {
                let body = body.clone();
                async move {
                    (
                        [
                            ("content-type", "application/json"),
                            ("cache-control", "public, max-age=3600"),
                        ],
                        (*body).clone(),
                    )
                }
            }),
        );
        let addr = bind(app).await?;
        Ok(Issuer {
            kid,
            secret,
            jwks_url: format!("http://{addr}/jwk"),
        })
    }

    /// A real IAP-shaped ES256 token for `name`, valid for an hour.
    pub fn token(&self, name: &str) -> anyhow::Result<String> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let claims = json!({
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": format!("accounts.google.com:{name}"),
            "email": format!("{name}@example.com"),
            "iat": now,
            "exp": now + 3600,
        });
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        let key = EncodingKey::from_ec_der(self.secret.to_pkcs8_der()?.as_bytes());
        Ok(jsonwebtoken::encode(&header, &claims, &key)?)
    }
}

/// A loopback port nobody listens on right now.
fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    Ok(listener.local_addr()?.port())
}

async fn wait_until_answers(endpoint: &Endpoint, path: &str, what: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        match client::get(endpoint, path).await {
            Ok((head, _)) if head.status == 200 => return Ok(()),
            _ if started.elapsed() > Duration::from_secs(20) => {
                bail!("{what} did not answer 200 on {path} within 20 s")
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// A child process that is stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Process {
    pub name: &'static str,
    child: Child,
}

impl Process {
    fn spawn(name: &'static str, mut command: Command, log: &Path) -> anyhow::Result<Process> {
        let out = fs::File::create(log)?;
        let err = out.try_clone()?;
        // SAFETY: die_with_parent only calls prctl, which is async-signal-safe.
        unsafe {
            command.pre_exec(sys::die_with_parent);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        Ok(Process { name, child })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited unexpectedly: {status}", self.name);
        }
        Ok(())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        sys::signal(self.child.id(), sys::SIGTERM);
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        sys::signal(self.child.id(), sys::SIGKILL);
        let _ = self.child.wait();
    }
}

/// The router, as deployed: the release binary, `serve --config`, IAP mode
/// against the local JWKS, the upstream as its single static backend.
pub async fn start_router(
    binary: &Path,
    dir: &Path,
    upstream: SocketAddr,
    jwks_url: &str,
    env: &[(String, String)],
) -> anyhow::Result<(Process, SocketAddr)> {
    if !binary.exists() {
        bail!("router binary {} missing (cargo bench builds it)", binary.display());
    }
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let config = format!(
        r#"# generated by benches/proxy: the router under test
[server]
listen = "{addr}"
drain_timeout = "1s"

[auth]
mode = "iap"
audiences = ["{AUDIENCE}"]
jwks_url = "{jwks_url}"

[session]
idle_timeout = "1h"

[backend.static]
upstreams = ["http://{upstream}"]
"#
    );
    let path = dir.join("router.toml");
    fs::write(&path, config)?;
    let mut command = Command::new(binary);
    command
        .arg("serve")
        .arg("--config")
        .arg(&path)
        .env(
            "SESSION_ROUTER_COOKIE_SECRET",
            "bench-cookie-secret-bench-cookie-secret-0123456789",
        )
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let process = Process::spawn("router", command, &dir.join("router.log"))?;
    // For attaching a profiler: `perf record -g -p $(cat target/bench/router.pid)`.
    fs::write(dir.join("router.pid"), process.pid().to_string())?;
    let probe = Endpoint {
        addr,
        headers: String::new(),
    };
    wait_until_answers(&probe, "/readyz", "the router").await?;
    Ok((process, addr))
}

/// nginx's binary: found, or installed from Debian (`nginx-light`) when
/// running as root, as the README says.
pub fn find_or_install_nginx() -> anyhow::Result<PathBuf> {
    let find = || {
        ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
    };
    if let Some(found) = find() {
        return Ok(found);
    }
    if !sys::is_root() {
        bail!("nginx not found; install it with `sudo apt-get install -y nginx-light` (or pass --no-nginx)");
    }
    eprintln!("nginx not found: apt-get install -y nginx-light …");
    let ok = Command::new("sh")
        .arg("-c")
        .arg("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light")
        .status()
        .context("cannot run apt-get")?
        .success();
    match find() {
        Some(found) if ok => Ok(found),
        _ => bail!("installing nginx-light failed (or pass --no-nginx)"),
    }
}

pub fn nginx_version(binary: &Path) -> String {
    Command::new(binary)
        .arg("-v")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
        .unwrap_or_default()
}

/// nginx configured as the front end the router replaces was: `proxy_pass`
/// with HTTP/1.1 upstream keep-alive, WebSocket upgrade and no body-size
/// limit (`benches/proxy/nginx.conf.template`). Its Lua and Redis parts are
/// left out: this is the cheapest nginx that proxies the same traffic.
pub async fn start_nginx(binary: &Path, dir: &Path, upstream: SocketAddr) -> anyhow::Result<(Process, SocketAddr)> {
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let prefix = dir.join("nginx");
    let _ = fs::remove_dir_all(&prefix);
    for sub in ["logs", "client_body", "proxy", "fastcgi", "uwsgi", "scgi"] {
        fs::create_dir_all(prefix.join(sub))?;
    }
    let prefix = prefix.canonicalize()?;
    let config = include_str!("nginx.conf.template")
        .replace(
            "{user}",
            if sys::is_root() {
                "user root;"
            } else {
                "# (not root: workers run as this user)"
            },
        )
        .replace("{prefix}", &prefix.display().to_string())
        .replace("{listen}", &addr.to_string())
        .replace("{upstream}", &upstream.to_string());
    let path = prefix.join("nginx.conf");
    fs::write(&path, config)?;
    let mut command = Command::new(binary);
    command.arg("-p").arg(&prefix).arg("-c").arg(&path);
    let process = Process::spawn("nginx", command, &prefix.join("logs/stderr.log"))?;
    let probe = Endpoint {
        addr,
        headers: String::new(),
    };
    wait_until_answers(&probe, "/small", "nginx").await?;
    Ok((process, addr))
}
