//! The binary's command line: config checking, refusing bad configs, and a
//! clean stop on SIGTERM.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_session-router");
const SECRET_ENV: &str = "SESSION_ROUTER_COOKIE_SECRET";
const SECRET: &str = "a-long-enough-secret-for-the-cli-tests-0123456789";

fn config_file(text: &str) -> tempfile_path::TempConfig {
    tempfile_path::TempConfig::new(text)
}

/// A config file in the target's temporary directory, removed on drop.
mod tempfile_path {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    static NEXT: AtomicUsize = AtomicUsize::new(0);

    pub struct TempConfig(pub PathBuf);

    impl TempConfig {
        pub fn new(text: &str) -> Self {
            let n = NEXT.fetch_add(1, Ordering::SeqCst);
            let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("cli-{}-{n}.toml", std::process::id()));
            std::fs::write(&path, text).unwrap();
            TempConfig(path)
        }
    }

    impl Drop for TempConfig {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

#[test]
fn check_config_prints_the_effective_config_with_the_secret_redacted() {
    let output = Command::new(BIN)
        .args(["check-config", "--config", "config/production.toml"])
        .env(SECRET_ENV, SECRET)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("idle_timeout = \"15m\""), "{stdout}");
    assert!(stdout.contains("redacted"), "{stdout}");
    assert!(!stdout.contains(SECRET), "secret printed: {stdout}");
}

#[test]
fn a_short_idle_timeout_on_agones_passes_without_setting_the_activity_sync_interval() {
    let base = r#"
[auth]
audiences = ["/projects/1/global/backendServices/2"]
[session]
idle_timeout = "20s"
[backend]
kind = "agones"
[backend.agones]
fleet = "webui"
"#;
    let check = |text: &str| {
        let file = config_file(text);
        Command::new(BIN)
            .args(["check-config", "--config"])
            .arg(&file.0)
            .env(SECRET_ENV, SECRET)
            .output()
            .unwrap()
    };
    let unset = check(base);
    assert!(unset.status.success(), "{}", String::from_utf8_lossy(&unset.stderr));
    let stdout = String::from_utf8_lossy(&unset.stdout);
    assert!(stdout.contains("activity_sync_interval = \"6s 666ms\""), "{stdout}");

    let explicit = check(&format!("{base}activity_sync_interval = \"30s\"\n"));
    assert!(!explicit.status.success());
    let stderr = String::from_utf8_lossy(&explicit.stderr);
    assert!(
        stderr.contains("backend.agones.activity_sync_interval: 30s is not shorter than session.idle_timeout"),
        "{stderr}"
    );
}

#[test]
fn every_shipped_example_config_is_valid() {
    for entry in std::fs::read_dir("config").unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let output = Command::new(BIN)
                .args(["check-config", "--config"])
                .arg(&path)
                .env(SECRET_ENV, SECRET)
                .output()
                .unwrap();
            assert!(
                output.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
}

#[test]
fn check_config_names_every_bad_key_and_fails() {
    let file = config_file(
        r#"
[server]
listen = "here"
[auth]
mode = "iap"
leeway = "a while"
[session]
idle_timout = "15m"
[backend.static]
upstreams = []
"#,
    );
    let output = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&file.0)
        .env_remove(SECRET_ENV)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    for key in [
        "server.listen: ",
        "auth.audiences: required",
        "auth.leeway: ",
        "session.idle_timout: unknown key",
        "backend.static.upstreams: must list at least one upstream",
        "SESSION_ROUTER_COOKIE_SECRET: required in iap mode",
    ] {
        assert!(
            stderr.lines().any(|l| l.starts_with(key)),
            "no line starting {key:?} in:\n{stderr}"
        );
    }
}

#[test]
fn serve_refuses_to_start_in_iap_mode_without_the_secret() {
    let output = Command::new(BIN)
        .args(["serve", "--config", "config/production.toml"])
        .env_remove(SECRET_ENV)
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains(SECRET_ENV));
}

#[test]
fn a_missing_config_file_is_a_clear_error() {
    let output = Command::new(BIN)
        .args(["check-config", "--config", "/nonexistent/config.toml"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot read /nonexistent/config.toml"));
}

#[test]
fn serve_answers_health_checks_and_stops_cleanly_on_sigterm() {
    let file = config_file(
        r#"
[server]
listen = "127.0.0.1:0"
drain_timeout = "2s"
[auth]
mode = "dev"
[backend.static]
upstreams = ["http://127.0.0.1:9"]
"#,
    );
    let mut child = Command::new(BIN)
        .args(["--log-format", "json", "serve", "--config"])
        .arg(&file.0)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let listening = rx.recv_timeout(Duration::from_secs(10)).expect("no log line");
    let log: serde_json::Value = serde_json::from_str(&listening).unwrap_or_else(|_| panic!("not JSON: {listening}"));
    let addr = log["listen"].as_str().unwrap().to_string();

    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut reply = String::new();
    std::io::Read::read_to_string(&mut stream, &mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");

    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "did not stop after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}
