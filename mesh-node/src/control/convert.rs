//! `mesh.config.v1` resources → the daemon's domain [`Snapshot`]. The proto boundary.
//!
//! - Workloads become [`Workload`]s: this node's, and other nodes' meshed ones (sent for source
//!   attribution); meshed Service endpoints the controller did not send as workloads are added
//!   too, so the outbound proxy knows where to tunnel and which identity to expect.
//! - Authorization rules keep their L7 fields and `when` conditions: the evaluator applies them
//!   per request on HTTP ports and fails closed elsewhere (`crate::authz`).
//! - PeerAuthentication with mode UNSET inherits, so it is dropped; port-level modes are not
//!   enforced yet (the workload-level mode applies to every port).
//! - Route tables become `mesh_l7` routes (`routes`): regexes are compiled here, once.
//! - RequestAuthentications become JWT providers; inline key sets are parsed here, once.
//! - Telemetries and the mesh config's tracing providers become `crate::telemetry::policy` types.

mod routes;

use std::{
    collections::{BTreeMap, HashSet},
    net::{IpAddr, Ipv4Addr},
    str::FromStr,
    sync::Arc,
};

use ipnet::IpNet;
use mesh_l7::route::RouteTable;
use mesh_proto::config::v1 as pb;

use super::Error;
use crate::{
    authn::RequestAuthentication,
    authz::{Action, Condition, Destination, Mode, PeerAuthentication, Policy, Rule, Source},
    state::{Endpoint, Parts, Protocol, Service, ServicePort, ServiceProtocol, Snapshot, Workload, workload::Interner},
    telemetry::policy,
};

fn invalid(what: impl Into<String>) -> Error {
    Error::Invalid(what.into())
}

fn ip(s: &str, what: &str) -> Result<IpAddr, Error> {
    IpAddr::from_str(s).map_err(|_| invalid(format!("{what}: {s:?} is not an IP address")))
}

fn port(p: u32, what: &str) -> Result<u16, Error> {
    u16::try_from(p).ok().filter(|p| *p != 0).ok_or_else(|| invalid(format!("{what}: port {p} out of range")))
}

/// (namespace, service account) from `spiffe://td/ns/<ns>/sa/<sa>`.
fn ns_sa(identity: &str) -> Option<(String, String)> {
    let rest = identity.strip_prefix("spiffe://")?;
    let mut parts = rest.split('/').skip(1);
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("ns"), Some(ns), Some("sa"), Some(sa)) => Some((ns.to_owned(), sa.to_owned())),
        _ => None,
    }
}

/// One resource, converted. Workloads and Services are shared with the states built from them
/// (`crate::state::Parts`), so a node holds each once however many updates keep it. Small (16
/// bytes): the store holds one per resource, and an inline policy or route table made every
/// entry of its map as large (~950 bytes a workload instead of ~340).
#[derive(Clone, Debug)]
pub enum Converted {
    /// A workload with one address, the usual case.
    Workload(Arc<Workload>),
    /// One per address of the workload.
    Workloads(Box<[Arc<Workload>]>),
    Service(Arc<Service>),
    Policy(Box<Policy>),
    /// `None`: mode UNSET, which inherits.
    PeerAuthentication(Option<Box<PeerAuthentication>>),
    Routes(Box<RouteTable>),
    RequestAuthentication(Box<RequestAuthentication>),
    Telemetry(Box<policy::Telemetry>),
    MeshTracing(Box<policy::MeshTracing>),
}

/// Converts one resource for this node. `node` and `own_address` are this node's name and HBONE
/// address: the address stands in for a local workload's node address when the controller
/// sends none.
pub fn resource(r: &pb::Resource, node: &str, own_address: IpAddr, shared: &mut Shared) -> Result<Converted, Error> {
    Ok(match &r.kind {
        Some(pb::resource::Kind::Workload(w)) => {
            let mut all = workloads(w, node, own_address, shared)?;
            if all.len() == 1 { Converted::Workload(all.remove(0)) } else { Converted::Workloads(all.into_boxed_slice()) }
        }
        Some(pb::resource::Kind::Service(s)) => Converted::Service(Arc::new(service(s, shared)?)),
        Some(pb::resource::Kind::AuthorizationPolicy(p)) => Converted::Policy(Box::new(policy(p)?)),
        Some(pb::resource::Kind::PeerAuthentication(p)) => Converted::PeerAuthentication(peer_authentication(p)?.map(Box::new)),
        Some(pb::resource::Kind::RouteTable(t)) => Converted::Routes(Box::new(routes::route_table(t)?)),
        Some(pb::resource::Kind::RequestAuthentication(r)) => Converted::RequestAuthentication(Box::new(request_authentication(r)?)),
        Some(pb::resource::Kind::Telemetry(t)) => Converted::Telemetry(Box::new(telemetry(t))),
        Some(pb::resource::Kind::MeshConfig(m)) => Converted::MeshTracing(Box::new(mesh_tracing(m)?)),
        None => return Err(invalid("resource without a kind")),
    })
}

