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

/// Connects to `dst`, from `src` (any address, `IP_TRANSPARENT`) when given.
pub async fn connect(src: Option<IpAddr>, dst: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = if dst.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if let Some(src) = src {
        setsockopt(&socket, sockopt::IpTransparent, &true).map_err(std::io::Error::from)?;
        socket.bind(SocketAddr::new(src, 0))?;
    }
    socket.set_nodelay(true)?;
    socket.connect(dst).await
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
