//! Dead letters: a request that still failed after its last retry is kept
//! as a document in the spiegel database (`<namespace>spiegel_dead_<...>`)
//! and delivery moves on. `spiegel status` counts them; `spiegel redeliver`
//! sends them again and removes the ones that succeed.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::couch::{AllDocsQuery, AllDocsRow, Change, CouchClient, CouchError};

/// An on_change request that still failed after its last retry, kept in the spiegel database until it is redelivered.
///
/// The changed documents are kept as the JSON text CouchDB sent (CouchDB
/// stores it as written), so a redelivery sends the same bytes. Read a
/// letter from its text (`serde_json::from_str`), not from a `Value`,
/// which would reorder them.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Always [`DeadLetter::KIND`].
    #[serde(rename = "type")]
    pub kind: String,
    /// The on_change document whose request failed.
    pub rule: String,
    /// The database of the change.
    pub db_name: String,
    /// The change's `_changes` seq, as received.
    pub seq: Value,
    /// The changed document.
    pub doc_id: String,
    /// The document revision the request was for.
    pub rev: String,
    /// The changed document (or its deletion stub) as CouchDB sent it, to
    /// build the request again on redelivery. A batch's first.
    pub change: Box<RawValue>,
    /// A batch request's changes, in order; `None` for a request of one
    /// change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<Vec<BatchMember>>,
    /// The request as sent, without credentials or secrets, its body as the
    /// text sent (`null` when it could not be built).
    pub request: Box<RawValue>,
    /// The HTTP status of the last attempt, if the API answered.
    pub last_status: Option<u16>,
    /// The last error, with an excerpt of the answer's body.
    pub last_error: String,
    /// Attempts made, the first included.
    pub attempts: u32,
    /// When the first attempt was made (RFC 3339).
    pub first_attempt_at: String,
    /// When the last attempt was made (RFC 3339).
    pub last_attempt_at: String,
    /// Since when a `spiegel redeliver` has claimed it and is sending it
    /// (RFC 3339); another one leaves it alone meanwhile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redelivering_since: Option<String>,
}

/// One change of a batch dead letter.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BatchMember {
    /// The changed document's id.
    pub doc_id: String,
    /// Its revision.
    pub rev: String,
    /// The change's `_changes` seq.
    pub seq: Value,
    /// The changed document, or its deletion stub, as CouchDB sent it.
    pub change: Box<RawValue>,
}

impl DeadLetter {
    /// The `type` of dead letter documents.
    pub const KIND: &'static str = "spiegel_dead_letter";

    /// The letter of a request for `change` (a batch's last) or, with
    /// `batch`, for its members in order: the request as sent (`null` when
    /// it could not be built) and the error; no attempt counted, both
    /// attempt times now.
    pub(crate) fn new(
        rule: &str,
        db: &str,
        change: &Change,
        batch: Option<&[&Change]>,
        request: Box<RawValue>,
        last_error: String,
    ) -> Self {
        let first = batch.and_then(|b| b.first().copied()).unwrap_or(change);
        let now = crate::ids::timestamp();
        DeadLetter {
            kind: DeadLetter::KIND.into(),
            rule: rule.into(),
            db_name: db.into(),
            seq: change.seq.as_json().clone(),
            doc_id: first.id.clone(),
            rev: first.rev().to_string(),
            change: first.doc_or_stub().raw().to_owned(),
            batch: batch.map(|b| b.iter().map(|c| BatchMember::of(c)).collect()),
            request,
            last_status: None,
            last_error,
            attempts: 0,
            first_attempt_at: now.clone(),
            last_attempt_at: now,
            redelivering_since: None,
        }
    }
}

impl BatchMember {
    fn of(change: &Change) -> Self {
        BatchMember {
            doc_id: change.id.clone(),
            rev: change.rev().to_string(),
            seq: change.seq.as_json().clone(),
            change: change.doc_or_stub().raw().to_owned(),
        }
    }
}

/// The id prefix of every dead letter of an installation.
pub fn id_prefix(namespace: &str) -> String {
    crate::ids::dead_letter_prefix(namespace)
}

/// Stores a dead letter under a new id.
pub async fn store(
    client: &CouchClient,
    db: &str,
    namespace: &str,
    letter: &DeadLetter,
) -> Result<(), CouchError> {
    let id = format!(
        "{}{}_{:08x}",
        id_prefix(namespace),
        chrono::Utc::now().format("%Y%m%dT%H%M%S%3f"),
        rand::random::<u32>()
    );
    client.put_doc(db, &id, letter).await.map(|_| ())
}

/// Dead letters read per request, with their bodies: each carries a copy
/// of a document, so a page stays small.
pub const LETTERS_PER_PAGE: u64 = 100;

/// Dead-letter ids counted per request (ids only).
pub const IDS_PER_PAGE: u64 = 1000;

/// A dead letter with its id and revision.
pub type Listed = (String, String, DeadLetter);

/// Every dead letter, with its id and revision, read page by page.
pub async fn list(
    client: &CouchClient,
    db: &str,
    namespace: &str,
) -> Result<Vec<Listed>, CouchError> {
    list_some(client, db, namespace, None).await
}

/// The first `limit` dead letters (the oldest: ids start with their time),
/// or all, with their ids and revisions, read [`LETTERS_PER_PAGE`] at a
/// time.
pub async fn list_some(
    client: &CouchClient,
    db: &str,
    namespace: &str,
    limit: Option<u64>,
) -> Result<Vec<Listed>, CouchError> {
    let query = AllDocsQuery::prefix(&id_prefix(namespace));
    let (mut letters, mut after) = (Vec::new(), None::<String>);
    loop {
        let wanted = limit.map_or(LETTERS_PER_PAGE, |l| l - letters.len() as u64);
        let page = wanted.min(LETTERS_PER_PAGE);
        if page == 0 {
            return Ok(letters);
        }
        let rows = client
            .all_docs_raw_after(db, &query, after.as_deref(), page)
            .await?;
        let full = rows.len() as u64 == page;
        after = rows.last().and_then(|r| r.id.clone());
        letters.extend(rows.into_iter().filter_map(parse));
        if !full {
            return Ok(letters);
        }
    }
}

/// A row of `_all_docs` as a dead letter; a malformed one is skipped.
fn parse(row: AllDocsRow<Box<RawValue>>) -> Option<Listed> {
    let (Some(id), Some(value), Some(doc)) = (row.id, row.value, row.doc) else {
        return None;
    };
    match serde_json::from_str::<DeadLetter>(doc.get()) {
        Ok(letter) => Some((id, value.rev, letter)),
        Err(e) => {
            tracing::warn!(id = %id, error = %e, "skipping a malformed dead letter");
            None
        }
    }
}

/// How many dead letters there are, from their ids alone, counted
/// [`IDS_PER_PAGE`] at a time.
pub async fn count(client: &CouchClient, db: &str, namespace: &str) -> Result<usize, CouchError> {
    let query = AllDocsQuery {
        include_docs: false,
        ..AllDocsQuery::prefix(&id_prefix(namespace))
    };
    let (mut total, mut after) = (0, None::<String>);
    loop {
        let rows = client
            .all_docs_raw_after(db, &query, after.as_deref(), IDS_PER_PAGE)
            .await?;
        total += rows.len();
        if (rows.len() as u64) < IDS_PER_PAGE {
            return Ok(total);
        }
        after = rows.last().and_then(|r| r.id.clone());
    }
}
