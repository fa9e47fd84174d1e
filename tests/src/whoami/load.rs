//! `http-load`: a fixed-rate HTTP load generator that does not hide stalls.
//!
//! Open model: request `i` is due at `start + i / rate`, whether or not earlier requests have
//! been answered, and its latency is counted from that due time, not from when a connection
//! got around to sending it. A server that stalls for 500 ms therefore shows up as every
//! request due in those 500 ms being late (up to 500 ms), not as one slow request per
//! connection: the coordinated-omission mistake of closed-loop tools (wrk, ab, hey).
//!
//! Due requests wait in one queue; `connections` HTTP/1.1 connections (one request in flight
//! each) or `connections` × `streams` HTTP/2 streams take them in order. A connection that
//! fails is dialed again for its next request. After the schedule ends, the run waits up to
//! `timeout` for what is queued or in flight; whatever is left then counts as an error.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex as StdMutex, PoisonError},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, Uri, header};
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::{Deserialize, Serialize};
use tokio::{
    net::TcpStream,
    sync::{Mutex, mpsc},
};

use super::http::{POD_HEADER, VERSION_HEADER};

/// What `http-load` is asked to do.
#[derive(Clone, Debug)]
pub struct Options {
    /// `http://HOST[:PORT]/PATH?QUERY` (no TLS).
    pub url: String,
    /// Requests per second.
    pub rate: f64,
    pub duration: Duration,
    pub connections: usize,
    /// HTTP/2 with prior knowledge (h2c) instead of HTTP/1.1.
    pub h2: bool,
    /// Requests in flight at once on each HTTP/2 connection.
    pub streams: usize,
    /// `POST` a body of this many bytes instead of `GET`, when not 0.
    pub body_size: usize,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Per request, from when it is sent.
    pub timeout: Duration,
}

/// The one JSON line `http-load` prints. `scheduled == responses + errors`, where responses
/// are the sum of `status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub url: String,
    /// `HTTP/1.1` or `HTTP/2`.
    pub protocol: String,
    pub rate: f64,
    pub duration_s: f64,
    pub connections: usize,
    /// Requests due during the run: `round(rate × duration)`.
    pub scheduled: u64,
    /// Requests a connection started on.
    pub sent: u64,
    /// Responses with a 2xx status.
    pub ok: u64,
    /// Scheduled requests without a response (see `error_kinds`).
    pub errors: u64,
    /// Responses by status code.
    pub status: BTreeMap<String, u64>,
    /// `connect`, `request` (failed on the connection), `body`, `timeout`, and, when the run
    /// ended with them still waiting, `unsent` and `unfinished`.
    pub error_kinds: BTreeMap<String, u64>,
    /// Responses by their `x-whoami-pod` header (`-` when absent): who served what share.
    pub pods: BTreeMap<String, u64>,
    /// Responses by their `x-whoami-version` header (`-` when absent).
    pub versions: BTreeMap<String, u64>,
    /// Requests sent a second time, on a new connection, because the first one had closed (or
    /// refused new streams) before they were sent.
    #[serde(default)]
    pub retried_unsent: u64,
    /// Responses per second, from the start to the last response.
    pub achieved_rps: f64,
    /// Latency percentiles of all responses, from each request's due time, in microseconds.
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: u64,
}

