//! The worker's bookkeeping, free of I/O: which databases need a run, which
//! runs may start, and which checkpoint each owned partition has reached.
//!
//! Rules it enforces:
//! - at most one run per database; events arriving during a run coalesce
//!   into one more run afterwards;
//! - at most `concurrency` runs in flight, started in arrival order, so a
//!   slow or failing database never holds up the others;
//! - a partition's checkpoint only moves past an event once a run that
//!   started after that event has finished.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use super::watermark::Watermark;
use crate::coordination::partition_of;
use crate::couch::{DbUpdate, DbUpdateKind, Seq};

/// An event a run is expected to cover. Its partition is the database's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EventRef {
    Live {
        epoch: u64,
        id: u64,
    },
    CatchUp {
        epoch: u64,
    },
    /// Found by the sweep: no checkpoint depends on it.
    Sweep,
}

/// The events a run of one database must cover, in constant space however
/// many arrive: a database that waits for hours over a busy feed keeps
/// this, not one entry per event.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Cover {
    /// Some event asks for a run (the sweep's included).
    any: bool,
    /// The oldest live event not yet handled, as (epoch, id). It alone holds
    /// its partition's watermark: later live events of the database enter
    /// the watermark done, since the run that covers this one starts after
    /// them too.
    live: Option<(u64, u64)>,
    /// The epoch of the catch-up that reported the database: it counts once
    /// in that catch-up's outstanding runs, however often reported.
    catch_up: Option<u64>,
}

impl Cover {
    /// True when a live event of `epoch` already holds the watermark.
    fn holds_live(&self, epoch: u64) -> bool {
        self.live.is_some_and(|(e, _)| e == epoch)
    }

    fn add(&mut self, event: EventRef) {
        self.any = true;
        match event {
            EventRef::Live { epoch, id } if !self.holds_live(epoch) => {
                self.live = Some((epoch, id));
            }
            EventRef::CatchUp { epoch } => self.catch_up = Some(epoch),
            _ => {}
        }
    }

    /// True when no live change asks for the run: history (a catch-up, the
    /// sweep, a document added over existing databases), which waits behind
    /// live changes.
    fn history_only(&self) -> bool {
        self.live.is_none()
    }

    /// The events whose handling moves a checkpoint.
    fn events(self) -> impl Iterator<Item = EventRef> {
        let live = self.live.map(|(epoch, id)| EventRef::Live { epoch, id });
        let catch_up = self.catch_up.map(|epoch| EventRef::CatchUp { epoch });
        live.into_iter().chain(catch_up)
    }
}

#[derive(Debug, Default)]
struct DbState {
    /// Events waiting for the next run.
    pending: Cover,
    /// Events covered by the run in flight.
    running: Cover,
    in_flight: bool,
    queued: bool,
    /// Queued with history only, in [`Ready::history`].
    queued_as_history: bool,
    /// The run in flight is history only: it holds a catch-up slot.
    history_run: bool,
    /// Waiting for a retry timer.
    backing_off: bool,
    /// The id of the retry timer it waits for: a timer that another one
    /// (or a run now) replaced is stale.
    timer: u64,
    retries: u32,
    /// When the oldest pending event arrived.
    pending_since: Option<Instant>,
    /// When the oldest event not yet handled arrived, across retries: how
    /// long the database has been waiting, for operators.
    waiting_since: Option<Instant>,
}

impl DbState {
    fn idle(&self) -> bool {
        !self.pending.any && !self.in_flight && !self.backing_off
    }
}

#[derive(Debug)]
struct CatchUp {
    /// Databases the catch-up reported, each counted once.
    found: u64,
    /// Catch-up events whose run has not finished yet.
    outstanding: usize,
    /// The seq the catch-up read ended at, once it has.
    end: Option<Seq>,
}

#[derive(Debug)]
struct Partition {
    epoch: u64,
    catch_up: Option<CatchUp>,
    live: Watermark,
    checkpoint: Option<Seq>,
    /// The checkpoint changed since the last flush.
    dirty: bool,
    /// The partition had no checkpoint and now has one: save it at once,
    /// or a crash before the next save would make the next owner start
    /// from nothing.
    urgent: bool,
    releasing: bool,
}

/// How a run ended, as far as the scheduler cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finished {
    /// The covered events are handled (done, or the database is gone).
    Handled,
    /// Try again later; the covered events stay pending.
    Retry,
    /// Held back by the role (a paused rule): like `Retry`, without
    /// counting a failure.
    Held,
}

/// Where a database that waits stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WaitState {
    /// Ready, waiting for a free run slot.
    Queued,
    /// A run is in flight.
    Running,
    /// Its last run failed; it runs again after its backoff.
    Retrying,
    /// Held back by its role (a paused on_change rule), not failing.
    Held,
}

/// A database with changes not yet handled, for operators.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Waiting {
    pub db: String,
    pub state: WaitState,
    /// Since the oldest change not yet handled arrived.
    pub waited: Duration,
    /// Runs that failed in a row.
    pub retries: u32,
}

/// A run the driver should start.
#[derive(Debug, PartialEq, Eq)]
pub struct Start {
    pub db: String,
    /// Time since the oldest event this run covers arrived.
    pub waited: Duration,
}

/// Databases that may run, live changes first: a first start over
/// thousands of databases must not hold back the changes made meanwhile.
#[derive(Debug, Default)]
struct Ready {
    live: VecDeque<String>,
    history: VecDeque<String>,
}

impl Ready {
    fn push(&mut self, db: &str, state: &mut DbState) {
        state.queued_as_history = state.pending.history_only();
        let queue = match state.queued_as_history {
            true => &mut self.history,
            false => &mut self.live,
        };
        queue.push_back(db.to_string());
    }

    /// The next database: a live one, else history if `history` allows;
    /// history first when `starved` (none of it runs), so that a steady
    /// stream of live changes never stops it.
    fn pop(&mut self, history: bool, starved: bool) -> Option<String> {
        if starved {
            if let Some(db) = self.history.pop_front() {
                return Some(db);
            }
        }
        match self.live.pop_front() {
            Some(db) => Some(db),
            None if history => self.history.pop_front(),
            None => None,
        }
    }

