//! Service load-balancing map layouts.
//!
//! A Service (VIP, port, protocol) has a selection table of `slot_count` slots; each slot names a
//! backend. Userspace builds the table: weighted random fills slots in proportion to weights,
//! Maglev fills a prime-sized table. The kernel only hashes into it, so every algorithm shares
//! one fast path. Only healthy backends are ever placed in a table.

use crate::Addr;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Key of the service map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    pub addr: Addr,
    /// Port in host byte order (readable in `bpftool map dump`).
    pub port: u16,
    /// IP protocol number ([`PROTO_TCP`], [`PROTO_UDP`]).
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<ServiceKey>() == 20);

impl ServiceKey {
    pub const fn new(addr: Addr, port: u16, proto: u8) -> Self {
        Self { addr, port, proto, _pad: 0 }
    }
}

/// Load-balancing behaviour bits of a Service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceFlags {
    pub bits: u32,
}

impl ServiceFlags {
    /// Table is a Maglev table: hash by flow, not at random.
    pub const MAGLEV: u32 = 1 << 0;
    /// Session affinity by client: the same client keeps its backend.
    pub const AFFINITY: u32 = 1 << 1;
}

/// Value of the service map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceValue {
    /// Stable id, key prefix in the slot map.
    pub id: u32,
    /// Number of slots in the selection table; 0 means no healthy backend.
    pub slot_count: u32,
    pub flags: ServiceFlags,
    /// Session-affinity timeout in seconds (0 when affinity is off).
    pub affinity_timeout_s: u32,
}
const _: () = assert!(size_of::<ServiceValue>() == 16);

/// Key of the slot map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SlotKey {
    pub service_id: u32,
    pub slot: u32,
}
const _: () = assert!(size_of::<SlotKey>() == 8);

/// Value of the slot map; key of the backend map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendId {
    pub id: u32,
}
const _: () = assert!(size_of::<BackendId>() == 4);

/// Value of the backend map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Backend {
    pub addr: Addr,
    /// Port in host byte order.
    pub port: u16,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<Backend>() == 20);

impl Backend {
    pub const fn new(addr: Addr, port: u16) -> Self {
        Self { addr, port, _pad: [0; 2] }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all impls): repr(C), Copy, only integer fields, no implicit padding (asserted by the
    // size checks above), so every bit pattern is valid and the bytes can be shared with the kernel.
    #![expect(unsafe_code, reason = "aya::Pod marks types as plain old data for map access")]
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceValue {}
    unsafe impl aya::Pod for super::SlotKey {}
    unsafe impl aya::Pod for super::BackendId {}
    unsafe impl aya::Pod for super::Backend {}
}
