//! The endpoints of CouchDB's replication protocol that the native engine
//! ([`crate::replication`]) calls: a filtered `_changes` page, `_revs_diff`,
//! `_bulk_get` (with `GET ?open_revs=` where it is missing), and `_bulk_docs`
//! with `new_edits: false`.

use std::collections::BTreeMap;

use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

use super::{
    doc_path, encode_segment, BulkResult, ChangesPage, CouchClient, CouchError, Result, Seq,
};

/// Which changes a replication reads: CouchDB's `filter`, `query_params`,
/// `selector` and `doc_ids` replication parameters.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ChangesFilter {
    /// A filter function of the source, `ddoc/name`.
    pub filter: Option<String>,
    /// Parameters passed to the filter function.
    pub query_params: Map<String, Value>,
    /// A Mango selector.
    pub selector: Option<Value>,
    /// Only these documents.
    pub doc_ids: Option<Vec<String>>,
}

/// What a target lacks of one document, from `_revs_diff`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct RevsDiff {
    /// The revisions the target does not have.
    #[serde(default)]
    pub missing: Vec<String>,
    /// Revisions the target has that may be ancestors of the missing ones.
    #[serde(default)]
    pub possible_ancestors: Vec<String>,
}

/// One revision to fetch, with the revisions whose attachments the target
/// already has.
#[derive(Clone, Debug, Serialize)]
pub struct RevToFetch {
    /// The document id.
    pub id: String,
    /// The revision.
    pub rev: String,
    /// Ancestors the target has: their attachments come as stubs. Left
    /// out when empty: `[]` would leave as stubs the attachments of
    /// revision position 0, which a write with `new_edits: false` can give.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub atts_since: Vec<String>,
}

/// A document revision as the source sent it: its JSON text, carried to
/// the target as it is. Parsing it into a tree and writing it again would
/// reorder its keys and re-encode its numbers.
pub type RawDoc = Box<RawValue>;

/// What the source gave for one revision asked of `_bulk_get`.
#[derive(Debug)]
pub enum Fetched {
    /// The revision, or with `latest` its newest descendants.
    Docs(Vec<RawDoc>),
    /// Not given, and why: to ask again with `open_revs`.
    Missing(String),
}

/// The answer of `_bulk_get`, each document left as text.
#[derive(Deserialize)]
struct BulkGetAnswer {
    results: Vec<BulkGetResult>,
}

/// The answer for one revision asked of `_bulk_get`.
#[derive(Deserialize)]
struct BulkGetResult {
    id: String,
    #[serde(default)]
    docs: Vec<BulkGetEntry>,
}

/// `{"ok": doc}` or `{"error": {...}}`.
#[derive(Deserialize)]
struct BulkGetEntry {
    ok: Option<RawDoc>,
    error: Option<Box<RawValue>>,
}

impl BulkGetAnswer {
    /// One [`Fetched`] per revision of `revs`: CouchDB answers each in the
    /// order asked.
    fn align(self, revs: &[RevToFetch]) -> Vec<Fetched> {
        let mut results = self.results.into_iter();
        revs.iter()
            .map(|wanted| match results.next() {
                Some(result) if result.id == wanted.id => result.fetched(),
                Some(result) => Fetched::Missing(format!("answered for {:?}", result.id)),
                None => Fetched::Missing("absent from the answer".into()),
            })
            .collect()
    }
}

impl BulkGetResult {
    /// Every document of the result, or why there is none; a result with an
    /// error beside documents counts as missing, so that it is asked again.
    fn fetched(self) -> Fetched {
        let mut docs = Vec::with_capacity(self.docs.len());
        for entry in self.docs {
            match (entry.ok, entry.error) {
                (Some(doc), None) => docs.push(doc),
                (_, Some(error)) => return Fetched::Missing(error.get().to_string()),
                (None, None) => {
                    return Fetched::Missing("an entry with neither ok nor error".into())
                }
            }
        }
        if docs.is_empty() {
            return Fetched::Missing("no document in the answer".into());
        }
        Fetched::Docs(docs)
    }
}

/// `{"ok": doc}` or `{"missing": rev}` of an `open_revs` answer.
#[derive(Deserialize)]
struct OpenRevsEntry {
    ok: Option<RawDoc>,
    missing: Option<String>,
}

/// What `open_revs` gave for one document.
#[derive(Debug, Default)]
pub struct OpenRevs {
    /// The revisions found (or with `latest` their newest descendants).
    pub docs: Vec<RawDoc>,
    /// The revisions asked for that the source did not give.
    pub missing: Vec<String>,
}

