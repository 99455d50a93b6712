//! End-to-end benchmark of one device against the real `mariesync` binary:
//! cold scan of a large generated workspace, rescans, flush, RSS, store size
//! and checkpoint time.
//!
//! ```sh
//! cargo build --release -p mariesync   # mariesync and mariesyncd
//! cargo run --release -p mariesync-benches --bin e2e -- --files 100000 --bytes 1GiB
//! ```
//! Options: `--workdir DIR` (default /var/tmp/mariesync-bench; the workspace
//! is generated once per (files, bytes) and reused), `--bin PATH` (default:
//! the `mariesync` next to this binary), `--drop-caches` (root: measure the
//! cold scan with an empty page cache too).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use mariesync_benches::args::Args;
use mariesync_benches::measure;
use mariesync_benches::workspace_gen::{self, Spec};
use mariesync_ffi::{Client, HomePaths};
use serde_json::{Value, json};

struct Daemon {
    child: Child,
    paths: HomePaths,
}

impl Daemon {
    fn start(bin: &Path, home: &Path) -> anyhow::Result<Daemon> {
        let child = Command::new(bin)
            .args(["daemon", "--home"])
            .arg(home)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .context("starting the daemon")?;
        let paths = HomePaths::in_dir(home);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Client::connect(&paths).is_err() {
            if Instant::now() > deadline {
                bail!("the daemon did not start");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(Daemon { child, paths })
    }

    fn call(&self, method: &str, params: Value) -> anyhow::Result<Value> {
        Ok(Client::connect(&self.paths)?.call(method, params)?)
    }

    fn timed(&self, method: &str, params: Value) -> anyhow::Result<Duration> {
        let mut client = Client::connect(&self.paths)?;
        let started = Instant::now();
        client.call(method, params)?;
        Ok(started.elapsed())
    }

    /// (current RSS, peak RSS) in MiB.
    fn rss_mib(&self) -> (f64, f64) {
        measure::rss_mib(self.child.id())
    }

    fn cpu_seconds(&self) -> f64 {
        measure::cpu_seconds(self.child.id())
    }

    fn stop(mut self) -> anyhow::Result<()> {
        let _ = self.call("shutdown", json!({}));
        self.child.wait()?;
        Ok(())
    }
}

/// Time from a file's save to its `local_change` event: by the watcher
/// alone, and with the IDE's `touched` hint (which answers once indexed).
fn save_latencies(
    daemon: &Daemon,
    tree: &Path,
    ws: &str,
    edits: usize,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let mut events = Client::connect(&daemon.paths)?;
    events.call("events.subscribe", json!({}))?;
    let mut watcher = Vec::new();
    let mut touched = Vec::new();
    for i in 0..edits {
        let relative = format!("src/latency-{i}.rs");
        let path = tree.join(&relative);
        let started = Instant::now();
        std::fs::write(&path, format!("// edit {i}\n"))?;
        loop {
            let event = events.next_notification()?.params;
            if event["kind"] == "local_change" && event["path"] == relative.as_str() {
                break;
            }
        }
        watcher.push(started.elapsed().as_secs_f64() * 1000.0);

        let mut client = Client::connect(&daemon.paths)?;
        let started = Instant::now();
        std::fs::write(&path, format!("// edit {i} again\n"))?;
        client.call(
            "workspace.touched",
            json!({"workspace": ws, "paths": [path]}),
        )?;
        touched.push(started.elapsed().as_secs_f64() * 1000.0);
        std::fs::remove_file(&path)?;
        daemon.call("flush", json!({"workspace": ws}))?;
    }
    Ok((watcher, touched))
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn main() -> anyhow::Result<()> {
    let args = Args::from_env();
    let flag = |name: &str| args.value(name).map(str::to_owned);
    let files: usize = flag("--files")
        .map(|v| v.parse())
        .transpose()?
        .unwrap_or(100_000);
    let bytes = flag("--bytes")
        .and_then(|v| workspace_gen::parse_bytes(&v))
        .unwrap_or(1 << 30);
    let workdir =
        PathBuf::from(flag("--workdir").unwrap_or_else(|| "/var/tmp/mariesync-bench".into()));
    let bin = match flag("--bin") {
        Some(bin) => PathBuf::from(bin),
        None => std::env::current_exe()?.with_file_name("mariesync"),
    };
    mariesync_benches::args::ensure_built(&bin)
        .map_err(|e| anyhow::anyhow!("{e}, or pass --bin"))?;
    let drop_caches = args.has("--drop-caches");

    let tree = workdir.join(format!("ws-{files}-{bytes}"));
    if !tree.join(".complete").exists() {
        let _ = std::fs::remove_dir_all(&tree);
        eprintln!(
            "generating {files} files, {:.0} MiB under {} ...",
            mib(bytes),
            tree.display()
        );
        let started = Instant::now();
        workspace_gen::generate(
            &tree,
            &Spec {
                files,
                text_bytes: bytes,
                binaries: 0,
                binary_bytes: 0,
                seed: 42,
            },
            4,
        )?;
        std::fs::write(tree.join(".complete"), b"")?;
        eprintln!("generated in {:.1?}", started.elapsed());
    }
    let tree_bytes = measure::du(&tree, true);
    let home = workdir.join("home");
    let _ = std::fs::remove_dir_all(&home);
    let _ = Command::new("sync").status();
    if drop_caches {
        std::fs::write("/proc/sys/vm/drop_caches", "3").context("--drop-caches needs root")?;
    }

    let daemon = Daemon::start(&bin, &home)?;
    let started = Instant::now();
    let added = daemon.call("workspace.add", json!({"path": tree, "name": "bench"}))?;
    let ws = added["workspace_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    daemon.call("flush", json!({"workspace": ws}))?;
    let cold_scan = started.elapsed();
    let cpu_cold = daemon.cpu_seconds();
    let (_, peak_cold) = daemon.rss_mib();

    let rescan = daemon.timed("workspace.rescan", json!({"workspace": ws}))?;
    let rescan2 = daemon.timed("workspace.rescan", json!({"workspace": ws}))?;
    let flush = daemon.timed("flush", json!({"workspace": ws}))?;
    let first_checkpoint = daemon.timed("checkpoint.create", json!({"workspace": ws}))?;
    let unchanged_checkpoint = daemon.timed("checkpoint.create", json!({"workspace": ws}))?;
    let status = daemon.call("status", json!({}))?;
    let indexed_files = status["workspaces"][0]["files"].as_u64().unwrap_or(0);
    let (rss_idle, peak) = daemon.rss_mib();
    let stats = daemon.call("store.stats", json!({}))?;
    // What the database occupies on disk (redb grows its file in steps; the
    // unwritten tail is sparse).
    let database_bytes = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(home.join("mariesync.redb"))
            .map(|m| m.blocks() * 512)
            .unwrap_or(0)
    };

    let (watcher_ms, touched_ms) = save_latencies(&daemon, &tree, &ws, 30)?;

    // One file edited: flush until it is indexed.
    let edited = tree.join("src/edited-by-bench.rs");
    std::fs::write(&edited, format!("// {:?}\n", Instant::now()))?;
    let edit_flush = daemon.timed("flush", json!({"workspace": ws}))?;
    std::fs::remove_file(&edited)?;
    daemon.call("flush", json!({"workspace": ws}))?;
    daemon.stop()?;

    let result = json!({
        "files": indexed_files,
        "workspace_bytes": tree_bytes,
        "cold_scan_s": cold_scan.as_secs_f64(),
        "cold_scan_mib_per_s": mib(tree_bytes) / cold_scan.as_secs_f64(),
        "cold_scan_cpu_s": cpu_cold,
        "rescan_unchanged_s": [rescan.as_secs_f64(), rescan2.as_secs_f64()],
        "flush_unchanged_ms": flush.as_secs_f64() * 1000.0,
        "flush_one_edit_ms": edit_flush.as_secs_f64() * 1000.0,
        "checkpoint_first_ms": first_checkpoint.as_secs_f64() * 1000.0,
        "checkpoint_unchanged_ms": unchanged_checkpoint.as_secs_f64() * 1000.0,
        "save_to_indexed_watcher_ms": measure::percentiles(&watcher_ms),
        "save_to_indexed_touched_ms": measure::percentiles(&touched_ms),
        "rss_idle_mib": rss_idle,
        "rss_peak_mib": peak,
        "rss_peak_cold_scan_mib": peak_cold,
        "stored_bytes": stats["stored_bytes"],
        "database_disk_bytes": database_bytes,
        "database_file_length": stats["database_bytes"],
        "database_breakdown": {
            "stored": stats["database_stored_bytes"],
            "metadata": stats["database_metadata_bytes"],
            "fragmented": stats["database_fragmented_bytes"],
        },
        "store_percent_of_workspace": 100.0 * database_bytes as f64 / tree_bytes.max(1) as f64,
    });
    println!("{}", serde_json::to_string_pretty(&result)?);
    Ok(())
}
