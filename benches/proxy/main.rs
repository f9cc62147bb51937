//! Side-by-side benchmark: a direct connection, the router, and nginx, on
//! the same machine, in the same run, interleaved round by round.
//!
//! ```sh
//! cargo bench --bench proxy               # full run, ~3 minutes after the build
//! cargo bench --bench proxy -- --smoke    # CI subset, ~40 s after the build
//! ```
//!
//! See `benches/README.md` for what is measured, how, and the targets.

mod client;
mod contenders;
mod micro;
mod report;
mod sys;
mod ws;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;

use client::{percentile, Endpoint};
use contenders::Process;
use report::{Better, Report, Target, CONTENDERS, DIRECT, NGINX, ROUTER};

/// The size of every run, full or smoke.
struct Profile {
    rounds: usize,
    /// Rounds of the small-request phases: short and many, so a burst of
    /// noise from a neighbour spoils one round's ratio, not the median.
    http_rounds: usize,
    warmup: Duration,
    http_duration: Duration,
    http_conns: usize,
    /// Constant-rate loads (moderate, heavy) as fractions of the slowest
    /// contender's closed-loop throughput.
    rate_fractions: [f64; 2],
    ws_small: (usize, usize),
    ws_large: (usize, usize),
    sse_samples: usize,
    sse_gap_ms: u64,
    upload_bytes: u64,
    upload_rounds: usize,
    idle_sockets: usize,
    lookups: usize,
    token_budget: Duration,
}

const FULL: Profile = Profile {
    rounds: 5,
    http_rounds: 8,
    warmup: Duration::from_secs(1),
    http_duration: Duration::from_millis(1500),
    http_conns: 32,
    rate_fractions: [0.25, 0.5],
    ws_small: (200, 2000),
    ws_large: (5, 40),
    sse_samples: 40,
    sse_gap_ms: 25,
    upload_bytes: 1 << 30,
    upload_rounds: 3,
    idle_sockets: 10_000,
    lookups: 1_000_000,
    token_budget: Duration::from_secs(2),
};

const SMOKE: Profile = Profile {
    rounds: 1,
    http_rounds: 2,
    warmup: Duration::from_millis(300),
    http_duration: Duration::from_millis(1000),
    http_conns: 32,
    rate_fractions: [0.25, 0.5],
    ws_small: (50, 300),
    ws_large: (2, 10),
    sse_samples: 10,
    sse_gap_ms: 25,
    upload_bytes: 64 << 20,
    upload_rounds: 1,
    idle_sockets: 1000,
    lookups: 200_000,
    token_budget: Duration::from_millis(500),
};

/// The smoke run fails below these small-request throughput ratios. Half
/// of what the router measures (about 1.0× nginx and 0.5× direct on 2
/// shared cores, see benches/README.md), so shared-runner noise (±10 %
/// between runs) cannot fail it; a gross regression (twice the CPU per
/// request) or a broken path does.
const SMOKE_FLOOR_NGINX: f64 = 0.5;
const SMOKE_FLOOR_DIRECT: f64 = 0.25;

/// Metric keys of one constant-rate load.
#[derive(Clone, Copy)]
struct RateKeys {
    p50: &'static str,
    p99: &'static str,
    added: &'static str,
    cpu: &'static str,
}

const RATE_LOW: RateKeys = RateKeys {
    p50: "rate_moderate_p50",
    p99: "rate_moderate_p99",
    added: "rate_moderate_p99_added",
    cpu: "rate_moderate_cpu",
};

const RATE_HIGH: RateKeys = RateKeys {
    p50: "rate_heavy_p50",
    p99: "rate_heavy_p99",
    added: "rate_heavy_p99_added",
    cpu: "rate_heavy_cpu",
};

const PHASES: [&str; 7] = ["http", "rate", "ws", "sse", "upload", "idle", "micro"];

struct Options {
    smoke: bool,
    nginx: bool,
    only: Vec<String>,
    rounds: Option<usize>,
    idle_sockets: Option<usize>,
    router_bin: PathBuf,
    /// Extra environment for the router process (`--router-env K=V`), for
    /// experiments such as `RUST_LOG=info,access=off`.
    router_env: Vec<(String, String)>,
    /// A fixed rate for the constant-rate phase (default: half the slowest
    /// contender's closed-loop throughput).
    rate: Option<f64>,
    out_dir: PathBuf,
}

