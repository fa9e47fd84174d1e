//! What the HTTP path remembers per Service (or subset) on this node, Envoy's "cluster": the
//! load-balancing state its policy needs (round-robin position, each endpoint's outstanding
//! requests and latency, the Maglev table), its circuit breaker and its outlier detector. A
//! cluster is rebuilt when its policy changes (a config update), so limits and counters always
//! belong to one policy.
//!
//! Ejections are shared beyond HTTP: [`Clusters::ejected`] gives the endpoints a Service's
//! clusters ejected, which the kernel's tables and the TCP path leave out too, and
//! [`Clusters::subscribe`] wakes the kernel sync when that set changes.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, PoisonError, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use mesh_common::lb::mix64;
use mesh_l7::{
    circuit::Breaker,
    outlier::{Detector, Outcome},
    policy::{LoadBalancer, TrafficPolicy},
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::sync::watch;

use super::Candidate;
use crate::datapath::{BackendSpec, tables};

/// Latency estimate of an endpoint when no endpoint of its cluster has been measured yet
/// (linkerd's default).
const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// How fast a latency estimate forgets (linkerd's peak-EWMA decay).
const DECAY: Duration = Duration::from_secs(10);
/// How much cheaper an endpoint must be to win a least-request comparison.
const TIE: f64 = 3.0;
/// How often ejections are checked for their end.
pub const SWEEP: Duration = Duration::from_millis(250);

/// Namespace → Service name → subset ("" for the whole Service): found by `&str` without
/// allocating, once per request.
type ByService = HashMap<String, HashMap<String, HashMap<String, Arc<Cluster>>>>;

/// Every cluster of this node's HTTP path.
pub struct Clusters {
    clusters: Mutex<ByService>,
    /// Per Service ("namespace/name"): the addresses its clusters have ejected.
    ejected: RwLock<HashMap<String, HashMap<String, Arc<HashSet<IpAddr>>>>>,
    changes: watch::Sender<u64>,
    metrics: Metrics,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabel {
    service: String,
}

/// `mesh_outlier_ejections_total` and `mesh_outlier_ejected_endpoints`, by Service.
#[derive(Default)]
struct Metrics {
    ejections: Family<ServiceLabel, Counter>,
    ejected: Family<ServiceLabel, Gauge>,
}

impl Default for Clusters {
    /// Metrics not registered anywhere (tests, the in-process daemon).
    fn default() -> Self {
        Self { clusters: Mutex::default(), ejected: RwLock::default(), changes: watch::Sender::new(0), metrics: Metrics::default() }
    }
}

impl Clusters {
    /// With the outlier-detection metrics in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let c = Self::default();
        registry.register("mesh_outlier_ejections", "Endpoints ejected by outlier detection (DestinationRule outlierDetection), by Service", c.metrics.ejections.clone());
        registry.register("mesh_outlier_ejected_endpoints", "Endpoints currently ejected by outlier detection (left out of HTTP, TCP and kernel balancing), by Service", c.metrics.ejected.clone());
        c
    }

    /// Counts an ejection of one of `namespace/name`'s endpoints.
    pub fn count_ejection(&self, namespace: &str, name: &str) {
        self.metrics.ejections.get_or_create(&ServiceLabel { service: format!("{namespace}/{name}") }).inc();
    }

    /// The cluster of `subset` of a Service, for `policy` (the one in force now).
    pub fn get(&self, namespace: &str, name: &str, subset: Option<&str>, policy: Option<&Arc<TrafficPolicy>>) -> Arc<Cluster> {
        let subset = subset.unwrap_or("");
        let mut clusters = self.clusters.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = clusters.get(namespace).and_then(|n| n.get(name)).and_then(|s| s.get(subset))
            && same_policy(c.policy.as_ref(), policy)
        {
            return c.clone();
        }
        let c = Arc::new(Cluster::new(policy.cloned()));
        clusters.entry(namespace.to_owned()).or_default().entry(name.to_owned()).or_default().insert(subset.to_owned(), c.clone());
        c
    }

    /// Addresses of `namespace/name`'s endpoints that outlier detection has ejected.
    pub fn ejected(&self, namespace: &str, name: &str) -> Option<Arc<HashSet<IpAddr>>> {
        self.ejected.read().unwrap_or_else(PoisonError::into_inner).get(namespace).and_then(|n| n.get(name)).cloned()
    }

    /// Bumped whenever [`Clusters::ejected`] changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// How many times [`Clusters::ejected`] has changed.
    pub fn version(&self) -> u64 {
        *self.changes.borrow()
    }

    /// Recomputes the ejected sets and tells subscribers (after an ejection or a return).
    pub fn ejections_changed(&self) {
        let mut by_service: HashMap<String, HashMap<String, HashSet<IpAddr>>> = HashMap::new();
        {
            let clusters = self.clusters.lock().unwrap_or_else(PoisonError::into_inner);
            for (namespace, names) in clusters.iter() {
                for (name, c) in names.iter().flat_map(|(name, subsets)| subsets.values().map(move |c| (name, c))) {
                    let Some(detector) = &c.outlier else { continue };
                    if let Some(out) = detector.ejected(c.endpoints.load(Ordering::Relaxed)) {
                        by_service.entry(namespace.clone()).or_default().entry(name.clone()).or_default().extend(out.iter().map(SocketAddr::ip));
                    }
                }
            }
        }
        self.metrics.ejected.clear();
        for (namespace, names) in &by_service {
            for (name, out) in names {
                self.metrics.ejected.get_or_create(&ServiceLabel { service: format!("{namespace}/{name}") }).set(i64::try_from(out.len()).unwrap_or(i64::MAX));
            }
        }
        let by_service = by_service.into_iter().map(|(ns, names)| (ns, names.into_iter().map(|(n, v)| (n, Arc::new(v))).collect())).collect();
        *self.ejected.write().unwrap_or_else(PoisonError::into_inner) = by_service;
        self.changes.send_modify(|v| *v += 1);
    }

    /// Ends ejections whose time is up, every [`SWEEP`], until `stop`. (Clusters stay, one per
    /// Service and subset ever requested: bounded by the config.)
    pub async fn run_sweeper(self: Arc<Self>, stop: impl Future<Output = ()>) {
        let mut tick = tokio::time::interval(SWEEP);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let now = Instant::now();
                    let changed = {
                        let clusters = self.clusters.lock().unwrap_or_else(PoisonError::into_inner);
                        clusters.values().flat_map(HashMap::values).flat_map(HashMap::values).fold(false, |changed, c| c.end_ejections(now) | changed)
                    };
                    if changed {
                        self.ejections_changed();
                    }
                }
                () = &mut stop => return,
            }
        }
    }
}

