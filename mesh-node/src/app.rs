//! Wiring: binds every listener (so a port conflict fails start-up), starts the proxies, the
//! certificate rotation, the metrics and admin servers, and drains them on SIGTERM, SIGINT or
//! `POST /quitquitquit`.

pub mod config;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use prometheus_client::registry::Registry;
use rustls_pki_types::CertificateDer;
use tokio::sync::watch;

pub use config::Config;

use crate::{
    admin::{Admin, LogControl},
    balance::cluster::Clusters,
    drain,
    identity::{CaClient, CertMetrics, CertStore},
    metrics,
    proxy::{self, Inputs, inbound::Inbound, inbound_plain::InboundPlain, outbound::Outbound, pool::Pool},
    readiness::Ready,
    state::StateRx,
};

/// A running daemon: its real addresses (port 0 resolved) and handles for tests.
pub struct Bound {
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
    pub inbound_plain: SocketAddr,
    pub metrics: SocketAddr,
    pub admin: SocketAddr,
    pub outbound_handler: proxy::outbound::Handler,
    pub inputs: Inputs,
    pub pool: Arc<Pool>,
    /// The HTTP paths' shared pools (tests drive the plaintext handler with it).
    pub http: Arc<proxy::l7::Shared>,
    pub ready: Ready,
    shutdown: watch::Sender<bool>,
    trigger: drain::Trigger,
    deadline: Duration,
}

pub async fn build(
    cfg: &Config,
    ca: Arc<dyn CaClient>,
    roots: Vec<CertificateDer<'static>>,
    state: StateRx,
    log: Option<LogControl>,
) -> Result<Bound, proxy::Error> {
    build_with(cfg, ca, roots, state, log, Registry::default(), Ready::default(), Arc::default()).await
}

/// [`build`] with a registry and readiness the caller already populated (the daemon registers
/// its control-plane and datapath metrics, and readiness blocks for "config synced" and
/// "datapath attached", before the proxies start), and the clusters the kernel sync follows.
#[expect(clippy::too_many_arguments, reason = "the daemon's one call site hands over what it built")]
pub async fn build_with(
    cfg: &Config,
    ca: Arc<dyn CaClient>,
    roots: Vec<CertificateDer<'static>>,
    state: StateRx,
    log: Option<LogControl>,
    mut registry: Registry,
    ready: Ready,
    clusters: Arc<Clusters>,
) -> Result<Bound, proxy::Error> {
    let certs = CertStore::new(ca, roots, CertMetrics::new(&mut registry));
    let inputs = Inputs {
        cfg: Arc::new(cfg.proxy.clone()),
        state: state.clone(),
        certs: certs.clone(),
        metrics: Arc::new(proxy::Metrics::new(&mut registry)),
    };
    let (trigger, watcher) = drain::new();
    let (shutdown, _) = watch::channel(false);

    let pool = Pool::new(inputs.clone());
    let jwks = crate::authn::JwksCache::new(cfg.proxy.jwks_refresh, &mut registry);
    let tracers = crate::telemetry::tracers::Tracers::new(&cfg.proxy.node_name, &cfg.proxy.cluster_domain, state.clone(), &mut registry);
    let http = proxy::l7::Shared::new(&inputs, pool.clone(), clusters.clone(), jwks.clone(), tracers);
    let outbound = Outbound::new(cfg.outbound_addr, inputs.clone(), pool.clone(), http.clone()).await?;
    let inbound = Inbound::new(cfg.inbound_addr, inputs.clone(), http.clone()).await?;
    let inbound_plain = InboundPlain::new(cfg.inbound_plain_addr, inputs.clone(), http.clone()).await?;
    let metrics = metrics::Server::new(cfg.metrics_addr, Arc::new(registry), ready.clone()).await?;
    let admin = Admin::new(cfg.admin_addr, inputs.cfg.clone(), state.clone(), certs.clone(), ready.clone(), log, shutdown.clone()).await?;

    let bound = Bound {
        outbound: outbound.address(),
        inbound: inbound.address(),
        inbound_plain: inbound_plain.address(),
        metrics: metrics.address(),
        admin: admin.address(),
        outbound_handler: outbound.handler(),
        inputs: inputs.clone(),
        pool: pool.clone(),
        http: http.clone(),
        ready: ready.clone(),
        shutdown,
        trigger,
        deadline: cfg.drain_deadline,
    };
    let jwks_state = state.clone();
    tokio::spawn(follow_state(state, certs.clone(), cfg.proxy.node_name.clone(), ready.clone()));
    let stop = |w: &drain::Watcher| {
        let w = w.clone();
        async move { w.signaled().await }
    };
    // Rotation and the reaper only stop on drain; they must not hold the drain open.
    tokio::spawn(certs.run(stop(&watcher)));
    tokio::spawn(pool.run_reaper(stop(&watcher)));
    tokio::spawn(http.run_reaper(stop(&watcher)));
    tokio::spawn(clusters.run_sweeper(stop(&watcher)));
    tokio::spawn(jwks.run(jwks_state, stop(&watcher)));
    tokio::spawn(outbound.run(watcher.clone()));
    tokio::spawn(inbound.run(watcher.clone()));
    tokio::spawn(inbound_plain.run(watcher.clone()));
    tokio::spawn(metrics.run(watcher.clone()));
    tokio::spawn(admin.run(watcher));
    Ok(bound)
}

/// Keeps the certificate set equal to the local workloads' identities; readiness waits for the
/// first snapshot and for those certificates.
async fn follow_state(mut state: StateRx, certs: Arc<CertStore>, node: String, ready: Ready) {
    let mut block_certs = Some(ready.register("certificates"));
    let mut issued = certs.subscribe();
    loop {
        let wanted = state.borrow_and_update().local_identities(&node);
        certs.set_wanted(wanted.clone());
        loop {
            if block_certs.is_some() && wanted.iter().all(|id| certs.get(id).is_some()) {
                block_certs = None;
            }
            tokio::select! {
                r = state.changed() => { if r.is_err() { return; } break; }
                r = issued.changed() => if r.is_err() { return },
            }
        }
    }
}

impl Bound {
    /// Starts a graceful shutdown (as `POST /quitquitquit` does).
    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// Waits for SIGTERM, SIGINT or a shutdown request, then drains: listeners stop accepting,
    /// open connections get until the deadline. Returns whether everything finished in time.
    pub async fn wait_termination(self) -> std::io::Result<bool> {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut asked = self.shutdown.subscribe();
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: draining"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: draining"),
            _ = asked.wait_for(|s| *s) => tracing::info!("shutdown requested: draining"),
        }
        let done = self.trigger.drain(self.deadline).await;
        if done {
            tracing::info!("drained");
        } else {
            tracing::warn!(deadline = ?self.deadline, "drain deadline passed: closing remaining connections");
        }
        Ok(done)
    }
}
