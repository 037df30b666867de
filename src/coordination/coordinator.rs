//! The coordinator of one worker: writes its heartbeat, watches the other
//! workers, claims and releases partition leases, and saves checkpoints into
//! them. It does all of the worker's coordination I/O, on its own task, so
//! that a slow CouchDB never stalls the scheduling of runs.
//!
//! Lease state machine (per partition, as this worker sees it):
//! `free/expired --claim (CAS)--> owned --release (drained, CAS)--> free`,
//! `owned --another owner seen, or own heartbeat failing for a lease time--> lost`.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};

use super::lease::{plan, DocIds, LeaseDoc, Liveness, WorkerDoc};
use crate::couch::{AllDocsQuery, BulkResult, CouchClient, CouchError, Seq};
use crate::metrics::{self, WorkerMetrics};

/// Timing of the coordination protocol.
#[derive(Clone, Debug)]
pub struct Timing {
    /// Time without a heartbeat after which a worker is taken for dead.
    pub lease: Duration,
    /// Interval of heartbeats and lease checks; a third of the lease time
    /// by default, so two can be lost without losing the lease.
    pub heartbeat: Duration,
}

/// What the coordinator tells the worker.
#[derive(Debug)]
pub enum Assignment {
    /// The partition is ours; replay from `checkpoint` (none: first start).
    Acquired {
        partition: u32,
        checkpoint: Option<Seq>,
    },
    /// Give the partition up: finish its runs, then send [`Request::Released`].
    Release { partition: u32 },
    /// The partition is no longer ours: drop it now, save nothing.
    Lost { partition: u32 },
}

/// What the worker asks of the coordinator.
#[derive(Debug)]
pub enum Request {
    /// Save these checkpoints in the leases.
    Checkpoints(Vec<(u32, Seq)>),
    /// The partition is drained; free its lease with its last checkpoint.
    Released {
        partition: u32,
        checkpoint: Option<Seq>,
    },
    /// Shutdown: save the checkpoints, free every lease, remove the
    /// membership document, then answer.
    Leave {
        checkpoints: Vec<(u32, Option<Seq>)>,
        done: oneshot::Sender<()>,
    },
}

pub struct Coordinator {
    client: CouchClient,
    db: String,
    ids: DocIds,
    role: String,
    me: String,
    partitions: u32,
    timing: Timing,
    member: WorkerDoc,
    liveness: Liveness,
    leases: HashMap<u32, LeaseDoc>,
    owned: BTreeSet<u32>,
    releasing: BTreeSet<u32>,
    last_beat: Option<Instant>,
    /// Publishes `last_beat`: the worker starts no run once it is older
    /// than the lease time minus a heartbeat (fencing).
    beats: watch::Sender<Option<Instant>>,
    metrics: WorkerMetrics,
    to_worker: mpsc::UnboundedSender<Assignment>,
}

/// Which worker a coordinator speaks for, and where.
#[derive(Clone, Debug)]
pub struct Member {
    /// The spiegel database.
    pub db: String,
    pub namespace: String,
    pub role: String,
    pub worker_id: String,
    /// The installation's partition count.
    pub partitions: u32,
    pub timing: Timing,
}

impl Coordinator {
    pub fn new(
        client: CouchClient,
        member: Member,
        metrics: WorkerMetrics,
        to_worker: mpsc::UnboundedSender<Assignment>,
        beats: watch::Sender<Option<Instant>>,
    ) -> Self {
        let Member {
            db,
            namespace,
            role,
            worker_id: me,
            partitions,
            timing,
        } = member;
        let (db, namespace, role, me) =
            (db.as_str(), namespace.as_str(), role.as_str(), me.as_str());
        let ids = DocIds::new(namespace, role);
        let member = WorkerDoc {
            id: ids.worker(me),
            rev: None,
            kind: WorkerDoc::KIND.into(),
            role: role.into(),
            worker_id: me.into(),
            beats: 0,
            lease_ms: timing.lease.as_millis() as u64,
            conflicts: Vec::new(),
        };
        Coordinator {
            client,
            db: db.into(),
            ids,
            role: role.into(),
            me: me.into(),
            partitions,
            liveness: Liveness::new(timing.lease),
            timing,
            member,
            leases: HashMap::new(),
            owned: BTreeSet::new(),
            releasing: BTreeSet::new(),
            last_beat: None,
            beats,
            metrics,
            to_worker,
        }
    }