/// The parts of a state from every resource of a config, converted: meshed Service endpoints
/// the controller did not send as workloads become workloads too (see the module's comment).
pub fn parts<'a>(all: impl IntoIterator<Item = &'a Converted>, shared: &mut Shared) -> Parts {
    let mut parts = Parts::default();
    for c in all {
        match c {
            Converted::Workload(w) => parts.workloads.push(w.clone()),
            Converted::Workloads(w) => parts.workloads.extend(w.iter().cloned()),
            Converted::Service(s) => parts.services.push(s.clone()),
            Converted::Policy(p) => parts.policies.push(Policy::clone(p)),
            Converted::PeerAuthentication(p) => parts.peer_authentications.extend(p.as_deref().cloned()),
            Converted::Routes(t) => parts.routes.push(RouteTable::clone(t)),
            Converted::RequestAuthentication(r) => parts.request_authentications.push(RequestAuthentication::clone(r)),
            Converted::Telemetry(t) => parts.telemetry.push(policy::Telemetry::clone(t)),
            Converted::MeshTracing(m) => parts.mesh_tracing = policy::MeshTracing::clone(m),
        }
    }
    let mut known: HashSet<IpAddr> = parts.workloads.iter().map(|w| w.ip).collect();
    let Parts { services, workloads, .. } = &mut parts;
    for e in services.iter().flat_map(|s| &s.endpoints) {
        let (Some(identity), Some(node_ip)) = (e.identity.as_deref(), e.node_address) else { continue };
        let Some((namespace, service_account)) = ns_sa(identity) else { continue };
        if !e.meshed || !known.insert(e.address) {
            continue;
        }
        workloads.push(Arc::new(Workload {
            name: e.address.to_string().into(),
            namespace: shared.name(&namespace),
            service_account: shared.name(&service_account),
            workload_name: None,
            ip: e.address,
            node: e.node.clone(),
            node_ip,
            labels: shared.labels(&BTreeMap::new()),
            protocol: Protocol::Hbone,
            locality: e.locality.as_deref().map(|l| shared.name(l)),
        }));
    }
    parts
}

/// Converts a complete set of resources into a snapshot (the saved last config, tests).
pub fn snapshot(resources: impl IntoIterator<Item = pb::Resource>, node: &str, own_address: IpAddr) -> Result<Snapshot, Error> {
    let mut shared = Shared::default();
    let converted = resources.into_iter().map(|r| resource(&r, node, own_address, &mut shared)).collect::<Result<Vec<_>, Error>>()?;
    let parts = parts(&converted, &mut shared);
    drop(converted);
    Ok(Snapshot::from(parts))
}

/// One copy of each name and label set the workloads and Service endpoints repeat: the pods of
/// a Deployment share a namespace, a service account, an identity, a node's name and (per
/// ReplicaSet) their labels. A copy per pod
/// was most of a node's memory at 100,000 workloads. Kept across updates by the store, and
/// pruned of what no workload holds any more.
#[derive(Default)]
pub struct Shared {
    names: Interner<str>,
    labels: Interner<BTreeMap<String, String>>,
}

impl Shared {
    fn name(&mut self, name: &str) -> Arc<str> {
        self.names.get(name, |n| Arc::from(n))
    }

    fn labels(&mut self, labels: &BTreeMap<String, String>) -> Arc<BTreeMap<String, String>> {
        self.labels.get(labels, |l| Arc::new(l.clone()))
    }

    /// Forgets what only this holds.
    pub fn prune(&mut self) {
        self.names.prune();
        self.labels.prune();
    }
}

