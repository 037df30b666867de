//! Per-endpoint protection of delivery, so that a failing or hanging API
//! does not slow the healthy ones: a circuit breaker and a bound on the
//! requests in flight for each endpoint (scheme, host and port), and a
//! request rate per rule.
//!
//! - **Closed**: requests go. `failures` failed attempts in a row (no
//!   answer, a timeout, a 5xx or a 429: the endpoint's trouble, not the
//!   request's) open the circuit.
//! - **Open**: nothing goes until `cooldown` has passed. Then one request
//!   goes as a probe (half-open) while the others keep waiting; its
//!   success closes the circuit, its failure opens it for another cooldown.
//! - **In flight**: at most `share` requests to one endpoint at once, while
//!   another endpoint has had requests within the last minute (a
//!   deployment with one API has nobody to share with).
//!
//! A request that may not go is told how long to wait: the caller ends its
//! run without holding a delivery slot, and its database runs again then.
//! Such a wait is not an attempt of the request: it never leads to a dead
//! letter.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// How long a request waits for a full endpoint's slot.
const BUSY_WAIT: Duration = Duration::from_secs(1);

/// An endpoint with a request this recent is one to share slots with.
const ACTIVE: Duration = Duration::from_secs(60);

/// The breaker's settings.
#[derive(Clone, Debug)]
pub struct CircuitSettings {
    /// Failed attempts in a row that open an endpoint's circuit.
    pub failures: u32,
    /// How long an open circuit lets nothing through.
    pub cooldown: Duration,
    /// Requests in flight to one endpoint, at most.
    pub share: usize,
}

/// Where an endpoint's circuit stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CircuitState {
    /// Requests go.
    Closed,
    /// Nothing goes until the cooldown is over.
    Open,
    /// One probe is in flight.
    HalfOpen,
}

impl CircuitState {
    /// Its value in `spiegel_endpoint_circuit`.
    pub fn gauge(self) -> i64 {
        match self {
            CircuitState::Closed => 0,
            CircuitState::Open => 1,
            CircuitState::HalfOpen => 2,
        }
    }

    /// Its name in the status and the console.
    pub fn name(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half-open",
        }
    }
}

#[derive(Debug)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    Probing,
}

impl State {
    fn seen_at(&self, now: Instant) -> CircuitState {
        match self {
            State::Closed { .. } => CircuitState::Closed,
            State::Open { until } if now < *until => CircuitState::Open,
            State::Open { .. } | State::Probing => CircuitState::HalfOpen,
        }
    }
}

#[derive(Debug)]
struct Endpoint {
    state: State,
    in_flight: usize,
    /// When a request last went.
    last_used: Instant,
}

/// Every endpoint's circuit, and every rule's rate.
#[derive(Debug)]
pub struct Endpoints {
    settings: CircuitSettings,
    endpoints: Mutex<HashMap<String, Endpoint>>,
    /// Per rule: when its next request may go.
    next_slot: Mutex<HashMap<String, Instant>>,
}

/// What a request may do.
#[derive(Debug)]
pub enum Admit<'a> {
    /// Go; report the outcome on the pass.
    Go(Pass<'a>),
    /// Wait this long, for this reason, without holding a slot.
    Wait(Duration, String),
}

/// A request under way to an endpoint. Dropped without a report (the run
/// was abandoned), it frees its slot and counts for nothing.
#[derive(Debug)]
pub struct Pass<'a> {
    endpoints: &'a Endpoints,
    origin: String,
    probe: bool,
}

impl Endpoints {
    pub fn new(settings: CircuitSettings) -> Self {
        Endpoints {
            settings: CircuitSettings {
                share: settings.share.max(1),
                failures: settings.failures.max(1),
                ..settings
            },
            endpoints: Mutex::default(),
            next_slot: Mutex::default(),
        }
    }

