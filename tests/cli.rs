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

fn check_config(text: &str, secret: Option<&str>) -> std::process::Output {
    let file = config_file(text);
    let mut command = Command::new(BIN);
    command.args(["check-config", "--config"]).arg(&file.0);
    match secret {
        Some(secret) => command.env(SECRET_ENV, secret),
        None => command.env_remove(SECRET_ENV),
    };
    command.output().unwrap()
}

#[test]
fn a_toml_syntax_error_says_at_which_line_and_column() {
    let output = check_config(
        "[server]\nlisten = \"127.0.0.1:8080\"\ndrain_timeout = 30s\n",
        Some(SECRET),
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("not valid TOML at line 3, column 19: expected newline"),
        "{stderr}"
    );
}

#[test]
fn a_url_with_a_port_out_of_range_fails_naming_its_key() {
    let output = check_config(
        "[server]\nlisten = \"127.0.0.1:8080\"\n[auth]\nmode = \"dev\"\n[backend.static]\nupstreams = [\"http://127.0.0.1:7860\", \"http://gpu-box:99999\"]\n",
        None,
    );
    assert!(!output.status.success(), "{}", String::from_utf8_lossy(&output.stdout));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with("backend.static.upstreams[1]: ") && l.contains("\"99999\" is not a port")),
        "{stderr}"
    );
}

#[test]
fn the_printed_effective_configuration_passes_check_config_when_fed_back() {
    let mut configs: Vec<(String, String)> = std::fs::read_dir("config")
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "toml"))
        .map(|path| (path.display().to_string(), std::fs::read_to_string(&path).unwrap()))
        .collect();
    configs.push((
        "dev mode, an IPv6 upstream".into(),
        "[auth]\nmode = \"dev\"\n[server]\nlisten = \"127.0.0.1:8080\"\n[backend.static]\nupstreams = [\"http://[::1]:7860\"]\n"
            .into(),
    ));
    assert!(configs.len() >= 4);
    for (name, text) in configs {
        let first = check_config(&text, Some(SECRET));
        assert!(
            first.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&first.stderr)
        );
        let printed = String::from_utf8(first.stdout).unwrap();
        let again = check_config(&printed, Some(SECRET));
        assert!(
            again.status.success(),
            "{name}: the printed configuration is refused:\n{}\n{printed}",
            String::from_utf8_lossy(&again.stderr)
        );
        let reprinted = String::from_utf8(again.stdout).unwrap();
        let body = |text: &str| text.lines().skip(1).collect::<Vec<_>>().join("\n");
        assert_eq!(body(&reprinted), body(&printed), "{name}: not the same configuration");
    }
}

#[test]
fn check_config_says_where_the_cookie_secret_came_from() {
    let dev = "[server]\nlisten = \"127.0.0.1:8080\"\n[auth]\nmode = \"dev\"\n[backend.static]\nupstreams = [\"http://127.0.0.1:7860\"]\n";
    let unset = check_config(dev, None);
    assert!(unset.status.success());
    let stdout = String::from_utf8_lossy(&unset.stdout);
    assert!(
        stdout.contains(&format!("{SECRET_ENV} is not set")) && !stdout.contains(&format!("from {SECRET_ENV}")),
        "{stdout}"
    );
    let set = check_config(dev, Some(SECRET));
    let stdout = String::from_utf8_lossy(&set.stdout);
    assert!(
        stdout.contains(&format!("{} bytes from {SECRET_ENV} (redacted)", SECRET.len())),
        "{stdout}"
    );
}

#[test]
fn a_failure_to_start_prints_its_cause_once() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let file = config_file(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:{port}\"\n[auth]\nmode = \"dev\"\n[backend.static]\nupstreams = [\"http://127.0.0.1:9\"]\n"
    ));
    let output = Command::new(BIN)
        .args(["--log-format", "text", "serve", "--config"])
        .arg(&file.0)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let last = stderr.lines().last().unwrap_or_default();
    assert_eq!(last.matches("Address already in use").count(), 1, "{stderr}");
    assert!(
        last.contains(&format!("cannot listen on 127.0.0.1:{port} (server.metrics_listen)")),
        "{stderr}"
    );
}

#[test]
fn every_option_has_help_text() {
    for command in ["serve", "check-config", "demo"] {
        let output = Command::new(BIN).args([command, "--help"]).output().unwrap();
        let help = String::from_utf8_lossy(&output.stdout);
        for line in help.lines().filter(|l| l.trim_start().starts_with("--")) {
            let option = line.split_whitespace().next().unwrap();
            if option == "--help" || option == "--version" {
                continue;
            }
            let help_text = line.split_whitespace().skip(2).collect::<Vec<_>>().join(" ");
            let described = !help_text.is_empty() && !help_text.starts_with("[default:");
            assert!(described, "{command} {option} has no help text:\n{help}");
        }
    }
}

/// The README's binary size holds only while the release profile (which
/// the Dockerfile's build uses too) leaves the debug info out; with it the
/// binary was 119 MB.
#[test]
fn the_release_binary_is_built_without_debug_info() {
    let manifest: toml::Table = std::fs::read_to_string("Cargo.toml").unwrap().parse().unwrap();
    let release = &manifest["profile"]["release"];
    assert_eq!(release["debug"].as_integer(), Some(0), "{release}");
    assert_eq!(release["strip"].as_str(), Some("debuginfo"), "{release}");
    let dockerfile = std::fs::read_to_string("Dockerfile").unwrap();
    assert!(dockerfile.contains("cargo build --release --locked"));
}
