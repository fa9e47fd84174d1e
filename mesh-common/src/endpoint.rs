//! What the kernel knows about pods and the node: identities, meshing, capture target.

use crate::Addr;

/// Bits of [`PodInfo::flags`] and [`EndpointInfo::flags`].
pub mod flags {
    /// The pod is part of the mesh: its outbound TCP is captured into the node daemon.
    pub const MESHED: u32 = 1 << 0;
    /// PeerAuthentication STRICT: plaintext from outside the mesh is refused.
    pub const STRICT: u32 = 1 << 1;
    /// The endpoint runs on this node (same-node bypass applies).
    pub const LOCAL: u32 = 1 << 2;
}

/// Value of the pod map, keyed by the pod's cgroup id (`u64`, the cgroup directory's inode).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodInfo {
    /// Workload identity id (0 = unknown); the same ids key the policy map.
    pub identity: u32,
    pub flags: u32,
    pub addr: Addr,
}
const _: () = assert!(size_of::<PodInfo>() == 24);

/// Value of the endpoint map, keyed by an endpoint address ([`Addr`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    pub identity: u32,
    pub flags: u32,
}
const _: () = assert!(size_of::<EndpointInfo>() == 8);

/// Value of the bridge-port map, keyed by a pod interface's index (`u32`): the MAC address of
/// the bridge the interface is a port of.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BridgePort {
    pub bridge_mac: [u8; 6],
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<BridgePort>() == 8);

/// The node's settings (single entry at index 0 of the node map).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    /// Where captured connections go: the daemon's outbound listener (0 port = capture off).
    pub capture_addr: Addr,
    pub capture_port: u16,
    /// Connections to this port (HBONE, 15008) are never captured.
    pub hbone_port: u16,
    /// Bits of [`node_flags`].
    pub flags: u32,
    /// The `SO_MARK` bits the daemon sets on its own connections to pods: a SYN toward a STRICT
    /// pod sent from the node must carry all of them (or come from a [`TrustedSender`] cgroup).
    pub daemon_mark: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<NodeConfig>() == 32);

/// The mark the daemon puts on its connections to pods unless `MESH_SOCKET_MARK` says
/// otherwise: one bit outside the ones kube-proxy (0x4000, 0x8000), Cilium (0x0F00 and the upper
/// 16), Calico (upper 16) and Istio (0x0FFF) use.
pub const DEFAULT_DAEMON_MARK: u32 = 0x1000;

/// Value of the trusted-sender map, keyed by a cgroup id: a process of the node (not the daemon)
/// whose connections to STRICT pods are let through — the kubelet, for its probes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrustedSender {
    /// The process found in that cgroup (the entry goes when it is gone).
    pub pid: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<TrustedSender>() == 8);

pub mod node_flags {
    /// Put same-node sockets in the sockhash and redirect payload with sk_msg.
    pub const BYPASS: u32 = 1 << 0;
}

#[cfg(feature = "user")]
mod pod {
    #![expect(unsafe_code, reason = "aya::Pod marks types as plain old data for map access")]
    // SAFETY: repr(C), integer fields only, sizes asserted: no padding, every bit pattern valid.
    unsafe impl aya::Pod for super::PodInfo {}
    unsafe impl aya::Pod for super::EndpointInfo {}
    unsafe impl aya::Pod for super::NodeConfig {}
    unsafe impl aya::Pod for super::TrustedSender {}
    unsafe impl aya::Pod for super::BridgePort {}
}
