//! Replicator and on_change documents: parsing, validation and matching of
//! database names and documents. Arrives with the roles that use them.
