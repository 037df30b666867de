//! What the admin console may ask of a running worker: the databases that
//! wait longest, and a database to run now. Questions go through the
//! worker's event loop, which alone owns its scheduler, and each carries
//! its answer's channel.

use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

pub use super::scheduler::WaitState;

/// How long the console waits for a busy worker's answer.
const ANSWER_WITHIN: Duration = Duration::from_secs(3);

/// A question to the worker's event loop.
pub(crate) enum Control {
    Waiting {
        limit: usize,
        reply: oneshot::Sender<Vec<WaitingDb>>,
    },
    RunNow {
        db: String,
        reply: oneshot::Sender<bool>,
    },
}

/// A database of this worker with changes not yet handled.
#[derive(Clone, Debug, Serialize)]
pub struct WaitingDb {
    /// The role of the worker.
    pub role: String,
    /// The database.
    pub db: String,
    /// Queued, running or retrying.
    pub state: WaitState,
    /// Seconds since the oldest change not yet handled arrived.
    pub waited_seconds: u64,
    /// Runs that failed in a row.
    pub retries: u32,
    /// Why the last run failed, if it did.
    pub reason: Option<String>,
}

/// The console's handle on one running worker.
#[derive(Clone, Debug)]
pub struct WorkerHandle {
    /// The worker's role.
    pub role: String,
    /// The worker's id.
    pub worker_id: String,
    tx: mpsc::Sender<Control>,
}

impl WorkerHandle {
    pub(crate) fn new(role: String, worker_id: String, tx: mpsc::Sender<Control>) -> Self {
        WorkerHandle {
            role,
            worker_id,
            tx,
        }
    }

    /// The `limit` databases that have waited longest; none when the worker
    /// has stopped or does not answer in time.
    pub async fn waiting(&self, limit: usize) -> Vec<WaitingDb> {
        self.ask(|reply| Control::Waiting { limit, reply })
            .await
            .unwrap_or_default()
    }

    /// Runs `db` now, cutting its backoff short. False when its partition
    /// is not this worker's (or the worker does not answer).
    pub async fn run_now(&self, db: &str) -> bool {
        let db = db.to_string();
        self.ask(|reply| Control::RunNow { db, reply })
            .await
            .unwrap_or(false)
    }

    /// Stopped workers leave the process's list.
    pub fn is_stopped(&self) -> bool {
        self.tx.is_closed()
    }

    async fn ask<T>(&self, question: impl FnOnce(oneshot::Sender<T>) -> Control) -> Option<T> {
        let (reply, answer) = oneshot::channel();
        tokio::time::timeout(ANSWER_WITHIN, async {
            self.tx.send(question(reply)).await.ok()?;
            answer.await.ok()
        })
        .await
        .ok()
        .flatten()
    }
}

/// The running workers of a process, for the console's questions.
#[derive(Debug, Default)]
pub struct Workers(Mutex<Vec<WorkerHandle>>);

impl Workers {
    /// A worker started: the console may ask it questions.
    pub(crate) fn register(&self, worker: WorkerHandle) {
        // A list of handles: a poisoned lock is safe to reuse.
        let mut workers = self.0.lock().unwrap_or_else(|e| e.into_inner());
        workers.retain(|w| !w.is_stopped());
        workers.push(worker);
    }

    /// The workers still running.
    pub(crate) fn running(&self) -> Vec<WorkerHandle> {
        let workers = self.0.lock().unwrap_or_else(|e| e.into_inner());
        workers
            .iter()
            .filter(|w| !w.is_stopped())
            .cloned()
            .collect()
    }
}
