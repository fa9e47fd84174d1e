//! The whole configuration chain, from YAML as a user writes it to what the kernel is given:
//! mesh-control parses and validates (`manifest::parse` → `filemode::build`), computes a node's
//! view (`view::node_view`), and mesh-node converts it (`convert::snapshot`), builds its state
//! (`State::build`) and translates it for the kernel (`kernel_sync::translate`). No step panics,
//! and the node accepts whatever the controller sends it: a view the node refused would leave
//! the node on its old config.
#![no_main]

use std::{collections::BTreeMap, net::IpAddr};

use libfuzzer_sys::fuzz_target;

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
        let _ = mesh_node::kernel_sync::translate(&node_state, node, &BTreeMap::new());
    }
});
