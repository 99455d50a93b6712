//! Settings sync across a device group (SPEC.md sections 3 and 6), with
//! real daemons: live changes, offline merges, device-only keys, extension
//! intents, the bound file, history and restore.

use std::time::Duration;

use mariesync_integration::*;
use serde_json::{Value, json};

fn history(device: &Device) -> Vec<Value> {
    device.ok("settings.history", json!({"limit": 1000}))["versions"]
        .as_array()
        .unwrap()
        .clone()
}

/// Three devices in a group: live changes reach every subscriber;
/// changes made apart merge (different keys: both kept; one key: one
/// winner everywhere, the loser in history).
#[test]
fn three_devices_share_settings_and_merge_what_they_did_apart() {
    let dirs = [temp_dir(), temp_dir(), temp_dir()];
    let mut a = Device::start(dirs[0].path());
    let mut b = Device::start(dirs[1].path());
    let mut c = Device::start(dirs[2].path());
    for device in [&mut a, &mut b, &mut c] {
        device.pin_port();
    }
    // A device that already had settings keeps them through its join.
    b.cli_json(&["settings", "set", "editor.tabSize", "2"]);
    a.link(&b);
    a.link(&c);
    // c learns of b from the group's device list, and connects to it.
    c.wait_connected(&b.device_id());
    for device in [&a, &b, &c] {
        device.wait_setting("editor.tabSize", &json!(2));
    }
    let premerge: Vec<Value> = history(&b)
        .into_iter()
        .filter(|v| v["before_joining_group"] == true)
        .collect();
    assert_eq!(
        premerge.len(),
        1,
        "b's settings before the join are a version"
    );

    // Live: a change on a reaches the subscribers of b and c, saying who.
    let mut on_b = b.subscribe();
    let mut on_c = c.subscribe();
    a.cli_json(&["settings", "set", "editor.fontSize", "14"]);
    let id_a = a.device_id();
    for events in [&mut on_b, &mut on_c] {
        let event = next_event(events, |e| e["kind"] == "settings_changed");
        assert_eq!(event["keys"], json!(["editor.fontSize"]));
        assert_eq!(event["device_id"], id_a);
        assert_eq!(event["origin"], "remote");
    }
    assert_eq!(b.setting("editor.fontSize"), json!(14));
    assert_eq!(c.setting("editor.fontSize"), json!(14));

    // Apart: c is away; a and b change things while they cannot see each
    // other (each changes while the other is stopped).
    c.stop();
    b.stop();
    a.cli_json(&["settings", "set", "from.a", "\"a\""]);
    a.cli_json(&["settings", "set", "workbench.colorTheme", "\"Dark A\""]);
    a.stop();
    b.start_again();
    b.cli_json(&["settings", "set", "from.b", "\"b\""]);
    b.cli_json(&["settings", "set", "workbench.colorTheme", "\"Light B\""]);
    a.start_again();
    c.start_again();
    for device in [&a, &b, &c] {
        device.wait_setting("from.a", &json!("a"));
        device.wait_setting("from.b", &json!("b"));
    }
    let everything = |d: &Device| d.ok("settings.get", json!({}))["value"].clone();
    wait_until(
        Duration::from_secs(30),
        "the same settings everywhere",
        || {
            let all_a = everything(&a);
            (all_a == everything(&b) && all_a == everything(&c)).then_some(())
        },
    );
    let theme = a.ok("settings.get", json!({"key": "workbench.colorTheme"}));
    let winner = theme["value"].clone();
    assert!(winner == "Dark A" || winner == "Light B", "{theme}");
    let loser = if winner == "Dark A" {
        "Light B"
    } else {
        "Dark A"
    };
    // The loser is shown beside the winner, and both are in history.
    assert_eq!(theme["conflicts"], json!([loser]), "{theme}");
    for device in [&a, &b, &c] {
        let summaries: Vec<(String, String)> = history(device)
            .iter()
            .filter(|v| v["summary"] == "set workbench.colorTheme")
            .map(|v| {
                (
                    v["device_id"].as_str().unwrap().to_owned(),
                    v["version"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        assert_eq!(summaries.len(), 2, "both changes in history: {summaries:?}");
    }
    // And it survives a restart (the merged document is stored).
    c.restart();
    assert_eq!(c.setting("workbench.colorTheme"), winner);
    assert_eq!(c.setting("editor.tabSize"), json!(2));
}

/// A device-only key never leaves its device; a normal key set after it
/// arrives without it.
#[test]
fn a_device_only_key_stays_on_its_device() {
    let (dir_a, dir_b) = (temp_dir(), temp_dir());
    let a = Device::start(dir_a.path());
    let b = Device::start(dir_b.path());
    a.link(&b);
    let set = a.cli_json(&[
        "settings",
        "set",
        "terminal.shell",
        "\"/bin/zsh\"",
        "--device-only",
    ]);
    assert_eq!(set["device_only"], true);
    // Staying device-only even when set again without the flag.
    a.cli_json(&["settings", "set", "terminal.shell", "\"/bin/fish\""]);
    a.cli_json(&["settings", "set", "after", "1"]);
    b.wait_setting("after", &json!(1));
    assert_eq!(b.setting("terminal.shell"), Value::Null);
    let on_a = a.ok("settings.get", json!({"key": "terminal.shell"}));
    assert_eq!(on_a["value"], "/bin/fish");
    assert_eq!(on_a["device_only"], true);
    assert!(
        history(&a)
            .iter()
            .all(|v| !v["summary"].as_str().unwrap().contains("terminal.shell"))
    );
    // b has its own value for the key; neither overwrites the other.
    b.cli_json(&[
        "settings",
        "set",
        "terminal.shell",
        "\"/bin/bash\"",
        "--device-only",
    ]);
    b.cli_json(&["settings", "set", "after", "2"]);
    a.wait_setting("after", &json!(2));
    assert_eq!(a.setting("terminal.shell"), "/bin/fish");
    // Unset removes the device's own value.
    a.cli_json(&["settings", "unset", "terminal.shell"]);
    assert_eq!(a.setting("terminal.shell"), Value::Null);
}

/// Uninstalled on a while b is away; b comes back still listing it (and
/// even reporting it installed again): it ends uninstalled everywhere.
#[test]
fn an_uninstall_is_not_undone_by_a_stale_device() {
    let (dir_a, dir_b) = (temp_dir(), temp_dir());
    let mut a = Device::start(dir_a.path());
    let mut b = Device::start(dir_b.path());
    a.pin_port();
    b.pin_port();
    a.link(&b);
    let state = |d: &Device, id: &str| -> Value {
        d.ok("settings.extension.list", json!({}))["extensions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["id"] == id)
            .map(|e| e["state"].clone())
            .unwrap_or(Value::Null)
    };
    a.cli_json(&[
        "settings",
        "extension",
        "install",
        "rust-lang.rust-analyzer",
    ]);
    a.cli_json(&["settings", "extension", "install", "vscodevim.vim"]);
    wait_until(Duration::from_secs(30), "the installs on b", || {
        (state(&b, "vscodevim.vim") == "installed").then_some(())
    });

    b.stop();
    a.cli_json(&["settings", "extension", "uninstall", "vscodevim.vim"]);
    a.stop();
    b.start_again();
    // b, apart, still lists it; its IDE reporting it again changes nothing.
    assert_eq!(state(&b, "vscodevim.vim"), "installed");
    let again = b.cli_json(&["settings", "extension", "install", "vscodevim.vim"]);
    assert_eq!(again["changed"], false);
    let mut on_b = b.subscribe();
    a.start_again();
    let event = next_event(&mut on_b, |e| {
        e["kind"] == "settings_changed" && e["section"] == "extensions"
    });
    assert_eq!(
        event["keys"],
        json!([{"id": "vscodevim.vim", "state": "uninstalled"}])
    );
    for device in [&a, &b] {
        assert_eq!(state(device, "vscodevim.vim"), "uninstalled");
        assert_eq!(state(device, "rust-lang.rust-analyzer"), "installed");
        assert_eq!(
            device.ok("settings.extension.list", json!({}))["installed"],
            json!(["rust-lang.rust-analyzer"])
        );
    }
}

/// A hand edit of a's bound file (with comments) reaches b's bound file
/// with b's comments intact; an invalid file syncs nothing and raises an
/// event until it is fixed.
#[test]
fn bound_files_stay_in_step_and_keep_their_comments() {
    let (dir_a, dir_b) = (temp_dir(), temp_dir());
    let a = Device::start(dir_a.path());
    let b = Device::start(dir_b.path());
    a.link(&b);
    let file_a = dir_a.path().join("settings.json");
    let file_b = dir_b.path().join("settings.json");
    std::fs::write(
        &file_a,
        "{\n  // the font I like\n  \"editor.fontSize\": 14,\n  \"editor.wordWrap\": \"on\",\n}\n",
    )
    .unwrap();
    std::fs::write(
        &file_b,
        "// b's settings\n{\n    /* keep tabs */\n    \"editor.insertSpaces\": false\n}\n",
    )
    .unwrap();
    let bound = a.cli_json(&["settings", "bind", file_a.to_str().unwrap()]);
    assert_eq!(bound["imported"], 2, "{bound}");
    b.wait_setting("editor.fontSize", &json!(14));
    let bound = b.cli_json(&["settings", "bind", file_b.to_str().unwrap()]);
    assert_eq!(bound["imported"], 1, "{bound}");
    assert_eq!(bound["exported"], 2, "{bound}");
    // The first bind merged: b's file has a's keys, a's file gets b's.
    a.wait_setting("editor.insertSpaces", &json!(false));
    let wait_file = |path: &std::path::Path, what: &str, check: &dyn Fn(&str) -> bool| {
        wait_until(Duration::from_secs(30), what, || {
            let text = std::fs::read_to_string(path).ok()?;
            check(&text).then_some(text)
        })
    };
    wait_file(&file_a, "b's key in a's file", &|t| {
        t.contains("\"editor.insertSpaces\": false") && t.contains("// the font I like")
    });

    // A hand edit on a, comments and all.
    let text = std::fs::read_to_string(&file_a).unwrap();
    std::fs::write(
        &file_a,
        text.replace(
            "\"editor.fontSize\": 14,",
            "\"editor.fontSize\": 18, // bigger",
        ),
    )
    .unwrap();
    let text_b = wait_file(&file_b, "the edit in b's file", &|t| {
        t.contains("\"editor.fontSize\": 18")
    });
    assert!(
        text_b.starts_with(
            "// b's settings\n{\n    /* keep tabs */\n    \"editor.insertSpaces\": false"
        ),
        "{text_b}"
    );
    assert_eq!(b.setting("editor.fontSize"), json!(18));

    // Half-saved: an event, nothing syncs, nothing is written over it.
    let versions = history(&a).len();
    let mut on_a = a.subscribe();
    std::fs::write(&file_a, "{\n  \"editor.fontSize\": 20,,\n").unwrap();
    let event = next_event(&mut on_a, |e| e["kind"] == "settings_file_invalid");
    assert_eq!(event["file"], file_a.to_str().unwrap());
    assert_eq!(a.setting("editor.fontSize"), json!(18));
    assert_eq!(history(&a).len(), versions);
    assert_eq!(
        std::fs::read_to_string(&file_a).unwrap(),
        "{\n  \"editor.fontSize\": 20,,\n"
    );
    // A remote change meanwhile is not written into the broken file.
    b.cli_json(&["settings", "set", "editor.rulers", "[80]"]);
    a.wait_setting("editor.rulers", &json!([80]));
    assert_eq!(
        std::fs::read_to_string(&file_a).unwrap(),
        "{\n  \"editor.fontSize\": 20,,\n"
    );

    // Fixed: it syncs; keys the fixed file lacks were removed by the user.
    std::fs::write(
        &file_a,
        "{\n  \"editor.fontSize\": 20, // fixed\n  \"editor.insertSpaces\": false,\n  \"editor.rulers\": [80]\n}\n",
    )
    .unwrap();
    b.wait_setting("editor.fontSize", &json!(20));
    b.wait_setting("editor.wordWrap", &Value::Null);
    let text_b = wait_file(&file_b, "the fix in b's file", &|t| {
        t.contains("\"editor.fontSize\": 20") && !t.contains("wordWrap")
    });
    assert!(text_b.contains("/* keep tabs */"), "{text_b}");
    assert!(
        text_b.contains("\"editor.rulers\": [80]") || text_b.contains("\"editor.rulers\": [\n"),
        "{text_b}"
    );
    // a's file keeps the user's comment.
    assert!(
        std::fs::read_to_string(&file_a)
            .unwrap()
            .contains("// fixed")
    );
}

/// An old version restored, then the restore undone; profiles and
/// keybindings and snippets are versioned with the rest.
#[test]
fn restore_an_old_version_and_undo_it() {
    let dir = temp_dir();
    let a = Device::start(dir.path());
    a.cli_json(&["settings", "set", "editor.fontSize", "12"]);
    a.cli_json(&["settings", "keybinding", "add", "ctrl+k", "editor.fold"]);
    a.cli_json(&[
        "settings",
        "snippet",
        "set",
        "rust/pr",
        r#"{"prefix": "pr", "body": "println!(\"$1\");"}"#,
    ]);
    let good = history(&a)[0]["version"].as_str().unwrap().to_owned();
    a.cli_json(&["settings", "set", "editor.fontSize", "30"]);
    a.cli_json(&["settings", "set", "oops", "true"]);
    a.cli_json(&["settings", "keybinding", "remove", "ctrl+k", "editor.fold"]);

    let restored = a.cli_json(&["settings", "restore", &good[..12]]);
    assert_eq!(restored["restored"], good);
    assert_eq!(a.setting("editor.fontSize"), json!(12));
    assert_eq!(a.setting("oops"), Value::Null);
    let keys = a.ok("settings.keybinding.list", json!({}))["keybindings"].clone();
    assert_eq!(keys, json!([{"key": "ctrl+k", "command": "editor.fold"}]));
    assert_eq!(
        history(&a)[0]["summary"],
        format!("restore {}", &good[..12])
    );

    // Undo: restore what was there before.
    let undo = restored["undo"].as_str().unwrap();
    a.cli_json(&["settings", "restore", undo]);
    assert_eq!(a.setting("editor.fontSize"), json!(30));
    assert_eq!(a.setting("oops"), json!(true));
    assert_eq!(
        a.ok("settings.keybinding.list", json!({}))["keybindings"],
        json!([])
    );
    assert_eq!(
        a.ok("settings.snippet.list", json!({}))["snippets"]["rust/pr"]["prefix"],
        "pr"
    );

    // Profiles: a copy, made active, changed apart from the default.
    a.cli_json(&["settings", "profile", "create", "presenting"]);
    a.cli_json(&["settings", "profile", "use", "presenting"]);
    a.cli_json(&["settings", "set", "editor.fontSize", "24"]);
    assert_eq!(
        a.ok(
            "settings.get",
            json!({"key": "editor.fontSize", "profile": "default"})
        )["value"],
        json!(30)
    );
    assert_eq!(a.setting("editor.fontSize"), json!(24));
    let profiles = a.cli_json(&["settings", "profile", "list"]);
    assert_eq!(profiles["active"], "presenting");
    assert_eq!(profiles["profiles"], json!(["default", "presenting"]));

    // Bad input changes nothing and says why.
    for (args, why) in [
        (
            vec!["settings", "restore", "0123456789abcdef"],
            "no version",
        ),
        (vec!["settings", "set", "k", "not json"], "not JSON"),
        (vec!["settings", "profile", "use", "nope"], "no profile"),
        (
            vec!["settings", "extension", "install", "bad id!"],
            "not an extension",
        ),
    ] {
        let out = a.cli(&args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(why), "{args:?}: {stderr}");
    }
    assert_eq!(a.setting("editor.fontSize"), json!(24));
}

/// A bound file deleted while the daemon is down is not taken for "every
/// setting removed" nor rewritten as an empty file; when it comes back it
/// is merged as at the first bind.
#[test]
fn a_bound_file_that_disappears_removes_nothing() {
    let dir = temp_dir();
    let mut a = Device::start(dir.path());
    let file = dir.path().join("settings.json");
    std::fs::write(
        &file,
        "{\n  \"editor.fontSize\": 14,\n  \"editor.tabSize\": 4\n}\n",
    )
    .unwrap();
    a.cli_json(&["settings", "bind", file.to_str().unwrap()]);
    assert_eq!(a.setting("editor.tabSize"), json!(4));
    a.stop();
    std::fs::remove_file(&file).unwrap();
    a.start_again();
    let mut events = a.client();
    // Replayed (after a gap notice: the log starts anew at each start):
    // the invalid-file event of the start.
    events
        .call("events.subscribe", json!({"since": 0}))
        .unwrap();
    let event = loop {
        let event = events.next_notification().unwrap().params;
        if event["kind"] == "settings_file_invalid" {
            break event;
        }
    };
    assert!(
        event["message"].as_str().unwrap().contains("missing"),
        "{event}"
    );
    assert!(!file.exists(), "the missing file was written");
    assert_eq!(a.setting("editor.fontSize"), json!(14));

    // Back, with one key only (an IDE that starts a new file): merged.
    std::fs::write(&file, "{\n  // new\n  \"editor.wordWrap\": \"on\"\n}\n").unwrap();
    a.wait_setting("editor.wordWrap", &json!("on"));
    let text = wait_until(
        Duration::from_secs(30),
        "the settings back in the file",
        || {
            let text = std::fs::read_to_string(&file).ok()?;
            text.contains("\"editor.tabSize\": 4").then_some(text)
        },
    );
    assert!(
        text.contains("// new") && text.contains("\"editor.fontSize\": 14"),
        "{text}"
    );
    assert_eq!(a.setting("editor.tabSize"), json!(4));
}
