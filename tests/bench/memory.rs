//! Benchmark: the node daemon's memory with a large mesh, fed by mesh-control as in a cluster.
//! The whole mesh in the lab (`mesh_tests::cluster`: mesh-control in file mode, both daemons
//! with the eBPF datapath, release binaries), then 10,000 more Services of 10 meshed pods each,
//! the pods spread over 100 more nodes: each daemon receives the 100,000 workloads and the
//! 10,000 Services with their endpoints, as mesh-control sends a node every meshed workload of
//! the mesh (`mesh-control/src/view.rs`). Root only, ignored by default:
//!
//! ```sh
//! cargo xtask bench --only memory
//! ```
//!
//! `MESH_BENCH_PAUSE_SECS=<n>` pauses before the large config, with the daemons' pids printed,
//! to attach a profiler; `MESH_BENCH_NODE_BIN=<program>` runs the daemons as another program
//! (a script that `exec`s `target/release/mesh-node` under heaptrack's preload library, say),
//! `MESH_BENCH_CONTROL_BIN=<program>` mesh-control.
//!
//! Reported: each daemon's RSS idle (the lab's own config), with the large config, after one
//! small update at that scale (one more Service), and a minute later (after the daemon's
//! `malloc_trim`), with the time each took from the file's write to the daemon's "config
//! applied", and where the RSS is (glibc's main heap, anonymous mappings, files); mesh-control's
//! RSS beside. The extra pods are config only:
//! their addresses (100.64.0.0/14) and nodes' (100.68.0.0/24) are never dialled, and no lab
//! namespace routes them. Results are in `bench/results/ztunnel.md` ("Memory at scale").

use std::{
    fmt::Write as _,
    path::Path,
    time::{Duration, Instant},
};

use mesh_tests::{
    LabSpec,
    cluster::{Binaries, Cluster, METRICS_PORT, write_atomic},
};

const SERVICES: u32 = 10_000;
const PODS_PER_SERVICE: u32 = 10;
const NODES: u32 = 100;

/// 100 nodes, 10,000 Services and their 100,000 meshed pods (three labels each, as a
/// Deployment's pods have), in mesh-control's file-mode YAML: files of at most 1,000 documents
/// (mesh-control's YAML parser refuses more in one file), by name.
fn scale_yaml() -> Vec<(String, String)> {
    const SERVICES_PER_FILE: u32 = 90; // 11 documents each
    let mut files = Vec::new();
    let mut y = String::new();
    for n in 0..NODES {
        let _ = write!(y, "apiVersion: lab.mesh.dev/v1alpha1\nkind: Node\nmetadata: {{name: scale-{n}}}\nspec: {{address: 100.68.0.{}}}\n---\n", n + 1);
    }
    y.push_str("apiVersion: lab.mesh.dev/v1alpha1\nkind: Namespace\nmetadata: {name: scale, labels: {mesh.dev/dataplane-mode: ambient}}\n");
    files.push(("scale-nodes.yaml".to_owned(), std::mem::take(&mut y)));
    for s in 0..SERVICES {
        for p in 0..PODS_PER_SERVICE {
            let i = s * PODS_PER_SERVICE + p;
            let ip = std::net::Ipv4Addr::from(0x6440_0000 + i);
            let _ = write!(
                y,
                "apiVersion: lab.mesh.dev/v1alpha1\nkind: Workload\nmetadata: {{name: svc-{s}-7d9f8b6c4-{p:05}, namespace: scale, labels: {{app: svc-{s}, version: v1, pod-template-hash: 7d9f8b6c4}}}}\nspec: {{node: scale-{}, serviceAccount: svc-{s}, addresses: [{ip}]}}\n---\n",
                i % NODES
            );
        }
        let _ = write!(
            y,
            "apiVersion: lab.mesh.dev/v1alpha1\nkind: Service\nmetadata: {{name: svc-{s}, namespace: scale}}\nspec:\n  vips: [198.19.{}.{}]\n  selector: {{app: svc-{s}}}\n  ports:\n  - {{name: http, port: 80, targetPort: 8080}}\n---\n",
            100 + s / 256,
            s % 256
        );
        if (s + 1) % SERVICES_PER_FILE == 0 || s + 1 == SERVICES {
            files.push((format!("scale-{:03}.yaml", s / SERVICES_PER_FILE), std::mem::take(&mut y)));
        }
    }
    files
}

