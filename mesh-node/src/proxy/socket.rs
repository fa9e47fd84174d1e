//! Socket helpers: the original destination of a redirected connection, and connecting from a
//! foreign source address.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};

use nix::sys::socket::{getsockopt, setsockopt, sockopt};
use tokio::net::{TcpSocket, TcpStream};

/// Where the client meant to connect. The kernel datapath answers this `getsockopt` for captured
/// connections (cgroup/getsockopt); iptables `REDIRECT` answers it the same way. Falls back to the
/// local address for connections that were not redirected (e.g. TPROXY or a direct dial).
pub fn original_dst(stream: &TcpStream) -> std::io::Result<SocketAddr> {
    match getsockopt(stream, sockopt::OriginalDst) {
        Ok(sa) => Ok(SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
            u16::from_be(sa.sin_port),
        ))),
        Err(_) => stream.local_addr(),
    }
}

/// Source ports of transparent connections (`connect` with a foreign source address). The pod's
/// replies to them are routed back to the daemon by port (`crate::routing`), so they must not
/// collide with ports peers pick themselves: the range is above Linux's default ephemeral range
/// (32768-60999). It ends below 65535 because the kernel rejects a rule port range ending there.
pub const TRANSPARENT_PORTS: std::ops::RangeInclusive<u16> = 61000..=65534;

/// Connects to `dst`, from `src` (any address, `IP_TRANSPARENT`) when given, on a port of
/// [`TRANSPARENT_PORTS`].
pub async fn connect(src: Option<IpAddr>, dst: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = if dst.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if let Some(src) = src {
        setsockopt(&socket, sockopt::IpTransparent, &true).map_err(std::io::Error::from)?;
        bind_transparent_port(&socket, src)?;
    }
    socket.set_nodelay(true)?;
    socket.connect(dst).await
}

/// Binds `src` with a free port of [`TRANSPARENT_PORTS`], starting at a random one.
fn bind_transparent_port(socket: &TcpSocket, src: IpAddr) -> std::io::Result<()> {
    use std::hash::{BuildHasher as _, RandomState};
    let (first, span) = (*TRANSPARENT_PORTS.start(), u64::from(TRANSPARENT_PORTS.end() - TRANSPARENT_PORTS.start()) + 1);
    let start = RandomState::new().hash_one(std::time::Instant::now()) % span;
    for i in 0..span {
        let port = first + u16::try_from((start + i) % span).expect("within the range");
        match socket.bind(SocketAddr::new(src, port)) {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {}
            other => return other,
        }
    }
    Err(std::io::Error::new(std::io::ErrorKind::AddrInUse, format!("every transparent source port of {src} is in use")))
}

/// Lets a listener accept connections addressed to any address routed to this host, and answer
/// from that address (`IP_TRANSPARENT`, and `IPV6_TRANSPARENT` for IPv6 sockets), as a TPROXY
/// listener does. Needs `CAP_NET_ADMIN`.
pub fn set_transparent(listener: &tokio::net::TcpListener) -> std::io::Result<()> {
    let sock = socket2::SockRef::from(listener);
    if listener.local_addr()?.is_ipv6() {
        sock.set_ip_transparent_v6(true)?;
    }
    sock.set_ip_transparent_v4(true)
}
