//! The one accept loop every listener runs: take connections until drain, give each a task that
//! holds the drain open until it ends, and back off when accepting fails (a full file table must
//! not turn into a busy loop: the error repeats at once until a descriptor is freed). A listener
//! takes a bounded number of connections at once, in all and from one source address: one more
//! is closed at once and counted, so one client cannot take every descriptor of the node. A
//! listener may also bound how fast one source opens connections (the HBONE listener does: each
//! costs a TLS handshake).

use std::{
    collections::HashMap,
    future::Future,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use mesh_l7::per_source::{PerSource, Rate};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
};
use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument as _;

use crate::drain;

const BACKOFF_MIN: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Concurrent connections a listener serves, in all and from one source address, and how fast
/// one source may open them (`None`: no bound).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Limits {
    pub max: usize,
    pub per_source: usize,
    pub rate: Option<Rate>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    pub listener: &'static str,
    /// `listener_limit`, `source_limit` or `source_rate`.
    pub reason: &'static str,
}

/// Connections closed at accept because a [`Limits`] was reached.
pub type Refused = Family<RefusedLabels, Counter>;

/// The connections a listener has open, in all and by source.
#[derive(Default)]
struct Open {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// One admitted connection: frees its place when dropped (with the connection's task).
struct Admitted {
    open: Arc<Mutex<Open>>,
    source: IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        open.total -= 1;
        if let Some(n) = open.by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                open.by_source.remove(&self.source);
            }
        }
    }
}

/// A place for a connection from `source`, or the limit that refuses it. The source's rate is
/// charged only for a connection the concurrency limits let in.
fn admit(open: &Arc<Mutex<Open>>, limits: Limits, rate: Option<&PerSource>, source: IpAddr) -> Result<Admitted, &'static str> {
    let mut o = open.lock().unwrap_or_else(PoisonError::into_inner);
    if o.total >= limits.max {
        return Err("listener_limit");
    }
    let from_source = o.by_source.get(&source).copied().unwrap_or(0);
    if from_source >= limits.per_source {
        return Err("source_limit");
    }
    if rate.is_some_and(|r| r.admit(source, Instant::now()).is_err()) {
        return Err("source_rate");
    }
    o.total += 1;
    o.by_source.insert(source, from_source + 1);
    Ok(Admitted { open: open.clone(), source })
}

/// Accepts on `listener` until drain, running `handle` for each connection in its own task; the
/// handler keeps the watcher it is given until the connection is done. Connections beyond
/// `limits` are closed at once and counted in `refused`.
pub async fn run<F, Fut>(listener: TcpListener, name: &'static str, limits: Limits, refused: Refused, drain: drain::Watcher, handle: F)
where
    F: Fn(TcpStream, SocketAddr, drain::Watcher) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let open = Arc::new(Mutex::new(Open::default()));
    let rate = limits.rate.map(PerSource::new);
    let mut backoff = BACKOFF_MIN;
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => {
                    backoff = BACKOFF_MIN;
                    c
                }
                Err(e) => {
                    tracing::warn!(listener = name, error = %e, retry_in = ?backoff, "accept failed");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = drain.signaled() => break,
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            },
            () = drain.signaled() => break,
        };
        let admitted = match admit(&open, limits, rate.as_ref(), peer.ip()) {
            Ok(a) => a,
            Err(reason) => {
                refused.get_or_create(&RefusedLabels { listener: name, reason }).inc();
                tracing::debug!(listener = name, %peer, reason, "connection refused at accept");
                drop(tcp);
                continue;
            }
        };
        // The task's watcher holds the drain open until the connection is done; the handler
        // watches it too, to close gracefully when drain starts.
        let span = tracing::debug_span!("conn", listener = name, %peer);
        let task = handle(tcp, peer, drain.clone());
        tokio::spawn(
            async move {
                task.await;
                drop(admitted);
            }
            .instrument(span),
        );
    }
    tracing::info!(listener = name, "drained: no longer accepting");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_counts_per_listener_and_per_source_and_frees_on_drop() {
        let open = Arc::new(Mutex::new(Open::default()));
        let limits = Limits { max: 3, per_source: 2, rate: None };
        let (a, b, c) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]), IpAddr::from([10, 0, 0, 3]));
        let a1 = admit(&open, limits, None, a).expect("a 1");
        let _a2 = admit(&open, limits, None, a).expect("a 2");
        assert_eq!(admit(&open, limits, None, a).err(), Some("source_limit"));
        let _b1 = admit(&open, limits, None, b).expect("b 1");
        assert_eq!(admit(&open, limits, None, c).err(), Some("listener_limit"));
        drop(a1);
        let _c1 = admit(&open, limits, None, c).expect("a place was freed");
        assert_eq!(admit(&open, limits, None, a).err(), Some("listener_limit"));
        let o = open.lock().unwrap();
        assert_eq!((o.total, o.by_source.len()), (3, 3));
    }

    #[test]
    fn a_source_with_nothing_open_is_forgotten() {
        let open = Arc::new(Mutex::new(Open::default()));
        let limits = Limits { max: 10, per_source: 1, rate: None };
        drop(admit(&open, limits, None, IpAddr::from([10, 0, 0, 1])).expect("admitted"));
        let _held = admit(&open, limits, None, IpAddr::from([10, 0, 0, 9])).expect("admitted");
        let o = open.lock().unwrap();
        assert_eq!((o.total, o.by_source.keys().copied().collect::<Vec<_>>()), (1, vec![IpAddr::from([10, 0, 0, 9])]), "no entry left for the closed source");
    }
}
