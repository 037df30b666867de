//! Per-database checkpoints of the change-listener: `spiegel_cl_<db_name>`
//! documents with `last_seq`, as Spiegel 1.2 wrote them, so that a running
//! 1.2 deployment resumes where it stopped, and a rollback to 1.2 finds
//! them as it reads them: 1.2's view indexes `"type": "change_listener"`
//! documents by `db_name`, and takes one without `dirty` for clean.
//!
//! Writes are coalesced: many databases' checkpoints go to CouchDB in one
//! `_bulk_docs` per flush, not one write per batch; a run reads its
//! database's checkpoint once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use crate::couch::{CouchClient, CouchError, Revised, Saved, Seq};
use crate::flush::{Flush, Turn};
use crate::ids::change_listener_checkpoint_id;

/// The document type Spiegel 1.2 reads. Spiegel 2.0.0-alpha.1 wrote
/// `change-listener`: such documents are found by id all the same and get
/// this type at their next save.
const CHECKPOINT_TYPE: &str = "change_listener";

#[derive(Clone)]
pub struct Checkpoints {
    client: CouchClient,
    db: String,
    inner: Arc<Mutex<HashMap<String, Entry>>>,
    turn: Arc<Turn>,
}

#[derive(Clone, Debug, Default)]
struct Entry {
    /// The stored document (to keep its revision and fields), if any.
    doc: Option<Value>,
    last_seq: Option<Seq>,
    dirty: bool,
    /// Taken by a flush whose write has not answered yet.
    saving: bool,
    /// Delete the document at the next flush.
    remove: bool,
}

impl Checkpoints {
    pub fn new(client: CouchClient, spiegel_db: &str) -> Self {
        Checkpoints {
            client,
            db: spiegel_db.into(),
            inner: Arc::default(),
            turn: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // A cache of documents; a poisoned lock is safe to reuse.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The database's checkpoint. Read from CouchDB at every call unless
    /// this worker has progress not saved yet: another worker may have
    /// handled the database meanwhile (a partition moves back and forth).
    pub async fn get(&self, db: &str) -> Result<Option<Seq>, CouchError> {
        // Progress not yet stored (or being stored) is newer than CouchDB's.
        if let Some(entry) = self.lock().get(db).filter(|e| e.dirty || e.saving) {
            return Ok(entry.last_seq.clone());
        }
        let doc: Option<Value> = self
            .client
            .get_doc_opt(&self.db, &change_listener_checkpoint_id(db))
            .await?;
        let last_seq = doc
            .as_ref()
            .and_then(|d| d.get("last_seq"))
            .filter(|s| !s.is_null())
            .cloned()
            .map(Seq::from);
        let mut cache = self.lock();
        let entry = cache.entry(db.to_string()).or_default();
        // On a cluster a read may come from a copy that has not received our
        // last write yet: a revision older than the one we wrote is stale.
        let stale = generation(doc.as_ref()) < generation(entry.doc.as_ref());
        if !entry.dirty && !entry.saving && !stale {
            entry.doc = doc;
            entry.last_seq = last_seq;
        }
        Ok(entry.last_seq.clone())
    }

    /// Records progress; saved at the next flush.
    pub fn set(&self, db: &str, seq: Seq) {
        let mut cache = self.lock();
        let entry = cache.entry(db.to_string()).or_default();
        entry.last_seq = Some(seq);
        entry.dirty = true;
        entry.remove = false;
    }

    /// Forgets the database's checkpoint (a deleted database), removing the
    /// document at the next flush.
    pub fn forget(&self, db: &str) {
        let mut cache = self.lock();
        let entry = cache.entry(db.to_string()).or_default();
        entry.last_seq = None;
        entry.dirty = true;
        entry.remove = true;
    }

    /// The documents to write, each marked as being saved.
    fn take_pending(&self) -> Vec<(String, Value)> {
        let mut cache = self.lock();
        cache
            .iter_mut()
            .filter(|(_, e)| e.dirty)
            .filter_map(|(db, e)| {
                e.dirty = false;
                let doc = if e.remove {
                    let rev = e.doc.as_ref()?.get("_rev")?.clone();
                    json!({ "_id": change_listener_checkpoint_id(db), "_rev": rev, "_deleted": true })
                } else {
                    checkpoint_doc(db, e)
                };
                e.saving = true;
                Some((db.clone(), doc))
            })
            .collect()
    }

    /// Takes in what became of a write.
    fn saved(&self, db: &str, saved: Option<Saved<Value>>) {
        let mut cache = self.lock();
        let Some(entry) = cache.get_mut(db) else {
            return;
        };
        entry.saving = false;
        match saved {
            Some(Saved::Written(_) | Saved::Superseded(_)) if entry.remove && !entry.dirty => {
                cache.remove(db);
            }
            Some(Saved::Written(doc)) => entry.doc = Some(doc),
            Some(Saved::Superseded(stored)) => entry.doc = stored,
            Some(Saved::Refused(e)) => {
                tracing::warn!(db = %db, error = %e, "checkpoint write refused; retrying");
                entry.dirty = true;
            }
            None => entry.dirty = true,
        }
    }
}

impl Flush for Checkpoints {
    fn turn(&self) -> &Turn {
        &self.turn
    }

    /// Writes every changed checkpoint in one request. A conflict (another
    /// worker wrote around a failover) is written again on the stored
    /// revision.
    async fn write_changes(&self) {
        let pending = self.take_pending();
        if pending.is_empty() {
            return;
        }
        let (dbs, docs): (Vec<String>, Vec<Value>) = pending.into_iter().unzip();
        let on_stored = |mut mine: Value, stored: Option<&Value>| {
            let rev = stored.and_then(|s| s.rev()).map(String::from);
            // A removal of a document already gone is done.
            if rev.is_none() && mine.get("_deleted").is_some() {
                return None;
            }
            mine.set_rev(rev);
            Some(mine)
        };
        match self.client.save_all(&self.db, docs, on_stored).await {
            Ok(results) => {
                for (db, saved) in dbs.iter().zip(results) {
                    self.saved(db, Some(saved));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot save change-listener checkpoints; retrying");
                for db in &dbs {
                    self.saved(db, None);
                }
            }
        }
    }
}

/// The generation of a document's revision (the `N` of `N-hash`; 0 for
/// none): later writes of one document have higher generations.
fn generation(doc: Option<&Value>) -> u64 {
    doc.and_then(|d| d.rev())
        .and_then(|rev| rev.split_once('-'))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or(0)
}

/// The checkpoint document of `db` as Spiegel 1.2 reads it, keeping the
/// stored document's other fields.
fn checkpoint_doc(db: &str, entry: &Entry) -> Value {
    let mut doc = entry
        .doc
        .clone()
        .unwrap_or_else(|| json!({ "_id": change_listener_checkpoint_id(db), "db_name": db }));
    doc["type"] = Value::from(CHECKPOINT_TYPE);
    doc["last_seq"] = serde_json::to_value(&entry.last_seq).unwrap_or(Value::Null);
    // Spiegel 1.2's lock fields mean nothing here.
    if let Some(obj) = doc.as_object_mut() {
        obj.remove("dirty");
        obj.remove("locked_at");
    }
    doc
}
