//! Per-connection state: original destinations, reverse translation, affinity, policy, sockets.

use crate::Addr;

/// An address and port (port in host order). Value of the original-destination maps and of the
/// reverse-NAT map; key of the by-peer original-destination map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockAddr {
    pub addr: Addr,
    pub port: u16,
    pub _pad: u16,
}
const _: () = assert!(size_of::<SockAddr>() == 20);

impl SockAddr {
    pub const fn new(addr: Addr, port: u16) -> Self {
        Self { addr, port, _pad: 0 }
    }
}

/// Key of the reverse-NAT map: which backend a socket was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RevNatKey {
    pub cookie: u64,
    pub backend: SockAddr,
    pub _pad: u32,
}
const _: () = assert!(size_of::<RevNatKey>() == 32);

/// Key of the affinity map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    /// The client's network-namespace cookie.
    pub client: u64,
    pub service_id: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<AffinityKey>() == 16);

/// Value of the affinity map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AffinityValue {
    pub backend_id: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_coarse_ns`-style monotonic nanoseconds of the last use.
    pub last_used_ns: u64,
}
const _: () = assert!(size_of::<AffinityValue>() == 16);

/// Key of the policy map. `port` 0 matches any port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    pub src_identity: u32,
    pub dst_identity: u32,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<PolicyKey>() == 12);

/// Value of the policy map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyValue {
    pub verdict: u32,
}
const _: () = assert!(size_of::<PolicyValue>() == 4);

impl PolicyValue {
    pub const DENY: u32 = 1;
}

/// Key of the sockhash: a socket's 4-tuple as seen from that socket (ports in host order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub local: Addr,
    pub remote: Addr,
    pub local_port: u32,
    pub remote_port: u32,
}
const _: () = assert!(size_of::<SockKey>() == 40);

impl SockKey {
    /// The key of the socket at the other end of the same connection.
    #[inline(always)]
    pub const fn peer(&self) -> Self {
        Self { local: self.remote, remote: self.local, local_port: self.remote_port, remote_port: self.local_port }
    }
}

#[cfg(feature = "user")]
mod pod {
    #![expect(unsafe_code, reason = "aya::Pod marks types as plain old data for map access")]
    // SAFETY: repr(C), integer fields only, sizes asserted: no padding, every bit pattern valid.
    unsafe impl aya::Pod for super::SockAddr {}
    unsafe impl aya::Pod for super::RevNatKey {}
    unsafe impl aya::Pod for super::AffinityKey {}
    unsafe impl aya::Pod for super::AffinityValue {}
    unsafe impl aya::Pod for super::PolicyKey {}
    unsafe impl aya::Pod for super::PolicyValue {}
    unsafe impl aya::Pod for super::SockKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_key_is_the_mirror_and_involutive() {
        let a = SockKey { local: Addr::from_v4([198, 18, 1, 11]), remote: Addr::from_v4([198, 18, 1, 1]), local_port: 40000, remote_port: 15001 };
        let p = a.peer();
        assert_eq!(p.local, a.remote);
        assert_eq!(p.local_port, 15001);
        assert_eq!(p.remote_port, 40000);
        assert_eq!(p.peer(), a);
    }
}
