//! The config stream: subscribe, apply each update atomically (ACK), or keep the last good state
//! and say why (NACK); when the stream breaks, keep serving and reconnect with jittered backoff.
//! When the node certificate is renewed, move to the new channel at once (the controller would
//! end a stream opened with the old certificate when that expires).

use std::{collections::BTreeMap, net::IpAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use prost::Message as _;

use mesh_proto::config::v1::{self as pb, config_distribution_client::ConfigDistributionClient, node_message::Kind};
use prometheus_client::{
    metrics::{counter::Counter, gauge::Gauge},
    registry::Registry,
};
use tokio_stream::wrappers::ReceiverStream;

use super::{Connection, Error, convert, last_config};
use crate::state::{State, StateTx};

/// Parts of one split update (`more`) a node holds before the last arrives: far above any
/// real view (the controller sends 1 MiB parts), low enough that a broken controller cannot
/// exhaust the node's memory.
const MAX_PENDING_BYTES: usize = 256 << 20;

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct Metrics {
    applied: Counter,
    rejected: Counter,
    connected: Gauge,
    version: Gauge,
    /// Expiry of the current node certificate, Unix seconds (set by `node_cert`).
    pub(super) node_cert_expiry: Gauge,
    /// Node certificate requests that failed (`node_cert`).
    pub(super) node_cert_errors: Counter,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            applied: Counter::default(),
            rejected: Counter::default(),
            connected: Gauge::default(),
            version: Gauge::default(),
            node_cert_expiry: Gauge::default(),
            node_cert_errors: Counter::default(),
        };
        registry.register("mesh_control_updates_applied", "Config updates applied and acknowledged", m.applied.clone());
        registry.register("mesh_control_updates_rejected", "Config updates rejected (NACK); the last good config stays", m.rejected.clone());
        registry.register("mesh_control_connected", "1 while the config stream to the control plane is open", m.connected.clone());
        registry.register("mesh_control_config_version", "Version of the config this node runs", m.version.clone());
        registry.register("mesh_control_node_cert_expiry_timestamp_seconds", "Expiry of this node's certificate for the control channel", m.node_cert_expiry.clone());
        registry.register("mesh_control_node_cert_errors", "Node certificate requests that failed (retried with backoff)", m.node_cert_errors.clone());
        m
    }
}

pub struct ConfigClient {
    connection: Connection,
    node: String,
    own_address: IpAddr,
    trust_domain: String,
    root_namespace: String,
    metrics: Metrics,
    /// Where each applied config is saved (`last_config`).
    last_config: Option<std::path::PathBuf>,
}

/// The resources of the last applied update, each as the protobuf bytes it came in: decoded,
/// a config held ~530 bytes an endpoint (a string per field), encoded ~134, and every update
/// converts all of them anyway (`convert::snapshot`).
type Resources = BTreeMap<(i32, String), Bytes>;

/// The resources, decoded one at a time as the conversion takes them.
fn decoded(resources: &Resources) -> impl Iterator<Item = pb::Resource> + '_ {
    // These are bytes this node encoded from a message it decoded: decoding cannot fail. Were it
    // to, a resource without a kind makes the conversion refuse the update, with that reason.
    resources.values().map(|b| pb::Resource::decode(b.as_ref()).unwrap_or_default())
}

/// The protocol's key (`mesh_proto::resource_key`), as a map key.
fn key_of(r: &pb::Resource) -> Result<(i32, String), Error> {
    let key = mesh_proto::resource_key(r.kind.as_ref().ok_or_else(|| Error::Invalid("resource without a kind".into()))?);
    Ok((key.kind, key.key))
}

