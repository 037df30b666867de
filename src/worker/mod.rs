//! The worker runtime shared by every role: it follows `_db_updates`, holds
//! a share of the partitions through leases, and hands each changed database
//! of its partitions to the role, at least once, one run per database at a
//! time, at most `concurrency` at once.
//!
//! A role implements [`Role`]: given a database name, do the work.

mod catch_up;
pub mod control;
mod health;
mod runtime;
mod scheduler;
mod sweep;
mod watermark;

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::StreamExt;
use tokio::sync::mpsc;

use self::control::{WorkerHandle, Workers};
pub use self::health::Health;
use self::runtime::{Ends, Worker};
use self::scheduler::Scheduler;
use crate::backoff::Backoff;
use crate::config::{RunArgs, Since};
use crate::coordination::coordinator::{Coordinator, Link, Member};
use crate::coordination::store::CouchStore;
use crate::coordination::Settings;
use crate::coordination::{DocIds, Timing};
use crate::couch::GLOBAL_CHANGES;
use crate::couch::{CouchClient, CouchError, DbUpdate, FeedOptions, Seq};
use crate::error::{Error, Result};
use crate::ids::settings_doc_id;
use crate::metrics::{self, WorkerMetrics};

/// Longest wait before running again a database whose run found CouchDB
/// unreachable.
const RECONNECT_CAP: Duration = Duration::from_secs(1);

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The database's changes up to the run's start are handled.
    Done,
    /// Something transient failed; the runtime runs the database again
    /// after `wait`, and its updates stay unhandled until then.
    Retry {
        /// When to run again.
        wait: Wait,
        /// Why, for logs and metrics.
        reason: String,
    },
    /// The database does not exist. The runtime runs it again after the
    /// backoff until it has been missing for `--assume-deleted-after`, then
    /// takes it for deleted ([`Role::forget`]).
    Missing,
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
    /// Not a failure: the role holds the database back (an on_change rule
    /// is paused). Run again after the duration, or sooner when the role
    /// nudges it.
    Held(Duration),
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

    /// The database has stayed missing for `--assume-deleted-after` (after
    /// a deletion event, or runs that found it missing): forget what is kept
    /// about it, so that a database created again under its name starts
    /// over.
    fn forget(&self, db_name: &str) -> impl Future<Output = ()> + Send {
        let _ = db_name;
        async {}
    }

    /// A partition is no longer this worker's (handed over or lost): what
    /// the role keeps about its databases may go stale while another
    /// worker handles them (a database deleted and created again there).
    /// `partitions` is their number (see `coordination::partition_of`).
    fn partition_gone(&self, partition: u32, partitions: u32) -> impl Future<Output = ()> + Send {
        let _ = (partition, partitions);
        async {}
    }

    /// Saves what the role keeps in memory about its databases. Called
    /// before a partition is handed to another worker, which reads it, and
    /// when the worker stops, once its runs are over (or abandoned).
    fn save(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// Settings of the runtime.
#[derive(Clone, Debug)]
pub struct WorkerOptions {
    /// The spiegel database.
    pub db_name: String,
    /// The namespace of Spiegel's documents.
    pub namespace: String,
    /// Unique among the workers of a role; part of a document id.
    pub worker_id: String,
    /// Runs at once, at most.
    pub concurrency: usize,
    /// Of those, runs of history only (a catch-up's), at most.
    pub catch_up_concurrency: usize,
    /// Lease, heartbeat and drain times.
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
    /// How long a database must stay missing to be taken for deleted.
    pub assume_deleted_after: Duration,
    /// Where the worker reports its readiness (the admin server reads it).
    pub health: Arc<Health>,
    /// Where the worker registers for the admin console's questions.
    pub workers: Arc<Workers>,
    /// Where the worker shows its catch-up's progress (its role's status
    /// document).
    pub status: crate::status::StatusBook,
}

impl WorkerOptions {
    /// The runtime settings of a worker of `role`. Each role of a process
    /// gets its own worker id (the role is appended) so that `run` can host
    /// several. It reports to the process's `health` and `workers`.
    pub fn for_role(
        args: &RunArgs,
        role: &str,
        health: Arc<Health>,
        workers: Arc<Workers>,
    ) -> Self {
        let w = &args.worker;
        WorkerOptions {
            db_name: args.connection.db_name.clone(),
            namespace: args.connection.namespace.clone(),
            worker_id: format!("{}-{role}", w.worker_id),
            concurrency: w.concurrency,
            catch_up_concurrency: w.catch_up_concurrency,
            timing: Timing {
                lease: w.lease_time,
                heartbeat: w.lease_time / 3,
                drain: w.shutdown_timeout,
            },
            checkpoint_interval: w.save_seq_after,
            feed_heartbeat: args.connection.feed_heartbeat,
            start_from_now: w.since == Since::Now,
            // Runs that fail for reasons outside the role wait like API
            // calls do, but never longer than five minutes between tries.
            retry: Backoff {
                max_delay: Some(w.backoff.delay.max(Duration::from_secs(300))),
                ..w.backoff.clone()
            },
            shutdown_timeout: w.shutdown_timeout,
            sweep_interval: w.sweep_interval,
            assume_deleted_after: w.assume_deleted_after,
            health,
            workers,
            status: crate::status::StatusBook::default(),
        }
    }
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
        Ok(None) | Err(CouchError::DbNotFound(_)) => Err(Error::not_installed(db_name)),
        Err(e) => Err(e.into()),
    }
}

