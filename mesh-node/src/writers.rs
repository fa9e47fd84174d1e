//! The tasks that write the node's kernel state (the datapath's maps, policy-routing rules),
//! supervised.
//!
//! Each runs until drain begins, then stops, so that a successor daemon is the maps' only writer
//! once it has taken over. A writer that ends before that (a panic) would leave the kernel
//! frozen at its last state while the daemon looked healthy: new pods never captured, a removed
//! backend still picked, a new DENY never enforced. [`Writers::supervise`] turns that into a
//! stop instead: readiness drops, the daemon drains and exits with an error naming the writer,
//! and its supervisor (the kubelet, systemd) starts a new one, which adopts the pinned kernel
//! state as on any restart.

use std::{collections::HashMap, future::Future};

use tokio::{
    sync::{oneshot, watch},
    task::JoinSet,
};

use crate::readiness::Ready;

/// A writer that ended while the daemon still needed it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the {name} writer {how} before drain; the node's kernel state would no longer follow the mesh")]
pub struct Ended {
    pub name: &'static str,
    /// `panicked` or `returned`.
    pub how: &'static str,
}

/// The node's kernel writers: tasks on the proxy's runtime and threads of their own.
#[derive(Default)]
pub struct Writers {
    tasks: JoinSet<()>,
    task_names: HashMap<tokio::task::Id, &'static str>,
    threads: Vec<Thread>,
}

/// A writer on a thread of its own, with a current-thread runtime.
struct Thread {
    name: &'static str,
    stop: oneshot::Sender<()>,
    /// Resolves with `Ok` when the writer returned (or was stopped), `Err` when it panicked.
    done: oneshot::Receiver<()>,
    /// `done` has resolved (a oneshot is polled to completion once).
    ended: bool,
}

impl Writers {
    /// Runs `writer` as a task of the current runtime.
    pub fn spawn_task(&mut self, name: &'static str, writer: impl Future<Output = ()> + Send + 'static) {
        let id = self.tasks.spawn(writer).id();
        self.task_names.insert(id, name);
    }

    /// Runs `writer` on a thread named `name` with a runtime of its own. A stop lands between
    /// two of the writer's polls: a synchronous step in progress (one kernel application)
    /// finishes first.
    pub fn spawn_thread<F>(&mut self, name: &'static str, writer: F) -> std::io::Result<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let (done_tx, done) = oneshot::channel();
        std::thread::Builder::new().name(name.into()).spawn(move || {
            rt.block_on(async {
                tokio::select! {
                    () = writer => {}
                    _ = stopped => {}
                }
            });
            // Not reached on a panic: `done_tx` is dropped unsent, which says so.
            let _ = done_tx.send(());
        })?;
        self.threads.push(Thread { name, stop, done, ended: false });
        Ok(())
    }

    /// Until drain begins (`shutdown` turns true): waits, and if a writer ends first, marks the
    /// daemon not ready, asks it to stop through `shutdown` and returns which one ended. Then
    /// stops every writer and returns once none of them writes any more.
    pub async fn supervise(mut self, shutdown: watch::Sender<bool>, ready: &Ready) -> Result<(), Ended> {
        let mut draining = shutdown.subscribe();
        let ended = tokio::select! {
            _ = draining.wait_for(|d| *d) => None,
            ended = self.first_to_end() => Some(ended),
        };
        if let Some(ended) = &ended {
            tracing::error!(writer = ended.name, how = ended.how, "a kernel writer ended before drain: the daemon stops, so that its supervisor starts a new one that adopts the kernel's pinned state");
            std::mem::forget(ready.register(NOT_READY));
            shutdown.send_replace(true);
        }
        self.tasks.shutdown().await;
        for thread in self.threads {
            drop(thread.stop);
            if !thread.ended {
                let _ = thread.done.await;
            }
        }
        ended.map_or(Ok(()), Err)
    }

