//! Capture of meshed pods into the node daemon, STRICT in the kernel, the L4 policy fast path.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use mesh_common::{DropReason, Stat};
use mesh_node::datapath::{DenyRule, EndpointSpec, NodeSpec, PodSpec, Protocol, ServiceSpec};
use mesh_tests::Spawn;

use crate::{APP_PORT, Fixture, WHOAMI, answered_by};

const CAPTURE_PORT: u16 = 15001;
const HBONE_PORT: u16 = 15008;

fn pod_spec(f: &Fixture, pod: &str, identity: u32, meshed: bool) -> PodSpec {
    let p = f.lab.pod(pod);
    PodSpec { name: pod.into(), cgroup: p.cgroup.clone(), addr: IpAddr::V4(p.ip), identity, meshed }
}

fn endpoint(f: &Fixture, pod: &str, identity: u32, strict: bool) -> EndpointSpec {
    let p = f.lab.pod(pod);
    EndpointSpec { addr: IpAddr::V4(p.ip), identity, meshed: true, strict, local: p.node == 1 }
}

fn app(f: &Fixture, pod: &str) -> SocketAddr {
    SocketAddr::from((f.lab.pod(pod).ip, APP_PORT))
}

#[test]
fn meshed_pods_are_captured_with_their_exact_original_destination() {
    let mut f = Fixture::new(&[2, 1], &["n2p1"]);
    // A stand-in for the daemon's outbound listener, in node 1's namespace and system cgroup:
    // it answers with what getsockopt(SO_ORIGINAL_DST) returns.
    let node = f.lab.node(1).clone();
    let listen = SocketAddr::from((node.pod_gateway, CAPTURE_PORT));
    let listen_arg = listen.to_string();
    let args = ["origdst", "--listen", listen_arg.as_str()];
    let mut daemon = f.lab.spawn(&Spawn::new(&node.netns, &node.system_cgroup, WHOAMI, &args)).expect("start listener");
    daemon.wait_for_line("listening", Duration::from_secs(5)).expect("listener ready");

    let vip = SocketAddr::from((Ipv4Addr::new(198, 19, 0, 10), 80));
    let backend = f.backend("n2p1");
    let dp = f.load();
    dp.set_node(&NodeSpec { capture: Some(listen), hbone_port: HBONE_PORT, bypass: false, daemon_mark: mesh_common::DEFAULT_DAEMON_MARK }).expect("node config");
    let pods = [pod_spec(&f, "n1p1", 1, true), pod_spec(&f, "n1p2", 2, false)];
    f.dp().sync_pods(&pods).expect("pods");
    f.dp().upsert_service(&ServiceSpec::tcp(vip.ip(), 80, vec![backend])).expect("service");

    let client = f.lab.pod("n1p1").ip;
    let to_pod = f.dial_one("n1p1", app(&f, "n2p1"));
    let direct = app(&f, "n2p1");
    assert!(to_pod.starts_with(&format!("connected peer={direct} orig={direct} peer={client}:")), "pod address: {to_pod}");
    let to_vip = f.dial_one("n1p1", vip);
    assert!(to_vip.starts_with(&format!("connected peer={vip} orig={vip} ")), "the VIP exactly as dialed: {to_vip}");
    assert_eq!(f.stats().event(Stat::Captured), 2);
    assert_eq!(f.stats().event(Stat::OrigDstAnswered), 2);
    assert_eq!(f.accepted("n2p1"), 0, "captured connections never went to the destination directly");

    // Not captured: unmeshed pods, the HBONE port, and the daemon itself (no loops).
    assert_eq!(answered_by(&f.dial_one("n1p2", direct)), Some("n2p1"), "unmeshed pod goes direct");
    let hbone = f.dial("n1p1", SocketAddr::from((f.lab.pod("n2p1").ip, HBONE_PORT)), &["--timeout-ms", "1000"]);
    assert!(hbone[0].contains("ECONNREFUSED"), "port 15008 is not captured (nothing listens there): {hbone:?}");
    let out = f
        .lab
        .spawn(&Spawn::new(&node.netns, &node.system_cgroup, WHOAMI, &["connect", &direct.to_string()]))
        .and_then(|mut p| p.wait_for_line("connected", Duration::from_secs(5)))
        .expect("daemon cgroup dial");
    assert!(out.contains("whoami name=n2p1"), "the daemon's own connections are never captured: {out}");
    assert_eq!(f.stats().event(Stat::Captured), 2);
}

