//! The daemon's kernel writer (`KernelSync::run` on a thread of its own through
//! `writers::Writers`, as `main.rs` runs it): not on the proxy's event loop, it applies each new
//! state, and once drain begins (a successor daemon took over) it stops and writes nothing more.

use std::{
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use mesh_common::names;
use mesh_node::{
    kernel_sync::{Config, KernelSync, Metrics, RESCAN},
    readiness::Ready,
    state::State,
    writers::Writers,
};

use super::Fixture;

/// Node 1's pod n1p1 as a meshed workload, STRICT or not.
fn state(f: &Fixture, strict: bool) -> Arc<State> {
    let pod = f.lab.pod("n1p1");
    let mode = if strict { "STRICT" } else { "PERMISSIVE" };
    let snapshot = serde_json::json!({
        "workloads": [{"name": "n1p1", "namespace": "demo", "serviceAccount": "n1p1", "ip": pod.ip.to_string(), "node": "n1", "nodeIp": "198.18.0.1", "protocol": "HBONE"}],
        "peerAuthentications": [{"name": "mode", "namespace": "demo", "mode": mode}],
    });
    Arc::new(State::build("cluster.local", "mesh-system", serde_json::from_value(snapshot).expect("snapshot")).expect("state"))
}

/// Entries of the kernel's endpoint map flagged STRICT.
fn strict_entries(f: &Fixture) -> usize {
    let map = f.pin_dir().join(names::MAP_ENDPOINTS);
    let dump = Command::new("bpftool").args(["-j", "map", "dump", "pinned"]).arg(&map).output().expect("bpftool");
    let entries: serde_json::Value = serde_json::from_slice(&dump.stdout).unwrap_or_else(|e| panic!("bpftool JSON: {e}: {}", String::from_utf8_lossy(&dump.stdout)));
    let strict = u64::from(mesh_common::endpoint::flags::STRICT);
    entries.as_array().expect("entries").iter().filter(|e| e["formatted"]["value"]["flags"].as_u64().is_some_and(|f| f & strict != 0)).count()
}

/// Threads of this process named `name`.
fn threads_named(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end() == name)
        .count()
}

/// Applications by outcome (`mesh_datapath_sync_duration_seconds_count{outcome}`).
#[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "a counter's whole value")]
fn syncs(registry: &prometheus_client::registry::Registry, outcome: &str) -> u64 {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).expect("encode");
    mesh_graph::metrics::parse(&text)
        .iter()
        .find(|s| s.name == "mesh_datapath_sync_duration_seconds_count" && s.label("outcome") == outcome)
        .map_or(0, |s| s.value as u64)
}

fn wait_for(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_kernel_writer_runs_on_its_own_thread_follows_the_state_and_stops_for_good() {
    let mut f = Fixture::new(&[1, 1], &[]);
    f.load();
    let datapath = f.datapath.take().expect("loaded");
    let config = Config { node_name: "n1".into(), cgroup: f.lab.node(1).cgroup.clone(), static_services: Vec::new(), pod_interfaces: Vec::new() };
    let mut registry = prometheus_client::registry::Registry::default();
    let sync = KernelSync::new(config, datapath, Metrics::new(&mut registry)).expect("kernel sync");
    let (tx, rx) = tokio::sync::watch::channel(state(&f, false));
    let before = threads_named("kernel-sync");
    let mut writers = Writers::default();
    writers.spawn_thread("kernel-sync", sync.run(rx, false)).expect("spawn the kernel writer");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let (shutdown, _) = tokio::sync::watch::channel(false);
    let supervising = rt.spawn({
        let shutdown = shutdown.clone();
        async move { writers.supervise(shutdown, &Ready::default()).await }
    });
    // The new thread names itself once it runs, not before `spawn_thread` returns.
    wait_for("the writer has a thread of its own", Duration::from_secs(2), || threads_named("kernel-sync") == before + 1);

    // Applied at start; a rescan that finds nothing new writes nothing; a new state is applied.
    wait_for("the first state applied", Duration::from_secs(5), || syncs(&registry, "applied") == 1);
    assert_eq!(strict_entries(&f), 0, "PERMISSIVE: no STRICT entry");
    wait_for("a rescan with nothing changed", RESCAN * 2, || syncs(&registry, "unchanged") >= 1);
    assert_eq!(syncs(&registry, "applied"), 1, "nothing changed, nothing applied");
    tx.send(state(&f, true)).expect("send");
    wait_for("STRICT in the kernel after the state changed", Duration::from_secs(2), || strict_entries(&f) == 1);
    assert_eq!(syncs(&registry, "applied"), 2);
    assert_eq!(syncs(&registry, "failed"), 0);

    // Drain begins: the writer stops (the supervisor returns once its thread has), and neither a
    // new state nor a rescan writes the maps again.
    shutdown.send_replace(true);
    assert_eq!(rt.block_on(supervising).expect("supervisor"), Ok(()), "a writer stopped by drain is no failure");
    wait_for("the writer's thread to end", Duration::from_secs(2), || threads_named("kernel-sync") == before);
    let _ = tx.send(state(&f, false));
    std::thread::sleep(RESCAN + Duration::from_millis(500));
    assert_eq!(strict_entries(&f), 1, "a stopped writer applied a state (a successor would no longer be the maps' only writer)");
}
