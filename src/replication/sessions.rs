//! The progress of this process's replications between their runs, so that
//! a run over a database that changes every second neither reads the
//! source's checkpoint again nor reads its changes twice.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::Progress;

/// Progress unused for this long is dropped: the next run over such a
/// database reads both checkpoints, which costs one request.
const IDLE: Duration = Duration::from_secs(600);

/// How often idle progress is looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Each replication's progress, by source database and replication id.
#[derive(Default)]
pub struct Sessions {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    kept: HashMap<(String, String), (Progress, Instant)>,
    swept: Option<Instant>,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A cache: a poisoned lock holds nothing wrong, only less.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The progress a run of replication `id` over `db` starts from. It is
    /// taken out: a run that fails leaves none, and the next one reads both
    /// checkpoints.
    pub fn take(&self, db: &str, id: &str) -> Option<Progress> {
        let key = (db.to_string(), id.to_string());
        self.lock().kept.remove(&key).map(|(progress, _)| progress)
    }

    /// Keeps what a run that succeeded left.
    pub fn keep(&self, db: &str, id: String, progress: Progress) {
        let mut inner = self.lock();
        let now = Instant::now();
        inner.kept.insert((db.to_string(), id), (progress, now));
        if inner.swept.is_none_or(|at| at.elapsed() >= SWEEP_EVERY) {
            inner.kept.retain(|_, (_, used)| used.elapsed() < IDLE);
            inner.swept = Some(now);
        }
    }

    /// Drops the progress of every replication from `db`: it was deleted,
    /// and one created again under its name starts over.
    pub fn forget(&self, db: &str) {
        self.lock().kept.retain(|(source, _), _| source != db);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_is_taken_once_and_a_deleted_source_drops_only_its_own() {
        let sessions = Sessions::default();
        let progress = Progress::for_tests();
        sessions.keep("a", "r1".into(), progress.clone());
        sessions.keep("a", "r2".into(), progress.clone());
        sessions.keep("b", "r1".into(), progress);
        assert!(sessions.take("a", "r1").is_some());
        assert!(
            sessions.take("a", "r1").is_none(),
            "a failed run keeps none"
        );
        sessions.forget("a");
        assert!(sessions.take("a", "r2").is_none());
        assert!(sessions.take("b", "r1").is_some());
    }
}
