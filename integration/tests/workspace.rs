//! One device, real daemon processes, real files: the index follows the tree.

use std::time::Duration;

use mariesync_integration::*;
use serde_json::json;

/// A few thousand files; edit, add, delete, rename (files and a directory),
/// exec bit, symlink, a same-size edit with an older mtime; after `flush`
/// the index and `status` match the tree exactly.
#[test]
fn index_matches_tree_after_edits() {
    let dir = temp_dir();
    let root = dir.path().join("ws");
    generate_tree(&root, 1, 3000, 2, 3 << 20);
    let device = Device::start(dir.path());
    let ws = device.add_workspace(&root, "project");
    device.flush(&ws);
    assert_same_state(
        "initial index",
        &tree_state(&root),
        &index_state(&device, &ws),
    );

    let files = list_files(&root);
    let mut rng = Rng::new(2);
    // Metadata-only and same-size edits first, while every path still exists.
    set_executable(&root.join(&files[5]), true);
    // Same size, mtime set back to before the first scan: only ctime tells.
    let victim = root.join(&files[11]);
    let old_mtime = std::fs::metadata(&victim).unwrap().modified().unwrap();
    let len = std::fs::metadata(&victim).unwrap().len() as usize;
    std::fs::write(&victim, vec![b'x'; len]).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&victim)
        .unwrap()
        .set_modified(old_mtime - Duration::from_secs(3600))
        .unwrap();
    for path in files.iter().skip(20).step_by(50) {
        std::fs::write(root.join(path), text(&mut rng, 3000)).unwrap();
    }
    for i in 0..40 {
        std::fs::write(root.join(format!("src/new{i}.rs")), text(&mut rng, 500)).unwrap();
    }
    for path in files.iter().skip(21).step_by(97).take(30) {
        let _ = std::fs::remove_file(root.join(path));
    }
    std::fs::rename(root.join(&files[3]), root.join("src/renamed.rs")).unwrap();
    std::fs::create_dir_all(root.join("moved")).unwrap();
    let some_dir = root.join(&files[1000]).parent().unwrap().to_path_buf();
    std::fs::rename(&some_dir, root.join("moved/dir")).unwrap();
    std::os::unix::fs::symlink("../src/renamed.rs", root.join("moved/link")).unwrap();

    device.flush(&ws);
    let tree = tree_state(&root);
    assert_same_state("index after edits", &tree, &index_state(&device, &ws));

    let status = device.cli_json(&["status"]);
    let entry = &status["workspaces"][0];
    let file_count = tree.values().filter(|s| s.kind == "file").count() as u64;
    assert_eq!(entry["files"], file_count, "status: {status}");
    assert_eq!(entry["state"], "idle", "{}", device.log());
    let listed = device.cli_json(&["workspace", "list"]);
    assert_eq!(listed["workspaces"][0]["files"], file_count);
    assert_eq!(
        listed["workspaces"][0]["path"],
        std::fs::canonicalize(&root).unwrap().to_str().unwrap()
    );
    device.assert_store_integrity();
}

/// .gitignore (nested too), .mariesyncignore and VCS directories keep files
/// out of the index; un-ignoring a file brings it in.
#[test]
fn ignored_files_are_not_indexed() {
    let dir = temp_dir();
    let root = dir.path().join("ws");
    std::fs::create_dir_all(root.join("target/debug")).unwrap();
    std::fs::create_dir_all(root.join("sub/.git")).unwrap();
    std::fs::create_dir_all(root.join(".git/objects")).unwrap();
    std::fs::create_dir_all(root.join("node_modules/x")).unwrap();
    std::fs::write(root.join(".gitignore"), "target/\n*.log\n").unwrap();
    std::fs::write(root.join(".mariesyncignore"), "node_modules/\n").unwrap();
    std::fs::write(root.join("sub/.gitignore"), "secret.txt\n").unwrap();
    for file in [
        "target/debug/app",
        "a.log",
        "sub/secret.txt",
        "node_modules/x/index.js",
        ".git/objects/1",
        "sub/.git/HEAD",
        "kept.txt",
        "sub/kept.txt",
    ] {
        std::fs::write(root.join(file), file).unwrap();
    }
    let device = Device::start(dir.path());
    let ws = device.add_workspace(&root, "ignores");
    device.flush(&ws);
    let indexed: Vec<String> = index_state(&device, &ws).into_keys().collect();
    assert_eq!(
        indexed,
        vec![
            ".gitignore",
            ".mariesyncignore",
            "kept.txt",
            "sub",
            "sub/.gitignore",
            "sub/kept.txt"
        ]
    );

    // The file counts `status` shows follow, both ways (a scan that only
    // forgets newly ignored files changes the count too).
    let status_files = || device.cli_json(&["status"])["workspaces"][0]["files"].clone();
    assert_eq!(status_files(), 5);
    std::fs::write(root.join("sub/.gitignore"), "").unwrap();
    device.flush(&ws);
    assert!(index_state(&device, &ws).contains_key("sub/secret.txt"));
    assert_eq!(status_files(), 6);
    std::fs::write(root.join("sub/.gitignore"), "secret.txt\n").unwrap();
    device.flush(&ws);
    assert!(!index_state(&device, &ws).contains_key("sub/secret.txt"));
    assert_eq!(status_files(), 5);
}

