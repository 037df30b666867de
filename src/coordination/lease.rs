//! Lease and membership documents, and what a worker concludes from them.
//!
//! Each worker of a role keeps a membership document whose revision changes
//! at every heartbeat. Each partition has a lease document naming its owner
//! and its checkpoint. A lease is valid while its owner is live; liveness is
//! judged by each observer on its own monotonic clock ("this member's
//! revision has not changed for a lease time"), so no two hosts' clocks need
//! to agree: only their rates must (within a few percent).

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::INTERNAL_PREFIX;
use crate::couch::{prefix_range, Seq};

/// Ids of one role's coordination documents.
#[derive(Clone, Debug)]
pub struct DocIds {
    lease_prefix: String,
    worker_prefix: String,
}

impl DocIds {
    pub fn new(namespace: &str, role: &str) -> Self {
        DocIds {
            lease_prefix: format!("{}{role}_", Self::all_leases(namespace)),
            worker_prefix: format!("{}{role}_", Self::all_workers(namespace)),
        }
    }

    /// The id prefix of every role's leases.
    pub fn all_leases(namespace: &str) -> String {
        format!("{namespace}{INTERNAL_PREFIX}lease_")
    }

    /// The id prefix of every role's membership documents.
    pub fn all_workers(namespace: &str) -> String {
        format!("{namespace}{INTERNAL_PREFIX}worker_")
    }

    /// Zero-padded so that `_all_docs` lists leases in partition order.
    pub fn lease(&self, partition: u32) -> String {
        format!("{}{partition:04}", self.lease_prefix)
    }

    pub fn worker(&self, worker_id: &str) -> String {
        format!("{}{worker_id}", self.worker_prefix)
    }

    /// `(startkey, endkey)` of every lease of the role.
    pub fn lease_range(&self) -> (String, String) {
        prefix_range(&self.lease_prefix)
    }

    /// `(startkey, endkey)` of every membership document of the role.
    pub fn worker_range(&self) -> (String, String) {
        prefix_range(&self.worker_prefix)
    }
}

/// A partition's lease: who works on it, and up to where its updates have
/// been handled.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LeaseDoc {
    #[serde(rename = "_id")]
    pub id: String,
    #[serde(rename = "_rev", default, skip_serializing_if = "Option::is_none")]
    pub rev: Option<String>,
    #[serde(rename = "type")]
    pub kind: String,
    pub role: String,
    pub partition: u32,
    /// The owning worker's id; `None` when free.
    pub owner: Option<String>,
    /// A `_db_updates` seq: every update at or before it, for databases of
    /// this partition, has been handled. `None` before the first one.
    pub checkpoint: Option<Seq>,
    /// When the checkpoint was saved (RFC 3339, the saver's clock): for
    /// operators only, never used for coordination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_at: Option<String>,
    #[serde(rename = "_conflicts", default, skip_serializing)]
    pub conflicts: Vec<String>,
}

impl LeaseDoc {
    pub const KIND: &'static str = "spiegel_lease";

    pub fn new(ids: &DocIds, role: &str, partition: u32) -> Self {
        LeaseDoc {
            id: ids.lease(partition),
            rev: None,
            kind: Self::KIND.into(),
            role: role.into(),
            partition,
            owner: None,
            checkpoint: None,
            checkpoint_at: None,
            conflicts: Vec::new(),
        }
    }
}

/// A worker's membership: its revision changing is its heartbeat.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct WorkerDoc {
    #[serde(rename = "_id")]
    pub id: String,
    #[serde(rename = "_rev", default, skip_serializing_if = "Option::is_none")]
    pub rev: Option<String>,
    #[serde(rename = "type")]
    pub kind: String,
    pub role: String,
    pub worker_id: String,
    /// Incremented at every heartbeat (informational: liveness is read from
    /// the revision).
    pub beats: u64,
    /// The lease time the worker runs with, so that operators can see it.
    pub lease_ms: u64,
    #[serde(rename = "_conflicts", default, skip_serializing)]
    pub conflicts: Vec<String>,
}

impl WorkerDoc {
    pub const KIND: &'static str = "spiegel_worker";
}