    fn len(&self) -> usize {
        self.live.len() + self.history.len()
    }
}

/// How far the catch-ups of the owned partitions are: databases found and
/// handled since the first of them began.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CatchUpProgress {
    pub found: u64,
    pub handled: u64,
    /// Some partition is still listing (or replaying) its databases: more
    /// may be found.
    pub listing: bool,
    /// Some partition is still catching up; false once all have.
    pub running: bool,
    pub since: Instant,
}

#[derive(Debug)]
pub struct Scheduler {
    partitions_total: u32,
    concurrency: usize,
    /// The most runs of history only (a catch-up's) at once.
    history_concurrency: usize,
    history_in_flight: usize,
    /// Databases handled by the catch-ups that ended since the current
    /// ones began, and when the first began.
    caught_up: (u64, Option<Instant>),
    skip: HashSet<String>,
    partitions: HashMap<u32, Partition>,
    in_flight_by_partition: HashMap<u32, usize>,
    dbs: HashMap<String, DbState>,
    ready: Ready,
    in_flight: usize,
    next_id: u64,
    next_epoch: u64,
    next_timer: u64,
    stopping: bool,
}

impl Scheduler {
    /// `skip`: databases never handed to the role (the spiegel database,
    /// `_global_changes`).
    pub fn new(partitions_total: u32, concurrency: usize, skip: HashSet<String>) -> Self {
        Scheduler {
            partitions_total,
            concurrency: concurrency.max(1),
            history_concurrency: concurrency.max(1),
            history_in_flight: 0,
            caught_up: (0, None),
            skip,
            partitions: HashMap::new(),
            in_flight_by_partition: HashMap::new(),
            dbs: HashMap::new(),
            ready: Ready::default(),
            in_flight: 0,
            next_id: 0,
            next_epoch: 0,
            next_timer: 0,
            stopping: false,
        }
    }

    /// At most `n` runs of history only at once (at least 1).
    pub fn with_history_concurrency(mut self, n: usize) -> Self {
        self.history_concurrency = n.clamp(1, self.concurrency);
        self
    }

    /// The progress of the current catch-ups, or of the last ones once
    /// they ended; None before any began.
    pub fn catch_up_progress(&self) -> Option<CatchUpProgress> {
        let (done, since) = self.caught_up;
        let mut progress = CatchUpProgress {
            found: done,
            handled: done,
            listing: false,
            running: false,
            since: since?,
        };
        let active = self.partitions.values().filter(|p| !p.releasing);
        for c in active.filter_map(|p| p.catch_up.as_ref()) {
            progress.running = true;
            progress.found += c.found;
            progress.handled += c.found.saturating_sub(c.outstanding as u64);
            progress.listing |= c.end.is_none();
        }
        Some(progress)
    }

    /// The installation's partition count.
    pub fn partitions(&self) -> u32 {
        self.partitions_total
    }

    pub fn partition_of(&self, db: &str) -> u32 {
        partition_of(db, self.partitions_total)
    }

    /// Starts owning a partition; returns the epoch that tags its catch-up.
    pub fn acquire(&mut self, partition: u32, checkpoint: Option<Seq>) -> u64 {
        if !self.catch_up_progress().is_some_and(|p| p.running) {
            self.caught_up = (0, Some(Instant::now()));
        }
        self.next_epoch += 1;
        self.partitions.insert(
            partition,
            Partition {
                epoch: self.next_epoch,
                catch_up: Some(CatchUp {
                    found: 0,
                    outstanding: 0,
                    end: None,
                }),
                live: Watermark::default(),
                urgent: checkpoint.is_none(),
                checkpoint,
                dirty: false,
                releasing: false,
            },
        );
        self.next_epoch
    }

    #[cfg(test)]
    fn owns(&self, partition: u32) -> bool {
        self.partitions
            .get(&partition)
            .is_some_and(|p| !p.releasing)
    }

    pub fn owned(&self) -> Vec<u32> {
        let mut owned: Vec<u32> = self.partitions.keys().copied().collect();
        owned.sort_unstable();
        owned
    }

    /// Stops starting runs for a partition; it stays until its runs in
    /// flight finish ([`Self::drained`]), so that its final checkpoint
    /// covers them.
    pub fn release(&mut self, partition: u32) {
        if let Some(p) = self.partitions.get_mut(&partition) {
            p.releasing = true;
            self.drop_pending(partition);
        }
    }

    /// Removes the releasing partitions whose runs are over, with their
    /// final checkpoints.
    pub fn take_drained(&mut self) -> Vec<(u32, Option<Seq>)> {
        let drained: Vec<u32> = self
            .partitions
            .iter()
            .filter(|(p, state)| state.releasing && self.in_flight_in(**p) == 0)
            .map(|(p, _)| *p)
            .collect();
        drained.into_iter().map(|p| (p, self.remove(p))).collect()
    }

    fn in_flight_in(&self, partition: u32) -> usize {
        self.in_flight_by_partition
            .get(&partition)
            .copied()
            .unwrap_or(0)
    }

    /// Forgets a partition and returns its last checkpoint.
    pub fn remove(&mut self, partition: u32) -> Option<Seq> {
        self.drop_pending(partition);
        self.partitions
            .remove(&partition)
            .and_then(|p| p.checkpoint)
    }

    fn drop_pending(&mut self, partition: u32) {
        let total = self.partitions_total;
        for (db, state) in self.dbs.iter_mut() {
            if partition_of(db, total) == partition {
                state.pending = Cover::default();
            }
        }
        self.dbs.retain(|_, s| !s.idle() || s.queued);
    }

