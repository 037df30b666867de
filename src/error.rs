//! The library's error type: what can stop a command.

use crate::config::ConfigError;
use crate::couch::CouchError;
use crate::delivery::DeliveryError;

/// Why a Spiegel command failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// CouchDB failed or refused.
    #[error(transparent)]
    Couch(#[from] CouchError),
    /// Spiegel is not installed in the spiegel database.
    #[error("{0}")]
    NotInstalled(String),
    /// The HTTP client for users' APIs could not be built.
    #[error("cannot set up delivery: {0}")]
    Delivery(#[from] DeliveryError),
    /// A worker's task panicked or was cancelled.
    #[error("worker failed: {0}")]
    Worker(#[from] tokio::task::JoinError),
}

/// The result of a Spiegel command.
pub type Result<T, E = Error> = std::result::Result<T, E>;
