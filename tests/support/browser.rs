//! A headless Chromium driven over the Chrome DevTools Protocol: just enough
//! to open pages, run JavaScript in them, wait for something to show up and
//! take a screenshot. One `Browser` is one Chromium process with its own
//! fresh profile, so two of them share no cookies.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Where Debian's `chromium` package puts its launcher.
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// How long one DevTools command may take before it counts as hung.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(15);

type Sink = SplitSink<WebSocketStream<MaybeTlsStream<TcpStream>>, Message>;
type Pending = HashMap<u64, oneshot::Sender<Result<Value, String>>>;

/// What the reader task shares with the `Browser`.
#[derive(Default)]
struct Shared {
    pending: Mutex<Pending>,
    /// Console messages, browser log entries and uncaught exceptions, as
    /// one line each: printed when a test fails.
    log: Mutex<Vec<String>>,
    /// Whether a failure message already carried the log.
    reported: AtomicBool,
}

/// A running headless Chromium with one page attached.
pub struct Browser {
    name: String,
    child: Child,
    dir: PathBuf,
    sink: tokio::sync::Mutex<Sink>,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    reader: tokio::task::JoinHandle<()>,
}

/// Whether Debian's Chromium is installed here.
pub fn chromium_available() -> bool {
    Path::new(CHROMIUM).exists()
}

impl Browser {
    /// Starts Chromium with a fresh profile and attaches to its blank page.
    /// `name` labels this browser in diagnostics.
    pub async fn launch(name: &str) -> Browser {
        let dir = fresh_dir(name);
        let profile = dir.join("profile");
        std::fs::create_dir_all(&profile).unwrap();
        let stderr_path = dir.join("chromium-stderr.log");
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut command = std::process::Command::new(CHROMIUM);
        command
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(["--remote-debugging-port=0", "about:blank"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr));
        // Its own process group, so that Drop can end Chromium's helper
        // processes together with it.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {CHROMIUM}: {e}"));

        let port = match wait_for_port(&profile, &mut child).await {
            Ok(port) => port,
            Err(why) => {
                let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                kill_group(&mut child);
                let _ = std::fs::remove_dir_all(&dir);
                panic!("{name}: Chromium did not start: {why}\nits stderr:\n{stderr}");
            }
        };
        let ws_url = page_websocket(port).await;
        let (socket, _) = tokio_tungstenite::connect_async(ws_url.as_str())
            .await
            .unwrap_or_else(|e| panic!("{name}: cannot connect to DevTools at {ws_url}: {e}"));
        let (sink, mut stream) = socket.split();
        let shared = Arc::new(Shared::default());
        let reader = {
            let shared = shared.clone();
            tokio::spawn(async move {
                while let Some(Ok(message)) = stream.next().await {
                    if let Message::Text(text) = message {
                        if let Ok(value) = serde_json::from_str::<Value>(text.as_str()) {
                            dispatch(&shared, value);
                        }
                    }
                }
                // The connection is gone: nothing pending will be answered.
                for (_, waiter) in shared.pending.lock().unwrap().drain() {
                    let _ = waiter.send(Err("DevTools connection closed".into()));
                }
            })
        };
        let browser = Browser {
            name: name.to_string(),
            child,
            dir,
            sink: tokio::sync::Mutex::new(sink),
            shared,
            next_id: AtomicU64::new(1),
            reader,
        };
        browser.call("Page.enable", json!({})).await;
        browser.call("Runtime.enable", json!({})).await;
        browser.call("Log.enable", json!({})).await;
        browser
    }

