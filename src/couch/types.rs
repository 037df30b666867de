//! Shapes of CouchDB's answers that Spiegel reads.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;
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

    /// The seq as CouchDB sent it.
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
    /// The welcome text.
    pub couchdb: Option<String>,
    /// The server's version, e.g. `3.5.0`.
    pub version: String,
    /// Optional features the server announces.
    #[serde(default)]
    pub features: Vec<String>,
}

/// `GET /{db}`.
#[derive(Clone, Debug, Deserialize)]
pub struct DbInfo {
    /// The database's name.
    pub db_name: String,
    /// The seq of its last update.
    pub update_seq: Seq,
    /// Documents that exist.
    #[serde(default)]
    pub doc_count: u64,
    /// Documents deleted.
    #[serde(default)]
    pub doc_del_count: u64,
}

/// A row of `GET /_dbs_info` (CouchDB 3.2+).
#[derive(Clone, Debug, Deserialize)]
pub struct DbsInfoRow {
    /// The database name asked for.
    pub key: String,
    /// Its information, if it exists.
    #[serde(default)]
    pub info: Option<DbInfo>,
    /// Why there is none (`not_found`).
    #[serde(default)]
    pub error: Option<String>,
}

/// A successful document write.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct DocRev {
    /// The document's id.
    pub id: String,
    /// The revision written.
    pub rev: String,
}

/// One entry of a `_bulk_docs` answer: CouchDB answers per document, so a
/// conflict on one leaves the others written.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum BulkResult {
    /// Not written.
    Failed {
        /// The document's id.
        #[serde(default)]
        id: Option<String>,
        /// CouchDB's error, e.g. `conflict` or `forbidden`.
        error: String,
        /// CouchDB's explanation.
        #[serde(default)]
        reason: Option<String>,
        /// The revision (`new_edits: false` answers name it).
        #[serde(default)]
        rev: Option<String>,
    },
    /// Written.
    Written {
        /// The document's id.
        id: String,
        /// Its new revision.
        rev: String,
    },
}

impl BulkResult {
    /// True when the document was not written.
    pub fn is_failed(&self) -> bool {
        matches!(self, BulkResult::Failed { .. })
    }

    /// True when the document was not written for a conflict.
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
    /// Only these ids (a POST).
    pub keys: Option<Vec<String>>,
    /// With each document's body.
    pub include_docs: bool,
    /// With `include_docs`: add `_conflicts` to documents that have them.
    pub conflicts: bool,
    /// The first id of the range.
    pub start_key: Option<String>,
    /// The last id of the range.
    pub end_key: Option<String>,
    /// At most this many rows.
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

/// The answer of `_all_docs`.
#[derive(Clone, Debug, Deserialize)]
pub struct AllDocs<D = Value> {
    /// One row per id, in id order.
    pub rows: Vec<AllDocsRow<D>>,
}

/// A row of `_all_docs`. With `keys`, a missing id comes back as a row with
/// `error: "not_found"`, a deleted one with `value.deleted` and no doc.
/// `D` is how the body is read: a [`Value`] to look into, or a
/// `Box<RawValue>` to keep its text.
#[derive(Clone, Debug, Deserialize)]
pub struct AllDocsRow<D = Value> {
    /// The document's id (absent for a key not found).
    #[serde(default)]
    pub id: Option<String>,
    /// The key asked for.
    pub key: Value,
    /// The current revision.
    #[serde(default)]
    pub value: Option<AllDocsValue>,
    /// The body, with `include_docs` (a missing `Option` member reads as
    /// `None`).
    pub doc: Option<D>,
    /// Why there is no document (`not_found`).
    #[serde(default)]
    pub error: Option<String>,
}

/// The value of an `_all_docs` row.
#[derive(Clone, Debug, Deserialize)]
pub struct AllDocsValue {
    /// The current revision.
    pub rev: String,
    /// True for a deleted document (asked for by id).
    #[serde(default)]
    pub deleted: bool,
}

/// Parameters of `_changes`.
#[derive(Clone, Debug, Default)]
pub struct ChangesQuery {
    /// Changes after this seq (none: from the start).
    pub since: Option<Seq>,
    /// At most this many changes.
    pub limit: Option<u64>,
    /// With each document's body.
    pub include_docs: bool,
}

/// One row of `_changes`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct Change {
    /// Where the feed resumes after this change.
    pub seq: Seq,
    /// The document's id.
    pub id: String,
    /// The leaf revisions (`style=all_docs`).
    #[serde(default)]
    pub changes: Vec<ChangeRev>,
    /// True when the document was deleted.
    #[serde(default)]
    pub deleted: bool,
    /// The body, with `include_docs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub doc: Option<Doc>,
}

