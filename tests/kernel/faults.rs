//! Kernel faults: a pinned map the daemon cannot use, an attach the kernel refuses; the pin of
//! a map an earlier version used. (A full map is
//! `capture::an_oversized_update_is_refused_whole_with_a_clear_error`.)

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    process::Command,
};

use mesh_common::names;
use mesh_node::datapath::{Datapath, DatapathConfig, Error, ServiceSpec};

use crate::{Fixture, answered_by, mesh_programs_loaded};

fn vip() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::new(198, 19, 0, 10), 80))
}

fn answering(f: &Fixture) -> BTreeSet<String> {
    f.dial("n1p1", vip(), &["--count", "20"]).iter().map(|l| answered_by(l).unwrap_or(l).to_owned()).collect()
}

#[test]
fn a_pinned_map_of_another_layout_stops_the_start_and_the_kernel_keeps_serving() {
    let mut f = Fixture::new(&[1, 2], &["n2p1", "n2p2"]);
    let spec = ServiceSpec::tcp(vip().ip(), 80, vec![f.backend("n2p1"), f.backend("n2p2")]);
    f.load().upsert_service(&spec).expect("install service");
    let both: BTreeSet<String> = ["n2p1", "n2p2"].map(String::from).into();
    assert_eq!(answering(&f), both);
    f.datapath = None; // the daemon stops: pinned links and maps keep serving
    let programs = mesh_programs_loaded();

    // Another build's map under our name (same name, other sizes), as an upgrade that changed a
    // map without renaming it would leave. The running programs keep the map they hold.
    let pin = f.pin_dir().join(names::MAP_TRUSTED);
    std::fs::remove_file(&pin).expect("unpin the real map");
    let made = Command::new("bpftool")
        .arg("map")
        .arg("create")
        .arg(&pin)
        .args(["type", "hash", "key", "8", "value", "4", "entries", "16", "name", names::MAP_TRUSTED])
        .status()
        .expect("run bpftool");
    assert!(made.success(), "bpftool map create");

    let config = DatapathConfig { cgroup: f.lab.node(1).cgroup.clone(), netns: crate::node_netns(&f.lab, 1), pin_dir: Some(f.pin_dir()) };
    let err = Datapath::load(config).err().expect("a start over an incompatible pin is refused");
    assert!(matches!(err, Error::IncompatiblePin { name: names::MAP_TRUSTED, .. }), "{err:?}");
    let text = err.to_string();
    let head = format!(
        "map MESH_TRUST_V1 pinned at {} has another layout (BPF_MAP_TYPE_HASH, key 8 B, value 4 B, 16 entries, flags 0x0) than this binary's (BPF_MAP_TYPE_HASH, key 8 B, value ",
        pin.display()
    );
    assert!(text.starts_with(&head), "{text}");
    assert!(text.contains("`mesh-node --uninstall`"), "the way out is named: {text}");

    // Nothing was loaded, no link moved: the kernel still balances with the old programs.
    assert_eq!(mesh_programs_loaded(), programs, "a refused start loads no program");
    assert_eq!(answering(&f), both, "the kernel keeps its last state");

    // The way out the error names: without the foreign pin the next start creates the map and
    // adopts everything else (the Service stays installed throughout).
    std::fs::remove_file(&pin).expect("remove the foreign pin");
    assert_eq!(f.load().service_count(), 1, "the restarted datapath adopts the installed Service");
    assert_eq!(answering(&f), both);
}

#[test]
fn the_pin_of_a_map_an_earlier_version_used_is_removed_at_start() {
    let mut f = Fixture::new(&[1, 1], &[]);
    f.load();
    f.datapath = None;
    // The endpoint map as a daemon before MESH_EP_V2 pinned it (65,536 entries).
    let old = f.pin_dir().join("MESH_EP_V1");
    let made = Command::new("bpftool")
        .arg("map")
        .arg("create")
        .arg(&old)
        .args(["type", "hash", "key", "16", "value", "8", "entries", "65536", "name", "MESH_EP_V1"])
        .status()
        .expect("run bpftool");
    assert!(made.success(), "bpftool map create");
    f.load();
    assert!(!old.exists(), "the retired map's pin is removed");
    assert!(f.pin_dir().join(names::MAP_ENDPOINTS).exists(), "the current one stays");
}

#[test]
fn an_attach_the_kernel_refuses_names_the_program_and_the_cgroup() {
    let f = Fixture::new(&[1, 1], &[]);
    // A directory, but not a cgroup (as a wrong MESH_CGROUP would be).
    let dir = std::env::temp_dir().join(format!("mesh-{}-not-a-cgroup", f.lab.spec.run));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let result = Datapath::load(DatapathConfig { cgroup: dir.clone(), netns: crate::node_netns(&f.lab, 1), pin_dir: Some(f.pin_dir()) }).map(|mut dp| dp.attach());
    let _ = std::fs::remove_dir(&dir);
    let err = result.expect("the object loads").expect_err("a directory that is not a cgroup cannot take programs");
    assert!(matches!(err, Error::Attach { name: names::PROG_SOCKOPS, .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.starts_with(&format!("attaching mesh_sockops to cgroup {}: ", dir.display())), "{text}");
    let links: Vec<_> = std::fs::read_dir(f.pin_dir().join("links")).expect("links dir").collect();
    assert!(links.is_empty(), "no link pinned by a failed attach: {links:?}");
    assert_eq!(mesh_programs_loaded(), 0, "the refused datapath holds no program once dropped");
}
