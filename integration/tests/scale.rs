//! A `git checkout` between two branches that differ in 20,000 files,
//! with the watcher's queue overflowing: nothing is missed (an overflow
//! turns into a full rescan), `flush` answers although its cookie may be
//! among the events dropped, and the peer ends with the same tree.
//!
//! The kernel queues 16,384 events by default, and the watcher keeps up
//! here (even with 256); as root, the test shrinks the queue of A's
//! watcher to 16 events (`fs.inotify.max_queued_events` is read when a
//! watcher is created, and restored right after). Elsewhere it says loudly
//! that the overflow was not forced.

use std::path::Path;
use std::time::Duration;

use mariesync_integration::*;

/// Sets `fs.inotify.max_queued_events` for the watchers created while
/// this lives.
struct QueueLimit(Option<String>);

const QUEUE_LIMIT: &str = "/proc/sys/fs/inotify/max_queued_events";

impl QueueLimit {
    fn shrink(events: u32) -> QueueLimit {
        if !is_root() {
            return QueueLimit(None);
        }
        let old = std::fs::read_to_string(QUEUE_LIMIT).unwrap();
        std::fs::write(QUEUE_LIMIT, events.to_string()).unwrap();
        QueueLimit(Some(old))
    }
}

impl Drop for QueueLimit {
    fn drop(&mut self) {
        if let Some(old) = &self.0 {
            std::fs::write(QUEUE_LIMIT, old.trim()).unwrap();
        }
    }
}

const FILES: usize = 20_000;

/// Writes branch `branch` of the tree: `FILES` files over 200 folders,
/// each naming its branch (so every file differs between branches), and a
/// few files only this branch has.
fn check_out(root: &Path, branch: &str) {
    for dir in 0..200 {
        std::fs::create_dir_all(root.join(format!("src/m{dir}"))).unwrap();
    }
    for i in 0..FILES {
        let path = root.join(format!("src/m{}/f{i}.rs", i % 200));
        std::fs::write(&path, format!("// {branch}\npub fn f{i}() {{}}\n")).unwrap();
    }
    let other = if branch == "main" { "topic" } else { "main" };
    for i in 0..100 {
        let _ = std::fs::remove_file(root.join(format!("only-{other}-{i}.md")));
        std::fs::write(root.join(format!("only-{branch}-{i}.md")), branch).unwrap();
    }
}

#[test]
fn a_checkout_of_20000_files_at_once_misses_nothing() {
    let (dir_a, dir_b, a, b) = two_trusting_devices();
    let root_a = dir_a.path().join("ws");
    let root_b = dir_b.path().join("ws");
    check_out(&root_a, "main");
    let limit = QueueLimit::shrink(16);
    let ws = a.add_workspace(&root_a, "w");
    // Its cookie comes through the watcher: the watcher exists.
    a.flush(&ws);
    let forced = limit.0.is_some();
    drop(limit);
    if !forced {
        eprintln!("NOT FORCED: the watcher's overflow needs root to shrink the inotify queue");
    }
    a.share_with(&b, &ws, "editor", &root_b);
    a.flush(&ws);
    let synced = |what: &str| {
        wait_until(Duration::from_secs(300), what, || {
            (tree_state(&root_a) == tree_state(&root_b)).then_some(())
        })
    };
    synced("the initial sync");

    check_out(&root_a, "topic");
    // flush answers although its cookie may have been among the events
    // the kernel dropped.
    a.flush(&ws);
    synced("B to have the checkout");
    if forced {
        let log = a.log();
        assert!(log.contains("overflowed"), "no overflow in A's log:\n{log}");
    }
    let tree = tree_state(&root_b);
    assert_eq!(
        tree.keys().filter(|p| p.ends_with(".rs")).count(),
        FILES,
        "B's tree"
    );
    assert!(tree.keys().all(|p| !p.starts_with("only-main")));
    let topic = std::fs::read_to_string(root_b.join("src/m7/f7.rs")).unwrap();
    assert!(topic.starts_with("// topic"), "{topic}");
    assert_no_junk(&root_b);
    a.assert_store_integrity();
    b.assert_store_integrity();
}
