//! Every map of the object, in one place. BTF-defined (`#[btf_map]`) so that
//! `bpftool map dump` prints field names. The `name = "..."` literals must equal the constants
//! in `mesh_common::names` (userspace looks maps up by those; a mismatch fails the privileged
//! tests at load with "map ... is missing from the eBPF object").

use aya_ebpf::{
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray, SockMap},
    macros::btf_map,
};
use mesh_common::{
    AffinityKey, AffinityValue, Backend, BackendId, BridgePort, DropReason, EndpointInfo, NodeConfig, PodInfo,
    PolicyKey, PolicyValue, RevNatKey, ServiceKey, ServiceValue, SlotKey, SockAddr, SockKey, Stat,
    TrustedSender,
    names::{MAX_BACKENDS, MAX_ENDPOINTS, MAX_PODS, MAX_POLICY, MAX_PORTS, MAX_SERVICES, MAX_SLOTS, MAX_SOCKETS, MAX_TRACKED, MAX_TRUSTED},
    Addr,
};

use crate::sockhash::SockHash64;

#[btf_map(name = "MESH_SVC_V1")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue, { MAX_SERVICES as usize }> = HashMap::new();

#[btf_map(name = "MESH_SLOT_V1")]
pub static SLOTS: HashMap<SlotKey, BackendId, { MAX_SLOTS as usize }> = HashMap::new();

#[btf_map(name = "MESH_BE_V1")]
pub static BACKENDS: HashMap<BackendId, Backend, { MAX_BACKENDS as usize }> = HashMap::new();

#[btf_map(name = "MESH_DROP_V1")]
pub static DROPS: PerCpuArray<u64, { DropReason::COUNT as usize }> = PerCpuArray::new();

#[btf_map(name = "MESH_STAT_V1")]
pub static STATS: PerCpuArray<u64, { Stat::COUNT as usize }> = PerCpuArray::new();

/// Keyed by cgroup id.
#[btf_map(name = "MESH_POD_V1")]
pub static PODS: HashMap<u64, PodInfo, { MAX_PODS as usize }> = HashMap::new();

#[btf_map(name = "MESH_EP_V2")]
pub static ENDPOINTS: HashMap<Addr, EndpointInfo, { MAX_ENDPOINTS as usize }> = HashMap::new();

#[btf_map(name = "MESH_NODE_V2")]
pub static NODE: Array<NodeConfig, 1> = Array::new();

/// Keyed by socket cookie.
#[btf_map(name = "MESH_ORIGC_V1")]
pub static ORIG_BY_COOKIE: LruHashMap<u64, SockAddr, { MAX_TRACKED as usize }> = LruHashMap::new();

#[btf_map(name = "MESH_ORIGP_V1")]
pub static ORIG_BY_PEER: LruHashMap<SockAddr, SockAddr, { MAX_TRACKED as usize }> = LruHashMap::new();

#[btf_map(name = "MESH_RNAT_V1")]
pub static REVNAT: LruHashMap<RevNatKey, SockAddr, { MAX_TRACKED as usize }> = LruHashMap::new();

#[btf_map(name = "MESH_AFF_V1")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue, { MAX_TRACKED as usize }> = LruHashMap::new();

#[btf_map(name = "MESH_POL_V1")]
pub static POLICY: HashMap<PolicyKey, PolicyValue, { MAX_POLICY as usize }> = HashMap::new();

#[btf_map(name = "MESH_SOCK_V1")]
pub static SOCKETS: SockHash64<SockKey, { MAX_SOCKETS as usize }> = SockHash64::new();

/// Keyed by cgroup id.
#[btf_map(name = "MESH_TRUST_V1")]
pub static TRUSTED: HashMap<u64, TrustedSender, { MAX_TRUSTED as usize }> = HashMap::new();

/// The daemon's plaintext listener at `names::LISTENER_PLAINTEXT` (set from userspace).
#[btf_map(name = "MESH_LSN_V1")]
pub static LISTENERS: SockMap<1> = SockMap::new();

/// Keyed by a pod interface's index: the MAC of the bridge it is a port of.
#[btf_map(name = "MESH_PORT_V1")]
pub static PORTS: HashMap<u32, BridgePort, { MAX_PORTS as usize }> = HashMap::new();

/// Count one drop for `reason`.
#[inline(always)]
pub fn count_drop(reason: DropReason) {
    if let Some(counter) = DROPS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *counter += 1 };
    }
}

/// Count one event.
#[inline(always)]
pub fn count(stat: Stat) {
    if let Some(counter) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
pub fn node_config() -> Option<&'static NodeConfig> {
    NODE.get(0)
}
