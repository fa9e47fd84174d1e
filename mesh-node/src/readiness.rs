//! Readiness: ready once every registered task has released its guard (first config snapshot,
//! certificates of the local workloads, datapath attached).

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex, PoisonError},
};

#[derive(Clone, Default)]
pub struct Ready(Arc<Mutex<BTreeSet<&'static str>>>);

/// Holds readiness back until dropped.
pub struct BlockReady {
    ready: Ready,
    name: &'static str,
}

impl Ready {
    pub fn register(&self, name: &'static str) -> BlockReady {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).insert(name);
        BlockReady { ready: self.clone(), name }
    }

    /// Tasks still pending (empty when ready).
    pub fn pending(&self) -> Vec<&'static str> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).iter().copied().collect()
    }

    pub fn is_ready(&self) -> bool {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).is_empty()
    }
}

impl Drop for BlockReady {
    fn drop(&mut self) {
        self.ready.0.lock().unwrap_or_else(PoisonError::into_inner).remove(self.name);
    }
}
