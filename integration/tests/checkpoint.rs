//! Checkpoints: create, list, diff, restore and undo, on a real daemon.

use mariesync_integration::*;
use serde_json::json;

/// Checkpoint, change many files, restore: byte-identical to the checkpoint;
/// restore the automatic pre-restore checkpoint: identical to before.
#[test]
fn restore_round_trip_is_byte_identical() {
    let dir = temp_dir();
    let root = dir.path().join("ws");
    generate_tree(&root, 10, 1500, 1, 2 << 20);
    let device = Device::start(dir.path());
    let ws = device.add_workspace(&root, "w");
    let original = tree_state(&root);
    let created = device.cli_json(&["checkpoint", "create", "w", "-m", "original"]);
    let first = created["checkpoint_id"].as_str().unwrap().to_owned();

    let files = list_files(&root);
    let mut rng = Rng::new(11);
    for path in files.iter().step_by(3) {
        std::fs::write(root.join(path), text(&mut rng, 2000)).unwrap();
    }
    for path in files.iter().skip(1).step_by(10) {
        let _ = std::fs::remove_file(root.join(path));
    }
    std::fs::create_dir_all(root.join("fresh/deep")).unwrap();
    for i in 0..30 {
        std::fs::write(
            root.join(format!("fresh/deep/n{i}.txt")),
            text(&mut rng, 100),
        )
        .unwrap();
    }
    set_executable(&root.join(&files[2]), true);
    std::fs::remove_file(root.join("link-to-src")).unwrap();
    let changed = tree_state(&root);

    let diff = device.cli_json(&["checkpoint", "diff", "w", &first]);
    assert_eq!(diff["added"].as_array().unwrap().len(), 32, "{diff}");
    assert!(
        diff["deleted"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p == "link-to-src")
    );
    assert!(diff["modified"].as_array().unwrap().len() >= 400);

    let restored = device.cli_json(&["checkpoint", "restore", "w", &first]);
    let undo = restored["undo_checkpoint_id"].as_str().unwrap().to_owned();
    assert_eq!(restored["errors"], json!([]), "{restored}");
    assert_same_state("tree after restore", &original, &tree_state(&root));
    device.flush(&ws);
    assert_same_state("index after restore", &original, &index_state(&device, &ws));

    device.cli_json(&["checkpoint", "restore", "w", &undo]);
    assert_same_state("tree after undo", &changed, &tree_state(&root));
    assert_no_junk(&root);

    let list = device.cli_json(&["checkpoint", "list", "w"]);
    let messages: Vec<&str> = list["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["message"].as_str().unwrap())
        .collect();
    assert_eq!(
        messages,
        vec![
            "original",
            "before restoring checkpoint 1",
            "before restoring checkpoint 2"
        ]
    );
    let between = device.cli_json(&["checkpoint", "diff", "w", &first, &undo]);
    assert_eq!(between["added"].as_array().unwrap().len(), 32);
    device.assert_store_integrity();
}

/// A checkpoint of an unchanged workspace shares everything: the store does
/// not grow, and a restore to it writes nothing.
#[test]
fn unchanged_checkpoints_cost_nothing() {
    let dir = temp_dir();
    let root = dir.path().join("ws");
    generate_tree(&root, 12, 400, 0, 0);
    let device = Device::start(dir.path());
    let ws = device.add_workspace(&root, "w");
    device.flush(&ws);
    device.cli_json(&["checkpoint", "create", "w"]);
    let before = device.ok("store.stats", json!({}));
    for _ in 0..5 {
        device.cli_json(&["checkpoint", "create", "w"]);
    }
    let after = device.ok("store.stats", json!({}));
    assert_eq!(before["chunks"], after["chunks"]);
    let restored = device.ok(
        "checkpoint.restore",
        json!({"workspace": ws, "checkpoint_id": "1"}),
    );
    assert_eq!(restored["written"], 0);
    assert_eq!(restored["deleted"], 0);
}

/// A flipped byte in a stored chunk is detected on read, reported, and never
/// written into the workspace; `store verify` drops it and the next scan
/// stores the content again from the file that still has it.
#[test]
fn corrupted_chunk_is_detected_and_never_used() {
    let dir = temp_dir();
    let root = dir.path().join("ws");
    std::fs::create_dir_all(&root).unwrap();
    // Incompressible, so its bytes appear verbatim in the database file.
    let mut rng = Rng::new(99);
    let precious = rng.bytes(20_000);
    std::fs::write(root.join("precious.bin"), &precious).unwrap();
    let mut device = Device::start(dir.path());
    let ws = device.add_workspace(&root, "w");
    device.cli_json(&["checkpoint", "create", "w"]);
    std::fs::write(root.join("precious.bin"), b"overwritten").unwrap();
    device.flush(&ws);
    device.stop();

    rot_stored_chunk(&device.home, &precious);

    device.start_again();
    let err = device
        .call(
            "checkpoint.restore",
            json!({"workspace": ws, "checkpoint_id": "1"}),
        )
        .unwrap_err();
    assert!(err.to_string().contains("corrupt"), "{err}");
    match err {
        mariesync_ffi::ClientError::Rpc(rpc) => assert_eq!(rpc.code, -32020),
        other => panic!("{other}"),
    }
    assert_eq!(
        std::fs::read(root.join("precious.bin")).unwrap(),
        b"overwritten",
        "the corrupt chunk was used"
    );

    let verify = device.cli(&["store", "verify", "--json"]);
    assert_eq!(verify.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&verify.stdout).unwrap();
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(report["corrupt"].as_array().unwrap().len(), 1, "{report}");
    assert!(String::from_utf8_lossy(&verify.stderr).contains("corrupt"));

    // The content comes back when a file still has it.
    std::fs::write(root.join("copy.bin"), &precious).unwrap();
    device.flush(&ws);
    device.assert_store_integrity();
    device.ok(
        "checkpoint.restore",
        json!({"workspace": ws, "checkpoint_id": "1"}),
    );
    assert_eq!(std::fs::read(root.join("precious.bin")).unwrap(), precious);
}

/// Regression: restore wrote over a file the index did not know (here: one
/// that became ignored after the checkpoint), though ignored files are never
/// touched.
#[test]
fn restore_never_overwrites_an_unindexed_file() {
    let dir = temp_dir();
    let root = dir.path().join("ws");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("local.json"), "checkpointed").unwrap();
    std::fs::write(root.join("kept.txt"), "a").unwrap();
    let device = Device::start(dir.path());
    let ws = device.add_workspace(&root, "w");
    device.ok("checkpoint.create", json!({"workspace": ws}));
    std::fs::write(root.join(".gitignore"), "local.json\n").unwrap();
    std::fs::write(root.join("local.json"), "the user's newer, ignored edit").unwrap();
    device.flush(&ws);
    let restored = device.ok(
        "checkpoint.restore",
        json!({"workspace": ws, "checkpoint_id": "1"}),
    );
    assert_eq!(
        std::fs::read_to_string(root.join("local.json")).unwrap(),
        "the user's newer, ignored edit"
    );
    assert!(
        restored["errors"].to_string().contains("local.json"),
        "{restored}"
    );
    assert!(
        !root.join(".gitignore").exists(),
        "the rest of the restore still happened"
    );
}

/// Regression: restoring an empty checkpoint paused the workspace (the scan
/// after it saw an empty root) and left the restore intent set, so a later
/// start replayed the restore over newer work.
#[test]
fn restoring_an_empty_checkpoint_is_not_replayed() {
    let dir = temp_dir();
    let root = dir.path().join("ws");
    std::fs::create_dir_all(&root).unwrap();
    let mut device = Device::start(dir.path());
    let ws = device.add_workspace(&root, "w");
    device.ok("checkpoint.create", json!({"workspace": ws}));
    std::fs::write(root.join("a.txt"), "a").unwrap();
    device.flush(&ws);
    device.ok(
        "checkpoint.restore",
        json!({"workspace": ws, "checkpoint_id": "1"}),
    );
    assert!(!root.join("a.txt").exists());
    assert_eq!(
        device.cli_json(&["status"])["workspaces"][0]["state"],
        "idle"
    );
    std::fs::write(root.join("new-work.txt"), "precious").unwrap();
    device.flush(&ws);
    device.restart();
    device.flush(&ws);
    assert_eq!(
        std::fs::read_to_string(root.join("new-work.txt")).unwrap(),
        "precious"
    );
}
