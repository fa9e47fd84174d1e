use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt as _;
use tokio::io::DuplexStream;

use super::*;
use crate::{body, server};

/// Connections are in-memory pipes to a real hyper server (the crate's own `server::serve`)
/// answering `<n>` with the request count seen on that connection.
#[derive(Clone, Default)]
struct Loopback {
    connects: Arc<AtomicUsize>,
}

impl Connect for Loopback {
    type Key = &'static str;
    type Io = DuplexStream;

    fn connect(
        &self,
        _key: &Self::Key,
    ) -> impl Future<Output = Result<DuplexStream, BoxError>> + Send {
        self.connects.fetch_add(1, Ordering::SeqCst);
        let (client, server_io) = tokio::io::duplex(64 << 10);
        let seen = Arc::new(AtomicUsize::new(0));
        let svc = tower::service_fn(move |req: Request<Body>| {
            let n = seen.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                let body = if req.uri().path() == "/big" {
                    "x".repeat(1 << 20)
                } else {
                    n.to_string()
                };
                Ok::<_, Infallible>(Response::new(body::full(body)))
            }
        });
        tokio::spawn(async move {
            let _ = server::serve(
                server_io,
                svc,
                &server::Config::default(),
                std::future::pending(),
            )
            .await;
        });
        async move { Ok(client) }
    }
}

fn get(path: &str, version: Version) -> Request<Body> {
    let mut req = Request::get(format!("http://whoami{path}"))
        .body(body::empty())
        .expect("request");
    crate::forward::prepare_request(&mut req, version);
    req
}

async fn text(resp: Response<Body>) -> String {
    String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes()
            .to_vec(),
    )
    .expect("utf-8")
}

#[tokio::test]
async fn http1_reuses_a_connection_whose_response_was_read_to_the_end() {
    let lo = Loopback::default();
    let pool = Pool::new(lo.clone(), Config::default());
    for i in 1..=5 {
        let resp = pool
            .send(&"ep", Version::Http1, get("/", Version::Http1))
            .await
            .expect("response");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            text(resp).await,
            i.to_string(),
            "the same upstream connection answered"
        );
    }
    assert_eq!(lo.connects.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn http1_drops_a_connection_whose_response_was_abandoned() {
    let lo = Loopback::default();
    let pool = Pool::new(lo.clone(), Config::default());
    let resp = pool
        .send(&"ep", Version::Http1, get("/big", Version::Http1))
        .await
        .expect("response");
    drop(resp);
    let resp = pool
        .send(&"ep", Version::Http1, get("/", Version::Http1))
        .await
        .expect("response");
    assert_eq!(text(resp).await, "1", "a fresh connection");
    assert_eq!(lo.connects.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn http2_multiplexes_concurrent_requests_on_one_connection() {
    let lo = Loopback::default();
    let pool = Pool::new(lo.clone(), Config::default());
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            text(
                pool.send(&"ep", Version::Http2, get("/", Version::Http2))
                    .await
                    .expect("response"),
            )
            .await
        }));
    }
    let mut seen: Vec<usize> = Vec::new();
    for t in tasks {
        seen.push(t.await.expect("task").parse().expect("number"));
    }
    seen.sort_unstable();
    assert_eq!(
        seen,
        (1..=50).collect::<Vec<_>>(),
        "all 50 on one connection"
    );
    assert_eq!(lo.connects.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_failed_connect_is_upstream_connection_failure() {
    struct Refuses;
    impl Connect for Refuses {
        type Key = ();
        type Io = DuplexStream;
        async fn connect(&self, _key: &()) -> Result<DuplexStream, BoxError> {
            Err("connection refused".into())
        }
    }
    let pool = Pool::new(Refuses, Config::default());
    let err = pool
        .send(&(), Version::Http1, get("/", Version::Http1))
        .await
        .expect_err("refused");
    assert_eq!(err.flag(), ResponseFlag::UpstreamConnectionFailure);
}

#[tokio::test]
async fn a_connection_is_closed_after_max_requests_and_not_reused_past_its_idle_timeout() {
    let lo = Loopback::default();
    let pool = Pool::new(lo.clone(), Config::default());
    let limited = |path: &str, limits: ConnectionLimits| {
        let mut req = get(path, Version::Http1);
        req.extensions_mut().insert(limits);
        req
    };
    let two = ConnectionLimits {
        max_requests: Some(2),
        idle_timeout: None,
    };
    let mut seen = Vec::new();
    for _ in 0..4 {
        let resp = pool
            .send(&"a", Version::Http1, limited("/", two))
            .await
            .expect("response");
        seen.push(text(resp).await);
    }
    assert_eq!(seen, ["1", "2", "1", "2"], "two requests per connection");
    assert_eq!(lo.connects.load(Ordering::SeqCst), 2);

    let short = ConnectionLimits {
        max_requests: None,
        idle_timeout: Some(Duration::from_millis(50)),
    };
    let resp = pool
        .send(&"b", Version::Http1, limited("/", short))
        .await
        .expect("response");
    assert_eq!(text(resp).await, "1");
    tokio::time::sleep(Duration::from_millis(80)).await;
    let resp = pool
        .send(&"b", Version::Http1, limited("/", short))
        .await
        .expect("response");
    assert_eq!(
        text(resp).await,
        "1",
        "the idle connection was too old: a new one"
    );
    assert_eq!(lo.connects.load(Ordering::SeqCst), 4);
}

/// Each connection answers its first request, then reads the second and closes without a
/// response: a server closing its idle keep-alive connection as a request crosses.
#[derive(Clone, Default)]
struct ClosesOnSecond {
    connects: Arc<AtomicUsize>,
}

impl Connect for ClosesOnSecond {
    type Key = &'static str;
    type Io = DuplexStream;

    fn connect(
        &self,
        _key: &Self::Key,
    ) -> impl Future<Output = Result<DuplexStream, BoxError>> + Send {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        self.connects.fetch_add(1, Ordering::SeqCst);
        let (client, mut server_io) = tokio::io::duplex(64 << 10);
        tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            for answer in [true, false] {
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match server_io.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                seen.clear();
                if answer {
                    let _ = server_io
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n1")
                        .await;
                }
            }
            // Dropping `server_io` closes the connection with the second request unanswered.
        });
        async move { Ok(client) }
    }
}

#[tokio::test]
async fn an_idempotent_request_on_a_keep_alive_connection_closed_under_it_goes_again_on_a_new_one()
{
    let up = ClosesOnSecond::default();
    let pool = Pool::new(up.clone(), Config::default());
    for _ in 0..2 {
        let resp = pool
            .send(&"ep", Version::Http1, get("/", Version::Http1))
            .await
            .expect("answered, the second time on a fresh connection");
        assert_eq!(text(resp).await, "1");
    }
    assert_eq!(up.connects.load(Ordering::SeqCst), 2);

    // A POST with a body may have been processed and cannot be replayed: the error stands.
    let up = ClosesOnSecond::default();
    let pool = Pool::new(up.clone(), Config::default());
    let post = || {
        let mut req = Request::post("http://whoami/")
            .body(body::full("payload"))
            .expect("request");
        crate::forward::prepare_request(&mut req, Version::Http1);
        req
    };
    let first = pool
        .send(&"ep", Version::Http1, post())
        .await
        .expect("first");
    assert_eq!(text(first).await, "1");
    let second = pool.send(&"ep", Version::Http1, post()).await;
    assert!(
        matches!(second, Err(Error::Reset(_))),
        "not replayed: {second:?}"
    );
    assert_eq!(up.connects.load(Ordering::SeqCst), 1);
}