/// Applies `update` to `resources` in place and returns how to take it back (the node keeps its
/// last good config when the result is refused). Copying every resource to apply an update to
/// the copy held the whole config twice at every update (~300 bytes an endpoint).
fn apply(resources: &mut Resources, update: pb::ConfigUpdate) -> Result<Undo, Error> {
    let upserts = update.upserts.into_iter().map(|r| Ok((key_of(&r)?, Bytes::from(r.encode_to_vec())))).collect::<Result<Vec<_>, Error>>()?;
    let removals = update.removals.into_iter().map(|k| (k.kind, k.key));
    if update.full {
        let whole = std::mem::take(resources);
        resources.extend(upserts);
        removals.for_each(|key| drop(resources.remove(&key)));
        return Ok(Undo { whole: Some(whole), replaced: Vec::new() });
    }
    let mut replaced = Vec::new();
    for (key, r) in upserts {
        let old = resources.insert(key.clone(), r);
        replaced.push((key, old));
    }
    for key in removals {
        if let Some(old) = resources.remove(&key) {
            replaced.push((key, Some(old)));
        }
    }
    Ok(Undo { whole: None, replaced })
}

/// What [`apply`] changed: the whole previous set for a full update, else each key's previous
/// value (`None`: it was not there).
struct Undo {
    whole: Option<Resources>,
    replaced: Vec<((i32, String), Option<Bytes>)>,
}

impl Undo {
    fn undo(self, resources: &mut Resources) {
        if let Some(whole) = self.whole {
            *resources = whole;
            return;
        }
        // Backwards: a key upserted then removed in one update gets its first value back.
        for (key, old) in self.replaced.into_iter().rev() {
            match old {
                Some(r) => resources.insert(key, r),
                None => resources.remove(&key),
            };
        }
    }
}

/// The parts of an update the controller split (`more`), joined as they come.
struct Pending {
    update: Option<pb::ConfigUpdate>,
    bytes: usize,
    limit: usize,
}

impl Pending {
    fn new(limit: usize) -> Self {
        Self { update: None, bytes: 0, limit }
    }

    /// Adds a part: the whole update once its last part is in, `None` before. A part that does
    /// not continue the update before it (another version, or `full` changed), or parts beyond
    /// the limit ([`MAX_PENDING_BYTES`]), are a broken stream: the caller reconnects and gets a snapshot.
    fn join(&mut self, part: pb::ConfigUpdate) -> Result<Option<pb::ConfigUpdate>, Error> {
        // Only parts held for a later one count (and cost a walk of the message): an update
        // sent whole, the usual case, is returned without one.
        if part.more {
            self.bytes += part.encoded_len();
        }
        let whole = match self.update.take() {
            None => part,
            Some(mut so_far) => {
                if (so_far.version, so_far.full) != (part.version, part.full) {
                    return Err(Error::Invalid(format!(
                        "update {} (full: {}) was continued by update {} (full: {})",
                        so_far.version, so_far.full, part.version, part.full
                    )));
                }
                so_far.upserts.extend(part.upserts);
                so_far.removals.extend(part.removals);
                so_far.more = part.more;
                so_far
            }
        };
        if !whole.more {
            self.bytes = 0;
            return Ok(Some(whole));
        }
        if self.bytes > self.limit {
            return Err(Error::Invalid(format!("update {} in parts exceeds {} bytes", whole.version, self.limit)));
        }
        self.update = Some(whole);
        Ok(None)
    }
}

/// Jitter without a random-number dependency: the clock's nanoseconds are unpredictable enough
/// to spread reconnecting nodes apart.
fn jittered(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |t| t.subsec_nanos());
    d / 2 + Duration::from_nanos(u64::from(nanos) % (d.as_nanos().max(1) as u64 / 2 + 1))
}

impl ConfigClient {
    pub fn new(connection: Connection, node: &str, own_address: IpAddr, trust_domain: &str, root_namespace: &str, metrics: Metrics) -> Self {
        Self {
            connection,
            node: node.into(),
            own_address,
            trust_domain: trust_domain.into(),
            root_namespace: root_namespace.into(),
            metrics,
            last_config: None,
        }
    }

    /// Saves every applied config to `path`, for the next start (`last_config`).
    #[must_use]
    pub fn saving_to(mut self, path: Option<std::path::PathBuf>) -> Self {
        self.last_config = path;
        self
    }