fn same_policy(a: Option<&Arc<TrafficPolicy>>, b: Option<&Arc<TrafficPolicy>>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => Arc::ptr_eq(a, b) || a == b,
        _ => false,
    }
}

/// One Service's (or subset's) state on this node.
pub struct Cluster {
    policy: Option<Arc<TrafficPolicy>>,
    pub breaker: Option<Arc<Breaker>>,
    pub outlier: Option<Detector>,
    next: AtomicUsize,
    loads: Mutex<HashMap<SocketAddr, Load>>,
    maglev: Mutex<Option<Maglev>>,
    /// Endpoints of the cluster at the last pick (outlier detection's share limits need it).
    endpoints: AtomicUsize,
}

struct Load {
    outstanding: u32,
    /// Peak-EWMA latency, in nanoseconds; meaningful once `measured`.
    rtt_ns: f64,
    /// An answer has been timed since the endpoint appeared or came back from an ejection.
    measured: bool,
    updated: Instant,
}

struct Maglev {
    members: Vec<SocketAddr>,
    table: Vec<usize>,
}

/// What a request hashes on, for consistent hashing (computed by the caller from the request).
pub type RequestHash = Option<u64>;

impl Cluster {
    fn new(policy: Option<Arc<TrafficPolicy>>) -> Self {
        let p = policy.as_deref();
        let pool = p.map(|p| &p.connection_pool).filter(|c| c.max_connections.is_some() || c.http1_max_pending_requests.is_some() || c.http2_max_requests.is_some());
        Self {
            breaker: pool.map(|c| Arc::new(Breaker::new(c))),
            outlier: p.and_then(|p| p.outlier_detection.clone()).map(Detector::new),
            policy,
            next: AtomicUsize::new(0),
            loads: Mutex::default(),
            maglev: Mutex::default(),
            endpoints: AtomicUsize::new(0),
        }
    }

