//! The benchmark (`spiegel-bench`, issue 7) at a small size, as a smoke
//! test: it must run end to end and find nothing missing. Timings are
//! never asserted: they depend on the machine.

mod common;

use std::process::{Command, Stdio};
use std::time::Instant;

use serde_json::Value;

use common::{kind, Kind, Kit};

/// Runs the benchmark on the test server it starts itself, or on a kit
/// node of its own (a real CouchDB) on the kit kinds.
fn run_bench(extra: &[&str]) -> Value {
    let started = Instant::now();
    let kit = matches!(kind(), Kind::Kit | Kind::Cluster).then(Kit::single);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_spiegel-bench"));
    if let Some(kit) = &kit {
        cmd.args(["--url", kit.url()]);
    }
    cmd.args(["--spiegel-bin", env!("CARGO_BIN_EXE_spiegel")])
        .args(["--dbs", "200", "--active", "10", "--seconds", "10"])
        .args([
            "--idle-seconds",
            "1",
            "--drain",
            "60",
            "--ready-timeout",
            "120",
        ])
        .arg("--json")
        .args(extra)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    let out = cmd.output().expect("run spiegel-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "spiegel-bench {extra:?} failed ({}); stdout:\n{stdout}",
        out.status
    );
    eprintln!(
        "spiegel-bench {extra:?} took {:?}",
        started.elapsed().as_secs_f64()
    );
    serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("JSON from spiegel-bench: {e}\n{stdout}"))
}

fn assert_latency_fields(v: &Value, what: &str, count: u64) {
    for key in ["p50_s", "p95_s", "p99_s", "max_s"] {
        assert!(v[key].is_number(), "{what}.{key} missing: {v}");
    }
    assert_eq!(v["count"].as_u64(), Some(count), "{what}.count: {v}");
}

/// Spiegel's report: complete, with every figure present.
fn assert_spiegel_report(r: &Value, processes: u64) {
    assert_eq!(r["mode"], "spiegel");
    assert_eq!(r["params"]["dbs"], 200);
    let writes = r["writes"].as_u64().expect("writes");
    assert_eq!(writes, 100, "10 databases x 10 s: {r}");
    assert_eq!(r["write_errors"], 0);
    assert_eq!(r["replication"]["missing"], 0, "{r}");
    assert_latency_fields(&r["replication"]["latency"], "replication", writes);
    let d = &r["delivery"];
    assert_eq!(d["missing"], 0, "{r}");
    assert_eq!(d["duplicates"], 0, "{r}");
    assert_eq!(d["unexpected"], 0, "{r}");
    assert_latency_fields(&d["latency"], "delivery", writes);
    let s = &r["spiegel"];
    assert_eq!(s["processes"], processes, "{r}");
    for key in [
        "peak_rss_mb",
        "cpu_s_load",
        "max_connections_to_couchdb",
        "max_connections_to_couchdb_per_process",
        "spiegel_db_writes",
        "spiegel_db_writes_per_update",
    ] {
        assert!(s[key].is_number(), "spiegel.{key} missing: {r}");
    }
    assert!(
        s["peak_rss_mb"].as_f64().unwrap() > 0.0,
        "RSS read from /proc: {r}"
    );
    // Read from every process's /metrics.
    let t = &s["time_spent"];
    for key in ["replicator", "change_listener"] {
        assert!(
            t[key]["runs"].as_f64().unwrap_or(0.0) > 0.0,
            "{key} runs: {r}"
        );
    }
    assert!(
        t["post_replicate"]["requests"].as_f64().unwrap_or(0.0) > 0.0,
        "{r}"
    );
    if kind() == Kind::TestServer {
        assert!(r["server"]["cpu_s_load"].is_number(), "{r}");
    }
    assert_eq!(r["complete"], true);
}

#[test]
#[cfg_attr(
    spiegel_test_server = "external",
    ignore = "creates hundreds of databases: run spiegel-bench --url by hand"
)]
fn benchmark_quick_size_delivers_and_replicates_everything() {
    assert_spiegel_report(&run_bench(&[]), 1);
}

#[test]
#[cfg_attr(
    spiegel_test_server = "external",
    ignore = "creates hundreds of databases: run spiegel-bench --url by hand"
)]
fn benchmark_with_two_workers_per_role_delivers_and_replicates_everything() {
    assert_spiegel_report(&run_bench(&["--workers", "2"]), 4);
}

#[test]
#[cfg_attr(
    spiegel_test_server = "external",
    ignore = "creates hundreds of databases: run spiegel-bench --url by hand"
)]
fn benchmark_baseline_replicates_everything() {
    let r = run_bench(&["--baseline", "couchdb-replicator"]);
    assert_eq!(r["mode"], "couchdb-replicator");
    let writes = r["writes"].as_u64().expect("writes");
    assert_eq!(writes, 100, "{r}");
    assert_eq!(r["replication"]["missing"], 0, "{r}");
    assert_latency_fields(&r["replication"]["latency"], "replication", writes);
    assert!(r["delivery"].is_null() && r["spiegel"].is_null(), "{r}");
    if kind() == Kind::TestServer {
        assert!(
            r["server"]["max_connections_to_itself"].as_u64().unwrap() > 0,
            "one continuous replication per database holds connections: {r}"
        );
    }
    assert_eq!(r["complete"], true);
}

#[test]
#[cfg_attr(
    spiegel_test_server = "external",
    ignore = "creates hundreds of databases: run spiegel-bench --url by hand"
)]
fn benchmark_with_an_api_outage_delivers_everything_once_it_is_back() {
    let r = run_bench(&["--outage-seconds", "4", "--only", "change-listener"]);
    let o = &r["outage"];
    assert!(o["refused_requests"].as_u64().unwrap() > 0, "{o}");
    let during = o["writes_during"].as_u64().expect("writes during");
    assert!(during > 0, "{o}");
    assert_eq!(o["delivered_of_those"].as_u64(), Some(during), "{o}");
    for phase in ["before", "during", "after"] {
        assert!(
            o["max_sampled_rss_mb"][phase].as_f64().unwrap() > 0.0,
            "{o}"
        );
    }
    assert_eq!(r["delivery"]["missing"], 0, "{r}");
    assert_eq!(r["delivery"]["duplicates"], 0, "{r}");
    assert_eq!(r["complete"], true);
}
