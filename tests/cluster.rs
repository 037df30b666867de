//! The change-listener and the native replicator against a real 3-node
//! Apache CouchDB 3.5 cluster (n=3, q=2): workers on different nodes, nodes
//! killed under load (`_db_updates` replays, seqs going backwards, fail-over
//! to another node) and a node restarted with its data. Only built to run with
//! `SPIEGEL_TEST_SERVER=cluster`; ignored (skipped) on other servers.
//!
//! Tests that kill nodes start their own cluster (`Kit::cluster(3)`) and
//! run one at a time, so that two 3-node clusters under load do not share
//! this machine's cores; the others use the shared cluster.

mod common;
use common::*;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use spiegel::couch::{AllDocsQuery, CouchClient, CouchError, FeedOptions, Seq};

/// The tests that start their own cluster and kill nodes take turns.
static OWN_CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The role every test runs.
const ROLE: &str = "change-listener";

/// The id prefix of Spiegel's internal documents.
const INTERNAL: &str = "spiegel_";

/// A change-listener worker on `url` with short test timings.
fn worker(url: &str, spiegel_db: &str, worker_id: &str) -> Spiegel {
    worker_of(ROLE, url, spiegel_db, worker_id)
}

/// A worker of `role` on `url` with short test timings.
fn worker_of(role: &str, url: &str, spiegel_db: &str, worker_id: &str) -> Spiegel {
    Spiegel::start(&[
        role,
        "--url",
        url,
        "--db-name",
        spiegel_db,
        "--worker-id",
        worker_id,
        "--lease-time",
        "1.5",
        "--save-seq-after",
        "1",
        "--backoff-delay",
        "0.3",
        "--shutdown-timeout",
        "3",
    ])
}

/// An on_change rule that POSTs `{db, id}` of every change of the
/// databases starting with `prefix` to `{base}/hook`.
async fn put_rule(couch: &CouchClient, spiegel_db: &str, prefix: &str, base: &str) {
    couch
        .put_doc(
            spiegel_db,
            "hook",
            &json!({"type": "on_change", "db_name": format!("^{prefix}"),
                    "url": format!("{base}/hook"), "method": "POST",
                    "params": {"db": "$db_name", "id": "$change.id"}}),
        )
        .await
        .expect("the on_change rule");
}

/// A write that CouchDB acknowledged.
#[derive(Clone, Debug)]
struct Write {
    db: String,
    id: String,
    acked: Instant,
}

