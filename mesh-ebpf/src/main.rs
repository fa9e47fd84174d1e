//! Kernel programs of the mesh. Entry points only: each reads its context, calls the decision
//! logic in `mesh-common` (unit-tested on the host) and in the modules here, and writes back.
#![no_std]
#![no_main]

mod maps;
mod sock;

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

/// Attach point: `cgroup/connect4` on the cgroup of the pods of one node.
/// Rewrites a Service VIP:port to a backend before the kernel routes the SYN (or, for connected
/// UDP, before the socket is bound to a peer).
#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    sock::connect4(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual BSD/GPL\0";
