//! Per-node views (sans-IO): what one node receives, as proto resources keyed for diffing.
//!
//! A node gets its own workloads (meshed or not: it must know which ones to capture), every
//! meshed workload of other nodes (address, identity, labels: the destination side attributes
//! inbound HBONE to its source workload in metrics, and trusts a `forwarded` client address only
//! when it belongs to the authenticated identity; ztunnel's workload set is the same), every
//! Service with its endpoints (each endpoint says whether it is meshed, its node and identity),
//! the policies that apply to at least one of its meshed workloads, with those workloads' uids
//! precomputed, and every route table (with each endpoint's DestinationRule subsets).
//!
//! What every node receives alike is built once per state and shared by the views (`shared`).
//!
//! This module is the proto boundary of the controller: domain types in, `mesh_proto` out.

use std::sync::Arc;

use mesh_proto::config::v1 as pb;

use crate::{
    model::{self, Action, Inventory, MtlsMode, Protocol, Scope, Workload},
    routing::Routes,
    validate::Policies,
};

mod routes;
mod shared;

pub use shared::{Cache, Key, Outgoing, Parts, Resources, View, diff, reuse, split};

/// Everything the controller knows, after validation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct State {
    pub inventory: Inventory,
    pub policies: Policies,
    pub routes: Routes,
}

/// What every node receives alike, from `state`: the meshed workloads of the whole mesh, the
/// Services with their endpoints, every route table (a client on any node may call the Service)
/// and the mesh config. Shared by every node's view ([`node_view_with`]).
pub fn common(state: &State, trust_domain: &str) -> Resources {
    let inv = &state.inventory;
    let mut out = Resources::new();
    for w in inv.workloads.values().filter(|w| w.meshed) {
        insert(&mut out, pb::resource::Kind::Workload(workload(w, inv, trust_domain)));
    }
    for s in inv.services.values() {
        let subsets = state.routes.subsets.get(&s.key()).map_or(&[][..], Vec::as_slice);
        insert(&mut out, pb::resource::Kind::Service(service(s, subsets, inv, trust_domain)));
    }
    for t in state.routes.tables.values() {
        insert(&mut out, pb::resource::Kind::RouteTable(routes::route_table(t)));
    }
    let mesh = &state.policies.mesh_config;
    if !mesh.tracing_providers.is_empty() {
        insert(&mut out, pb::resource::Kind::MeshConfig(mesh_config(mesh)));
    }
    out
}

/// `node`'s view, on its own (tests, tools); the server shares the common part between nodes.
pub fn node_view(state: &State, node: &str, trust_domain: &str) -> View {
    node_view_with(Arc::new(common(state, trust_domain)), state, node, trust_domain)
}

/// `node`'s view: `common` (built from the same `state` by [`common`]) and the node's own
/// resources: its unmeshed workloads (it must know which ones not to capture) and the policies
/// that apply to at least one of its meshed workloads, with those workloads' uids.
pub fn node_view_with(common: Arc<Resources>, state: &State, node: &str, trust_domain: &str) -> View {
    let inv = &state.inventory;
    let mut own = Resources::new();
    let local: Vec<&Workload> = inv.workloads.values().filter(|w| w.node == node).collect();
    for w in local.iter().filter(|w| !w.meshed) {
        insert(&mut own, pb::resource::Kind::Workload(workload(w, inv, trust_domain)));
    }
    let applied = |scope, ns: &str, sel| -> Vec<String> {
        local.iter().filter(|w| w.meshed && model::applies_to(scope, ns, sel, w)).map(|w| w.uid.clone()).collect()
    };
    for p in state.policies.authorization.values() {
        let uids = applied(p.scope, &p.namespace, &p.selector);
        if !uids.is_empty() {
            insert(&mut own, pb::resource::Kind::AuthorizationPolicy(authorization_policy(p, uids)));
        }
    }
    for p in state.policies.peer_authentication.values() {
        let uids = applied(p.scope, &p.namespace, &p.selector);
        if !uids.is_empty() {
            insert(&mut own, pb::resource::Kind::PeerAuthentication(peer_authentication(p, uids)));
        }
    }
    for p in state.policies.request_authentication.values() {
        let uids = applied(p.scope, &p.namespace, &p.selector);
        if !uids.is_empty() {
            insert(&mut own, pb::resource::Kind::RequestAuthentication(request_authentication(p, uids)));
        }
    }
    for t in state.policies.telemetry.values() {
        let uids = applied(t.scope, &t.namespace, &t.selector);
        if !uids.is_empty() {
            insert(&mut own, pb::resource::Kind::Telemetry(telemetry(t, uids)));
        }
    }
    View::new(common, own)
}

