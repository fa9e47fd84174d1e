//! `mesh-node`: parse config (exit 64 when invalid), load and attach the datapath, install the
//! configured Services, start the L4 proxy, run until SIGTERM/SIGINT, then drain (and uninstall
//! when the mesh is being removed, see `removal`). `mesh-node --uninstall` removes what a daemon
//! leaves on the node; `--help` and `--version` say what they say.
use std::process::ExitCode;

use std::sync::Arc;

use std::net::{IpAddr, Ipv4Addr};

use mesh_node::{
    admin::LogControl,
    app,
    config::{self, Config},
    control::{ConfigClient, Connection, GrpcCa, Metrics as ControlMetrics},
    datapath::{Datapath, DatapathConfig},
    identity::{CaClient, TestCa, ca::pem_certs},
    kernel_sync::{self, KernelSync},
    readiness::Ready,
    removal, routing,
    services_file, state,
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

fn run(config: &Config, log: LogControl) -> anyhow::Result<()> {
    tracing::info!(config = %serde_json::to_string(config)?, "starting");
    let datapath = if config.app.datapath { Some(load_datapath(config)?) } else { None };
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
        // With a control plane: the config this node last applied, if it was saved, so that a
        // restart enforces it at once (and keeps enforcing it while the controller is away).
        let own = config.node_address.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
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
        if let Some(datapath) = datapath {
            let sync_config = kernel_sync::Config {
                node_name: config.node_name.clone(),
                cgroup: config.cgroup.clone().expect("resolved at start"),
                capture: config.capture,
                hbone_port: config.app.inbound_addr.port(),
                bypass: config.bypass,
                pod_interfaces: config.pod_interfaces.clone(),
                static_services: match &config.services_file {
                    Some(path) => services_file::load(path)?,
                    None => Vec::new(),
                },
            };
            let sync = KernelSync::new(sync_config, datapath, kernel_sync::Metrics::new(&mut registry))?.with_ejections(clusters.clone());
            tokio::spawn(sync.run(state_rx.clone(), placeholder));
        }
        if config.app.hbone_redirect {
            let routes = routing::Routes::new(
                routing::Config {
                    node_name: config.node_name.clone(),
                    hbone_port: config.app.inbound_addr.port(),
                    transparent: config.app.proxy.transparent,
                },
                routing::Metrics::new(&mut registry),
            )?;
            tokio::spawn(routes.run(state_rx.clone()));
        }
        let bound = app::build_with(&config.app, ca, roots, state_rx, Some(log), registry, ready, clusters).await?;
        println!(
            "mesh-node ready node={} outbound={} inbound={} metrics={} admin={}",
            config.node_name, bound.outbound, bound.inbound, bound.metrics, bound.admin
        );
        let removal = match &config.removal {
            Some(cfg) => Some(Removal::start(cfg.clone())?),
            None => None,
        };
        let drained = bound.wait_termination().await?;
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

fn load_datapath(config: &Config) -> anyhow::Result<Datapath> {
    let mut datapath = Datapath::load(DatapathConfig {
        cgroup: config.cgroup.clone().expect("resolved at start"),
        pin_dir: Some(config.bpf_pin_dir.clone()),
    })?;
    datapath.attach()?;
    tracing::info!("datapath attached");
    Ok(datapath)
}
