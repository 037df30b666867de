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
    /// Databases with a run under way, and whether they were forgotten
    /// meanwhile (then that run's progress is not kept).
    running: HashMap<String, bool>,
    swept: Option<Instant>,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A cache: a poisoned lock holds nothing wrong, only less.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The progress a run of replication `id` over `db` starts from, unless
    /// unused for [`IDLE`]. It is taken out: a run that fails leaves none,
    /// and the next one reads both checkpoints. The run ends with
    /// [`Self::finish`].
    pub fn take(&self, db: &str, id: &str) -> Option<Progress> {
        let mut inner = self.lock();
        inner.running.insert(db.to_string(), false);
        let key = (db.to_string(), id.to_string());
        let (progress, used) = inner.kept.remove(&key)?;
        (used.elapsed() < IDLE).then_some(progress)
    }

    /// Ends a run: keeps what it left, unless the database was forgotten
    /// while it ran (its progress would belong to the deleted database).
    pub fn finish(&self, db: &str, id: String, progress: Option<Progress>) {
        let mut inner = self.lock();
        let forgotten = inner.running.remove(db).unwrap_or(true);
        let Some(progress) = progress.filter(|_| !forgotten) else {
            return;
        };
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
        self.forget_where(|source| source == db);
    }

    /// Drops the progress of the databases `gone` names (a partition
    /// handed over or lost).
    pub fn forget_where(&self, gone: impl Fn(&str) -> bool) {
        let mut inner = self.lock();
        inner.kept.retain(|(source, _), _| !gone(source));
        for (db, forgotten) in inner.running.iter_mut() {
            *forgotten |= gone(db);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(sessions: &Sessions, db: &str, id: &str) {
        sessions.take(db, id);
        sessions.finish(db, id.into(), Some(Progress::for_tests()));
    }

    #[test]
    fn progress_is_taken_once_and_a_deleted_source_drops_only_its_own() {
        let sessions = Sessions::default();
        kept(&sessions, "a", "r1");
        kept(&sessions, "a", "r2");
        kept(&sessions, "b", "r1");
        assert!(sessions.take("a", "r1").is_some());
        sessions.finish("a", "r1".into(), None);
        assert!(
            sessions.take("a", "r1").is_none(),
            "a failed run keeps none"
        );
        sessions.finish("a", "r1".into(), None);
        sessions.forget("a");
        assert!(sessions.take("a", "r2").is_none());
        sessions.finish("a", "r2".into(), None);
        assert!(sessions.take("b", "r1").is_some());
    }

    #[test]
    fn a_run_over_a_database_deleted_meanwhile_or_whose_partition_went_keeps_nothing() {
        let sessions = Sessions::default();
        sessions.take("a", "r1");
        sessions.forget("a");
        sessions.finish("a", "r1".into(), Some(Progress::for_tests()));
        assert!(sessions.take("a", "r1").is_none());
        sessions.finish("a", "r1".into(), None);
        kept(&sessions, "a", "r1");
        kept(&sessions, "b", "r1");
        sessions.forget_where(|db| db == "a");
        assert!(sessions.take("a", "r1").is_none(), "its partition went");
        assert!(sessions.take("b", "r1").is_some());
    }
}