    /// Sends one DevTools command and returns its `result`, or the error.
    pub async fn try_call(&self, method: &str, params: Value) -> Result<Value, String> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.shared.pending.lock().unwrap().insert(id, tx);
        let message = json!({ "id": id, "method": method, "params": params }).to_string();
        if let Err(e) = self.sink.lock().await.send(Message::text(message)).await {
            self.shared.pending.lock().unwrap().remove(&id);
            return Err(format!("cannot send {method}: {e}"));
        }
        match tokio::time::timeout(COMMAND_TIMEOUT, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(format!("{method}: DevTools connection closed")),
            Err(_) => {
                self.shared.pending.lock().unwrap().remove(&id);
                Err(format!("{method}: no answer within {COMMAND_TIMEOUT:?}"))
            }
        }
    }

    /// Like [`Browser::try_call`], failing the test on an error.
    pub async fn call(&self, method: &str, params: Value) -> Value {
        self.try_call(method, params)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}\n{}", self.name, self.diagnostics()))
    }

    /// Opens `url` and waits until the new document has loaded.
    pub async fn goto(&self, url: &str) {
        let result = self.call("Page.navigate", json!({ "url": url })).await;
        if let Some(error) = result.get("errorText").and_then(Value::as_str) {
            panic!(
                "{}: navigating to {url} failed: {error}\n{}",
                self.name,
                self.diagnostics()
            );
        }
        self.wait_for("document.readyState === 'complete'", Duration::from_secs(15))
            .await;
    }

    /// The value of the JavaScript expression `js` (promises awaited), or
    /// why there is none (a thrown exception, a page in the middle of
    /// navigating, …).
    pub async fn try_eval(&self, js: &str) -> Result<Value, String> {
        let result = self
            .try_call(
                "Runtime.evaluate",
                json!({ "expression": js, "returnByValue": true, "awaitPromise": true }),
            )
            .await?;
        if let Some(exception) = result.get("exceptionDetails") {
            return Err(format!("`{js}` threw: {exception}"));
        }
        Ok(result.pointer("/result/value").cloned().unwrap_or(Value::Null))
    }

    /// Like [`Browser::try_eval`], failing the test on an error.
    pub async fn eval(&self, js: &str) -> Value {
        self.try_eval(js)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}\n{}", self.name, self.diagnostics()))
    }

    /// The text of the first element matching `selector`, or `None`.
    pub async fn text(&self, selector: &str) -> Option<String> {
        let js = format!(
            "document.querySelector({}) ? document.querySelector({0}).textContent : null",
            Value::from(selector)
        );
        self.try_eval(&js)
            .await
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
    }

    /// Polls the JavaScript condition `js` every 100 ms until it is truthy,
    /// failing the test if it is not within `within`. Errors while polling
    /// (the page is being replaced, say) count as "not yet".
    pub async fn wait_for(&self, js: &str, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let last = match self.try_eval(&format!("!!({js})")).await {
                Ok(Value::Bool(true)) => return,
                Ok(other) => format!("evaluated to {other}"),
                Err(e) => e,
            };
            if tokio::time::Instant::now() >= deadline {
                let page = self.describe_page().await;
                panic!(
                    "{}: `{js}` did not hold within {within:?} (last: {last})\n{page}\n{}",
                    self.name,
                    self.diagnostics()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The current page as PNG bytes.
    pub async fn screenshot_png(&self) -> Vec<u8> {
        let result = self.call("Page.captureScreenshot", json!({ "format": "png" })).await;
        let data = result["data"].as_str().expect("screenshot data");
        B64.decode(data).expect("screenshot is base64")
    }

    /// Where the page is, its title and the start of its text: for failure
    /// messages.
    pub async fn describe_page(&self) -> String {
        match self
            .try_eval(
                "JSON.stringify({ url: location.href, title: document.title, \
                 text: (document.body ? document.body.innerText : '').slice(0, 600) })",
            )
            .await
        {
            Ok(v) => format!("page now: {}", v.as_str().unwrap_or("?")),
            Err(e) => format!("page now: unknown ({e})"),
        }
    }

    /// Everything the page logged, one line each.
    pub fn log(&self) -> Vec<String> {
        self.shared.log.lock().unwrap().clone()
    }

    /// The log, for a failure message.
    fn diagnostics(&self) -> String {
        self.shared.reported.store(true, Ordering::Relaxed);
        let log = self.log();
        if log.is_empty() {
            format!("{}: nothing in the browser console", self.name)
        } else {
            format!("{} browser console:\n  {}", self.name, log.join("\n  "))
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if std::thread::panicking() && !self.shared.reported.load(Ordering::Relaxed) {
            eprintln!("{}", self.diagnostics());
        }
        self.reader.abort();
        kill_group(&mut self.child);
        // Helpers may still be letting go of files for a moment.
        for _ in 0..20 {
            if std::fs::remove_dir_all(&self.dir).is_ok() || !self.dir.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Routes one DevTools message: a reply to its waiter, a log event to the
/// log, anything else away.
fn dispatch(shared: &Shared, message: Value) {
    if let Some(id) = message.get("id").and_then(Value::as_u64) {
        let waiter = shared.pending.lock().unwrap().remove(&id);
        if let Some(waiter) = waiter {
            let reply = match message.get("error") {
                Some(error) => Err(error.to_string()),
                None => Ok(message.get("result").cloned().unwrap_or(Value::Null)),
            };
            let _ = waiter.send(reply);
        }
        return;
    }
    let params = &message["params"];
    let line = match message["method"].as_str() {
        Some("Runtime.consoleAPICalled") => {
            let args: Vec<String> = params["args"]
                .as_array()
                .map(|args| {
                    args.iter()
                        .map(|a| match a.get("value") {
                            Some(Value::String(s)) => s.clone(),
                            Some(v) => v.to_string(),
                            None => a["description"].as_str().unwrap_or("?").to_string(),
                        })
                        .collect()
                })
                .unwrap_or_default();
            format!(
                "console.{}: {}",
                params["type"].as_str().unwrap_or("log"),
                args.join(" ")
            )
        }
        Some("Runtime.exceptionThrown") => {
            let details = &params["exceptionDetails"];
            let description = details["exception"]["description"]
                .as_str()
                .or(details["text"].as_str())
                .unwrap_or("?");
            format!("uncaught exception: {description}")
        }
        Some("Log.entryAdded") => {
            let entry = &params["entry"];
            format!(
                "log.{} ({}): {} {}",
                entry["level"].as_str().unwrap_or("?"),
                entry["source"].as_str().unwrap_or("?"),
                entry["text"].as_str().unwrap_or(""),
                entry["url"].as_str().unwrap_or("")
            )
        }
        Some("Page.frameNavigated") if params["frame"]["parentId"].is_null() => {
            format!("navigated to {}", params["frame"]["url"].as_str().unwrap_or("?"))
        }
        _ => return,
    };
    shared.log.lock().unwrap().push(line);
}

/// A new, empty directory under the system temp dir.
fn fresh_dir(name: &str) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "session-router-chromium-{name}-{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Waits for Chromium to write the DevTools port it picked.
async fn wait_for_port(profile: &Path, child: &mut Child) -> Result<u16, String> {
    let file = profile.join("DevToolsActivePort");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(text) = std::fs::read_to_string(&file) {
            // Written in one go, but a read may catch it half done.
            if let Some(port) = text.lines().next().and_then(|l| l.trim().parse().ok()) {
                if text.lines().count() >= 2 {
                    return Ok(port);
                }
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("it exited with {status}"));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("no {} after 20 s", file.display()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The DevTools WebSocket of the browser's first page.
async fn page_websocket(port: u16) -> String {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/json/list");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let targets: Option<Vec<Value>> = match client.get(&url).send().await {
            Ok(r) => r.json().await.ok(),
            Err(_) => None,
        };
        let page = targets.unwrap_or_default().into_iter().find_map(|t| {
            (t["type"] == "page")
                .then(|| t["webSocketDebuggerUrl"].as_str().map(str::to_string))
                .flatten()
        });
        if let Some(ws) = page {
            return ws;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("Chromium on port {port} lists no page to attach to");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Ends Chromium and every helper process it started, then reaps it.
fn kill_group(child: &mut Child) {
    if !matches!(child.try_wait(), Ok(None)) {
        // Already gone (and reaped): its pid is no longer ours to signal.
        return;
    }
    // The group id is the child's pid (`process_group(0)` above); only
    // processes this browser started are in it.
    let _ = std::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", child.id())])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let _ = child.kill();
    let _ = child.wait();
}
