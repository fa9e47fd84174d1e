//! The L4 side of the sample app, as the kernel, node and e2e suites use it (std only, one
//! thread per connection): the TCP greeting + echo server, the UDP responder, the
//! `SO_ORIGINAL_DST` reporter, and the connect / UDP / round-trip clients.

use std::{
    fmt::Write as _,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::ExitCode,
    thread,
    time::Duration,
};

use super::{payload, unmap};

/// Prints `error: MSG` (the line tests match on) and returns the failure exit code.
pub fn fail(msg: &str) -> ExitCode {
    println!("error: {msg}");
    ExitCode::from(2)
}

/// Every TCP connection gets one line `whoami name=NAME peer=IP:PORT local=IP:PORT`, then an
/// echo of whatever it sends. Prints `accept peer=IP:PORT` per connection: tests use it to
/// prove a server saw nothing.
pub fn serve_tcp(listener: &TcpListener, name: &str) {
    for stream in listener.incoming().flatten() {
        if let Ok(peer) = stream.peer_addr() {
            println!("accept peer={}", unmap(peer));
        }
        let name = name.to_owned();
        thread::spawn(move || {
            let _ = handle(&name, stream);
        });
    }
}

/// Every datagram is answered with `whoami name=NAME peer=IP:PORT`.
pub fn serve_udp(socket: &UdpSocket, name: &str) {
    let mut buf = [0u8; 2048];
    while let Ok((_, peer)) = socket.recv_from(&mut buf) {
        let _ = socket.send_to(format!("whoami name={name} peer={}", unmap(peer)).as_bytes(), peer);
    }
}

fn handle(name: &str, mut stream: TcpStream) -> std::io::Result<()> {
    let peer = unmap(stream.peer_addr()?);
    let local = unmap(stream.local_addr()?);
    writeln!(stream, "whoami name={name} peer={peer} local={local}")?;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buf[..n])?;
    }
}

/// # Panics
/// If a bound listener has no local address (cannot happen on Linux).
pub fn origdst(listen: SocketAddr) -> ExitCode {
    let listener = match TcpListener::bind(listen) {
        Ok(l) => l,
        Err(e) => return fail(&format!("bind {listen}: {e}")),
    };
    println!("listening tcp {}", listener.local_addr().expect("bound"));
    for mut stream in listener.incoming().flatten() {
        let peer = stream.peer_addr().map_or_else(|e| format!("? ({e})"), |p| p.to_string());
        let orig = original_dst(&stream).map_or_else(|e| format!("none ({e})"), |a| a.to_string());
        let _ = writeln!(stream, "orig={orig} peer={peer}");
    }
    ExitCode::SUCCESS
}

/// getsockopt(SOL_IP, SO_ORIGINAL_DST): what a transparent proxy asks the kernel.
fn original_dst(stream: &TcpStream) -> std::io::Result<SocketAddr> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: sockaddr_in is plain data; the kernel writes at most `len` bytes into it.
    #[expect(unsafe_code, reason = "getsockopt has no safe std wrapper")]
    unsafe {
        let mut addr: libc::sockaddr_in = std::mem::zeroed();
        let mut len = libc::socklen_t::try_from(size_of::<libc::sockaddr_in>()).expect("16 bytes");
        let rc = libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_IP,
            libc::SO_ORIGINAL_DST,
            (&raw mut addr).cast(),
            &raw mut len,
        );
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let ip = std::net::Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
        Ok(SocketAddr::from((ip, u16::from_be(addr.sin_port))))
    }
}

pub struct ConnectOpts {
    pub count: u64,
    /// Keep connecting until this much time has passed (then `count` is not a limit).
    pub duration: Option<Duration>,
    /// Connections in flight at once, each worker dialling back to back.
    pub concurrency: u64,
    pub bind_port: u16,
    pub echo: usize,
    pub timeout: Duration,
}

