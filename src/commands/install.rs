//! `install` and `uninstall`: the one-shot commands that prepare a CouchDB
//! server for Spiegel and clean it up again.

use serde_json::{json, Value};

use crate::coordination::Settings;
use crate::couch::{AllDocsQuery, CouchClient, CouchError};
use crate::error::Result;

/// CouchDB 3 serves `_db_updates` from this database and no longer creates
/// it at setup.
use crate::couch::GLOBAL_CHANGES;

/// The design documents Spiegel 1.2 put in the spiegel database. Nothing
/// reads them any more, and CouchDB 3's background indexer would keep
/// rebuilding their views on every write to the spiegel database.
const LEGACY_DESIGN_DOCS: [&str; 12] = [
    "_design/dirty_listeners",
    "_design/dirty_replicators",
    "_design/on_changes",
    "_design/clean_replicators",
    "_design/clean_or_locked_replicators",
    "_design/clean_or_locked_replicators_by_db_name",
    "_design/clean_or_locked_listeners_by_db_name",
    "_design/listeners_by_db_name",
    "_design/dirty_and_unlocked_replicator",
    "_design/locked_replicator",
    "_design/dirty_and_unlocked_change_listener",
    "_design/locked_change_listener",
];

/// Only server admins may read or write the spiegel database: whoever can
/// write a replicator or on_change doc can make Spiegel send the passwords it
/// injects to any host.
pub fn admins_only_security() -> Value {
    json!({
        "admins": { "names": [], "roles": ["_admin"] },
        "members": { "names": [], "roles": ["_admin"] }
    })
}

/// Prepares the server. Idempotent: running it again changes nothing that
/// is already in place.
pub async fn install(
    client: &CouchClient,
    db_name: &str,
    namespace: &str,
    partitions: u32,
) -> Result<()> {
    let server = client.server_info().await?;
    tracing::info!(version = %server.version, "connected to CouchDB");

    if client.create_db(db_name).await? {
        tracing::info!(db = db_name, "created the spiegel database");
    } else {
        tracing::info!(
            db = db_name,
            "the spiegel database exists; its documents are kept"
        );
    }

    let security = admins_only_security();
    let current = client.get_security(db_name).await?;
    if current != security {
        client.put_security(db_name, &security).await?;
        tracing::info!(db = db_name, "set _security: server admins only");
    }

    if client.create_db(GLOBAL_CHANGES).await? {
        tracing::info!("created {GLOBAL_CHANGES}, which _db_updates needs on CouchDB 3");
    }

    write_settings(client, db_name, namespace, partitions).await?;
    remove_legacy_design_docs(client, db_name, namespace).await?;
    tracing::info!(db = db_name, "install complete");
    Ok(())
}

async fn write_settings(
    client: &CouchClient,
    db_name: &str,
    namespace: &str,
    partitions: u32,
) -> Result<()> {
    let id = crate::ids::settings_doc_id(namespace);
    match client.get_doc_opt::<Settings>(db_name, &id).await? {
        Some(existing) if existing.partitions != partitions => {
            tracing::warn!(
                installed = existing.partitions,
                requested = partitions,
                "keeping the installed partition count: changing it needs every worker stopped, then uninstall and install"
            );
        }
        Some(_) => {}
        None => {
            match client
                .put_doc(db_name, &id, &Settings::new(partitions))
                .await
            {
                // Another install won the race; its settings stand.
                Ok(_) | Err(CouchError::Conflict) => {}
                Err(e) => return Err(e.into()),
            }
            tracing::info!(partitions, "wrote the settings document");
        }
    }
    Ok(())
}

async fn remove_legacy_design_docs(
    client: &CouchClient,
    db_name: &str,
    namespace: &str,
) -> Result<()> {
    let sieve = format!("_design/{namespace}sieve");
    let targets = LEGACY_DESIGN_DOCS
        .iter()
        .map(|id| (db_name, id.to_string()))
        .chain([(GLOBAL_CHANGES, sieve)]);
    for (db, id) in targets {
        if delete_if_present(client, db, &id).await? {
            tracing::info!(db, id, "removed a Spiegel 1.2 design document");
        }
    }
    Ok(())
}

/// Deletes the current revision of a document if there is one.
async fn delete_if_present(client: &CouchClient, db: &str, id: &str) -> Result<bool> {
    let Some(doc) = client.get_doc_opt::<Value>(db, id).await? else {
        return Ok(false);
    };
    let Some(rev) = doc.get("_rev").and_then(Value::as_str) else {
        return Ok(false);
    };
    match client.delete_doc(db, id, rev).await {
        Ok(_) => Ok(true),
        Err(CouchError::Conflict | CouchError::DocNotFound { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// What `uninstall` did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Uninstalled {
    /// Spiegel's own documents deleted (leases, checkpoints, status).
    pub internal_docs_removed: usize,
    /// Whether the spiegel database itself was deleted.
    pub database_deleted: bool,
    /// Replicator and on_change docs left in place.
    pub user_docs_kept: usize,
}

/// Removes Spiegel's internal documents; deletes the spiegel database when
/// it holds no user documents, or when `delete_user_docs` says so.
/// `_global_changes` stays: other consumers of `_db_updates` need it.
pub async fn uninstall(
    client: &CouchClient,
    db_name: &str,
    namespace: &str,
    delete_user_docs: bool,
) -> Result<Uninstalled> {
    let rows = match client.all_docs(db_name, &AllDocsQuery::default()).await {
        Ok(all) => all.rows,
        Err(CouchError::DbNotFound(_)) => {
            tracing::info!(
                db = db_name,
                "the spiegel database does not exist: nothing to uninstall"
            );
            return Ok(Uninstalled::default());
        }
        Err(e) => return Err(e.into()),
    };
    let internal = format!("{namespace}{}", crate::ids::INTERNAL_PREFIX);
    let mut report = Uninstalled::default();
    let mut deletions = Vec::new();
    for row in rows {
        let (Some(id), Some(value)) = (row.id, row.value) else {
            continue;
        };
        // Only this installation's documents: another namespace's, and the
        // user's own design documents, stay.
        if id.starts_with(&internal) {
            deletions.push(json!({ "_id": id, "_rev": value.rev, "_deleted": true }));
        } else {
            report.user_docs_kept += 1;
        }
    }
    if delete_user_docs || report.user_docs_kept == 0 {
        client.delete_db(db_name).await?;
        report.internal_docs_removed = deletions.len();
        report.user_docs_kept = 0;
        report.database_deleted = true;
        tracing::info!(db = db_name, "deleted the spiegel database");
        return Ok(report);
    }
    for chunk in deletions.chunks(500) {
        let results = client.bulk_docs(db_name, chunk, true).await?;
        report.internal_docs_removed += results.iter().filter(|r| !r.is_failed()).count();
    }
    tracing::info!(
        db = db_name,
        removed = report.internal_docs_removed,
        kept = report.user_docs_kept,
        "removed Spiegel's internal documents; kept the database and its user documents (use --delete-user-docs to delete them)"
    );
    Ok(report)
}