    pub fn policy(&self) -> Option<&TrafficPolicy> {
        self.policy.as_deref()
    }

    pub fn load_balancer(&self) -> Option<&LoadBalancer> {
        self.policy().and_then(|p| p.load_balancer.as_ref())
    }

    /// The endpoint for one request among `candidates` (healthy, weighted, not ejected), by the
    /// cluster's algorithm; `hash` is the request's consistent-hash key when it has one.
    pub fn pick<'s>(&self, candidates: impl Iterator<Item = Candidate<'s>> + Clone, ejected: Option<&HashSet<IpAddr>>, hash: RequestHash, client_locality: Option<&str>) -> Option<Candidate<'s>> {
        let mut all = 0;
        let mut live: Vec<Candidate<'s>> = candidates
            .inspect(|_| all += 1)
            .filter(|c| c.endpoint.healthy && c.weight > 0 && !ejected.is_some_and(|e| e.contains(&c.addr.ip())))
            .collect();
        self.endpoints.store(all, Ordering::Relaxed);
        // Locality failover: only the closest healthy ones (same zone, else region, else any).
        if let Some(client) = client_locality.filter(|_| self.policy().is_some_and(|p| p.locality_failover)) {
            let priority = |c: &Candidate<'_>| super::locality_priority(client, c.endpoint.locality.as_deref());
            if let Some(best) = live.iter().map(priority).min() {
                live.retain(|c| priority(c) == best);
            }
        }
        match live.len() {
            0 => return None,
            1 => return Some(live[0]),
            _ => {}
        }
        match self.load_balancer() {
            Some(LoadBalancer::Random) => super::pick(live.iter().copied(), fastrand::u64(..)),
            Some(LoadBalancer::RoundRobin) => {
                let total: u64 = live.iter().map(|c| u64::from(c.weight)).sum();
                super::pick(live.iter().copied(), self.next.fetch_add(1, Ordering::Relaxed) as u64 % total)
            }
            Some(LoadBalancer::ConsistentHash { table_size, .. }) => match hash {
                Some(h) => self.by_hash(&live, *table_size, h),
                None => super::pick(live.iter().copied(), fastrand::u64(..)),
            },
            Some(LoadBalancer::LeastRequest) | None => Some(self.least_loaded(&live)),
        }
    }

    /// Power of two choices: of two random endpoints, the one with the markedly lower cost =
    /// latency estimate × (outstanding requests + 1). Costs within [`TIE`] of each other count
    /// as equal and the first (random) one wins: pure peak-EWMA sends every request to the
    /// fastest endpoint (a same-node pod is a little faster than one across the network), which
    /// starves the others of the measurements that would bring them back; this keeps Envoy's
    /// even spread among similar endpoints and still steers away from slow or busy ones.
    ///
    /// An endpoint not measured yet (new, or back from an ejection) counts as fast as the
    /// fastest measured one ([`fastest`]). A fixed pessimistic guess (linkerd's 30 ms) loses
    /// every comparison against endpoints that have converged on answering in a millisecond,
    /// so a scaled-up or returning endpoint would get no request to measure.
    fn least_loaded<'s>(&self, live: &[Candidate<'s>]) -> Candidate<'s> {
        let a = fastrand::usize(..live.len());
        let mut b = fastrand::usize(..live.len() - 1);
        if b >= a {
            b += 1;
        }
        let loads = self.loads.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let cost = |c: &Candidate<'_>| {
            let load = loads.get(&c.addr);
            let latency = load.filter(|l| l.measured).map_or_else(|| fastest(&loads, now), |l| l.decayed(now));
            latency.max(1.0) * f64::from(load.map_or(0, |l| l.outstanding) + 1) / f64::from(c.weight.max(1))
        };
        if cost(&live[b]) * TIE < cost(&live[a]) { live[b] } else { live[a] }
    }

    fn by_hash<'s>(&self, live: &[Candidate<'s>], table_size: u32, hash: u64) -> Option<Candidate<'s>> {
        let mut maglev = self.maglev.lock().unwrap_or_else(PoisonError::into_inner);
        // Rebuilt only when the live endpoints change; the check allocates nothing.
        if maglev.as_ref().is_none_or(|m| !m.members.iter().eq(live.iter().map(|c| &c.addr))) {
            let specs: Vec<BackendSpec> = live.iter().map(|c| BackendSpec { addr: c.addr.ip(), port: c.addr.port(), weight: c.weight, healthy: true }).collect();
            *maglev = Some(Maglev { table: tables::maglev(&specs, table_size), members: live.iter().map(|c| c.addr).collect() });
        }
        let m = maglev.as_ref().expect("just built");
        let slot = usize::try_from(hash % m.table.len().max(1) as u64).expect("fits");
        m.table.get(slot).map(|&i| live[i])
    }

    /// A request to `addr` starts: counted as outstanding until the returned guard is dropped.
    pub fn begin(self: &Arc<Self>, addr: SocketAddr) -> InFlight {
        let mut loads = self.loads.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        loads.entry(addr).or_insert(Load { outstanding: 0, rtt_ns: 0.0, measured: false, updated: now }).outstanding += 1;
        InFlight { cluster: self.clone(), addr, started: now }
    }

    /// Ends the ejections whose time is up; `true`: some endpoint came back. A returning
    /// endpoint's latency estimate is forgotten: it was last timed failing (or before it
    /// failed), and it is measured afresh like a new one.
    fn end_ejections(&self, now: Instant) -> bool {
        let Some(detector) = &self.outlier else { return false };
        let back = detector.sweep(now);
        if !back.is_empty() {
            let mut loads = self.loads.lock().unwrap_or_else(PoisonError::into_inner);
            for addr in &back {
                if let Some(l) = loads.get_mut(addr) {
                    l.measured = false;
                }
            }
        }
        !back.is_empty()
    }

    /// Outlier detection's count of one outcome of `addr`; `true`: the endpoint was just ejected.
    pub fn observe(&self, addr: SocketAddr, outcome: Outcome) -> bool {
        self.outlier.as_ref().is_some_and(|d| d.observe(addr, outcome, self.endpoints.load(Ordering::Relaxed), Instant::now()))
    }
}