/// Node `i`'s latest "config applied" once it counts at least `at_least` resources: how long
/// after `since` the test saw it, the resources, and how long the daemon took from
/// mesh-control's sending of that version (or, for an update in one part, its reading of the
/// config) to applying it (both logs' timestamps).
fn applied(c: &Cluster, i: u8, at_least: usize, since: Instant) -> (Duration, usize, f64) {
    let log = c.node_log(i);
    let deadline = Instant::now() + Duration::from_mins(5);
    let field = |line: &str, key: &str| line.split(&format!(" {key}=")).nth(1)?.split_whitespace().next().map(str::to_owned);
    loop {
        let text = strip_colours(&std::fs::read_to_string(&log).unwrap_or_default());
        let last = text.lines().rfind(|l| l.contains("config applied")).map(str::to_owned);
        let count = last.as_deref().and_then(|l| field(l, "resources")?.parse::<usize>().ok());
        if let (Some(line), Some(n)) = (&last, count.filter(|n| *n >= at_least)) {
            let seen = since.elapsed();
            let version = field(line, "version").expect("a version");
            let node = format!("node=\"n{i}\"");
            let control = strip_colours(&std::fs::read_to_string(c.logs.join("mesh-control.log")).unwrap_or_default());
            // Updates in parts are logged as sent; a small one only as its version's config.
            let of_version = |l: &&str| field(l, "version").as_deref() == Some(&version);
            let sent = control
                .lines()
                .rfind(|l| l.contains("config update sent") && l.contains(&node) && of_version(l))
                .or_else(|| control.lines().rfind(|l| l.contains("config folder changed") && of_version(l)))
                .expect("mesh-control logged the version");
            let mut took = seconds_of_day(line) - seconds_of_day(sent);
            if took < 0.0 {
                took += 86_400.0;
            }
            return (seen, n, took);
        }
        assert!(Instant::now() < deadline, "node {i} did not apply {at_least} resources in 5 min (last: {count:?}); see {}", log.display());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The time of day of a log line (`2026-12-01T07:17:07.656926Z ...`), in seconds.
fn seconds_of_day(line: &str) -> f64 {
    let time = line.get(11..26).unwrap_or_else(|| panic!("no timestamp: {line}"));
    let mut parts = time.split(':').map(|p| p.parse::<f64>().unwrap_or_else(|e| panic!("{time}: {e}")));
    let (h, m, s) = (parts.next().expect("hours"), parts.next().expect("minutes"), parts.next().expect("seconds"));
    h * 3600.0 + m * 60.0 + s
}

/// The log without its terminal colour codes (`ESC [ ... m`), which split `key=value`.
fn strip_colours(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|c| *c == 'm');
        } else {
            out.push(c);
        }
    }
    out
}

/// Where a process's resident memory is, KiB by kind of mapping (`/proc/<pid>/smaps`): glibc's
/// main heap, anonymous mappings (its other arenas, blocks of 1 MiB and more, thread stacks),
/// and files (the binary and libraries).
fn rss_by_mapping(pid: u32) -> String {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let (mut heap, mut anon, mut files, mut other) = (0u64, 0u64, 0u64, 0u64);
    let mut kind = 0;
    for line in smaps.lines() {
        if let Some(kib) = line.strip_prefix("Rss:") {
            let kib: u64 = kib.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0);
            *[&mut heap, &mut anon, &mut files, &mut other][kind] += kib;
        } else if line.split_whitespace().next().is_some_and(|range| range.contains('-') && !range.ends_with(':')) {
            // A mapping's header: `start-end perms offset dev inode [path]`.
            kind = match line.split_whitespace().nth(5) {
                Some("[heap]") => 0,
                None => 1,
                Some(path) if path.starts_with('/') => 2,
                Some(_) => 3,
            };
        }
    }
    format!("heap {} MiB, anonymous {} MiB, files {} MiB, other {} MiB", heap >> 10, anon >> 10, files >> 10, other >> 10)
}

