//! Wiring: binds every listener (so a port conflict fails start-up) or takes it from the daemon
//! this one replaces (`crate::handoff`), starts the proxies, the certificate rotation, the
//! metrics and admin servers, and drains them on SIGTERM, SIGINT, `POST /quitquitquit` or a
//! successor's take-over.

/// The daemon's listeners by name: how a predecessor hands them over (`crate::handoff`) and how
/// a service manager passes them (`crate::activation`).
pub mod listener {
    pub const OUTBOUND: &str = "outbound";
    pub const INBOUND: &str = "inbound";
    pub const INBOUND_PLAINTEXT: &str = "inbound-plaintext";
    pub const METRICS: &str = "metrics";
    pub const ADMIN: &str = "admin";
    pub const ALL: [&str; 5] = [OUTBOUND, INBOUND, INBOUND_PLAINTEXT, METRICS, ADMIN];
}

pub mod config;

use std::{
    net::SocketAddr,
    os::fd::OwnedFd,
    sync::Arc,
    time::Duration,
};

use prometheus_client::registry::Registry;
use rustls_pki_types::CertificateDer;
use tokio::sync::watch;

pub use config::Config;

use crate::{
    admin::{Admin, LogControl},
    balance::cluster::Clusters,
    drain, handoff,
    identity::{CaClient, CertMetrics, CertStore},
    metrics,
    proxy::{self, Inputs, Listen, inbound::Inbound, inbound_plain::InboundPlain, outbound::Outbound, pool::Pool},
    readiness::Ready,
    state::StateRx,
};

/// Why a daemon stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    Sigterm,
    Sigint,
    /// `POST /quitquitquit`, or a successor took over.
    Asked,
}

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
    /// The listeners start accepting when this turns true ([`Bound::start`]).
    accepting: watch::Sender<bool>,
    /// Duplicates of the listening sockets, by name, for a successor.
    sockets: Vec<(&'static str, OwnedFd)>,
}

pub async fn build(
    cfg: &Config,
    ca: Arc<dyn CaClient>,
    roots: Vec<CertificateDer<'static>>,
    state: StateRx,
    log: Option<LogControl>,
) -> Result<Bound, proxy::Error> {
    let bound = build_with(cfg, ca, roots, state, log, Registry::default(), Ready::default(), Arc::default(), &mut handoff::Inherited::default()).await?;
    bound.start();
    Ok(bound)
}

/// [`build`] with a registry and readiness the caller already populated (the daemon registers
/// its control-plane and datapath metrics, and readiness blocks for "config synced" and
/// "datapath attached", before the proxies start), the clusters the kernel sync follows, and the
/// listeners a predecessor handed over. Nothing is accepted until [`Bound::start`].
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
    inherited: &mut handoff::Inherited,
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
    let mut listen = |name, addr| inherited.take(name, addr).map_or(Listen::Bind(addr), Listen::Inherited);
    let outbound = Outbound::new(listen(listener::OUTBOUND, cfg.outbound_addr), inputs.clone(), pool.clone(), http.clone()).await?;
    let inbound = Inbound::new(listen(listener::INBOUND, cfg.inbound_addr), inputs.clone(), http.clone()).await?;
    let inbound_plain = InboundPlain::new(listen(listener::INBOUND_PLAINTEXT, cfg.inbound_plain_addr), inputs.clone(), http.clone()).await?;
    let refused = inputs.metrics.connections_refused.clone();
    let metrics = metrics::Server::new(listen(listener::METRICS, cfg.metrics_addr), Arc::new(registry), ready.clone(), refused.clone()).await?;
    let credential = crate::admin::Credential::load_or_create(cfg.admin_token_file.as_deref())?;
    let admin = Admin::new(listen(listener::ADMIN, cfg.admin_addr), inputs.cfg.clone(), state.clone(), certs.clone(), ready.clone(), log, shutdown.clone(), refused, credential).await?;
    let sockets = vec![
        (listener::OUTBOUND, outbound.socket()?),
        (listener::INBOUND, inbound.socket()?),
        (listener::INBOUND_PLAINTEXT, inbound_plain.socket()?),
        (listener::METRICS, metrics.socket()?),
        (listener::ADMIN, admin.socket()?),
    ];
    let (accepting, _) = watch::channel(false);

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
        accepting: accepting.clone(),
        sockets,
    };
    let jwks_state = state.clone();
    let pruner_state = state.clone();
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
    tokio::spawn(proxy::metrics::run_pruner(inputs.metrics.clone(), pruner_state, stop(&watcher)));
    tokio::spawn(jwks.run(jwks_state, stop(&watcher)));
    tokio::spawn(once_started(accepting.subscribe(), watcher.clone(), outbound.run(watcher.clone())));
    tokio::spawn(once_started(accepting.subscribe(), watcher.clone(), inbound.run(watcher.clone())));
    tokio::spawn(once_started(accepting.subscribe(), watcher.clone(), inbound_plain.run(watcher.clone())));
    tokio::spawn(once_started(accepting.subscribe(), watcher.clone(), metrics.run(watcher.clone())));
    tokio::spawn(once_started(accepting.subscribe(), watcher.clone(), admin.run(watcher)));
    Ok(bound)
}

