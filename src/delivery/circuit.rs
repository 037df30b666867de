//! Protection of delivery, so that a failing or hanging API does not slow
//! the healthy ones, nor one rule's failing route the other rules' requests
//! to the same host: circuit breakers, a bound on the requests in flight
//! for each endpoint (scheme, host and port), and a request rate per rule.
//!
//! Two kinds of circuit, each a breaker:
//! - an **endpoint's**, opened by attempts that cannot reach it at all
//!   (connection refused, connect timeout, DNS, TLS): every rule's
//!   requests to it wait;
//! - a **route's**, one rule's at one endpoint, opened by its requests
//!   failing there otherwise (a timeout, a 5xx or a 429): only that rule's
//!   requests to that endpoint wait; the other rules' go on.
//!
//! A route is a rule and an endpoint, not a URL: a templated path would
//! make a circuit per document, and a path can hold a secret.
//!
//! - **Closed**: requests go. `failures` failed attempts in a row open the
//!   circuit.
//! - **Open**: nothing goes until `cooldown` has passed. Then one request
//!   goes as a probe (half-open) while the others keep waiting; its
//!   success closes the circuit, its failure opens it for another cooldown.
//! - **In flight**: at most `share` requests to one endpoint at once (all
//!   rules together), while another endpoint has had requests within the
//!   last minute (a deployment with one API has nobody to share with).
//!
//! A request that may not go is told how long to wait, and whether a
//! circuit or the share holds it: the caller ends its run without holding
//! a delivery slot, and its database runs again then. What a wait on a
//! circuit does to the rule's retries is the caller's.
//!
//! At most [`MAX_CIRCUITS`] circuits are kept: one closed and unused for
//! [`IDLE`] is forgotten, and beyond the cap the least recently used one
//! with no request in flight (an open one forgotten starts closed again).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

/// How long a request waits for a full endpoint's slot.
const BUSY_WAIT: Duration = Duration::from_secs(1);

/// An endpoint with a request this recent is one to share slots with.
const ACTIVE: Duration = Duration::from_secs(60);

/// A closed circuit unused this long is forgotten.
pub const IDLE: Duration = Duration::from_secs(600);

/// The circuits kept at most (endpoints and routes together).
pub const MAX_CIRCUITS: usize = 10_000;

/// How often idle circuits are looked for, below the cap.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// The breaker's settings.
#[derive(Clone, Debug)]
pub struct CircuitSettings {
    /// Failed attempts in a row that open a circuit.
    pub failures: u32,
    /// How long an open circuit lets nothing through.
    pub cooldown: Duration,
    /// Requests in flight to one endpoint, at most.
    pub share: usize,
}

/// Where a circuit stands.
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

/// Which circuit: an endpoint's, or a rule's at an endpoint (a route's).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CircuitKey {
    /// Scheme, host and port.
    pub origin: String,
    /// The rule of a route's circuit; `None` for the endpoint's.
    pub rule: Option<String>,
}

impl CircuitKey {
    /// The circuit of the whole endpoint.
    pub fn endpoint(origin: &str) -> Self {
        CircuitKey {
            origin: origin.to_string(),
            rule: None,
        }
    }

    /// The circuit of `rule`'s requests to the endpoint.
    pub fn route(rule: &str, origin: &str) -> Self {
        CircuitKey {
            origin: origin.to_string(),
            rule: Some(rule.to_string()),
        }
    }

    /// The circuits a request of `rule` to `origin` passes: the endpoint's,
    /// then the route's.
    pub fn both(rule: &str, origin: &str) -> [Self; 2] {
        [Self::endpoint(origin), Self::route(rule, origin)]
    }
}

/// `origin`, or `origin (on_change rule)`: in logs, statuses, the console.
impl fmt::Display for CircuitKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.rule {
            None => f.write_str(&self.origin),
            Some(rule) => write!(f, "{} (on_change {rule})", self.origin),
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
struct Circuit {
    state: State,
    in_flight: usize,
    /// When a request last went.
    last_used: Instant,
    /// The failure that last opened it, for the requests it holds.
    reason: String,
}

/// Why a request may not go now, and for how long.
#[derive(Debug)]
pub enum Held {
    /// An open or half-open circuit holds it.
    Open(Duration, String),
    /// Its endpoint has its share of requests in flight.
    Busy(Duration, String),
    /// Its rule has sent its `rate_limit` for now.
    Paced(Duration, String),
}

impl Held {
    /// How long to wait.
    pub fn wait(&self) -> Duration {
        match self {
            Held::Open(wait, _) | Held::Busy(wait, _) | Held::Paced(wait, _) => *wait,
        }
    }

