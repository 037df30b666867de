//! One worker's event loop. [`Worker`] holds the whole state of a running
//! worker; the loop in [`Worker::run`] waits for the next event and hands it
//! to the one method that handles that kind of event.

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::time::Instant as TokioInstant;

use futures::FutureExt;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::task::{AbortHandle, JoinSet};

use super::catch_up::{self, CatchUpEvent};
use super::control::{Control, WaitState, WaitingDb};
use super::scheduler::{CatchUpProgress, Finished, Scheduler};
use super::{Outcome, Role, Wait, WorkerOptions, RECONNECT_CAP};
use crate::backoff::Backoff;
use crate::coordination::coordinator::{Assignment, Request};
use crate::couch::{CouchClient, CouchError, DbUpdate};
use crate::metrics::{RoleLabel, WorkerMetrics};
use crate::status::CatchUpStatus;

/// Nudges kept for partitions not yet acquired, at most.
const PARKED_NUDGES: usize = 100_000;

/// Partition replays at once: each holds a connection and reads a feed.
const REPLAYS: usize = 2;

/// How often a catch-up's progress is updated in the status and the
/// metrics; it is logged every [`LOG_EVERY`] of these.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);
const LOG_EVERY: u32 = 5;

/// A catch-up's progress as the status shows it: its rate since it began,
/// and the time left at that rate once every database is listed.
fn catch_up_status(progress: &CatchUpProgress) -> CatchUpStatus {
    let elapsed = progress.since.elapsed().as_secs_f64().max(1.0);
    let per_second = progress.handled as f64 / elapsed;
    let left = progress.found.saturating_sub(progress.handled) as f64 / per_second;
    CatchUpStatus {
        found: progress.found,
        handled: progress.handled,
        listing: progress.listing,
        per_second: (per_second * 10.0).round() / 10.0,
        seconds_left: (!progress.listing && per_second > 0.0).then_some(left.ceil() as u64),
    }
}

/// Internal messages of the worker's own tasks.
pub(super) enum Event {
    Finished {
        db: String,
        outcome: Outcome,
        took: Duration,
    },
    /// The database's retry timer `timer` fired (one replaced by a later
    /// timer or cut short by a run now is stale).
    RetryDue { db: String, timer: u64 },
}

/// Where the worker's events come from.
pub(super) struct Inbox {
    /// The live `_db_updates` feed.
    pub live: mpsc::Receiver<DbUpdate>,
    /// Partitions gained, to give up, or lost, from the coordinator.
    pub assignments: mpsc::UnboundedReceiver<Assignment>,
    /// Replays of partitions, and the sweep's findings.
    pub catch_up: mpsc::Receiver<CatchUpEvent>,
    /// Runs that finished, retries that are due.
    pub events: mpsc::UnboundedReceiver<Event>,
    /// The coordinator's last successful heartbeat.
    pub beats: watch::Receiver<Option<TokioInstant>>,
    /// Databases the role asks to handle (a document added or edited).
    pub nudges: mpsc::Receiver<String>,
    /// Questions of the admin console.
    pub control: mpsc::Receiver<Control>,
}

/// The other ends of the worker's channels: what its services (the feed,
/// the coordinator) hold.
pub(super) struct Ends {
    /// Into [`Inbox::live`].
    pub live: mpsc::Sender<DbUpdate>,
    /// Into [`Inbox::assignments`].
    pub assignments: mpsc::UnboundedSender<Assignment>,
    /// Into [`Inbox::beats`].
    pub beats: watch::Sender<Option<TokioInstant>>,
    /// From [`Worker::requests`].
    pub requests: mpsc::UnboundedReceiver<Request>,
    /// Into [`Inbox::control`], for the admin console.
    pub control: mpsc::Sender<Control>,
}