    /// Runs `f` on the endpoint, telling it whether it must share: it has
    /// its share in flight and another endpoint is active (only then are
    /// the others looked at).
    fn with<T>(&self, origin: &str, f: impl FnOnce(&mut Endpoint, bool) -> T) -> T {
        // Counters only; a poisoned lock is safe to reuse.
        let mut endpoints = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let full = endpoints
            .get(origin)
            .is_some_and(|e| e.in_flight >= self.settings.share);
        let others = full
            && endpoints
                .iter()
                .any(|(o, e)| o != origin && now.duration_since(e.last_used) < ACTIVE);
        let endpoint = endpoints.entry(origin.to_string()).or_insert(Endpoint {
            state: State::Closed { failures: 0 },
            in_flight: 0,
            last_used: now,
        });
        f(endpoint, others)
    }

    /// Whether a request to `origin` may go now.
    pub fn admit(&self, origin: &str) -> Admit<'_> {
        let (settings, now) = (&self.settings, Instant::now());
        let verdict = self.with(origin, |e, shared| {
            let probe = match e.state {
                State::Open { until } if now < until => {
                    return Err((until - now, format!("circuit open for {origin}")))
                }
                State::Open { .. } => true,
                State::Probing => {
                    return Err((
                        settings.cooldown,
                        format!("circuit half-open for {origin}: a probe is under way"),
                    ))
                }
                State::Closed { .. } if shared => {
                    let why = format!("{} requests in flight to {origin} already", e.in_flight);
                    return Err((BUSY_WAIT, why));
                }
                State::Closed { .. } => false,
            };
            if probe {
                e.state = State::Probing;
            }
            e.in_flight += 1;
            e.last_used = now;
            Ok(probe)
        });
        match verdict {
            Ok(probe) => Admit::Go(Pass {
                endpoints: self,
                origin: origin.to_string(),
                probe,
            }),
            Err((wait, why)) => Admit::Wait(wait, why),
        }
    }

    /// Waits until `rule` may send its next request, at most `per_second`.
    pub async fn pace(&self, rule: &str, per_second: f64) {
        let gap = Duration::from_secs_f64(1.0 / per_second);
        let at = {
            let mut next = self.next_slot.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let slot = next.get(rule).copied().filter(|t| *t > now).unwrap_or(now);
            next.insert(rule.to_string(), slot + gap);
            slot
        };
        tokio::time::sleep_until(at).await;
    }

    /// Each endpoint's circuit state, for the console.
    pub fn states(&self) -> Vec<(String, CircuitState)> {
        let now = Instant::now();
        let endpoints = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        let mut states: Vec<(String, CircuitState)> = endpoints
            .iter()
            .map(|(origin, e)| (origin.clone(), e.state.seen_at(now)))
            .collect();
        states.sort_by(|a, b| a.0.cmp(&b.0));
        states
    }

    /// One endpoint's circuit state, for metrics.
    pub fn state(&self, origin: &str) -> CircuitState {
        let now = Instant::now();
        self.with(origin, |e, _| e.state.seen_at(now))
    }

    fn report(&self, origin: &str, probe: bool, ok: Option<bool>) {
        let settings = &self.settings;
        self.with(origin, |e, _| {
            e.in_flight = e.in_flight.saturating_sub(1);
            let opened = State::Open {
                until: Instant::now() + settings.cooldown,
            };
            e.state = match (ok, &e.state) {
                (Some(true), State::Closed { .. }) => State::Closed { failures: 0 },
                // A request sent before the circuit opened may answer after:
                // the endpoint is back either way.
                (Some(true), _) => {
                    let by = if probe { "the probe" } else { "a request" };
                    tracing::info!(endpoint = %origin, "circuit closed: {by} succeeded");
                    State::Closed { failures: 0 }
                }
                (Some(false), State::Closed { failures }) if *failures + 1 < settings.failures => {
                    State::Closed {
                        failures: failures + 1,
                    }
                }
                (Some(false), State::Closed { .. }) => {
                    tracing::warn!(endpoint = %origin, failures = settings.failures, cooldown = ?settings.cooldown, "circuit open: the endpoint keeps failing");
                    opened
                }
                (Some(false), _) if probe => {
                    tracing::warn!(endpoint = %origin, "circuit open again: the probe failed");
                    opened
                }
                // A probe abandoned: the next request probes again.
                (None, State::Probing) if probe => State::Open {
                    until: Instant::now(),
                },
                _ => std::mem::replace(&mut e.state, State::Closed { failures: 0 }),
            };
        });
    }
}