    /// An event of the live `_db_updates` feed. Returns true when it is a
    /// deletion of a database of an owned partition (the role may want to
    /// know).
    pub fn on_live_event(&mut self, update: &DbUpdate, now: Instant) -> bool {
        let partition = self.partition_of(&update.db_name);
        self.next_id += 1;
        let id = self.next_id;
        let mut deleted_here = false;
        for (&q, p) in self.partitions.iter_mut() {
            if p.releasing {
                continue;
            }
            let runs = q == partition
                && update.kind != DbUpdateKind::Deleted
                && !self.skip.contains(&update.db_name);
            deleted_here |= q == partition && update.kind == DbUpdateKind::Deleted;
            // A database already waiting with an earlier live event holds
            // the watermark there, and its next run covers this event too.
            let covered = runs
                && self
                    .dbs
                    .get(&update.db_name)
                    .is_some_and(|s| s.pending.holds_live(p.epoch));
            p.live.push(id, update.seq.clone(), !runs || covered);
            if runs {
                let event = EventRef::Live { epoch: p.epoch, id };
                add_event(&mut self.dbs, &mut self.ready, &update.db_name, event, now);
            }
            self.caught_up.0 += advance(p);
        }
        deleted_here
    }

    /// A database found by a partition's catch-up (its replay since the
    /// checkpoint, or the listing of every database on a first start).
    pub fn on_catch_up_event(&mut self, partition: u32, epoch: u64, db: &str, now: Instant) {
        let Some(p) = self.partitions.get_mut(&partition) else {
            return;
        };
        if p.epoch != epoch || p.releasing || self.skip.contains(db) {
            return;
        }
        let Some(catch_up) = p.catch_up.as_mut() else {
            return;
        };
        // Its next run covers every report of this catch-up: count it once.
        if self
            .dbs
            .get(db)
            .is_none_or(|s| s.pending.catch_up != Some(epoch))
        {
            catch_up.outstanding += 1;
            catch_up.found += 1;
        }
        let event = EventRef::CatchUp { epoch };
        add_event(&mut self.dbs, &mut self.ready, db, event, now);
    }

    /// A database the sweep found changed without an update event. Returns
    /// false when its partition is not ours.
    pub fn on_sweep(&mut self, db: &str, now: Instant) -> bool {
        let partition = self.partition_of(db);
        if self.partitions.get(&partition).is_none_or(|p| p.releasing) || self.skip.contains(db) {
            return false;
        }
        add_event(&mut self.dbs, &mut self.ready, db, EventRef::Sweep, now);
        true
    }

    /// The catch-up read of a partition reached the end of the feed at `end`.
    pub fn on_catch_up_done(&mut self, partition: u32, epoch: u64, end: Seq) {
        if let Some(p) = self
            .partitions
            .get_mut(&partition)
            .filter(|p| p.epoch == epoch)
        {
            if let Some(catch_up) = p.catch_up.as_mut() {
                catch_up.end = Some(end);
            }
            self.caught_up.0 += advance(p);
        }
    }

    /// Runs that may start now, within the concurrency limit.
    pub fn take_startable(&mut self, now: Instant) -> Vec<Start> {
        let mut starts = Vec::new();
        while !self.stopping && self.in_flight < self.concurrency {
            let history = self.history_in_flight < self.history_concurrency;
            let Some(db) = self.ready.pop(history, self.history_in_flight == 0) else {
                break;
            };
            let Some(state) = self.dbs.get_mut(&db) else {
                continue;
            };
            state.queued = false;
            if state.in_flight || state.backing_off {
                continue;
            }
            if !state.pending.any {
                if state.idle() {
                    self.dbs.remove(&db);
                }
                continue;
            }
            if state.pending.history_only() && !history {
                // Live when queued, history now: it waits for a slot.
                state.queued = true;
                self.ready.push(&db, state);
                continue;
            }
            state.history_run = state.pending.history_only();
            self.history_in_flight += usize::from(state.history_run);
            state.running = std::mem::take(&mut state.pending);
            state.in_flight = true;
            let waited = state
                .pending_since
                .take()
                .map(|t| now.saturating_duration_since(t))
                .unwrap_or_default();
            self.in_flight += 1;
            *self
                .in_flight_by_partition
                .entry(self.partition_of(&db))
                .or_default() += 1;
            starts.push(Start { db, waited });
        }
        starts
    }

    /// Runs of `db` that failed in a row (0 once one succeeds).
    pub fn retries(&self, db: &str) -> u32 {
        self.dbs.get(db).map_or(0, |s| s.retries)
    }

    /// The id of the retry timer `db` waits for, to give
    /// [`Self::retry_due`] when it fires.
    pub fn timer(&self, db: &str) -> u64 {
        self.dbs.get(db).map_or(0, |s| s.timer)
    }

    /// A run finished. On [`Finished::Retry`] and [`Finished::Held`]
    /// returns the retry number (1 for the first failure; unchanged when
    /// held), after which [`Self::retry_due`] must be called with
    /// [`Self::timer`].
    pub fn on_finished(&mut self, db: &str, outcome: Finished, now: Instant) -> Option<u32> {
        let partition = self.partition_of(db);
        let state = self.dbs.get_mut(db).filter(|s| s.in_flight)?;
        state.in_flight = false;
        if std::mem::take(&mut state.history_run) {
            self.history_in_flight -= 1;
        }
        let ran = std::mem::take(&mut state.running);
        if outcome == Finished::Handled {
            state.retries = 0;
            state.waiting_since = state.pending_since;
        }
        self.in_flight -= 1;
        if let Some(n) = self.in_flight_by_partition.get_mut(&partition) {
            *n = n.saturating_sub(1);
        }
        if outcome == Finished::Handled {
            for event in ran.events() {
                self.complete(partition, event);
            }
            self.settle(db);
            return None;
        }
        let retry = self.back_off(db, partition, ran, outcome, now);
        if retry.is_none() {
            self.settle(db);
        }
        retry
    }

    /// A run that must be retried: its events go back to pending, and the
    /// database waits for a retry timer. None when nothing is left to cover
    /// (its partition is no longer ours).
    fn back_off(
        &mut self,
        db: &str,
        partition: u32,
        ran: Cover,
        outcome: Finished,
        now: Instant,
    ) -> Option<u32> {
        let pending = self.dbs.get(db)?.pending;
        let pending = self.requeue(partition, ran, pending);
        let state = self.dbs.get_mut(db)?;
        state.pending = pending;
        if !pending.any {
            return None;
        }
        state.pending_since.get_or_insert(now);
        if outcome == Finished::Retry {
            state.retries += 1;
        }
        state.backing_off = true;
        self.next_timer += 1;
        state.timer = self.next_timer;
        Some(state.retries)
    }