/// The kernel writer's applications from a daemon's metrics
/// (`mesh_datapath_sync_duration_seconds{outcome}`): how many, their mean time, and the
/// smallest bucket bound that holds them all.
fn kernel_syncs(metrics: &str) -> String {
    let samples = mesh_graph::metrics::parse(metrics);
    let of = |outcome: &str| {
        let value = |suffix| sync_series(&samples, suffix, outcome).next().map_or(0.0, |s| s.value);
        let (count, sum) = (value("count"), value("sum"));
        // Cumulative buckets, in order of their bounds.
        let slowest = sync_series(&samples, "bucket", outcome).find(|b| b.value >= count).map_or_else(|| "-".to_owned(), |b| format!("≤ {} s", b.label("le")));
        let mean = if count > 0.0 { sum / count * 1e3 } else { 0.0 };
        format!("{outcome} {count} (mean {mean:.1} ms, all {slowest})")
    };
    format!("kernel syncs: {}", ["applied", "unchanged", "failed"].map(of).join(", "))
}

/// The samples of `mesh_datapath_sync_duration_seconds_<suffix>{outcome}`.
fn sync_series<'a>(samples: &'a [mesh_graph::metrics::Sample], suffix: &'a str, outcome: &'a str) -> impl Iterator<Item = &'a mesh_graph::metrics::Sample> {
    samples.iter().filter(move |s| s.name.strip_prefix("mesh_datapath_sync_duration_seconds_") == Some(suffix) && s.label("outcome") == outcome)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse().ok()).unwrap_or(0)
}

