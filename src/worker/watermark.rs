//! Which `_db_updates` seq a partition may be checkpointed at.
//!
//! Seqs are opaque, so "the highest handled seq" cannot be computed by
//! comparing them. Instead the worker keeps the feed's events in arrival
//! order, marks each done when the run that covers it finishes, and the
//! checkpoint is the seq of the last event of the done prefix.
//!
//! Done events next to each other collapse into the latest, so the entries
//! are at most twice the events not done, plus one. The scheduler keeps one
//! event not done per database waiting (and one per run in flight): memory
//! follows the databases that wait, not the traffic.

use std::collections::VecDeque;

use crate::couch::Seq;

#[derive(Debug)]
struct Entry {
    id: u64,
    seq: Seq,
    done: bool,
}

/// Events of one partition in feed order (ids strictly increasing).
#[derive(Debug, Default)]
pub struct Watermark {
    entries: VecDeque<Entry>,
}

impl Watermark {
    /// Appends an event. Consecutive done events collapse into the latest,
    /// so that a long-pending event followed by a flood of others' events
    /// costs one entry, not one per event.
    pub fn push(&mut self, id: u64, seq: Seq, done: bool) {
        debug_assert!(self.entries.back().is_none_or(|e| e.id < id));
        if done {
            if let Some(back) = self.entries.back_mut().filter(|e| e.done) {
                back.id = id;
                back.seq = seq;
                return;
            }
        }
        self.entries.push_back(Entry { id, seq, done });
    }

    /// Marks an event done, collapsing it with done neighbours; unknown
    /// ids (already collapsed or popped) are ignored.
    pub fn complete(&mut self, id: u64) {
        let Ok(i) = self.entries.binary_search_by_key(&id, |e| e.id) else {
            return;
        };
        self.entries[i].done = true;
        // The later of two done neighbours stands for both, as in `push`.
        if self.entries.get(i + 1).is_some_and(|e| e.done) {
            self.entries.remove(i);
        }
        if i > 0 && self.entries[i - 1].done {
            self.entries.remove(i - 1);
        }
    }

    /// Pops the done prefix and returns the seq of its last event, if any.
    pub fn advance(&mut self) -> Option<Seq> {
        let mut last = None;
        while self.entries.front().is_some_and(|e| e.done) {
            last = self.entries.pop_front().map(|e| e.seq);
        }
        last
    }

    /// Entries kept.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn seq(n: u64) -> Seq {
        Seq::from(json!(format!("{n}-opaque")))
    }

    #[test]
    fn checkpoint_stops_before_the_first_pending_event() {
        let mut w = Watermark::default();
        w.push(1, seq(1), false);
        w.push(2, seq(2), true);
        w.push(3, seq(3), false);
        assert_eq!(w.advance(), None);
        w.complete(3);
        assert_eq!(w.advance(), None, "event 1 still pending");
        w.complete(1);
        assert_eq!(w.advance(), Some(seq(3)));
        assert!(w.is_empty());
    }

    #[test]
    fn done_events_behind_a_pending_one_collapse() {
        let mut w = Watermark::default();
        w.push(1, seq(1), false);
        for i in 2..10_000 {
            w.push(i, seq(i), true);
        }
        assert_eq!(w.len(), 2);
        w.complete(1);
        assert_eq!(w.advance(), Some(seq(9_999)));
    }

    #[test]
    fn done_events_collapse_whenever_they_become_done() {
        let mut w = Watermark::default();
        w.push(1, seq(1), false);
        // Another database's event is handled, again and again, while the
        // first waits: the entries do not grow.
        for i in (2..10_000).step_by(2) {
            w.push(i, seq(i), false);
            w.push(i + 1, seq(i + 1), true);
            w.complete(i);
            assert!(w.len() <= 3, "{} entries after event {i}", w.len());
        }
        w.push(10_000, seq(10_000), false);
        w.complete(10_000);
        assert_eq!(w.len(), 2);
        assert_eq!(w.advance(), None, "event 1 still pending");
        w.complete(1);
        assert_eq!(w.advance(), Some(seq(10_000)));
        assert!(w.is_empty());
    }

    #[test]
    fn completing_unknown_ids_is_harmless() {
        let mut w = Watermark::default();
        w.push(5, seq(5), false);
        w.complete(4);
        w.complete(6);
        assert_eq!(w.advance(), None);
    }
}
