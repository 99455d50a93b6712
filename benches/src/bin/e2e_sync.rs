//! Two devices on loopback, release daemons: initial sync of a generated
//! workspace (5,000 source files and 4 x 64 MiB binaries by default, the
//! shape of ../shared/bench), catch-up after one mutation round, and the
//! time from a save on A until B has the bytes, by the watcher alone and
//! with the `touched` hint.
//!
//! ```sh
//! cargo build --release -p mariesync   # mariesync and mariesyncd
//! cargo run --release -p mariesync-benches --bin e2e_sync -- [--files 5000] [--binaries 4] [--edits 20] [--gap-ms 300] [--dir /var/tmp] [--share-first] [--perf FILE [--perf-dwarf] [--perf-event E]]
//! ```

use std::time::{Duration, Instant};

use mariesync_benches::args::{Args, use_sibling_daemon};
use mariesync_benches::measure;
use mariesync_benches::workspace_gen::{self, Spec};
use mariesync_integration::{Device, tree_state, wait_until, wait_until_every};
use serde_json::json;

fn main() -> anyhow::Result<()> {
    let args = Args::from_env();
    let (files, binaries, edits) = (
        args.number("--files", 5000),
        args.number("--binaries", 4),
        args.number("--edits", 20),
    );
    // Between saves, as a person pauses between them (../shared/bench
    // waits 1 to 1.5 s): the last save's work is over, on both sides, and
    // idle CPUs have to wake up again.
    let gap = Duration::from_millis(args.number("--gap-ms", 300) as u64);
    use_sibling_daemon()?;

    let work = tempfile::Builder::new()
        .prefix("ms-sync-bench-")
        .tempdir_in(args.value("--dir").unwrap_or("/var/tmp"))?;
    // --keep leaves the trees and the daemons' logs for a look afterwards.
    let work_path = if args.has("--keep") {
        work.keep()
    } else {
        work.path().to_path_buf()
    };
    eprintln!("working in {}", work_path.display());
    let (dir_a, dir_b) = (work_path.join("a"), work_path.join("b"));
    std::fs::create_dir_all(&dir_a)?;
    std::fs::create_dir_all(&dir_b)?;
    let root_a = dir_a.join("ws");
    let root_b = dir_b.join("ws");
    let spec = Spec {
        files,
        text_bytes: (files as u64) * 10_700,
        binaries,
        binary_bytes: 64 << 20,
        seed: 42,
    };
    let bytes = workspace_gen::generate(&root_a, &spec, 4)?;
    std::fs::create_dir_all(&root_b)?;
    let _ = std::process::Command::new("sync").status();

    let a = Device::start(&dir_a);
    let b = Device::start(&dir_b);
    a.trust_each_other(&b);
    let expected = tree_state(&root_a);
    // --perf FILE: a CPU profile of the machine during the initial sync
    // (`perf report -i FILE`).
    let perf = args.value("--perf").map(|file| {
        std::process::Command::new("perf")
            // --perf-event EVENT: another event than CPU time (say
            // `page-faults`).
            .args([
                "record",
                "-e",
                args.value("--perf-event").unwrap_or("cpu-clock"),
            ])
            .args(["-o", file])
            // --perf-dwarf: call graphs through Rust code (no frame pointers).
            .args(if args.has("--perf-dwarf") {
                ["-F", "299", "--call-graph", "dwarf,32768"]
            } else {
                ["-F", "999", "--call-graph", "fp"]
            })
            // Both daemons and every thread, including those started after
            // perf attached (`-p` misses the workspace's and the apply
            // pool's): `perf report --sort pid,comm` tells them apart.
            .arg("-a")
            .spawn()
            .expect("perf")
    });

    // --share-first: share the workspace as soon as it is added, as
    // ../shared/bench does, so that the initial sync includes A's first
    // scan; by default A has scanned it before it is shared.
    let share_first = args.has("--share-first");
    let start = || {
        eprintln!("initial sync");
        Instant::now()
    };
    let started = share_first.then(start);
    let ws = a.add_workspace(&root_a, "bench");
    if !share_first {
        a.flush(&ws);
    }
    let cpu_b_before = measure::cpu_seconds(b.pid());
    let faults_b_before = measure::minor_faults(b.pid());

    // Initial sync: from sharing (or adding, with --share-first) until
    // B's tree is byte-identical.
    let started = started.unwrap_or_else(start);
    a.share_with(&b, &ws, "editor", &root_b);
    let want_files = expected.values().filter(|s| s.kind == "file").count() as u64;
    // B counts a file once it is in place, durable, and indexed: the time
    // it counts them all is the sync's, if the tree is then identical
    // (else the time it becomes so). Polled every 5 ms (a `status` costs
    // B a fraction of a millisecond), and B's tree is read only once it is
    // done: hashing 307 MiB to check takes a third of a second.
    let every_file = || {
        let status = b.ok("status", json!({}));
        (status["workspaces"][0]["files"].as_u64() == Some(want_files)).then_some(())
    };
    let (pause, timeout) = (Duration::from_millis(5), Duration::from_secs(600));
    wait_until_every(pause, timeout, "B to have every file", every_file);
    let mut initial = started.elapsed();
    eprintln!("B has every file");
    if tree_state(&root_b) != expected {
        wait_until(Duration::from_secs(600), "B's tree to be identical", || {
            (tree_state(&root_b) == expected).then_some(())
        });
        initial = started.elapsed();
    }
    let cpu_b_initial = measure::cpu_seconds(b.pid()) - cpu_b_before;
    let faults_b_initial = measure::minor_faults(b.pid()) - faults_b_before;
    if let Some(mut perf) = perf {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(perf.id() as i32, libc::SIGINT) };
        let _ = perf.wait();
    }

    // Catch-up: one mutation round on A, until A's flush is acknowledged.
    let listed = mariesync_integration::list_files(&root_a);
    let mut rng = mariesync_integration::Rng::new(7);
    for path in listed.iter().step_by(100).take(50) {
        let mut content = std::fs::read(root_a.join(path))?;
        content.extend_from_slice(b"\n// appended by the benchmark\n");
        std::fs::write(root_a.join(path), content)?;
    }
    for i in 0..50 {
        std::fs::write(
            root_a.join(format!("src/bench-added-{i}.rs")),
            mariesync_integration::text(&mut rng, 4000),
        )?;
    }
    for path in listed.iter().skip(7).step_by(97).take(50) {
        let _ = std::fs::remove_file(root_a.join(path));
    }
    for (i, path) in listed.iter().skip(13).step_by(89).take(20).enumerate() {
        let _ = std::fs::rename(
            root_a.join(path),
            root_a.join(format!("src/bench-renamed-{i}.rs")),
        );
    }
    let started = Instant::now();
    a.flush(&ws);
    let catch_up = started.elapsed();
    let expected = tree_state(&root_a);
    assert!(
        tree_state(&root_b) == expected,
        "B differs after the mutation round"
    );

    // Latency of one saved file: watcher only, then with the hint.
    // A source file, as an IDE saves them (not one of the binaries).
    let small = listed
        .iter()
        .find(|p| p.starts_with("src/") && root_a.join(p).exists())
        .expect("a source file");
    let target_a = root_a.join(small);
    let target_b = root_b.join(small);
    let mut watcher = Vec::new();
    let mut hinted = Vec::new();
    let mut waited = Vec::new();
    for i in 0..edits * 3 {
        a.flush(&ws);
        std::thread::sleep(gap);
        let mut content = std::fs::read(&target_a)?;
        content.extend_from_slice(format!("// edit {i}\n").as_bytes());
        let started = Instant::now();
        std::fs::write(&target_a, &content)?;
        match i % 3 {
            0 => {}
            1 => {
                a.ok(
                    "workspace.touched",
                    json!({"workspace": ws, "paths": [target_a]}),
                );
            }
            _ => {
                // The answer comes once B has it: nothing to poll.
                a.ok(
                    "workspace.touched",
                    json!({"workspace": ws, "paths": [target_a], "wait": true}),
                );
                let ms = started.elapsed().as_secs_f64() * 1000.0;
                assert!(
                    std::fs::read(&target_b)? == content,
                    "B lacks the edit when touched with wait answered"
                );
                waited.push(ms);
                continue;
            }
        }
        // Every 0.5 ms: a growing pause would round the latency up to
        // its steps (wait_until's 2, 6, 14, 30 ms made one run's p50 4.9
        // ms and the next one's 8.5).
        let (pause, timeout) = (Duration::from_micros(500), Duration::from_secs(30));
        wait_until_every(pause, timeout, "B to have the edit", || {
            (std::fs::read(&target_b).ok().as_deref() == Some(content.as_slice())).then_some(())
        });
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        if i % 3 == 1 {
            hinted.push(ms)
        } else {
            watcher.push(ms)
        }
    }
    let result = json!({
        "workspace_bytes": bytes,
        "files": want_files,
        "initial_sync_s": initial.as_secs_f64(),
        "initial_sync_mib_per_s": bytes as f64 / (1024.0 * 1024.0) / initial.as_secs_f64(),
        "receiver_cpu_s_initial": cpu_b_initial,
        "receiver_minor_faults_initial": faults_b_initial,
        "catch_up_s": catch_up.as_secs_f64(),
        "save_to_peer_watcher_ms": measure::percentiles(&watcher),
        "save_to_peer_touched_ms": measure::percentiles(&hinted),
        "save_to_peer_touched_wait_ms": measure::percentiles(&waited),
        "peak_rss_mib": {"sender": measure::rss_mib(a.pid()).1, "receiver": measure::rss_mib(b.pid()).1},
        "receiver_disk_bytes_per_workspace_byte": (measure::du(&dir_b.join("home/mariesync.redb"), false) + measure::du(&root_b, false)) as f64 / bytes as f64,
    });
    println!("{}", serde_json::to_string_pretty(&result)?);
    Ok(())
}
