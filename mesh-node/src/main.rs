//! `mesh-node`: parse config (exit 64 when invalid), take over from the daemon running here if
//! there is one (`handoff`), load and attach the datapath, install the configured Services,
//! start the proxy, run until SIGTERM/SIGINT or a successor's take-over, then drain (and
//! uninstall when the mesh is being removed, see `removal`). `mesh-node --uninstall` removes what a daemon
//! leaves on the node; `--help` and `--version` say what they say.
use std::process::ExitCode;

use std::sync::Arc;

use std::net::{IpAddr, Ipv4Addr};

use mesh_node::{
    admin::LogControl,
    app,
    config::{self, Config},
    control::{ConfigClient, Connection, GrpcCa, Metrics as ControlMetrics},
    datapath::{Datapath, DatapathConfig, NodeSpec, Steering},
    handoff,
    identity::{CaClient, TestCa, ca::pem_certs},
    kernel_sync::{self, KernelSync},
    readiness::Ready,
    removal, routing,
    services_file, state,
    writers::{self, Writers},
};
use prometheus_client::registry::Registry;
use rustls_pki_types::CertificateDer;

/// sysexits.h EX_USAGE: the configuration is invalid.
const EX_USAGE: u8 = 64;

const HELP: &str = "mesh-node: the mesh's per-node daemon (eBPF datapath, HBONE/mTLS proxy, L7)

usage: mesh-node              run; configured by MESH_* environment variables (see the README)
       mesh-node --uninstall  remove what daemons left on this node: pinned programs, links and
                              maps under MESH_BPF_PIN_DIR (default /sys/fs/bpf/mesh), and the
                              policy-routing rules 15008/15009 with their table
       mesh-node --version
       mesh-node --help
";

fn main() -> ExitCode {
    match std::env::args().nth(1).as_deref() {
        None => {}
        Some("--help" | "-h") => {
            print!("{HELP}");
            return ExitCode::SUCCESS;
        }
        Some("--version" | "-V") => {
            println!("mesh-node {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Some("--uninstall") => {
            let pin_dir = std::env::var_os(config::ENV_BPF_PIN_DIR).map_or_else(|| std::path::PathBuf::from("/sys/fs/bpf/mesh"), Into::into);
            return match uninstall(&pin_dir) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("mesh-node --uninstall: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Some(other) => {
            eprintln!("mesh-node: unknown argument {other:?}\n\n{HELP}");
            return ExitCode::from(EX_USAGE);
        }
    }
    keep_buffers_on_the_heap();
    let mut config = match Config::from_source(&config::Env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mesh-node: invalid configuration: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    if config.cgroup.is_none() && config.app.datapath {
        match mesh_node::kubepods::discover() {
            Ok(dir) => config.cgroup = Some(dir),
            Err(e) => {
                eprintln!("mesh-node: invalid configuration: MESH_CGROUP is not set and {e}");
                return ExitCode::from(EX_USAGE);
            }
        }
    }
    let log = init_tracing(config.app.log_json);
    match run(&config, log) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-node: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// glibc's defaults hand every freed buffer of 128 KiB and up back to the kernel (`munmap`, or
/// trimming the heap top) and fault fresh zeroed pages in for the next one. The HBONE path frees
/// and allocates such buffers per chunk (h2 frames, TLS records, relay reads), so page faults
/// and `clear_page` were ~10 % of a daemon's CPU in the lab benchmark; with these two settings
/// they disappear and CPU per GB fell from 1.15-1.26 to 1.08 (bench/results/node-l4.md).
/// Freed memory above 16 MiB at the heap top is still returned.
#[cfg(target_env = "gnu")]
#[expect(unsafe_code, reason = "mallopt is an FFI call; it runs first in main, before any other thread or allocation-heavy work")]
fn keep_buffers_on_the_heap() {
    // SAFETY: plain integer parameters; glibc documents mallopt as callable at any time.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 16 << 20);
    }
}

#[cfg(not(target_env = "gnu"))]
fn keep_buffers_on_the_heap() {}

/// glibc keeps pages freed in the middle of its heap: after 10,000 connections closed, the
/// daemons' RSS stayed at its peak (bench/results/soak.md). `malloc_trim` hands those pages
/// back (`madvise`) and the heap top beyond the 16 MiB kept above; once a minute, so a daemon
/// that served a burst shrinks back, while the hot path's buffers stay.
async fn return_free_memory_every_minute() {
    let mut tick = tokio::time::interval(std::time::Duration::from_mins(1));
    tick.tick().await;
    loop {
        tick.tick().await;
        let started = std::time::Instant::now();
        let released = trim_heap();
        tracing::debug!(released, took_us = started.elapsed().as_micros(), "malloc_trim");
    }
}

#[cfg(target_env = "gnu")]
#[expect(unsafe_code, reason = "malloc_trim is an FFI call on glibc's own state")]
fn trim_heap() -> bool {
    // SAFETY: an integer parameter; glibc locks its arenas itself.
    unsafe { libc::malloc_trim(16 << 20) == 1 }
}

#[cfg(not(target_env = "gnu"))]
fn trim_heap() -> bool {
    false
}

/// Logs go to stderr; `MESH_LOG` sets the filter, the admin endpoint changes it at runtime.
fn init_tracing(json: bool) -> LogControl {
    use tracing_subscriber::{EnvFilter, layer::SubscriberExt as _, reload, util::SubscriberInitExt as _};
    let filter = EnvFilter::try_from_env("MESH_LOG").unwrap_or_else(|_| "info".into());
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    if json {
        registry.with(tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr)).init();
    } else {
        registry.with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr)).init();
    }
    Arc::new(move |level: &str| {
        let f = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
        handle.reload(f).map_err(|e| e.to_string())
    })
}

