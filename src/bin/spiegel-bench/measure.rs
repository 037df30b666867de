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
        for (series, v) in scrape_one(url).await {
            *sums.entry(series).or_default() += v;
        }
    }
    sums
}

/// True when the partitions are spread over the processes: each owns at
/// least its share of `partitions` among the `per_role` processes of its
/// role. Until then partitions move, and a move replays some changes.
pub(crate) async fn balanced(urls: &[String], partitions: u32, per_role: usize) -> bool {
    let share = f64::from(partitions / per_role.max(1) as u32);
    for url in urls {
        let owned: f64 = scrape_one(url)
            .await
            .iter()
            .filter(|(series, _)| series.starts_with("spiegel_owned_partitions{"))
            .map(|(_, v)| v)
            .sum();
        if owned < share.max(1.0) {
            return false;
        }
    }
    true
}

/// True when every process's catch-up has ended: each role reports it
/// (`spiegel_catch_up_databases_found`), and has handled all it found.
pub(crate) async fn caught_up(urls: &[String]) -> bool {
    for url in urls {
        let series = scrape_one(url).await;
        let value = |name: &str| -> HashMap<String, f64> {
            let prefix = format!("spiegel_catch_up_databases_{name}{{");
            let found = series
                .iter()
                .filter_map(|(s, v)| Some((s.strip_prefix(&prefix)?.to_string(), *v)));
            found.collect()
        };
        let (found, handled) = (value("found"), value("handled"));
        if found.is_empty() || found.iter().any(|(role, n)| handled.get(role) != Some(n)) {
            return false;
        }
    }
    true
}

/// One process's series.
async fn scrape_one(url: &str) -> Vec<(String, f64)> {
    let Ok(resp) = reqwest::get(url).await else {
        return Vec::new();
    };
    let Ok(text) = resp.text().await else {
        return Vec::new();
    };
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            Some((name.to_string(), value.parse::<f64>().ok()?))
        })
        .collect()
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
            // Abandoned by the client: no answer, and CouchDB ran no job.
            "unanswered": d(format!("spiegel_couchdb_errors_total{{{l},error=\"unreachable\"}}")) as u64,
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
pub(crate) async fn wait_until_async<F: std::future::Future<Output = bool>>(
    limit: Duration,
    mut check: impl FnMut() -> F,
) -> bool {
    let start = Instant::now();
    loop {
        if check().await {
            return true;
        }
        if start.elapsed() >= limit {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Polls `check` every 200 ms until it is true or `limit` passes.
pub(crate) async fn wait_until(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    wait_until_async(limit, || std::future::ready(check())).await
}
