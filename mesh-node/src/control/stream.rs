//! The config stream: subscribe, apply each update atomically (ACK), or keep the last good state
//! and say why (NACK); when the stream breaks, keep serving and reconnect with jittered backoff.
//! When the node certificate is renewed, move to the new channel at once (the controller would
//! end a stream opened with the old certificate when that expires).

use std::{net::IpAddr, sync::Arc, time::Duration};

use prost::Message as _;

use mesh_proto::config::v1::{self as pb, config_distribution_client::ConfigDistributionClient, node_message::Kind};
use prometheus_client::{
    metrics::{counter::Counter, gauge::Gauge},
    registry::Registry,
};
use tokio_stream::wrappers::ReceiverStream;

use super::{
    Connection, Error, last_config,
    store::{Incoming, Store},
};
use crate::state::StateTx;

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
    /// Calls abandoned at the call deadline (`Deadlines::call`).
    pub(super) call_timeouts: Counter,
    /// Config streams that ended (closed by the controller, failed, or a PING unanswered).
    stream_breaks: Counter,
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
            call_timeouts: Counter::default(),
            stream_breaks: Counter::default(),
        };
        registry.register("mesh_control_updates_applied", "Config updates applied and acknowledged", m.applied.clone());
        registry.register("mesh_control_updates_rejected", "Config updates rejected (NACK); the last good config stays", m.rejected.clone());
        registry.register("mesh_control_connected", "1 while the config stream to the control plane is open", m.connected.clone());
        registry.register("mesh_control_config_version", "Version of the config this node runs", m.version.clone());
        registry.register("mesh_control_node_cert_expiry_timestamp_seconds", "Expiry of this node's certificate for the control channel", m.node_cert_expiry.clone());
        registry.register("mesh_control_node_cert_errors", "Node certificate requests that failed (retried with backoff)", m.node_cert_errors.clone());
        registry.register("mesh_control_call_timeouts", "Calls to the control plane abandoned at MESH_CONTROL_CALL_TIMEOUT_SECS (retried)", m.call_timeouts.clone());
        registry.register(
            "mesh_control_stream_breaks",
            "Config streams that ended: closed by the control plane, failed, or left when a keepalive PING went unanswered (reconnected with backoff)",
            m.stream_breaks.clone(),
        );
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

/// Where a part stands in the update the controller split (`more`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PartOf {
    /// It begins an update.
    first: bool,
    /// It ends one: the update applies.
    last: bool,
}

/// Keeps the parts of a split update in step: each continues the update before it, and their
/// size stays bounded.
struct Pending {
    /// Version and `full` of the update under way, if a part of it came.
    update: Option<(u64, bool)>,
    bytes: usize,
    limit: usize,
}

impl Pending {
    fn new(limit: usize) -> Self {
        Self { update: None, bytes: 0, limit }
    }

