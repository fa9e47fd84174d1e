//! Domain types of the control plane. Kubernetes objects, file-mode YAML and CRDs are converted
//! into these at their module boundaries; the per-node views and the gRPC conversion start here.

use std::{collections::BTreeMap, fmt, net::IpAddr};

use ipnet::IpNet;

pub type Labels = BTreeMap<String, String>;

/// A namespace and a name: the key of services and policies.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NamespacedName {
    pub namespace: String,
    pub name: String,
}

impl NamespacedName {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self { namespace: namespace.into(), name: name.into() }
    }
}

impl fmt::Display for NamespacedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A pod, or a workload described in file mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// Pod UID; file mode: "<namespace>/<name>".
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub node: String,
    pub addresses: Vec<IpAddr>,
    pub labels: Labels,
    pub meshed: bool,
    pub healthy: bool,
}

impl Workload {
    /// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
    pub fn identity(&self, trust_domain: &str) -> String {
        spiffe_id(trust_domain, &self.namespace, &self.service_account)
    }
}

pub fn spiffe_id(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_uppercase().as_str() {
            "" | "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            "SCTP" => Some(Self::Sctp),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
    pub target_port: u16,
    pub app_protocol: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub workload_uid: Option<String>,
    pub address: IpAddr,
    /// Service port → port on this endpoint.
    pub ports: BTreeMap<u16, u16>,
    pub healthy: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub endpoints: Vec<Endpoint>,
}

impl Service {
    pub fn key(&self) -> NamespacedName {
        NamespacedName::new(&self.namespace, &self.name)
    }
}

/// Everything discovered about the cluster, before policies.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Inventory {
    /// Node name → the address other nodes reach its daemon at (HBONE, 15008): the Kubernetes
    /// InternalIP, or `spec.address` in file mode. `None` when not known.
    pub nodes: BTreeMap<String, Option<IpAddr>>,
    /// Node name → `<region>/<zone>` from its `topology.kubernetes.io/region` and `zone` labels
    /// (nodes without either are absent).
    pub localities: BTreeMap<String, String>,
    /// By uid.
    pub workloads: BTreeMap<String, Workload>,
    pub services: BTreeMap<NamespacedName, Service>,
}

impl Inventory {
    /// Takes every address claimed by more than one workload away from all of them (a workload
    /// left without an address goes), and says what it took. Which claimant is right cannot be
    /// known here (in Kubernetes, a deleted pod's IP given to a new pod before the old one is
    /// gone; in file mode, a mistake): neither gets the identity, so traffic from that address
    /// is nobody's and fails closed under policies that name principals. The rest of the update
    /// goes through: a node refuses a view with a duplicate address whole.
    pub fn drop_shared_addresses(&mut self) -> Vec<String> {
        let mut claims: BTreeMap<IpAddr, Vec<String>> = BTreeMap::new();
        for w in self.workloads.values() {
            for a in &w.addresses {
                claims.entry(*a).or_default().push(format!("{}/{}", w.namespace, w.name));
            }
        }
        let shared: BTreeMap<IpAddr, Vec<String>> = claims.into_iter().filter(|(_, who)| who.len() > 1).collect();
        if shared.is_empty() {
            return Vec::new();
        }
        for w in self.workloads.values_mut() {
            w.addresses.retain(|a| !shared.contains_key(a));
        }
        self.workloads.retain(|_, w| !w.addresses.is_empty());
        shared.into_iter().map(|(a, who)| format!("address {a} is claimed by {}: taken from all of them", who.join(", "))).collect()
    }
}

/// `<region>/<zone>` from a node's labels, `None` when it has neither.
pub fn locality(labels: &Labels) -> Option<String> {
    let region = labels.get("topology.kubernetes.io/region").map_or("", String::as_str);
    let zone = labels.get("topology.kubernetes.io/zone").map_or("", String::as_str);
    (!region.is_empty() || !zone.is_empty()).then(|| format!("{region}/{zone}"))
}

/// Where a policy applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// In the root namespace without a selector: every workload of the mesh.
    Mesh,
    /// Without a selector: every workload of its namespace.
    Namespace,
    /// With a selector: the matching workloads of its namespace.
    Workload,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
    Audit,
}