/// Removes pinned objects (which detaches the programs once no daemon holds them) and the
/// routing rules; says what it removed.
fn uninstall(pin_dir: &std::path::Path) -> anyhow::Result<()> {
    let pinned = walk_count(pin_dir);
    Datapath::uninstall(pin_dir)?;
    let rules = routing::Routes::uninstall()?;
    println!("mesh-node --uninstall: removed {pinned} pinned objects under {} and {rules} routing rules (priorities 15008, 15009) with table 15008", pin_dir.display());
    Ok(())
}

fn walk_count(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).into_iter().flatten().flatten().map(|e| if e.path().is_dir() { walk_count(&e.path()) } else { 1 }).sum()
}

/// How long a successor waits to be ready (config, certificates, datapath) before it takes over
/// anyway: a controller that is away must not keep the old binary running forever, and the
/// successor serves the last saved config meanwhile.
const TAKE_OVER_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

fn run(config: &Config, log: LogControl) -> anyhow::Result<()> {
    tracing::info!(config = %serde_json::to_string(config)?, "starting");
    raise_open_files_limit();
    // A daemon already running here hands its listeners over: both hold the same sockets, so
    // no connection attempt finds the ports closed while one process replaces the other.
    let mut successor = config.handoff.as_deref().and_then(|path| find_predecessor(path, &config.node_name));
    let mut activated = mesh_node::activation::listeners()?;
    if let Some(a) = &activated {
        tracing::info!(listeners = ?a.names(), "socket activation: serving the listeners the service manager passed (it keeps them open across restarts)");
    }
    let (datapath, mut steering) = config.app.datapath.then(|| load_datapath(config)).transpose()?.unzip();
    // Plaintext for local meshed pods is brought to the daemon by routing rules and handed to
    // its plaintext listener by the kernel: both halves or neither.
    let plaintext = (config.app.plaintext_redirect && config.app.hbone_redirect && steering.is_some()).then_some(config.app.inbound_plain_addr);
    // One thread by default: every hop of a proxied connection then wakes the same thread
    // (in process, the HBONE path's added round trip fell from ~150 to ~32 µs; see
    // bench/results/node-l4.md). More threads spread bulk traffic over cores.
    let rt = match config.app.worker_threads {
        1 => tokio::runtime::Builder::new_current_thread().enable_all().build()?,
        n => tokio::runtime::Builder::new_multi_thread().worker_threads(n).enable_all().build()?,
    };
    let drained = rt.block_on(async {
        let mut registry = Registry::default();
        let ready = Ready::default();
        let own = config.node_address.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let (snapshot, placeholder) = initial_snapshot(config, own)?;
        let state = state::State::build(&config.app.trust_domain, &config.app.root_namespace, snapshot)?;
        let (state_tx, state_rx) = tokio::sync::watch::channel(Arc::new(state));
        let (ca, roots): (Arc<dyn CaClient>, _) = match &config.control {
            Some(control) => {
                // State and certificates come from mesh-control, over mutual TLS with a node
                // certificate the renewer obtains with this node's credential and keeps current.
                let metrics = ControlMetrics::new(&mut registry);
                let (connection, renewer) = Connection::new(control, &metrics)?;
                tokio::spawn(renewer.run());
                let root = std::fs::read_to_string(&control.root_cert)?;
                let client = ConfigClient::new(connection.clone(), &config.node_name, own, &config.app.trust_domain, &config.app.root_namespace, metrics).saving_to(control.last_config.clone());
                let synced = ready.register("control-plane config");
                tokio::spawn(client.run(state_tx, move || drop(synced)));
                (Arc::new(GrpcCa::new(connection, config.app.cert_ttl)), pem_certs(&root))
            }
            None => {
                std::mem::forget(state_tx); // a static state: keep its sender for the daemon's life
                certificate_authority(&config.app)?
            }
        };
        // The HTTP path's clusters: their outlier ejections steer the kernel's tables too.
        let clusters = Arc::new(mesh_node::balance::cluster::Clusters::new(&mut registry));
        // Tasks that write the node's kernel state (maps, routing rules): stopped when drain
        // starts, so that a successor is the only writer once it has taken over.
        let mut writers = Writers::default();
        if let Some(datapath) = datapath {
            let sync_config = kernel_sync::Config {
                node_name: config.node_name.clone(),
                cgroup: config.cgroup.clone().expect("resolved at start"),
                pod_interfaces: config.pod_interfaces.clone(),
                static_services: match &config.services_file {
                    Some(path) => services_file::load(path)?,
                    None => Vec::new(),
                },
            };
            let sync = KernelSync::new(sync_config, datapath, kernel_sync::Metrics::new(&mut registry))?.with_ejections(clusters.clone());
            writers.spawn_thread("kernel-sync", sync.run(state_rx.clone(), placeholder))?;
        }
        if config.app.hbone_redirect {
            let routes = routing::Routes::new(
                routing::Config {
                    node_name: config.node_name.clone(),
                    hbone_port: config.app.inbound_addr.port(),
                    transparent: config.app.proxy.transparent,
                    keep_existing: successor.is_some(),
                    plaintext,
                },
                routing::Metrics::new(&mut registry),
            )?;
            writers.spawn_task("routing", routes.run(state_rx.clone(), placeholder));
        }
        // A running daemon's sockets first; else the service manager's (socket activation).
        let mut inherited = match successor.as_mut() {
            Some(s) => std::mem::take(s.listeners()),
            None => activated.take().unwrap_or_default(),
        };
        let mut bound = app::build_with(&config.app, ca, roots, state_rx, Some(log), registry, ready.clone(), clusters, &mut inherited).await?;
        drop(inherited); // listeners the new configuration does not use
        start_serving(successor, &bound, &ready).await?;
        if let (Some(steering), Some(_)) = (steering.as_mut(), plaintext) {
            let listener = bound.listener_socket(app::listener::INBOUND_PLAINTEXT).expect("the daemon holds its listeners until it offers them");
            steering.serve(listener)?;
            tracing::info!(listener = %bound.inbound_plain, "plaintext for local meshed pods goes to the plaintext listener");
        }
        let (taken_over, offer) = match &config.handoff {
            Some(path) => {
                let (taken, offer) = offer_listeners(path, &config.node_name, &mut bound)?;
                (taken, Some(offer))
            }
            None => (Arc::default(), None),
        };
        let supervised = tokio::spawn(stop_on_drain(bound.shutdown_handle(), writers, ready.clone(), offer));
        tokio::spawn(return_free_memory_every_minute());
        println!(
            "mesh-node ready node={} outbound={} inbound={} metrics={} admin={}",
            config.node_name, bound.outbound, bound.inbound, bound.metrics, bound.admin
        );
        let removal = config.removal.as_ref().map(|cfg| Removal::start(cfg.clone())).transpose()?;
        let (drained, handed_over) = stop_and_drain(bound, removal.as_ref(), &taken_over).await?;
        // A writer that ended early stopped the daemon: exit with its error, for a restart.
        supervised.await??;
        if handed_over {
            return anyhow::Ok((drained, false));
        }
        let removed = match removal {
            Some(r) => r.removed_for_good().await,
            None => false,
        };
        anyhow::Ok((drained, removed))
    })?;
    let (drained, removed) = drained;
    tracing::info!(drained, "shutting down");
    if removed {
        uninstall(&config.bpf_pin_dir)?;
        if let Some(path) = config.control.as_ref().and_then(|c| c.last_config.as_deref()) {
            let _ = std::fs::remove_file(path);
        }
        tracing::info!("uninstalled: this node is left without the mesh's programs, pins and rules");
    }
    Ok(())
}