impl OpenRevs {
    /// Sorts the answer to `revs`: a revision is missing when the server
    /// says so, or when it gave no document at all.
    fn of(revs: &[String], answer: Vec<OpenRevsEntry>) -> OpenRevs {
        let mut found = OpenRevs::default();
        for entry in answer {
            match (entry.ok, entry.missing) {
                (Some(doc), _) => found.docs.push(doc),
                (None, Some(rev)) => found.missing.push(rev),
                (None, None) => {}
            }
        }
        if found.docs.is_empty() {
            found.missing = revs.to_vec();
        }
        found
    }
}

impl CouchClient {
    /// One page of a database's changes, every leaf revision of each
    /// (`style=all_docs`) unless `winning_only`.
    pub async fn changes_page(
        &self,
        db: &str,
        since: Option<&Seq>,
        limit: u64,
        filter: &ChangesFilter,
        winning_only: bool,
    ) -> Result<ChangesPage> {
        let path = format!("{}/_changes", encode_segment(db));
        let mut params: Vec<(String, String)> = vec![("limit".into(), limit.to_string())];
        if let Some(since) = since {
            params.push(("since".into(), since.as_param()));
        }
        if !winning_only {
            params.push(("style".into(), "all_docs".into()));
        }
        let (method, body) = filter_params(filter, &mut params);
        let mut req = self.request(method, &path).query(&params);
        if let Some(body) = body {
            req = req.json(&body);
        }
        self.json(req, Some(db), None).await
    }

    /// `POST /{db}/_revs_diff`: which of `revs` the database lacks.
    pub async fn revs_diff(
        &self,
        db: &str,
        revs: &BTreeMap<String, Vec<String>>,
    ) -> Result<BTreeMap<String, RevsDiff>> {
        let path = format!("{}/_revs_diff", encode_segment(db));
        let req = self.request(Method::POST, &path).json(revs);
        self.json(req, Some(db), None).await
    }

    /// `POST /{db}/_local_docs?include_docs=true` with `keys`: the local
    /// documents `ids` (each `_local/…`) in one request, None for those
    /// that do not exist. A server without it answers
    /// [`CouchError::DocNotFound`] (about `_local_docs`) or
    /// [`CouchError::BadRequest`].
    pub async fn local_docs(&self, db: &str, ids: &[String]) -> Result<Vec<Option<Value>>> {
        #[derive(Deserialize)]
        struct Rows {
            rows: Vec<Row>,
        }
        #[derive(Deserialize)]
        struct Row {
            key: String,
            doc: Option<Value>,
            error: Option<String>,
        }
        let path = format!("{}/_local_docs", encode_segment(db));
        let req = self
            .request(Method::POST, &path)
            .query(&[("include_docs", "true")])
            .json(&json!({ "keys": ids }));
        let answer: Rows = self.json(req, Some(db), Some("_local_docs")).await?;
        let mut found: BTreeMap<String, Row> = answer
            .rows
            .into_iter()
            .map(|r| (r.key.clone(), r))
            .collect();
        ids.iter()
            .map(|id| match found.remove(id) {
                Some(Row { doc: Some(doc), .. }) => Ok(Some(doc)),
                Some(Row { error: Some(e), .. }) if e != "not_found" => Err(CouchError::Decode(
                    format!("_local_docs answered {e} for {id}"),
                )),
                _ => Ok(None),
            })
            .collect()
    }

    /// `POST /{db}/_bulk_get?revs=true&latest=true`: the revisions with
    /// their history, in one request; with `attachments`, the attachments'
    /// data inline as well, else their stubs. One
    /// [`Fetched`] per revision asked for, in order: an error CouchDB gave
    /// for a revision, or a revision absent from the answer, is
    /// [`Fetched::Missing`]. [`CouchError::NotFound`] or
    /// [`CouchError::BadRequest`] when the server has no `_bulk_get`;
    /// [`CouchError::Decode`] for an answer of another shape.
    pub async fn bulk_get(
        &self,
        db: &str,
        revs: &[RevToFetch],
        attachments: bool,
    ) -> Result<Vec<Fetched>> {
        let path = format!("{}/_bulk_get", encode_segment(db));
        let req = self
            .request(Method::POST, &path)
            .query(&[
                ("revs", "true"),
                ("attachments", if attachments { "true" } else { "false" }),
                ("latest", "true"),
            ])
            .json(&json!({ "docs": revs }));
        let answer: BulkGetAnswer = self.json(req, Some(db), None).await?;
        Ok(answer.align(revs))
    }