/// The lowest latency estimate among a cluster's measured endpoints ([`DEFAULT_RTT`] when none
/// is): what an endpoint not measured yet is assumed to take.
fn fastest(loads: &HashMap<SocketAddr, Load>, now: Instant) -> f64 {
    loads.values().filter(|l| l.measured).map(|l| l.decayed(now)).reduce(f64::min).unwrap_or(DEFAULT_RTT.as_secs_f64() * 1e9)
}

impl Load {
    /// The estimate decayed towards zero for the time without news (so an endpoint that was
    /// slow once gets tried again).
    fn decayed(&self, now: Instant) -> f64 {
        let elapsed = now.duration_since(self.updated).as_secs_f64();
        self.rtt_ns * (-elapsed / DECAY.as_secs_f64()).exp()
    }
}

/// One request in flight to an endpoint, for least-request balancing.
pub struct InFlight {
    cluster: Arc<Cluster>,
    addr: SocketAddr,
    started: Instant,
}

impl InFlight {
    /// The endpoint's response headers arrived: the latency feeds its peak EWMA. Not for
    /// failures to reach it: how long a refused connection or a reset took says nothing of how
    /// fast the endpoint answers (outlier detection judges those).
    ///
    /// The first answer after the endpoint (re)appears starts its estimate at the cluster's
    /// [`fastest`] instead of counting as a peak: that one request often paid for a new
    /// connection (a TLS handshake to another node), and as a peak it would keep the endpoint
    /// out of balancing for tens of seconds. Later answers move the estimate as usual.
    pub fn answered(&self) {
        let now = Instant::now();
        let rtt = now.duration_since(self.started).as_nanos() as f64;
        let mut loads = self.cluster.loads.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(l) = loads.get_mut(&self.addr) else { return };
        if l.measured {
            let decayed = l.decayed(now);
            l.rtt_ns = if rtt > decayed { rtt } else { decayed + (rtt - decayed) * (1.0 - (-now.duration_since(l.updated).as_secs_f64() / DECAY.as_secs_f64()).exp()) };
            l.updated = now;
            return;
        }
        // The rare case (the first answer): the seed needs every endpoint's estimate.
        let seed = fastest(&loads, now);
        if let Some(l) = loads.get_mut(&self.addr) {
            l.rtt_ns = seed;
            l.measured = true;
            l.updated = now;
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut loads = self.cluster.loads.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(l) = loads.get_mut(&self.addr) {
            l.outstanding = l.outstanding.saturating_sub(1);
            // Forget endpoints idle long enough for their estimate to be noise (bounds the map).
            if l.outstanding == 0 && l.updated.elapsed() > DECAY * 6 {
                loads.remove(&self.addr);
            }
        }
    }
}

/// A stable 64-bit hash of a consistent-hash key's bytes (the same on every node).
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    u64::from(mix64(h)) << 32 | u64::from(mix64(h.rotate_left(29)))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::state::Endpoint;

