//! Test harness: a CouchDB to test against, unique database names, and the
//! spiegel binary.
//!
//! By default the tests start the project's test server (PouchDB Server with
//! `_db_updates`, `testing/couchdb/server.js`). With
//! `SPIEGEL_TEST_COUCHDB_URL=http://admin:pw@host:5984` every test runs
//! against that server instead (a real CouchDB 3.x); tests that must stop or
//! restart the server skip themselves there.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use spiegel::couch::{ClientOptions, CouchClient, SecretUrl};

pub const EXTERNAL_ENV: &str = "SPIEGEL_TEST_COUCHDB_URL";

/// The admin of test servers started with an admin.
pub const ADMIN_USER: &str = "admin";
pub const ADMIN_PASSWORD: &str = "s3cret-test";

/// A test server process. Dropping it kills the server.
pub struct TestServer {
    child: Option<Child>,
    /// Kept open: the launcher exits when its stdin closes, so a crashed
    /// test run leaves no server behind.
    stdin: Option<ChildStdin>,
    pub url: String,
    pub port: u16,
    admin: bool,
    data_dir: Option<tempfile::TempDir>,
}

#[derive(Default, Clone, Copy)]
pub struct ServerOptions {
    /// Require an admin (like CouchDB 3).
    pub admin: bool,
    /// Keep data on disk so that a killed server restarts with it.
    pub persistent: bool,
}

fn launcher() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testing/couchdb/server.js")
}

impl TestServer {
    pub fn start(options: ServerOptions) -> TestServer {
        let data_dir = options
            .persistent
            .then(|| tempfile::tempdir().expect("temp dir for the test server"));
        let mut server = TestServer {
            child: None,
            stdin: None,
            url: String::new(),
            port: 0,
            admin: options.admin,
            data_dir,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let launcher = launcher();
        assert!(
            launcher.with_file_name("node_modules").exists(),
            "the test CouchDB is not installed: run `npm ci --prefix testing/couchdb`"
        );
        let mut cmd = Command::new("node");
        cmd.arg(&launcher).arg("--port").arg(self.port.to_string());
        if self.admin {
            cmd.arg("--admin")
                .arg(format!("{ADMIN_USER}:{ADMIN_PASSWORD}"));
        }
        if let Some(dir) = &self.data_dir {
            cmd.arg("--data-dir").arg(dir.path());
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("start node testing/couchdb/server.js");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the test server's url line");
        let ready: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|_| panic!("unexpected first line from the test server: {line:?}"));
        let url = ready["url"]
            .as_str()
            .expect("url in the ready line")
            .to_string();
        let parsed = url::Url::parse(&url).expect("server url");
        self.port = parsed.port().expect("server port");
        self.url = if self.admin {
            format!(
                "http://{ADMIN_USER}:{ADMIN_PASSWORD}@127.0.0.1:{}",
                self.port
            )
        } else {
            url.trim_end_matches('/').to_string()
        };
        self.stdin = child.stdin.take();
        self.child = Some(child);
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.stdin = None;
    }

    /// Starts again on the same port (and data, if persistent).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The server the tests of this binary share: the external one, or a test
/// server started on first use.
pub fn shared_url() -> String {
    static SHARED: OnceLock<Mutex<TestServer>> = OnceLock::new();
    if let Some(url) = external_url() {
        return url;
    }
    let server = SHARED.get_or_init(|| {
        Mutex::new(TestServer::start(ServerOptions {
            admin: true,
            persistent: false,
        }))
    });
    server.lock().unwrap_or_else(|e| e.into_inner()).url.clone()
}

/// The external server's URL, when the tests run against one.
pub fn external_url() -> Option<String> {
    std::env::var(EXTERNAL_ENV)
        .ok()
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().trim_end_matches('/').to_string())
}

/// True (and a note printed) when a test needs its own test server, which an
/// external CouchDB cannot provide.
pub fn skip_on_external(test: &str) -> bool {
    if external_url().is_some() {
        eprintln!("{test}: skipped, it stops and restarts its own test server");
        return true;
    }
    false
}

/// Spiegel's logs in a test's output, when `SPIEGEL_TEST_LOG` is set.
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
        let mut child = spiegel()
            .args(args)
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
    /// timings (lease 1.5 s, saves every second), plus `extra` options.
    pub fn start_worker(&self, role: &str, extra: &[&str]) -> Spiegel {
        let mut args = vec![
            role,
            "--url",
            &self.url,
            "--db-name",
            &self.spiegel_db,
            "--lease-time",
            "1.5",
            "--save-seq-after",
            "1",
        ];
        args.extend_from_slice(extra);
        Spiegel::start(&args)
    }

    /// `spiegel status --json`.
    pub async fn status(&self) -> serde_json::Value {
        let out = spiegel()
            .args([
                "status",
                "--json",
                "--url",
                &self.url,
                "--db-name",
                &self.spiegel_db,
            ])
            .output()
            .expect("run spiegel status");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }
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
