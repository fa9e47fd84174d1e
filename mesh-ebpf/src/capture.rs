//! Capture bookkeeping: sock_ops records each captured connection's original destination under
//! the client's address:port once established; cgroup/getsockopt answers `SO_ORIGINAL_DST` for
//! the daemon's accepted socket from that record — the same call a proxy makes under iptables.

use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_ops, bpf_sockopt},
    helpers::generated::bpf_get_socket_cookie,
    programs::{SockOpsContext, SockoptContext},
    EbpfContext as _,
};
use mesh_common::{Addr, SockAddr, SockKey, Stat};

use core::mem::offset_of;

use crate::{
    bypass,
    ctx::{load_ip6, load_u32},
    maps::{count, ORIG_BY_COOKIE, ORIG_BY_PEER},
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;
/// `SO_ORIGINAL_DST` (linux/netfilter_ipv4.h) and `IP6T_SO_ORIGINAL_DST` share the number.
const SO_ORIGINAL_DST: i32 = 80;
const ACTIVE_ESTABLISHED: u32 = 4;
const PASSIVE_ESTABLISHED: u32 = 5;

/// The 4-tuple of a sock_ops socket, from that socket's point of view.
fn sock_key(ops: &bpf_sock_ops) -> Option<SockKey> {
    let base: *const bpf_sock_ops = ops;
    // SAFETY: constant-offset loads of sock_ops context fields.
    let (local, remote) = unsafe {
        match load_u32::<{ offset_of!(bpf_sock_ops, family) }, _>(base) {
            AF_INET => (
                Addr::from_v4_raw(load_u32::<{ offset_of!(bpf_sock_ops, local_ip4) }, _>(base)),
                Addr::from_v4_raw(load_u32::<{ offset_of!(bpf_sock_ops, remote_ip4) }, _>(base)),
            ),
            AF_INET6 => (
                Addr::from_v6_raw(load_ip6!(base, bpf_sock_ops, local_ip6)),
                Addr::from_v6_raw(load_ip6!(base, bpf_sock_ops, remote_ip6)),
            ),
            _ => return None,
        }
    };
    // SAFETY: as above.
    let (local_port, remote_port) = unsafe {
        (load_u32::<{ offset_of!(bpf_sock_ops, local_port) }, _>(base), load_u32::<{ offset_of!(bpf_sock_ops, remote_port) }, _>(base))
    };
    // local_port is host order; remote_port holds a be16 in its upper 16 bits.
    Some(SockKey { local, remote, local_port, remote_port: u32::from_be(remote_port) })
}

pub fn sockops(ctx: &SockOpsContext) -> u32 {
    // SAFETY: the kernel hands a valid bpf_sock_ops.
    let ops = unsafe { &mut *ctx.ops };
    // SAFETY: constant-offset load of the context.
    let op = unsafe { load_u32::<{ offset_of!(bpf_sock_ops, op) }, _>(ctx.ops) };
    if op != ACTIVE_ESTABLISHED && op != PASSIVE_ESTABLISHED {
        return 0;
    }
    let Some(key) = sock_key(ops) else { return 0 };
    if op == ACTIVE_ESTABLISHED {
        // SAFETY: sock_ops contexts are accepted by bpf_get_socket_cookie.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        // SAFETY: value copied out at once.
        if let Some(orig) = unsafe { ORIG_BY_COOKIE.get(&cookie) } {
            let orig = *orig;
            #[allow(clippy::cast_possible_truncation, reason = "ports are 16-bit")]
            let me = SockAddr::new(key.local, key.local_port as u16);
            let _ = ORIG_BY_PEER.insert(me, orig, 0);
            let _ = ORIG_BY_COOKIE.remove(&cookie);
        }
    }
    bypass::add_socket(ops, key);
    0
}

/// Answers getsockopt(SOL_IP/SOL_IPV6, SO_ORIGINAL_DST) on sockets accepted by the daemon.
/// Must return 1 (0 would turn every getsockopt of the daemon into EPERM).
pub fn getsockopt(ctx: &SockoptContext) -> i32 {
    // SAFETY: the kernel hands a valid bpf_sockopt.
    let so: &mut bpf_sockopt = unsafe { &mut *ctx.sockopt };
    if so.optname != SO_ORIGINAL_DST || (so.level != SOL_IP && so.level != SOL_IPV6) {
        return 1;
    }
    // SAFETY: sk is a valid full socket for getsockopt hooks.
    let sk = unsafe { so.__bindgen_anon_1.sk };
    if sk.is_null() {
        return 1;
    }
    // SAFETY: constant-offset loads of a valid bpf_sock.
    let (family, peer) = unsafe {
        let family = load_u32::<{ offset_of!(bpf_sock, family) }, _>(sk);
        // dst_port: a be16 followed by 16 zero bits; a 4-byte load is accepted.
        let port = u16::from_be(load_u32::<{ offset_of!(bpf_sock, dst_port) }, _>(sk) as u16);
        let addr = if family == AF_INET {
            Addr::from_v4_raw(load_u32::<{ offset_of!(bpf_sock, dst_ip4) }, _>(sk))
        } else {
            Addr::from_v6_raw(load_ip6!(sk, bpf_sock, dst_ip6))
        };
        (family, SockAddr::new(addr, port))
    };
    // SAFETY: value copied out at once.
    let Some(orig) = (unsafe { ORIG_BY_PEER.get(&peer) }) else { return 1 };
    let orig = *orig;
    // SAFETY: reading the optval bounds the kernel set up.
    let (start, end) = unsafe { (so.__bindgen_anon_2.optval as usize, so.__bindgen_anon_3.optval_end as usize) };
    if so.level == SOL_IP && family == AF_INET && orig.addr.is_v4() {
        // struct sockaddr_in: family, port (be), addr (be), 8 bytes zero.
        if start + 16 > end {
            return 1;
        }
        // SAFETY: bounds checked against optval_end just above.
        unsafe {
            let p = start as *mut u8;
            (p as *mut u16).write_unaligned(AF_INET as u16);
            (p.add(2) as *mut u16).write_unaligned(orig.port.to_be());
            (p.add(4) as *mut u32).write_unaligned(orig.addr.v4_raw());
            (p.add(8) as *mut u64).write_unaligned(0);
        }
        so.optlen = 16;
    } else if so.level == SOL_IPV6 {
        // struct sockaddr_in6: family, port, flowinfo, addr[16], scope_id.
        if start + 28 > end {
            return 1;
        }
        let w = orig.addr.v6_raw();
        // SAFETY: bounds checked against optval_end just above.
        unsafe {
            let p = start as *mut u8;
            (p as *mut u16).write_unaligned(AF_INET6 as u16);
            (p.add(2) as *mut u16).write_unaligned(orig.port.to_be());
            (p.add(4) as *mut u32).write_unaligned(0);
            (p.add(8) as *mut u32).write_unaligned(w[0]);
            (p.add(12) as *mut u32).write_unaligned(w[1]);
            (p.add(16) as *mut u32).write_unaligned(w[2]);
            (p.add(20) as *mut u32).write_unaligned(w[3]);
            (p.add(24) as *mut u32).write_unaligned(0);
        }
        so.optlen = 28;
    } else {
        return 1;
    }
    so.retval = 0;
    count(Stat::OrigDstAnswered);
    1
}
