//! The HBONE stream-open path: the request of a CONNECT stream as a peer may send it (method,
//! authority, headers: `forwarded` among them), checked by `proxy::inbound::check_connect`
//! against a small node. No panic; a stream is opened only to a meshed workload of this node
//! whose identity this node presented; the client workload it is attributed to always owns the
//! client's authenticated identity, whatever `forwarded` claims.
//!
//! Input: the method, the authority and then `name: value` header lines, one per line.
#![no_main]

use std::{collections::BTreeMap, net::SocketAddr, sync::LazyLock};

use libfuzzer_sys::fuzz_target;
use mesh_node::{
    identity::Identity,
    proxy::inbound::{HboneConn, check_connect},
    state::{Protocol, Snapshot, State, Workload},
};

const NODE: &str = "n1";

fn workload(name: &str, node: &str, ip: [u8; 4], sa: &str, protocol: Protocol) -> Workload {
    Workload {
        name: name.into(),
        namespace: "demo".into(),
        service_account: sa.into(),
        workload_name: None,
        ip: ip.into(),
        node: node.into(),
        node_ip: [198, 18, 0, if node == NODE { 1 } else { 2 }].into(),
        labels: BTreeMap::new().into(),
        protocol,
        locality: None,
    }
}

/// Two meshed servers on this node (different identities), an unmeshed one, a server on another
/// node, and clients on the other node.
static STATE: LazyLock<State> = LazyLock::new(|| {
    let snapshot = Snapshot {
        workloads: vec![
            workload("whoami", NODE, [198, 18, 1, 12], "whoami", Protocol::Hbone),
            workload("other", NODE, [198, 18, 1, 14], "other", Protocol::Hbone),
            workload("legacy", NODE, [198, 18, 1, 13], "legacy", Protocol::Tcp),
            workload("remote", "n2", [198, 18, 2, 12], "whoami", Protocol::Hbone),
            workload("client", "n2", [198, 18, 2, 11], "client", Protocol::Hbone),
            workload("intruder", "n2", [198, 18, 2, 13], "intruder", Protocol::Hbone),
        ],
        ..Snapshot::default()
    };
    State::build("cluster.local", "mesh-system", snapshot).expect("state")
});

fn id(sa: &str) -> Identity {
    format!("spiffe://cluster.local/ns/demo/sa/{sa}").parse().expect("identity")
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut lines = text.split('\n');
    let (Some(method), Some(authority)) = (lines.next(), lines.next()) else { return };
    let mut request = http::Request::builder().method(method).uri(authority);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { return };
        request = request.header(name, value.trim_start());
    }
    let Ok(request) = request.body(()) else { return };
    let (parts, ()) = request.into_parts();

    let served = id("whoami");
    // The client as its certificate says, from its own address and from its node's.
    for (peer_id, peer) in [(id("client"), "198.18.2.11:40000"), (id("client"), "198.18.0.2:40000"), (id("nobody"), "198.18.0.2:40000")] {
        let peer: SocketAddr = peer.parse().expect("addr");
        let conn = HboneConn { node: NODE, served: &served, peer_id: &peer_id, peer };
        let Ok(t) = check_connect(&STATE, &conn, &parts) else { continue };
        assert_eq!(parts.method, http::Method::CONNECT, "a {} stream was opened", parts.method);
        assert_eq!(parts.uri.authority().and_then(|a| a.as_str().parse::<SocketAddr>().ok()), Some(t.dst), "the stream goes where the authority says");
        assert!(*t.dst_w.node == *NODE && t.dst_w.protocol == Protocol::Hbone, "opened to {:?}", t.dst_w);
        assert_eq!(t.dst_w.ip, t.dst.ip());
        assert_eq!(STATE.identity(&t.dst_w), served, "a stream to a workload whose certificate was not presented");
        match &t.src_w {
            Some(w) => {
                assert_eq!(STATE.identity(w), peer_id, "attributed to {} though the client is {peer_id}", w.name);
                assert_eq!(t.src_ip, w.ip);
            }
            None => assert_eq!(t.src_ip, peer.ip()),
        }
    }
});
