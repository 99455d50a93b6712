//! Two devices replicate a workspace over libp2p on loopback.

use std::time::Duration;

use mariesync_integration::*;
use serde_json::json;

fn pair() -> (tempfile::TempDir, tempfile::TempDir, Device, Device) {
    let (dir_a, dir_b) = (temp_dir(), temp_dir());
    let a = Device::start(dir_a.path());
    let b = Device::start(dir_b.path());
    let (id_a, id_b) = (a.device_id(), b.device_id());
    a.cli_json(&["peer", "add", &id_b]);
    b.cli_json(&["peer", "add", &id_a, "--addr", &a.listen_addr()]);
    a.wait_connected(&id_b);
    b.wait_connected(&id_a);
    (dir_a, dir_b, a, b)
}

fn wait_same(what: &str, a: &std::path::Path, b: &std::path::Path) {
    wait_until(Duration::from_secs(60), what, || {
        (tree_state(a) == tree_state(b)).then_some(())
    });
}

#[test]
fn two_devices_converge_through_edits_on_both_sides() {
    let (dir_a, dir_b, a, b) = pair();
    let root_a = dir_a.path().join("ws");
    let root_b = dir_b.path().join("ws");
    generate_tree(&root_a, 40, 600, 2, 3 << 20);
    std::fs::create_dir_all(&root_b).unwrap();
    let ws = a.add_workspace(&root_a, "w");
    a.flush(&ws);
    b.ok(
        "workspace.add",
        json!({"path": root_b, "name": "w", "id": ws}),
    );
    wait_same("the initial sync", &root_a, &root_b);
    // Files land before the entries that record them commit: the index
    // follows within the same apply.
    wait_until(Duration::from_secs(30), "the indexes to agree", || {
        (digest(&index_state(&a, &ws)) == digest(&index_state(&b, &ws))).then_some(())
    });

    // Edits, adds, deletes and a rename on A: flush returns once B has them.
    let files = list_files(&root_a);
    let mut rng = Rng::new(41);
    for path in files.iter().step_by(37) {
        std::fs::write(root_a.join(path), text(&mut rng, 900)).unwrap();
    }
    std::fs::write(root_a.join("src/added-on-a.rs"), "fn a() {}\n").unwrap();
    std::fs::remove_file(root_a.join(&files[5])).unwrap();
    std::fs::rename(root_a.join(&files[6]), root_a.join("src/renamed-on-a.rs")).unwrap();
    a.flush(&ws);
    assert_same_state(
        "B after A's edits",
        &tree_state(&root_a),
        &tree_state(&root_b),
    );

    // And the other way.
    std::fs::write(root_b.join("src/added-on-b.rs"), "fn b() {}\n").unwrap();
    std::fs::remove_file(root_b.join(&files[9])).unwrap();
    set_executable(&root_b.join(&files[10]), true);
    b.flush(&ws);
    assert_same_state(
        "A after B's edits",
        &tree_state(&root_b),
        &tree_state(&root_a),
    );
    assert_no_junk(&root_a);
    assert_no_junk(&root_b);
    a.assert_store_integrity();
    b.assert_store_integrity();
}

/// A device that was offline catches up from where it left off.
#[test]
fn an_offline_device_catches_up() {
    let (dir_a, dir_b, a, mut b) = pair();
    let root_a = dir_a.path().join("ws");
    let root_b = dir_b.path().join("ws");
    generate_tree(&root_a, 50, 200, 0, 0);
    std::fs::create_dir_all(&root_b).unwrap();
    let ws = a.add_workspace(&root_a, "w");
    b.ok(
        "workspace.add",
        json!({"path": root_b, "name": "w", "id": ws}),
    );
    wait_same("the initial sync", &root_a, &root_b);
    b.stop();
    let mut rng = Rng::new(51);
    for path in list_files(&root_a).iter().step_by(11) {
        std::fs::write(root_a.join(path), text(&mut rng, 700)).unwrap();
    }
    a.flush(&ws);
    b.start_again();
    wait_same("b to catch up", &root_a, &root_b);
}