/// A running worker of one role.
pub(super) struct Worker<R: Role> {
    pub role: Arc<R>,
    pub label: RoleLabel,
    pub options: WorkerOptions,
    pub client: CouchClient,
    pub metrics: WorkerMetrics,
    /// Which databases need a run, which runs may start, and each owned
    /// partition's checkpoint. Free of I/O.
    pub sched: Scheduler,
    /// Every task but the runs: the feed, the coordinator, the sweep,
    /// replays, retry timers, deletions. Dropped (aborted) with the worker.
    pub tasks: JoinSet<()>,
    /// The runs of the role in flight.
    pub runs: JoinSet<()>,
    /// Replay tasks by partition, with the epoch of the ownership they serve.
    pub catch_ups: HashMap<u32, (u64, AbortHandle)>,
    /// Nudges for partitions not (yet) ours, with when they came.
    pub parked: VecDeque<(String, Instant)>,
    /// Databases whose runs found them missing, since when.
    pub missing: HashMap<String, Instant>,
    /// Why the last run of each database that is retrying failed, and
    /// whether it was held back rather than failed.
    pub failing: HashMap<String, (String, bool)>,
    pub replays: Arc<Semaphore>,
    /// To the coordinator.
    pub requests: mpsc::UnboundedSender<Request>,
    /// To this loop, from runs and retry timers.
    pub events: mpsc::UnboundedSender<Event>,
    /// To this loop, from replays.
    pub catch_up: mpsc::Sender<CatchUpEvent>,
    /// The catch-up's progress when last reported, and reports since it
    /// was last logged.
    pub catching_up: (Option<CatchUpProgress>, u32),
}

impl<R: Role> Worker<R> {
    /// A worker of `role` over `sched`, with its channels: the inbox it
    /// reads and the ends its services hold. `nudges` come from the role.
    pub fn new(
        role: Arc<R>,
        options: WorkerOptions,
        client: CouchClient,
        metrics: WorkerMetrics,
        sched: Scheduler,
        nudges: mpsc::Receiver<String>,
    ) -> (Self, Inbox, Ends) {
        let (live_tx, live) = mpsc::channel(1024);
        let (assign_tx, assignments) = mpsc::unbounded_channel();
        let (beat_tx, beats) = watch::channel(None);
        let (requests, request_rx) = mpsc::unbounded_channel();
        let (catch_up, catch_up_rx) = mpsc::channel(256);
        let (events, events_rx) = mpsc::unbounded_channel();
        let (control_tx, control) = mpsc::channel(16);
        let worker = Worker {
            label: crate::metrics::role(role.name()),
            sched,
            tasks: JoinSet::new(),
            runs: JoinSet::new(),
            catch_ups: HashMap::new(),
            parked: VecDeque::new(),
            missing: HashMap::new(),
            failing: HashMap::new(),
            replays: Arc::new(Semaphore::new(REPLAYS)),
            role,
            options,
            client,
            metrics,
            requests,
            events,
            catch_up,
            catching_up: (None, 0),
        };
        let inbox = Inbox {
            live,
            assignments,
            catch_up: catch_up_rx,
            events: events_rx,
            beats,
            nudges,
            control,
        };
        let ends = Ends {
            live: live_tx,
            assignments: assign_tx,
            beats: beat_tx,
            requests: request_rx,
            control: control_tx,
        };
        (worker, inbox, ends)
    }

    fn name(&self) -> &str {
        self.role.name()
    }

    /// Handles events until `shutdown` resolves, then stops cleanly.
    pub async fn run(mut self, mut inbox: Inbox, shutdown: impl std::future::Future<Output = ()>) {
        let mut flush = tokio::time::interval(self.options.checkpoint_interval);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut progress = tokio::time::interval(PROGRESS_EVERY);
        progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        // Catch-up events and nudges are read only while few runs are
        // queued: a first start over 100,000 databases is paced by the
        // runs, not by memory.
        let queue_limit = self.options.concurrency * 4;
        loop {
            let room = self.sched.queued() < queue_limit;
            tokio::select! {
                _ = &mut shutdown => break,
                Some(update) = inbox.live.recv() => self.on_update(update),
                Some(assignment) = inbox.assignments.recv() => self.on_assignment(assignment),
                Some(event) = inbox.catch_up.recv(), if room => self.on_catch_up(event),
                Some(event) = inbox.events.recv() => self.on_event(event),
                Some(_) = self.tasks.join_next(), if !self.tasks.is_empty() => {}
                Some(_) = self.runs.join_next(), if !self.runs.is_empty() => {}
                Ok(()) = inbox.beats.changed() => {
                    if let Some(at) = *inbox.beats.borrow() {
                        self.options.health.heartbeat(self.role.name(), at.into_std());
                    }
                }
                Some(db) = inbox.nudges.recv(), if room => self.on_nudge(db),
                Some(control) = inbox.control.recv() => self.on_control(control),
                _ = flush.tick() => self.save_checkpoints(),
                _ = progress.tick() => self.report_catch_up(),
            }
            self.release_drained();
            if self.sched.take_urgent() {
                self.save_checkpoints();
            }
            let fenced = self.fenced(&inbox.beats);
            self.start_runs(fenced);
        }
        self.stop(inbox.events).await;
    }

