//! Spiegel 1.2's update-listener, kept so that an existing deployment (a
//! Swarm service with `TYPE=update-listener`) does not crash-loop after the
//! upgrade. The replicator and change-listener workers now follow
//! `_db_updates` themselves, so this command only idles.

use std::future::Future;

/// What `spiegel update-listener` prints: the role is gone, and why.
pub const EXPLANATION: &str =
    "the update-listener is no longer needed: replicator and change-listener \
workers follow CouchDB's _db_updates feed themselves. This process stays idle so that an existing \
deployment keeps running; remove the update-listener service when convenient.";

/// Logs why the role is obsolete, then idles until `shutdown` resolves.
pub async fn run(shutdown: impl Future<Output = ()>) {
    tracing::warn!("{EXPLANATION}");
    shutdown.await;
    tracing::info!("update-listener stopped");
}