/// Dials `opts.count` connections (or as many as fit in `opts.duration`) from
/// `opts.concurrency` threads and prints one line per connection. A load generator for new
/// connections needs several in flight: one at a time, the rate is bounded by the round trip.
pub fn connect_all(addr: SocketAddr, opts: &ConnectOpts) -> ExitCode {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let next = AtomicU64::new(0);
    let ok = AtomicBool::new(true);
    let deadline = opts.duration.map(|d| std::time::Instant::now() + d);
    thread::scope(|scope| {
        for _ in 0..opts.concurrency.max(1) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let more = match deadline {
                        Some(at) => std::time::Instant::now() < at,
                        None => i < opts.count,
                    };
                    if !more {
                        break;
                    }
                    let port = if opts.bind_port == 0 { 0 } else { opts.bind_port.wrapping_add(u16::try_from(i).unwrap_or(0)) };
                    // One println per line: the stdout lock keeps lines whole across threads.
                    match connect_one(addr, port, opts) {
                        Ok(line) => println!("{line}"),
                        Err(line) => {
                            println!("{line}");
                            ok.store(false, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
    });
    if ok.into_inner() { ExitCode::SUCCESS } else { ExitCode::from(2) }
}

/// Binds a TCP listener on 0.0.0.0 for each of `ports`, here (this process's network namespace
/// and cgroup, which its listeners' accepted sockets belong to), and sends them over the Unix
/// socket at `to` (`SCM_RIGHTS`, one message): a stand-in for the service manager that creates
/// socket-activated listeners.
pub fn bind_listeners(to: &std::path::Path, ports: &[u16]) -> ExitCode {
    use std::os::fd::AsRawFd as _;
    let bind = |port: u16| -> std::io::Result<socket2::Socket> {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())?;
        socket.listen(4096)?;
        Ok(socket)
    };
    let sockets = match ports.iter().map(|&p| bind(p)).collect::<std::io::Result<Vec<_>>>() {
        Ok(s) => s,
        Err(e) => return fail(&format!("bind: {e}")),
    };
    let stream = match std::os::unix::net::UnixStream::connect(to) {
        Ok(s) => s,
        Err(e) => return fail(&format!("connect {}: {e}", to.display())),
    };
    let fds: Vec<i32> = sockets.iter().map(|s| s.as_raw_fd()).collect();
    match mesh_node::handoff::send_line(std::os::fd::AsFd::as_fd(&stream), b"listeners\n", &fds) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&format!("send the listeners: {e}")),
    }
}

fn errno_name(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENETUNREACH) => "ENETUNREACH".into(),
        Some(libc::ECONNREFUSED) => "ECONNREFUSED".into(),
        Some(libc::EPERM) => "EPERM".into(),
        Some(libc::EACCES) => "EACCES".into(),
        Some(libc::EHOSTUNREACH) => "EHOSTUNREACH".into(),
        Some(libc::ETIMEDOUT) => "ETIMEDOUT".into(),
        Some(other) => format!("errno {other}"),
        None if e.kind() == std::io::ErrorKind::TimedOut => "ETIMEDOUT".into(),
        None => "?".into(),
    }
}

/// Echo payloads up to this size are written before reading the echo back (the kernel's
/// socket buffers hold them); larger ones are written from a second thread.
const SMALL_ECHO: usize = 16 * 1024;

fn connect_one(addr: SocketAddr, bind_port: u16, opts: &ConnectOpts) -> Result<String, String> {
    let err = |what: &str, e: &std::io::Error| format!("error: {what} {addr}: {} ({e})", errno_name(e));
    let stream = if bind_port == 0 {
        TcpStream::connect_timeout(&addr, opts.timeout).map_err(|e| err("connect", &e))?
    } else {
        let domain = if addr.is_ipv4() { socket2::Domain::IPV4 } else { socket2::Domain::IPV6 };
        let socket = socket2::Socket::new(domain, socket2::Type::STREAM, None).map_err(|e| err("socket", &e))?;
        socket.set_reuse_address(true).map_err(|e| err("setsockopt", &e))?;
        // Close with RST: no TIME_WAIT, so the same source port can dial the same backend again.
        socket.set_linger(Some(Duration::ZERO)).map_err(|e| err("setsockopt", &e))?;
        let local: SocketAddr = if addr.is_ipv4() { ([0, 0, 0, 0], bind_port).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, bind_port).into() };
        socket.bind(&local.into()).map_err(|e| err("bind", &e))?;
        socket.connect_timeout(&addr.into(), opts.timeout).map_err(|e| err("connect", &e))?;
        socket.into()
    };
    stream.set_read_timeout(Some(opts.timeout)).map_err(|e| err("setsockopt", &e))?;
    let peer = stream.peer_addr().map_or_else(|e| format!("? ({e})"), |p| p.to_string());
    let mut reader = BufReader::new(stream.try_clone().map_err(|e| err("clone", &e))?);
    let mut line = String::new();
    reader.read_line(&mut line).map_err(|e| err("read from", &e))?;
    let mut out = format!("connected peer={peer} {}", line.trim_end());
    if opts.echo > 0 {
        // Pseudo-random but reproducible payload; a mismatch names the first differing offset.
        let payload = payload(0, opts.echo);
        let mut writer = stream;
        let mut back = vec![0u8; opts.echo];
        if opts.echo <= SMALL_ECHO {
            // Fits in the socket buffers both ways: no writer thread needed, so a load of new
            // connections measures the mesh, not thread creation.
            writer.write_all(&payload).map_err(|e| err("echo write to", &e))?;
            reader.read_exact(&mut back).map_err(|e| err("echo read from", &e))?;
        } else {
            let sender = {
                let payload = payload.clone();
                thread::spawn(move || writer.write_all(&payload))
            };
            reader.read_exact(&mut back).map_err(|e| err("echo read from", &e))?;
            let _ = sender.join();
        }
        if let Some(at) = back.iter().zip(&payload).position(|(a, b)| a != b) {
            return Err(format!("error: echo mismatch at byte {at} of {}", opts.echo));
        }
        let _ = write!(out, " echo ok bytes={}", opts.echo);
    }
    Ok(out)
}

