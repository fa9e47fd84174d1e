//! Keeps the kernel datapath equal to the node's view of the mesh.
//!
//! `translate` (pure, unit-tested) turns a [`State`] plus the pod cgroups found on the node into
//! what the kernel needs: Services to balance, this node's pods (by cgroup), endpoints with their
//! identities and STRICT flags, and the part of AuthorizationPolicy the kernel can enforce.
//! [`KernelSync::run`] re-applies it whenever the state changes and every few seconds (pods come
//! and go without a state change), counting failures; the datapath writes only differences.
//!
//! The daemon runs it on a thread of its own (`writers::Writers::spawn_thread`), not on the
//! proxy's event loop (one thread by default): an application walks the pod cgroups, every
//! Service and endpoint of the mesh and the maps' mirrors, which at 100,000 endpoints is time no
//! request should wait for.
//!
//! The STRICT guard goes on each pod's host-side interface. With `MESH_POD_INTERFACES` the list
//! is fixed (the lab); without it (a cluster) every rescan finds them: the interfaces of this
//! namespace whose peer is in the network namespace of a pod cgroup's process (netlink's
//! namespace ids, see `routing::netlink`). Guards of interfaces that went away are unpinned.

mod translate;

use std::{
    collections::BTreeSet,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

pub use translate::{Cgroups, Desired, identities, translate, translate_with};

use crate::{
    datapath::{self, Datapath, discover},
    routing::Netlink,
    state::{State, StateRx},
};

/// How often pod cgroups are rescanned when the state does not change.
pub const RESCAN: Duration = Duration::from_secs(2);

#[derive(Clone, Debug)]
pub struct Config {
    pub node_name: String,
    /// The cgroup the datapath is attached to; pods are discovered below it.
    pub cgroup: PathBuf,
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: Outcome,
}

/// Datapath metrics: kernel drop/event counters (read from the per-CPU maps at each sync) and
/// sync failures.
#[derive(Clone)]
pub struct Metrics {
    /// Counters that follow the kernel's per-CPU counts (see [`follow`]).
    drops: Family<ReasonLabel, Counter>,
    events: Family<ReasonLabel, Counter>,
    sync_errors: Family<ErrorLabel, Counter>,
    services: Gauge,
    pods: Gauge,
    interfaces: Gauge,
    /// How long one application of the state takes (discovery, translation, map writes), by
    /// what it did.
    duration: Family<OutcomeLabel, Histogram, fn() -> Histogram>,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            drops: Family::default(),
            events: Family::default(),
            sync_errors: Family::default(),
            services: Gauge::default(),
            pods: Gauge::default(),
            interfaces: Gauge::default(),
            // 100 µs to ~3.3 s.
            duration: Family::new_with_constructor(|| Histogram::new(exponential_buckets(1e-4, 2.0, 16))),
        };
        registry.register("mesh_datapath_drops", "Operations the kernel datapath refused, by stable reason (cumulative)", m.drops.clone());
        registry.register("mesh_datapath_events", "Kernel datapath events: LB decisions, captures, bypass (cumulative)", m.events.clone());
        registry.register("mesh_datapath_sync_errors", "Failed applications of the desired state to the kernel, by kind", m.sync_errors.clone());
        registry.register("mesh_datapath_services", "Service VIP:port entries installed in the kernel", m.services.clone());
        registry.register("mesh_datapath_pods", "Pod cgroups of this node known to the kernel", m.pods.clone());
        registry.register("mesh_datapath_pod_interfaces", "Pod interfaces carrying the STRICT guard", m.interfaces.clone());
        registry.register(
            "mesh_datapath_sync_duration_seconds",
            "Time one application of the node's state to the kernel took (pod discovery, translation, map writes), by outcome: applied, unchanged (nothing to translate or write), failed",
            m.duration.clone(),
        );
        m
    }
}

