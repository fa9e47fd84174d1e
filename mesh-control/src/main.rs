//! `mesh-control`: the control plane. File mode (`--config-dir`) or Kubernetes mode
//! (`--kubernetes`); see the README for both.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use clap::Parser;
use mesh_control::{
    auth::{Authenticator, NodeIds},
    ca::{self, Ca},
    election::{Leadership, Timing},
    filemode, graph, k8s,
    metrics::Metrics,
    server::{Server, Shared},
    snapshot::Publisher,
    status::{Sources, StatusServer},
};
use prometheus_client::registry::Registry;

#[derive(Parser, Debug)]
#[command(about = "mesh control plane: per-node config push and workload CA")]
struct Args {
    /// File mode: read policies, nodes, workloads and services from this folder (and watch it).
    #[arg(long, env = "MESH_CONTROL_CONFIG_DIR", conflicts_with = "kubernetes", required_unless_present = "kubernetes")]
    config_dir: Option<PathBuf>,
    /// Kubernetes mode: watch the cluster (in-cluster config or KUBECONFIG).
    #[arg(long, env = "MESH_CONTROL_KUBERNETES")]
    kubernetes: bool,
    /// File mode: where the mesh root is kept (`ca/root.crt`, `ca/root.key`; created on first start).
    #[arg(long, env = "MESH_CONTROL_STATE_DIR", default_value = "/var/lib/mesh-control")]
    state_dir: PathBuf,
    /// File mode: folder of per-node credentials, `<node>.token` (default: `<state-dir>/node-tokens`).
    #[arg(long, env = "MESH_CONTROL_NODE_TOKEN_DIR")]
    node_token_dir: Option<PathBuf>,
    /// gRPC address (config streams and CA): TLS with the mesh root; mutual TLS with a node
    /// certificate for everything but obtaining one.
    #[arg(long, env = "MESH_CONTROL_GRPC_ADDR", default_value = "0.0.0.0:15012")]
    grpc_addr: SocketAddr,
    /// Status endpoint: /status, /metrics, /ready, /healthz.
    #[arg(long, env = "MESH_CONTROL_STATUS_ADDR", default_value = "127.0.0.1:15014")]
    status_addr: SocketAddr,
    /// Names (DNS or IP) nodes use to reach the gRPC server; they go into its certificate.
    #[arg(long = "tls-san", env = "MESH_CONTROL_TLS_SANS", value_delimiter = ',', default_values_t = default_sans())]
    tls_sans: Vec<String>,
    #[arg(long, env = "MESH_CONTROL_TRUST_DOMAIN", default_value = mesh_control::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// Namespace whose policies apply mesh-wide; in Kubernetes mode also the controller's own.
    #[arg(long, env = "MESH_CONTROL_ROOT_NAMESPACE", default_value = mesh_control::DEFAULT_ROOT_NAMESPACE)]
    root_namespace: String,
    /// Default workload certificate lifetime, seconds.
    #[arg(long, env = "MESH_CONTROL_CERT_TTL_SECONDS", default_value_t = ca::DEFAULT_TTL.as_secs(),
          value_parser = clap::value_parser!(u64).range(60..=ca::MAX_TTL.as_secs()))]
    cert_ttl_seconds: u64,
    /// Default node certificate lifetime, seconds (renewed by the node at half-life with its
    /// credential).
    #[arg(long, env = "MESH_CONTROL_NODE_CERT_TTL_SECONDS", default_value_t = ca::DEFAULT_NODE_TTL.as_secs(),
          value_parser = clap::value_parser!(u64).range(60..=ca::MAX_NODE_TTL.as_secs()))]
    node_cert_ttl_seconds: u64,
    /// File mode: how often the folder is checked for changes, milliseconds.
    #[arg(long, env = "MESH_CONTROL_POLL_MS", default_value_t = 200, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    poll_ms: u64,
    /// `ServiceAccount` of the node `DaemonSet`: Kubernetes mode refuses tokens of others; both
    /// modes name it in node certificates.
    #[arg(long, env = "MESH_CONTROL_NODE_SERVICE_ACCOUNT", default_value = "mesh-node")]
    node_service_account: String,
    /// Node bootstraps (`CreateNodeCertificate`, the one call without a client certificate)
    /// one source address (IPv6: its /64) may make at once; then `--bootstrap-per-minute`.
    #[arg(long, env = "MESH_CONTROL_BOOTSTRAP_BURST", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    bootstrap_burst: u32,
    /// Node bootstraps per minute and source address once its burst is spent.
    #[arg(long, env = "MESH_CONTROL_BOOTSTRAP_PER_MINUTE", default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..))]
    bootstrap_per_minute: u32,
    /// Kubernetes mode: this replica's name in the leader Lease (the Deployment sets the pod
    /// name; default `<hostname>-<pid>`).
    #[arg(long, env = "MESH_CONTROL_POD_NAME")]
    pod_name: Option<String>,
    /// Service graph: the node daemons' metrics port, scraped at the address each node's config
    /// stream comes from.
    #[arg(long, env = "MESH_CONTROL_GRAPH_METRICS_PORT", default_value_t = 15020)]
    graph_metrics_port: u16,
    /// Service graph: seconds between two scrapes of every node (the window of its rates, and
    /// the refresh of the /graph page).
    #[arg(long, env = "MESH_CONTROL_GRAPH_INTERVAL_SECONDS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
    graph_interval_seconds: u64,
    /// Service graph: build it from this Prometheus' HTTP API (`http://host:port[/prefix]`,
    /// increases over 60 s) instead of scraping the nodes.
    #[arg(long, env = "MESH_CONTROL_GRAPH_PROMETHEUS_URL", value_name = "URL")]
    graph_prometheus_url: Option<graph::Prometheus>,
    #[arg(long, env = "MESH_LOG", default_value = "info")]
    log: String,
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}-{}", host.trim(), std::process::id())
}

