//! Same-node bypass: sockops + sk_msg move payload socket to socket.

use std::net::{IpAddr, SocketAddr};

use mesh_common::Stat;
use mesh_node::datapath::{EndpointSpec, NodeSpec};

use crate::{APP_PORT, Fixture};

const PAYLOAD: &str = "33554432"; // 32 MiB, echoed back: 64 MiB through the bypass

#[test]
fn same_node_traffic_skips_the_stack_and_stays_byte_exact() {
    let mut f = Fixture::new(&[2], &["n1p2"]);
    let local = |pod: &str| EndpointSpec { addr: IpAddr::V4(f.lab.pod(pod).ip), identity: 0, meshed: false, strict: false, local: true };
    let endpoints = [local("n1p1"), local("n1p2")];
    let target = SocketAddr::from((f.lab.pod("n1p2").ip, APP_PORT));
    let dp = f.load();
    dp.sync_endpoints(&endpoints).expect("endpoints");

    // Baseline: plain TCP over the veths.
    dp.set_node(&NodeSpec { capture: None, hbone_port: 15008, bypass: false, daemon_mark: mesh_common::DEFAULT_DAEMON_MARK }).expect("node");
    let (tx0, _) = f.lab.pod_packets("n1p1").expect("counters");
    let out = f.dial("n1p1", target, &["--echo", PAYLOAD]);
    assert!(out[0].ends_with(&format!("echo ok bytes={PAYLOAD}")), "{out:?}");
    let (tx1, _) = f.lab.pod_packets("n1p1").expect("counters");
    let plain_packets = tx1 - tx0;

    // Bypass on: only the handshake and teardown use the wire.
    f.dp().set_node(&NodeSpec { capture: None, hbone_port: 15008, bypass: true, daemon_mark: mesh_common::DEFAULT_DAEMON_MARK }).expect("node");
    let out = f.dial("n1p1", target, &["--echo", PAYLOAD]);
    assert!(out[0].ends_with(&format!("echo ok bytes={PAYLOAD}")), "bypass must keep data byte-exact: {out:?}");
    let (tx2, _) = f.lab.pod_packets("n1p1").expect("counters");
    let bypass_packets = tx2 - tx1;
    // veth uses GSO: 32 MiB each way is ~512 64-KiB super-packets, plus ACKs.
    assert!(plain_packets > 300, "baseline moved {plain_packets} packets");
    assert!(bypass_packets <= 10, "with bypass only handshake + FIN should cross eth0, saw {bypass_packets}");
    let stats = f.stats();
    assert!(stats.event(Stat::BypassSocket) >= 2, "{stats:?}");
    assert!(stats.event(Stat::BypassRedirect) > 0, "{stats:?}");
}