    /// The first writer to end, task or thread; pending while none has (or there are none).
    async fn first_to_end(&mut self) -> Ended {
        let Self { tasks, task_names, threads } = self;
        let thread_ended = async {
            if threads.is_empty() {
                return std::future::pending().await;
            }
            let waits = threads.iter_mut().map(|t| {
                Box::pin(async move {
                    let how = if (&mut t.done).await.is_ok() { "returned" } else { "panicked" };
                    t.ended = true;
                    Ended { name: t.name, how }
                })
            });
            futures::future::select_all(waits).await.0
        };
        let task_ended = async {
            let (id, how) = match tasks.join_next_with_id().await {
                Some(Ok((id, ()))) => (id, "returned"),
                Some(Err(e)) => (e.id(), if e.is_panic() { "panicked" } else { "was cancelled" }),
                None => return std::future::pending().await,
            };
            Ended { name: task_names.get(&id).copied().unwrap_or("unnamed"), how }
        };
        tokio::select! {
            e = thread_ended => e,
            e = task_ended => e,
        }
    }
}

/// What readiness reports as pending once a writer has ended.
pub const NOT_READY: &str = "kernel writers (one ended; the daemon is stopping)";

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn panics() -> impl Future<Output = ()> + Send + 'static {
        async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            panic!("a writer's bug (this test panics on purpose)");
        }
    }

    async fn supervised(writers: Writers) -> (Result<(), Ended>, bool, Ready) {
        let (shutdown, asked) = watch::channel(false);
        let ready = Ready::default();
        let result = tokio::time::timeout(Duration::from_secs(10), writers.supervise(shutdown, &ready)).await.expect("supervise returns");
        let stop_asked = *asked.borrow();
        (result, stop_asked, ready)
    }

    #[tokio::test]
    async fn a_panicking_thread_stops_the_daemon_and_drops_readiness() {
        let mut writers = Writers::default();
        writers.spawn_task("routing", std::future::pending());
        writers.spawn_thread("kernel-sync", panics()).unwrap();
        let (result, stop_asked, ready) = supervised(writers).await;
        assert_eq!(result, Err(Ended { name: "kernel-sync", how: "panicked" }));
        assert!(stop_asked, "the daemon was asked to stop");
        assert_eq!(ready.pending(), vec![NOT_READY]);
    }

    #[tokio::test]
    async fn a_panicking_task_is_named() {
        let mut writers = Writers::default();
        writers.spawn_thread("kernel-sync", std::future::pending()).unwrap();
        writers.spawn_task("routing", panics());
        let (result, stop_asked, _) = supervised(writers).await;
        assert_eq!(result, Err(Ended { name: "routing", how: "panicked" }));
        assert!(stop_asked);
    }

    #[tokio::test]
    async fn a_writer_that_returns_early_counts_too() {
        let mut writers = Writers::default();
        writers.spawn_thread("kernel-sync", async {}).unwrap();
        let (result, _, _) = supervised(writers).await;
        assert_eq!(result, Err(Ended { name: "kernel-sync", how: "returned" }));
    }

    #[tokio::test]
    async fn drain_stops_every_writer_and_is_no_error() {
        let mut writers = Writers::default();
        let (alive_tx, mut alive) = tokio::sync::mpsc::channel::<()>(1);
        let in_thread = alive_tx.clone();
        writers.spawn_thread("kernel-sync", async move {
            let _held = in_thread;
            std::future::pending::<()>().await;
        })
        .unwrap();
        writers.spawn_task("routing", async move {
            let _held = alive_tx;
            std::future::pending::<()>().await;
        });
        let (shutdown, _) = watch::channel(false);
        let ready = Ready::default();
        let supervising = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { writers.supervise(shutdown, &ready).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        shutdown.send_replace(true);
        let result = tokio::time::timeout(Duration::from_secs(10), supervising).await.expect("returns").unwrap();
        assert_eq!(result, Ok(()));
        // Both writers (and the senders they held) are gone once supervise returns.
        assert!(alive.recv().await.is_none(), "no writer is left running");
    }
}
