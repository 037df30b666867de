//! Measurement helpers: /proc samples, percentiles, Spiegel's metrics.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::procfs;

#[derive(Default, Clone, Copy)]
pub(crate) struct Samples {
    pub(crate) max_rss_kb: u64,
    pub(crate) max_spiegel_conns: usize,
    /// The most any one Spiegel process held at a time.
    pub(crate) max_spiegel_conns_per_process: usize,
    pub(crate) max_server_conns: usize,
    pub(crate) max_server_self_conns: usize,
}

pub(crate) fn sample(spiegel: &[u32], server: Option<u32>, port: u16, s: &mut Samples) {
    if !spiegel.is_empty() {
        let rss: u64 = spiegel.iter().filter_map(|p| procfs::rss_kb(*p)).sum();
        s.max_rss_kb = s.max_rss_kb.max(rss);
        let (_, to_couch) = procfs::connections(spiegel, port);
        s.max_spiegel_conns = s.max_spiegel_conns.max(to_couch);
        for pid in spiegel {
            let (_, one) = procfs::connections(&[*pid], port);
            s.max_spiegel_conns_per_process = s.max_spiegel_conns_per_process.max(one);
        }
    }
    if let Some(pid) = server {
        let (all, to_self) = procfs::connections(&[pid], port);
        s.max_server_conns = s.max_server_conns.max(all);
        s.max_server_self_conns = s.max_server_self_conns.max(to_self);
    }
}

pub(crate) fn cpu(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|p| procfs::cpu_seconds(*p)).sum()
}

pub(crate) fn percentiles(mut v: Vec<f64>) -> Value {
    if v.is_empty() {
        return json!({"count": 0, "p50_s": null, "p95_s": null, "p99_s": null, "max_s": null});
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |p: f64| {
        let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
        round3(v[rank - 1] / 1000.0)
    };
    json!({"count": v.len(), "p50_s": at(0.50), "p95_s": at(0.95), "p99_s": at(0.99),
           "max_s": round3(v[v.len() - 1] / 1000.0)})
}

/// Every series of the processes' `/metrics`, summed over the processes.
pub(crate) async fn scrape(urls: &[String]) -> HashMap<String, f64> {
    let mut sums = HashMap::new();
    for url in urls {
        let Ok(resp) = reqwest::get(url.as_str()).await else {
            continue;
        };
        let Ok(text) = resp.text().await else {
            continue;
        };
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            if let Some((series, value)) = line.rsplit_once(' ') {
                if let Ok(v) = value.parse::<f64>() {
                    *sums.entry(series.to_string()).or_default() += v;
                }
            }
        }
    }
    sums
}

/// Where the time went during load and drain, from Spiegel's own metrics
/// (the difference of two scrapes): per role, the runs, the mean wait from
/// an update to the run that covers it (queueing for a slot) and the mean
/// run; and the mean duration of the CouchDB requests the runs make.
pub(crate) fn breakdown(before: &HashMap<String, f64>, after: &HashMap<String, f64>) -> Value {
    let d =
        |k: String| after.get(&k).copied().unwrap_or(0.0) - before.get(&k).copied().unwrap_or(0.0);
    let mean = |name: &str, labels: &str| {
        let count = d(format!("spiegel_{name}_count{{{labels}}}"));
        (count > 0.0).then(|| round3(d(format!("spiegel_{name}_sum{{{labels}}}")) / count))
    };
    let role = |r: &str| {
        let l = format!("role=\"{r}\"");
        json!({
            "runs": d(format!("spiegel_runs_started_total{{{l}}}")) as u64,
            "mean_update_to_run_s": mean("update_to_run_seconds", &l),
            "mean_run_s": mean("run_duration_seconds", &l),
        })
    };
    let op = |o: &str| {
        let l = format!("op=\"{o}\"");
        json!({
            "requests": d(format!("spiegel_couchdb_requests_total{{{l}}}")) as u64,
            "mean_s": mean("couchdb_request_duration_seconds", &l),
        })
    };
    json!({
        "replicator": role("replicator"),
        "change_listener": role("change-listener"),
        "post_replicate": op("POST _replicate"),
        "get_changes": op("GET db/_changes"),
    })
}

pub(crate) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

pub(crate) fn secs(since: Instant) -> f64 {
    round3(since.elapsed().as_secs_f64())
}

/// Polls `check` every 200 ms until it is true or `limit` passes.
pub(crate) async fn wait_until(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if check() {
            return true;
        }
        if start.elapsed() >= limit {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
