//! The sample app's L7 side and the client tools, driven by real clients (curl, grpcurl,
//! h2load, wrk, and our own `http-load`, `ws-client`, `grpc-call`) on loopback only.
//! Unprivileged: part of a plain `cargo test`. The tools come from `scripts/setup.sh`; a
//! missing one fails the test with that hint (see `mesh_tests::tools`).

mod grpc;
mod http;
mod load;

use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::{
        Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    thread,
    time::Duration,
};

use mesh_tests::whoami::Seen;

const WHOAMI: &str = env!("CARGO_BIN_EXE_mesh-whoami");

/// Tests that measure time or load the CPU run one at a time: on a 2-core machine a 100 MB
/// upload next to a latency measurement would make either flaky.
static HEAVY: Mutex<()> = Mutex::new(());

fn heavy() -> MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A `mesh-whoami serve` on ephemeral ports (HTTP and gRPC), killed when dropped.
struct App {
    child: Child,
    http: u16,
    grpc: u16,
    /// Its `--request-log`.
    log: PathBuf,
}

impl App {
    /// Pod `app-1`, node `n1`, version `v7`.
    fn start() -> Self {
        Self::start_with(&[])
    }

    /// The same, with more `serve` flags.
    fn start_with(extra: &[&str]) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let log = std::env::temp_dir().join(format!("mesh-apps-{}-{n}.jsonl", std::process::id()));
        let mut child = Command::new(WHOAMI)
            .args(["serve", "--name", "app-1", "--node", "n1", "--version", "v7", "--http", "0", "--grpc", "0"])
            .arg("--request-log")
            .arg(&log)
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn mesh-whoami serve");
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        let (tx, rx) = mpsc::channel();
        // Reads the listening lines, then keeps draining so the server never blocks on stdout.
        thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let port = |line: &str| line.rsplit(':').next().and_then(|p| p.parse::<u16>().ok()).expect("listening line ends with the port");
        let (mut http, mut grpc) = (None, None);
        while http.is_none() || grpc.is_none() {
            let line = rx.recv_timeout(Duration::from_secs(10)).expect("mesh-whoami serve prints its listening lines");
            if line.starts_with("listening http ") {
                http = Some(port(&line));
            } else if line.starts_with("listening grpc ") {
                grpc = Some(port(&line));
            }
        }
        Self { child, http: http.expect("read"), grpc: grpc.expect("read"), log }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http)
    }

    fn grpc_addr(&self) -> String {
        format!("127.0.0.1:{}", self.grpc)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The request log so far, one entry per request received.
    fn requests(&self) -> Vec<Seen> {
        std::fs::read_to_string(&self.log)
            .expect("request log")
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("request log line {l:?}: {e}")))
            .collect()
    }

    /// Peak resident memory (VmHWM) in KiB.
    fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("/proc status");
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM line");
        line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("VmHWM value")
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Runs a command to completion; panics if it cannot start.
fn run(program: &std::path::Path, args: &[&str]) -> Output {
    Command::new(program).args(args).output().unwrap_or_else(|e| panic!("run {}: {e}", program.display()))
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `mesh-whoami ARGS` and returns its output.
fn whoami(args: &[&str]) -> Output {
    run(std::path::Path::new(WHOAMI), args)
}
