//! The one path of every on_change request, whether a change-listener
//! sends it or a dead letter is redelivered: wait for the rule's
//! `rate_limit`, pass the endpoint's circuit and share, send, and report
//! the outcome to the circuit and the metrics. What a failure does to a
//! checkpoint or a dead letter is the caller's.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use super::circuit::{Admit, CircuitSettings, Endpoints};
use super::send::{Delivered, DeliveryError, Sender};
use super::Request;
use crate::config::DeliverySettings;
use crate::metrics::{ClassLabel, EndpointLabel, RoleMetrics};

/// Sends requests through their endpoint's circuit and their rule's pace.
/// Clones share the connections, the circuits and the metrics.
#[derive(Clone, Debug)]
pub struct Delivery {
    sender: Sender,
    endpoints: Arc<Endpoints>,
    /// Requests by class (`2xx`, ..., `timeout`, `network`).
    requests: Family<ClassLabel, Counter>,
    /// Each endpoint's circuit: 0 closed, 1 open, 2 half-open.
    circuits: Family<EndpointLabel, Gauge>,
}

/// What became of a request.
#[derive(Debug)]
pub enum Outcome {
    /// The endpoint accepted it.
    Delivered(Delivered),
    /// The circuit or the endpoint's share held it back for this long, for
    /// this reason: nothing was sent, and it is not an attempt.
    Wait(Duration, String),
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
    /// if its endpoint's circuit and share let it go now.
    pub async fn deliver(&self, rule: &str, rate_limit: Option<f64>, request: &Request) -> Outcome {
        if let Some(per_second) = rate_limit {
            self.endpoints.pace(rule, per_second).await;
        }
        let origin = request.origin();
        let pass = match self.endpoints.admit(&origin) {
            Admit::Go(pass) => pass,
            Admit::Wait(wait, why) => {
                self.show_circuit(&origin);
                return Outcome::Wait(wait, why);
            }
        };
        let result = self.sender.send(request).await;
        match &result {
            Err(e) if e.is_endpoint_fault() => pass.failed(),
            _ => pass.succeeded(),
        }
        self.show_circuit(&origin);
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

    /// Shows the endpoint's circuit in its gauge.
    fn show_circuit(&self, origin: &str) {
        let label = EndpointLabel {
            endpoint: origin.to_string(),
        };
        let state = self.endpoints.state(origin);
        self.circuits.get_or_create(&label).set(state.gauge());
    }
}