    /// Shows how far the catch-up is, in the status and two gauges every
    /// [`PROGRESS_EVERY`] while it lasts (and in a log line every
    /// [`LOG_EVERY`] of these), and once when it ends.
    fn report_catch_up(&mut self) {
        let Some(progress) = self.sched.catch_up_progress() else {
            return;
        };
        let (last, reports) = &mut self.catching_up;
        // An end is reported once, even of a catch-up shorter than a report.
        let ended_before = last.replace(progress).is_some_and(|p| !p.running);
        if !progress.running && ended_before {
            return;
        }
        let log = *reports % LOG_EVERY == 0;
        *reports = if progress.running { *reports + 1 } else { 0 };
        let label = &self.label;
        let gauge = |g: &crate::metrics::Gauges, n: u64| g.get_or_create(label).set(n as i64);
        gauge(&self.metrics.catch_up_found, progress.found);
        gauge(&self.metrics.catch_up_handled, progress.handled);
        let role = self.role.name();
        if !progress.running {
            let took_s = progress.since.elapsed().as_secs();
            tracing::info!(role, databases = progress.found, took_s, "catch-up done");
            self.options.status.catch_up(None);
            return;
        }
        let status = catch_up_status(&progress);
        if log {
            let left = status
                .seconds_left
                .map_or("unknown while listing".into(), |s| format!("{s} s"));
            let (handled, found, per_s) = (status.handled, status.found, status.per_second);
            let listing = status.listing;
            tracing::info!(role, handled, found, listing, per_s, left, "catching up");
        }
        self.options.status.catch_up(Some(status));
    }

    /// An event of the live `_db_updates` feed.
    fn on_update(&mut self, update: DbUpdate) {
        self.metrics
            .updates_received
            .get_or_create(&self.label)
            .inc();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        self.metrics
            .last_event
            .get_or_create(&self.label)
            .set(now.as_secs_f64());
        tracing::trace!(role = %self.name(), db = %update.db_name, kind = ?update.kind, seq = %update.seq, "update");
        if self.sched.on_live_event(&update, Instant::now()) {
            self.on_deleted(update.db_name);
        }
    }

    /// A database of ours was deleted: the role is told at once, and told
    /// to forget it if it stays deleted for `--assume-deleted-after`.
    fn on_deleted(&mut self, db: String) {
        let role = self.role.clone();
        let client = self.client.clone();
        let wait = self.options.assume_deleted_after;
        self.tasks.spawn(async move {
            role.deleted(&db).await;
            tokio::time::sleep(wait).await;
            if matches!(client.db_info(&db).await, Err(CouchError::DbNotFound(_))) {
                role.forget(&db).await;
            }
        });
    }

    fn on_assignment(&mut self, assignment: Assignment) {
        match assignment {
            Assignment::Acquired {
                partition,
                checkpoint,
            } => self.acquire(partition, checkpoint),
            Assignment::Release { partition } => {
                self.sched.release(partition);
                self.partition_gone(partition);
            }
            Assignment::Lost { partition } => {
                self.sched.remove(partition);
                self.partition_gone(partition);
            }
        }
    }

    fn partition_gone(&mut self, partition: u32) {
        self.stop_replay(partition);
        self.forget_failures(partition);
        let role = self.role.clone();
        let partitions = self.sched.partitions();
        self.tasks
            .spawn(async move { role.partition_gone(partition, partitions).await });
    }

