//! Copying bytes both ways, then the close metrics and the one access-log line per connection.
//! Two relays: TCP to TCP (same node, passthrough, plaintext inbound), and TCP to an HBONE
//! stream, which hands h2 the buffer the socket was read into instead of copying it.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf},
    net::{
        TcpStream,
        tcp::{ReadHalf, WriteHalf},
    },
};

use super::metrics::{ConnLabels, Metrics};

/// Large buffers: one read fills a whole HTTP/2 frame or TLS record instead of 8 KiB slices.
/// Kept below glibc's mmap threshold (128 KiB): 256 KiB buffers made every HTTP/2 write
/// allocate fresh pages (page faults and `clear_page` showed in the profile).
const BUF: usize = 64 << 10;

/// An open connection as metrics and the access log see it. Counted as opened when created.
pub struct Record {
    pub kind: &'static str,
    pub labels: ConnLabels,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub metrics: Arc<Metrics>,
    pub start: Instant,
}

impl Record {
    pub fn open(kind: &'static str, labels: ConnLabels, src: SocketAddr, dst: SocketAddr, metrics: &Arc<Metrics>) -> Self {
        metrics.opened.get_or_create(&labels).inc();
        Self { kind, labels, src, dst, metrics: metrics.clone(), start: Instant::now() }
    }

    /// Counts a connection closed for idleness and says why, for its access-log line.
    fn idle_timeout(&self, after: Duration) -> io::Error {
        self.metrics.idle_timeouts.get_or_create(&super::metrics::KindLabel { kind: self.kind }).inc();
        io::Error::new(io::ErrorKind::TimedOut, format!("idle timeout: no byte either way for {}s (MESH_TCP_IDLE_TIMEOUT_SECS)", after.as_secs()))
    }

    pub fn close(self, received: u64, sent: u64, error: Option<&io::Error>) {
        let m = &self.metrics;
        m.closed.get_or_create(&self.labels).inc();
        m.received.get_or_create(&self.labels).inc_by(received);
        m.sent.get_or_create(&self.labels).inc_by(sent);
        let l = &self.labels.peers;
        tracing::info!(
            target: "access",
            kind = self.kind,
            src.addr = %self.src,
            src.workload = %l.source_workload,
            src.namespace = %l.source_workload_namespace,
            src.identity = %l.source_principal,
            dst.addr = %self.dst,
            dst.workload = %l.destination_workload,
            dst.namespace = %l.destination_workload_namespace,
            dst.identity = %l.destination_principal,
            bytes_received = received,
            bytes_sent = sent,
            duration_ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX),
            result = error.map_or_else(|| "ok".to_owned(), ToString::to_string),
            "connection complete"
        );
    }
}

/// Copies until both directions are done, or until `idle` passes with no byte moved either way.
/// `client` is the side that opened the connection.
pub async fn relay<A, B>(client: &mut A, upstream: &mut B, idle: Option<Duration>, record: Record)
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (received, sent) = (AtomicU64::new(0), AtomicU64::new(0));
    let (mut from_client, mut from_upstream) = (Counting { io: client, read: &received }, Counting { io: upstream, read: &sent });
    let copy = tokio::io::copy_bidirectional_with_sizes(&mut from_client, &mut from_upstream, BUF, BUF);
    let result = tokio::select! {
        r = copy => r.map(drop),
        e = idle_watch(idle, || received.load(Relaxed) + sent.load(Relaxed)) => Err(record.idle_timeout(e)),
    };
    record.close(received.into_inner(), sent.into_inner(), result.err().as_ref());
}

/// Counts the bytes read from a stream (what it sent to the relay).
struct Counting<'a, S: ?Sized> {
    io: &'a mut S,
    read: &'a AtomicU64,
}

impl<S: AsyncRead + Unpin + ?Sized> AsyncRead for Counting<'_, S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut *self.io).poll_read(cx, buf);
        self.read.fetch_add((buf.filled().len() - before) as u64, Relaxed);
        polled
    }
}

impl<S: AsyncWrite + Unpin + ?Sized> AsyncWrite for Counting<'_, S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Resolves once a connection has moved no byte (`moved` unchanged) for `after`, give or take a
/// quarter of it; never without a timeout. One timer per connection that wakes four times per
/// period, instead of a clock read on every chunk: Envoy's TCP proxy counts `idle_timeout` the
/// same way (no bytes sent or received), 1 h by default.
async fn idle_watch(after: Option<Duration>, moved: impl Fn() -> u64) -> Duration {
    const TICKS: u32 = 4;
    let Some(after) = after else { return std::future::pending().await };
    let (mut last, mut quiet) = (moved(), 0);
    loop {
        tokio::time::sleep(after / TICKS).await;
        let now = moved();
        if now == last {
            quiet += 1;
            if quiet >= TICKS {
                return after;
            }
        } else {
            (last, quiet) = (now, 0);
        }
    }
}

/// The two halves h2 gives for one CONNECT stream.
pub struct Tunnel {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
}

/// Which end opened the connection: its bytes are the "received" ones in metrics and the log.
#[derive(Clone, Copy)]
pub enum Opener {
    /// Outbound: the local pod's TCP connection.
    Tcp,
    /// Inbound: the remote client, through the tunnel.
    Tunnel,
}

