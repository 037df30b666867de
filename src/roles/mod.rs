//! The worker roles. Each is "something to do when a database changed":
//! the replicator replicates it, the change-listener delivers its changes to
//! on_change rules. [`run`] hosts them, handing each the process's shared
//! state ([`Process`]); what they report goes in the status book
//! ([`crate::status`]).

pub(crate) mod change_listener;
pub(crate) mod replicator;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::config::{Command, RunArgs};
use crate::couch::CouchClient;
use crate::error::Result;
use crate::flush;
use crate::process::Process;
use crate::rules::follower::{self, DocsWatch};
use crate::rules::replicator::AuthStyle;
use crate::status::{self, StatusBook};
use crate::worker::{Extras, Role, WorkerOptions};

/// The worker roles a process can host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoleKind {
    /// Replicates changed databases.
    Replicator,
    /// Delivers changes to on_change rules.
    ChangeListener,
}

impl RoleKind {
    /// The roles a worker command hosts.
    pub fn hosted_by(command: Command) -> &'static [RoleKind] {
        match command {
            Command::Replicator => &[RoleKind::Replicator],
            Command::ChangeListener => &[RoleKind::ChangeListener],
            _ => &[RoleKind::Replicator, RoleKind::ChangeListener],
        }
    }

    /// The role's name, as in `--type` and logs.
    pub fn name(self) -> &'static str {
        match self {
            RoleKind::Replicator => replicator::NAME,
            RoleKind::ChangeListener => change_listener::NAME,
        }
    }
}

/// What every role's worker is started with.
struct Host<'a> {
    args: &'a RunArgs,
    client: &'a CouchClient,
    process: &'a Process,
    /// The followed replicator and on_change documents.
    docs: DocsWatch,
    /// CouchDB's version, as the server reported it.
    version: String,
}

/// Runs the roles of `args.command` in this process until `shutdown`
/// resolves, then stops each cleanly. One follower of the spiegel
/// database's documents serves them all.
pub async fn run(
    args: &RunArgs,
    client: &CouchClient,
    process: &Process,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let server = client.server_info().await?;
    tracing::info!(version = %server.version, "connected to CouchDB");
    let conn = &args.connection;
    crate::worker::installed_settings(client, &conn.db_name, &conn.namespace).await?;
    let roles = RoleKind::hosted_by(args.command);
    for role in roles {
        process.health.expect(role.name());
    }
    let (docs, follow) =
        follower::start(client.clone(), conn.db_name.clone(), conn.namespace.clone());
    process.follow(docs.clone());
    // The follower serves every worker; it stops after them.
    let mut follower = JoinSet::new();
    follower.spawn(follow);
    let host = Host {
        args,
        client,
        process,
        docs,
        version: server.version,
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut workers = JoinSet::new();
    for role in roles {
        let mut stop = stop_rx.clone();
        let stopped = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        match role {
            RoleKind::Replicator => host.replicator(&mut workers, stopped).await?,
            RoleKind::ChangeListener => host.change_listener(&mut workers, stopped)?,
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
    follower.abort_all();
    while follower.join_next().await.is_some() {}
    Ok(())
}

impl Host<'_> {
    /// Starts a replicator worker, nudged when replicator documents change.
    async fn replicator(
        &self,
        workers: &mut JoinSet<Result<()>>,
        stopped: impl Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let (args, client) = (self.args, self.client);
        let conn = &args.connection;
        let mut options = self.options(replicator::NAME);
        let (book, saver) = self.status_book(replicator::NAME, &options.worker_id);
        options.status = book.clone();
        let (nudge_tx, nudges) = mpsc::channel(256);
        let already_run =
            status::reported_docs(client, &conn.db_name, &conn.namespace, replicator::NAME).await?;
        let nudging = replicator::nudge_on_changes(
            client.clone(),
            conn.url.clone(),
            self.docs.clone(),
            already_run,
            nudge_tx,
        );
        let role = replicator::Replicator::start(
            args,
            client.clone(),
            self.docs.clone(),
            AuthStyle::for_version(&self.version),
            book,
            self.process.metrics.roles.clone(),
        );
        let extras = Extras {
            nudges,
            tasks: vec![Box::pin(nudging), saver],
        };
        workers.spawn(self.worker(Arc::new(role), options, extras, stopped));
        Ok(())
    }

    /// Starts a change-listener worker.
    fn change_listener(
        &self,
        workers: &mut JoinSet<Result<()>>,
        stopped: impl Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let mut options = self.options(change_listener::NAME);
        let (book, saver) = self.status_book(change_listener::NAME, &options.worker_id);
        options.status = book.clone();
        let (role, flusher, nudges) = change_listener::ChangeListener::start(
            self.args,
            self.client.clone(),
            self.docs.clone(),
            book,
            self.process.metrics.roles.clone(),
        )?;
        self.process.deliver_to(role.endpoints());
        let role = Arc::new(role);
        // on_change documents take effect at their databases' next change;
        // an unusable one is reported as soon as it is loaded, and a
        // resumed one lets the databases it held back run at once.
        let watching = role.clone().watch_rules();
        let extras = Extras {
            nudges,
            tasks: vec![Box::pin(flusher), saver, Box::pin(watching)],
        };
        workers.spawn(self.worker(role, options, extras, stopped));
        Ok(())
    }

    /// The worker runtime hosting `role` until `stopped` resolves.
    fn worker<R: Role>(
        &self,
        role: Arc<R>,
        options: WorkerOptions,
        extras: Extras,
        stopped: impl Future<Output = ()> + Send + 'static,
    ) -> impl Future<Output = Result<()>> {
        crate::worker::run(
            self.client.clone(),
            role,
            options,
            self.process.metrics.worker.clone(),
            extras,
            stopped,
        )
    }

    /// The runtime settings of a worker of `role`, reporting to the process.
    fn options(&self, role: &str) -> WorkerOptions {
        let process = self.process;
        let (health, workers) = (process.health.clone(), process.workers.clone());
        WorkerOptions::for_role(self.args, role, health, workers)
    }

    /// A role's status book, and the task that saves it (at most every 5 s;
    /// the role saves it a last time at stop).
    fn status_book(&self, role: &str, worker_id: &str) -> (StatusBook, BoxFuture<'static, ()>) {
        let conn = &self.args.connection;
        let book = StatusBook::saved_in(status::Target {
            client: self.client.clone(),
            db: conn.db_name.clone(),
            namespace: conn.namespace.clone(),
            role: role.into(),
            worker_id: worker_id.into(),
        })
        .with_tail(role, self.process.tail.clone());
        let interval = self.args.worker.save_seq_after.min(Duration::from_secs(5));
        (book.clone(), Box::pin(flush::every(book, interval)))
    }
}

fn flatten(result: std::result::Result<Result<()>, tokio::task::JoinError>) -> Result<()> {
    match result {
        Ok(r) => r,
        Err(e) => Err(e.into()),
    }
}
