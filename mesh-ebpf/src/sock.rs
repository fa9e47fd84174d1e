//! cgroup socket-address hooks: socket-level Service load balancing.

use aya_ebpf::{helpers::bpf_get_prandom_u32, programs::SockAddrContext};
use mesh_common::{
    Addr, DropReason, ServiceKey, SlotKey,
    lb::slot_for,
    service::{PROTO_TCP, PROTO_UDP},
};

use crate::maps::{BACKENDS, SERVICES, SLOTS, count_drop};

/// Let the operation proceed (rewritten or not).
const ALLOW: i32 = 1;
/// Refuse the operation (the caller sees EPERM).
const REFUSE: i32 = 0;

const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;

pub fn connect4(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the kernel hands cgroup/connect4 a valid bpf_sock_addr.
    let sa = unsafe { &mut *ctx.sock_addr };
    let proto = match sa.type_ {
        SOCK_STREAM => PROTO_TCP,
        SOCK_DGRAM => PROTO_UDP,
        _ => return ALLOW,
    };
    // user_port holds the be16 port in its low 16 bits (4-byte access required).
    let port = u16::from_be(sa.user_port as u16);
    let key = ServiceKey::new(Addr::from_v4_raw(sa.user_ip4), port, proto);
    // SAFETY: map values are plain data; we copy out what we need immediately.
    let Some(svc) = (unsafe { SERVICES.get(&key) }) else {
        return ALLOW; // not a Service: leave the connect alone
    };
    let Some(slot) = slot_for(unsafe { bpf_get_prandom_u32() }, svc.slot_count) else {
        count_drop(DropReason::NoHealthyBackend);
        return REFUSE;
    };
    let Some(backend_id) = (unsafe { SLOTS.get(&SlotKey { service_id: svc.id, slot }) }) else {
        count_drop(DropReason::SlotMissing);
        return REFUSE;
    };
    let Some(backend) = (unsafe { BACKENDS.get(backend_id) }) else {
        count_drop(DropReason::BackendMissing);
        return REFUSE;
    };
    sa.user_ip4 = backend.addr.v4_raw();
    sa.user_port = u32::from(backend.port.to_be());
    ALLOW
}
