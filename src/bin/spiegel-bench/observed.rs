//! What was written, replicated and delivered, with when.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::ValueEnum;
use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::Value;

use crate::couch::{enc, Couch};

/// What the receiver does while the API is down (`--outage-kind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum OutageKind {
    /// Answer 503 at once.
    Refuse,
    /// Hold each request until the outage ends, then answer 503.
    Hang,
}

/// The receiver's switch: while it is down, requests are refused.
pub(crate) struct Gate {
    pub(crate) kind: OutageKind,
    down: AtomicBool,
    /// Requests answered 503.
    refused: AtomicU64,
}

impl Gate {
    pub(crate) fn new(kind: OutageKind) -> Self {
        Gate {
            kind,
            down: AtomicBool::new(false),
            refused: AtomicU64::new(0),
        }
    }

    /// Takes the receiver down or brings it back; whether that changed it.
    pub(crate) fn set_down(&self, down: bool) -> bool {
        self.down.swap(down, Ordering::Relaxed) != down
    }

    pub(crate) fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// The receiver's answer while down; None when it is up.
    async fn refuse(&self) -> Option<StatusCode> {
        if !self.down.load(Ordering::Relaxed) {
            return None;
        }
        self.refused.fetch_add(1, Ordering::Relaxed);
        while self.kind == OutageKind::Hang && self.down.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Some(StatusCode::SERVICE_UNAVAILABLE)
    }
}

pub(crate) struct State {
    pub(crate) t0: Instant,
    /// Document id -> write time (ms since t0, taken before the request).
    pub(crate) writes: HashMap<String, f64>,
    pub(crate) write_errors: u64,
    pub(crate) first_write_error: Option<String>,
    /// Document id -> first time seen in the aggregate's _changes.
    pub(crate) replicated: HashMap<String, f64>,
    /// Document id -> (deliveries, first delivery time).
    pub(crate) delivered: HashMap<String, (u32, f64)>,
    /// Requests the API received.
    pub(crate) requests: u64,
}

impl State {
    /// Changes delivered per second, from the first write to the last
    /// first delivery, and the API's requests.
    pub(crate) fn throughput(&self) -> Value {
        let first_write = self.writes.values().copied().fold(f64::INFINITY, f64::min);
        let last = self
            .writes
            .keys()
            .filter_map(|id| self.delivered.get(id).map(|(_, t)| *t))
            .fold(f64::NEG_INFINITY, f64::max);
        let delivered = self
            .writes
            .keys()
            .filter(|id| self.delivered.contains_key(*id))
            .count();
        let seconds = (last - first_write) / 1000.0;
        let per_second = (seconds > 0.0).then(|| (delivered as f64 / seconds).round());
        serde_json::json!({"changes_per_second": per_second, "requests": self.requests})
    }
}

/// What the run came to, per written document.
pub(crate) struct Figures {
    pub(crate) written: usize,
    /// Replication latencies (ms) of the writes that arrived.
    pub(crate) repl_lat: Vec<f64>,
    pub(crate) missing_replicated: usize,
    /// Delivery latencies (ms) of the writes that were delivered.
    pub(crate) del_lat: Vec<f64>,
    pub(crate) missing_delivered: usize,
    pub(crate) duplicates: u64,
    /// Deliveries of documents never written (probes aside).
    pub(crate) unexpected: usize,
    pub(crate) write_errors: u64,
    pub(crate) first_write_error: Option<String>,
}

impl State {
    pub(crate) fn figures(&self) -> Figures {
        let written = self.writes.len();
        let repl_lat: Vec<f64> = self
            .writes
            .iter()
            .filter_map(|(id, t)| self.replicated.get(id).map(|r| r - t))
            .collect();
        let del_lat: Vec<f64> = self
            .writes
            .iter()
            .filter_map(|(id, t)| self.delivered.get(id).map(|(_, d)| d - t))
            .collect();
        Figures {
            written,
            missing_replicated: written - repl_lat.len(),
            missing_delivered: written - del_lat.len(),
            repl_lat,
            del_lat,
            duplicates: self
                .writes
                .keys()
                .filter_map(|id| self.delivered.get(id))
                .map(|(n, _)| (*n as u64).saturating_sub(1))
                .sum(),
            unexpected: self
                .delivered
                .keys()
                .filter(|id| !self.writes.contains_key(*id) && !id.starts_with("probe_"))
                .count(),
            write_errors: self.write_errors,
            first_write_error: self.first_write_error.clone(),
        }
    }
}

pub(crate) type Shared = Arc<Mutex<State>>;

pub(crate) fn now_ms(state: &Shared) -> f64 {
    let t0 = state.lock().unwrap().t0;
    t0.elapsed().as_secs_f64() * 1000.0
}

/// Follows the aggregate's continuous `_changes` from now on, recording
/// when each document first shows. Runs until aborted.
pub(crate) async fn follow_aggregate(couch: Couch, db: String, state: Shared) {
    let feed_client = reqwest::Client::builder().build().expect("http client");
    let since = match couch.get(&enc(&db)).await {
        Ok(info) => seq_text(&info["update_seq"]),
        Err(_) => "now".to_string(),
    };
    let mut since = since;
    loop {
        let url = format!(
            "{}/{}/_changes?feed=continuous&heartbeat=5000&since={}",
            couch.base,
            enc(&db),
            enc(&since)
        );
        let mut rb = feed_client.get(url);
        if let Some((u, p)) = &couch.auth {
            rb = rb.basic_auth(u, Some(p));
        }
        if let Ok(resp) = rb.send().await {
            let mut stream = resp.bytes_stream();
            let mut buf: Vec<u8> = Vec::new();
            while let Some(Ok(chunk)) = stream.next().await {
                buf.extend_from_slice(&chunk);
                while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=nl).collect();
                    let Ok(v) = serde_json::from_slice::<Value>(&line) else {
                        continue;
                    };
                    if let Some(id) = v["id"].as_str() {
                        let t = now_ms(&state);
                        state
                            .lock()
                            .unwrap()
                            .replicated
                            .entry(id.to_string())
                            .or_insert(t);
                    }
                    if !v["seq"].is_null() {
                        since = seq_text(&v["seq"]);
                    }
                    if !v["last_seq"].is_null() {
                        since = seq_text(&v["last_seq"]);
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub(crate) fn seq_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "now".to_string(),
        other => other.to_string(),
    }
}

/// The receiver of the on_change rule's POSTs; it refuses them while
/// `outage` is down.
pub(crate) async fn start_receiver(
    state: Shared,
    latency: Duration,
    outage: Arc<Gate>,
) -> Result<u16> {
    use axum::{extract, routing::post, Router};
    type Ctx = (Shared, Duration, Arc<Gate>);
    pub(crate) async fn hook(
        extract::State((state, latency, outage)): extract::State<Ctx>,
        body: axum::Json<Value>,
    ) -> StatusCode {
        if let Some(refused) = outage.refuse().await {
            return refused;
        }
        // An API that takes its time, as real ones do.
        tokio::time::sleep(latency).await;
        // One change, or a batch: an array of them.
        let items = match &body.0 {
            Value::Array(items) => items.iter().collect(),
            one => vec![one],
        };
        let t = now_ms(&state);
        let mut st = state.lock().unwrap();
        for id in items.iter().filter_map(|i| i["id"].as_str()) {
            let e = st.delivered.entry(id.to_string()).or_insert((0, t));
            e.0 += 1;
        }
        st.requests += 1;
        StatusCode::OK
    }
    let app = Router::new()
        .route("/hook", post(hook))
        .with_state((state, latency, outage));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(port)
}
