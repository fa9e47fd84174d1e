//! Program and map names. Userspace never writes these literals itself.
//!
//! The kernel keeps 15 characters of an object name, so every name here fits in 15.
//! A map's `_V<n>` suffix is bumped whenever its key or value layout changes.

// === programs (attach point in the comment) ===

/// `cgroup/connect4` on the node's pods cgroup: Service LB, capture, L4 policy fast path.
pub const PROG_CONNECT4: &str = "mesh_connect4";
/// `cgroup/connect6`, same for IPv6 sockets.
pub const PROG_CONNECT6: &str = "mesh_connect6";
/// `cgroup/sendmsg4`: Service LB per datagram for unconnected UDP.
pub const PROG_SENDMSG4: &str = "mesh_sendmsg4";
/// `cgroup/sendmsg6`.
pub const PROG_SENDMSG6: &str = "mesh_sendmsg6";
/// `cgroup/recvmsg4`: replies of unconnected UDP appear to come from the VIP.
pub const PROG_RECVMSG4: &str = "mesh_recvmsg4";
/// `cgroup/recvmsg6`.
pub const PROG_RECVMSG6: &str = "mesh_recvmsg6";
/// `cgroup/getpeername4`: the application sees the VIP it dialed, not the backend.
pub const PROG_GETPEERNAME4: &str = "mesh_getpeer4";
/// `cgroup/getpeername6`.
pub const PROG_GETPEERNAME6: &str = "mesh_getpeer6";
/// `sockops` on the node cgroup (pods + daemon): records captured connections' original
/// destination by peer address and puts established local sockets into the sockhash.
pub const PROG_SOCKOPS: &str = "mesh_sockops";
/// `sk_msg` on the sockhash: same-node payload goes socket to socket, skipping TCP/IP.
pub const PROG_SK_MSG: &str = "mesh_sk_msg";
/// `cgroup/getsockopt` on the daemon's cgroup: answers `SO_ORIGINAL_DST` for captured sockets.
pub const PROG_GETSOCKOPT: &str = "mesh_getsockopt";
/// tc egress on a pod's host-side interface: STRICT pods refuse plaintext from outside the mesh.
pub const PROG_TC_TO_POD: &str = "mesh_tc_to_pod";
/// `sk_lookup` on the node's network namespace: plaintext TCP arriving for a local meshed pod
/// is handed to the daemon's plaintext listener (15006), whatever its port.
pub const PROG_SK_LOOKUP: &str = "mesh_sk_lookup";
/// tc ingress on a pod's host-side interface that is a bridge port: plaintext from that pod to
/// a local meshed pod is addressed to the bridge instead, so that it goes up through the
/// node's routing (and [`PROG_SK_LOOKUP`]) rather than across the bridge.
pub const PROG_TC_STEER: &str = "mesh_tc_steer";

// === maps ===

/// Service VIP:port/proto → [`crate::ServiceValue`].
pub const MAP_SERVICES: &str = "MESH_SVC_V1";
/// (service id, slot) → [`crate::BackendId`]: the selection table of each Service.
pub const MAP_SLOTS: &str = "MESH_SLOT_V1";
/// [`crate::BackendId`] → [`crate::Backend`].
pub const MAP_BACKENDS: &str = "MESH_BE_V1";
/// Per-CPU counters indexed by [`crate::DropReason`].
pub const MAP_DROPS: &str = "MESH_DROP_V1";
/// Per-CPU counters indexed by [`crate::Stat`].
pub const MAP_STATS: &str = "MESH_STAT_V1";
/// cgroup id of a pod → [`crate::PodInfo`].
pub const MAP_PODS: &str = "MESH_POD_V1";
/// Endpoint address → [`crate::EndpointInfo`] (identity, meshed/strict).
pub const MAP_ENDPOINTS: &str = "MESH_EP_V2";
/// Node settings (one entry): [`crate::NodeConfig`].
pub const MAP_NODE: &str = "MESH_NODE_V2";
/// Socket cookie → [`crate::OrigDst`] while a captured connection is being set up.
pub const MAP_ORIG_BY_COOKIE: &str = "MESH_ORIGC_V1";
/// Client address:port → [`crate::OrigDst`] once established (what SO_ORIGINAL_DST reads).
pub const MAP_ORIG_BY_PEER: &str = "MESH_ORIGP_V1";
/// (socket cookie, backend) → VIP: reverse translation for getpeername and recvmsg.
pub const MAP_REVNAT: &str = "MESH_RNAT_V1";
/// (service, client) → backend: session affinity.
pub const MAP_AFFINITY: &str = "MESH_AFF_V1";
/// (source identity, destination identity, port) → verdict: the L4 policy fast path.
pub const MAP_POLICY: &str = "MESH_POL_V1";
/// Established same-node sockets by 4-tuple, for sk_msg redirection.
pub const MAP_SOCKETS: &str = "MESH_SOCK_V1";
/// cgroup id → [`crate::TrustedSender`]: node processes (the kubelet) whose connections STRICT
/// pods accept without the daemon's mark.
pub const MAP_TRUSTED: &str = "MESH_TRUST_V1";
/// Sockmap holding the daemon's plaintext listener at [`LISTENER_PLAINTEXT`]: where
/// [`PROG_SK_LOOKUP`] hands plaintext for local meshed pods. A listener that closes (the daemon
/// died) leaves the map by itself.
pub const MAP_LISTENERS: &str = "MESH_LSN_V1";
/// Interface index of a pod's bridge port → [`crate::BridgePort`] (its bridge's MAC).
pub const MAP_PORTS: &str = "MESH_PORT_V1";
/// Index of the plaintext listener in [`MAP_LISTENERS`].
pub const LISTENER_PLAINTEXT: u32 = 0;

