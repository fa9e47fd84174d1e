//! The YAML documents of file mode: the policy and routing CRDs exactly as applied with kubectl
//! (`security.mesh.dev`, `networking.mesh.dev`, Gateway API's `HTTPRoute`, `GRPCRoute`,
//! `ReferenceGrant`), plus small descriptions of what Kubernetes would otherwise tell us
//! (`lab.mesh.dev/v1alpha1` kinds `Node`, `Namespace`, `Workload`, `Service`). See
//! `deploy/examples/` and the README for the format.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use serde::Deserialize;

use crate::{
    crd::{self, Read, gateway, networking, telemetry},
    model::{self, Labels, NamespacedName},
};

/// `apiVersion` of the file-mode-only kinds.
pub const LAB_API_VERSION: &str = "lab.mesh.dev/v1alpha1";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("not YAML: {0}")]
    Yaml(String),
    #[error("{api_version}/{kind}: {source}")]
    Shape { api_version: String, kind: String, source: serde_json::Error },
    #[error(
        "unknown kind {kind:?} of apiVersion {api_version:?} (expected {} AuthorizationPolicy/PeerAuthentication/RequestAuthentication, {} VirtualService/DestinationRule/LocalRateLimit, {} HTTPRoute/GRPCRoute, {} ReferenceGrant, {} Telemetry, v1 ConfigMap {} or {LAB_API_VERSION} Node/Namespace/Workload/Service)",
        crd::API_VERSION,
        networking::API_VERSION,
        gateway::API_VERSION,
        gateway::REFERENCE_GRANT_API_VERSION,
        telemetry::API_VERSION,
        telemetry::MESH_CONFIG_MAP
    )]
    UnknownKind { api_version: String, kind: String },
    #[error("{kind} {name}: {what}")]
    Invalid { kind: &'static str, name: String, what: String },
}

/// One document of a config-folder file.
#[derive(Clone, Debug)]
pub enum Document {
    AuthorizationPolicy(Box<crd::AuthorizationPolicy>),
    PeerAuthentication(Box<crd::PeerAuthentication>),
    RequestAuthentication(Box<Read<crd::RequestAuthentication>>),
    HttpRoute(Box<Read<gateway::HttpRoute>>),
    GrpcRoute(Box<Read<gateway::GrpcRoute>>),
    ReferenceGrant(Box<gateway::ReferenceGrant>),
    VirtualService(Box<Read<networking::VirtualService>>),
    DestinationRule(Box<Read<networking::DestinationRule>>),
    LocalRateLimit(Box<Read<networking::LocalRateLimit>>),
    Telemetry(Box<Read<telemetry::Telemetry>>),
    /// The ConfigMap `mesh-config`'s `mesh` key, parsed (Istio's MeshConfig providers).
    MeshConfig { namespace: String, config: telemetry::MeshConfig },
    /// `metadata.labels` may carry `topology.kubernetes.io/region` and `zone`, as a
    /// Kubernetes node does.
    Node { name: String, address: Option<IpAddr>, labels: Labels },
    Namespace { name: String, labels: Labels },
    Workload(model::Workload),
    Service(ServiceDoc),
}

/// A Service in file mode: endpoints come from `selector` over the described workloads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceDoc {
    pub key: NamespacedName,
    pub vips: Vec<IpAddr>,
    pub selector: Labels,
    pub ports: Vec<model::ServicePort>,
}