/// A file saved in the IDE is indexed by the watcher alone, and at once
/// with the `touched` hint.
#[test]
fn watcher_and_touched_index_saved_files() {
    let dir = temp_dir();
    let root = dir.path().join("ws");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("a.txt"), "one").unwrap();
    let device = Device::start(dir.path());
    let ws = device.add_workspace(&root, "w");
    device.flush(&ws);

    std::fs::write(root.join("saved.txt"), "by the watcher").unwrap();
    let expected = blake3::hash(b"by the watcher").to_hex().to_string();
    wait_until(
        Duration::from_secs(10),
        "the watcher to index saved.txt",
        || {
            index_state(&device, &ws)
                .get("saved.txt")
                .filter(|s| s.hash == expected)
                .map(|_| ())
        },
    );

    std::fs::write(root.join("hinted.txt"), "by the hint").unwrap();
    let touched = device.cli_json(&["touched", "w", root.join("hinted.txt").to_str().unwrap()]);
    assert_eq!(touched, json!({}));
    assert_eq!(
        index_state(&device, &ws)["hinted.txt"].hash,
        blake3::hash(b"by the hint").to_hex().to_string()
    );

    // A path outside the workspace is refused with a clear error.
    let err = device
        .call(
            "workspace.touched",
            json!({"workspace": ws, "paths": ["/etc/passwd"]}),
        )
        .unwrap_err();
    assert!(err.to_string().contains("outside the workspace"), "{err}");
}

/// With the watcher unavailable, status says so and flush still works.
#[test]
fn degraded_watcher_is_reported() {
    let dir = temp_dir();
    let root = dir.path().join("ws");
    std::fs::create_dir_all(&root).unwrap();
    let device = Device::start_with_env(dir.path(), &[("MARIESYNC_FAULT_NO_WATCH", "1")]);
    let ws = device.add_workspace(&root, "w");
    std::fs::write(root.join("f"), "x").unwrap();
    device.flush(&ws);
    assert!(index_state(&device, &ws).contains_key("f"));
    let status = device.cli_json(&["status"]);
    assert_eq!(
        status["workspaces"][0]["watcher"]["state"], "degraded",
        "{status}"
    );
    assert!(device.log().contains("falling back to rescans"));
}

/// A workspace whose root is emptied wholesale (an unmounted disk) pauses
/// instead of recording every file as deleted; `resume` accepts it.
#[test]
fn emptied_root_pauses_instead_of_deleting() {
    let dir = temp_dir();
    let root = dir.path().join("ws");
    generate_tree(&root, 3, 50, 0, 0);
    let device = Device::start(dir.path());
    let ws = device.add_workspace(&root, "w");
    device.flush(&ws);
    let before = index_state(&device, &ws);

    // What an unmount looks like: the tree is gone at once, an empty
    // directory is left at the mount point.
    std::fs::rename(&root, dir.path().join("away")).unwrap();
    std::fs::create_dir(&root).unwrap();
    let err = device.call("flush", json!({"workspace": ws})).unwrap_err();
    assert!(err.to_string().contains("paused"), "{err}");
    assert_same_state(
        "index kept while paused",
        &before,
        &index_state(&device, &ws),
    );
    let status = device.cli_json(&["status"]);
    assert_eq!(status["workspaces"][0]["state"], "paused");

    // The disk comes back: the workspace resumes by itself and changed nothing.
    std::fs::remove_dir(&root).unwrap();
    std::fs::rename(dir.path().join("away"), &root).unwrap();
    wait_until(Duration::from_secs(30), "the workspace to resume", || {
        (device.cli_json(&["status"])["workspaces"][0]["state"] == "idle").then_some(())
    });
    assert_same_state("index after remount", &before, &index_state(&device, &ws));

    // The watcher follows the new root directory.
    std::fs::write(root.join("after-remount.txt"), "x").unwrap();
    wait_until(
        Duration::from_secs(10),
        "the watcher to see a file in the remounted root",
        || {
            index_state(&device, &ws)
                .contains_key("after-remount.txt")
                .then_some(())
        },
    );

    // Emptying it on purpose: paused, then accepted with `resume`.
    std::fs::rename(&root, dir.path().join("away2")).unwrap();
    std::fs::create_dir(&root).unwrap();
    assert!(device.call("flush", json!({"workspace": ws})).is_err());
    device.ok("workspace.resume", json!({"workspace": ws}));
    device.flush(&ws);
    assert!(index_state(&device, &ws).is_empty());
}

