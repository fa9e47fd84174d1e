//! Benchmark: the node daemons held under load and attack (issue 15). Root only, ignored by
//! default:
//!
//! ```sh
//! cargo xtask bench --only soak
//! # or, with release binaries built:
//! cargo test --release --locked -p mesh-tests --features privileged --test bench-soak -- --ignored --nocapture
//! ```
//!
//! One node lab (`tests/node/mesh.rs`: daemons pinned to CPU 1, clients and attackers on CPU 0).
//! A prober in n1p1 measures what a legitimate client sees through both daemons the whole time:
//! 64-byte round trips on one connection (100/s) and new connections (connect + the server's
//! greeting, 20/s), p50 and p99.
//!
//! 1. **baseline**: the prober alone, 10 s.
//! 2. **soak**: 10,000 connections from n1p1 to n2p1 through both daemons, each echoing 64 bytes
//!    every 10 s, held `MESH_BENCH_SOAK_SECS` (300); both daemons' RSS, CPU and open files
//!    sampled every 10 s.
//! 3. **after**: all closed; open files and RSS 70 s later (past the pooled HBONE connections'
//!    60 s idle timeout and the daemons' once-a-minute heap trim), against the baseline.
//! 4. **attacks**, 20 s each, one at a time, the prober running: a TLS slowloris on node 2's
//!    HBONE port (1,000 connections from node 1's namespace, one byte of a ClientHello per
//!    second each, reconnecting when cut); an HTTP slowloris through node 1's outbound port
//!    (1,000 connections from n1p1 to the HTTP Service, one header line per second, never
//!    finishing); a flood of 1,000 TLS handshakes per second without a client certificate
//!    against node 2's HBONE port.
//!
//! Nothing is asserted beyond the traffic working (a benchmark reports); results and the command
//! are in `bench/results/soak.md`.

#![expect(clippy::cast_precision_loss, reason = "counts, KiB and seconds printed as f64")]

#[path = "../node/mesh.rs"]
#[allow(dead_code, reason = "shared with the node suite; the benchmark uses part of it")]
mod mesh;

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use mesh::{HTTP_VIP, HTTP1_PORT, MeshLab, Options, spawn_pinned_in as in_netns};

const CONNECTIONS: usize = 10_000;
const ECHO_EVERY: Duration = Duration::from_secs(10);
const ATTACK_SECS: u64 = 20;
const ATTACKERS: usize = 1_000;
const FLOOD_PER_SEC: u64 = 1_000;

