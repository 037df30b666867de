//! Test harness: a CouchDB to test against ([`server`]), unique database
//! names, and the spiegel binary.
#![allow(dead_code, unused_imports)]

mod proxy;
mod receiver;
mod rewriting_proxy;
mod server;
mod test_server;

pub use proxy::Proxy;
pub use receiver::{Received, Receiver};
pub use rewriting_proxy::{Fault, RewritingProxy, FOREVER};
pub use server::*;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use spiegel::couch::{AllDocsQuery, ClientOptions, CouchClient, SecretUrl};

/// The server the tests of this binary share (node 1 of a cluster).
pub fn shared_url() -> String {
    shared_urls().swap_remove(0)
}

/// Spiegel's logs in a test's output, when `SPIEGEL_TEST_LOG` is set.
pub async fn http_get(url: &str) -> Option<(u16, String)> {
    let answer = reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    Some((answer.status().as_u16(), answer.text().await.ok()?))
}

/// Waits until `url` answers `want`; returns the body. (A failure prints
/// the worker's logs: `Spiegel` does on drop.)
pub async fn wait_http_status(url: &str, want: u16, deadline: Duration) -> String {
    wait_for(&format!("{url} to answer {want}"), deadline, || async {
        http_get(url)
            .await
            .and_then(|(status, body)| (status == want).then_some(body))
    })
    .await
}

/// A TCP port free on loopback at the time of the call.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn init_logs() {
    if std::env::var_os("SPIEGEL_TEST_LOG").is_some() {
        spiegel::logging::init(
            spiegel::config::LogLevel::Trace,
            spiegel::config::LogFormat::Human,
        );
    }
}

pub fn client_for(url: &str) -> CouchClient {
    let url = SecretUrl::parse(url).expect("test server url");
    CouchClient::new(&url, ClientOptions::default()).expect("client")
}

/// A database name no other test (or earlier run) uses. Names must start
/// with a lowercase letter.
pub fn unique_name(label: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("test_{}_{nanos:x}_{n}_{label}", std::process::id())
}

/// Polls `check` until it returns `Some`, or panics after `deadline` naming
/// what was awaited.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The ids of `ids` that `db` lacks (or holds deleted). Read by id: on a
/// cluster a read by id waits for a quorum of copies, where `doc_count` or a
/// range of `_all_docs` comes from whichever copy of each shard answers
/// first, and may lag. A database that cannot be read lacks them all.
pub async fn missing_ids<S: AsRef<str>>(couch: &CouchClient, db: &str, ids: &[S]) -> Vec<String> {
    let all = || ids.iter().map(|id| id.as_ref().to_string()).collect();
    let query = AllDocsQuery {
        keys: Some(all()),
        ..Default::default()
    };
    let Ok(found) = couch.all_docs(db, &query).await else {
        return all();
    };
    found
        .rows
        .into_iter()
        .filter(|row| row.value.as_ref().is_none_or(|v| v.deleted))
        .map(|row| row.key.as_str().unwrap_or_default().to_string())
        .collect()
}

/// The spiegel binary built for these tests.
pub fn spiegel() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_spiegel"));
    // Keep the developer's environment out of the tests.
    for var in [
        "TYPE",
        "URL",
        "LOG_LEVEL",
        "LOG_FORMAT",
        "DB_NAME",
        "NAMESPACE",
        "PASSWORDS_FILE",
        "BATCH_SIZE",
        "CONCURRENCY",
        "ASSUME_DELETED_AFTER",
        "SAVE_SEQ_AFTER",
        "BACKOFF_STRATEGY",
        "BACKOFF_DELAY",
        "BACKOFF_MULTIPLIER",
        "BACKOFF_LIMIT",
        "BATCH_TIMEOUT",
        "RETRY_AFTER",
        "CHECK_STALLED",
        "PARTITIONS",
        "WORKER_ID",
        "LEASE_TIME",
        "SINCE",
        "SHUTDOWN_TIMEOUT",
        "SWEEP_INTERVAL",
        "REQUEST_TIMEOUT",
        "CONSOLE",
        "ADMIN_TOKEN",
        "CONSOLE_PUBLIC_READ",
    ] {
        cmd.env_remove(var);
    }
    // Many test processes run at once: no admin server unless asked for.
    cmd.env("ADMIN_ADDR", "");
    cmd
}