    /// Why, in words safe to log.
    pub fn why(&self) -> &str {
        match self {
            Held::Open(_, why) | Held::Busy(_, why) | Held::Paced(_, why) => why,
        }
    }
}

impl Circuit {
    fn new(now: Instant) -> Self {
        Circuit {
            state: State::Closed { failures: 0 },
            in_flight: 0,
            last_used: now,
            reason: String::new(),
        }
    }

    /// Closed, with nothing in flight, unused for [`IDLE`]: nothing lost by
    /// forgetting it but a count of failures.
    fn idle(&self, now: Instant) -> bool {
        matches!(self.state, State::Closed { .. })
            && self.in_flight == 0
            && now.duration_since(self.last_used) >= IDLE
    }

    /// Whether a request may pass now, as a probe or not.
    fn check(&self, key: &CircuitKey, cooldown: Duration, now: Instant) -> Result<bool, Held> {
        match self.state {
            State::Open { until } if now < until => Err(Held::Open(
                until - now,
                format!("circuit open for {key}: {}", self.reason),
            )),
            State::Open { .. } => Ok(true),
            State::Probing => Err(Held::Open(
                cooldown,
                format!("circuit half-open for {key}: a probe is under way"),
            )),
            State::Closed { .. } => Ok(false),
        }
    }

    fn take(&mut self, probe: bool, now: Instant) {
        if probe {
            self.state = State::Probing;
        }
        self.in_flight += 1;
        self.last_used = now;
    }

    /// The outcome of a request that went: `Some(true)` a success,
    /// `Some(false)` a failure (`why`), `None` nothing learnt (abandoned, or
    /// a failure that is the other circuit's).
    fn report(
        &mut self,
        key: &CircuitKey,
        settings: &CircuitSettings,
        probe: bool,
        ok: Option<bool>,
        why: &str,
    ) {
        self.in_flight = self.in_flight.saturating_sub(1);
        let opened = State::Open {
            until: Instant::now() + settings.cooldown,
        };
        self.state = match (ok, &self.state) {
            (Some(true), State::Closed { .. }) => State::Closed { failures: 0 },
            // A request sent before the circuit opened may answer after:
            // the endpoint is back either way.
            (Some(true), _) => {
                let by = if probe { "the probe" } else { "a request" };
                tracing::info!(circuit = %key, "circuit closed: {by} succeeded");
                State::Closed { failures: 0 }
            }
            (Some(false), State::Closed { failures }) if *failures + 1 < settings.failures => {
                State::Closed {
                    failures: failures + 1,
                }
            }
            (Some(false), State::Closed { .. }) => {
                tracing::warn!(circuit = %key, failures = settings.failures, cooldown = ?settings.cooldown, error = why, "circuit open: the endpoint keeps failing");
                self.reason = why.to_string();
                opened
            }
            (Some(false), _) if probe => {
                tracing::warn!(circuit = %key, error = why, "circuit open again: the probe failed");
                self.reason = why.to_string();
                opened
            }
            // A probe abandoned: the next request probes again.
            (None, State::Probing) if probe => State::Open {
                until: Instant::now(),
            },
            _ => std::mem::replace(&mut self.state, State::Closed { failures: 0 }),
        };
    }
}

/// The circuits kept, bounded.
#[derive(Debug)]
struct Circuits {
    map: HashMap<CircuitKey, Circuit>,
    /// When idle circuits were last forgotten.
    swept: Instant,
}

impl Circuits {
    fn get(&mut self, key: &CircuitKey, now: Instant) -> &mut Circuit {
        if !self.map.contains_key(key) {
            self.make_room(now);
        }
        self.map
            .entry(key.clone())
            .or_insert_with(|| Circuit::new(now))
    }

    /// Forgets idle circuits now and then, and at the cap the least
    /// recently used one with nothing in flight.
    fn make_room(&mut self, now: Instant) {
        if self.map.len() >= MAX_CIRCUITS || now.duration_since(self.swept) >= SWEEP_EVERY {
            self.map.retain(|_, c| !c.idle(now));
            self.swept = now;
        }
        if self.map.len() >= MAX_CIRCUITS {
            let oldest = self
                .map
                .iter()
                .filter(|(_, c)| c.in_flight == 0)
                .min_by_key(|(_, c)| c.last_used)
                .map(|(key, _)| key.clone());
            if let Some(key) = oldest {
                self.map.remove(&key);
            }
        }
    }

