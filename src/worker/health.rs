//! Readiness as the workers of this process report it: whether each follows
//! its feed and holds a fresh lease.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::coordination::Timing;

/// What the workers of this process report about themselves.
#[derive(Debug, Default)]
pub struct Health {
    roles: Mutex<BTreeMap<String, RoleHealth>>,
}

#[derive(Debug, Clone)]
struct RoleHealth {
    feed_ok: bool,
    last_beat: Option<Instant>,
    timing: Timing,
}

impl Health {
    fn with(&self, role: &str, f: impl FnOnce(&mut RoleHealth)) {
        // Plain flags; a poisoned lock is safe to reuse.
        let mut roles = self.roles.lock().unwrap_or_else(|e| e.into_inner());
        let entry = roles.entry(role.to_string()).or_insert(RoleHealth {
            feed_ok: false,
            last_beat: None,
            timing: Timing {
                lease: Duration::from_secs(15),
                heartbeat: Duration::from_secs(5),
                drain: Duration::from_secs(30),
            },
        });
        f(entry);
    }

    /// A worker of `role` will run: the process is unready until it starts.
    pub fn expect(&self, role: &str) {
        self.with(role, |_| {});
    }

    /// A worker of `role` started (its feed is open).
    pub fn started(&self, role: &str, timing: &Timing) {
        self.with(role, |r| {
            r.feed_ok = true;
            r.timing = timing.clone();
        });
    }

    /// Records whether the role's `_db_updates` feed is connected.
    pub fn feed(&self, role: &str, ok: bool) {
        self.with(role, |r| r.feed_ok = ok);
    }

    /// The guard of the task that follows the role's `_db_updates`.
    pub(crate) fn feed_task(self: &Arc<Self>, role: &str) -> FeedTask {
        FeedTask {
            health: self.clone(),
            role: role.to_string(),
        }
    }

    /// Records the role's last successful heartbeat.
    pub fn heartbeat(&self, role: &str, at: Instant) {
        self.with(role, |r| r.last_beat = Some(at));
    }

    /// Problems that make the process unready, by role.
    pub fn problems(&self) -> Vec<String> {
        let roles = self.roles.lock().unwrap_or_else(|e| e.into_inner());
        let mut problems = Vec::new();
        for (role, r) in roles.iter() {
            if !r.feed_ok {
                problems.push(format!("{role}: not following _db_updates"));
            }
            // Unready as soon as the worker fences itself (it runs nothing).
            let last_beat = r.last_beat.map(tokio::time::Instant::from_std);
            match last_beat {
                None => problems.push(format!("{role}: no heartbeat yet")),
                Some(_) if r.timing.fenced(last_beat, tokio::time::Instant::now()) => {
                    problems.push(format!("{role}: heartbeats failing, leases lost"))
                }
                Some(_) => {}
            }
        }
        problems
    }
}

/// Held by the task that follows a role's `_db_updates`, so that the role
/// turns unready when that task ends while the worker runs: nothing else
/// would follow the feed. A panic is reported from `drop`, while the task
/// unwinds. The worker's stop, which aborts the task or drops the
/// receiving end of its channel, is not reported.
pub(crate) struct FeedTask {
    health: Arc<Health>,
    role: String,
}

impl FeedTask {
    /// The feed ended: the task returns without following it any more.
    pub(crate) fn ended(&self) {
        self.health.feed(&self.role, false);
    }
}

impl Drop for FeedTask {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.ended();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNFOLLOWED: &str = "r: not following _db_updates";

    fn started() -> Arc<Health> {
        let health = Arc::new(Health::default());
        let timing = Timing {
            lease: Duration::from_secs(15),
            heartbeat: Duration::from_secs(5),
            drain: Duration::from_secs(30),
        };
        health.started("r", &timing);
        health
    }

    #[tokio::test]
    async fn a_feed_task_that_panics_makes_its_role_unready() {
        let health = started();
        let guard = health.feed_task("r");
        let task = tokio::spawn(async move {
            let _guard = guard;
            panic!("a bug in the feed task");
        });
        assert!(task.await.unwrap_err().is_panic());
        assert!(health.problems().iter().any(|p| p == UNFOLLOWED));
    }

    #[tokio::test]
    async fn a_feed_task_stopped_with_its_worker_is_not_reported() {
        let health = started();
        let guard = health.feed_task("r");
        let task = tokio::spawn(async move {
            let _guard = guard;
            std::future::pending::<()>().await;
        });
        task.abort();
        assert!(task.await.unwrap_err().is_cancelled());
        assert!(!health.problems().iter().any(|p| p == UNFOLLOWED));
    }
}
