//! Prometheus metrics of the process. One [`Metrics`] per process, shared by
//! its roles. The runtime's series carry a `role` label; the replicator's,
//! the change-listener's and CouchDB's series belong to one role or to the
//! process by their names.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RoleLabel {
    pub(crate) role: String,
}

type Counters = Family<RoleLabel, Counter>;
pub(crate) type Gauges = Family<RoleLabel, Gauge>;
type Histograms = Family<RoleLabel, Histogram, fn() -> Histogram>;

fn seconds_histogram() -> Histogram {
    // 5 ms to about 80 s.
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

/// The worker runtime's series.
#[derive(Clone)]
pub struct WorkerMetrics {
    pub(crate) updates_received: Counters,
    pub(crate) feed_reconnects: Counters,
    pub(crate) runs_started: Counters,
    pub(crate) runs_succeeded: Counters,
    pub(crate) runs_failed: Counters,
    pub(crate) runs_retried: Counters,
    pub(crate) run_duration: Histograms,
    pub(crate) update_to_run: Histograms,
    pub(crate) owned_partitions: Gauges,
    pub(crate) live_workers: Gauges,
    pub(crate) checkpoint_writes: Counters,
    pub(crate) sweeps: Counters,
    pub(crate) sweep_found: Counters,
    pub(crate) last_event: Family<RoleLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub(crate) catch_up_found: Gauges,
    pub(crate) catch_up_handled: Gauges,
}

/// CouchDB requests by operation (method and path shape).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct OpLabel {
    pub(crate) op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct OpErrorLabel {
    pub(crate) op: String,
    pub(crate) error: String,
}

/// The series of the CouchDB client.
#[derive(Clone, Debug)]
pub struct CouchMetrics {
    pub(crate) requests: Family<OpLabel, Counter>,
    pub(crate) errors: Family<OpErrorLabel, Counter>,
    pub(crate) latency: Family<OpLabel, Histogram, fn() -> Histogram>,
}

impl CouchMetrics {
    pub(crate) fn observe(&self, op: &str, took: std::time::Duration, error: Option<&str>) {
        let label = OpLabel { op: op.to_string() };
        self.requests.get_or_create(&label).inc();
        self.latency
            .get_or_create(&label)
            .observe(took.as_secs_f64());
        if let Some(error) = error {
            let label = OpErrorLabel {
                op: op.to_string(),
                error: error.to_string(),
            };
            self.errors.get_or_create(&label).inc();
        }
    }
}

/// What the roles count about their work.
#[derive(Clone)]
pub(crate) struct RoleMetrics {
    /// Replications by outcome (ok, failed, retry, source_missing) and engine.
    pub(crate) replications: Family<OutcomeLabel, Counter>,
    pub(crate) docs_read: Counters,
    pub(crate) docs_written: Counters,
    pub(crate) doc_write_failures: Counters,
    /// Webhook requests by status class (2xx, 3xx, 4xx, 5xx, timeout, network).
    pub(crate) webhook_requests: Family<ClassLabel, Counter>,
    pub(crate) webhook_retries: Counter,
    pub(crate) dead_letters: Counter,
    /// Each API endpoint's and route's circuit: 0 closed, 1 open, 2
    /// half-open.
    pub(crate) endpoint_circuit: Family<CircuitLabel, Gauge>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct CircuitLabel {
    /// Scheme, host and port; `other` for the circuits beyond the cap.
    pub(crate) endpoint: String,
    /// The rule of a route's circuit; empty for the endpoint's.
    pub(crate) rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct OutcomeLabel {
    pub(crate) outcome: String,
    /// The replication engine (`native` or `couchdb`).
    pub(crate) engine: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ClassLabel {
    pub(crate) class: String,
}

/// Every Prometheus series of a process, in one registry.
pub struct Metrics {
    pub(crate) registry: Registry,
    /// The worker runtime's series.
    pub worker: WorkerMetrics,
    /// The CouchDB client's series.
    pub couch: CouchMetrics,
    pub(crate) roles: RoleMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every series, registered and at zero.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("spiegel");
        let worker = WorkerMetrics::register(&mut registry);
        let couch = CouchMetrics::register(&mut registry);
        let roles = RoleMetrics::register(&mut registry);
        Metrics {
            registry,
            worker,
            couch,
            roles,
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl WorkerMetrics {
    fn new() -> Self {
        let histograms =
            || Histograms::new_with_constructor(seconds_histogram as fn() -> Histogram);
        WorkerMetrics {
            updates_received: Counters::default(),
            feed_reconnects: Counters::default(),
            runs_started: Counters::default(),
            runs_succeeded: Counters::default(),
            runs_failed: Counters::default(),
            runs_retried: Counters::default(),
            run_duration: histograms(),
            update_to_run: histograms(),
            owned_partitions: Gauges::default(),
            live_workers: Gauges::default(),
            checkpoint_writes: Counters::default(),
            sweeps: Counters::default(),
            sweep_found: Counters::default(),
            last_event: Family::default(),
            catch_up_found: Gauges::default(),
            catch_up_handled: Gauges::default(),
        }
    }

    /// Every series of the runtime, registered. The groups register in this
    /// order so that `/metrics` lists the series as it always has.
    fn register(registry: &mut Registry) -> Self {
        let worker = WorkerMetrics::new();
        worker.register_feed(registry);
        worker.register_runs(registry);
        worker.register_ownership(registry);
        worker.register_discovery(registry);
        worker.register_catch_up(registry);
        worker
    }

    /// A first start's (or a takeover's) catch-up over the databases' history.
    fn register_catch_up(&self, registry: &mut Registry) {
        registry.register(
            "catch_up_databases_found",
            "Databases the current (or last) catch-up found so far",
            self.catch_up_found.clone(),
        );
        registry.register(
            "catch_up_databases_handled",
            "Databases the current (or last) catch-up has handled",
            self.catch_up_handled.clone(),
        );
    }

    /// What the `_db_updates` feed delivered, and how often it reconnected.
    fn register_feed(&self, registry: &mut Registry) {
        registry.register(
            "db_updates_received",
            "Database updates received from _db_updates",
            self.updates_received.clone(),
        );
        registry.register(
            "feed_reconnects",
            "Reconnects of the _db_updates feed",
            self.feed_reconnects.clone(),
        );
    }

    /// Runs by outcome and their timings: how well the roles keep up.
    fn register_runs(&self, registry: &mut Registry) {
        registry.register(
            "runs_started",
            "Runs started (one database handled by a role)",
            self.runs_started.clone(),
        );
        registry.register(
            "runs_succeeded",
            "Runs that handled their database",
            self.runs_succeeded.clone(),
        );
        registry.register(
            "runs_failed",
            "Runs that failed and will be retried",
            self.runs_failed.clone(),
        );
        registry.register(
            "runs_retried",
            "Runs started again after a failure",
            self.runs_retried.clone(),
        );
        registry.register(
            "run_duration_seconds",
            "Duration of runs",
            self.run_duration.clone(),
        );
        registry.register(
            "update_to_run_seconds",
            "Time from receiving a database update to the start of the run that covers it",
            self.update_to_run.clone(),
        );
    }

    /// The partitions this process holds, the workers it shares them with,
    /// and the lease writes that save their checkpoints.
    fn register_ownership(&self, registry: &mut Registry) {
        registry.register(
            "owned_partitions",
            "Partitions this process holds",
            self.owned_partitions.clone(),
        );
        registry.register(
            "live_workers",
            "Live workers of the role, as this process sees them",
            self.live_workers.clone(),
        );
        registry.register(
            "checkpoint_writes",
            "Lease documents written to save checkpoints",
            self.checkpoint_writes.clone(),
        );
    }

    /// Whether changes are found: the sweeps that catch a dropped event,
    /// and the feed's last event, to tell its lag.
    fn register_discovery(&self, registry: &mut Registry) {
        registry.register(
            "sweeps",
            "Sweeps completed, the first (which only records what it sees) included; a change whose event was dropped is found by a sweep that starts after it",
            self.sweeps.clone(),
        );
        registry.register(
            "sweep_found",
            "Databases of owned partitions the sweep found changed since the previous sweep (most were handled through their update events too)",
            self.sweep_found.clone(),
        );
        registry.register(
            "feed_last_event_timestamp_seconds",
            "Unix time of the last _db_updates event received (feed lag: time() minus this, on a busy server)",
            self.last_event.clone(),
        );
    }
}

impl CouchMetrics {
    fn register(registry: &mut Registry) -> Self {
        let couch = CouchMetrics {
            requests: Family::default(),
            errors: Family::default(),
            latency: Family::new_with_constructor(seconds_histogram as fn() -> Histogram),
        };
        registry.register(
            "couchdb_requests",
            "Requests to CouchDB by operation",
            couch.requests.clone(),
        );
        registry.register(
            "couchdb_errors",
            "Failed requests to CouchDB by operation and error",
            couch.errors.clone(),
        );
        registry.register(
            "couchdb_request_duration_seconds",
            "Latency of CouchDB requests by operation (to the answer's headers for feeds)",
            couch.latency.clone(),
        );
        couch
    }
}

impl RoleMetrics {
    fn register(registry: &mut Registry) -> Self {
        let roles = RoleMetrics {
            replications: Family::default(),
            docs_read: Counters::default(),
            docs_written: Counters::default(),
            doc_write_failures: Counters::default(),
            webhook_requests: Family::default(),
            webhook_retries: Counter::default(),
            dead_letters: Counter::default(),
            endpoint_circuit: Family::default(),
        };
        registry.register(
            "replications",
            "One-shot replications by outcome",
            roles.replications.clone(),
        );
        registry.register(
            "replication_docs_read",
            "Documents read by replications",
            roles.docs_read.clone(),
        );
        registry.register(
            "replication_docs_written",
            "Documents written by replications",
            roles.docs_written.clone(),
        );
        registry.register(
            "replication_doc_write_failures",
            "Documents replications failed to write",
            roles.doc_write_failures.clone(),
        );
        registry.register(
            "webhook_requests",
            "on_change requests by status class",
            roles.webhook_requests.clone(),
        );
        registry.register(
            "webhook_retries",
            "on_change requests that failed and will be retried",
            roles.webhook_retries.clone(),
        );
        registry.register(
            "dead_letters",
            "on_change requests stored as dead letters after their last retry",
            roles.dead_letters.clone(),
        );
        registry.register(
            "endpoint_circuit",
            "Each on_change API endpoint's circuit (rule empty) and each rule's at an endpoint: 0 closed, 1 open, 2 half-open",
            roles.endpoint_circuit.clone(),
        );
        roles
    }
}

pub(crate) fn role(role: &str) -> RoleLabel {
    RoleLabel {
        role: role.to_string(),
    }
}
