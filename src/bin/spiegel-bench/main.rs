//! `spiegel-bench`: the many-databases scenario of issue 7, measured.
//!
//! Sets up K databases, one templated fan-in replicator document into one
//! aggregate database and one on_change rule that posts to a receiver built
//! into the benchmark; starts Spiegel (or, with `--baseline
//! couchdb-replicator`, one continuous `_replicator` document per database
//! instead); writes A active databases once a second for D seconds; and
//! reports replication and delivery latency, completeness, and what Spiegel
//! and the server cost (memory, CPU, connections, writes to the spiegel
//! database). See docs/benchmarks.md.

mod couch;
mod hanging;
mod measure;

/// Partitions of the benchmark's installation (`spiegel install`'s default).
const PARTITIONS: u32 = 32;
mod observed;
mod outage;
mod processes;
mod procfs;
mod report;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use futures::StreamExt;
use serde_json::{json, Value};

use couch::{enc, Couch};
use measure::{
    breakdown, cpu, percentiles, round3, sample, scrape, secs, wait_until, wait_until_async,
    Samples,
};
use observed::OutageKind;
use observed::{follow_aggregate, now_ms, start_receiver, Figures, Shared, State};
use outage::Outage;
use processes::{spiegel_bin, spiegel_cmd, start_spiegel, start_test_server, stop, Workers};
use report::markdown;

pub(crate) const BENCH_ADMIN: (&str, &str) = ("bench", "bench-secret");

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Baseline {
    /// One continuous `_replicator` document per database, no Spiegel.
    CouchdbReplicator,
}

/// One role of Spiegel alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Only {
    /// `spiegel replicator` processes: no delivery is expected.
    Replicator,
    /// `spiegel change-listener` processes: no replication is expected.
    ChangeListener,
    /// No Spiegel process: what the benchmark's writes alone cost the
    /// server, to subtract from the other runs.
    Writes,
}