    /// `GET /{db}/{id}?open_revs=[...]&revs=true&latest=true`: the
    /// revisions of one document that [`Self::bulk_get`] did not give, or
    /// all of them on servers without `_bulk_get`; attachments as stubs.
    pub async fn open_revs(&self, db: &str, id: &str, revs: &[String]) -> Result<OpenRevs> {
        let open = serde_json::to_string(revs).map_err(|e| CouchError::Decode(e.to_string()))?;
        let req = self
            .request(Method::GET, &doc_path(db, id)?)
            .header(reqwest::header::ACCEPT, "application/json")
            .query(&[
                ("open_revs", open.as_str()),
                ("revs", "true"),
                ("latest", "true"),
            ]);
        let answer: Vec<OpenRevsEntry> = self.json(req, Some(db), Some(id)).await?;
        Ok(OpenRevs::of(revs, answer))
    }

    /// `POST /{db}/_bulk_docs` with `new_edits: false`: stores revisions as
    /// they are, history included, each as the text the source sent.
    /// Returns the documents CouchDB refused.
    pub async fn bulk_docs_replicated(&self, db: &str, docs: &[RawDoc]) -> Result<Vec<BulkResult>> {
        let failed = self.bulk_docs(db, docs, false).await?;
        Ok(failed.into_iter().filter(BulkResult::is_failed).collect())
    }