    /// A partition is ours: replay what it missed since its checkpoint.
    fn acquire(&mut self, partition: u32, checkpoint: Option<crate::couch::Seq>) {
        let epoch = self.sched.acquire(partition, checkpoint.clone());
        // Nudges that came before the partition was ours (a worker that
        // just started) still count for a while.
        let fresh = self.options.timing.lease * 2;
        let sched = &mut self.sched;
        self.parked.retain(|(db, at)| {
            at.elapsed() < fresh
                && !(sched.partition_of(db) == partition && sched.on_sweep(db, Instant::now()))
        });
        let job = catch_up::Job {
            client: self.client.clone(),
            partition,
            epoch,
            partitions: self.sched.partitions(),
            checkpoint,
            start_from_now: self.options.start_from_now,
        };
        let replay = catch_up::replay(job, self.catch_up.clone(), self.replays.clone());
        let task = self.tasks.spawn(replay);
        if let Some((_, old)) = self.catch_ups.insert(partition, (epoch, task)) {
            old.abort();
        }
    }

    /// The failures of a partition that is no longer ours are its next
    /// owner's to report.
    fn forget_failures(&mut self, partition: u32) {
        let sched = &self.sched;
        self.failing
            .retain(|db, _| sched.partition_of(db) != partition);
    }

    fn stop_replay(&mut self, partition: u32) {
        if let Some((_, task)) = self.catch_ups.remove(&partition) {
            task.abort();
        }
    }

