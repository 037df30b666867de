//! The requests of one page of a database's changes: one per change and
//! matching rule, or for a `batch` rule one per run of up to
//! `max_changes` of its matching changes. Each knows where in the page
//! delivery in change order reaches it, and the first change it covers:
//! the checkpoint never moves past a change whose requests are not done.

use std::borrow::Cow;
use std::collections::HashSet;
use std::time::Duration;

use serde_json::value::RawValue;

use crate::couch::{Change, Doc};
use crate::delivery::dead_letter::DeadLetter;
use crate::delivery::{Request, RequestError};
use crate::rules::on_change::{Batch, ChangeContext, OnChangeRule};

/// One rule's delivery of one change. A change is its document id and
/// revision, never its seq: on a sharded database the same change can come
/// back with another seq when `_changes` is read again.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct DeliveryKey {
    rule: String,
    doc_id: String,
    rev: String,
}

impl DeliveryKey {
    pub(super) fn of(rule: &str, change: &Change) -> Self {
        DeliveryKey {
            rule: rule.to_string(),
            doc_id: change.id.clone(),
            rev: change.rev().to_string(),
        }
    }
}

/// A request to make, a batch or a rule that holds the database back, or a
/// request that cannot be built.
pub(super) struct Job<'a> {
    /// The delivery whose attempts count: the change's, or a batch's first
    /// member's.
    pub key: DeliveryKey,
    pub rule: &'a OnChangeRule,
    /// Index in the page of the change at which delivery in change order
    /// reaches the job: its change, a batch's last member.
    pub at: usize,
    /// Index of the first change it covers.
    pub first: usize,
    /// The change at `at`.
    pub change: &'a Change,
    /// A batch's members, settled together; empty for one change.
    pub members: Vec<(DeliveryKey, &'a Change)>,
    pub work: Work,
}

impl Job<'_> {
    /// The deliveries the job settles: its change's, or each batch
    /// member's.
    pub fn keys(&self) -> impl Iterator<Item = &DeliveryKey> {
        let single = self.members.is_empty().then_some(&self.key);
        single
            .into_iter()
            .chain(self.members.iter().map(|(key, _)| key))
    }

    /// The job's dead letter: its change, or a batch's members.
    pub fn letter(&self, db: &str, request: Box<RawValue>, last_error: String) -> DeadLetter {
        let members: Vec<&Change> = self.members.iter().map(|(_, c)| *c).collect();
        let batch = (!members.is_empty()).then_some(members.as_slice());
        DeadLetter::new(&self.rule.id, db, self.change, batch, request, last_error)
    }
}

/// What a job does.
pub(super) enum Work {
    Send(Box<Request>),
    /// An incomplete batch waits this long for more changes.
    Hold(Duration),
    /// The rule holds its databases back (paused, or unusable since an
    /// edit): nothing is built.
    Held,
    /// The request cannot be built for this change: it becomes a dead
    /// letter.
    Unbuildable(RequestError),
}

/// What planning a page needs to know.
pub(super) struct Page<'p, 'a> {
    pub db: &'p str,
    pub rules: &'p [&'a OnChangeRule],
    pub changes: &'a [Change],
    /// Deliveries done since the checkpoint (by an earlier, failed run).
    pub delivered: &'p HashSet<DeliveryKey>,
}

