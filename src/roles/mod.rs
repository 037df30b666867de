//! The worker roles. Each is "something to do when a database changed":
//! the replicator replicates it, the change-listener delivers its changes to
//! on_change rules. The update-listener of Spiegel 1.2 survives only as a
//! compatibility stub.

pub mod update_listener;
