//! `mesh-node`: parse config (exit 64 when invalid), load and attach the datapath, install the
//! configured Services, start the L4 proxy, run until SIGTERM/SIGINT, then drain.
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
    routing,
    services_file, state,
};
use prometheus_client::registry::Registry;
use rustls_pki_types::CertificateDer;

/// sysexits.h EX_USAGE: the configuration is invalid.
const EX_USAGE: u8 = 64;

fn main() -> ExitCode {
    keep_buffers_on_the_heap();
    let config = match Config::from_source(&config::Env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mesh-node: invalid configuration: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
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
        let snapshot = match &config.app.local_config {
            Some(path) => state::read_file(path)?,
            None => state::Snapshot::default(),
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
                let own = config.node_address.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
                let client = ConfigClient::new(connection.clone(), &config.node_name, own, &config.app.trust_domain, &config.app.root_namespace, metrics);
                let synced = ready.register("control-plane config");
                tokio::spawn(client.run(state_tx, move || drop(synced)));
                (Arc::new(GrpcCa::new(connection, config.app.cert_ttl)), pem_certs(&root))
            }
            None => {
                std::mem::forget(state_tx); // a static state: keep its sender for the daemon's life
                certificate_authority(&config.app)?
            }
        };
        if let Some(datapath) = datapath {
            let sync_config = kernel_sync::Config {
                node_name: config.node_name.clone(),
                cgroup: config.cgroup.clone(),
                capture: config.capture,
                hbone_port: config.app.inbound_addr.port(),
                bypass: config.bypass,
                pod_interfaces: config.pod_interfaces.clone(),
                static_services: match &config.services_file {
                    Some(path) => services_file::load(path)?,
                    None => Vec::new(),
                },
            };
            let sync = KernelSync::new(sync_config, datapath, kernel_sync::Metrics::new(&mut registry))?;
            tokio::spawn(sync.run(state_rx.clone()));
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
        let bound = app::build_with(&config.app, ca, roots, state_rx, Some(log), registry, ready).await?;
        println!(
            "mesh-node ready node={} outbound={} inbound={} metrics={} admin={}",
            config.node_name, bound.outbound, bound.inbound, bound.metrics, bound.admin
        );
        anyhow::Ok(bound.wait_termination().await?)
    })?;
    tracing::info!(drained, "shutting down");
    Ok(())
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
        cgroup: config.cgroup.clone(),
        pin_dir: Some(config.bpf_pin_dir.clone()),
    })?;
    datapath.attach()?;
    tracing::info!("datapath attached");
    Ok(datapath)
}
