//! Who is live, judged by each observer on its own monotonic clock: a
//! member whose revision has not changed for the liveness window
//! ([`super::renewer::Timing::window`]) is dead. No two
//! hosts' clocks need to agree, only their rates (within a few percent).

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use tokio::time::Instant;

/// Who is live, as seen from one worker.
#[derive(Debug)]
pub struct Liveness {
    window: Duration,
    /// worker id -> (revision last seen, when it was first seen).
    seen: HashMap<String, (String, Instant)>,
    /// When the observer last looked.
    last_look: Option<Instant>,
}

impl Liveness {
    pub fn new(window: Duration) -> Self {
        Liveness {
            window,
            seen: HashMap::new(),
            last_look: None,
        }
    }

    /// Records the membership documents read at `now` and returns the ids of
    /// the live workers. A worker seen for the first time counts as live for
    /// one window: it may have just started, or just died.
    pub fn observe<'a>(
        &mut self,
        now: Instant,
        members: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> BTreeSet<String> {
        // An observer that could not look for a while (its own link to
        // CouchDB was down) cannot tell who beat meanwhile: everyone gets a
        // fresh lease rather than being declared dead at once.
        let blind = self
            .last_look
            .is_none_or(|t| now.duration_since(t) > self.window);
        self.last_look = Some(now);
        let mut present = HashMap::new();
        for (worker, rev) in members {
            let since = match self.seen.get(worker) {
                Some((seen_rev, since)) if seen_rev == rev && !blind => *since,
                _ => now,
            };
            present.insert(worker.to_string(), (rev.to_string(), since));
        }
        self.seen = present;
        self.seen
            .iter()
            .filter(|(_, (_, since))| now.duration_since(*since) < self.window)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Workers whose documents have not changed for `age`: candidates for
    /// clean-up.
    pub fn stale(&self, now: Instant, age: Duration) -> Vec<String> {
        self.seen
            .iter()
            .filter(|(_, (_, since))| now.duration_since(*since) >= age)
            .map(|(id, _)| id.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(ids: &[&str]) -> BTreeSet<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn liveness_uses_the_observers_clock_only() {
        let lease = Duration::from_secs(10);
        let mut l = Liveness::new(lease);
        let t0 = Instant::now();
        assert_eq!(
            l.observe(t0, [("a", "1-x"), ("b", "1-y")]),
            live(&["a", "b"])
        );
        // "a" beats, "b" does not.
        let t1 = t0 + Duration::from_secs(6);
        assert_eq!(
            l.observe(t1, [("a", "2-x"), ("b", "1-y")]),
            live(&["a", "b"])
        );
        let t2 = t0 + Duration::from_secs(11);
        assert_eq!(l.observe(t2, [("a", "2-x"), ("b", "1-y")]), live(&["a"]));
        assert_eq!(l.stale(t2, Duration::from_secs(11)), vec!["b".to_string()]);
        // After being unable to look for longer than a lease, nobody is
        // declared dead on the spot.
        let t3 = t2 + Duration::from_secs(30);
        assert_eq!(
            l.observe(t3, [("a", "3-x"), ("b", "1-y")]),
            live(&["a", "b"])
        );
        // A deleted membership document is simply gone.
        assert_eq!(l.observe(t3, [("a", "3-x")]), live(&["a"]));
    }
}
