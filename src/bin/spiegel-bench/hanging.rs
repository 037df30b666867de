//! `--hanging-endpoint`: the load runs in two phases of `--seconds` each.
//! In the second, `--active` more databases are written too, and their
//! on_change rule calls an API that accepts connections and never answers.
//! The healthy API's delivery latency is reported per phase: what the
//! broken endpoint costs the healthy one, measured side by side.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Result;
use serde_json::{json, Value};

use crate::measure::percentiles;
use crate::observed::State;

/// The name of the `j`-th database of the hanging endpoint.
pub(crate) fn db(prefix: &str, j: usize) -> String {
    format!("{prefix}_h_{j:05}")
}

/// An API that accepts every connection and never answers; the count of
/// connections it accepted. The connections stay open until the process
/// ends.
pub(crate) async fn start() -> Result<(u16, Arc<AtomicU64>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let accepted = Arc::new(AtomicU64::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::Relaxed);
            held.push(socket);
        }
    });
    Ok((port, accepted))
}

/// The on_change document that sends the second phase's databases to the
/// hanging API.
pub(crate) fn rule(prefix: &str, port: u16) -> Value {
    json!({
        "_id": "bench_hanging", "type": "on_change", "db_name": format!("^{prefix}_h_"),
        "url": format!("http://127.0.0.1:{port}/hook"), "method": "POST",
        "params": {"db": "$db_name", "id": "$change.id"},
    })
}

/// The healthy API's delivery latencies in each phase: the first
/// `seconds` of writes, then the rest. Write ids are `w<writer>_<second>_<k>`.
pub(crate) fn by_phase(state: &State, seconds: u64, accepted: &AtomicU64) -> Value {
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for (id, t) in &state.writes {
        let Some((_, delivered)) = state.delivered.get(id) else {
            continue;
        };
        let second: u64 = id
            .split('_')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        match second < seconds {
            true => without.push(delivered - t),
            false => with.push(delivered - t),
        }
    }
    let (without, with) = (percentiles(without), percentiles(with));
    let ratio = match (without["p99_s"].as_f64(), with["p99_s"].as_f64()) {
        (Some(a), Some(b)) if a > 0.0 => Some((b / a * 100.0).round() / 100.0),
        _ => None,
    };
    json!({"healthy_without_broken": without, "healthy_with_broken": with, "p99_ratio": ratio,
           "connections_to_the_hanging_api": accepted.load(Ordering::Relaxed)})
}
