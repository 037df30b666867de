//! The one path of every on_change request, whether a change-listener
//! sends it or a dead letter is redelivered: keep to the rule's
//! `rate_limit` and pass the endpoint's circuit and share (the rate slot
//! taken only by a request that goes), send, and report
//! the outcome to the circuit and the metrics. What a failure does to a
//! checkpoint or a dead letter is the caller's.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use super::circuit::{Admit, CircuitKey, CircuitSettings, CircuitState, Endpoints, Held};
use super::send::{Delivered, DeliveryError, Sender};
use super::Request;
use crate::config::DeliverySettings;
use crate::metrics::{CircuitLabel, ClassLabel, RoleMetrics};

/// Circuits shown by name in the metrics and statuses, at most; the others
/// show together as `other`, so that templated hosts cannot grow them
/// without bound.
pub const MAX_SHOWN: usize = 200;

/// The longest wait for a rule's pace slept while holding a delivery slot;
/// a longer one ends the run, without holding it.
pub const PACE_SLEEP: Duration = Duration::from_secs(1);

/// The name of the circuits beyond [`MAX_SHOWN`].
const OTHER: &str = "other";

/// Sends requests through their endpoint's circuit and their rule's pace.
/// Clones share the connections, the circuits and the metrics.
#[derive(Clone, Debug)]
pub struct Delivery {
    sender: Sender,
    endpoints: Arc<Endpoints>,
    /// Requests by class (`2xx`, ..., `timeout`, `network`).
    requests: Family<ClassLabel, Counter>,
    /// Each circuit: 0 closed, 1 open, 2 half-open.
    circuits: Family<CircuitLabel, Gauge>,
    /// The circuits shown by name.
    named: Arc<Mutex<HashSet<CircuitKey>>>,
}

/// What became of a request.
#[derive(Debug)]
pub enum Outcome {
    /// The endpoint accepted it.
    Delivered(Delivered),
    /// A circuit or the endpoint's share held it back: nothing was sent.
    Wait(Held),
    /// It was sent and failed: an attempt.
    Failed(DeliveryError),
}

impl Delivery {
    /// A delivery with its own connections and circuits, counted in
    /// metrics nobody reads until [`Delivery::counted`].
    pub fn new(settings: &DeliverySettings) -> Result<Self, DeliveryError> {
        let endpoints = Endpoints::new(CircuitSettings {
            failures: settings.circuit_failures,
            cooldown: settings.circuit_cooldown,
            // A broken endpoint leaves at least half the slots to others.
            share: settings.concurrency / 2,
        });
        Ok(Delivery {
            sender: Sender::new(settings.request_timeout, settings.concurrency)?,
            endpoints: Arc::new(endpoints),
            requests: Family::default(),
            circuits: Family::default(),
            named: Arc::default(),
        })
    }

    /// The same, counting its requests and circuits in `metrics`.
    pub(crate) fn counted(self, metrics: &RoleMetrics) -> Self {
        Delivery {
            requests: metrics.webhook_requests.clone(),
            circuits: metrics.endpoint_circuit.clone(),
            ..self
        }
    }

    /// The same connections and metrics over other circuits (a running
    /// change-listener's, so that they apply to the console's requests).
    pub fn over(&self, endpoints: Arc<Endpoints>) -> Self {
        Delivery {
            endpoints,
            ..self.clone()
        }
    }

    /// Every endpoint's circuit and every rule's pace.
    pub fn endpoints(&self) -> &Arc<Endpoints> {
        &self.endpoints
    }

    /// Sends `request` of rule `rule` once, at most `rate_limit` a second,
    /// if its circuits and its endpoint's share let it go now. A wait for
    /// the rule's pace of up to [`PACE_SLEEP`] is slept here, a longer one
    /// handed back as [`Held::Paced`].
    pub async fn deliver(&self, rule: &str, rate_limit: Option<f64>, request: &Request) -> Outcome {
        let origin = request.origin();
        let pass = loop {
            let admit = match rate_limit {
                Some(per_second) => self.endpoints.admit_paced(rule, &origin, per_second),
                None => self.endpoints.admit(rule, &origin),
            };
            match admit {
                Admit::Go(pass) => break pass,
                Admit::Wait(Held::Paced(wait, _)) if wait <= PACE_SLEEP => {
                    tokio::time::sleep(wait).await;
                }
                Admit::Wait(held) => {
                    self.show_circuits(rule, &origin);
                    return Outcome::Wait(held);
                }
            }
        };
        let result = self.sender.send(request).await;
        match &result {
            Err(e) if e.is_unreachable() => pass.unreachable(&e.to_string()),
            Err(e) if e.is_endpoint_fault() => pass.failed(e.answered(), &e.to_string()),
            _ => pass.succeeded(),
        }
        self.show_circuits(rule, &origin);
        let class = match &result {
            Ok(delivered) => delivered.class(),
            Err(e) => e.class(),
        };
        self.requests.get_or_create(&ClassLabel { class }).inc();
        match result {
            Ok(delivered) => Outcome::Delivered(delivered),
            Err(e) => Outcome::Failed(e),
        }
    }

