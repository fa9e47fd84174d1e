//! The whole configuration chain, from YAML as a user writes it to what the kernel is given:
//! mesh-control parses and validates (`manifest::parse` → `filemode::build`), computes a node's
//! view (`view::node_view`), and mesh-node converts it (`convert::snapshot`), builds its state
//! (`State::build`) and translates it for the kernel (`kernel_sync::translate`). No step panics,
//! the node accepts whatever the controller sends it (a view the node refused would leave the
//! node on its old config), and the kernel never denies what the daemon allows: every deny entry
//! the kernel is given names a (source, destination, port) that the daemon's one evaluator
//! (`authz::evaluate`) denies too, as a TCP connection and as a plain HTTP request.
#![no_main]

use std::{collections::BTreeMap, net::IpAddr};

use libfuzzer_sys::fuzz_target;
use mesh_node::{
    authz::{self, Conn, Decision, HttpRequest},
    identity::Identity,
    kernel_sync::{Desired, identities},
    state::{Protocol, State},
};

/// Ports a kernel entry for "any port" (0) is checked on.
const ANY_PORT_SAMPLES: [u16; 3] = [1, 80, 8080];

fn kernel_denies_only_what_the_daemon_denies(state: &State, desired: &Desired) {
    let names = identities(state);
    let headers = http::HeaderMap::new();
    let plain_get = HttpRequest { method: "GET", path: "/", host: None, headers: &headers, auth: None };
    for rule in &desired.deny {
        let name = |id: u32| names.get(id as usize - 1).unwrap_or_else(|| panic!("kernel identity id {id} names no identity"));
        let src: Identity = name(rule.src_identity).parse().unwrap_or_else(|e| panic!("kernel source identity: {e}"));
        let dst_name = name(rule.dst_identity);
        let ports: &[u16] = if rule.port == 0 { &ANY_PORT_SAMPLES } else { std::slice::from_ref(&rule.port) };
        // The kernel checks at the source's connect() by the destination endpoint's identity:
        // the entry denies every endpoint with that identity, on any node. Each must be a
        // workload the daemon authorizes (meshed) and denies.
        for e in desired.endpoints.iter().filter(|e| e.identity == rule.dst_identity) {
            let w = state.workload(e.addr).unwrap_or_else(|| panic!("the kernel denies {src} -> {} ({dst_name}), an endpoint the daemon knows no workload of", e.addr));
            assert!(w.protocol == Protocol::Hbone, "the kernel denies {src} -> {} ({dst_name}), an unmeshed workload no daemon authorizes", w.ip);
        }
        let targets = state.workloads.values().filter(|w| &state.identity(w).to_string() == dst_name);
        for dst in targets {
            for &port in ports {
                for http in [None, Some(plain_get)] {
                    let conn = Conn { src_identity: Some(&src), src_ip: [198, 18, 9, 9].into(), dst, dst_port: port, http };
                    let verdict = authz::evaluate(&state.policies, &state.root_namespace, &conn);
                    assert!(
                        matches!(verdict.decision, Decision::Deny(_)),
                        "the kernel denies {src} -> {}:{port} ({dst_name}) but the daemon allows it (http: {})",
                        dst.ip,
                        http.is_some()
                    );
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(docs) = mesh_control::manifest::parse(text) else { return };
    let docs: Vec<_> = docs.into_iter().filter_map(Result::ok).collect();
    let state = mesh_control::filemode::build(docs, "mesh-system");
    for node in ["n1", "n2"] {
        let view = mesh_control::view::node_view(&state, node, "cluster.local");
        let own: IpAddr = [198, 18, 0, 1].into();
        let snapshot = match mesh_node::control::convert::snapshot(view.into_values(), node, own) {
            Ok(s) => s,
            Err(e) => panic!("node {node} refused the controller's view: {e}"),
        };
        let node_state = match mesh_node::state::State::build("cluster.local", "mesh-system", snapshot) {
            Ok(s) => s,
            Err(e) => panic!("node {node} could not build a state from the controller's view: {e}"),
        };
        let desired = mesh_node::kernel_sync::translate(&node_state, node, &BTreeMap::new());
        kernel_denies_only_what_the_daemon_denies(&node_state, &desired);
    }
});
