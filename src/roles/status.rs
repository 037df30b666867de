//! What each role reports about its documents: per document, how many runs
//! succeeded and failed, the last success, and the current errors by
//! database. Kept in memory and saved in batches, at most every few seconds
//! and only when something changed, as one document per worker
//! (`<namespace>spiegel_status_<worker id>`), which `spiegel status` reads.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::coordination::{DocIds, INTERNAL_PREFIX};
use crate::couch::{AllDocsQuery, CouchClient, CouchError};

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
    /// Why the document itself cannot be used, if it cannot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invalid: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Event {
    pub db: String,
    pub at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
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
}

impl StatusDoc {
    pub const KIND: &'static str = "spiegel_status";
}

pub fn status_doc_prefix(namespace: &str) -> String {
    format!("{namespace}{INTERNAL_PREFIX}status_")
}

/// The in-memory book of one worker, shared by its runs.
#[derive(Clone, Default)]
pub struct StatusBook {
    inner: Arc<Mutex<Book>>,
}

#[derive(Default)]
struct Book {
    docs: BTreeMap<String, DocStatus>,
    dirty: bool,
}

impl StatusBook {
    fn with<T>(&self, f: impl FnOnce(&mut Book) -> T) -> T {
        // A panic while holding this lock cannot leave the book half-written
        // in a way that matters: it only holds counters and messages.
        let mut book = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut book)
    }

    pub fn success(&self, doc: &str, db: &str, detail: Option<String>) {
        self.with(|b| {
            let s = b.docs.entry(doc.to_string()).or_default();
            s.succeeded += 1;
            s.errors.remove(db);
            s.last_success = Some(Event {
                db: db.into(),
                at: crate::coordination::timestamp(),
                detail,
            });
            b.dirty = true;
        });
    }

    pub fn failure(&self, doc: &str, db: &str, error: String) {
        self.with(|b| {
            let s = b.docs.entry(doc.to_string()).or_default();
            s.failed += 1;
            if s.errors.len() >= MAX_ERRORS && !s.errors.contains_key(db) {
                // Keep the newest: drop the oldest entry.
                if let Some(oldest) = s
                    .errors
                    .iter()
                    .min_by(|a, b| a.1.at.cmp(&b.1.at))
                    .map(|(k, _)| k.clone())
                {
                    s.errors.remove(&oldest);
                }
            }
            s.errors.insert(
                db.into(),
                Event {
                    db: db.into(),
                    at: crate::coordination::timestamp(),
                    detail: Some(error),
                },
            );
            b.dirty = true;
        });
    }

    /// Marks a document unusable (or usable again with `None`).
    pub fn invalid(&self, doc: &str, reason: Option<String>) {
        self.with(|b| {
            let s = b.docs.entry(doc.to_string()).or_default();
            if s.invalid != reason {
                s.invalid = reason;
                b.dirty = true;
            }
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

    pub fn snapshot(&self) -> BTreeMap<String, DocStatus> {
        self.with(|b| b.docs.clone())
    }

    fn take_if_dirty(&self) -> Option<BTreeMap<String, DocStatus>> {
        self.with(|b| std::mem::take(&mut b.dirty).then(|| b.docs.clone()))
    }
}

/// Saves the book every `interval` when it changed, until the process ends.
pub async fn save_periodically(
    client: CouchClient,
    db: String,
    namespace: String,
    role: String,
    worker_id: String,
    book: StatusBook,
    interval: Duration,
) {
    let id = format!("{}{worker_id}", status_doc_prefix(&namespace));
    let mut rev: Option<String> = None;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(docs) = book.take_if_dirty() else {
            continue;
        };
        let mut doc = StatusDoc {
            id: id.clone(),
            rev: rev.clone(),
            kind: StatusDoc::KIND.into(),
            role: role.clone(),
            worker_id: worker_id.clone(),
            updated_at: crate::coordination::timestamp(),
            docs,
        };
        let mut result = client.put_doc(&db, &id, &doc).await;
        if matches!(result, Err(CouchError::Conflict)) {
            // Our revision is stale (first save after a restart under the
            // same id): take the current one and write again.
            let current: Option<Value> = client.get_doc_opt(&db, &id).await.unwrap_or(None);
            doc.rev = current.and_then(|c| c.get("_rev").and_then(Value::as_str).map(String::from));
            result = client.put_doc(&db, &id, &doc).await;
        }
        match result {
            Ok(written) => rev = Some(written.rev),
            Err(e) => {
                tracing::warn!(role = %role, error = %e, "cannot save the status document; retrying later");
                book.with(|b| b.dirty = true);
            }
        }
    }
}

/// What `spiegel status` shows: the workers of each role and their
/// partitions, and each document's state as the workers reported it.
pub async fn report(client: &CouchClient, db: &str, namespace: &str) -> Result<Value, CouchError> {
    use serde_json::json;

    let range = |prefix: String| AllDocsQuery::prefix(&prefix);
    let docs_of = |rows: Vec<crate::couch::AllDocsRow>| {
        rows.into_iter()
            .filter_map(|r| r.doc)
            .collect::<Vec<Value>>()
    };
    let settings: Option<Value> = client
        .get_doc_opt(db, &crate::coordination::settings_doc_id(namespace))
        .await?;
    let workers = docs_of(
        client
            .all_docs(db, &range(DocIds::all_workers(namespace)))
            .await?
            .rows,
    );
    let leases = docs_of(
        client
            .all_docs(db, &range(DocIds::all_leases(namespace)))
            .await?
            .rows,
    );
    let statuses = docs_of(
        client
            .all_docs(db, &range(status_doc_prefix(namespace)))
            .await?
            .rows,
    );

    let mut roles = serde_json::Map::new();
    let now = Utc::now();
    for lease in &leases {
        let role = lease["role"].as_str().unwrap_or("?").to_string();
        let entry = roles.entry(role).or_insert_with(
            || json!({"workers": {}, "free_partitions": [], "oldest_checkpoint_age_seconds": null}),
        );
        // The oldest checkpoint tells how much a takeover would replay.
        let age = lease["checkpoint_at"]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map(|t| (now - t.with_timezone(&Utc)).num_seconds().max(0));
        if let Some(age) = age {
            let oldest = entry["oldest_checkpoint_age_seconds"].as_i64().unwrap_or(0);
            entry["oldest_checkpoint_age_seconds"] = json!(oldest.max(age));
        }
        match lease["owner"].as_str() {
            Some(owner) => {
                let mut partitions = entry["workers"][owner]["partitions"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                partitions.push(lease["partition"].clone());
                entry["workers"][owner] = json!({ "partitions": partitions });
            }
            None => {
                if let Some(free) = entry["free_partitions"].as_array_mut() {
                    free.push(lease["partition"].clone());
                }
            }
        }
    }
    for worker in &workers {
        let role = worker["role"].as_str().unwrap_or("?").to_string();
        let id = worker["worker_id"].as_str().unwrap_or("?").to_string();
        let entry = roles
            .entry(role)
            .or_insert_with(|| json!({"workers": {}, "free_partitions": []}));
        if entry["workers"].get(&id).is_none() {
            entry["workers"][&id] = json!({ "partitions": [] });
        }
        entry["workers"][&id]["heartbeats"] = worker["beats"].clone();
    }
    let mut documents = serde_json::Map::new();
    for status in &statuses {
        let Some(docs) = status["docs"].as_object() else {
            continue;
        };
        for (id, state) in docs {
            let mut state = state.clone();
            state["role"] = status["role"].clone();
            state["worker"] = status["worker_id"].clone();
            state["reported_at"] = status["updated_at"].clone();
            if let Some(list) = documents
                .entry(id.clone())
                .or_insert_with(|| json!([]))
                .as_array_mut()
            {
                list.push(state);
            }
        }
    }
    let mut dead_letters = serde_json::Map::new();
    let letters = crate::delivery::dead_letter::list(client, db, namespace).await?;
    for (_, _, letter) in &letters {
        let n = dead_letters
            .get(&letter.rule)
            .and_then(Value::as_u64)
            .unwrap_or(0);
        dead_letters.insert(letter.rule.clone(), json!(n + 1));
    }
    Ok(json!({
        "dead_letters": { "total": letters.len(), "by_rule": dead_letters },
        "database": db,
        "installed": settings.is_some(),
        "partitions": settings.as_ref().and_then(|s| s.get("partitions")).cloned(),
        "roles": roles,
        "documents": documents,
    }))
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
        .all_docs(db, &AllDocsQuery::prefix(&status_doc_prefix(namespace)))
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

/// The report as a readable text for a terminal.
pub fn render(report: &Value) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "spiegel database {}: {}",
        report["database"].as_str().unwrap_or("?"),
        if report["installed"] == Value::Bool(true) {
            format!("installed, {} partitions", report["partitions"])
        } else {
            "not installed".into()
        }
    );
    if let Some(roles) = report["roles"].as_object() {
        for (role, r) in roles {
            let _ = writeln!(out, "\n{role}:");
            if let Some(workers) = r["workers"].as_object() {
                for (id, w) in workers {
                    let n = w["partitions"].as_array().map_or(0, Vec::len);
                    let _ = writeln!(out, "  worker {id}: {n} partitions");
                }
            }
            if let Some(age) = r["oldest_checkpoint_age_seconds"].as_i64() {
                let _ = writeln!(out, "  oldest checkpoint saved {age} s ago");
            }
            let free = r["free_partitions"].as_array().map_or(0, Vec::len);
            if free > 0 {
                let _ = writeln!(out, "  {free} partitions without an owner");
            }
        }
    }
    let dead = report["dead_letters"]["total"].as_u64().unwrap_or(0);
    if dead > 0 {
        let _ = writeln!(
            out,
            "\ndead letters: {dead} (spiegel redeliver sends them again)"
        );
        if let Some(by_rule) = report["dead_letters"]["by_rule"].as_object() {
            for (rule, n) in by_rule {
                let _ = writeln!(out, "  {rule}: {n}");
            }
        }
    }
    if let Some(docs) = report["documents"].as_object() {
        let _ = writeln!(out, "\ndocuments:");
        for (id, reports) in docs {
            for r in reports.as_array().into_iter().flatten() {
                let _ = writeln!(
                    out,
                    "  {id} ({} on {}): {} succeeded, {} failed{}",
                    r["role"].as_str().unwrap_or("?"),
                    r["worker"].as_str().unwrap_or("?"),
                    r["succeeded"],
                    r["failed"],
                    r["invalid"]
                        .as_str()
                        .map(|e| format!("; UNUSABLE: {e}"))
                        .unwrap_or_default()
                );
                if let Some(errors) = r["errors"].as_object() {
                    for (db, e) in errors {
                        let _ = writeln!(
                            out,
                            "    {db}: {} ({})",
                            e["detail"].as_str().unwrap_or(""),
                            e["at"].as_str().unwrap_or("")
                        );
                    }
                }
            }
        }
    }
    out
}

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
