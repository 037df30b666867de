//! The requests of one page of a database's changes: one per change and
//! matching rule, or for a `batch` rule one per run of up to
//! `max_changes` of its matching changes. Each knows where in the page
//! delivery in change order reaches it, and the first change it covers:
//! the checkpoint never moves past a change whose requests are not done.

use std::borrow::Cow;
use std::collections::HashSet;
use std::time::Duration;

use super::{doc_of, rev_of, DeliveryKey};
use crate::couch::{Change, Doc};
use crate::delivery::{Request, RequestError};
use crate::rules::on_change::{Batch, ChangeContext, OnChangeRule};

/// A request to make, or a batch to hold back.
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

/// What a job does.
pub(super) enum Work {
    Send(Box<Request>),
    /// An incomplete batch waits this long for more changes.
    Hold(Duration),
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
    /// Every job of the page, in the order delivery reaches them. `failed`
    /// is told of a request that cannot be built (the change is skipped
    /// for that rule); `waited` says how long an incomplete batch, known
    /// by its first member, has been waiting.
    pub fn jobs(
        &self,
        failed: impl Fn(&OnChangeRule, &RequestError),
        waited: impl Fn(&OnChangeRule, &DeliveryKey) -> Duration,
    ) -> Vec<Job<'a>> {
        let docs: Vec<Cow<'a, Doc>> = self.changes.iter().map(doc_of).collect();
        let mut jobs = self.singles(&docs, &failed);
        for rule in self.rules.iter().filter(|r| r.batch.is_some()) {
            jobs.extend(self.batches(rule, &docs, &failed, &waited));
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
            rev: rev_of(change),
            seq: change.seq.as_json(),
        }
    }

    /// One job per change and matching rule without `batch`, debounced.
    fn singles(
        &self,
        docs: &[Cow<'a, Doc>],
        failed: &impl Fn(&OnChangeRule, &RequestError),
    ) -> Vec<Job<'a>> {
        let mut jobs = Vec::new();
        let mut debounced = HashSet::new();
        for (i, change) in self.changes.iter().enumerate() {
            let single = self.rules.iter().filter(|r| r.batch.is_none());
            for rule in single.filter(|r| r.matches(docs[i].value())) {
                let request = match Request::build(&rule.request, &self.context(rule, i, &docs[i]))
                {
                    Ok(request) => request,
                    Err(e) => {
                        failed(rule, &e);
                        continue;
                    }
                };
                if rule.debounce && !debounced.insert(request.identity()) {
                    continue;
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
                    work: Work::Send(Box::new(request)),
                });
            }
        }
        jobs
    }

    /// The jobs of a `batch` rule: its matching changes not yet delivered,
    /// in runs of `max_changes`; the last, incomplete run is held while it
    /// has waited less than `max_wait`.
    fn batches(
        &self,
        rule: &'a OnChangeRule,
        docs: &[Cow<'a, Doc>],
        failed: &impl Fn(&OnChangeRule, &RequestError),
        waited: &impl Fn(&OnChangeRule, &DeliveryKey) -> Duration,
    ) -> Vec<Job<'a>> {
        let Some(Batch {
            max_changes,
            max_wait,
        }) = rule.batch
        else {
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
        for run in pending.chunks(max_changes) {
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
            let wait = match run.len() < max_changes {
                true => max_wait.saturating_sub(waited(rule, &key)),
                false => Duration::ZERO,
            };
            let work = if !wait.is_zero() {
                Work::Hold(wait)
            } else {
                let contexts: Vec<ChangeContext> = run
                    .iter()
                    .map(|&i| self.context(rule, i, &docs[i]))
                    .collect();
                match Request::build_batch(&rule.request, &contexts) {
                    Ok(request) => Work::Send(Box::new(request)),
                    Err(e) => {
                        failed(rule, &e);
                        continue;
                    }
                }
            };
            // A held batch stops delivery at its first member.
            let at = match work {
                Work::Hold(_) => first,
                Work::Send(_) => last,
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
}
