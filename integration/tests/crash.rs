//! `kill -9` at random moments of a big scan and of a restore, many times:
//! every restart opens the store and the checks of RELIABILITY.md hold.
//! `SEED=` replays a run; `ITERATIONS=` changes how many kills.

use std::time::Duration;

use mariesync_integration::*;
use serde_json::json;

fn seed() -> u64 {
    let seed = std::env::var("SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("SEED={seed}");
    seed
}

fn iterations(default: usize) -> usize {
    std::env::var("ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

#[test]
fn kill9_during_scan_never_corrupts() {
    let mut rng = Rng::new(seed());
    let dir = temp_dir();
    let root = dir.path().join("ws");
    generate_tree(&root, 20, 2000, 3, 6 << 20);
    let expected = tree_state(&root);
    let mut device = Device::start(dir.path());
    let ws = device.add_workspace(&root, "w");
    for i in 0..iterations(15) {
        // A random moment of the scan that startup or the edit triggers.
        std::thread::sleep(Duration::from_millis(rng.below(400)));
        device.restart();
        if i % 3 == 0 {
            // Dirty some files so the next scan has work to do again.
            let files = list_files(&root);
            let path = &files[rng.below(files.len() as u64) as usize];
            let content = std::fs::read(root.join(path)).unwrap();
            std::fs::write(root.join(path), &content).unwrap();
        }
    }
    device.flush(&ws);
    assert_same_state("index after crashes", &expected, &index_state(&device, &ws));
    assert_same_state("tree after crashes", &expected, &tree_state(&root));
    device.assert_store_integrity();
    assert_no_junk(&root);
    device.kill9();
    assert!(mariesync::store::Store::check_integrity(&device.home.join("mariesync.redb")).unwrap());
}

#[test]
fn kill9_during_restore_leaves_no_torn_file() {
    let mut rng = Rng::new(seed());
    let dir = temp_dir();
    let root = dir.path().join("ws");
    generate_tree(&root, 30, 1500, 2, 4 << 20);
    let mut device = Device::start(dir.path());
    let ws = device.add_workspace(&root, "w");
    let state_a = tree_state(&root);
    device.ok("checkpoint.create", json!({"workspace": ws}));
    let files = list_files(&root);
    let mut text_rng = Rng::new(31);
    for path in files.iter().step_by(2) {
        std::fs::write(root.join(path), text(&mut text_rng, 4000)).unwrap();
    }
    std::fs::write(root.join("assets/blob0.bin"), text_rng.bytes(4 << 20)).unwrap();
    let state_b = tree_state(&root);
    device.flush(&ws);
    device.ok("checkpoint.create", json!({"workspace": ws}));

    for i in 0..iterations(10) {
        let target = if i % 2 == 0 { "1" } else { "2" };
        // Start a restore without waiting for it, then crash at a random moment.
        let mut client = device.client();
        let request = serde_json::to_vec(&json!({"jsonrpc": "2.0", "id": 1, "method": "checkpoint.restore", "params": {"workspace": ws, "checkpoint_id": target}})).unwrap();
        client.send_raw(&request).unwrap();
        std::thread::sleep(Duration::from_millis(rng.below(300)));
        device.restart();
        device.flush(&ws);
        // Each file is a complete version, never a mix; an interrupted
        // restore was finished at restart, so the tree is one state or the other.
        let tree = tree_state(&root);
        for (path, state) in &tree {
            assert!(
                state_a.get(path) == Some(state) || state_b.get(path) == Some(state),
                "iteration {i}: {path} is neither version"
            );
        }
        let digest_now = digest(&tree);
        assert!(
            digest_now == digest(&state_a) || digest_now == digest(&state_b),
            "iteration {i}: tree is a mix of both checkpoints"
        );
        assert_same_state("index matches tree", &tree, &index_state(&device, &ws));
        assert_no_junk(&root);
    }
    device.assert_store_integrity();
}

/// `kill -9` of the receiver again and again while a large workspace
/// arrives: every restart resumes where the last left off, never fetching
/// a verified, stored chunk a second time, and the end state passes the
/// checks of RELIABILITY.md.
#[test]
fn kill9_of_the_receiver_during_a_transfer_resumes() {
    let mut rng = Rng::new(seed());
    let (dir_a, dir_b) = (temp_dir(), temp_dir());
    let root_a = dir_a.path().join("ws");
    let root_b = dir_b.path().join("ws");
    generate_tree(&root_a, 90, 400, 4, 32 << 20);
    let a = Device::start(dir_a.path());
    let mut b = Device::start(dir_b.path());
    a.trust_each_other(&b);
    let ws = a.add_workspace(&root_a, "w");
    a.flush(&ws);
    let total = a.ok("store.stats", json!({}))["chunks"].as_u64().unwrap();
    a.share_with(&b, &ws, "editor", &root_b);

    let fetched = |b: &Device| {
        b.ok("store.stats", json!({}))["fetched_chunks"]
            .as_u64()
            .unwrap()
    };
    let mut kills = 0;
    let mut last = 0;
    for _ in 0..iterations(5) {
        // Kill once more chunks have arrived since the last restart, at a
        // random point of the transfer.
        let step = 1 + rng.below(total / 8);
        let now = wait_until(Duration::from_secs(120), "more chunks to arrive", || {
            let now = fetched(&b);
            (now >= (last + step).min(total)).then_some(now)
        });
        if now >= total {
            break;
        }
        b.restart();
        kills += 1;
        last = fetched(&b);
        assert!(last >= now, "stored chunks were lost: {now} -> {last}");
    }
    eprintln!("killed the receiver {kills} times during the transfer");
    assert!(
        kills >= 2,
        "the transfer ended before the receiver could be killed twice"
    );
    wait_until(Duration::from_secs(300), "the transfer to finish", || {
        (tree_state(&root_a) == tree_state(&root_b)).then_some(())
    });
    // Every chunk arrived exactly once across all the restarts.
    assert_eq!(fetched(&b), total);
    wait_until(Duration::from_secs(30), "the indexes to agree", || {
        (digest(&index_state(&a, &ws)) == digest(&index_state(&b, &ws))).then_some(())
    });
    assert_no_junk(&root_b);
    b.assert_store_integrity();
}

/// A device whose saves peers took before they were durable here (a small
/// scan's entries are served at once, made durable meanwhile) and that
/// then crashes: it loses them, and what it changes next must still reach
/// the peers. Sequence numbers and version counters a peer saw are never
/// given to another change (a peer would skip it as already had).
#[test]
fn a_crash_after_peers_took_undurable_saves_numbers_nothing_again() {
    let (dir_a, dir_b) = (temp_dir(), temp_dir());
    // Small scans are never made durable on A until it restarts.
    let mut a = Device::start_with_env(dir_a.path(), &[("MARIESYNC_FAULT_NOT_DURABLE", "1")]);
    a.pin_port();
    let b = Device::start(dir_b.path());
    a.trust_each_other(&b);
    let (ws, root_a, root_b) = a.share_generated(dir_a.path(), &b, dir_b.path(), 31, 20);
    a.flush(&ws);
    let note = root_a.join("note.txt");
    let append = |line: &str| {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&note)
            .unwrap();
        writeln!(file, "{line}").unwrap();
    };
    for i in 0..3 {
        append(&format!("taken by the peer {i}"));
        a.touched(&ws, &note, true);
    }
    assert_eq!(
        std::fs::read(&note).unwrap(),
        std::fs::read(root_b.join("note.txt")).unwrap(),
        "the peer acknowledged the saves"
    );

    a.restart_with_env(&[]);
    a.wait_connected(&b.device_id());
    b.wait_connected(&a.device_id());
    append("after the crash");
    std::fs::write(root_a.join("new.txt"), "made after the crash\n").unwrap();
    a.touched(&ws, &note, true);
    a.touched(&ws, &root_a.join("new.txt"), true);
    a.flush(&ws);
    wait_until(
        Duration::from_secs(30),
        "the peer to have every change",
        || (tree_state(&root_a) == tree_state(&root_b)).then_some(()),
    );
    wait_until(Duration::from_secs(30), "the indexes to agree", || {
        (digest(&index_state(&a, &ws)) == digest(&index_state(&b, &ws))).then_some(())
    });
    assert!(
        a.log()
            .contains("sequence numbers and version counters move"),
        "the restart found no lease: the saves were durable after all"
    );
    assert_no_junk(&root_b);
    b.assert_store_integrity();
}
