//! Where one role's leases and membership documents are kept. The
//! coordinator needs only [`LeaseStore`]; [`CouchStore`] keeps them in the
//! spiegel database, and the tests keep them in memory.

use std::future::Future;

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::lease::{DocIds, LeaseDoc, WorkerDoc};
use crate::couch::{AllDocsQuery, CouchClient, CouchError, Saved};

/// The storage operations of the lease protocol.
pub trait LeaseStore: Send + Sync + 'static {
    /// Every membership document of the role.
    fn members(&self) -> impl Future<Output = Result<Vec<WorkerDoc>, CouchError>> + Send;

    /// Every lease document of the role that exists.
    fn leases(&self) -> impl Future<Output = Result<Vec<LeaseDoc>, CouchError>> + Send;

    /// Writes our membership document over whatever revision is stored.
    fn beat(&self, member: WorkerDoc)
        -> impl Future<Output = Result<WorkerDoc, CouchError>> + Send;

    /// Deletes a membership document (ours at a stop, or a dead worker's).
    fn remove(&self, member: &WorkerDoc) -> impl Future<Output = Result<(), CouchError>> + Send;

    /// Claims a lease: written on the revision read, so that of two workers
    /// claiming it only one wins; the other gets [`CouchError::Conflict`].
    fn claim(&self, lease: LeaseDoc) -> impl Future<Output = Result<LeaseDoc, CouchError>> + Send;

    /// The status documents of every worker of every role.
    fn statuses(&self) -> impl Future<Output = Result<Vec<StatusRef>, CouchError>> + Send;

    /// Deletes a status document.
    fn remove_status(
        &self,
        id: &str,
        rev: &str,
    ) -> impl Future<Output = Result<(), CouchError>> + Send;

    /// Writes leases we hold, in one request. A lease that changed since it
    /// was read is written again on top if it is still ours (`me`), and is
    /// [`Saved::Superseded`] if another worker took it.
    fn update(
        &self,
        leases: Vec<LeaseDoc>,
        me: &str,
    ) -> impl Future<Output = Result<Vec<Saved<LeaseDoc>>, CouchError>> + Send;
}

/// Leases and membership documents in the spiegel database.
pub struct CouchStore {
    pub client: CouchClient,
    /// The spiegel database.
    pub db: String,
    pub ids: DocIds,
}

/// A worker's status document, by id and revision (enough to delete it).
#[derive(Clone, Debug, PartialEq)]
pub struct StatusRef {
    /// The worker it reports on.
    pub worker: String,
    pub id: String,
    pub rev: String,
}

impl LeaseStore for CouchStore {
    async fn members(&self) -> Result<Vec<WorkerDoc>, CouchError> {
        self.read_range(self.ids.worker_range()).await
    }

    async fn leases(&self) -> Result<Vec<LeaseDoc>, CouchError> {
        self.read_range(self.ids.lease_range()).await
    }

    async fn beat(&self, member: WorkerDoc) -> Result<WorkerDoc, CouchError> {
        self.client.save(&self.db, member).await
    }

    async fn remove(&self, member: &WorkerDoc) -> Result<(), CouchError> {
        let Some(rev) = &member.rev else {
            return Ok(());
        };
        self.client.delete_doc(&self.db, &member.id, rev).await?;
        Ok(())
    }

    async fn statuses(&self) -> Result<Vec<StatusRef>, CouchError> {
        let prefix = self.ids.status_prefix();
        let query = AllDocsQuery {
            include_docs: false,
            ..AllDocsQuery::prefix(prefix)
        };
        let rows = self.client.all_docs(&self.db, &query).await?.rows;
        Ok(rows
            .into_iter()
            .filter_map(|row| {
                let id = row.id?;
                let worker = id.strip_prefix(prefix)?.to_string();
                let rev = row.value?.rev;
                Some(StatusRef { worker, id, rev })
            })
            .collect())
    }

    async fn remove_status(&self, id: &str, rev: &str) -> Result<(), CouchError> {
        self.client.delete_doc(&self.db, id, rev).await?;
        Ok(())
    }

    async fn claim(&self, mut lease: LeaseDoc) -> Result<LeaseDoc, CouchError> {
        let written = self.client.put_doc(&self.db, &lease.id, &lease).await?;
        lease.rev = Some(written.rev);
        Ok(lease)
    }

    async fn update(
        &self,
        leases: Vec<LeaseDoc>,
        me: &str,
    ) -> Result<Vec<Saved<LeaseDoc>>, CouchError> {
        self.client
            .save_all(&self.db, leases, |mine, stored| mine.rebase(stored, me))
            .await
    }
}

impl CouchStore {
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
                    tracing::warn!(error = %e, "skipping a malformed coordination document")
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
                    tracing::info!(id, rev, "resolved a conflict: kept the winning revision")
                }
                Err(e) => {
                    tracing::debug!(id, rev, error = %e, "conflict already resolved")
                }
            }
        }
    }
}

#[cfg(test)]
pub mod memory {
    //! A [`LeaseStore`] in memory, with CouchDB's revision checks, for
    //! deterministic tests of the coordinator on a paused clock.

    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    use serde::de::DeserializeOwned;
    use serde::Serialize;

