//! The one accept loop every listener runs: take connections until drain, give each a task that
//! holds the drain open until it ends, and back off when accepting fails (a full file table must
//! not turn into a busy loop: the error repeats at once until a descriptor is freed).

use std::{future::Future, net::SocketAddr, time::Duration};

use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument as _;

use crate::drain;

const BACKOFF_MIN: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Accepts on `listener` until drain, running `handle` for each connection in its own task; the
/// handler keeps the watcher it is given until the connection is done.
pub async fn run<F, Fut>(listener: TcpListener, name: &'static str, drain: drain::Watcher, handle: F)
where
    F: Fn(TcpStream, SocketAddr, drain::Watcher) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
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
        // The task's watcher holds the drain open until the connection is done; the handler
        // watches it too, to close gracefully when drain starts.
        let span = tracing::debug_span!("conn", listener = name, %peer);
        tokio::spawn(handle(tcp, peer, drain.clone()).instrument(span));
    }
    tracing::info!(listener = name, "drained: no longer accepting");
}
