//! Settings sync, measured: the time from `settings.set` on one device to
//! the `settings_changed` event on another (two release daemons on
//! loopback, one IPC client each, many changes one after another), and a
//! settings document after 10,000 changes: its size stored incrementally
//! and compacted, the time to load it, and a daemon's start with it.
//!
//! ```sh
//! cargo build --release -p mariesync   # mariesync and mariesyncd
//! cargo run --release -p mariesync-benches --bin settings_sync -- [--changes 1000] [--history 10000]
//! ```

use std::time::Instant;

use mariesync::settings::doc::{Doc, DocKind, Edit, SETTINGS};
use mariesync_benches::args::{Args, use_sibling_daemon};
use mariesync_benches::measure;
use mariesync_integration::{Device, next_event};
use serde_json::json;

fn main() -> anyhow::Result<()> {
    let args = Args::from_env();
    let (changes, history) = (
        args.number("--changes", 1000),
        args.number("--history", 10_000),
    );
    use_sibling_daemon()?;

    // -- A document after `history` changes, in process.
    let keys = 200;
    let mut doc = Doc::new(DocKind::Settings, [1; 16]);
    let mut incremental = doc.save_incremental().len();
    let started = Instant::now();
    for i in 0..history {
        let edit = Edit::Put {
            section: SETTINGS,
            key: format!("default:key.{}", i % keys),
            value: json!(i),
        };
        doc.change(&[edit], "bench-device", "set", i as u64);
        incremental += doc.save_incremental().len();
    }
    let change_ms = started.elapsed().as_secs_f64() * 1000.0 / history as f64;
    let compacted = doc.save();
    let started = Instant::now();
    let loaded = Doc::load(DocKind::Settings, [1; 16], std::slice::from_ref(&compacted))?;
    let load_ms = started.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(loaded.section_entries(SETTINGS).len(), keys);

    // -- Live: set on a, event on b.
    let work = tempfile::Builder::new()
        .prefix("ms-settings-bench-")
        .tempdir_in("/var/tmp")?;
    let (dir_a, dir_b) = (work.path().join("a"), work.path().join("b"));
    let mut a = Device::start(&dir_a);
    let b = Device::start(&dir_b);
    a.link(&b);
    let mut on_b = b.subscribe();
    let mut client_a = a.client();
    let mut samples = Vec::with_capacity(changes);
    for i in 0..changes {
        let key = format!("bench.key{}", i % 50);
        let started = Instant::now();
        client_a.call("settings.set", json!({"key": key, "value": i}))?;
        next_event(&mut on_b, |e| {
            e["kind"] == "settings_changed" && e["keys"] == json!([key])
        });
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    let live = measure::percentiles(&samples);

    // -- A daemon with `history` changes: stored size and start time.
    for i in 0..history.saturating_sub(changes) {
        client_a.call(
            "settings.set",
            json!({"key": format!("bench.key{}", i % 50), "value": i}),
        )?;
    }
    drop(client_a);
    a.stop();
    let database = measure::du(&dir_a.join("home"), true);
    let started = Instant::now();
    a.start_again();
    let restart_ms = started.elapsed().as_secs_f64() * 1000.0;
    let total = a.ok("settings.history", json!({"limit": 1}))["total"].clone();

    println!(
        "{}",
        serde_json::to_string_pretty(&json!({
            "set_to_event_on_peer_ms": live,
            "document": {
                "changes": history,
                "keys": keys,
                "change_ms": change_ms,
                "incremental_bytes": incremental,
                "compacted_bytes": compacted.len(),
                "load_ms": load_ms,
            },
            "daemon": {
                "changes_in_history": total,
                "home_bytes": database,
                "start_ms": restart_ms,
            },
        }))?
    );
    Ok(())
}
