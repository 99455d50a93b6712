//! Full disks: a receiver whose workspace disk fills up keeps its old
//! files intact, says so, and syncs once there is room again. Needs root
//! to mount a small tmpfs (CI runs as root); elsewhere it says loudly that
//! it was skipped.

use std::time::Duration;

use mariesync_integration::*;
use serde_json::{Value, json};

fn not_applied(device: &Device) -> Vec<Value> {
    device.ok("status", json!({}))["workspaces"][0]["not_applied"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn a_full_workspace_disk_keeps_the_old_file_and_syncs_once_there_is_room() {
    if !is_root() {
        eprintln!(
            "SKIPPED a_full_workspace_disk_keeps_the_old_file_and_syncs_once_there_is_room: needs root to mount a small tmpfs"
        );
        return;
    }
    let (dir_a, dir_b) = (temp_dir(), temp_dir());
    let (root_a, root_b) = (dir_a.path().join("ws"), dir_b.path().join("ws"));
    let disk = SmallDisk::mount(&root_b, "1m");
    let mut a = Device::start(dir_a.path());
    let mut b = Device::start(dir_b.path());
    a.trust_each_other(&b);
    std::fs::create_dir_all(&root_a).unwrap();
    std::fs::write(root_a.join("keep.txt"), "the old version\n").unwrap();
    std::fs::write(root_a.join("small.txt"), "small\n").unwrap();
    let ws = a.add_workspace(&root_a, "w");
    a.share_with(&b, &ws, "editor", &root_b);
    wait_until(Duration::from_secs(30), "the initial sync", || {
        (tree_state(&root_a) == tree_state(&root_b)).then_some(())
    });
    let mut events = b.subscribe();

    // A new version bigger than B's disk: it cannot be written there.
    let big = Rng::new(5).bytes(3 << 20);

    std::fs::write(root_a.join("keep.txt"), &big).unwrap();
    a.ok(
        "workspace.touched",
        json!({"workspace": ws, "paths": [root_a.join("keep.txt")]}),
    );
    let event = next_event(&mut events, |e| {
        e["kind"] == "error" && e["path"] == "keep.txt"
    });
    assert!(
        event["message"].as_str().unwrap().contains("No space left"),
        "{event}"
    );
    let listed = wait_until(Duration::from_secs(30), "B to list keep.txt", || {
        let listed = not_applied(&b);
        (!listed.is_empty()).then_some(listed)
    });
    assert_eq!(listed[0]["path"], "keep.txt");
    // The old file is intact, no temporary file is left, and the other
    // changes still arrive.
    assert_eq!(
        std::fs::read_to_string(root_b.join("keep.txt")).unwrap(),
        "the old version\n"
    );
    assert_no_junk(&root_b);
    std::fs::write(root_a.join("small.txt"), "small, edited\n").unwrap();
    a.ok(
        "workspace.touched",
        json!({"workspace": ws, "paths": [root_a.join("small.txt")]}),
    );
    wait_until(Duration::from_secs(60), "small.txt on B", || {
        (std::fs::read_to_string(root_b.join("small.txt"))
            .ok()?
            .as_str()
            == "small, edited\n")
            .then_some(())
    });

    // Room again: the new version arrives, and the error is gone.
    disk.resize("16m");
    wait_until(Duration::from_secs(90), "keep.txt on B", || {
        (std::fs::read(root_b.join("keep.txt")).ok()? == big).then_some(())
    });
    wait_until(Duration::from_secs(10), "B's list to clear", || {
        not_applied(&b).is_empty().then_some(())
    });
    assert_same_state("B", &tree_state(&root_a), &tree_state(&root_b));
    assert_no_junk(&root_b);
    b.assert_store_integrity();
    b.stop();
    a.stop();
}