/// What a role brings to its worker besides itself.
pub struct Extras {
    /// Databases the role wants handled although no update event named them
    /// (they are handled if their partition is ours).
    pub nudges: mpsc::Receiver<String>,
    /// Tasks the role needs while it runs (savers, followers). The worker
    /// owns them: they stop with it, after the role's [`Role::save`] at stop.
    pub tasks: Vec<BoxFuture<'static, ()>>,
}

impl Default for Extras {
    fn default() -> Self {
        // No nudges: the sender is dropped at once.
        let (_, nudges) = mpsc::channel(1);
        Extras {
            nudges,
            tasks: Vec::new(),
        }
    }
}

/// Runs a worker of `role` until `shutdown` resolves, then stops cleanly:
/// runs in flight finish (or are abandoned after the shutdown timeout),
/// checkpoints are saved, leases released, and every task of the worker
/// stopped, the role's `extras` included.
pub async fn run<R: Role>(
    client: CouchClient,
    role: Arc<R>,
    options: WorkerOptions,
    metrics: WorkerMetrics,
    extras: Extras,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let role_name = role.name().to_string();
    let settings = installed_settings(&client, &options.db_name, &options.namespace).await?;
    // Where the live feed starts; every partition replays what came before
    // from its own checkpoint.
    let start = catch_up::current_seq(&client).await?;
    options.health.started(&role_name, &options.timing);
    tracing::info!(
        role = %role_name,
        worker = %options.worker_id,
        partitions = settings.partitions,
        concurrency = options.concurrency,
        "worker started"
    );
    let skip = HashSet::from([options.db_name.clone(), GLOBAL_CHANGES.to_string()]);
    let sched = Scheduler::new(settings.partitions, options.concurrency, skip)
        .with_history_concurrency(options.catch_up_concurrency);
    let (mut worker, inbox, ends) =
        Worker::new(role, options, client, metrics, sched, extras.nudges);
    let handle = WorkerHandle::new(
        role_name.clone(),
        worker.options.worker_id.clone(),
        ends.control.clone(),
    );
    worker.options.workers.register(handle);
    Services { start, ends }.spawn(&mut worker);
    for task in extras.tasks {
        worker.tasks.spawn(task);
    }
    worker.run(inbox, shutdown).await;
    Ok(())
}

/// The worker's services, each on a task of its own: the `_db_updates`
/// feed, the coordinator and the sweep, with the channel ends they use.
struct Services {
    /// Where the feed starts.
    start: Seq,
    /// The worker's channel ends they hold.
    ends: Ends,
}

impl Services {
    fn spawn<R: Role>(self, worker: &mut Worker<R>) {
        let role = worker.role.name().to_string();
        let feed_options = FeedOptions {
            heartbeat: worker.options.feed_heartbeat,
            ..Default::default()
        };
        worker.tasks.spawn(follow_updates(
            worker.options.health.clone(),
            worker.client.clone(),
            self.start,
            feed_options,
            self.ends.live,
            worker.metrics.clone(),
            role.clone(),
        ));
        let options = &worker.options;
        let member = Member {
            namespace: options.namespace.clone(),
            role: role.clone(),
            worker_id: options.worker_id.clone(),
            partitions: worker.sched.partitions(),
            timing: options.timing.clone(),
        };
        let store = CouchStore {
            client: worker.client.clone(),
            db: options.db_name.clone(),
            ids: DocIds::new(&options.namespace, &role),
        };
        let link = Link {
            to_worker: self.ends.assignments,
            beats: self.ends.beats,
        };
        let coordinator = Coordinator::new(store, member, worker.metrics.clone(), link);
        worker.tasks.spawn(coordinator.run(self.ends.requests));
        if let Some(interval) = worker.options.sweep_interval {
            let done = worker.metrics.sweeps.get_or_create(&worker.label).clone();
            let sweep = sweep::run(
                worker.client.clone(),
                interval,
                worker.catch_up.clone(),
                done,
            );
            worker.tasks.spawn(sweep);
        }
    }
}

/// Follows `_db_updates` from `start` for as long as the worker runs. The
/// feed reconnects by itself; an error it cannot get past (credentials
/// refused, `_global_changes` missing) is logged and retried slowly, since
/// an operator can fix it without restarting Spiegel. Should the task end
/// otherwise (a panic included), the role is reported unready.
async fn follow_updates(
    health: Arc<Health>,
    client: CouchClient,
    start: Seq,
    options: FeedOptions,
    tx: mpsc::Sender<DbUpdate>,
    metrics: WorkerMetrics,
    role: String,
) {
    let watch = health.feed_task(&role);
    let label = metrics::role(&role);
    let options = FeedOptions {
        retry_errors: Some(Duration::from_secs(60)),
        ..options
    };
    let reconnects = options.reconnects.clone();
    let mut reported = 0;
    let mut feed = client.db_updates_feed(Some(start), options);
    while let Some(item) = feed.next().await {
        let now = reconnects.load(std::sync::atomic::Ordering::Relaxed);
        if now > reported {
            metrics
                .feed_reconnects
                .get_or_create(&label)
                .inc_by(now - reported);
            reported = now;
        }
        match item {
            Ok(update) => {
                health.feed(&role, true);
                if tx.send(update).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                health.feed(&role, false);
                tracing::error!(role = %role, error = %e, "cannot follow _db_updates");
            }
        }
    }
    tracing::error!(role = %role, "the _db_updates feed ended");
    watch.ended();
}