#[derive(Deserialize, Default)]
struct Meta {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    labels: Labels,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WorkloadSpec {
    node: String,
    #[serde(default = "default_sa")]
    service_account: String,
    addresses: Vec<IpAddr>,
    #[serde(default = "yes")]
    healthy: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ServiceSpec {
    #[serde(default)]
    vips: Vec<IpAddr>,
    #[serde(default)]
    selector: Labels,
    ports: Vec<PortSpec>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PortSpec {
    #[serde(default)]
    name: String,
    port: u16,
    #[serde(default)]
    target_port: Option<u16>,
    #[serde(default)]
    protocol: Option<String>,
    #[serde(default)]
    app_protocol: Option<String>,
}

fn default_sa() -> String {
    "default".into()
}
fn yes() -> bool {
    true
}

/// Parses every document of a YAML text; one bad document does not hide the others.
pub fn parse(text: &str) -> Result<Vec<Result<Document, Error>>, Error> {
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(text).map_err(|e| Error::Yaml(e.to_string()))?;
    Ok(docs.iter().filter(|d| !d.is_null()).map(document).collect())
}

fn document(doc: &serde_json::Value) -> Result<Document, Error> {
    let field = |name: &str| doc.get(name).and_then(|v| v.as_str()).unwrap_or_default().to_owned();
    let (api_version, kind) = (field("apiVersion"), field("kind"));
    let shape = |source| Error::Shape { api_version: api_version.clone(), kind: kind.clone(), source };
    let meta: Meta = serde_json::from_value(doc.get("metadata").cloned().unwrap_or_default()).map_err(shape)?;
    let spec = doc.get("spec").cloned().unwrap_or_default();
    let ns = || meta.namespace.clone().unwrap_or_else(|| "default".into());
    match (api_version.as_str(), kind.as_str()) {
        (crd::API_VERSION, "AuthorizationPolicy") => {
            let mut p: crd::AuthorizationPolicy = serde_json::from_value(doc.clone()).map_err(shape)?;
            p.metadata.namespace.get_or_insert_with(ns);
            Ok(Document::AuthorizationPolicy(Box::new(p)))
        }
        (crd::API_VERSION, "PeerAuthentication") => {
            let mut p: crd::PeerAuthentication = serde_json::from_value(doc.clone()).map_err(shape)?;
            p.metadata.namespace.get_or_insert_with(ns);
            Ok(Document::PeerAuthentication(Box::new(p)))
        }
        (crd::API_VERSION, "RequestAuthentication") => Ok(Document::RequestAuthentication(Box::new(routing_object(doc, ns(), shape)?))),
        // v1beta1 HTTPRoutes (older docs) have v1's shape; Kubernetes serves them as v1 too.
        (gateway::API_VERSION | "gateway.networking.k8s.io/v1beta1", "HTTPRoute") => Ok(Document::HttpRoute(Box::new(routing_object(doc, ns(), shape)?))),
        (gateway::API_VERSION, "GRPCRoute") => Ok(Document::GrpcRoute(Box::new(routing_object(doc, ns(), shape)?))),
        (gateway::REFERENCE_GRANT_API_VERSION | "gateway.networking.k8s.io/v1", "ReferenceGrant") => {
            let mut g: gateway::ReferenceGrant = serde_json::from_value(doc.clone()).map_err(shape)?;
            g.metadata.namespace.get_or_insert_with(ns);
            Ok(Document::ReferenceGrant(Box::new(g)))
        }
        (networking::API_VERSION, "VirtualService") => Ok(Document::VirtualService(Box::new(routing_object(doc, ns(), shape)?))),
        (networking::API_VERSION, "DestinationRule") => Ok(Document::DestinationRule(Box::new(routing_object(doc, ns(), shape)?))),
        (networking::API_VERSION, "LocalRateLimit") => Ok(Document::LocalRateLimit(Box::new(routing_object(doc, ns(), shape)?))),
        (telemetry::API_VERSION, "Telemetry") => Ok(Document::Telemetry(Box::new(routing_object(doc, ns(), shape)?))),
        ("v1", "ConfigMap") => {
            let name = named("ConfigMap", meta.name)?;
            let invalid = |what: String| Error::Invalid { kind: "ConfigMap", name: name.clone(), what };
            if name != telemetry::MESH_CONFIG_MAP {
                return Err(invalid(format!("the only ConfigMap read is {:?} (the mesh config)", telemetry::MESH_CONFIG_MAP)));
            }
            let text = doc.pointer(&format!("/data/{}", telemetry::MESH_CONFIG_KEY)).and_then(|v| v.as_str()).unwrap_or_default();
            let config = mesh_config(text).map_err(invalid)?;
            Ok(Document::MeshConfig { namespace: ns(), config })
        }
        (LAB_API_VERSION, "Node") => {
            #[derive(serde::Deserialize, Default)]
            #[serde(deny_unknown_fields)]
            struct NodeSpec {
                address: Option<IpAddr>,
            }
            let s: NodeSpec = if spec.is_null() { NodeSpec::default() } else { serde_json::from_value(spec).map_err(shape)? };
            Ok(Document::Node { name: named("Node", meta.name)?, address: s.address, labels: meta.labels })
        }
        (LAB_API_VERSION, "Namespace") => Ok(Document::Namespace { name: named("Namespace", meta.name)?, labels: meta.labels }),
        (LAB_API_VERSION, "Workload") => {
            let s: WorkloadSpec = serde_json::from_value(spec).map_err(shape)?;
            let namespace = ns();
            let name = named("Workload", meta.name)?;
            Ok(Document::Workload(model::Workload {
                uid: format!("{namespace}/{name}"),
                name,
                namespace,
                service_account: s.service_account,
                node: s.node,
                addresses: s.addresses,
                labels: meta.labels,
                meshed: false, // decided with the namespace labels, in `filemode::build`
                healthy: s.healthy,
            }))
        }
        (LAB_API_VERSION, "Service") => {
            let s: ServiceSpec = serde_json::from_value(spec).map_err(shape)?;
            let name = named("Service", meta.name)?;
            let mut ports = Vec::new();
            for p in s.ports {
                let invalid = |what: String| Error::Invalid { kind: "Service", name: name.clone(), what };
                if p.port == 0 {
                    return Err(invalid("port 0 is out of range 1-65535".into()));
                }
                let protocol = p.protocol.as_deref().unwrap_or("TCP");
                ports.push(model::ServicePort {
                    name: p.name,
                    port: p.port,
                    protocol: model::Protocol::parse(protocol).ok_or_else(|| invalid(format!("unknown protocol {protocol:?}")))?,
                    target_port: p.target_port.filter(|t| *t != 0).unwrap_or(p.port),
                    app_protocol: p.app_protocol,
                });
            }
            Ok(Document::Service(ServiceDoc { key: NamespacedName::new(ns(), name), vips: s.vips, selector: s.selector, ports }))
        }
        _ => Err(Error::UnknownKind { api_version, kind }),
    }
}

/// The mesh config from the text of the ConfigMap's `mesh` key (empty: no providers).
pub fn mesh_config(text: &str) -> Result<telemetry::MeshConfig, String> {
    if text.trim().is_empty() {
        return Ok(telemetry::MeshConfig::default());
    }
    let value: serde_json::Value = serde_saphyr::from_str(text).map_err(|e| format!("data.{} is not YAML: {e}", telemetry::MESH_CONFIG_KEY))?;
    serde_json::from_value(value).map_err(|e| format!("data.{}: {e} (read: extensionProviders, defaultProviders)", telemetry::MESH_CONFIG_KEY))
}

/// A routing object with its unknown fields (validation names them in its status).
fn routing_object<K>(doc: &serde_json::Value, namespace: String, shape: impl Fn(serde_json::Error) -> Error) -> Result<Read<K>, Error>
where
    K: kube::Resource + serde::de::DeserializeOwned + serde::Serialize,
{
    let mut r: Read<K> = crd::read(doc).map_err(shape)?;
    r.object.meta_mut().namespace.get_or_insert(namespace);
    Ok(r)
}

fn named(kind: &'static str, name: String) -> Result<String, Error> {
    if name.is_empty() {
        return Err(Error::Invalid { kind, name, what: "metadata.name is required".into() });
    }
    Ok(name)
}

/// The workloads of file mode by namespace and label, so each Service's selector is answered
/// from the workloads carrying one of its labels instead of a scan of them all (10,000 Services
/// over 100,000 workloads were 10^9 comparisons: most of a minute for each change).
pub struct WorkloadIndex<'a> {
    /// (namespace, label key, label value) → the workloads with it, in uid order.
    by_label: HashMap<(&'a str, &'a str, &'a str), Vec<&'a model::Workload>>,
}

impl<'a> WorkloadIndex<'a> {
    pub fn new(workloads: &'a BTreeMap<String, model::Workload>) -> Self {
        let mut by_label: HashMap<_, Vec<_>> = HashMap::new();
        for w in workloads.values() {
            for (k, v) in &w.labels {
                by_label.entry((w.namespace.as_str(), k.as_str(), v.as_str())).or_default().push(w);
            }
        }
        Self { by_label }
    }

    /// The workloads of `namespace` whose labels include all of `selector` (none for an empty
    /// selector, as a Service without one selects nothing), in uid order.
    fn selected<'s>(&'s self, namespace: &'s str, selector: &'s Labels) -> impl Iterator<Item = &'a model::Workload> + 's {
        // The rarest of the selector's labels, then the others checked on its workloads.
        let mut lists = selector.iter().map(|(k, v)| self.by_label.get(&(namespace, k.as_str(), v.as_str())).map_or(&[][..], Vec::as_slice));
        let first = lists.next().unwrap_or_default();
        let rarest = lists.fold(first, |a, b| if b.len() < a.len() { b } else { a });
        rarest.iter().copied().filter(move |w| selector.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
    }
}

/// Endpoints of a file-mode Service: every address of every workload its selector matches.
pub fn endpoints(svc: &ServiceDoc, workloads: &WorkloadIndex<'_>) -> Vec<model::Endpoint> {
    let ports: BTreeMap<u16, u16> = svc.ports.iter().map(|p| (p.port, p.target_port)).collect();
    workloads
        .selected(&svc.key.namespace, &svc.selector)
        .flat_map(|w| {
            w.addresses.iter().map(|a| model::Endpoint {
                workload_uid: Some(w.uid.clone()),
                address: *a,
                ports: ports.clone(),
                healthy: w.healthy,
            })
        })
        .collect()
}
