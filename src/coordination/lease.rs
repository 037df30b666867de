//! Lease and membership documents.
//!
//! Each worker of a role keeps a membership document whose revision changes
//! at every heartbeat. Each partition has a lease document naming its owner
//! and its checkpoint. A lease is valid while its owner is live (see
//! [`super::liveness`]).

use serde::{Deserialize, Serialize};

use crate::couch::{impl_revised, prefix_range, Seq};

/// Ids of one role's coordination documents.
#[derive(Clone, Debug)]
pub struct DocIds {
    lease_prefix: String,
    worker_prefix: String,
    /// Status documents: every role's, one per worker.
    status_prefix: String,
}

impl DocIds {
    /// The ids of `role`'s documents in `namespace`.
    pub fn new(namespace: &str, role: &str) -> Self {
        DocIds {
            lease_prefix: format!("{}{role}_", Self::all_leases(namespace)),
            worker_prefix: format!("{}{role}_", Self::all_workers(namespace)),
            status_prefix: crate::ids::status_doc_prefix(namespace),
        }
    }

    /// The id prefix of the status documents of every worker of every role.
    pub fn status_prefix(&self) -> &str {
        &self.status_prefix
    }

    /// The id prefix of every role's leases.
    pub fn all_leases(namespace: &str) -> String {
        crate::ids::lease_prefix(namespace)
    }

    /// The id prefix of every role's membership documents.
    pub fn all_workers(namespace: &str) -> String {
        crate::ids::worker_prefix(namespace)
    }

    /// Zero-padded so that `_all_docs` lists leases in partition order.
    pub fn lease(&self, partition: u32) -> String {
        format!("{}{partition:04}", self.lease_prefix)
    }

    /// The membership document id of a worker.
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
    /// When the last heartbeat was written (RFC 3339, the writer's clock):
    /// for operators only; liveness is read from the revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beat_at: Option<String>,
    /// The lease time the worker runs with, so that operators can see it.
    pub lease_ms: u64,
    #[serde(rename = "_conflicts", default, skip_serializing)]
    pub conflicts: Vec<String>,
}

impl WorkerDoc {
    pub const KIND: &'static str = "spiegel_worker";
}

impl LeaseDoc {
    /// What to write when an update of ours met a newer revision: our
    /// update on top of it if the lease is still ours, else nothing (the
    /// lease was taken).
    pub fn rebase(self, stored: Option<&LeaseDoc>, me: &str) -> Option<LeaseDoc> {
        let stored = stored.filter(|s| s.owner.as_deref() == Some(me))?;
        Some(LeaseDoc {
            rev: stored.rev.clone(),
            ..self
        })
    }
}

impl_revised!(LeaseDoc, WorkerDoc);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_ids_sort_by_partition() {
        let ids = DocIds::new("ns_", "replicator");
        assert_eq!(ids.lease(7), "ns_spiegel_lease_replicator_0007");
        let (start, end) = ids.lease_range();
        assert!(ids.lease(7) > start && ids.lease(7) < end);
        assert!(ids.worker("w1") > ids.worker_range().0);
    }

    #[test]
    fn an_update_is_rebased_only_on_a_lease_still_ours() {
        let ids = DocIds::new("", "replicator");
        let mine = LeaseDoc {
            owner: Some("me".into()),
            rev: Some("1-a".into()),
            ..LeaseDoc::new(&ids, "replicator", 0)
        };
        let stored = LeaseDoc {
            rev: Some("2-b".into()),
            ..mine.clone()
        };
        let rebased = mine.clone().rebase(Some(&stored), "me").unwrap();
        assert_eq!(rebased.rev.as_deref(), Some("2-b"));
        let taken = LeaseDoc {
            owner: Some("other".into()),
            ..stored
        };
        assert!(mine.clone().rebase(Some(&taken), "me").is_none());
        assert!(mine.rebase(None, "me").is_none());
    }
}