/// The state to start from, and whether it is only a placeholder until the control plane
/// answers. With a control plane: the config this node last applied, if it was saved, so that a
/// restart enforces it at once (and keeps enforcing it while the controller is away).
fn initial_snapshot(config: &Config, own: IpAddr) -> anyhow::Result<(state::Snapshot, bool)> {
    let saved_file = config.control.as_ref().and_then(|c| c.last_config.as_deref());
    let saved = saved_file.and_then(|path| match mesh_node::control::last_config::load_snapshot(path, &config.node_name, own) {
        Ok(Some((version, snap))) => {
            tracing::info!(version, file = %path.display(), "enforcing the last applied config until the control plane answers");
            Some(snap)
        }
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(error = %e, "the saved config cannot be used; starting without it");
            None
        }
    });
    let placeholder = config.control.is_some() && saved.is_none();
    let snapshot = match (&config.app.local_config, saved) {
        (_, Some(snap)) => snap,
        (Some(path), None) => state::read_file(path)?,
        (None, None) => state::Snapshot::default(),
    };
    Ok((snapshot, placeholder))
}

/// Once drain begins: stops the kernel's writers (waiting for an application in flight) and
/// withdraws the listeners on offer. A writer that ends before that stops the daemon (see
/// `writers`).
async fn stop_on_drain(shutdown: tokio::sync::watch::Sender<bool>, writers: Writers, ready: Ready, offer: Option<handoff::Offer>) -> Result<(), writers::Ended> {
    let supervised = writers.supervise(shutdown, &ready).await;
    if let Some(offer) = offer {
        offer.withdraw();
    }
    supervised
}