    /// Runs until the worker leaves (or drops its request channel).
    pub async fn run(mut self, mut requests: mpsc::UnboundedReceiver<Request>) {
        let mut tick = tokio::time::interval(self.timing.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Every step is bounded in time so that a hung request never
            // delays the next heartbeat, and with it the fencing check, for
            // long.
            let limit = self.timing.heartbeat * 2;
            tokio::select! {
                _ = tick.tick() => self.beat().await,
                request = requests.recv() => match request {
                    Some(Request::Checkpoints(list)) => {
                        bounded(limit, "saving checkpoints", self.save_checkpoints(list)).await;
                    }
                    Some(Request::Released { partition, checkpoint }) => {
                        bounded(limit, "releasing a lease", self.free(&[(partition, checkpoint)])).await;
                    }
                    Some(Request::Leave { checkpoints, done }) => {
                        bounded(limit, "releasing leases", self.free(&checkpoints)).await;
                        bounded(limit, "removing the membership", self.remove_membership()).await;
                        let _ = done.send(());
                        return;
                    }
                    None => return,
                },
            }
        }
    }

    fn label(&self) -> metrics::RoleLabel {
        metrics::role(&self.role)
    }

    fn tell(&self, assignment: Assignment) {
        // The worker outlives its coordinator; a send can only fail during
        // shutdown, when nothing needs the message any more.
        let _ = self.to_worker.send(assignment);
    }

