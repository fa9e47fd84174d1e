//! Decisions the kernel programs take, as pure functions over already-looked-up values, so the
//! host tests cover every branch the verifier-bound code takes.

use crate::{
    Addr, EndpointInfo, NodeConfig, PodInfo, PolicyKey,
    endpoint::flags::{LOCAL, MESHED, STRICT},
    service::PROTO_TCP,
};

/// True for 127.0.0.0/8 (IPv4-mapped) and ::1: traffic that never leaves the pod.
#[inline(always)]
pub const fn is_loopback(a: &Addr) -> bool {
    if a.is_v4() {
        a.octets[12] == 127
    } else {
        let o = &a.octets;
        let mut i = 0;
        while i < 15 {
            if o[i] != 0 {
                return false;
            }
            i += 1;
        }
        o[15] == 1
    }
}

/// Whether a connect() from a pod is redirected into the node daemon.
///
/// Only meshed pods, only TCP, only when the node has a capture target, never loopback, never
/// the daemon's own addresses (no loops), never the HBONE port (already mesh traffic).
#[inline(always)]
pub fn should_capture(pod: Option<&PodInfo>, node: Option<&NodeConfig>, dst: &Addr, dst_port: u16, proto: u8) -> bool {
    let (Some(pod), Some(node)) = (pod, node) else { return false };
    pod.flags & MESHED != 0
        && proto == PROTO_TCP
        && node.capture_port != 0
        && !is_loopback(dst)
        && !(dst.octets == node.capture_addr.octets)
        && dst_port != node.hbone_port
}

/// Policy-map keys to probe for a connection, most specific first (exact port, then any port).
#[inline(always)]
pub const fn policy_keys(src_identity: u32, dst_identity: u32, port: u16, proto: u8) -> [PolicyKey; 2] {
    [
        PolicyKey { src_identity, dst_identity, port, proto, _pad: 0 },
        PolicyKey { src_identity, dst_identity, port: 0, proto, _pad: 0 },
    ]
}

/// Who sent a TCP SYN that tc sees on its way to a pod.
#[derive(Clone, Copy, Debug)]
pub struct Sender {
    /// A socket of this node sent it (tc still sees it); a forwarded or bridged packet has none.
    pub local_socket: bool,
    /// The packet's mark (a local socket's `SO_MARK`).
    pub mark: u32,
    /// The sending socket's cgroup is in the trusted-sender map (the kubelet).
    pub trusted_cgroup: bool,
}

/// Whether a TCP SYN toward a pod is refused by PeerAuthentication STRICT: the pod is STRICT and
/// the SYN is neither the daemon's (a local socket carrying `daemon_mark`) nor the kubelet's (a
/// local socket in a trusted cgroup). Everything else is plaintext from outside the mesh: from
/// another host or pod (forwarded or bridged), or from any other process of the node.
/// `daemon_mark` 0 trusts no mark (only trusted cgroups).
#[inline(always)]
pub const fn strict_refuses(dst_flags: u32, is_syn: bool, sender: Sender, daemon_mark: u32) -> bool {
    let daemons = daemon_mark != 0 && sender.mark & daemon_mark == daemon_mark;
    let trusted = sender.local_socket && (daemons || sender.trusted_cgroup);
    dst_flags & STRICT != 0 && is_syn && !trusted
}

/// What `sk_lookup` does with a new inbound connection that policy routing delivered to this
/// node (`mesh-node`'s routing sends TCP for local meshed pods here, unless this node sent it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Steer {
    /// Not ours: the normal socket lookup decides.
    Pass,
    /// Plaintext from outside the mesh for a PERMISSIVE pod: to the daemon's plaintext listener,
    /// which authorizes it (L4 and L7) and forwards it to the pod.
    Daemon,
    /// Plaintext for a STRICT pod: dropped and counted, as the tc guard drops it.
    Drop,
}

