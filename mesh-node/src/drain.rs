//! Graceful drain: the trigger tells every watcher to stop taking new work, then waits until all
//! watchers are gone (each listener and each open connection holds one) or the deadline passes.

use std::time::Duration;

use tokio::sync::{mpsc, watch};

/// Create a trigger and the first watcher; clone the watcher for every task that must finish
/// before shutdown completes.
pub fn new() -> (Trigger, Watcher) {
    let (signal, signal_rx) = watch::channel(false);
    let (hold, done) = mpsc::channel(1);
    (Trigger { signal, done }, Watcher { signal: signal_rx, _hold: hold })
}

pub struct Trigger {
    signal: watch::Sender<bool>,
    done: mpsc::Receiver<()>,
}

impl Trigger {
    /// Signals drain and waits for every watcher to be dropped. Returns `false` when the deadline
    /// passed first (the caller then closes what is left by exiting).
    pub async fn drain(mut self, deadline: Duration) -> bool {
        self.signal.send_replace(true);
        tokio::time::timeout(deadline, self.done.recv()).await.is_ok()
    }
}

#[derive(Clone)]
pub struct Watcher {
    signal: watch::Receiver<bool>,
    /// Never sends: the trigger only waits for all clones to be dropped.
    _hold: mpsc::Sender<()>,
}

impl Watcher {
    /// Resolves once drain has started.
    pub async fn signaled(&self) {
        let mut rx = self.signal.clone();
        // An Err means the trigger is gone, which also means: stop.
        let _ = rx.wait_for(|d| *d).await;
    }

    pub fn is_draining(&self) -> bool {
        *self.signal.borrow()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_waits_for_watchers_up_to_the_deadline() {
        let (trigger, watcher) = new();
        let busy = watcher.clone();
        drop(watcher);
        let task = tokio::spawn(async move {
            busy.signaled().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(busy);
        });
        assert!(trigger.drain(Duration::from_secs(2)).await, "the watcher finished in time");
        task.await.expect("task");

        let (trigger, watcher) = new();
        let stuck = watcher.clone();
        drop(watcher);
        assert!(!trigger.drain(Duration::from_millis(50)).await, "a stuck watcher hits the deadline");
        assert!(stuck.is_draining());
    }
}
