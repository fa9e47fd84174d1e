//! What the daemon knows about the cluster, as domain types: workloads, authorization policies and
//! peer authentication. A snapshot is published through a `tokio::sync::watch` channel; proxies
//! read the latest `Arc<State>` per connection. The control plane's proto types are converted
//! into these (`TryFrom`) at the gRPC client; until then they come from a JSON file or a channel.

pub mod service;
pub mod workload;

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    path::Path,
    sync::Arc,
};

use mesh_l7::route::RouteTable;
use tokio::sync::watch;

pub use service::{Endpoint, Service, ServicePort, ServiceProtocol};
pub use workload::{Protocol, Workload, Workloads};

use crate::{
    authz::{PeerAuthentication, Policy},
    identity::Identity,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}: {source}")]
    Read { path: std::path::PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    Parse { path: std::path::PathBuf, source: serde_json::Error },
}

/// The serialized form of a snapshot (local config file, admin config dump).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Snapshot {
    #[serde(default)]
    pub workloads: Vec<Workload>,
    #[serde(default)]
    pub policies: Vec<Policy>,
    #[serde(default)]
    pub peer_authentications: Vec<PeerAuthentication>,
    #[serde(default)]
    pub services: Vec<Service>,
    /// HTTP route tables, one per Service that has routes. Only the control plane sends them
    /// (the local config file has none); shown in the config dump.
    #[serde(default, skip_deserializing)]
    pub routes: Vec<RouteTable>,
    /// RequestAuthentications (JWT providers); only the control plane sends them.
    #[serde(default, skip_deserializing)]
    pub request_authentications: Vec<crate::authn::RequestAuthentication>,
    /// Telemetries (tracing, access log) and the mesh config's tracing providers; only the
    /// control plane sends them.
    #[serde(default, skip_deserializing)]
    pub telemetry: Vec<crate::telemetry::policy::Telemetry>,
    #[serde(default, skip_deserializing)]
    pub mesh_tracing: crate::telemetry::policy::MeshTracing,
}

/// What a [`State`] is built from: a [`Snapshot`]'s contents, with the workloads and Services
/// shared.
#[derive(Debug, Default)]
pub struct Parts {
    pub workloads: Vec<Arc<Workload>>,
    pub services: Vec<Arc<Service>>,
    pub policies: Vec<Policy>,
    pub peer_authentications: Vec<PeerAuthentication>,
    pub routes: Vec<RouteTable>,
    pub request_authentications: Vec<crate::authn::RequestAuthentication>,
    pub telemetry: Vec<crate::telemetry::policy::Telemetry>,
    pub mesh_tracing: crate::telemetry::policy::MeshTracing,
}

impl From<Snapshot> for Parts {
    fn from(snap: Snapshot) -> Self {
        Self {
            workloads: snap.workloads.into_iter().map(Arc::new).collect(),
            services: snap.services.into_iter().map(Arc::new).collect(),
            policies: snap.policies,
            peer_authentications: snap.peer_authentications,
            routes: snap.routes,
            request_authentications: snap.request_authentications,
            telemetry: snap.telemetry,
            mesh_tracing: snap.mesh_tracing,
        }
    }
}

impl From<Parts> for Snapshot {
    /// Copies what is still shared.
    fn from(parts: Parts) -> Self {
        Self {
            workloads: parts.workloads.into_iter().map(Arc::unwrap_or_clone).collect(),
            services: parts.services.into_iter().map(Arc::unwrap_or_clone).collect(),
            policies: parts.policies,
            peer_authentications: parts.peer_authentications,
            routes: parts.routes,
            request_authentications: parts.request_authentications,
            telemetry: parts.telemetry,
            mesh_tracing: parts.mesh_tracing,
        }
    }
}

/// One consistent view, indexed for the per-connection lookups.
#[derive(Debug, Default)]
pub struct State {
    pub trust_domain: String,
    /// Istio's root namespace: policies there apply mesh-wide.
    pub root_namespace: String,
    pub workloads: Workloads,
    pub policies: Vec<Policy>,
    pub peer_authentications: Vec<PeerAuthentication>,
    /// End-user JWT providers (`crate::authn`).
    pub request_authn: Vec<crate::authn::RequestAuthentication>,
    /// Tracing and access-log settings (`crate::telemetry::policy`).
    pub telemetry: Vec<crate::telemetry::policy::Telemetry>,
    pub mesh_tracing: crate::telemetry::policy::MeshTracing,
    pub services: Vec<Arc<Service>>,
    /// Route tables by Service namespace, then name (nested: a per-request lookup borrows).
    pub routes: HashMap<String, HashMap<String, Arc<RouteTable>>>,
    /// The implicit route tables of Services without routes, each made on first use and kept
    /// with this state: most Services of a large mesh are never called from a given node (10,000
    /// tables made up front took 8 MB), and a request must not build one each time.
    implicit_routes: std::sync::Mutex<HashMap<String, HashMap<String, Arc<RouteTable>>>>,
    /// VIP and serving-Service lookups over `services`, built with them.
    service_index: service::Index,
    /// Pod address → the `LocalRateLimit` of a Service it serves: its buckets' scope
    /// ("namespace/name@pod"), the limit.
    rate_limits: HashMap<IpAddr, (Arc<str>, Arc<mesh_l7::policy::RateLimit>)>,
}

