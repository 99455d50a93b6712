//! A trusted but hostile peer: a huge length prefix, a message type that
//! does not exist, index entries that escape the workspace (`..`, an
//! absolute path), an index page of 20,000 entries and one announcing ten
//! million, a decompression bomb, a chunk that does not match its hash
//! (asked for, or pushed with a change), ninety requests of 8 MiB at once,
//! a request sent one byte a second.
//! Each time the victim closes the connection, writes nothing outside the
//! workspace, keeps its memory bounded, and goes on syncing with an honest
//! peer.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use mariesync_integration::*;
use serde_json::json;

/// Peak resident memory of a process, from /proc.
fn peak_rss_bytes(pid: u32) -> u64 {
    proc_stats::status_kib(pid, "VmHWM").expect("VmHWM in /proc/PID/status") * 1024
}

/// `from` writes `name` into its root and flushes: `to_root` has it then.
fn sends(from: &Device, ws: &str, from_root: &Path, to_root: &Path, name: &str, content: &str) {
    std::fs::write(from_root.join(name), content).unwrap();
    from.flush(ws);
    assert_eq!(
        std::fs::read_to_string(to_root.join(name)).unwrap(),
        content,
        "{name}"
    );
}

#[test]
fn a_hostile_peer_is_cut_off_and_others_keep_syncing() {
    let (dir_a, dir_b, a, b) = two_trusting_devices();
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
    // The peer's lines, each awaited for a bounded time: a victim that
    // never reacts fails the test instead of hanging it.
    let lines = {
        let (send, receive) = std::sync::mpsc::channel();
        let out = BufReader::new(hostile.stdout.take().unwrap());
        std::thread::spawn(move || {
            for line in out.lines() {
                if send.send(line.unwrap()).is_err() {
                    return;
                }
            }
        });
        receive
    };
    let next_line = |what: &str| {
        lines
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| panic!("no '{what}' from the hostile peer; log:\n{}", a.log()))
    };
    let id_h = next_line("device ID");
    // Trusted, and even an editor of the workspace: the worst case.
    a.cli_json(&["peer", "add", &id_h]);
    a.cli_json(&["share", "w", &id_h, "--role", "editor"]);
    writeln!(hostile.stdin.take().unwrap(), "go").unwrap();

    for attack in [
        "HugeLength",
        "UnknownMessage",
        "EscapingPath",
        "AbsolutePath",
        "ManyEntries",
        "HugeCount",
        "DecompressionBomb",
        "WrongHash",
        "PushedWrongHash",
        "Flood",
    ] {
        let expected = format!("{attack} closed");
        assert_eq!(next_line(&expected), expected, "log:\n{}", a.log());
    }
    // A request trickling in one byte a second: while it does, the honest
    // peer's changes still go both ways; then the victim hangs up on it
    // (within seconds, not the minute a request may take).
    assert_eq!(next_line("SlowLoris started"), "SlowLoris started");
    sends(
        &b,
        &ws,
        &root_b,
        &root_a,
        "during-the-trickle.txt",
        "from B\n",
    );
    sends(&a, &ws, &root_a, &root_b, "answer-to-b.txt", "from A\n");
    assert_eq!(next_line("SlowLoris closed"), "SlowLoris closed");
    // Then an honest change pushed with its announcement: applied from
    // what came along, without asking for its chunk.
    assert_eq!(
        next_line("Pushed applied"),
        "Pushed applied, chunks asked 0",
        "log:\n{}",
        a.log()
    );
    assert_eq!(
        std::fs::read(root_a.join("pushed.txt")).unwrap(),
        b"pushed with its announcement\n"
    );
    assert_eq!(next_line("Pushed closed"), "Pushed closed");
    assert_eq!(next_line("done"), "done");
    assert!(hostile.wait().unwrap().success());

    // Nothing written outside the workspace, nothing bad inside it.
    assert!(!dir_a.path().join("escape.txt").exists());
    assert!(!Path::new("/escape-abs.t").exists());
    for name in [
        "bomb.bin",
        "wrong.bin",
        "pushed-wrong.bin",
        "aa",
        "many",
        "count.txt",
    ] {
        assert!(!root_a.join(name).exists(), "{name} was written");
    }
    assert_no_junk(&root_a);
    let log = a.log();
    for reason in [
        "malformed request",
        "malformed answer",
        "malformed index page (20000 entries",
        "sent a bad chunk",
        "pushed a bad chunk",
        "a request that stalled",
    ] {
        assert!(log.contains(reason), "no '{reason}' in the log:\n{log}");
    }
    // A 512 MiB bomb never got near memory, nor 720 MiB of requests.
    let peak = peak_rss_bytes(a.pid());
    eprintln!("the victim's peak RSS: {} MiB", peak >> 20);
    assert!(peak < 256 << 20, "peak RSS {} MiB", peak >> 20);

    // The honest peer still syncs, both ways.
    sends(
        &b,
        &ws,
        &root_b,
        &root_a,
        "after-the-attack.txt",
        "still here\n",
    );
    sends(&a, &ws, &root_a, &root_b, "reply.txt", "and back\n");
    wait_until(Duration::from_secs(30), "the trees to agree", || {
        (tree_state(&root_a) == tree_state(&root_b)).then_some(())
    });
    a.assert_store_integrity();
    assert_eq!(a.ok("store.verify", json!({}))["ok"], true);
}