/// The parts of every request, computed once.
struct Target {
    addr: SocketAddr,
    authority: String,
    /// What goes on the request line: origin-form for HTTP/1.1, absolute for HTTP/2 (hyper
    /// takes `:scheme` and `:authority` from it).
    uri: Uri,
    h2: bool,
    body: Bytes,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl Target {
    async fn new(opts: &Options) -> Result<Self, String> {
        let url: Uri = opts.url.parse().map_err(|e| format!("--url {:?}: {e}", opts.url))?;
        if url.scheme_str() != Some("http") {
            return Err(format!("--url {:?}: only http:// URLs", opts.url));
        }
        let authority = url.authority().ok_or_else(|| format!("--url {:?}: no host", opts.url))?.as_str().to_owned();
        let with_port = if url.port().is_some() { authority.clone() } else { format!("{authority}:80") };
        let addr = tokio::net::lookup_host(&with_port)
            .await
            .map_err(|e| format!("resolving {with_port}: {e}"))?
            .next()
            .ok_or_else(|| format!("{with_port} resolves to no address"))?;
        let path = url.path_and_query().map_or("/", |p| p.as_str()).to_owned();
        let uri = if opts.h2 { url } else { path.parse().expect("a URL's path is a valid origin-form URI") };
        Ok(Self { addr, authority, uri, h2: opts.h2, body: vec![b'x'; opts.body_size].into(), headers: opts.headers.clone() })
    }

    fn request(&self) -> Request<Full<Bytes>> {
        let method = if self.body.is_empty() { Method::GET } else { Method::POST };
        let mut req = Request::builder().method(method).uri(self.uri.clone());
        if !self.h2 {
            req = req.header(header::HOST, &self.authority);
        }
        for (name, value) in &self.headers {
            req = req.header(name, value);
        }
        req.body(Full::new(self.body.clone())).expect("parts were validated when parsed")
    }

    async fn dial(&self) -> Result<TokioIo<TcpStream>, Failure> {
        let stream = TcpStream::connect(self.addr).await.map_err(|_| Failure::Connect)?;
        let _ = stream.set_nodelay(true);
        Ok(TokioIo::new(stream))
    }
}

#[derive(Clone, Copy)]
enum Failure {
    Connect,
    Request,
    Body,
    Timeout,
}

impl Failure {
    fn kind(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Request => "request",
            Self::Body => "body",
            Self::Timeout => "timeout",
        }
    }
}

/// How one try of a request ended, when it did not get a response.
enum Attempt {
    /// The request never left: safe to send again.
    Unsent,
    Failed(Failure),
}

impl Attempt {
    fn failure(self) -> Failure {
        match self {
            Self::Unsent => Failure::Request,
            Self::Failed(f) => f,
        }
    }
}

/// One HTTP/1.1 connection per worker; one HTTP/2 connection shared by `streams` workers.
enum Conn {
    H1(Option<http1::SendRequest<Full<Bytes>>>),
    H2(Arc<Mutex<Option<http2::SendRequest<Full<Bytes>>>>>),
}

impl Conn {
    async fn connect(&mut self, target: &Target) -> Result<(), Failure> {
        match self {
            Self::H1(slot) => {
                if slot.as_ref().is_none_or(http1::SendRequest::is_closed) {
                    let (sender, conn) = http1::handshake(target.dial().await?).await.map_err(|_| Failure::Connect)?;
                    tokio::spawn(conn);
                    *slot = Some(sender);
                }
            }
            Self::H2(shared) => {
                let mut slot = shared.lock().await;
                if slot.as_ref().is_none_or(http2::SendRequest::is_closed) {
                    let io = target.dial().await?;
                    let (sender, conn) = http2::handshake(TokioExecutor::new(), io).await.map_err(|_| Failure::Connect)?;
                    tokio::spawn(conn);
                    *slot = Some(sender);
                }
            }
        }
        Ok(())
    }

    /// One request and its whole response body; returns the response head and whether the
    /// request had to be sent again. A request the connection never sent (it had closed, or
    /// HTTP/2 refused new streams after GOAWAY) goes once more on a new connection, as curl,
    /// browsers and Go's client do; one that may have reached the server is never retried.
    async fn exchange(&mut self, target: &Target) -> Result<(http::response::Parts, bool), Failure> {
        match self.attempt(target).await {
            Err(Attempt::Unsent) => {
                self.abandon().await;
                self.attempt(target).await.map(|p| (p, true)).map_err(|a| {
                    if matches!(a, Attempt::Unsent) {
                        eprintln!("http-load: request failed: not sent on a new connection either");
                    }
                    a.failure()
                })
            }
            other => other.map(|p| (p, false)).map_err(Attempt::failure),
        }
    }

