//! A trusted but hostile peer: a huge length prefix, an index entry that
//! escapes the workspace, a decompression bomb, a chunk that does not match
//! its hash. Each time the victim closes the connection, writes nothing
//! outside the workspace, keeps its memory bounded, and goes on syncing
//! with an honest peer.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use mariesync_integration::*;
use serde_json::json;

/// Peak resident memory of a process, from /proc.
fn peak_rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM in /proc/PID/status");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap();
    kib * 1024
}

#[test]
fn a_hostile_peer_is_cut_off_and_others_keep_syncing() {
    let (dir_a, dir_b) = (temp_dir(), temp_dir());
    let a = Device::start(dir_a.path());
    let b = Device::start(dir_b.path());
    a.trust_each_other(&b);
    let root_a = dir_a.path().join("ws");
    let root_b = dir_b.path().join("ws");
    generate_tree(&root_a, 95, 100, 0, 0);
    let ws = a.add_workspace(&root_a, "w");
    a.share_with(&b, &ws, "editor", &root_b);

    let mut hostile = Command::new(env!("CARGO_BIN_EXE_hostile_peer"))
        .args([&a.listen_addr(), &ws])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(hostile.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let id_h = line.trim().to_owned();
    // Trusted, and even an editor of the workspace: the worst case.
    a.cli_json(&["peer", "add", &id_h]);
    a.cli_json(&["share", "w", &id_h, "--role", "editor"]);
    writeln!(hostile.stdin.take().unwrap(), "go").unwrap();

    for attack in [
        "HugeLength",
        "EscapingPath",
        "DecompressionBomb",
        "WrongHash",
    ] {
        line.clear();
        out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), format!("{attack} closed"), "log:\n{}", a.log());
    }
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "done");
    assert!(hostile.wait().unwrap().success());

    // Nothing written outside the workspace, nothing bad inside it.
    assert!(!dir_a.path().join("escape.txt").exists());
    for name in ["bomb.bin", "wrong.bin", "aa"] {
        assert!(!root_a.join(name).exists(), "{name} was written");
    }
    assert_no_junk(&root_a);
    let log = a.log();
    for reason in ["malformed request", "malformed answer", "bad chunk"] {
        assert!(log.contains(reason), "no '{reason}' in the log:\n{log}");
    }
    // A 512 MiB bomb never got near memory.
    let peak = peak_rss_bytes(a.pid());
    assert!(peak < 256 << 20, "peak RSS {} MiB", peak >> 20);

    // The honest peer still syncs, both ways.
    std::fs::write(root_b.join("after-the-attack.txt"), "still here\n").unwrap();
    b.flush(&ws);
    assert_eq!(
        std::fs::read(root_a.join("after-the-attack.txt")).unwrap(),
        b"still here\n"
    );
    std::fs::write(root_a.join("reply.txt"), "and back\n").unwrap();
    a.flush(&ws);
    assert_eq!(
        std::fs::read(root_b.join("reply.txt")).unwrap(),
        b"and back\n"
    );
    wait_until(Duration::from_secs(30), "the trees to agree", || {
        (tree_state(&root_a) == tree_state(&root_b)).then_some(())
    });
    a.assert_store_integrity();
    assert_eq!(a.ok("store.verify", json!({}))["ok"], true);
}