const USAGE: &str = "usage: cargo bench --bench proxy -- [--smoke] [--no-nginx] \
[--only http,rate,ws,sse,upload,idle,micro] [--rounds N] [--idle-sockets N] [--router-bin PATH] \
[--router-env KEY=VALUE] [--rate REQ_PER_S] [--out-dir DIR]";

fn options() -> anyhow::Result<Options> {
    let router_bin = PathBuf::from(env!("CARGO_BIN_EXE_session-router"));
    // …/target/release/session-router → …/target/bench
    let target_dir = router_bin
        .parent()
        .and_then(|p| p.parent())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"));
    let mut options = Options {
        smoke: false,
        nginx: true,
        only: PHASES.iter().map(|p| p.to_string()).collect(),
        rounds: None,
        idle_sockets: None,
        router_bin,
        router_env: Vec::new(),
        rate: None,
        out_dir: target_dir.join("bench"),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--bench" => {} // added by `cargo bench`
            "--smoke" => options.smoke = true,
            "--no-nginx" => options.nginx = false,
            "--only" => {
                options.only = value("--only")?.split(',').map(str::to_string).collect();
                if let Some(bad) = options.only.iter().find(|p| !PHASES.contains(&p.as_str())) {
                    bail!("unknown phase {bad}\n{USAGE}");
                }
            }
            "--rounds" => options.rounds = Some(value("--rounds")?.parse()?),
            "--rate" => options.rate = Some(value("--rate")?.parse()?),
            "--idle-sockets" => options.idle_sockets = Some(value("--idle-sockets")?.parse()?),
            "--router-bin" => options.router_bin = value("--router-bin")?.into(),
            "--router-env" => {
                let pair = value("--router-env")?;
                let (k, v) = pair.split_once('=').context("--router-env takes KEY=VALUE")?;
                options.router_env.push((k.to_string(), v.to_string()));
            }
            "--out-dir" => options.out_dir = value("--out-dir")?.into(),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    Ok(options)
}

/// One contender: where it listens and, if it is a process of its own, the
/// process (for its memory and CPU time).
struct Contender {
    endpoint: Endpoint,
    process: Option<Process>,
}

impl Contender {
    /// The process and its children (nginx workers).
    fn pids(&self) -> Vec<u32> {
        self.process
            .as_ref()
            .map_or_else(Vec::new, |p| sys::process_tree(p.pid()))
    }

    fn rss_kib(&self) -> Option<f64> {
        let pids = self.pids();
        (!pids.is_empty()).then(|| sys::sum_kib(&pids, "VmRSS") as f64)
    }

    /// Open descriptors of the process tree.
    fn open_fds(&self) -> usize {
        self.pids()
            .iter()
            .filter_map(|pid| std::fs::read_dir(format!("/proc/{pid}/fd")).ok())
            .map(|dir| dir.count())
            .sum()
    }

    /// CPU seconds (user, kernel) used so far by the process tree.
    fn cpu_secs(&self) -> Option<(f64, f64)> {
        let pids = self.pids();
        if pids.is_empty() {
            return None;
        }
        let (user, kernel) = pids
            .iter()
            .filter_map(|pid| {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
                let after = &stat[stat.rfind(')')? + 2..];
                let fields: Vec<&str> = after.split_whitespace().collect();
                // After "(comm) ": state is field 3, utime 14, stime 15.
                Some((
                    fields.get(11)?.parse::<u64>().ok()?,
                    fields.get(12)?.parse::<u64>().ok()?,
                ))
            })
            .fold((0, 0), |(u, k), (du, dk)| (u + du, k + dk));
        // USER_HZ is 100 on Linux.
        Some((user as f64 / 100.0, kernel as f64 / 100.0))
    }
}

/// Contender indices for round `round`, rotated so no contender is always
/// first (or last) after another's load.
fn order(round: usize, present: &[usize]) -> Vec<usize> {
    let n = present.len();
    (0..n).map(|i| present[(i + round) % n]).collect()
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(contenders::UPSTREAM_CHILD) {
        return match contenders::upstream_child(args.get(2).map_or("", String::as_str)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("upstream: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("benchmark failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<bool> {
    let options = options()?;
    let profile = if options.smoke { &SMOKE } else { &FULL };
    let rounds = options.rounds.unwrap_or(profile.rounds).max(1);
    let http_rounds = options.rounds.unwrap_or(profile.http_rounds).max(1);
    let idle_sockets = options.idle_sockets.unwrap_or(profile.idle_sockets);
    let phase = |name: &str| options.only.iter().any(|p| p == name);
    std::fs::create_dir_all(&options.out_dir)?;
    let out_dir = options.out_dir.canonicalize()?;

    // Each idle WebSocket is one descriptor here, one in the upstream and
    // two in the proxy; children inherit the limit. Without CAP_SYS_RESOURCE
    // the hard limit caps it, and with it the number of sockets.
    let fd_limit = sys::raise_fd_limit((2 * idle_sockets as u64 + 4096).max(65_536));
    let idle_sockets = if 2 * idle_sockets as u64 + 100 > fd_limit {
        let capped = (fd_limit.saturating_sub(100) / 2) as usize;
        eprintln!("open-file limit is {fd_limit} (hard): {capped} idle WebSockets instead of {idle_sockets}");
        capped
    } else {
        idle_sockets
    };

    let nginx_bin = if options.nginx {
        Some(contenders::find_or_install_nginx()?)
    } else {
        None
    };

    // The upstream is a process of its own; the JWKS server runs here on a
    // small runtime of its own; the load generator on a single thread, so
    // it takes at most one core.
    let servers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("jwks")
        .enable_all()
        .build()?;
    let load = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (upstream_process, upstream) = load.block_on(contenders::start_upstream(&out_dir))?;
    let issuer = servers.block_on(contenders::Issuer::start())?;
    let token = issuer.token("bench-user")?;

    let (router, router_addr) = load.block_on(contenders::start_router(
        &options.router_bin,
        &out_dir,
        upstream,
        &issuer.jwks_url,
        &options.router_env,
    ))?;
    let nginx = match &nginx_bin {
        Some(bin) => Some(load.block_on(contenders::start_nginx(bin, &out_dir, upstream))?),
        None => None,
    };

    // The first request through the router allocates the user's backend
    // and sets the pinning cookie; every later request carries both, as a
    // browser behind IAP does.
    let bare = Endpoint {
        addr: router_addr,
        headers: format!("x-goog-iap-jwt-assertion: {token}\r\n"),
    };
    let (head, _) = load.block_on(client::get(&bare, "/small"))?;
    if head.status != 200 {
        bail!("first request through the router answered {}", head.status);
    }
    let cookie = head
        .set_cookies
        .iter()
        .find_map(|c| c.split(';').next().filter(|p| p.starts_with("session_router=")))
        .context("the router set no pinning cookie")?
        .to_string();
    let headers = format!("x-goog-iap-jwt-assertion: {token}\r\nCookie: {cookie}\r\n");
    let endpoint = |addr| Endpoint {
        addr,
        headers: headers.clone(),
    };
    let mut all: Vec<Option<Contender>> = vec![
        Some(Contender {
            endpoint: endpoint(upstream),
            process: None,
        }),
        Some(Contender {
            endpoint: endpoint(router_addr),
            process: Some(router),
        }),
        nginx.map(|(process, addr)| Contender {
            endpoint: endpoint(addr),
            process: Some(process),
        }),
    ];
    let present: Vec<usize> = (0..3).filter(|&c| all[c].is_some()).collect();
    let router_idle_rss = all[ROUTER].as_ref().and_then(Contender::rss_kib);

    let mut report = Report::default();
    let started = Instant::now();
    // Everything this benchmark runs, to tell its CPU time from a neighbour's.
    let mut ours: Vec<u32> = vec![std::process::id(), upstream_process.pid()];
    for contender in all.iter().flatten() {
        ours.extend(contender.pids());
    }
    let (machine_start, ours_start) = (sys::cpu_ticks(), sys::process_ticks(&ours));
    let say = |what: &str| eprintln!("[{:>5.1}s] {what}", started.elapsed().as_secs_f64());

    // ---- small GET requests over keep-alive ----------------------------
    let conns = profile.http_conns;
    let mut slowest_rps = f64::INFINITY;
    if phase("http") || phase("rate") {
        say("warm-up");
        for &c in &present {
            let contender = all[c].as_ref().expect("present");
            load.block_on(client::closed_loop(
                &contender.endpoint,
                "/small",
                conns,
                profile.warmup,
            ))?;
        }
    }
    if phase("http") {
        report.metric(
            "http_rps",
            format!("small GET, {conns} keep-alive connections, closed loop"),
            "req/s",
            Better::Higher,
            true,
            Some(Target::NginxRatioAtLeast(1.0)),
        );
        report.metric(
            "http_p50",
            "  latency p50, closed loop",
            "ms",
            Better::Lower,
            true,
            None,
        );
        report.metric(
            "http_p99",
            "  latency p99, closed loop",
            "ms",
            Better::Lower,
            true,
            None,
        );
        report.metric("http_cpu", "  proxy CPU per request", "µs", Better::Lower, true, None);
        report.metric(
            "http_cpu_kernel",
            "    of which in the kernel",
            "µs",
            Better::Lower,
            true,
            None,
        );
        report.metric(
            "http_machine_busy",
            "  machine CPU busy (all processes)",
            "%",
            Better::Lower,
            true,
            None,
        );
        for round in 0..http_rounds {
            say(&format!("small GET, closed loop, round {}/{http_rounds}", round + 1));
            for c in order(round, &present) {
                let contender = all[c].as_ref().expect("present");
                let cpu_before = contender.cpu_secs();
                let machine_before = sys::cpu_ticks();
                let mut result = load
                    .block_on(client::closed_loop(
                        &contender.endpoint,
                        "/small",
                        conns,
                        profile.http_duration,
                    ))
                    .with_context(|| CONTENDERS[c])?;
                let cpu = contender
                    .cpu_secs()
                    .zip(cpu_before)
                    .map(|((u, k), (u0, k0))| (u - u0, k - k0));
                let machine_busy = sys::busy_share(machine_before, sys::cpu_ticks());
                report.record("http_machine_busy", round, c, machine_busy * 100.0);
                if result.errors > 0 {
                    bail!("{}: {} small GETs failed", CONTENDERS[c], result.errors);
                }
                let rps = result.throughput();
                report.record("http_rps", round, c, rps);
                report.record("http_p50", round, c, percentile(&mut result.latencies_ns, 0.5) / 1e6);
                report.record("http_p99", round, c, percentile(&mut result.latencies_ns, 0.99) / 1e6);
                if let Some((user, kernel)) = cpu {
                    let requests = result.latencies_ns.len() as f64;
                    report.record("http_cpu", round, c, (user + kernel) / requests * 1e6);
                    report.record("http_cpu_kernel", round, c, kernel / requests * 1e6);
                }
            }
        }
        if let Some(s) = report.get("http_rps") {
            slowest_rps = s.values.iter().flatten().fold(f64::INFINITY, |a, &b| a.min(b));
        }
    }

    // ---- the same at a constant rate (no coordinated omission) ----------
    // Two loads, as fractions of the slowest contender's closed-loop
    // throughput: moderate (where the latency target applies) and heavy.
    if phase("rate") {
        if !slowest_rps.is_finite() && options.rate.is_none() {
            // Phase run alone: find the slowest contender quickly.
            for &c in &present {
                let contender = all[c].as_ref().expect("present");
                let r = load
                    .block_on(client::closed_loop(
                        &contender.endpoint,
                        "/small",
                        conns,
                        Duration::from_secs(1),
                    ))
                    .with_context(|| CONTENDERS[c])?;
                slowest_rps = slowest_rps.min(r.throughput());
            }
        }
        let rates: Vec<(RateKeys, f64, &str)> = match options.rate {
            Some(rate) => vec![(RATE_LOW, rate, "fixed")],
            None => profile
                .rate_fractions
                .iter()
                .zip([(RATE_LOW, "moderate"), (RATE_HIGH, "heavy")])
                .map(|(f, (keys, name))| (keys, (slowest_rps * f / 100.0).round() * 100.0, name))
                .collect(),
        };
        for (keys, rate, name) in rates {
            let label = format!("small GET at a constant {rate:.0} req/s ({name} load)");
            report.metric(keys.p50, format!("{label}: p50"), "ms", Better::Lower, true, None);
            report.metric(keys.p99, "  p99", "ms", Better::Lower, true, None);
            report.metric(
                keys.added,
                "  p99 added over direct",
                "ms",
                Better::Lower,
                false,
                (keys.added == RATE_LOW.added).then_some(Target::RouterAtMost(1.0)),
            );
            report.metric(
                keys.cpu,
                "  proxy CPU per request at this rate",
                "µs",
                Better::Lower,
                true,
                None,
            );
            for round in 0..http_rounds {
                say(&format!(
                    "small GET, constant {rate:.0} req/s, round {}/{http_rounds}",
                    round + 1
                ));
                let mut p99 = [None; 3];
                for c in order(round, &present) {
                    let contender = all[c].as_ref().expect("present");
                    let cpu_before = contender.cpu_secs();
                    let mut result = load
                        .block_on(client::constant_rate(
                            &contender.endpoint,
                            "/small",
                            conns,
                            rate,
                            profile.http_duration,
                        ))
                        .with_context(|| CONTENDERS[c])?;
                    if result.errors > 0 {
                        bail!("{}: {} small GETs failed", CONTENDERS[c], result.errors);
                    }
                    if let Some(((u, k), (u0, k0))) = contender.cpu_secs().zip(cpu_before) {
                        let requests = result.latencies_ns.len() as f64;
                        report.record(keys.cpu, round, c, (u - u0 + k - k0) / requests * 1e6);
                    }
                    report.record(keys.p50, round, c, percentile(&mut result.latencies_ns, 0.5) / 1e6);
                    let tail = percentile(&mut result.latencies_ns, 0.99) / 1e6;
                    report.record(keys.p99, round, c, tail);
                    p99[c] = Some(tail);
                }
                if let Some(direct) = p99[DIRECT] {
                    for c in [DIRECT, ROUTER, NGINX] {
                        if let Some(v) = p99[c] {
                            report.record(keys.added, round, c, v - direct);
                        }
                    }
                }
            }
        }
    }

    // ---- WebSocket echo round trips --------------------------------------
    if phase("ws") {
        let token = token.clone();
        for (key_p50, key_p99, size, (warmup, count), name) in [
            ("ws_small_p50", "ws_small_p99", 64usize, profile.ws_small, "64 B"),
            ("ws_large_p50", "ws_large_p99", 1 << 20, profile.ws_large, "1 MiB"),
        ] {
            report.metric(
                key_p50,
                format!("WebSocket echo round trip, {name}: p50"),
                "µs",
                Better::Lower,
                true,
                Some(Target::NginxRatioAtMost(1.1)),
            );
            report.metric(key_p99, "  p99", "µs", Better::Lower, true, None);
            for round in 0..rounds {
                say(&format!("WebSocket echo {name}, round {}/{rounds}", round + 1));
                for c in order(round, &present) {
                    let contender = all[c].as_ref().expect("present");
                    let mut rtts =
                        load.block_on(ws::echo_rtt(&contender.endpoint, &cookie, &token, size, warmup, count))?;
                    report.record(key_p50, round, c, percentile(&mut rtts, 0.5) / 1e3);
                    report.record(key_p99, round, c, percentile(&mut rtts, 0.99) / 1e3);
                }
            }
        }
    }

    // ---- SSE first event ---------------------------------------------------
    if phase("sse") {
        let gap = profile.sse_gap_ms;
        report.metric(
            "sse_first_p50",
            format!("SSE first event after request (next one {gap} ms later): p50"),
            "ms",
            Better::Lower,
            true,
            None,
        );
        report.metric("sse_first_max", "  max", "ms", Better::Lower, true, None);
        for round in 0..rounds {
            say(&format!("SSE first event, round {}/{rounds}", round + 1));
            for c in order(round, &present) {
                let contender = all[c].as_ref().expect("present");
                let mut delays =
                    load.block_on(client::sse_first_event(&contender.endpoint, profile.sse_samples, gap))?;
                report.record("sse_first_p50", round, c, percentile(&mut delays, 0.5) / 1e6);
                report.record("sse_first_max", round, c, percentile(&mut delays, 1.0) / 1e6);
            }
        }
    }

    // ---- streamed upload ---------------------------------------------------
    if phase("upload") {
        let bytes = profile.upload_bytes;
        let size = if bytes >= 1 << 30 {
            format!("{} GiB", bytes >> 30)
        } else {
            format!("{} MiB", bytes >> 20)
        };
        // The target applies to the stand-in pod's own upload handler, which
        // reads and hashes every byte as a real backend does something with
        // an upload. The counting sink does nothing per byte: the copies a
        // user-space proxy adds (two per byte, on 2 shared cores) are then all
        // there is to measure, which shows the proxy's own ceiling.
        report.metric(
            "upload_hash_mib_s",
            format!("{size} streamed upload to the pod's SHA-256 sink (/upload)"),
            "MiB/s",
            Better::Higher,
            true,
            Some(Target::DirectRatioAtLeast(0.9)),
        );
        report.metric(
            "upload_mib_s",
            format!("{size} streamed upload to a byte-counting sink"),
            "MiB/s",
            Better::Higher,
            true,
            None,
        );
        report.metric(
            "upload_peak_rss",
            "  proxy peak RSS during the uploads",
            "MiB",
            Better::Lower,
            true,
            Some(Target::RouterAtMost(64.0)),
        );
        let upload_rounds = options.rounds.unwrap_or(profile.upload_rounds).max(1);
        for round in 0..upload_rounds {
            let mut peaks = [None::<f64>; 3];
            for (key, path) in [("upload_hash_mib_s", "/upload"), ("upload_mib_s", "/sink")] {
                say(&format!("upload {size} to {path}, round {}/{upload_rounds}", round + 1));
                for c in order(round, &present) {
                    let contender = all[c].as_mut().expect("present");
                    let pids = contender.pids();
                    let peak_tracked = !pids.is_empty() && pids.iter().all(|&p| sys::reset_peak(p));
                    let secs = load
                        .block_on(client::upload(&contender.endpoint, path, bytes))
                        .with_context(|| CONTENDERS[c])?;
                    report.record(key, round, c, bytes as f64 / (1 << 20) as f64 / secs);
                    if peak_tracked {
                        let peak = sys::sum_kib(&pids, "VmHWM") as f64 / 1024.0;
                        peaks[c] = Some(peaks[c].map_or(peak, |p: f64| p.max(peak)));
                    }
                    if let Some(p) = contender.process.as_mut() {
                        p.check_alive()?;
                    }
                }
            }
            for (c, peak) in peaks.iter().enumerate() {
                if let Some(peak) = peak {
                    report.record("upload_peak_rss", round, c, *peak);
                }
            }
        }
    }

    // ---- many idle WebSockets ----------------------------------------------
    if phase("idle") && idle_sockets > 0 {
        report.metric(
            "idle_ws_kib",
            format!("memory per idle WebSocket ({idle_sockets} open)"),
            "KiB",
            Better::Lower,
            true,
            Some(Target::RouterAtMost(16.0)),
        );
        report.metric(
            "idle_ws_rss",
            format!("  proxy RSS with {idle_sockets} idle WebSockets"),
            "MiB",
            Better::Lower,
            true,
            None,
        );
        for c in [ROUTER, NGINX] {
            let Some(contender) = all[c].as_ref() else {
                continue;
            };
            say(&format!("{idle_sockets} idle WebSockets through {}", CONTENDERS[c]));
            std::thread::sleep(Duration::from_secs(1));
            let before = contender.rss_kib().context("no RSS")?;
            let fds_before = contender.open_fds();
            let mut sockets = load
                .block_on(ws::open_many(&contender.endpoint, idle_sockets, 64))
                .with_context(|| CONTENDERS[c])?;
            std::thread::sleep(Duration::from_secs(2));
            let after = contender.rss_kib().context("no RSS")?;
            // Still relayed end to end: a sample of them echo.
            let step = (sockets.len() / 10).max(1);
            for socket in sockets.iter_mut().step_by(step) {
                load.block_on(ws::check_echo(socket))
                    .with_context(|| format!("idle WebSocket through {}", CONTENDERS[c]))?;
            }
            report.record("idle_ws_kib", 0, c, (after - before) / idle_sockets as f64);
            report.record("idle_ws_rss", 0, c, after / 1024.0);
            drop(sockets);
            // Every relay must end once its client is gone: the proxy's
            // descriptors come back down to where they were.
            let closing = Instant::now();
            while contender.open_fds() > fds_before + 64 {
                if closing.elapsed() > Duration::from_secs(10) {
                    bail!(
                        "{}: {} descriptors still open 10 s after closing {idle_sockets} WebSockets ({} before)",
                        CONTENDERS[c],
                        contender.open_fds(),
                        fds_before
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    // ---- micro-benchmarks ----------------------------------------------------
    if phase("micro") {
        // The target is at 100 000 users; the other sizes show the shape:
        // a hash map stays flat but for the memory hierarchy, where a scan
        // would grow tenfold per step. From 100 000 to 1 000 000 users the
        // table and its keys leave the last cache level: each lookup's few
        // memory reads go to DRAM, which measured 1.5-2.2x here, so the
        // check allows 3x (a scan: 10x).
        let sizes = [1_000usize, 10_000, 100_000, 1_000_000];
        report.metric(
            "lookup_ns",
            "session lookup of a known user (Registry::get_or_allocate), 100 000 users",
            "ns",
            Better::Lower,
            false,
            Some(Target::RouterBelow(1000.0)),
        );
        report.metric(
            "lookup_get_ns",
            "  read-only Registry::get, 100 000 users",
            "ns",
            Better::Lower,
            false,
            None,
        );
        for (key, label) in [
            ("lookup_1k_ns", "  get_or_allocate, 1 000 users"),
            ("lookup_10k_ns", "  get_or_allocate, 10 000 users"),
            ("lookup_1m_ns", "  get_or_allocate, 1 000 000 users"),
        ] {
            report.metric(key, label, "ns", Better::Lower, false, None);
        }
        report.metric(
            "lookup_growth",
            "  1 000 000 ÷ 100 000 users (O(1): flat but for the caches; a scan: 10×)",
            "×",
            Better::Lower,
            false,
            Some(Target::RouterAtMost(3.0)),
        );
        let mut at = Vec::new();
        for n in sizes {
            say(&format!("session lookup micro-benchmark, {n} users"));
            at.push(micro::session_lookup(n, profile.lookups, 5));
        }
        report.record("lookup_1k_ns", 0, ROUTER, at[0].get_or_allocate_ns);
        report.record("lookup_10k_ns", 0, ROUTER, at[1].get_or_allocate_ns);
        report.record("lookup_ns", 0, ROUTER, at[2].get_or_allocate_ns);
        report.record("lookup_get_ns", 0, ROUTER, at[2].get_ns);
        report.record("lookup_1m_ns", 0, ROUTER, at[3].get_or_allocate_ns);
        report.record(
            "lookup_growth",
            0,
            ROUTER,
            at[3].get_or_allocate_ns / at[2].get_or_allocate_ns,
        );
        say("token check micro-benchmark");
        let check = load.block_on(micro::token_check(&issuer.jwks_url, &token, profile.token_budget))?;
        report.metric(
            "token_cached_ns",
            "token check, cached",
            "ns",
            Better::Lower,
            false,
            None,
        );
        report.metric(
            "token_full_ns",
            "token check, full ES256 verification",
            "ns",
            Better::Lower,
            false,
            None,
        );
        report.metric(
            "token_speedup",
            "  full ÷ cached",
            "×",
            Better::Higher,
            false,
            Some(Target::RouterAtLeast(50.0)),
        );
        report.record("token_cached_ns", 0, ROUTER, check.cached_ns);
        report.record("token_full_ns", 0, ROUTER, check.full_ns);
        report.record("token_speedup", 0, ROUTER, check.full_ns / check.cached_ns);
    }

    for c in [ROUTER, NGINX] {
        if let Some(process) = all[c].as_mut().and_then(|c| c.process.as_mut()) {
            process.check_alive()?;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let machine_end = sys::cpu_ticks();
    let ours_used = sys::process_ticks(&ours).saturating_sub(ours_start);
    let machine_total = (machine_end.0 + machine_end.1 + machine_end.2)
        .saturating_sub(machine_start.0 + machine_start.1 + machine_start.2)
        .max(1);
    // Busy time not spent in this benchmark's processes: other work on the
    // machine (a build, a test run) that skews every figure of this run.
    let background =
        machine_end.0.saturating_sub(machine_start.0).saturating_sub(ours_used) as f64 / machine_total as f64;
    let router_final_rss = all[ROUTER].as_ref().and_then(Contender::rss_kib);
    drop(all); // stops the router and nginx
    drop(upstream_process);

    // ---- report --------------------------------------------------------------
    let machine = sys::machine();
    let nginx_version = nginx_bin
        .as_deref()
        .map(contenders::nginx_version)
        .unwrap_or_else(|| "not run".into());
    let table = report.table();
    println!(
        "\nsession-router benchmark ({mode}, {rounds} round(s), {elapsed:.0} s) on {cpu}, {cores} cores, {mem} GiB, Linux {kernel}; {nginx_version}\n",
        mode = if options.smoke { "smoke" } else { "full" },
        cpu = machine["cpu"].as_str().unwrap_or("?"),
        cores = machine["cores"],
        mem = machine["memory_gib"],
        kernel = machine["kernel"].as_str().unwrap_or("?"),
    );
    println!("{table}");
    println!(
        "other processes used {:.0}% of the machine's CPU time during the run{}",
        background * 100.0,
        if background > 0.1 {
            " — figures are skewed; run again on a quiet machine"
        } else {
            ""
        }
    );
    if let (Some(idle), Some(end)) = (router_idle_rss, router_final_rss) {
        println!(
            "router RSS: {:.1} MiB after start-up, {:.1} MiB at the end",
            idle / 1024.0,
            end / 1024.0
        );
    }
    let context = json!({
        "mode": if options.smoke { "smoke" } else { "full" },
        "rounds": rounds,
        "seconds": elapsed,
        "machine": machine,
        "nginx": nginx_version,
        "router_binary": options.router_bin.display().to_string(),
        "router_env": options.router_env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
        "http_connections": conns,
        "router_rss_start_mib": router_idle_rss.map(|k| k / 1024.0),
        "router_rss_end_mib": router_final_rss.map(|k| k / 1024.0),
        "background_cpu_share": background,
    });
    let json_path = out_dir.join(if options.smoke {
        "proxy-smoke.json"
    } else {
        "proxy.json"
    });
    std::fs::write(&json_path, serde_json::to_string_pretty(&report.json(context))?)?;
    std::fs::write(
        out_dir.join(if options.smoke { "proxy-smoke.md" } else { "proxy.md" }),
        &table,
    )?;
    println!("written: {}", json_path.display());

    // ---- the smoke gate: it runs, and the router is not grossly slower ------
    if options.smoke {
        let Some(rps) = report.get("http_rps") else {
            return Ok(true);
        };
        let (ratio, versus, floor) = match rps.to_nginx {
            Some(r) => (r, "nginx", SMOKE_FLOOR_NGINX),
            None => (rps.to_direct.unwrap_or(0.0), "direct", SMOKE_FLOOR_DIRECT),
        };
        if ratio < floor {
            eprintln!("SMOKE FAILED: router small-request throughput is {ratio:.2}× {versus} (floor {floor}×)");
            return Ok(false);
        }
        eprintln!("smoke ok: router small-request throughput {ratio:.2}× {versus} (floor {floor}×)");
    }
    Ok(true)
}
