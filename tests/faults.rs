//! Faults between Spiegel and CouchDB, through a TCP proxy that can make a
//! connection go silent (it stays open, no byte flows): every request has a
//! deadline, so a silent connection is dropped and its work retried within
//! about two feed heartbeats, wherever it happens. And when CouchDB comes
//! back after a stop, Spiegel follows within about a second.
//!
//! The workers run with `--lease-time 1.5`: their feed heartbeat is 1.5 s,
//! so a silent connection is given up after 3 s.

mod common;

use std::time::{Duration, Instant};

use serde_json::json;

use common::*;

/// Deadline for recovering from a silent connection: two heartbeats (3 s),
/// plus a retry, with room for a slow machine.
const RECOVERY: Duration = Duration::from_secs(15);

/// A change-listener installation whose worker talks to CouchDB through a
/// proxy, with an on_change rule for one database.
struct Setup {
    s: Installation,
    proxy: Proxy,
    receiver: Receiver,
    db: String,
}

impl Setup {
    async fn new(label: &str) -> Setup {
        let s = Installation::new(label).await;
        let proxy = Proxy::start(&[&s.url]).await;
        let (receiver, base) = Receiver::start().await;
        let db = s.db("d");
        s.couch.create_db(&db).await.unwrap();
        let rule = json!({"type": "on_change", "db_name": format!("^{db}$"),
                          "url": format!("{base}/hook"), "method": "POST",
                          "params": {"id": "$change.id"}});
        s.couch.put_doc(&s.spiegel_db, "hook", &rule).await.unwrap();
        Setup {
            s,
            proxy,
            receiver,
            db,
        }
    }

    fn start(&self, role: &str) -> Spiegel {
        let url = self.proxy.url(&self.s.url);
        Spiegel::start(&[
            role,
            "--url",
            &url,
            "--db-name",
            &self.s.spiegel_db,
            "--lease-time",
            "1.5",
            "--save-seq-after",
            "1",
            "--backoff-delay",
            "0.3",
        ])
    }

    async fn write(&self, id: &str) {
        self.s
            .couch
            .put_doc(&self.db, id, &json!({}))
            .await
            .unwrap();
    }