    fn endpoints(n: u8) -> Vec<Endpoint> {
        (1..=n)
            .map(|i| Endpoint {
                address: IpAddr::from([198, 18, 2, i]),
                ports: BTreeMap::new(),
                healthy: true,
                node: "n2".into(),
                node_address: None,
                meshed: true,
                identity: None,
                subsets: Vec::new(),
                locality: None,
            })
            .collect()
    }

    fn candidates(eps: &[Endpoint]) -> impl Iterator<Item = Candidate<'_>> + Clone {
        eps.iter().map(|e| Candidate { endpoint: e, addr: SocketAddr::new(e.address, 8080), weight: 1 })
    }

    fn cluster(lb: Option<LoadBalancer>) -> Arc<Cluster> {
        Arc::new(Cluster::new(Some(Arc::new(TrafficPolicy { load_balancer: lb, ..TrafficPolicy::default() }))))
    }

    #[test]
    fn round_robin_takes_turns_and_skips_ejected_endpoints() {
        let eps = endpoints(3);
        let c = cluster(Some(LoadBalancer::RoundRobin));
        let picks: Vec<u8> = (0..6).map(|_| c.pick(candidates(&eps), None, None, None).expect("pick").addr.ip().to_string().rsplit('.').next().expect("octet").parse().expect("n")).collect();
        assert_eq!(picks, [1, 2, 3, 1, 2, 3]);
        let ejected = HashSet::from([IpAddr::from([198, 18, 2, 2])]);
        assert!((0..10).all(|_| c.pick(candidates(&eps), Some(&ejected), None, None).expect("pick").addr.ip() != IpAddr::from([198, 18, 2, 2])));
    }

    #[test]
    fn least_request_prefers_the_endpoint_with_fewer_outstanding_requests() {
        let eps = endpoints(2);
        let c = cluster(None);
        let busy = SocketAddr::from(([198, 18, 2, 1], 8080));
        let held: Vec<InFlight> = (0..10).map(|_| c.begin(busy)).collect();
        let picks = (0..100).filter(|_| c.pick(candidates(&eps), None, None, None).expect("pick").addr == busy).count();
        assert_eq!(picks, 0, "with two endpoints P2C always compares both");
        // Both idle and about as fast: an even spread, not everything to the faster one.
        drop(held);
        measure(&c, busy, Duration::from_millis(1), 1);
        measure(&c, SocketAddr::from(([198, 18, 2, 2], 8080)), Duration::from_micros(700), 1);
        let picks = (0..1000).filter(|_| c.pick(candidates(&eps), None, None, None).expect("pick").addr == busy).count();
        assert!((400..=600).contains(&picks), "similar endpoints share: {picks} of 1000");
    }

    /// Times `n` answers of `addr` that took `rtt`.
    fn measure(c: &Arc<Cluster>, addr: SocketAddr, rtt: Duration, n: usize) {
        for _ in 0..n {
            let mut f = c.begin(addr);
            f.started -= rtt;
            f.answered();
        }
    }

    /// `addr` as after a long run of answers taking `rtt`.
    fn converged(c: &Arc<Cluster>, addr: SocketAddr, rtt: Duration) {
        c.loads.lock().expect("loads").insert(addr, Load { outstanding: 0, rtt_ns: rtt.as_secs_f64() * 1e9, measured: true, updated: Instant::now() });
    }

    fn share(c: &Arc<Cluster>, eps: &[Endpoint], ejected: Option<&HashSet<IpAddr>>, addr: SocketAddr) -> usize {
        (0..1000).filter(|_| c.pick(candidates(eps), ejected, None, None).expect("pick").addr == addr).count()
    }

    #[test]
    fn least_request_gives_a_new_endpoint_its_share_at_once() {
        let eps = endpoints(3);
        let c = cluster(None);
        let [a, b, new] = [1, 2, 3].map(|i| SocketAddr::from(([198, 18, 2, i], 8080)));
        converged(&c, a, Duration::from_micros(800));
        converged(&c, b, Duration::from_micros(900));
        // Counted as fast as the fastest until its first answer is timed (a 30 ms guess would
        // lose every comparison against 1 ms and get nothing here).
        let picks = share(&c, &eps, None, new);
        assert!((250..=420).contains(&picks), "the unmeasured endpoint gets about a third: {picks} of 1000");
        // Its first answer paid for a TLS handshake: not a peak that would shut it out.
        measure(&c, new, Duration::from_millis(10), 1);
        let picks = share(&c, &eps, None, new);
        assert!((250..=420).contains(&picks), "a slow first answer is not held against it: {picks} of 1000");
        measure(&c, new, Duration::from_millis(10), 1);
        assert_eq!(share(&c, &eps, None, new), 0, "a second slow one is");
    }

    #[test]
    fn an_endpoint_back_from_ejection_is_measured_afresh_not_starved_by_its_failures() {
        let eps = endpoints(3);
        let policy = Arc::new(TrafficPolicy {
            outlier_detection: Some(mesh_l7::policy::OutlierDetection {
                consecutive_5xx: 0,
                consecutive_gateway: 3,
                interval: Duration::from_secs(1),
                base_ejection_time: Duration::from_secs(10),
                max_ejection_percent: 50,
                min_health_percent: 0,
            }),
            ..TrafficPolicy::default()
        });
        let c = Arc::new(Cluster::new(Some(policy)));
        let [a, b, sick] = [1, 2, 3].map(|i| SocketAddr::from(([198, 18, 2, i], 8080)));
        converged(&c, a, Duration::from_millis(1));
        converged(&c, b, Duration::from_millis(1));
        // Its last answers were slow (it was dying), then three failures eject it.
        measure(&c, sick, Duration::from_millis(500), 3);
        assert!(c.loads.lock().expect("loads")[&sick].rtt_ns > 400e6, "a peak after the first answer");
        c.endpoints.store(3, Ordering::Relaxed);
        let now = Instant::now();
        assert!((0..3).fold(false, |_, _| c.observe(sick, Outcome::Failure)), "ejected");
        let out = HashSet::from([sick.ip()]);
        assert_eq!(share(&c, &eps, Some(&out), sick), 0, "no pick while ejected");
        assert!(!c.end_ejections(now + Duration::from_secs(9)), "still out");
        // Without the reset, 500 ms × e^-1 ≈ 180 ms against 1 ms: no pick for half a minute.
        assert!(c.end_ejections(now + Duration::from_secs(11)), "back");
        let picks = share(&c, &eps, None, sick);
        assert!((250..=420).contains(&picks), "back with its share: {picks} of 1000");
    }

    #[test]
    fn consistent_hash_keeps_keys_on_their_endpoint_and_moves_about_one_nth() {
        let eps = endpoints(5);
        let c = cluster(Some(LoadBalancer::ConsistentHash { key: mesh_l7::policy::HashKey::SourceIp, table_size: 65_537 }));
        let keys: Vec<u64> = (0..2000u32).map(|k| hash_bytes(format!("user-{k}").as_bytes())).collect();
        let before: Vec<SocketAddr> = keys.iter().map(|k| c.pick(candidates(&eps), None, Some(*k), None).expect("pick").addr).collect();
        let again: Vec<SocketAddr> = keys.iter().map(|k| c.pick(candidates(&eps), None, Some(*k), None).expect("pick").addr).collect();
        assert_eq!(before, again, "the same key, the same endpoint");
        let more = endpoints(6);
        let after: Vec<SocketAddr> = keys.iter().map(|k| c.pick(candidates(&more), None, Some(*k), None).expect("pick").addr).collect();
        let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        // Ideal: 1/6 of the keys move to the new endpoint.
        assert!((250..=420).contains(&moved), "{moved} of 2000 keys moved");
    }
}