/// Sends a signal to a child process.
pub fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on a pid we own; no memory is shared.
    let rc = unsafe { libc::kill(child.id() as i32, sig) };
    assert_eq!(rc, 0, "kill({}, {sig})", child.id());
}

/// Waits for a child to exit, up to `deadline`.
pub fn wait_exit(child: &mut Child, deadline: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if start.elapsed() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A long-running spiegel process (a worker role), stopped with SIGTERM on
/// drop. Its log lines are kept for assertions and printed if the test fails.
pub struct Spiegel {
    pub child: std::process::Child,
    pub logs: std::sync::Arc<Mutex<Vec<String>>>,
}

impl Spiegel {
    pub fn start(args: &[&str]) -> Spiegel {
        let mut cmd = spiegel();
        cmd.args(args);
        Spiegel::start_command(cmd)
    }

    /// Starts `cmd` (made with [`spiegel`]), logging JSON at debug level.
    pub fn start_command(mut cmd: Command) -> Spiegel {
        let mut child = cmd
            .args(["--log-format", "json", "--log-level", "debug"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start spiegel");
        let stderr = child.stderr.take().expect("piped stderr");
        let logs: std::sync::Arc<Mutex<Vec<String>>> = Default::default();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        Spiegel { child, logs }
    }

    pub fn logs(&self) -> String {
        self.logs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .join("\n")
    }

    /// Waits until the logs contain `text`, or panics after `deadline`.
    pub async fn wait_log(&self, text: &str, deadline: Duration) {
        wait_for(&format!("{text:?} in the logs"), deadline, || async {
            self.logs().contains(text).then_some(())
        })
        .await
    }

    /// SIGTERM, then waits for the exit.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Some(status);
        }
        signal(&self.child, libc::SIGTERM);
        wait_exit(&mut self.child, Duration::from_secs(20))
    }
}

impl Drop for Spiegel {
    fn drop(&mut self) {
        if self.stop().is_none() {
            let _ = self.child.kill();
        }
        if std::thread::panicking() {
            eprintln!("--- spiegel logs ---\n{}", self.logs());
        }
    }
}

/// A fresh installation on the shared server: its own spiegel database
/// (4 partitions) and a prefix for the test's database names.
pub struct Installation {
    pub url: String,
    pub couch: CouchClient,
    pub spiegel_db: String,
    pub prefix: String,
}

impl Installation {
    pub async fn new(label: &str) -> Installation {
        Installation::with_partitions(label, 4).await
    }

    /// A fresh installation with `partitions` partitions.
    pub async fn with_partitions(label: &str, partitions: u32) -> Installation {
        let url = shared_url();
        let couch = client_for(&url);
        couch
            .create_db("_global_changes")
            .await
            .expect("_global_changes");
        let prefix = unique_name(label);
        let spiegel_db = format!("{prefix}_spiegel");
        spiegel::install::install(&couch, &spiegel_db, "", partitions)
            .await
            .expect("install");
        Installation {
            url,
            couch,
            spiegel_db,
            prefix,
        }
    }

    pub fn db(&self, name: &str) -> String {
        format!("{}_{name}", self.prefix)
    }

    /// Starts a worker of `role` on this installation with short test
    /// timings (lease 1.5 s unless `extra` sets one, saves every second),
    /// plus `extra` options.
    pub fn start_worker(&self, role: &str, extra: &[&str]) -> Spiegel {
        self.start_worker_at(&self.url, role, extra)
    }

    /// [`Self::start_worker`], with `url` as the worker's `--url` (the
    /// installation's server through a proxy).
    pub fn start_worker_at(&self, url: &str, role: &str, extra: &[&str]) -> Spiegel {
        let mut args = vec![
            role,
            "--url",
            url,
            "--db-name",
            &self.spiegel_db,
            "--save-seq-after",
            "1",
        ];
        if !extra.contains(&"--lease-time") {
            args.extend(["--lease-time", "1.5"]);
        }
        args.extend_from_slice(extra);
        Spiegel::start(&args)
    }

    /// `spiegel status --json`.
    pub async fn status(&self) -> serde_json::Value {
        spiegel_status(&self.url, &self.spiegel_db)
    }

    /// Each worker's report on document `doc` in `spiegel status --json`.
    pub async fn reports(&self, doc: &str) -> Vec<serde_json::Value> {
        let status = self.status().await;
        status["documents"][doc]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

/// A fresh installation, an API receiver (and its base URL), and a
/// database `name` of the installation, created.
pub async fn with_receiver(label: &str, name: &str) -> (Installation, Receiver, String, String) {
    let s = Installation::new(label).await;
    let (receiver, base) = Receiver::start().await;
    let db = s.db(name);
    s.couch.create_db(&db).await.unwrap();
    (s, receiver, base, db)
}

/// `spiegel status --json` on the installation in `spiegel_db` at `url`.
pub fn spiegel_status(url: &str, spiegel_db: &str) -> serde_json::Value {
    let out = spiegel()
        .args(["status", "--json", "--url", url, "--db-name", spiegel_db])
        .output()
        .expect("run spiegel status");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status JSON")
}

/// Waits until document `id` of `db` exists (`present`) or not, or panics
/// after `deadline` with `what`.
pub async fn wait_doc(
    couch: &CouchClient,
    db: &str,
    id: &str,
    present: bool,
    deadline: Duration,
    what: &str,
) {
    wait_for(what, deadline, || async {
        let found = couch
            .get_doc_opt::<serde_json::Value>(db, id)
            .await
            .ok()?
            .is_some();
        (found == present).then_some(())
    })
    .await
}

/// `_db_updates`' seq now: what came before it is history.
pub async fn current_seq(couch: &CouchClient) -> spiegel::couch::Seq {
    couch
        .db_updates(Some(&spiegel::couch::Seq::now()), None)
        .await
        .expect("_db_updates")
        .last_seq
}

/// Waits until `_db_updates` has published nothing about `dbs` for
/// `quiet`. On a cluster every node that holds a copy of a shard publishes
/// its own event for it, each up to `max_write_delay` after the write, so
/// a database's events can keep arriving after its first one.
pub async fn wait_quiet(couch: &CouchClient, dbs: &[String], quiet: Duration) {
    let mut since = current_seq(couch).await;
    let mut calm_since = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(30);
    while calm_since.elapsed() < quiet {
        assert!(Instant::now() < deadline, "_db_updates never went quiet");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let page = couch
            .db_updates(Some(&since), None)
            .await
            .expect("_db_updates");
        if page.results.iter().any(|u| dbs.contains(&u.db_name)) {
            calm_since = Instant::now();
        }
        since = page.last_seq;
    }
}

/// A server this test owns (see [`OwnServer`]) with Spiegel installed in
/// `spiegel` (4 partitions), and a client of it.
pub async fn own_installation() -> (OwnServer, CouchClient) {
    let server = OwnServer::start();
    let couch = client_for(&server.url());
    couch
        .create_db("_global_changes")
        .await
        .expect("_global_changes");
    spiegel::install::install(&couch, "spiegel", "", 4)
        .await
        .expect("install");
    (server, couch)
}

/// Waits until `_db_updates` since `before` shows a write to each of `dbs`.
pub async fn wait_published(
    couch: &spiegel::couch::CouchClient,
    before: &spiegel::couch::Seq,
    dbs: &[String],
) {
    wait_for(
        "the writes in _db_updates",
        Duration::from_secs(20),
        || async {
            let page = couch.db_updates(Some(before), None).await.ok()?;
            let seen: std::collections::HashSet<&str> = page
                .results
                .iter()
                .filter(|u| u.kind == spiegel::couch::DbUpdateKind::Updated)
                .map(|u| u.db_name.as_str())
                .collect();
            dbs.iter()
                .all(|db| seen.contains(db.as_str()))
                .then_some(())
        },
    )
    .await;
}

/// `size` bytes that do not compress (xorshift), so that no layer between
/// the test and CouchDB shrinks them.
pub fn incompressible(size: usize) -> Vec<u8> {
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    (0..size)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// A size in `/proc/{pid}/status` (`VmRSS:`, `VmHWM:`), in bytes.
pub fn proc_status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in {status}"));
    kb * 1024
}