    /// The connection refused a request unsent (closed, or HTTP/2 GOAWAY): the next one goes on
    /// a new connection. An HTTP/2 connection that sent GOAWAY is not `is_closed` until its
    /// last streams end, so without this the resend went to the same connection and was
    /// refused again.
    async fn abandon(&mut self) {
        match self {
            Self::H1(slot) => *slot = None,
            Self::H2(shared) => *shared.lock().await = None,
        }
    }

    async fn attempt(&mut self, target: &Target) -> Result<http::response::Parts, Attempt> {
        self.connect(target).await.map_err(Attempt::Failed)?;
        let unsent = |e: &hyper::Error| {
            // RFC 9113 8.7: a stream refused, or above a GOAWAY's last stream, was not processed.
            let h2 = std::error::Error::source(e).and_then(|s| s.downcast_ref::<h2::Error>());
            if e.is_canceled() || h2.is_some_and(|h| h.reason() == Some(h2::Reason::REFUSED_STREAM) || h.is_go_away() && h.is_remote()) {
                Attempt::Unsent
            } else {
                eprintln!("http-load: request failed: {e:?}");
                Attempt::Failed(Failure::Request)
            }
        };
        let response = match self {
            Self::H1(slot) => {
                let sender = slot.as_mut().expect("connected above");
                sender.ready().await.map_err(|_| Attempt::Unsent)?;
                let response = sender.send_request(target.request()).await.map_err(|e| unsent(&e))?;
                // `connection: close`: the server closes after this response; the next request
                // must not be written to this connection.
                if response.headers().get(header::CONNECTION).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close")) {
                    *slot = None;
                }
                response
            }
            Self::H2(shared) => {
                let mut sender = shared.lock().await.clone().expect("connected above");
                sender.ready().await.map_err(|_| Attempt::Unsent)?;
                sender.send_request(target.request()).await.map_err(|e| unsent(&e))?
            }
        };
        let (parts, body) = response.into_parts();
        body.collect().await.map_err(|_| Attempt::Failed(Failure::Body))?;
        Ok(parts)
    }

    /// After a failure the HTTP/1.1 connection's state is unknown: dial a fresh one next time.
    /// (A broken HTTP/2 connection reports `is_closed` and is replaced in `connect`.)
    fn reset(&mut self) {
        if let Self::H1(slot) = self {
            *slot = None;
        }
    }
}

#[derive(Default)]
struct Stats {
    sent: u64,
    latencies_us: Vec<u64>,
    status: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
    pods: BTreeMap<String, u64>,
    versions: BTreeMap<String, u64>,
    retried: u64,
    last_done: Option<Instant>,
}

fn lock(stats: &StdMutex<Stats>) -> std::sync::MutexGuard<'_, Stats> {
    stats.lock().unwrap_or_else(PoisonError::into_inner)
}

type Queue = Arc<Mutex<mpsc::UnboundedReceiver<Instant>>>;

async fn worker(target: Arc<Target>, mut conn: Conn, queue: Queue, stats: Arc<StdMutex<Stats>>, timeout: Duration) {
    loop {
        // Holding the queue's lock while waiting hands due requests out strictly in order.
        let due = queue.lock().await.recv().await;
        let Some(due) = due else { return };
        lock(&stats).sent += 1;
        let result = tokio::time::timeout(timeout, conn.exchange(&target)).await.unwrap_or(Err(Failure::Timeout));
        let done = Instant::now();
        let mut s = lock(&stats);
        match result {
            Ok((parts, retried)) => {
                s.retried += u64::from(retried);
                s.latencies_us.push(u64::try_from(done.duration_since(due).as_micros()).unwrap_or(u64::MAX));
                *s.status.entry(parts.status.as_u16().to_string()).or_default() += 1;
                let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("-").to_owned();
                *s.pods.entry(header(POD_HEADER)).or_default() += 1;
                *s.versions.entry(header(VERSION_HEADER)).or_default() += 1;
            }
            Err(failure) => {
                *s.errors.entry(failure.kind().to_owned()).or_default() += 1;
                conn.reset();
            }
        }
        s.last_done = Some(done);
    }
}

