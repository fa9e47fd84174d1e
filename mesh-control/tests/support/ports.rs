//! Ports for child processes that bind them after the test chose them.

use std::{
    hash::{BuildHasher as _, RandomState},
    net::TcpListener,
};

/// A port nothing listens on, for a child process to bind, chosen BELOW the kernel's ephemeral
/// range (`net.ipv4.ip_local_port_range`, 32768–60999 by default). A port from `bind(:0)` comes
/// from that range, and between our probe and the child's bind any outgoing connection on the
/// machine may take it as its source port: CI saw `mesh-control` fail with "Address already in
/// use" while another test's TLS clients were connecting. Ports below the range are only ever
/// taken by listeners, and the random pick makes two tests choosing the same one unlikely.
pub fn free_port() -> u16 {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u16, ephemeral_low.max(10_001));
    for _ in 0..1000 {
        let offset = RandomState::new().hash_one(std::process::id()) % u64::from(high - low);
        let pick = low + u16::try_from(offset).expect("below high - low");
        if TcpListener::bind(("127.0.0.1", pick)).is_ok() {
            return pick;
        }
    }
    panic!("no free port in 127.0.0.1:{low}..{high} after 1000 tries");
}
