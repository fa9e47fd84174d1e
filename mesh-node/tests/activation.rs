//! Socket activation against systemd's own implementation of the protocol:
//! `systemd-socket-activate` (Debian's `systemd` package) binds a port, names the socket and
//! execs the real `mesh-node` binary, as a `.socket` unit does. Unprivileged: no datapath, no
//! routing, loopback only. Started under `prlimit --nofile=1024:8192`, the daemon must also
//! have raised its open files limit to the hard one.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// The controller's tests have the same need; one helper serves both.
#[path = "../../mesh-control/tests/support/ports.rs"]
mod ports;
use ports::free_port;

fn get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(s, "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

#[test]
fn mesh_node_serves_the_listener_systemd_passes() {
    let tool = "systemd-socket-activate";
    assert!(
        Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success()),
        "{tool} is missing: install Debian's systemd package (it ships the tool)"
    );
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let any = "127.0.0.1:0";
    let child = Command::new("prlimit")
        .args(["--nofile=1024:8192", "--", tool])
        .args(["-l", &metrics.to_string(), "--fdname=metrics"])
        .args(["-E", "MESH_NODE_NAME=n1", "-E", "MESH_DATAPATH=false", "-E", "MESH_HBONE_REDIRECT=false"])
        .args(["-E", &format!("MESH_OUTBOUND_ADDR={any}"), "-E", &format!("MESH_INBOUND_ADDR={any}")])
        .args(["-E", &format!("MESH_INBOUND_PLAINTEXT_ADDR={any}"), "-E", &format!("MESH_ADMIN_ADDR={any}")])
        // The port systemd binds is what the configuration names.
        .args(["-E", &format!("MESH_METRICS_ADDR={metrics}")])
        .arg(env!("CARGO_BIN_EXE_mesh-node"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start systemd-socket-activate");
    let mut child = Killed(child);
    // The socket exists before mesh-node runs: a request made now waits in its accept queue.
    let started = Instant::now();
    let answer = loop {
        match get(metrics, "/healthz/live") {
            Ok(a) if !a.is_empty() => break a,
            _ if started.elapsed() > Duration::from_secs(20) => {
                let _ = child.0.kill();
                let mut log = String::new();
                let _ = child.0.stderr.take().map(|mut e| e.read_to_string(&mut log));
                panic!("no answer from the passed metrics socket in 20 s; mesh-node said:\n{log}");
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // prlimit and systemd-socket-activate exec in place: the child is mesh-node itself.
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.0.id())).expect("limits");
    let open_files = limits.lines().find(|l| l.starts_with("Max open files")).unwrap_or_default().to_owned();
    assert_eq!(open_files.split_whitespace().nth(3), Some("8192"), "soft limit raised to the hard one: {open_files}");
    let _ = child.0.kill();
    let mut log = String::new();
    let _ = child.0.stderr.take().map(|mut e| e.read_to_string(&mut log));
    assert!(log.contains("socket activation") && log.contains("metrics"), "mesh-node says it serves the passed listener:\n{log}");
}
