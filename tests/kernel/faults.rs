//! Kernel faults: a pinned map the daemon cannot use, a program the verifier refuses, an attach
//! the kernel refuses; the pin of a map an earlier version used; a Service the kernel refuses
//! next to a STRICT pod. (A full map is
//! `capture::an_oversized_update_is_refused_whole_with_a_clear_error`.)

use std::{
    collections::{BTreeMap, BTreeSet},
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

/// The datapath of node 1 balancing a Service over n2p1 and n2p2, then its daemon stopped: the
/// pinned links and maps keep serving. Returns the fixture and the pods that answer.
fn a_stopped_daemons_kernel_serving_a_service() -> (Fixture, BTreeSet<String>) {
    let mut f = Fixture::new(&[1, 2], &["n2p1", "n2p2"]);
    let spec = ServiceSpec::tcp(vip().ip(), 80, vec![f.backend("n2p1"), f.backend("n2p2")]);
    f.load().upsert_service(&spec).expect("install service");
    let both: BTreeSet<String> = ["n2p1", "n2p2"].map(String::from).into();
    assert_eq!(answering(&f), both);
    f.datapath = None;
    (f, both)
}

#[test]
fn a_pinned_map_of_another_layout_stops_the_start_and_the_kernel_keeps_serving() {
    let (mut f, both) = a_stopped_daemons_kernel_serving_a_service();
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

/// The embedded object with `program`'s first instruction replaced by a read above the stack
/// (`r0 = *(u64 *)(r10 + 0)`; the stack grows down from r10): the verifier refuses it, as it
/// would a program using a feature the kernel lacks.
fn object_with_refused_program(program: &str) -> Vec<u8> {
    use object::{Object as _, ObjectSection as _, ObjectSymbol as _};
    let mut bytes = mesh_node::datapath::embedded_object().to_vec();
    let offset = {
        let elf = object::File::parse(&*bytes).expect("parse the embedded object");
        let symbol = elf.symbols().find(|s| s.name() == Ok(program)).unwrap_or_else(|| panic!("no symbol {program} in the object"));
        let section = elf.section_by_index(symbol.section_index().expect("a program's symbol is in a section")).expect("its section");
        let (start, _) = section.file_range().expect("a program's section has bytes");
        // In a relocatable object a symbol's value is its offset in its section.
        usize::try_from(start + symbol.address()).expect("an offset in the file")
    };
    // A 16-byte load (BPF_LD | BPF_IMM | BPF_DW, 0x18) there would carry a relocation that
    // the loader, not the verifier, would refuse once overwritten.
    assert_ne!(bytes[offset], 0x18, "{program} starts with a 64-bit load: pick another instruction to break");
    // BPF_LDX | BPF_MEM | BPF_DW (0x79), dst r0, src r10 (0xa0), offset 0, no immediate. (An
    // `exit` there instead leaves the rest unreachable, refused before any register is read.)
    bytes[offset..offset + 8].copy_from_slice(&[0x79, 0xa0, 0, 0, 0, 0, 0, 0]);
    bytes
}

/// Program id each pinned link runs, by pin name (`bpftool link show pinned`).
fn pinned_links(f: &Fixture) -> BTreeMap<String, u64> {
    let dir = f.pin_dir().join("links");
    let mut links = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).expect("links dir") {
        let path = entry.expect("a link pin").path();
        let out = Command::new("bpftool").args(["-j", "link", "show", "pinned"]).arg(&path).output().expect("run bpftool");
        assert!(out.status.success(), "bpftool link show pinned {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
        let link: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool's JSON");
        let prog = link["prog_id"].as_u64().unwrap_or_else(|| panic!("no prog_id in {link}"));
        links.insert(path.file_name().expect("a name").to_string_lossy().into_owned(), prog);
    }
    links
}

#[test]
fn a_program_the_verifier_refuses_stops_the_start_and_no_link_moves() {
    let (mut f, both) = a_stopped_daemons_kernel_serving_a_service();
    let programs = mesh_programs_loaded();
    let links = pinned_links(&f);
    assert!(links.contains_key(names::PROG_CONNECT4), "connect4's link is pinned: {links:?}");

    // The program verified last: every other one of the new object loads first, so a refusal
    // that moved links as it went would have moved them all by then.
    let refused = names::PROG_TC_STEER;
    let object = object_with_refused_program(refused);
    let config = DatapathConfig { cgroup: f.lab.node(1).cgroup.clone(), netns: crate::node_netns(&f.lab, 1), pin_dir: Some(f.pin_dir()) };
    let mut datapath = Datapath::load_object(config, &object).expect("the object's maps load (the verifier sees programs at attach)");
    let err = datapath.attach().expect_err("the verifier refuses the broken program");
    drop(datapath);
    assert!(matches!(err, Error::Program { name, .. } if name == refused), "{err:?}");
    let text = err.to_string();
    assert!(text.starts_with(&format!("program {refused}: the BPF_PROG_LOAD syscall returned ")), "{text}");
    assert!(text.contains("invalid read from stack R10 off=0 size=8"), "the verifier's own words are in the error: {text}");

    assert_eq!(pinned_links(&f), links, "every pinned link still runs the previous programs");
    assert_eq!(mesh_programs_loaded(), programs, "the refused start holds no program once dropped");
    assert_eq!(answering(&f), both, "the kernel keeps balancing with the previous programs");
    // The next good start adopts it all.
    assert_eq!(f.load().service_count(), 1, "a good start adopts the installed Service");
    assert_eq!(answering(&f), both);
}

/// The daemon's kernel sync applies each map on its own: a Service the kernel refuses (port 0)
/// does not keep a STRICT pod's flag out of the endpoint map. Before, the Service's refusal
/// ended the sync before the endpoint and policy maps were written.
#[test]
fn a_service_the_kernel_refuses_does_not_hold_back_a_strict_pod() {
    use mesh_node::kernel_sync::{Config, KernelSync, Metrics};
    let mut f = Fixture::new(&[1, 1], &[]);
    f.load();
    let datapath = f.datapath.take().expect("loaded");
    let pod = f.lab.pod("n1p1").clone();
    let refused = ServiceSpec::tcp("198.19.0.99".parse().expect("ip"), 0, vec![f.backend("n1p1")]);
    let config = Config { node_name: "n1".into(), cgroup: f.lab.node(1).cgroup.clone(), static_services: vec![refused], pod_interfaces: Vec::new() };
    let mut registry = prometheus_client::registry::Registry::default();
    let mut sync = KernelSync::new(config, datapath, Metrics::new(&mut registry)).expect("kernel sync");
    let snapshot = serde_json::json!({
        "workloads": [{"name": "n1p1", "namespace": "demo", "serviceAccount": "n1p1", "ip": pod.ip.to_string(), "node": "n1", "nodeIp": "198.18.0.1", "protocol": "HBONE"}],
        "peerAuthentications": [{"name": "strict", "namespace": "demo", "mode": "STRICT"}],
    });
    let state = mesh_node::state::State::build("cluster.local", "mesh-system", serde_json::from_value(snapshot).expect("snapshot")).expect("state");
    let err = sync.apply(&state).expect_err("the Service is refused");
    assert!(err.to_string().contains("port 0"), "{err}");
    let map = f.pin_dir().join(names::MAP_ENDPOINTS);
    let dump = Command::new("bpftool").args(["-j", "map", "dump", "pinned"]).arg(&map).output().expect("bpftool");
    let entries: serde_json::Value = serde_json::from_slice(&dump.stdout).unwrap_or_else(|e| panic!("bpftool JSON: {e}: {}", String::from_utf8_lossy(&dump.stdout)));
    let strict = entries.as_array().expect("entries").iter().filter(|e| e["formatted"]["value"]["flags"].as_u64().is_some_and(|f| f & u64::from(mesh_common::endpoint::flags::STRICT) != 0)).count();
    assert_eq!(strict, 1, "the STRICT pod is in the endpoint map although the Service was refused: {entries}");
}
