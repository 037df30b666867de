//! Replicator and on_change documents: parsing, validation and matching of
//! database names and documents, and the follower that keeps them in memory.

pub mod follower;
pub mod replicator;