    fn on_catch_up(&mut self, event: CatchUpEvent) {
        match event {
            CatchUpEvent::Database {
                partition,
                epoch,
                db,
            } => self
                .sched
                .on_catch_up_event(partition, epoch, &db, Instant::now()),
            CatchUpEvent::Done {
                partition,
                epoch,
                end,
            } => {
                tracing::debug!(role = %self.name(), partition, "partition caught up");
                self.sched.on_catch_up_done(partition, epoch, end);
                if self
                    .catch_ups
                    .get(&partition)
                    .is_some_and(|(e, _)| *e == epoch)
                {
                    self.catch_ups.remove(&partition);
                }
            }
            CatchUpEvent::Swept { db } => {
                if self.sched.on_sweep(&db, Instant::now()) {
                    self.metrics.sweep_found.get_or_create(&self.label).inc();
                    tracing::debug!(role = %self.name(), db = %db, "sweep: changed since the previous sweep");
                }
            }
        }
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Finished { db, outcome, took } => self.on_finished(db, outcome, took),
            Event::RetryDue { db, timer } => {
                if self.sched.timer(&db) == timer {
                    self.metrics.runs_retried.get_or_create(&self.label).inc();
                }
                self.sched.retry_due(&db, timer);
            }
        }
    }

    /// A run ended: count it, and set a retry timer if it asked for one.
    fn on_finished(&mut self, db: String, outcome: Outcome, took: Duration) {
        let outcome = self.limit_retries(&db, outcome);
        let outcome = self.track_missing(&db, outcome);
        self.metrics
            .run_duration
            .get_or_create(&self.label)
            .observe(took.as_secs_f64());
        match &outcome {
            Outcome::Retry {
                wait: Wait::Held(_),
                reason,
            } => tracing::debug!(role = %self.name(), db = %db, %reason, "held back"),
            Outcome::Retry { reason, .. } => {
                self.metrics.runs_failed.get_or_create(&self.label).inc();
                tracing::warn!(role = %self.name(), db = %db, %reason, "run failed; will retry");
            }
            Outcome::Done | Outcome::Missing => {
                self.metrics.runs_succeeded.get_or_create(&self.label).inc();
            }
        }
        let retry = self
            .sched
            .on_finished(&db, finished(&outcome), Instant::now());
        // Why it waits, while it waits here.
        match (&outcome, retry) {
            (Outcome::Retry { wait, reason }, Some(_)) => {
                let held = matches!(wait, Wait::Held(_));
                self.failing.insert(db.clone(), (reason.clone(), held));
            }
            _ => {
                self.failing.remove(&db);
            }
        }
        let Some(retry) = retry else {
            return;
        };
        let wait = match outcome {
            Outcome::Retry {
                wait: Wait::For(wait) | Wait::Held(wait),
                ..
            } => wait,
            Outcome::Retry {
                wait: Wait::Reconnect,
                ..
            } => Backoff::reconnect(RECONNECT_CAP).wait(retry),
            _ => self.options.retry.wait(retry),
        };
        let events = self.events.clone();
        let timer = self.sched.timer(&db);
        self.tasks.spawn(async move {
            tokio::time::sleep(wait).await;
            let _ = events.send(Event::RetryDue { db, timer });
        });
    }

    /// `--backoff-limit`: a database whose runs keep failing for a reason
    /// of its own ([`Wait::Backoff`]) is given up after the last retry, and
    /// runs again at its next change. Runs that met CouchDB unreachable are
    /// retried for as long as it takes, and a role's own waits
    /// ([`Wait::For`]) follow the role's policy.
    fn limit_retries(&mut self, db: &str, outcome: Outcome) -> Outcome {
        let Outcome::Retry {
            wait: Wait::Backoff,
            reason,
        } = &outcome
        else {
            return outcome;
        };
        // Retries made so far: this run was the last allowed if they reach the limit.
        if !self.options.retry.exhausted(self.sched.retries(db)) {
            return outcome;
        }
        tracing::error!(role = %self.name(), db, %reason, "run failed after the last retry (--backoff-limit): the database runs again at its next change");
        Outcome::Done
    }

    /// A database that runs find missing is run again after the backoff
    /// until it has been missing for `--assume-deleted-after`; then it is
    /// taken for deleted: handled, and forgotten by the role.
    fn track_missing(&mut self, db: &str, outcome: Outcome) -> Outcome {
        if outcome != Outcome::Missing {
            self.missing.remove(db);
            return outcome;
        }
        let since = *self
            .missing
            .entry(db.to_string())
            .or_insert_with(Instant::now);
        if since.elapsed() < self.options.assume_deleted_after {
            return Outcome::retry("the database does not exist");
        }
        self.missing.remove(db);
        tracing::info!(role = %self.name(), db, "the database stayed missing: taken for deleted");
        let role = self.role.clone();
        let db = db.to_string();
        self.tasks.spawn(async move { role.forget(&db).await });
        Outcome::Done
    }

    /// The role asks for a run of `db` (one of its documents changed): it
    /// runs as soon as it may, even if it was waiting for a retry.
    fn on_nudge(&mut self, db: String) {
        if !self.sched.run_now(&db, Instant::now()) && self.parked.len() < PARKED_NUDGES {
            self.parked.push_back((db, Instant::now()));
        }
    }

    /// A question of the admin console.
    fn on_control(&mut self, control: Control) {
        match control {
            Control::Waiting { limit, reply } => {
                let waiting = self.sched.waiting(Instant::now(), limit);
                let role = self.name().to_string();
                let list = waiting
                    .into_iter()
                    .map(|w| WaitingDb {
                        role: role.clone(),
                        reason: self.failing.get(&w.db).map(|(why, _)| why.clone()),
                        state: match self.failing.get(&w.db) {
                            Some((_, true)) if w.state == WaitState::Retrying => WaitState::Held,
                            _ => w.state,
                        },
                        waited_seconds: w.waited.as_secs(),
                        retries: w.retries,
                        db: w.db,
                    })
                    .collect();
                let _ = reply.send(list);
            }
            Control::RunNow { db, reply } => {
                let _ = reply.send(self.sched.run_now(&db, Instant::now()));
            }
        }
    }

    /// Hands the partitions being given up whose runs are over back to the
    /// coordinator, with their final checkpoints, once the role has saved
    /// what its runs did: the next owner starts from what it reads in
    /// CouchDB. (A partition whose runs never end is released by the
    /// coordinator after the drain timeout.)
    fn release_drained(&mut self) {
        let drained = self.sched.take_drained();
        if drained.is_empty() {
            return;
        }
        let role = self.role.clone();
        let requests = self.requests.clone();
        self.tasks.spawn(async move {
            role.save().await;
            for (partition, checkpoint) in drained {
                let _ = requests.send(Request::Released {
                    partition,
                    checkpoint,
                });
            }
        });
    }

    /// Fencing (see [`crate::coordination::Timing::fenced`]).
    fn fenced(&self, beats: &watch::Receiver<Option<TokioInstant>>) -> bool {
        self.options
            .timing
            .fenced(*beats.borrow(), TokioInstant::now())
    }

    /// Starts the runs the scheduler allows (none while fenced).
    fn start_runs(&mut self, fenced: bool) {
        if fenced {
            return;
        }
        for start in self.sched.take_startable(Instant::now()) {
            self.metrics.runs_started.get_or_create(&self.label).inc();
            tracing::trace!(role = %self.name(), db = %start.db, "run");
            self.metrics
                .update_to_run
                .get_or_create(&self.label)
                .observe(start.waited.as_secs_f64());
            self.spawn_run(start.db);
        }
    }

    /// Runs the role on a database in its own task; a panic counts as a
    /// failure to retry, never as a lost database.
    fn spawn_run(&mut self, db: String) {
        let role = self.role.clone();
        let events = self.events.clone();
        self.runs.spawn(async move {
            let started = Instant::now();
            let outcome = AssertUnwindSafe(role.handle(&db))
                .catch_unwind()
                .await
                .unwrap_or_else(|_| Outcome::retry("the run panicked"));
            let _ = events.send(Event::Finished {
                db,
                outcome,
                took: started.elapsed(),
            });
        });
    }

    /// Asks the coordinator to save the checkpoints that moved, if any.
    fn save_checkpoints(&mut self) {
        let dirty = self.sched.take_dirty_checkpoints();
        if !dirty.is_empty() {
            let _ = self.requests.send(Request::Checkpoints(dirty));
        }
    }

    /// No new runs; those in flight finish (or are abandoned after the
    /// shutdown timeout); checkpoints are saved and leases released; every
    /// task is stopped.
    async fn stop(mut self, mut events: mpsc::UnboundedReceiver<Event>) {
        tracing::info!(role = %self.name(), in_flight = self.sched.in_flight(), "stopping");
        self.sched.stop();
        for (_, task) in self.catch_ups.values() {
            task.abort();
        }
        self.finish_runs(&mut events).await;
        self.role.save().await;
        self.leave().await;
        self.tasks.abort_all();
        self.runs.abort_all();
        // Wait for the aborted tasks, so that nothing of the worker outlives
        // its stop.
        while self.tasks.join_next().await.is_some() {}
        while self.runs.join_next().await.is_some() {}
        tracing::info!(role = %self.name(), "stopped");
    }

    async fn finish_runs(&mut self, events: &mut mpsc::UnboundedReceiver<Event>) {
        let deadline = tokio::time::Instant::now() + self.options.shutdown_timeout;
        while self.sched.in_flight() > 0 {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(Some(Event::Finished { db, outcome, .. })) => {
                    self.sched
                        .on_finished(&db, finished(&outcome), Instant::now());
                }
                Ok(Some(Event::RetryDue { .. })) => {}
                Ok(None) | Err(_) => {
                    tracing::warn!(role = %self.name(), abandoned = self.sched.in_flight(), "shutdown timeout: abandoning runs in flight");
                    return;
                }
            }
        }
    }

    /// Saves the checkpoints, frees the leases and removes the membership.
    async fn leave(&mut self) {
        let checkpoints = self
            .sched
            .owned()
            .into_iter()
            .map(|p| (p, self.sched.remove(p)))
            .collect();
        let (done, left) = oneshot::channel();
        if self
            .requests
            .send(Request::Leave { checkpoints, done })
            .is_ok()
            // The coordinator may be in the middle of a heartbeat (bounded
            // by two heartbeats) and then needs two bounded steps to leave.
            && tokio::time::timeout(self.options.timing.heartbeat * 7, left)
                .await
                .is_err()
        {
            tracing::warn!(role = %self.name(), "could not release the leases in time; they expire after the lease time");
        }
    }
}

