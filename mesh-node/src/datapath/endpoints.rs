//! Pods, endpoints, node settings and the compiled L4 policy → kernel maps, by diff.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use aya::maps::{Array, HashMap as BpfHashMap, MapData, MapError, PerCpuArray};
use mesh_common::{
    Addr, DropReason, EndpointInfo, NodeConfig, PodInfo, PolicyKey, PolicyValue, Stat, TrustedSender,
    endpoint::{
        flags::{LOCAL, MESHED, STRICT},
        node_flags::BYPASS,
    },
    names::{MAP_DROPS, MAP_ENDPOINTS, MAP_NODE, MAP_PODS, MAP_POLICY, MAP_STATS, MAP_TRUSTED, MAX_ENDPOINTS, MAX_PODS, MAX_POLICY, MAX_TRUSTED},
};

use super::{
    Datapath, Error,
    services::{Protocol, addr_of, full_or},
    sys,
};

/// A pod of this node, identified in the kernel by its cgroup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodSpec {
    pub name: String,
    /// The pod's cgroup v2 directory (its id is what the kernel sees at connect()).
    pub cgroup: PathBuf,
    pub addr: IpAddr,
    /// Workload identity id, shared with the policy rules (0 = unknown).
    pub identity: u32,
    pub meshed: bool,
}

/// Any workload address the node may talk to, with what the kernel needs to know of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSpec {
    pub addr: IpAddr,
    pub identity: u32,
    pub meshed: bool,
    /// PeerAuthentication STRICT (only meaningful for pods of this node).
    pub strict: bool,
    /// Runs on this node: same-node bypass applies.
    pub local: bool,
}

/// Node-wide datapath settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeSpec {
    /// The daemon's outbound listener that meshed pods' connections are redirected to; `None`
    /// turns capture off.
    pub capture: Option<SocketAddr>,
    /// Never captured (already mesh traffic).
    pub hbone_port: u16,
    /// Same-node sockmap bypass.
    pub bypass: bool,
    /// The `SO_MARK` bits of the daemon's connections to pods (what STRICT pods accept).
    pub daemon_mark: u32,
}

/// One connection the kernel must refuse at connect(): source identity → destination identity
/// on a port (0 = any port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct DenyRule {
    pub src_identity: u32,
    pub dst_identity: u32,
    pub port: u16,
    pub protocol: Protocol,
}

/// Counters read from the kernel, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DatapathStats {
    pub drops: BTreeMap<&'static str, u64>,
    pub events: BTreeMap<&'static str, u64>,
}

impl DatapathStats {
    pub fn drop(&self, reason: DropReason) -> u64 {
        self.drops.get(reason.as_str()).copied().unwrap_or(0)
    }
    pub fn event(&self, stat: Stat) -> u64 {
        self.events.get(stat.as_str()).copied().unwrap_or(0)
    }
}

#[derive(Default)]
pub(super) struct EndpointTable {
    pods: BTreeMap<u64, PodInfo>,
    endpoints: BTreeMap<Addr, EndpointInfo>,
    policy: BTreeSet<PolicyKey>,
    trusted: BTreeMap<u64, TrustedSender>,
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> Error {
    move |source| Error::Map { name, source }
}

macro_rules! hash_map {
    ($self:expr, $name:expr) => {{
        let map = $self.ebpf.map_mut($name).ok_or(Error::MissingMap { name: $name })?;
        BpfHashMap::try_from(map).map_err(map_err($name))?
    }};
}

/// Applies `desired` to a kernel hash map whose current content is `current`, writing only
/// changed entries and deleting vanished ones.
fn apply_diff<K: aya::Pod + Ord + std::fmt::Debug, V: aya::Pod + PartialEq>(
    map: &mut BpfHashMap<&mut MapData, K, V>,
    current: &mut BTreeMap<K, V>,
    desired: BTreeMap<K, V>,
    name: &'static str,
    capacity: u32,
) -> Result<(), Error> {
    // Refuse before writing anything: an oversized desired state must not leave a partial one.
    if desired.len() > capacity as usize {
        return Err(Error::MapFull { name, capacity, item: format!("{} entries requested", desired.len()) });
    }
    for (k, v) in &desired {
        if current.get(k) != Some(v) {
            map.insert(k, v, 0).map_err(|e| full_or(e, name, capacity, &format!("{k:?}")))?;
        }
    }
    for k in current.keys().filter(|k| !desired.contains_key(k)) {
        let _ = map.remove(k);
    }
    *current = desired;
    Ok(())
}

impl Datapath {
    pub(super) fn adopt_endpoints(&mut self) -> Result<(), Error> {
        let pods: BpfHashMap<_, u64, PodInfo> = hash_map!(self, MAP_PODS);
        let pods = pods.iter().collect::<Result<BTreeMap<_, _>, _>>().map_err(map_err(MAP_PODS))?;
        let eps: BpfHashMap<_, Addr, EndpointInfo> = hash_map!(self, MAP_ENDPOINTS);
        let eps = eps.iter().collect::<Result<BTreeMap<_, _>, _>>().map_err(map_err(MAP_ENDPOINTS))?;
        let pol: BpfHashMap<_, PolicyKey, PolicyValue> = hash_map!(self, MAP_POLICY);
        let pol = pol.keys().collect::<Result<BTreeSet<_>, _>>().map_err(map_err(MAP_POLICY))?;
        let trusted: BpfHashMap<_, u64, TrustedSender> = hash_map!(self, MAP_TRUSTED);
        let trusted = trusted.iter().collect::<Result<BTreeMap<_, _>, _>>().map_err(map_err(MAP_TRUSTED))?;
        self.endpoints = EndpointTable { pods, endpoints: eps, policy: pol, trusted };
        Ok(())
    }

