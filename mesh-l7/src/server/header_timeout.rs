//! A request-header timeout for HTTP/1.1 that is not the idle timeout.
//!
//! hyper has one timer for both: `header_read_timeout` runs from the end of a response (or the
//! connection's start) until the next request's headers are complete. Set to an hour, so that a
//! pod's kept-alive connections are not closed under it, a client may also take an hour to send
//! one request's headers a byte at a time (a slowloris). Envoy and Go keep the two apart:
//! idle time ends with the first byte of the next request, and from then on the headers have
//! their own, short, deadline. This wrapper adds that deadline below hyper: it starts when bytes
//! arrive while no request is in flight, ends when hyper hands a request to the service, and,
//! when it passes, fails the read so hyper closes the connection.
//!
//! Only for HTTP/1.1: a connection that opens with HTTP/2's preface (PINGs and SETTINGS arrive
//! with no request in flight) or that was upgraded (WebSocket, CONNECT) is passed through.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Instant, Sleep},
};

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The error a connection ends with when a request's headers were too slow: the source of the
/// I/O error hyper reports ([`is_header_timeout`] finds it).
#[derive(Debug, thiserror::Error)]
#[error("request headers not complete within {0:?} of their first byte")]
pub struct HeaderTimeout(pub Duration);

/// Whether `e` (a connection's error, as hyper reports it) is a [`HeaderTimeout`].
pub fn is_header_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(err) = next {
        // An I/O error's `source()` skips the error it wraps: look inside.
        let wrapped = err
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref);
        if err.is::<HeaderTimeout>() || wrapped.is_some_and(|e| e.is::<HeaderTimeout>()) {
            return true;
        }
        next = err.source();
    }
    false
}

/// What the service tells the wrapper: requests begun and not yet answered in full.
#[derive(Debug, Default)]
pub struct Requests {
    begun: AtomicU64,
    in_flight: AtomicUsize,
    /// Upgraded or HTTP/2: no more deadlines.
    passthrough: AtomicBool,
}

impl Requests {
    /// hyper parsed a request's headers; the returned guard ends it when dropped (with the
    /// response body, once hyper has written it).
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.begun.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(self))
    }

    /// The connection now carries something else than HTTP/1.1 requests (an upgrade).
    pub fn pass_through(&self) {
        self.passthrough.store(true, Ordering::Relaxed);
    }
}