/// Runs the load and reports; `Err` only for options that cannot run at all.
pub async fn run(opts: &Options) -> Result<Report, String> {
    if !(opts.rate.is_finite() && opts.rate > 0.0) || opts.duration.is_zero() || opts.connections == 0 || opts.streams == 0 {
        return Err("--rate, --duration, --connections and --streams must be positive".to_owned());
    }
    let target = Arc::new(Target::new(opts).await?);
    let (due_tx, due_rx) = mpsc::unbounded_channel();
    let queue: Queue = Arc::new(Mutex::new(due_rx));
    let mut workers = Vec::new();
    let mut stats = Vec::new();
    let mut spawn = |conn: Conn| {
        let s = Arc::new(StdMutex::new(Stats::default()));
        stats.push(Arc::clone(&s));
        workers.push(tokio::spawn(worker(Arc::clone(&target), conn, Arc::clone(&queue), s, opts.timeout)));
    };
    // Connections are dialed before the clock starts, so the first requests do not pay for it
    // (a failed dial is retried by the first request, and counted there).
    for _ in 0..opts.connections {
        if opts.h2 {
            let mut conn = Conn::H2(Arc::new(Mutex::new(None)));
            let _ = conn.connect(&target).await;
            let Conn::H2(shared) = conn else { unreachable!("built as H2") };
            for _ in 0..opts.streams {
                spawn(Conn::H2(Arc::clone(&shared)));
            }
        } else {
            let mut conn = Conn::H1(None);
            let _ = conn.connect(&target).await;
            spawn(conn);
        }
    }

    let scheduled = scheduled(opts.rate, opts.duration);
    let rate = opts.rate;
    let start = Instant::now();
    // The clock runs on its own thread: a thread's sleep overshoots by tens of microseconds,
    // tokio's timer by up to a millisecond, and every bit of overshoot would be counted as
    // latency of the request it delays.
    let clock = tokio::task::spawn_blocking(move || {
        for i in 0..scheduled {
            let due = start + due_offset(i, rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            // Everything already due goes out at once: after a late wake-up the queue catches up.
            if due_tx.send(due).is_err() {
                break;
            }
        }
    });
    let _ = clock.await;
    let deadline = start + opts.duration + opts.timeout + Duration::from_secs(1);
    if tokio::time::timeout_at(deadline.into(), futures::future::join_all(workers.iter_mut())).await.is_err() {
        for w in &workers {
            w.abort();
        }
        // Aborted tasks stop at their next await; wait for that before reading their stats.
        let _ = futures::future::join_all(workers).await;
    }
    let stats: Vec<Stats> = stats.into_iter().map(|s| std::mem::take(&mut *lock(&s))).collect();
    Ok(summarize(opts, scheduled, start, stats))
}

#[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "rate and duration are positive and finite")]
fn scheduled(rate: f64, duration: Duration) -> u64 {
    (rate * duration.as_secs_f64()).round() as u64
}

#[expect(clippy::cast_precision_loss, reason = "request indexes stay far below 2^52")]
fn due_offset(i: u64, rate: f64) -> Duration {
    Duration::from_secs_f64(i as f64 / rate)
}

/// Nearest-rank percentile of sorted samples (0 when there are none).
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss, reason = "0 <= p <= 1")]
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn summarize(opts: &Options, scheduled: u64, start: Instant, stats: Vec<Stats>) -> Report {
    let mut all = Stats::default();
    for s in stats {
        all.sent += s.sent;
        all.latencies_us.extend(s.latencies_us);
        for (into, from) in [(&mut all.status, s.status), (&mut all.errors, s.errors), (&mut all.pods, s.pods), (&mut all.versions, s.versions)] {
            for (k, v) in from {
                *into.entry(k).or_default() += v;
            }
        }
        all.last_done = all.last_done.max(s.last_done);
    }
    all.latencies_us.sort_unstable();
    let responses = all.latencies_us.len() as u64;
    let failed: u64 = all.errors.values().sum();
    for (kind, n) in [("unsent", scheduled.saturating_sub(all.sent)), ("unfinished", all.sent.saturating_sub(responses + failed))] {
        if n > 0 {
            all.errors.insert(kind.to_owned(), n);
        }
    }
    let ok = all.status.iter().filter(|(code, _)| code.starts_with('2')).map(|(_, n)| n).sum();
    let elapsed = all.last_done.map_or(0.0, |t| t.duration_since(start).as_secs_f64());
    #[expect(clippy::cast_precision_loss, reason = "counts stay far below 2^52")]
    let achieved_rps = if elapsed > 0.0 { responses as f64 / elapsed } else { 0.0 };
    let p = |q| percentile(&all.latencies_us, q);
    Report {
        url: opts.url.clone(),
        protocol: if opts.h2 { "HTTP/2" } else { "HTTP/1.1" }.to_owned(),
        rate: opts.rate,
        duration_s: opts.duration.as_secs_f64(),
        connections: opts.connections,
        scheduled,
        sent: all.sent,
        ok,
        errors: all.errors.values().sum(),
        status: all.status,
        error_kinds: all.errors,
        pods: all.pods,
        versions: all.versions,
        retried_unsent: all.retried,
        achieved_rps: (achieved_rps * 10.0).round() / 10.0,
        p50_us: p(0.5),
        p90_us: p(0.9),
        p99_us: p(0.99),
        p999_us: p(0.999),
        max_us: all.latencies_us.last().copied().unwrap_or(0),
        mean_us: all.latencies_us.iter().sum::<u64>().checked_div(responses).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&samples, 0.5), 500);
        assert_eq!(percentile(&samples, 0.99), 990);
        assert_eq!(percentile(&samples, 0.999), 999);
        assert_eq!(percentile(&samples, 1.0), 1000);
        assert_eq!(percentile(&[7], 0.5), 7);
        assert_eq!(percentile(&[], 0.5), 0);
    }

    #[test]
    fn requests_are_due_at_fixed_intervals_from_the_start() {
        assert_eq!(scheduled(1000.0, Duration::from_secs(2)), 2000);
        assert_eq!(scheduled(3.0, Duration::from_millis(500)), 2);
        assert_eq!(due_offset(0, 250.0), Duration::ZERO);
        assert_eq!(due_offset(250, 250.0), Duration::from_secs(1));
        assert_eq!(due_offset(3, 2.0), Duration::from_millis(1500));
    }

    /// Every scheduled request is either a response or an error, whatever stage it stopped at.
    #[test]
    fn requests_left_over_count_as_errors() {
        let opts = Options {
            url: "http://127.0.0.1:1/".into(),
            rate: 10.0,
            duration: Duration::from_secs(1),
            connections: 1,
            h2: false,
            streams: 1,
            body_size: 0,
            headers: vec![],
            timeout: Duration::from_secs(1),
        };
        let start = Instant::now();
        let stats = Stats {
            sent: 6,
            latencies_us: vec![300, 100, 200],
            status: [("200".to_owned(), 2), ("503".to_owned(), 1)].into(),
            errors: [("timeout".to_owned(), 2)].into(),
            last_done: Some(start + Duration::from_millis(500)),
            ..Stats::default()
        };
        let r = summarize(&opts, 10, start, vec![stats]);
        assert_eq!((r.scheduled, r.sent, r.ok, r.errors), (10, 6, 2, 7));
        assert_eq!(r.error_kinds, [("timeout".to_owned(), 2), ("unsent".to_owned(), 4), ("unfinished".to_owned(), 1)].into());
        assert_eq!((r.p50_us, r.max_us, r.mean_us), (200, 300, 200));
        assert!((r.achieved_rps - 6.0).abs() < 0.01, "{}", r.achieved_rps);
    }
}