    /// `PUT /{db}` with creation parameters (`q`, `n`, `partitioned`).
    pub async fn create_db_with(&self, db: &str, params: &Map<String, Value>) -> Result<bool> {
        let query: Vec<(String, String)> = params
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.as_str().map_or_else(|| v.to_string(), String::from),
                )
            })
            .collect();
        let req = self.request(Method::PUT, &encode_segment(db)).query(&query);
        match self.json::<Value>(req, Some(db), None).await {
            Ok(_) => Ok(true),
            Err(CouchError::PreconditionFailed(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// Adds a filter's query parameters; returns the method and body it needs
/// (`selector` and `doc_ids` are sent in a POST body).
fn filter_params(
    filter: &ChangesFilter,
    params: &mut Vec<(String, String)>,
) -> (Method, Option<Value>) {
    if let Some(selector) = &filter.selector {
        params.push(("filter".into(), "_selector".into()));
        return (Method::POST, Some(json!({ "selector": selector })));
    }
    if let Some(ids) = &filter.doc_ids {
        params.push(("filter".into(), "_doc_ids".into()));
        return (Method::POST, Some(json!({ "doc_ids": ids })));
    }
    if let Some(name) = &filter.filter {
        params.push(("filter".into(), name.clone()));
        for (k, v) in &filter.query_params {
            let text = v.as_str().map_or_else(|| v.to_string(), String::from);
            params.push((k.clone(), text));
        }
    }
    (Method::GET, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hostile_input;
    use proptest::prelude::*;

    fn wanted(id: &str, rev: &str) -> RevToFetch {
        RevToFetch {
            id: id.into(),
            rev: rev.into(),
            atts_since: Vec::new(),
        }
    }

    fn fetched(answer: &str, revs: &[RevToFetch]) -> Vec<Fetched> {
        serde_json::from_str::<BulkGetAnswer>(answer)
            .unwrap()
            .align(revs)
    }

    #[test]
    fn bulk_get_documents_keep_the_text_the_source_sent() {
        let doc = r#"{"_id":"a","_rev":"1-x","zeta":1,"alpha":-0.0,"n":18446744073709551616}"#;
        let answer = format!(r#"{{"results":[{{"id":"a","docs":[{{"ok":{doc}}}]}}]}}"#);
        let got = fetched(&answer, &[wanted("a", "1-x")]);
        let [Fetched::Docs(docs)] = got.as_slice() else {
            panic!("{got:?}")
        };
        assert_eq!(docs[0].get(), doc);
    }

    #[test]
    fn bulk_get_errors_and_absent_revisions_are_missing() {
        let answer = r#"{"results":[
            {"id":"a","docs":[{"error":{"id":"a","rev":"1-x","error":"not_found","reason":"missing"}}]},
            {"id":"b","docs":[]},
            {"id":"x","docs":[{"ok":{"_id":"x"}}]}
        ]}"#;
        let revs = [
            wanted("a", "1-x"),
            wanted("b", "1-y"),
            wanted("c", "1-z"),
            wanted("d", "1-w"),
        ];
        let got = fetched(answer, &revs);
        assert_eq!(got.len(), 4);
        assert!(
            got.iter().all(|f| matches!(f, Fetched::Missing(_))),
            "{got:?}"
        );
        let Fetched::Missing(why) = &got[0] else {
            unreachable!()
        };
        assert!(why.contains("not_found"), "{why}");
    }

    #[test]
    fn open_revs_sorts_documents_from_missing_revisions() {
        let revs = ["1-a".to_string(), "1-b".to_string()];
        let answer: Vec<OpenRevsEntry> =
            serde_json::from_str(r#"[{"ok":{"_id":"d","_rev":"1-a"}},{"missing":"1-b"}]"#).unwrap();
        let got = OpenRevs::of(&revs, answer);
        assert_eq!(got.docs.len(), 1);
        assert_eq!(got.missing, ["1-b"]);
        let answer: Vec<OpenRevsEntry> = serde_json::from_str(r#"[{"other":1}]"#).unwrap();
        assert_eq!(OpenRevs::of(&revs, answer).missing, revs);
    }

    /// A `_bulk_get` entry: a document, an error, both, neither, or any
    /// JSON.
    fn entry() -> impl Strategy<Value = serde_json::Value> {
        prop_oneof![
            hostile_input::json().prop_map(|doc| json!({"ok": doc})),
            hostile_input::json().prop_map(|e| json!({"error": e})),
            (hostile_input::json(), hostile_input::json())
                .prop_map(|(d, e)| json!({"ok": d, "error": e})),
            hostile_input::json(),
        ]
    }

    /// The text of a `_bulk_get` answer with hostile results for ids `a`
    /// to `d`, and the revisions asked for.
    fn bulk_get() -> impl Strategy<Value = (String, Vec<RevToFetch>)> {
        let id = proptest::sample::select(&["a", "b", "c", "d"][..]);
        let result = prop_oneof![
            (id.clone(), proptest::collection::vec(entry(), 0..4))
                .prop_map(|(id, docs)| json!({"id": id, "docs": docs})),
            hostile_input::json(),
        ];
        (
            proptest::collection::vec(result, 0..6),
            proptest::collection::vec(id, 0..6),
        )
            .prop_map(|(results, ids)| {
                let revs = ids.into_iter().map(|id| wanted(id, "1-x")).collect();
                (json!({ "results": results }).to_string(), revs)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Any bytes decode as an answer or a clear Err; an answer gives
        /// one result per revision asked for, whatever it holds.
        #[test]
        fn a_bulk_get_answer_of_any_bytes_decodes_or_errs_without_panic(
            bytes in hostile_input::bytes(),
            ids in proptest::collection::vec(hostile_input::text(), 0..4),
        ) {
            let revs: Vec<RevToFetch> = ids.iter().map(|id| wanted(id, "1-x")).collect();
            if let Ok(answer) = serde_json::from_slice::<BulkGetAnswer>(&bytes) {
                prop_assert_eq!(answer.align(&revs).len(), revs.len());
            }
            if let Ok(answer) = serde_json::from_slice::<Vec<OpenRevsEntry>>(&bytes) {
                let entries = answer.len();
                let revs = ids.clone();
                let found = OpenRevs::of(&revs, answer);
                prop_assert!(found.docs.len() <= entries);
                prop_assert!(found.missing.len() <= entries.max(revs.len()));
            }
        }

        /// An answer of hostile results: one per revision asked for, the
        /// documents only of a result for that revision's id and without
        /// an error, kept as the text they came as.
        #[test]
        fn a_bulk_get_answer_of_hostile_results_aligns_with_the_revisions_asked(
            (text, revs) in bulk_get(),
        ) {
            let Ok(answer) = serde_json::from_str::<BulkGetAnswer>(&text) else {
                return Ok(());
            };
            let ids: Vec<String> = answer.results.iter().map(|r| r.id.clone()).collect();
            let got = answer.align(&revs);
            prop_assert_eq!(got.len(), revs.len());
            for (i, fetched) in got.iter().enumerate() {
                if let Fetched::Docs(docs) = fetched {
                    prop_assert_eq!(ids.get(i), Some(&revs[i].id));
                    prop_assert!(!docs.is_empty());
                    for doc in docs {
                        prop_assert!(text.contains(doc.get()));
                    }
                }
            }
        }
    }

    #[test]
    fn a_document_nested_far_deeper_than_json_allows_is_carried_as_text_without_recursion() {
        // Documents are never parsed, only delimited: their depth does not
        // reach the stack.
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let answer = format!(r#"{{"results":[{{"id":"a","docs":[{{"ok":{deep}}}]}}]}}"#);
        let got = fetched(&answer, &[wanted("a", "1-x")]);
        assert!(matches!(&got[..], [Fetched::Docs(docs)] if docs[0].get() == deep));
        let answer = format!(r#"{{"results":[{{"id":"a","docs":[{{"error":{deep}}}]}}]}}"#);
        let got = fetched(&answer, &[wanted("a", "1-x")]);
        assert!(matches!(&got[..], [Fetched::Missing(why)] if why.len() == deep.len()));
        let entries: Vec<OpenRevsEntry> =
            serde_json::from_str(&format!(r#"[{{"ok":{deep}}}]"#)).unwrap();
        assert_eq!(OpenRevs::of(&[], entries).docs[0].get(), deep);
    }
}
