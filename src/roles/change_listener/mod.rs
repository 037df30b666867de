//! The change-listener role: when a database changes, read its `_changes`
//! from the database's checkpoint, call the API of every on_change rule
//! that matches each change, and save the checkpoint once the batch is
//! delivered.
//!
//! Order: with `block` (the default) the requests of change N+1 start only
//! after those of change N succeeded. Requests of `block: false` rules of a
//! batch go out concurrently, and the checkpoint waits for all of them.
//! A failed request is retried after the rule's backoff without holding a
//! concurrency slot (the run ends and the runtime runs the database again);
//! what was delivered meanwhile is remembered, so a retry sends only what
//! failed. After the last retry the request becomes a dead letter and
//! delivery moves on; so does, at once, a request that cannot be built. A
//! paused rule, or one whose document an edit made unusable, holds each
//! database at the first change it matches until it is resumed, fixed or
//! deleted.

mod books;
mod checkpoints;
mod jobs;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::value::RawValue;
use tokio::sync::mpsc;

use self::books::{Attempts, Books, Progress};
pub use self::checkpoints::Checkpoints;
use self::jobs::{DeliveryKey, Job, Page, Work};
use crate::backoff::Backoff;
use crate::config::{Passwords, RunArgs};
use crate::couch::{Change, ChangesQuery, CouchClient, CouchError, Seq};
use crate::delivery::circuit::{CircuitState, Held};
use crate::delivery::dead_letter::{self, DeadLetter};
use crate::delivery::{self, Delivery, DeliveryError, Request, RequestError};
use crate::error::Result;
use crate::flush::{self, Flush};
use crate::metrics::RoleMetrics;
use crate::rules::cache::{Parsed, RuleCache};
use crate::rules::follower::{self, DocsWatch};
use crate::rules::on_change::{Context, OnChangeDocError, OnChangeRule};
use crate::status::StatusBook;
use crate::worker::{Outcome, Role, Wait};

pub const NAME: &str = "change-listener";

/// Requests of `block: false` rules sent at once, per run.
const PARALLEL_REQUESTS: usize = 8;

/// A database held back by a paused or unusable rule runs again after this,
/// in case the nudge at its resumption was missed (a restart in between).
const PAUSED_RECHECK: Duration = Duration::from_secs(60);

pub struct ChangeListener {
    client: CouchClient,
    spiegel_db: String,
    namespace: String,
    docs: DocsWatch,
    passwords: Passwords,
    /// Sends the requests through their endpoint's circuit and rule's pace.
    delivery: Delivery,
    backoff: Backoff,
    batch_size: u64,
    checkpoints: Checkpoints,
    status: StatusBook,
    metrics: RoleMetrics,
    rules: RuleCache<OnChangeRule>,
    /// What is kept about each database between its runs.
    books: Books,
    /// Databases to run now, to the worker.
    nudges: mpsc::Sender<String>,
}

enum Sent {
    Ok,
    /// Failed, or held back by a paused or unusable rule; run again after
    /// the wait.
    Retry(Wait, String),
    /// Failed for the last time: dead-lettered, moving on.
    Dead,
}

impl ChangeListener {
    /// The role as `args` set it up, the task that saves its checkpoints
    /// (for the worker to run), and the databases it asks to run now.
    pub fn start(
        args: &RunArgs,
        client: CouchClient,
        docs: DocsWatch,
        status: StatusBook,
        metrics: RoleMetrics,
    ) -> Result<(
        Self,
        impl Future<Output = ()> + Send + 'static,
        mpsc::Receiver<String>,
    )> {
        let (conn, delivery) = (&args.connection, &args.delivery);
        let checkpoints = Checkpoints::new(client.clone(), &conn.db_name);
        // Per-database checkpoints are saved in batches: at most the lease
        // time of changes is delivered again after a crash.
        let flush_every = args.worker.save_seq_after.min(args.worker.lease_time);
        let flushing = flush::every(checkpoints.clone(), flush_every);
        let delivery = Delivery::new(delivery)?.counted(&metrics);
        let (nudges, nudged) = mpsc::channel(256);
        let role = ChangeListener {
            client,
            spiegel_db: conn.db_name.clone(),
            namespace: conn.namespace.clone(),
            docs,
            passwords: args.rules.passwords.clone(),
            delivery,
            backoff: args.rules.backoff.clone(),
            batch_size: args.batch_size.max(1),
            checkpoints,
            status,
            metrics,
            rules: RuleCache::new("on_change"),
            books: Books::default(),
            nudges,
        };
        Ok((role, flushing, nudged))
    }