/// Every map the object defines, for pinning and inspection.
pub const ALL_MAPS: &[&str] = &[
    MAP_SERVICES,
    MAP_SLOTS,
    MAP_BACKENDS,
    MAP_DROPS,
    MAP_STATS,
    MAP_PODS,
    MAP_ENDPOINTS,
    MAP_NODE,
    MAP_ORIG_BY_COOKIE,
    MAP_ORIG_BY_PEER,
    MAP_REVNAT,
    MAP_AFFINITY,
    MAP_POLICY,
    MAP_SOCKETS,
    MAP_TRUSTED,
    MAP_LISTENERS,
    MAP_PORTS,
];
/// Every program the object defines.
pub const ALL_PROGRAMS: &[&str] = &[
    PROG_CONNECT4,
    PROG_CONNECT6,
    PROG_SENDMSG4,
    PROG_SENDMSG6,
    PROG_RECVMSG4,
    PROG_RECVMSG6,
    PROG_GETPEERNAME4,
    PROG_GETPEERNAME6,
    PROG_SOCKOPS,
    PROG_SK_MSG,
    PROG_GETSOCKOPT,
    PROG_TC_TO_POD,
    PROG_SK_LOOKUP,
    PROG_TC_STEER,
];

/// Capacity of the bridge-port map (pod interfaces of one node).
pub const MAX_PORTS: u32 = 4096;
/// Capacity of the trusted-sender map (kubelets; two only while one restarts).
pub const MAX_TRUSTED: u32 = 64;
/// Capacity of the service map (VIP:port/proto entries).
pub const MAX_SERVICES: u32 = 65_536;
/// Capacity of the slot map: sum of all services' selection tables.
pub const MAX_SLOTS: u32 = 1_048_576;
/// Capacity of the backend map.
pub const MAX_BACKENDS: u32 = 262_144;
/// Capacity of the pod map (the pods of one node).
pub const MAX_PODS: u32 = 65_536;
/// Capacity of the endpoint map: every workload of the mesh a node talks to (a node receives
/// every meshed workload, as ztunnel does), so the size of the mesh, not of a node. 65,536
/// (`MESH_EP_V1`) refused a mesh of 100,000 pods; ~20 MB of kernel memory at this size.
pub const MAX_ENDPOINTS: u32 = 262_144;
/// Capacity of the LRU maps that track connections (original destination, reverse NAT, affinity).
pub const MAX_TRACKED: u32 = 262_144;
/// Capacity of the policy map.
pub const MAX_POLICY: u32 = 262_144;
/// Capacity of the sockhash.
pub const MAX_SOCKETS: u32 = 131_072;

const _: () = {
    let mut i = 0;
    while i < ALL_MAPS.len() {
        assert!(ALL_MAPS[i].len() <= 15, "map name longer than the kernel keeps");
        i += 1;
    }
    let mut i = 0;
    while i < ALL_PROGRAMS.len() {
        assert!(ALL_PROGRAMS[i].len() <= 15, "program name longer than the kernel keeps");
        i += 1;
    }
};
