//! The little of the OS the benchmark needs: the file-descriptor limit,
//! signals to child processes, and their memory as `/proc` reports it.
//! Linux only, like the deployment target.

use std::path::Path;

#[repr(C)]
struct RLimit {
    cur: u64,
    max: u64,
}

extern "C" {
    fn getrlimit(resource: i32, rlim: *mut RLimit) -> i32;
    fn setrlimit(resource: i32, rlim: *const RLimit) -> i32;
    fn kill(pid: i32, sig: i32) -> i32;
    fn prctl(option: i32, ...) -> i32;
    fn geteuid() -> u32;
}

const RLIMIT_NOFILE: i32 = 7;
const PR_SET_PDEATHSIG: i32 = 1;
pub const SIGTERM: i32 = 15;
pub const SIGKILL: i32 = 9;

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { geteuid() == 0 }
}

/// Raises this process's open-file limit to `want` (children inherit it).
/// Root may raise the hard limit too; others get at most the hard limit.
/// Returns the soft limit in force afterwards.
pub fn raise_fd_limit(want: u64) -> u64 {
    let mut current = RLimit { cur: 0, max: 0 };
    // SAFETY: `current` is a valid, writable rlimit.
    if unsafe { getrlimit(RLIMIT_NOFILE, &mut current) } != 0 {
        return 0;
    }
    if current.cur >= want {
        return current.cur;
    }
    let raised = RLimit {
        cur: want,
        max: current.max.max(want),
    };
    // SAFETY: `raised` is a valid rlimit.
    if unsafe { setrlimit(RLIMIT_NOFILE, &raised) } == 0 {
        return want;
    }
    let capped = RLimit {
        cur: current.max,
        max: current.max,
    };
    // SAFETY: as above.
    if unsafe { setrlimit(RLIMIT_NOFILE, &capped) } == 0 {
        return current.max;
    }
    current.cur
}

pub fn signal(pid: u32, sig: i32) {
    // SAFETY: sending a signal to a process we started.
    unsafe {
        kill(pid as i32, sig);
    }
}

/// For `Command::pre_exec`: the child gets SIGTERM if the benchmark dies,
/// so no router or nginx outlives an interrupted run.
pub fn die_with_parent() -> std::io::Result<()> {
    // SAFETY: prctl(PR_SET_PDEATHSIG, sig) only sets a flag on this process.
    unsafe {
        prctl(PR_SET_PDEATHSIG, SIGTERM as std::ffi::c_ulong);
    }
    Ok(())
}

/// A `kB` field of `/proc/PID/status` (`VmRSS`, `VmHWM`), in KiB.
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

/// Resets `VmHWM` to the current RSS (`clear_refs` value 5), so the next
/// reading is the peak of what follows.
pub fn reset_peak(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// Direct children of `pid` (nginx workers under their master).
pub fn children(pid: u32) -> Vec<u32> {
    let listed = format!("/proc/{pid}/task/{pid}/children");
    if let Ok(text) = std::fs::read_to_string(&listed) {
        return text.split_whitespace().filter_map(|p| p.parse().ok()).collect();
    }
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| {
                    // pid (comm) state ppid …; comm may contain spaces.
                    let after = &stat[stat.rfind(')')? + 2..];
                    after.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

/// A process and its direct children: the whole of nginx, or the router alone.
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    all.extend(children(pid));
    all
}

/// Sum of a `/proc/PID/status` field over `pids`, in KiB.
pub fn sum_kib(pids: &[u32], field: &str) -> u64 {
    pids.iter().filter_map(|&p| status_kib(p, field)).sum()
}

/// Machine-wide CPU ticks from `/proc/stat`: (busy, idle, steal).
pub fn cpu_ticks() -> (u64, u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = text
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let get = |i: usize| fields.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal
    let idle = get(3) + get(4);
    let steal = get(7);
    let busy = get(0) + get(1) + get(2) + get(5) + get(6);
    (busy, idle, steal)
}

/// CPU ticks (user + system, USER_HZ) used so far by `pids`.
pub fn process_ticks(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let after = &stat[stat.rfind(')')? + 2..];
            let fields: Vec<&str> = after.split_whitespace().collect();
            Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
        })
        .sum()
}

/// Share of the machine's CPU time that was busy between two readings.
pub fn busy_share(before: (u64, u64, u64), after: (u64, u64, u64)) -> f64 {
    let busy = after.0.saturating_sub(before.0) as f64;
    let idle = after.1.saturating_sub(before.1) as f64;
    let steal = after.2.saturating_sub(before.2) as f64;
    busy / (busy + idle + steal).max(1.0)
}

/// One line about this machine, for the report.
pub fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    let kernel = read_trim("/proc/sys/kernel/osrelease");
    let os = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_string())
        })
        .unwrap_or_default();
    serde_json::json!({
        "cpu": cpu,
        "cores": cores,
        "memory_gib": (mem_gib * 10.0).round() / 10.0,
        "kernel": kernel,
        "os": os,
    })
}

fn read_trim(path: impl AsRef<Path>) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}
