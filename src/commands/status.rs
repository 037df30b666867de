//! `spiegel status`: the workers of each role and their partitions, the
//! dead letters, and each document's state as the workers reported it in
//! their status documents ([`crate::status`]).

use chrono::Utc;
use serde_json::{json, Map, Value};

use crate::coordination::{settings_doc_id, DocIds};
use crate::couch::{AllDocsQuery, CouchClient, CouchError};
use crate::delivery::dead_letter::{self, DeadLetter};
use crate::status::status_doc_prefix;

/// What `spiegel status` shows: the workers of each role and their
/// partitions, and each document's state as the workers reported it.
pub async fn report(client: &CouchClient, db: &str, namespace: &str) -> Result<Value, CouchError> {
    let settings: Option<Value> = client.get_doc_opt(db, &settings_doc_id(namespace)).await?;
    let workers = docs_with_prefix(client, db, &DocIds::all_workers(namespace)).await?;
    let leases = docs_with_prefix(client, db, &DocIds::all_leases(namespace)).await?;
    let statuses = docs_with_prefix(client, db, &status_doc_prefix(namespace)).await?;
    let letters = dead_letter::list(client, db, namespace).await?;
    Ok(json!({
        "dead_letters": dead_letter_counts(&letters),
        "database": db,
        "installed": settings.is_some(),
        "partitions": settings.as_ref().and_then(|s| s.get("partitions")).cloned(),
        "roles": roles(&leases, &workers),
        "documents": documents(&statuses),
    }))
}

/// The documents whose ids start with `prefix`.
async fn docs_with_prefix(
    client: &CouchClient,
    db: &str,
    prefix: &str,
) -> Result<Vec<Value>, CouchError> {
    let rows = client
        .all_docs(db, &AllDocsQuery::prefix(prefix))
        .await?
        .rows;
    Ok(rows.into_iter().filter_map(|r| r.doc).collect())
}

/// Per role: its workers with their partitions and heartbeats, the
/// partitions without an owner, and the age of the oldest checkpoint.
fn roles(leases: &[Value], workers: &[Value]) -> Map<String, Value> {
    let mut roles = Map::new();
    let now = Utc::now();
    for lease in leases {
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
    for worker in workers {
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
    roles
}

/// Per document id, the state each worker reported.
fn documents(statuses: &[Value]) -> Map<String, Value> {
    let mut documents = Map::new();
    for status in statuses {
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
    documents
}

/// The number of dead letters, in total and per rule.
fn dead_letter_counts(letters: &[(String, String, DeadLetter)]) -> Value {
    let mut by_rule = Map::new();
    for (_, _, letter) in letters {
        let n = by_rule
            .get(&letter.rule)
            .and_then(Value::as_u64)
            .unwrap_or(0);
        by_rule.insert(letter.rule.clone(), json!(n + 1));
    }
    json!({ "total": letters.len(), "by_rule": by_rule })
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