fn workloads(w: &pb::Workload, node: &str, own_address: IpAddr, shared: &mut Shared) -> Result<Vec<Arc<Workload>>, Error> {
    let known = if w.node_address.is_empty() { None } else { Some(ip(&w.node_address, &w.uid)?) };
    let labels = shared.labels(&w.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
    let name: Arc<str> = Arc::from(w.name.as_str());
    let mut all = Vec::with_capacity(w.addresses.len());
    for a in &w.addresses {
        let addr = ip(a, &format!("workload {}", w.uid))?;
        // Without a node address: our own for local workloads; for another node's, the pod's
        // address, where that node's policy routing brings HBONE to its daemon (never ours).
        let node_ip = known.unwrap_or(if w.node == node { own_address } else { addr });
        all.push(Arc::new(Workload {
            name: name.clone(),
            namespace: shared.name(&w.namespace),
            service_account: shared.name(&w.service_account),
            workload_name: None,
            ip: addr,
            node: shared.name(&w.node),
            node_ip,
            labels: labels.clone(),
            protocol: if w.meshed { Protocol::Hbone } else { Protocol::Tcp },
            locality: (!w.locality.is_empty()).then(|| shared.name(&w.locality)),
        }));
    }
    Ok(all)
}

fn service(s: &pb::Service, shared: &mut Shared) -> Result<Service, Error> {
    let what = format!("service {}/{}", s.namespace, s.name);
    let mut ports = Vec::new();
    for p in &s.ports {
        let protocol = match pb::Protocol::try_from(p.protocol) {
            Ok(pb::Protocol::Tcp | pb::Protocol::Unspecified) => ServiceProtocol::Tcp,
            Ok(pb::Protocol::Udp) => ServiceProtocol::Udp,
            // SCTP is not balanced by this datapath: skip the port, keep the Service.
            _ => continue,
        };
        ports.push(ServicePort {
            name: p.name.clone(),
            port: port(p.port, &what)?,
            protocol,
            target_port: port(p.target_port, &what)?,
            app_protocol: (!p.app_protocol.is_empty()).then(|| p.app_protocol.clone()),
        });
    }
    // Sized exactly: collecting through `Result` grows the list by doubling (16 slots for 10
    // endpoints), and the State keeps it until the next update.
    let mut endpoints = Vec::with_capacity(s.endpoints.len());
    for e in &s.endpoints {
        endpoints.push(Endpoint {
            address: ip(&e.address, &what)?,
            ports: e.ports.iter().map(|(k, v)| Ok((port(*k, &what)?, port(*v, &what)?))).collect::<Result<_, Error>>()?,
            healthy: e.healthy,
            node: shared.name(&e.node),
            node_address: if e.node_address.is_empty() { None } else { Some(ip(&e.node_address, &what)?) },
            meshed: e.meshed,
            identity: (!e.identity.is_empty()).then(|| shared.name(&e.identity)),
            subsets: e.subsets.clone(),
            locality: (!e.locality.is_empty()).then(|| e.locality.clone()),
        });
    }
    let vips = s.vips.iter().map(|v| ip(v, &what)).collect::<Result<_, _>>()?;
    Ok(Service { name: s.name.clone(), namespace: s.namespace.clone(), vips, ports, endpoints })
}

fn nets(blocks: &[String], what: &str) -> Result<Vec<IpNet>, Error> {
    blocks
        .iter()
        .map(|b| b.parse::<IpNet>().or_else(|_| ip(b, what).map(IpNet::from)).map_err(|_| invalid(format!("{what}: bad IP block {b:?}"))))
        .collect()
}

fn policy(p: &pb::AuthorizationPolicy) -> Result<Policy, Error> {
    let what = format!("AuthorizationPolicy {}/{}", p.namespace, p.name);
    let action = match pb::Action::try_from(p.action) {
        Ok(pb::Action::Allow) => Action::Allow,
        Ok(pb::Action::Deny) => Action::Deny,
        Ok(pb::Action::Audit) => Action::Audit,
        _ => return Err(invalid(format!("{what}: unknown action {}", p.action))),
    };
    let mut rules = Vec::new();
    for r in &p.rules {
        let from = r
            .from
            .iter()
            .map(|s| {
                Ok(Source {
                    principals: s.principals.clone(),
                    not_principals: s.not_principals.clone(),
                    namespaces: s.namespaces.clone(),
                    not_namespaces: s.not_namespaces.clone(),
                    ip_blocks: nets(&s.ip_blocks, &what)?,
                    not_ip_blocks: nets(&s.not_ip_blocks, &what)?,
                    request_principals: s.request_principals.clone(),
                    not_request_principals: s.not_request_principals.clone(),
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let to = r
            .to
            .iter()
            .map(|o| {
                Ok(Destination {
                    ports: o.ports.iter().map(|p| port(*p, &what)).collect::<Result<_, _>>()?,
                    not_ports: o.not_ports.iter().map(|p| port(*p, &what)).collect::<Result<_, _>>()?,
                    methods: o.methods.clone(),
                    not_methods: o.not_methods.clone(),
                    paths: o.paths.clone(),
                    not_paths: o.not_paths.clone(),
                    hosts: o.hosts.clone(),
                    not_hosts: o.not_hosts.clone(),
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let when = r.when.iter().map(|c| Condition { key: c.key.clone(), values: c.values.clone(), not_values: c.not_values.clone() }).collect();
        rules.push(Rule { from, to, when });
    }
    let selector = (!p.selector.is_empty()).then(|| p.selector.clone().into_iter().collect());
    Ok(Policy { name: p.name.clone(), namespace: p.namespace.clone(), selector, action, dry_run: p.dry_run, rules })
}

fn peer_authentication(p: &pb::PeerAuthentication) -> Result<Option<PeerAuthentication>, Error> {
    let mode = match pb::MtlsMode::try_from(p.mode) {
        Ok(pb::MtlsMode::Strict) => Mode::Strict,
        Ok(pb::MtlsMode::Permissive) => Mode::Permissive,
        Ok(pb::MtlsMode::Disable) => Mode::Disable,
        Ok(pb::MtlsMode::Unset) => return Ok(None),
        Err(_) => return Err(invalid(format!("PeerAuthentication {}/{}: unknown mode {}", p.namespace, p.name, p.mode))),
    };
    let selector = (!p.selector.is_empty()).then(|| p.selector.clone().into_iter().collect());
    Ok(Some(PeerAuthentication { name: p.name.clone(), namespace: p.namespace.clone(), selector, mode }))
}

fn request_authentication(r: &pb::RequestAuthentication) -> Result<RequestAuthentication, Error> {
    use mesh_l7::jwt::{ClaimToHeader, HeaderLocation, Jwks, KeySet, Provider};
    let what = format!("RequestAuthentication {}/{}", r.namespace, r.name);
    let header = |name: &str| http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| invalid(format!("{what}: {name:?} is not a header name")));
    let providers = r
        .jwt_rules
        .iter()
        .map(|j| {
            let jwks = match (j.jwks_uri.is_empty(), j.jwks.is_empty()) {
                (false, true) => Jwks::Uri(j.jwks_uri.clone()),
                (true, false) => Jwks::Inline(Arc::new(KeySet::parse(&j.jwks).map_err(|e| invalid(format!("{what}: issuer {}: {e}", j.issuer)))?)),
                _ => return Err(invalid(format!("{what}: issuer {}: exactly one of jwks_uri and jwks", j.issuer))),
            };
            Ok(Provider {
                issuer: j.issuer.clone(),
                audiences: j.audiences.clone(),
                from_headers: j.from_headers.iter().map(|h| Ok(HeaderLocation { name: header(&h.name)?, prefix: h.prefix.clone() })).collect::<Result<_, Error>>()?,
                from_params: j.from_params.clone(),
                from_cookies: j.from_cookies.clone(),
                forward_original_token: j.forward_original_token,
                output_payload_to_header: (!j.output_payload_to_header.is_empty()).then(|| header(&j.output_payload_to_header)).transpose()?,
                output_claim_to_headers: j.output_claim_to_headers.iter().map(|c| Ok(ClaimToHeader { header: header(&c.header)?, claim: c.claim.clone() })).collect::<Result<_, Error>>()?,
                jwks,
            })
        })
        .collect::<Result<Vec<_>, Error>>()?;
    let selector = (!r.selector.is_empty()).then(|| r.selector.clone().into_iter().collect());
    Ok(RequestAuthentication { name: r.name.clone(), namespace: r.namespace.clone(), selector, providers: providers.into() })
}

fn telemetry(t: &pb::Telemetry) -> policy::Telemetry {
    let tag = |s: &pb::TagSource| (s.name.clone(), s.default_value.clone());
    policy::Telemetry {
        name: t.name.clone(),
        namespace: t.namespace.clone(),
        selector: (!t.selector.is_empty()).then(|| t.selector.clone().into_iter().collect()),
        tracing: t
            .tracing
            .iter()
            .map(|r| policy::TracingRule {
                mode: match r.mode() {
                    pb::TracingMode::ClientAndServer => policy::Mode::ClientAndServer,
                    pb::TracingMode::Client => policy::Mode::Client,
                    pb::TracingMode::Server => policy::Mode::Server,
                },
                provider: r.provider.clone(),
                sampling_percent: r.sampling_ppm.map(|ppm| f64::from(ppm) / 10_000.0),
                disable_span_reporting: r.disable_span_reporting,
                custom_tags: r
                    .custom_tags
                    .iter()
                    .filter_map(|(k, v)| {
                        let source = match v.source.as_ref()? {
                            pb::custom_tag::Source::Literal(l) => policy::TagSource::Literal(l.clone()),
                            pb::custom_tag::Source::Environment(e) => {
                                let (name, default) = tag(e);
                                policy::TagSource::Environment { name, default }
                            }
                            pb::custom_tag::Source::Header(h) => {
                                let (name, default) = tag(h);
                                policy::TagSource::Header { name, default }
                            }
                        };
                        Some((k.clone(), source))
                    })
                    .collect(),
            })
            .collect(),
        access_log_disabled: t.access_log_disabled,
    }
}

fn mesh_tracing(m: &pb::MeshConfig) -> Result<policy::MeshTracing, Error> {
    let providers = m
        .tracing_providers
        .iter()
        .map(|p| {
            let what = format!("tracing provider {}", p.name);
            let protocol = match &p.protocol {
                Some(pb::tracing_provider::Protocol::ZipkinPath(path)) => policy::Protocol::Zipkin { path: path.clone() },
                Some(pb::tracing_provider::Protocol::Opentelemetry(_)) => policy::Protocol::OpenTelemetry,
                None => return Err(invalid(format!("{what}: no protocol"))),
            };
            let provider = policy::Provider { name: p.name.clone(), service: p.service.clone(), port: port(p.port, &what)?, max_tag_length: p.max_tag_length, protocol };
            Ok((p.name.clone(), provider))
        })
        .collect::<Result<_, Error>>()?;
    Ok(policy::MeshTracing { providers, default_provider: (!m.default_tracing_provider.is_empty()).then(|| m.default_tracing_provider.clone()) })
}

/// An unspecified address, for callers that do not know their own (tests).
pub const UNKNOWN_ADDRESS: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(name: &str, node: &str, address: &str, node_address: &str) -> pb::Resource {
        pb::Resource {
            kind: Some(pb::resource::Kind::Workload(pb::Workload {
                uid: format!("demo/{name}"),
                name: name.into(),
                namespace: "demo".into(),
                service_account: "sa".into(),
                node: node.into(),
                addresses: vec![address.into()],
                meshed: true,
                healthy: true,
                node_address: node_address.into(),
                ..pb::Workload::default()
            })),
        }
    }

    #[test]
    fn a_missing_node_address_is_ours_only_for_our_workloads() {
        let own: IpAddr = "198.18.0.1".parse().expect("ip");
        let resources = [
            workload("local", "n1", "198.18.1.11", ""),
            workload("remote", "n2", "198.18.2.11", ""),
            workload("known", "n2", "198.18.2.12", "198.18.0.2"),
        ];
        let snap = snapshot(resources, "n1", own).expect("snapshot");
        let node_ip = |name: &str| snap.workloads.iter().find(|w| *w.name == *name).expect(name).node_ip.to_string();
        assert_eq!(node_ip("local"), "198.18.0.1");
        assert_eq!(node_ip("remote"), "198.18.2.11", "never this node's address for another node's pod");
        assert_eq!(node_ip("known"), "198.18.0.2");
    }
}
