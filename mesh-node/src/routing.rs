//! Policy routing that brings HBONE addressed to this node's pods into the daemon.
//!
//! Istio's ztunnel dials the destination *pod's* address on 15008 (its in-pod listener answers
//! there), and so do we by default (`MESH_HBONE_DIAL=pod`). A packet for a local pod's address is
//! normally forwarded to the pod; for each local meshed pod this module installs
//!
//! ```text
//! 15008: from all to <pod ip> ipproto tcp dport 15008 lookup 15008
//! table 15008: local default dev lo
//! ```
//!
//! so those packets are delivered to the daemon's `0.0.0.0:15008` listener instead, whose
//! accepted socket still carries the pod's address as its local address (that is how the
//! inbound picks the certificate to present when the client sends no SNI, as ztunnel does not).
//!
//! With `MESH_INBOUND_TRANSPARENT=true` the inbound connects to the local pod *from the client
//! pod's address*, on a source port of `proxy::socket::TRANSPARENT_PORTS`; the pod's replies go
//! to a remote address, so for each local meshed pod also
//!
//! ```text
//! 15009: from <pod ip> iif <pod's interface> ipproto tcp dport 61000-65534 lookup 15008
//! ```
//!
//! delivers those replies to the daemon's transparent socket. The port range keeps the pod's
//! other traffic on its normal path: replies to plaintext clients (PERMISSIVE) reach clients'
//! ephemeral ports, below 61000 by Linux's default.
//!
//! Plaintext from outside the mesh for a local meshed pod (an unmeshed pod, another host) must
//! meet the daemon too, or that pod's ALLOW and L7 policies would not apply to it. For each such
//! pod, and for the whole node once,
//!
//! ```text
//! 15010: from all iif lo goto 15012          (this node's own connections keep their path)
//! 15011: from all to <pod ip> ipproto tcp lookup 15008
//! 15012: from all nop
//! ```
//!
//! delivers TCP for the pod to this node; the kernel's `sk_lookup` program (`mesh-ebpf`'s
//! `steer`) then hands each new connection to the daemon's plaintext listener whatever its
//! port, or drops it for a STRICT pod. Connections the node makes itself (the daemon forwarding
//! to the pod, the kubelet probing it) come from `lo` and skip the rule.
//!
//! Rules are a pure function of the state ([`wanted`]); [`Routes::run`] keeps the kernel equal
//! to it. At start, rules left by an earlier run are adopted and kept until the first state (the
//! control plane's first update, or the saved config) says which to keep. They are left in place
//! at exit, like the pinned datapath, so a restarting daemon is found at the same address;
//! `ip rule del priority 15008` (and 15009 to 15012) until none is left removes them.

pub mod netlink;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use prometheus_client::{
    metrics::{counter::Counter, gauge::Gauge},
    registry::Registry,
};

pub use netlink::{Action, Netlink, Rule};

use crate::{
    proxy::socket::TRANSPARENT_PORTS,
    state::{Protocol, State, StateRx},
};

/// The routing table holding the `local` default route.
pub const TABLE: u32 = 15008;
/// Priority of the rules for HBONE to local pods.
pub const PRIORITY_HBONE: u32 = 15008;
/// Priority of the rules for replies of transparent (source-preserving) connections.
pub const PRIORITY_TRANSPARENT: u32 = 15009;
/// Priority of the rule that keeps this node's own connections to pods (the daemon's, the
/// kubelet's probes) off [`PRIORITY_PLAINTEXT`]: `iif lo goto` [`PRIORITY_PLAINTEXT_END`].
pub const PRIORITY_FROM_NODE: u32 = 15010;
/// Priority of the rules for plaintext to local meshed pods.
pub const PRIORITY_PLAINTEXT: u32 = 15011;
/// The `nop` rule [`PRIORITY_FROM_NODE`] jumps to.
pub const PRIORITY_PLAINTEXT_END: u32 = 15012;

/// Every kind of rule this module installs, by priority, for adopting and uninstalling.
const ALL_RULES: [(u32, Action); 5] = [
    (PRIORITY_HBONE, Action::Lookup(TABLE)),
    (PRIORITY_TRANSPARENT, Action::Lookup(TABLE)),
    (PRIORITY_FROM_NODE, Action::Goto(PRIORITY_PLAINTEXT_END)),
    (PRIORITY_PLAINTEXT, Action::Lookup(TABLE)),
    (PRIORITY_PLAINTEXT_END, Action::Nop),
];

