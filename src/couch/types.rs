//! Shapes of CouchDB's answers that Spiegel reads.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// An update sequence from `_changes` or `_db_updates`.
///
/// Opaque by contract: an integer on a single node, a string in a cluster.
/// Spiegel never parses or compares one; it only stores a seq it received and
/// hands it back as `since`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Seq(Value);

impl Seq {
    /// `since=now`: only what happens from now on.
    pub fn now() -> Self {
        Seq(Value::String("now".into()))
    }

    /// The seq as CouchDB wants it in a `since` query parameter: strings as
    /// they are, anything else as JSON text.
    pub fn as_param(&self) -> String {
        match &self.0 {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        }
    }

    pub fn as_json(&self) -> &Value {
        &self.0
    }
}

impl From<Value> for Seq {
    fn from(v: Value) -> Self {
        Seq(v)
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_param())
    }
}

/// `GET /`. PouchDB Server and CouchDB differ in the welcome field, so only
/// the version is required.
#[derive(Clone, Debug, Deserialize)]
pub struct ServerInfo {
    pub couchdb: Option<String>,
    pub version: String,
    #[serde(default)]
    pub features: Vec<String>,
}

/// `GET /{db}`.
#[derive(Clone, Debug, Deserialize)]
pub struct DbInfo {
    pub db_name: String,
    pub update_seq: Seq,
    #[serde(default)]
    pub doc_count: u64,
    #[serde(default)]
    pub doc_del_count: u64,
}

/// A row of `GET /_dbs_info` (CouchDB 3.2+).
#[derive(Clone, Debug, Deserialize)]
pub struct DbsInfoRow {
    pub key: String,
    #[serde(default)]
    pub info: Option<DbInfo>,
    #[serde(default)]
    pub error: Option<String>,
}

/// A successful document write.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct DocRev {
    pub id: String,
    pub rev: String,
}

/// One entry of a `_bulk_docs` answer: CouchDB answers per document, so a
/// conflict on one leaves the others written.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum BulkResult {
    Failed {
        #[serde(default)]
        id: Option<String>,
        error: String,
        #[serde(default)]
        reason: Option<String>,
    },
    Written {
        id: String,
        rev: String,
    },
}

impl BulkResult {
    pub fn is_failed(&self) -> bool {
        matches!(self, BulkResult::Failed { .. })
    }

    pub fn is_conflict(&self) -> bool {
        matches!(self, BulkResult::Failed { error, .. } if error == "conflict")
    }
}

/// `(startkey, endkey)` covering every id that starts with `prefix`.
pub fn prefix_range(prefix: &str) -> (String, String) {
    (prefix.to_string(), format!("{prefix}\u{fff0}"))
}

/// Parameters of `_all_docs`.
#[derive(Clone, Debug, Default)]
pub struct AllDocsQuery {
    pub keys: Option<Vec<String>>,
    pub include_docs: bool,
    /// With `include_docs`: add `_conflicts` to documents that have them.
    pub conflicts: bool,
    pub start_key: Option<String>,
    pub end_key: Option<String>,
    pub limit: Option<u64>,
}

impl AllDocsQuery {
    /// Every document whose id starts with `prefix`, with its body.
    pub fn prefix(prefix: &str) -> Self {
        let (start, end) = prefix_range(prefix);
        AllDocsQuery {
            include_docs: true,
            start_key: Some(start),
            end_key: Some(end),
            ..Default::default()
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
pub struct AllDocs {
    pub rows: Vec<AllDocsRow>,
}

/// A row of `_all_docs`. With `keys`, a missing id comes back as a row with
/// `error: "not_found"`, a deleted one with `value.deleted` and no doc.
#[derive(Clone, Debug, Deserialize)]
pub struct AllDocsRow {
    #[serde(default)]
    pub id: Option<String>,
    pub key: Value,
    #[serde(default)]
    pub value: Option<AllDocsValue>,
    #[serde(default)]
    pub doc: Option<Value>,
    #[serde(default)]
    pub error: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct AllDocsValue {
    pub rev: String,
    #[serde(default)]
    pub deleted: bool,
}

/// Parameters of `_changes`.
#[derive(Clone, Debug, Default)]
pub struct ChangesQuery {
    pub since: Option<Seq>,
    pub limit: Option<u64>,
    pub include_docs: bool,
}

/// One row of `_changes`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct Change {
    pub seq: Seq,
    pub id: String,
    #[serde(default)]
    pub changes: Vec<ChangeRev>,
    #[serde(default)]
    pub deleted: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub doc: Option<Value>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct ChangeRev {
    pub rev: String,
}

/// A page of a normal `_changes` request.
#[derive(Clone, Debug, Deserialize)]
pub struct ChangesPage {
    pub results: Vec<Change>,
    pub last_seq: Seq,
    #[serde(default)]
    pub pending: Option<u64>,
}

/// What happened to a database, from `_db_updates`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DbUpdateKind {
    Created,
    Updated,
    Deleted,
    /// Anything a newer CouchDB may add (for example `ddoc_updated`).
    #[serde(other)]
    Other,
}

/// One event of `_db_updates`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct DbUpdate {
    pub db_name: String,
    #[serde(rename = "type")]
    pub kind: DbUpdateKind,
    pub seq: Seq,
}

/// A page of a normal `_db_updates` request.
#[derive(Clone, Debug, Deserialize)]
pub struct DbUpdatesPage {
    pub results: Vec<DbUpdate>,
    pub last_seq: Seq,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn seqs_stay_opaque_in_parameters() {
        let cluster: Seq = serde_json::from_value(json!("12-g1AAAA")).unwrap();
        assert_eq!(cluster.as_param(), "12-g1AAAA");
        let single: Seq = serde_json::from_value(json!(12)).unwrap();
        assert_eq!(single.as_param(), "12");
        assert_eq!(serde_json::to_value(&cluster).unwrap(), json!("12-g1AAAA"));
    }

    #[test]
    fn bulk_results_tell_conflicts_apart() {
        let rows: Vec<BulkResult> = serde_json::from_value(json!([
            {"ok": true, "id": "a", "rev": "1-x"},
            {"id": "b", "error": "conflict", "reason": "Document update conflict."}
        ]))
        .unwrap();
        assert!(matches!(&rows[0], BulkResult::Written { id, .. } if id == "a"));
        assert!(rows[1].is_conflict());
    }

    #[test]
    fn unknown_db_update_kinds_are_tolerated() {
        let u: DbUpdate =
            serde_json::from_value(json!({"db_name": "a", "type": "ddoc_updated", "seq": "1-x"}))
                .unwrap();
        assert_eq!(u.kind, DbUpdateKind::Other);
    }
}