impl State {
    pub fn build(trust_domain: &str, root_namespace: &str, snap: Snapshot) -> Result<Self, Error> {
        // The state lives until the next update: it keeps only the Services it holds (the
        // parsers already size each endpoint list exactly and share the names in it).
        let parts = Parts::from(snap);
        Ok(Self::from_parts(trust_domain, root_namespace, parts))
    }

    /// The state of `parts`, sharing their workloads and Services (the control plane's store
    /// keeps them between updates, `crate::control::store`).
    pub fn from_parts(trust_domain: &str, root_namespace: &str, mut parts: Parts) -> Self {
        parts.services.shrink_to_fit();
        // An address two workloads claim belongs to neither (the controller already takes it
        // from both; a file or an older controller may not): the rest of the update applies.
        let (workloads, claimed_twice) = Workloads::new(parts.workloads);
        for (a, b) in claimed_twice {
            tracing::warn!(address = %a.ip, workloads = %format!("{}/{}, {}/{}", a.namespace, a.name, b.namespace, b.name), "two workloads claim one address: it is taken from both");
        }
        let mut routes: HashMap<String, HashMap<String, Arc<RouteTable>>> = HashMap::new();
        for t in parts.routes {
            routes.entry(t.namespace.clone()).or_default().insert(t.name.clone(), Arc::new(t));
        }
        let mut rate_limits = HashMap::new();
        for s in &parts.services {
            let Some(limit) = routes.get(&s.namespace).and_then(|n| n.get(&s.name)).and_then(|t| t.rate_limit.clone()) else { continue };
            for e in &s.endpoints {
                rate_limits.entry(e.address).or_insert_with(|| (Arc::from(format!("{}/{}@{}", s.namespace, s.name, e.address)), limit.clone()));
            }
        }
        Self {
            rate_limits,
            trust_domain: trust_domain.to_owned(),
            root_namespace: root_namespace.to_owned(),
            workloads,
            policies: parts.policies,
            peer_authentications: parts.peer_authentications,
            request_authn: parts.request_authentications,
            telemetry: parts.telemetry,
            mesh_tracing: parts.mesh_tracing,
            service_index: service::Index::build(&parts.services),
            services: parts.services,
            routes,
            implicit_routes: std::sync::Mutex::default(),
        }
    }

    pub fn workload(&self, ip: IpAddr) -> Option<&Workload> {
        self.workloads.get(&ip)
    }

    /// The Service and port of a VIP:port (TCP), for a connection addressed to it.
    pub fn vip(&self, dst: std::net::SocketAddr) -> Option<(&Service, &ServicePort)> {
        self.service_index.vip(&self.services, dst)
    }

    pub fn service(&self, namespace: &str, name: &str) -> Option<&Service> {
        self.service_index.by_name(&self.services, namespace, name)
    }

    /// The Service (and port) whose endpoint a connection to `dst` reaches (`service::Index`).
    pub fn serving(&self, dst: std::net::SocketAddr) -> Option<(&Service, &ServicePort)> {
        self.service_index.serving(&self.services, dst)
    }

    /// Every Service serving the pod address `dst` (the first is [`State::serving`]'s).
    pub fn serving_all(&self, dst: std::net::SocketAddr) -> impl Iterator<Item = (&Service, &ServicePort)> {
        self.service_index.serving_all(&self.services, dst)
    }

    /// How the mesh handles traffic to the pod address `dst`: HTTP when the Service serving it
    /// marks that port so.
    pub fn app_protocol_at(&self, dst: std::net::SocketAddr) -> mesh_l7::AppProtocol {
        self.serving(dst).map_or(mesh_l7::AppProtocol::Tcp, |(_, p)| p.app_protocol())
    }

    /// The traffic policy of `subset` of a Service (or of the whole Service), if it has one.
    pub fn traffic_policy(&self, namespace: &str, name: &str, subset: Option<&str>) -> Option<&Arc<mesh_l7::policy::TrafficPolicy>> {
        self.routes.get(namespace).and_then(|n| n.get(name)).and_then(|t| t.policy(subset))
    }