    use super::*;
    use crate::couch::Revised;

    /// Documents by id, each with its revision number. Clones share them.
    #[derive(Clone, Default)]
    pub struct MemoryStore {
        docs: Arc<Mutex<BTreeMap<String, (u64, Value)>>>,
        /// While set, every operation fails as if CouchDB were unreachable.
        pub down: Arc<AtomicBool>,
        /// While set, a claim reaches the store only after a minute.
        pub slow_claims: Arc<AtomicBool>,
        /// While set, no call returns: CouchDB never answers.
        pub hang: Arc<AtomicBool>,
        pub ids: Option<DocIds>,
    }

    impl MemoryStore {
        pub fn new(ids: DocIds) -> Self {
            MemoryStore {
                ids: Some(ids),
                ..Default::default()
            }
        }

        /// A view of the same documents with its own down switch: one
        /// worker's link to CouchDB failing.
        pub fn with_own_link(&self) -> Self {
            MemoryStore {
                down: Arc::default(),
                slow_claims: Arc::default(),
                hang: Arc::default(),
                ..self.clone()
            }
        }

        /// Where every call starts: it hangs or fails as the switches say.
        async fn reach(&self) -> Result<(), CouchError> {
            if self.hang.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            self.check()
        }

        fn check(&self) -> Result<(), CouchError> {
            if self.down.load(Ordering::SeqCst) {
                return Err(CouchError::Unreachable("the store is down".into()));
            }
            Ok(())
        }

        /// Writes `doc` if its revision is the stored one.
        fn put<T: Revised>(&self, mut doc: T) -> Result<T, CouchError> {
            self.check()?;
            let mut docs = self.docs.lock().unwrap();
            let stored = docs.get(doc.id()).map(|(n, _)| format!("{n}-x"));
            if stored.as_deref() != doc.rev() {
                return Err(CouchError::Conflict);
            }
            let n = docs.get(doc.id()).map_or(1, |(n, _)| n + 1);
            doc.set_rev(Some(format!("{n}-x")));
            let value = serde_json::to_value(&doc).unwrap();
            docs.insert(doc.id().to_string(), (n, value));
            Ok(doc)
        }

        fn get<T: DeserializeOwned>(&self, id: &str) -> Option<T> {
            let docs = self.docs.lock().unwrap();
            docs.get(id)
                .map(|(_, v)| serde_json::from_value(v.clone()).unwrap())
        }

        fn range<T: DeserializeOwned + Serialize>(
            &self,
            (start, end): (String, String),
        ) -> Result<Vec<T>, CouchError> {
            self.check()?;
            let docs = self.docs.lock().unwrap();
            Ok(docs
                .range(start..end)
                .map(|(_, (_, v))| serde_json::from_value(v.clone()).unwrap())
                .collect())
        }

        /// The lease of `partition` as stored.
        pub fn lease(&self, partition: u32) -> Option<LeaseDoc> {
            self.get(&self.ids.as_ref().unwrap().lease(partition))
        }
    }

    impl LeaseStore for MemoryStore {
        async fn members(&self) -> Result<Vec<WorkerDoc>, CouchError> {
            self.reach().await?;
            self.range(self.ids.as_ref().unwrap().worker_range())
        }

        async fn leases(&self) -> Result<Vec<LeaseDoc>, CouchError> {
            self.reach().await?;
            self.range(self.ids.as_ref().unwrap().lease_range())
        }

        async fn beat(&self, mut member: WorkerDoc) -> Result<WorkerDoc, CouchError> {
            self.reach().await?;
            let stored: Option<WorkerDoc> = self.get(&member.id);
            member.rev = stored.and_then(|s| s.rev);
            self.put(member)
        }

        async fn remove(&self, member: &WorkerDoc) -> Result<(), CouchError> {
            self.reach().await?;
            self.check()?;
            self.docs.lock().unwrap().remove(&member.id);
            Ok(())
        }

        async fn statuses(&self) -> Result<Vec<StatusRef>, CouchError> {
            Ok(Vec::new())
        }

        async fn remove_status(&self, _id: &str, _rev: &str) -> Result<(), CouchError> {
            Ok(())
        }

        async fn claim(&self, lease: LeaseDoc) -> Result<LeaseDoc, CouchError> {
            self.reach().await?;
            if self.slow_claims.load(Ordering::SeqCst) {
                tokio::time::sleep(std::time::Duration::from_secs(60)).await;
            }
            self.put(lease)
        }

        async fn update(
            &self,
            leases: Vec<LeaseDoc>,
            me: &str,
        ) -> Result<Vec<Saved<LeaseDoc>>, CouchError> {
            self.reach().await?;
            self.check()?;
            let mut saved = Vec::new();
            for lease in leases {
                let stored: Option<LeaseDoc> = self.get(&lease.id);
                let lease =
                    if stored.as_ref().and_then(|s| s.rev.as_deref()) == lease.rev.as_deref() {
                        Some(lease)
                    } else {
                        lease.rebase(stored.as_ref(), me)
                    };
                saved.push(match lease {
                    Some(lease) => Saved::Written(self.put(lease)?),
                    None => Saved::Superseded(stored),
                });
            }
            Ok(saved)
        }
    }
}
