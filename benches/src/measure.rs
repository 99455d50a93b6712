//! Measurements shared by the end-to-end benchmarks: latency percentiles and
//! a process's CPU time and peak memory from /proc.

use mariesync_integration::proc_stats;
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
    proc_stats::cpu_ticks(pid).unwrap_or(0) as f64 / CLOCK_TICKS_PER_SECOND
}

/// Minor page faults of a process so far.
pub fn minor_faults(pid: u32) -> u64 {
    proc_stats::minor_faults(pid).unwrap_or(0)
}

/// (current RSS, peak RSS) of a process in MiB.
pub fn rss_mib(pid: u32) -> (f64, f64) {
    let mib = |name| proc_stats::status_kib(pid, name).unwrap_or(0) as f64 / 1024.0;
    (mib("VmRSS"), mib("VmHWM"))
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
