//! Capture bookkeeping: sock_ops records each captured connection's original destination under
//! the client's address:port once established; cgroup/getsockopt answers `SO_ORIGINAL_DST` for
//! the daemon's accepted socket from that record — the same call a proxy makes under iptables.

use aya_ebpf::{
    bindings::{bpf_sock_ops, bpf_sockopt},
    helpers::generated::bpf_get_socket_cookie,
    programs::{SockOpsContext, SockoptContext},
    EbpfContext as _,
};
use mesh_common::{Addr, SockAddr, SockKey, Stat};

use crate::{
    bypass,
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
    let (local, remote) = match ops.family {
        AF_INET => (Addr::from_v4_raw(ops.local_ip4), Addr::from_v4_raw(ops.remote_ip4)),
        AF_INET6 => (Addr::from_v6_raw(ops.local_ip6), Addr::from_v6_raw(ops.remote_ip6)),
        _ => return None,
    };
    // local_port is host order; remote_port holds a be16 in its upper 16 bits.
    Some(SockKey { local, remote, local_port: ops.local_port, remote_port: u32::from_be(ops.remote_port) })
}

pub fn sockops(ctx: &SockOpsContext) -> u32 {
    // SAFETY: the kernel hands a valid bpf_sock_ops.
    let ops = unsafe { &mut *ctx.ops };
    let op = ops.op;
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
    // SAFETY: reading fields of a valid bpf_sock.
    let (family, peer) = unsafe {
        let family = (*sk).family;
        let port = u16::from_be((*sk).dst_port);
        let addr = if family == AF_INET {
            Addr::from_v4_raw((*sk).dst_ip4)
        } else {
            Addr::from_v6_raw((*sk).dst_ip6)
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
