//! Plaintext for a local meshed pod, from another node or from a pod on the same bridge, meets
//! the daemon: the plaintext rules of `mesh_node::routing` deliver it to node 1 (a same-node
//! pod's after `mesh_tc_steer` addressed it to the bridge) and `mesh_sk_lookup` hands it to
//! the plaintext listener whatever its port, with the pod's address and port as the accepted
//! socket's local address. STRICT pods drop it in the kernel; the node's own connections keep
//! their path; with no listener nothing answers, and nothing reaches the pod.

use std::{
    collections::BTreeSet,
    io::Write as _,
    net::{IpAddr, SocketAddr, TcpListener},
    os::fd::AsFd as _,
    time::Duration,
};

use mesh_common::DropReason;
use mesh_node::{
    datapath::{EndpointSpec, NodeSpec},
    routing::{self, Netlink, Routes, Want},
};
use mesh_tests::Spawn;

use crate::{APP_PORT, Fixture, WHOAMI, answered_by};

/// A stand-in for the daemon's plaintext listener in node `n`'s namespace (`0.0.0.0:<any>`,
/// `IP_TRANSPARENT` as the daemon's): answers each connection with the addresses it saw, until
/// it is shut down.
fn plaintext_listener(f: &Fixture, n: u8) -> TcpListener {
    let listener = f.lab.in_netns(&f.lab.node(n).netns, || TcpListener::bind("0.0.0.0:0")).expect("netns").expect("bind");
    let fd = listener.as_fd().try_clone_to_owned().expect("dup");
    nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::IpTransparent, &true).expect("IP_TRANSPARENT");
    let serving = listener.try_clone().expect("clone");
    std::thread::spawn(move || {
        // Ends when the test shuts the listener down (accept then fails).
        while let Ok((mut s, peer)) = serving.accept() {
            let local = s.local_addr().expect("local");
            let _ = writeln!(s, "whoami name=plaintext-listener peer={peer} local={local}");
        }
    });
    listener
}

fn routes(f: &Fixture, listener: SocketAddr) -> Routes {
    let cfg = routing::Config { node_name: "n1".into(), hbone_port: 15008, transparent: false, keep_existing: false, plaintext: Some(listener) };
    f.lab.in_netns(&f.lab.node(1).netns, || Routes::new(cfg, routing::Metrics::default())).expect("netns").expect("routing (CAP_NET_ADMIN)")
}

