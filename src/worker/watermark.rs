//! Which `_db_updates` seq a partition may be checkpointed at.
//!
//! Seqs are opaque, so "the highest handled seq" cannot be computed by
//! comparing them. Instead the worker keeps the feed's events in arrival
//! order, marks each done when the run that covers it finishes, and the
//! checkpoint is the seq of the last event of the done prefix.

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

    /// Marks an event done; unknown ids (already collapsed or popped) are
    /// ignored.
    pub fn complete(&mut self, id: u64) {
        if let Ok(i) = self.entries.binary_search_by_key(&id, |e| e.id) {
            self.entries[i].done = true;
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

    #[cfg(test)]
    fn len(&self) -> usize {
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
    fn completing_unknown_ids_is_harmless() {
        let mut w = Watermark::default();
        w.push(5, seq(5), false);
        w.complete(4);
        w.complete(6);
        assert_eq!(w.advance(), None);
    }
}
