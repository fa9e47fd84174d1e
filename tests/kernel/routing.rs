//! The node's policy routing (`mesh_node::routing`): HBONE addressed to a local pod reaches the
//! node's listener (how a ztunnel, which dials pod-ip:15008, reaches our daemon), and with a
//! transparent (source-preserving) connection the pod's replies come back to the node socket.

use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, SocketAddr, TcpListener},
    process::Command,
    time::Duration,
};

use mesh_node::routing::{self, Routes, Want};

use crate::{APP_PORT, Fixture};

const HBONE: u16 = 15008;

fn routes(f: &Fixture, node: u8, transparent: bool) -> Routes {
    let cfg = routing::Config { node_name: format!("n{node}"), hbone_port: HBONE, transparent, keep_existing: false, plaintext: None };
    f.lab
        .in_netns(&f.lab.node(node).netns, || Routes::new(cfg, routing::Metrics::default()))
        .expect("enter node netns")
        .expect("routing set up (CAP_NET_ADMIN)")
}

fn ip_rules(f: &Fixture, node: u8) -> String {
    let ns = &f.lab.node(node).netns;
    let v4 = Command::new("ip").args(["-n", ns, "rule", "show"]).output().expect("ip rule");
    let v6 = Command::new("ip").args(["-n", ns, "-6", "rule", "show"]).output().expect("ip -6 rule");
    format!("{}{}", String::from_utf8_lossy(&v4.stdout), String::from_utf8_lossy(&v6.stdout))
}

/// A stand-in for the daemon's HBONE listener on node 2 (`[::]:15008`, dual stack): answers each
/// connection with the addresses it saw.
fn node_listener(f: &Fixture, node: u8) {
    let listener = f.lab.in_netns(&f.lab.node(node).netns, || TcpListener::bind(("::", HBONE))).expect("netns").expect("bind");
    // As the daemon's inbound does: answering from the pod's address takes IP_TRANSPARENT.
    let tokio_listener = {
        listener.set_nonblocking(true).expect("nonblocking");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let _guard = rt.enter();
        tokio::net::TcpListener::from_std(listener).expect("tokio listener")
    };
    mesh_node::proxy::socket::set_transparent(&tokio_listener).expect("IP_TRANSPARENT");
    let listener = tokio_listener.into_std().expect("std listener");
    listener.set_nonblocking(false).expect("blocking");
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let (peer, local) = (s.peer_addr().expect("peer"), s.local_addr().expect("local"));
            let _ = writeln!(s, "whoami name=node-listener peer={peer} local={local}");
        }
    });
}

