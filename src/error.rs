//! The library's error type: what can stop a command.

use crate::config::ConfigError;
use crate::couch::CouchError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Couch(#[from] CouchError),
    #[error("{0}")]
    NotInstalled(String),
    #[error("worker failed: {0}")]
    Worker(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
