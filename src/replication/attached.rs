//! Revisions with attachments, copied one by one and streamed, as
//! CouchDB's replicator copies them: their bytes never sit whole in memory.

use serde::Deserialize;

use super::{Replication, ReplicationError, Report};
use crate::couch::{CouchError, DocBody, Fetched, RawDoc, RevToFetch};

impl Replication {
    /// Copies one revision with attachments, streamed from the source into
    /// the target. When the target lacks an attachment the source sent as
    /// a stub (the ancestor it has is on another branch), the revision is
    /// sent again with every attachment, as CouchDB's replicator does.
    pub(super) async fn copy_attached(
        &self,
        head: &Head,
        since: &[String],
        report: &mut Report,
    ) -> Result<(), ReplicationError> {
        let mut stubs = !since.is_empty();
        loop {
            let atts_since = if stubs { since } else { &[] };
            match self.stream(head, atts_since, report).await? {
                Streamed::Done => return Ok(()),
                Streamed::MissingStub if stubs => stubs = false,
                Streamed::MissingStub => {
                    return Err(ReplicationError::Refused {
                        id: head.id.clone(),
                        rev: head.rev.clone(),
                        error: "missing_stub".into(),
                        reason: "refused even with every attachment".into(),
                    })
                }
            }
        }
    }

    /// One streamed copy of a revision: a `multipart/related` answer goes on
    /// as the body of a `PUT ?new_edits=false`; a JSON answer (a server
    /// that sends no multipart) is written with the others' path.
    async fn stream(
        &self,
        head: &Head,
        atts_since: &[String],
        report: &mut Report,
    ) -> Result<Streamed, ReplicationError> {
        let (source, target) = (&self.source, &self.target);
        let read = source
            .client
            .open_rev_streamed(&source.db, &head.id, &head.rev, atts_since)
            .await;
        let body = match read {
            Err(CouchError::UnaddressableId(_)) => {
                return self.inline(head, atts_since, report).await
            }
            read => read.map_err(ReplicationError::couch(
                "fetching a document with attachments",
            ))?,
        };
        let multipart = match body {
            DocBody::Json(doc) => {
                let stubs = self.write(vec![doc], report).await?;
                return Ok(Streamed::after(stubs));
            }
            DocBody::Multipart(multipart) => multipart,
        };
        match target
            .client
            .put_replicated(&target.db, &head.id, multipart)
            .await
        {
            Ok(()) => report.docs_written += 1,
            Err(CouchError::PreconditionFailed(e)) if e.starts_with("missing_stub") => {
                return Ok(Streamed::MissingStub)
            }
            // A validation function's refusal, or a proxy's: `_bulk_docs`
            // tells them apart (a refusal per document, or of the request).
            Err(CouchError::Forbidden(_) | CouchError::Unauthorized(_)) => {
                return self.inline(head, atts_since, report).await
            }
            Err(e) => match passed_over(&e) {
                Some(why) => report.refuse(&target.db, &head.id, &head.rev, why),
                None => return Err(ReplicationError::couch("writing to the target")(e)),
            },
        }
        Ok(Streamed::Done)
    }

    /// A revision with attachments fetched with its attachments inline and
    /// written with `_bulk_docs`: for an id no URL path can carry
    /// (`_bulk_get` carries any id), and for a refusal of the streamed
    /// write whose cause only `_bulk_docs` tells.
    async fn inline(
        &self,
        head: &Head,
        atts_since: &[String],
        report: &mut Report,
    ) -> Result<Streamed, ReplicationError> {
        let source = &self.source;
        let want = [RevToFetch {
            id: head.id.clone(),
            rev: head.rev.clone(),
            atts_since: atts_since.to_vec(),
        }];
        let fetched = source.client.bulk_get(&source.db, &want, true).await;
        let docs = match fetched
            .map_err(ReplicationError::couch("fetching revisions"))?
            .pop()
        {
            Some(Fetched::Docs(docs)) => docs,
            Some(Fetched::Missing(reason)) => {
                let (id, rev) = (head.id.clone(), head.rev.clone());
                return Err(ReplicationError::Unreadable { id, rev, reason });
            }
            None => Vec::new(),
        };
        let stubs = self.write(docs, report).await?;
        Ok(Streamed::after(stubs))
    }
}

/// How a streamed copy ended.
pub(super) enum Streamed {
    Done,
    /// The target lacks an attachment sent as a stub.
    MissingStub,
}

impl Streamed {
    /// After a write that returned the revision refused for a stub, if any.
    pub(super) fn after(stubs: Option<(String, String)>) -> Streamed {
        match stubs {
            Some(_) => Streamed::MissingStub,
            None => Streamed::Done,
        }
    }
}

/// What the engine reads of a revision's text to route it: its id and
/// revision, and whether it has attachments.
#[derive(Default, Deserialize)]
pub(super) struct Head {
    #[serde(rename = "_id", default)]
    pub(super) id: String,
    #[serde(rename = "_rev", default)]
    pub(super) rev: String,
    #[serde(rename = "_attachments", default)]
    attachments: Option<std::collections::HashMap<String, serde::de::IgnoredAny>>,
}

impl Head {
    /// A text that is not a document has no head: it goes the plain way,
    /// and the target says what it thinks of it.
    pub(super) fn of(doc: &RawDoc) -> Head {
        serde_json::from_str(doc.get()).unwrap_or_default()
    }

    fn has_attachments(&self) -> bool {
        self.attachments.as_ref().is_some_and(|a| !a.is_empty())
    }
}

/// The revisions without attachments, and the heads of those with them.
pub(super) fn split_attached(docs: Vec<RawDoc>) -> (Vec<RawDoc>, Vec<Head>) {
    let (mut plain, mut attached) = (Vec::new(), Vec::new());
    for doc in docs {
        let head = Head::of(&doc);
        if head.has_attachments() {
            attached.push(head);
        } else {
            plain.push(doc);
        }
    }
    (plain, attached)
}

/// Why the target's refusal of one streamed document passes it over, as
/// CouchDB's replicator passes it over (size, media type, an attachment's
/// name); `None` fails the run.
fn passed_over(e: &CouchError) -> Option<&'static str> {
    match e {
        CouchError::Unexpected { status: 413, .. } => Some("too large for the target"),
        CouchError::Unexpected { status: 415, .. } => Some("unsupported media type"),
        CouchError::BadRequest(reason) if reason.contains("Attachment name") => {
            Some("invalid attachment name")
        }
        _ => None,
    }
}