    /// Waits for the delivery of document `id`; returns how long it took.
    async fn delivered(&self, id: &str, deadline: Duration) -> Duration {
        let start = Instant::now();
        wait_for(&format!("the delivery of {id}"), deadline, || async {
            self.receiver
                .received()
                .iter()
                .any(|r| r.json()["id"] == id)
                .then_some(())
        })
        .await;
        start.elapsed()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_db_updates_feed_is_dropped_and_reopened() {
    let t = Setup::new("silent_feed").await;
    let _worker = t.start("change-listener");
    t.write("before").await;
    t.delivered("before", Duration::from_secs(30)).await;

    // Every connection goes silent, the _db_updates feed among them.
    t.proxy.silence_open_connections();
    assert!(t.proxy.silenced() > 0);
    t.write("after").await;
    let took = t.delivered("after", RECOVERY).await;
    eprintln!("delivered {took:?} after the connections went silent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_changes_read_is_abandoned_and_retried() {
    let t = Setup::new("silent_changes").await;
    let _worker = t.start("change-listener");
    t.write("first").await;
    t.delivered("first", Duration::from_secs(30)).await;

    // The next read of the database's _changes gets no answer.
    let path = format!("GET /{}/_changes", spiegel::couch::encode_segment(&t.db));
    t.proxy.silence_next_request(&path);
    t.write("second").await;
    let took = t.delivered("second", RECOVERY).await;
    assert_eq!(t.proxy.silenced(), 1, "the _changes read went silent");
    eprintln!("delivered {took:?} after its _changes read went silent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    spiegel_test_server = "test-server",
    ignore = "needs CouchDB's _scheduler/jobs, which the test server lacks (it gets the one-hour limit instead)"
)]
async fn a_silent_replicate_is_abandoned_and_the_database_keeps_replicating() {
    let t = Setup::new("silent_replicate").await;
    let target = t.s.db("target");
    // The server as Spiegel knows it, through the proxy.
    let url = t.proxy.url(&t.s.url);
    let doc = json!({"type": "replicator", "source": format!("{url}/{}", t.db),
                     "target": format!("{url}/{target}"), "create_target": true,
                     "engine": "couchdb"});
    t.s.couch.put_doc(&t.s.spiegel_db, "r", &doc).await.unwrap();
    t.proxy.silence_next_request("POST /_replicate");
    let worker = t.start("replicator");
    t.write("first").await;
    // CouchDB replicates; its answer never reaches Spiegel.
    let what = "the first document replicated";
    wait_doc(
        &t.s.couch,
        &target,
        "first",
        true,
        Duration::from_secs(30),
        what,
    )
    .await;
    assert_eq!(t.proxy.silenced(), 1, "a POST /_replicate went silent");

    // The database is not blocked: its next change is replicated too.
    t.write("second").await;
    let what = "the second document replicated";
    wait_doc(
        &t.s.couch,
        &target,
        "second",
        true,
        Duration::from_secs(40),
        what,
    )
    .await;
    assert!(
        worker.logs().contains("CouchDB runs no job for it"),
        "the watchdog abandoned the request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    spiegel_test_server = "external",
    ignore = "owns its CouchDB: kills and restarts it"
)]
async fn after_couchdb_returns_readiness_replication_and_delivery_follow_within_seconds() {
    let (mut server, couch) = own_installation().await;
    let url = server.url();
    let (receiver, base) = Receiver::start().await;
    let db = "returns";
    let copy = "returns_copy";
    couch.create_db(db).await.unwrap();
    let rule = json!({"type": "on_change", "db_name": format!("^{db}$"),
                      "url": format!("{base}/hook"), "method": "POST", "params": {"id": "$change.id"}});
    couch.put_doc("spiegel", "hook", &rule).await.unwrap();
    let replication = json!({"type": "replicator", "source": format!("{url}/{db}"),
                             "target": format!("{url}/{copy}"), "create_target": true});
    couch
        .put_doc("spiegel", "copy", &replication)
        .await
        .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let admin = format!("127.0.0.1:{port}");
    let _worker = Spiegel::start(&[
        "run",
        "--url",
        &url,
        "--lease-time",
        "1.5",
        "--save-seq-after",
        "1",
        "--backoff-delay",
        "5",
        "--admin-addr",
        &admin,
    ]);
    // Waits until `/readyz` answers `want`.
    let readyz = |want: u16| {
        let url = format!("http://{admin}/readyz");
        move || {
            let url = url.clone();
            async move { (reqwest::get(url).await.ok()?.status() == want).then_some(()) }
        }
    };
    wait_for("readiness", Duration::from_secs(20), readyz(200)).await;
    couch.put_doc(db, "before", &json!({})).await.unwrap();
    let delivered = |id: &'static str| {
        let receiver = receiver.clone();
        move || {
            let receiver = receiver.clone();
            async move {
                receiver
                    .received()
                    .iter()
                    .any(|r| r.json()["id"] == id)
                    .then_some(())
            }
        }
    };
    wait_for(
        "the first delivery",
        Duration::from_secs(30),
        delivered("before"),
    )
    .await;
    let what = "the first replication";
    wait_doc(&couch, copy, "before", true, Duration::from_secs(30), what).await;

    server.kill();
    wait_for("unreadiness", Duration::from_secs(20), readyz(503)).await;
    // Not a synchronisation: the outage itself lasts 20 s, long enough for
    // reconnect backoffs to grow past the bounds below.
    tokio::time::sleep(Duration::from_secs(20)).await;
    server.restart();
    let back = Instant::now();
    wait_for("readiness again", Duration::from_secs(20), readyz(200)).await;
    let readiness = back.elapsed();
    // Written once CouchDB publishes updates again: it may drop the update
    // event of a write made while it starts up (`_db_updates` is best
    // effort), which no client can see.
    let couch = client_for(&url);
    let since = current_seq(&couch).await;
    couch.create_db("probe").await.unwrap();
    couch.put_doc("probe", "p", &json!({})).await.unwrap();
    wait_published(&couch, &since, &["probe".to_string()]).await;
    let written = Instant::now();
    couch.put_doc(db, "after", &json!({})).await.unwrap();
    let what = "the replication after";
    let replicated_in = async {
        wait_doc(&couch, copy, "after", true, Duration::from_secs(20), what).await;
        written.elapsed()
    };
    let delivered_in = async {
        wait_for(
            "the delivery after",
            Duration::from_secs(20),
            delivered("after"),
        )
        .await;
        written.elapsed()
    };
    let (replication, delivery) = tokio::join!(replicated_in, delivered_in);
    eprintln!("after CouchDB returned: ready in {readiness:?}; a write replicated in {replication:?}, delivered in {delivery:?}");
    assert!(
        readiness < Duration::from_secs(3),
        "ready {readiness:?} after CouchDB returned"
    );
    assert!(
        delivery < Duration::from_secs(3),
        "delivered {delivery:?} after its write"
    );
    assert!(
        replication < Duration::from_secs(5),
        "replicated {replication:?} after its write"
    );
}