    /// Puts the events of a run that was not handled back in front of those
    /// that arrived during it, unless the partition is no longer ours. The
    /// older event keeps the hold; the newer one, covered by the same next
    /// run, is released.
    fn requeue(&mut self, partition: u32, ran: Cover, pending: Cover) -> Cover {
        let epoch = match self.partitions.get(&partition) {
            Some(p) if !p.releasing => p.epoch,
            _ => return pending,
        };
        let mut merged = pending;
        merged.any |= ran.any;
        if let Some(older) = ran.live.filter(|(e, _)| *e == epoch) {
            if let Some((epoch, id)) = merged.live.replace(older) {
                self.complete(partition, EventRef::Live { epoch, id });
            }
        }
        if let Some(epoch) = ran.catch_up.filter(|e| *e == epoch) {
            if merged.catch_up.replace(epoch).is_some() {
                self.complete(partition, EventRef::CatchUp { epoch });
            }
        }
        merged
    }

    /// The retry timer `timer` of a database fired: its wait is over,
    /// unless the timer is stale.
    pub fn retry_due(&mut self, db: &str, timer: u64) {
        if self
            .dbs
            .get(db)
            .is_some_and(|s| s.backing_off && s.timer == timer)
        {
            self.end_backoff(db);
        }
    }

    fn end_backoff(&mut self, db: &str) {
        if let Some(state) = self.dbs.get_mut(db) {
            state.backing_off = false;
            self.settle(db);
        }
    }

    /// Queues `db` if it can run, or forgets it if it is idle.
    fn settle(&mut self, db: &str) {
        let Some(state) = self.dbs.get_mut(db) else {
            return;
        };
        if enqueue_if_ready(state) {
            self.ready.push(db, state);
        } else if state.idle() {
            self.dbs.remove(db);
        }
    }

    /// Runs `db` as soon as a slot is free, cutting a backoff short.
    /// False when its partition is not ours.
    pub fn run_now(&mut self, db: &str, now: Instant) -> bool {
        let partition = self.partition_of(db);
        let ours = self
            .partitions
            .get(&partition)
            .is_some_and(|p| !p.releasing);
        if ours && self.dbs.get(db).is_some_and(|s| s.backing_off) {
            self.end_backoff(db);
            return true;
        }
        self.on_sweep(db, now)
    }

    /// The `limit` databases that have waited longest for their changes to
    /// be handled.
    pub fn waiting(&self, now: Instant, limit: usize) -> Vec<Waiting> {
        let mut waiting: Vec<Waiting> = self
            .dbs
            .iter()
            .filter_map(|(db, s)| {
                let state = if s.in_flight {
                    WaitState::Running
                } else if s.backing_off {
                    WaitState::Retrying
                } else if s.pending.any {
                    WaitState::Queued
                } else {
                    return None;
                };
                Some(Waiting {
                    db: db.clone(),
                    state,
                    waited: now.saturating_duration_since(s.waiting_since?),
                    retries: s.retries,
                })
            })
            .collect();
        waiting.sort_by(|a, b| b.waited.cmp(&a.waited).then_with(|| a.db.cmp(&b.db)));
        waiting.truncate(limit);
        waiting
    }

    /// An event of `partition` is handled (or covered by another).
    fn complete(&mut self, partition: u32, event: EventRef) {
        let Some(p) = self.partitions.get_mut(&partition) else {
            return;
        };
        match event {
            EventRef::Live { epoch, id } if epoch == p.epoch => p.live.complete(id),
            EventRef::CatchUp { epoch } if epoch == p.epoch => {
                if let Some(c) = p.catch_up.as_mut() {
                    c.outstanding = c.outstanding.saturating_sub(1);
                }
            }
            _ => return,
        }
        self.caught_up.0 += advance(p);
    }

    /// Checkpoints that moved since the last call.
    pub fn take_dirty_checkpoints(&mut self) -> Vec<(u32, Seq)> {
        let mut out = Vec::new();
        for (&q, p) in self.partitions.iter_mut() {
            if p.dirty && !p.releasing {
                if let Some(seq) = &p.checkpoint {
                    out.push((q, seq.clone()));
                }
                p.dirty = false;
            }
        }
        out.sort_by_key(|(q, _)| *q);
        out
    }

    /// True when a checkpoint must be saved now (see `Partition::urgent`).
    pub fn take_urgent(&mut self) -> bool {
        let mut urgent = false;
        for p in self.partitions.values_mut() {
            if p.urgent && p.checkpoint.is_some() {
                p.urgent = false;
                urgent = true;
            }
        }
        urgent
    }