/// How often rules are re-checked when the state does not change (a pod's interface may appear
/// after the pod is known).
const RESYNC: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("opening a NETLINK_ROUTE socket: {0}")]
    Open(std::io::Error),
    #[error("listing the routing rules (needs CAP_NET_ADMIN): {0}")]
    List(std::io::Error),
    #[error("removing rules left by an earlier run (priority {priority}): {source}")]
    Flush { priority: u32, source: std::io::Error },
    #[error("installing the local route of table {TABLE} (needs CAP_NET_ADMIN): {0}")]
    LocalRoute(std::io::Error),
    #[error("installing the routing rule `{rule}` (needs CAP_NET_ADMIN): {source}")]
    Rule { rule: Rule, source: std::io::Error },
}

#[derive(Clone, Debug)]
pub struct Config {
    pub node_name: String,
    pub hbone_port: u16,
    /// Also install the reply rules of `MESH_INBOUND_TRANSPARENT`.
    pub transparent: bool,
    /// Keep the rules an earlier daemon left instead of adopting them: a successor taking over
    /// (`crate::handoff`) while its predecessor still serves connections that need them.
    /// Rules of pods that went away meanwhile stay until the next start without a predecessor.
    pub keep_existing: bool,
    /// Bring plaintext for local meshed pods to the daemon's plaintext listener, bound at this
    /// address (its family says which pods' addresses it can take); `None`: leave it to the pods.
    pub plaintext: Option<SocketAddr>,
}

/// Whether a listener bound at `listener` can accept a connection for `pod`'s address
/// (`[::]` takes both families: Linux sockets are dual-stack unless told otherwise).
fn serves(listener: SocketAddr, pod: IpAddr) -> bool {
    match listener {
        SocketAddr::V4(_) => pod.is_ipv4(),
        SocketAddr::V6(a) => a.ip().is_unspecified() || pod.is_ipv6(),
    }
}

/// What one local meshed pod needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Want {
    /// HBONE addressed to the pod goes to the daemon.
    Hbone(IpAddr),
    /// The pod's TCP replies go to the daemon (transparent inbound).
    Replies(IpAddr),
    /// Plaintext TCP for the pod from outside the node goes to the daemon.
    Plaintext(IpAddr),
}

/// The rules `state` calls for on this node.
pub fn wanted(state: &State, cfg: &Config) -> BTreeSet<Want> {
    state
        .workloads
        .values()
        .filter(|w| *w.node == *cfg.node_name && w.protocol == Protocol::Hbone)
        .flat_map(|w| {
            let plaintext = cfg.plaintext.is_some_and(|l| serves(l, w.ip));
            [Some(Want::Hbone(w.ip)), cfg.transparent.then_some(Want::Replies(w.ip)), plaintext.then_some(Want::Plaintext(w.ip))]
        })
        .flatten()
        .collect()
}

/// What an earlier run's rule is to this configuration.
enum Found {
    /// A per-pod rule it would write itself: adopted, kept until a state says otherwise.
    Pod(Want),
    /// A node-wide rule it keeps.
    Node,
    /// A rule it would not write: removed.
    Stale,
}

fn adoptable(cfg: &Config, rule: &Rule, plaintext: bool) -> Found {
    let hbone = Some((cfg.hbone_port, cfg.hbone_port));
    let replies = Some((*TRANSPARENT_PORTS.start(), *TRANSPARENT_PORTS.end()));
    match (rule.priority, rule.to, rule.from) {
        (PRIORITY_HBONE, Some(ip), None) if rule.tcp_dport == hbone && rule.iif.is_none() => Found::Pod(Want::Hbone(ip)),
        (PRIORITY_TRANSPARENT, None, Some(ip)) if cfg.transparent && rule.tcp_dport == replies && rule.iif.is_some() => Found::Pod(Want::Replies(ip)),
        (PRIORITY_PLAINTEXT, Some(ip), None) if plaintext && rule.tcp && rule.tcp_dport.is_none() && rule.iif.is_none() => Found::Pod(Want::Plaintext(ip)),
        (PRIORITY_FROM_NODE | PRIORITY_PLAINTEXT_END, None, None) if plaintext => Found::Node,
        _ => Found::Stale,
    }
}

#[derive(Clone, Default)]
pub struct Metrics {
    rules: Gauge,
    errors: Counter,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register("mesh_hbone_redirect_rules", "Policy-routing rules installed to bring traffic for local pods (HBONE, plaintext, transparent replies) into the daemon", m.rules.clone());
        registry.register("mesh_hbone_redirect_errors", "Failed attempts to install or remove such a rule", m.errors.clone());
        m
    }
}

pub struct Routes {
    cfg: Config,
    netlink: Netlink,
    installed: BTreeMap<Want, Rule>,
    metrics: Metrics,
}