fn telemetry(t: &model::Telemetry, workload_uids: Vec<String>) -> pb::Telemetry {
    let source = |name: &str, default: &Option<String>| pb::TagSource { name: name.to_owned(), default_value: default.clone() };
    pb::Telemetry {
        name: t.name.clone(),
        namespace: t.namespace.clone(),
        scope: scope(t.scope),
        selector: t.selector.clone().into_iter().collect(),
        tracing: t
            .tracing
            .iter()
            .map(|r| pb::TracingRule {
                mode: match r.mode {
                    model::TracingMode::ClientAndServer => pb::TracingMode::ClientAndServer,
                    model::TracingMode::Client => pb::TracingMode::Client,
                    model::TracingMode::Server => pb::TracingMode::Server,
                }
                .into(),
                provider: r.provider.clone(),
                sampling_ppm: r.sampling_ppm,
                disable_span_reporting: r.disable_span_reporting,
                custom_tags: r
                    .custom_tags
                    .iter()
                    .map(|(k, v)| {
                        let source = match v {
                            model::CustomTag::Literal(l) => pb::custom_tag::Source::Literal(l.clone()),
                            model::CustomTag::Environment { name, default } => pb::custom_tag::Source::Environment(source(name, default)),
                            model::CustomTag::Header { name, default } => pb::custom_tag::Source::Header(source(name, default)),
                        };
                        (k.clone(), pb::CustomTag { source: Some(source) })
                    })
                    .collect(),
            })
            .collect(),
        access_log_disabled: t.access_log_disabled,
        workload_uids,
    }
}

fn mesh_config(m: &model::MeshConfig) -> pb::MeshConfig {
    pb::MeshConfig {
        tracing_providers: m
            .tracing_providers
            .iter()
            .map(|(name, p)| pb::TracingProvider {
                name: name.clone(),
                service: p.service.clone(),
                port: u32::from(p.port),
                max_tag_length: p.max_tag_length,
                protocol: Some(match &p.protocol {
                    model::TraceProtocol::Zipkin { path } => pb::tracing_provider::Protocol::ZipkinPath(path.clone()),
                    model::TraceProtocol::OpenTelemetry => pb::tracing_provider::Protocol::Opentelemetry(true),
                }),
            })
            .collect(),
        default_tracing_provider: m.default_tracing_provider.clone().unwrap_or_default(),
    }
}

fn insert(resources: &mut Resources, kind: pb::resource::Kind) {
    let key = key_of(&kind);
    resources.insert((key.kind, key.key), Arc::new(pb::Resource { kind: Some(kind) }));
}

/// The key of a resource (the protocol's rule, shared with the nodes).
pub fn key_of(kind: &pb::resource::Kind) -> pb::ResourceKey {
    mesh_proto::resource_key(kind)
}

/// Largest config message the controller sends: a quarter of gRPC's default 4 MiB receive
/// limit, so a node with default limits takes any part.
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;

fn node_address(inv: &Inventory, node: &str) -> String {
    inv.nodes.get(node).copied().flatten().map(|a| a.to_string()).unwrap_or_default()
}

fn workload(w: &Workload, inv: &Inventory, trust_domain: &str) -> pb::Workload {
    pb::Workload {
        uid: w.uid.clone(),
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        service_account: w.service_account.clone(),
        node: w.node.clone(),
        addresses: w.addresses.iter().map(ToString::to_string).collect(),
        labels: w.labels.clone().into_iter().collect(),
        meshed: w.meshed,
        healthy: w.healthy,
        identity: w.identity(trust_domain),
        node_address: node_address(inv, &w.node),
        locality: inv.localities.get(&w.node).cloned().unwrap_or_default(),
    }
}

/// `subsets`: the Service's DestinationRule subsets; an endpoint belongs to those whose labels its
/// workload has.
fn service(s: &model::Service, subsets: &[(String, model::Labels)], inv: &Inventory, trust_domain: &str) -> pb::Service {
    let protocol = |p: Protocol| match p {
        Protocol::Tcp => pb::Protocol::Tcp,
        Protocol::Udp => pb::Protocol::Udp,
        Protocol::Sctp => pb::Protocol::Sctp,
    };
    pb::Service {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        vips: s.vips.iter().map(ToString::to_string).collect(),
        ports: s
            .ports
            .iter()
            .map(|p| pb::ServicePort {
                name: p.name.clone(),
                port: p.port.into(),
                protocol: protocol(p.protocol).into(),
                target_port: p.target_port.into(),
                app_protocol: p.app_protocol.clone().unwrap_or_default(),
            })
            .collect(),
        endpoints: s
            .endpoints
            .iter()
            .map(|e| {
                let w = e.workload_uid.as_ref().and_then(|uid| inv.workloads.get(uid));
                pb::Endpoint {
                    workload_uid: e.workload_uid.clone().unwrap_or_default(),
                    address: e.address.to_string(),
                    ports: e.ports.iter().map(|(k, v)| (u32::from(*k), u32::from(*v))).collect(),
                    healthy: e.healthy,
                    node: w.map(|w| w.node.clone()).unwrap_or_default(),
                    meshed: w.is_some_and(|w| w.meshed),
                    identity: w.filter(|w| w.meshed).map(|w| w.identity(trust_domain)).unwrap_or_default(),
                    node_address: w.map(|w| node_address(inv, &w.node)).unwrap_or_default(),
                    locality: w.and_then(|w| inv.localities.get(&w.node)).cloned().unwrap_or_default(),
                    subsets: w
                        .map(|w| subsets.iter().filter(|(_, l)| l.iter().all(|(k, v)| w.labels.get(k) == Some(v))).map(|(n, _)| n.clone()).collect())
                        .unwrap_or_default(),
                }
            })
            .collect(),
    }
}

