//! The tail of recent runs: the outcomes the roles report to their status
//! books, kept in a bounded ring for the console's live view.

use std::collections::VecDeque;
use std::sync::Mutex;

use serde::Serialize;

/// Entries kept: a few screens of history.
const KEEP: usize = 200;

/// One run's outcome for one document and database.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct TailEntry {
    /// Increasing; a reader asks for what came after the last it saw.
    pub id: u64,
    /// When it was reported (RFC 3339).
    pub at: String,
    /// The reporting role.
    pub role: String,
    /// The replicator or on_change document.
    pub doc: String,
    /// The database of the run.
    pub db: String,
    /// Whether it succeeded.
    pub ok: bool,
    /// The status of a delivery, the documents a replication wrote, or
    /// the error.
    pub detail: Option<String>,
}

/// A bounded ring of [`TailEntry`].
#[derive(Debug, Default)]
pub struct Tail {
    inner: Mutex<Ring>,
}

#[derive(Debug, Default)]
struct Ring {
    entries: VecDeque<TailEntry>,
    next_id: u64,
}

impl Tail {
    /// Adds an outcome; the oldest entry goes once [`KEEP`] are kept.
    pub fn push(&self, role: &str, doc: &str, db: &str, ok: bool, detail: Option<String>) {
        // Plain data: a poisoned lock is safe to reuse.
        let mut ring = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        ring.next_id += 1;
        let entry = TailEntry {
            id: ring.next_id,
            at: crate::ids::timestamp(),
            role: role.into(),
            doc: doc.into(),
            db: db.into(),
            ok,
            detail: detail.map(|d| crate::couch::origins_only(&d)),
        };
        if ring.entries.len() == KEEP {
            ring.entries.pop_front();
        }
        ring.entries.push_back(entry);
    }

    /// The entries after `after`, oldest first; all of them when `after`
    /// is one this process never gave (a reader from before a restart).
    pub fn since(&self, after: u64) -> Vec<TailEntry> {
        let ring = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let after = if after > ring.next_id { 0 } else { after };
        ring.entries
            .iter()
            .filter(|e| e.id > after)
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reader_gets_what_came_after_its_last_entry_and_the_ring_is_bounded() {
        let tail = Tail::default();
        for i in 0..KEEP + 5 {
            tail.push("change-listener", "rule", &format!("db{i}"), true, None);
        }
        let all = tail.since(0);
        assert_eq!(all.len(), KEEP);
        assert_eq!(all[0].db, "db5", "the oldest went first");
        let last = all[all.len() - 2].id;
        assert_eq!(tail.since(last).len(), 1);
        assert_eq!(
            tail.since(u64::MAX).len(),
            KEEP,
            "a reader from before a restart"
        );
    }
}
