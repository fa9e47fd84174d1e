//! The lab's sample application and test client.
//!
//! Servers (each prints `listening ...` on stdout once bound):
//! - `serve --name NAME [--node NODE] [--tcp PORT] [--udp PORT] [--http PORT]`: every TCP
//!   connection gets one line
//!   `whoami name=NAME peer=IP:PORT local=IP:PORT`, then an echo of whatever it sends; every UDP
//!   datagram is answered with `whoami name=NAME peer=IP:PORT`; every HTTP/1.1 request (keep-alive)
//!   is answered with a JSON body `{"pod":..,"node":..,"peer":..,"method":..,"path":..}`.
//! - `origdst --listen ADDR`: a stand-in for the node daemon's outbound listener: answers each
//!   connection with `orig=IP:PORT peer=IP:PORT` from getsockopt(SO_ORIGINAL_DST), or
//!   `orig=none (error)`.
//!
//! Clients:
//! - `connect ADDR [--count N] [--bind-port P] [--echo BYTES] [--timeout-ms MS]`: N connections
//!   (from source ports P, P+1, ... when given), one result line each: `connected peer=<getpeername>
//!   <server line>` or `error: connect ADDR: <ERRNO> (<message>)`; with --echo, sends BYTES
//!   pseudo-random bytes and checks the echo byte for byte. Exit 0 only if all succeeded.
//! - `udp ADDR [--count N]`: N datagrams from one unconnected socket, one line per reply:
//!   `reply from=<recvfrom address> <server line>`.
//!
//! Measurements (one JSON line of latency percentiles in microseconds):
//! - `bench-connect ADDR --count N`: N × (connect, read the server line, close with RST);
//!   times the connect() call alone.
//! - `rr ADDR --count N [--size BYTES]`: one connection, N request/response round trips of
//!   BYTES through the echo server.
use std::{
    env,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::ExitCode,
    thread,
    time::Duration,
};

fn usage() -> ExitCode {
    eprintln!("usage: mesh-whoami serve --name NAME --tcp PORT [--udp PORT] | origdst --listen ADDR |");
    eprintln!("       connect ADDR [--count N] [--bind-port P] [--echo BYTES] [--timeout-ms MS] | udp ADDR [--count N]");
    ExitCode::from(64)
}

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let flag = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let num = |name: &str, default: u64| flag(name).and_then(|v| v.parse::<u64>().ok()).unwrap_or(default);
    let addr = || args.get(1).and_then(|a| a.parse::<SocketAddr>().ok());
    match args.first().map(String::as_str) {
        Some("serve") => {
            let Some(name) = flag("--name") else { return usage() };
            let port = |f: &str| flag(f).and_then(|p| p.parse::<u16>().ok());
            let node = flag("--node").unwrap_or_default();
            serve(&name, &node, port("--tcp"), port("--udp"), port("--http"))
        }
        Some("origdst") => match flag("--listen").and_then(|a| a.parse().ok()) {
            Some(listen) => origdst(listen),
            None => usage(),
        },
        Some("connect") => {
            let Some(addr) = addr() else { return usage() };
            let opts = ConnectOpts {
                count: num("--count", 1),
                bind_port: u16::try_from(num("--bind-port", 0)).unwrap_or(0),
                echo: usize::try_from(num("--echo", 0)).unwrap_or(0),
                timeout: Duration::from_millis(num("--timeout-ms", 5000)),
            };
            connect_all(addr, &opts)
        }
        Some("bench-connect") => match addr() {
            Some(addr) => bench_connect(addr, num("--count", 1000)),
            None => usage(),
        },
        Some("rr") => match addr() {
            Some(addr) => request_response(addr, num("--count", 10_000), usize::try_from(num("--size", 64)).unwrap_or(64)),
            None => usage(),
        },
        Some("udp") => match addr() {
            Some(addr) => udp(addr, num("--count", 1)),
            None => usage(),
        },
        _ => usage(),
    }
}

