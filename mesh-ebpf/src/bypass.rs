//! Same-node bypass: established sockets whose both ends are on this node go into a sockhash,
//! and sk_msg hands each sendmsg() straight to the peer socket's receive queue, skipping the
//! TCP/IP stack (and the veth hops) for the payload. Handshake and FIN still use TCP.

use core::mem::offset_of;

use aya_ebpf::{
    bindings::{bpf_sock_ops, sk_msg_md},
    programs::SkMsgContext,
};
use mesh_common::{
    endpoint::{flags::LOCAL, node_flags::BYPASS},
    Addr, SockKey, Stat,
};

use crate::{
    ctx::{load_ip6, load_u32},
    maps::{count, node_config, ENDPOINTS, SOCKETS},
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const BPF_ANY: u64 = 0;
/// Deliver to the peer's receive (ingress) queue, as if it arrived from the network.
const BPF_F_INGRESS: u64 = 1;
const SK_PASS: u32 = 1;

fn is_local(addr: &Addr) -> bool {
    if let Some(node) = node_config() {
        if addr.octets == node.capture_addr.octets {
            return true;
        }
    }
    // SAFETY: value copied out at once.
    unsafe { ENDPOINTS.get(addr) }.is_some_and(|ep| ep.flags & LOCAL != 0)
}

/// Called from sock_ops when a connection is established (either side).
pub fn add_socket(ops: &mut bpf_sock_ops, mut key: SockKey) {
    let Some(node) = node_config() else { return };
    if node.flags & BYPASS == 0 || !is_local(&key.local) || !is_local(&key.remote) {
        return;
    }
    if SOCKETS.update(&mut key, ops, BPF_ANY) == 0 {
        count(Stat::BypassSocket);
    }
}

pub fn sk_msg(ctx: &SkMsgContext) -> u32 {
    let md: *const sk_msg_md = ctx.msg;
    // SAFETY: constant-offset loads of the sk_msg context.
    let (local, remote, local_port, remote_port) = unsafe {
        let (local, remote) = match load_u32::<{ offset_of!(sk_msg_md, family) }, _>(md) {
            AF_INET => (
                Addr::from_v4_raw(load_u32::<{ offset_of!(sk_msg_md, local_ip4) }, _>(md)),
                Addr::from_v4_raw(load_u32::<{ offset_of!(sk_msg_md, remote_ip4) }, _>(md)),
            ),
            AF_INET6 => (
                Addr::from_v6_raw(load_ip6!(md, sk_msg_md, local_ip6)),
                Addr::from_v6_raw(load_ip6!(md, sk_msg_md, remote_ip6)),
            ),
            _ => return SK_PASS,
        };
        (local, remote, load_u32::<{ offset_of!(sk_msg_md, local_port) }, _>(md), load_u32::<{ offset_of!(sk_msg_md, remote_port) }, _>(md))
    };
    // Same port encoding as sock_ops: local host order, remote be16 in the upper half.
    let me = SockKey { local, remote, local_port, remote_port: u32::from_be(remote_port) };
    let mut peer = me.peer();
    // On failure (peer not in the map yet or any more) the helper returns SK_DROP without
    // redirecting: fall back to the normal TCP path instead of dropping data.
    if SOCKETS.redirect_msg(ctx, &mut peer, BPF_F_INGRESS) == i64::from(SK_PASS) {
        count(Stat::BypassRedirect);
    }
    SK_PASS
}