/// A validated `AuthorizationPolicy`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthorizationPolicy {
    pub name: String,
    pub namespace: String,
    pub scope: Scope,
    pub selector: Labels,
    pub action: Action,
    pub dry_run: bool,
    pub rules: Vec<Rule>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    pub from: Vec<Source>,
    pub to: Vec<Operation>,
    pub when: Vec<Condition>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Source {
    pub principals: Vec<String>,
    pub not_principals: Vec<String>,
    pub namespaces: Vec<String>,
    pub not_namespaces: Vec<String>,
    pub ip_blocks: Vec<IpNet>,
    pub not_ip_blocks: Vec<IpNet>,
    pub request_principals: Vec<String>,
    pub not_request_principals: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Operation {
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
    pub methods: Vec<String>,
    pub not_methods: Vec<String>,
    pub paths: Vec<String>,
    pub not_paths: Vec<String>,
    pub hosts: Vec<String>,
    pub not_hosts: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Condition {
    pub key: String,
    pub values: Vec<String>,
    pub not_values: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MtlsMode {
    Unset,
    Strict,
    Permissive,
    Disable,
}

/// A validated `PeerAuthentication`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerAuthentication {
    pub name: String,
    pub namespace: String,
    pub scope: Scope,
    pub selector: Labels,
    pub mode: MtlsMode,
    pub port_level: BTreeMap<u16, MtlsMode>,
}

/// A validated `RequestAuthentication`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestAuthentication {
    pub name: String,
    pub namespace: String,
    pub scope: Scope,
    pub selector: Labels,
    pub rules: Vec<JwtRule>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JwtRule {
    pub issuer: String,
    pub audiences: Vec<String>,
    pub jwks: Jwks,
    /// (header name, prefix).
    pub from_headers: Vec<(String, String)>,
    pub from_params: Vec<String>,
    pub from_cookies: Vec<String>,
    pub forward_original_token: bool,
    pub output_payload_to_header: Option<String>,
    /// (header, claim).
    pub output_claim_to_headers: Vec<(String, String)>,
}

/// Where a rule's keys are: a URI each node fetches, or the JWK set inline (checked to parse).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Jwks {
    Uri(String),
    Inline(String),
}

impl Default for Jwks {
    fn default() -> Self {
        Self::Inline(String::new())
    }
}

/// A status condition as the controller decides it (policies, routing objects), before a source
/// writes it as a Kubernetes `Condition` (with times and generations) or shows it on `/status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusCondition {
    pub type_: &'static str,
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

impl StatusCondition {
    pub fn yes(type_: &'static str, reason: &'static str, message: impl Into<String>) -> Self {
        Self { type_, status: true, reason, message: message.into() }
    }

    pub fn no(type_: &'static str, reason: &'static str, message: impl Into<String>) -> Self {
        Self { type_, status: false, reason, message: message.into() }
    }
}

/// Does a policy with this scope, namespace and selector apply to the workload?
pub fn applies_to(scope: Scope, namespace: &str, selector: &Labels, w: &Workload) -> bool {
    let selected = selector.iter().all(|(k, v)| w.labels.get(k) == Some(v));
    match scope {
        Scope::Mesh => selected,
        Scope::Namespace => w.namespace == namespace,
        Scope::Workload => w.namespace == namespace && selected,
    }
}

/// Is a pod in the mesh? Its namespace opts in with `mesh.dev/dataplane-mode=ambient`, or the pod
/// itself does; the pod value `none` opts out of a meshed namespace.
pub fn meshed(namespace_labels: Option<&Labels>, pod_labels: &Labels) -> bool {
    let mode = crate::crd::DATAPLANE_MODE_LABEL;
    match pod_labels.get(mode).map(String::as_str) {
        Some("none") => false,
        Some("ambient") => true,
        _ => namespace_labels.and_then(|l| l.get(mode)).is_some_and(|v| v == "ambient"),
    }
}

/// A validated `Telemetry`: what it sets, each field `None` when inherited from the enclosing
/// scope (mesh → namespace → workload, the most specific that sets a field wins).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Telemetry {
    pub name: String,
    pub namespace: String,
    pub scope: Scope,
    pub selector: Labels,
    pub tracing: Vec<TracingRule>,
    /// `accessLogging[].disabled` (`None`: inherited).
    pub access_log_disabled: Option<bool>,
}

/// Which side of a request a tracing rule applies to (Istio's `match.mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TracingMode {
    ClientAndServer,
    Client,
    Server,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TracingRule {
    pub mode: TracingMode,
    /// The one provider's name (Istio allows one), checked against the mesh config.
    pub provider: Option<String>,
    /// `randomSamplingPercentage` in millionths (100 % = 1,000,000), so the model stays `Eq`.
    pub sampling_ppm: Option<u32>,
    pub disable_span_reporting: Option<bool>,
    pub custom_tags: BTreeMap<String, CustomTag>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CustomTag {
    Literal(String),
    /// A variable of the node daemon's environment.
    Environment { name: String, default: Option<String> },
    Header { name: String, default: Option<String> },
}

/// The tracing providers of the mesh config, by name, and the default one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MeshConfig {
    pub tracing_providers: BTreeMap<String, TracingProvider>,
    pub default_tracing_provider: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TracingProvider {
    pub protocol: TraceProtocol,
    /// A Service host (`zipkin.istio-system.svc.cluster.local`, `zipkin.istio-system`) or an IP.
    pub service: String,
    pub port: u16,
    /// 0: unlimited.
    pub max_tag_length: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TraceProtocol {
    /// Zipkin JSON v2, POSTed to this path.
    Zipkin { path: String },
    /// OTLP over gRPC.
    OpenTelemetry,
}