/// The many-databases benchmark: Spiegel (or CouchDB's own `_replicator`)
/// against K databases of which A are written once a second.
#[derive(Parser, Debug, Clone)]
#[command(name = "spiegel-bench", version)]
pub(crate) struct Args {
    /// CouchDB admin URL (http://user:pass@host:port). Default: start the
    /// test CouchDB (testing/couchdb/server.js) in memory, with an admin.
    #[arg(long)]
    url: Option<String>,
    /// Number of databases (K).
    #[arg(long, default_value_t = 10_000)]
    dbs: usize,
    /// Number of active databases (A), each written once a second.
    #[arg(long, default_value_t = 100)]
    active: usize,
    /// Seconds of load (D).
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Run W processes per role (`replicator`, `change-listener`) instead
    /// of one `spiegel run`.
    #[arg(long)]
    workers: Option<usize>,
    /// Bursts: every active database writes N documents (one _bulk_docs)
    /// at the same instant each second, instead of one document each,
    /// spread over the second.
    #[arg(long)]
    burst: Option<usize>,
    /// Run the load twice: then again with `--active` more databases
    /// written, whose on_change rule calls an API that never answers; the
    /// healthy API's delivery latency is reported for each half.
    #[arg(long, conflicts_with = "baseline")]
    hanging_endpoint: bool,
    /// Take the on_change API down for N seconds in the middle of the load,
    /// then bring it back: Spiegel's memory is reported before, during and
    /// after, and every write must still be delivered.
    #[arg(long, conflicts_with_all = ["baseline", "hanging_endpoint"])]
    outage_seconds: Option<u64>,
    /// What the API does while down (`--outage-seconds`).
    #[arg(long, value_enum, default_value = "refuse")]
    outage_kind: OutageKind,
    /// Milliseconds the API takes to answer each request.
    #[arg(long, default_value_t = 0)]
    api_latency_ms: u64,
    /// The on_change rule sends batches of up to N changes (its
    /// `batch.max_changes`) instead of one request per change.
    #[arg(long, conflicts_with = "baseline")]
    batch: Option<usize>,
    /// Serve the scenario with CouchDB's own replicator instead of Spiegel.
    #[arg(long, value_enum)]
    baseline: Option<Baseline>,
    /// Run one role of Spiegel only, to measure what it costs the server
    /// (`--only change-listener` gives the share of the server's CPU that
    /// the writes and the change-listener's reads take).
    #[arg(long, value_enum, conflicts_with = "baseline")]
    only: Option<Only>,
    /// Print JSON instead of a markdown table.
    #[arg(long)]
    json: bool,
    /// The spiegel binary. Default: `spiegel` next to this binary.
    #[arg(long)]
    spiegel_bin: Option<PathBuf>,
    /// `--concurrency` passed to Spiegel.
    #[arg(long, default_value_t = 20)]
    concurrency: usize,
    /// Seconds to wait, after the last write, for everything to arrive.
    #[arg(long, default_value_t = 60)]
    drain: u64,
    /// Seconds of idle measurement (CPU) between readiness and the load.
    #[arg(long, default_value_t = 5)]
    idle_seconds: u64,
    /// Seconds to wait for Spiegel (or the replications) to be ready.
    #[arg(long, default_value_t = 900)]
    ready_timeout: u64,
    /// Requests in flight while setting up (database creation).
    #[arg(long, default_value_t = 32)]
    setup_concurrency: usize,
    /// Prefix of every database and document the benchmark creates.
    #[arg(long, default_value = "spiegel_bench")]
    prefix: String,
    /// Leave the databases on an external server (--url) at the end.
    #[arg(long)]
    keep: bool,
    /// The process id of an external CouchDB (--url) on this machine:
    /// its CPU seconds, RSS and connections are measured like Spiegel's.
    #[arg(long)]
    server_pid: Option<u32>,
    /// `--replication-engine` passed to Spiegel: `couchdb` or `native`.
    #[arg(long, default_value = "couchdb")]
    replication_engine: String,
    /// Spiegel's log level (its logs are kept in the run's log folder).
    #[arg(long, default_value = "warn")]
    spiegel_log_level: String,
    /// The test CouchDB launcher (when --url is not given).
    #[arg(long)]
    server_js: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match run(&args).await {
        Ok((report, complete)) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else {
                print!("{}", markdown(&report));
            }
            if complete {
                std::process::ExitCode::SUCCESS
            } else {
                eprintln!("spiegel-bench: some writes were not replicated or delivered");
                std::process::ExitCode::from(3)
            }
        }
        Err(e) => {
            eprintln!("spiegel-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Waits until CouchDB's replication scheduler has taken up each of the
/// `dbs` `_replicator` documents of the baseline (`prefix`), and returns
/// the ids of those it left pending, with the count of each state. On a
/// server without the scheduler, nothing is pending.
async fn scheduled(
    couch: &Couch,
    prefix: &str,
    dbs: usize,
    deadline: Instant,
) -> Result<(std::collections::HashSet<String>, Value)> {
    progress("waiting for the replication scheduler to take up every document");
    loop {
        let Some(states) = couch.replicator_states(prefix).await? else {
            return Ok(Default::default());
        };
        let settled = states.len() == dbs && states.values().all(|s| s != "initializing");
        if settled {
            let mut counts: HashMap<&str, u64> = HashMap::new();
            for state in states.values() {
                *counts.entry(state.as_str()).or_default() += 1;
            }
            let pending = states
                .iter()
                .filter(|(_, s)| *s == "pending")
                .map(|(id, _)| id.clone())
                .collect();
            return Ok((pending, json!(counts)));
        }
        if Instant::now() >= deadline {
            bail!("the replication scheduler did not take up every document in time");
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

fn progress(msg: &str) {
    eprintln!("[spiegel-bench] {msg}");
}

async fn run(args: &Args) -> Result<(Value, bool)> {
    if args.dbs == 0 || args.active == 0 || args.active > args.dbs || args.seconds == 0 {
        bail!("need 0 < --active <= --dbs and --seconds > 0");
    }
    if args.outage_seconds.is_some_and(|n| n > args.seconds) {
        bail!("--outage-seconds: at most --seconds");
    }
    if !args.prefix.starts_with(|c: char| c.is_ascii_lowercase())
        || !args
            .prefix
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        bail!("--prefix: lowercase letters, digits and _ only, starting with a letter");
    }
    let baseline = args.baseline.is_some();
    let wants_replication = !matches!(args.only, Some(Only::ChangeListener | Only::Writes));
    let wants_delivery = !baseline && args.only.is_none_or(|o| o == Only::ChangeListener);
    let logs = std::env::temp_dir().join(format!("spiegel-bench-{}", std::process::id()));
    std::fs::create_dir_all(&logs)?;
    let run_start = Instant::now();

    let mut server = match &args.url {
        Some(_) => None,
        None => {
            progress("starting the test CouchDB (PouchDB Server, in memory)");
            Some(start_test_server(args, &logs).await?)
        }
    };
    let url = match (&args.url, &server) {
        (Some(u), _) => u.clone(),
        (None, Some(s)) => s.url.clone(),
        _ => unreachable!(),
    };
    let couch = Couch::new(&url)?;
    let server_pid = server.as_ref().map(|s| s.pid).or(args.server_pid);
    let root = couch.get("").await.context("GET / on the server")?;
    let server_kind = match &server {
        Some(_) => "test CouchDB (PouchDB Server 4.2.0 + CouchDB 3 shims), in memory, started by the benchmark".to_string(),
        None => format!(
            "{} {} at --url",
            root["vendor"]["name"].as_str().unwrap_or("CouchDB"),
            root["version"].as_str().unwrap_or("?")
        ),
    };

    let p = &args.prefix;
    let names: Vec<String> = (0..args.dbs).map(|i| format!("{p}_u_{i:06}")).collect();
    let phases: u64 = if args.hanging_endpoint { 2 } else { 1 };
    let broken: Vec<String> = match args.hanging_endpoint {
        true => (0..args.active).map(|j| hanging::db(p, j)).collect(),
        false => Vec::new(),
    };
    let aggregate = format!("{p}_all");
    let spiegel_db = format!("{p}_spiegel");

    // --- setup
    let setup_start = Instant::now();
    progress(&format!("creating {} databases", args.dbs));
    couch.create_db(&aggregate).await?;
    let results: Vec<Result<()>> = futures::stream::iter(names.iter().chain(&broken))
        .map(|n| couch.create_db(n))
        .buffer_unordered(args.setup_concurrency.max(1))
        .collect()
        .await;
    for r in results {
        r?;
    }
    let create_s = secs(setup_start);

    let state: Shared = Arc::new(Mutex::new(State {
        t0: Instant::now(),
        writes: HashMap::new(),
        write_errors: 0,
        first_write_error: None,
        replicated: HashMap::new(),
        delivered: HashMap::new(),
        requests: 0,
    }));
    let feed = tokio::spawn(follow_aggregate(
        couch.clone(),
        aggregate.clone(),
        state.clone(),
    ));

    let mut workers = Workers::default();
    let mut hanging_accepted = Arc::default();
    let outage = Outage::new(args.outage_kind);
    let config_start = Instant::now();
    if baseline {
        progress(&format!(
            "writing {} continuous _replicator documents",
            args.dbs
        ));
        couch.create_db("_replicator").await?;
        let target = format!("{}/{}", couch.auth_url, enc(&aggregate));
        for chunk in names.chunks(500) {
            let docs: Vec<Value> = chunk
                .iter()
                .map(|n| {
                    json!({"_id": format!("{n}_to_all"), "source": format!("{}/{}", couch.auth_url, enc(n)),
                           "target": target, "continuous": true})
                })
                .collect();
            let ok = couch.bulk("_replicator", &docs).await?;
            if ok.len() != docs.len() {
                bail!("_replicator refused {} documents", docs.len() - ok.len());
            }
        }
    } else {
        progress("spiegel install, replicator and on_change documents");
        let bin = spiegel_bin(args)?;
        let status = spiegel_cmd(
            &bin,
            &[
                "install",
                "--url",
                &couch.auth_url,
                "--db-name",
                &spiegel_db,
                "--log-level",
                "warn",
            ],
            None,
        )
        .status()
        .await
        .with_context(|| format!("run {} install", bin.display()))?;
        if !status.success() {
            bail!("spiegel install failed: {status}");
        }
        let latency = Duration::from_millis(args.api_latency_ms);
        let receiver_port = start_receiver(state.clone(), latency, outage.gate()).await?;
        couch
            .put_doc(
                &spiegel_db,
                &json!({
                    "_id": "bench_fan_in", "type": "replicator", "db_name": format!("^{p}_u_"),
                    "source": format!("{}/${{db_name}}", couch.auth_url),
                    "target": format!("{}/{}", couch.auth_url, enc(&aggregate)),
                }),
            )
            .await?;
        couch
            .put_doc(
                &spiegel_db,
                &json!({
                    "_id": "bench_hook", "type": "on_change", "db_name": format!("^{p}_u_"),
                    "url": format!("http://127.0.0.1:{receiver_port}/hook"), "method": "POST",
                    "params": {"db": "$db_name", "id": "$change.id", "doc": "$change"},
                    "batch": args.batch.map(|n| json!({"max_changes": n})),
                }),
            )
            .await?;
        if args.hanging_endpoint {
            let (port, accepted) = hanging::start().await?;
            couch.put_doc(&spiegel_db, &hanging::rule(p, port)).await?;
            hanging_accepted = accepted;
        }
        progress("starting Spiegel");
        workers = start_spiegel(args, &couch, &spiegel_db, &logs).await?;
    }

    let deadline = Instant::now() + Duration::from_secs(args.ready_timeout);
    // The baseline's jobs the scheduler leaves pending (beyond its
    // `max_jobs`): their databases are not probed, and their writes count
    // as never replicated.
    let (pending, job_states) = if baseline {
        scheduled(&couch, p, args.dbs, deadline).await?
    } else {
        Default::default()
    };

    // --- readiness: probe documents in a few databases must come through
    let probed: Vec<&String> = names
        .iter()
        .filter(|n| !pending.contains(&format!("{n}_to_all")))
        .collect();
    let probe_dbs: Vec<&String> = (0..4.min(probed.len()))
        .map(|k| probed[k * probed.len() / 4.min(probed.len())])
        .collect();
    progress(
        "waiting until probe writes come through and the first pass over every database has ended",
    );
    let ready_start = Instant::now();
    let mut probe_ids = Vec::new();
    let mut ready = false;
    'probe: for round in 0..5000u32 {
        for db in &probe_dbs {
            let id = format!("probe_{round}_{db}");
            let t = now_ms(&state);
            couch
                .put_doc(db, &json!({"_id": id, "t_ms": t, "probe": true}))
                .await?;
            probe_ids.push(id);
        }
        let through = |st: &State, id: &String| {
            (!wants_replication || st.replicated.contains_key(id))
                && (!wants_delivery || st.delivered.contains_key(id))
        };
        let limit = Duration::from_secs(2).min(deadline.saturating_duration_since(Instant::now()));
        // Ready when any round so far came through whole: on a slow server
        // a round may take longer than the 2 s between rounds.
        if wait_until(limit, || {
            let st = state.lock().unwrap();
            probe_ids
                .chunks(probe_dbs.len())
                .any(|round| round.iter().all(|id| through(&st, id)))
        })
        .await
        {
            ready = true;
            break 'probe;
        }
        if Instant::now() >= deadline {
            break;
        }
        for w in workers.children.iter_mut() {
            if let Ok(Some(status)) = w.try_wait() {
                bail!(
                    "a spiegel process exited early ({status}); logs in {}",
                    logs.display()
                );
            }
        }
    }
    if !ready {
        bail!(
            "not ready after {} s (logs in {})",
            args.ready_timeout,
            logs.display()
        );
    }
    if !baseline {
        // Partitions still moving between processes would replay changes
        // during the load.
        let per_role = args.workers.unwrap_or(1).max(1);
        let balanced = wait_until_async(deadline.saturating_duration_since(Instant::now()), || {
            measure::balanced(&workers.metrics_urls, PARTITIONS, per_role)
        })
        .await;
        if !balanced {
            bail!(
                "the partitions were not spread over the processes in time (logs in {})",
                logs.display()
            );
        }
        // Live changes (the probes) go before the first pass over every
        // database: the load starts once that pass is over.
        let left = deadline.saturating_duration_since(Instant::now());
        if !wait_until_async(left, || measure::caught_up(&workers.metrics_urls)).await {
            bail!(
                "the first pass over the databases did not end in time (logs in {})",
                logs.display()
            );
        }
    }
    let ready_s = secs(ready_start);
    let config_to_ready_s = secs(config_start);

    // --- idle window
    let spiegel_pids = workers.pids.clone();
    let spiegel_cpu_before_idle = cpu(&spiegel_pids);
    let server_cpu_before_idle = server_pid.map(|p| cpu(&[p]));
    tokio::time::sleep(Duration::from_secs(args.idle_seconds)).await;
    let spiegel_cpu_idle = cpu(&spiegel_pids) - spiegel_cpu_before_idle;
    let server_cpu_idle = server_pid.map(|p| cpu(&[p]) - server_cpu_before_idle.unwrap_or(0.0));

    // --- load
    let writes_before = if baseline {
        0
    } else {
        couch.writes_in(&spiegel_db).await?
    };
    let metrics_before = scrape(&workers.metrics_urls).await;
    let spiegel_cpu_before = cpu(&spiegel_pids);
    let server_cpu_before = server_pid.map(|p| cpu(&[p]));
    let samples = Arc::new(Mutex::new(Samples::default()));
    let sampler = {
        let samples = samples.clone();
        let pids = spiegel_pids.clone();
        let port = couch.port;
        tokio::spawn(async move {
            loop {
                let (pids, s) = (pids.clone(), samples.clone());
                let _ = tokio::task::spawn_blocking(move || {
                    let mut cur = *s.lock().unwrap();
                    sample(&pids, server_pid, port, &mut cur);
                    *s.lock().unwrap() = cur;
                })
                .await;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    let per_write = args.burst.unwrap_or(1).max(1);
    progress(&format!(
        "load: {} databases x {} s x {} document(s){}",
        args.active,
        args.seconds,
        per_write,
        match args.hanging_endpoint {
            true => ", then again with as many databases whose API hangs",
            false => "",
        }
    ));
    let load_start = tokio::time::Instant::now();
    let outage_task = args.outage_seconds.map(|n| {
        let after = Duration::from_secs((args.seconds - n) / 2);
        let length = Duration::from_secs(n);
        let pids = spiegel_pids.clone();
        outage.clone().spawn(state.clone(), pids, after, length)
    });
    let mut writers = Vec::new();
    for j in 0..args.active {
        let db = names[j * args.dbs / args.active].clone();
        let couch = couch.clone();
        let state = state.clone();
        let offset = if args.burst.is_some() {
            Duration::ZERO
        } else {
            Duration::from_millis((j as u64 * 1000) / args.active as u64)
        };
        let seconds = args.seconds;
        let broken = args.hanging_endpoint.then(|| hanging::db(p, j));
        writers.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(load_start + offset, Duration::from_secs(1));
            for s in 0..seconds * phases {
                tick.tick().await;
                if let Some(broken) = broken.as_ref().filter(|_| s >= seconds) {
                    // Never delivered (its API hangs): not counted.
                    let doc = json!({"_id": format!("h{j:05}_{s:05}"), "n": s});
                    let _ = couch.bulk(broken, &[doc]).await;
                }
                let t = now_ms(&state);
                let docs: Vec<Value> = (0..per_write)
                    .map(|k| json!({"_id": format!("w{j:05}_{s:05}_{k}"), "t_ms": t, "db": db, "n": s}))
                    .collect();
                let result = couch.bulk(&db, &docs).await;
                let mut st = state.lock().unwrap();
                match result {
                    Ok(ids) => {
                        st.write_errors += (docs.len() - ids.len()) as u64;
                        for id in ids {
                            st.writes.insert(id, t);
                        }
                    }
                    Err(e) => {
                        st.write_errors += docs.len() as u64;
                        if st.first_write_error.is_none() {
                            st.first_write_error = Some(format!("{e:#}"));
                        }
                    }
                }
            }
        }));
    }
    for w in writers {
        let _ = w.await;
    }
    let load_s = round3(load_start.elapsed().as_secs_f64());

    // --- drain
    progress("draining");
    let drain_start = Instant::now();
    let all_through = || {
        let st = state.lock().unwrap();
        st.writes.keys().all(|id| {
            (!wants_replication || st.replicated.contains_key(id))
                && (!wants_delivery || st.delivered.contains_key(id))
        })
    };
    let drained = wait_until(Duration::from_secs(args.drain), all_through).await;
    let drain_s = secs(drain_start);
    // A moment for late duplicates to show.
    if drained && !baseline {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    sampler.abort();
    if let Some(task) = outage_task {
        task.abort();
    }
    let metrics_after = scrape(&workers.metrics_urls).await;
    let spiegel_cpu_load = cpu(&spiegel_pids) - spiegel_cpu_before;
    let server_cpu_load = server_pid.map(|p| cpu(&[p]) - server_cpu_before.unwrap_or(0.0));
    let spiegel_peak_kb: u64 = spiegel_pids
        .iter()
        .filter_map(|p| procfs::peak_rss_kb(*p))
        .sum();
    let spiegel_cpu_total = cpu(&spiegel_pids);
    let server_peak_kb = server_pid.and_then(procfs::peak_rss_kb);
    let writes_after = if baseline {
        0
    } else {
        couch.writes_in(&spiegel_db).await?
    };
    let samples = *samples.lock().unwrap();

    // --- stop
    feed.abort();
    for w in workers.children.iter_mut() {
        stop(w, Duration::from_secs(15)).await;
    }

    // --- figures
    let Figures {
        written,
        repl_lat,
        missing_replicated,
        del_lat,
        missing_delivered,
        duplicates,
        unexpected,
        write_errors,
        first_write_error,
    } = state.lock().unwrap().figures();
    let complete = written > 0
        && write_errors == 0
        && (!wants_replication || missing_replicated == 0)
        && (!wants_delivery || (missing_delivered == 0 && duplicates == 0 && unexpected == 0));

    let spiegel_writes = writes_after.saturating_sub(writes_before);
    let mb = |kb: u64| round3(kb as f64 / 1024.0);
    let report = json!({
        "mode": if baseline { "couchdb-replicator" } else { "spiegel" },
        "params": {
            "dbs": args.dbs, "active": args.active, "seconds": args.seconds,
            "burst": args.burst, "docs_per_write": per_write, "batch": args.batch,
            "api_latency_ms": args.api_latency_ms,
            "spiegel_processes": if baseline { 0 } else { spiegel_pids.len() },
            "workers_per_role": args.workers,
            "only": args.only.map(|o| format!("{o:?}")),
            "concurrency": if baseline { Value::Null } else { json!(args.concurrency) },
            "replication_engine": if baseline { Value::Null } else { json!(args.replication_engine) },
            "server": server_kind,
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        },
        "timing": {
            "create_dbs_s": create_s,
            "ready_s": ready_s,
            "config_to_ready_s": config_to_ready_s,
            "load_s": load_s,
            "drain_s": drain_s,
            "total_s": secs(run_start),
        },
        "hanging_endpoint": if args.hanging_endpoint {
            hanging::by_phase(&state.lock().unwrap(), args.seconds, &hanging_accepted)
        } else {
            Value::Null
        },
        "outage": match args.outage_seconds {
            Some(n) => outage.report(&state, n),
            None => Value::Null,
        },
        "writes": written,
        "write_errors": write_errors,
        "first_write_error": first_write_error,
        "replication": if !wants_replication { Value::Null } else { json!({
            "latency": percentiles(repl_lat),
            "missing": missing_replicated,
        })},
        "delivery": if !wants_delivery { Value::Null } else { json!({
            "latency": percentiles(del_lat),
            "missing": missing_delivered,
            "duplicates": duplicates,
            "unexpected": unexpected,
            "throughput": state.lock().unwrap().throughput(),
        })},
        "spiegel": if baseline { Value::Null } else { json!({
            "processes": spiegel_pids.len(),
            "peak_rss_mb": mb(spiegel_peak_kb),
            "max_sampled_rss_mb": mb(samples.max_rss_kb),
            "cpu_s_load": round3(spiegel_cpu_load),
            "cpu_s_idle": round3(spiegel_cpu_idle),
            "idle_seconds": args.idle_seconds,
            "cpu_s_total": round3(spiegel_cpu_total),
            "max_connections_to_couchdb": samples.max_spiegel_conns,
            "max_connections_to_couchdb_per_process": samples.max_spiegel_conns_per_process,
            "spiegel_db_writes": spiegel_writes,
            "spiegel_db_writes_per_update": if written > 0 { round3(spiegel_writes as f64 / written as f64) } else { 0.0 },
            "time_spent": breakdown(&metrics_before, &metrics_after),
        })},
        "server": match server_pid { None => Value::Null, Some(pid) => json!({
            "pid": pid,
            "cpu_s_load": server_cpu_load.map(round3),
            "cpu_s_idle": server_cpu_idle.map(round3),
            "peak_rss_mb": server_peak_kb.map(mb),
            "max_established_connections": samples.max_server_conns,
            "max_connections_to_itself": samples.max_server_self_conns,
        })},
        "baseline_jobs": job_states,
        "complete": complete,
        "logs": logs.display().to_string(),
    });

    // --- cleanup
    if args.url.is_some() && !args.keep {
        progress("deleting the benchmark's databases");
        if baseline {
            if let Ok(v) = couch.get("_replicator/_all_docs").await {
                let dels: Vec<Value> = v["rows"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|r| {
                        r["id"]
                            .as_str()
                            .is_some_and(|id| id.starts_with(p.as_str()))
                    })
                    .map(|r| json!({"_id": r["id"], "_rev": r["value"]["rev"], "_deleted": true}))
                    .collect();
                for chunk in dels.chunks(500) {
                    let _ = couch.bulk("_replicator", chunk).await;
                }
            }
        } else {
            couch.delete_db(&spiegel_db).await;
        }
        couch.delete_db(&aggregate).await;
        futures::stream::iter(names.iter().chain(&broken))
            .map(|n| couch.delete_db(n))
            .buffer_unordered(args.setup_concurrency.max(1))
            .collect::<Vec<()>>()
            .await;
    }
    if let Some(s) = server.as_mut() {
        let _ = s.child.kill().await;
    }
    if complete {
        let _ = std::fs::remove_dir_all(&logs);
    }
    Ok((report, complete))
}