impl Routes {
    /// Opens netlink, adopts the rules an earlier run left (unless `keep_existing`), installs
    /// the local routes (both families) and, for plaintext, the node-wide rules. Fails without
    /// `CAP_NET_ADMIN`.
    ///
    /// Adopted, not flushed: a restarting daemon's pods keep their rules (HBONE reaches the
    /// node, plaintext meets the daemon) until its first state says otherwise, so there is no
    /// moment without them; rules that this configuration would not write (another HBONE port,
    /// plaintext steering turned off) go at once.
    pub fn new(cfg: Config, metrics: Metrics) -> Result<Self, Error> {
        let netlink = Netlink::open().map_err(Error::Open)?;
        let mut installed = BTreeMap::new();
        let families = [IpAddr::V4(Ipv4Addr::UNSPECIFIED), IpAddr::V6(Ipv6Addr::UNSPECIFIED)];
        for family in families {
            match netlink.local_default_route(family, TABLE) {
                Ok(()) => {}
                // A node without IPv6 has no IPv6 pods to route.
                Err(e) if family.is_ipv6() && e.raw_os_error() == Some(libc::EAFNOSUPPORT) => continue,
                Err(e) => return Err(Error::LocalRoute(e)),
            }
            let plaintext = cfg.plaintext.is_some_and(|l| serves(l, family));
            if !cfg.keep_existing {
                let found = netlink.rules(family).map_err(Error::List)?;
                for rule in found.into_iter().filter(|r| ALL_RULES.iter().any(|(p, a)| *p == r.priority && *a == r.action)) {
                    match adoptable(&cfg, &rule, plaintext) {
                        Found::Pod(want) => drop(installed.insert(want, rule)),
                        Found::Node => {}
                        Found::Stale => {
                            tracing::info!(%rule, "removing a routing rule of an earlier run this configuration does not write");
                            netlink.del_rule(&rule).map_err(|source| Error::Flush { priority: rule.priority, source })?;
                        }
                    }
                }
            }
            if plaintext {
                // The jump's target first: a goto to a missing rule does nothing.
                for rule in [
                    Rule::any(family, PRIORITY_PLAINTEXT_END, Action::Nop),
                    Rule { iif: Some("lo".into()), ..Rule::any(family, PRIORITY_FROM_NODE, Action::Goto(PRIORITY_PLAINTEXT_END)) },
                ] {
                    match netlink.add_rule(&rule) {
                        Ok(()) => tracing::debug!(%rule, "routing rule installed"),
                        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                        Err(source) => return Err(Error::Rule { rule, source }),
                    }
                }
            }
        }
        if !installed.is_empty() {
            tracing::info!(n = installed.len(), "kept the routing rules of an earlier run until the first state");
        }
        metrics.rules.set(i64::try_from(installed.len()).unwrap_or(i64::MAX));
        Ok(Self { cfg, netlink, installed, metrics })
    }

    /// `mesh-node --uninstall`: removes every rule this module installs and the table's local
    /// route, in both families; returns how many rules there were.
    pub fn uninstall() -> Result<usize, Error> {
        let netlink = Netlink::open().map_err(Error::Open)?;
        let mut n = 0;
        for family in [IpAddr::V4(Ipv4Addr::UNSPECIFIED), IpAddr::V6(Ipv6Addr::UNSPECIFIED)] {
            for (priority, action) in ALL_RULES {
                match netlink.flush_rules(family, priority, action) {
                    Ok(k) => n += k,
                    Err(e) if family.is_ipv6() && e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {}
                    Err(source) => return Err(Error::Flush { priority, source }),
                }
            }
            netlink.delete_local_default_route(family, TABLE).map_err(Error::LocalRoute)?;
        }
        Ok(n)
    }