/// Who is live, as seen from one worker.
#[derive(Debug)]
pub struct Liveness {
    lease: Duration,
    /// worker id -> (revision last seen, when it was first seen).
    seen: HashMap<String, (String, Instant)>,
    /// When the observer last looked.
    last_look: Option<Instant>,
}

impl Liveness {
    pub fn new(lease: Duration) -> Self {
        Liveness {
            lease,
            seen: HashMap::new(),
            last_look: None,
        }
    }

    /// Records the membership documents read at `now` and returns the ids of
    /// the live workers. A worker seen for the first time counts as live for
    /// one lease time: it may have just started, or just died.
    pub fn observe<'a>(
        &mut self,
        now: Instant,
        members: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> BTreeSet<String> {
        // An observer that could not look for a while (its own link to
        // CouchDB was down) cannot tell who beat meanwhile: everyone gets a
        // fresh lease rather than being declared dead at once.
        let blind = self
            .last_look
            .is_none_or(|t| now.duration_since(t) > self.lease);
        self.last_look = Some(now);
        let mut present = HashMap::new();
        for (worker, rev) in members {
            let since = match self.seen.get(worker) {
                Some((seen_rev, since)) if seen_rev == rev && !blind => *since,
                _ => now,
            };
            present.insert(worker.to_string(), (rev.to_string(), since));
        }
        self.seen = present;
        self.seen
            .iter()
            .filter(|(_, (_, since))| now.duration_since(*since) < self.lease)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Workers whose documents have not changed for `age`: candidates for
    /// clean-up.
    pub fn stale(&self, now: Instant, age: Duration) -> Vec<String> {
        self.seen
            .iter()
            .filter(|(_, (_, since))| now.duration_since(*since) >= age)
            .map(|(id, _)| id.clone())
            .collect()
    }
}

/// What a worker should do with its leases.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub claim: Vec<u32>,
    pub release: Vec<u32>,
}

