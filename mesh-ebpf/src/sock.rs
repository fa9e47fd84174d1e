//! cgroup socket-address hooks: Service load balancing at the socket, capture of meshed pods'
//! connections, the L4 policy fast path, and reverse translation for getpeername/recvmsg.

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_prandom_u32, bpf_ktime_get_ns,
        generated::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    },
    programs::SockAddrContext,
    EbpfContext as _,
};
use mesh_common::{
    decide::{policy_keys, should_capture},
    lb::{flow_hash, slot_for},
    service::{PROTO_TCP, PROTO_UDP},
    Addr, AffinityKey, AffinityValue, DropReason, PolicyValue, RevNatKey, ServiceFlags, ServiceKey,
    ServiceValue, SlotKey, SockAddr, Stat,
};

use core::mem::offset_of;

use crate::ctx::{load_ip6, load_u32, store_ip6};
use crate::maps::{
    count, count_drop, node_config, AFFINITY, BACKENDS, ENDPOINTS, ORIG_BY_COOKIE, PODS, POLICY,
    REVNAT, SERVICES, SLOTS,
};

/// Let the operation proceed (rewritten or not).
const ALLOW: i32 = 1;
/// Refuse the operation; the errno was set with bpf_set_retval.
const REFUSE: i32 = 0;

const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const ECONNREFUSED: i32 = 111;
const EPERM: i32 = 1;

/// A refused operation: why (counted) and what the application sees.
struct Refusal {
    reason: DropReason,
    errno: i32,
}

fn proto_of(sa: &bpf_sock_addr) -> Option<u8> {
    match sa.type_ {
        SOCK_STREAM => Some(PROTO_TCP),
        SOCK_DGRAM => Some(PROTO_UDP),
        _ => None,
    }
}

/// The port in `user_port`: a be16 in the low 16 bits (4-byte access required).
#[inline(always)]
fn user_port(sa: &bpf_sock_addr) -> u16 {
    u16::from_be(sa.user_port as u16)
}

#[inline(always)]
fn set_user_port(sa: &mut bpf_sock_addr, port: u16) {
    sa.user_port = u32::from(port.to_be());
}

fn cookies(ctx: &SockAddrContext) -> (u64, u64) {
    // SAFETY: both helpers accept a cgroup sock_addr context.
    unsafe { (bpf_get_socket_cookie(ctx.as_ptr()), bpf_get_netns_cookie(ctx.as_ptr())) }
}

/// Chooses a backend of a Service. Only backends in the selection table (healthy, weight > 0)
/// are ever chosen.
fn pick_backend(svc: &ServiceValue, netns_cookie: u64, src_port: u16) -> Result<SockAddr, DropReason> {
    let affinity_key = AffinityKey { client: netns_cookie, service_id: svc.id, _pad: 0 };
    // SAFETY: ktime has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if svc.flags.bits & ServiceFlags::AFFINITY != 0 {
        // SAFETY: value copied out at once.
        if let Some(prev) = unsafe { AFFINITY.get(&affinity_key) } {
            let fresh = now.saturating_sub(prev.last_used_ns) < u64::from(svc.affinity_timeout_s) * 1_000_000_000;
            let id = mesh_common::BackendId { id: prev.backend_id };
            // A backend that left every table (unhealthy, removed) is gone from the backend map.
            if fresh && let Some(b) = unsafe { BACKENDS.get(&id) } {
                let _ = AFFINITY.insert(affinity_key, AffinityValue { last_used_ns: now, ..*prev }, 0);
                return Ok(SockAddr::new(b.addr, b.port));
            }
        }
    }
    let hash = if svc.flags.bits & ServiceFlags::MAGLEV != 0 {
        flow_hash(netns_cookie, src_port, svc.id)
    } else {
        // SAFETY: no preconditions.
        unsafe { bpf_get_prandom_u32() }
    };
    let slot = slot_for(hash, svc.slot_count).ok_or(DropReason::NoHealthyBackend)?;
    // SAFETY: values copied out at once.
    let id = *unsafe { SLOTS.get(&SlotKey { service_id: svc.id, slot }) }.ok_or(DropReason::SlotMissing)?;
    let backend = unsafe { BACKENDS.get(&id) }.ok_or(DropReason::BackendMissing)?;
    if svc.flags.bits & ServiceFlags::AFFINITY != 0 {
        let value = AffinityValue { backend_id: id.id, _pad: 0, last_used_ns: now };
        let _ = AFFINITY.insert(affinity_key, value, 0);
    }
    Ok(SockAddr::new(backend.addr, backend.port))
}

/// The L4 policy fast path: deny if the policy map says so for (source pod, destination, port).
fn policy_denies(src_identity: u32, dst: &SockAddr, proto: u8) -> bool {
    // SAFETY: values copied out at once.
    let Some(ep) = (unsafe { ENDPOINTS.get(&dst.addr) }) else { return false };
    for key in policy_keys(src_identity, ep.identity, dst.port, proto) {
        if let Some(v) = unsafe { POLICY.get(&key) } {
            return v.verdict == PolicyValue::DENY;
        }
    }
    false
}

