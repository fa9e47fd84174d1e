//! State → kernel desired state. Pure: no I/O, so every branch has a unit test.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use crate::{
    authz::{self, Action, Mode, Policy},
    balance,
    datapath::{BackendSpec, DenyRule, EndpointSpec, PodSpec, Protocol, ServiceSpec},
    state::{Protocol as WorkloadProtocol, Service, ServiceProtocol, State, Workload},
};

/// What the kernel should hold.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub services: Vec<ServiceSpec>,
    pub pods: Vec<PodSpec>,
    pub endpoints: Vec<EndpointSpec>,
    pub deny: Vec<DenyRule>,
}

/// Kernel identity ids: 1-based positions of the SPIFFE ids in sorted order (0 = unknown). They
/// only need to agree within one node's maps, and the whole set is rewritten by diff.
struct Ids(BTreeMap<String, u32>);

impl Ids {
    fn of(&self, identity: &str) -> u32 {
        self.0.get(identity).copied().unwrap_or(0)
    }
}

/// Addresses a Service's endpoints are ejected at (outlier detection), by the Service.
pub type Ejected<'a> = &'a dyn Fn(&Service) -> Option<Arc<HashSet<IpAddr>>>;

/// This node's pod cgroups and their addresses, as discovered at a rescan.
pub type Cgroups = BTreeMap<PathBuf, Vec<IpAddr>>;

pub fn translate(state: &State, node: &str, cgroups: &Cgroups) -> Desired {
    translate_with(state, node, cgroups, &|_| None)
}

/// [`translate`], leaving ejected endpoints out of the Services' tables (they stay endpoints:
/// a client already connected keeps its connection).
/// The SPIFFE ids the kernel tables number, in id order: id `n` is `identities(state)[n - 1]`.
pub fn identities(state: &State) -> Vec<String> {
    let mut all: BTreeSet<String> = state.workloads.values().map(|w| state.identity(w).to_string()).collect();
    for s in &state.services {
        all.extend(s.endpoints.iter().filter_map(|e| e.identity.as_deref().map(str::to_owned)));
    }
    all.into_iter().collect()
}

pub fn translate_with(state: &State, node: &str, cgroups: &Cgroups, ejected: Ejected<'_>) -> Desired {
    let identity_of = |w: &Workload| state.identity(w).to_string();
    let ids = Ids(identities(state).into_iter().zip(1..).collect());
    let local: Vec<&Workload> = state.workloads.values().filter(|w| *w.node == *node).collect();

    // This node's pods: every cgroup whose network namespace holds a local workload's address.
    let mut pods = Vec::new();
    for (cgroup, addrs) in cgroups {
        if let Some(w) = local.iter().find(|w| addrs.contains(&w.ip)) {
            pods.push(PodSpec {
                name: format!("{}/{}", w.namespace, w.name),
                cgroup: cgroup.clone(),
                addr: w.ip,
                identity: ids.of(&identity_of(w)),
                meshed: w.protocol == WorkloadProtocol::Hbone,
            });
        }
    }

    // Endpoints: local workloads (with STRICT), then every Service endpoint not already listed.
    let mut endpoints: BTreeMap<IpAddr, EndpointSpec> = BTreeMap::new();
    for w in &local {
        let meshed = w.protocol == WorkloadProtocol::Hbone;
        let strict = meshed && authz::mode_for(&state.peer_authentications, &state.root_namespace, w) == Mode::Strict;
        endpoints.insert(w.ip, EndpointSpec { addr: w.ip, identity: ids.of(&identity_of(w)), meshed, strict, local: true });
    }
    for s in &state.services {
        for e in &s.endpoints {
            endpoints.entry(e.address).or_insert(EndpointSpec {
                addr: e.address,
                identity: e.identity.as_deref().map_or(0, |i| ids.of(i)),
                meshed: e.meshed,
                strict: false,
                local: *e.node == *node,
            });
        }
    }

    Desired {
        services: services(state, ejected),
        pods,
        endpoints: endpoints.into_values().collect(),
        deny: deny_rules(state, &ids),
    }
}

fn services(state: &State, ejected: Ejected<'_>) -> Vec<ServiceSpec> {
    let mut out = Vec::new();
    for s in &state.services {
        let out_now = ejected(s);
        let policy = state.traffic_policy(&s.namespace, &s.name, None).map(|p| &**p);
        for vip in &s.vips {
            for port in &s.ports {
                // The same candidates, weights, ejections and algorithm the daemon's picks use.
                let spec = |ejected: Option<&HashSet<IpAddr>>| -> Vec<BackendSpec> {
                    balance::candidates(s, port, vip.is_ipv4(), None)
                        .map(|c| BackendSpec {
                            addr: c.addr.ip(),
                            port: c.addr.port(),
                            weight: c.weight,
                            healthy: c.endpoint.healthy && !ejected.is_some_and(|o| o.contains(&c.addr.ip())),
                        })
                        .collect()
                };
                let mut backends = spec(out_now.as_deref());
                // Ejections never leave a Service with nothing (the daemon's panic rule).
                if out_now.is_some() && !backends.iter().any(|b| b.healthy) {
                    backends = spec(None);
                }
                let protocol = match port.protocol {
                    ServiceProtocol::Tcp => Protocol::Tcp,
                    ServiceProtocol::Udp => Protocol::Udp,
                };
                out.push(ServiceSpec { vip: *vip, port: port.port, protocol, backends, lb: balance::algorithm(s, port, policy), affinity: None::<Duration> });
            }
        }
    }
    out
}

