//! Sharing a workspace: offers and roles, invitation tickets.

use std::time::{Duration, Instant};

use mariesync_ffi::{Client, ClientError};
use mariesync_integration::*;
use serde_json::{Value, json};

/// Reads events until one matches.
fn wait_event(client: &mut Client, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
    loop {
        let event = client
            .next_notification()
            .unwrap_or_else(|e| panic!("waiting for {what}: {e}"))
            .params;
        assert_ne!(event["kind"], "gap", "missed events waiting for {what}");
        if matches(&event) {
            return event;
        }
    }
}

fn error_name(result: Result<Value, ClientError>) -> (String, String) {
    match result {
        Err(ClientError::Rpc(e)) => (
            e.data
                .as_ref()
                .and_then(|d| d["name"].as_str())
                .unwrap_or_default()
                .to_owned(),
            e.message,
        ),
        other => panic!("expected an error, got {other:?}"),
    }
}

fn workspace_entry(device: &Device, ws: &str) -> Value {
    device.ok("workspace.list", json!({}))["workspaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["workspace_id"] == ws)
        .cloned()
        .unwrap_or(Value::Null)
}

/// A viewer receives everything, but what it changes stays on it: the
/// owner refuses it (and says so in an event), and the viewer lists it as
/// local changes. Only owners share or invite.
#[test]
fn a_viewers_changes_stay_local() {
    let (dir_a, dir_b) = (temp_dir(), temp_dir());
    let a = Device::start(dir_a.path());
    let b = Device::start(dir_b.path());
    let (id_a, id_b) = (a.device_id(), b.device_id());
    a.trust_each_other(&b);
    let root_a = dir_a.path().join("ws");
    let root_b = dir_b.path().join("ws");
    generate_tree(&root_a, 61, 120, 0, 0);
    let ws = a.add_workspace(&root_a, "w");

    // The offer shows in B's list, as an event, until B accepts it.
    let mut b_events = b.client();
    b_events.call("events.subscribe", json!({})).unwrap();
    a.cli_json(&["share", "w", &id_b, "--role", "viewer"]);
    let offered = wait_event(&mut b_events, "the offer", |e| {
        e["kind"] == "workspace_offered"
    });
    assert_eq!(offered["workspace_id"], ws.as_str());
    assert_eq!(offered["role"], "viewer");
    assert_eq!(offered["device_id"], id_a.as_str());
    let listed = workspace_entry(&b, &ws);
    assert_eq!(listed["state"], "offered", "{listed}");
    assert_eq!(listed["name"], "w");
    b.accept_offer(&ws, &root_b);
    wait_until(Duration::from_secs(60), "the viewer's copy", || {
        (tree_state(&root_a) == tree_state(&root_b)).then_some(())
    });
    assert_eq!(workspace_entry(&b, &ws)["role"], "viewer");
    assert_eq!(workspace_entry(&a, &ws)["role"], "owner");
    let before = tree_state(&root_a);

    // The viewer edits, adds and deletes; the owner refuses all of it.
    let mut a_events = a.client();
    a_events.call("events.subscribe", json!({})).unwrap();
    let files = list_files(&root_b);
    std::fs::write(root_b.join(&files[0]), "edited by the viewer\n").unwrap();
    std::fs::write(root_b.join("added-by-viewer.txt"), "mine\n").unwrap();
    std::fs::remove_file(root_b.join(&files[1])).unwrap();
    b.flush(&ws);
    let refused = wait_event(&mut a_events, "the refusal", |e| {
        e["kind"] == "changes_refused"
    });
    assert_eq!(refused["device_id"], id_b.as_str());
    // A round trip later (the owner's own change reaches the viewer), the
    // owner's tree is still its own.
    std::fs::write(root_a.join("from-owner.txt"), "owner's\n").unwrap();
    a.flush(&ws);
    assert!(root_b.join("from-owner.txt").exists());
    let mut expected = before.clone();
    expected.insert(
        "from-owner.txt".into(),
        tree_state(&root_a)["from-owner.txt"].clone(),
    );
    assert_same_state("the owner's tree", &expected, &tree_state(&root_a));
    assert_eq!(
        workspace_entry(&b, &ws)["local_changes"],
        3,
        "{}",
        workspace_entry(&b, &ws)
    );

    // Only owners change membership.
    let (name, message) = error_name(b.call(
        "share",
        json!({"workspace": ws, "device_id": id_a, "role": "viewer"}),
    ));
    assert_eq!(name, "forbidden");
    assert!(message.contains("only an owner"), "{message}");
    let (name, _) = error_name(b.call("invite", json!({"workspace": ws})));
    assert_eq!(name, "forbidden");
    // Accepting a workspace nobody offered is refused too.
    let (name, message) = error_name(b.call(
        "workspace.add",
        json!({"path": dir_b.path().join("other"), "id": "0123456789abcdef0123456789abcdef"}),
    ));
    assert!(
        name == "forbidden" || name == "invalid_params",
        "{name}: {message}"
    );
}

/// A ticket trusts both ways and adds the workspace in one step; it works
/// once; an expired, reused or damaged ticket is refused clearly and
/// changes nothing on the joining device.
#[test]
fn tickets_work_once_and_expire() {
    let (dir_a, dir_b, dir_c) = (temp_dir(), temp_dir(), temp_dir());
    let a = Device::start(dir_a.path());
    let b = Device::start(dir_b.path());
    let c = Device::start(dir_c.path());
    let root_a = dir_a.path().join("ws");
    generate_tree(&root_a, 62, 150, 1, 2 << 20);
    let ws = a.add_workspace(&root_a, "w");

    let invite = a.cli_json(&["invite", "w", "--role", "editor"]);
    let ticket = invite["ticket"].as_str().unwrap().to_owned();
    assert!(ticket.starts_with("mariesync1-") && !ticket.contains(char::is_whitespace));
    // B's folder does not exist yet: join makes it, like `git clone`.
    let root_b = dir_b.path().join("joined");
    let joined = b.cli_json(&["join", &ticket, root_b.to_str().unwrap()]);
    assert_eq!(joined["workspace_id"], ws.as_str());
    wait_until(Duration::from_secs(60), "the joined copy", || {
        (tree_state(&root_a) == tree_state(&root_b)).then_some(())
    });
    assert_eq!(workspace_entry(&b, &ws)["role"], "editor");
    // Trust both ways, and an editor's change is accepted.
    a.wait_connected(&b.device_id());
    b.wait_connected(&a.device_id());
    std::fs::write(root_b.join("from-b.txt"), "b\n").unwrap();
    b.flush(&ws);
    assert_eq!(std::fs::read(root_a.join("from-b.txt")).unwrap(), b"b\n");

    // Used: refused, and C is left as it was.
    let root_c = dir_c.path().join("joined");
    let reused = c.call("join", json!({"ticket": ticket, "path": root_c}));
    let (name, message) = error_name(reused);
    assert_eq!(name, "ticket_refused");
    assert!(message.contains("already used"), "{message}");
    assert_eq!(c.ok("peer.list", json!({})), json!({"peers": []}));
    assert_eq!(c.ok("workspace.list", json!({})), json!({"workspaces": []}));
    assert!(!root_c.exists());

    // Expired: the inviter's clock decides. The test waits for the ticket's
    // one-second lifetime to pass, which is the behaviour under test.
    let short = a.ok(
        "invite",
        json!({"workspace": "w", "role": "viewer", "expires": "1s"}),
    )["ticket"]
        .as_str()
        .unwrap()
        .to_owned();
    let issued = Instant::now();
    std::thread::sleep(Duration::from_millis(1500).saturating_sub(issued.elapsed()));
    let (name, message) = error_name(c.call("join", json!({"ticket": short, "path": root_c})));
    assert_eq!(name, "ticket_refused");
    assert!(message.contains("expired"), "{message}");
    assert_eq!(c.ok("peer.list", json!({})), json!({"peers": []}));
    assert!(!root_c.exists());

    // Damaged in the paste.
    let mut damaged = ticket.clone();
    damaged.truncate(ticket.len() - 5);
    let out = c.cli(&["join", &damaged, root_c.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("damaged"));
    let out = c.cli(&["join", "hello", root_c.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a MarieSync ticket"));

    // A fresh ticket still works for C, as a viewer this time.
    let fresh = a.ok("invite", json!({"workspace": ws, "role": "viewer"}))["ticket"]
        .as_str()
        .unwrap()
        .to_owned();
    c.ok("join", json!({"ticket": fresh, "path": root_c}));
    wait_until(Duration::from_secs(60), "C's copy", || {
        (tree_state(&root_a) == tree_state(&root_c)).then_some(())
    });
    assert_eq!(workspace_entry(&c, &ws)["role"], "viewer");
    // B learned from A that C is a viewer (membership is pushed by owners).
    let id_c = c.device_id();
    wait_until(Duration::from_secs(30), "B to learn C's role", || {
        workspace_entry(&b, &ws)["members"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["device_id"] == id_c && m["role"] == "viewer")
            .then_some(())
    });
}