fn default_sans() -> Vec<String> {
    ["localhost", "127.0.0.1", "mesh-control", "mesh-control.mesh-system", "mesh-control.mesh-system.svc"].map(String::from).to_vec()
}

fn main() -> ExitCode {
    let config = match Args::try_parse() {
        Ok(c) => c,
        Err(e) if e.use_stderr() => {
            let _ = e.print();
            return ExitCode::from(64);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::new(&config.log)).init();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime");
    match rt.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Args) -> Result<()> {
    let publisher = Publisher::new();
    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::new(&mut registry));
    let nodes = Arc::default();
    // Kubernetes mode elects a leader among the replicas; the election stops (and releases the
    // Lease) when we do.
    let (stop_election, election_stopped) = tokio::sync::oneshot::channel::<()>();
    let mut election_task = None;
    let (ca, auth, source, leadership, election) = if let Some(dir) = config.config_dir.clone() {
        let ca = Ca::load_or_create(&config.state_dir.join("ca"), &config.trust_domain)?;
        let token_dir = config.node_token_dir.clone().unwrap_or_else(|| config.state_dir.join("node-tokens"));
        let source = tokio::spawn(filemode::watch(dir, config.root_namespace.clone(), Duration::from_millis(config.poll_ms), publisher.clone()));
        (Arc::new(ca), Authenticator::Files { dir: token_dir }, source, Leadership::alone(), "none (file mode: a single controller)".to_owned())
    } else {
        let client = kube::Client::try_default().await.context("connecting to Kubernetes")?;
        let ns = config.root_namespace.clone();
        let identity = config.pod_name.clone().unwrap_or_else(default_identity);
        let (lead_tx, leadership) = Leadership::channel();
        let elector = k8s::lease::Elector::new(client.clone(), &ns, &identity, Timing::DEFAULT);
        election_task = Some(tokio::spawn(elector.run(lead_tx, async move {
            let _ = election_stopped.await;
        })));
        let ca = Arc::new(k8s::ca_secret::load_or_create(&client, &ns, &config.trust_domain, &leadership).await?);
        tokio::spawn(k8s::ca_secret::publish_while_leading(client.clone(), ns.clone(), Arc::clone(&ca), leadership.clone()));
        let auth = Authenticator::Kubernetes(k8s::token::Reviewer::new(client.clone(), &ns, &config.node_service_account));
        let cfg = k8s::discovery::Config { root_namespace: ns.clone(), leadership: leadership.clone(), metrics: metrics.clone() };
        let source = tokio::spawn(k8s::discovery::run(client, cfg, publisher.clone()));
        let election = format!("Lease {ns}/{} as {identity}", k8s::lease::LEASE_NAME);
        (ca, auth, source, leadership, election)
    };
    let shared = Shared {
        publisher: publisher.clone(),
        ca,
        auth: Arc::new(auth),
        metrics: metrics.clone(),
        nodes: Arc::clone(&nodes),
        default_ttl: Duration::from_secs(config.cert_ttl_seconds),
        node_ids: NodeIds::new(&config.trust_domain, &config.root_namespace, &config.node_service_account),
        node_ttl: Duration::from_secs(config.node_cert_ttl_seconds),
        bootstrap_limit: Arc::new(mesh_l7::per_source::PerSource::new(mesh_l7::per_source::Rate {
            burst: config.bootstrap_burst,
            per_minute: config.bootstrap_per_minute,
        })),
        views: Default::default(),
    };
    let grpc = Server::new(config.grpc_addr, &config.tls_sans, shared).await?;
    let graph = graph::Store::new(graph::Config { metrics_port: config.graph_metrics_port, interval: Duration::from_secs(config.graph_interval_seconds) });
    match config.graph_prometheus_url.clone() {
        Some(prometheus) => tokio::spawn(graph::run_prometheus(graph.clone(), prometheus, metrics.clone())),
        None => tokio::spawn(graph::run(graph.clone(), Arc::clone(&nodes), metrics.clone())),
    };
    let status = StatusServer::new(config.status_addr, Sources { publisher, nodes, registry: Arc::new(registry), metrics, leadership, election, graph }).await?;
    tracing::info!(grpc = %grpc.local_addr(), status = %status.local_addr(), "mesh-control started");
    tokio::select! {
        r = grpc.run() => r.context("gRPC server stopped")?,
        () = status.run() => {}
        r = source => r.context("config source stopped")?,
        () = shutdown_signal() => tracing::info!("stopping on signal"),
    }
    // Hand the Lease over (the other replica takes it at its next read, not after 15 s).
    let _ = stop_election.send(());
    if let Some(task) = election_task {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    Ok(())
}

/// SIGTERM (Kubernetes, the lab) or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