    /// Runs forever: every applied update replaces the state in `state_tx`; `on_first_sync` is
    /// called once, after the first applied snapshot (readiness).
    pub async fn run(self, state_tx: StateTx, on_first_sync: impl FnOnce() + Send) {
        let mut on_first_sync = Some(on_first_sync);
        let mut version = 0u64;
        let mut backoff = BACKOFF_MIN;
        loop {
            let before = version;
            match self.session(&state_tx, &mut version, &mut on_first_sync).await {
                Ok(Ended::Renewed) => {
                    tracing::info!("node certificate renewed; reopening the config stream with it");
                    self.metrics.connected.set(0);
                    backoff = BACKOFF_MIN;
                    continue;
                }
                Ok(Ended::Closed) => tracing::info!("control plane closed the config stream; reconnecting"),
                Err(e) => tracing::warn!(error = %e, "config stream failed; serving the last good config"),
            }
            self.metrics.connected.set(0);
            backoff = if version != before { BACKOFF_MIN } else { (backoff * 2).min(BACKOFF_MAX) };
            tokio::time::sleep(jittered(backoff)).await;
        }
    }

    async fn session(&self, state_tx: &StateTx, version: &mut u64, on_first_sync: &mut Option<impl FnOnce()>) -> Result<Ended, Error> {
        // Waits for the first node certificate; a renewal ends the session (see `run`).
        let mut certs = self.connection.channel.clone();
        let channel = certs.wait_for(Option::is_some).await.map_err(|_| Error::NoNodeCertificate)?.clone().ok_or(Error::NoNodeCertificate)?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let send = |kind| pb::NodeMessage { kind: Some(kind) };
        let subscribe = Kind::Subscribe(pb::Subscribe { node_name: self.node.clone(), last_applied_version: *version });
        tx.send(send(subscribe)).await.map_err(|_| Error::Invalid("stream closed".into()))?;
        let mut updates = ConfigDistributionClient::new(channel).stream_config(ReceiverStream::new(rx)).await?.into_inner();
        self.metrics.connected.set(1);
        let mut resources = Resources::new();
        let mut pending = Pending::new(MAX_PENDING_BYTES);
        loop {
            let part = tokio::select! {
                message = updates.message() => match message? {
                    Some(update) => update,
                    None => return Ok(Ended::Closed),
                },
                changed = certs.changed() => {
                    if changed.is_err() {
                        return Err(Error::NoNodeCertificate);
                    }
                    return Ok(Ended::Renewed);
                }
            };
            let Some(update) = pending.join(part)? else { continue };
            let (number, full) = (update.version, update.full);
            let undo = apply(&mut resources, update)?;
            let applied = convert::snapshot(decoded(&resources), &self.node, self.own_address)
                .and_then(|snap| State::build(&self.trust_domain, &self.root_namespace, snap).map_err(|e| Error::Invalid(e.to_string())));
            let reply = match applied {
                Ok(state) => {
                    drop(undo);
                    state_tx.send_replace(Arc::new(state));
                    *version = number;
                    self.metrics.applied.inc();
                    self.metrics.version.set(i64::try_from(number).unwrap_or(i64::MAX));
                    tracing::info!(version = number, full, resources = resources.len(), "config applied");
                    if let Some(Err(e)) = self.last_config.as_ref().map(|path| last_config::save(path, number, resources.values().map(AsRef::as_ref))) {
                        tracing::warn!(error = %e, "saving the applied config failed: a restart without the control plane would start from an older one");
                    }
                    if let Some(f) = on_first_sync.take() {
                        f();
                    }
                    Kind::Ack(pb::Ack { version: number })
                }
                Err(e) => {
                    undo.undo(&mut resources);
                    self.metrics.rejected.inc();
                    tracing::warn!(version = number, error = %e, "config rejected; keeping the last good one");
                    Kind::Nack(pb::Nack { version: number, error: e.to_string() })
                }
            };
            if tx.send(send(reply)).await.is_err() {
                return Ok(Ended::Closed);
            }
        }
    }
}

/// Why a session ended without an error.
enum Ended {
    /// The controller closed the stream.
    Closed,
    /// A new node certificate is out: reconnect with it at once.
    Renewed,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(version: u64, full: bool, more: bool, keys: &[&str]) -> pb::ConfigUpdate {
        let removals = keys.iter().map(|k| pb::ResourceKey { kind: 1, key: (*k).into() }).collect();
        pb::ConfigUpdate { version, full, more, upserts: Vec::new(), removals }
    }

