//! Outbound HBONE connection pool: streams are multiplexed over one mTLS HTTP/2 connection per
//! (source identity, destination identity, HBONE address dialed: the destination pod's or its
//! node's, see [`super::HboneDial`]); a connection takes at most
//! `max_streams_per_conn` streams before another one is opened, and a connection without streams
//! is closed after `pool_idle_timeout`. Connections are h2 client connections driven by one
//! task each; a connection that failed or was told to go away (GOAWAY) takes no new streams.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::client::SendRequest;
use rustls_pki_types::ServerName;

use super::{Error, HboneDial, Inputs, socket};
use crate::{identity::Identity, tls};

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Key {
    pub src: Identity,
    pub dst: Identity,
    /// The HBONE address dialed: the destination pod's (ztunnel's way) or its node's.
    pub addr: SocketAddr,
}

struct Conn {
    id: u64,
    sender: SendRequest<Bytes>,
    streams: AtomicUsize,
    /// When the last stream ended (or the connection was opened).
    idle_since: Mutex<Instant>,
    /// Set when the connection's task ends or a request on it was refused (e.g. after GOAWAY).
    closed: Arc<AtomicBool>,
}

impl Conn {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

/// A stream slot on a pooled connection; releases the slot when dropped.
pub struct Checkout {
    pub sender: SendRequest<Bytes>,
    /// Which pooled connection (tests assert reuse with it).
    pub conn_id: u64,
    conn: Arc<Conn>,
    inputs: Inputs,
}

impl Checkout {
    /// No new streams on this connection: a request on it failed at the HTTP/2 level.
    pub fn retire(&self) {
        self.conn.closed.store(true, Ordering::Release);
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        if self.conn.streams.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.conn.idle_since.lock().unwrap_or_else(PoisonError::into_inner) = Instant::now();
        }
        self.inputs.metrics.pool_streams.dec();
    }
}

type Slot = Arc<tokio::sync::Mutex<Vec<Arc<Conn>>>>;

/// An open HBONE stream and the pool slot it occupies (released when dropped).
pub struct Opened {
    pub slot: Checkout,
    pub send: h2::SendStream<Bytes>,
    pub recv: h2::RecvStream,
}

pub struct Pool {
    inputs: Inputs,
    slots: Mutex<HashMap<Key, Slot>>,
    next_id: AtomicU64,
}

impl Pool {
    pub fn new(inputs: Inputs) -> Arc<Self> {
        Arc::new(Self { inputs, slots: Mutex::default(), next_id: AtomicU64::new(1) })
    }

    /// A stream slot to `key`, on an existing connection when one has room, else on a new one.
    /// Dials to one key are serialized, so a burst of new streams opens one connection, not many.
    pub async fn checkout(&self, key: &Key) -> Result<Checkout, Error> {
        let slot = self.slots.lock().unwrap_or_else(PoisonError::into_inner).entry(key.clone()).or_default().clone();
        let mut conns = slot.lock().await;
        self.prune_closed(&mut conns);
        let max = self.inputs.cfg.max_streams_per_conn;
        if let Some(c) = conns.iter().find(|c| c.streams.load(Ordering::Acquire) < max) {
            return Ok(self.take(c));
        }
        let c = Arc::new(self.dial(key).await?);
        self.inputs.metrics.pool_connections.inc();
        conns.push(c.clone());
        Ok(self.take(&c))
    }

    fn take(&self, c: &Arc<Conn>) -> Checkout {
        c.streams.fetch_add(1, Ordering::AcqRel);
        self.inputs.metrics.pool_streams.inc();
        Checkout { sender: c.sender.clone(), conn_id: c.id, conn: c.clone(), inputs: self.inputs.clone() }
    }

    fn prune_closed(&self, conns: &mut Vec<Arc<Conn>>) {
        let before = conns.len();
        conns.retain(|c| !c.is_closed());
        self.forget(before - conns.len());
    }

