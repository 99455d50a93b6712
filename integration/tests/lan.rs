//! LAN discovery: two devices in their own network namespaces on a veth
//! link find each other by mDNS, with no address typed, and sync. Needs
//! root (CI runs as root); elsewhere it says loudly that it was skipped.

use std::time::Duration;

use mariesync_integration::*;

#[test]
fn devices_on_a_lan_discover_each_other_and_sync() {
    if !is_root() || std::process::Command::new("ip").arg("-V").output().is_err() {
        eprintln!(
            "SKIPPED devices_on_a_lan_discover_each_other_and_sync: needs root and iproute2 to make network namespaces"
        );
        return;
    }
    let lan = Lan::new("lan");
    let (dir_a, dir_b) = (temp_dir(), temp_dir());
    let a = Device::start_in_netns(dir_a.path(), &lan.names[0]);
    let b = Device::start_in_netns(dir_b.path(), &lan.names[1]);
    let (id_a, id_b) = (a.device_id(), b.device_id());
    // Trust only: no addresses.
    a.cli_json(&["peer", "add", &id_b]);
    b.cli_json(&["peer", "add", &id_a]);
    a.wait_connected(&id_b);
    b.wait_connected(&id_a);
    let address = a.peer(&id_b).unwrap()["address"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        address.contains("/ip4/10.231."),
        "connected over the LAN link: {address}"
    );

    let (_, root_a, root_b) = a.share_generated(dir_a.path(), &b, dir_b.path(), 60, 100);
    wait_until(
        Duration::from_secs(60),
        "the workspace to sync over the LAN",
        || (tree_state(&root_a) == tree_state(&root_b)).then_some(()),
    );
    drop(a);
    drop(b);
}
