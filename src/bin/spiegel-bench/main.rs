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

mod procfs;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, ValueEnum};
use futures::StreamExt;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const BENCH_ADMIN: (&str, &str) = ("bench", "bench-secret");

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Baseline {
    /// One continuous `_replicator` document per database, no Spiegel.
    CouchdbReplicator,
}

/// The many-databases benchmark: Spiegel (or CouchDB's own `_replicator`)
/// against K databases of which A are written once a second.
#[derive(Parser, Debug, Clone)]
#[command(name = "spiegel-bench", version)]
struct Args {
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
    /// Serve the scenario with CouchDB's own replicator instead of Spiegel.
    #[arg(long, value_enum)]
    baseline: Option<Baseline>,
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
    /// The test CouchDB launcher (when --url is not given).
    #[arg(long)]
    server_js: Option<PathBuf>,
}

// ---------------------------------------------------------------------------
// CouchDB access

#[derive(Clone)]
struct Couch {
    http: reqwest::Client,
    /// Without credentials, no trailing slash.
    base: String,
    /// With credentials: what Spiegel and the documents get.
    auth_url: String,
    auth: Option<(String, String)>,
    port: u16,
}

fn enc(name: &str) -> String {
    utf8_percent_encode(name, NON_ALPHANUMERIC).to_string()
}

