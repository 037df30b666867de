//! The coordinator of one worker. On its own task, so that a slow CouchDB
//! never stalls the scheduling of runs, it beats ([`super::renewer`]),
//! rebalances ([`super::taker`]) and moves each partition's lease through
//! its lifecycle ([`super::partition`]), telling the worker what it gains,
//! must give up, or lost.

use std::collections::{BTreeSet, HashMap};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Duration, Instant};

use super::lease::{DocIds, LeaseDoc, WorkerDoc};
use super::liveness::Liveness;
use super::partition::{LeaseState, Partitions};
use super::renewer::{Renewer, Timing};
use super::store::LeaseStore;
use super::taker::plan;
use crate::couch::{Saved, Seq};
use crate::metrics::{self, WorkerMetrics};

/// What the coordinator tells the worker.
#[derive(Debug, PartialEq)]
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

/// Which worker a coordinator speaks for, and where.
#[derive(Clone, Debug)]
pub struct Member {
    pub namespace: String,
    pub role: String,
    pub worker_id: String,
    /// The installation's partition count.
    pub partitions: u32,
    pub timing: Timing,
}

/// The channels between a coordinator and its worker.
pub struct Link {
    pub to_worker: mpsc::UnboundedSender<Assignment>,
    /// The last successful heartbeat, for the worker's fencing.
    pub beats: watch::Sender<Option<Instant>>,
}

/// The whole coordination state of one worker.
pub struct Coordinator<S> {
    store: S,
    role: String,
    me: String,
    timing: Timing,
    renewer: Renewer,
    liveness: Liveness,
    /// The members live at the last rebalance: a look that finds others
    /// rebalances at once.
    live: BTreeSet<String>,
    /// Whether the last heartbeat was written: without it, claim nothing.
    beat_ok: bool,
    /// Each partition's lease document as last read or written by us.
    leases: Vec<LeaseDoc>,
    /// Each partition's place in the lease lifecycle.
    states: Partitions,
    /// Status documents of this role's workers that are not live, with
    /// when this worker first saw them so.
    orphans: HashMap<String, Instant>,
    /// Heartbeats since the last look at the status documents.
    beats_since_statuses: u32,
    metrics: WorkerMetrics,
    to_worker: mpsc::UnboundedSender<Assignment>,
}

impl<S: LeaseStore> Coordinator<S> {
    pub fn new(store: S, member: Member, metrics: WorkerMetrics, link: Link) -> Self {
        let ids = DocIds::new(&member.namespace, &member.role);
        let doc = WorkerDoc {
            id: ids.worker(&member.worker_id),
            rev: None,
            kind: WorkerDoc::KIND.into(),
            role: member.role.clone(),
            worker_id: member.worker_id.clone(),
            beats: 0,
            beat_at: None,
            lease_ms: member.timing.lease.as_millis() as u64,
            conflicts: Vec::new(),
        };
        Coordinator {
            store,
            leases: (0..member.partitions)
                .map(|p| LeaseDoc::new(&ids, &member.role, p))
                .collect(),
            states: Partitions::new(member.partitions),
            orphans: HashMap::new(),
            beats_since_statuses: 0,
            renewer: Renewer::new(doc, member.timing.clone(), link.beats),
            liveness: Liveness::new(member.timing.window()),
            live: BTreeSet::new(),
            beat_ok: false,
            role: member.role,
            me: member.worker_id,
            timing: member.timing,
            metrics,
            to_worker: link.to_worker,
        }
    }

