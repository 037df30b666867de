//! What a new owner of a partition does first: replay the updates since the
//! partition's checkpoint, or, on a first start, list every database of the
//! partition once. Runs beside the live feed; both may report the same
//! database, which the scheduler coalesces.

use std::time::Duration;

use std::sync::Arc;

use tokio::sync::{mpsc, Semaphore};

use crate::backoff::Backoff;
use crate::coordination::partition_of;
use crate::couch::{CouchClient, CouchError, DbUpdateKind, Seq};

/// Page size of the replay and of the database listing.
const PAGE: u64 = 1000;

#[derive(Debug)]
pub enum CatchUpEvent {
    /// A database of the partition to handle once.
    Database {
        partition: u32,
        epoch: u64,
        db: String,
    },
    /// Nothing more to replay: the history is covered up to `end`.
    Done {
        partition: u32,
        epoch: u64,
        end: Seq,
    },
    /// A database the sweep found changed (any partition: the worker keeps
    /// the ones it owns).
    Swept { db: String },
}

/// What to replay: a partition the worker just acquired.
pub struct Job {
    pub client: CouchClient,
    pub partition: u32,
    /// Tags the events with the ownership they belong to.
    pub epoch: u64,
    pub partitions: u32,
    pub checkpoint: Option<Seq>,
    pub start_from_now: bool,
}

/// Replays one partition, once one of the worker's few replay permits is
/// free (a takeover of many partitions must not open a connection per
/// partition). Transient errors are retried (with backoff) from
/// where the replay was, until the task is aborted.
pub async fn replay(job: Job, tx: mpsc::Sender<CatchUpEvent>, permits: Arc<Semaphore>) {
    // Closed only if the worker is gone.
    let Ok(_permit) = permits.acquire_owned().await else {
        return;
    };
    let (has_checkpoint, start_from_now) = (job.checkpoint.is_some(), job.start_from_now);
    let mut replay = Replay {
        client: job.client,
        partition: job.partition,
        epoch: job.epoch,
        partitions: job.partitions,
        tx,
        since: job.checkpoint,
        end: None,
        listed_after: None,
    };
    let what = format!("the replay of partition {}", job.partition);
    // Each attempt resumes where the last one was.
    Backoff::reconnect(Duration::from_secs(30))
        .retry(&what, &mut replay, |replay| {
            Box::pin(async move {
                let result = match (has_checkpoint, start_from_now) {
                    (true, _) => replay.since_checkpoint().await,
                    (false, true) => replay.skip_history().await,
                    (false, false) => replay.every_database().await,
                };
                match result {
                    Ok(()) | Err(Stop::Closed) => Ok(()),
                    Err(Stop::Couch(e)) => Err(e),
                }
            })
        })
        .await
}

/// The seq `_db_updates` is at now.
pub async fn current_seq(client: &CouchClient) -> Result<Seq, CouchError> {
    Ok(client.db_updates(Some(&Seq::now()), None).await?.last_seq)
}

enum Stop {
    /// The worker dropped the partition.
    Closed,
    Couch(CouchError),
}

impl From<CouchError> for Stop {
    fn from(e: CouchError) -> Self {
        Stop::Couch(e)
    }
}

struct Replay {
    client: CouchClient,
    partition: u32,
    epoch: u64,
    partitions: u32,
    tx: mpsc::Sender<CatchUpEvent>,
    /// Progress, kept across retries.
    since: Option<Seq>,
    end: Option<Seq>,
    listed_after: Option<String>,
}

impl Replay {
    async fn send_db(&self, db: String) -> Result<(), Stop> {
        let event = CatchUpEvent::Database {
            partition: self.partition,
            epoch: self.epoch,
            db,
        };
        self.tx.send(event).await.map_err(|_| Stop::Closed)
    }

    async fn done(&self, end: Seq) -> Result<(), Stop> {
        let event = CatchUpEvent::Done {
            partition: self.partition,
            epoch: self.epoch,
            end,
        };
        self.tx.send(event).await.map_err(|_| Stop::Closed)
    }

    /// `_db_updates?since=<checkpoint>`, page by page, until a page is empty.
    /// From an old seq CouchDB returns at most the latest event of each
    /// database, so the replay is bounded by the number of databases.
    async fn since_checkpoint(&mut self) -> Result<(), Stop> {
        loop {
            let page = self
                .client
                .db_updates(self.since.as_ref(), Some(PAGE))
                .await?;
            if page.results.is_empty() {
                return self.done(page.last_seq).await;
            }
            for update in page.results {
                if update.kind != DbUpdateKind::Deleted
                    && partition_of(&update.db_name, self.partitions) == self.partition
                {
                    self.send_db(update.db_name).await?;
                }
            }
            self.since = Some(page.last_seq);
        }
    }

    /// First start with `--since=now`: the history is skipped.
    async fn skip_history(&mut self) -> Result<(), Stop> {
        let now = current_seq(&self.client).await?;
        self.done(now).await
    }

    /// First start: every existing database of the partition, once. The
    /// end seq is taken before listing, so that a database written during
    /// the listing is either listed or seen on the live feed.
    async fn every_database(&mut self) -> Result<(), Stop> {
        if self.end.is_none() {
            self.end = Some(current_seq(&self.client).await?);
        }
        loop {
            let fresh = self
                .client
                .all_dbs_after(self.listed_after.as_deref(), PAGE)
                .await?;
            if fresh.is_empty() {
                let end = self.end.clone().unwrap_or_else(Seq::now);
                return self.done(end).await;
            }
            for db in &fresh {
                if partition_of(db, self.partitions) == self.partition {
                    self.send_db(db.clone()).await?;
                }
            }
            self.listed_after = fresh.last().cloned();
        }
    }
}
