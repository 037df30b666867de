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
use std::time::Instant;

use serde_json::{json, Value};

use crate::couch::{CouchClient, CouchError, Revised, Saved, Seq};
use crate::flush::{Flush, Turn};
use crate::ids::change_listener_checkpoint_id;

use super::books::IDLE;

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
    /// When it was last read or set: a saved entry unused for
    /// [`IDLE`] is dropped (CouchDB has it).
    used: Option<Instant>,
}

impl Entry {
    /// Nothing of it waits to be written.
    fn saved(&self) -> bool {
        !self.dirty && !self.saving
    }
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
        entry.used = Some(Instant::now());
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
        entry.used = Some(Instant::now());
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

    /// Drops the saved entries of the databases for which `gone` holds
    /// (their partition is another worker's): what is dirty stays until
    /// written.
    pub fn evict_where(&self, gone: impl Fn(&str) -> bool) {
        self.lock().retain(|db, e| !(e.saved() && gone(db)));
    }

    /// Drops the saved entries not used for [`IDLE`] before `now`.
    fn evict_idle(&self, now: Instant) {
        let idle = |e: &Entry| {
            e.used
                .is_none_or(|at| now.saturating_duration_since(at) >= IDLE)
        };
        self.lock().retain(|_, e| !(e.saved() && idle(e)));
    }

    /// The databases with an entry.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().len()
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
    /// revision. Saved checkpoints unused for [`IDLE`] leave the cache
    /// first.
    async fn write_changes(&self) {
        self.evict_idle(Instant::now());
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::couch::SecretUrl;

    fn checkpoints() -> Checkpoints {
        let url = SecretUrl::parse("http://127.0.0.1:9/").expect("a URL");
        let client = CouchClient::new(&url, Default::default()).expect("a client");
        Checkpoints::new(client, "spiegel")
    }

    /// As a flush leaves what it wrote.
    fn written(checkpoints: &Checkpoints) {
        for (db, _) in checkpoints.take_pending() {
            checkpoints.lock().get_mut(&db).expect("taken").saving = false;
        }
    }

    #[test]
    fn saved_checkpoints_leave_the_cache_when_idle_or_gone_and_dirty_ones_stay() {
        let checkpoints = checkpoints();
        for n in 0..1000 {
            checkpoints.set(&format!("db{n}"), Seq::from(serde_json::json!(n)));
        }
        checkpoints.evict_idle(Instant::now() + IDLE);
        assert_eq!(checkpoints.len(), 1000, "not written yet: kept");
        written(&checkpoints);
        checkpoints.set("db1", Seq::from(serde_json::json!("newer")));
        checkpoints.evict_where(|db| db.starts_with("db1"));
        assert_eq!(
            checkpoints.len(),
            1000 - 111 + 1,
            "db1 is dirty again: kept"
        );
        checkpoints.evict_idle(Instant::now());
        assert_eq!(checkpoints.len(), 1000 - 111 + 1, "used just now: kept");
        checkpoints.evict_idle(Instant::now() + IDLE);
        assert_eq!(checkpoints.len(), 1, "only the dirty one is left");
    }
}
