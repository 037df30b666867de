//! What this process knows in memory and the console shows beside what it
//! reads from the spiegel database: its running workers (to ask them which
//! databases wait, or to run one now), the followed replicator and
//! on_change documents, and the tail of recent runs.

use std::sync::{Arc, Mutex};

use crate::rules::follower::{DocsWatch, UserDocs};
use crate::worker::control::WorkerHandle;

use super::tail::Tail;

/// Shared by the workers of the process and the admin server.
#[derive(Debug, Default)]
pub struct Live {
    workers: Mutex<Vec<WorkerHandle>>,
    docs: Mutex<Option<DocsWatch>>,
    /// The latest runs' outcomes, newest last.
    pub tail: Tail,
}

impl Live {
    /// A worker started: the console may ask it questions.
    pub fn register(&self, worker: WorkerHandle) {
        let mut workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        workers.retain(|w| !w.is_stopped());
        workers.push(worker);
    }

    /// The workers still running.
    pub fn workers(&self) -> Vec<WorkerHandle> {
        // A list of handles: a poisoned lock is safe to reuse.
        let workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        workers
            .iter()
            .filter(|w| !w.is_stopped())
            .cloned()
            .collect()
    }

    /// The documents the process's workers follow.
    pub(crate) fn follow(&self, docs: DocsWatch) {
        *self.docs.lock().unwrap_or_else(|e| e.into_inner()) = Some(docs);
    }

    /// The replicator and on_change documents as last loaded; `None`
    /// before the first load.
    pub(crate) fn docs(&self) -> Option<Arc<UserDocs>> {
        let docs = self.docs.lock().unwrap_or_else(|e| e.into_inner());
        docs.as_ref().and_then(|d| d.borrow().clone())
    }
}