/// What an outcome means to the scheduler.
fn finished(outcome: &Outcome) -> Finished {
    match outcome {
        // A database taken for deleted comes back from `track_missing` as
        // `Done`; one still within `--assume-deleted-after` (or met at a
        // stop) is not handled yet.
        Outcome::Retry {
            wait: Wait::Held(_),
            ..
        } => Finished::Held,
        Outcome::Retry { .. } | Outcome::Missing => Finished::Retry,
        Outcome::Done => Finished::Handled,
    }
}

#[cfg(test)]
mod tests {
    //! The event loop with a scripted role and a paused clock: no CouchDB
    //! is reached (replays wait for a permit that never comes, and the
    //! coordinator is played by the test).

    use std::collections::HashSet;
    use std::sync::Mutex;

    use serde_json::json;

    use super::*;
    use crate::backoff::Strategy;
    use crate::coordination::Timing;
    use crate::couch::{ClientOptions, DbUpdateKind, SecretUrl};
    use crate::worker::control::WorkerHandle;

    /// Records when each run started and when the role saved; answers runs
    /// with `outcome`; takes `save_time` to save.
    struct Scripted {
        outcome: Outcome,
        save_time: Duration,
        runs: Mutex<Vec<TokioInstant>>,
        saves: Mutex<Vec<TokioInstant>>,
    }