    /// The API endpoints it delivers to, with their circuits.
    pub(crate) fn endpoints(&self) -> Arc<crate::delivery::circuit::Endpoints> {
        self.delivery.endpoints().clone()
    }

    fn progress(&self) -> std::sync::MutexGuard<'_, HashMap<String, Progress>> {
        self.books.progress()
    }

    pub async fn rules(&self) -> Arc<Vec<OnChangeRule>> {
        let docs = follower::loaded(&mut self.docs.clone()).await;
        let context = Context {
            passwords: &self.passwords,
            backoff: &self.backoff,
        };
        self.rules.rules(
            &docs,
            |id, doc| OnChangeRule::load(id, doc, &context),
            |id, parsed| self.report(id, parsed),
            // Statuses of deleted documents go with them.
            |docs| self.status.retain(|id| docs.contains_key(id)),
        )
    }

    /// Logs and shows in the status what a document's new revision is:
    /// usable, paused, unusable and holding its databases, or unusable
    /// and skipped.
    fn report(&self, id: &str, parsed: Parsed<'_, OnChangeRule, OnChangeDocError>) {
        let (invalid, note) = match parsed {
            Parsed::Usable(rule) => match &rule.unusable {
                Some(e) => {
                    tracing::error!(doc = %id, error = %e, "unusable on_change document: its changes wait until it is fixed or deleted");
                    let note = "unusable: its changes wait until it is fixed or deleted";
                    (Some(e.to_string()), Some(note))
                }
                None => {
                    let paused = "paused: its changes wait until it is resumed";
                    (None, rule.paused.then_some(paused))
                }
            },
            Parsed::Unusable(e) => {
                tracing::error!(doc = %id, error = %e, "unusable on_change document: skipped");
                (Some(e.to_string()), None)
            }
        };
        self.status.invalid(id, invalid);
        self.status.note(id, note.map(String::from));
    }

    /// Parses the on_change documents each time they change, so that an
    /// unusable one is reported (log and status) when it is loaded, not at
    /// its databases' next change, and the databases a rule held back run
    /// as soon as it is resumed. Runs for as long as the worker owns it.
    pub async fn watch_rules(self: Arc<Self>) {
        let mut docs = self.docs.clone();
        loop {
            let rules = self.rules().await;
            for db in self.resumed(&rules) {
                if self.nudges.send(db).await.is_err() {
                    return;
                }
            }
            if docs.changed().await.is_err() {
                return;
            }
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashSet<String>>> {
        self.books.held()
    }

    /// The databases held back by rules that no longer hold them: resumed,
    /// fixed, deleted, or made unable to name their databases.
    fn resumed(&self, rules: &[OnChangeRule]) -> Vec<String> {
        let holding: HashSet<&str> = rules
            .iter()
            .filter(|rule| rule.holds())
            .map(|rule| rule.id.as_str())
            .collect();
        let mut held = self.held();
        let resumed: Vec<String> = held
            .keys()
            .filter(|rule| !holding.contains(rule.as_str()))
            .cloned()
            .collect();
        resumed
            .iter()
            .filter_map(|rule| held.remove(rule))
            .flatten()
            .collect::<HashSet<_>>()
            .into_iter()
            .collect()
    }

    /// The job is done with (delivered or dead-lettered): a retry skips it.
    fn settle(&self, db: &str, job: &Job<'_>) {
        let mut progress = self.progress();
        let p = progress.entry(db.to_string()).or_default();
        for key in job.keys() {
            p.attempts.remove(key);
            p.delivered.insert(key.clone());
        }
        if !job.members.is_empty() {
            p.batches.remove(&job.rule.id);
        }
    }

    /// How long the incomplete batch of `rule` in `db` whose first member
    /// is `first` has been waiting (since this worker first saw it).
    fn batch_waited(&self, db: &str, rule: &OnChangeRule, first: &DeliveryKey) -> Duration {
        let now = Instant::now();
        let mut progress = self.progress();
        let entry = progress
            .entry(db.to_string())
            .or_default()
            .batches
            .entry(rule.id.clone())
            .or_insert_with(|| (first.clone(), now));
        if entry.0 != *first {
            *entry = (first.clone(), now);
        }
        now - entry.1
    }

    /// The jobs of a page of changes, in the order delivery reaches them.
    fn jobs<'a>(
        &self,
        db: &str,
        rules: &[&'a OnChangeRule],
        changes: &'a [Change],
    ) -> Vec<Job<'a>> {
        let delivered = self
            .progress()
            .get(db)
            .map(|p| p.delivered.clone())
            .unwrap_or_default();
        let page = Page {
            db,
            rules,
            changes,
            delivered: &delivered,
        };
        page.jobs(|rule, first| self.batch_waited(db, rule, first))
    }

    /// Sends one request once, recording the outcome. A paused or unusable
    /// rule sends nothing: it holds the database back.
    async fn send(&self, job: &Job<'_>, db: &str) -> Sent {
        let request = match &job.work {
            Work::Send(request) => request,
            Work::Hold(wait) => {
                let reason = format!(
                    "a batch of on_change {} waits for more changes",
                    job.rule.id
                );
                return Sent::Retry(Wait::Held(*wait), reason);
            }
            Work::Held => return self.hold(job, db),
            Work::Unbuildable(error) => return self.unbuildable(job, db, error).await,
        };
        let outcome = self
            .delivery
            .deliver(&job.rule.id, job.rule.rate_limit, request)
            .await;
        self.show_circuits(&job.rule.id, &request.origin());
        match outcome {
            delivery::Outcome::Delivered(delivered) => {
                self.status
                    .success(&job.rule.id, db, Some(format!("HTTP {}", delivered.status)));
                self.settle(db, job);
                Sent::Ok
            }
            delivery::Outcome::Wait(Held::Busy(wait, why) | Held::Paced(wait, why)) => {
                Sent::Retry(Wait::Held(wait), why)
            }
            delivery::Outcome::Wait(Held::Open(wait, why)) => {
                self.circuit_held(job, request, db, wait, why).await
            }
            delivery::Outcome::Failed(error) => self.failed(job, request, db, &error).await,
        }
    }

    /// A paused or unusable rule holds the database at this change until
    /// it is resumed, fixed or deleted (then [`Self::resumed`] runs it).
    fn hold(&self, job: &Job<'_>, db: &str) -> Sent {
        let rule = &job.rule.id;
        self.held()
            .entry(rule.clone())
            .or_default()
            .insert(db.into());
        let reason = match job.rule.unusable {
            Some(_) => format!("on_change {rule} is unusable: fix or delete it"),
            None => format!("on_change {rule} is paused"),
        };
        Sent::Retry(Wait::Held(PAUSED_RECHECK), reason)
    }

    /// Shows the circuits of the rule's requests to `origin` (the
    /// endpoint's and the route's) in the status, which lists only the
    /// circuits that are not closed.
    fn show_circuits(&self, rule: &str, origin: &str) {
        for (name, state) in self.delivery.circuits(rule, origin) {
            let shown = (state != CircuitState::Closed).then(|| state.name());
            self.status.circuit(&name, shown);
        }
    }

    /// A request an open circuit holds (`why`) for `wait`. With a
    /// `backoff.limit`, the time it waits counts as its retries' schedule:
    /// held past the time of its last retry, it becomes a dead letter with
    /// the circuit's reason, and delivery moves on.
    async fn circuit_held(
        &self,
        job: &Job<'_>,
        request: &Request,
        db: &str,
        wait: Duration,
        why: String,
    ) -> Sent {
        let Some((left, count, first_at)) = self.schedule_left(job, db) else {
            return Sent::Retry(Wait::Held(wait), why);
        };
        if !left.is_zero() {
            return Sent::Retry(Wait::Held(wait.min(left)), why);
        }
        self.status.failure(&job.rule.id, db, why.clone());
        let letter = DeadLetter {
            attempts: count,
            first_attempt_at: first_at,
            ..job.letter(db, request.redacted(), why)
        };
        self.bury(
            job,
            db,
            letter,
            "held by an open circuit past its last retry",
        )
        .await
    }

    /// How long until the last retry of the job's changes is due (the
    /// soonest of them), with their attempts and first attempt as
    /// [`Self::count_attempt`] gives them; a change never tried starts its
    /// schedule now. `None` when the rule retries forever.
    fn schedule_left(&self, job: &Job<'_>, db: &str) -> Option<(Duration, u32, String)> {
        let backoff = &job.rule.backoff;
        backoff.schedule_left(0)?;
        let (now, stamp) = (Instant::now(), crate::ids::timestamp());
        let mut progress = self.progress();
        let p = progress.entry(db.to_string()).or_default();
        let (mut left, mut count, mut first_at) = (None::<Duration>, 0, stamp.clone());
        for key in job.keys() {
            let a = p.attempts.entry(key.clone()).or_insert(Attempts {
                count: 0,
                first_at: stamp.clone(),
                since: now,
            });
            // A schedule beyond the clock's range never ends.
            let until = (a.since.checked_add(backoff.schedule_left(a.count)?))
                .map_or(Duration::MAX, |due| due.saturating_duration_since(now));
            left = Some(left.map_or(until, |l| l.min(until)));
            count = count.max(a.count);
            first_at = first_at.min(a.first_at.clone());
        }
        Some((left.unwrap_or_default(), count, first_at))
    }

    /// A failed attempt: retried after the rule's backoff, or, after its
    /// last retry, stored as a dead letter.
    async fn failed(
        &self,
        job: &Job<'_>,
        request: &Request,
        db: &str,
        error: &DeliveryError,
    ) -> Sent {
        let text = error.to_string();
        self.status.failure(&job.rule.id, db, text.clone());
        let now = crate::ids::timestamp();
        let (count, first_at) = self.count_attempt(job, db, &now);
        let retries = count - 1;
        if !job.rule.backoff.exhausted(retries) {
            self.metrics.webhook_retries.inc();
            return Sent::Retry(Wait::For(job.rule.backoff.wait(count)), text);
        }
        let letter = DeadLetter {
            last_status: error.status(),
            attempts: count,
            first_attempt_at: first_at,
            last_attempt_at: now,
            ..job.letter(db, request.redacted(), text)
        };
        self.bury(job, db, letter, "request failed for the last time")
            .await
    }

    /// Counts a failed attempt against each change the job covers, and
    /// returns the most any of them has had, with the earliest first
    /// attempt. Counted per change, not per batch: a database whose
    /// `_changes` is read again (q > 1) can give its changes in another
    /// order, and so group them into batches led by other changes.
    fn count_attempt(&self, job: &Job<'_>, db: &str, now: &str) -> (u32, String) {
        let mut progress = self.progress();
        let p = progress.entry(db.to_string()).or_default();
        let (mut count, mut first_at) = (0, now.to_string());
        for key in job.keys() {
            let a = p.attempts.entry(key.clone()).or_insert(Attempts {
                count: 0,
                first_at: now.to_string(),
                since: Instant::now(),
            });
            a.count += 1;
            a.since = Instant::now();
            count = count.max(a.count);
            first_at = first_at.min(a.first_at.clone());
        }
        (count, first_at)
    }

    /// A request that cannot be built for its change (a URL that does not
    /// parse once a placeholder is filled in, say). Building it again gives
    /// the same, so it becomes a dead letter at once, with the reason, and
    /// delivery moves on; `spiegel redeliver` sends it once the rule is
    /// fixed.
    async fn unbuildable(&self, job: &Job<'_>, db: &str, error: &RequestError) -> Sent {
        let text = format!("cannot build the request: {error}");
        self.status.failure(&job.rule.id, db, text.clone());
        // `null`: valid JSON text.
        let null = RawValue::from_string("null".into()).expect("null is JSON");
        let letter = job.letter(db, null, text);
        self.bury(job, db, letter, "request cannot be built").await
    }

    /// Stores a job's dead letter and moves on past the job; `what` says
    /// why in the log. A letter that cannot be stored leaves the job to be
    /// retried, never dropped.
    async fn bury(&self, job: &Job<'_>, db: &str, letter: DeadLetter, what: &str) -> Sent {
        if let Err(e) =
            dead_letter::store(&self.client, &self.spiegel_db, &self.namespace, &letter).await
        {
            return Sent::Retry(
                Wait::For(job.rule.backoff.wait(letter.attempts.max(1))),
                format!("cannot store the dead letter: {e}"),
            );
        }
        tracing::error!(rule = %job.rule.id, db, doc = %job.change.id, attempts = letter.attempts, error = %letter.last_error, "{what}: stored as a dead letter");
        self.metrics.dead_letters.inc();
        self.settle(db, job);
        Sent::Dead
    }

    /// Delivers a batch. Ok(()) when everything is delivered; otherwise the
    /// seq of the last change whose requests all succeeded, the wait and
    /// the reason.
    async fn deliver(
        &self,
        db: &str,
        rules: &[&OnChangeRule],
        changes: &[Change],
    ) -> Result<(), (Option<Seq>, Wait, String)> {
        let jobs = self.jobs(db, rules, changes);
        let (parallel, ordered): (Vec<&Job>, Vec<&Job>) = jobs.iter().partition(|j| !j.rule.block);

        let mut failure: Option<(Wait, String)> = None;
        let mut waiting = parallel.iter();
        let mut in_flight = futures::stream::FuturesUnordered::new();
        for job in waiting.by_ref().take(PARALLEL_REQUESTS) {
            in_flight.push(self.send(job, db));
        }
        while let Some(sent) = in_flight.next().await {
            if let Sent::Retry(wait, reason) = sent {
                failure = Some(first_failure(failure, (wait, reason)));
            }
            if let Some(job) = waiting.next() {
                in_flight.push(self.send(job, db));
            }
        }
        let parallel_failed = failure.is_some();

        // Blocking requests, strictly in change order (the jobs are sorted
        // by `at`). A job that fails leaves the checkpoint before the first
        // change of every job not done yet: a batch reached later may cover
        // changes before the one that failed.
        for (n, job) in ordered.iter().enumerate() {
            if let Sent::Retry(wait, reason) = self.send(job, db).await {
                let first = ordered[n..]
                    .iter()
                    .map(|j| j.first)
                    .fold(job.first, usize::min);
                let before = first.checked_sub(1).map(|k| changes[k].seq.clone());
                let progress = if parallel_failed { None } else { before };
                let (wait, reason) = first_failure(failure, (wait, reason));
                return Err((progress, wait, reason));
            }
        }
        match failure {
            None => Ok(()),
            Some((wait, reason)) => Err((None, wait, reason)),
        }
    }
}