    /// Node-wide settings: capture target, HBONE port, bypass.
    pub fn set_node(&mut self, spec: &NodeSpec) -> Result<(), Error> {
        let (capture_addr, capture_port) = spec.capture.map_or((Addr::UNSPECIFIED, 0), |c| (addr_of(c.ip()), c.port()));
        let value = NodeConfig {
            capture_addr,
            capture_port,
            hbone_port: spec.hbone_port,
            flags: if spec.bypass { BYPASS } else { 0 },
            daemon_mark: spec.daemon_mark,
            _pad: 0,
        };
        let map = self.ebpf.map_mut(MAP_NODE).ok_or(Error::MissingMap { name: MAP_NODE })?;
        let mut array: Array<_, NodeConfig> = Array::try_from(map).map_err(map_err(MAP_NODE))?;
        array.set(0, value, 0).map_err(map_err(MAP_NODE))
    }

    /// Makes the pod map equal to `pods` (this node's pods, by cgroup id).
    pub fn sync_pods(&mut self, pods: &[PodSpec]) -> Result<(), Error> {
        let mut desired = BTreeMap::new();
        for p in pods {
            let id = sys::cgroup_id(&p.cgroup).map_err(|e| Error::InvalidPod {
                pod: p.name.clone(),
                reason: format!("cgroup {}: {e}", p.cgroup.display()),
            })?;
            let flags = if p.meshed { MESHED } else { 0 };
            desired.insert(id, PodInfo { identity: p.identity, flags, addr: addr_of(p.addr) });
        }
        let mut map: BpfHashMap<_, u64, PodInfo> = hash_map!(self, MAP_PODS);
        apply_diff(&mut map, &mut self.endpoints.pods, desired, MAP_PODS, MAX_PODS)
    }

    /// Makes the trusted-sender map equal to `senders`: cgroup directory → the process found in
    /// it (the kubelet). Connections from sockets of those cgroups reach STRICT pods.
    pub fn sync_trusted(&mut self, senders: &[(u32, PathBuf)]) -> Result<(), Error> {
        let mut desired = BTreeMap::new();
        for (pid, cgroup) in senders {
            // A process may have moved or exited since it was found: leave it out.
            if let Ok(id) = sys::cgroup_id(cgroup) {
                desired.insert(id, TrustedSender { pid: *pid, _pad: 0 });
            }
        }
        let mut map: BpfHashMap<_, u64, TrustedSender> = hash_map!(self, MAP_TRUSTED);
        apply_diff(&mut map, &mut self.endpoints.trusted, desired, MAP_TRUSTED, MAX_TRUSTED)
    }

    /// Makes the endpoint map equal to `endpoints`.
    pub fn sync_endpoints(&mut self, endpoints: &[EndpointSpec]) -> Result<(), Error> {
        let desired = endpoints
            .iter()
            .map(|e| {
                let flags = u32::from(e.meshed) * MESHED | u32::from(e.strict) * STRICT | u32::from(e.local) * LOCAL;
                (addr_of(e.addr), EndpointInfo { identity: e.identity, flags })
            })
            .collect();
        let mut map: BpfHashMap<_, Addr, EndpointInfo> = hash_map!(self, MAP_ENDPOINTS);
        apply_diff(&mut map, &mut self.endpoints.endpoints, desired, MAP_ENDPOINTS, MAX_ENDPOINTS)
    }

    /// Makes the kernel's deny set equal to `rules` (the part of L4 policy the kernel enforces).
    pub fn sync_policy(&mut self, rules: &[DenyRule]) -> Result<(), Error> {
        let desired = rules
            .iter()
            .map(|r| {
                let key = PolicyKey {
                    src_identity: r.src_identity,
                    dst_identity: r.dst_identity,
                    port: r.port,
                    proto: r.protocol.number(),
                    _pad: 0,
                };
                (key, PolicyValue { verdict: PolicyValue::DENY })
            })
            .collect::<BTreeMap<_, _>>();
        let mut current: BTreeMap<PolicyKey, PolicyValue> =
            self.endpoints.policy.iter().map(|k| (*k, PolicyValue { verdict: PolicyValue::DENY })).collect();
        let mut map: BpfHashMap<_, PolicyKey, PolicyValue> = hash_map!(self, MAP_POLICY);
        apply_diff(&mut map, &mut current, desired, MAP_POLICY, MAX_POLICY)?;
        self.endpoints.policy = current.into_keys().collect();
        Ok(())
    }

    /// Reads the drop and event counters (summed over CPUs).
    pub fn stats(&self) -> Result<DatapathStats, Error> {
        let mut out = DatapathStats::default();
        let read = |name: &'static str, index: u32| -> Result<u64, Error> {
            let map = self.ebpf.map(name).ok_or(Error::MissingMap { name })?;
            let array: PerCpuArray<_, u64> = PerCpuArray::try_from(map).map_err(map_err(name))?;
            Ok(array.get(&index, 0).map_err(map_err(name))?.iter().sum())
        };
        for reason in DropReason::ALL {
            out.drops.insert(reason.as_str(), read(MAP_DROPS, reason as u32)?);
        }
        for stat in Stat::ALL {
            out.events.insert(stat.as_str(), read(MAP_STATS, stat as u32)?);
        }
        Ok(out)
    }
}