#[test]
fn strict_pods_refuse_plaintext_from_outside_the_mesh_in_the_kernel() {
    let mut f = Fixture::new(&[3, 1], &["n1p2"]);
    let endpoints = [endpoint(&f, "n1p2", 2, true)];
    f.load().sync_endpoints(&endpoints).expect("endpoints");
    f.dp().set_node(&NodeSpec { capture: None, hbone_port: HBONE_PORT, bypass: false, daemon_mark: mesh_common::DEFAULT_DAEMON_MARK }).expect("node config");
    let host_if = f.lab.pod("n1p2").host_if.clone();
    let netns = f.lab.node(1).netns.clone();
    let dp = f.datapath.as_mut().expect("loaded");
    f.lab.in_netns(&netns, || dp.attach_pod_interface(&host_if, None)).expect("enter node netns").expect("attach tc");

    let target = app(&f, "n1p2");
    for from in ["n2p1", "n1p3"] {
        let out = f.dial(from, target, &["--timeout-ms", "1500"]);
        assert!(out[0].contains("ETIMEDOUT"), "plaintext from {from} must be dropped: {out:?}");
    }
    assert!(f.stats().drop(DropReason::StrictPlaintext) >= 2, "{:?}", f.stats());
    assert_eq!(f.accepted("n1p2"), 0);

    // Another process of the node is outside the mesh too.
    let node = f.lab.node(1).clone();
    let mut p = f.lab.spawn(&Spawn::new(&node.netns, &node.system_cgroup, WHOAMI, &["connect", &target.to_string(), "--timeout-ms", "1500"])).expect("spawn");
    let line = p.wait_for_line("ETIMEDOUT", Duration::from_secs(5)).expect("a node process without the daemon's mark is refused");
    assert!(!line.contains("name=n1p2"), "{line}");

    // The daemon's connections (its socket mark) get through, from any cgroup.
    let greeting = f.lab.in_netns(&netns, || greeting_with_mark(target, mesh_common::DEFAULT_DAEMON_MARK)).expect("enter node netns");
    assert!(greeting.as_deref().is_ok_and(|g| g.contains("name=n1p2")), "a SYN with the daemon's mark: {greeting:?}");
    let other_mark = f.lab.in_netns(&netns, || greeting_with_mark(target, 0x4000)).expect("enter node netns");
    assert!(other_mark.is_err(), "another mark (kube-proxy's) proves nothing: {other_mark:?}");

    // So do the kubelet's probes: its cgroup is trusted.
    f.dp().sync_trusted(&[(std::process::id(), node.system_cgroup.clone())]).expect("trusted cgroup");
    let mut p = f.lab.spawn(&Spawn::new(&node.netns, &node.system_cgroup, WHOAMI, &["connect", &target.to_string()])).expect("spawn");
    let line = p.wait_for_line("connected", Duration::from_secs(5)).expect("dial from a trusted cgroup");
    assert!(line.contains("whoami name=n1p2"), "{line}");
    f.dp().sync_trusted(&[]).expect("no trusted cgroup");

    // PERMISSIVE: the same plaintext connection passes.
    let permissive = [endpoint(&f, "n1p2", 2, false)];
    f.dp().sync_endpoints(&permissive).expect("endpoints");
    assert_eq!(answered_by(&f.dial_one("n2p1", target)), Some("n1p2"));
}

/// The first line `target` sends on a connection made with `SO_MARK` `mark` (2 s to connect).
fn greeting_with_mark(target: SocketAddr, mark: u32) -> std::io::Result<String> {
    use std::io::{BufRead as _, BufReader};
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.set_mark(mark)?;
    socket.connect_timeout(&target.into(), Duration::from_secs(2))?;
    let stream: std::net::TcpStream = socket.into();
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    Ok(line)
}