/// Names that differ only in case are reported; non-UTF-8 names are listed
/// as not synced; neither stops the scan.
#[test]
fn case_clashes_and_non_utf8_names_are_reported() {
    use std::os::unix::ffi::OsStrExt;
    let dir = temp_dir();
    let root = dir.path().join("ws");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("Readme.md"), "a").unwrap();
    std::fs::write(root.join("README.md"), "b").unwrap();
    std::fs::write(root.join(std::ffi::OsStr::from_bytes(b"bad\xffname")), "c").unwrap();
    std::fs::write(root.join("fine.txt"), "d").unwrap();
    let device = Device::start(dir.path());
    let ws = device.add_workspace(&root, "w");
    device.flush(&ws);
    let status = device.cli_json(&["status"]);
    let w = &status["workspaces"][0];
    assert_eq!(
        w["case_clashes"],
        json!([["README.md", "Readme.md"]]),
        "{status}"
    );
    assert!(
        w["skipped"][0].as_str().unwrap().contains("not UTF-8"),
        "{status}"
    );
    assert_eq!(index_state(&device, &ws).len(), 3);
}

/// `workspace remove` stops syncing and never deletes files.
#[test]
fn removing_a_workspace_keeps_its_files() {
    let dir = temp_dir();
    let root = dir.path().join("ws");
    generate_tree(&root, 4, 20, 0, 0);
    let before = tree_state(&root);
    let device = Device::start(dir.path());
    let ws = device.add_workspace(&root, "w");
    device.flush(&ws);
    assert_eq!(device.cli_json(&["workspace", "remove", "w"]), json!({}));
    assert_same_state("files after remove", &before, &tree_state(&root));
    assert_eq!(
        device.cli_json(&["workspace", "list"]),
        json!({"workspaces": []})
    );
    let gc = device.cli_json(&["store", "gc"]);
    assert!(gc["chunks_removed"].as_u64().unwrap() >= 20, "{gc}");
}

/// Regression: the watcher followed `link-to-src -> src` and reported every
/// edit under the link's path, which the scanner (rightly) does not follow,
/// so `flush` missed the edits.
#[test]
fn flush_sees_edits_behind_a_symlinked_directory() {
    let dir = temp_dir();
    let root = dir.path().join("ws");
    generate_tree(&root, 10, 300, 0, 0);
    let device = Device::start(dir.path());
    let ws = device.add_workspace(&root, "w");
    device.flush(&ws);
    let mut rng = Rng::new(11);
    for path in list_files(&root).iter().step_by(3) {
        std::fs::write(root.join(path), text(&mut rng, 2000)).unwrap();
    }
    device.flush(&ws);
    assert_same_state(
        "index after edits",
        &tree_state(&root),
        &index_state(&device, &ws),
    );
}

/// Regression: a paused workspace resumed by itself as soon as anything at
/// all was in its root, accepting the mass deletion; a root holding only
/// `.git` is still empty.
#[test]
fn a_root_with_only_vcs_metadata_stays_paused() {
    let dir = temp_dir();
    let root = dir.path().join("ws");
    generate_tree(&root, 3, 20, 0, 0);
    let device = Device::start(dir.path());
    let ws = device.add_workspace(&root, "w");
    device.flush(&ws);
    let before = index_state(&device, &ws);
    std::fs::rename(&root, dir.path().join("away")).unwrap();
    std::fs::create_dir_all(root.join(".git")).unwrap();
    assert!(device.call("flush", json!({"workspace": ws})).is_err());
    // Ask again until well past the automatic recheck period (2 s): the
    // workspace must stay paused and keep its index.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        assert_eq!(
            device.cli_json(&["status"])["workspaces"][0]["state"],
            "paused"
        );
        assert_same_state("index while paused", &before, &index_state(&device, &ws));
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Links are synced only when they stay inside the workspace; the others
/// are listed as not synced.
#[test]
fn symlinks_leaving_the_workspace_are_not_indexed() {
    let dir = temp_dir();
    let root = dir.path().join("ws");
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", root.join("abs")).unwrap();
    std::os::unix::fs::symlink("../../outside", root.join("sub/up")).unwrap();
    std::os::unix::fs::symlink("../inside.txt", root.join("sub/ok")).unwrap();
    std::fs::write(root.join("inside.txt"), "x").unwrap();
    let device = Device::start(dir.path());
    let ws = device.add_workspace(&root, "w");
    device.flush(&ws);
    let indexed: Vec<String> = index_state(&device, &ws).into_keys().collect();
    assert_eq!(indexed, vec!["inside.txt", "sub", "sub/ok"]);
    let status = device.cli_json(&["status"]);
    let skipped = status["workspaces"][0]["skipped"].to_string();
    assert!(
        skipped.contains("abs (link points outside") && skipped.contains("sub/up"),
        "{status}"
    );
}
