//! Copying bytes both ways, then the close metrics and the one access-log line per connection.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use tokio::io::{AsyncRead, AsyncWrite};

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

    fn close(self, received: u64, sent: u64, error: Option<&std::io::Error>) {
        let m = &self.metrics;
        m.closed.get_or_create(&self.labels).inc();
        m.received.get_or_create(&self.labels).inc_by(received);
        m.sent.get_or_create(&self.labels).inc_by(sent);
        let l = &self.labels;
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

/// Copies until both directions are done. `client` is the side that opened the connection.
pub async fn relay<A, B>(client: &mut A, upstream: &mut B, record: Record)
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    match tokio::io::copy_bidirectional_with_sizes(client, upstream, BUF, BUF).await {
        Ok((received, sent)) => record.close(received, sent, None),
        Err(e) => record.close(0, 0, Some(&e)),
    }
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
