//! Spiegel: scalable replication and change listening for Apache CouchDB.
//!
//! Where things live:
//! - [`couch`]: the CouchDB client (requests, typed errors, resilient feeds).
//! - [`config`]: command line, environment variables, passwords file.
//! - [`coordination`]: partitions, leases and checkpoints shared by workers.
//! - [`roles`]: what each worker role does with a database that changed.
//! - [`rules`]: matching databases and documents to replicator and on_change docs.
//! - [`delivery`]: calling the users' HTTP APIs.
//! - [`admin`]: the health, readiness and metrics endpoints.
//! - [`install`]: the install and uninstall commands.
//! - [`backoff`]: the one retry policy.

pub mod admin;
pub mod backoff;
pub mod config;
pub mod coordination;
pub mod couch;
pub mod delivery;
pub mod error;
pub mod install;
pub mod logging;
pub mod metrics;
pub mod roles;
pub mod rules;
pub mod worker;

pub use error::{Error, Result};