/// The `sk_lookup` decision for a TCP (or other) connection to `dst_port` on an address whose
/// endpoint entry is `ep`. Only local meshed pods are steered, never their HBONE port (HBONE has
/// its own listener) and never the node's capture address. The program only sees what routing
/// delivered to the node, and the plaintext rule leaves the node's own connections (`iif lo`)
/// on their normal path: the daemon forwarding to the pod and the kubelet probing it are never
/// steered back. (`bpf_sk_lookup.ingress_ifindex` could check that again, but needs 5.17.)
/// `mesh_tc_steer` asks the same for a packet a pod sends across its bridge: anything but
/// [`Steer::Pass`] goes up to the node, to be decided here.
#[inline(always)]
pub fn steer_inbound(ep: Option<&EndpointInfo>, node: Option<&NodeConfig>, dst: &Addr, dst_port: u16, proto: u8) -> Steer {
    let (Some(ep), Some(node)) = (ep, node) else { return Steer::Pass };
    let ours = ep.flags & (LOCAL | MESHED) == (LOCAL | MESHED);
    if !ours || proto != PROTO_TCP || dst_port == node.hbone_port || dst.octets == node.capture_addr.octets {
        return Steer::Pass;
    }
    if ep.flags & STRICT != 0 { Steer::Drop } else { Steer::Daemon }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::PROTO_UDP;

    fn node() -> NodeConfig {
        NodeConfig { capture_addr: Addr::from_v4([198, 18, 1, 1]), capture_port: 15001, hbone_port: 15008, flags: 0, daemon_mark: MARK, _pad: 0 }
    }
    fn pod(flags: u32) -> PodInfo {
        PodInfo { identity: 7, flags, addr: Addr::from_v4([198, 18, 1, 11]) }
    }
    const DST: Addr = Addr::from_v4([198, 18, 2, 11]);

    #[test]
    fn capture_only_meshed_tcp_to_real_destinations() {
        let n = node();
        assert!(should_capture(Some(&pod(MESHED)), Some(&n), &DST, 8080, PROTO_TCP));
        assert!(!should_capture(Some(&pod(0)), Some(&n), &DST, 8080, PROTO_TCP), "unmeshed");
        assert!(!should_capture(None, Some(&n), &DST, 8080, PROTO_TCP), "unknown pod");
        assert!(!should_capture(Some(&pod(MESHED)), None, &DST, 8080, PROTO_TCP), "no node config");
        assert!(!should_capture(Some(&pod(MESHED)), Some(&n), &DST, 53, PROTO_UDP), "udp");
        assert!(!should_capture(Some(&pod(MESHED)), Some(&n), &Addr::from_v4([127, 0, 0, 1]), 80, PROTO_TCP), "loopback");
        assert!(!should_capture(Some(&pod(MESHED)), Some(&n), &n.capture_addr, 15001, PROTO_TCP), "the daemon itself");
        assert!(!should_capture(Some(&pod(MESHED)), Some(&n), &DST, 15008, PROTO_TCP), "hbone");
        let off = NodeConfig { capture_port: 0, ..n };
        assert!(!should_capture(Some(&pod(MESHED)), Some(&off), &DST, 8080, PROTO_TCP), "capture off");
    }

    #[test]
    fn loopback_detection() {
        assert!(is_loopback(&Addr::from_v4([127, 1, 2, 3])));
        let mut v6 = [0u8; 16];
        v6[15] = 1;
        assert!(is_loopback(&Addr::from_v6(v6)));
        assert!(!is_loopback(&DST));
        v6[0] = 0xfd;
        assert!(!is_loopback(&Addr::from_v6(v6)));
    }

    #[test]
    fn policy_keys_go_from_exact_to_any_port() {
        let [exact, any] = policy_keys(1, 2, 8080, PROTO_TCP);
        assert_eq!((exact.port, any.port), (8080, 0));
        assert_eq!((exact.src_identity, exact.dst_identity), (1, 2));
    }

    const MARK: u32 = crate::DEFAULT_DAEMON_MARK;

    #[test]
    fn only_plaintext_for_local_meshed_pods_is_steered() {
        let n = node();
        let ep = |flags| Some(EndpointInfo { identity: 7, flags });
        let steer = |flags, port, proto| steer_inbound(ep(flags).as_ref(), Some(&n), &DST, port, proto);
        assert_eq!(steer(LOCAL | MESHED, 8080, PROTO_TCP), Steer::Daemon);
        assert_eq!(steer(LOCAL | MESHED | STRICT, 8080, PROTO_TCP), Steer::Drop, "STRICT: plaintext is refused in the kernel");
        assert_eq!(steer(MESHED, 8080, PROTO_TCP), Steer::Pass, "a pod of another node");
        assert_eq!(steer(LOCAL, 8080, PROTO_TCP), Steer::Pass, "an unmeshed local pod");
        assert_eq!(steer(LOCAL | MESHED, 15008, PROTO_TCP), Steer::Pass, "HBONE has its own listener");
        assert_eq!(steer(LOCAL | MESHED, 53, PROTO_UDP), Steer::Pass, "UDP");
        assert_eq!(steer_inbound(None, Some(&n), &DST, 8080, PROTO_TCP), Steer::Pass, "no endpoint entry");
        assert_eq!(steer_inbound(ep(LOCAL | MESHED).as_ref(), None, &DST, 8080, PROTO_TCP), Steer::Pass, "no node config");
        let at_capture = steer_inbound(ep(LOCAL | MESHED).as_ref(), Some(&n), &n.capture_addr, 8080, PROTO_TCP);
        assert_eq!(at_capture, Steer::Pass, "never the node's own address");
    }

    fn sender(local_socket: bool, mark: u32, trusted_cgroup: bool) -> Sender {
        Sender { local_socket, mark, trusted_cgroup }
    }

    #[test]
    fn strict_refuses_all_but_the_daemons_and_the_kubelets_syns() {
        let forwarded = sender(false, 0, false);
        assert!(strict_refuses(STRICT, true, forwarded, MARK), "another host or pod");
        assert!(strict_refuses(STRICT, true, sender(true, 0, false), MARK), "another process of the node");
        assert!(!strict_refuses(STRICT, true, sender(true, MARK | 0x4000, false), MARK), "the daemon, whatever else marks the packet");
        assert!(!strict_refuses(STRICT, true, sender(true, 0, true), MARK), "the kubelet's probe");
        assert!(strict_refuses(STRICT, true, sender(false, MARK, false), MARK), "a mark on a forwarded packet proves nothing");
        assert!(strict_refuses(STRICT, true, sender(true, 0x1000, false), 0x3000), "every bit of the mark is needed");
        assert!(strict_refuses(STRICT, true, sender(true, 0, false), 0), "mark 0 trusts no mark");
        assert!(!strict_refuses(STRICT, false, forwarded, MARK), "not a connection attempt");
        assert!(!strict_refuses(MESHED, true, forwarded, MARK), "permissive");
    }
}