impl Couch {
    fn new(url: &str) -> Result<Couch> {
        let parsed = url::Url::parse(url).context("--url")?;
        let auth = (!parsed.username().is_empty()).then(|| {
            let dec = |s: &str| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8_lossy()
                    .to_string()
            };
            (dec(parsed.username()), dec(parsed.password().unwrap_or("")))
        });
        let port = parsed
            .port_or_known_default()
            .ok_or_else(|| anyhow!("--url has no port"))?;
        let mut bare = parsed.clone();
        let _ = bare.set_username("");
        let _ = bare.set_password(None);
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .pool_idle_timeout(Duration::from_secs(30))
            .build()?;
        Ok(Couch {
            http,
            base: bare.as_str().trim_end_matches('/').to_string(),
            auth_url: parsed.as_str().trim_end_matches('/').to_string(),
            auth,
            port,
        })
    }

    fn req(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let rb = self.http.request(method, format!("{}/{}", self.base, path));
        match &self.auth {
            Some((u, p)) => rb.basic_auth(u, Some(p)),
            None => rb,
        }
    }

    async fn send(&self, rb: reqwest::RequestBuilder) -> Result<(StatusCode, Value)> {
        let resp = rb.send().await?;
        let status = resp.status();
        let body = resp.bytes().await?;
        let value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        Ok((status, value))
    }

    async fn get(&self, path: &str) -> Result<Value> {
        let (status, v) = self.send(self.req(Method::GET, path)).await?;
        if !status.is_success() {
            bail!("GET {path}: {status} {v}");
        }
        Ok(v)
    }

    /// Creates a database; an existing one is fine.
    async fn create_db(&self, name: &str) -> Result<()> {
        for attempt in 0..5 {
            match self.send(self.req(Method::PUT, &enc(name))).await {
                Ok((s, _)) if s.is_success() || s == StatusCode::PRECONDITION_FAILED => {
                    return Ok(())
                }
                Ok((s, v)) if attempt == 4 => bail!("PUT /{name}: {s} {v}"),
                Err(e) if attempt == 4 => return Err(e),
                _ => tokio::time::sleep(Duration::from_millis(200 << attempt)).await,
            }
        }
        unreachable!()
    }

    async fn delete_db(&self, name: &str) {
        let _ = self.send(self.req(Method::DELETE, &enc(name))).await;
    }

    async fn put_doc(&self, db: &str, doc: &Value) -> Result<()> {
        let id = doc["_id"].as_str().unwrap_or_default();
        let (s, v) = self
            .send(
                self.req(Method::PUT, &format!("{}/{}", enc(db), enc(id)))
                    .json(doc),
            )
            .await?;
        if !s.is_success() {
            bail!("PUT /{db}/{id}: {s} {v}");
        }
        Ok(())
    }

    /// _bulk_docs; returns the ids that were written.
    async fn bulk(&self, db: &str, docs: &[Value]) -> Result<Vec<String>> {
        let (s, v) = self
            .send(
                self.req(Method::POST, &format!("{}/_bulk_docs", enc(db)))
                    .json(&json!({ "docs": docs })),
            )
            .await?;
        if !s.is_success() {
            bail!("POST /{db}/_bulk_docs: {s} {v}");
        }
        Ok(v.as_array()
            .map(|rows| {
                rows.iter()
                    .filter(|r| r.get("error").is_none())
                    .filter_map(|r| r["id"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Writes made to a database so far: the sum of the revision
    /// generations of its documents, deleted ones included (a deletion is a
    /// write; its tombstone's generation counts it). Portable: it does not
    /// parse `update_seq`.
    async fn writes_in(&self, db: &str) -> Result<u64> {
        let v = self.get(&format!("{}/_changes", enc(db))).await?;
        let mut sum = 0;
        for row in v["results"].as_array().into_iter().flatten() {
            let rev = row["changes"][0]["rev"].as_str().unwrap_or("0-");
            sum += rev
                .split('-')
                .next()
                .and_then(|g| g.parse::<u64>().ok())
                .unwrap_or(0);
        }
        Ok(sum)
    }
}

// ---------------------------------------------------------------------------
// What was written, replicated and delivered

struct State {
    t0: Instant,
    /// Document id -> write time (ms since t0, taken before the request).
    writes: HashMap<String, f64>,
    write_errors: u64,
    first_write_error: Option<String>,
    /// Document id -> first time seen in the aggregate's _changes.
    replicated: HashMap<String, f64>,
    /// Document id -> (deliveries, first delivery time).
    delivered: HashMap<String, (u32, f64)>,
}

type Shared = Arc<Mutex<State>>;

fn now_ms(state: &Shared) -> f64 {
    let t0 = state.lock().unwrap().t0;
    t0.elapsed().as_secs_f64() * 1000.0
}

/// Follows the aggregate's continuous `_changes` from now on, recording
/// when each document first shows. Runs until aborted.
async fn follow_aggregate(couch: Couch, db: String, state: Shared) {
    let feed_client = reqwest::Client::builder().build().expect("http client");
    let since = match couch.get(&enc(&db)).await {
        Ok(info) => seq_text(&info["update_seq"]),
        Err(_) => "now".to_string(),
    };
    let mut since = since;
    loop {
        let url = format!(
            "{}/{}/_changes?feed=continuous&heartbeat=5000&since={}",
            couch.base,
            enc(&db),
            enc(&since)
        );
        let mut rb = feed_client.get(url);
        if let Some((u, p)) = &couch.auth {
            rb = rb.basic_auth(u, Some(p));
        }
        if let Ok(resp) = rb.send().await {
            let mut stream = resp.bytes_stream();
            let mut buf: Vec<u8> = Vec::new();
            while let Some(Ok(chunk)) = stream.next().await {
                buf.extend_from_slice(&chunk);
                while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=nl).collect();
                    let Ok(v) = serde_json::from_slice::<Value>(&line) else {
                        continue;
                    };
                    if let Some(id) = v["id"].as_str() {
                        let t = now_ms(&state);
                        state
                            .lock()
                            .unwrap()
                            .replicated
                            .entry(id.to_string())
                            .or_insert(t);
                    }
                    if !v["seq"].is_null() {
                        since = seq_text(&v["seq"]);
                    }
                    if !v["last_seq"].is_null() {
                        since = seq_text(&v["last_seq"]);
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn seq_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "now".to_string(),
        other => other.to_string(),
    }
}

/// The receiver of the on_change rule's POSTs.
async fn start_receiver(state: Shared) -> Result<u16> {
    use axum::{extract, routing::post, Router};
    async fn hook(
        extract::State(state): extract::State<Shared>,
        body: axum::Json<Value>,
    ) -> StatusCode {
        if let Some(id) = body.0["id"].as_str() {
            let t = now_ms(&state);
            let mut st = state.lock().unwrap();
            let e = st.delivered.entry(id.to_string()).or_insert((0, t));
            e.0 += 1;
        }
        StatusCode::OK
    }
    let app = Router::new().route("/hook", post(hook)).with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(port)
}

// ---------------------------------------------------------------------------
// Processes

struct TestServer {
    child: Child,
    pid: u32,
    url: String,
}

async fn start_test_server(args: &Args, logs: &std::path::Path) -> Result<TestServer> {
    let js = args.server_js.clone().unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testing/couchdb/server.js")
    });
    if !js.with_file_name("node_modules").exists() {
        bail!(
            "the test CouchDB is not installed: run `npm ci --prefix testing/couchdb` (or pass --url)"
        );
    }
    let log = std::fs::File::create(logs.join("test-couchdb.log"))?;
    let mut child = Command::new("node")
        .arg(&js)
        .args(["--port", "0", "--admin"])
        .arg(format!("{}:{}", BENCH_ADMIN.0, BENCH_ADMIN.1))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .context("start node testing/couchdb/server.js")?;
    let pid = child.id().ok_or_else(|| anyhow!("test server exited"))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(30),
        BufReader::new(stdout).read_line(&mut line),
    )
    .await
    .context("the test CouchDB did not start within 30 s")??;
    let ready: Value = serde_json::from_str(&line)
        .with_context(|| format!("unexpected first line from the test server: {line:?}"))?;
    let url = ready["url"].as_str().ok_or_else(|| anyhow!("no url"))?;
    let url = url.replacen(
        "http://",
        &format!("http://{}:{}@", BENCH_ADMIN.0, BENCH_ADMIN.1),
        1,
    );
    Ok(TestServer { child, pid, url })
}

struct Workers {
    children: Vec<Child>,
    pids: Vec<u32>,
    /// Each process's `/metrics` (its admin server, on a loopback port).
    metrics_urls: Vec<String>,
}

fn spiegel_bin(args: &Args) -> Result<PathBuf> {
    if let Some(p) = &args.spiegel_bin {
        return Ok(p.clone());
    }
    let me = std::env::current_exe()?;
    let p = me.with_file_name("spiegel");
    if !p.exists() {
        bail!(
            "no spiegel binary next to {}: build it or pass --spiegel-bin",
            me.display()
        );
    }
    Ok(p)
}

fn spiegel_cmd(bin: &PathBuf, args: &[&str], log: Option<std::fs::File>) -> Command {
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .env_remove("TYPE")
        .env_remove("URL")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(match log {
            Some(f) => Stdio::from(f),
            None => Stdio::null(),
        })
        .kill_on_drop(true);
    cmd
}

async fn start_spiegel(
    args: &Args,
    couch: &Couch,
    spiegel_db: &str,
    logs: &std::path::Path,
) -> Result<Workers> {
    let bin = spiegel_bin(args)?;
    let concurrency = args.concurrency.to_string();
    let common = [
        "--url",
        couch.auth_url.as_str(),
        "--db-name",
        spiegel_db,
        "--since",
        "now",
        "--concurrency",
        concurrency.as_str(),
        "--log-level",
        "warn",
        "--log-format",
        "json",
    ];
    let roles: Vec<&str> = match args.workers {
        None => vec!["run"],
        Some(w) => {
            let mut r = Vec::new();
            for _ in 0..w.max(1) {
                r.push("replicator");
                r.push("change-listener");
            }
            r
        }
    };
    let mut workers = Workers {
        children: Vec::new(),
        pids: Vec::new(),
        metrics_urls: Vec::new(),
    };
    for (n, role) in roles.iter().enumerate() {
        let log = std::fs::File::create(logs.join(format!("spiegel-{n}-{role}.log")))?;
        // A free loopback port per process: the default admin address
        // (0.0.0.0:9090) would be shared by the processes.
        let admin = format!(
            "127.0.0.1:{}",
            std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port()
        );
        let mut argv = vec![*role, "--admin-addr", admin.as_str()];
        argv.extend_from_slice(&common);
        let child = spiegel_cmd(&bin, &argv, Some(log))
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        workers.pids.push(child.id().unwrap_or(0));
        workers.children.push(child);
        workers.metrics_urls.push(format!("http://{admin}/metrics"));
    }
    Ok(workers)
}

/// SIGTERM, then SIGKILL after `grace`.
async fn stop(child: &mut Child, grace: Duration) {
    if let Some(pid) = child.id() {
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
        if tokio::time::timeout(grace, child.wait()).await.is_ok() {
            return;
        }
    }
    let _ = child.kill().await;
}

// ---------------------------------------------------------------------------
// Measurement helpers

#[derive(Default, Clone, Copy)]
struct Samples {
    max_rss_kb: u64,
    max_spiegel_conns: usize,
    /// The most any one Spiegel process held at a time.
    max_spiegel_conns_per_process: usize,
    max_server_conns: usize,
    max_server_self_conns: usize,
}

fn sample(spiegel: &[u32], server: Option<u32>, port: u16, s: &mut Samples) {
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

fn cpu(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|p| procfs::cpu_seconds(*p)).sum()
}

fn percentiles(mut v: Vec<f64>) -> Value {
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
async fn scrape(urls: &[String]) -> HashMap<String, f64> {
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
fn breakdown(before: &HashMap<String, f64>, after: &HashMap<String, f64>) -> Value {
    let d =
        |k: String| after.get(&k).copied().unwrap_or(0.0) - before.get(&k).copied().unwrap_or(0.0);
    let mean = |name: &str, labels: &str| {
        let count = d(format!("spiegel_{name}_count{{{labels}}}"));
        (count > 0.0).then(|| round3(d(format!("spiegel_{name}_sum{{{labels}}}")) / count))
    };
    let role = |r: &str| {
        let l = format!("role=\"{r}\"");
        json!({
            "runs": d(format!("spiegel_runs_started_total{{{l}}}")),
            "mean_update_to_run_s": mean("update_to_run_seconds", &l),
            "mean_run_s": mean("run_duration_seconds", &l),
        })
    };
    let op = |o: &str| {
        let l = format!("op=\"{o}\"");
        json!({
            "requests": d(format!("spiegel_couchdb_requests_total{{{l}}}")),
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

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn secs(since: Instant) -> f64 {
    round3(since.elapsed().as_secs_f64())
}

/// Polls `check` every 200 ms until it is true or `limit` passes.
async fn wait_until(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
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

// ---------------------------------------------------------------------------
// The run

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

fn progress(msg: &str) {
    eprintln!("[spiegel-bench] {msg}");
}

async fn run(args: &Args) -> Result<(Value, bool)> {
    if args.dbs == 0 || args.active == 0 || args.active > args.dbs || args.seconds == 0 {
        bail!("need 0 < --active <= --dbs and --seconds > 0");
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
    let server_pid = server.as_ref().map(|s| s.pid);
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
    let aggregate = format!("{p}_all");
    let spiegel_db = format!("{p}_spiegel");

    // --- setup
    let setup_start = Instant::now();
    progress(&format!("creating {} databases", args.dbs));
    couch.create_db(&aggregate).await?;
    let results: Vec<Result<()>> = futures::stream::iter(names.iter())
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
    }));
    let feed = tokio::spawn(follow_aggregate(
        couch.clone(),
        aggregate.clone(),
        state.clone(),
    ));

    let mut workers = Workers {
        children: Vec::new(),
        pids: Vec::new(),
        metrics_urls: Vec::new(),
    };
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
        let receiver_port = start_receiver(state.clone()).await?;
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
                }),
            )
            .await?;
        progress("starting Spiegel");
        workers = start_spiegel(args, &couch, &spiegel_db, &logs).await?;
    }

    // --- readiness: probe documents in a few databases must come through
    let probe_dbs: Vec<&String> = (0..4.min(args.dbs))
        .map(|k| &names[k * args.dbs / 4.min(args.dbs)])
        .collect();
    progress("waiting until probe writes come through (initial pass over every database included)");
    let ready_start = Instant::now();
    let mut probe_ids = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(args.ready_timeout);
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
            st.replicated.contains_key(id) && (baseline || st.delivered.contains_key(id))
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
        "load: {} databases x {} s x {} document(s)",
        args.active, args.seconds, per_write
    ));
    let load_start = tokio::time::Instant::now();
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
        writers.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(load_start + offset, Duration::from_secs(1));
            for s in 0..seconds {
                tick.tick().await;
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
        st.writes
            .keys()
            .all(|id| st.replicated.contains_key(id) && (baseline || st.delivered.contains_key(id)))
    };
    let drained = wait_until(Duration::from_secs(args.drain), all_through).await;
    let drain_s = secs(drain_start);
    // A moment for late duplicates to show.
    if drained && !baseline {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    sampler.abort();
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
    let (
        written,
        repl_lat,
        missing_replicated,
        del_lat,
        missing_delivered,
        duplicates,
        unexpected,
        write_errors,
        first_write_error,
    ) = {
        let st = state.lock().unwrap();
        let written = st.writes.len();
        let repl_lat: Vec<f64> = st
            .writes
            .iter()
            .filter_map(|(id, t)| st.replicated.get(id).map(|r| r - t))
            .collect();
        let missing_replicated = written - repl_lat.len();
        let del_lat: Vec<f64> = st
            .writes
            .iter()
            .filter_map(|(id, t)| st.delivered.get(id).map(|(_, d)| d - t))
            .collect();
        let missing_delivered = written - del_lat.len();
        let duplicates: u64 = st
            .writes
            .keys()
            .filter_map(|id| st.delivered.get(id))
            .map(|(n, _)| (*n as u64).saturating_sub(1))
            .sum();
        let unexpected = st
            .delivered
            .keys()
            .filter(|id| !st.writes.contains_key(*id) && !id.starts_with("probe_"))
            .count();
        let write_errors = st.write_errors;
        let first_write_error = st.first_write_error.clone();
        (
            written,
            repl_lat,
            missing_replicated,
            del_lat,
            missing_delivered,
            duplicates,
            unexpected,
            write_errors,
            first_write_error,
        )
    };
    let complete = written > 0
        && write_errors == 0
        && missing_replicated == 0
        && (baseline || (missing_delivered == 0 && duplicates == 0 && unexpected == 0));

    let spiegel_writes = writes_after.saturating_sub(writes_before);
    let mb = |kb: u64| round3(kb as f64 / 1024.0);
    let report = json!({
        "mode": if baseline { "couchdb-replicator" } else { "spiegel" },
        "params": {
            "dbs": args.dbs, "active": args.active, "seconds": args.seconds,
            "burst": args.burst, "docs_per_write": per_write,
            "spiegel_processes": if baseline { 0 } else { spiegel_pids.len() },
            "workers_per_role": args.workers,
            "concurrency": if baseline { Value::Null } else { json!(args.concurrency) },
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
        "writes": written,
        "write_errors": write_errors,
        "first_write_error": first_write_error,
        "replication": {
            "latency": percentiles(repl_lat),
            "missing": missing_replicated,
        },
        "delivery": if baseline { Value::Null } else { json!({
            "latency": percentiles(del_lat),
            "missing": missing_delivered,
            "duplicates": duplicates,
            "unexpected": unexpected,
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
        futures::stream::iter(names.iter())
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

fn markdown(r: &Value) -> String {
    let mut out = String::new();
    let mut row = |k: &str, v: String| out.push_str(&format!("| {k} | {v} |\n"));
    let f = |v: &Value| match v {
        Value::Null => "n/a".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let lat = |l: &Value| {
        format!(
            "{} / {} / {} / {} s",
            f(&l["p50_s"]),
            f(&l["p95_s"]),
            f(&l["p99_s"]),
            f(&l["max_s"])
        )
    };
    row("Mode", f(&r["mode"]));
    let p = &r["params"];
    row("Server", f(&p["server"]));
    row(
        "Databases / active / seconds",
        format!("{} / {} / {}", p["dbs"], p["active"], p["seconds"]),
    );
    row(
        "Documents per write (burst)",
        format!("{} ({})", p["docs_per_write"], f(&p["burst"])),
    );
    row(
        "Spiegel processes / concurrency",
        format!("{} / {}", p["spiegel_processes"], f(&p["concurrency"])),
    );
    row("CPUs", f(&p["cpus"]));
    let t = &r["timing"];
    row(
        "Create databases / ready / load / drain",
        format!(
            "{} / {} / {} / {} s",
            t["create_dbs_s"], t["ready_s"], t["load_s"], t["drain_s"]
        ),
    );
    row(
        "Writes (errors)",
        format!("{} ({})", r["writes"], r["write_errors"]),
    );
    row(
        "Replication p50 / p95 / p99 / max",
        lat(&r["replication"]["latency"]),
    );
    row("Replicated docs missing", f(&r["replication"]["missing"]));
    if !r["delivery"].is_null() {
        let d = &r["delivery"];
        row("Delivery p50 / p95 / p99 / max", lat(&d["latency"]));
        row(
            "Deliveries missing / duplicate / unexpected",
            format!(
                "{} / {} / {}",
                d["missing"], d["duplicates"], d["unexpected"]
            ),
        );
    }
    if !r["spiegel"].is_null() {
        let s = &r["spiegel"];
        row(
            "Spiegel peak RSS (sum of VmHWM) / max sampled",
            format!("{} / {} MB", s["peak_rss_mb"], s["max_sampled_rss_mb"]),
        );
        row(
            "Spiegel CPU: load+drain / idle window / whole run",
            format!(
                "{} / {} ({} s) / {} s",
                s["cpu_s_load"], s["cpu_s_idle"], s["idle_seconds"], s["cpu_s_total"]
            ),
        );
        row(
            "Spiegel TCP connections to CouchDB: all processes / one process (max)",
            format!(
                "{} / {}",
                s["max_connections_to_couchdb"], s["max_connections_to_couchdb_per_process"]
            ),
        );
        let t = &s["time_spent"];
        for (name, key) in [
            ("Replicator", "replicator"),
            ("Change-listener", "change_listener"),
        ] {
            let r = &t[key];
            row(
                &format!("{name}: runs / mean wait update-to-run / mean run"),
                format!(
                    "{} / {} / {} s",
                    r["runs"],
                    f(&r["mean_update_to_run_s"]),
                    f(&r["mean_run_s"])
                ),
            );
        }
        for (name, key) in [
            ("POST _replicate", "post_replicate"),
            ("GET db/_changes", "get_changes"),
        ] {
            let o = &t[key];
            row(
                &format!("{name}: requests / mean"),
                format!("{} / {} s", o["requests"], f(&o["mean_s"])),
            );
        }
        row(
            "Spiegel-database writes (per update)",
            format!(
                "{} ({})",
                s["spiegel_db_writes"], s["spiegel_db_writes_per_update"]
            ),
        );
    }
    if !r["server"].is_null() {
        let s = &r["server"];
        row(
            "Server CPU: load+drain / idle window",
            format!("{} / {} s", f(&s["cpu_s_load"]), f(&s["cpu_s_idle"])),
        );
        row("Server peak RSS", format!("{} MB", f(&s["peak_rss_mb"])));
        row(
            "Server TCP connections: all / to itself (max)",
            format!(
                "{} / {}",
                s["max_established_connections"], s["max_connections_to_itself"]
            ),
        );
    }
    row("Complete", f(&r["complete"]));
    format!("| Figure | Value |\n|---|---|\n{out}")
}