    impl Role for Scripted {
        fn name(&self) -> &str {
            "scripted"
        }

        async fn handle(&self, _db: &str) -> Outcome {
            self.runs.lock().expect("runs").push(TokioInstant::now());
            self.outcome.clone()
        }

        async fn save(&self) {
            tokio::time::sleep(self.save_time).await;
            self.saves.lock().expect("saves").push(TokioInstant::now());
        }
    }

    /// The ends of the worker's channels that the test plays.
    struct Harness {
        role: Arc<Scripted>,
        live: mpsc::Sender<DbUpdate>,
        assignments: mpsc::UnboundedSender<Assignment>,
        beats: watch::Sender<Option<TokioInstant>>,
        requests: mpsc::UnboundedReceiver<Request>,
        /// The admin console's handle.
        console: WorkerHandle,
        _stop: oneshot::Sender<()>,
    }

    fn options(retry: Backoff) -> WorkerOptions {
        WorkerOptions {
            db_name: "spiegel".into(),
            namespace: String::new(),
            worker_id: "w1".into(),
            concurrency: 2,
            catch_up_concurrency: 2,
            timing: Timing {
                lease: Duration::from_secs(30),
                heartbeat: Duration::from_secs(10),
                drain: Duration::from_secs(30),
            },
            checkpoint_interval: Duration::from_secs(3600),
            feed_heartbeat: Duration::from_secs(10),
            start_from_now: true,
            retry,
            shutdown_timeout: Duration::from_secs(5),
            sweep_interval: None,
            assume_deleted_after: Duration::from_secs(600),
            health: Arc::default(),
            workers: Arc::default(),
            status: Default::default(),
        }
    }

    fn linear(delay: u64, limit: u32) -> Backoff {
        Backoff {
            strategy: Strategy::Linear,
            delay: Duration::from_secs(delay),
            multiplier: 1.0,
            max_delay: None,
            limit,
            jitter: false,
        }
    }

    /// Starts a worker of one partition, with a fresh heartbeat.
    async fn start(outcome: Outcome, save_time: Duration, retry: Backoff) -> Harness {
        let role = Arc::new(Scripted {
            outcome,
            save_time,
            runs: Mutex::default(),
            saves: Mutex::default(),
        });
        let url = SecretUrl::parse("http://127.0.0.1:9").expect("a URL");
        let client = CouchClient::new(&url, ClientOptions::default()).expect("a client");
        let (_, nudges) = mpsc::channel(1);
        let (stop_tx, stop) = oneshot::channel::<()>();
        let options = options(retry);
        let sched = Scheduler::new(1, options.concurrency, HashSet::new());
        let metrics = crate::metrics::Metrics::new().worker;
        let (mut worker, inbox, ends) =
            Worker::new(role.clone(), options, client, metrics, sched, nudges);
        // No replay ever starts: it would read CouchDB.
        worker.replays = Arc::new(Semaphore::new(0));
        ends.beats.send_replace(Some(TokioInstant::now()));
        tokio::spawn(worker.run(inbox, async {
            let _ = stop.await;
        }));
        ends.assignments
            .send(Assignment::Acquired {
                partition: 0,
                checkpoint: None,
            })
            .expect("the worker runs");
        // Live events of a partition not acquired yet are left to its
        // replay: let the worker take the assignment first.
        tokio::time::sleep(Duration::from_millis(1)).await;
        Harness {
            role,
            live: ends.live,
            assignments: ends.assignments,
            beats: ends.beats,
            requests: ends.requests,
            console: WorkerHandle::new("scripted".into(), "w1".into(), ends.control),
            _stop: stop_tx,
        }
    }

