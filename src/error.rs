//! The library's error type: what can stop a command.

use crate::config::ConfigError;
use crate::couch::CouchError;
use crate::delivery::DeliveryError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Couch(#[from] CouchError),
    #[error("{0}")]
    NotInstalled(String),
    /// The HTTP client for users' APIs could not be built.
    #[error("cannot set up delivery: {0}")]
    Delivery(#[from] DeliveryError),
    /// A worker's task panicked or was cancelled.
    #[error("worker failed: {0}")]
    Worker(#[from] tokio::task::JoinError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
