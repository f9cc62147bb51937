//! The `session-router demo` binary as its own process, started the way a
//! newcomer starts it, with what it printed kept for failure messages.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A running `session-router demo`.
pub struct Demo {
    /// `http://127.0.0.1:PORT`, also the origin its same-origin checks want.
    pub origin: String,
    output: Arc<Mutex<Vec<String>>>,
    _child: Child,
}

impl Demo {
    /// Starts the demo with `args` after `demo --listen 127.0.0.1:0` and
    /// waits for it to say where to go.
    pub async fn start(args: &[&str]) -> Demo {
        let mut child = Command::new(env!("CARGO_BIN_EXE_session-router"))
            .args(["demo", "--listen", "127.0.0.1:0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start session-router demo");
        let output = Arc::new(Mutex::new(Vec::new()));
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let stderr = BufReader::new(child.stderr.take().unwrap()).lines();
        tokio::spawn(keep_lines(stderr, output.clone()));
        let url = tokio::time::timeout(Duration::from_secs(30), async {
            while let Ok(Some(line)) = stdout.next_line().await {
                output.lock().unwrap().push(line.clone());
                let url = line
                    .strip_prefix("Open ")
                    .and_then(|rest| rest.split_whitespace().next());
                if let Some(url) = url {
                    return Some(url.to_string());
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| {
            panic!(
                "the demo never printed its address; it printed:\n{}",
                output.lock().unwrap().join("\n")
            )
        });
        tokio::spawn(keep_lines(stdout, output.clone()));
        let origin = url.trim_end_matches('/').to_string();
        assert!(origin.starts_with("http://127.0.0.1:"), "demo address {url}");
        Demo {
            origin,
            output,
            _child: child,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.origin)
    }

    pub fn printed(&self) -> String {
        self.output.lock().unwrap().join("\n")
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "session-router demo output:\n  {}",
                self.printed().replace('\n', "\n  ")
            );
        }
    }
}

async fn keep_lines<R: tokio::io::AsyncBufRead + Unpin>(mut lines: tokio::io::Lines<R>, into: Arc<Mutex<Vec<String>>>) {
    while let Ok(Some(line)) = lines.next_line().await {
        into.lock().unwrap().push(line);
    }
}