    /// The circuits a request of `rule` to `origin` passes, as the
    /// metrics and statuses show them: by name, or beyond [`MAX_SHOWN`]
    /// names as `other` with the worst state of the circuits not named.
    pub fn circuits(&self, rule: &str, origin: &str) -> Vec<(String, CircuitState)> {
        CircuitKey::both(rule, origin)
            .iter()
            .map(|key| match self.named(key) {
                true => (key.to_string(), self.endpoints.state(key)),
                false => (OTHER.to_string(), self.others()),
            })
            .collect()
    }

    /// Shows the circuits of a request of `rule` to `origin` in the gauge.
    fn show_circuits(&self, rule: &str, origin: &str) {
        let labels = CircuitKey::both(rule, origin).map(|key| match self.named(&key) {
            true => (label(&key), self.endpoints.state(&key)),
            false => (other_label(), self.others()),
        });
        for (label, state) in labels {
            self.circuits.get_or_create(&label).set(state.gauge());
        }
    }

    /// Whether `key` is shown by name: it is, or a name is free for it.
    /// The names of forgotten circuits are freed, and their series go.
    fn named(&self, key: &CircuitKey) -> bool {
        // A set of names only; a poisoned lock is safe to reuse.
        let mut named = self.named.lock().unwrap_or_else(|e| e.into_inner());
        if named.contains(key) {
            return true;
        }
        if named.len() >= MAX_SHOWN {
            named.retain(|k| {
                let kept = self.endpoints.knows(k);
                if !kept {
                    self.circuits.remove(&label(k));
                }
                kept
            });
        }
        named.len() < MAX_SHOWN && named.insert(key.clone())
    }

    /// The worst state of the circuits not shown by name.
    fn others(&self) -> CircuitState {
        let named = self.named.lock().unwrap_or_else(|e| e.into_inner());
        self.endpoints.worst(|key| !named.contains(key))
    }
}

fn label(key: &CircuitKey) -> CircuitLabel {
    CircuitLabel {
        endpoint: key.origin.clone(),
        rule: key.rule.clone().unwrap_or_default(),
    }
}

fn other_label() -> CircuitLabel {
    CircuitLabel {
        endpoint: OTHER.into(),
        rule: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::on_change::{ChangeContext, Method, Template};

    fn request(url: &str) -> Request {
        let doc = serde_json::value::to_raw_value(&serde_json::json!({})).unwrap();
        let seq = serde_json::json!(1);
        let change = ChangeContext {
            rule: "r",
            db_name: "db",
            doc: &doc,
            id: "d",
            rev: "1-a",
            seq: &seq,
        };
        let t = Template {
            url: url.to_string(),
            method: Method::Post,
            ..Template::default()
        };
        Request::build(&t, &change).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_a_circuit_refuses_does_not_spend_its_rules_rate_slot() {
        let delivery = Delivery::new(&DeliverySettings {
            request_timeout: Duration::from_secs(5),
            concurrency: 10,
            circuit_failures: 1,
            circuit_cooldown: Duration::from_secs(30),
        })
        .unwrap();
        let Admit::Go(pass) = delivery.endpoints().admit("r", "http://down") else {
            panic!("a new circuit refused");
        };
        pass.unreachable("refused");
        let down = request("http://down/hook");
        let start = tokio::time::Instant::now();
        for _ in 0..3 {
            let outcome = delivery.deliver("r", Some(1.0), &down).await;
            assert!(
                matches!(outcome, Outcome::Wait(Held::Open(..))),
                "{outcome:?}"
            );
        }
        assert_eq!(start.elapsed(), Duration::ZERO, "refused without pacing");
        let Admit::Go(pass) = delivery.endpoints().admit_paced("r", "http://up", 1.0) else {
            panic!("the rule's rate slot was spent");
        };
        pass.succeeded();
        let Admit::Wait(Held::Paced(wait, _)) =
            delivery.endpoints().admit_paced("r", "http://up", 1.0)
        else {
            panic!("not paced after a request that went");
        };
        assert_eq!(wait, Duration::from_secs(1));
    }
}