    /// Whether a request to `origin` must wait for a slot: it has `share`
    /// in flight, and another endpoint is active (only then are the others
    /// looked at).
    fn must_share(&self, origin: &str, share: usize, now: Instant) -> bool {
        let endpoint = CircuitKey::endpoint(origin);
        let full = self
            .map
            .get(&endpoint)
            .is_some_and(|c| c.in_flight >= share);
        full && self.map.iter().any(|(key, c)| {
            key.rule.is_none() && key.origin != origin && now.duration_since(c.last_used) < ACTIVE
        })
    }

    /// Lets a request through both its circuits and the endpoint's share,
    /// or says why not; the probes it is, endpoint's and route's.
    fn admit(
        &mut self,
        keys: &[CircuitKey; 2],
        settings: &CircuitSettings,
        now: Instant,
    ) -> Result<[bool; 2], Held> {
        let [endpoint, route] = keys;
        let shared = self.must_share(&endpoint.origin, settings.share, now);
        let probes = [
            self.get(endpoint, now)
                .check(endpoint, settings.cooldown, now)?,
            self.get(route, now).check(route, settings.cooldown, now)?,
        ];
        if shared && !probes[0] {
            let in_flight = self.get(endpoint, now).in_flight;
            let why = format!("{in_flight} requests in flight to {endpoint} already");
            return Err(Held::Busy(BUSY_WAIT, why));
        }
        for (key, probe) in keys.iter().zip(probes) {
            self.get(key, now).take(probe, now);
        }
        Ok(probes)
    }
}

/// Every circuit, and every rule's rate.
#[derive(Debug)]
pub struct Endpoints {
    settings: CircuitSettings,
    circuits: Mutex<Circuits>,
    /// Per rule: when its next request may go.
    next_slot: Mutex<HashMap<String, Instant>>,
}

/// What a request may do.
#[derive(Debug)]
pub enum Admit<'a> {
    /// Go; report the outcome on the pass.
    Go(Pass<'a>),
    /// Wait, without holding a slot.
    Wait(Held),
}

/// A request under way, through its endpoint's circuit and its route's.
/// Dropped without a report (the run was abandoned), it frees its slot and
/// counts for nothing.
#[derive(Debug)]
pub struct Pass<'a> {
    endpoints: &'a Endpoints,
    /// The endpoint's circuit and the route's.
    keys: [CircuitKey; 2],
    probes: [bool; 2],
    reported: bool,
}

impl Endpoints {
    pub fn new(settings: CircuitSettings) -> Self {
        Endpoints {
            settings: CircuitSettings {
                share: settings.share.max(1),
                failures: settings.failures.max(1),
                ..settings
            },
            circuits: Mutex::new(Circuits {
                map: HashMap::new(),
                swept: Instant::now(),
            }),
            next_slot: Mutex::default(),
        }
    }

