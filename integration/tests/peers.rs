//! Devices trust each other, connect over libp2p on loopback, refuse
//! strangers, and find each other again after a restart.

use std::time::Duration;

use mariesync_integration::*;
use serde_json::json;

#[test]
fn trusted_devices_connect_and_show_in_status() {
    let (dir_a, dir_b) = (temp_dir(), temp_dir());
    let a = Device::start(dir_a.path());
    let b = Device::start(dir_b.path());
    let (id_a, id_b) = (a.device_id(), b.device_id());
    let out = a.cli_json(&["peer", "add", &id_b, "--name", "bee"]);
    assert_eq!(out, json!({}));
    b.cli_json(&["peer", "add", &id_a, "--addr", &a.listen_addr()]);
    a.wait_connected(&id_b);
    b.wait_connected(&id_a);
    let listed = a.cli_json(&["peer", "list"]);
    assert_eq!(listed["peers"][0]["device_id"], id_b);
    assert_eq!(listed["peers"][0]["name"], "bee");
    assert_eq!(listed["peers"][0]["connected"], true);
    let status = a.cli_json(&["status"]);
    assert!(
        status["listen_addrs"][0]
            .as_str()
            .unwrap()
            .starts_with("/ip4/127.0.0.1/tcp/"),
        "{status}"
    );
    assert_eq!(status["peers"][0]["connected"], true);

    // Forgetting a device closes its connection.
    a.cli_json(&["peer", "remove", &id_b]);
    wait_until(
        Duration::from_secs(30),
        "b to see the connection closed",
        || {
            b.peer(&id_a)
                .filter(|p| p["connected"] == false)
                .map(|_| ())
        },
    );
    assert!(a.peer(&id_b).is_none());
}

/// A device that trusts nobody refuses a device that trusts it: the
/// stranger's connection is closed right after the handshake.
#[test]
fn untrusted_device_is_refused() {
    let (dir_a, dir_c) = (temp_dir(), temp_dir());
    let a = Device::start(dir_a.path());
    let c = Device::start(dir_c.path());
    let mut a_events = a.client();
    a_events.call("events.subscribe", json!({})).unwrap();
    let mut c_events = c.client();
    c_events.call("events.subscribe", json!({})).unwrap();
    let id_a = a.device_id();
    c.cli_json(&["peer", "add", &id_a, "--addr", &a.listen_addr()]);
    // The attempt is visible on c's side as a closed connection.
    loop {
        let event = c_events.next_notification().unwrap().params;
        if event["kind"] == "peer_disconnected" && event["device_id"] == id_a {
            break;
        }
    }
    assert_eq!(a.cli_json(&["peer", "list"]), json!({"peers": []}));
    assert_eq!(c.peer(&id_a).unwrap()["connected"], false);
    // Once a trusts c too, they connect: the refusal was the trust check.
    a.cli_json(&["peer", "add", &c.device_id()]);
    c.wait_connected(&id_a);
    loop {
        let event = a_events.next_notification().unwrap().params;
        assert_ne!(event["kind"], "gap");
        if event["kind"] == "peer_connected" {
            assert_eq!(event["device_id"], c.device_id());
            break;
        }
    }
}

/// A paired device that crashes and comes back is reconnected without
/// anyone asking.
#[test]
fn a_restarted_peer_reconnects_by_itself() {
    let (dir_a, dir_b) = (temp_dir(), temp_dir());
    let a = Device::start(dir_a.path());
    let mut b = Device::start(dir_b.path());
    let (id_a, id_b) = (a.device_id(), b.device_id());
    a.trust_each_other(&b);
    b.restart();
    b.wait_connected(&id_a);
    a.wait_connected(&id_b);
}

#[test]
fn bad_peer_input_is_refused_clearly() {
    let dir = temp_dir();
    let a = Device::start(dir.path());
    let bad = a.cli(&["peer", "add", "not-a-device-id", "--json"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("is not a device ID"));
    let own = a.cli(&["peer", "add", &a.device_id()]);
    assert!(String::from_utf8_lossy(&own.stderr).contains("own ID"));
    let addr = a.cli(&[
        "peer",
        "add",
        "12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo",
        "--addr",
        "nonsense",
    ]);
    assert!(String::from_utf8_lossy(&addr.stderr).contains("is not a multiaddr"));
    assert_eq!(a.cli_json(&["peer", "list"]), json!({"peers": []}));
}