impl Change {
    /// The change's revision, `""` when `_changes` gave none.
    pub fn rev(&self) -> &str {
        self.changes.first().map_or("", |c| c.rev.as_str())
    }

    /// The changed document, or for a deletion its stub (`_id`, `_rev`,
    /// `_deleted`).
    pub fn doc_or_stub(&self) -> std::borrow::Cow<'_, Doc> {
        match &self.doc {
            Some(doc) if !self.deleted => std::borrow::Cow::Borrowed(doc),
            _ => std::borrow::Cow::Owned(Doc::from_value(serde_json::json!({
                "_id": self.id, "_rev": self.rev(), "_deleted": true
            }))),
        }
    }
}

/// A document as CouchDB sent it: its exact text, which is what Spiegel
/// passes on (key order, number text and escapes kept), and that text
/// parsed, which is what rules look into. Reading one fails where parsing
/// its text fails, so a change is never handled without its value.
#[derive(Clone, Debug)]
pub struct Doc {
    raw: Box<RawValue>,
    value: Value,
}

impl Doc {
    /// The document's JSON text, as received.
    pub fn raw(&self) -> &RawValue {
        &self.raw
    }

    /// The document parsed. Numbers are `f64` beyond the 64-bit integers.
    pub fn value(&self) -> &Value {
        &self.value
    }

    /// A document of Spiegel's own making (a deletion stub): its text is
    /// the value's compact JSON.
    pub fn from_value(value: Value) -> Doc {
        // A `Value` always serializes: its keys are strings.
        let raw = serde_json::value::to_raw_value(&value).expect("a Value serializes");
        Doc { raw, value }
    }
}

impl PartialEq for Doc {
    fn eq(&self, other: &Self) -> bool {
        self.raw.get() == other.raw.get()
    }
}

impl<'de> Deserialize<'de> for Doc {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = Box::<RawValue>::deserialize(deserializer)?;
        let value = serde_json::from_str(raw.get()).map_err(serde::de::Error::custom)?;
        Ok(Doc { raw, value })
    }
}

impl Serialize for Doc {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.raw.serialize(serializer)
    }
}

/// A revision of a change.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct ChangeRev {
    /// The revision.
    pub rev: String,
}

/// A page of a normal `_changes` request.
#[derive(Clone, Debug, Deserialize)]
pub struct ChangesPage {
    /// The changes, in the feed's order.
    pub results: Vec<Change>,
    /// Where the next page starts.
    pub last_seq: Seq,
    /// Changes left after this page, if the server says.
    #[serde(default)]
    pub pending: Option<u64>,
}

/// What happened to a database, from `_db_updates`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DbUpdateKind {
    /// The database was created.
    Created,
    /// A document of it was written.
    Updated,
    /// The database was deleted.
    Deleted,
    /// Anything a newer CouchDB may add (for example `ddoc_updated`).
    #[serde(other)]
    Other,
}

/// One event of `_db_updates`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct DbUpdate {
    /// The database.
    pub db_name: String,
    /// What happened.
    #[serde(rename = "type")]
    pub kind: DbUpdateKind,
    /// Where the feed resumes after this event.
    pub seq: Seq,
}

