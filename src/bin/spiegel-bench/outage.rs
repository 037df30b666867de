//! `--outage-seconds N`: the webhook receiver goes down for N seconds in
//! the middle of the load (it answers 503, or with `--outage-kind hang`
//! holds each request until the outage ends, then answers 503), then comes
//! back. Spiegel's memory is sampled before, during and after the outage:
//! a database that waits keeps constant state, so memory during an outage
//! follows the databases waiting, not the writes. Completeness is checked
//! as in any run: every write delivered, once, after the outage.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use crate::measure::{percentiles, round3};
use crate::observed::{now_ms, Gate, OutageKind, Shared};
use crate::procfs;

/// The receiver's outage, and what was measured around it.
pub(crate) struct Outage {
    /// The receiver's switch.
    gate: Arc<Gate>,
    /// Spiegel's largest sampled RSS (kB) before, during and after.
    max_rss_kb: Mutex<[u64; 3]>,
    /// When the outage began and ended, ms since the run's t0.
    window_ms: Mutex<(Option<f64>, Option<f64>)>,
}

impl Outage {
    pub(crate) fn new(kind: OutageKind) -> Arc<Self> {
        Arc::new(Outage {
            gate: Arc::new(Gate::new(kind)),
            max_rss_kb: Mutex::new([0; 3]),
            window_ms: Mutex::new((None, None)),
        })
    }

    /// The switch the receiver obeys.
    pub(crate) fn gate(&self) -> Arc<Gate> {
        self.gate.clone()
    }

    /// Goes down `after` the start for `length`, then comes back; samples
    /// the RSS of `pids` every 250 ms meanwhile, until aborted.
    pub(crate) fn spawn(
        self: Arc<Self>,
        state: Shared,
        pids: Vec<u32>,
        after: Duration,
        length: Duration,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            loop {
                let elapsed = start.elapsed();
                let phase = match elapsed {
                    e if e < after => 0,
                    e if e < after + length => 1,
                    _ => 2,
                };
                self.enter(phase, &state);
                let rss: u64 = pids.iter().filter_map(|p| procfs::rss_kb(*p)).sum();
                {
                    let mut max = self.max_rss_kb.lock().unwrap();
                    max[phase] = max[phase].max(rss);
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    }

    /// Takes the receiver down (phase 1) or brings it back (phase 2),
    /// noting when.
    fn enter(&self, phase: usize, state: &Shared) {
        let down = phase == 1;
        if !self.gate.set_down(down) {
            return;
        }
        let mut window = self.window_ms.lock().unwrap();
        match down {
            true => window.0 = Some(now_ms(state)),
            false => window.1 = Some(now_ms(state)),
        }
    }

    /// The memory before, during and after the outage, and how the writes
    /// made during it were delivered once it ended.
    pub(crate) fn report(&self, state: &Shared, seconds: u64) -> Value {
        let [before, during, after] = *self.max_rss_kb.lock().unwrap();
        let (start, end) = *self.window_ms.lock().unwrap();
        let (start, end) = (start.unwrap_or(f64::MAX), end.unwrap_or(f64::MAX));
        let st = state.lock().unwrap();
        let written: Vec<&String> = st
            .writes
            .iter()
            .filter(|(_, t)| (start..end).contains(*t))
            .map(|(id, _)| id)
            .collect();
        let delivered: Vec<f64> = written
            .iter()
            .filter_map(|id| st.delivered.get(*id).map(|(_, t)| *t))
            .collect();
        let last = delivered.iter().copied().fold(f64::NAN, f64::max);
        let latency: Vec<f64> = written
            .iter()
            .filter_map(|id| Some(st.delivered.get(*id)?.1 - st.writes[*id]))
            .collect();
        let mb = |kb: u64| round3(kb as f64 / 1024.0);
        json!({
            "kind": format!("{:?}", self.gate.kind).to_lowercase(),
            "seconds": seconds,
            "refused_requests": self.gate.refused(),
            "max_sampled_rss_mb": {"before": mb(before), "during": mb(during), "after": mb(after)},
            "writes_during": written.len(),
            "delivered_of_those": delivered.len(),
            "their_latency": percentiles(latency),
            "all_delivered_s_after_it_ended": (last.is_finite() && end < f64::MAX)
                .then(|| round3((last - end).max(0.0) / 1000.0)),
        })
    }
}
