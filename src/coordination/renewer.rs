//! The heartbeat: a worker proves it is alive by writing its membership
//! document, and stops working on its partitions (fencing) before others
//! may take them for its silence.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::lease::WorkerDoc;
use super::store::LeaseStore;

/// Timing of the coordination protocol.
#[derive(Clone, Debug)]
pub struct Timing {
    /// Time without a heartbeat after which a worker is taken for dead.
    pub lease: Duration,
    /// Interval of heartbeats and lease checks; a third of the lease time
    /// by default, so two can be lost without losing the lease.
    pub heartbeat: Duration,
    /// How long a partition being given up may wait for its runs before it
    /// is released anyway.
    pub drain: Duration,
}

impl Timing {
    /// Fencing: once our last heartbeat is older than the lease time minus
    /// a heartbeat, others may soon take our partitions, so we must not
    /// work on them any more.
    pub fn fenced(&self, last_beat: Option<Instant>, now: Instant) -> bool {
        last_beat.is_none_or(|t| now.saturating_duration_since(t) + self.heartbeat >= self.lease)
    }

    /// How often a worker looks, between its heartbeats, for members that
    /// stopped beating: a fifth of a heartbeat (1 s by default).
    pub fn watch(&self) -> Duration {
        self.heartbeat / 5
    }

    /// How long a member's revision must stay unchanged, on the observer's
    /// clock, for the member to be taken for dead: the lease time less
    /// three looks. The observer first sees a heartbeat within a look of its
    /// write and notices the silence within a look of the window's end, so
    /// a dead worker's partitions are taken within a lease time of its last
    /// heartbeat; and the window stays above the `lease − heartbeat` at
    /// which the dead worker fenced itself (by two fifths of a heartbeat),
    /// so they are never taken while it may still start work on them.
    pub fn window(&self) -> Duration {
        self.lease.saturating_sub(self.watch() * 3)
    }

    /// How long from `now` until [`Timing::fenced`] holds; zero once it does.
    pub fn until_fenced(&self, last_beat: Option<Instant>, now: Instant) -> Duration {
        last_beat.map_or(Duration::ZERO, |t| {
            (t + self.lease).saturating_duration_since(now + self.heartbeat)
        })
    }
}

/// Writes the heartbeats of one worker and remembers the last that worked.
pub struct Renewer {
    member: WorkerDoc,
    timing: Timing,
    last_beat: Option<Instant>,
    /// Publishes `last_beat` to the worker, which fences itself with it.
    beats: watch::Sender<Option<Instant>>,
}

impl Renewer {
    pub fn new(member: WorkerDoc, timing: Timing, beats: watch::Sender<Option<Instant>>) -> Self {
        Renewer {
            member,
            timing,
            last_beat: None,
            beats,
        }
    }

    /// One heartbeat, bounded by the heartbeat interval. True if it was
    /// written.
    pub async fn renew<S: LeaseStore>(&mut self, store: &S) -> bool {
        // The time the write was sent: an observer can only see it later,
        // so leases computed from it are never longer than others think.
        let sent = Instant::now();
        let mut member = self.member.clone();
        member.beats += 1;
        member.beat_at = Some(crate::ids::timestamp());
        let role = member.role.clone();
        match tokio::time::timeout(self.timing.heartbeat, store.beat(member)).await {
            Ok(Ok(written)) => {
                self.member = written;
                self.last_beat = Some(sent);
                let _ = self.beats.send(Some(sent));
                true
            }
            Ok(Err(e)) => {
                tracing::warn!(%role, error = %e, "heartbeat failed");
                false
            }
            Err(_) => {
                tracing::warn!(%role, "heartbeat timed out");
                false
            }
        }
    }

    /// True once the heartbeat has failed for too long (see [`Timing::fenced`]).
    pub fn fenced(&self, now: Instant) -> bool {
        self.timing.fenced(self.last_beat, now)
    }

    /// How long until [`Renewer::fenced`] holds.
    pub fn until_fenced(&self, now: Instant) -> Duration {
        self.timing.until_fenced(self.last_beat, now)
    }

    /// Removes the membership document: a clean stop.
    pub async fn leave<S: LeaseStore>(&self, store: &S) {
        if let Err(e) = store.remove(&self.member).await {
            tracing::warn!(role = %self.member.role, error = %e, "cannot remove the membership document");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_is_fenced_a_heartbeat_before_its_lease_ends() {
        let timing = Timing {
            lease: Duration::from_secs(30),
            heartbeat: Duration::from_secs(10),
            drain: Duration::from_secs(30),
        };
        let beat = Instant::now();
        assert!(timing.fenced(None, beat), "never beat: fenced");
        assert!(!timing.fenced(Some(beat), beat + Duration::from_secs(19)));
        assert!(timing.fenced(Some(beat), beat + Duration::from_secs(20)));
        assert_eq!(timing.until_fenced(None, beat), Duration::ZERO);
        assert_eq!(
            timing.until_fenced(Some(beat), beat + Duration::from_secs(19)),
            Duration::from_secs(1)
        );
        assert_eq!(
            timing.until_fenced(Some(beat), beat + Duration::from_secs(25)),
            Duration::ZERO
        );
    }
}