fn scope(s: Scope) -> i32 {
    match s {
        Scope::Mesh => pb::Scope::Mesh,
        Scope::Namespace => pb::Scope::Namespace,
        Scope::Workload => pb::Scope::Workload,
    }
    .into()
}

fn mode(m: MtlsMode) -> i32 {
    match m {
        MtlsMode::Unset => pb::MtlsMode::Unset,
        MtlsMode::Strict => pb::MtlsMode::Strict,
        MtlsMode::Permissive => pb::MtlsMode::Permissive,
        MtlsMode::Disable => pb::MtlsMode::Disable,
    }
    .into()
}

fn authorization_policy(p: &model::AuthorizationPolicy, workload_uids: Vec<String>) -> pb::AuthorizationPolicy {
    let action = match p.action {
        Action::Allow => pb::Action::Allow,
        Action::Deny => pb::Action::Deny,
        Action::Audit => pb::Action::Audit,
    };
    let ports = |v: &[u16]| v.iter().map(|p| u32::from(*p)).collect();
    let blocks = |v: &[ipnet::IpNet]| v.iter().map(ToString::to_string).collect();
    pb::AuthorizationPolicy {
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        scope: scope(p.scope),
        selector: p.selector.clone().into_iter().collect(),
        action: action.into(),
        dry_run: p.dry_run,
        rules: p
            .rules
            .iter()
            .map(|r| pb::Rule {
                from: r
                    .from
                    .iter()
                    .map(|s| pb::Source {
                        principals: s.principals.clone(),
                        not_principals: s.not_principals.clone(),
                        namespaces: s.namespaces.clone(),
                        not_namespaces: s.not_namespaces.clone(),
                        ip_blocks: blocks(&s.ip_blocks),
                        not_ip_blocks: blocks(&s.not_ip_blocks),
                        request_principals: s.request_principals.clone(),
                        not_request_principals: s.not_request_principals.clone(),
                    })
                    .collect(),
                to: r
                    .to
                    .iter()
                    .map(|o| pb::Operation {
                        ports: ports(&o.ports),
                        not_ports: ports(&o.not_ports),
                        methods: o.methods.clone(),
                        not_methods: o.not_methods.clone(),
                        paths: o.paths.clone(),
                        not_paths: o.not_paths.clone(),
                        hosts: o.hosts.clone(),
                        not_hosts: o.not_hosts.clone(),
                    })
                    .collect(),
                when: r
                    .when
                    .iter()
                    .map(|c| pb::Condition { key: c.key.clone(), values: c.values.clone(), not_values: c.not_values.clone() })
                    .collect(),
            })
            .collect(),
        workload_uids,
    }
}

fn peer_authentication(p: &model::PeerAuthentication, workload_uids: Vec<String>) -> pb::PeerAuthentication {
    pb::PeerAuthentication {
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        scope: scope(p.scope),
        selector: p.selector.clone().into_iter().collect(),
        mode: mode(p.mode),
        port_level_mtls: p.port_level.iter().map(|(k, v)| (u32::from(*k), mode(*v))).collect(),
        workload_uids,
    }
}

fn request_authentication(p: &model::RequestAuthentication, workload_uids: Vec<String>) -> pb::RequestAuthentication {
    pb::RequestAuthentication {
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        scope: scope(p.scope),
        selector: p.selector.clone().into_iter().collect(),
        jwt_rules: p
            .rules
            .iter()
            .map(|r| {
                let (jwks_uri, jwks) = match &r.jwks {
                    model::Jwks::Uri(u) => (u.clone(), String::new()),
                    model::Jwks::Inline(set) => (String::new(), set.clone()),
                };
                pb::JwtRule {
                    issuer: r.issuer.clone(),
                    audiences: r.audiences.clone(),
                    jwks_uri,
                    jwks,
                    from_headers: r.from_headers.iter().map(|(name, prefix)| pb::JwtHeader { name: name.clone(), prefix: prefix.clone() }).collect(),
                    from_params: r.from_params.clone(),
                    from_cookies: r.from_cookies.clone(),
                    forward_original_token: r.forward_original_token,
                    output_payload_to_header: r.output_payload_to_header.clone().unwrap_or_default(),
                    output_claim_to_headers: r.output_claim_to_headers.iter().map(|(header, claim)| pb::ClaimToHeader { header: header.clone(), claim: claim.clone() }).collect(),
                }
            })
            .collect(),
        workload_uids,
    }
}

#[cfg(test)]
#[path = "view_tests.rs"]
mod tests;