fn soak_secs() -> u64 {
    std::env::var("MESH_BENCH_SOAK_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(300)
}

#[test]
#[ignore = "benchmark: run explicitly with --ignored (see the module doc)"]
fn soak_and_attacks() {
    mesh_tests::require_root();
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).expect("getrlimit");
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard).expect("raise RLIMIT_NOFILE");
    // The soak's 10,000 connections and the prober share n1p1's address: one over the default
    // per-source limit (10,000), which the lab raises for this run only.
    let m = MeshLab::start_with(Options { bench: true, http: true, daemon_env: &[("MESH_MAX_CONNECTIONS_PER_SOURCE", "20000")], ..Options::default() });
    m.set_capture(true);
    let server = SocketAddr::new(m.lab.pod("n2p1").ip.into(), 8080);
    let pod = |name: &str| m.lab.pod(name).netns.clone();
    let node1 = m.lab.node(1).netns.clone();
    std::thread::sleep(Duration::from_secs(1));
    let base = Usage::of(&m);

    let mut rows = vec![("baseline".to_owned(), probe_while(&pod("n1p1"), server, || std::thread::sleep(Duration::from_secs(10))))];

    // The soak.
    let secs = soak_secs();
    let stats = Arc::new(SoakStats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let soak = {
        let (stats, stop) = (stats.clone(), stop.clone());
        in_netns(&pod("n1p1"), move || soak_clients(server, &stats, &stop))
    };
    let opening = Instant::now();
    while stats.open.load(Relaxed) + stats.failed.load(Relaxed) < CONNECTIONS as u64 && opening.elapsed() < Duration::from_mins(2) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let opened_in = opening.elapsed();
    println!("soak: {} of {CONNECTIONS} connections open in {opened_in:.1?} ({} failed)", stats.open.load(Relaxed), stats.failed.load(Relaxed));
    let cpu_before = m.daemon_cpu_secs();
    let mut samples = Vec::new();
    let probed = probe_while(&pod("n1p1"), server, || {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(secs) {
            std::thread::sleep(Duration::from_secs(10));
            let u = Usage::of(&m);
            println!("  t={:>3}s  {u}  open {} echoes {} failed {}", start.elapsed().as_secs(), stats.open.load(Relaxed), stats.echoes.load(Relaxed), stats.failed.load(Relaxed));
            samples.push(u);
        }
    });
    let cpu_after = m.daemon_cpu_secs();
    rows.push((format!("{CONNECTIONS} connections held {secs} s"), probed));
    stop.store(true, Relaxed);
    soak.join().expect("soak clients");
    // Past the pooled HBONE connections' idle timeout (60 s) and a minute's heap trim.
    std::thread::sleep(Duration::from_secs(70));
    let after = Usage::of(&m);
    let peak = samples.iter().fold(base, |p, u| Usage { rss_kib: (p.rss_kib.0.max(u.rss_kib.0), p.rss_kib.1.max(u.rss_kib.1)), fds: (p.fds.0.max(u.fds.0), p.fds.1.max(u.fds.1)) });

    // The attacks.
    let hbone = SocketAddr::new(m.lab.pod("n2p1").ip.into(), 15008);
    let http = SocketAddr::new(HTTP_VIP.parse::<IpAddr>().expect("ip"), HTTP1_PORT.0);
    let cut = Arc::new(AtomicU64::new(0));
    let c = cut.clone();
    let probed = probe_while(&pod("n1p1"), server, || in_netns(&node1, move || slowloris(hbone, &TLS_TRICKLE, &c)).join().expect("attacker"));
    rows.push((format!("TLS slowloris on :15008, {ATTACKERS} connections ({} cut)", cut.swap(0, Relaxed)), probed));
    let c = cut.clone();
    let probed = probe_while(&pod("n1p1"), server, || in_netns(&pod("n1p1"), move || slowloris(http, &HTTP_TRICKLE, &c)).join().expect("attacker"));
    rows.push((format!("HTTP slowloris through :15001, {ATTACKERS} connections ({} cut)", cut.swap(0, Relaxed)), probed));
    let mut flood = (0, 0);
    let probed = probe_while(&pod("n1p1"), server, || flood = in_netns(&node1, move || tls_flood(hbone)).join().expect("flood"));
    rows.push((format!("TLS flood on :15008 ({:.0} handshakes/s attempted, {} refused by the daemon)", flood.0 as f64 / ATTACK_SECS as f64, flood.1), probed));
    let end = Usage::of(&m);

    let cpu = |i: usize| {
        let (b, a) = if i == 0 { (cpu_before.0, cpu_after.0) } else { (cpu_before.1, cpu_after.1) };
        (a - b) / secs as f64 * 100.0
    };
    println!("\n## Soak: {CONNECTIONS} connections through both daemons for {secs} s (commit {})\n", git_head());
    println!("| daemon (node 1 client side / node 2 server side) | before | peak during | 70 s after closing | after the attacks |\n|---|---|---|---|---|");
    println!("| RSS, MiB | {:.1} / {:.1} | {:.1} / {:.1} | {:.1} / {:.1} | {:.1} / {:.1} |", mib(base.rss_kib.0), mib(base.rss_kib.1), mib(peak.rss_kib.0), mib(peak.rss_kib.1), mib(after.rss_kib.0), mib(after.rss_kib.1), mib(end.rss_kib.0), mib(end.rss_kib.1));
    println!("| open files | {} / {} | {} / {} | {} / {} | {} / {} |", base.fds.0, base.fds.1, peak.fds.0, peak.fds.1, after.fds.0, after.fds.1, end.fds.0, end.fds.1);
    println!("\nOpened in {opened_in:.1?}; CPU while held: {:.1} % / {:.1} % of one core; echoes {}; failures {}.", cpu(0), cpu(1), stats.echoes.load(Relaxed), stats.failed.load(Relaxed));
    println!(
        "Per connection at the peak: {:.1} / {:.1} KiB RSS.",
        (peak.rss_kib.0 - base.rss_kib.0) as f64 / CONNECTIONS as f64,
        (peak.rss_kib.1 - base.rss_kib.1) as f64 / CONNECTIONS as f64
    );
    println!("\n## What a legitimate client of n1p1 saw (through both daemons)\n");
    println!("| while | round trip p50 / p99 µs | ratio to baseline p50 / p99 | new connection p50 / p99 µs | ratio p50 / p99 | failed |\n|---|---|---|---|---|---|");
    let baseline = rows[0].1.clone();
    for (what, p) in &rows {
        println!(
            "| {what} | {:.0} / {:.0} | {:.2} / {:.2} | {:.0} / {:.0} | {:.2} / {:.2} | {} |",
            p.rtt.0,
            p.rtt.1,
            p.rtt.0 / baseline.rtt.0,
            p.rtt.1 / baseline.rtt.1,
            p.setup.0,
            p.setup.1,
            p.setup.0 / baseline.setup.0,
            p.setup.1 / baseline.setup.1,
            p.failed
        );
    }
    assert!(stats.open.load(Relaxed) >= CONNECTIONS as u64, "all soak connections opened");
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn git_head() -> String {
    std::process::Command::new("git").args(["rev-parse", "--short", "HEAD"]).output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned()).unwrap_or_default()
}

