//! The status book: what each role reports about its documents while it
//! runs. Per document, how many runs succeeded and failed, the last success,
//! and the current errors by database. Kept in memory and saved in batches,
//! at most every few seconds and only when something changed, as one
//! document per worker (`<namespace>spiegel_status_<worker id>`). The roles
//! write it; `spiegel status` reads it, and a
//! starting replicator reads which documents were already reported on.

mod tail;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

pub use self::tail::Tail;
use crate::couch::{impl_revised, AllDocsQuery, CouchClient, CouchError};
use crate::flush::{Flush, Turn};

/// Errors kept per document: enough to see a pattern, bounded for
/// templated documents over thousands of databases.
const MAX_ERRORS: usize = 20;

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct DocStatus {
    pub succeeded: u64,
    pub failed: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success: Option<Event>,
    /// The last error of each database that is failing now.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub errors: BTreeMap<String, Event>,
    /// Per database, the last revisions its target refused for good and
    /// that were passed over (a validation function, a document too
    /// large): kept after later successes, for an operator to see.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub passed_over: BTreeMap<String, Event>,
    /// Why the document itself cannot be used, if it cannot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invalid: Option<String>,
    /// What an operator should know about how the document runs (a
    /// parameter that sends it to another engine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Event {
    pub db: String,
    pub at: String,
    /// For an error: when the database's errors in a row began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// Records `detail` as the last event of `db`, keeping the time its events
/// in a row began, and at most [`MAX_ERRORS`] databases (the oldest goes).
fn record(events: &mut BTreeMap<String, Event>, db: &str, detail: String) {
    if events.len() >= MAX_ERRORS && !events.contains_key(db) {
        let oldest = events.iter().min_by(|a, b| a.1.at.cmp(&b.1.at));
        if let Some(oldest) = oldest.map(|(k, _)| k.clone()) {
            events.remove(&oldest);
        }
    }
    let at = crate::ids::timestamp();
    let since = events.get(db).map(|e| e.since.as_ref().unwrap_or(&e.at));
    let since = Some(since.unwrap_or(&at).clone());
    let db = db.to_string();
    let detail = Some(detail);
    events.insert(
        db.clone(),
        Event {
            db,
            at,
            since,
            detail,
        },
    );
}

/// The status document of one worker.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusDoc {
    #[serde(rename = "_id")]
    pub id: String,
    #[serde(rename = "_rev", default, skip_serializing_if = "Option::is_none")]
    pub rev: Option<String>,
    #[serde(rename = "type")]
    pub kind: String,
    pub role: String,
    pub worker_id: String,
    pub updated_at: String,
    pub docs: BTreeMap<String, DocStatus>,
    /// The worker's API endpoints whose circuit is not closed, with its
    /// state (`open`, `half-open`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub circuits: BTreeMap<String, String>,
    /// The worker's catch-up, while one runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catch_up: Option<CatchUpStatus>,
}

/// How far a worker's catch-up over the databases' history is (a first
/// start, or a takeover's replay).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CatchUpStatus {
    /// Databases found so far.
    pub found: u64,
    /// Of those, handled.
    pub handled: u64,
    /// Databases are still being listed: more may be found.
    pub listing: bool,
    /// Databases handled per second, since it began.
    pub per_second: f64,
    /// At that rate, once the listing is done.
    pub seconds_left: Option<u64>,
}

impl StatusDoc {
    pub const KIND: &'static str = "spiegel_status";
}

/// The in-memory book of one worker, shared by its runs, and where it is
/// saved ([`Flush`]). The default book is saved nowhere.
#[derive(Clone, Default)]
pub struct StatusBook {
    inner: Arc<Mutex<Book>>,
    target: Option<Arc<Target>>,
    turn: Arc<Turn>,
    /// Where each outcome is also told, with the role's name: the
    /// console's live tail.
    tail: Option<(String, Arc<Tail>)>,
}

#[derive(Default)]
struct Book {
    docs: BTreeMap<String, DocStatus>,
    circuits: BTreeMap<String, String>,
    catch_up: Option<CatchUpStatus>,
    dirty: bool,
    /// The revision of the status document, once saved.
    rev: Option<String>,
}

/// Where a book is saved: its worker's status document.
pub struct Target {
    pub client: CouchClient,
    /// The spiegel database.
    pub db: String,
    pub namespace: String,
    pub role: String,
    pub worker_id: String,
}

impl StatusBook {
    /// An empty book saved in `target`.
    pub fn saved_in(target: Target) -> Self {
        StatusBook {
            target: Some(Arc::new(target)),
            ..Default::default()
        }
    }

    /// Tells each outcome to the process's live tail too.
    pub fn with_tail(mut self, role: &str, tail: Arc<Tail>) -> Self {
        self.tail = Some((role.to_string(), tail));
        self
    }