/// Advances `counter` to the kernel's cumulative count `n`. The kernel's maps outlive a daemon
/// restart and its counter starts at zero, so the first read carries the whole count (a process
/// restart is a counter reset to Prometheus anyway); the kernel's counts never go down while its
/// maps exist.
fn follow(counter: &Counter, n: u64) {
    let now = counter.get();
    if n > now {
        counter.inc_by(n - now);
    }
}

pub struct KernelSync {
    config: Config,
    datapath: Datapath,
    metrics: Metrics,
    /// Pod interfaces found at each rescan (no `MESH_POD_INTERFACES`); `None` with a fixed list.
    discovery: Option<Netlink>,
    guarded: BTreeSet<String>,
    /// The HTTP path's clusters, whose ejections the kernel's tables follow.
    clusters: Option<Arc<crate::balance::cluster::Clusters>>,
    /// Where the cgroup2 filesystem is mounted, to name the kubelets' cgroups (`None`: no
    /// cgroup2 mount seen, so no kubelet is trusted).
    cgroup2: Option<PathBuf>,
    /// Kubelets trusted at the last rescan (logged when it changes).
    kubelets: Vec<(u32, PathBuf)>,
    /// What the last successful application was made from.
    applied: Option<Applied>,
}

/// The inputs of a successful application (see [`KernelSync::apply_shared`]).
struct Applied {
    state: Arc<State>,
    cgroups: Cgroups,
    ejections: u64,
}

/// What one application did: `mesh_datapath_sync_duration_seconds{outcome}`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types, reason = "the label values users see")]
enum Outcome {
    /// Translated and written (only the differences reach the kernel).
    applied,
    /// Nothing changed since the last success: not translated, nothing written.
    unchanged,
    /// A map refused its update (retried at the next rescan).
    failed,
}

impl KernelSync {
    /// Takes a datapath whose node settings (capture target, bypass, daemon mark) were written
    /// before its programs attached; guards the fixed pod interfaces; state follows in `run`.
    pub fn new(config: Config, mut datapath: Datapath, metrics: Metrics) -> Result<Self, datapath::Error> {
        let netlink = Netlink::open().map_err(|source| datapath::Error::Syscall { what: "open a netlink socket to find pod interfaces", source })?;
        if !config.pod_interfaces.is_empty() {
            // One dump for all of them: which ones are bridge ports, and of which bridge.
            let links = netlink.peer_links().map_err(|source| datapath::Error::Syscall { what: "list the pod interfaces", source })?;
            for ifname in &config.pod_interfaces {
                let bridge = links.iter().find(|l| &l.name == ifname).and_then(|l| l.bridge_mac);
                datapath.attach_pod_interface(ifname, bridge)?;
            }
        }
        let discovery = config.pod_interfaces.is_empty().then_some(netlink);
        let guarded = config.pod_interfaces.iter().cloned().collect();
        let cgroup2 = std::fs::read_to_string("/proc/self/mounts").ok().and_then(|m| crate::kubepods::cgroup2_mount(&m));
        let mut sync = Self { config, datapath, metrics, discovery, guarded, clusters: None, cgroup2, kubelets: Vec::new(), applied: None };
        sync.trust_kubelets();
        Ok(sync)
    }

    /// Lets the kubelets' probes into STRICT pods (their cgroups go to the trusted-sender map);
    /// a kubelet restarted in another cgroup is followed at the next rescan.
    fn trust_kubelets(&mut self) {
        let found = self.cgroup2.as_deref().map(|mount| discover::kubelets(mount, &self.config.cgroup)).unwrap_or_default();
        if found != self.kubelets {
            let cgroups: Vec<String> = found.iter().map(|(pid, dir)| format!("{} (pid {pid})", dir.display())).collect();
            tracing::info!(kubelets = ?cgroups, "kubelets whose probes STRICT pods accept");
        }
        if let Err(e) = self.datapath.sync_trusted(&found) {
            self.metrics.sync_errors.get_or_create(&ErrorLabel { kind: "trusted_senders".into() }).inc();
            tracing::warn!(error = %e, "updating the kubelets STRICT pods accept probes from failed (retried)");
        }
        self.kubelets = found;
    }

