//! Keeps the user documents of the spiegel database (replicator and
//! on_change docs) in memory, following its `_changes` live, so that an
//! added, edited or deleted document takes effect without a restart.
//!
//! Internal documents (leases, heartbeats, checkpoints) change often; their
//! rows are skipped by id, without reading their bodies.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;
use tokio::sync::watch;

use crate::backoff::Backoff;
use crate::couch::{AllDocsQuery, ChangesQuery, CouchClient, CouchError, FeedOptions, Seq};
use crate::ids::is_internal_doc_id;

/// The user documents by id.
pub type UserDocs = BTreeMap<String, Value>;

/// A handle on the followed documents: `None` until the first full load.
pub type DocsWatch = watch::Receiver<Option<Arc<UserDocs>>>;

/// The follower, to run on a task of the caller's, and a receiver that sees
/// every new version of the document set. The follower ends once the
/// receiver and its clones are dropped.
pub fn start(
    client: CouchClient,
    db: String,
    namespace: String,
) -> (DocsWatch, impl Future<Output = ()> + Send + 'static) {
    let (tx, rx) = watch::channel(None);
    (rx, follow(client, db, namespace, tx))
}

/// Waits for the first full load.
pub async fn loaded(docs: &mut DocsWatch) -> Arc<UserDocs> {
    loop {
        if let Some(current) = docs.borrow_and_update().clone() {
            return current;
        }
        if docs.changed().await.is_err() {
            // The follower ended: only during shutdown. An empty set then.
            return Arc::default();
        }
    }
}

async fn follow(
    client: CouchClient,
    db: String,
    namespace: String,
    tx: watch::Sender<Option<Arc<UserDocs>>>,
) {
    let what = format!("following the documents of {db:?}");
    let mut follower = (client, db, namespace, tx);
    Backoff::reconnect(Duration::from_secs(30))
        .retry(&what, &mut follower, |(client, db, namespace, tx)| {
            Box::pin(follow_once(client, db, namespace, tx))
        })
        .await
}

/// The ids of the user documents, from `_changes` (cheap rows: internal
/// documents are never downloaded), and the seq they are current at.
async fn user_doc_ids(
    client: &CouchClient,
    db: &str,
    namespace: &str,
) -> Result<(std::collections::BTreeSet<String>, Option<Seq>), CouchError> {
    let mut ids = std::collections::BTreeSet::new();
    let mut since: Option<Seq> = None;
    loop {
        let page = client
            .changes(
                db,
                &ChangesQuery {
                    since: since.clone(),
                    limit: Some(1000),
                    include_docs: false,
                },
            )
            .await?;
        let done = page.results.is_empty();
        for change in page.results {
            if is_internal_doc_id(&change.id, namespace) {
                continue;
            }
            if change.deleted {
                ids.remove(&change.id);
            } else {
                ids.insert(change.id);
            }
        }
        since = Some(page.last_seq);
        if done {
            break;
        }
    }
    Ok((ids, since))
}

/// Loads everything, then follows; returns Ok only when nobody listens.
async fn follow_once(
    client: &CouchClient,
    db: &str,
    namespace: &str,
    tx: &watch::Sender<Option<Arc<UserDocs>>>,
) -> Result<(), CouchError> {
    let (ids, since) = user_doc_ids(client, db, namespace).await?;
    let mut docs = UserDocs::new();
    let ids: Vec<String> = ids.into_iter().collect();
    for chunk in ids.chunks(500) {
        let query = AllDocsQuery {
            keys: Some(chunk.to_vec()),
            include_docs: true,
            ..Default::default()
        };
        for row in client.all_docs(db, &query).await?.rows {
            if let (Some(id), Some(doc)) = (row.id, row.doc.filter(|d| !d.is_null())) {
                docs.insert(id, doc);
            }
        }
    }
    if tx.send(Some(Arc::new(docs.clone()))).is_err() {
        return Ok(());
    }
    let mut feed = client.changes_feed(
        db,
        &ChangesQuery {
            since,
            ..Default::default()
        },
        FeedOptions::default(),
    );
    while let Some(change) = feed.next().await {
        let change = change?;
        if is_internal_doc_id(&change.id, namespace) {
            continue;
        }
        let doc = if change.deleted {
            None
        } else {
            client.get_doc_opt::<Value>(db, &change.id).await?
        };
        match doc {
            Some(doc) => docs.insert(change.id, doc),
            None => docs.remove(&change.id),
        };
        if tx.send(Some(Arc::new(docs.clone()))).is_err() {
            return Ok(());
        }
    }
    Err(CouchError::Transient(
        "the spiegel database's changes feed ended".into(),
    ))
}
