//! The optional sweep: `_db_updates` is documented as best effort, so a
//! worker can periodically compare every database's `update_seq` with what
//! the previous sweep saw and hand the ones that changed to the role.
//!
//! Cost, per worker and sweep: one `GET /_dbs_info` per 100 databases, one
//! run per database that changed since the previous sweep (most of them were
//! already handled through their update events, so these runs are usually
//! redundant), and about 8 bytes plus the name of every database in memory.
//! The first sweep, at the worker's start, only records what it sees.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;

use super::catch_up::CatchUpEvent;
use crate::couch::CouchClient;

const PAGE: u64 = 100;

/// Sweeps every `interval` until the worker stops, counting complete sweeps
/// in `done`. A sweep that fails part way records nothing, so the next one
/// compares with the last complete one (and may hand a database over twice).
pub async fn run(
    client: CouchClient,
    interval: Duration,
    tx: mpsc::Sender<CatchUpEvent>,
    done: Counter,
) {
    // update_seq values are opaque: only their equality is used, through a hash.
    let mut seen: HashMap<String, u64> = HashMap::new();
    // The baseline is taken at once: what changed before it is covered by
    // the partitions' replays, what changes after it by the sweeps.
    let mut baseline = true;
    loop {
        match sweep(&client, &mut seen, baseline, &tx).await {
            Ok(Some(found)) => {
                tracing::debug!(found, "sweep done");
                done.inc();
                baseline = false;
            }
            // Interrupted: nothing recorded; a failed baseline is taken again.
            Ok(None) => {}
            Err(Closed) => return,
        }
        tokio::time::sleep(interval).await;
    }
}

struct Closed;

async fn sweep(
    client: &CouchClient,
    seen: &mut HashMap<String, u64>,
    record_only: bool,
    tx: &mpsc::Sender<CatchUpEvent>,
) -> Result<Option<usize>, Closed> {
    let mut after: Option<String> = None;
    let mut found = 0;
    let mut present = HashMap::with_capacity(seen.len());
    loop {
        let fresh = match client.dbs_info_after(after.as_deref(), PAGE).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "sweep interrupted; it runs again at the next interval");
                return Ok(None);
            }
        };
        if fresh.is_empty() {
            break;
        }
        after = fresh.last().map(|r| r.key.clone());
        for row in fresh {
            let Some(info) = row.info else { continue };
            let mut hasher = DefaultHasher::new();
            info.update_seq.as_param().hash(&mut hasher);
            let hash = hasher.finish();
            let changed = seen.get(&row.key).is_some_and(|old| *old != hash);
            let new = !seen.contains_key(&row.key);
            if !record_only && (changed || new) {
                found += 1;
                tracing::trace!(db = %row.key, new, "sweep: changed");
                tx.send(CatchUpEvent::Swept {
                    db: row.key.clone(),
                })
                .await
                .map_err(|_| Closed)?;
            }
            present.insert(row.key, hash);
        }
    }
    *seen = present;
    Ok(Some(found))
}
