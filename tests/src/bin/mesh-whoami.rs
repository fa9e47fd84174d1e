//! The lab's sample application: a whoami/echo server and a client.
//!
//! `mesh-whoami serve --name NAME --tcp PORT` answers every TCP connection with one line
//! `whoami name=NAME peer=IP:PORT local=IP:PORT`, then echoes back whatever it receives.
//! It prints `listening ...` on stdout once bound, so harnesses can wait for it.
//!
//! `mesh-whoami connect ADDR [--echo BYTES]` connects, prints the server's line prefixed by
//! `connected peer=<getpeername>`, optionally sends BYTES random bytes and checks the echo, and
//! exits 0. On failure it prints `error: connect ADDR: <errno name> (os error N)` and exits 2.
use std::{
    env,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    process::ExitCode,
    thread,
    time::Duration,
};

fn usage() -> ExitCode {
    eprintln!("usage: mesh-whoami serve --name NAME --tcp PORT | connect ADDR [--echo BYTES]");
    ExitCode::from(64)
}

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let flag = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    match args.first().map(String::as_str) {
        Some("serve") => {
            let (Some(name), Some(port)) = (flag("--name"), flag("--tcp")) else { return usage() };
            let Ok(port) = port.parse::<u16>() else { return usage() };
            serve(&name, port)
        }
        Some("connect") => {
            let Some(Ok(addr)) = args.get(1).map(|a| a.parse::<SocketAddr>()) else { return usage() };
            let echo = flag("--echo").and_then(|b| b.parse::<usize>().ok()).unwrap_or(0);
            connect(addr, echo)
        }
        _ => usage(),
    }
}

fn serve(name: &str, port: u16) -> ExitCode {
    let listener = match TcpListener::bind(("0.0.0.0", port)) {
        Ok(l) => l,
        Err(e) => {
            println!("error: bind 0.0.0.0:{port}: {e}");
            return ExitCode::from(2);
        }
    };
    println!("listening tcp {}", listener.local_addr().expect("bound"));
    for stream in listener.incoming().flatten() {
        let name = name.to_owned();
        thread::spawn(move || {
            let _ = handle(&name, stream);
        });
    }
    ExitCode::SUCCESS
}

fn handle(name: &str, mut stream: TcpStream) -> std::io::Result<()> {
    let peer = stream.peer_addr()?;
    let local = stream.local_addr()?;
    writeln!(stream, "whoami name={name} peer={peer} local={local}")?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buf[..n])?;
    }
}

fn connect(addr: SocketAddr, echo: usize) -> ExitCode {
    let stream = match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => {
            let errno = e.raw_os_error().map_or_else(|| "?".to_owned(), errno_name);
            println!("error: connect {addr}: {errno} ({e})");
            return ExitCode::from(2);
        }
    };
    let peer = stream.peer_addr().map_or_else(|e| format!("? ({e})"), |p| p.to_string());
    let mut reader = BufReader::new(stream.try_clone().expect("clone socket"));
    let mut line = String::new();
    if let Err(e) = reader.read_line(&mut line) {
        println!("error: read from {addr}: {e}");
        return ExitCode::from(2);
    }
    println!("connected peer={peer} {}", line.trim_end());
    if echo > 0 {
        let payload: Vec<u8> = (0..echo).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let mut writer = stream;
        let sender = {
            let payload = payload.clone();
            thread::spawn(move || writer.write_all(&payload))
        };
        let mut back = vec![0u8; echo];
        if let Err(e) = reader.read_exact(&mut back) {
            println!("error: echo read: {e}");
            return ExitCode::from(2);
        }
        let _ = sender.join();
        if back != payload {
            println!("error: echo mismatch");
            return ExitCode::from(3);
        }
        println!("echo ok bytes={echo}");
    }
    ExitCode::SUCCESS
}

fn errno_name(code: i32) -> String {
    match code {
        libc::ENETUNREACH => "ENETUNREACH".into(),
        libc::ECONNREFUSED => "ECONNREFUSED".into(),
        libc::EPERM => "EPERM".into(),
        libc::EHOSTUNREACH => "EHOSTUNREACH".into(),
        libc::ETIMEDOUT => "ETIMEDOUT".into(),
        libc::EACCES => "EACCES".into(),
        other => format!("errno {other}"),
    }
}
