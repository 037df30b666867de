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
    /// The console's embedded page does not compile.
    #[error("the admin console's page: {0}")]
    Console(#[from] minijinja::Error),
    /// A worker's task panicked or was cancelled.
    #[error("worker failed: {0}")]
    Worker(#[from] tokio::task::JoinError),
}

impl Error {
    /// Spiegel is not installed in `db_name`: the message names the command
    /// that fixes it.
    pub(crate) fn not_installed(db_name: &str) -> Self {
        Error::NotInstalled(format!(
            "Spiegel is not installed in database {db_name:?}: run `spiegel install` first"
        ))
    }
}

/// The result of a Spiegel command.
pub type Result<T, E = Error> = std::result::Result<T, E>;
