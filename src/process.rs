//! The state one process shares among its parts. `main` builds one
//! [`Process`] and hands it down, explicitly, to the roles it hosts and to
//! the admin server: the workers report into it, the admin server and the
//! console read it. Nothing else is process-wide.

use std::sync::{Arc, Mutex};

use crate::delivery::circuit::{CircuitState, Endpoints};
use crate::metrics::Metrics;
use crate::rules::follower::{DocsWatch, UserDocs};
use crate::status::Tail;
use crate::worker::control::{WorkerHandle, Workers};
use crate::worker::Health;

/// What the workers of this process report and its admin server shows.
#[derive(Default)]
pub struct Process {
    /// Every metric of the process, served at `/metrics`.
    pub metrics: Arc<Metrics>,
    /// Each hosted worker's readiness, served at `/readyz`.
    pub health: Arc<Health>,
    /// The running workers, which the console asks what waits.
    pub(crate) workers: Arc<Workers>,
    /// The latest runs' outcomes, the console's live tail.
    pub(crate) tail: Arc<Tail>,
    /// The followed replicator and on_change documents, once followed.
    docs: Mutex<Option<DocsWatch>>,
    /// The API endpoints the change-listener delivers to, once it runs.
    endpoints: Mutex<Option<Arc<Endpoints>>>,
}

impl Process {
    /// The documents the process's workers follow.
    pub(crate) fn follow(&self, docs: DocsWatch) {
        // Plain slots; a poisoned lock is safe to reuse.
        *self.docs.lock().unwrap_or_else(|e| e.into_inner()) = Some(docs);
    }

    /// The API endpoints the process's change-listener delivers to.
    pub(crate) fn deliver_to(&self, endpoints: Arc<Endpoints>) {
        *self.endpoints.lock().unwrap_or_else(|e| e.into_inner()) = Some(endpoints);
    }

    /// The endpoints of the running change-listener, if there is one.
    pub(crate) fn endpoints(&self) -> Option<Arc<Endpoints>> {
        self.endpoints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Each API endpoint's circuit, in this process.
    pub(crate) fn circuits(&self) -> Vec<(String, CircuitState)> {
        self.endpoints().map(|e| e.states()).unwrap_or_default()
    }

    /// The replicator and on_change documents as last loaded; `None`
    /// before the first load.
    pub(crate) fn docs(&self) -> Option<Arc<UserDocs>> {
        let docs = self.docs.lock().unwrap_or_else(|e| e.into_inner());
        docs.as_ref().and_then(|d| d.borrow().clone())
    }

    /// The workers still running.
    pub(crate) fn workers(&self) -> Vec<WorkerHandle> {
        self.workers.running()
    }
}