/// Copies between `tcp` and an HBONE stream until both directions are done, one fails, or
/// `idle` passes with no byte moved (then dropping the stream resets it, so the other daemon
/// closes its end too).
pub async fn relay_tunnel(tcp: &mut TcpStream, tunnel: Tunnel, opener: Opener, idle: Option<Duration>, record: Record) {
    let (mut rd, mut wr) = tcp.split();
    let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
    let copy = async { tokio::try_join!(tcp_to_tunnel(&mut rd, tunnel.send, &up), tunnel_to_tcp(tunnel.recv, &mut wr, &down)).map(drop) };
    let result = tokio::select! {
        r = copy => r,
        e = idle_watch(idle, || up.load(Relaxed) + down.load(Relaxed)) => Err(record.idle_timeout(e)),
    };
    let (up, down) = (up.into_inner(), down.into_inner());
    let (received, sent) = match opener {
        Opener::Tcp => (up, down),
        Opener::Tunnel => (down, up),
    };
    record.close(received, sent, result.err().as_ref());
}

fn h2_io(e: h2::Error) -> io::Error {
    e.into_io().unwrap_or_else(|| io::Error::other("HBONE stream reset"))
}

/// Reads into a `BytesMut` and hands h2 frozen slices of it: no copy between the socket and
/// the TLS layer. Once h2 has written a chunk and dropped it, `reserve` reuses the same
/// allocation, so a stream that keeps coming allocates nothing. A connection with nothing to
/// read waits without a buffer: 10,000 idle connections held 10,000 of them
/// (bench/results/soak.md).
///
/// The read goes through `read_buf` (tokio's `poll_read`), not `try_read_buf`: a read shorter
/// than the buffer tells tokio the socket is drained (epoll is edge-triggered), so the wait that
/// follows sleeps at once. `try_read_buf` keeps the readiness, which cost one more `recvfrom`
/// returning `EAGAIN` per message and direction on an interactive connection.
async fn tcp_to_tunnel(rd: &mut ReadHalf<'_>, mut send: SendStream<Bytes>, count: &AtomicU64) -> io::Result<()> {
    let mut buf = BytesMut::new();
    loop {
        if buf.capacity() == 0 {
            rd.readable().await?;
        }
        buf.reserve(read_size(count.load(Relaxed)));
        let room = buf.capacity() - buf.len();
        let n = rd.read_buf(&mut buf).await?;
        if n == 0 {
            return send.send_data(Bytes::new(), true).map_err(h2_io);
        }
        count.fetch_add(n as u64, Relaxed);
        let mut chunk = buf.split().freeze();
        if n < room {
            // Drained: wait for the next bytes without holding the rest of the buffer.
            buf = BytesMut::new();
        }
        while !chunk.is_empty() {
            let n = send_capacity(&mut send, chunk.len()).await?;
            send.send_data(chunk.split_to(n.min(chunk.len())), false).map_err(h2_io)?;
        }
    }
}

/// How much one read from a pod's socket into an HBONE stream may take, by the bytes the
/// connection has moved so far (ztunnel's relay grows its buffer the same way). Small while a
/// connection is new or interactive: an idle connection holds only this much. Large once it
/// carries bulk data: fewer reads, and bigger chunks for h2 and rustls, so fewer and fuller TLS
/// writes (the client-side daemon made 46k system calls per GB with fixed 64 KiB reads where
/// ztunnel made 21k).
fn read_size(moved: u64) -> usize {
    const SMALL: usize = 16 << 10;
    const MEDIUM: usize = 64 << 10;
    const BULK: usize = 256 << 10;
    match moved {
        m if m < 256 << 10 => SMALL,
        m if m < 4 << 20 => MEDIUM,
        _ => BULK,
    }
}

/// Waits until h2 lets this stream buffer more data (flow-control window and send buffer).
async fn send_capacity(send: &mut SendStream<Bytes>, want: usize) -> io::Result<usize> {
    send.reserve_capacity(want);
    loop {
        let n = send.capacity();
        if n > 0 {
            return Ok(n);
        }
        match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(h2_io(e)),
            None => return Err(io::ErrorKind::BrokenPipe.into()),
        }
    }
}

/// Writes each received DATA payload straight from h2's buffer, then returns its window.
async fn tunnel_to_tcp(mut recv: RecvStream, wr: &mut WriteHalf<'_>, count: &AtomicU64) -> io::Result<()> {
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.map_err(h2_io)?;
        wr.write_all(&chunk).await?;
        count.fetch_add(chunk.len() as u64, Relaxed);
        recv.flow_control().release_capacity(chunk.len()).map_err(h2_io)?;
    }
    wr.shutdown().await
}

/// The access-log line of a connection refused before any byte was forwarded.
pub fn log_refused(kind: &'static str, src: SocketAddr, dst: SocketAddr, identity: Option<&str>, reason: &str) {
    tracing::info!(
        target: "access",
        kind,
        src.addr = %src,
        src.identity = identity.unwrap_or("unknown"),
        dst.addr = %dst,
        bytes_received = 0u64,
        bytes_sent = 0u64,
        result = %format!("denied: {reason}"),
        "connection refused"
    );
}

#[cfg(test)]
mod tests {
    use super::read_size;

    #[test]
    fn reads_grow_with_the_bytes_a_connection_moved() {
        assert_eq!(read_size(0), 16 << 10, "a new or interactive connection holds a small buffer");
        assert_eq!(read_size((256 << 10) - 1), 16 << 10);
        assert_eq!(read_size(256 << 10), 64 << 10);
        assert_eq!(read_size(4 << 20), 256 << 10, "bulk streams read a lot at once");
        assert_eq!(read_size(u64::MAX), 256 << 10);
    }
}