impl Pass<'_> {
    /// The request went through, or failed for a reason of its own (a 4xx).
    pub fn succeeded(self) {
        self.finish(Some(true));
    }

    /// The endpoint failed the request: no answer, a timeout, a 5xx, a 429.
    pub fn failed(self) {
        self.finish(Some(false));
    }

    fn finish(mut self, ok: Option<bool>) {
        self.endpoints.report(&self.origin, self.probe, ok);
        // Reported: the drop must not report again.
        self.origin.clear();
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        if !self.origin.is_empty() {
            self.endpoints.report(&self.origin, self.probe, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(share: usize) -> Endpoints {
        Endpoints::new(CircuitSettings {
            failures: 3,
            cooldown: Duration::from_secs(30),
            share,
        })
    }

    fn go<'a>(e: &'a Endpoints, origin: &str) -> Pass<'a> {
        match e.admit(origin) {
            Admit::Go(pass) => pass,
            Admit::Wait(wait, why) => panic!("waits {wait:?}: {why}"),
        }
    }

    fn waits(e: &Endpoints, origin: &str) -> Duration {
        match e.admit(origin) {
            Admit::Go(_) => panic!("admitted"),
            Admit::Wait(wait, _) => wait,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn failures_in_a_row_open_the_circuit_and_a_probe_closes_it() {
        let e = endpoints(10);
        go(&e, "http://bad").failed();
        go(&e, "http://bad").succeeded();
        for _ in 0..3 {
            go(&e, "http://bad").failed();
        }
        assert_eq!(waits(&e, "http://bad"), Duration::from_secs(30));
        go(&e, "http://good").succeeded();
        tokio::time::advance(Duration::from_secs(30)).await;
        let probe = go(&e, "http://bad");
        assert_eq!(e.states()[0], ("http://bad".into(), CircuitState::HalfOpen));
        waits(&e, "http://bad");
        probe.failed();
        assert_eq!(waits(&e, "http://bad"), Duration::from_secs(30));
        tokio::time::advance(Duration::from_secs(30)).await;
        go(&e, "http://bad").succeeded();
        assert_eq!(e.states()[0], ("http://bad".into(), CircuitState::Closed));
        go(&e, "http://bad").succeeded();
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_sent_before_the_circuit_opened_closes_it_by_succeeding() {
        let e = endpoints(10);
        let late = go(&e, "http://slow");
        for _ in 0..3 {
            go(&e, "http://slow").failed();
        }
        assert_eq!(e.state("http://slow"), CircuitState::Open);
        late.succeeded();
        assert_eq!(e.state("http://slow"), CircuitState::Closed);
        go(&e, "http://slow").succeeded();
    }

    #[tokio::test(start_paused = true)]
    async fn an_endpoint_shares_slots_only_with_active_others_and_an_abandoned_pass_frees_its_own()
    {
        let e = endpoints(2);
        let alone: Vec<Pass> = (0..3).map(|_| go(&e, "http://slow")).collect();
        drop(alone);
        go(&e, "http://other").succeeded();
        let first = go(&e, "http://slow");
        let second = go(&e, "http://slow");
        assert_eq!(waits(&e, "http://slow"), BUSY_WAIT);
        go(&e, "http://other").succeeded();
        drop(first);
        second.succeeded();
        let _again = go(&e, "http://slow");
        tokio::time::advance(ACTIVE).await;
        let _alone_again: Vec<Pass> = (0..3).map(|_| go(&e, "http://slow")).collect();
    }

    #[tokio::test(start_paused = true)]
    async fn a_rule_is_paced_to_its_rate() {
        let e = endpoints(10);
        let start = Instant::now();
        for _ in 0..5 {
            e.pace("rule", 10.0).await;
        }
        assert_eq!(start.elapsed(), Duration::from_millis(400));
    }
}