#[cfg(test)]
mod locality_tests {
    use std::collections::BTreeMap;

    use mesh_l7::policy::OutlierDetection;

    use super::*;
    use crate::{balance::locality_priority, state::Endpoint};

    fn endpoint(last: u8, locality: &str) -> Endpoint {
        Endpoint {
            address: IpAddr::from([198, 18, 2, last]),
            ports: BTreeMap::new(),
            healthy: true,
            node: "".into(),
            node_address: None,
            meshed: true,
            identity: None,
            subsets: Vec::new(),
            locality: Some(locality.to_owned()),
        }
    }

    #[test]
    fn priorities_are_zone_then_region_then_anywhere() {
        assert_eq!(locality_priority("r1/z1", Some("r1/z1")), 0);
        assert_eq!(locality_priority("r1/z1", Some("r1/z2")), 1);
        assert_eq!(locality_priority("r1/z1", Some("r2/z1")), 2);
        assert_eq!(locality_priority("r1/z1", None), 2);
    }

    #[test]
    fn requests_stay_in_the_clients_zone_and_fail_over_zone_then_region() {
        let eps = [endpoint(1, "r1/z1"), endpoint(2, "r1/z2"), endpoint(3, "r2/z1")];
        let outlier = OutlierDetection {
            consecutive_5xx: 5,
            consecutive_gateway: 0,
            interval: Duration::from_secs(1),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 100,
            min_health_percent: 0,
        };
        let policy = |failover| Arc::new(TrafficPolicy { outlier_detection: Some(outlier.clone()), locality_failover: failover, ..TrafficPolicy::default() });
        let c = Cluster::new(Some(policy(true)));
        let all = || eps.iter().map(|e| Candidate { endpoint: e, addr: SocketAddr::new(e.address, 8080), weight: 1 });
        let picks = |ejected: &HashSet<IpAddr>, client: Option<&str>| -> HashSet<u8> {
            (0..200).map(|_| c.pick(all(), Some(ejected), None, client).expect("pick").addr.ip().to_string().rsplit('.').next().expect("octet").parse().expect("n")).collect()
        };
        let none = HashSet::new();
        assert_eq!(picks(&none, Some("r1/z1")), HashSet::from([1]), "the client's zone only");
        let z1_out = HashSet::from([IpAddr::from([198, 18, 2, 1])]);
        assert_eq!(picks(&z1_out, Some("r1/z1")), HashSet::from([2]), "then its region");
        let r1_out = HashSet::from([IpAddr::from([198, 18, 2, 1]), IpAddr::from([198, 18, 2, 2])]);
        assert_eq!(picks(&r1_out, Some("r1/z1")), HashSet::from([3]), "then anywhere");
        assert_eq!(picks(&none, None).len(), 3, "a client without a locality: no preference");
        let off = Cluster::new(Some(policy(false)));
        let spread: HashSet<IpAddr> = (0..200).map(|_| off.pick(all(), None, None, Some("r1/z1")).expect("pick").addr.ip()).collect();
        assert_eq!(spread.len(), 3, "localityLbSetting.enabled: false spreads over all");
    }
}
