//! The endpoints of CouchDB's replication protocol that the native engine
//! ([`crate::replication`]) calls: a filtered `_changes` page, `_revs_diff`,
//! `_bulk_get` (with `GET ?open_revs=` where it is missing), and `_bulk_docs`
//! with `new_edits: false`.

use std::collections::BTreeMap;

use reqwest::Method;
use serde::{Deserialize, Serialize};
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
    /// Ancestors the target has: their attachments come as stubs.
    pub atts_since: Vec<String>,
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

    /// `POST /{db}/_bulk_get?revs=true&attachments=true&latest=true`: the
    /// revisions with their history and attachments, in one request. Each
    /// result is a document, or the error CouchDB gave for that revision.
    /// [`CouchError::NotFound`] or [`CouchError::BadRequest`] when the
    /// server has no `_bulk_get`.
    pub async fn bulk_get(
        &self,
        db: &str,
        revs: &[RevToFetch],
    ) -> Result<Vec<Result<Value, Value>>> {
        let path = format!("{}/_bulk_get", encode_segment(db));
        let req = self
            .request(Method::POST, &path)
            .query(&[
                ("revs", "true"),
                ("attachments", "true"),
                ("latest", "true"),
            ])
            .json(&json!({ "docs": revs }));
        let answer: Value = self.json(req, Some(db), None).await?;
        let results = answer["results"].as_array().cloned().unwrap_or_default();
        Ok(results
            .into_iter()
            .flat_map(|r| r["docs"].as_array().cloned().unwrap_or_default())
            .map(|mut d| match d.get_mut("ok").map(Value::take) {
                Some(doc) => Ok(doc),
                None => Err(d.get_mut("error").map(Value::take).unwrap_or(d)),
            })
            .collect())
    }

    /// `GET /{db}/{id}?open_revs=[...]&revs=true&attachments=true&latest=true`:
    /// what [`Self::bulk_get`] gives, for one document, on servers without
    /// `_bulk_get`.
    pub async fn open_revs(
        &self,
        db: &str,
        id: &str,
        revs: &[String],
        atts_since: &[String],
    ) -> Result<Vec<Result<Value, Value>>> {
        let open = serde_json::to_string(revs).map_err(|e| CouchError::Decode(e.to_string()))?;
        let since =
            serde_json::to_string(atts_since).map_err(|e| CouchError::Decode(e.to_string()))?;
        let req = self
            .request(Method::GET, &doc_path(db, id))
            .header(reqwest::header::ACCEPT, "application/json")
            .query(&[
                ("open_revs", open.as_str()),
                ("revs", "true"),
                ("attachments", "true"),
                ("latest", "true"),
                ("atts_since", since.as_str()),
            ]);
        let answer: Vec<Value> = self.json(req, Some(db), Some(id)).await?;
        Ok(answer
            .into_iter()
            .map(|mut r| match r.get_mut("ok").map(Value::take) {
                Some(doc) => Ok(doc),
                None => Err(r),
            })
            .collect())
    }

    /// `POST /{db}/_bulk_docs` with `new_edits: false`: stores revisions as
    /// they are, history included. Returns the documents CouchDB refused.
    pub async fn bulk_docs_replicated(&self, db: &str, docs: &[Value]) -> Result<Vec<BulkResult>> {
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