#[test]
fn hbone_to_a_local_pod_address_reaches_the_node_listener_only_while_the_rule_is_installed() {
    let f = Fixture::new(&[1, 1], &[]);
    node_listener(&f, 2);
    let pod = f.lab.pod("n2p1").clone();
    let (v4, v6) = (SocketAddr::from((pod.ip, HBONE)), SocketAddr::from((pod.ip6, HBONE)));
    // Without the rule the packets are forwarded to the pod, where nothing listens on 15008.
    assert!(f.dial_one("n1p1", v4).contains("ECONNREFUSED"), "{}", f.dial_one("n1p1", v4));

    let mut r = routes(&f, 2, false);
    let want = BTreeSet::from([Want::Hbone(IpAddr::V4(pod.ip)), Want::Hbone(IpAddr::V6(pod.ip6))]);
    assert_eq!(r.sync(&want), 2);
    let rules = ip_rules(&f, 2);
    assert!(rules.contains(&format!("to {} ipproto tcp dport 15008 lookup 15008", pod.ip)), "{rules}");
    for (target, client) in [(v4, f.lab.pod("n1p1").ip.to_string()), (v6, f.lab.pod("n1p1").ip6.to_string())] {
        let line = f.dial_one("n1p1", target);
        assert!(line.contains("name=node-listener"), "{target}: {line}");
        // The accepted socket keeps the pod's address as its local address: the daemon picks
        // the certificate to present by it.
        assert!(line.contains(&format!("local={target}")) || line.contains(&format!("local=[::ffff:{}]:{HBONE}", pod.ip)), "{line}");
        assert!(line.contains(&client), "the node sees the real client address: {line}");
    }
    // Other ports to the pod are untouched.
    let other = SocketAddr::from((pod.ip, APP_PORT));
    assert!(f.dial_one("n1p1", other).contains("ECONNREFUSED"));

    // A restarted daemon adopts what the previous one left: HBONE keeps reaching the node
    // before its first state (no gap), and the first state decides what stays.
    drop(r);
    let mut r = routes(&f, 2, false);
    assert!(f.dial_one("n1p1", v4).contains("name=node-listener"), "kept across the restart: {}", ip_rules(&f, 2));
    assert_eq!(r.sync(&want), 2, "adopted, not installed twice");
    // A pod that leaves the node loses its rule.
    assert_eq!(r.sync(&BTreeSet::new()), 0);
    assert!(f.dial_one("n1p1", v4).contains("ECONNREFUSED"));
    // A rule the new configuration would not write (another HBONE port) goes at start.
    r.sync(&want);
    drop(r);
    let cfg = routing::Config { node_name: "n2".into(), hbone_port: HBONE + 1000, transparent: false, keep_existing: false, plaintext: None };
    let r = f.lab.in_netns(&f.lab.node(2).netns, || Routes::new(cfg, routing::Metrics::default())).expect("netns").expect("routing");
    assert!(!ip_rules(&f, 2).contains("dport 15008 lookup 15008"), "a rule for the old port: {}", ip_rules(&f, 2));
    drop(r);
}

/// Connects from node 2 to n2p1's app port with n1p1's address as the source (as the inbound
/// does with `MESH_INBOUND_TRANSPARENT`); the first line the server sends, or the error.
fn transparent_dial(f: &Fixture) -> Result<String, String> {
    let (client, server) = (f.lab.pod("n1p1").ip, f.lab.pod("n2p1").ip);
    f.lab
        .in_netns(&f.lab.node(2).netns, || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async {
                let dial = mesh_node::proxy::socket::connect(Some(IpAddr::V4(client)), SocketAddr::from((server, APP_PORT)), mesh_common::DEFAULT_DAEMON_MARK);
                let s = tokio::time::timeout(Duration::from_millis(1500), dial)
                    .await
                    .map_err(|_| "timed out".to_owned())?
                    .map_err(|e| e.to_string())?;
                let mut line = String::new();
                let s = s.into_std().map_err(|e| e.to_string())?;
                s.set_nonblocking(false).map_err(|e| e.to_string())?;
                s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
                BufReader::new(s).read_line(&mut line).map_err(|e| e.to_string())?;
                Ok(line)
            })
        })
        .expect("netns")
}

#[test]
fn transparent_connections_get_their_replies_back_and_the_pod_sees_the_client_address() {
    let mut f = Fixture::new(&[1, 1], &["n2p1"]);
    let err = transparent_dial(&f).expect_err("without the rule the pod's SYN-ACK goes to node 1");
    assert!(err.contains("timed out"), "{err}");
    let mut r = routes(&f, 2, true);
    r.sync(&BTreeSet::from([Want::Replies(IpAddr::V4(f.lab.pod("n2p1").ip))]));
    let rules = ip_rules(&f, 2);
    assert!(rules.contains(&format!("from {} iif br0 ipproto tcp dport 61000-65534 lookup 15008", f.lab.pod("n2p1").ip)), "{rules}");
    let line = transparent_dial(&f).expect("transparent connection");
    let client = f.lab.pod("n1p1").ip;
    assert!(line.contains(&format!("peer={client}:")), "the pod sees the client pod's address: {line}");
    // The pod's other traffic keeps its path: a plain connection from n1p1 (ephemeral port
    // below the transparent range) is answered straight to n1p1.
    let direct = f.dial_one("n1p1", SocketAddr::from((f.lab.pod("n2p1").ip, APP_PORT)));
    assert!(direct.contains("whoami name=n2p1"), "{direct}");
    f.servers.clear();
}