    /// Attaches the STRICT guard to pod interfaces that appeared and unpins those of interfaces
    /// that went away. A failure is logged, counted and retried at the next rescan.
    fn guard_pod_interfaces(&mut self, found: &std::collections::BTreeMap<PathBuf, discover::Found>) {
        let Some(netlink) = &self.discovery else { return };
        let links = match netlink.peer_links() {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "listing interfaces failed; pod interfaces unchanged");
                return;
            }
        };
        let nsids: BTreeSet<i32> = found.values().filter_map(|f| netlink.netnsid_of_pid(f.pid).ok().flatten()).collect();
        let pods: Vec<_> = links.into_iter().filter(|l| nsids.contains(&l.peer_netnsid)).collect();
        let want: BTreeSet<String> = pods.iter().map(|l| l.name.clone()).collect();
        let new: Vec<_> = pods.iter().filter(|l| !self.guarded.contains(&l.name)).collect();
        for link in new {
            let ifname = &link.name;
            match self.datapath.attach_pod_interface(ifname, link.bridge_mac) {
                Ok(()) => {
                    tracing::info!(interface = %ifname, "STRICT guard attached to a new pod interface");
                    self.guarded.insert(ifname.clone());
                }
                Err(e) => {
                    self.metrics.sync_errors.get_or_create(&ErrorLabel { kind: "pod_interface".into() }).inc();
                    tracing::warn!(interface = %ifname, error = %e, "attaching the STRICT guard failed (retried)");
                }
            }
        }
        for gone in self.datapath.prune_pod_interfaces(&want) {
            tracing::info!(interface = %gone, "pod interface gone: its STRICT guard removed");
        }
        self.guarded.retain(|i| want.contains(i));
        self.metrics.interfaces.set(i64::try_from(self.guarded.len()).unwrap_or(i64::MAX));
    }

    /// Applies the current state once; errors are logged, counted and returned.
    pub fn apply(&mut self, state: &State) -> Result<(), datapath::Error> {
        self.timed(|sync| sync.apply_inner(state, None))
    }

    /// As [`Self::apply`], but a rescan that finds what the last successful application had
    /// (this very state, the same pod cgroups and addresses, the same outlier ejections) leaves
    /// the maps alone: at 100,000 endpoints, translating and comparing the whole mesh every
    /// [`RESCAN`] cost a core's time and a transient copy of the kernel's tables for nothing.
    /// The maps are written only by this writer (diffed against its mirrors), so nothing is
    /// lost by not writing the same entries again.
    fn apply_shared(&mut self, state: &Arc<State>) -> Result<(), datapath::Error> {
        self.timed(|sync| sync.apply_inner(state, Some(state)))
    }

    fn timed(&mut self, apply: impl FnOnce(&mut Self) -> Result<Outcome, datapath::Error>) -> Result<(), datapath::Error> {
        let started = Instant::now();
        let result = apply(self);
        let outcome = match &result {
            Ok(o) => *o,
            Err(_) => Outcome::failed,
        };
        self.metrics.duration.get_or_create(&OutcomeLabel { outcome }).observe(started.elapsed().as_secs_f64());
        result.map(drop)
    }

    fn apply_inner(&mut self, state: &State, shared: Option<&Arc<State>>) -> Result<Outcome, datapath::Error> {
        let found = discover::pod_processes(&self.config.cgroup).unwrap_or_default();
        self.guard_pod_interfaces(&found);
        self.trust_kubelets();
        let cgroups: Cgroups = found.into_iter().map(|(dir, f)| (dir, f.addresses)).collect();
        let ejections = self.clusters.as_ref().map_or(0, |c| c.version());
        let unchanged = shared.zip(self.applied.as_ref()).is_some_and(|(s, a)| Arc::ptr_eq(s, &a.state) && a.cgroups == cgroups && a.ejections == ejections);
        if unchanged {
            self.read_counters();
            return Ok(Outcome::unchanged);
        }
        self.applied = None;
        let clusters = self.clusters.clone();
        let ejected = move |s: &crate::state::Service| clusters.as_ref().and_then(|c| c.ejected(&s.namespace, &s.name));
        let mut desired = translate_with(state, &self.config.node_name, &cgroups, &ejected);
        desired.services.extend(self.config.static_services.iter().cloned());
        // Each map on its own: a Service the kernel refuses must not keep a new STRICT pod or
        // deny rule (the endpoint and policy maps) out of the kernel.
        let results = [
            ("services", self.datapath.sync_services(&desired.services)),
            ("pods", self.datapath.sync_pods(&desired.pods)),
            ("endpoints", self.datapath.sync_endpoints(&desired.endpoints)),
            ("policy", self.datapath.sync_policy(&desired.deny)),
        ];
        let mut result = Ok(Outcome::applied);
        for (what, r) in results {
            let Err(e) = r else { continue };
            let kind = match e {
                datapath::Error::MapFull { .. } => "map_full",
                datapath::Error::InvalidService { .. } => "invalid_service",
                datapath::Error::InvalidPod { .. } => "invalid_pod",
                _ => "kernel",
            };
            self.metrics.sync_errors.get_or_create(&ErrorLabel { kind: kind.into() }).inc();
            tracing::warn!(error = %e, maps = what, "datapath sync failed; these maps keep their last applied state, the others were updated");
            if result.is_ok() {
                result = Err(e);
            }
        }
        if result.is_ok()
            && let Some(state) = shared
        {
            // A failed map is retried at every rescan: only a success is remembered.
            self.applied = Some(Applied { state: state.clone(), cgroups, ejections });
        }
        self.metrics.services.set(i64::try_from(self.datapath.service_count()).unwrap_or(i64::MAX));
        self.metrics.pods.set(i64::try_from(desired.pods.len()).unwrap_or(i64::MAX));
        self.read_counters();
        result
    }

    /// The kernel's drop and event counters, into the metrics.
    fn read_counters(&self) {
        if let Ok(stats) = self.datapath.stats() {
            for (reason, n) in stats.drops {
                follow(&self.metrics.drops.get_or_create(&ReasonLabel { reason: reason.into() }), n);
            }
            for (event, n) in stats.events {
                follow(&self.metrics.events.get_or_create(&ReasonLabel { reason: event.into() }), n);
            }
        }
    }

    /// Re-applies on every state change and every [`RESCAN`], until the state sender is gone.
    /// Re-applies on ejection changes too: an endpoint outlier detection ejects leaves the
    /// kernel's tables within a sweep.
    pub fn with_ejections(mut self, clusters: Arc<crate::balance::cluster::Clusters>) -> Self {
        self.clusters = Some(clusters);
        self
    }

    /// `hold`: the current state is a placeholder (no config yet): leave the kernel's pinned
    /// state as the previous daemon left it until the first real one arrives.
    pub async fn run(mut self, mut state_rx: StateRx, hold: bool) {
        if hold {
            tracing::info!("no config yet: the kernel keeps its last state until the control plane's first update");
            if state_rx.changed().await.is_err() {
                return;
            }
        }
        let mut ejections = self.clusters.as_ref().map(|c| c.subscribe());
        loop {
            let state: Arc<State> = state_rx.borrow_and_update().clone();
            let _ = self.apply_shared(&state);
            let ejections_changed = async {
                match ejections.as_mut() {
                    Some(rx) => rx.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = state_rx.changed() => if changed.is_err() { return },
                true = ejections_changed => {}
                () = tokio::time::sleep(RESCAN) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_counts_become_a_counter_that_never_goes_back() {
        let c = Counter::default();
        follow(&c, 40); // first read after a restart: the kernel's whole count
        assert_eq!(c.get(), 40);
        follow(&c, 45);
        follow(&c, 45);
        assert_eq!(c.get(), 45);
        follow(&c, 3); // never down (maps are recreated only by an uninstall)
        assert_eq!(c.get(), 45);
    }
}
