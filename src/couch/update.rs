//! Writing documents that another writer may have touched: the one place
//! where a conflict is answered by reading the current revision and writing
//! again. Leases, membership, change-listener checkpoints and status
//! documents are all saved through it.

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use super::{BulkResult, CouchClient, CouchError, Result};

/// A document that carries its own id and revision.
pub trait Revised: Serialize + DeserializeOwned {
    /// The `_id`.
    fn id(&self) -> &str;
    /// The `_rev` the next write is based on, if any.
    fn rev(&self) -> Option<&str>;
    /// Sets the revision the next write is based on (`None`: a new document).
    fn set_rev(&mut self, rev: Option<String>);
}

impl Revised for Value {
    fn id(&self) -> &str {
        self.get("_id").and_then(Value::as_str).unwrap_or_default()
    }

    fn rev(&self) -> Option<&str> {
        self.get("_rev").and_then(Value::as_str)
    }

    fn set_rev(&mut self, rev: Option<String>) {
        if let Some(obj) = self.as_object_mut() {
            match rev {
                Some(rev) => obj.insert("_rev".into(), Value::from(rev)),
                None => obj.remove("_rev"),
            };
        }
    }
}

/// Implements [`Revised`] for document structs whose `id: String` and
/// `rev: Option<String>` fields are `_id` and `_rev`.
macro_rules! impl_revised {
    ($($doc:ty),+) => {$(
        impl $crate::couch::Revised for $doc {
            fn id(&self) -> &str {
                &self.id
            }
            fn rev(&self) -> Option<&str> {
                self.rev.as_deref()
            }
            fn set_rev(&mut self, rev: Option<String>) {
                self.rev = rev;
            }
        }
    )+};
}
pub(crate) use impl_revised;

/// What became of one document of [`CouchClient::save_all`].
#[derive(Debug)]
pub enum Saved<T> {
    /// Stored; the document carries its new revision.
    Written(T),
    /// In conflict, and the rebase kept the stored version, given here
    /// (`None`: the document does not exist any more).
    Superseded(Option<T>),
    /// Refused: a conflict again, or a validation function said no.
    Refused(CouchError),
}

impl CouchClient {
    /// Writes `docs` in one `_bulk_docs`. A document found in conflict is
    /// read again, and `rebase(mine, stored)` returns what to write on top
    /// of the stored revision, or `None` to keep the stored version; the
    /// rebased documents are written once more, in one request.
    pub async fn save_all<T, F>(&self, db: &str, docs: Vec<T>, rebase: F) -> Result<Vec<Saved<T>>>
    where
        T: Revised,
        F: Fn(T, Option<&T>) -> Option<T>,
    {
        let results = self.bulk_docs(db, &docs, true).await?;
        let mut saved = Vec::with_capacity(docs.len());
        let mut again = Vec::new();
        for (doc, result) in docs.into_iter().zip(results) {
            match result {
                BulkResult::Written { rev, .. } => saved.push(Some(written(doc, rev))),
                BulkResult::Failed { error, .. } if error == "conflict" => {
                    let stored: Option<T> = self.get_doc_opt(db, doc.id()).await?;
                    match rebase(doc, stored.as_ref()) {
                        Some(doc) => {
                            again.push((saved.len(), doc));
                            saved.push(None);
                        }
                        None => saved.push(Some(Saved::Superseded(stored))),
                    }
                }
                BulkResult::Failed { error, reason, .. } => {
                    saved.push(Some(Saved::Refused(refused(error, reason))))
                }
            }
        }
        self.save_rebased(db, again, &mut saved).await?;
        // Every slot left empty above is filled by `save_rebased`.
        Ok(saved.into_iter().flatten().collect())
    }

    /// Writes the rebased documents, filling their slots of `saved`.
    async fn save_rebased<T: Revised>(
        &self,
        db: &str,
        again: Vec<(usize, T)>,
        saved: &mut [Option<Saved<T>>],
    ) -> Result<()> {
        if again.is_empty() {
            return Ok(());
        }
        let (slots, docs): (Vec<usize>, Vec<T>) = again.into_iter().unzip();
        let results = self.bulk_docs(db, &docs, true).await?;
        for ((slot, doc), result) in slots.into_iter().zip(docs).zip(results) {
            saved[slot] = Some(match result {
                BulkResult::Written { rev, .. } => written(doc, rev),
                BulkResult::Failed { error, reason, .. } => Saved::Refused(refused(error, reason)),
            });
        }
        Ok(())
    }

    /// Writes one document over whatever revision is stored: the document is
    /// ours alone (a worker's status or membership), and a conflict only
    /// means that our revision is stale (a restart under the same id, or a
    /// clean-up that removed it).
    pub async fn save<T: Revised>(&self, db: &str, doc: T) -> Result<T> {
        let take_stored = |mut mine: T, stored: Option<&T>| {
            mine.set_rev(stored.and_then(|s| s.rev()).map(String::from));
            Some(mine)
        };
        match self.save_all(db, vec![doc], take_stored).await?.pop() {
            Some(Saved::Written(doc)) => Ok(doc),
            Some(Saved::Refused(error)) => Err(error),
            // `take_stored` always rebases, and one document gives one result.
            Some(Saved::Superseded(_)) | None => Err(CouchError::Conflict),
        }
    }
}

fn written<T: Revised>(mut doc: T, rev: String) -> Saved<T> {
    doc.set_rev(Some(rev));
    Saved::Written(doc)
}

/// The error of a document that `_bulk_docs` did not write.
fn refused(error: String, reason: Option<String>) -> CouchError {
    match error.as_str() {
        "conflict" => CouchError::Conflict,
        "forbidden" => CouchError::Forbidden(reason.unwrap_or(error)),
        "unauthorized" => CouchError::Unauthorized(reason.unwrap_or(error)),
        _ => CouchError::Unexpected {
            status: 0,
            error,
            reason: reason.unwrap_or_default(),
        },
    }
}
