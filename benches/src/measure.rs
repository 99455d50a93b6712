//! Measurements shared by the end-to-end benchmarks: latency percentiles and
//! a process's CPU time and peak memory from /proc.

use serde_json::{Value, json};

/// USER_HZ, which Linux fixes at 100 for /proc.
const CLOCK_TICKS_PER_SECOND: f64 = 100.0;

/// p50, p99 and max of the samples, with their count.
pub fn percentiles(samples: &[f64]) -> Value {
    let mut sorted = samples.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| {
        sorted
            .get(((sorted.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    json!({"p50": at(0.5), "p99": at(0.99), "max": at(1.0), "samples": sorted.len()})
}

/// User plus system CPU seconds of a process so far.
pub fn cpu_seconds(pid: u32) -> f64 {
    let ticks: f64 = stat_fields(pid, 11..13).iter().sum();
    ticks / CLOCK_TICKS_PER_SECOND
}

/// Minor page faults of a process so far (each a page the kernel had to
/// find and map: memory given back to the system and touched again).
pub fn minor_faults(pid: u32) -> u64 {
    stat_fields(pid, 7..8).first().copied().unwrap_or(0.0) as u64
}

/// Fields of `/proc/PID/stat` after the command name (index 0 is the
/// state), as numbers.
fn stat_fields(pid: u32, range: std::ops::Range<usize>) -> Vec<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    fields
        .get(range)
        .map(|f| f.iter().filter_map(|v| v.parse::<f64>().ok()).collect())
        .unwrap_or_default()
}

/// (current RSS, peak RSS) of a process in MiB.
pub fn rss_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map(|kib| kib / 1024.0)
            .unwrap_or(0.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Bytes under `path` as `du` counts them: the files' apparent sizes, or the
/// blocks allocated on disk (what the disk really pays, sparse tails aside).
pub fn du(path: &std::path::Path, apparent: bool) -> u64 {
    let flags: &[&str] = if apparent { &["-sb"] } else { &["-s", "-B1"] };
    std::process::Command::new("du")
        .args(flags)
        .arg(path)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}