/// Both daemons' resident memory (KiB) and open files.
#[derive(Clone, Copy)]
struct Usage {
    rss_kib: (u64, u64),
    fds: (usize, usize),
}

impl Usage {
    fn of(m: &MeshLab) -> Self {
        let (a, b) = m.daemon_pids();
        let fds = |pid: u32| std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count);
        Self { rss_kib: m.daemon_rss_kib(), fds: (fds(a), fds(b)) }
    }
}

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RSS {:.1} / {:.1} MiB, files {} / {}", mib(self.rss_kib.0), mib(self.rss_kib.1), self.fds.0, self.fds.1)
    }
}

/// p50/p99 (µs) of round trips and of new connections, and how many probes failed.
#[derive(Clone)]
struct Probed {
    rtt: (f64, f64),
    setup: (f64, f64),
    failed: u64,
}

/// Probes `server` from `netns` while `during` runs.
fn probe_while(netns: &str, server: SocketAddr, during: impl FnOnce()) -> Probed {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let prober = in_netns(netns, move || probe(server, &s));
    during();
    stop.store(true, Relaxed);
    prober.join().expect("prober")
}

fn probe(server: SocketAddr, stop: &AtomicBool) -> Probed {
    let greeted = |s: &TcpStream| {
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).is_ok_and(|_| line.starts_with("whoami"))
    };
    let mut conn = TcpStream::connect(server).expect("the prober's connection");
    conn.set_nodelay(true).expect("nodelay");
    conn.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    assert!(greeted(&conn), "greeting");
    let (mut rtts, mut setups, mut failed) = (Vec::new(), Vec::new(), 0);
    let (msg, mut buf) = ([7u8; 64], [0u8; 64]);
    let mut next = Instant::now();
    let mut tick = 0u64;
    while !stop.load(Relaxed) {
        let t = Instant::now();
        if conn.write_all(&msg).and_then(|()| conn.read_exact(&mut buf)).is_ok() {
            rtts.push(t.elapsed().as_secs_f64() * 1e6);
        } else {
            failed += 1;
        }
        if tick.is_multiple_of(5) {
            let t = Instant::now();
            match TcpStream::connect_timeout(&server, Duration::from_secs(5)) {
                Ok(s) if s.set_read_timeout(Some(Duration::from_secs(5))).is_ok() && greeted(&s) => setups.push(t.elapsed().as_secs_f64() * 1e6),
                _ => failed += 1,
            }
        }
        tick += 1;
        next += Duration::from_millis(10);
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    Probed { rtt: percentiles(&mut rtts), setup: percentiles(&mut setups), failed }
}

fn percentiles(v: &mut [f64]) -> (f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[v.len() * 99 / 100])
}

#[derive(Default)]
struct SoakStats {
    open: AtomicU64,
    echoes: AtomicU64,
    failed: AtomicU64,
}

/// Opens `CONNECTIONS` connections (256 dials at a time) and echoes 64 bytes on each every
/// `ECHO_EVERY` (spread over the period) until `stop`.
fn soak_clients(server: SocketAddr, stats: &Arc<SoakStats>, stop: &Arc<AtomicBool>) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let dials = Arc::new(tokio::sync::Semaphore::new(256));
        let tasks: Vec<_> = (0..CONNECTIONS)
            .map(|i| {
                let (stats, stop, dials) = (stats.clone(), stop.clone(), dials.clone());
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                    let permit = dials.acquire_owned().await.expect("semaphore");
                    let conn = hold_open(server).await;
                    drop(permit);
                    let Ok(mut s) = conn else { return stats.failed.fetch_add(1, Relaxed) };
                    stats.open.fetch_add(1, Relaxed);
                    let offset = ECHO_EVERY * u32::try_from(i).expect("small") / u32::try_from(CONNECTIONS).expect("small");
                    let mut timer = tokio::time::interval_at(tokio::time::Instant::now() + offset, ECHO_EVERY);
                    let mut buf = [0u8; 64];
                    while !stop.load(Relaxed) {
                        tokio::select! {
                            _ = timer.tick() => {}
                            () = tokio::time::sleep(Duration::from_millis(500)) => continue,
                        }
                        if s.write_all(&[9u8; 64]).await.is_err() || s.read_exact(&mut buf).await.is_err() {
                            return stats.failed.fetch_add(1, Relaxed);
                        }
                        stats.echoes.fetch_add(1, Relaxed);
                    }
                    0
                })
            })
            .collect();
        for t in tasks {
            let _ = t.await;
        }
    });
}

