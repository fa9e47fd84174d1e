//! The HTTP port: HTTP/1.1 and h2c side by side, pipelining, the special paths, WebSocket, and
//! a 100 MB upload that must stream.

use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::TcpStream,
    process::{Command, Output, Stdio},
    thread,
    time::Duration,
};

use mesh_tests::{tools, whoami::Seen};

use crate::{App, heavy, run, stdout, whoami};

fn curl(args: &[&str]) -> Output {
    let curl = tools::curl().expect("curl");
    run(&curl, &[&["-s", "--max-time", "30"], args].concat())
}

fn seen(out: &Output) -> Seen {
    serde_json::from_str(&stdout(out)).unwrap_or_else(|e| panic!("JSON answer expected ({e}): {out:?}"))
}

#[test]
fn http1_and_h2c_are_served_on_one_port_and_logged_as_seen() {
    let app = App::start();
    let url = app.url("/some/path?a=1&b=two");
    let h1 = seen(&curl(&["--http1.1", "-H", "x-test: one", &url]));
    let h2 = seen(&curl(&["--http2-prior-knowledge", "-H", "x-test: two", &url]));
    let post = seen(&curl(&["--http1.1", "-X", "POST", "--data-binary", "hello", &app.url("/rewritten")]));

    assert_eq!((h1.protocol.as_str(), h2.protocol.as_str()), ("HTTP/1.1", "HTTP/2"));
    for (s, value) in [(&h1, "one"), (&h2, "two")] {
        assert_eq!((s.pod.as_str(), s.node.as_str(), s.version.as_str()), ("app-1", "n1", "v7"), "{s:?}");
        assert_eq!((s.method.as_str(), s.path.as_str(), s.query.as_str()), ("GET", "/some/path", "a=1&b=two"), "{s:?}");
        assert_eq!(s.host, format!("127.0.0.1:{}", app.http), "Host or :authority: {s:?}");
        assert_eq!(s.headers.get("x-test").map(String::as_str), Some(value), "{s:?}");
        assert!(s.peer.starts_with("127.0.0.1:"), "IPv4 clients are shown as IPv4: {s:?}");
    }
    assert_eq!((post.method.as_str(), post.path.as_str(), post.body_bytes), ("POST", "/rewritten", 5), "{post:?}");
    // The request log is what a mirror or rewrite test reads: the same record, per request.
    assert_eq!(app.requests(), vec![h1, h2, post]);
}

#[test]
fn status_delay_and_streamed_bytes_on_both_protocols() {
    let app = App::start();
    for protocol in ["--http1.1", "--http2-prior-knowledge"] {
        let code = |path: &str| stdout(&curl(&[protocol, "-o", "/dev/null", "-w", "%{http_code}", &app.url(path)]));
        assert_eq!(code("/status/503"), "503", "{protocol}");
        assert_eq!(code("/status/418"), "418", "{protocol}");
        assert_eq!(code("/status/abc"), "400", "{protocol}: a bad code is refused, not ignored");
        assert_eq!(code("/bytes/x"), "400", "{protocol}");

        let took = stdout(&curl(&[protocol, "-o", "/dev/null", "-w", "%{time_total}", &app.url("/delay/300")]));
        let took: f64 = took.parse().unwrap_or_else(|_| panic!("curl time_total {took:?}"));
        assert!((0.3..5.0).contains(&took), "{protocol}: /delay/300 answered after {took} s");

        // Headers to a file of their own, the body on stdout.
        let head = std::env::temp_dir().join(format!("mesh-apps-head-{}", std::process::id()));
        let out = curl(&[protocol, "-D", head.to_str().expect("utf-8 path"), &app.url("/bytes/3000000")]);
        let headers = std::fs::read_to_string(&head).expect("headers").to_ascii_lowercase();
        let _ = std::fs::remove_file(&head);
        assert_eq!(out.stdout.len(), 3_000_000, "{protocol}");
        assert!(out.stdout.iter().enumerate().all(|(i, b)| *b == b"abcdefghijklmnopqrstuvwxyz"[i % 26]), "{protocol}: pattern");
        assert!(!headers.contains("content-length"), "{protocol}: streamed, so no length up front:\n{headers}");
        if protocol == "--http1.1" {
            assert!(headers.contains("transfer-encoding: chunked"), "{headers}");
        }
        assert!(headers.contains("x-whoami-pod: app-1"), "{headers}");
    }
}

#[test]
fn flaky_paths_and_a_backend_started_to_fail() {
    let app = App::start();
    let code = |path: &str| stdout(&curl(&["-o", "/dev/null", "-w", "%{http_code}", &app.url(path)]));
    // The first two requests with this path and query fail, later ones succeed: what a retry
    // test needs from a single backend. Another query counts on its own.
    let codes: Vec<String> = (0..3).map(|_| code("/flaky/2/503?id=a")).collect();
    assert_eq!(codes, ["503", "503", "200"]);
    assert_eq!(code("/flaky/2/503?id=b"), "503");
    assert_eq!(code("/flaky/x/503"), "400");

    // A backend started as the bad one: ordinary answers fail, but still say who answered.
    let bad = App::start_with(&["--http-status", "503"]);
    let out = curl(&["-w", "\n%{http_code}", &bad.url("/anything")]);
    let text = stdout(&out);
    let (body, status) = text.rsplit_once('\n').expect("status line");
    assert_eq!(status, "503");
    assert_eq!(serde_json::from_str::<Seen>(body).expect("JSON").pod, "app-1");
    let code = |path: &str| stdout(&curl(&["-o", "/dev/null", "-w", "%{http_code}", &bad.url(path)]));
    assert_eq!(code("/status/200"), "200", "an explicit /status wins");
}

