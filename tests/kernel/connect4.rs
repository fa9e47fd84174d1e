//! `cgroup/connect4` socket load balancing: a client pod on node 1 dials a Service VIP and lands
//! on backend pods of node 2; without the program the same dial is unreachable in the namespace.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    process::Command,
    time::Duration,
};

use mesh_node::datapath::{BackendSpec, Datapath, DatapathConfig, ServiceSpec};
use mesh_tests::{Lab, LabSpec, require_root};

const WHOAMI: &str = env!("CARGO_BIN_EXE_mesh-whoami");
const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);

fn dial(lab: &Lab, pod: &str, target: &str) -> String {
    let out = lab.run_in_pod(pod, WHOAMI, &["connect", target]).expect("run client");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn prog_listed() -> bool {
    let out = Command::new("bpftool").args(["prog", "list"]).output().expect("bpftool");
    String::from_utf8_lossy(&out.stdout).contains("mesh_connect4")
}

#[test]
fn vip_is_rewritten_to_backends_on_another_node_and_unreachable_without_the_program() {
    require_root();
    let mut lab = Lab::build(LabSpec::for_test(&[1, 2])).expect("build lab");
    let mut servers = Vec::new();
    for pod in ["n2p1", "n2p2"] {
        let mut server = lab
            .spawn_in_pod(pod, WHOAMI, &["serve", "--name", pod, "--tcp", "8080"])
            .expect("start server");
        server.wait_for_line("listening", Duration::from_secs(5)).expect("server ready");
        servers.push(server);
    }
    let target = format!("{VIP}:80");

    // No program: the VIP has no route anywhere in the lab.
    let out = dial(&lab, "n1p1", &target);
    assert!(out.contains("ENETUNREACH"), "expected unreachable without the datapath, got {out:?}");

    let mut datapath = Datapath::load(DatapathConfig {
        cgroup: lab.node(1).pods_cgroup.clone(),
        pin_dir: Some(lab.bpffs.join("n1")),
    })
    .expect("load datapath");
    datapath.attach().expect("attach connect4");
    let backend = |pod: &str| BackendSpec {
        addr: IpAddr::V4(lab.pod(pod).ip),
        port: 8080,
        weight: 1,
        healthy: true,
    };
    datapath
        .upsert_service(&ServiceSpec::tcp(IpAddr::V4(VIP), 80, vec![backend("n2p1"), backend("n2p2")]))
        .expect("install service");
    assert!(prog_listed(), "bpftool prog list must show mesh_connect4 while attached");

    let mut answered = BTreeSet::new();
    for _ in 0..30 {
        let out = dial(&lab, "n1p1", &target);
        assert!(out.starts_with("connected"), "dial through the VIP failed: {out:?}");
        let client_ip = lab.pod("n1p1").ip;
        assert!(out.contains(&format!("peer={client_ip}:")), "backend must see the client pod: {out:?}");
        let name = out.split("name=").nth(1).and_then(|s| s.split_whitespace().next()).expect("name");
        answered.insert(name.to_owned());
    }
    assert_eq!(answered, BTreeSet::from(["n2p1".to_owned(), "n2p2".to_owned()]), "both backends must serve");

    // Detached: back to unreachable, the VIP never leaks to a network.
    datapath.detach();
    let out = dial(&lab, "n1p1", &target);
    assert!(out.contains("ENETUNREACH"), "expected unreachable after detach, got {out:?}");
    drop(datapath);
    drop(servers);
    lab.teardown();
    assert!(!prog_listed(), "program must be gone after the test");
}