    impl Harness {
        async fn update(&self, db: &str) {
            let update = DbUpdate {
                db_name: db.into(),
                kind: DbUpdateKind::Updated,
                seq: json!("1-a").into(),
            };
            self.live.send(update).await.expect("the worker runs");
        }

        fn runs(&self) -> Vec<TokioInstant> {
            self.role.runs.lock().expect("runs").clone()
        }

        /// Lets the (paused) clock run for `time`.
        async fn wait(&self, time: Duration) {
            tokio::time::sleep(time).await;
        }

        /// Keeps the heartbeat fresh for `time`.
        async fn beat_for(&self, time: Duration) {
            let end = TokioInstant::now() + time;
            while TokioInstant::now() < end {
                self.beats.send_replace(Some(TokioInstant::now()));
                self.wait(Duration::from_secs(1)).await;
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_database_runs_again_after_each_backoff_until_the_limit() {
        let h = start(
            Outcome::retry("the API failed"),
            Duration::ZERO,
            linear(10, 2),
        )
        .await;
        let t0 = TokioInstant::now();
        h.update("db1").await;
        h.beat_for(Duration::from_secs(60)).await;
        let after: Vec<u64> = h.runs().iter().map(|t| (*t - t0).as_secs()).collect();
        assert_eq!(
            after,
            [0, 10, 20],
            "a first run and two retries, 10 s apart"
        );
        h.update("db1").await;
        h.beat_for(Duration::from_secs(5)).await;
        assert_eq!(h.runs().len(), 4, "the next change runs it again");
    }

    #[tokio::test(start_paused = true)]
    async fn run_now_cuts_a_retry_wait_short_and_the_earlier_timer_is_ignored() {
        let h = start(
            Outcome::retry("the API failed"),
            Duration::ZERO,
            linear(10, 0),
        )
        .await;
        let t0 = TokioInstant::now();
        h.update("db1").await;
        h.beat_for(Duration::from_secs(3)).await;
        let waiting = h.console.waiting(10).await;
        assert_eq!(waiting.len(), 1);
        assert_eq!(waiting[0].state, WaitState::Retrying);
        assert_eq!(waiting[0].reason.as_deref(), Some("the API failed"));
        assert!(h.console.run_now("db1").await, "its partition is ours");
        h.beat_for(Duration::from_secs(30)).await;
        let after: Vec<u64> = h.runs().iter().map(|t| (*t - t0).as_secs()).collect();
        assert_eq!(
            after,
            [0, 3, 13, 23],
            "run at once, then 10 s after each failure: the first failure's timer (due at 10 s) is stale"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn no_run_starts_while_the_heartbeat_is_too_old() {
        let h = start(Outcome::Done, Duration::ZERO, linear(10, 0)).await;
        // The last heartbeat is 25 s old: within a heartbeat (10 s) of the
        // lease time (30 s), others may take the partition soon.
        h.wait(Duration::from_secs(25)).await;
        h.update("db1").await;
        h.wait(Duration::from_secs(20)).await;
        assert!(h.runs().is_empty(), "fenced: no run");
        h.beats.send_replace(Some(TokioInstant::now()));
        h.wait(Duration::from_secs(1)).await;
        assert_eq!(h.runs().len(), 1, "a fresh heartbeat lifts the fence");
    }

    #[tokio::test(start_paused = true)]
    async fn a_partition_is_handed_back_only_once_the_role_has_saved() {
        let mut h = start(Outcome::Done, Duration::from_secs(3), linear(10, 0)).await;
        h.update("db1").await;
        h.beat_for(Duration::from_secs(1)).await;
        assert_eq!(h.runs().len(), 1);
        let asked = TokioInstant::now();
        h.assignments
            .send(Assignment::Release { partition: 0 })
            .expect("the worker runs");
        let released = loop {
            match h.requests.recv().await.expect("the worker runs") {
                Request::Released { partition, .. } => break partition,
                Request::Checkpoints(_) => continue,
                Request::Leave { .. } => panic!("the worker left"),
            }
        };
        assert_eq!(released, 0);
        let saves = h.role.saves.lock().expect("saves").clone();
        assert_eq!(saves.len(), 1, "saved once, before the release");
        assert!(
            TokioInstant::now() >= asked + Duration::from_secs(3),
            "the release waited for the save"
        );
    }
}
