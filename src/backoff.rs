//! The one backoff policy of Spiegel, how long to wait before attempt N+1,
//! and the one retry loop of its background work ([`Backoff::retry`]).
//!
//! It serves both the user-facing retry options (`--backoff-strategy`,
//! `--backoff-delay`, `--backoff-multiplier`, `--backoff-limit`, with Spiegel
//! 1.2's meaning) and the internal reconnects of CouchDB feeds (exponential,
//! capped, with jitter so that many workers do not reconnect in step).

use std::time::Duration;

use futures::future::BoxFuture;
use rand::Rng;

/// Retries left beyond which a schedule is counted as forever.
pub const MAX_SCHEDULED: u32 = 100_000;

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize, serde::Serialize,
)]
/// How the wait grows from one retry to the next.
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// The same delay before every retry (Spiegel 1.2's "linear").
    Linear,
    /// `delay * multiplier^(retry - 1)`.
    Exponential,
}

/// A retry policy: how long to wait before each retry, and how many.
#[derive(Clone, Debug, PartialEq)]
pub struct Backoff {
    /// How the wait grows.
    pub strategy: Strategy,
    /// The wait before the first retry.
    pub delay: Duration,
    /// The factor of each further wait (exponential strategy).
    pub multiplier: f64,
    /// Upper bound of one wait; `None` for no bound.
    pub max_delay: Option<Duration>,
    /// Number of retries after the first attempt; 0 retries forever.
    pub limit: u32,
    /// Draw each wait uniformly from [wait/2, wait] ("equal jitter").
    pub jitter: bool,
}

impl Backoff {
    /// The policy for reconnecting a dropped feed: 250 ms doubling up to
    /// `cap`, jittered, forever.
    pub fn reconnect(cap: Duration) -> Self {
        Backoff {
            strategy: Strategy::Exponential,
            delay: Duration::from_millis(250),
            multiplier: 2.0,
            max_delay: Some(cap),
            limit: 0,
            jitter: true,
        }
    }

    /// The wait before retry number `retry` (1 for the first retry).
    pub fn wait(&self, retry: u32) -> Duration {
        let exponent = retry.saturating_sub(1).min(64) as i32;
        let secs = match self.strategy {
            Strategy::Linear => self.delay.as_secs_f64(),
            Strategy::Exponential => self.delay.as_secs_f64() * self.multiplier.powi(exponent),
        };
        let mut wait = Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX);
        if let Some(max) = self.max_delay {
            wait = wait.min(max);
        }
        if self.jitter && !wait.is_zero() {
            let half = wait / 2;
            wait = half + rand::rng().random_range(Duration::ZERO..=half);
        }
        wait
    }

    /// The waits left in the schedule after `attempts` attempts (a request
    /// never tried has made none): the time until its last retry is due.
    /// `None` when it is retried forever, or more than [`MAX_SCHEDULED`]
    /// times, which is as good.
    pub fn schedule_left(&self, attempts: u32) -> Option<Duration> {
        let first = attempts.max(1);
        if self.limit == 0 || self.limit.saturating_sub(first) >= MAX_SCHEDULED {
            return None;
        }
        let waits = (first..=self.limit).map(|retry| self.wait(retry));
        Some(waits.fold(Duration::ZERO, Duration::saturating_add))
    }

    /// True when `retries` retries have been made and no more are allowed.
    pub fn exhausted(&self, retries: u32) -> bool {
        self.limit != 0 && retries >= self.limit
    }

    /// Runs `attempt` on `state` until it succeeds, waiting between
    /// failures as this policy says and logging each failure as `what`
    /// failing. The one retry loop of Spiegel's background work; `limit`
    /// is not applied (background work is retried for as long as the worker
    /// runs). `state` carries progress from one attempt to the next.
    pub async fn retry<S, T, E: std::fmt::Display>(
        &self,
        what: &str,
        state: &mut S,
        mut attempt: impl FnMut(&mut S) -> BoxFuture<'_, Result<T, E>>,
    ) -> T {
        let mut failures = 0;
        loop {
            match attempt(state).await {
                Ok(value) => return value,
                Err(error) => {
                    failures += 1;
                    let wait = self.wait(failures);
                    tracing::warn!(%error, retry_in = ?wait, "{what} failed; retrying");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(strategy: Strategy) -> Backoff {
        Backoff {
            strategy,
            delay: Duration::from_secs(5),
            multiplier: 2.0,
            max_delay: None,
            limit: 3,
            jitter: false,
        }
    }

    #[test]
    fn linear_waits_the_same_delay_every_time() {
        let b = policy(Strategy::Linear);
        assert_eq!(b.wait(1), Duration::from_secs(5));
        assert_eq!(b.wait(4), Duration::from_secs(5));
    }

    #[test]
    fn exponential_multiplies_and_caps() {
        let mut b = policy(Strategy::Exponential);
        assert_eq!(b.wait(1), Duration::from_secs(5));
        assert_eq!(b.wait(2), Duration::from_secs(10));
        assert_eq!(b.wait(3), Duration::from_secs(20));
        b.max_delay = Some(Duration::from_secs(12));
        assert_eq!(b.wait(3), Duration::from_secs(12));
        assert!(b.wait(u32::MAX) <= Duration::from_secs(12));
    }

    #[test]
    fn the_schedule_left_sums_the_waits_of_the_retries_not_made() {
        let mut b = policy(Strategy::Exponential);
        assert_eq!(b.schedule_left(0), Some(Duration::from_secs(35)));
        assert_eq!(b.schedule_left(1), Some(Duration::from_secs(35)));
        assert_eq!(b.schedule_left(3), Some(Duration::from_secs(20)));
        assert_eq!(b.schedule_left(4), Some(Duration::ZERO));
        b.limit = 0;
        assert_eq!(b.schedule_left(1), None);
        b.limit = u32::MAX;
        assert_eq!(b.schedule_left(1), None);
    }

    #[test]
    fn limit_zero_means_forever() {
        let mut b = policy(Strategy::Linear);
        assert!(!b.exhausted(2));
        assert!(b.exhausted(3));
        b.limit = 0;
        assert!(!b.exhausted(1_000_000));
    }

    #[tokio::test(start_paused = true)]
    async fn retry_waits_between_failures_until_an_attempt_succeeds() {
        let b = Backoff {
            max_delay: Some(Duration::from_secs(6)),
            ..policy(Strategy::Exponential)
        };
        let started = tokio::time::Instant::now();
        let mut attempts = 0;
        let value = b
            .retry("the test", &mut attempts, |n| {
                *n += 1;
                let n = *n;
                Box::pin(async move {
                    if n < 4 {
                        Err("not yet")
                    } else {
                        Ok(n)
                    }
                })
            })
            .await;
        assert_eq!(value, 4);
        // 5 s, 6 s (capped), 6 s.
        assert_eq!(started.elapsed(), Duration::from_secs(17));
    }

    #[test]
    fn jitter_stays_within_half_and_full_wait() {
        let b = Backoff::reconnect(Duration::from_secs(8));
        for retry in 1..20 {
            let w = b.wait(retry);
            assert!(w <= Duration::from_secs(8), "{w:?}");
        }
        let w = b.wait(1);
        assert!(
            w >= Duration::from_millis(125) && w <= Duration::from_millis(250),
            "{w:?}"
        );
    }
}
