//! The worker runtime shared by every role: it follows `_db_updates`, holds
//! a share of the partitions through leases, and hands each changed database
//! of its partitions to the role, at least once, one run per database at a
//! time, at most `concurrency` at once.
//!
//! A role implements [`Role`]: given a database name, do the work.

mod catch_up;
mod scheduler;
mod sweep;
mod watermark;

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::task::{AbortHandle, JoinSet};

use self::catch_up::CatchUpEvent;
use self::scheduler::{Finished, Scheduler};
use crate::admin::Health;
use crate::backoff::Backoff;
use crate::coordination::coordinator::{Assignment, Coordinator, Request, Timing};
use crate::coordination::{settings_doc_id, Settings};
use crate::couch::{CouchClient, CouchError, DbUpdate, FeedOptions, Seq};
use crate::error::{Error, Result};
use crate::install::GLOBAL_CHANGES;
use crate::metrics::{self, WorkerMetrics};

/// Longest wait before running again a database whose run found CouchDB
/// unreachable.
const RECONNECT_CAP: Duration = Duration::from_secs(1);

/// Nudges kept for partitions not yet acquired, at most.
const PARKED_NUDGES: usize = 100_000;

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The database's changes up to the run's start are handled.
    Done,
    /// Something transient failed; the runtime runs the database again
    /// after `wait`, and its updates stay unhandled until then.
    Retry { wait: Wait, reason: String },
    /// The database does not exist (any more): nothing to do.
    Gone,
}

/// When a run that failed runs again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// After the runtime's backoff (`--backoff-*`, at most five minutes).
    Backoff,
    /// After a wait of the role's own, such as an on_change rule's backoff.
    For(Duration),
    /// CouchDB did not answer: as soon as it may again, within a second.
    Reconnect,
}

impl Outcome {
    /// Run again after the runtime's backoff.
    pub fn retry(reason: impl Into<String>) -> Self {
        Outcome::Retry {
            wait: Wait::Backoff,
            reason: reason.into(),
        }
    }

    /// A CouchDB request failed: run again as soon as CouchDB answers if it
    /// did not, after the backoff otherwise.
    pub fn couch_failed(context: &str, error: &CouchError) -> Self {
        Outcome::Retry {
            wait: Wait::for_couch(error),
            reason: format!("{context}: {error}"),
        }
    }
}

impl Wait {
    /// [`Wait::Reconnect`] when CouchDB did not answer, else the backoff.
    pub fn for_couch(error: &CouchError) -> Self {
        match error {
            CouchError::Unreachable(_) => Wait::Reconnect,
            _ => Wait::Backoff,
        }
    }
}

/// What a role does with a database that changed.
pub trait Role: Send + Sync + 'static {
    /// The role's name, used in document ids, logs and metrics.
    fn name(&self) -> &str;

    /// Handles the database. Called at most once at a time per database.
    fn handle(&self, db_name: &str) -> impl Future<Output = Outcome> + Send;

    /// The database was deleted. No run is started for a deletion.
    fn deleted(&self, db_name: &str) -> impl Future<Output = ()> + Send {
        let _ = db_name;
        async {}
    }

    /// The worker stops: its runs are over (or abandoned). A role saves
    /// what it keeps in memory here.
    fn stop(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// Settings of the runtime.
#[derive(Clone, Debug)]
pub struct WorkerOptions {
    /// The spiegel database.
    pub db_name: String,
    pub namespace: String,
    /// Unique among the workers of a role; part of a document id.
    pub worker_id: String,
    pub concurrency: usize,
    pub timing: Timing,
    /// Longest time between checkpoint saves.
    pub checkpoint_interval: Duration,
    /// Heartbeat asked of CouchDB on the `_db_updates` feed.
    pub feed_heartbeat: Duration,
    /// On a partition's first start (no checkpoint), skip its history
    /// instead of handling every existing database once.
    pub start_from_now: bool,
    /// Waits between runs of a database that asked to be retried.
    pub retry: Backoff,
    /// How long a stop waits for runs in flight.
    pub shutdown_timeout: Duration,
    /// Interval of the sweep for updates `_db_updates` missed; `None`: off.
    pub sweep_interval: Option<Duration>,
    /// Where the worker reports its readiness (the admin server reads it).
    pub health: Arc<Health>,
}

/// A default worker id: host name, process id and a random suffix.
pub fn default_worker_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .unwrap_or_else(|| "spiegel".into());
    let host: String = host
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!(
        "{host}-{}-{:04x}",
        std::process::id(),
        rand::random::<u16>()
    )
}

/// Internal messages to the worker's loop.
enum Event {
    Finished {
        db: String,
        outcome: Outcome,
        took: Duration,
    },
    RetryDue(String),
}