/// A page of a normal `_db_updates` request.
#[derive(Clone, Debug, Deserialize)]
pub struct DbUpdatesPage {
    /// The events, latest per database.
    pub results: Vec<DbUpdate>,
    /// Where the next page starts.
    pub last_seq: Seq,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hostile_input;
    use proptest::prelude::*;
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
    fn a_change_keeps_its_document_text_and_parses_it_for_rules() {
        let doc = r#"{"_id":"a","z":1.0,"b":18446744073709551616,"s":"\u00e9"}"#;
        let line = format!(r#"{{"seq":1,"id":"a","changes":[{{"rev":"1-x"}}],"doc":{doc}}}"#);
        let change: Change = serde_json::from_str(&line).unwrap();
        let read = change.doc.as_ref().unwrap();
        assert_eq!(read.raw().get(), doc);
        assert_eq!(read.value()["s"], "é");
        let written = serde_json::to_string(&change).unwrap();
        assert!(written.ends_with(&format!(r#""doc":{doc}}}"#)), "{written}");
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

    /// The text of a `_changes` or `_db_updates` page: its results any
    /// JSON or of the right shape with hostile members.
    fn page() -> impl Strategy<Value = (String, usize)> {
        let result = prop_oneof![
            hostile_input::json(),
            (hostile_input::text(), hostile_input::number(), hostile_input::json(), any::<bool>())
                .prop_map(|(id, seq, doc, deleted)| json!({
                    "seq": seq, "id": id, "changes": [{"rev": "1-a"}], "deleted": deleted, "doc": doc
                })),
            (hostile_input::text(), hostile_input::text())
                .prop_map(|(db_name, kind)| json!({"db_name": db_name, "type": kind, "seq": "1-a"})),
        ];
        (
            proptest::collection::vec(result, 0..8),
            prop_oneof![hostile_input::json(), Just(json!("9-z"))],
        )
            .prop_map(|(results, last_seq)| {
                let count = results.len();
                (
                    json!({"results": results, "last_seq": last_seq, "pending": 0}).to_string(),
                    count,
                )
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Any bytes decode as a page or a clear Err; a page has fewer
        /// results than its text has `{` and `[` (a struct may be written
        /// as an array too).
        #[test]
        fn a_page_of_any_bytes_decodes_or_errs_without_panic(bytes in hostile_input::bytes()) {
            let objects = hostile_input::count(&bytes, b'{') + hostile_input::count(&bytes, b'[');
            match serde_json::from_slice::<ChangesPage>(&bytes) {
                Ok(page) => prop_assert!(page.results.len() < objects),
                Err(error) => prop_assert!(!error.to_string().is_empty()),
            }
            if let Ok(page) = serde_json::from_slice::<DbUpdatesPage>(&bytes) {
                prop_assert!(page.results.len() < objects);
            }
            let _ = serde_json::from_slice::<Change>(&bytes);
            let _ = serde_json::from_slice::<DbUpdate>(&bytes);
        }

        /// A page of hostile results: at most as many as were sent, each
        /// change's document kept as the text it came as.
        #[test]
        fn a_page_of_hostile_results_decodes_or_errs_without_panic((text, sent) in page()) {
            if let Ok(page) = serde_json::from_str::<ChangesPage>(&text) {
                prop_assert_eq!(page.results.len(), sent);
                for change in &page.results {
                    if let Some(doc) = &change.doc {
                        prop_assert!(text.contains(doc.raw().get()));
                    }
                    let stub = change.doc_or_stub();
                    prop_assert!(stub.value().is_object() || !change.deleted);
                }
            }
            if let Ok(page) = serde_json::from_str::<DbUpdatesPage>(&text) {
                prop_assert_eq!(page.results.len(), sent);
            }
        }
    }

    #[test]
    fn a_page_nested_far_deeper_than_json_allows_is_an_error_not_a_stack_overflow() {
        let open = "[".repeat(100_000);
        let close = "]".repeat(100_000);
        for text in [
            format!(r#"{{"results":[{{"seq":1,"id":"a","doc":{open}{close}}}],"last_seq":1}}"#),
            format!(r#"{{"results":[],"last_seq":{open}{close}}}"#),
            format!(r#"{{"results":{open}{close},"last_seq":1}}"#),
        ] {
            assert!(serde_json::from_str::<ChangesPage>(&text).is_err());
            assert!(serde_json::from_str::<DbUpdatesPage>(&text).is_err());
        }
    }
}