/// What a run that met several failures reports: a real failure before a
/// paused rule's hold, so that it is retried on its own backoff, logged and
/// counted; otherwise the first.
fn first_failure(kept: Option<(Wait, String)>, new: (Wait, String)) -> (Wait, String) {
    match kept {
        Some(kept) if matches!(kept.0, Wait::Held(_)) && !matches!(new.0, Wait::Held(_)) => new,
        Some(kept) => kept,
        None => new,
    }
}

impl ChangeListener {
    /// One run of `db`: its changes from the checkpoint, page by page.
    async fn run(&self, db: &str) -> Outcome {
        let rules = self.rules().await;
        let rules: Vec<&OnChangeRule> = rules.iter().filter(|r| r.applies_to_db(db)).collect();
        if rules.is_empty() {
            return Outcome::Done;
        }
        let recreated = self.books.start_run(db, Instant::now());
        let mut since = if recreated {
            // The database was deleted and created again: its seqs restarted.
            self.checkpoints.forget(db);
            None
        } else {
            match self.checkpoints.get(db).await {
                Ok(seq) => seq,
                Err(e) => return Outcome::couch_failed("cannot read the checkpoint", &e),
            }
        };
        loop {
            let query = ChangesQuery {
                since: since.clone(),
                limit: Some(self.batch_size),
                include_docs: true,
            };
            let page = match self.client.changes(db, &query).await {
                Ok(page) => page,
                Err(CouchError::DbNotFound(_)) => return Outcome::Missing,
                Err(e) => return Outcome::couch_failed("cannot read _changes", &e),
            };
            if page.results.is_empty() {
                return Outcome::Done;
            }
            let full = page.results.len() as u64 >= self.batch_size;
            match self.deliver(db, &rules, &page.results).await {
                Ok(()) => {
                    self.checkpoints.set(db, page.last_seq.clone());
                    if let Some(p) = self.progress().get_mut(db) {
                        p.delivered.clear();
                    }
                    since = Some(page.last_seq);
                }
                Err((upto, wait, reason)) => {
                    if let Some(seq) = upto {
                        self.checkpoints.set(db, seq);
                    }
                    return Outcome::Retry { wait, reason };
                }
            }
            if !full {
                return Outcome::Done;
            }
        }
    }
}

