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
    assert_eq!(digest(&index_state(&a, &ws)), digest(&index_state(&b, &ws)));

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
