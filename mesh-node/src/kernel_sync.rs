//! Keeps the kernel datapath equal to the node's view of the mesh.
//!
//! `translate` (pure, unit-tested) turns a [`State`] plus the pod cgroups found on the node into
//! what the kernel needs: Services to balance, this node's pods (by cgroup), endpoints with their
//! identities and STRICT flags, and the part of AuthorizationPolicy the kernel can enforce.
//! [`KernelSync::run`] re-applies it whenever the state changes and every few seconds (pods come
//! and go without a state change), counting failures; the datapath writes only differences.

mod translate;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

pub use translate::{Desired, translate};

use crate::{
    datapath::{self, Datapath, NodeSpec, discover},
    state::{State, StateRx},
};

/// How often pod cgroups are rescanned when the state does not change.
pub const RESCAN: Duration = Duration::from_secs(2);

#[derive(Clone, Debug)]
pub struct Config {
    pub node_name: String,
    /// The cgroup the datapath is attached to; pods are discovered below it.
    pub cgroup: PathBuf,
    /// The daemon's outbound listener: meshed pods' connections are redirected here.
    pub capture: Option<SocketAddr>,
    pub hbone_port: u16,
    pub bypass: bool,
    /// Services from `MESH_SERVICES_FILE`, installed beside the control plane's.
    pub static_services: Vec<datapath::ServiceSpec>,
    /// Pods' host-side interfaces: the STRICT guard is attached to each.
    pub pod_interfaces: Vec<String>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabel {
    kind: String,
}

/// Datapath metrics: kernel drop/event counters (read from the per-CPU maps at each sync) and
/// sync failures.
#[derive(Clone)]
pub struct Metrics {
    drops: Family<ReasonLabel, Gauge>,
    events: Family<ReasonLabel, Gauge>,
    sync_errors: Family<ErrorLabel, Counter>,
    services: Gauge,
    pods: Gauge,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            drops: Family::default(),
            events: Family::default(),
            sync_errors: Family::default(),
            services: Gauge::default(),
            pods: Gauge::default(),
        };
        registry.register("mesh_datapath_drops", "Operations the kernel datapath refused, by stable reason (cumulative)", m.drops.clone());
        registry.register("mesh_datapath_events", "Kernel datapath events: LB decisions, captures, bypass (cumulative)", m.events.clone());
        registry.register("mesh_datapath_sync_errors", "Failed applications of the desired state to the kernel, by kind", m.sync_errors.clone());
        registry.register("mesh_datapath_services", "Service VIP:port entries installed in the kernel", m.services.clone());
        registry.register("mesh_datapath_pods", "Pod cgroups of this node known to the kernel", m.pods.clone());
        m
    }
}

pub struct KernelSync {
    config: Config,
    datapath: Datapath,
    metrics: Metrics,
}

impl KernelSync {
    /// Sets the node-wide settings at once (capture target, bypass); state follows in `run`.
    pub fn new(config: Config, mut datapath: Datapath, metrics: Metrics) -> Result<Self, datapath::Error> {
        datapath.set_node(&NodeSpec { capture: config.capture, hbone_port: config.hbone_port, bypass: config.bypass })?;
        for ifname in &config.pod_interfaces {
            datapath.attach_pod_interface(ifname)?;
        }
        Ok(Self { config, datapath, metrics })
    }

    /// Applies the current state once; errors are logged, counted and returned.
    pub fn apply(&mut self, state: &State) -> Result<(), datapath::Error> {
        let cgroups = discover::pod_cgroups(&self.config.cgroup).unwrap_or_default();
        let mut desired = translate(state, &self.config.node_name, &cgroups);
        desired.services.extend(self.config.static_services.iter().cloned());
        let result = (|| {
            self.datapath.sync_services(&desired.services)?;
            self.datapath.sync_pods(&desired.pods)?;
            self.datapath.sync_endpoints(&desired.endpoints)?;
            self.datapath.sync_policy(&desired.deny)
        })();
        if let Err(e) = &result {
            let kind = match e {
                datapath::Error::MapFull { .. } => "map_full",
                datapath::Error::InvalidService { .. } => "invalid_service",
                datapath::Error::InvalidPod { .. } => "invalid_pod",
                _ => "kernel",
            };
            self.metrics.sync_errors.get_or_create(&ErrorLabel { kind: kind.into() }).inc();
            tracing::warn!(error = %e, "datapath sync failed; the kernel keeps its last applied state");
        }
        self.metrics.services.set(i64::try_from(self.datapath.service_count()).unwrap_or(i64::MAX));
        self.metrics.pods.set(i64::try_from(desired.pods.len()).unwrap_or(i64::MAX));
        if let Ok(stats) = self.datapath.stats() {
            for (reason, n) in stats.drops {
                self.metrics.drops.get_or_create(&ReasonLabel { reason: reason.into() }).set(i64::try_from(n).unwrap_or(i64::MAX));
            }
            for (event, n) in stats.events {
                self.metrics.events.get_or_create(&ReasonLabel { reason: event.into() }).set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
        result
    }

    /// Re-applies on every state change and every [`RESCAN`], until the state sender is gone.
    pub async fn run(mut self, mut state_rx: StateRx) {
        loop {
            let state: Arc<State> = state_rx.borrow_and_update().clone();
            let _ = self.apply(&state);
            tokio::select! {
                changed = state_rx.changed() => if changed.is_err() { return },
                () = tokio::time::sleep(RESCAN) => {}
            }
        }
    }
}
