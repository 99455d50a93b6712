//! Two devices replicate a workspace over libp2p on loopback.

use std::time::Duration;

use mariesync_integration::*;
use serde_json::json;

/// A partition: each device forgets the other (`trust_each_other` heals).
fn partition(a: &Device, b: &Device) {
    let (id_a, id_b) = (a.device_id(), b.device_id());
    a.cli_json(&["peer", "remove", &id_b]);
    b.cli_json(&["peer", "remove", &id_a]);
    wait_until(Duration::from_secs(30), "the partition", || {
        (a.cli_json(&["status"])["peers"] == json!([]) && b.peer(&id_a).is_none()).then_some(())
    });
}

fn wait_same(what: &str, a: &std::path::Path, b: &std::path::Path) {
    wait_until(Duration::from_secs(60), what, || {
        (tree_state(a) == tree_state(b)).then_some(())
    });
}

#[test]
fn two_devices_converge_through_edits_on_both_sides() {
    let (dir_a, dir_b, a, b) = two_trusting_devices();
    let root_a = dir_a.path().join("ws");
    let root_b = dir_b.path().join("ws");
    generate_tree(&root_a, 40, 2500, 2, 52 << 20);
    std::fs::create_dir_all(&root_b).unwrap();
    let ws = a.add_workspace(&root_a, "w");
    a.flush(&ws);
    a.share_with(&b, &ws, "editor", &root_b);
    // B says it is syncing, and how far along, until it is done.
    let mut seen = Vec::new();
    wait_until(Duration::from_secs(60), "the initial sync", || {
        let status = b.ok("status", json!({}));
        let w = &status["workspaces"][0];
        if w["state"] == "syncing" {
            seen.push(w["progress"].clone());
        }
        (tree_state(&root_a) == tree_state(&root_b)).then_some(())
    });
    assert!(!seen.is_empty(), "B never said it was syncing");
    let a_id = a.device_id();
    for pair in seen.windows(2) {
        let (before, after) = (&pair[0], &pair[1]);
        assert!(
            after["changes_done"].as_u64() >= before["changes_done"].as_u64(),
            "{seen:?}"
        );
        assert!(
            after["bytes_received"].as_u64() >= before["bytes_received"].as_u64(),
            "{seen:?}"
        );
    }
    for p in &seen {
        assert!(
            p["changes_done"].as_u64() <= p["changes_total"].as_u64(),
            "{p}"
        );
        assert!(p["changes_total"].as_u64() > Some(0), "{p}");
        assert_eq!(p["peers"], json!([a_id]), "{p}");
    }
    wait_until(Duration::from_secs(30), "B to be idle", || {
        let status = b.ok("status", json!({}));
        let w = &status["workspaces"][0];
        (w["state"] == "idle" && w.get("progress").is_none()).then_some(())
    });
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
    let (dir_a, dir_b, a, mut b) = two_trusting_devices();
    let (ws, root_a, root_b) = a.share_generated(dir_a.path(), &b, dir_b.path(), 50, 200);
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

/// `touched --wait` answers once connected peers have the saved files: no
/// polling needed. Plain `touched` answers once the file is indexed here.
#[test]
fn touched_with_wait_answers_once_the_peer_has_the_file() {
    let (dir_a, dir_b, a, b) = two_trusting_devices();
    let (ws, root_a, root_b) = a.share_generated(dir_a.path(), &b, dir_b.path(), 60, 30);
    wait_same("the initial sync", &root_a, &root_b);
    for i in 0..5 {
        let saved = root_a.join(format!("saved-{i}.txt"));
        let content = format!("saved {i}\n").repeat(100 * (i + 1));
        std::fs::write(&saved, &content).unwrap();
        let answer = a.cli_json(&["touched", "--wait", "w", saved.to_str().unwrap()]);
        assert_eq!(answer, json!({}));
        assert_eq!(
            std::fs::read_to_string(root_b.join(format!("saved-{i}.txt"))).ok(),
            Some(content),
            "B has saved-{i}.txt when touched --wait answers"
        );
    }
    // Also through IPC, for an edit of an existing file.
    let edited = list_files(&root_a)[3].clone();
    std::fs::write(root_a.join(&edited), "edited\n").unwrap();
    a.touched(&ws, &root_a.join(&edited), true);
    assert_eq!(
        std::fs::read_to_string(root_b.join(&edited)).unwrap(),
        "edited\n"
    );
    assert_same_state("B", &tree_state(&root_a), &tree_state(&root_b));
}

/// Files a peer saved a moment ago are not read again by the receiver's
/// next scans: the stat cached when they were written stands for them, as
/// its ctime (our rename) is past the mtime the peer gave them. Without it
/// every received file was hashed again, 64 MiB binaries included.
#[test]
fn files_received_are_not_read_again_by_the_receivers_scans() {
    let (dir_a, dir_b, a, b) = two_trusting_devices();
    let (ws, root_a, root_b) = a.share_generated(dir_a.path(), &b, dir_b.path(), 61, 200);
    std::fs::write(root_a.join("fresh.bin"), vec![7u8; 9 << 20]).unwrap();
    a.touched(&ws, &root_a.join("fresh.bin"), true);
    wait_same("the initial sync", &root_a, &root_b);
    let mut events = b.subscribe();
    b.ok("workspace.rescan", json!({"workspace": ws}));
    let finished = next_event(&mut events, |e| {
        e["kind"] == "scan_finished" && e["workspace_id"] == ws.as_str()
    });
    assert_eq!(finished["hashed_files"], 0, "{finished}");
    // A local edit on B after that is still seen.
    let edited = list_files(&root_b)[5].clone();
    let before = std::fs::read(root_b.join(&edited)).unwrap();
    let mut after = before.clone();
    after[0] ^= 1;
    std::fs::write(root_b.join(&edited), &after).unwrap();
    b.flush(&ws);
    wait_until(Duration::from_secs(30), "B's edit to reach A", || {
        (std::fs::read(root_a.join(&edited)).ok() == Some(after.clone())).then_some(())
    });
}

/// A chunk that rotted in the sender's store is never served: the sender
/// drops it, reads the file that still has the content again, and the
/// receiver, which asks again, gets the right bytes.
#[test]
fn a_chunk_rotten_in_the_senders_store_is_never_served_and_heals() {
    let (dir_a, dir_b) = (temp_dir(), temp_dir());
    let root_a = dir_a.path().join("ws");
    let root_b = dir_b.path().join("ws");
    std::fs::create_dir_all(&root_a).unwrap();
    std::fs::create_dir_all(&root_b).unwrap();
    // Incompressible, so its bytes appear verbatim in the database file.
    let precious = Rng::new(7).bytes(20_000);
    std::fs::write(root_a.join("precious.bin"), &precious).unwrap();
    std::fs::write(root_a.join("plain.txt"), "plain\n").unwrap();
    let mut a = Device::start(dir_a.path());
    let ws = a.add_workspace(&root_a, "w");
    a.flush(&ws);
    a.stop();
    rot_stored_chunk(&a.home, &precious);
    a.start_again();

    let b = Device::start(dir_b.path());
    a.trust_each_other(&b);
    a.share_with(&b, &ws, "editor", &root_b);
    wait_same("B to have the right bytes", &root_a, &root_b);
    let log = a.log();
    assert!(log.contains("not serving chunk"), "{log}");
    assert!(log.contains("corrupt chunk"), "{log}");
    assert_eq!(
        std::fs::read(root_b.join("precious.bin")).unwrap(),
        precious
    );
    a.assert_store_integrity();
    b.assert_store_integrity();
    assert_eq!(a.ok("store.verify", json!({}))["ok"], true);
}

/// A chunk that rotted in the receiver's own store, needed by a peer's new
/// file (a copy of one it has): the corrupt copy is never written, it is
/// dropped and fetched again, and the copy arrives with the right bytes.
#[test]
fn a_chunk_rotten_in_the_receivers_store_is_fetched_again() {
    let (dir_a, dir_b, a, mut b) = two_trusting_devices();
    let root_a = dir_a.path().join("ws");
    let root_b = dir_b.path().join("ws");
    std::fs::create_dir_all(&root_a).unwrap();
    let precious = Rng::new(8).bytes(20_000);
    std::fs::write(root_a.join("precious.bin"), &precious).unwrap();
    let ws = a.add_workspace(&root_a, "w");
    a.share_with(&b, &ws, "editor", &root_b);
    wait_same("the initial sync", &root_a, &root_b);
    b.stop();
    rot_stored_chunk(&b.home, &precious);
    b.start_again();

    std::fs::write(root_a.join("copy.bin"), &precious).unwrap();
    a.flush(&ws);
    wait_same("B to have the copy", &root_a, &root_b);
    assert_eq!(std::fs::read(root_b.join("copy.bin")).unwrap(), precious);
    let log = b.log();
    assert!(log.contains("corrupt chunk"), "{log}");
    assert_no_junk(&root_b);
    b.assert_store_integrity();
    assert_eq!(b.ok("store.verify", json!({}))["ok"], true);
}

/// Concurrent edits of one file on two partitioned devices: after the
/// partition heals both versions exist on both devices under the same
/// names; an edit concurrent with a delete keeps the edit.
#[test]
fn concurrent_edits_become_identical_conflict_copies() {
    let (dir_a, dir_b, a, b) = two_trusting_devices();
    let root_a = dir_a.path().join("ws");
    let root_b = dir_b.path().join("ws");
    std::fs::create_dir_all(root_a.join("src")).unwrap();
    std::fs::write(root_a.join("src/shared.rs"), "original\n").unwrap();
    std::fs::write(root_a.join("notes.md"), "original notes\n").unwrap();
    std::fs::create_dir_all(&root_b).unwrap();
    let ws = a.add_workspace(&root_a, "w");
    a.share_with(&b, &ws, "editor", &root_b);
    wait_same("the initial sync", &root_a, &root_b);

    partition(&a, &b);
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
    a.trust_each_other(&b);
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

/// Clocks days apart (A's three days ahead, as its files' mtimes show):
/// concurrent edits keep both versions, the same winner and conflict name
/// on both devices (the newer mtime wins, whichever clock is right); files
/// dated in the future or the past sync as they are; and an edit of a
/// future-dated file that keeps its size and puts its mtime back is still
/// seen, since a stat dated in the future is never trusted.
#[test]
fn clocks_days_apart_lose_nothing() {
    const DAYS_3: Duration = Duration::from_secs(3 * 24 * 3600);
    let set_mtime = |path: &std::path::Path, mtime: std::time::SystemTime| {
        let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        file.set_modified(mtime).unwrap();
    };
    let now = std::time::SystemTime::now();
    let (dir_a, dir_b, a, b) = two_trusting_devices();
    let root_a = dir_a.path().join("ws");
    let root_b = dir_b.path().join("ws");
    std::fs::create_dir_all(&root_a).unwrap();
    std::fs::write(root_a.join("shared.txt"), "original\n").unwrap();
    std::fs::write(root_a.join("future.txt"), "written ahead\n").unwrap();
    set_mtime(&root_a.join("future.txt"), now + DAYS_3);
    std::fs::create_dir_all(&root_b).unwrap();
    let ws = a.add_workspace(&root_a, "w");
    a.share_with(&b, &ws, "editor", &root_b);
    wait_same("the initial sync", &root_a, &root_b);

    // Partition; A edits with its clock ahead, B with its own, and B adds
    // a file dated three days back.
    partition(&a, &b);
    std::fs::write(root_a.join("shared.txt"), "edited on a, clock ahead\n").unwrap();
    set_mtime(&root_a.join("shared.txt"), now + DAYS_3);
    std::fs::write(root_b.join("shared.txt"), "edited on b\n").unwrap();
    std::fs::write(root_b.join("past.txt"), "dated back\n").unwrap();
    set_mtime(&root_b.join("past.txt"), now - DAYS_3);
    a.flush(&ws);
    b.flush(&ws);

    a.trust_each_other(&b);
    a.flush(&ws);
    b.flush(&ws);
    wait_same("convergence after the partition", &root_a, &root_b);
    for root in [&root_a, &root_b] {
        assert_eq!(
            std::fs::read_to_string(root.join("shared.txt")).unwrap(),
            "edited on a, clock ahead\n"
        );
        assert_eq!(
            std::fs::read_to_string(root.join("past.txt")).unwrap(),
            "dated back\n"
        );
    }
    let listed = a.cli_json(&["conflicts", "w"]);
    assert_eq!(b.cli_json(&["conflicts", "w"]), listed);
    let copy = listed["conflicts"][0]["conflict_path"].as_str().unwrap();
    assert_eq!(
        std::fs::read_to_string(root_a.join(copy)).unwrap(),
        "edited on b\n"
    );
    // Dates travel as they are.
    let mtime = |path: std::path::PathBuf| std::fs::metadata(path).unwrap().modified().unwrap();
    assert_eq!(
        mtime(root_b.join("future.txt")),
        mtime(root_a.join("future.txt"))
    );
    assert_eq!(
        mtime(root_a.join("past.txt")),
        mtime(root_b.join("past.txt"))
    );

    // B edits the future-dated file in place, same size, and puts its
    // mtime back: the edit still reaches A.
    let future = root_b.join("future.txt");
    let dated = mtime(future.clone());
    std::fs::write(&future, "WRITTEN AHEAD\n").unwrap();
    set_mtime(&future, dated);
    b.flush(&ws);
    wait_until(Duration::from_secs(30), "B's edit to reach A", || {
        (std::fs::read_to_string(root_a.join("future.txt"))
            .ok()
            .as_deref()
            == Some("WRITTEN AHEAD\n"))
        .then_some(())
    });
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
    // B co-owns the workspace, so it can offer it to C, whom A cannot reach.
    a.share_with(&b, &ws, "owner", &roots[1]);
    b.share_with(&c, &ws, "editor", &roots[2]);
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

/// A triangle: every device trusts the other two, changes made anywhere
/// reach everyone by the shortest path, and one that was offline catches
/// up from whichever peers are there.
#[test]
fn three_devices_in_a_triangle_converge() {
    let dirs = [temp_dir(), temp_dir(), temp_dir()];
    let mut devices: Vec<Device> = dirs.iter().map(|d| Device::start(d.path())).collect();
    let ids: Vec<String> = devices.iter().map(|d| d.device_id()).collect();
    let addrs: Vec<String> = devices.iter().map(|d| d.listen_addr()).collect();
    for (i, device) in devices.iter().enumerate() {
        for j in 0..3 {
            if i != j {
                device.cli_json(&["peer", "add", &ids[j], "--addr", &addrs[j]]);
            }
        }
    }
    for (i, device) in devices.iter().enumerate() {
        for (j, id) in ids.iter().enumerate() {
            if i != j {
                device.wait_connected(id);
            }
        }
    }
    let roots: Vec<_> = dirs.iter().map(|d| d.path().join("ws")).collect();
    generate_tree(&roots[0], 80, 200, 1, 1 << 20);
    let ws = devices[0].add_workspace(&roots[0], "w");
    devices[0].share_with(&devices[1], &ws, "editor", &roots[1]);
    devices[0].share_with(&devices[2], &ws, "editor", &roots[2]);
    wait_same("B's copy", &roots[0], &roots[1]);
    wait_same("C's copy", &roots[0], &roots[2]);

    // Changes on all three at once, to different files.
    let files = list_files(&roots[0]);
    let mut rng = Rng::new(81);
    for (i, root) in roots.iter().enumerate() {
        for path in files.iter().skip(i).step_by(17) {
            std::fs::write(root.join(path), text(&mut rng, 500)).unwrap();
        }
        std::fs::write(root.join(format!("src/new-{i}.rs")), format!("// {i}\n")).unwrap();
    }
    std::fs::remove_file(roots[1].join(&files[4])).unwrap();
    for device in &devices {
        device.flush(&ws);
    }
    wait_same("A and B", &roots[0], &roots[1]);
    wait_same("A and C", &roots[0], &roots[2]);

    // C goes away; A and B change things; C comes back and catches up.
    devices[2].stop();
    std::fs::write(roots[0].join("src/while-c-away-a.rs"), "a\n").unwrap();
    std::fs::write(roots[1].join("src/while-c-away-b.rs"), "b\n").unwrap();
    std::fs::rename(roots[1].join(&files[8]), roots[1].join("src/moved.rs")).unwrap();
    devices[0].flush(&ws);
    devices[1].flush(&ws);
    wait_same("A and B while C is away", &roots[0], &roots[1]);
    devices[2].start_again();
    wait_same("C to catch up", &roots[0], &roots[2]);
    let index_digests: Vec<String> = devices
        .iter()
        .map(|d| {
            wait_until(Duration::from_secs(30), "the index to settle", || {
                let state = index_state(d, &ws);
                (state == tree_state(&roots[0])).then_some(digest(&state))
            })
        })
        .collect();
    assert!(index_digests.windows(2).all(|w| w[0] == w[1]));
    for root in &roots {
        assert_no_junk(root);
    }
}

/// A device that joins a workspace two peers already have pulls from both
/// at once, and fetches every chunk once: the pulls split the requests
/// between the peers instead of each fetching everything.
#[test]
fn a_new_device_pulls_from_two_peers_and_fetches_each_chunk_once() {
    let dirs = [temp_dir(), temp_dir(), temp_dir()];
    let devices: Vec<Device> = dirs.iter().map(|d| Device::start(d.path())).collect();
    let (a, b, c) = (&devices[0], &devices[1], &devices[2]);
    a.trust_each_other(b);
    a.trust_each_other(c);
    b.trust_each_other(c);
    let roots: Vec<_> = dirs.iter().map(|d| d.path().join("ws")).collect();
    generate_tree(&roots[0], 90, 300, 12, 8 << 20);
    let ws = a.add_workspace(&roots[0], "w");
    a.share_with(b, &ws, "editor", &roots[1]);
    wait_same("B's copy", &roots[0], &roots[1]);
    b.flush(&ws);

    a.share_with(c, &ws, "editor", &roots[2]);
    wait_same("C's copy", &roots[0], &roots[2]);
    let stats = c.ok("store.stats", json!({}));
    // Every chunk C holds came from a peer, and none came twice.
    assert_eq!(stats["fetched_chunks"], stats["chunks"], "{stats}");
    let from = |peer: &Device| {
        c.peer(&peer.device_id()).unwrap()["fetched_bytes"]
            .as_u64()
            .unwrap()
    };
    let (from_a, from_b) = (from(a), from(b));
    assert_eq!(from_a + from_b, stats["fetched_bytes"].as_u64().unwrap());
    assert!(
        from_a > 0 && from_b > 0,
        "both peers should have served part: {from_a} bytes from A, {from_b} from B"
    );
    assert_no_junk(&roots[2]);
}

/// A device that leaves a shared workspace (`workspace remove`: its index
/// goes) and joins it again keeps what it changed meanwhile: its new
/// versions must not look older than the ones it made before it left.
#[test]
fn a_device_that_rejoins_keeps_what_it_changed_while_away() {
    let (dir_a, dir_b, a, b) = two_trusting_devices();
    let (ws, root_a, root_b) = a.share_generated(dir_a.path(), &b, dir_b.path(), 70, 20);
    wait_same("the initial sync", &root_a, &root_b);
    // B edits a file a few times: its device has counters in the version.
    // The first save right after joining reaches A too: A's first pull
    // from B, before B accepted, was refused, and `--wait` counts A all
    // the same.
    let path = list_files(&root_a)[0].clone();
    for i in 0..3 {
        std::fs::write(root_b.join(&path), format!("B's edit {i}\n")).unwrap();
        b.touched(&ws, &root_b.join(&path), true);
    }
    assert_eq!(
        std::fs::read_to_string(root_a.join(&path)).unwrap(),
        "B's edit 2\n"
    );
    // B leaves, edits the file while away, and joins again in place (A
    // offers it again).
    b.ok("workspace.remove", json!({ "workspace": ws }));
    std::fs::write(root_b.join(&path), "written while away\n").unwrap();
    a.share_with(&b, &ws, "editor", &root_b);
    b.flush(&ws);
    a.flush(&ws);
    wait_same("the rejoin", &root_a, &root_b);
    // The edit made while away is on both devices: the file itself or a
    // conflict copy of it.
    for root in [&root_a, &root_b] {
        let kept = list_files(root).iter().any(|p| {
            std::fs::read_to_string(root.join(p)).ok().as_deref() == Some("written while away\n")
        });
        assert!(
            kept,
            "the edit made while away is lost in {}",
            root.display()
        );
    }
}

/// A device that comes back to dozens of workspaces pulls them all at
/// once. libp2p allows a connection 100 streams, both ways together, and
/// fails any beyond: requests to one peer wait for each other instead, so
/// none fails ("max sub-streams reached") and none is dropped ("at
/// capacity"), and everything arrives at once rather than after retries.
#[test]
fn dozens_of_workspaces_catch_up_at_once_without_refused_requests() {
    const WORKSPACES: usize = 60;
    // Failed pulls are logged at debug level only.
    let debug = [("RUST_LOG", "mariesync=debug,info")];
    let (dir_a, dir_b) = (temp_dir(), temp_dir());
    let mut a = Device::start_with_env(dir_a.path(), &debug);
    let b = Device::start_with_env(dir_b.path(), &debug);
    a.trust_each_other(&b);
    a.pin_port();
    let mut shared = Vec::new();
    for i in 0..WORKSPACES {
        let (root_a, root_b) = (
            dir_a.path().join(format!("ws{i}")),
            dir_b.path().join(format!("ws{i}")),
        );
        generate_tree(&root_a, 300 + i as u64, 8, 1, 1 << 20);
        let ws = a.add_workspace(&root_a, &format!("w{i}"));
        a.flush(&ws);
        a.cli_json(&["share", &ws, &b.device_id(), "--role", "editor"]);
        shared.push((ws, root_a, root_b));
    }
    wait_until(Duration::from_secs(60), "every offer to arrive", || {
        let list = b.ok("workspace.list", json!({}));
        let offered = list["workspaces"].as_array().unwrap().iter();
        (offered.filter(|w| w["state"] == "offered").count() == WORKSPACES).then_some(())
    });
    // Accepted while the owner is away, so that every pull starts at the
    // moment it is back.
    a.stop();
    for (ws, _, root_b) in &shared {
        std::fs::create_dir_all(root_b).unwrap();
        b.ok("workspace.add", json!({"path": root_b, "id": ws}));
    }
    a.start_again();
    for (ws, root_a, root_b) in &shared {
        wait_same(ws, root_a, root_b);
    }
    for (name, log) in [("A", a.log()), ("B", b.log())] {
        for refusal in ["max sub-streams reached", "at capacity"] {
            assert!(
                !log.contains(refusal),
                "'{refusal}' in {name}'s log:\n{log}"
            );
        }
    }
}
