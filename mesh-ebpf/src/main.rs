//! Kernel programs of the mesh. Entry points only: each reads its context and calls the logic in
//! the modules here, whose decisions come from `mesh-common` (unit-tested on the host).
#![no_std]
#![no_main]
// Inline asm for verifier-shaped context loads (see ctx.rs).
#![feature(asm_experimental_arch)]

mod bypass;
mod capture;
mod ctx;
mod maps;
mod sock;
mod sockhash;
mod steer;
mod tc;

use aya_ebpf::{
    macros::{cgroup_sock_addr, cgroup_sockopt, classifier, sk_lookup, sk_msg, sock_ops},
    programs::{
        SkLookupContext, SkMsgContext, SockAddrContext, SockOpsContext, SockoptContext, TcContext,
    },
};
use mesh_common::Stat;

/// `cgroup/connect4` on the node's pods cgroup: capture, Service LB, L4 policy fast path.
#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    sock::translate4(&ctx, true, Stat::LbConnect)
}

/// `cgroup/connect6` on the node's pods cgroup.
#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    sock::translate6(&ctx, true, Stat::LbConnect)
}

/// `cgroup/sendmsg4`: per-datagram Service LB for unconnected UDP.
#[cgroup_sock_addr(sendmsg4)]
pub fn mesh_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::translate4(&ctx, false, Stat::LbSendmsg)
}

/// `cgroup/sendmsg6`.
#[cgroup_sock_addr(sendmsg6)]
pub fn mesh_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock::translate6(&ctx, false, Stat::LbSendmsg)
}

/// `cgroup/recvmsg4`: replies from a backend appear to come from the VIP.
#[cgroup_sock_addr(recvmsg4)]
pub fn mesh_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::reverse4(&ctx)
}

/// `cgroup/recvmsg6`.
#[cgroup_sock_addr(recvmsg6)]
pub fn mesh_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock::reverse6(&ctx)
}

/// `cgroup/getpeername4`: the application sees the address it dialed.
#[cgroup_sock_addr(getpeername4)]
pub fn mesh_getpeer4(ctx: SockAddrContext) -> i32 {
    sock::reverse4(&ctx)
}

/// `cgroup/getpeername6`.
#[cgroup_sock_addr(getpeername6)]
pub fn mesh_getpeer6(ctx: SockAddrContext) -> i32 {
    sock::reverse6(&ctx)
}

/// `sockops` on the node cgroup (pods and daemon): original destinations, sockhash membership.
#[sock_ops]
pub fn mesh_sockops(ctx: SockOpsContext) -> u32 {
    capture::sockops(&ctx)
}

/// `sk_msg` attached to the sockhash: same-node payload socket to socket.
#[sk_msg]
pub fn mesh_sk_msg(ctx: SkMsgContext) -> u32 {
    bypass::sk_msg(&ctx)
}

/// `cgroup/getsockopt` on the daemon's cgroup: SO_ORIGINAL_DST for captured connections.
#[cgroup_sockopt(getsockopt)]
pub fn mesh_getsockopt(ctx: SockoptContext) -> i32 {
    capture::getsockopt(&ctx)
}

/// tc egress on a pod's host-side interface: STRICT refuses plaintext from outside the mesh.
#[classifier]
pub fn mesh_tc_to_pod(ctx: TcContext) -> i32 {
    tc::to_pod(&ctx)
}

/// tc ingress on a pod's host-side bridge port: plaintext to local meshed pods up to the node.
#[classifier]
pub fn mesh_tc_steer(ctx: TcContext) -> i32 {
    tc::steer(&ctx)
}

/// `sk_lookup` on the node's network namespace: plaintext for local meshed pods to the daemon.
#[sk_lookup]
pub fn mesh_sk_lookup(ctx: SkLookupContext) -> u32 {
    steer::sk_lookup(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual BSD/GPL\0";