    fn circuits(&self) -> MutexGuard<'_, Circuits> {
        // Counters only; a poisoned lock is safe to reuse.
        self.circuits.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a request of `rule` to `origin` may go now.
    pub fn admit(&self, rule: &str, origin: &str) -> Admit<'_> {
        let keys = CircuitKey::both(rule, origin);
        let verdict = self.circuits().admit(&keys, &self.settings, Instant::now());
        match verdict {
            Ok(probes) => Admit::Go(Pass {
                endpoints: self,
                keys,
                probes,
                reported: false,
            }),
            Err(held) => Admit::Wait(held),
        }
    }

    /// Whether a request of `rule`, at most `per_second`, to `origin` may
    /// go now: as [`Endpoints::admit`], after the rule's pace. Only a
    /// request that goes takes the rule's rate slot, so that one a circuit
    /// refuses does not delay the next.
    pub fn admit_paced(&self, rule: &str, origin: &str, per_second: f64) -> Admit<'_> {
        let gap = Duration::from_secs_f64(1.0 / per_second);
        // Instants only; a poisoned lock is safe to reuse.
        let mut next = self.next_slot.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if let Some(at) = next.get(rule).filter(|at| **at > now) {
            let why = format!("on_change {rule} keeps to its rate_limit of {per_second} a second");
            return Admit::Wait(Held::Paced(*at - now, why));
        }
        let admit = self.admit(rule, origin);
        if let Admit::Go(_) = admit {
            next.insert(rule.to_string(), now + gap);
        }
        admit
    }

    /// Every circuit's state, for the console.
    pub fn states(&self) -> Vec<(String, CircuitState)> {
        let now = Instant::now();
        let circuits = self.circuits();
        let mut states: Vec<(&CircuitKey, CircuitState)> = circuits
            .map
            .iter()
            .map(|(key, c)| (key, c.state.seen_at(now)))
            .collect();
        states.sort_by(|a, b| a.0.cmp(b.0));
        states
            .into_iter()
            .map(|(key, state)| (key.to_string(), state))
            .collect()
    }

    /// One circuit's state (closed when not kept), for metrics.
    pub fn state(&self, key: &CircuitKey) -> CircuitState {
        let now = Instant::now();
        let circuits = self.circuits();
        circuits
            .map
            .get(key)
            .map_or(CircuitState::Closed, |c| c.state.seen_at(now))
    }

    /// Whether the circuit is kept.
    pub fn knows(&self, key: &CircuitKey) -> bool {
        self.circuits().map.contains_key(key)
    }

    /// The worst state of the circuits `keep` selects: open if one is,
    /// else half-open if one is.
    pub fn worst(&self, keep: impl Fn(&CircuitKey) -> bool) -> CircuitState {
        let now = Instant::now();
        let circuits = self.circuits();
        let states = circuits
            .map
            .iter()
            .filter(|(key, _)| keep(key))
            .map(|(_, c)| c.state.seen_at(now));
        states.fold(CircuitState::Closed, |worst, s| match (worst, s) {
            (CircuitState::Open, _) | (_, CircuitState::Open) => CircuitState::Open,
            (CircuitState::HalfOpen, _) | (_, CircuitState::HalfOpen) => CircuitState::HalfOpen,
            _ => CircuitState::Closed,
        })
    }

    fn report(&self, pass: &Pass<'_>, oks: [Option<bool>; 2], why: &str) {
        let mut circuits = self.circuits();
        for ((key, probe), ok) in pass.keys.iter().zip(pass.probes).zip(oks) {
            // Forgotten at the cap meanwhile: nothing to report to.
            if let Some(c) = circuits.map.get_mut(key) {
                c.report(key, &self.settings, probe, ok, why);
            }
        }
    }
}