    /// One heartbeat: prove we are alive, see who else is, and rebalance.
    async fn beat(&mut self) {
        // The time the write was sent: an observer can only see it later,
        // so leases computed from it are never longer than others think.
        let sent = Instant::now();
        let beat = tokio::time::timeout(self.timing.heartbeat, self.write_membership()).await;
        let alive = match beat {
            Ok(Ok(())) => {
                self.last_beat = Some(sent);
                let _ = self.beats.send(Some(sent));
                true
            }
            Ok(Err(e)) => {
                tracing::warn!(role = %self.role, error = %e, "heartbeat failed");
                false
            }
            Err(_) => {
                tracing::warn!(role = %self.role, "heartbeat timed out");
                false
            }
        };
        // Fencing: others may take our partitions once our heartbeat has been
        // missing for a lease time; stop working on them a heartbeat before.
        let fenced = self
            .last_beat
            .is_none_or(|t| t.elapsed() + self.timing.heartbeat >= self.timing.lease);
        if fenced {
            if !self.owned.is_empty() {
                tracing::warn!(role = %self.role, "heartbeats failing for too long: dropping every partition");
                for partition in std::mem::take(&mut self.owned) {
                    self.tell(Assignment::Lost { partition });
                }
                self.releasing.clear();
                self.update_gauges(0);
            }
            return;
        }
        if !alive {
            // Without a fresh heartbeat our standing is unknown: claim nothing.
            return;
        }
        match tokio::time::timeout(self.timing.heartbeat, self.rebalance()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(role = %self.role, error = %e, "cannot read the leases; retrying at the next heartbeat")
            }
            Err(_) => {
                tracing::warn!(role = %self.role, "reading the leases timed out; retrying at the next heartbeat")
            }
        }
    }

    async fn write_membership(&mut self) -> Result<(), CouchError> {
        self.member.beats += 1;
        match self
            .client
            .put_doc(&self.db, &self.member.id, &self.member)
            .await
        {
            Ok(written) => {
                self.member.rev = Some(written.rev);
                Ok(())
            }
            Err(CouchError::Conflict) => {
                // Someone removed or touched our document (a cleanup that took
                // us for dead): take the current revision, write next time.
                let current: Option<WorkerDoc> =
                    self.client.get_doc_opt(&self.db, &self.member.id).await?;
                self.member.rev = current.and_then(|d| d.rev);
                Err(CouchError::Conflict)
            }
            Err(e) => Err(e),
        }
    }

    async fn rebalance(&mut self) -> Result<(), CouchError> {
        let members: Vec<WorkerDoc> = self.read_range(self.ids.worker_range()).await?;
        // Observed now, after the read: a revision cannot be older than this
        // from our point of view.
        let now = Instant::now();
        let live = self.liveness.observe(
            now,
            members
                .iter()
                .filter_map(|m| Some((m.worker_id.as_str(), m.rev.as_deref()?))),
        );
        self.remove_dead_members(now, &members).await;

        let mut table: Vec<LeaseDoc> = (0..self.partitions)
            .map(|p| LeaseDoc::new(&self.ids, &self.role, p))
            .collect();
        for lease in self.read_range::<LeaseDoc>(self.ids.lease_range()).await? {
            if let Some(slot) = table.get_mut(lease.partition as usize) {
                *slot = lease;
            }
        }
        for lease in &table {
            self.leases.insert(lease.partition, lease.clone());
        }

        // Leases someone else now holds are lost; ours from an earlier
        // life under the same id are picked up again.
        for lease in &table {
            let ours = lease.owner.as_deref() == Some(self.me.as_str());
            if self.owned.contains(&lease.partition) && !ours {
                tracing::warn!(role = %self.role, partition = lease.partition, owner = ?lease.owner, "lease taken by another worker");
                self.owned.remove(&lease.partition);
                self.releasing.remove(&lease.partition);
                self.tell(Assignment::Lost {
                    partition: lease.partition,
                });
            } else if ours && !self.owned.contains(&lease.partition) {
                self.owned.insert(lease.partition);
                self.tell(Assignment::Acquired {
                    partition: lease.partition,
                    checkpoint: lease.checkpoint.clone(),
                });
            }
        }

        let owners: Vec<(u32, Option<String>)> = table
            .iter()
            .map(|l| (l.partition, l.owner.clone()))
            .collect();
        let plan = plan(&self.me, &live, &owners);
        for partition in plan.release {
            if self.releasing.insert(partition) {
                self.tell(Assignment::Release { partition });
            }
        }
        for partition in plan.claim {
            self.claim(partition).await;
        }
        self.update_gauges(live.len().max(1));
        Ok(())
    }

    fn update_gauges(&self, live: usize) {
        let label = self.label();
        self.metrics
            .owned_partitions
            .get_or_create(&label)
            .set(self.owned.len() as i64);
        if live > 0 {
            self.metrics
                .live_workers
                .get_or_create(&label)
                .set(live as i64);
        }
    }

    async fn claim(&mut self, partition: u32) {
        let Some(mut lease) = self.leases.get(&partition).cloned() else {
            return;
        };
        let previous = lease.owner.replace(self.me.clone());
        match self.client.put_doc(&self.db, &lease.id, &lease).await {
            Ok(written) => {
                lease.rev = Some(written.rev);
                tracing::info!(role = %self.role, partition, previous_owner = ?previous, "acquired partition");
                self.owned.insert(partition);
                self.tell(Assignment::Acquired {
                    partition,
                    checkpoint: lease.checkpoint.clone(),
                });
                self.leases.insert(partition, lease);
            }
            Err(CouchError::Conflict) => {
                tracing::debug!(role = %self.role, partition, "another worker claimed the partition first");
            }
            Err(e) => {
                tracing::warn!(role = %self.role, partition, error = %e, "cannot claim partition")
            }
        }
    }

    /// Writes checkpoints of owned partitions in one `_bulk_docs`.
    async fn save_checkpoints(&mut self, list: Vec<(u32, Seq)>) {
        let updates = list
            .into_iter()
            .filter(|(p, _)| self.owned.contains(p))
            .map(|(p, seq)| (p, Some(seq), true))
            .collect();
        self.write_leases(updates).await;
    }

    /// Frees leases, saving their last checkpoint.
    async fn free(&mut self, list: &[(u32, Option<Seq>)]) {
        let updates = list
            .iter()
            .filter(|(p, _)| self.owned.contains(p))
            .map(|(p, seq)| (*p, seq.clone(), false))
            .collect();
        self.write_leases(updates).await;
        for (partition, _) in list {
            if self.owned.remove(partition) {
                tracing::info!(role = %self.role, partition, "released partition");
            }
            self.releasing.remove(partition);
        }
        self.update_gauges(0);
    }

    /// Writes `(partition, checkpoint, keep ownership)` into the leases we
    /// own. A conflict means the lease changed under us: re-read it and, if
    /// it is still ours, write again once; otherwise it is lost.
    async fn write_leases(&mut self, updates: Vec<(u32, Option<Seq>, bool)>) {
        let mut attempt = 0;
        let mut pending = updates;
        while !pending.is_empty() && attempt < 2 {
            attempt += 1;
            let docs: Vec<LeaseDoc> = pending
                .iter()
                .filter_map(|(p, seq, keep)| {
                    let mut lease = self.leases.get(p)?.clone();
                    if let Some(seq) = seq {
                        lease.checkpoint = Some(seq.clone());
                        lease.checkpoint_at = Some(super::timestamp());
                    }
                    lease.owner = keep.then(|| self.me.clone());
                    Some(lease)
                })
                .collect();
            if docs.is_empty() {
                return;
            }
            let results = match self.client.bulk_docs(&self.db, &docs, true).await {
                Ok(results) => results,
                Err(e) => {
                    tracing::warn!(role = %self.role, error = %e, "cannot save checkpoints; they will be saved later");
                    return;
                }
            };
            self.metrics
                .checkpoint_writes
                .get_or_create(&self.label())
                .inc_by(docs.len() as u64);
            let mut retry = Vec::new();
            for ((doc, result), update) in docs.into_iter().zip(results).zip(pending) {
                match result {
                    BulkResult::Written { rev, .. } => {
                        let mut doc = doc;
                        doc.rev = Some(rev);
                        self.leases.insert(doc.partition, doc);
                    }
                    failed if failed.is_conflict() => {
                        match self.client.get_doc_opt::<LeaseDoc>(&self.db, &doc.id).await {
                            Ok(Some(current))
                                if current.owner.as_deref() == Some(self.me.as_str()) =>
                            {
                                self.leases.insert(current.partition, current);
                                retry.push(update);
                            }
                            Ok(current) => {
                                let partition = doc.partition;
                                tracing::warn!(role = %self.role, partition, owner = ?current.and_then(|c| c.owner), "lease taken by another worker");
                                if self.owned.remove(&partition) {
                                    self.tell(Assignment::Lost { partition });
                                }
                            }
                            Err(e) => {
                                tracing::warn!(role = %self.role, error = %e, "cannot re-read a lease")
                            }
                        }
                    }
                    failed => {
                        tracing::warn!(role = %self.role, partition = doc.partition, result = ?failed, "lease write refused")
                    }
                }
            }
            pending = retry;
        }
    }

    async fn remove_membership(&mut self) {
        if let Some(rev) = &self.member.rev {
            if let Err(e) = self.client.delete_doc(&self.db, &self.member.id, rev).await {
                tracing::warn!(role = %self.role, error = %e, "cannot remove the membership document");
            }
        }
    }

    /// Membership documents of workers silent for ten lease times are
    /// deleted, so that crashed workers do not accumulate.
    async fn remove_dead_members(&self, now: Instant, members: &[WorkerDoc]) {
        let stale = self.liveness.stale(now, self.timing.lease * 10);
        for member in members
            .iter()
            .filter(|m| m.worker_id != self.me && stale.contains(&m.worker_id))
        {
            if let Some(rev) = &member.rev {
                if self
                    .client
                    .delete_doc(&self.db, &member.id, rev)
                    .await
                    .is_ok()
                {
                    tracing::info!(role = %self.role, worker = %member.worker_id, "removed the membership of a dead worker");
                }
            }
        }
    }

    /// Reads every document of an id range. Documents in conflict are
    /// resolved on the way: CouchDB's deterministic winner stays, the losing
    /// revisions are deleted. Every revision ever written is safe to keep
    /// (a checkpoint is only written after its updates were handled), so
    /// keeping the winner loses nothing.
    async fn read_range<T: DeserializeOwned>(
        &self,
        (start, end): (String, String),
    ) -> Result<Vec<T>, CouchError> {
        let query = AllDocsQuery {
            include_docs: true,
            conflicts: true,
            start_key: Some(start),
            end_key: Some(end),
            ..Default::default()
        };
        let rows = self.client.all_docs(&self.db, &query).await?.rows;
        let mut docs = Vec::with_capacity(rows.len());
        for doc in rows.into_iter().filter_map(|r| r.doc) {
            self.resolve_conflicts(&doc).await;
            match serde_json::from_value::<T>(doc) {
                Ok(parsed) => docs.push(parsed),
                Err(e) => {
                    tracing::warn!(role = %self.role, error = %e, "skipping a malformed coordination document")
                }
            }
        }
        Ok(docs)
    }

    async fn resolve_conflicts(&self, doc: &Value) {
        let (Some(id), Some(conflicts)) = (
            doc.get("_id").and_then(Value::as_str),
            doc.get("_conflicts").and_then(Value::as_array),
        ) else {
            return;
        };
        for rev in conflicts.iter().filter_map(Value::as_str) {
            match self.client.delete_doc(&self.db, id, rev).await {
                Ok(_) => {
                    tracing::info!(role = %self.role, id, rev, "resolved a conflict: kept the winning revision")
                }
                Err(e) => {
                    tracing::debug!(role = %self.role, id, rev, error = %e, "conflict already resolved")
                }
            }
        }
    }
}

/// Runs `step` for at most `limit`, logging when it had to be cut short.
async fn bounded(limit: Duration, what: &str, step: impl std::future::Future<Output = ()>) {
    if tokio::time::timeout(limit, step).await.is_err() {
        tracing::warn!("{what} cut short after {limit:?}");
    }
}