fn serve(name: &str, node: &str, tcp: Option<u16>, udp: Option<u16>, http: Option<u16>) -> ExitCode {
    if tcp.is_none() && udp.is_none() && http.is_none() {
        return usage();
    }
    let mut threads = Vec::new();
    if let Some(port) = http {
        let listener = match TcpListener::bind(("::", port)) {
            Ok(l) => l,
            Err(e) => return fail(&format!("bind http [::]:{port}: {e}")),
        };
        println!("listening http {}", listener.local_addr().expect("bound"));
        let (name, node) = (name.to_owned(), node.to_owned());
        threads.push(thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (name, node) = (name.clone(), node.clone());
                thread::spawn(move || {
                    let _ = handle_http(&name, &node, stream);
                });
            }
        }));
    }
    if let Some(port) = udp {
        let socket = match UdpSocket::bind(("::", port)) {
            Ok(s) => s,
            Err(e) => return fail(&format!("bind udp [::]:{port}: {e}")),
        };
        println!("listening udp {}", socket.local_addr().expect("bound"));
        let name = name.to_owned();
        threads.push(thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((_, peer)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(format!("whoami name={name} peer={}", unmap(peer)).as_bytes(), peer);
            }
        }));
    }
    if let Some(port) = tcp {
        // A dual-stack listener: IPv4 clients appear as IPv4-mapped, printed as plain IPv4.
        let listener = match TcpListener::bind(("::", port)) {
            Ok(l) => l,
            Err(e) => return fail(&format!("bind tcp [::]:{port}: {e}")),
        };
        println!("listening tcp {}", listener.local_addr().expect("bound"));
        for stream in listener.incoming().flatten() {
            // One line per accepted connection: tests use it to prove a server saw nothing.
            if let Ok(peer) = stream.peer_addr() {
                println!("accept peer={}", unmap(peer));
            }
            let name = name.to_owned();
            thread::spawn(move || {
                let _ = handle(&name, stream);
            });
        }
    }
    for t in threads {
        let _ = t.join();
    }
    ExitCode::SUCCESS
}

fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

fn fail(msg: &str) -> ExitCode {
    println!("error: {msg}");
    ExitCode::from(2)
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

/// Minimal HTTP/1.1: request head, optional Content-Length body, keep-alive until the client
/// closes or sends `Connection: close`.
fn handle_http(name: &str, node: &str, stream: TcpStream) -> std::io::Result<()> {
    let peer = unmap(stream.peer_addr()?);
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let mut parts = request_line.split_whitespace();
        let (method, path) = (parts.next().unwrap_or("").to_owned(), parts.next().unwrap_or("").to_owned());
        let (mut length, mut close) = (0usize, false);
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header)? == 0 {
                return Ok(());
            }
            let h = header.trim_end();
            if h.is_empty() {
                break;
            }
            let lower = h.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            } else if lower.starts_with("connection:") && lower.contains("close") {
                close = true;
            }
        }
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body)?;
        let json = format!(
            "{{\"pod\":\"{name}\",\"node\":\"{node}\",\"peer\":\"{peer}\",\"method\":\"{method}\",\"path\":\"{}\"}}\n",
            path.replace(['"', '\\'], "")
        );
        write!(writer, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{json}", json.len())?;
        if close {
            return Ok(());
        }
    }
}

fn origdst(listen: SocketAddr) -> ExitCode {
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
        let mut len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
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

struct ConnectOpts {
    count: u64,
    bind_port: u16,
    echo: usize,
    timeout: Duration,
}

fn connect_all(addr: SocketAddr, opts: &ConnectOpts) -> ExitCode {
    let mut ok = true;
    for i in 0..opts.count {
        let port = if opts.bind_port == 0 { 0 } else { opts.bind_port.wrapping_add(u16::try_from(i).unwrap_or(0)) };
        match connect_one(addr, port, opts) {
            Ok(line) => println!("{line}"),
            Err(line) => {
                println!("{line}");
                ok = false;
            }
        }
    }
    if ok { ExitCode::SUCCESS } else { ExitCode::from(2) }
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
        let payload: Vec<u8> = (0..opts.echo).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let mut writer = stream;
        let sender = {
            let payload = payload.clone();
            thread::spawn(move || writer.write_all(&payload))
        };
        let mut back = vec![0u8; opts.echo];
        reader.read_exact(&mut back).map_err(|e| err("echo read from", &e))?;
        let _ = sender.join();
        if let Some(at) = back.iter().zip(&payload).position(|(a, b)| a != b) {
            return Err(format!("error: echo mismatch at byte {at} of {}", opts.echo));
        }
        out.push_str(&format!(" echo ok bytes={}", opts.echo));
    }
    Ok(out)
}

fn udp(addr: SocketAddr, count: u64) -> ExitCode {
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

fn bench_connect(addr: SocketAddr, count: u64) -> ExitCode {
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

fn request_response(addr: SocketAddr, count: u64, size: usize) -> ExitCode {
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
        samples.push(started.elapsed().as_secs_f64() * 1e6);
    }
    report("rr", &mut samples);
    ExitCode::SUCCESS
}