impl Role for ChangeListener {
    fn name(&self) -> &str {
        NAME
    }

    async fn handle(&self, db: &str) -> Outcome {
        let outcome = self.run(db).await;
        if outcome == Outcome::Done {
            self.books.done(db);
        }
        outcome
    }

    async fn deleted(&self, db: &str) {
        {
            let mut progress = self.progress();
            let p = progress.entry(db.to_string()).or_default();
            p.deleted = true;
            p.delivered.clear();
            p.attempts.clear();
        }
        // The checkpoint goes once the database has stayed deleted
        // (`forget`).
    }

    async fn partition_gone(&self, partition: u32, partitions: u32) {
        let gone = |db: &str| crate::coordination::partition_of(db, partitions) == partition;
        self.books.forget_where(gone);
        // Checkpoints are dropped once saved: the next owner reads them.
        self.checkpoints.flush().await;
        self.checkpoints.evict_where(gone);
    }

    async fn forget(&self, db: &str) {
        self.progress().remove(db);
        // Load it first: only a known revision can be deleted.
        let _ = self.checkpoints.get(db).await;
        self.checkpoints.forget(db);
        self.checkpoints.flush().await;
        tracing::info!(db = %db, "deleted database: its checkpoint is removed");
    }

    async fn save(&self) {
        self.checkpoints.flush().await;
        self.status.flush().await;
    }
}