#[test]
fn l4_policy_denies_in_the_kernel_before_any_byte_leaves() {
    let mut f = Fixture::new(&[2, 1], &["n2p1"]);
    f.load();
    let pods = [pod_spec(&f, "n1p1", 1, false), pod_spec(&f, "n1p2", 3, false)];
    f.dp().sync_pods(&pods).expect("pods");
    let endpoints = [endpoint(&f, "n2p1", 2, false)];
    f.dp().sync_endpoints(&endpoints).expect("endpoints");
    let deny = DenyRule { src_identity: 1, dst_identity: 2, port: APP_PORT, protocol: Protocol::Tcp };
    f.dp().sync_policy(&[deny]).expect("policy");
    let vip = SocketAddr::from((Ipv4Addr::new(198, 19, 0, 11), 80));
    let backend = f.backend("n2p1");
    f.dp().upsert_service(&ServiceSpec::tcp(vip.ip(), 80, vec![backend])).expect("service");

    let direct = app(&f, "n2p1");
    assert!(f.dial_one("n1p1", direct).contains("EPERM"), "denied identity pair");
    assert!(f.dial_one("n1p1", vip).contains("EPERM"), "denied through the Service too");
    assert_eq!(f.stats().drop(DropReason::PolicyDenied), 2);
    assert_eq!(f.accepted("n2p1"), 0, "the destination never saw the denied connections");
    assert_eq!(answered_by(&f.dial_one("n1p2", direct)), Some("n2p1"), "other identities are not affected");

    f.dp().sync_policy(&[]).expect("clear policy");
    assert_eq!(answered_by(&f.dial_one("n1p1", direct)), Some("n2p1"), "allowed once the rule is gone");
}

#[test]
fn pod_cgroups_are_discovered_by_their_network_namespace_addresses() {
    let f = Fixture::new(&[2, 1], &["n1p1", "n1p2", "n2p1"]);
    let found = mesh_node::datapath::discover::pod_cgroups(&f.lab.node(1).cgroup).expect("scan cgroups");
    for pod in ["n1p1", "n1p2"] {
        let p = f.lab.pod(pod);
        let addrs = found.get(&p.cgroup).unwrap_or_else(|| panic!("{pod}'s cgroup not found in {found:?}"));
        assert!(addrs.contains(&IpAddr::V4(p.ip)) && addrs.contains(&IpAddr::V6(p.ip6)), "{pod}: {addrs:?}");
    }
    let n2 = f.lab.pod("n2p1");
    assert!(!found.contains_key(&n2.cgroup), "node 2's pods are outside node 1's cgroup");
}

#[test]
fn an_oversized_update_is_refused_whole_with_a_clear_error() {
    use mesh_common::names::MAP_ENDPOINTS;
    let mut f = Fixture::new(&[1, 1], &[]);
    let before = [endpoint(&f, "n2p1", 2, false)];
    f.load().sync_endpoints(&before).expect("endpoints");
    let too_many: Vec<EndpointSpec> = (0..=mesh_common::names::MAX_ENDPOINTS)
        .map(|i| EndpointSpec { addr: IpAddr::V6(std::net::Ipv6Addr::from(0xfd00_u128 << 112 | u128::from(i))), identity: i, meshed: true, strict: false, local: false })
        .collect();
    let err = f.dp().sync_endpoints(&too_many).expect_err("over capacity");
    let max = mesh_common::names::MAX_ENDPOINTS;
    assert_eq!(err.to_string(), format!("map {MAP_ENDPOINTS} is full (capacity {max}) while writing {} entries requested", max + 1));
    // Nothing was written: the pinned map still holds exactly the previous entry.
    let map = f.pin_dir().join(MAP_ENDPOINTS);
    let dump = std::process::Command::new("bpftool").args(["-j", "map", "dump", "pinned"]).arg(&map).output().expect("bpftool");
    let text = String::from_utf8_lossy(&dump.stdout);
    assert_eq!(text.matches("\"formatted\"").count(), 1, "partial write after a refused update: {}", &text[..text.len().min(400)]);
    let after = [endpoint(&f, "n2p1", 2, false), endpoint(&f, "n1p1", 1, false)];
    f.dp().sync_endpoints(&after).expect("a fitting update still applies");
}
