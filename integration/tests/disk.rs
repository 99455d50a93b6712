//! Full disks: a receiver whose workspace disk fills up keeps its old
//! files intact, says so, and syncs once there is room again. Needs root
//! to mount a small tmpfs (CI runs as root); elsewhere it says loudly that
//! it was skipped.

use std::path::PathBuf;
use std::time::Duration;

use mariesync_integration::*;
use serde_json::{Value, json};

/// Two devices sharing a workspace, synced once, with B's `on` (`ws` or
/// `home`) on a tmpfs of `size`. Fields drop in order: the daemons stop
/// before the tmpfs goes, and it before the directories.
struct Setup {
    a: Device,
    b: Device,
    ws: String,
    root_a: PathBuf,
    root_b: PathBuf,
    disk: SmallDisk,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

/// None, said loudly, where no tmpfs can be mounted.
fn setup(test: &str, on: &str, size: &str, files: &[(&str, &str)]) -> Option<Setup> {
    if !is_root() {
        eprintln!("SKIPPED {test}: needs root to mount a small tmpfs");
        return None;
    }
    let (dir_a, dir_b) = (temp_dir(), temp_dir());
    let (root_a, root_b) = (dir_a.path().join("ws"), dir_b.path().join("ws"));
    let Some(disk) = SmallDisk::mount(&dir_b.path().join(on), size) else {
        eprintln!("SKIPPED {test}: cannot mount a tmpfs here");
        return None;
    };
    let a = Device::start(dir_a.path());
    let b = Device::start(dir_b.path());
    a.trust_each_other(&b);
    std::fs::create_dir_all(&root_a).unwrap();
    std::fs::create_dir_all(&root_b).unwrap();
    for (name, content) in files {
        std::fs::write(root_a.join(name), content).unwrap();
    }
    let ws = a.add_workspace(&root_a, "w");
    a.share_with(&b, &ws, "editor", &root_b);
    wait_until(Duration::from_secs(30), "the initial sync", || {
        (tree_state(&root_a) == tree_state(&root_b)).then_some(())
    });
    Some(Setup {
        a,
        b,
        ws,
        root_a,
        root_b,
        disk,
        _dirs: (dir_a, dir_b),
    })
}

fn not_applied(device: &Device) -> Vec<Value> {
    device.ok("status", json!({}))["workspaces"][0]["not_applied"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn a_full_workspace_disk_keeps_the_old_file_and_syncs_once_there_is_room() {
    let Some(mut t) = setup(
        "a_full_workspace_disk_keeps_the_old_file_and_syncs_once_there_is_room",
        "ws",
        "1m",
        &[("keep.txt", "the old version\n"), ("small.txt", "small\n")],
    ) else {
        return;
    };
    let Setup {
        a,
        b,
        ws,
        root_a,
        root_b,
        ..
    } = &t;
    let mut events = b.subscribe();

    // A new version bigger than B's disk: it cannot be written there.
    let big = Rng::new(5).bytes(3 << 20);
    std::fs::write(root_a.join("keep.txt"), &big).unwrap();
    a.touched(ws, &root_a.join("keep.txt"), false);
    let event = next_event(&mut events, |e| {
        e["kind"] == "error" && e["path"] == "keep.txt"
    });
    assert!(
        event["message"].as_str().unwrap().contains("No space left"),
        "{event}"
    );
    let listed = wait_until(Duration::from_secs(30), "B to list keep.txt", || {
        let listed = not_applied(b);
        (!listed.is_empty()).then_some(listed)
    });
    assert_eq!(listed[0]["path"], "keep.txt");
    // The old file is intact, and the other changes still arrive (a
    // temporary file may be there meanwhile: B tries again; none is left
    // at the end).
    assert_eq!(
        std::fs::read_to_string(root_b.join("keep.txt")).unwrap(),
        "the old version\n"
    );
    std::fs::write(root_a.join("small.txt"), "small, edited\n").unwrap();
    a.touched(ws, &root_a.join("small.txt"), false);
    wait_until(Duration::from_secs(60), "small.txt on B", || {
        (std::fs::read_to_string(root_b.join("small.txt"))
            .ok()?
            .as_str()
            == "small, edited\n")
            .then_some(())
    });

    // Room again: the new version arrives, and the error is gone.
    t.disk.resize("16m");
    wait_until(Duration::from_secs(90), "keep.txt on B", || {
        (std::fs::read(root_b.join("keep.txt")).ok()? == big).then_some(())
    });
    wait_until(Duration::from_secs(10), "B's list to clear", || {
        not_applied(b).is_empty().then_some(())
    });
    assert_same_state("B", &tree_state(root_a), &tree_state(root_b));
    assert_no_junk(root_b);
    b.assert_store_integrity();
    t.b.stop();
    t.a.stop();
}

/// The home's disk fills while chunks arrive: the commit fails, nothing
/// half-written is used, the daemon keeps answering, and once there is
/// room the database opens again and the sync completes, no restart.
#[test]
fn a_full_home_disk_resumes_once_there_is_room() {
    let Some(mut t) = setup(
        "a_full_home_disk_resumes_once_there_is_room",
        "home",
        "4m",
        &[("small.txt", "small\n")],
    ) else {
        return;
    };
    let Setup {
        a,
        b,
        ws,
        root_a,
        root_b,
        ..
    } = &t;
    // More than B's home can hold.
    let big = Rng::new(6).bytes(6 << 20);
    std::fs::write(root_a.join("big.bin"), &big).unwrap();
    a.touched(ws, &root_a.join("big.bin"), false);
    wait_until(Duration::from_secs(30), "B's database to fail", || {
        b.log().contains("database commit failed").then_some(())
    });
    // B still answers, and says why it cannot store.
    let answer = b.call("status", json!({}));
    if let Err(e) = &answer {
        assert!(e.to_string().contains("full disk"), "{e}");
    }
    assert!(!root_b.join("big.bin").exists());
    // A settings change now: acknowledged only if stored (it may fit in
    // the database's free pages), else refused.
    let acknowledged = b
        .call(
            "settings.set",
            json!({"key": "editor.fontSize", "value": 15}),
        )
        .is_ok();

    t.disk.resize("64m");
    wait_until(Duration::from_secs(90), "big.bin on B", || {
        (std::fs::read(root_b.join("big.bin")).ok()? == big).then_some(())
    });
    assert!(b.log().contains("the database is open again"));
    assert_same_state("B", &tree_state(root_a), &tree_state(root_b));
    assert_no_junk(root_b);
    // A local change on B goes out too: B's store takes writes again.
    std::fs::write(root_b.join("from-b.txt"), "after the disk was full\n").unwrap();
    b.touched(ws, &root_b.join("from-b.txt"), true);
    assert_eq!(
        std::fs::read_to_string(root_a.join("from-b.txt")).unwrap(),
        "after the disk was full\n"
    );
    // And settings take changes again. The one made while the disk was
    // full is there if it was acknowledged. If it was refused it may be
    // there too: a commit that fails part way may have written all it
    // needed (redb writes the new header, then flushes every page), just as
    // a crash right before the answer would keep it. It is whole or absent.
    let value = b.setting("editor.fontSize");
    if acknowledged {
        assert_eq!(value, json!(15));
    } else {
        assert!(value == Value::Null || value == json!(15), "{value}");
    }
    b.ok(
        "settings.set",
        json!({"key": "editor.fontSize", "value": 16}),
    );
    assert_eq!(b.setting("editor.fontSize"), json!(16));
    b.assert_store_integrity();
    t.b.stop();
    t.a.stop();
}