    fn forget(&self, n: usize) {
        self.inputs.metrics.pool_connections.dec_by(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// A CONNECT stream to `key`, answered `200`, on a pooled connection. A pooled connection
    /// the peer is draining (GOAWAY) refuses new streams: it is retired and the CONNECT retried
    /// once on a fresh one. Another status is [`Error::Status`].
    pub async fn open(&self, key: &Key, req: impl Fn() -> http::Request<()>) -> Result<Opened, Error> {
        let (slot, response, send) = match self.send_connect(key, req()).await {
            Err(Error::H2(e)) if e.is_go_away() || e.is_io() => self.send_connect(key, req()).await?,
            r => r?,
        };
        // The peer answers once it has connected to the pod (within its own connect timeout);
        // one that never answers must not hold the client's connection forever. Dropping the
        // stream's handles resets it.
        let after = self.inputs.cfg.handshake_timeout;
        let resp = match tokio::time::timeout(after, response).await {
            Ok(resp) => resp?,
            Err(_) => {
                self.inputs.metrics.handshake_timeout("outbound");
                return Err(Error::ConnectUnanswered { peer: key.addr, after });
            }
        };
        if resp.status() != http::StatusCode::OK {
            return Err(Error::Status(resp.status()));
        }
        Ok(Opened { slot, send, recv: resp.into_body() })
    }

    async fn send_connect(&self, key: &Key, req: http::Request<()>) -> Result<(Checkout, h2::client::ResponseFuture, h2::SendStream<Bytes>), Error> {
        let slot = self.checkout(key).await?;
        let sent = match slot.sender.clone().ready().await {
            Ok(mut sender) => sender.send_request(req, false),
            Err(e) => Err(e),
        };
        match sent {
            Ok((response, send)) => Ok((slot, response, send)),
            Err(e) => {
                slot.retire();
                Err(e.into())
            }
        }
    }

    /// Open pooled connections (all keys).
    pub fn connections(&self) -> usize {
        let slots: Vec<Slot> = self.slots.lock().unwrap_or_else(PoisonError::into_inner).values().cloned().collect();
        slots.iter().map(|s| s.try_lock().map_or(0, |c| c.iter().filter(|c| !c.is_closed()).count())).sum()
    }

    async fn dial(&self, key: &Key) -> Result<Conn, Error> {
        let cfg = &self.inputs.cfg;
        let cert = self.inputs.certs.fetch(&key.src).await?;
        let tls_cfg = tls::client_config(cert.key.clone(), &self.inputs.certs.roots(), key.dst.clone())?;
        let tcp = tokio::time::timeout(cfg.connect_timeout, socket::connect(None, key.addr, cfg.socket_mark))
            .await
            .map_err(|_| Error::ConnectTimeout(key.addr))?
            .map_err(|source| Error::Connect { addr: key.addr, source })?;
        let name = match cfg.hbone_dial {
            // An IP server name makes rustls send no SNI, like ztunnel: the server picks the
            // certificate by the address the connection reached. The verifier checks the SPIFFE
            // identity either way, never the name.
            HboneDial::Pod => ServerName::IpAddress(key.addr.ip().into()),
            HboneDial::Node => ServerName::try_from(key.dst.sni()).map_err(|_| tls::Error::ServerName(key.dst.sni()))?,
        };
        let tcp = tokio::io::BufReader::with_capacity(super::TLS_READ_BUF, tcp);
        let handshake = async {
            let tls = match tokio_rustls::TlsConnector::from(tls_cfg).connect(name, tcp).await {
                Ok(t) => {
                    self.inputs.metrics.handshake("outbound", true);
                    t
                }
                Err(e) => {
                    self.inputs.metrics.handshake("outbound", false);
                    return Err(Error::Io(e));
                }
            };
            Ok(h2::client::Builder::new()
                .initial_window_size(cfg.stream_window)
                .initial_connection_window_size(cfg.connection_window)
                .max_frame_size(cfg.max_frame_size)
                .max_send_buffer_size(super::send_buffer(cfg))
                .enable_push(false)
                .handshake(tls)
                .await?)
        };
        // A peer that accepts and then stalls must not hold the dial (and the connections
        // waiting on this key) forever.
        let (sender, conn) = match tokio::time::timeout(cfg.handshake_timeout, handshake).await {
            Ok(done) => done?,
            Err(_) => {
                self.inputs.metrics.handshake_timeout("outbound");
                return Err(Error::HandshakeTimeout { peer: key.addr, after: cfg.handshake_timeout });
            }
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let addr = key.addr;
        let closed = Arc::new(AtomicBool::new(false));
        let ended = closed.clone();
        // The connection's reads and writes for all its streams happen in this task.
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(conn = id, %addr, error = %e, "HBONE connection ended");
            }
            ended.store(true, Ordering::Release);
        });
        tracing::debug!(conn = id, src = %key.src, dst = %key.dst, %addr, "HBONE connection opened");
        Ok(Conn { id, sender, streams: AtomicUsize::new(0), idle_since: Mutex::new(Instant::now()), closed })
    }

    /// Closes connections idle longer than the timeout, until `stop` resolves.
    pub async fn run_reaper(self: Arc<Self>, stop: impl Future<Output = ()>) {
        let idle = self.inputs.cfg.pool_idle_timeout;
        let mut tick = tokio::time::interval((idle / 4).max(Duration::from_millis(50)));
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = tick.tick() => self.reap(idle).await,
                () = &mut stop => return,
            }
        }
    }

    async fn reap(&self, idle: Duration) {
        let slots: Vec<(Key, Slot)> = self.slots.lock().unwrap_or_else(PoisonError::into_inner).iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        for (key, slot) in slots {
            let mut conns = slot.lock().await;
            let before = conns.len();
            conns.retain(|c| {
                let busy = c.streams.load(Ordering::Acquire) > 0;
                !c.is_closed() && (busy || c.idle_since.lock().unwrap_or_else(PoisonError::into_inner).elapsed() < idle)
            });
            self.forget(before - conns.len());
            if conns.is_empty() {
                drop(conns);
                self.slots.lock().unwrap_or_else(PoisonError::into_inner).remove(&key);
            }
        }
    }
}