    /// The `LocalRateLimit` on the pod at `ip` (of a Service it serves), with its buckets' scope.
    pub fn rate_limit_at(&self, ip: IpAddr) -> Option<&(Arc<str>, Arc<mesh_l7::policy::RateLimit>)> {
        self.rate_limits.get(&ip)
    }

    /// The route table of a Service; the implicit one when it has none.
    pub fn route_table(&self, namespace: &str, name: &str) -> Arc<RouteTable> {
        if let Some(t) = self.routes.get(namespace).and_then(|n| n.get(name)) {
            return Arc::clone(t);
        }
        // Only a poisoned lock's holder panicked mid-insert: the map is still sound.
        let mut implicit = self.implicit_routes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(t) = implicit.get(namespace).and_then(|n| n.get(name)) {
            return Arc::clone(t);
        }
        let table = Arc::new(RouteTable::default_for(namespace, name));
        implicit.entry(namespace.to_owned()).or_default().insert(name.to_owned(), Arc::clone(&table));
        table
    }

    pub fn identity(&self, w: &Workload) -> Identity {
        Identity::new(&self.trust_domain, &w.namespace, &w.service_account)
    }

    /// Identities of the meshed workloads on `node`: the certificates this daemon must hold.
    pub fn local_identities(&self, node: &str) -> BTreeSet<Identity> {
        self.workloads
            .values()
            .filter(|w| *w.node == *node && w.protocol == Protocol::Hbone)
            .map(|w| self.identity(w))
            .collect()
    }

    pub fn snapshot(&self) -> Snapshot {
        let workloads: Vec<Workload> = self.workloads.values().cloned().collect();
        Snapshot {
            workloads,
            policies: self.policies.clone(),
            peer_authentications: self.peer_authentications.clone(),
            services: self.services.iter().map(|s| Service::clone(s)).collect(),
            routes: {
                // Explicit tables only: the implicit ones are implied by the Services.
                let mut r: Vec<RouteTable> = self.routes.values().flat_map(HashMap::values).filter(|t| !t.is_implicit()).map(|t| RouteTable::clone(t)).collect();
                r.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
                r
            },
            request_authentications: self.request_authn.clone(),
            telemetry: self.telemetry.clone(),
            mesh_tracing: self.mesh_tracing.clone(),
        }
    }
}

pub type StateRx = watch::Receiver<Arc<State>>;
pub type StateTx = watch::Sender<Arc<State>>;

/// Reads a snapshot from a JSON file (the local config source).
pub fn read_file(path: &Path) -> Result<Snapshot, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read { path: path.into(), source })?;
    serde_json::from_str(&text).map_err(|source| Error::Parse { path: path.into(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_two_workloads_claim_is_taken_from_both_and_the_rest_applies() {
        let w = |name: &str, ip: &str| format!(r#"{{"name":"{name}","namespace":"demo","serviceAccount":"{name}","ip":"{ip}","node":"n1","nodeIp":"198.18.0.1","protocol":"HBONE"}}"#);
        let json = format!(r#"{{"workloads":[{},{},{}]}}"#, w("a", "198.18.1.10"), w("impostor", "198.18.1.10"), w("b", "198.18.1.11"));
        let snap: Snapshot = serde_json::from_str(&json).expect("snapshot");
        let state = State::build("cluster.local", "mesh-system", snap).expect("the update applies");
        assert!(state.workload("198.18.1.10".parse().expect("ip")).is_none(), "nobody's identity at the shared address");
        assert_eq!(state.workload("198.18.1.11".parse().expect("ip")).map(|w| &*w.name), Some("b"));
    }

    /// A Service without routes gets its implicit table when first asked for, the same one after
    /// (a request does not build its own), and it never shows among the explicit tables.
    #[test]
    fn an_implicit_route_table_is_made_on_first_use_and_kept() {
        let json = r#"{"services":[{"name":"whoami","namespace":"demo","vips":["198.19.0.10"],"ports":[{"name":"http","port":80,"protocol":"TCP","targetPort":8080}]}]}"#;
        let state = State::build("cluster.local", "mesh-system", serde_json::from_str(json).expect("snapshot")).expect("applies");
        assert!(state.implicit_routes.lock().expect("lock").is_empty(), "none made up front");
        let first = state.route_table("demo", "whoami");
        assert!(first.is_implicit());
        assert!(Arc::ptr_eq(&first, &state.route_table("demo", "whoami")), "made once");
        assert!(state.snapshot().routes.is_empty(), "implied by the Service, not listed");
    }
}
