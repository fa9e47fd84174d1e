//! The published, versioned state: one writer (file watcher or Kubernetes reflectors), many
//! readers (one config stream per node, the CA, the status endpoint).

use std::{path::PathBuf, sync::Arc};

use tokio::sync::watch;

use crate::view::State;

/// A config-folder file or document that could not be read (file mode only).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct FileError {
    pub file: PathBuf,
    /// Index of the document in a multi-document file, when the file itself parsed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub document: Option<usize>,
    pub message: String,
}

#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// 0 = nothing published yet; then strictly increasing.
    pub version: u64,
    pub state: State,
    pub file_errors: Vec<FileError>,
}

/// Bumps the version only when something changed, so nodes are not sent empty updates.
#[derive(Clone)]
pub struct Publisher {
    tx: Arc<watch::Sender<Arc<Snapshot>>>,
}

impl Default for Publisher {
    fn default() -> Self {
        Self::new()
    }
}

impl Publisher {
    pub fn new() -> Self {
        Self { tx: Arc::new(watch::Sender::new(Arc::new(Snapshot::default()))) }
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    pub fn current(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    /// Publishes a new state; returns its version, or `None` if nothing changed.
    pub fn publish(&self, state: State, file_errors: Vec<FileError>) -> Option<u64> {
        let mut published = None;
        self.tx.send_if_modified(|cur| {
            if cur.version > 0 && cur.state == state && cur.file_errors == file_errors {
                return false;
            }
            let version = cur.version + 1;
            *cur = Arc::new(Snapshot { version, state, file_errors });
            published = Some(version);
            true
        });
        published
    }
}
