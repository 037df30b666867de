//! The admin HTTP server of a worker process: health, readiness that follows
//! CouchDB, Prometheus metrics after activity, and a clean exit on SIGTERM.

mod common;

use std::time::{Duration, Instant};

use serde_json::json;

use common::*;

#[tokio::test]
#[cfg_attr(
    spiegel_test_server = "external",
    ignore = "owns its CouchDB: kills and restarts it"
)]
async fn readiness_follows_couchdb_and_metrics_show_activity() {
    let (mut server, couch) = own_installation().await;
    let server_url = server.url();
    let port = free_port();
    let admin = format!("http://127.0.0.1:{port}");
    let mut worker = Spiegel::start(&[
        "run",
        "--url",
        &server_url,
        "--lease-time",
        "1.5",
        "--save-seq-after",
        "1",
        "--admin-addr",
        &format!("127.0.0.1:{port}"),
    ]);
    assert_eq!(
        wait_http_status(&format!("{admin}/healthz"), 200, Duration::from_secs(10)).await,
        "ok\n"
    );
    wait_http_status(&format!("{admin}/readyz"), 200, Duration::from_secs(10)).await;

    // Activity: a replication and a change.
    let (src, dst) = ("src", "dst");
    couch.create_db(src).await.unwrap();
    couch.create_db(dst).await.unwrap();
    let url = server_url.clone();
    couch
        .put_doc("spiegel", "r", &json!({"type": "replicator", "source": format!("{url}/{src}"), "target": format!("{url}/{dst}"), "engine": "couchdb"}))
        .await
        .unwrap();
    couch.put_doc(src, "doc", &json!({})).await.unwrap();
    wait_doc(
        &couch,
        dst,
        "doc",
        true,
        Duration::from_secs(20),
        "a replication",
    )
    .await;
    // The target can hold the document a moment before `_replicate` answers.
    let metrics = {
        let start = Instant::now();
        loop {
            let (_, text) = http_get(&format!("{admin}/metrics")).await.unwrap();
            if text.contains("spiegel_replications_total{outcome=\"ok\",engine=\"couchdb\"}")
                || start.elapsed() > Duration::from_secs(10)
            {
                break text;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    for series in [
        "spiegel_runs_started_total{role=\"replicator\"}",
        "spiegel_runs_succeeded_total{role=\"replicator\"}",
        "spiegel_db_updates_received_total{role=\"change-listener\"}",
        "spiegel_owned_partitions{role=\"replicator\"} 4",
        "spiegel_live_workers{role=\"change-listener\"} 1",
        "spiegel_run_duration_seconds_count{role=\"replicator\"}",
        "spiegel_replications_total{outcome=\"ok\",engine=\"couchdb\"}",
        "spiegel_replication_docs_written_total{role=\"replicator\"}",
        "spiegel_couchdb_requests_total{op=\"POST _replicate\"}",
        "spiegel_couchdb_request_duration_seconds_count{op=\"GET db/_changes\"}",
        "spiegel_feed_last_event_timestamp_seconds{role=\"replicator\"}",
    ] {
        assert!(metrics.contains(series), "missing {series} in\n{metrics}");
    }
    let started = metrics
        .lines()
        .find(|l| l.starts_with("spiegel_runs_started_total{role=\"replicator\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap();
    assert!(started >= 1.0);

    // CouchDB stops: unready; it returns: ready again.
    server.kill();
    let body = wait_http_status(&format!("{admin}/readyz"), 503, Duration::from_secs(15)).await;
    assert!(body.contains("CouchDB"), "{body}");
    server.restart();
    wait_http_status(&format!("{admin}/readyz"), 200, Duration::from_secs(30)).await;

    // _global_changes deleted: the feeds end and cannot reopen, unready.
    // Created again: ready again (Spiegel's own heartbeat writes are events
    // that show the feeds work, even on an otherwise idle server).
    couch.delete_db("_global_changes").await.unwrap();
    wait_for("unready for the feed", Duration::from_secs(15), || async {
        let (status, body) = http_get(&format!("{admin}/readyz")).await?;
        (status == 503 && body.contains("not following _db_updates")).then_some(())
    })
    .await;
    couch.create_db("_global_changes").await.unwrap();
    wait_http_status(&format!("{admin}/readyz"), 200, Duration::from_secs(30)).await;

    // SIGTERM: a clean exit, code 0, within the bound.
    let t = Instant::now();
    let status = worker.stop().expect("exits after SIGTERM");
    assert!(status.success(), "{status:?}\n{}", worker.logs());
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "took {:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn a_second_process_on_the_default_admin_port_runs_without_the_admin_server() {
    // Spiegel 1.2's README runs several processes on one host, with no
    // admin address: the default port is taken by the first.
    let _first = std::net::TcpListener::bind("0.0.0.0:9090");
    let s = Installation::new("busyadmin").await;
    let mut cmd = spiegel();
    cmd.env_remove("ADMIN_ADDR").args([
        "replicator",
        "--url",
        &s.url,
        "--db-name",
        &s.spiegel_db,
        "--lease-time",
        "1.5",
    ]);
    let mut worker = Spiegel::start_command(cmd);
    for line in ["admin HTTP server not started", "acquired partitions"] {
        worker.wait_log(line, Duration::from_secs(30)).await;
    }
    assert!(
        worker.child.try_wait().unwrap().is_none(),
        "the process keeps running"
    );
    assert!(worker.stop().expect("stops").success());
}

#[test]
fn an_admin_address_set_explicitly_and_busy_stops_the_process() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let out = spiegel()
        .args([
            "replicator",
            "--url",
            "http://127.0.0.1:9",
            "--admin-addr",
            &addr,
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--admin-addr") && err.contains(&addr), "{err}");
}