async fn hold_open(server: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    use tokio::io::AsyncReadExt as _;
    let mut s = tokio::time::timeout(Duration::from_secs(10), tokio::net::TcpStream::connect(server)).await.map_err(|_| std::io::ErrorKind::TimedOut)??;
    // The greeting line, byte by byte (small, once).
    let mut b = [0u8; 1];
    loop {
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut b)).await.map_err(|_| std::io::ErrorKind::TimedOut)??;
        if b[0] == b'\n' {
            return Ok(s);
        }
    }
}

/// A TLS record header announcing a 512-byte ClientHello, then the first bytes of it.
const TLS_TRICKLE: [&[u8]; 8] = [&[0x16], &[0x03], &[0x01], &[0x02], &[0x00], &[0x01], &[0x00], &[0x01]];
/// An HTTP/1.1 request whose headers never end.
const HTTP_TRICKLE: [&[u8]; 8] = [b"GET / HTTP/1.1\r\n", b"host: x\r\n", b"x-a: 1\r\n", b"x-b: 2\r\n", b"x-c: 3\r\n", b"x-d: 4\r\n", b"x-e: 5\r\n", b"x-f: 6\r\n"];

/// `ATTACKERS` connections to `target`, each sending the next piece of `trickle` every second
/// (then one byte of the last piece per second) for `ATTACK_SECS`, reconnecting when the
/// server cuts it; counts the cuts.
fn slowloris(target: SocketAddr, trickle: &'static [&'static [u8]; 8], cut: &Arc<AtomicU64>) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let end = tokio::time::Instant::now() + Duration::from_secs(ATTACK_SECS);
        let tasks: Vec<_> = (0..ATTACKERS)
            .map(|_| {
                let cut = cut.clone();
                tokio::spawn(async move {
                    use tokio::io::AsyncWriteExt as _;
                    while tokio::time::Instant::now() < end {
                        let Ok(Ok(mut s)) = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(target)).await else {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        };
                        let mut piece = 0;
                        loop {
                            let bytes = trickle.get(piece).copied().unwrap_or(b" ");
                            if s.write_all(bytes).await.is_err() || ends_within_a_second(&mut s).await {
                                cut.fetch_add(1, Relaxed);
                                break;
                            }
                            piece += 1;
                            if tokio::time::Instant::now() >= end {
                                return;
                            }
                        }
                    }
                })
            })
            .collect();
        for t in tasks {
            let _ = t.await;
        }
    });
}

/// Waits a second: true if the server closed the connection (or answered, giving up on it)
/// within it.
async fn ends_within_a_second(s: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt as _;
    let mut b = [0u8; 256];
    tokio::time::timeout(Duration::from_secs(1), s.read(&mut b)).await.is_ok()
}

/// `FLOOD_PER_SEC` TLS handshakes per second without a client certificate against `target`
/// for `ATTACK_SECS` (16 threads, paced): each costs the daemon a key exchange and a signature
/// before it refuses the missing certificate. Returns (attempted, refused by the daemon).
fn tls_flood(target: SocketAddr) -> (u64, u64) {
    const THREADS: u64 = 16;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = Arc::new(
        rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
            .with_no_client_auth(),
    );
    let (attempted, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let end = Instant::now() + Duration::from_secs(ATTACK_SECS);
    let threads: Vec<_> = (0..THREADS)
        .map(|_| {
            let (config, attempted, refused) = (config.clone(), attempted.clone(), refused.clone());
            std::thread::spawn(move || {
                let interval = Duration::from_secs(THREADS) / u32::try_from(FLOOD_PER_SEC).expect("small");
                let mut next = Instant::now();
                while Instant::now() < end {
                    attempted.fetch_add(1, Relaxed);
                    if handshake(&config, target).is_err() {
                        refused.fetch_add(1, Relaxed);
                    }
                    next += interval;
                    if let Some(wait) = next.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("flood thread");
    }
    (attempted.load(Relaxed), refused.load(Relaxed))
}

fn handshake(config: &Arc<rustls::ClientConfig>, target: SocketAddr) -> Result<(), Box<dyn std::error::Error>> {
    let mut tcp = TcpStream::connect_timeout(&target, Duration::from_secs(2))?;
    tcp.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut tls = rustls::ClientConnection::new(config.clone(), rustls_pki_types::ServerName::IpAddress(target.ip().into()))?;
    while tls.is_handshaking() {
        tls.complete_io(&mut tcp)?;
    }
    // TLS 1.3: the client's (empty) certificate is judged after its Finished; the refusal
    // arrives as an alert on the first read.
    let mut b = [0u8; 1];
    let _answered = rustls::Stream::new(&mut tls, &mut tcp).read(&mut b)?;
    Ok(())
}

/// Accepts any server certificate: the flood measures the server's cost, not the client's.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