    /// Takes a part in. A part that does not continue the update before it (another version,
    /// or `full` changed), or parts beyond the limit ([`MAX_PENDING_BYTES`]), are a broken
    /// stream: the caller reconnects and gets a snapshot.
    fn accept(&mut self, part: &pb::ConfigUpdate) -> Result<PartOf, Error> {
        // Only parts held for a later one count (and cost a walk of the message): an update
        // sent whole, the usual case, is taken without one.
        if part.more {
            self.bytes += part.encoded_len();
        }
        let first = match self.update {
            None => true,
            Some((version, full)) if (version, full) == (part.version, part.full) => false,
            Some((version, full)) => {
                return Err(Error::Invalid(format!("update {version} (full: {full}) was continued by update {} (full: {})", part.version, part.full)));
            }
        };
        if !part.more {
            self.update = None;
            self.bytes = 0;
            return Ok(PartOf { first, last: true });
        }
        if self.bytes > self.limit {
            return Err(Error::Invalid(format!("update {} in parts exceeds {} bytes", part.version, self.limit)));
        }
        self.update = Some((part.version, part.full));
        Ok(PartOf { first, last: false })
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

    /// Says that saving the applied config to `path` failed, and removes the file: it would no
    /// longer follow the updates. Saving starts again from the next full update (returns the
    /// new `saving`: false).
    fn save_failed(&self, path: &std::path::Path, e: &last_config::Error) -> bool {
        tracing::warn!(error = %e, "saving the applied config failed: removed; saving again from the next full update (a restart without the control plane meanwhile starts empty)");
        for f in [path.to_owned(), path.with_extension("parts")] {
            if let Err(e) = std::fs::remove_file(&f)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(error = %e, path = %f.display(), "removing the saved config failed: a restart without the control plane would start from an older one");
            }
        }
        false
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
            self.metrics.stream_breaks.inc();
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
        let mut client = ConfigDistributionClient::new(channel);
        let mut updates = self.connection.bounded(client.stream_config(ReceiverStream::new(rx))).await?.into_inner();
        self.metrics.connected.set(1);
        let mut store = Store::new(&self.node, self.own_address);
        // A save that failed leaves the file behind the updates: it is removed, and saving
        // starts again from the next full update.
        let mut saving = self.last_config.is_some();
        let mut pending = Pending::new(MAX_PENDING_BYTES);
        let mut incoming: Option<Incoming> = None;
        let mut staging: Option<last_config::Staging> = None;
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
            let at = pending.accept(&part)?;
            if at.first {
                incoming = Some(Incoming::new(part.version, part.full));
                saving |= part.full;
                staging = None;
                if let Some(path) = self.last_config.as_deref().filter(|_| saving) {
                    match last_config::Staging::new(path) {
                        Ok(s) => staging = Some(s),
                        Err(e) => saving = self.save_failed(path, &e),
                    }
                }
            }
            if let (Some(s), Some(path)) = (&mut staging, self.last_config.as_deref())
                && let Err(e) = part.upserts.iter().try_for_each(|r| s.add(r))
            {
                staging = None;
                saving = self.save_failed(path, &e);
            }
            let Some(update) = incoming.as_mut() else { return Err(Error::Invalid("a part without its update".into())) };
            store.stage(update, part);
            if !at.last {
                continue;
            }
            let Some(update) = incoming.take() else { continue };
            let (number, full) = (update.version, update.full);
            let changed = staging.as_ref().map(|_| update.changed());
            let reply = match store.commit(update) {
                Ok(()) => {
                    let state = store.state(&self.trust_domain, &self.root_namespace);
                    drop(state_tx.send_replace(Arc::new(state)));
                    store.settle();
                    *version = number;
                    self.metrics.applied.inc();
                    self.metrics.version.set(i64::try_from(number).unwrap_or(i64::MAX));
                    tracing::info!(version = number, full, resources = store.len(), "config applied");
                    if let (Some(s), Some(changed), Some(path)) = (staging.take(), changed, self.last_config.as_deref())
                        && let Err(e) = s.finish(number, full, &changed)
                    {
                        saving = self.save_failed(path, &e);
                    }
                    if let Some(f) = on_first_sync.take() {
                        f();
                    }
                    Kind::Ack(pb::Ack { version: number })
                }
                Err(e) => {
                    staging = None;
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
    fn parts_are_taken_in_step_and_an_update_ends_at_its_last() {
        let mut pending = Pending::new(MAX_PENDING_BYTES);
        let at = |first, last| PartOf { first, last };
        assert_eq!(pending.accept(&part(3, false, false, &["a"])).expect("ok"), at(true, true), "a whole update");
        assert_eq!(pending.accept(&part(4, true, true, &["a", "b"])).expect("ok"), at(true, false));
        assert_eq!(pending.accept(&part(4, true, true, &["c"])).expect("ok"), at(false, false));
        assert_eq!(pending.accept(&part(4, true, false, &["d"])).expect("ok"), at(false, true));
        assert_eq!(pending.accept(&part(5, false, false, &[])).expect("ok"), at(true, true), "nothing left over");
    }

    #[test]
    fn a_part_of_another_update_breaks_the_stream() {
        let mut pending = Pending::new(MAX_PENDING_BYTES);
        pending.accept(&part(4, true, true, &["a"])).expect("ok");
        let e = pending.accept(&part(5, false, false, &["b"])).expect_err("another version");
        assert!(e.to_string().contains("update 4 (full: true) was continued by update 5"), "{e}");
        let mut pending = Pending::new(MAX_PENDING_BYTES);
        pending.accept(&part(4, true, true, &["a"])).expect("ok");
        assert!(pending.accept(&part(4, false, false, &["b"])).is_err(), "full changed");
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
            let mut upserts: Vec<pb::Resource> = (0..10_000).map(service).collect();
            if with_workloads {
                upserts.extend((0..100_000).map(workload));
            }
            let converting = std::time::Instant::now();
            let mut store = Store::new("node-0", std::net::Ipv4Addr::LOCALHOST.into());
            store.apply(pb::ConfigUpdate { version: 1, full: true, upserts, ..Default::default() }).expect("apply");
            let held = heap() - start;
            let state = store.state("cluster.local", "mesh-system");
            store.settle();
            let took = converting.elapsed();
            let both = heap() - start;
            assert_eq!(state.workloads.len(), 100_000, "every meshed endpoint is a workload either way");
            // A second state shares the store's workloads and Services: only its indexes are new.
            let again = std::time::Instant::now();
            let second = store.state("cluster.local", "mesh-system");
            let rebuilt = again.elapsed();
            let with_second = heap() - start;
            drop(second);
            // What the kernel's writer does at every rescan, beside discovery and map writes.
            let translating = std::time::Instant::now();
            let desired = crate::kernel_sync::translate(&state, "node-0", &std::collections::BTreeMap::new());
            let translated = translating.elapsed();
            drop(desired);
            let what = if with_workloads { "100,000 workloads and 10,000 Services" } else { "10,000 Services, no workloads" };
            println!(
                "{what}: the store {held} bytes ({} per endpoint); the State built from it adds {} bytes (converted and built in {took:?}); a second State adds {} bytes (built in {rebuilt:?}); translated for the kernel in {translated:?}",
                held / 100_000,
                both - held,
                with_second - both
            );
            drop((state, store));
        }
    }

    #[test]
    fn parts_are_bounded() {
        let mut pending = Pending::new(10_000);
        let keys: Vec<String> = (0..10).map(|i| format!("{i:0>300}")).collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        for _ in 0..3 {
            assert!(!pending.accept(&part(9, true, true, &keys)).expect("under the bound").last);
        }
        let e = pending.accept(&part(9, true, true, &keys)).expect_err("past the bound");
        assert!(e.to_string().contains("exceeds 10000 bytes"), "{e}");
    }
}
