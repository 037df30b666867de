//! What this process knows in memory and the console shows beside what it
//! reads from the spiegel database: its running workers (to ask them which
//! databases wait, or to run one now), the followed replicator and
//! on_change documents, and the tail of recent runs.

use std::sync::{Arc, Mutex};

use crate::delivery::circuit::{CircuitState, Endpoints};
use crate::rules::follower::{DocsWatch, UserDocs};
use crate::worker::control::WorkerHandle;

use super::tail::Tail;

/// Shared by the workers of the process and the admin server.
#[derive(Debug, Default)]
pub struct Live {
    workers: Mutex<Vec<WorkerHandle>>,
    docs: Mutex<Option<DocsWatch>>,
    endpoints: Mutex<Option<Arc<Endpoints>>>,
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

    /// The API endpoints the process's change-listener delivers to.
    pub(crate) fn deliver_to(&self, endpoints: Arc<Endpoints>) {
        *self.endpoints.lock().unwrap_or_else(|e| e.into_inner()) = Some(endpoints);
    }

    /// The circuits of the process's change-listener, if it runs one.
    pub(crate) fn endpoints(&self) -> Option<Arc<Endpoints>> {
        self.endpoints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Each API endpoint's circuit, in this process.
    pub(crate) fn circuits(&self) -> Vec<(String, CircuitState)> {
        let endpoints = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        endpoints.as_ref().map(|e| e.states()).unwrap_or_default()
    }

    /// The replicator and on_change documents as last loaded; `None`
    /// before the first load.
    pub(crate) fn docs(&self) -> Option<Arc<UserDocs>> {
        let docs = self.docs.lock().unwrap_or_else(|e| e.into_inner());
        docs.as_ref().and_then(|d| d.borrow().clone())
    }
}