    /// Stop starting runs (shutdown).
    pub fn stop(&mut self) {
        self.stopping = true;
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    pub fn queued(&self) -> usize {
        self.ready.len()
    }

    /// Databases with a run in flight, pending or backing off.
    #[cfg(test)]
    fn active_databases(&self) -> usize {
        self.dbs.len()
    }

    /// Watermark entries kept, over every partition.
    #[cfg(test)]
    fn watermark_entries(&self) -> usize {
        self.partitions.values().map(|p| p.live.len()).sum()
    }
}

/// Adds an event for the next run of `db`, queueing the database if it can
/// run.
fn add_event(
    dbs: &mut HashMap<String, DbState>,
    ready: &mut Ready,
    db: &str,
    event: EventRef,
    now: Instant,
) {
    let state = dbs.entry(db.to_string()).or_default();
    if !state.pending.any {
        state.pending_since = Some(now);
    }
    state.waiting_since.get_or_insert(now);
    state.pending.add(event);
    if enqueue_if_ready(state) {
        ready.push(db, state);
    } else if state.queued && state.queued_as_history && !state.pending.history_only() {
        // A live change to a database waiting as history: it goes ahead
        // (its entry in the history queue is then skipped as stale).
        ready.push(db, state);
    }
}

/// Marks a database queued if it can run; true when it must be pushed on
/// the ready queue.
fn enqueue_if_ready(state: &mut DbState) -> bool {
    if state.queued || state.in_flight || state.backing_off || !state.pending.any {
        return false;
    }
    state.queued = true;
    true
}

/// Moves a partition's checkpoint as far as its done events allow. Returns
/// the databases of its catch-up if that ended now.
fn advance(p: &mut Partition) -> u64 {
    let live = p.live.advance();
    match &mut p.catch_up {
        Some(c) => {
            if c.outstanding == 0 {
                if let Some(end) = c.end.take() {
                    let found = c.found;
                    p.catch_up = None;
                    p.checkpoint = Some(end);
                    p.dirty = true;
                    return found;
                }
            }
            // Live events popped while catching up were handled, but the
            // checkpoint may only use live seqs once the replay is complete.
        }
        None => {
            if let Some(seq) = live {
                p.checkpoint = Some(seq);
                p.dirty = true;
            }
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::{HashMap, VecDeque};

    fn update(db: &str, n: u64, kind: DbUpdateKind) -> DbUpdate {
        DbUpdate {
            db_name: db.into(),
            kind,
            seq: Seq::from(json!(format!("{n}-x"))),
        }
    }

    fn seq(n: u64) -> Seq {
        Seq::from(json!(format!("{n}-x")))
    }

    /// One partition, caught up, so that live seqs become checkpoints.
    fn live_scheduler(concurrency: usize) -> Scheduler {
        let mut s = Scheduler::new(1, concurrency, HashSet::from(["spiegel".to_string()]));
        let epoch = s.acquire(0, None);
        s.on_catch_up_done(0, epoch, seq(0));
        assert_eq!(s.take_dirty_checkpoints(), vec![(0, seq(0))]);
        s
    }

    fn dbs(starts: Vec<Start>) -> Vec<String> {
        starts.into_iter().map(|s| s.db).collect()
    }

    #[test]
    fn waiting_databases_are_listed_longest_first_and_run_now_cuts_a_backoff() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(10);
        let mut s = live_scheduler(1);
        s.on_live_event(&update("failing", 1, DbUpdateKind::Updated), t0);
        assert_eq!(dbs(s.take_startable(t0)), ["failing"]);
        assert_eq!(s.on_finished("failing", Finished::Retry, t0), Some(1));
        s.on_live_event(&update("queued", 2, DbUpdateKind::Updated), later);
        s.on_live_event(&update("running", 3, DbUpdateKind::Updated), later);
        let now = later + Duration::from_secs(5);
        let waiting: Vec<(String, WaitState, u64)> = s
            .waiting(now, 10)
            .into_iter()
            .map(|w| (w.db, w.state, w.waited.as_secs()))
            .collect();
        assert_eq!(
            waiting,
            [
                ("failing".into(), WaitState::Retrying, 15),
                ("queued".into(), WaitState::Queued, 5),
                ("running".into(), WaitState::Queued, 5),
            ]
        );
        assert_eq!(dbs(s.take_startable(now)), ["queued"], "one slot");
        assert!(s.run_now("failing", now), "its partition is ours");
        assert_eq!(
            s.waiting(now, 1)[0].state,
            WaitState::Queued,
            "no longer backing off"
        );
        s.on_finished("queued", Finished::Handled, now);
        assert_eq!(dbs(s.take_startable(now)), ["running", "failing"][..1]);
        s.on_finished("running", Finished::Handled, now);
        assert_eq!(dbs(s.take_startable(now)), ["failing"]);
        s.on_finished("failing", Finished::Handled, now);
        assert!(s.waiting(now, 10).is_empty(), "nothing waits once handled");
        assert!(
            !live_scheduler(1).run_now("spiegel", now),
            "skipped databases never run"
        );
    }

    #[test]
    fn live_changes_go_before_history_which_runs_within_its_share_and_never_starves() {
        let now = Instant::now();
        let mut s = Scheduler::new(1, 3, HashSet::new()).with_history_concurrency(2);
        let epoch = s.acquire(0, None);
        for db in ["h1", "h2", "h3", "h4"] {
            s.on_catch_up_event(0, epoch, db, now);
        }
        s.on_live_event(&update("live", 1, DbUpdateKind::Updated), now);
        s.on_live_event(&update("h4", 2, DbUpdateKind::Updated), now);
        assert_eq!(
            dbs(s.take_startable(now)),
            ["h1", "live", "h4"],
            "one history run always goes, then live changes first"
        );
        s.on_finished("live", Finished::Handled, now);
        assert_eq!(
            dbs(s.take_startable(now)),
            ["h2"],
            "the second history slot"
        );
        s.on_finished("h4", Finished::Handled, now);
        assert!(
            s.take_startable(now).is_empty(),
            "a free slot, but history holds its two"
        );
        let progress = s.catch_up_progress().expect("catching up");
        assert_eq!(
            (progress.found, progress.handled, progress.listing),
            (4, 1, true)
        );
        s.on_catch_up_done(0, epoch, seq(9));
        s.on_finished("h1", Finished::Handled, now);
        assert_eq!(dbs(s.take_startable(now)), ["h3"]);
        let progress = s.catch_up_progress().expect("catching up");
        assert_eq!(
            (progress.found, progress.handled, progress.listing),
            (4, 2, false)
        );
        s.on_finished("h2", Finished::Handled, now);
        s.on_finished("h3", Finished::Handled, now);
        let progress = s.catch_up_progress().expect("the last catch-up");
        assert_eq!(
            (progress.found, progress.handled, progress.running),
            (4, 4, false)
        );
        assert_eq!(s.take_dirty_checkpoints(), vec![(0, seq(9))]);
    }

    #[test]
    fn updates_during_a_run_coalesce_into_one_more_run() {
        let now = Instant::now();
        let mut s = live_scheduler(4);
        s.on_live_event(&update("a", 1, DbUpdateKind::Updated), now);
        assert_eq!(dbs(s.take_startable(now)), ["a"]);
        for n in 2..1000 {
            s.on_live_event(&update("a", n, DbUpdateKind::Updated), now);
        }
        assert!(s.take_startable(now).is_empty(), "one run at a time");
        assert_eq!(s.on_finished("a", Finished::Handled, now), None);
        assert_eq!(s.take_dirty_checkpoints(), vec![(0, seq(1))]);
        assert_eq!(dbs(s.take_startable(now)), ["a"], "exactly one more run");
        s.on_finished("a", Finished::Handled, now);
        assert!(s.take_startable(now).is_empty());
        assert_eq!(s.take_dirty_checkpoints(), vec![(0, seq(999))]);
        assert_eq!(s.active_databases(), 0, "nothing kept for idle databases");
    }

    #[test]
    fn concurrency_bounds_runs_and_a_failing_database_does_not_block_others() {
        let now = Instant::now();
        let mut s = live_scheduler(2);
        for (i, db) in ["a", "b", "c"].iter().enumerate() {
            s.on_live_event(&update(db, i as u64 + 1, DbUpdateKind::Updated), now);
        }
        assert_eq!(dbs(s.take_startable(now)), ["a", "b"]);
        assert_eq!(s.on_finished("a", Finished::Retry, now), Some(1));
        assert_eq!(dbs(s.take_startable(now)), ["c"], "a backs off, c goes");
        s.on_finished("b", Finished::Handled, now);
        s.on_finished("c", Finished::Handled, now);
        assert!(
            s.take_dirty_checkpoints().is_empty(),
            "a's event holds the checkpoint"
        );
        s.retry_due("a", s.timer("a"));
        assert_eq!(dbs(s.take_startable(now)), ["a"]);
        assert_eq!(s.on_finished("a", Finished::Retry, now), Some(2));
        s.retry_due("a", s.timer("a"));
        s.take_startable(now);
        s.on_finished("a", Finished::Handled, now);
        assert_eq!(s.take_dirty_checkpoints(), vec![(0, seq(3))]);
    }

    /// A worker driven step by step (one feed event per step, runs
    /// finishing one step after they start), with a model of the events no
    /// successful run has covered yet.
    struct Sim {
        s: Scheduler,
        now: Instant,
        /// Per database, the events not handled yet, oldest first.
        unhandled: HashMap<String, VecDeque<u64>>,
        /// Runs in flight, with the last event each covers.
        running: Vec<(String, u64)>,
        timers: Vec<(String, u64)>,
        runs: HashMap<String, u64>,
        last_event: u64,
        checkpoint: u64,
    }

    impl Sim {
        fn new() -> Self {
            Sim {
                s: live_scheduler(4),
                now: Instant::now(),
                unhandled: HashMap::new(),
                running: Vec::new(),
                timers: Vec::new(),
                runs: HashMap::new(),
                last_event: 0,
                checkpoint: 0,
            }
        }

        /// One step: an optional event, then runs end (`fails` says which
        /// fail), retry timers fire, runs start; checks the checkpoint.
        fn step(&mut self, event: Option<&str>, fails: impl Fn(&str, u64) -> bool) {
            if let Some(db) = event {
                self.last_event += 1;
                let n = self.last_event;
                self.s
                    .on_live_event(&update(db, n, DbUpdateKind::Updated), self.now);
                self.unhandled.entry(db.into()).or_default().push_back(n);
            }
            for (db, covered) in std::mem::take(&mut self.running) {
                let run = self.runs.entry(db.clone()).or_default();
                *run += 1;
                if fails(&db, *run) {
                    assert!(self.s.on_finished(&db, Finished::Retry, self.now).is_some());
                    self.timers.push((db.clone(), self.s.timer(&db)));
                } else {
                    self.s.on_finished(&db, Finished::Handled, self.now);
                    let events = self.unhandled.get_mut(&db).expect("it had events");
                    while events.front().is_some_and(|&e| e <= covered) {
                        events.pop_front();
                    }
                }
            }
            for (db, timer) in std::mem::take(&mut self.timers) {
                self.s.retry_due(&db, timer);
            }
            for start in self.s.take_startable(self.now) {
                self.running.push((start.db, self.last_event));
            }
            self.check_checkpoint();
        }

        /// The checkpoint never passes an event not handled yet.
        fn check_checkpoint(&mut self) {
            for (_, seq) in self.s.take_dirty_checkpoints() {
                let text = seq.as_json().as_str().expect("a test seq").to_string();
                self.checkpoint = text.trim_end_matches("-x").parse().expect("a test seq");
            }
            let oldest = self.unhandled.values().filter_map(|e| e.front()).min();
            if let Some(&oldest) = oldest {
                assert!(
                    self.checkpoint < oldest,
                    "checkpoint {} passed event {oldest}",
                    self.checkpoint
                );
            }
        }
    }

    #[test]
    fn waiting_databases_keep_constant_state_however_many_events_arrive() {
        let mut sim = Sim::new();
        // 10 databases fail 49 runs in 50, then every run from event
        // 90,000 on, amid 7 busy ones that always succeed.
        let (mut most_dbs, mut most_entries) = (0, 0);
        for n in 0..100_000u64 {
            let db = if n % 3 == 0 {
                format!("busy{}", n % 7)
            } else {
                format!("fail{}", n % 10)
            };
            let late = n >= 90_000;
            sim.step(Some(&db), |db, run| {
                db.starts_with("fail") && (late || run % 50 != 0)
            });
            most_dbs = most_dbs.max(sim.s.active_databases());
            most_entries = most_entries.max(sim.s.watermark_entries());
            assert!(sim.s.queued() <= 17);
        }
        assert!(most_dbs <= 17, "{most_dbs} databases kept");
        // At most a pending and a running hold per database, each between
        // two collapsed done entries.
        assert!(
            most_entries <= 4 * 17 + 1,
            "{most_entries} watermark entries"
        );
        assert!(sim.checkpoint > 80_000, "handled runs moved the checkpoint");
        assert!(sim.checkpoint < 90_010, "the failing databases hold it");
        while sim.s.active_databases() > 0 {
            sim.step(None, |_, _| false);
        }
        assert_eq!(sim.checkpoint, 100_000, "the end once all succeeded");
        assert_eq!(sim.s.watermark_entries(), 0);
    }

    #[test]
    fn deletions_and_skipped_databases_start_no_run() {
        let now = Instant::now();
        let mut s = live_scheduler(2);
        assert!(s.on_live_event(&update("gone", 1, DbUpdateKind::Deleted), now));
        assert!(!s.on_live_event(&update("spiegel", 2, DbUpdateKind::Updated), now));
        assert!(s.take_startable(now).is_empty());
        assert_eq!(s.take_dirty_checkpoints(), vec![(0, seq(2))]);
    }

    #[test]
    fn catch_up_must_finish_before_live_seqs_become_checkpoints() {
        let now = Instant::now();
        let mut s = Scheduler::new(1, 4, HashSet::new());
        let epoch = s.acquire(0, Some(seq(5)));
        s.on_catch_up_event(0, epoch, "old", now);
        s.on_live_event(&update("new", 20, DbUpdateKind::Updated), now);
        assert_eq!(dbs(s.take_startable(now)), ["old", "new"]);
        s.on_finished("new", Finished::Handled, now);
        s.on_catch_up_done(0, epoch, seq(18));
        assert!(
            s.take_dirty_checkpoints().is_empty(),
            "the replay's run is still going"
        );
        s.on_finished("old", Finished::Handled, now);
        assert_eq!(s.take_dirty_checkpoints(), vec![(0, seq(18))]);
        s.on_live_event(&update("other", 21, DbUpdateKind::Updated), now);
        s.take_startable(now);
        s.on_finished("other", Finished::Handled, now);
        assert_eq!(s.take_dirty_checkpoints(), vec![(0, seq(21))]);
    }

    #[test]
    fn stale_catch_up_messages_of_an_earlier_ownership_are_ignored() {
        let now = Instant::now();
        let mut s = Scheduler::new(1, 4, HashSet::new());
        let old = s.acquire(0, None);
        s.remove(0);
        let new = s.acquire(0, None);
        s.on_catch_up_event(0, old, "x", now);
        s.on_catch_up_done(0, old, seq(1));
        assert!(s.take_startable(now).is_empty());
        assert!(s.take_dirty_checkpoints().is_empty());
        s.on_catch_up_done(0, new, seq(2));
        assert_eq!(s.take_dirty_checkpoints(), vec![(0, seq(2))]);
    }

    #[test]
    fn a_released_partition_drains_its_runs_and_keeps_its_last_checkpoint() {
        let now = Instant::now();
        let mut s = Scheduler::new(2, 4, HashSet::new());
        // Find two databases in partition 0.
        let names: Vec<String> = (0..100)
            .map(|i| format!("db{i}"))
            .filter(|n| s.partition_of(n) == 0)
            .take(2)
            .collect();
        let epoch = s.acquire(0, None);
        s.on_catch_up_done(0, epoch, seq(0));
        s.take_dirty_checkpoints();
        s.on_live_event(&update(&names[0], 1, DbUpdateKind::Updated), now);
        assert_eq!(s.take_startable(now).len(), 1);
        s.on_live_event(&update(&names[1], 2, DbUpdateKind::Updated), now);
        s.release(0);
        assert!(!s.owns(0));
        assert!(
            s.take_startable(now).is_empty(),
            "no new run in a releasing partition"
        );
        assert!(s.take_drained().is_empty(), "a run is in flight");
        s.on_finished(&names[0], Finished::Handled, now);
        assert_eq!(
            s.take_drained(),
            [(0, Some(seq(1)))],
            "covers the finished run, not the dropped event"
        );
        assert!(s.owned().is_empty());
        assert_eq!(s.active_databases(), 0);
    }

    #[test]
    fn events_of_partitions_not_owned_only_advance_idle_checkpoints() {
        let now = Instant::now();
        let mut s = Scheduler::new(64, 4, HashSet::new());
        let epoch = s.acquire(0, None);
        s.on_catch_up_done(0, epoch, seq(0));
        s.take_dirty_checkpoints();
        let foreign = (0..1000)
            .map(|i| format!("db{i}"))
            .find(|n| s.partition_of(n) != 0)
            .unwrap();
        s.on_live_event(&update(&foreign, 7, DbUpdateKind::Updated), now);
        assert!(s.take_startable(now).is_empty());
        assert_eq!(s.take_dirty_checkpoints(), vec![(0, seq(7))]);
    }

    /// The checkpoint last taken, as the number of its test seq.
    fn checkpoint(s: &mut Scheduler, last: &mut u64) -> u64 {
        for (_, seq) in s.take_dirty_checkpoints() {
            let text = seq.as_json().as_str().expect("a test seq").to_string();
            *last = text.trim_end_matches("-x").parse().expect("a test seq");
        }
        *last
    }

    #[test]
    fn a_database_reported_again_by_its_replay_counts_once_until_a_run_handles_it() {
        let now = Instant::now();
        let mut s = Scheduler::new(1, 4, HashSet::new());
        let epoch = s.acquire(0, Some(seq(5)));
        let mut last = 5;
        s.on_catch_up_event(0, epoch, "d", now);
        s.on_catch_up_event(0, epoch, "d", now);
        assert_eq!(dbs(s.take_startable(now)), ["d"]);
        s.on_catch_up_event(0, epoch, "d", now);
        s.on_catch_up_done(0, epoch, seq(18));
        assert_eq!(s.on_finished("d", Finished::Retry, now), Some(1));
        assert_eq!(checkpoint(&mut s, &mut last), 5, "d is not handled yet");
        s.retry_due("d", s.timer("d"));
        assert_eq!(dbs(s.take_startable(now)), ["d"]);
        assert_eq!(checkpoint(&mut s, &mut last), 5, "its retry is in flight");
        s.on_finished("d", Finished::Handled, now);
        assert_eq!(checkpoint(&mut s, &mut last), 18, "the replay's end");
        assert_eq!(s.active_databases(), 0);
    }

    /// Partition 0 is lost and acquired again (checkpoint 1) while a run of
    /// `d` started in the old ownership is in flight; `d` changes again in
    /// the new one (seq 2), then `x` (seq 3, handled). The old run ends
    /// with `old_run`.
    fn epoch_change_during_a_run(old_run: Finished) {
        let now = Instant::now();
        let mut s = live_scheduler(4);
        let mut last = 0;
        s.on_live_event(&update("d", 1, DbUpdateKind::Updated), now);
        assert_eq!(dbs(s.take_startable(now)), ["d"]);
        s.remove(0);
        let epoch = s.acquire(0, Some(seq(1)));
        s.on_catch_up_done(0, epoch, seq(1));
        assert_eq!(checkpoint(&mut s, &mut last), 1);
        s.on_live_event(&update("d", 2, DbUpdateKind::Updated), now);
        s.on_live_event(&update("x", 3, DbUpdateKind::Updated), now);
        assert_eq!(dbs(s.take_startable(now)), ["x"], "d's run is in flight");
        s.on_finished("x", Finished::Handled, now);
        s.on_finished("d", old_run, now);
        assert_eq!(checkpoint(&mut s, &mut last), 1, "d's seq 2 holds it");
        if old_run == Finished::Retry {
            s.retry_due("d", s.timer("d"));
        }
        assert_eq!(dbs(s.take_startable(now)), ["d"]);
        assert_eq!(checkpoint(&mut s, &mut last), 1, "d's seq 2 holds it");
        s.on_finished("d", Finished::Handled, now);
        assert_eq!(checkpoint(&mut s, &mut last), 3);
        assert_eq!((s.active_databases(), s.watermark_entries()), (0, 0));
    }

    #[test]
    fn a_run_of_an_earlier_ownership_that_fails_leaves_the_new_hold_in_place() {
        epoch_change_during_a_run(Finished::Retry);
    }

    #[test]
    fn a_run_of_an_earlier_ownership_that_succeeds_leaves_the_new_hold_in_place() {
        epoch_change_during_a_run(Finished::Handled);
    }

    /// Sends 1,000 events of `d` from seq `from`, asserting at each that
    /// the watermark keeps at most `entries` entries and the checkpoint
    /// stays at 0 (below d's first event).
    fn flood(s: &mut Scheduler, from: u64, entries: usize) -> u64 {
        let mut last = 0;
        for n in from..from + 1000 {
            s.on_live_event(&update("d", n, DbUpdateKind::Updated), Instant::now());
            assert!(s.take_startable(Instant::now()).is_empty(), "d waits");
            assert!(
                s.watermark_entries() <= entries,
                "{} entries",
                s.watermark_entries()
            );
            assert_eq!(checkpoint(s, &mut last), 0);
        }
        from + 1000
    }

    #[test]
    fn events_during_a_backoff_a_run_now_and_a_hold_keep_constant_state() {
        let now = Instant::now();
        let mut s = live_scheduler(4);
        let mut last = 0;
        s.on_live_event(&update("d", 1, DbUpdateKind::Updated), now);
        s.take_startable(now);
        assert_eq!(s.on_finished("d", Finished::Retry, now), Some(1));
        let next = flood(&mut s, 2, 3);
        assert!(s.run_now("d", now));
        assert_eq!(dbs(s.take_startable(now)), ["d"]);
        let next = flood(&mut s, next, 5);
        assert_eq!(
            s.on_finished("d", Finished::Held, now),
            Some(1),
            "not a failure"
        );
        let next = flood(&mut s, next, 3);
        s.retry_due("d", s.timer("d"));
        assert_eq!(dbs(s.take_startable(now)), ["d"]);
        s.on_finished("d", Finished::Handled, now);
        assert_eq!(checkpoint(&mut s, &mut last), next - 1);
        assert_eq!((s.active_databases(), s.watermark_entries()), (0, 0));
    }

    /// Partition 0 of 2, caught up at 0, with `d` in it backing off after
    /// a failed run of its seq 1, and more of its events pending.
    fn backing_off_with_pending_events() -> (Scheduler, String) {
        let now = Instant::now();
        let mut s = Scheduler::new(2, 4, HashSet::new());
        let d = (0..100)
            .map(|i| format!("db{i}"))
            .find(|n| s.partition_of(n) == 0)
            .expect("a database of partition 0");
        let epoch = s.acquire(0, None);
        s.on_catch_up_done(0, epoch, seq(0));
        s.take_dirty_checkpoints();
        s.on_live_event(&update(&d, 1, DbUpdateKind::Updated), now);
        s.take_startable(now);
        assert_eq!(s.on_finished(&d, Finished::Retry, now), Some(1));
        for n in 2..10 {
            s.on_live_event(&update(&d, n, DbUpdateKind::Updated), now);
        }
        (s, d)
    }

    #[test]
    fn a_partition_released_while_a_database_backs_off_keeps_its_checkpoint_below_it() {
        let (mut s, d) = backing_off_with_pending_events();
        s.release(0);
        assert_eq!(s.take_drained(), [(0, Some(seq(0)))], "d's seq 1 holds it");
        s.retry_due(&d, s.timer(&d));
        assert!(s.take_startable(Instant::now()).is_empty());
        assert_eq!(s.active_databases(), 0);
    }

    #[test]
    fn a_partition_released_during_a_retry_keeps_its_checkpoint_below_it() {
        let now = Instant::now();
        let (mut s, d) = backing_off_with_pending_events();
        s.retry_due(&d, s.timer(&d));
        assert_eq!(dbs(s.take_startable(now)), std::slice::from_ref(&d));
        s.on_live_event(&update(&d, 10, DbUpdateKind::Updated), now);
        s.release(0);
        assert!(s.take_drained().is_empty(), "the retry is in flight");
        assert_eq!(s.on_finished(&d, Finished::Retry, now), None, "not ours");
        assert_eq!(s.take_drained(), [(0, Some(seq(0)))], "d's seq 1 holds it");
        assert_eq!(s.active_databases(), 0);
    }
}