    #[test]
    fn parts_join_into_one_update_applied_at_the_last() {
        let mut pending = Pending::new(MAX_PENDING_BYTES);
        assert_eq!(pending.join(part(3, false, false, &["a"])).expect("ok"), Some(part(3, false, false, &["a"])), "a whole update as before");
        assert_eq!(pending.join(part(4, true, true, &["a", "b"])).expect("ok"), None);
        assert_eq!(pending.join(part(4, true, true, &["c"])).expect("ok"), None);
        let whole = pending.join(part(4, true, false, &["d"])).expect("ok").expect("the last part");
        assert_eq!(whole, part(4, true, false, &["a", "b", "c", "d"]));
        assert_eq!(pending.join(part(5, false, false, &[])).expect("ok"), Some(part(5, false, false, &[])), "nothing left over");
    }

    #[test]
    fn a_part_of_another_update_breaks_the_stream() {
        let mut pending = Pending::new(MAX_PENDING_BYTES);
        pending.join(part(4, true, true, &["a"])).expect("ok");
        let e = pending.join(part(5, false, false, &["b"])).expect_err("another version");
        assert!(e.to_string().contains("update 4 (full: true) was continued by update 5"), "{e}");
        let mut pending = Pending::new(MAX_PENDING_BYTES);
        pending.join(part(4, true, true, &["a"])).expect("ok");
        assert!(pending.join(part(4, false, false, &["b"])).is_err(), "full changed");
    }

    fn workload(uid: &str, name: &str) -> pb::Resource {
        let w = pb::Workload { uid: uid.into(), name: name.into(), ..Default::default() };
        pb::Resource { kind: Some(pb::resource::Kind::Workload(w)) }
    }

    #[test]
    fn a_refused_update_is_taken_back_exactly() {
        let mut resources = Resources::new();
        let first = pb::ConfigUpdate { version: 1, full: true, upserts: vec![workload("a", "a1"), workload("b", "b1")], ..Default::default() };
        apply(&mut resources, first).expect("apply");
        let before = resources.clone();
        // Changes a, removes b, adds c and removes it again in the same update.
        let key = |uid: &str| pb::ResourceKey { kind: pb::ResourceKind::Workload.into(), key: uid.into() };
        let second = pb::ConfigUpdate { version: 2, upserts: vec![workload("a", "a2"), workload("c", "c1")], removals: vec![key("b"), key("c")], ..Default::default() };
        let undo = apply(&mut resources, second).expect("apply");
        assert_eq!(resources.keys().map(|k| k.1.as_str()).collect::<Vec<_>>(), ["a"]);
        undo.undo(&mut resources);
        assert_eq!(resources, before);
        let whole = pb::ConfigUpdate { version: 3, full: true, upserts: vec![workload("z", "z")], ..Default::default() };
        let undo = apply(&mut resources, whole).expect("apply");
        assert_eq!(resources.len(), 1);
        undo.undo(&mut resources);
        assert_eq!(resources, before, "a refused full update leaves the previous set whole");
        let nameless = pb::ConfigUpdate { version: 4, upserts: vec![workload("d", "d"), pb::Resource { kind: None }], ..Default::default() };
        assert!(apply(&mut resources, nameless).is_err());
        assert_eq!(resources, before, "an update with a resource without a kind changes nothing");
    }

