//! Test fixtures: a router on port 0, a real IAP-like token issuer with a
//! JWKS endpoint, stand-in pods and a client that keeps cookies only when
//! asked to.
#![allow(dead_code)]

pub mod api_pod;
pub mod browser;
pub mod demo_process;
pub mod fake_agones;
pub mod fake_endpoints;
pub mod gpu_box;
pub mod iap;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use session_router::app::{serve, AppState};
use session_router::config::Config;
pub use session_router::demo::DemoPod;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

pub use fake_agones::FakeAgones;
pub use iap::IapIssuer;

pub const SECRET: &[u8] = b"test-secret-test-secret-test-secret!!";
pub const AUDIENCE: &str = "/projects/123/global/backendServices/456";

/// A router running in this process on an ephemeral loopback port.
pub struct TestRouter {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestRouter {
    /// Starts a router in `iap` mode against `issuer`, with the given pods as
    /// its static pool. `extra` is appended to the config (its own sections).
    pub async fn iap(issuer: &IapIssuer, pods: &[&DemoPod], session: &str) -> TestRouter {
        let text = format!(
            r#"{head}
[session]
retry_after = "2s"
{session}
[backend.static]
upstreams = [{upstreams}]
"#,
            head = iap_head(issuer, "", ""),
            upstreams = upstream_list(pods),
        );
        TestRouter::start(&text).await
    }

    /// Starts a router in `iap` mode on an Agones backend served by `fake`.
    /// `kind` is `agones` or `agones-allocator`; `session` and `agones` are
    /// extra lines for those sections.
    pub async fn agones(issuer: &IapIssuer, fake: &FakeAgones, kind: &str, session: &str, agones: &str) -> TestRouter {
        TestRouter::start(&agones_config(issuer, fake, kind, "", session, agones)).await
    }

    pub async fn start(text: &str) -> TestRouter {
        let config =
            Config::from_toml(text, Some(SECRET.to_vec())).unwrap_or_else(|e| panic!("test config invalid:\n{e}"));
        let listener = TcpListener::bind(config.server.listen).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(session_router::build(config).await.unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let state_for_task = state.clone();
        let task = tokio::spawn(async move {
            serve(listener, state_for_task, async move {
                let _ = stopped.await;
            })
            .await
            .expect("router serves");
        });
        let router = TestRouter {
            addr,
            state,
            stop: Some(stop),
            task: Some(task),
        };
        router.wait_ready().await;
        router
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// The backends of the router's default (or only) profile.
    pub fn capacity(&self) -> session_router::allocator::Capacity {
        self.state.registry.profiles().default_profile().allocator.capacity()
    }

    /// How many wait in the default (or only) profile's line.
    pub async fn waiting(&self) -> usize {
        self.state.registry.profiles().default_profile().line.waiting().await
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    async fn wait_ready(&self) {
        let client = client();
        for _ in 0..100 {
            if let Ok(r) = client.get(self.url("/readyz")).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("router never became ready");
    }

    /// Stops the router and waits for its drain to finish.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for TestRouter {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// The config of an `iap`-mode router on an Agones backend served by `fake`
/// (see [`TestRouter::agones`]); `server` adds lines to `[server]`. Further
/// sections can be appended.
pub fn agones_config(
    issuer: &IapIssuer,
    fake: &FakeAgones,
    kind: &str,
    server: &str,
    session: &str,
    agones: &str,
) -> String {
    format!(
        r#"{head}
[session]
retry_after = "2s"
{session}
[backend]
kind = "{kind}"
connect_timeout = "1s"
[backend.agones]
fleet = "{fleet}"
kube_api_url = "{api}"
allocator_url = "{api}"
allocation_retry_window = "500ms"
activity_sync_interval = "200ms"
api_timeout = "3s"
{agones}
"#,
        head = iap_head(issuer, server, ""),
        fleet = fake_agones::FLEET,
        api = fake.url(),
    )
}

/// The `[server]` and `[auth]` sections of an `iap`-mode test router on an
/// ephemeral port, trusting `issuer`; `server` and `auth` add lines to them.
pub fn iap_head(issuer: &IapIssuer, server: &str, auth: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
drain_timeout = "1s"
{server}
[auth]
mode = "iap"
audiences = ["{AUDIENCE}"]
jwks_url = "{jwks}"
jwks_refetch_interval = "200ms"
{auth}
"#,
        jwks = issuer.jwks_url(),
    )
}

/// A static-pool `iap` router config: [`iap_head`], further sections
/// (`more`) and the pool (`upstreams`, a TOML list body, see [`upstream_list`]).
pub fn static_config(issuer: &IapIssuer, server: &str, auth: &str, more: &str, upstreams: &str) -> String {
    format!(
        "{head}\n{more}\n[backend.static]\nupstreams = [{upstreams}]\n",
        head = iap_head(issuer, server, auth),
    )
}

pub fn upstream_list(pods: &[&DemoPod]) -> String {
    pods.iter()
        .map(|p| format!("{:?}", p.url()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Starts `n` stand-in pods named `pod-1` … `pod-n`.
pub async fn pods(n: usize) -> Vec<DemoPod> {
    let mut pods = Vec::new();
    for i in 1..=n {
        pods.push(DemoPod::start(&format!("pod-{i}")).await.unwrap());
    }
    pods
}

/// An HTTP client that never follows redirects and keeps no cookies.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// The `name=value` part of the router's `Set-Cookie`, if the response set it.
pub fn set_cookie(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or("").to_string())
        .find(|pair| pair.starts_with(&format!("{name}=")))
}

/// The body of the answer to `request`, as text (panics when there is none).
pub async fn text_of(request: reqwest::RequestBuilder) -> String {
    request.send().await.unwrap().text().await.unwrap()
}

/// Polls `check` every 50 ms until it holds or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
