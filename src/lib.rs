//! Spiegel: scalable replication and change listening for Apache CouchDB.
//!
//! Where things live:
//! - [`couch`]: the CouchDB client (requests, typed errors, resilient feeds).
//! - [`config`]: command line, environment variables, passwords file.
//! - [`coordination`]: partitions, leases and checkpoints shared by workers.
//! - [`worker`]: the runtime that shares databases among a role's workers.
//! - [`roles`]: what each worker role does with a database that changed.
//! - [`status`]: the status book the roles keep of their documents.
//! - [`rules`]: replicator and on_change documents, parsed and compiled.
//! - [`delivery`]: sending on_change requests to the users' HTTP APIs.
//! - [`replication`]: the native replication engine.
//! - [`commands`]: the one-shot commands (install, uninstall, status,
//!   redeliver, the update-listener stub).
//! - [`process`]: the state the parts of one process share.
//! - [`admin`]: the health, readiness and metrics endpoints, the console.
//! - [`backoff`]: the one retry policy.
//! - [`flush`]: the one way state kept in memory is saved.
//! - [`ids`]: the ids of Spiegel's own documents, and the time they carry.

#![deny(missing_docs)]

pub mod admin;
pub mod backoff;
pub mod commands;
pub mod config;
pub mod coordination;
pub mod couch;
pub mod delivery;
pub mod error;
pub(crate) mod flush;
#[cfg(test)]
mod hostile_input;
pub mod ids;
pub mod logging;
pub mod metrics;
pub mod process;
pub mod replication;
pub mod roles;
pub(crate) mod rules;
pub(crate) mod status;
pub mod worker;

/// `install` and `uninstall`, at their former path.
pub use commands::install;
pub use error::{Error, Result};
