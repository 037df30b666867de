//! The worker roles. Each is "something to do when a database changed":
//! the replicator replicates it, the change-listener delivers its changes to
//! on_change rules. The update-listener of Spiegel 1.2 survives only as a
//! compatibility stub.

pub mod change_listener;
pub mod replicator;
pub mod status;
pub mod update_listener;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::couch::CouchClient;
use crate::error::Result;
use crate::metrics::Metrics;
use crate::rules::follower;
use crate::rules::replicator::AuthStyle;

/// The worker roles a process can host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoleKind {
    Replicator,
    ChangeListener,
}

impl RoleKind {
    pub fn name(self) -> &'static str {
        match self {
            RoleKind::Replicator => replicator::NAME,
            RoleKind::ChangeListener => change_listener::NAME,
        }
    }
}

/// Runs the given roles in this process until `shutdown` resolves, then
/// stops each cleanly. One follower of the spiegel database's documents
/// serves them all.
pub async fn run(
    config: &Config,
    client: &CouchClient,
    roles: &[RoleKind],
    metrics: &Metrics,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let server = client.server_info().await?;
    tracing::info!(version = %server.version, "connected to CouchDB");
    crate::worker::installed_settings(client, &config.db_name, &config.namespace).await?;
    for role in roles {
        config.health.expect(role.name());
    }
    let docs = follower::spawn(
        client.clone(),
        config.db_name.clone(),
        config.namespace.clone(),
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut workers = tokio::task::JoinSet::new();
    for role in roles {
        let mut stop = stop_rx.clone();
        let stopped = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        match role {
            RoleKind::Replicator => {
                let options = config.worker_options(replicator::NAME);
                let book = status_book(config, client, replicator::NAME, &options.worker_id);
                let (nudge_tx, nudge_rx) = mpsc::channel(256);
                let already_run = status::reported_docs(
                    client,
                    &config.db_name,
                    &config.namespace,
                    replicator::NAME,
                )
                .await?;
                tokio::spawn(replicator::nudge_on_changes(
                    client.clone(),
                    config.url.clone(),
                    docs.clone(),
                    already_run,
                    nudge_tx,
                ));
                let role = replicator::Replicator::new(
                    client.clone(),
                    config.url.clone(),
                    docs.clone(),
                    config.passwords.clone(),
                    AuthStyle::for_version(&server.version),
                    config.backoff.clone(),
                    config.assume_deleted_after,
                    book,
                    metrics.roles.clone(),
                );
                let run = crate::worker::run(
                    client.clone(),
                    Arc::new(role),
                    options,
                    metrics.worker.clone(),
                    nudge_rx,
                    stopped,
                );
                workers.spawn(run);
            }
            RoleKind::ChangeListener => {
                let options = config.worker_options(change_listener::NAME);
                let book = status_book(config, client, change_listener::NAME, &options.worker_id);
                let checkpoints =
                    change_listener::Checkpoints::new(client.clone(), &config.db_name);
                // Per-database checkpoints are saved in batches: at most the
                // lease time of changes is delivered again after a crash.
                let flush_every = config.save_seq_after.min(config.lease_time);
                let flusher = checkpoints.clone();
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(flush_every);
                    loop {
                        tick.tick().await;
                        flusher.flush().await;
                    }
                });
                let sender =
                    crate::delivery::Sender::new(config.request_timeout, config.concurrency)
                        .map_err(|e| crate::error::Error::Worker(e.to_string()))?;
                let role = change_listener::ChangeListener::new(
                    client.clone(),
                    &config.db_name,
                    &config.namespace,
                    docs.clone(),
                    config.passwords.clone(),
                    sender,
                    config.backoff.clone(),
                    config.batch_size,
                    config.assume_deleted_after,
                    checkpoints,
                    book,
                    metrics.roles.clone(),
                );
                // on_change documents take effect at their databases' next change.
                let (_, nudge_rx) = mpsc::channel(1);
                let run = crate::worker::run(
                    client.clone(),
                    Arc::new(role),
                    options,
                    metrics.worker.clone(),
                    nudge_rx,
                    stopped,
                );
                workers.spawn(run);
            }
        }
    }
    tokio::select! {
        _ = shutdown => {}
        // A role that ends on its own (it could not start) ends the process.
        Some(result) = workers.join_next() => {
            let _ = stop_tx.send(true);
            flatten(result)?;
        }
    }
    let _ = stop_tx.send(true);
    while let Some(result) = workers.join_next().await {
        flatten(result)?;
    }
    Ok(())
}

/// A role's status book, saved in the background (at most every 5 s).
fn status_book(
    config: &Config,
    client: &CouchClient,
    role: &str,
    worker_id: &str,
) -> status::StatusBook {
    let book = status::StatusBook::default();
    tokio::spawn(status::save_periodically(
        client.clone(),
        config.db_name.clone(),
        config.namespace.clone(),
        role.into(),
        worker_id.into(),
        book.clone(),
        config.save_seq_after.min(Duration::from_secs(5)),
    ));
    book
}

fn flatten(result: std::result::Result<Result<()>, tokio::task::JoinError>) -> Result<()> {
    match result {
        Ok(r) => r,
        Err(e) => Err(crate::error::Error::Worker(e.to_string())),
    }
}