/// A request in flight, until dropped.
#[derive(Debug)]
pub struct InFlight(Arc<Requests>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `io` with the request-header deadline.
pub struct HeaderDeadline<I> {
    io: I,
    limit: Duration,
    requests: Arc<Requests>,
    /// The first bytes of the connection, until they tell HTTP/2's preface from HTTP/1.1.
    seen: usize,
    decided: bool,
    /// Armed: the deadline, and how many requests had begun when it was armed.
    armed: Option<(Pin<Box<Sleep>>, u64)>,
}

impl<I> HeaderDeadline<I> {
    pub fn new(io: I, limit: Duration, requests: Arc<Requests>) -> Self {
        Self {
            io,
            limit,
            requests,
            seen: 0,
            decided: false,
            armed: None,
        }
    }

    /// Reads the first bytes of the connection: HTTP/2's preface turns the deadline off.
    fn classify(&mut self, bytes: &[u8]) {
        let want = &H2_PREFACE[self.seen..];
        let n = bytes.len().min(want.len());
        if bytes[..n] == want[..n] {
            self.seen += n;
            if self.seen == H2_PREFACE.len() {
                self.requests.pass_through();
                self.decided = true;
            }
        } else {
            self.decided = true;
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for HeaderDeadline<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let requests = &this.requests;
        if requests.passthrough.load(Ordering::Relaxed) {
            this.armed = None;
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        let begun = requests.begun.load(Ordering::Relaxed);
        if this.armed.as_ref().is_some_and(|(_, at)| *at != begun) {
            // A request's headers were complete since: its deadline is over.
            this.armed = None;
        }
        if let Some((sleep, _)) = &mut this.armed
            && sleep.as_mut().poll(cx).is_ready()
        {
            if requests.in_flight.load(Ordering::Relaxed) > 0 {
                // Pipelined bytes wait behind a response still being sent: their deadline
                // starts again once it is.
                sleep.as_mut().reset(Instant::now() + this.limit);
            } else {
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    HeaderTimeout(this.limit),
                )));
            }
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        let read = &buf.filled()[before..];
        if read.is_empty() {
            return Poll::Ready(Ok(()));
        }
        if !this.decided {
            this.classify(read);
        }
        let idle = this.requests.in_flight.load(Ordering::Relaxed) == 0;
        if this.armed.is_none() && idle && !this.requests.passthrough.load(Ordering::Relaxed) {
            let mut sleep = Box::pin(tokio::time::sleep(this.limit));
            // Registers the timer with this task: it wakes hyper's read when it passes.
            let _ = sleep.as_mut().poll(cx);
            this.armed = Some((sleep, begun));
        }
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for HeaderDeadline<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn read_some(io: &mut HeaderDeadline<tokio::io::DuplexStream>) -> std::io::Result<usize> {
        let mut buf = [0u8; 64];
        io.read(&mut buf).await
    }

    /// The deadline runs from the first byte of a request, not from the end of the last one:
    /// an idle connection lives, one that sends a request's first bytes and stalls does not.
    #[tokio::test(start_paused = true)]
    async fn the_deadline_starts_at_a_requests_first_byte_and_ends_at_its_headers() {
        let (mut client, server) = tokio::io::duplex(1024);
        let requests = Arc::new(Requests::default());
        let mut io = HeaderDeadline::new(server, Duration::from_secs(10), requests.clone());
        // Idle for a minute: nothing is armed, the read just waits.
        let idle = tokio::time::timeout(Duration::from_mins(1), read_some(&mut io)).await;
        assert!(idle.is_err(), "an idle connection is not timed out");
        client
            .write_all(b"GET / HTTP/1.1\r\n")
            .await
            .expect("write");
        assert_eq!(read_some(&mut io).await.expect("read"), 16);
        // A request whose headers complete within the limit ends its deadline...
        tokio::time::sleep(Duration::from_secs(5)).await;
        let request = requests.begin();
        drop(request);
        let after = tokio::time::timeout(Duration::from_secs(30), read_some(&mut io)).await;
        assert!(after.is_err(), "no deadline after the headers: {after:?}");
        // ...and the next request's first bytes start another, which passes.
        client.write_all(b"GET /slow").await.expect("write");
        assert_eq!(read_some(&mut io).await.expect("read"), 9);
        let err = tokio::time::timeout(Duration::from_secs(11), read_some(&mut io))
            .await
            .expect("ends by itself")
            .expect_err("timed out");
        assert!(is_header_timeout(&err), "{err}");
    }

    /// Bytes that arrive while a response is in flight (a request body, pipelined requests)
    /// are not a slow request: the deadline waits for the response to finish.
    #[tokio::test(start_paused = true)]
    async fn bytes_during_a_request_in_flight_are_not_timed() {
        let (mut client, server) = tokio::io::duplex(1024);
        let requests = Arc::new(Requests::default());
        let mut io = HeaderDeadline::new(server, Duration::from_secs(10), requests.clone());
        client
            .write_all(b"POST / HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        read_some(&mut io).await.expect("read");
        let request = requests.begin();
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(8)).await;
            client.write_all(b"body").await.expect("write");
            read_some(&mut io)
                .await
                .expect("a slow body is the application's business");
        }
        drop(request);
        let idle = tokio::time::timeout(Duration::from_secs(30), read_some(&mut io)).await;
        assert!(idle.is_err(), "idle again after the response: {idle:?}");
    }

    /// HTTP/2 (its preface) and upgraded connections carry no HTTP/1.1 requests to time.
    #[tokio::test(start_paused = true)]
    async fn http2_and_upgraded_connections_are_passed_through() {
        let (mut client, server) = tokio::io::duplex(1024);
        let requests = Arc::new(Requests::default());
        let mut io = HeaderDeadline::new(server, Duration::from_secs(10), requests.clone());
        // The preface in two pieces.
        client.write_all(&H2_PREFACE[..10]).await.expect("write");
        read_some(&mut io).await.expect("read");
        client.write_all(&H2_PREFACE[10..]).await.expect("write");
        read_some(&mut io).await.expect("read");
        client.write_all(b"frames").await.expect("write");
        read_some(&mut io).await.expect("read");
        let quiet = tokio::time::timeout(Duration::from_mins(1), read_some(&mut io)).await;
        assert!(quiet.is_err(), "HTTP/2 is not timed: {quiet:?}");

        let (mut client, server) = tokio::io::duplex(1024);
        let requests = Arc::new(Requests::default());
        let mut io = HeaderDeadline::new(server, Duration::from_secs(10), requests.clone());
        client
            .write_all(b"GET /ws HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        read_some(&mut io).await.expect("read");
        drop(requests.begin());
        requests.pass_through();
        client.write_all(b"frame").await.expect("write");
        read_some(&mut io).await.expect("read");
        let quiet = tokio::time::timeout(Duration::from_mins(1), read_some(&mut io)).await;
        assert!(
            quiet.is_err(),
            "an upgraded connection is not timed: {quiet:?}"
        );
    }
}