/// Runs `serve` (a server's accept loop) once the daemon starts accepting (a successor waits
/// until it is ready to serve: the daemon it replaces accepts meanwhile), or never if drain
/// comes first.
async fn once_started(mut accepting: watch::Receiver<bool>, drain: drain::Watcher, serve: impl Future<Output = ()>) {
    let started = tokio::select! {
        r = accepting.wait_for(|a| *a) => r.is_ok(),
        () = drain.signaled() => false,
    };
    if started {
        serve.await;
    }
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
    /// The listening socket named `name` (`listener::*`), while this daemon still holds it (a
    /// successor takes them: [`Bound::take_listener_sockets`]).
    pub fn listener_socket(&self, name: &str) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.sockets.iter().find(|(n, _)| *n == name).map(|(_, fd)| std::os::fd::AsFd::as_fd(fd))
    }

    /// The listeners start accepting.
    pub fn start(&self) {
        self.accepting.send_replace(true);
    }

    /// The duplicates of the listening sockets, by name, to hand to a successor (once: they
    /// move to the caller, who closes them when this daemon drains).
    pub fn take_listener_sockets(&mut self) -> Vec<(&'static str, OwnedFd)> {
        std::mem::take(&mut self.sockets)
    }

    /// A handle that starts the graceful shutdown from elsewhere (a successor's take-over).
    pub fn shutdown_handle(&self) -> watch::Sender<bool> {
        self.shutdown.clone()
    }

    /// Starts a graceful shutdown (as `POST /quitquitquit` does).
    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// Waits for SIGTERM, SIGINT or a shutdown request, then drains: listeners stop accepting,
    /// open connections get until the deadline. Returns whether everything finished in time.
    pub async fn wait_termination(self) -> std::io::Result<bool> {
        self.wait_stop().await?;
        Ok(self.drain().await)
    }

    /// Waits for SIGTERM, SIGINT or a shutdown request (`POST /quitquitquit`, a successor's
    /// take-over).
    pub async fn wait_stop(&self) -> std::io::Result<Stop> {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut asked = self.shutdown.subscribe();
        Ok(tokio::select! {
            _ = term.recv() => Stop::Sigterm,
            _ = tokio::signal::ctrl_c() => Stop::Sigint,
            _ = asked.wait_for(|s| *s) => Stop::Asked,
        })
    }

    /// Drains: listeners stop accepting, open connections get until the deadline. Returns
    /// whether everything finished in time.
    pub async fn drain(mut self) -> bool {
        tracing::info!("draining");
        self.shutdown.send_replace(true); // tells whoever watches it that drain has begun
        // The listening sockets close as the accept loops end (unless handed to a successor).
        self.sockets.clear();
        let done = self.trigger.drain(self.deadline).await;
        if done {
            tracing::info!("drained");
        } else {
            tracing::warn!(deadline = ?self.deadline, "drain deadline passed: closing remaining connections");
        }
        done
    }
}