/// Waits until the daemon is told to stop, then drains; returns whether the drain finished in
/// time and whether a successor took over.
async fn stop_and_drain(bound: app::Bound, removal: Option<&Removal>, taken_over: &std::sync::atomic::AtomicBool) -> std::io::Result<(bool, bool)> {
    let stop = bound.wait_stop().await?;
    let taken = || taken_over.load(std::sync::atomic::Ordering::Relaxed);
    let drained = bound.drain().await;
    if taken() && removal.is_some() && stop != app::Stop::Sigterm {
        await_pod_deletion().await?;
    }
    Ok((drained, taken()))
}

/// After a DaemonSet's surge update handed this daemon's work over: exiting now would have the
/// kubelet restart this container, which would take the node back. The old pod is deleted once
/// the new one is ready; until its SIGTERM there is nothing left to do.
async fn await_pod_deletion() -> std::io::Result<()> {
    tracing::info!("handed over and drained: waiting for SIGTERM (the old pod's deletion)");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    term.recv().await;
    Ok(())
}

/// Every proxied connection takes two descriptors (client and upstream), and the soft limit
/// most hosts start a process with (1024) would cap a node at ~500 connections: raise it to the
/// hard limit, as Envoy and ztunnel do. Failing to is logged, not fatal.
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::info!(from = soft, to = hard, "raised the open files limit to its hard limit"),
            Err(e) => tracing::warn!(soft, hard, error = %e, "could not raise the open files limit"),
        },
        Ok((soft, _)) => tracing::info!(limit = soft, "open files limit already at its hard limit"),
        Err(e) => tracing::warn!(error = %e, "could not read the open files limit"),
    }
}

/// The daemon running on this node, reached at its hand-off socket `path`, if any.
fn find_predecessor(path: &std::path::Path, node: &str) -> Option<handoff::Successor> {
    match handoff::Successor::connect(path, node) {
        Ok(Some(s)) => {
            tracing::info!(predecessor = s.predecessor(), socket = %path.display(), "a daemon runs here: taking over its listeners once ready");
            Some(s)
        }
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(error = %e, "cannot take over from the daemon running here: binding the ports afresh");
            None
        }
    }
}

