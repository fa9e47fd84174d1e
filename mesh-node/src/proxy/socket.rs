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

/// Tries for a free transparent 4-tuple before giving up.
const TRANSPARENT_TRIES: usize = 32;

/// Connects to `dst`, from `src` (any address, `IP_TRANSPARENT`) when given, on a port of
/// [`TRANSPARENT_PORTS`]. The socket carries `mark` (`SO_MARK`): the STRICT guard lets a SYN
/// from this node into a STRICT pod only with it (`mesh_common::decide::strict_refuses`).
///
/// The daemon usually closes these connections first (it passes the client's close on), so each
/// leaves a `TIME_WAIT` on a source port for a minute. Binding a port plainly fails while any
/// connection to anywhere holds it, which capped a client at ~75 new connections per second
/// through one node (4,535 ports / 60 s). With `SO_REUSEADDR` a port is only unusable toward
/// the same destination (the kernel refuses the 4-tuple at `connect`, `EADDRNOTAVAIL`, and
/// another port is tried), so the cap is per client and destination instead.
pub async fn connect(src: Option<IpAddr>, dst: SocketAddr, mark: u32) -> std::io::Result<TcpStream> {
    let new_socket = || -> std::io::Result<TcpSocket> {
        let socket = if dst.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        setsockopt(&socket, sockopt::Mark, &mark).map_err(std::io::Error::from)?;
        Ok(socket)
    };
    let Some(src) = src else {
        let socket = new_socket()?;
        socket.set_nodelay(true)?;
        return socket.connect(dst).await;
    };
    for _ in 0..TRANSPARENT_TRIES {
        let socket = new_socket()?;
        setsockopt(&socket, sockopt::IpTransparent, &true).map_err(std::io::Error::from)?;
        socket.set_reuseaddr(true)?;
        bind_transparent_port(&socket, src)?;
        socket.set_nodelay(true)?;
        match socket.connect(dst).await {
            Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {}
            other => return other,
        }
    }
    Err(std::io::Error::new(std::io::ErrorKind::AddrInUse, format!("no free transparent source port of {src} toward {dst} after {TRANSPARENT_TRIES} tries")))
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