#[test]
#[ignore = "benchmark: run explicitly with --ignored (see the module doc)"]
fn controller_fed_node_memory_at_scale() {
    mesh_tests::require_root();
    let release = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release");
    let spec = LabSpec::for_test(&[3, 2]);
    let base = std::env::temp_dir().join(format!("mesh-{}-bench", spec.run));
    let mut bins = Binaries::in_dir(&release);
    // MESH_BENCH_NODE_BIN / MESH_BENCH_CONTROL_BIN: the daemons or the controller run as another
    // program, e.g. a script that `exec`s it under a heap profiler (bench/results/ztunnel.md,
    // "Memory at scale").
    if let Some(node) = std::env::var_os("MESH_BENCH_NODE_BIN") {
        bins.mesh_node = node.into();
    }
    if let Some(control) = std::env::var_os("MESH_BENCH_CONTROL_BIN") {
        bins.mesh_control = control.into();
    }
    let c = Cluster::start(spec, bins, &base).expect("start the mesh");
    #[expect(clippy::cast_precision_loss, reason = "memory sizes")]
    let mib = |kib: u64| format!("{:.1}", kib as f64 / 1024.0);
    let daemons = || [0, 1].map(|i| mib(c.daemon_rss_kib(i))).join(" / ");
    let control = || c.control.as_ref().map_or(0, |p| rss_kib(p.pid()));
    std::thread::sleep(Duration::from_secs(2));
    let idle = (daemons(), mib(control()));
    println!("idle: daemons {} MiB, mesh-control {} MiB", idle.0, idle.1);

    // MESH_BENCH_PAUSE_SECS: time to attach a profiler to the idle daemons (`heaptrack -p`).
    if let Some(secs) = std::env::var("MESH_BENCH_PAUSE_SECS").ok().and_then(|s| s.parse().ok()) {
        let pids: Vec<u32> = c.daemons.iter().flatten().map(mesh_tests::PodProcess::pid).collect();
        println!("pausing {secs} s: daemons' pids {pids:?}");
        std::thread::sleep(Duration::from_secs(secs));
    }
    let files = scale_yaml();
    println!("scale config: {} MiB of YAML in {} files", files.iter().map(|(_, y)| y.len()).sum::<usize>() >> 20, files.len());
    // Written into a folder outside the config, then moved in at once: mesh-control sees all
    // of it in one read.
    let staged = base.join("scale");
    std::fs::create_dir_all(&staged).expect("mkdir");
    for (name, yaml) in &files {
        std::fs::write(staged.join(name), yaml).expect("write the scale config");
    }
    drop(files);
    let written = Instant::now();
    std::fs::rename(&staged, c.config_dir.join("scale")).expect("move the scale config in");
    let resources = (SERVICES * (PODS_PER_SERVICE + 1)) as usize;
    let scaled_at = [1, 2].map(|i| applied(&c, i, resources, written));
    std::thread::sleep(Duration::from_secs(3));
    let scaled = (daemons(), mib(control()));
    println!("scaled: daemons {} MiB, mesh-control {} MiB, applied {scaled_at:.1?}", scaled.0, scaled.1);
    let pids: Vec<u32> = c.daemons.iter().flatten().map(mesh_tests::PodProcess::pid).collect();
    for pid in &pids {
        println!("  daemon {pid}: {}", rss_by_mapping(*pid));
    }

    // One small change at that scale, which every node receives: one more Service.
    let written = Instant::now();
    let extra = "apiVersion: lab.mesh.dev/v1alpha1\nkind: Service\nmetadata: {name: svc-extra, namespace: scale}\nspec:\n  vips: [198.19.200.1]\n  selector: {app: svc-0}\n  ports:\n  - {name: http, port: 80, targetPort: 8080}\n";
    write_atomic(&c.config_dir.join("scale-extra.yaml"), extra).expect("write one more Service");
    let updated = [0u8, 1].map(|i| applied(&c, i + 1, scaled_at[usize::from(i)].1 + 1, written));
    std::thread::sleep(Duration::from_secs(3));
    let after = (daemons(), mib(control()));
    println!("after one more update: daemons {} MiB, applied {updated:.1?}", after.0);
    for pid in &pids {
        println!("  daemon {pid}: {}", rss_by_mapping(*pid));
    }
    // The daemon hands freed pages back once a minute (`malloc_trim`, mesh-node's main.rs): what
    // a node holds between changes, as Prometheus would sample it.
    std::thread::sleep(Duration::from_secs(65));
    let settled = daemons();
    println!("a minute later: daemons {settled} MiB");
    for pid in &pids {
        println!("  daemon {pid}: {}", rss_by_mapping(*pid));
    }

    // The kernel's writer at this scale (`mesh_datapath_sync_*`): how long an application takes,
    // and how many of the rescans found nothing to write.
    for i in [1, 2] {
        let text = c.curl_on_node(i, &format!("http://127.0.0.1:{METRICS_PORT}/metrics")).expect("metrics");
        println!("  daemon n{i}: {}", kernel_syncs(&text));
    }

    let times = |a: &[(Duration, usize, f64); 2]| format!("{:.2} / {:.2} s to apply; {:.0} s after the file's write", a[0].2, a[1].2, a[0].0.as_secs_f64().max(a[1].0.as_secs_f64()));
    println!(
        "\n| RSS, MiB (node 1 / node 2) | idle, the lab's config | {SERVICES} more Services × {PODS_PER_SERVICE} meshed pods (100,000 workloads) | after one more update at that scale | a minute later |\n|---|---|---|---|---|"
    );
    println!("| mesh-node, fed by mesh-control | {} | {} ({}) | {} ({}) | {settled} |", idle.0, scaled.0, times(&scaled_at), after.0, times(&updated));
    println!("| mesh-control (beside) | {} | {} | {} | {} |", idle.1, scaled.1, after.1, mib(control()));
}