/// The kernel enforces the simplest and most common deny: a non-dry-run DENY rule whose sources
/// are exact principals only and whose operations are ports only. Everything else (wildcards,
/// namespaces, IP blocks, negations, L7, request principals) is left to the daemon, which
/// enforces every rule.
///
/// The kernel checks an entry at the source's `connect()` by the destination endpoint's
/// identity, so an entry for identity D refuses connections to every endpoint with identity D,
/// on any node. A policy therefore compiles to entries only for the identities whose every
/// endpoint it selects: a ServiceAccount shared with workloads the selector leaves out, an
/// unmeshed workload (no daemon authorizes it, so nothing denies it) or an endpoint whose
/// labels the node does not know keep that identity with the daemon.
fn deny_rules(state: &State, ids: &Ids) -> Vec<DenyRule> {
    let identity_of = |w: &Workload| state.identity(w).to_string();
    let unlabeled: BTreeSet<&str> = state
        .services
        .iter()
        .flat_map(|s| &s.endpoints)
        .filter(|e| state.workload(e.address).map(identity_of).as_deref() != e.identity.as_deref())
        .filter_map(|e| e.identity.as_deref())
        .collect();
    let mut out = BTreeSet::new();
    for p in state.policies.iter().filter(|p| p.action == Action::Deny && !p.dry_run) {
        let (mut selected, mut left_out) = (BTreeSet::new(), BTreeSet::new());
        for w in state.workloads.values() {
            let whole = w.protocol == WorkloadProtocol::Hbone && authz::applies(p, &state.root_namespace, w);
            if whole { &mut selected } else { &mut left_out }.insert(identity_of(w));
        }
        let targets: Vec<u32> = selected
            .difference(&left_out)
            .filter(|id| !unlabeled.contains(id.as_str()))
            .map(|id| ids.of(id))
            .filter(|&id| id != 0)
            .collect();
        for (principals, ports) in kernel_expressible(p) {
            for principal in &principals {
                let src = ids.of(&format!("spiffe://{principal}"));
                if src == 0 {
                    continue; // an identity the node has never heard of cannot connect from here
                }
                for &dst in &targets {
                    for &port in &ports {
                        out.insert(DenyRule { src_identity: src, dst_identity: dst, port, protocol: Protocol::Tcp });
                    }
                }
            }
        }
    }
    out.into_iter().collect()
}

/// (exact principals, ports — 0 meaning any) of each rule the kernel can express.
fn kernel_expressible(p: &Policy) -> Vec<(Vec<String>, Vec<u16>)> {
    let mut out = Vec::new();
    for rule in &p.rules {
        let sources_ok = !rule.from.is_empty()
            && rule.from.iter().all(|s| {
                !s.principals.is_empty()
                    && s.principals.iter().all(|pr| !pr.contains('*'))
                    && s.not_principals.is_empty()
                    && s.namespaces.is_empty()
                    && s.not_namespaces.is_empty()
                    && s.ip_blocks.is_empty()
                    && s.not_ip_blocks.is_empty()
                    // A JWT is per request: "deny X's requests that carry a token" must not
                    // become "refuse every connection from X".
                    && !s.needs_request()
            });
        // L7 fields and conditions are evaluated by the daemon per request (or fail closed there):
        // a kernel entry would deny every connection instead.
        let ops_ok = rule.to.iter().all(|d| d.not_ports.is_empty() && !d.has_l7()) && rule.when.is_empty();
        if !sources_ok || !ops_ok {
            continue;
        }
        let principals: Vec<String> = rule.from.iter().flat_map(|s| s.principals.clone()).collect();
        let ports: Vec<u16> = if rule.to.is_empty() || rule.to.iter().any(|d| d.ports.is_empty()) {
            vec![0]
        } else {
            rule.to.iter().flat_map(|d| d.ports.clone()).collect()
        };
        out.push((principals, ports));
    }
    out
}


