//! The gRPC server: config streams (`mesh.config.v1.ConfigDistribution`) and the CA
//! (`mesh.ca.v1.Certificates`), over TLS from the mesh root (`tls`).
//!
//! A node first obtains a node certificate with its bearer credential
//! (`CreateNodeCertificate`); every other call must come over mutual TLS with that certificate,
//! and the node it names is the only node the call may act for.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use futures::Stream;
use mesh_proto::{ca::v1 as ca_pb, config::v1 as pb};
use tokio::{net::TcpListener, sync::mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::{
    auth::{Authenticator, NodeIds, VerifiedNode},
    ca::Ca,
    metrics::{Metrics, PushLabels, ReasonLabels},
    snapshot::Publisher,
    tls, view,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("binding {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("serving certificate: {0}")]
    Cert(#[from] crate::ca::Error),
    #[error("TLS setup: {0}")]
    Tls(#[from] tls::Error),
    #[error("serving gRPC: {0}")]
    Serve(tonic::transport::Error),
}

/// What the status endpoint shows about one node.
#[derive(Clone, Debug, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    pub connected: bool,
    pub sent_version: u64,
    /// The newest version the node holds: the last it acked, or a later one that left its view
    /// as the one it acked (no push needed, so no ack comes).
    pub acked_version: u64,
    /// The newest version whose view for this node is the one last sent.
    #[serde(skip)]
    pub view_version: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_nack: Option<Nack>,
    /// Where its config stream comes from: the node's own address (the lab's underlay, or the
    /// node IP of the hostNetwork DaemonSet), where the service graph scrapes its metrics.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<IpAddr>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Nack {
    pub version: u64,
    pub error: String,
}

pub type NodeStatuses = Arc<Mutex<BTreeMap<String, NodeStatus>>>;

/// State shared by both services.
#[derive(Clone)]
pub struct Shared {
    pub publisher: Publisher,
    pub ca: Arc<Ca>,
    pub auth: Arc<Authenticator>,
    pub metrics: Arc<Metrics>,
    pub nodes: NodeStatuses,
    /// Default lifetime of workload certificates.
    pub default_ttl: Duration,
    /// How node certificates name nodes.
    pub node_ids: NodeIds,
    /// Default lifetime of node certificates.
    pub node_ttl: Duration,
    /// Node bootstraps per source address (`mesh_l7::per_source`).
    pub bootstrap_limit: Arc<mesh_l7::per_source::PerSource>,
    /// What every node's view shares, for the latest state (`view::Cache`).
    pub views: Arc<view::Cache>,
}

impl Shared {
    /// Counts a refused certificate request; returns its status.
    fn refused(&self, reason: &'static str, status: Status) -> Status {
        self.metrics.certificate_refusals.get_or_create(&ReasonLabels { reason }).inc();
        status
    }

    /// The node a call comes from, proven by its client certificate; refusals are logged.
    fn verified_node<T>(&self, req: &Request<T>, what: &str) -> Result<VerifiedNode, crate::auth::Error> {
        let peer = req.peer_certs();
        self.node_ids.verify(peer.as_deref().map(Vec::as_slice), SystemTime::now()).inspect_err(|e| {
            tracing::warn!(remote = ?req.remote_addr(), "{what} refused: {e}");
        })
    }
}

pub struct Server {
    listener: TcpListener,
    tls: tls::Acceptor,
    shared: Shared,
}

impl Server {
    /// Binds `addr` and issues the serving certificate for `names` (DNS names or IPs the nodes
    /// dial).
    pub async fn new(addr: SocketAddr, names: &[String], shared: Shared) -> Result<Self, Error> {
        let listener = TcpListener::bind(addr).await.map_err(|source| Error::Bind { addr, source })?;
        // Renewed only by a restart: a year, far from the workload TTL that matters.
        let (cert, key) = shared.ca.serving_cert(names, Duration::from_hours(8760))?;
        let tls = tls::Acceptor::new(&cert.chain, &key, &shared.ca.trust_bundle())?;
        Ok(Self { listener, tls, shared })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    pub async fn run(self) -> Result<(), Error> {
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(20)))
            .add_service(pb::config_distribution_server::ConfigDistributionServer::new(ConfigService(self.shared.clone())))
            .add_service(ca_pb::certificates_server::CertificatesServer::new(CaService(self.shared)))
            .serve_with_incoming(self.tls.incoming(self.listener))
            .await
            .map_err(Error::Serve)
    }
}

struct ConfigService(Shared);

const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(10);

type UpdateStream = Pin<Box<dyn Stream<Item = Result<pb::ConfigUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl pb::config_distribution_server::ConfigDistribution for ConfigService {
    type StreamConfigStream = UpdateStream;

    async fn stream_config(&self, req: Request<Streaming<pb::NodeMessage>>) -> Result<Response<UpdateStream>, Status> {
        let shared = self.0.clone();
        let verified = shared.verified_node(&req, "config stream").map_err(|e| Status::unauthenticated(e.to_string()))?;
        let node = verified.name.clone();
        let address = req.remote_addr().map(|a| a.ip());
        let mut inbound = req.into_inner();
        // A client that opens a stream but never subscribes must not hold it forever.
        let first = tokio::time::timeout(SUBSCRIBE_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Subscribe within 10 s"))??
            .and_then(|m| m.kind);
        let Some(pb::node_message::Kind::Subscribe(sub)) = first else {
            return Err(Status::invalid_argument("the first message must be Subscribe"));
        };
        if sub.node_name != node {
            tracing::warn!(certificate = node, claimed = sub.node_name, "config stream refused: node name mismatch");
            return Err(Status::permission_denied(format!("the client certificate is node {node:?}'s, not {:?}'s", sub.node_name)));
        }
        tracing::info!(node, last_applied = sub.last_applied_version, ?address, "node subscribed");
        shared.nodes.lock().expect("not poisoned").entry(node.clone()).or_default().address = address;
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(serve_node(shared, verified, inbound, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Marks the node connected for as long as it lives.
struct Connected {
    shared: Shared,
    node: String,
}

impl Connected {
    fn new(shared: Shared, node: String) -> Self {
        shared.metrics.connected_nodes.inc();
        shared.nodes.lock().expect("not poisoned").entry(node.clone()).or_default().connected = true;
        Self { shared, node }
    }

    fn update(&self, f: impl FnOnce(&mut NodeStatus)) {
        f(self.shared.nodes.lock().expect("not poisoned").entry(self.node.clone()).or_default());
    }
}

impl Drop for Connected {
    fn drop(&mut self) {
        self.shared.metrics.connected_nodes.dec();
        self.update(|s| s.connected = false);
    }
}

/// One node's stream: a full view first, then a diff whenever the published state changes its
/// view; Acks and Nacks are recorded as they come. The stream ends when the node certificate
/// that opened it expires: the node reconnects with its renewed one (or, without one, is out).
async fn serve_node(
    shared: Shared,
    verified: VerifiedNode,
    mut inbound: Streaming<pb::NodeMessage>,
    tx: mpsc::Sender<Result<pb::ConfigUpdate, Status>>,
) {
    let node = verified.name;
    let expiry = tokio::time::sleep(verified.not_after.duration_since(SystemTime::now()).unwrap_or_default());
    tokio::pin!(expiry);
    let conn = Connected::new(shared.clone(), node.clone());
    let mut snapshots = shared.publisher.subscribe();
    let mut last: Option<view::View> = None;
    let trust_domain = shared.ca.trust_domain().to_owned();
    'stream: loop {
        let snap = snapshots.borrow_and_update().clone();
        if snap.version > 0 {
            let common = shared.views.get(snap.version, |previous| view::reuse(view::common(&snap.state, &trust_domain), previous));
            let new = view::node_view_with(common, &snap.state, &node, &trust_domain);
            let update = match &last {
                None => Some((new.full(snap.version), "full")),
                Some(old) => {
                    let (upserts, removals) = view::diff(old, &new);
                    let update = view::Outgoing { version: snap.version, full: false, upserts, removals };
                    (!update.is_empty()).then_some((update, "incremental"))
                }
            };
            if let Some((update, kind)) = update {
                tracing::debug!(node, version = update.version, kind, upserts = update.upserts.len(), removals = update.removals.len(), "pushing config");
                // Each part is built as the node takes the previous one (the channel holds 4).
                let mut parts = 0;
                for part in update.parts(view::MAX_MESSAGE_BYTES) {
                    if tx.send(Ok(part)).await.is_err() {
                        break 'stream;
                    }
                    parts += 1;
                }
                if parts > 1 {
                    tracing::info!(node, version = snap.version, kind, parts, "config update sent in parts");
                }
                shared.metrics.pushes.get_or_create(&PushLabels { kind }).inc();
                conn.update(|s| (s.sent_version, s.view_version) = (snap.version, snap.version));
            } else {
                // Nothing of this version concerns the node: once it holds what it was last sent,
                // it holds this version too (else `meshctl status` showed it behind until a
                // change that concerns it).
                conn.update(|s| {
                    s.view_version = snap.version;
                    if s.acked_version >= s.sent_version {
                        s.acked_version = snap.version;
                    }
                });
            }
            last = Some(new);
        }
        tokio::select! {
            () = &mut expiry => {
                tracing::info!(node, "node certificate expired; ending its config stream");
                let _ = tx.send(Err(Status::unauthenticated("node certificate expired; reconnect with a renewed one"))).await;
                break;
            }
            changed = snapshots.changed() => if changed.is_err() { break },
            msg = inbound.message() => match msg {
                Ok(Some(m)) => handle_reply(&shared, &conn, m),
                Ok(None) => break,
                Err(e) => {
                    tracing::info!(node, "config stream ended: {e}");
                    break;
                }
            },
        }
    }
    tracing::info!(node, "node disconnected");
}

fn handle_reply(shared: &Shared, conn: &Connected, msg: pb::NodeMessage) {
    match msg.kind {
        Some(pb::node_message::Kind::Ack(a)) => {
            shared.metrics.acks.inc();
            conn.update(|s| {
                s.acked_version = s.acked_version.max(a.version);
                if a.version >= s.sent_version {
                    s.acked_version = s.acked_version.max(s.view_version);
                }
            });
        }
        Some(pb::node_message::Kind::Nack(n)) => {
            shared.metrics.nacks.inc();
            tracing::warn!(node = conn.node, version = n.version, "node rejected config: {}", n.error);
            conn.update(|s| s.last_nack = Some(Nack { version: n.version, error: n.error }));
        }
        Some(pb::node_message::Kind::Subscribe(_)) | None => {
            tracing::warn!(node = conn.node, "ignoring an unexpected message on the config stream");
        }
    }
}

struct CaService(Shared);

#[tonic::async_trait]
impl ca_pb::certificates_server::Certificates for CaService {
    async fn create_certificate(
        &self,
        req: Request<ca_pb::CreateCertificateRequest>,
    ) -> Result<Response<ca_pb::CreateCertificateResponse>, Status> {
        let s = &self.0;
        let refuse = |reason, status| s.refused(reason, status);
        let verified = s.verified_node(&req, "certificate request").map_err(|e| refuse(e.reason(), Status::unauthenticated(e.to_string())))?;
        let node = verified.name;
        let r = req.into_inner();
        let id = s.ca.parse_identity(&r.identity).map_err(|e| {
            tracing::warn!(node, identity = r.identity, "certificate request refused: {e}");
            refuse("invalid_identity", Status::invalid_argument(e.to_string()))
        })?;
        let snap = s.publisher.current();
        let runs_here = snap.state.inventory.workloads.values().any(|w| {
            w.node == node && w.meshed && w.namespace == id.namespace && w.service_account == id.service_account
        });
        if !runs_here {
            tracing::warn!(node, identity = r.identity, "certificate request refused: no meshed workload with this identity runs on the node");
            return Err(refuse(
                "not_on_node",
                Status::permission_denied(format!("node {node:?} runs no meshed workload with identity {}", r.identity)),
            ));
        }
        let ttl = crate::ca::ttl(r.ttl_seconds, s.default_ttl, crate::ca::MAX_TTL)
            .map_err(|e| refuse("invalid_ttl", Status::invalid_argument(e.to_string())))?;
        // Never beyond the node certificate the request came with: a node the mesh stops
        // renewing (removed, or its credential revoked) loses its workloads' certificates at
        // most one node lifetime later, not a workload lifetime later.
        let node_left = verified.not_after.duration_since(SystemTime::now()).unwrap_or_default();
        let ttl = ttl.min(node_left).max(Duration::from_secs(1));
        let signed = s.ca.sign_workload(&r.csr_pem, &r.identity, ttl).map_err(|e| {
            tracing::warn!(node, identity = r.identity, "certificate request refused: {e}");
            refuse("invalid_csr", Status::invalid_argument(e.to_string()))
        })?;
        s.metrics.certificates_issued.inc();
        tracing::info!(node, identity = r.identity, ttl_s = ttl.as_secs(), "issued a workload certificate");
        Ok(Response::new(response(&s.ca, signed)))
    }

    async fn create_node_certificate(
        &self,
        req: Request<ca_pb::CreateNodeCertificateRequest>,
    ) -> Result<Response<ca_pb::CreateCertificateResponse>, Status> {
        let s = &self.0;
        let refuse = |reason, status| s.refused(reason, status);
        // Before the credential is checked: checking costs a TokenReview on the API server.
        // (Every call over TCP has a remote address.)
        if let Some(source) = req.remote_addr().map(|a| a.ip())
            && let Err(wait) = s.bootstrap_limit.admit(source, std::time::Instant::now())
        {
            tracing::warn!(%source, "node certificate request refused: rate limited");
            let why = format!("too many node certificate requests from {source}; retry in {} ms (--bootstrap-per-minute)", wait.as_millis());
            return Err(refuse("rate_limited", Status::resource_exhausted(why)));
        }
        let node = s.auth.authenticate(req.metadata()).await.map_err(|e| {
            tracing::warn!(remote = ?req.remote_addr(), "node certificate request refused: {e}");
            refuse(e.reason(), Status::unauthenticated(e.to_string()))
        })?;
        let r = req.into_inner();
        let ttl = crate::ca::ttl(r.ttl_seconds, s.node_ttl, crate::ca::MAX_NODE_TTL)
            .map_err(|e| refuse("invalid_ttl", Status::invalid_argument(e.to_string())))?;
        let signed = s.ca.sign_node(&r.csr_pem, &s.node_ids.uri(&node), ttl).map_err(|e| {
            tracing::warn!(node, "node certificate request refused: {e}");
            refuse("invalid_csr", Status::invalid_argument(e.to_string()))
        })?;
        s.metrics.node_certificates_issued.inc();
        tracing::info!(node, ttl_s = ttl.as_secs(), "issued a node certificate");
        Ok(Response::new(response(&s.ca, signed)))
    }
}

fn response(ca: &Ca, signed: crate::ca::Signed) -> ca_pb::CreateCertificateResponse {
    ca_pb::CreateCertificateResponse {
        cert_chain_pem: signed.chain,
        not_after_unix: signed.not_after.unix_timestamp(),
        trust_bundle_pem: ca.trust_bundle(),
    }
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