/// Concurrent edits of one file on two partitioned devices: after the
/// partition heals both versions exist on both devices under the same
/// names; an edit concurrent with a delete keeps the edit.
#[test]
fn concurrent_edits_become_identical_conflict_copies() {
    let (dir_a, dir_b, a, b) = pair();
    let root_a = dir_a.path().join("ws");
    let root_b = dir_b.path().join("ws");
    std::fs::create_dir_all(root_a.join("src")).unwrap();
    std::fs::write(root_a.join("src/shared.rs"), "original\n").unwrap();
    std::fs::write(root_a.join("notes.md"), "original notes\n").unwrap();
    std::fs::create_dir_all(&root_b).unwrap();
    let ws = a.add_workspace(&root_a, "w");
    b.ok(
        "workspace.add",
        json!({"path": root_b, "name": "w", "id": ws}),
    );
    wait_same("the initial sync", &root_a, &root_b);
    let (id_a, id_b) = (a.device_id(), b.device_id());

    // Partition: each forgets the other.
    a.cli_json(&["peer", "remove", &id_b]);
    b.cli_json(&["peer", "remove", &id_a]);
    wait_until(Duration::from_secs(30), "the partition", || {
        (a.cli_json(&["status"])["peers"] == json!([]) && b.peer(&id_a).is_none()).then_some(())
    });
    std::fs::write(root_a.join("src/shared.rs"), "edited on a\n").unwrap();
    std::fs::write(
        root_b.join("src/shared.rs"),
        "edited on b, later and longer\n",
    )
    .unwrap();
    std::fs::write(root_a.join("notes.md"), "notes edited on a\n").unwrap();
    std::fs::remove_file(root_b.join("notes.md")).unwrap();
    a.flush(&ws);
    b.flush(&ws);

    // Heal.
    a.cli_json(&["peer", "add", &id_b]);
    b.cli_json(&["peer", "add", &id_a, "--addr", &a.listen_addr()]);
    wait_same("convergence after the partition", &root_a, &root_b);
    a.flush(&ws);
    b.flush(&ws);
    wait_same("convergence after the partition", &root_a, &root_b);

    let tree = tree_state(&root_a);
    let conflicts: Vec<&String> = tree
        .keys()
        .filter(|p| p.contains(".sync-conflict-"))
        .collect();
    assert_eq!(conflicts.len(), 1, "{:?}", tree.keys().collect::<Vec<_>>());
    let copy = conflicts[0];
    assert!(
        copy.starts_with("src/shared.sync-conflict-") && copy.ends_with(".rs"),
        "{copy}"
    );
    let winner = std::fs::read_to_string(root_a.join("src/shared.rs")).unwrap();
    let loser = std::fs::read_to_string(root_a.join(copy)).unwrap();
    let mut both = [winner, loser];
    both.sort();
    assert_eq!(
        both,
        [
            "edited on a\n".to_string(),
            "edited on b, later and longer\n".to_string()
        ]
    );
    // The edit beat the delete.
    assert_eq!(
        std::fs::read_to_string(root_b.join("notes.md")).unwrap(),
        "notes edited on a\n"
    );
    let listed = a.cli_json(&["conflicts", "w"]);
    assert_eq!(listed["conflicts"][0]["path"], "src/shared.rs");
    assert_eq!(listed["conflicts"][0]["conflict_path"], copy.as_str());
    assert_eq!(b.cli_json(&["conflicts", "w"]), listed);
}

/// A chain A - B - C (A and C do not know each other): changes on either
/// end reach the other through B; C, offline meanwhile, catches up.
/// Regression: B announced entries it received before committing them, so
/// C pulled too early, got nothing, and was never told again.
#[test]
fn three_devices_in_a_chain_converge() {
    let dirs = [temp_dir(), temp_dir(), temp_dir()];
    let a = Device::start(dirs[0].path());
    let b = Device::start(dirs[1].path());
    let mut c = Device::start(dirs[2].path());
    let (id_a, id_b, id_c) = (a.device_id(), b.device_id(), c.device_id());
    a.cli_json(&["peer", "add", &id_b]);
    // C knows where B is, so it can call B again after its restart.
    c.cli_json(&["peer", "add", &id_b, "--addr", &b.listen_addr()]);
    b.cli_json(&["peer", "add", &id_a, "--addr", &a.listen_addr()]);
    b.cli_json(&["peer", "add", &id_c, "--addr", &c.listen_addr()]);
    a.wait_connected(&id_b);
    c.wait_connected(&id_b);
    let roots: Vec<_> = dirs.iter().map(|d| d.path().join("ws")).collect();
    generate_tree(&roots[0], 70, 150, 0, 0);
    std::fs::create_dir_all(&roots[1]).unwrap();
    std::fs::create_dir_all(&roots[2]).unwrap();
    let ws = a.add_workspace(&roots[0], "w");
    b.ok(
        "workspace.add",
        json!({"path": roots[1], "name": "w", "id": ws}),
    );
    c.ok(
        "workspace.add",
        json!({"path": roots[2], "name": "w", "id": ws}),
    );
    wait_same("C to get A's files through B", &roots[0], &roots[2]);

    std::fs::write(roots[2].join("src/from-c.rs"), "fn c() {}\n").unwrap();
    wait_same("A to get C's file through B", &roots[2], &roots[0]);

    // C goes offline; A and B keep changing things; C returns and catches up.
    c.stop();
    std::fs::write(roots[0].join("src/from-a-while-c-away.rs"), "fn a() {}\n").unwrap();
    std::fs::remove_file(roots[1].join("src/from-c.rs")).unwrap();
    a.flush(&ws);
    b.flush(&ws);
    wait_same("A and B to agree", &roots[0], &roots[1]);
    c.start_again();
    wait_same("C to catch up", &roots[0], &roots[2]);
    assert!(!roots[2].join("src/from-c.rs").exists());
}