impl<'a> Page<'_, 'a> {
    /// Every job of the page, in the order delivery reaches them. `waited`
    /// says how long an incomplete batch, known by its first member, has
    /// been waiting.
    pub fn jobs(&self, waited: impl Fn(&OnChangeRule, &DeliveryKey) -> Duration) -> Vec<Job<'a>> {
        let docs: Vec<Cow<'a, Doc>> = self.changes.iter().map(Change::doc_or_stub).collect();
        let mut jobs = self.singles(&docs);
        for rule in self.rules.iter().filter(|r| r.batch.is_some()) {
            jobs.extend(self.batches(rule, &docs, &waited));
        }
        jobs.sort_by_key(|j| j.at);
        jobs
    }

    fn context<'c>(&'c self, rule: &'c OnChangeRule, i: usize, doc: &'c Doc) -> ChangeContext<'c> {
        let change = &self.changes[i];
        ChangeContext {
            rule: &rule.id,
            db_name: self.db,
            doc: doc.raw(),
            id: &change.id,
            rev: change.rev(),
            seq: change.seq.as_json(),
        }
    }

    /// One job per change and matching rule without `batch`, debounced.
    fn singles(&self, docs: &[Cow<'a, Doc>]) -> Vec<Job<'a>> {
        let mut jobs = Vec::new();
        let mut debounced = HashSet::new();
        for (i, change) in self.changes.iter().enumerate() {
            let single = self.rules.iter().filter(|r| r.batch.is_none());
            for rule in single.filter(|r| r.matches(docs[i].value())) {
                let work = self.work(rule, i, &docs[i]);
                if let (true, Work::Send(request)) = (rule.debounce, &work) {
                    if !debounced.insert(request.identity()) {
                        continue;
                    }
                }
                let key = DeliveryKey::of(&rule.id, change);
                if self.delivered.contains(&key) {
                    continue;
                }
                jobs.push(Job {
                    key,
                    rule,
                    at: i,
                    first: i,
                    change,
                    members: Vec::new(),
                    work,
                });
            }
        }
        jobs
    }

    /// What a rule without `batch` does for change `i`.
    fn work(&self, rule: &OnChangeRule, i: usize, doc: &Doc) -> Work {
        if rule.holds() {
            return Work::Held;
        }
        match Request::build(&rule.request, &self.context(rule, i, doc)) {
            Ok(request) => Work::Send(Box::new(request)),
            Err(e) => Work::Unbuildable(e),
        }
    }

    /// The jobs of a `batch` rule: its matching changes not yet delivered,
    /// in runs of `max_changes`.
    fn batches(
        &self,
        rule: &'a OnChangeRule,
        docs: &[Cow<'a, Doc>],
        waited: &impl Fn(&OnChangeRule, &DeliveryKey) -> Duration,
    ) -> Vec<Job<'a>> {
        let Some(batch) = rule.batch else {
            return Vec::new();
        };
        let pending: Vec<usize> = (0..self.changes.len())
            .filter(|&i| rule.matches(docs[i].value()))
            .filter(|&i| {
                !self
                    .delivered
                    .contains(&DeliveryKey::of(&rule.id, &self.changes[i]))
            })
            .collect();
        let mut jobs = Vec::new();
        for run in pending.chunks(batch.max_changes) {
            let (first, last) = (run[0], run[run.len() - 1]);
            let members: Vec<(DeliveryKey, &'a Change)> = run
                .iter()
                .map(|&i| {
                    (
                        DeliveryKey::of(&rule.id, &self.changes[i]),
                        &self.changes[i],
                    )
                })
                .collect();
            let key = members[0].0.clone();
            let work = self.batch_work(rule, batch, run, docs, || waited(rule, &key));
            // A held batch stops delivery at its first member.
            let at = match work {
                Work::Hold(_) | Work::Held => first,
                Work::Send(_) | Work::Unbuildable(_) => last,
            };
            jobs.push(Job {
                key,
                rule,
                at,
                first,
                change: &self.changes[at],
                members,
                work,
            });
        }
        jobs
    }

    /// What a `batch` rule does for a run of its changes (indexes in the
    /// page): an incomplete run is held while it has waited (`waited`) less
    /// than `max_wait`.
    fn batch_work(
        &self,
        rule: &OnChangeRule,
        batch: Batch,
        run: &[usize],
        docs: &[Cow<'a, Doc>],
        waited: impl FnOnce() -> Duration,
    ) -> Work {
        if rule.holds() {
            return Work::Held;
        }
        if run.len() < batch.max_changes {
            let wait = batch.max_wait.saturating_sub(waited());
            if !wait.is_zero() {
                return Work::Hold(wait);
            }
        }
        let contexts: Vec<ChangeContext> = run
            .iter()
            .map(|&i| self.context(rule, i, &docs[i]))
            .collect();
        match Request::build_batch(&rule.request, &contexts) {
            Ok(request) => Work::Send(Box::new(request)),
            Err(e) => Work::Unbuildable(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn change(seq: &str) -> Change {
        serde_json::from_value(json!({"seq": seq, "id": "doc1", "changes": [{"rev": "1-a"}]}))
            .expect("a change")
    }

    #[test]
    fn a_change_read_again_with_another_seq_is_the_same_delivery() {
        // A sharded database can give one change another seq when its
        // `_changes` is read again (the shards' rows interleave otherwise).
        let first = DeliveryKey::of("hook", &change("3-g1AAAAbc"));
        let again = DeliveryKey::of("hook", &change("3-g1AAAAxy"));
        assert_eq!(first, again);
        assert_ne!(first, DeliveryKey::of("other", &change("3-g1AAAAbc")));
    }
}