/// What connect()/sendmsg() should do with a destination.
fn decide(ctx: &SockAddrContext, dst: SockAddr, proto: u8, allow_capture: bool) -> Result<Option<SockAddr>, Refusal> {
    let (cookie, netns) = cookies(ctx);
    // SAFETY: no preconditions.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: values copied out at once.
    let pod = unsafe { PODS.get(&cgroup) };
    let node = node_config();
    if allow_capture && should_capture(pod, node, &dst.addr, dst.port, proto) {
        if let (Some(pod), Some(node)) = (pod, node) {
            if policy_denies(pod.identity, &dst, proto) {
                return Err(Refusal { reason: DropReason::PolicyDenied, errno: EPERM });
            }
            let capture = SockAddr::new(node.capture_addr, node.capture_port);
            let _ = ORIG_BY_COOKIE.insert(cookie, dst, 0);
            // getpeername() on the app's socket shows what it dialed, not the daemon.
            let _ = REVNAT.insert(RevNatKey { cookie, backend: capture, _pad: 0 }, dst, 0);
            count(Stat::Captured);
            return Ok(Some(capture));
        }
    }
    let key = ServiceKey::new(dst.addr, dst.port, proto);
    // SAFETY: value copied out at once.
    let target = match unsafe { SERVICES.get(&key) } {
        Some(svc) => {
            // SAFETY: the kernel hands a valid context; sk may be read for its bound port.
            let src_port = unsafe { bound_port(ctx) };
            match pick_backend(svc, netns, src_port) {
                Ok(b) => Some(b),
                Err(reason) => return Err(Refusal { reason, errno: ECONNREFUSED }),
            }
        }
        None => None,
    };
    if let Some(pod) = pod
        && policy_denies(pod.identity, target.as_ref().unwrap_or(&dst), proto)
    {
        return Err(Refusal { reason: DropReason::PolicyDenied, errno: EPERM });
    }
    if let Some(backend) = target {
        let _ = REVNAT.insert(RevNatKey { cookie, backend, _pad: 0 }, dst, 0);
    }
    Ok(target)
}

/// The socket's bound source port (0 if not bound yet).
unsafe fn bound_port(ctx: &SockAddrContext) -> u16 {
    // SAFETY: caller passes the program's context; sk is a valid full socket in sock_addr hooks.
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    if sk.is_null() {
        return 0;
    }
    // src_port is in host order.
    unsafe { load_u32::<{ offset_of!(aya_ebpf::bindings::bpf_sock, src_port) }, _>(sk) as u16 }
}

fn refuse(r: &Refusal) -> i32 {
    count_drop(r.reason);
    // SAFETY: cgroup sock_addr programs may set the errno returned to the caller.
    unsafe { bpf_set_retval(-r.errno) };
    REFUSE
}

fn write_v4(sa: &mut bpf_sock_addr, to: &SockAddr) -> Result<(), Refusal> {
    if !to.addr.is_v4() {
        return Err(Refusal { reason: DropReason::BackendMissing, errno: ECONNREFUSED });
    }
    sa.user_ip4 = to.addr.v4_raw();
    set_user_port(sa, to.port);
    Ok(())
}

fn write_v6(sa: &mut bpf_sock_addr, to: &SockAddr) {
    // SAFETY: user_ip6 is a writable u32[4] of the context.
    unsafe { store_ip6!(sa, bpf_sock_addr, user_ip6, to.addr.v6_raw()) };
    set_user_port(sa, to.port);
}

fn dst_v4(sa: &bpf_sock_addr) -> SockAddr {
    SockAddr::new(Addr::from_v4_raw(sa.user_ip4), user_port(sa))
}

fn dst_v6(sa: &bpf_sock_addr) -> SockAddr {
    // SAFETY: user_ip6 is a u32[4] of the context.
    let words = unsafe { load_ip6!(sa, bpf_sock_addr, user_ip6) };
    SockAddr::new(Addr::from_v6_raw(words), user_port(sa))
}

/// connect4 and sendmsg4 (`capture` only for connect: unconnected UDP is never captured).
pub fn translate4(ctx: &SockAddrContext, capture: bool, stat: Stat) -> i32 {
    // SAFETY: the kernel hands a valid bpf_sock_addr.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(proto) = proto_of(sa) else { return ALLOW };
    match decide(ctx, dst_v4(sa), proto, capture) {
        Ok(None) => ALLOW,
        Ok(Some(to)) => match write_v4(sa, &to) {
            Ok(()) => {
                count(stat);
                ALLOW
            }
            Err(r) => refuse(&r),
        },
        Err(r) => refuse(&r),
    }
}

/// connect6 and sendmsg6.
pub fn translate6(ctx: &SockAddrContext, capture: bool, stat: Stat) -> i32 {
    // SAFETY: the kernel hands a valid bpf_sock_addr.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(proto) = proto_of(sa) else { return ALLOW };
    match decide(ctx, dst_v6(sa), proto, capture) {
        Ok(None) => ALLOW,
        Ok(Some(to)) => {
            write_v6(sa, &to);
            count(stat);
            ALLOW
        }
        Err(r) => refuse(&r),
    }
}

/// getpeername4 and recvmsg4: show the VIP (or the captured original destination) instead of
/// the backend the socket really talks to. These hooks must always return 1.
pub fn reverse4(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the kernel hands a valid bpf_sock_addr.
    let sa = unsafe { &mut *ctx.sock_addr };
    let (cookie, _) = cookies(ctx);
    let key = RevNatKey { cookie, backend: dst_v4(sa), _pad: 0 };
    // SAFETY: value copied out at once.
    if let Some(vip) = unsafe { REVNAT.get(&key) } {
        let vip = *vip;
        let _ = write_v4(sa, &vip);
    }
    ALLOW
}

/// getpeername6 and recvmsg6.
pub fn reverse6(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the kernel hands a valid bpf_sock_addr.
    let sa = unsafe { &mut *ctx.sock_addr };
    let (cookie, _) = cookies(ctx);
    let key = RevNatKey { cookie, backend: dst_v6(sa), _pad: 0 };
    // SAFETY: value copied out at once.
    if let Some(vip) = unsafe { REVNAT.get(&key) } {
        let vip = *vip;
        write_v6(sa, &vip);
    }
    ALLOW
}
