//! Replicator and on_change documents: parsing, validation and matching of
//! database names and documents, and the follower that keeps them in memory.

pub mod cache;
pub mod follower;
pub mod on_change;
pub mod replicator;
