//! The life of each partition's lease as one worker sees it: the one state
//! machine of the lease lifecycle.
//!
//! ```text
//!  Free/Lost --claim--> Claiming --won--> Owned --rebalance--> Draining
//!                          |                |                      |
//!                     lost the race    taken by another,     runs over, or
//!                          v           or fenced: Lost       drain timeout
//!                        Free                                      v
//!  Free <--------------------written-------------------------- Releasing
//! ```
//!
//! A lease found ours in the store (an earlier life of this worker) goes
//! from Free or Lost straight to Owned. Owned, Draining and Releasing go to
//! Lost as soon as the store shows another owner or the heartbeat has
//! failed for too long (fencing).

use tokio::time::{Duration, Instant};

/// Where one partition's lease stands, for this worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseState {
    /// Not ours: free, or another worker's.
    Free,
    /// Our claim is being written.
    Claiming,
    /// Ours: the worker runs its databases.
    Owned,
    /// Ours, being given up: the worker finishes its runs but starts none.
    Draining { since: Instant },
    /// Given up: the lease is being written free, with its last checkpoint.
    Releasing,
    /// Taken from us (another owner, or our heartbeats failing): the worker
    /// dropped it at once, without saving anything.
    Lost,
}

impl LeaseState {
    /// The worker holds the lease (in the store, the owner is us).
    pub fn held(self) -> bool {
        matches!(
            self,
            LeaseState::Owned | LeaseState::Draining { .. } | LeaseState::Releasing
        )
    }

    /// The transitions of the diagram above; every other one is refused.
    fn may_become(self, next: LeaseState) -> bool {
        use LeaseState::*;
        matches!(
            (self, next),
            (Free | Lost, Claiming | Owned)
                | (Claiming, Owned | Free)
                | (Owned, Draining { .. })
                | (Draining { .. }, Releasing)
                | (Releasing, Free)
                | (Owned | Draining { .. } | Releasing, Lost)
        )
    }
}

/// Every partition's lease state.
#[derive(Debug)]
pub struct Partitions {
    states: Vec<LeaseState>,
}

impl Partitions {
    pub fn new(count: u32) -> Self {
        Partitions {
            states: vec![LeaseState::Free; count as usize],
        }
    }

    pub fn state(&self, partition: u32) -> LeaseState {
        self.states
            .get(partition as usize)
            .copied()
            .unwrap_or(LeaseState::Free)
    }

    /// Moves `partition` to `next` if the lifecycle allows it; false (and
    /// no change) otherwise.
    pub fn set(&mut self, partition: u32, next: LeaseState) -> bool {
        match self.states.get_mut(partition as usize) {
            Some(state) if state.may_become(next) => {
                *state = next;
                true
            }
            _ => false,
        }
    }

    /// The partitions whose lease we hold.
    pub fn held(&self) -> Vec<u32> {
        self.matching(|s| s.held())
    }

    /// Draining partitions whose runs have not ended within `timeout`.
    pub fn overdue(&self, now: Instant, timeout: Duration) -> Vec<u32> {
        self.matching(|s| matches!(s, LeaseState::Draining { since } if now - since >= timeout))
    }

    fn matching(&self, keep: impl Fn(LeaseState) -> bool) -> Vec<u32> {
        (0..self.states.len() as u32)
            .filter(|&p| keep(self.state(p)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use LeaseState::*;

    #[test]
    fn a_lease_goes_round_its_lifecycle() {
        let now = Instant::now();
        let mut p = Partitions::new(1);
        for next in [Claiming, Owned, Draining { since: now }, Releasing, Free] {
            assert!(p.set(0, next), "to {next:?}");
        }
        assert!(p.held().is_empty());
    }

    #[test]
    fn illegal_transitions_are_refused() {
        let mut p = Partitions::new(2);
        assert!(!p.set(0, Releasing), "nothing to release");
        assert!(!p.set(0, Lost), "nothing to lose");
        assert!(p.set(0, Owned));
        assert!(!p.set(0, Releasing), "a release drains first");
        assert!(!p.set(0, Claiming), "already ours");
        assert!(!p.set(7, Owned), "no such partition");
        assert_eq!(p.state(0), Owned);
    }

    #[test]
    fn a_held_lease_can_be_lost_at_any_stage() {
        let now = Instant::now();
        for stage in [Owned, Draining { since: now }, Releasing] {
            let mut p = Partitions::new(1);
            p.set(0, Owned);
            if stage != Owned {
                p.set(0, Draining { since: now });
            }
            if stage == Releasing {
                p.set(0, Releasing);
            }
            assert_eq!(p.held(), [0]);
            assert!(p.set(0, Lost));
            assert!(p.held().is_empty());
            assert!(p.set(0, Claiming), "a lost lease may be claimed again");
        }
    }

    #[test]
    fn a_drain_is_overdue_after_its_timeout() {
        let start = Instant::now();
        let mut p = Partitions::new(2);
        p.set(1, Owned);
        p.set(1, Draining { since: start });
        let timeout = Duration::from_secs(10);
        assert!(p
            .overdue(start + Duration::from_secs(9), timeout)
            .is_empty());
        assert_eq!(p.overdue(start + timeout, timeout), [1]);
    }
}