pub fn udp(addr: SocketAddr, count: u64) -> ExitCode {
    let local: SocketAddr = if addr.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
    let socket = match UdpSocket::bind(local) {
        Ok(s) => s,
        Err(e) => return fail(&format!("bind udp: {e}")),
    };
    let _ = socket.set_read_timeout(Some(Duration::from_secs(3)));
    let mut ok = true;
    let mut buf = [0u8; 2048];
    for _ in 0..count {
        if let Err(e) = socket.send_to(b"hello", addr) {
            println!("error: sendto {addr}: {} ({e})", errno_name(&e));
            ok = false;
            continue;
        }
        match socket.recv_from(&mut buf) {
            Ok((n, from)) => println!("reply from={from} {}", String::from_utf8_lossy(&buf[..n])),
            Err(e) => {
                println!("error: recvfrom: {} ({e})", errno_name(&e));
                ok = false;
            }
        }
    }
    if ok { ExitCode::SUCCESS } else { ExitCode::from(2) }
}

/// Percentiles of `samples` (microseconds) as one JSON line.
#[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss, reason = "sample counts far below 2^52")]
fn report(kind: &str, samples: &mut [f64]) {
    samples.sort_by(f64::total_cmp);
    let pct = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
    println!(
        "{{\"kind\":\"{kind}\",\"n\":{},\"p50_us\":{:.2},\"p90_us\":{:.2},\"p99_us\":{:.2},\"mean_us\":{:.2}}}",
        samples.len(),
        pct(0.5),
        pct(0.9),
        pct(0.99),
        samples.iter().sum::<f64>() / samples.len() as f64
    );
}

pub fn bench_connect(addr: SocketAddr, count: u64) -> ExitCode {
    let mut samples = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    let mut line = String::new();
    for _ in 0..count {
        let started = std::time::Instant::now();
        let stream = match TcpStream::connect(addr) {
            Ok(s) => s,
            Err(e) => return fail(&format!("connect {addr}: {} ({e})", errno_name(&e))),
        };
        samples.push(started.elapsed().as_secs_f64() * 1e6);
        // Read the greeting so the server side completes, then close with RST (no TIME_WAIT).
        let mut reader = BufReader::new(&stream);
        line.clear();
        let _ = reader.read_line(&mut line);
        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    }
    report("connect", &mut samples);
    ExitCode::SUCCESS
}

pub fn request_response(addr: SocketAddr, count: u64, size: usize) -> ExitCode {
    let mut stream = match TcpStream::connect(addr) {
        Ok(s) => s,
        Err(e) => return fail(&format!("connect {addr}: {} ({e})", errno_name(&e))),
    };
    let _ = stream.set_nodelay(true);
    let mut greeting = [0u8; 1];
    // Skip the greeting line byte by byte (it has no fixed length).
    loop {
        if stream.read_exact(&mut greeting).is_err() {
            return fail("no greeting");
        }
        if greeting[0] == b'\n' {
            break;
        }
    }
    let request = vec![0x5au8; size];
    let mut response = vec![0u8; size];
    let mut samples = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    for _ in 0..count {
        let started = std::time::Instant::now();
        if stream.write_all(&request).and_then(|()| stream.read_exact(&mut response)).is_err() {
            return fail("round trip failed");
        }
        if response != request {
            return fail("round trip: the echo differs from what was sent");
        }
        samples.push(started.elapsed().as_secs_f64() * 1e6);
    }
    report("rr", &mut samples);
    ExitCode::SUCCESS
}