    /// What a node fed by mesh-control holds at 10,000 Services × 10 endpoints, as the
    /// controller sends it (`mesh-control/src/view.rs`): every meshed workload of the mesh with
    /// its labels (a Deployment's three), and the Services whose endpoints name them. Also the
    /// same Services without the workloads (each meshed endpoint then becomes a workload in the
    /// conversion), the measurement of earlier commits.
    ///
    /// `cargo test --release -p mesh-node --lib -- --ignored --nocapture held_config_bytes`
    #[test]
    #[ignore = "a measurement; run alone (the heap is read process-wide)"]
    #[expect(unsafe_code, reason = "mallinfo2 reads glibc's counters")]
    fn held_config_bytes() {
        // In use in the arenas plus mmapped blocks (large tables and vectors are mmapped).
        let heap = || {
            // SAFETY: no arguments; glibc returns a plain struct of counters.
            let info = unsafe { libc::mallinfo2() };
            info.uordblks + info.hblkhd
        };
        // Pod i of Service i / 10, on one of 100 nodes.
        let uid = |i: u32| format!("{i:08x}-1f2e-4d3c-8b7a-0123456789ab");
        let address = |i: u32| std::net::Ipv4Addr::from(0x6440_0000 + i).to_string();
        let node = |i: u32| (format!("node-{}", i % 100), format!("10.0.0.{}", i % 100 + 2));
        let identity = |s: u32| format!("spiffe://cluster.local/ns/default/sa/svc-{s}");
        let workload = |i: u32| {
            let (node, node_address) = node(i);
            pb::Resource {
                kind: Some(pb::resource::Kind::Workload(pb::Workload {
                    uid: uid(i),
                    name: format!("svc-{}-7d9f8b6c4-{i:05x}", i / 10),
                    namespace: "default".into(),
                    service_account: format!("svc-{}", i / 10),
                    node,
                    addresses: vec![address(i)],
                    labels: [("app", format!("svc-{}", i / 10)), ("version", "v1".into()), ("pod-template-hash", "7d9f8b6c4".into())]
                        .into_iter()
                        .map(|(k, v)| (k.to_owned(), v))
                        .collect(),
                    meshed: true,
                    healthy: true,
                    identity: identity(i / 10),
                    node_address,
                    locality: String::new(),
                })),
            }
        };
        let endpoint = |i: u32| {
            let (node, node_address) = node(i);
            pb::Endpoint { workload_uid: uid(i), address: address(i), healthy: true, node, meshed: true, identity: identity(i / 10), node_address, ..Default::default() }
        };
        let service = |s: u32| pb::Resource {
            kind: Some(pb::resource::Kind::Service(pb::Service {
                name: format!("svc-{s}"),
                namespace: "default".into(),
                vips: vec![format!("198.19.{}.{}", s / 256, s % 256)],
                ports: vec![pb::ServicePort { name: "tcp".into(), port: 80, protocol: pb::Protocol::Tcp.into(), target_port: 8080, app_protocol: String::new() }],
                endpoints: (0..10).map(|j| endpoint(s * 10 + j)).collect(),
            })),
        };
        for with_workloads in [true, false] {
            let start = heap();
            let mut resources = Resources::new();
            let mut upserts: Vec<pb::Resource> = (0..10_000).map(service).collect();
            if with_workloads {
                upserts.extend((0..100_000).map(workload));
            }
            apply(&mut resources, pb::ConfigUpdate { version: 1, full: true, upserts, ..Default::default() }).expect("apply");
            let held = heap() - start;
            let converting = std::time::Instant::now();
            let snap = convert::snapshot(decoded(&resources), "node-0", std::net::Ipv4Addr::LOCALHOST.into()).expect("convert");
            let state = State::build("cluster.local", "mesh-system", snap).expect("state");
            let took = converting.elapsed();
            let both = heap() - start;
            assert_eq!(state.workloads.len(), 100_000, "every meshed endpoint is a workload either way");
            let what = if with_workloads { "100,000 workloads and 10,000 Services" } else { "10,000 Services, no workloads" };
            println!("{what}: held {held} bytes ({} per endpoint); the State built from it: {} bytes, in {took:?}", held / 100_000, both - held);
            drop((state, resources));
        }
    }

    #[test]
    fn parts_are_bounded() {
        let mut pending = Pending::new(10_000);
        let keys: Vec<String> = (0..10).map(|i| format!("{i:0>300}")).collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        for _ in 0..3 {
            assert_eq!(pending.join(part(9, true, true, &keys)).expect("under the bound"), None);
        }
        let e = pending.join(part(9, true, true, &keys)).expect_err("past the bound");
        assert!(e.to_string().contains("exceeds 10000 bytes"), "{e}");
    }
}