/// A device of the group (it joined with a real device ticket) sends
/// garbage, a rival document whose maps would replace the victim's, a
/// corrupted message and an unknown document: each is refused, the stored
/// settings are untouched (also after a restart), and the honest device
/// keeps syncing both ways.
#[test]
fn garbage_settings_messages_harm_nothing() {
    let (dir_a, dir_b) = (temp_dir(), temp_dir());
    let mut a = Device::start(dir_a.path());
    let b = Device::start(dir_b.path());
    a.link(&b);
    a.cli_json(&["settings", "set", "editor.fontSize", "14"]);
    a.cli_json(&[
        "settings",
        "extension",
        "install",
        "rust-lang.rust-analyzer",
    ]);
    b.wait_setting("editor.fontSize", &json!(14));
    let before = a.ok("settings.get", json!({}));
    let history_before = a.ok("settings.history", json!({}));

    let ticket = a.cli_json(&["invite", "--device"])["ticket"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut hostile = Command::new(env!("CARGO_BIN_EXE_hostile_peer"))
        .args(["settings", &ticket])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(hostile.stdout.take().unwrap());
    let mut lines = Vec::new();
    let mut line = String::new();
    while out.read_line(&mut line).unwrap() > 0 {
        lines.push(line.trim().to_owned());
        line.clear();
    }
    assert!(hostile.wait().unwrap().success(), "{lines:?}");
    let id_h = lines[0].clone();
    assert_eq!(lines[1], "joined");
    for (line, attack) in lines[2..]
        .iter()
        .zip(["garbage", "rival", "corrupt", "unknown"])
    {
        assert!(
            line.starts_with(&format!("{attack} refused")),
            "{lines:?}\n{}",
            a.log()
        );
    }
    assert_eq!(lines.last().unwrap(), "done");
    assert!(a.log().contains("refused a settings message"));

    // Nothing changed, in memory or on disk.
    assert_eq!(a.ok("settings.get", json!({})), before);
    assert_eq!(a.ok("settings.history", json!({})), history_before);
    a.restart();
    assert_eq!(a.ok("settings.get", json!({})), before);
    assert_eq!(a.ok("settings.history", json!({})), history_before);

    // The hostile device is forgotten by the group when removed.
    a.cli_json(&["peer", "remove", &id_h]);
    wait_until(
        Duration::from_secs(30),
        "b to forget the removed device",
        || b.peer(&id_h).is_none().then_some(()),
    );
    // The honest device still syncs, both ways.
    b.cli_json(&["settings", "set", "after.attack", "true"]);
    a.wait_setting("after.attack", &json!(true));
    a.cli_json(&["settings", "set", "and.back", "1"]);
    b.wait_setting("and.back", &json!(1));
}