#[test]
fn plaintext_for_a_meshed_pod_meets_the_daemon_listener_and_strict_drops_it() {
    let mut f = Fixture::new(&[2, 1], &["n1p1"]);
    let (pod, client, neighbour) = (f.lab.pod("n1p1").clone(), f.lab.pod("n2p1").clone(), f.lab.pod("n1p2").clone());
    let app = SocketAddr::from((pod.ip, APP_PORT));
    // Before anything: the pod answers itself, to another node's pod and to its bridge neighbour.
    assert_eq!(answered_by(&f.dial_one("n2p1", app)), Some("n1p1"));
    assert_eq!(answered_by(&f.dial_one("n1p2", app)), Some("n1p1"));

    let listener = plaintext_listener(&f, 1);
    let endpoint = |strict| EndpointSpec { addr: IpAddr::V4(pod.ip), identity: 1, meshed: true, strict, local: true };
    let dp = f.load();
    dp.set_node(&NodeSpec { capture: None, hbone_port: 15008, bypass: false, daemon_mark: mesh_common::DEFAULT_DAEMON_MARK }).expect("node");
    dp.sync_endpoints(&[endpoint(false)]).expect("endpoints");
    let mut steering = dp.steering().expect("the listener map");
    steering.serve(listener.as_fd()).expect("a listening socket of the node's namespace");
    let mut rules = routes(&f, listener.local_addr().expect("addr"));
    assert_eq!(rules.sync(&BTreeSet::from([Want::Plaintext(IpAddr::V4(pod.ip))])), 1);
    // The pods' bridge ports, as the daemon attaches them.
    let node = f.lab.node(1).clone();
    for p in [&pod, &neighbour] {
        let dp = f.datapath.as_mut().expect("loaded");
        f.lab
            .in_netns(&node.netns, || {
                let links = Netlink::open().and_then(|n| n.peer_links()).expect("netlink");
                let mac = links.iter().find(|l| l.name == p.host_if).and_then(|l| l.bridge_mac);
                assert!(mac.is_some(), "{} is a port of the node's pod bridge", p.host_if);
                dp.attach_pod_interface(&p.host_if, mac)
            })
            .expect("netns")
            .expect("tc attached");
    }

    // From another node: the listener answers, for every port, and sees the real client and
    // the original destination.
    for port in [APP_PORT, 9999] {
        let dst = SocketAddr::from((pod.ip, port));
        let line = f.dial_one("n2p1", dst);
        assert_eq!(answered_by(&line), Some("plaintext-listener"), "{dst}: {line}");
        assert!(line.contains(&format!("local={dst}")), "the original destination is the local address: {line}");
        assert!(line.contains(&format!("peer={}:", client.ip)), "the real client: {line}");
    }
    // From the pod's bridge neighbour: up to the node (the bridge's MAC), then the same way.
    let line = f.dial_one("n1p2", app);
    assert_eq!(answered_by(&line), Some("plaintext-listener"), "same node: {line}");
    assert!(line.contains(&format!("local={app}")) && line.contains(&format!("peer={}:", neighbour.ip)), "{line}");
    assert_eq!(f.accepted("n1p1"), 2, "only the two unsteered connections reached the pod");

    // The node's own connections (the daemon forwarding, the kubelet probing) keep their path.
    let target = app.to_string();
    let mut own = f.lab.spawn(&Spawn::new(&node.netns, &node.system_cgroup, WHOAMI, &["connect", &target])).expect("spawn");
    let line = own.wait_for_line("", Duration::from_secs(5)).expect("an answer");
    assert_eq!(answered_by(&line), Some("n1p1"), "from the node itself: {line}");
    // The listener is IPv4: IPv6 to the pod gets no rule and keeps its path.
    let v6 = SocketAddr::from((pod.ip6, APP_PORT));
    assert_eq!(answered_by(&f.dial_one("n2p1", v6)), Some("n1p1"), "IPv6 is left to the pod");

    // STRICT: plaintext is dropped in the kernel (the client times out) and counted.
    let before = f.stats().drop(DropReason::StrictPlaintext);
    f.dp().sync_endpoints(&[endpoint(true)]).expect("endpoints");
    for from in ["n2p1", "n1p2"] {
        let out = f.dial(from, app, &["--timeout-ms", "700"]);
        assert!(out.iter().all(|l| l.contains("ETIMEDOUT")), "{from}: {out:?}");
    }
    assert!(f.stats().drop(DropReason::StrictPlaintext) >= before + 2, "the drops are counted");

    // The listener closes (the daemon died with no successor): not let through to the pod.
    f.dp().sync_endpoints(&[endpoint(false)]).expect("endpoints");
    nix::sys::socket::shutdown(std::os::fd::AsRawFd::as_raw_fd(&listener), nix::sys::socket::Shutdown::Both).expect("shutdown");
    drop(listener);
    std::thread::sleep(Duration::from_millis(100));
    // The SYN is still delivered to the node, which finds no socket and cannot answer for the
    // pod's address: unanswered, the client times out.
    let out = f.dial("n2p1", app, &["--timeout-ms", "700"]);
    assert!(out.iter().all(|l| l.contains("ETIMEDOUT")), "no listener: nothing answers: {out:?}");
    assert_eq!(f.accepted("n1p1"), 4, "the pod saw only the connections before steering, the node's own and IPv6");
    drop(rules);
}