/// Starts accepting. A successor first waits until it is ready (or [`TAKE_OVER_WAIT`]), starts
/// accepting beside its predecessor, then tells it to stop.
async fn start_serving(successor: Option<handoff::Successor>, bound: &app::Bound, ready: &Ready) -> anyhow::Result<()> {
    let Some(successor) = successor else {
        bound.start();
        return Ok(());
    };
    let waited = std::time::Instant::now();
    while !ready.is_ready() && waited.elapsed() < TAKE_OVER_WAIT {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    if !ready.is_ready() {
        tracing::warn!(pending = ?ready.pending(), "taking over before ready: serving the last saved config");
    }
    bound.start();
    match tokio::task::spawn_blocking(move || successor.take_over()).await? {
        Ok(()) => tracing::info!(waited = ?waited.elapsed(), "took over: the previous daemon drains"),
        // It may have been told to stop meanwhile (a DaemonSet deletes the old pod once the new
        // one is Ready): this process serves either way.
        Err(e) => tracing::warn!(error = %e, "the previous daemon did not acknowledge the take-over; serving anyway"),
    }
    Ok(())
}

/// Serves the hand-off socket at `path` for the next daemon, on its own thread; a take-over
/// starts this one's drain. The flag says whether that happened.
fn offer_listeners(path: &std::path::Path, node: &str, bound: &mut app::Bound) -> anyhow::Result<(Arc<std::sync::atomic::AtomicBool>, handoff::Offer)> {
    let server = handoff::Server::new(path, node, bound.take_listener_sockets())?;
    let offer = server.offer();
    let taken_over = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (shutdown, taken) = (bound.shutdown_handle(), taken_over.clone());
    std::thread::Builder::new().name("handoff".into()).spawn(move || {
        server.run(move || {
            taken.store(true, std::sync::atomic::Ordering::Relaxed);
            shutdown.send_replace(true);
        });
    })?;
    Ok((taken_over, offer))
}

/// The API check of `removal`, first made at start (so a refusal at exit means something).
struct Removal {
    checker: Arc<removal::Checker>,
    answered_at_start: Arc<std::sync::atomic::AtomicBool>,
}

impl Removal {
    fn start(cfg: removal::Config) -> anyhow::Result<Self> {
        let checker = Arc::new(removal::Checker::new(cfg)?);
        let answered_at_start = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (c, flag) = (checker.clone(), answered_at_start.clone());
        tokio::spawn(async move {
            for attempt in 1..=30 {
                let (ds, ns) = c.look().await;
                if matches!((&ds, &ns), (removal::Seen::Present { .. }, removal::Seen::Present { .. })) {
                    flag.store(true, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!("the API server answers about this daemon's DaemonSet: it uninstalls when the mesh is removed");
                    return;
                }
                if attempt == 30 {
                    tracing::error!(daemonset = ?ds, namespace = ?ns, "cannot ask the API server about this daemon's DaemonSet: it will NOT uninstall itself when the mesh is removed (run `mesh-node --uninstall` on the node)");
                }
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            }
        });
        Ok(Self { checker, answered_at_start })
    }

    async fn removed_for_good(&self) -> bool {
        let (ds, ns) = self.checker.look().await;
        match removal::decide(self.answered_at_start.load(std::sync::atomic::Ordering::Relaxed), &ds, &ns) {
            removal::Verdict::Removed(why) => {
                tracing::info!(why, "the mesh is being removed: uninstalling");
                true
            }
            removal::Verdict::Staying => {
                tracing::info!("the DaemonSet stays (restart or update): the datapath and rules stay for the next daemon");
                false
            }
            removal::Verdict::Unknown(what) => {
                tracing::warn!(what, "cannot tell whether the mesh is being removed: keeping the datapath (remove it with `mesh-node --uninstall`)");
                false
            }
        }
    }
}

/// The workload CA: the control plane's once it exists; until then a test CA whose root both
/// nodes share through `MESH_CA_CERT`/`MESH_CA_KEY` (or a fresh one, good for one node only).
fn certificate_authority(cfg: &app::Config) -> anyhow::Result<(Arc<dyn CaClient>, Vec<CertificateDer<'static>>)> {
    let ca = if let (Some(cert), Some(key)) = (&cfg.ca_cert, &cfg.ca_key) {
        TestCa::load_pem(cert, key, cfg.cert_ttl)?
    } else {
        tracing::warn!("no MESH_CA_CERT/MESH_CA_KEY: generated a throw-away CA; other nodes will not trust it");
        TestCa::generate(cfg.cert_ttl)?
    };
    let roots = vec![ca.root()];
    Ok((Arc::new(ca), roots))
}

fn load_datapath(config: &Config) -> anyhow::Result<(Datapath, Steering)> {
    let mut datapath = Datapath::load(DatapathConfig {
        cgroup: config.cgroup.clone().expect("resolved at start"),
        netns: DatapathConfig::OWN_NETNS.into(),
        pin_dir: Some(config.bpf_pin_dir.clone()),
    })?;
    // Node settings before the programs: a first start, or maps whose layout changed, begin
    // empty, and programs attached to an empty node map would capture nothing and let no
    // daemon connection into STRICT pods until the first sync.
    datapath.set_node(&NodeSpec { capture: config.capture, hbone_port: config.app.inbound_addr.port(), bypass: config.bypass, daemon_mark: config.app.proxy.socket_mark })?;
    datapath.attach()?;
    let steering = datapath.steering()?;
    tracing::info!("datapath attached");
    Ok((datapath, steering))
}
