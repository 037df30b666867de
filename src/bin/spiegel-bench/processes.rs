//! The processes the benchmark starts: the test CouchDB and Spiegel.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::couch::Couch;
use crate::{Args, Only, BENCH_ADMIN};

pub(crate) struct TestServer {
    pub(crate) child: Child,
    pub(crate) pid: u32,
    pub(crate) url: String,
}

pub(crate) async fn start_test_server(args: &Args, logs: &std::path::Path) -> Result<TestServer> {
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

#[derive(Default)]
pub(crate) struct Workers {
    pub(crate) children: Vec<Child>,
    pub(crate) pids: Vec<u32>,
    /// Each process's `/metrics` (its admin server, on a loopback port).
    pub(crate) metrics_urls: Vec<String>,
}

pub(crate) fn spiegel_bin(args: &Args) -> Result<PathBuf> {
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

pub(crate) fn spiegel_cmd(bin: &PathBuf, args: &[&str], log: Option<std::fs::File>) -> Command {
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

pub(crate) async fn start_spiegel(
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
        args.spiegel_log_level.as_str(),
        "--replication-engine",
        args.replication_engine.as_str(),
        "--log-format",
        "json",
    ];
    let per_process: &[&str] = match args.only {
        None => &["replicator", "change-listener"],
        Some(Only::Replicator) => &["replicator"],
        Some(Only::ChangeListener) => &["change-listener"],
        Some(Only::Writes) => &[],
    };
    let roles: Vec<&str> = match (args.workers, args.only) {
        (None, None) => vec!["run"],
        (workers, _) => per_process.repeat(workers.unwrap_or(1).max(1)),
    };
    let mut workers = Workers::default();
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
pub(crate) async fn stop(child: &mut Child, grace: Duration) {
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
