//! Reading the revisions a target lacks: `_bulk_get` first, each document
//! on its own (`open_revs`) where it gave none, attachments as stubs.

use std::collections::BTreeMap;
use std::time::Duration;

use super::{Replication, ReplicationError, Report};
use crate::couch::{CouchError, Fetched, OpenRevs, RawDoc, RevToFetch};

/// How long a revision the source did not give waits before it is asked
/// for again (CouchDB's `[replicator] missing_doc_retry_msec`).
const MISSING_DOC_RETRY: Duration = Duration::from_secs(2);

impl Replication {
    /// The wanted revisions from the source, each as the text it sent,
    /// attachments as stubs. A revision `_bulk_get` did not give is asked
    /// for on its own.
    pub(super) async fn fetch(
        &self,
        wanted: &[RevToFetch],
        report: &mut Report,
        bulk_get: &mut bool,
    ) -> Result<Vec<RawDoc>, ReplicationError> {
        let (mut docs, left) = if *bulk_get {
            self.fetch_bulk(wanted, bulk_get).await?
        } else {
            (Vec::new(), wanted.to_vec())
        };
        docs.extend(self.fetch_each(&left).await?);
        report.docs_read += docs.len() as u64;
        Ok(docs)
    }

    /// `_bulk_get`: the documents it gave, and the revisions to ask for on
    /// their own (all of them after an answer of another shape).
    async fn fetch_bulk(
        &self,
        wanted: &[RevToFetch],
        bulk_get: &mut bool,
    ) -> Result<(Vec<RawDoc>, Vec<RevToFetch>), ReplicationError> {
        let source = &self.source;
        let fetched = match source.client.bulk_get(&source.db, wanted, false).await {
            Ok(fetched) => fetched,
            Err(e) if no_bulk_get(&e) => {
                *bulk_get = false;
                return Ok((Vec::new(), wanted.to_vec()));
            }
            Err(CouchError::Decode(error)) => {
                tracing::warn!(db = %source.db, %error, "an answer of _bulk_get of another shape: fetching each document on its own");
                return Ok((Vec::new(), wanted.to_vec()));
            }
            Err(e) => return Err(ReplicationError::couch("fetching revisions")(e)),
        };
        let (mut docs, mut left) = (Vec::new(), Vec::new());
        for (want, fetched) in wanted.iter().zip(fetched) {
            match fetched {
                Fetched::Docs(found) => docs.extend(found),
                Fetched::Missing(reason) => {
                    tracing::warn!(db = %source.db, id = %want.id, rev = %want.rev, %reason, "_bulk_get did not give a revision: fetching it on its own");
                    left.push(want.clone());
                }
            }
        }
        Ok((docs, left))
    }

    /// One `open_revs` request per document. A revision the source does not
    /// give is asked for once more after [`MISSING_DOC_RETRY`] (a copy of
    /// a cluster may not have it yet), then fails the run.
    async fn fetch_each(&self, wanted: &[RevToFetch]) -> Result<Vec<RawDoc>, ReplicationError> {
        let mut by_id: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for w in wanted {
            by_id.entry(&w.id).or_default().push(w.rev.clone());
        }
        let mut docs = Vec::new();
        for (id, revs) in by_id {
            let mut got = self.open_revs(id, &revs).await?;
            if !got.missing.is_empty() {
                tracing::warn!(db = %self.source.db, id, missing = ?got.missing, "revisions unexpectedly missing from the source: asking again");
                tokio::time::sleep(MISSING_DOC_RETRY).await;
                let missing = std::mem::take(&mut got.missing);
                let retried = self.open_revs(id, &missing).await?;
                got.docs.extend(retried.docs);
                if let Some(rev) = retried.missing.into_iter().next() {
                    let reason = "missing (asked for twice with open_revs)".into();
                    let id = id.to_string();
                    return Err(ReplicationError::Unreadable { id, rev, reason });
                }
            }
            docs.extend(got.docs);
        }
        Ok(docs)
    }

    async fn open_revs(&self, id: &str, revs: &[String]) -> Result<OpenRevs, ReplicationError> {
        let source = &self.source;
        let got = source.client.open_revs(&source.db, id, revs);
        got.await
            .map_err(ReplicationError::couch("fetching revisions"))
    }
}

/// The answer of a server without `_bulk_get` (CouchDB before 2.3).
fn no_bulk_get(e: &CouchError) -> bool {
    matches!(
        e,
        CouchError::NotFound(_)
            | CouchError::DocNotFound { .. }
            | CouchError::BadRequest(_)
            | CouchError::Unexpected { status: 405, .. }
    )
}