#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        authz::{Destination, PeerAuthentication, Rule, Source},
        state::{Endpoint, Service, ServicePort, Snapshot},
    };

    fn workload(name: &str, node: &str, ip: [u8; 4], sa: &str, meshed: bool) -> Workload {
        Workload {
            name: name.into(),
            namespace: "demo".into(),
            service_account: sa.into(),
            workload_name: None,
            ip: IpAddr::from(ip),
            node: node.into(),
            node_ip: IpAddr::from([198, 18, 0, 1]),
            labels: BTreeMap::from([("app".to_owned(), name.to_owned())]).into(),
            protocol: if meshed { WorkloadProtocol::Hbone } else { WorkloadProtocol::Tcp },
            locality: None,
        }
    }

    fn state(policies: Vec<Policy>, pas: Vec<PeerAuthentication>) -> State {
        let snap = Snapshot {
            workloads: vec![
                workload("client", "n1", [198, 18, 1, 11], "client", true),
                workload("plain", "n1", [198, 18, 1, 12], "plain", false),
                workload("server", "n1", [198, 18, 1, 13], "server", true),
            ],
            policies,
            peer_authentications: pas,
            services: vec![Service {
                name: "whoami".into(),
                namespace: "demo".into(),
                vips: vec![IpAddr::from([198, 19, 0, 10])],
                ports: vec![ServicePort { name: String::new(), port: 80, protocol: ServiceProtocol::Tcp, target_port: 8080, app_protocol: None }],
                endpoints: vec![
                    Endpoint { address: IpAddr::from([198, 18, 2, 11]), ports: BTreeMap::new(), healthy: true, node: "n2".into(), node_address: None, meshed: true, identity: Some("spiffe://cluster.local/ns/demo/sa/whoami".into()), subsets: Vec::new(), locality: None },
                    Endpoint { address: IpAddr::from([198, 18, 2, 12]), ports: BTreeMap::from([(80, 9090)]), healthy: false, node: "n2".into(), node_address: None, meshed: true, identity: Some("spiffe://cluster.local/ns/demo/sa/whoami".into()), subsets: Vec::new(), locality: None },
                ],
            }],
            ..Snapshot::default()
        };
        State::build("cluster.local", "mesh-system", snap).expect("state")
    }

    fn deny(principals: &[&str], ports: &[u16]) -> Policy {
        Policy {
            name: "deny".into(),
            namespace: "demo".into(),
            selector: Some(BTreeMap::from([("app".to_owned(), "server".to_owned())])),
            action: Action::Deny,
            dry_run: false,
            rules: vec![Rule {
                from: vec![Source { principals: principals.iter().map(|p| (*p).to_owned()).collect(), ..Source::default() }],
                to: if ports.is_empty() { vec![] } else { vec![Destination { ports: ports.to_vec(), ..Destination::default() }] },
                when: vec![],
            }],
        }
    }

    fn cgroups() -> BTreeMap<PathBuf, Vec<IpAddr>> {
        BTreeMap::from([
            (PathBuf::from("/cg/pods/p1"), vec![IpAddr::from([198, 18, 1, 11])]),
            (PathBuf::from("/cg/pods/p2"), vec![IpAddr::from([198, 18, 1, 12])]),
            (PathBuf::from("/cg/system"), vec![IpAddr::from([198, 18, 0, 1])]),
        ])
    }

    #[test]
    fn services_become_one_spec_per_vip_and_port_with_endpoint_ports_and_health() {
        let d = translate(&state(vec![], vec![]), "n1", &cgroups());
        assert_eq!(d.services.len(), 1);
        let s = &d.services[0];
        assert_eq!((s.vip, s.port, s.protocol), (IpAddr::from([198, 19, 0, 10]), 80, Protocol::Tcp));
        assert_eq!(s.backends.iter().map(|b| (b.port, b.healthy)).collect::<Vec<_>>(), [(8080, true), (9090, false)]);
    }

    #[test]
    fn pods_are_the_cgroups_of_local_workloads_only() {
        let d = translate(&state(vec![], vec![]), "n1", &cgroups());
        let pods: Vec<(&str, bool)> = d.pods.iter().map(|p| (p.cgroup.to_str().unwrap(), p.meshed)).collect();
        assert_eq!(pods, [("/cg/pods/p1", true), ("/cg/pods/p2", false)], "the node's own cgroup is not a pod");
        assert!(d.pods.iter().all(|p| p.identity != 0));
    }

    #[test]
    fn endpoints_carry_identity_local_and_strict_flags() {
        let strict = PeerAuthentication { name: "strict".into(), namespace: "demo".into(), selector: None, mode: Mode::Strict };
        let d = translate(&state(vec![], vec![strict]), "n1", &cgroups());
        let by_ip = |ip: [u8; 4]| d.endpoints.iter().find(|e| e.addr == IpAddr::from(ip)).expect("endpoint");
        assert!(by_ip([198, 18, 1, 13]).strict && by_ip([198, 18, 1, 13]).local);
        assert!(!by_ip([198, 18, 1, 12]).strict, "STRICT applies to meshed workloads only");
        assert!(!by_ip([198, 18, 2, 11]).local && by_ip([198, 18, 2, 11]).identity != 0);
    }

    #[test]
    fn exact_principal_denies_compile_to_kernel_rules_and_others_do_not() {
        let d = translate(&state(vec![deny(&["cluster.local/ns/demo/sa/client"], &[8080])], vec![]), "n1", &cgroups());
        assert_eq!(d.deny.len(), 1);
        let r = d.deny[0];
        assert_eq!(r.port, 8080);
        let id = |ip: [u8; 4]| d.endpoints.iter().find(|e| e.addr == IpAddr::from(ip)).unwrap().identity;
        assert_eq!((r.src_identity, r.dst_identity), (id([198, 18, 1, 11]), id([198, 18, 1, 13])));

        let any_port = translate(&state(vec![deny(&["cluster.local/ns/demo/sa/client"], &[])], vec![]), "n1", &cgroups());
        assert_eq!(any_port.deny[0].port, 0);
        for not_kernel in [deny(&["cluster.local/ns/demo/sa/*"], &[]), deny(&["cluster.local/ns/demo/sa/nobody"], &[])] {
            assert!(translate(&state(vec![not_kernel], vec![]), "n1", &cgroups()).deny.is_empty());
        }
        let mut dry = deny(&["cluster.local/ns/demo/sa/client"], &[]);
        dry.dry_run = true;
        assert!(translate(&state(vec![dry], vec![]), "n1", &cgroups()).deny.is_empty(), "dry-run never enforces");
    }

    /// A kernel entry denies by identity: a policy selecting only some of the workloads of a
    /// ServiceAccount (or an unmeshed one) must not deny the others in the kernel.
    #[test]
    fn denies_reach_the_kernel_only_for_identities_the_policy_selects_whole() {
        let mut snap = state(vec![], vec![]).snapshot();
        // A second workload as `server`, with other labels, on another node.
        let mut twin = workload("twin", "n2", [198, 18, 2, 13], "server", true);
        twin.labels = BTreeMap::from([("app".to_owned(), "twin".to_owned())]).into();
        snap.workloads.push(twin);
        let build = |policies: Vec<Policy>, snap: &Snapshot| {
            let mut snap = snap.clone();
            snap.policies = policies;
            State::build("cluster.local", "mesh-system", snap).expect("state")
        };
        let only_server = deny(&["cluster.local/ns/demo/sa/client"], &[8080]);
        assert!(translate(&build(vec![only_server.clone()], &snap), "n1", &cgroups()).deny.is_empty(), "twin shares the identity and is not selected");
        let mut both = only_server;
        both.selector = None;
        assert_eq!(translate(&build(vec![both.clone()], &snap), "n1", &cgroups()).deny.len(), 2, "client and server: every meshed workload of both identities is selected; plain is unmeshed");
        let mut unmeshed = snap.clone();
        unmeshed.workloads.iter_mut().find(|w| &*w.name == "twin").expect("twin").protocol = WorkloadProtocol::Tcp;
        let d = translate(&build(vec![both], &unmeshed), "n1", &cgroups());
        let server_id = d.endpoints.iter().find(|e| e.addr == IpAddr::from([198, 18, 1, 13])).expect("server").identity;
        assert!(d.deny.iter().all(|r| r.dst_identity != server_id), "no daemon authorizes the unmeshed twin: nothing may deny it in the kernel");
    }

    /// "Deny the client's requests that carry a JWT" is per request: a kernel entry would refuse
    /// the client's token-less requests too, which the daemon allows.
    #[test]
    fn denies_that_need_a_request_stay_in_the_daemon() {
        for (request_principals, not_request_principals) in [(vec!["*".to_owned()], vec![]), (vec![], vec!["issuer/alice".to_owned()])] {
            let mut p = deny(&["cluster.local/ns/demo/sa/client"], &[8080]);
            p.rules[0].from[0].request_principals = request_principals;
            p.rules[0].from[0].not_request_principals = not_request_principals;
            assert!(translate(&state(vec![p], vec![]), "n1", &cgroups()).deny.is_empty());
        }
    }

    #[test]
    fn identity_ids_are_positions_in_identities() {
        let st = state(vec![], vec![]);
        let d = translate(&st, "n1", &cgroups());
        let names = identities(&st);
        for e in &d.endpoints {
            assert!(e.identity >= 1, "every endpoint here has an identity");
            let name = &names[e.identity as usize - 1];
            let expected = match st.workloads.values().find(|w| w.ip == e.addr) {
                Some(w) => st.identity(w).to_string(),
                None => "spiffe://cluster.local/ns/demo/sa/whoami".to_owned(),
            };
            assert_eq!(name, &expected, "{}", e.addr);
        }
    }
}