    fn tell(&self, doc: &str, db: &str, ok: bool, detail: Option<&String>) {
        if let Some((role, tail)) = &self.tail {
            tail.push(role, doc, db, ok, detail.cloned());
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Book) -> T) -> T {
        // A panic while holding this lock cannot leave the book half-written
        // in a way that matters: it only holds counters and messages.
        let mut book = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut book)
    }

    pub fn success(&self, doc: &str, db: &str, detail: Option<String>) {
        self.tell(doc, db, true, detail.as_ref());
        self.with(|b| {
            let s = b.docs.entry(doc.to_string()).or_default();
            s.succeeded += 1;
            s.errors.remove(db);
            s.last_success = Some(Event {
                db: db.into(),
                at: crate::ids::timestamp(),
                since: None,
                detail,
            });
            b.dirty = true;
        });
    }

    pub fn failure(&self, doc: &str, db: &str, error: String) {
        self.tell(doc, db, false, Some(&error));
        self.with(|b| {
            let s = b.docs.entry(doc.to_string()).or_default();
            s.failed += 1;
            record(&mut s.errors, db, error);
            b.dirty = true;
        });
    }

    /// Records revisions of `db` that its target refused for good and that
    /// were passed over.
    pub fn passed_over(&self, doc: &str, db: &str, detail: String) {
        self.with(|b| {
            let s = b.docs.entry(doc.to_string()).or_default();
            record(&mut s.passed_over, db, detail);
            b.dirty = true;
        });
    }

    /// Marks a document unusable (or usable again with `None`).
    pub fn invalid(&self, doc: &str, reason: Option<String>) {
        self.set(doc, reason, |s| &mut s.invalid);
    }

    /// Sets (or clears, with `None`) the document's note.
    pub fn note(&self, doc: &str, note: Option<String>) {
        self.set(doc, note, |s| &mut s.note);
    }

    /// Sets one field of a document's status, dirty only if it changed.
    fn set(
        &self,
        doc: &str,
        value: Option<String>,
        field: fn(&mut DocStatus) -> &mut Option<String>,
    ) {
        self.with(|b| {
            let slot = field(b.docs.entry(doc.to_string()).or_default());
            if *slot != value {
                *slot = value;
                b.dirty = true;
            }
        });
    }

    /// Records an API endpoint's circuit state; `None` when it is closed.
    pub fn circuit(&self, endpoint: &str, state: Option<&str>) {
        self.with(|b| {
            let changed = match state {
                Some(state) => {
                    b.circuits.insert(endpoint.into(), state.into()).as_deref() != Some(state)
                }
                None => b.circuits.remove(endpoint).is_some(),
            };
            b.dirty |= changed;
        });
    }

    /// The worker's catch-up, or None once it ended.
    pub fn catch_up(&self, progress: Option<CatchUpStatus>) {
        self.with(|b| {
            b.dirty |= b.catch_up != progress;
            b.catch_up = progress;
        });
    }

    /// Forgets documents that no longer exist.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.with(|b| {
            let before = b.docs.len();
            b.docs.retain(|id, _| keep(id));
            b.dirty |= b.docs.len() != before;
        });
    }

    #[cfg(test)]
    pub fn snapshot(&self) -> BTreeMap<String, DocStatus> {
        self.with(|b| b.docs.clone())
    }

    /// What to save, if anything changed: the documents' statuses and the
    /// circuits.
    fn take_if_dirty(&self) -> Option<Saved> {
        self.with(|b| {
            std::mem::take(&mut b.dirty).then(|| Saved {
                docs: b.docs.clone(),
                circuits: b.circuits.clone(),
                catch_up: b.catch_up.clone(),
            })
        })
    }
}

impl std::fmt::Debug for StatusBook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let saved_as = self.target.as_ref().map(|t| &t.worker_id);
        f.debug_struct("StatusBook")
            .field("saved_as", &saved_as)
            .finish_non_exhaustive()
    }
}

/// What a status document is written with.
struct Saved {
    docs: BTreeMap<String, DocStatus>,
    circuits: BTreeMap<String, String>,
    catch_up: Option<CatchUpStatus>,
}

impl Flush for StatusBook {
    fn turn(&self) -> &Turn {
        &self.turn
    }

    /// Writes the status document if the book changed.
    async fn write_changes(&self) {
        let Some(target) = &self.target else {
            return;
        };
        let Some(Saved {
            docs,
            circuits,
            catch_up,
        }) = self.take_if_dirty()
        else {
            return;
        };
        let doc = StatusDoc {
            id: format!(
                "{}{}",
                crate::ids::status_doc_prefix(&target.namespace),
                target.worker_id
            ),
            rev: self.with(|b| b.rev.clone()),
            kind: StatusDoc::KIND.into(),
            role: target.role.clone(),
            worker_id: target.worker_id.clone(),
            updated_at: crate::ids::timestamp(),
            docs,
            circuits,
            catch_up,
        };
        match target.client.save(&target.db, doc).await {
            Ok(saved) => self.with(|b| b.rev = saved.rev),
            Err(e) => {
                tracing::warn!(role = %target.role, error = %e, "cannot save the status document; retrying later");
                self.with(|b| b.dirty = true);
            }
        }
    }
}

/// Ids of the documents of `role` that some worker reported on.
pub async fn reported_docs(
    client: &CouchClient,
    db: &str,
    namespace: &str,
    role: &str,
) -> Result<std::collections::HashSet<String>, CouchError> {
    // Only the status documents: the rest of the report is not needed.
    let statuses = client
        .all_docs(
            db,
            &AllDocsQuery::prefix(&crate::ids::status_doc_prefix(namespace)),
        )
        .await?;
    let mut ids = std::collections::HashSet::new();
    for status in statuses.rows.into_iter().filter_map(|r| r.doc) {
        if status["role"] == role {
            if let Some(docs) = status["docs"].as_object() {
                ids.extend(docs.keys().cloned());
            }
        }
    }
    Ok(ids)
}

impl_revised!(StatusDoc);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn success_clears_the_databases_error_and_errors_stay_bounded() {
        let book = StatusBook::default();
        book.failure("r", "a", "boom".into());
        book.success("r", "a", None);
        let s = &book.snapshot()["r"];
        assert_eq!((s.succeeded, s.failed), (1, 1));
        assert!(s.errors.is_empty());
        for i in 0..100 {
            book.failure("r", &format!("db{i}"), "x".into());
        }
        assert_eq!(book.snapshot()["r"].errors.len(), MAX_ERRORS);
        assert!(book.take_if_dirty().is_some());
        assert!(book.take_if_dirty().is_none(), "saved only when changed");
    }
}