    /// Makes the installed rules equal to `want`; a rule that fails is retried at the next sync.
    /// Returns the rules installed now.
    pub fn sync(&mut self, want: &BTreeSet<Want>) -> usize {
        let stale: Vec<(Want, Rule)> = self.installed.iter().filter(|(w, _)| !want.contains(w)).map(|(w, r)| (*w, r.clone())).collect();
        for (w, rule) in stale {
            self.installed.remove(&w);
            match self.netlink.del_rule(&rule) {
                Ok(()) => tracing::debug!(%rule, "routing rule removed"),
                // Gone already (someone ran `ip rule del`): the goal is met.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => {
                    self.metrics.errors.inc();
                    tracing::warn!(%rule, error = %e, "removing routing rule");
                    self.installed.insert(w, rule);
                }
            }
        }
        let missing: Vec<Want> = want.iter().filter(|w| !self.installed.contains_key(w)).copied().collect();
        for w in missing {
            let rule = match self.rule_for(w) {
                Ok(r) => r,
                Err(e) => {
                    self.metrics.errors.inc();
                    tracing::debug!(want = ?w, error = %e, "routing rule not installable yet");
                    continue;
                }
            };
            match self.netlink.add_rule(&rule) {
                Ok(()) => tracing::debug!(%rule, "routing rule installed"),
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => {
                    self.metrics.errors.inc();
                    tracing::warn!(%rule, error = %e, "installing routing rule");
                    continue;
                }
            }
            self.installed.insert(w, rule);
        }
        self.metrics.rules.set(i64::try_from(self.installed.len()).unwrap_or(i64::MAX));
        self.installed.len()
    }

    fn rule_for(&self, want: Want) -> std::io::Result<Rule> {
        Ok(match want {
            Want::Hbone(ip) => Rule {
                to: Some(ip),
                tcp_dport: Some((self.cfg.hbone_port, self.cfg.hbone_port)),
                tcp: true,
                ..Rule::any(ip, PRIORITY_HBONE, Action::Lookup(TABLE))
            },
            Want::Plaintext(ip) => Rule { to: Some(ip), tcp: true, ..Rule::any(ip, PRIORITY_PLAINTEXT, Action::Lookup(TABLE)) },
            Want::Replies(ip) => Rule {
                from: Some(ip),
                // Only what arrives from the pod: the daemon's own packets from that address
                // (replies of HBONE accepted for the pod) must keep their normal route.
                iif: Some(self.netlink.route_interface(ip)?),
                tcp_dport: Some((*TRANSPARENT_PORTS.start(), *TRANSPARENT_PORTS.end())),
                tcp: true,
                ..Rule::any(ip, PRIORITY_TRANSPARENT, Action::Lookup(TABLE))
            },
        })
    }

    /// Keeps the rules equal to the state until the state channel closes. With `hold` (the
    /// state is a placeholder until the control plane's first update) the rules stay as found
    /// until then.
    pub async fn run(mut self, mut state: StateRx, hold: bool) {
        if hold && state.changed().await.is_err() {
            return;
        }
        loop {
            let want = wanted(&state.borrow_and_update(), &self.cfg);
            self.sync(&want);
            tokio::select! {
                r = state.changed() => if r.is_err() { return },
                () = tokio::time::sleep(RESYNC) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Snapshot, Workload};

    fn workload(ip: &str, node: &str, protocol: Protocol) -> Workload {
        Workload {
            name: format!("w-{ip}").into(),
            namespace: "demo".into(),
            service_account: "sa".into(),
            workload_name: None,
            ip: ip.parse().expect("ip"),
            node: node.into(),
            node_ip: "198.18.0.1".parse().expect("ip"),
            labels: BTreeMap::new().into(),
            protocol,
            locality: None,
        }
    }

    #[test]
    fn only_local_meshed_pods_get_rules_and_replies_only_when_transparent() {
        let snap = Snapshot {
            workloads: vec![
                workload("198.18.1.11", "n1", Protocol::Hbone),
                workload("198.18.1.13", "n1", Protocol::Tcp),
                workload("198.18.2.11", "n2", Protocol::Hbone),
                workload("fd6d:6573:6800:1::c", "n1", Protocol::Hbone),
            ],
            ..Snapshot::default()
        };
        let state = State::build("cluster.local", "mesh-system", snap).expect("state");
        let mut cfg = Config { node_name: "n1".into(), hbone_port: 15008, transparent: false, keep_existing: false, plaintext: None };
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert_eq!(
            wanted(&state, &cfg),
            BTreeSet::from([Want::Hbone(ip("198.18.1.11")), Want::Hbone(ip("fd6d:6573:6800:1::c"))])
        );
        cfg.transparent = true;
        let w = wanted(&state, &cfg);
        assert_eq!(w.len(), 4);
        assert!(w.contains(&Want::Replies(ip("198.18.1.11"))));
        assert!(!w.iter().any(|w| matches!(w, Want::Hbone(a) | Want::Replies(a) if *a == ip("198.18.1.13") || *a == ip("198.18.2.11"))));
        // Plaintext: the pods whose family the plaintext listener takes.
        cfg.transparent = false;
        cfg.plaintext = Some("0.0.0.0:15006".parse().expect("addr"));
        let w = wanted(&state, &cfg);
        assert!(w.contains(&Want::Plaintext(ip("198.18.1.11"))), "{w:?}");
        assert!(!w.contains(&Want::Plaintext(ip("fd6d:6573:6800:1::c"))), "an IPv4 listener cannot take IPv6: {w:?}");
        assert!(!w.iter().any(|w| matches!(w, Want::Plaintext(a) if *a == ip("198.18.1.13") || *a == ip("198.18.2.11"))), "only local meshed pods");
        cfg.plaintext = Some("[::]:15006".parse().expect("addr"));
        assert_eq!(wanted(&state, &cfg).iter().filter(|w| matches!(w, Want::Plaintext(_))).count(), 2, "[::] takes both families");
    }
}