#[test]
fn pipelined_requests_are_answered_in_order_on_one_connection() {
    let app = App::start();
    // curl and browsers no longer pipeline, so the client here is a socket writing three
    // requests in one segment, exactly what a pipelining client (or a proxy) sends.
    let request = |path: &str, close: bool| {
        format!("GET /{path} HTTP/1.1\r\nHost: pipelined\r\n{}\r\n", if close { "Connection: close\r\n" } else { "" })
    };
    let mut socket = TcpStream::connect(("127.0.0.1", app.http)).expect("connect");
    socket.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let all = format!("{}{}{}", request("first", false), request("second", false), request("third", true));
    socket.write_all(all.as_bytes()).expect("write");
    let mut answers = String::new();
    socket.read_to_string(&mut answers).expect("the server closes after the third answer");
    assert_eq!(answers.matches("HTTP/1.1 200 OK").count(), 3, "{answers}");
    let at = |path: &str| answers.find(&format!("\"path\":\"/{path}\"")).unwrap_or_else(|| panic!("/{path} in {answers}"));
    assert!(at("first") < at("second") && at("second") < at("third"), "answers out of order: {answers}");
    let peers: Vec<String> = app.requests().into_iter().map(|s| s.peer).collect();
    assert!(peers.len() == 3 && peers.iter().all(|p| *p == peers[0]), "one connection: {peers:?}");
}

#[test]
fn websocket_echo_through_ws_client() {
    let app = App::start();
    let url = format!("ws://127.0.0.1:{}/ws", app.http);
    // Small frames, and frames past 65535 bytes (the 64-bit length form).
    for (messages, size) in [(50, 10), (5, 200_000)] {
        let out = whoami(&["ws-client", &url, "--messages", &messages.to_string(), "--size", &size.to_string()]);
        assert!(out.status.success(), "{out:?}");
        assert_eq!(stdout(&out).trim(), format!("ws ok messages={messages} bytes={} pod=app-1", messages * size));
    }
    // Without a handshake /ws refuses; and ws-client fails where no WebSocket answers.
    assert_eq!(stdout(&curl(&["-o", "/dev/null", "-w", "%{http_code}", &app.url("/ws")])), "426");
    let out = whoami(&["ws-client", &format!("ws://127.0.0.1:{}/not-ws", app.http), "--messages", "1"]);
    assert!(!out.status.success() && stdout(&out).starts_with("error: connect"), "{out:?}");
}

/// Streams `chunks` MiB into `curl -T -` and returns curl's output and the SHA-256 sent.
fn upload(app: &App, protocol: &str, chunks: u64) -> (Output, String) {
    let mut curl = Command::new(tools::curl().expect("curl"))
        .args(["-s", "--max-time", "120", protocol, "-X", "POST", "-T", "-", &app.url("/upload")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn curl");
    let mut stdin = curl.stdin.take().expect("piped");
    let writer = thread::spawn(move || {
        let mut sha256 = ring::digest::Context::new(&ring::digest::SHA256);
        let mut chunk = mesh_tests::whoami::payload(0, 1 << 20);
        for i in 0..chunks {
            chunk[..8].copy_from_slice(&i.to_le_bytes());
            sha256.update(&chunk);
            stdin.write_all(&chunk).expect("curl reads the upload");
        }
        sha256.finish().as_ref().iter().fold(String::new(), |mut hex, b| {
            let _ = write!(hex, "{b:02x}");
            hex
        })
    });
    let sent = writer.join().expect("writer");
    (curl.wait_with_output().expect("curl"), sent)
}

#[test]
fn a_100_mb_upload_is_streamed_and_hashed_in_bounded_memory() {
    let _heavy = heavy();
    let app = App::start();
    let before = app.peak_rss_kib();
    for (protocol, mib) in [("--http1.1", 100), ("--http2-prior-knowledge", 100)] {
        let (out, sha256) = upload(&app, protocol, mib);
        let answer: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap_or_else(|e| panic!("{protocol}: {e}: {out:?}"));
        assert_eq!(answer, serde_json::json!({ "bytes": mib << 20, "sha256": sha256 }), "{protocol}");
    }
    let after = app.peak_rss_kib();
    // Holding the body would take 100 MiB; streaming takes a few socket buffers.
    assert!(after < before + 32 * 1024, "peak RSS went from {before} KiB to {after} KiB during the uploads");
    let log = app.requests();
    assert_eq!(log.iter().map(|s| (s.path.as_str(), s.body_bytes)).collect::<Vec<_>>(), [("/upload", 100 << 20); 2]);
}
