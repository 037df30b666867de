//! Writing revisions as they are (`_bulk_docs` with `new_edits: false`),
//! and what a refusal of the target does.

use std::collections::VecDeque;

use super::attached::Head;
use super::{Replication, ReplicationError, Report};
use crate::couch::{BulkResult, CouchError, RawDoc};

impl Replication {
    /// Writes revisions as they are, in halves while the target finds the
    /// request too large (a single revision too large is passed over, as
    /// CouchDB's replicator does). A revision a validation function refuses
    /// counts as a failure and is passed over; any other refusal fails the
    /// run. Returns a revision refused for lacking an attachment sent as a
    /// stub, if any. The first try is shared with the other runs on the
    /// target; a run writes alone what that try could not settle.
    pub(super) async fn write(
        &self,
        docs: Vec<RawDoc>,
        report: &mut Report,
    ) -> Result<Option<(String, String)>, ReplicationError> {
        let docs = match self.write_shared(docs, report).await? {
            Ok(stubs) => return Ok(stubs),
            Err(docs) => docs,
        };
        let target = &self.target;
        let mut batches = VecDeque::from([docs]);
        let mut stubs = None;
        while let Some(mut batch) = batches.pop_front() {
            if batch.is_empty() {
                continue;
            }
            let written = target.client.bulk_docs_replicated(&target.db, &batch).await;
            let refused = match written {
                Err(e) if too_large(&e) && batch.len() > 1 => {
                    let rest = batch.split_off(batch.len() / 2);
                    batches.push_front(rest);
                    batches.push_front(batch);
                    continue;
                }
                Err(e) if too_large(&e) => {
                    let head = Head::of(&batch[0]);
                    report.refuse(&target.db, &head.id, &head.rev, "too large for the target");
                    continue;
                }
                // CouchDB answers a missing stub for the whole request.
                Err(e) if missing_stub(&e) => {
                    let head = Head::of(&batch[0]);
                    stubs = Some((head.id, head.rev));
                    continue;
                }
                Err(e) => return Err(ReplicationError::couch("writing to the target")(e)),
                Ok(refused) => refused,
            };
            stubs = stubs.or(self.settle(batch.len(), refused, report)?);
        }
        Ok(stubs)
    }

    /// Writes `docs` in one `_bulk_docs` with the other runs on the target.
    /// Err: the documents to write alone (no other run, too many, or a
    /// shared request too large or with a missing stub, which only a write
    /// alone can tell apart).
    async fn write_shared(
        &self,
        docs: Vec<RawDoc>,
        report: &mut Report,
    ) -> Result<Result<Option<(String, String)>, Vec<RawDoc>>, ReplicationError> {
        let Some(group) = self.group.as_ref().filter(|_| !docs.is_empty()) else {
            return Ok(Err(docs));
        };
        let (docs, written) = match group.write(docs).await {
            Ok(written) => written,
            Err(docs) => return Ok(Err(docs)),
        };
        match written {
            Ok(refused) => Ok(Ok(self.settle(docs.len(), refused, report)?)),
            Err(e) if too_large(&e) || missing_stub(&e) => Ok(Err(docs)),
            Err(e) => Err(ReplicationError::couch("writing to the target")(e)),
        }
    }

    /// Counts a written batch of `n` revisions, of which `refused` were
    /// refused; returns one refused for a missing stub, if any.
    fn settle(
        &self,
        n: usize,
        refused: Vec<BulkResult>,
        report: &mut Report,
    ) -> Result<Option<(String, String)>, ReplicationError> {
        report.docs_written += n.saturating_sub(refused.len()) as u64;
        let mut stubs = None;
        for failure in refused {
            stubs = stubs.or(self.refused(failure, report)?);
        }
        Ok(stubs)
    }

    /// What one revision `_bulk_docs` refused does: a missing stub is
    /// returned, a validation function's refusal is a failure, anything
    /// else fails the run.
    fn refused(
        &self,
        failure: BulkResult,
        report: &mut Report,
    ) -> Result<Option<(String, String)>, ReplicationError> {
        let BulkResult::Failed {
            id,
            rev,
            error,
            reason,
        } = failure
        else {
            return Ok(None);
        };
        let (id, rev) = (id.unwrap_or_default(), rev.unwrap_or_default());
        match error.as_str() {
            "missing_stub" => Ok(Some((id, rev))),
            "forbidden" | "unauthorized" => {
                let why = format!("{error}: {}", reason.as_deref().unwrap_or(""));
                report.refuse(&self.target.db, &id, &rev, &why);
                Ok(None)
            }
            _ => Err(ReplicationError::Refused {
                id,
                rev,
                error,
                reason: reason.unwrap_or_default(),
            }),
        }
    }
}

/// A request the target refused as too large (413: `document_too_large`
/// or `too_large`).
fn too_large(e: &CouchError) -> bool {
    matches!(e, CouchError::Unexpected { status: 413, .. })
}

/// A request refused for an attachment stub the target lacks.
fn missing_stub(e: &CouchError) -> bool {
    matches!(e, CouchError::PreconditionFailed(e) if e.starts_with("missing_stub"))
}
