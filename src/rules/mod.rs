//! Replicator and on_change documents: parsing, validation and matching of
//! database names and documents, and the follower that keeps them in memory.
//! An on_change document is compiled here, once, into the request the
//! delivery sends ([`on_change::Template`]); the delivery depends on this
//! module, never the other way round.

pub mod cache;
pub mod follower;
pub mod on_change;
pub mod replicator;
