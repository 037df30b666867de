//! What the change-listener keeps about each database between its runs:
//! what a failed run leaves for its retry, the batches waiting for more
//! changes, and the databases paused rules hold back. Kept only while it
//! matters, so that it stays bounded however many databases pass through:
//! a database's entry goes when its run ends done, when its partition is no
//! longer this worker's, and, when nothing of it is pending, after
//! [`IDLE`] without a run.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::jobs::DeliveryKey;

/// A database not run for this long loses what is kept about it, unless
/// something of it is pending (a failed attempt, a deletion, a batch).
pub(super) const IDLE: Duration = Duration::from_secs(600);

/// The idle sweep runs at most this often (from the runs themselves: no
/// timer of its own).
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// What a database's failed run leaves for its retry.
pub(super) struct Progress {
    /// Requests already delivered (or dead-lettered) since the checkpoint.
    pub delivered: HashSet<DeliveryKey>,
    /// Attempts of the requests that failed.
    pub attempts: HashMap<DeliveryKey, Attempts>,
    /// Deleted while we held it: the next run starts from the beginning.
    pub deleted: bool,
    /// Per batch rule, the first member of the incomplete batch that waits
    /// for more changes, and when it was first seen.
    pub batches: HashMap<String, (DeliveryKey, Instant)>,
    /// When a run of the database last started (or the entry was made).
    touched: Instant,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            delivered: HashSet::new(),
            attempts: HashMap::new(),
            deleted: false,
            batches: HashMap::new(),
            touched: Instant::now(),
        }
    }
}

impl Progress {
    /// Nothing of it must outlive an idle spell: no failed attempt counts
    /// toward `backoff.limit`, no deletion waits for the next run, no batch
    /// waits for more changes.
    fn settled(&self) -> bool {
        self.attempts.is_empty() && !self.deleted && self.batches.is_empty()
    }
}

pub(super) struct Attempts {
    pub count: u32,
    pub first_at: String,
    /// When its last attempt failed, or an open circuit first held it: its
    /// backoff schedule runs from there.
    pub since: Instant,
}

#[derive(Default)]
pub(super) struct Books {
    progress: Mutex<HashMap<String, Progress>>,
    /// Per paused or unusable rule, the databases it holds back: they run
    /// again as soon as it is resumed, fixed or deleted.
    held: Mutex<HashMap<String, HashSet<String>>>,
    last_sweep: Mutex<Option<Instant>>,
}

impl Books {
    pub fn progress(&self) -> MutexGuard<'_, HashMap<String, Progress>> {
        // Bookkeeping only; a poisoned lock is safe to reuse.
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn held(&self) -> MutexGuard<'_, HashMap<String, HashSet<String>>> {
        // Bookkeeping only; a poisoned lock is safe to reuse.
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A run of `db` starts at `now`: its entry is touched, and whether it
    /// was deleted since its last run is taken (its seqs restarted).
    pub fn start_run(&self, db: &str, now: Instant) -> bool {
        self.sweep(now);
        let mut progress = self.progress();
        let Some(p) = progress.get_mut(db) else {
            return false;
        };
        p.touched = now;
        std::mem::take(&mut p.deleted)
    }

    /// A run of `db` ended done: every change up to its checkpoint is
    /// delivered or dead-lettered, no batch waits and no rule holds it, so
    /// nothing kept about it matters any more. A deletion noted during the
    /// run stays for the next one.
    pub fn done(&self, db: &str) {
        let mut progress = self.progress();
        if progress.get(db).is_some_and(|p| !p.deleted) {
            progress.remove(db);
        }
        drop(progress);
        self.held().retain(|_, dbs| {
            dbs.remove(db);
            !dbs.is_empty()
        });
    }

    /// The databases for which `gone` holds are another worker's now: what
    /// is kept about them would go stale.
    pub fn forget_where(&self, gone: impl Fn(&str) -> bool) {
        self.progress().retain(|db, _| !gone(db));
        self.held().retain(|_, dbs| {
            dbs.retain(|db| !gone(db));
            !dbs.is_empty()
        });
    }

    /// Drops the settled entries of databases not run for [`IDLE`], at
    /// most once per [`SWEEP_EVERY`].
    fn sweep(&self, now: Instant) {
        {
            let mut last = self.last_sweep.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_some_and(|at| now.saturating_duration_since(at) < SWEEP_EVERY) {
                return;
            }
            *last = Some(now);
        }
        self.progress()
            .retain(|_, p| !p.settled() || now.saturating_duration_since(p.touched) < IDLE);
    }

    /// The databases with an entry, and the holds of paused rules.
    #[cfg(test)]
    pub fn sizes(&self) -> (usize, usize) {
        let held = self.held().values().map(HashSet::len).sum();
        (self.progress().len(), held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::couch::Change;

    fn key(db: &str) -> DeliveryKey {
        let change: Change = serde_json::from_value(serde_json::json!({
            "seq": "1", "id": db, "changes": [{"rev": "1-a"}]
        }))
        .expect("a change");
        DeliveryKey::of("rule", &change)
    }

    /// What a run leaves: one delivered request, and a failed one if
    /// `failed`.
    fn ran(books: &Books, db: &str, failed: bool) {
        books.start_run(db, Instant::now());
        let mut progress = books.progress();
        let p = progress.entry(db.to_string()).or_default();
        p.delivered.insert(key(db));
        if failed {
            let since = Instant::now();
            let first_at = String::new();
            p.attempts.insert(
                key(db),
                Attempts {
                    count: 1,
                    first_at,
                    since,
                },
            );
        }
    }

    #[test]
    fn databases_whose_runs_end_done_leave_nothing_behind() {
        let books = Books::default();
        for n in 0..1000 {
            let db = format!("db{n}");
            ran(&books, &db, false);
            books
                .held()
                .entry("paused".into())
                .or_default()
                .insert(db.clone());
            books.done(&db);
        }
        assert_eq!(books.sizes(), (0, 0));
    }

    #[test]
    fn a_failed_attempt_is_kept_until_handled_however_long_idle() {
        let books = Books::default();
        ran(&books, "failed", true);
        ran(&books, "idle", false);
        let later = Instant::now() + IDLE * 10;
        books.start_run("other", later);
        assert!(
            books.progress().contains_key("failed"),
            "its count must survive"
        );
        assert!(
            !books.progress().contains_key("idle"),
            "settled and idle: dropped"
        );
        books.done("failed");
        assert_eq!(books.sizes(), (0, 0));
    }

    #[test]
    fn a_deletion_noted_during_a_run_outlives_its_end() {
        let books = Books::default();
        ran(&books, "db", false);
        books.progress().get_mut("db").expect("entry").deleted = true;
        books.done("db");
        assert!(
            books.start_run("db", Instant::now()),
            "the next run starts over"
        );
    }

    #[test]
    fn a_partition_gone_takes_its_databases_with_it() {
        let books = Books::default();
        for n in 0..100 {
            let db = format!("db{n}");
            ran(&books, &db, n % 2 == 0);
            books.held().entry("paused".into()).or_default().insert(db);
        }
        books.forget_where(|db| db.ends_with(['1', '3', '5', '7', '9']));
        assert_eq!(books.sizes(), (50, 50));
        books.forget_where(|_| true);
        assert_eq!(books.sizes(), (0, 0));
    }
}