/// Creates a new document, retrying while a node is dying. A conflict on a
/// retry means an earlier attempt was stored. Returns when it was
/// acknowledged, `None` if every attempt failed.
async fn put_new(couch: &CouchClient, db: &str, id: &str) -> Option<Instant> {
    let mut last = None;
    for attempt in 0..30 {
        match couch.put_doc(db, id, &json!({"type": "load"})).await {
            Ok(_) => return Some(Instant::now()),
            Err(CouchError::Conflict) if attempt > 0 => return Some(Instant::now()),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("write {db}/{id} failed: {last:?}");
    None
}

/// Writes one new document `id` to each of `dbs` through `couch`,
/// concurrently.
async fn write_round(couch: &CouchClient, dbs: &[String], id: &str) -> Vec<Write> {
    put_all(couch, dbs.iter().map(|db| (db.clone(), id.to_string()))).await
}

/// Writes one new document per `(db, id)` through `couch`, concurrently;
/// returns those acknowledged.
async fn put_all(
    couch: &CouchClient,
    writes: impl Iterator<Item = (String, String)>,
) -> Vec<Write> {
    let acked = writes.map(|(db, id)| async move {
        let acked = put_new(couch, &db, &id).await?;
        Some(Write { db, id, acked })
    });
    futures::future::join_all(acked)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// The deliveries of the receiver by `(db, id)`, with their arrival times.
fn deliveries(receiver: &Receiver) -> HashMap<(String, String), Vec<Instant>> {
    let mut by_change: HashMap<(String, String), Vec<Instant>> = HashMap::new();
    for r in receiver.on("/hook") {
        let body = r.json();
        let key = (
            body["db"].as_str().unwrap_or("").to_string(),
            body["id"].as_str().unwrap_or("").to_string(),
        );
        by_change.entry(key).or_default().push(r.at);
    }
    by_change
}

/// Waits until every write was delivered, or panics after `deadline`
/// listing what is missing.
async fn wait_all_delivered(receiver: &Receiver, writes: &[Write], deadline: Duration) {
    wait_none_missing("writes not delivered", writes.len(), deadline, || async {
        let got = deliveries(receiver);
        writes
            .iter()
            .filter(|w| !got.contains_key(&(w.db.clone(), w.id.clone())))
            .map(|w| format!("{}/{}", w.db, w.id))
            .collect()
    })
    .await
}

/// Polls `missing` until it returns nothing, or panics after `deadline`
/// saying how many of the `of` awaited are still `what`, with a sample.
async fn wait_none_missing<F, Fut>(what: &str, of: usize, deadline: Duration, mut missing: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Vec<String>>,
{
    let start = Instant::now();
    loop {
        let left = missing().await;
        if left.is_empty() {
            return;
        }
        if start.elapsed() > deadline {
            let shown = &left[..left.len().min(20)];
            panic!(
                "{} of {of} {what} after {deadline:?}, e.g. {shown:?}",
                left.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How long before a disruption a change may have been delivered and still
/// be delivered again because of it: a run that read `_changes` before a
/// node died may deliver after it, and the next run, from a seq that names
/// the dead node's shard copy, may be rewound.
const SLACK: Duration = Duration::from_secs(3);

/// Checks that every duplicate delivery comes from a disruption (a node
/// killed): a change is delivered more than once only if disruptions
/// happened after (or up to [`SLACK`] before) its first delivery and no
/// later than its last, and at most once more per such disruption. So no
/// change is ever delivered twice while the cluster is steady. Returns the
/// duplicates that arrived after each disruption (and before the next).
fn check_duplicates(receiver: &Receiver, disruptions: &[Instant]) -> Vec<usize> {
    let mut by_window = vec![0; disruptions.len()];
    let mut unexplained = Vec::new();
    for ((db, id), mut times) in deliveries(receiver) {
        times.sort();
        let (first, last) = (times[0], times[times.len() - 1]);
        let causes = disruptions
            .iter()
            .filter(|d| first < **d + SLACK && **d <= last)
            .count();
        if times.len() - 1 > causes {
            unexplained.push(format!(
                "{db}/{id}: {} deliveries, {causes} disruptions between them",
                times.len()
            ));
        }
        for t in &times[1..] {
            if let Some(window) = disruptions.iter().rposition(|d| d <= t) {
                by_window[window] += 1;
            }
        }
    }
    assert!(
        unexplained.is_empty(),
        "changes delivered again without a node dying in between: {unexplained:?}"
    );
    by_window
}

/// Writes acknowledged before `at` (plus [`SLACK`]): the most that a
/// rewind of `_changes` at `at` can deliver again.
fn acked_before(writes: &[Write], at: Instant) -> usize {
    writes.iter().filter(|w| w.acked < at + SLACK).count()
}

/// How long after `at` the first write acknowledged after `at` was
/// delivered (waits up to 40 s for one).
async fn resumed_after(
    receiver: &Receiver,
    writes: &Mutex<Vec<Write>>,
    at: Instant,
    what: &str,
) -> Duration {
    wait_for(what, Duration::from_secs(40), || async {
        let after: HashSet<(String, String)> = writes
            .lock()
            .unwrap()
            .iter()
            .filter(|w| w.acked > at)
            .map(|w| (w.db.clone(), w.id.clone()))
            .collect();
        deliveries(receiver)
            .into_iter()
            .filter(|(key, _)| after.contains(key))
            .filter_map(|(_, times)| times.into_iter().min())
            .min()
            .map(|first| first - at)
    })
    .await
}

/// The documents of `db` whose ids start with `prefix` that have
/// unresolved conflicting revisions, read through `couch`:
/// `(id, _conflicts)`.
async fn conflicted(
    couch: &CouchClient,
    db: &str,
    prefix: &str,
) -> Result<Vec<(String, Value)>, CouchError> {
    let mut query = AllDocsQuery::prefix(prefix);
    query.conflicts = true;
    let rows = couch.all_docs(db, &query).await?.rows;
    Ok(rows
        .into_iter()
        .filter_map(|r| r.doc)
        .filter_map(|doc| {
            let conflicts = doc.get("_conflicts")?.clone();
            let id = doc["_id"].as_str()?.to_string();
            Some((id, conflicts))
        })
        .collect())
}

fn is_lease_or_checkpoint(id: &str) -> bool {
    id.starts_with("spiegel_lease_") || id.starts_with("spiegel_cl_")
}

/// The partitions each worker of the role owns, per `spiegel status`.
fn owned(status: &Value) -> HashMap<String, usize> {
    status["roles"][ROLE]["workers"]
        .as_object()
        .map(|workers| {
            workers
                .iter()
                .map(|(id, w)| (id.clone(), w["partitions"].as_array().map_or(0, Vec::len)))
                .collect()
        })
        .unwrap_or_default()
}

/// `_db_updates` events as a client of one node sees them (Spiegel's own
/// feed client, which reconnects from the last seq it got): `(db, the
/// number of the seq)`. The number is parsed only to tell whether the node
/// replayed (Spiegel never parses seqs).
struct DbUpdatesObserver {
    events: Arc<Mutex<Vec<(String, u64)>>>,
    reconnects: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl DbUpdatesObserver {
    fn start(url: &str) -> DbUpdatesObserver {
        let events: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
        let options = FeedOptions {
            heartbeat: Duration::from_secs(1),
            ..FeedOptions::default()
        };
        let reconnects = options.reconnects.clone();
        let sink = events.clone();
        let couch = client_for(url);
        let task = tokio::spawn(async move {
            let mut feed = couch.db_updates_feed(Some(Seq::now()), options);
            while let Some(Ok(event)) = feed.next().await {
                let n = event
                    .seq
                    .as_param()
                    .split('-')
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                sink.lock().unwrap().push((event.db_name, n));
            }
        });
        DbUpdatesObserver {
            events,
            reconnects,
            task,
        }
    }

    /// Events seen; events whose seq number was below one seen before;
    /// events of a database seen again with a seq number not above its
    /// previous one (a replayed event); reconnects.
    fn stop(self) -> (usize, usize, usize, u64) {
        self.task.abort();
        let events = self.events.lock().unwrap();
        let (mut max, mut backward, mut replayed) = (0, 0, 0);
        let mut last: HashMap<&str, u64> = HashMap::new();
        for (db, n) in events.iter() {
            if *n < max {
                backward += 1;
            }
            max = max.max(*n);
            if last.get(db.as_str()).is_some_and(|prev| n <= prev) {
                replayed += 1;
            }
            last.insert(db, *n);
        }
        let reconnects = self.reconnects.load(Ordering::SeqCst);
        (events.len(), backward, replayed, reconnects)
    }
}

/// A fresh spiegel database with `partitions` partitions on `couch`, a
/// rule for the databases `<prefix>_d*`, and a receiver for it.
async fn set_up(couch: &CouchClient, label: &str, partitions: u32) -> (String, String, Receiver) {
    let (prefix, spiegel_db) = fresh_installation(couch, label, partitions).await;
    let (receiver, base) = Receiver::start().await;
    put_rule(couch, &spiegel_db, &format!("{prefix}_d"), &base).await;
    (prefix, spiegel_db, receiver)
}

/// A fresh spiegel database with `partitions` partitions on `couch`:
/// `(prefix, spiegel_db)`.
async fn fresh_installation(couch: &CouchClient, label: &str, partitions: u32) -> (String, String) {
    let prefix = unique_name(label);
    let spiegel_db = format!("{prefix}_spiegel");
    spiegel::install::install(couch, &spiegel_db, "", partitions)
        .await
        .expect("install");
    (prefix, spiegel_db)
}

async fn create_dbs(couch: &CouchClient, prefix: &str, n: usize) -> Vec<String> {
    let dbs: Vec<String> = (0..n).map(|i| format!("{prefix}_d{i}")).collect();
    for db in &dbs {
        couch
            .create_db(db)
            .await
            .unwrap_or_else(|e| panic!("create {db}: {e}"));
    }
    dbs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spiegel_test_server = "cluster"),
    ignore = "needs the kit's 3-node cluster (SPIEGEL_TEST_SERVER=cluster)"
)]
async fn workers_on_two_nodes_share_partitions_deliver_everything_and_leave_no_conflicts() {
    let urls = shared_urls();
    let (node1, node2, node3) = (
        client_for(&urls[0]),
        client_for(&urls[1]),
        client_for(&urls[2]),
    );
    let (prefix, spiegel_db, receiver) = set_up(&node1, "twonodes", 8).await;
    let status = || async { spiegel_status(&urls[2], &spiegel_db) };

    // Every conflicting revision that shows up while the workers run, read
    // through the node neither worker uses.
    let seen_conflicts: Arc<Mutex<HashSet<(String, String)>>> = Arc::default();
    let sampler = {
        let seen = seen_conflicts.clone();
        let couch = client_for(&urls[2]);
        let db = spiegel_db.clone();
        tokio::spawn(async move {
            loop {
                if let Ok(docs) = conflicted(&couch, &db, INTERNAL).await {
                    let mut seen = seen.lock().unwrap();
                    for (id, revs) in docs {
                        for rev in revs.as_array().into_iter().flatten() {
                            seen.insert((id.clone(), rev.to_string()));
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };

    // Started together, so that their first claims race through two nodes.
    let mut a = worker(&urls[0], &spiegel_db, "a");
    let b = worker(&urls[1], &spiegel_db, "b");
    let (a_id, b_id) = (format!("a-{ROLE}"), format!("b-{ROLE}"));
    let shared_by_both = || async {
        let status = status().await;
        let workers = &status["roles"][ROLE]["workers"];
        let live =
            !workers[&a_id]["heartbeats"].is_null() && !workers[&b_id]["heartbeats"].is_null();
        let shares = owned(&status);
        let (na, nb) = (
            shares.get(&a_id).copied().unwrap_or(0),
            shares.get(&b_id).copied().unwrap_or(0),
        );
        (live && na > 0 && nb > 0 && na + nb == 8).then_some((na, nb))
    };
    let shares = wait_for(
        "both workers live and owning partitions",
        Duration::from_secs(20),
        shared_by_both,
    )
    .await;
    eprintln!(
        "partitions: a (node 1) {}, b (node 2) {}",
        shares.0, shares.1
    );

    // Ten databases written through node 3.
    let dbs = create_dbs(&node3, &prefix, 10).await;
    let mut writes = Vec::new();
    for n in 0..5 {
        writes.extend(write_round(&node3, &dbs, &format!("n{n}")).await);
    }
    assert_eq!(writes.len(), 50, "every write acknowledged");
    wait_all_delivered(&receiver, &writes, Duration::from_secs(30)).await;

    // a stops cleanly (its last checkpoints and releases go through node 1),
    // b takes every partition over through node 2 and goes on.
    assert!(a.stop().is_some_and(|s| s.success()), "a stops cleanly");
    wait_for(
        "b owning every partition",
        Duration::from_secs(20),
        || async { (owned(&status().await).get(&b_id) == Some(&8)).then_some(()) },
    )
    .await;
    for n in 5..8 {
        writes.extend(write_round(&node3, &dbs, &format!("n{n}")).await);
    }
    wait_all_delivered(&receiver, &writes, Duration::from_secs(30)).await;

    // a comes back: b hands partitions over to it (through node 1) while
    // changes keep coming.
    let a = worker(&urls[0], &spiegel_db, "a");
    for n in 8..13 {
        writes.extend(write_round(&node3, &dbs, &format!("n{n}")).await);
    }
    let shares = wait_for(
        "both workers owning partitions again",
        Duration::from_secs(20),
        shared_by_both,
    )
    .await;
    eprintln!(
        "after a's return: a (node 1) {}, b (node 2) {}",
        shares.0, shares.1
    );
    for n in 13..15 {
        writes.extend(write_round(&node3, &dbs, &format!("n{n}")).await);
    }
    assert_eq!(writes.len(), 150, "every write acknowledged");
    wait_all_delivered(&receiver, &writes, Duration::from_secs(30)).await;

    // No lease or checkpoint keeps a conflicting revision, on any node.
    let mut left = Vec::new();
    let settled = {
        let start = Instant::now();
        loop {
            left.clear();
            for couch in [&node1, &node2, &node3] {
                let docs = conflicted(couch, &spiegel_db, INTERNAL)
                    .await
                    .expect("read the spiegel database");
                left.extend(
                    docs.into_iter()
                        .filter(|(id, _)| is_lease_or_checkpoint(id)),
                );
            }
            if left.is_empty() || start.elapsed() > Duration::from_secs(10) {
                break left.is_empty();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    sampler.abort();
    let seen = seen_conflicts.lock().unwrap().clone();
    let total = receiver.on("/hook").len();
    eprintln!(
        "{} writes, {total} deliveries; conflicting revisions seen while running: {seen:?}",
        writes.len()
    );
    assert!(
        settled,
        "unresolved conflicts 10 s after the last write: {left:?}"
    );
    let others = conflicted(&node1, &spiegel_db, INTERNAL)
        .await
        .expect("read the spiegel database");
    if !others.is_empty() {
        eprintln!("other internal documents with conflicts: {others:?}");
    }
    drop(a);
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spiegel_test_server = "cluster"),
    ignore = "needs the kit's 3-node cluster (SPIEGEL_TEST_SERVER=cluster)"
)]
async fn killing_nodes_under_load_loses_nothing_through_replays_and_fail_over() {
    let _turn = OWN_CLUSTER.lock().await;
    let kit = tokio::task::block_in_place(|| Kit::cluster(3));
    let urls = kit.urls.clone();
    // Everything the test writes goes through node 2, which stays up.
    let node2 = client_for(&urls[1]);
    let (prefix, spiegel_db, receiver) = set_up(&node2, "kill", 4).await;
    let dbs = create_dbs(&node2, &prefix, 10).await;
    // Spiegel reaches node 1 through a proxy that fails over to node 2; it
    // never talks to node 3.
    let proxy = Proxy::start(&[&urls[0], &urls[1]]).await;
    let spiegel_url = proxy.url(&urls[0]);
    let w = worker(&spiegel_url, &spiegel_db, "w");

    // The load: one new document per database every 200 ms for 20 s.
    const ROUNDS: usize = 100;
    let writes: Arc<Mutex<Vec<Write>>> = Arc::default();
    let rounds = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (writes, rounds, dbs) = (writes.clone(), rounds.clone(), dbs.clone());
        let couch = node2.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for round in 0..ROUNDS {
                tick.tick().await;
                let done = write_round(&couch, &dbs, &format!("r{round:03}")).await;
                writes.lock().unwrap().extend(done);
                rounds.store(round + 1, Ordering::SeqCst);
            }
        })
    };
    let round_reached = |n: usize| {
        let rounds = rounds.clone();
        move || {
            let rounds = rounds.clone();
            async move { (rounds.load(Ordering::SeqCst) >= n).then_some(()) }
        }
    };
    let started = Instant::now();
    wait_for("the first deliveries", Duration::from_secs(30), || async {
        (!receiver.on("/hook").is_empty()).then_some(())
    })
    .await;

    // Node 3 dies: Spiegel's node (1) stays up, but its `_db_updates` feed
    // may replay older events, with seqs going backwards.
    let observer = DbUpdatesObserver::start(&urls[0]);
    wait_for("round 25", Duration::from_secs(30), round_reached(25)).await;
    let killed3 = Instant::now();
    tokio::task::block_in_place(|| kit.kill_node(3));
    let resume3 = resumed_after(&receiver, &writes, killed3, "deliveries after node 3 died").await;
    eprintln!(
        "node 3 killed at {:?}; deliveries resumed {resume3:?} later",
        killed3 - started
    );

    // Node 1, Spiegel's node, dies: new connections go to node 2.
    wait_for("round 55", Duration::from_secs(30), round_reached(55)).await;
    let (events, backward, replayed, reconnects) = observer.stop();
    let killed1 = Instant::now();
    tokio::task::block_in_place(|| kit.kill_node(1));
    let resume1 = resumed_after(&receiver, &writes, killed1, "deliveries after node 1 died").await;
    eprintln!(
        "node 1 killed at {:?}; deliveries resumed {resume1:?} later",
        killed1 - started
    );

    writer.await.expect("the writer");
    let writes = writes.lock().unwrap().clone();
    assert_eq!(
        writes.len(),
        ROUNDS * dbs.len(),
        "every write acknowledged by node 2"
    );
    wait_all_delivered(&receiver, &writes, Duration::from_secs(45)).await;

    let total = receiver.on("/hook").len();
    let dups = check_duplicates(&receiver, &[killed3, killed1]);
    let (before3, before1) = (
        acked_before(&writes, killed3),
        acked_before(&writes, killed1),
    );
    eprintln!(
        "{} writes, {total} deliveries: {} duplicates ({:.1}%), {} after node 3 died \
         ({before3} writes before), {} after node 1 died ({before1} writes before); \
         node 1's _db_updates while node 3 died: {events} events, {backward} with a seq \
         below an earlier one, {replayed} repeating a database's earlier seq, {reconnects} reconnects",
        writes.len(),
        total - writes.len(),
        100.0 * (total - writes.len()) as f64 / writes.len() as f64,
        dups[0],
        dups[1],
    );
    assert!(
        resume3 < Duration::from_secs(5),
        "deliveries resumed {resume3:?} after node 3 died"
    );
    assert!(
        resume1 < Duration::from_secs(5),
        "deliveries resumed {resume1:?} after node 1 died"
    );
    // A dead node's shard copies make CouchDB restart `_changes` of their
    // ranges from an older seq (down to 0): each death may deliver again
    // at most what was written before it, once.
    assert!(
        dups[0] <= before3,
        "{} duplicates after node 3 died, more than the {before3} writes before it",
        dups[0]
    );
    assert!(
        dups[1] <= before1,
        "{} duplicates after node 1 died, more than the {before1} writes before it",
        dups[1]
    );
    drop(w);
    drop(proxy);
    tokio::task::block_in_place(|| drop(kit));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spiegel_test_server = "cluster"),
    ignore = "needs the kit's 3-node cluster (SPIEGEL_TEST_SERVER=cluster)"
)]
async fn a_restarted_node_rejoins_and_spiegel_keeps_delivering() {
    let _turn = OWN_CLUSTER.lock().await;
    let kit = tokio::task::block_in_place(|| Kit::cluster(3));
    let urls = kit.urls.clone();
    let (node1, node2, node3) = (
        client_for(&urls[0]),
        client_for(&urls[1]),
        client_for(&urls[2]),
    );
    let (prefix, spiegel_db, receiver) = set_up(&node2, "restart", 4).await;
    let dbs = create_dbs(&node2, &prefix, 6).await;
    let proxy = Proxy::start(&[&urls[0], &urls[1]]).await;
    let w = worker(&proxy.url(&urls[0]), &spiegel_db, "w");

    let mut writes = Vec::new();
    for n in 0..3 {
        writes.extend(write_round(&node1, &dbs, &format!("before{n}")).await);
    }
    assert_eq!(writes.len(), 3 * dbs.len(), "every write acknowledged");
    wait_all_delivered(&receiver, &writes, Duration::from_secs(30)).await;

    // Spiegel's node dies; Spiegel goes on through node 2.
    let killed = Instant::now();
    tokio::task::block_in_place(|| kit.kill_node(1));
    for n in 0..3 {
        writes.extend(write_round(&node3, &dbs, &format!("down{n}")).await);
    }
    wait_all_delivered(&receiver, &writes, Duration::from_secs(30)).await;

    // Node 1 comes back with its data and rejoins. Writes through it are
    // delivered.
    tokio::task::block_in_place(|| kit.restart_node(1));
    let restarted = Instant::now();
    for n in 0..3 {
        writes.extend(write_round(&node1, &dbs, &format!("back{n}")).await);
    }
    wait_all_delivered(&receiver, &writes, Duration::from_secs(30)).await;

    // Node 2 dies: Spiegel can only go on through the restarted node, which
    // must have caught up with what it missed.
    let accepted = proxy.accepted();
    let killed2 = Instant::now();
    tokio::task::block_in_place(|| kit.kill_node(2));
    for n in 0..3 {
        writes.extend(write_round(&node1, &dbs, &format!("after{n}")).await);
        writes.extend(write_round(&node3, &dbs, &format!("after{n}_3")).await);
    }
    assert_eq!(writes.len(), 15 * dbs.len(), "every write acknowledged");
    wait_all_delivered(&receiver, &writes, Duration::from_secs(30)).await;
    assert!(
        proxy.accepted() > accepted,
        "Spiegel connected again (to node 1, the proxy's only live backend)"
    );
    let total = receiver.on("/hook").len();
    let dups = check_duplicates(&receiver, &[killed, restarted, killed2]);
    eprintln!(
        "{} writes, {total} deliveries; duplicates: {} after node 1 died, {} after it came back, \
         {} after node 2 died; everything delivered {:?} after the restart",
        writes.len(),
        dups[0],
        dups[1],
        dups[2],
        restarted.elapsed()
    );
    for (dups, at) in dups.iter().zip([killed, restarted, killed2]) {
        assert!(*dups <= acked_before(&writes, at), "{dups} duplicates");
    }
    drop(w);
    drop(proxy);
    tokio::task::block_in_place(|| drop(kit));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spiegel_test_server = "cluster"),
    ignore = "needs the kit's 3-node cluster (SPIEGEL_TEST_SERVER=cluster)"
)]
async fn native_replication_through_node_deaths_loses_nothing_and_makes_no_conflict() {
    let _turn = OWN_CLUSTER.lock().await;
    let kit = tokio::task::block_in_place(|| Kit::cluster(3));
    let urls = kit.urls.clone();
    // The writes and the checks go through node 2, which stays up; Spiegel
    // reaches node 1 through a proxy that fails over to node 2.
    let node2 = client_for(&urls[1]);
    let (prefix, spiegel_db) = fresh_installation(&node2, "native_kill", 4).await;
    let dbs = create_dbs(&node2, &prefix, 10).await;
    let target = format!("{prefix}_all");
    node2.create_db(&target).await.expect("the target");
    let proxy = Proxy::start(&[&urls[0], &urls[1]]).await;
    let spiegel_url = proxy.url(&urls[0]);
    // One templated document fans every source into the target (the
    // engine is the default, native).
    let doc = json!({"type": "replicator", "db_name": format!("^{prefix}_d"),
                     "source": format!("{spiegel_url}/${{db_name}}"),
                     "target": format!("{spiegel_url}/{target}")});
    node2
        .put_doc(&spiegel_db, "fan-in", &doc)
        .await
        .expect("the replicator document");
    let w = worker_of("replicator", &spiegel_url, &spiegel_db, "w");

    // The load: one new document per source every 200 ms for 12 s, with
    // ids unique across sources; node 3 dies at round 15, node 1 (Spiegel's
    // node) at round 35.
    let mut writes = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for round in 0..60 {
        tick.tick().await;
        if round == 15 {
            tokio::task::block_in_place(|| kit.kill_node(3));
        }
        if round == 35 {
            tokio::task::block_in_place(|| kit.kill_node(1));
        }
        let batch = dbs
            .iter()
            .enumerate()
            .map(|(i, db)| (db.clone(), format!("{i}-r{round:02}")));
        writes.extend(put_all(&node2, batch).await);
    }
    assert_eq!(
        writes.len(),
        60 * dbs.len(),
        "every write acknowledged by node 2"
    );
    let last_write = Instant::now();
    let ids: Vec<&str> = writes.iter().map(|w| w.id.as_str()).collect();

    // Spiegel's logs are printed if this fails (the worker does on drop).
    wait_none_missing(
        "writes not in the target",
        ids.len(),
        Duration::from_secs(60),
        || missing_ids(&node2, &target, &ids),
    )
    .await;
    eprintln!(
        "{} writes replicated through two node deaths; the last one {:?} after it was written",
        writes.len(),
        last_write.elapsed()
    );
    // The engine writes the source's revisions as they are: a document
    // copied again after a rewind is the same revision, never a conflict.
    let conflicts = conflicted(&node2, &target, "").await.expect("the target");
    assert!(
        conflicts.is_empty(),
        "conflicts in the target: {conflicts:?}"
    );
    drop(w);
    drop(proxy);
    tokio::task::block_in_place(|| drop(kit));
}
