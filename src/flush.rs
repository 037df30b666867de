//! Saving what is kept in memory. State that changes at every run (status
//! books, change-listener checkpoints) is marked dirty in memory and
//! written to CouchDB in batches: every interval when it changed, before a
//! partition is handed to another worker, and a last time when the worker
//! stops.

use std::future::Future;
use std::time::Duration;

/// Makes the flushes of one store take turns.
pub type Turn = tokio::sync::Mutex<()>;

/// Something kept in memory and saved to CouchDB when it changed.
pub trait Flush: Send + Sync + 'static {
    /// The store's [`Turn`].
    fn turn(&self) -> &Turn;

    /// Writes what changed since the last write. What cannot be written
    /// stays dirty for the next one.
    fn write_changes(&self) -> impl Future<Output = ()> + Send;

    /// Writes what changed, after any flush in flight: when it returns,
    /// what changed before the call is in CouchDB (or dirty again), even
    /// if the periodic flush had taken it a moment before. The next owner
    /// of a partition and the next start read it there.
    fn flush(&self) -> impl Future<Output = ()> + Send {
        async move {
            let _turn = self.turn().lock().await;
            self.write_changes().await;
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// A store whose writes take a while and count what they wrote.
    #[derive(Default)]
    struct Slow {
        turn: Turn,
        dirty: AtomicUsize,
        written: AtomicUsize,
    }

    impl Flush for Arc<Slow> {
        fn turn(&self) -> &Turn {
            &self.turn
        }

        async fn write_changes(&self) {
            let taken = self.dirty.swap(0, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_secs(1)).await;
            self.written.fetch_add(taken, Ordering::SeqCst);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_flush_returns_after_the_write_in_flight_has_landed() {
        let store = Arc::new(Slow::default());
        store.dirty.store(3, Ordering::SeqCst);
        let periodic = tokio::spawn({
            let store = store.clone();
            async move { store.flush().await }
        });
        // Let the periodic flush take the changes and start writing.
        tokio::task::yield_now().await;
        assert_eq!(store.dirty.load(Ordering::SeqCst), 0);
        store.flush().await;
        assert_eq!(
            store.written.load(Ordering::SeqCst),
            3,
            "the second flush found nothing dirty, yet returned only once the first had written"
        );
        periodic.await.expect("the periodic flush");
    }
}