/// Balances partitions among live workers: the first `P mod n` workers by id
/// hold `P/n + 1` partitions, the others `P/n`. A worker over its share
/// releases its highest partitions; a worker under it claims free partitions
/// (no owner, or an owner that is not live), starting at an offset given by
/// its rank so that several newcomers do not all race for the same ones.
/// Every worker runs this on its own view; views converge within a heartbeat.
pub fn plan(me: &str, live: &BTreeSet<String>, owners: &[(u32, Option<String>)]) -> Plan {
    let partitions = owners.len();
    let mut workers: Vec<&str> = live.iter().map(String::as_str).collect();
    if !live.contains(me) {
        workers.push(me);
        workers.sort_unstable();
    }
    let n = workers.len();
    let rank = workers.iter().position(|w| *w == me).unwrap_or(0);
    let target = partitions / n + usize::from(rank < partitions % n);

    let mut mine: Vec<u32> = owners
        .iter()
        .filter(|(_, owner)| owner.as_deref() == Some(me))
        .map(|(p, _)| *p)
        .collect();
    mine.sort_unstable();
    if mine.len() > target {
        return Plan {
            claim: Vec::new(),
            release: mine.split_off(target),
        };
    }
    let free: Vec<u32> = owners
        .iter()
        .filter(|(_, owner)| match owner {
            None => true,
            Some(o) => o != me && !live.contains(o),
        })
        .map(|(p, _)| *p)
        .collect();
    let want = target - mine.len();
    if want == 0 || free.is_empty() {
        return Plan::default();
    }
    let offset = (rank * free.len()) / n;
    let claim = free
        .iter()
        .cycle()
        .skip(offset)
        .take(want.min(free.len()))
        .copied()
        .collect();
    Plan {
        claim,
        release: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(ids: &[&str]) -> BTreeSet<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    fn owners(list: &[Option<&str>]) -> Vec<(u32, Option<String>)> {
        list.iter()
            .enumerate()
            .map(|(p, o)| (p as u32, o.map(String::from)))
            .collect()
    }

    /// Runs every worker's plan on a shared table until nothing changes.
    fn converge(workers: &[&str], table: &mut Vec<(u32, Option<String>)>) -> usize {
        let alive = live(workers);
        for round in 1..20 {
            let mut changed = false;
            for w in workers {
                let plan = plan(w, &alive, table);
                for p in plan.release {
                    table[p as usize].1 = None;
                    changed = true;
                }
                for p in plan.claim {
                    let owner = &mut table[p as usize].1;
                    let free = owner.as_deref().is_none_or(|o| !alive.contains(o));
                    if free {
                        *owner = Some(w.to_string());
                        changed = true;
                    }
                }
            }
            if !changed {
                return round;
            }
        }
        panic!("no convergence: {table:?}");
    }

    fn counts(workers: &[&str], table: &[(u32, Option<String>)]) -> Vec<usize> {
        workers
            .iter()
            .map(|w| {
                table
                    .iter()
                    .filter(|(_, o)| o.as_deref() == Some(*w))
                    .count()
            })
            .collect()
    }

    #[test]
    fn workers_split_partitions_within_one() {
        let mut table = owners(&[None; 32]);
        converge(&["a", "b", "c"], &mut table);
        assert_eq!(counts(&["a", "b", "c"], &table), [11, 11, 10]);
        assert!(table.iter().all(|(_, o)| o.is_some()));

        // A fourth joins: the others release, it claims.
        converge(&["a", "b", "c", "d"], &mut table);
        assert_eq!(counts(&["a", "b", "c", "d"], &table), [8, 8, 8, 8]);

        // "b" dies: its partitions are free to the live ones.
        converge(&["a", "c", "d"], &mut table);
        assert_eq!(counts(&["a", "c", "d"], &table), [11, 11, 10]);
    }

    #[test]
    fn a_lone_worker_takes_everything_and_more_workers_than_partitions_is_fine() {
        let mut table = owners(&[None; 4]);
        converge(&["x"], &mut table);
        assert_eq!(counts(&["x"], &table), [4]);
        converge(&["v", "w", "x", "y", "z"], &mut table);
        let c = counts(&["v", "w", "x", "y", "z"], &table);
        assert_eq!(c.iter().sum::<usize>(), 4);
        assert!(c.iter().all(|&n| n <= 1));
    }

    #[test]
    fn a_live_owner_keeps_its_lease() {
        let table = owners(&[Some("a"), Some("b")]);
        let p = plan("b", &live(&["a", "b"]), &table);
        assert_eq!(p, Plan::default());
        // "a" is not live any more: "b" takes its partition.
        let p = plan("b", &live(&["b"]), &table);
        assert_eq!(p.claim, vec![0]);
    }

    #[test]
    fn liveness_uses_the_observers_clock_only() {
        let lease = Duration::from_secs(10);
        let mut l = Liveness::new(lease);
        let t0 = Instant::now();
        assert_eq!(
            l.observe(t0, [("a", "1-x"), ("b", "1-y")]),
            live(&["a", "b"])
        );
        // "a" beats, "b" does not.
        let t1 = t0 + Duration::from_secs(6);
        assert_eq!(
            l.observe(t1, [("a", "2-x"), ("b", "1-y")]),
            live(&["a", "b"])
        );
        let t2 = t0 + Duration::from_secs(11);
        assert_eq!(l.observe(t2, [("a", "2-x"), ("b", "1-y")]), live(&["a"]));
        assert_eq!(l.stale(t2, Duration::from_secs(11)), vec!["b".to_string()]);
        // After being unable to look for longer than a lease, nobody is
        // declared dead on the spot.
        let t3 = t2 + Duration::from_secs(30);
        assert_eq!(
            l.observe(t3, [("a", "3-x"), ("b", "1-y")]),
            live(&["a", "b"])
        );
        // A deleted membership document is simply gone.
        assert_eq!(l.observe(t3, [("a", "3-x")]), live(&["a"]));
    }

    #[test]
    fn lease_ids_sort_by_partition() {
        let ids = DocIds::new("ns_", "replicator");
        assert_eq!(ids.lease(7), "ns_spiegel_lease_replicator_0007");
        let (start, end) = ids.lease_range();
        assert!(ids.lease(7) > start && ids.lease(7) < end);
        assert!(ids.worker("w1") > ids.worker_range().0);
    }
}