/// The installation's settings, or [`Error::NotInstalled`] when Spiegel is
/// not installed in `db_name`.
pub(crate) async fn installed_settings(
    client: &CouchClient,
    db_name: &str,
    namespace: &str,
) -> Result<Settings> {
    match client
        .get_doc_opt(db_name, &settings_doc_id(namespace))
        .await
    {
        Ok(Some(settings)) => Ok(settings),
        Ok(None) | Err(CouchError::DbNotFound(_)) => Err(Error::NotInstalled(format!(
            "Spiegel is not installed in database {db_name:?}: run `spiegel install` first"
        ))),
        Err(e) => Err(e.into()),
    }
}

/// Runs a worker of `role` until `shutdown` resolves, then stops cleanly:
/// `nudges` brings databases the role wants handled although no update
/// event named them (they are handled if their partition is ours).
/// runs in flight finish (or are abandoned after the shutdown timeout),
/// checkpoints are saved and leases released.
pub async fn run<R: Role>(
    client: CouchClient,
    role: Arc<R>,
    options: WorkerOptions,
    metrics: WorkerMetrics,
    mut nudges: mpsc::Receiver<String>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let role_name = role.name().to_string();
    let label = metrics::role(&role_name);
    let settings = installed_settings(&client, &options.db_name, &options.namespace).await?;
    // Where the live feed starts; every partition replays what came before
    // from its own checkpoint.
    let start = catch_up::current_seq(&client).await?;
    options.health.started(&role_name, options.timing.lease);
    tracing::info!(
        role = %role_name,
        worker = %options.worker_id,
        partitions = settings.partitions,
        concurrency = options.concurrency,
        "worker started"
    );

    let (live_tx, mut live_rx) = mpsc::channel::<DbUpdate>(1024);
    let feed_options = FeedOptions {
        heartbeat: options.feed_heartbeat,
        ..Default::default()
    };
    // Every task of the worker lives in these sets: dropping the worker
    // (or aborting it, as a crash would) stops them all.
    let mut tasks = JoinSet::new();
    let mut runs = JoinSet::new();
    tasks.spawn(follow_updates(
        options.health.clone(),
        client.clone(),
        start,
        feed_options,
        live_tx,
        metrics.clone(),
        role_name.clone(),
    ));

    let (assign_tx, mut assign_rx) = mpsc::unbounded_channel();
    let (beat_tx, mut beat_rx) = watch::channel(None);
    let (request_tx, request_rx) = mpsc::unbounded_channel();
    let coordinator = Coordinator::new(
        client.clone(),
        &options.db_name,
        &options.namespace,
        &role_name,
        &options.worker_id,
        settings.partitions,
        options.timing.clone(),
        metrics.clone(),
        assign_tx,
        beat_tx,
    );
    tasks.spawn(coordinator.run(request_rx));
    let (catch_up_tx, mut catch_up_rx) = mpsc::channel::<CatchUpEvent>(256);
    if let Some(interval) = options.sweep_interval {
        tasks.spawn(sweep::run(client.clone(), interval, catch_up_tx.clone()));
    }

    let skip = HashSet::from([options.db_name.clone(), GLOBAL_CHANGES.to_string()]);
    let mut sched = Scheduler::new(settings.partitions, options.concurrency, skip);
    let (event_tx, mut event_rx) = mpsc::unbounded_channel::<Event>();
    // Replay tasks by partition, with the epoch of the ownership they serve.
    let mut catch_ups: HashMap<u32, (u64, AbortHandle)> = HashMap::new();
    // Nudges for partitions not (yet) ours, with when they came.
    let mut parked: VecDeque<(String, Instant)> = VecDeque::new();
    // Partitions being released, with when the release began.
    let mut draining: HashMap<u32, Instant> = HashMap::new();
    // Replays at once: each holds a connection and reads a whole feed.
    let replays = Arc::new(Semaphore::new(2));
    let mut flush = tokio::time::interval(options.checkpoint_interval);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    // Catch-up events are read only while few runs are queued: a first
    // start over 100,000 databases is paced by the runs, not by memory.
    let queue_limit = options.concurrency * 4;

    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(update) = live_rx.recv() => {
                metrics.updates_received.get_or_create(&label).inc();
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                metrics.last_event.get_or_create(&label).set(now.as_secs_f64());
                tracing::trace!(role = %role_name, db = %update.db_name, kind = ?update.kind, seq = %update.seq, "update");
                if sched.on_live_event(&update, Instant::now()) {
                    let role = role.clone();
                    tasks.spawn(async move { role.deleted(&update.db_name).await });
                }
            }
            Some(assignment) = assign_rx.recv() => match assignment {
                Assignment::Acquired { partition, checkpoint } => {
                    let epoch = sched.acquire(partition, checkpoint.clone());
                    // Nudges that came before the partition was ours (a
                    // worker that just started) still count for a while.
                    let fresh = options.timing.lease * 2;
                    parked.retain(|(db, at)| {
                        at.elapsed() < fresh && !(sched.partition_of(db) == partition && sched.on_sweep(db, Instant::now()))
                    });
                    let job = catch_up::Job {
                        client: client.clone(),
                        partition,
                        epoch,
                        partitions: settings.partitions,
                        checkpoint,
                        start_from_now: options.start_from_now,
                    };
                    let task = tasks.spawn(catch_up::replay(job, catch_up_tx.clone(), replays.clone()));
                    if let Some((_, old)) = catch_ups.insert(partition, (epoch, task)) {
                        old.abort();
                    }
                    draining.remove(&partition);
                }
                Assignment::Release { partition } => {
                    sched.release(partition);
                    if let Some((_, task)) = catch_ups.remove(&partition) {
                        task.abort();
                    }
                    draining.insert(partition, Instant::now());
                }
                Assignment::Lost { partition } => {
                    sched.remove(partition);
                    if let Some((_, task)) = catch_ups.remove(&partition) {
                        task.abort();
                    }
                    draining.remove(&partition);
                }
            },
            Some(event) = catch_up_rx.recv(), if sched.queued() < queue_limit => match event {
                CatchUpEvent::Database { partition, epoch, db } => sched.on_catch_up_event(partition, epoch, &db, Instant::now()),
                CatchUpEvent::Done { partition, epoch, end } => {
                    tracing::debug!(role = %role_name, partition, "partition caught up");
                    sched.on_catch_up_done(partition, epoch, end);
                    if catch_ups.get(&partition).is_some_and(|(e, _)| *e == epoch) {
                        catch_ups.remove(&partition);
                    }
                }
                CatchUpEvent::Swept { db } => {
                    if sched.on_sweep(&db, Instant::now()) {
                        metrics.sweep_found.get_or_create(&label).inc();
                        tracing::debug!(role = %role_name, db = %db, "sweep: changed since the previous sweep");
                    }
                }
            },
            Some(event) = event_rx.recv() => match event {
                Event::Finished { db, outcome, took } => {
                    metrics.run_duration.get_or_create(&label).observe(took.as_secs_f64());
                    let finished = finished(&outcome);
                    match &outcome {
                        Outcome::Retry { reason, .. } => {
                            metrics.runs_failed.get_or_create(&label).inc();
                            tracing::warn!(role = %role_name, db = %db, %reason, "run failed; will retry");
                        }
                        _ => {
                            metrics.runs_succeeded.get_or_create(&label).inc();
                        }
                    }
                    if let Some(retry) = sched.on_finished(&db, finished, Instant::now()) {
                        let wait = match outcome {
                            Outcome::Retry { wait: Wait::For(wait), .. } => wait,
                            Outcome::Retry { wait: Wait::Reconnect, .. } => Backoff::reconnect(RECONNECT_CAP).wait(retry),
                            _ => options.retry.wait(retry),
                        };
                        let tx = event_tx.clone();
                        tasks.spawn(async move {
                            tokio::time::sleep(wait).await;
                            let _ = tx.send(Event::RetryDue(db));
                        });
                    }
                }
                Event::RetryDue(db) => {
                    metrics.runs_retried.get_or_create(&label).inc();
                    sched.retry_due(&db);
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            Some(_) = runs.join_next(), if !runs.is_empty() => {}
            Ok(()) = beat_rx.changed() => {
                if let Some(at) = *beat_rx.borrow() {
                    options.health.heartbeat(&role_name, at);
                }
            }
            // Databases the role asks to handle (a document added or edited).
            Some(db) = nudges.recv(), if sched.queued() < queue_limit => {
                if !sched.on_sweep(&db, Instant::now()) && parked.len() < PARKED_NUDGES {
                    parked.push_back((db, Instant::now()));
                }
            }
            _ = flush.tick() => save_checkpoints(&mut sched, &request_tx),
        }
        draining.retain(|&partition, since| {
            // A run that never ends must not keep the partition from its
            // next owner: after the shutdown timeout it is released anyway
            // (the run's updates are not marked handled, so nothing is lost).
            if !sched.drained(partition) && since.elapsed() < options.shutdown_timeout {
                return true;
            }
            let checkpoint = sched.remove(partition);
            let _ = request_tx.send(Request::Released {
                partition,
                checkpoint,
            });
            false
        });
        if sched.take_urgent() {
            save_checkpoints(&mut sched, &request_tx);
        }
        // Fencing: once our last heartbeat is older than the lease time
        // minus a heartbeat, others may take our partitions; start nothing.
        let fenced = beat_rx
            .borrow()
            .is_none_or(|t| t.elapsed() + options.timing.heartbeat >= options.timing.lease);
        let startable = if fenced {
            Vec::new()
        } else {
            sched.take_startable(Instant::now())
        };
        for start in startable {
            metrics.runs_started.get_or_create(&label).inc();
            tracing::trace!(role = %role_name, db = %start.db, "run");
            metrics
                .update_to_run
                .get_or_create(&label)
                .observe(start.waited.as_secs_f64());
            spawn_run(&mut runs, role.clone(), start.db, event_tx.clone());
        }
    }

    // Stop: no new runs; let those in flight finish, up to the timeout.
    tracing::info!(role = %role_name, in_flight = sched.in_flight(), "stopping");
    sched.stop();
    for (_, task) in catch_ups.values() {
        task.abort();
    }
    let deadline = tokio::time::Instant::now() + options.shutdown_timeout;
    while sched.in_flight() > 0 {
        match tokio::time::timeout_at(deadline, event_rx.recv()).await {
            Ok(Some(Event::Finished { db, outcome, .. })) => {
                sched.on_finished(&db, finished(&outcome), Instant::now());
            }
            Ok(Some(Event::RetryDue(_))) => {}
            Ok(None) | Err(_) => {
                tracing::warn!(role = %role_name, abandoned = sched.in_flight(), "shutdown timeout: abandoning runs in flight");
                break;
            }
        }
    }
    role.stop().await;
    let checkpoints = sched
        .owned()
        .into_iter()
        .map(|p| (p, sched.remove(p)))
        .collect();
    let (done_tx, done_rx) = oneshot::channel();
    if request_tx
        .send(Request::Leave {
            checkpoints,
            done: done_tx,
        })
        .is_ok()
        // The coordinator may be in the middle of a heartbeat (bounded by two
        // heartbeats) and then needs two bounded steps to leave.
        && tokio::time::timeout(options.timing.heartbeat * 7, done_rx)
            .await
            .is_err()
    {
        tracing::warn!(role = %role_name, "could not release the leases in time; they expire after the lease time");
    }
    tasks.abort_all();
    runs.abort_all();
    tracing::info!(role = %role_name, "stopped");
    Ok(())
}