    /// Runs until the worker leaves (or drops its request channel).
    pub async fn run(mut self, mut requests: mpsc::UnboundedReceiver<Request>) {
        let mut tick = tokio::time::interval(self.timing.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut look = tokio::time::interval(self.timing.watch());
        look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.beat().await,
                _ = look.tick() => self.look().await,
                request = requests.recv() => match request {
                    Some(request) => {
                        if self.on_request(request).await {
                            return;
                        }
                    }
                    None => return,
                },
            }
        }
    }

    /// Does what the worker asks; true once it has left.
    async fn on_request(&mut self, request: Request) -> bool {
        let limit = self.step_limit();
        match request {
            Request::Checkpoints(list) => {
                let list = list.into_iter().map(|(p, seq)| (p, Some(seq))).collect();
                bounded(limit, "saving checkpoints", self.write_leases(list, true)).await;
            }
            Request::Released {
                partition,
                checkpoint,
            } => {
                if self.states.set(partition, LeaseState::Releasing) {
                    let list = vec![(partition, checkpoint)];
                    bounded(limit, "releasing a lease", self.free(list)).await;
                }
            }
            Request::Leave { checkpoints, done } => {
                self.leave(checkpoints).await;
                let _ = done.send(());
                return true;
            }
        }
        false
    }

    /// The deadline of a step that talks to CouchDB: a heartbeat, and never
    /// past the fence. A hung request then never delays the next heartbeat,
    /// and with it the fencing check, beyond the fence: the partitions are
    /// dropped before others may take them. A step cut short is a step
    /// that failed; what it left half done is finished at the next
    /// heartbeat ([`Self::settle`]).
    fn step_limit(&self) -> Duration {
        let left = self.renewer.until_fenced(Instant::now());
        left.min(self.timing.heartbeat)
    }

    fn label(&self) -> metrics::RoleLabel {
        metrics::role(&self.role)
    }

    /// Moves a partition in its lifecycle and tells the worker, if the move
    /// is one the worker must know about.
    fn set(&mut self, partition: u32, next: LeaseState) {
        if !self.states.set(partition, next) {
            return;
        }
        let assignment = match next {
            LeaseState::Owned => Assignment::Acquired {
                partition,
                checkpoint: self.leases[partition as usize].checkpoint.clone(),
            },
            LeaseState::Draining { .. } => Assignment::Release { partition },
            LeaseState::Lost => Assignment::Lost { partition },
            _ => return,
        };
        self.tell(assignment);
    }

    fn tell(&self, assignment: Assignment) {
        // The worker outlives its coordinator; a send can only fail during
        // shutdown, when nothing needs the message any more.
        let _ = self.to_worker.send(assignment);
    }

    /// One heartbeat: prove we are alive, see who else is, and rebalance.
    async fn beat(&mut self) {
        // A tick that comes late, after a step cut short at the fence, drops
        // the partitions before a heartbeat that may hang.
        self.drop_if_fenced();
        let alive = self.renewer.renew(&self.store).await;
        self.beat_ok = alive;
        bounded(self.step_limit(), "finishing releases", self.settle()).await;
        if self.drop_if_fenced() || !alive {
            // Without a fresh heartbeat our standing is unknown: claim nothing.
            return;
        }
        let limit = self.step_limit();
        bounded(
            limit,
            "releasing overdue partitions",
            self.release_overdue(),
        )
        .await;
        match tokio::time::timeout(self.step_limit(), self.rebalance()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(role = %self.role, error = %e, "cannot read the leases; retrying at the next heartbeat")
            }
            Err(_) => {
                tracing::warn!(role = %self.role, "reading the leases timed out; retrying at the next heartbeat")
            }
        }
    }

    /// A look between heartbeats: reads the members only, and rebalances
    /// at once when one has died (or joined), rather than at the next
    /// heartbeat. So a dead worker's partitions are taken within a lease
    /// time of its last heartbeat ([`Timing::window`]).
    async fn look(&mut self) {
        if self.drop_if_fenced() || !self.beat_ok {
            return;
        }
        let read = tokio::time::timeout(self.step_limit(), self.store.members()).await;
        let Ok(Ok(members)) = read else {
            return;
        };
        if self.observe(&members) == self.live {
            return;
        }
        let limit = self.step_limit();
        if let Ok(Err(e)) = tokio::time::timeout(limit, self.rebalance()).await {
            tracing::debug!(role = %self.role, error = %e, "cannot read the leases; retrying at the next heartbeat");
        }
    }

    /// Records the members read just now; returns the live ones.
    fn observe(&mut self, members: &[WorkerDoc]) -> BTreeSet<String> {
        // Observed now, after the read: a revision cannot be older than this
        // from our point of view.
        let now = Instant::now();
        let ids = members
            .iter()
            .filter_map(|m| Some((m.worker_id.as_str(), m.rev.as_deref()?)));
        self.liveness.observe(now, ids)
    }

    /// Fencing: once heartbeats have failed for too long, every partition
    /// held is dropped. True while fenced.
    fn drop_if_fenced(&mut self) -> bool {
        if !self.renewer.fenced(Instant::now()) {
            return false;
        }
        let held = self.states.held();
        if !held.is_empty() {
            tracing::warn!(role = %self.role, "heartbeats failing for too long: dropping every partition");
            for partition in held {
                self.set(partition, LeaseState::Lost);
            }
            self.update_gauges(0);
        }
        true
    }

    /// Finishes what a step cut short by its deadline left half done: a
    /// claim whose answer never came is forgotten (the lease, read again,
    /// tells whether it landed), and a release is written again (with the
    /// checkpoint stored in the lease: older, so nothing is lost).
    async fn settle(&mut self) {
        let mut releasing = Vec::new();
        for partition in 0..self.leases.len() as u32 {
            match self.states.state(partition) {
                LeaseState::Claiming => {
                    self.states.set(partition, LeaseState::Free);
                }
                LeaseState::Releasing => releasing.push((partition, None)),
                _ => {}
            }
        }
        if !releasing.is_empty() {
            self.free(releasing).await;
        }
    }

    /// A run that never ends must not keep a partition from its next owner:
    /// after the drain timeout the lease is freed with its last saved
    /// checkpoint (the run's updates are not marked handled, so nothing is
    /// lost), and the worker drops the partition.
    async fn release_overdue(&mut self) {
        let overdue = self.states.overdue(Instant::now(), self.timing.drain);
        for &partition in &overdue {
            tracing::warn!(role = %self.role, partition, "runs still in flight after the drain timeout: releasing the partition anyway");
            self.states.set(partition, LeaseState::Releasing);
            self.tell(Assignment::Lost { partition });
        }
        let keep_stored_checkpoint = |p: u32| (p, None);
        self.free(overdue.into_iter().map(keep_stored_checkpoint).collect())
            .await;
    }

    async fn rebalance(&mut self) -> Result<(), crate::couch::CouchError> {
        let members = self.store.members().await?;
        let live = self.observe(&members);
        self.live.clone_from(&live);
        let now = Instant::now();
        self.remove_dead_members(now, &members).await;
        self.remove_orphaned_statuses(now, &live).await;
        for lease in self.store.leases().await? {
            if let Some(slot) = self.leases.get_mut(lease.partition as usize) {
                *slot = lease;
            }
        }
        self.follow_owners();
        let owners: Vec<(u32, Option<String>)> = self
            .leases
            .iter()
            .map(|l| (l.partition, l.owner.clone()))
            .collect();
        let plan = plan(&self.me, &live, &owners);
        for partition in plan.release {
            self.set(partition, LeaseState::Draining { since: now });
        }
        let mut acquired = Vec::new();
        for partition in plan.claim {
            if self.claim(partition).await {
                acquired.push(partition);
            }
        }
        if !acquired.is_empty() {
            let owned = self.states.held().len();
            tracing::info!(role = %self.role, count = acquired.len(), owned, partitions = ?acquired, "acquired partitions");
        }
        self.update_gauges(live.len().max(1));
        Ok(())
    }

    /// Leases someone else now holds are lost; ours from an earlier life
    /// under the same id are picked up again.
    fn follow_owners(&mut self) {
        for partition in 0..self.leases.len() as u32 {
            let owner = self.leases[partition as usize].owner.clone();
            let ours = owner.as_deref() == Some(self.me.as_str());
            let held = self.states.state(partition).held();
            if held && !ours {
                let owner = owner.as_deref().unwrap_or("none");
                tracing::warn!(role = %self.role, partition, owner, "lease taken by another worker");
                self.set(partition, LeaseState::Lost);
            } else if ours && !held {
                self.set(partition, LeaseState::Owned);
            }
        }
    }

    fn update_gauges(&self, live: usize) {
        let label = self.label();
        self.metrics
            .owned_partitions
            .get_or_create(&label)
            .set(self.states.held().len() as i64);
        if live > 0 {
            self.metrics
                .live_workers
                .get_or_create(&label)
                .set(live as i64);
        }
    }

    /// Claims a free partition; true if it is ours now.
    async fn claim(&mut self, partition: u32) -> bool {
        if !self.states.set(partition, LeaseState::Claiming) {
            return false;
        }
        let mut lease = self.leases[partition as usize].clone();
        let previous = lease.owner.replace(self.me.clone());
        match self.store.claim(lease).await {
            Ok(written) => {
                let previous_owner = previous.as_deref().unwrap_or("none");
                tracing::debug!(role = %self.role, partition, previous_owner, "acquired partition");
                self.leases[partition as usize] = written;
                self.set(partition, LeaseState::Owned);
                true
            }
            Err(e) => {
                self.states.set(partition, LeaseState::Free);
                match e {
                    crate::couch::CouchError::Conflict => {
                        tracing::debug!(role = %self.role, partition, "another worker claimed the partition first")
                    }
                    e => {
                        tracing::warn!(role = %self.role, partition, error = %e, "cannot claim partition")
                    }
                }
                false
            }
        }
    }

    /// Frees leases, saving their last checkpoint.
    async fn free(&mut self, list: Vec<(u32, Option<Seq>)>) {
        let partitions: Vec<u32> = list.iter().map(|(p, _)| *p).collect();
        self.write_leases(list, false).await;
        let mut released = Vec::new();
        for partition in partitions {
            if self.states.set(partition, LeaseState::Free) {
                tracing::debug!(role = %self.role, partition, "released partition");
                released.push(partition);
            }
        }
        if !released.is_empty() {
            tracing::info!(role = %self.role, count = released.len(), partitions = ?released, "released partitions");
        }
        self.update_gauges(0);
    }

    /// Shutdown: every lease we hold is freed with its checkpoint, and the
    /// membership document removed, each within a heartbeat (not bounded by
    /// the fence: nothing runs after it, and a lease write is checked
    /// against the lease's revision).
    async fn leave(&mut self, checkpoints: Vec<(u32, Option<Seq>)>) {
        let limit = self.timing.heartbeat;
        let held: BTreeSet<u32> = self.states.held().into_iter().collect();
        let mut list = Vec::new();
        for (partition, checkpoint) in checkpoints {
            if !held.contains(&partition) {
                continue;
            }
            if self.states.state(partition) == LeaseState::Owned {
                let now = Instant::now();
                self.states
                    .set(partition, LeaseState::Draining { since: now });
            }
            self.states.set(partition, LeaseState::Releasing);
            list.push((partition, checkpoint));
        }
        // Partitions the worker had drained but not handed back yet (its
        // save before the release was under way): freed with their stored
        // checkpoint rather than left to expire.
        let listed: BTreeSet<u32> = list.iter().map(|(p, _)| *p).collect();
        for partition in held.difference(&listed) {
            self.states.set(*partition, LeaseState::Releasing);
            list.push((*partition, None));
        }
        bounded(limit, "releasing leases", self.free(list)).await;
        bounded(
            limit,
            "removing the membership",
            self.renewer.leave(&self.store),
        )
        .await;
    }

    /// Writes checkpoints (`None`: keep the stored one) into leases we hold,
    /// keeping or giving up ownership, in one request. A lease another
    /// worker took meanwhile is lost.
    async fn write_leases(&mut self, updates: Vec<(u32, Option<Seq>)>, keep: bool) {
        let docs: Vec<LeaseDoc> = updates
            .into_iter()
            .filter(|(p, _)| self.states.state(*p).held())
            .filter_map(|(p, seq)| {
                let mut lease = self.leases.get(p as usize)?.clone();
                if let Some(seq) = seq {
                    lease.checkpoint = Some(seq);
                    lease.checkpoint_at = Some(crate::ids::timestamp());
                }
                lease.owner = keep.then(|| self.me.clone());
                Some(lease)
            })
            .collect();
        if docs.is_empty() {
            return;
        }
        let count = docs.len() as u64;
        let partitions: Vec<u32> = docs.iter().map(|d| d.partition).collect();
        let saved = match self.store.update(docs, &self.me).await {
            Ok(saved) => saved,
            Err(e) => {
                tracing::warn!(role = %self.role, error = %e, "cannot save checkpoints; they will be saved later");
                return;
            }
        };
        self.metrics
            .checkpoint_writes
            .get_or_create(&self.label())
            .inc_by(count);
        for (partition, saved) in partitions.into_iter().zip(saved) {
            self.saved(partition, saved);
        }
    }

    /// Takes in what became of a lease write.
    fn saved(&mut self, partition: u32, saved: Saved<LeaseDoc>) {
        match saved {
            Saved::Written(lease) => self.leases[partition as usize] = lease,
            Saved::Superseded(current) => {
                let owner = current.as_ref().and_then(|c| c.owner.clone());
                let owner = owner.as_deref().unwrap_or("none");
                tracing::warn!(role = %self.role, partition, owner, "lease taken by another worker");
                if let Some(current) = current {
                    self.leases[partition as usize] = current;
                }
                self.set(partition, LeaseState::Lost);
            }
            Saved::Refused(e) => {
                tracing::warn!(role = %self.role, partition, error = %e, "lease write refused")
            }
        }
    }

    /// Status documents of this role's workers that have not been live for
    /// ten lease times (stopped cleanly, or dead) are deleted, so that
    /// `spiegel status` shows the workers that run. Looked at every ten
    /// heartbeats: a listing of ids only.
    async fn remove_orphaned_statuses(&mut self, now: Instant, live: &BTreeSet<String>) {
        self.beats_since_statuses += 1;
        if self.beats_since_statuses < 10 {
            return;
        }
        self.beats_since_statuses = 0;
        let Ok(statuses) = self.store.statuses().await else {
            return;
        };
        let suffix = format!("-{}", self.role);
        let mut seen = HashMap::new();
        for status in statuses {
            let worker = status.worker;
            if !worker.ends_with(&suffix) || live.contains(&worker) || worker == self.me {
                continue;
            }
            let since = self.orphans.get(&worker).copied().unwrap_or(now);
            if now - since >= self.timing.lease * 10 {
                if self
                    .store
                    .remove_status(&status.id, &status.rev)
                    .await
                    .is_ok()
                {
                    tracing::info!(role = %self.role, worker = %worker, "removed the status of a worker gone for ten lease times");
                }
                continue;
            }
            seen.insert(worker, since);
        }
        self.orphans = seen;
    }

    /// Membership documents of workers silent for ten lease times are
    /// deleted, so that crashed workers do not accumulate.
    async fn remove_dead_members(&self, now: Instant, members: &[WorkerDoc]) {
        let stale = self.liveness.stale(now, self.timing.lease * 10);
        for member in members
            .iter()
            .filter(|m| m.worker_id != self.me && stale.contains(&m.worker_id))
        {
            if self.store.remove(member).await.is_ok() {
                tracing::info!(role = %self.role, worker = %member.worker_id, "removed the membership of a dead worker");
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

#[cfg(test)]
mod tests {
    //! The lease protocol on tokio's paused clock, over a store in memory:
    //! every timing is asserted exactly, not on the wall clock.

    use std::sync::atomic::Ordering;

    use super::*;
    use crate::coordination::store::memory::MemoryStore;
    use crate::metrics::Metrics;

    const PARTITIONS: u32 = 4;
    const TIMING: Timing = Timing {
        lease: Duration::from_secs(30),
        heartbeat: Duration::from_secs(10),
        drain: Duration::from_secs(60),
    };

    /// One worker's end of a running coordinator.
    struct Worker {
        assignments: mpsc::UnboundedReceiver<Assignment>,
        requests: mpsc::UnboundedSender<Request>,
        task: tokio::task::JoinHandle<()>,
        /// Partitions the worker holds, as it was told.
        owned: BTreeSet<u32>,
        /// When the last heartbeat that worked was sent.
        beats: watch::Receiver<Option<Instant>>,
    }

    fn start(store: &MemoryStore, id: &str) -> Worker {
        let (to_worker, assignments) = mpsc::unbounded_channel();
        let (requests, request_rx) = mpsc::unbounded_channel();
        let member = Member {
            namespace: String::new(),
            role: "test".into(),
            worker_id: id.into(),
            partitions: PARTITIONS,
            timing: TIMING,
        };
        let (beats, beats_rx) = watch::channel(None);
        let link = Link { to_worker, beats };
        let metrics = Metrics::new().worker;
        let coordinator = Coordinator::new(store.clone(), member, metrics, link);
        Worker {
            assignments,
            requests,
            task: tokio::spawn(coordinator.run(request_rx)),
            owned: BTreeSet::new(),
            beats: beats_rx,
        }
    }

    impl Worker {
        /// The next assignment, applied to `owned`, with when it came.
        async fn next(&mut self) -> (Assignment, Instant) {
            // Virtual time: a missing assignment fails the test at once.
            let wait = tokio::time::timeout(Duration::from_secs(600), self.assignments.recv());
            let assignment = wait.await.expect("an assignment in time").expect("running");
            match &assignment {
                Assignment::Acquired { partition, .. } => self.owned.insert(*partition),
                Assignment::Release { partition } | Assignment::Lost { partition } => {
                    self.owned.remove(partition)
                }
            };
            (assignment, Instant::now())
        }

        /// Takes assignments until `owned` has `count` partitions.
        async fn until_owning(&mut self, count: usize) -> Instant {
            loop {
                let (_, at) = self.next().await;
                if self.owned.len() == count {
                    return at;
                }
            }
        }
    }

    fn store() -> MemoryStore {
        MemoryStore::new(DocIds::new("", "test"))
    }

    #[tokio::test(start_paused = true)]
    async fn leaving_frees_a_partition_being_drained_too() {
        let store = store();
        let mut a = start(&store, "a");
        a.until_owning(4).await;
        let _b = start(&store, "b");
        // "a" is told to give a partition up, and stops before handing it
        // back.
        let draining = loop {
            if let (Assignment::Release { partition }, _) = a.next().await {
                break partition;
            }
        };
        let (done, left) = oneshot::channel();
        let checkpoints = a.owned.iter().map(|p| (*p, None)).collect();
        a.requests
            .send(Request::Leave { checkpoints, done })
            .unwrap();
        left.await.expect("left");
        for partition in 0..PARTITIONS {
            let owner = store.lease(partition).and_then(|l| l.owner);
            assert_ne!(
                owner.as_deref(),
                Some("a"),
                "partition {partition} (draining: {draining})"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_workers_partitions_are_taken_within_a_lease_time_of_its_last_beat_not_before_it_fenced(
    ) {
        let store = store();
        let mut a = start(&store, "a");
        a.until_owning(4).await;
        let mut b = start(&store, "b");
        // "a" gives two partitions up; "b" claims them once they are free.
        while a.owned.len() > 2 {
            if let (Assignment::Release { partition }, _) = a.next().await {
                a.requests
                    .send(Request::Released {
                        partition,
                        checkpoint: None,
                    })
                    .unwrap();
            }
        }
        b.until_owning(2).await;
        // "b" dies, some time after its last heartbeat.
        tokio::time::sleep(TIMING.heartbeat / 2).await;
        let last_beat = b.beats.borrow().expect("a heartbeat");
        b.task.abort();
        let taken = a.until_owning(4).await;
        let waited = taken - last_beat;
        // Not before "b" fenced itself, and within a lease time.
        let fenced = TIMING.lease - TIMING.heartbeat;
        assert!(waited > fenced, "taken after {waited:?}");
        assert!(waited <= TIMING.lease, "taken after {waited:?}");
        assert_eq!(store.lease(3).unwrap().owner.as_deref(), Some("a"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_worker_that_cannot_beat_drops_its_partitions_before_others_may_take_them() {
        let store = store();
        let mut a = start(&store, "a");
        a.until_owning(4).await;
        let cut = store.with_own_link();
        // Same documents; "a" is restarted on a link we can cut.
        a.requests
            .send(Request::Leave {
                checkpoints: Vec::new(),
                done: oneshot::channel().0,
            })
            .unwrap();
        let mut a = start(&cut, "a");
        let last_beat = a.until_owning(4).await;
        cut.down.store(true, Ordering::SeqCst);
        let mut lost = 0;
        let mut when = last_beat;
        while lost < 4 {
            if let (Assignment::Lost { .. }, at) = a.next().await {
                lost += 1;
                when = at;
            }
        }
        let after = when - last_beat;
        assert!(
            after >= TIMING.lease - TIMING.heartbeat,
            "dropped after {after:?}"
        );
        assert!(
            after < TIMING.lease,
            "dropped after {after:?}: others may already hold them"
        );
        // Another worker takes them only after the lease time.
        let mut b = start(&store, "b");
        let taken = b.until_owning(4).await;
        assert!(taken - last_beat >= TIMING.lease);
    }

    #[tokio::test(start_paused = true)]
    async fn a_partition_whose_runs_never_end_is_released_after_the_drain_timeout() {
        let store = store();
        let mut a = start(&store, "a");
        a.until_owning(4).await;
        let mut b = start(&store, "b");
        // "a" is asked to give two partitions up, and never says they drained.
        let mut asked = Vec::new();
        while asked.len() < 2 {
            if let (Assignment::Release { partition }, at) = a.next().await {
                asked.push((partition, at));
            }
        }
        let mut lost = Vec::new();
        while lost.len() < 2 {
            if let (Assignment::Lost { partition }, at) = a.next().await {
                lost.push((partition, at));
            }
        }
        for ((p, asked_at), (q, lost_at)) in asked.iter().zip(&lost) {
            assert_eq!(p, q);
            let drained_for = *lost_at - *asked_at;
            assert!(
                drained_for >= TIMING.drain,
                "released after {drained_for:?}"
            );
            assert!(drained_for <= TIMING.drain + TIMING.heartbeat);
        }
        b.until_owning(2).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_claim_cut_short_by_its_deadline_does_not_block_the_partition() {
        let store = store();
        let slow = store.with_own_link();
        slow.slow_claims.store(true, Ordering::SeqCst);
        let mut a = start(&slow, "a");
        // Every claim outlives the rebalance's deadline and never lands.
        tokio::time::sleep(TIMING.heartbeat * 3).await;
        assert!(a.assignments.try_recv().is_err(), "nothing claimed");
        slow.slow_claims.store(false, Ordering::SeqCst);
        a.until_owning(4).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_release_never_holds_the_coordinator_past_the_fence() {
        let store = store();
        let hung = store.with_own_link();
        let mut a = start(&hung, "a");
        a.until_owning(4).await;
        let _b = start(&store, "b");
        let partition = loop {
            if let (Assignment::Release { partition }, _) = a.next().await {
                break partition;
            }
        };
        // From now on no call of "a" ever returns: its release hangs, and
        // so do its heartbeats and every later attempt to release.
        hung.hang.store(true, Ordering::SeqCst);
        let last_beat = a.beats.borrow().expect("a heartbeat");
        a.requests
            .send(Request::Released {
                partition,
                checkpoint: None,
            })
            .unwrap();
        let dropped = a.until_owning(0).await;
        let after = dropped - last_beat;
        assert!(
            after < TIMING.lease,
            "dropped after {after:?}: others may already hold them"
        );
        assert!(after >= TIMING.lease - TIMING.heartbeat, "{after:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn leaving_frees_every_lease_with_its_checkpoint_and_removes_the_membership() {
        let store = store();
        let mut a = start(&store, "a");
        a.until_owning(4).await;
        let checkpoints = (0..PARTITIONS)
            .map(|p| (p, Some(Seq::from(serde_json::json!(format!("{p}-seq"))))))
            .collect();
        let (done, left) = oneshot::channel();
        a.requests
            .send(Request::Leave { checkpoints, done })
            .unwrap();
        left.await.unwrap();
        for p in 0..PARTITIONS {
            let lease = store.lease(p).unwrap();
            assert_eq!(lease.owner, None);
            assert_eq!(
                lease.checkpoint,
                Some(Seq::from(serde_json::json!(format!("{p}-seq"))))
            );
        }
        assert!(store.members().await.unwrap().is_empty());
    }
}
