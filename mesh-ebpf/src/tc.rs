//! tc on a pod's host-side interface. Egress: PeerAuthentication STRICT in the kernel.
//! A TCP SYN toward a STRICT pod is let through only from the daemon delivering mesh traffic (a
//! local socket with the daemon's mark) or the kubelet probing (a local socket in a trusted
//! cgroup); anything else — another host, another pod, another process of the node — is
//! plaintext from outside the mesh: dropped, counted.
//!
//! Ingress, on an interface that is a bridge port: TCP from the pod to a local meshed pod would
//! cross the bridge at layer 2, never meeting the node's routing. Addressed to the bridge
//! instead (its MAC, from `MESH_PORT_V1`), it goes up to the node, whose plaintext rule and
//! `sk_lookup` (`steer.rs`) hand it to the daemon like plaintext from another node. IPv4 only,
//! as the plaintext rules with the default listener.

use aya_ebpf::{bindings::__sk_buff, helpers::generated::bpf_skb_cgroup_id, programs::TcContext};
use mesh_common::{
    decide::{steer_inbound, strict_refuses, Sender, Steer},
    endpoint::flags::STRICT,
    service::PROTO_TCP,
    Addr, DropReason,
};

use crate::ctx::load_u32;
use crate::maps::{count_drop, node_config, ENDPOINTS, PORTS, TRUSTED};

const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

pub fn to_pod(ctx: &TcContext) -> i32 {
    match try_to_pod(ctx) {
        Some(true) => {
            count_drop(DropReason::StrictPlaintext);
            TC_ACT_SHOT
        }
        _ => TC_ACT_OK,
    }
}

/// A TCP packet's destination address and the offset of its TCP header; `None` for anything
/// else (and for IPv6 with extension headers: a SYN with them is passed, a documented limitation).
fn tcp_destination(ctx: &TcContext) -> Option<(Addr, usize)> {
    match u16::from_be(ctx.load::<u16>(12).ok()?) {
        ETH_P_IP => {
            let vihl: u8 = ctx.load(ETH_HLEN).ok()?;
            if ctx.load::<u8>(ETH_HLEN + 9).ok()? != IPPROTO_TCP {
                return None;
            }
            let dst: [u8; 4] = ctx.load(ETH_HLEN + 16).ok()?;
            Some((Addr::from_v4(dst), ETH_HLEN + usize::from(vihl & 0x0f) * 4))
        }
        ETH_P_IPV6 => {
            if ctx.load::<u8>(ETH_HLEN + 6).ok()? != IPPROTO_TCP {
                return None;
            }
            let dst: [u8; 16] = ctx.load(ETH_HLEN + 24).ok()?;
            Some((Addr::from_v6(dst), ETH_HLEN + 40))
        }
        _ => None,
    }
}

/// `Some(true)` when the packet must be dropped; `None` when it is not a parsable TCP packet.
fn try_to_pod(ctx: &TcContext) -> Option<bool> {
    let (dst, l4) = tcp_destination(ctx)?;
    let tcp_flags: u8 = ctx.load(l4 + 13).ok()?;
    let is_syn = tcp_flags & TCP_SYN != 0 && tcp_flags & TCP_ACK == 0;
    if !is_syn {
        return Some(false);
    }
    // SAFETY: value copied out at once.
    let ep = unsafe { ENDPOINTS.get(&dst) }?;
    // Who sent it matters only for a STRICT pod: spare every other SYN the lookups below.
    if ep.flags & STRICT == 0 {
        return Some(false);
    }
    // A locally originated packet still carries its socket at tc egress; a forwarded or
    // bridged one does not.
    // SAFETY: reading the sk and mark fields of the program's own __sk_buff.
    let (local_socket, mark) = unsafe {
        let skb = ctx.skb.skb;
        let sk = core::ptr::read_volatile(core::ptr::addr_of!((*skb).__bindgen_anon_2.sk));
        (!sk.is_null(), (*skb).mark)
    };
    // The sending socket's cgroup (0 without a full socket, which no entry has).
    // SAFETY: helper call on the program's own __sk_buff.
    let cgroup = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
    // SAFETY: presence check only.
    let trusted_cgroup = local_socket && unsafe { TRUSTED.get(&cgroup) }.is_some();
    let daemon_mark = node_config().map_or(0, |n| n.daemon_mark);
    Some(strict_refuses(ep.flags, is_syn, Sender { local_socket, mark, trusted_cgroup }, daemon_mark))
}

/// tc ingress: re-addresses a pod's TCP for a local meshed pod to the bridge. Never drops.
pub fn steer(ctx: &TcContext) -> i32 {
    let _ = try_steer(ctx);
    TC_ACT_OK
}

fn try_steer(ctx: &TcContext) -> Option<()> {
    let (dst, l4) = tcp_destination(ctx).filter(|(dst, _)| dst.is_v4())?;
    let port = u16::from_be(ctx.load::<u16>(l4 + 2).ok()?);
    // SAFETY: value copied out at once.
    let ep = unsafe { ENDPOINTS.get(&dst) };
    if steer_inbound(ep, node_config(), &dst, port, PROTO_TCP) == Steer::Pass {
        return None;
    }
    // SAFETY: a fixed-offset load of the program's own __sk_buff (the device it runs on).
    let ifindex = unsafe { load_u32::<{ core::mem::offset_of!(__sk_buff, ifindex) }, _>(ctx.skb.skb) };
    // SAFETY: value copied out at once.
    let bridge = unsafe { PORTS.get(&ifindex) }?;
    let mac = bridge.bridge_mac;
    ctx.store(0, &mac, 0).ok()
}