/// What an outcome means to the scheduler.
fn finished(outcome: &Outcome) -> Finished {
    match outcome {
        Outcome::Retry { .. } => Finished::Retry,
        Outcome::Done | Outcome::Gone => Finished::Handled,
    }
}

/// Asks the coordinator to save the checkpoints that moved, if any.
fn save_checkpoints(sched: &mut Scheduler, requests: &mpsc::UnboundedSender<Request>) {
    let dirty = sched.take_dirty_checkpoints();
    if !dirty.is_empty() {
        let _ = requests.send(Request::Checkpoints(dirty));
    }
}

/// Runs the role on a database in its own task; a panic counts as a failure
/// to retry, never as a lost database.
fn spawn_run<R: Role>(
    runs: &mut JoinSet<()>,
    role: Arc<R>,
    db: String,
    events: mpsc::UnboundedSender<Event>,
) {
    runs.spawn(async move {
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

/// Follows `_db_updates` from `start` for as long as the worker runs. The
/// feed reconnects by itself; an error it cannot get past (credentials
/// refused, `_global_changes` missing) is logged and retried slowly, since
/// an operator can fix it without restarting Spiegel.
async fn follow_updates(
    health: Arc<Health>,
    client: CouchClient,
    start: Seq,
    options: FeedOptions,
    tx: mpsc::Sender<DbUpdate>,
    metrics: WorkerMetrics,
    role: String,
) {
    let label = metrics::role(&role);
    let mut since = start;
    let backoff = Backoff::reconnect(Duration::from_secs(60));
    let mut failures = 0;
    let mut reported = 0;
    loop {
        let mut feed = client.db_updates_feed(Some(since.clone()), options.clone());
        while let Some(item) = feed.next().await {
            let reconnects = options
                .reconnects
                .load(std::sync::atomic::Ordering::Relaxed);
            if reconnects > reported {
                metrics
                    .feed_reconnects
                    .get_or_create(&label)
                    .inc_by(reconnects - reported);
                reported = reconnects;
            }
            match item {
                Ok(update) => {
                    failures = 0;
                    health.feed(&role, true);
                    since = update.seq.clone();
                    if tx.send(update).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    failures += 1;
                    health.feed(&role, false);
                    let wait = backoff.wait(failures);
                    tracing::error!(role = %role, error = %e, retry_in = ?wait, "cannot follow _db_updates");
                    tokio::time::sleep(wait).await;
                    break;
                }
            }
        }
    }
}
