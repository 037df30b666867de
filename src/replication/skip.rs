//! When to skip `_revs_diff`, as CouchDB's replicator does since 3.3: while
//! the target has lacked nearly every revision it was asked about (a
//! per-user database fanned into an aggregate: every change is new there),
//! asking costs a request and saves nothing, so the revisions are fetched
//! and written without asking; writing a revision the target has changes
//! nothing. It asks again every few batches, and goes on asking once the
//! target is found to have some.

/// The share of asked revisions that must have been missing to skip.
const THRESHOLD: f64 = 0.9;
/// The weight of the older batches in the average (CouchDB's 0.4).
const DECAY: f64 = 0.4;
/// While skipping, one batch in this many is asked about all the same.
const ASK_EVERY: u32 = 10;

/// How much of what a replication asked about the target lacked, over its
/// recent batches.
#[derive(Clone, Copy, Debug, Default)]
pub struct MissingRate {
    /// The decaying average share of missing revisions.
    rate: f64,
    /// Batches skipped since the target was last asked.
    skipped: u32,
}

impl MissingRate {
    /// Whether the next batch goes without `_revs_diff` (counted as one
    /// skipped).
    pub fn skip(&mut self) -> bool {
        let skip = self.rate >= THRESHOLD && self.skipped + 1 < ASK_EVERY;
        self.skipped = if skip { self.skipped + 1 } else { 0 };
        skip
    }

    /// Counts a batch that was asked about: `found` of `checked` missing.
    pub fn asked(&mut self, checked: u64, found: u64) {
        if checked > 0 {
            let share = found as f64 / checked as f64;
            self.rate = DECAY * self.rate + (1.0 - DECAY) * share;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_that_lacks_everything_is_asked_one_batch_in_ten_and_again_once_it_has_some() {
        let mut rate = MissingRate::default();
        let mut asked = 0;
        for _ in 0..3 {
            assert!(!rate.skip(), "asked until the average passes 0.9");
            rate.asked(10, 10);
            asked += 1;
        }
        let mut skipped = 0;
        for _ in 0..30 {
            if rate.skip() {
                skipped += 1;
            } else {
                rate.asked(10, 10);
                asked += 1;
            }
        }
        assert_eq!((skipped, asked), (27, 6));
        while rate.skip() {}
        rate.asked(10, 2);
        assert!(!rate.skip(), "the target had most: asked again");
        rate.asked(0, 0);
        assert!(!rate.skip(), "an empty batch changes nothing");
    }
}
