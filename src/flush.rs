//! Saving what is kept in memory. State that changes at every run (status
//! books, change-listener checkpoints) is marked dirty in memory and
//! written to CouchDB in batches: every interval when it changed, and a
//! last time when the worker stops.

use std::future::Future;
use std::time::Duration;

/// Something kept in memory and saved to CouchDB when it changed.
pub trait Flush: Send + Sync + 'static {
    /// Writes what changed since the last flush. What cannot be written
    /// stays dirty for the next one.
    fn flush(&self) -> impl Future<Output = ()> + Send;
}

/// Flushes `store` every `interval`, for as long as the task lives: the
/// worker owns the task and stops it after its own final flush.
pub async fn every<F: Flush>(store: F, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate: there is nothing to save yet.
    tick.tick().await;
    loop {
        tick.tick().await;
        store.flush().await;
    }
}