impl Pass<'_> {
    /// The request went through, or failed for a reason of its own (a
    /// 4xx): both circuits learn the endpoint answers.
    pub fn succeeded(self) {
        self.finish([Some(true), Some(true)], "");
    }

    /// The endpoint could not be reached (`why`): its circuit counts it.
    pub fn unreachable(self, why: &str) {
        self.finish([Some(false), None], why);
    }

    /// The endpoint failed the request (`why`): a timeout, a 5xx, a 429.
    /// The route's circuit counts it; an answer (`answered`) also tells
    /// the endpoint's that it is reachable.
    pub fn failed(self, answered: bool, why: &str) {
        self.finish([answered.then_some(true), Some(false)], why);
    }

    fn finish(mut self, oks: [Option<bool>; 2], why: &str) {
        self.endpoints.report(&self, oks, why);
        // Reported: the drop must not report again.
        self.reported = true;
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        if !self.reported {
            self.endpoints.report(self, [None, None], "");
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

    fn go<'a>(e: &'a Endpoints, rule: &str, origin: &str) -> Pass<'a> {
        match e.admit(rule, origin) {
            Admit::Go(pass) => pass,
            Admit::Wait(held) => panic!("waits {:?}: {}", held.wait(), held.why()),
        }
    }

    fn held(e: &Endpoints, rule: &str, origin: &str) -> Held {
        match e.admit(rule, origin) {
            Admit::Go(_) => panic!("admitted"),
            Admit::Wait(held) => held,
        }
    }

    fn waits(e: &Endpoints, origin: &str) -> Duration {
        held(e, "r", origin).wait()
    }

    #[tokio::test(start_paused = true)]
    async fn failures_in_a_row_open_the_circuit_and_a_probe_closes_it() {
        let e = endpoints(10);
        go(&e, "r", "http://bad").unreachable("refused");
        go(&e, "r", "http://bad").succeeded();
        for _ in 0..3 {
            go(&e, "r", "http://bad").unreachable("refused");
        }
        assert_eq!(waits(&e, "http://bad"), Duration::from_secs(30));
        go(&e, "r", "http://good").succeeded();
        tokio::time::advance(Duration::from_secs(30)).await;
        let probe = go(&e, "r", "http://bad");
        assert_eq!(e.states()[0], ("http://bad".into(), CircuitState::HalfOpen));
        waits(&e, "http://bad");
        probe.unreachable("refused");
        assert_eq!(waits(&e, "http://bad"), Duration::from_secs(30));
        tokio::time::advance(Duration::from_secs(30)).await;
        go(&e, "r", "http://bad").succeeded();
        assert_eq!(e.states()[0], ("http://bad".into(), CircuitState::Closed));
        go(&e, "r", "http://bad").succeeded();
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_sent_before_the_circuit_opened_closes_it_by_succeeding() {
        let e = endpoints(10);
        let slow = CircuitKey::endpoint("http://slow");
        let late = go(&e, "r", "http://slow");
        for _ in 0..3 {
            go(&e, "r", "http://slow").unreachable("refused");
        }
        assert_eq!(e.state(&slow), CircuitState::Open);
        late.succeeded();
        assert_eq!(e.state(&slow), CircuitState::Closed);
        go(&e, "r", "http://slow").succeeded();
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreachable_endpoint_holds_every_rule_with_the_reason() {
        let e = endpoints(10);
        for _ in 0..3 {
            go(&e, "a", "http://down").unreachable("connection refused");
        }
        let Held::Open(wait, why) = held(&e, "b", "http://down") else {
            panic!("not held by the circuit");
        };
        assert_eq!(wait, Duration::from_secs(30));
        assert!(why.contains("http://down: connection refused"), "{why}");
        assert_eq!(
            e.state(&CircuitKey::route("a", "http://down")),
            CircuitState::Closed
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_route_holds_its_own_rule_only() {
        let e = endpoints(10);
        go(&e, "slow", "http://api").failed(false, "no answer");
        go(&e, "slow", "http://api").failed(true, "HTTP 503");
        go(&e, "good", "http://api").succeeded();
        go(&e, "slow", "http://api").failed(false, "no answer");
        let Held::Open(_, why) = held(&e, "slow", "http://api") else {
            panic!("not held by the circuit");
        };
        assert!(
            why.contains("http://api (on_change slow): no answer"),
            "{why}"
        );
        go(&e, "good", "http://api").succeeded();
        let endpoint = CircuitKey::endpoint("http://api");
        assert_eq!(e.state(&endpoint), CircuitState::Closed);
        let route = CircuitKey::route("slow", "http://api");
        assert_eq!(e.state(&route), CircuitState::Open);
        tokio::time::advance(Duration::from_secs(30)).await;
        go(&e, "slow", "http://api").succeeded();
        assert_eq!(e.state(&route), CircuitState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn an_endpoint_shares_slots_only_with_active_others_and_an_abandoned_pass_frees_its_own()
    {
        let e = endpoints(2);
        let alone: Vec<Pass> = (0..3).map(|_| go(&e, "r", "http://slow")).collect();
        drop(alone);
        go(&e, "r", "http://other").succeeded();
        let first = go(&e, "r", "http://slow");
        let second = go(&e, "s", "http://slow");
        assert!(matches!(
            held(&e, "t", "http://slow"),
            Held::Busy(BUSY_WAIT, _)
        ));
        go(&e, "r", "http://other").succeeded();
        drop(first);
        second.succeeded();
        let _again = go(&e, "r", "http://slow");
        tokio::time::advance(ACTIVE).await;
        let _alone_again: Vec<Pass> = (0..3).map(|_| go(&e, "r", "http://slow")).collect();
    }

    #[tokio::test(start_paused = true)]
    async fn idle_circuits_are_forgotten_and_the_total_is_capped() {
        let e = endpoints(10);
        let open = CircuitKey::endpoint("http://down");
        for _ in 0..3 {
            go(&e, "r", "http://down").unreachable("refused");
        }
        go(&e, "r", "http://idle").succeeded();
        tokio::time::advance(IDLE).await;
        go(&e, "r", "http://new").succeeded();
        assert!(!e.knows(&CircuitKey::endpoint("http://idle")));
        assert!(e.knows(&open), "an open circuit is not idle");
        let in_flight = go(&e, "r", "http://busy");
        // Two circuits each: past the cap by twenty.
        for n in 0..MAX_CIRCUITS / 2 + 10 {
            go(&e, "r", &format!("http://h{n}")).succeeded();
        }
        assert_eq!(e.circuits().map.len(), MAX_CIRCUITS);
        assert!(e.knows(&CircuitKey::endpoint("http://busy")));
        in_flight.succeeded();
    }

    #[tokio::test(start_paused = true)]
    async fn a_rule_is_paced_to_its_rate() {
        let e = endpoints(10);
        let start = Instant::now();
        for _ in 0..5 {
            loop {
                match e.admit_paced("rule", "http://api", 10.0) {
                    Admit::Go(pass) => break pass.succeeded(),
                    Admit::Wait(held) => tokio::time::sleep(held.wait()).await,
                }
            }
        }
        assert_eq!(start.elapsed(), Duration::from_millis(400));
    }
}
