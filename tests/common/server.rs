//! The CouchDB the tests run against, chosen by `SPIEGEL_TEST_SERVER` (read
//! by `build.rs`, so that tests the chosen server cannot host are compiled
//! as ignored and reported as skipped):
//!
//! - `test-server` (default): PouchDB Server with `_db_updates`
//!   (`testing/couchdb/server.js`), the fresh-machine path;
//! - `kit`: a real Apache CouchDB from the kit (`couchdb.sh`), single node;
//! - `cluster`: a 3-node cluster of the kit;
//! - `external`: the server at `SPIEGEL_TEST_COUCHDB_URL`.
//!
//! The kit is found at `SPIEGEL_TEST_KIT` (the folder of `couchdb.sh`),
//! else at `../shared/couchdb` beside this repository. Each test binary
//! starts its own kit node (or cluster) in a temporary working dir on free
//! ports; a supervisor process stops it and removes its data when the test
//! binary exits, even after a crash.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};

use super::test_server::{ServerOptions, TestServer};

/// The kind of server this build of the tests runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    TestServer,
    Kit,
    Cluster,
    External,
}

pub const EXTERNAL_ENV: &str = "SPIEGEL_TEST_COUCHDB_URL";
pub const KIT_ENV: &str = "SPIEGEL_TEST_KIT";

pub fn kind() -> Kind {
    if cfg!(spiegel_test_server = "kit") {
        Kind::Kit
    } else if cfg!(spiegel_test_server = "cluster") {
        Kind::Cluster
    } else if cfg!(spiegel_test_server = "external") {
        Kind::External
    } else {
        Kind::TestServer
    }
}

/// The external server's URL, when the tests run against one.
pub fn external_url() -> Option<String> {
    std::env::var(EXTERNAL_ENV)
        .ok()
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().trim_end_matches('/').to_string())
}

/// The folder of the kit's `couchdb.sh`, if there is one.
pub fn kit_dir() -> Option<PathBuf> {
    let dir = match std::env::var_os(KIT_ENV) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/couchdb"),
    };
    dir.join("couchdb.sh").exists().then_some(dir)
}

fn kit_script() -> PathBuf {
    match kit_dir() {
        Some(dir) => dir.join("couchdb.sh"),
        None => panic!(
            "SPIEGEL_TEST_SERVER={:?} needs the CouchDB kit: set {KIT_ENV} to the folder of couchdb.sh",
            kind()
        ),
    }
}

/// A kit node or cluster in a working dir of its own. Dropping it stops
/// every node and removes the data.
pub struct Kit {
    dir: PathBuf,
    /// The supervisor: it stops the nodes when its stdin closes.
    supervisor: Child,
    stdin: Option<ChildStdin>,
    /// Node 1 first.
    pub urls: Vec<String>,
}

/// Started with `start`/`cluster-start`, waits for its stdin to close (the
/// test binary ended, however), then stops every node and deletes the dir;
/// the same at once if the start failed.
const SUPERVISOR: &str = r#"
trap '' INT TERM
kit="$1"; shift
clean() { bash "$kit" reset >/dev/null 2>&1; rm -rf "$SPIEGEL_COUCHDB_DIR"; }
bash "$kit" "$@" || { clean; exit 1; }
echo "--ready--"
cat >/dev/null
clean
"#;

impl Kit {
    /// One node.
    pub fn single() -> Kit {
        Kit::start(&["start"], 1)
    }

    /// A cluster of `nodes` nodes.
    pub fn cluster(nodes: u16) -> Kit {
        Kit::start(&["cluster-start", &nodes.to_string()], nodes)
    }

    /// Starts the kit, trying again (in a new dir, on new ports, after a
    /// growing pause) when a start fails: on a loaded machine (several
    /// tests starting their nodes at once) CouchDB sometimes answers 500
    /// to the creation of a system database right after it came up.
    fn start(args: &[&str], nodes: u16) -> Kit {
        const ATTEMPTS: u32 = 5;
        for attempt in 1..=ATTEMPTS {
            match Kit::try_start(args, nodes) {
                Ok(kit) => return kit,
                Err(printed) => eprintln!(
                    "the kit did not start (attempt {attempt} of {ATTEMPTS}; its output is above); it printed {printed:?}"
                ),
            }
            std::thread::sleep(std::time::Duration::from_secs(u64::from(attempt)));
        }
        panic!("the kit did not start after {ATTEMPTS} attempts");
    }

    fn try_start(args: &[&str], nodes: u16) -> Result<Kit, Vec<String>> {
        let dir = tempfile::Builder::new()
            .prefix("spiegel-test-kit-")
            .tempdir()
            .expect("temp dir for a kit node")
            .keep();
        let port = free_ports(nodes);
        let mut child = Command::new("bash")
            .arg("-c")
            .arg(SUPERVISOR)
            .arg("kit-supervisor")
            .arg(kit_script())
            .args(args)
            .env("SPIEGEL_COUCHDB_DIR", &dir)
            .env("SPIEGEL_COUCHDB_PORT", port.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the kit supervisor");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut urls = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.expect("read the kit's output");
            if line == "--ready--" {
                break;
            }
            urls.push(line.trim().trim_end_matches('/').to_string());
        }
        if urls.len() != nodes as usize {
            // The supervisor cleans up and exits once its stdin closes.
            drop(child.stdin.take());
            let _ = child.wait();
            return Err(urls);
        }
        // cluster-start prints nodes 2..N, then node 1.
        urls.rotate_right(1);
        Ok(Kit {
            dir,
            stdin: child.stdin.take(),
            supervisor: child,
            urls,
        })
    }

    pub fn url(&self) -> &str {
        &self.urls[0]
    }

    /// Runs a kit command on this working dir and returns its stdout.
    fn command(&self, args: &[&str]) -> String {
        // Through bash: the kit may be a read-only copy without exec bits.
        let out = Command::new("bash")
            .arg(kit_script())
            .args(["--dir".as_ref(), self.dir.as_os_str()])
            .args(args)
            .stderr(Stdio::inherit())
            .output()
            .expect("run couchdb.sh");
        assert!(out.status.success(), "couchdb.sh {args:?} failed");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// SIGKILL of the single node, as a crash would.
    pub fn kill(&self) {
        self.command(&["kill"]);
    }

    /// Starts the single node again, with its data, on the same port.
    pub fn restart(&self) {
        self.command(&["start"]);
    }

    /// SIGKILL of cluster node `k` (1-based).
    pub fn kill_node(&self, k: usize) {
        self.command(&["cluster-kill", &k.to_string()]);
    }

    /// Starts cluster node `k` again with its data; returns once it is back
    /// in the cluster.
    pub fn restart_node(&self, k: usize) {
        self.command(&["cluster-restart", &k.to_string()]);
    }
}

impl Drop for Kit {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.supervisor.wait();
    }
}

/// `n` consecutive free loopback ports; returns the first.
fn free_ports(n: u16) -> u16 {
    for _ in 0..200 {
        let base = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        if base > u16::MAX - n {
            continue;
        }
        if (1..n).all(|i| TcpListener::bind(("127.0.0.1", base + i)).is_ok()) {
            return base;
        }
    }
    panic!("no {n} consecutive free ports");
}

/// A server of the chosen kind that one test owns, so that it may kill and
/// restart it: a test server, or a kit node (on the kit and cluster kinds).
/// An external server cannot be owned: tests that need one are ignored
/// there.
pub enum OwnServer {
    TestServer(TestServer),
    Kit(Kit),
}

impl OwnServer {
    /// Requires an admin (like CouchDB 3) and keeps data across restarts.
    pub fn start() -> OwnServer {
        match kind() {
            Kind::TestServer => OwnServer::TestServer(TestServer::start(ServerOptions {
                admin: true,
                persistent: true,
            })),
            Kind::Kit | Kind::Cluster => OwnServer::Kit(Kit::single()),
            Kind::External => panic!("a test that owns its server cannot run on an external one"),
        }
    }

    pub fn url(&self) -> String {
        match self {
            OwnServer::TestServer(s) => s.url.clone(),
            OwnServer::Kit(k) => k.url().to_string(),
        }
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        match self {
            OwnServer::TestServer(s) => s.kill(),
            OwnServer::Kit(k) => k.kill(),
        }
    }

    /// Starts again on the same port, with the same data.
    pub fn restart(&mut self) {
        match self {
            OwnServer::TestServer(s) => s.restart(),
            OwnServer::Kit(k) => k.restart(),
        }
    }
}

/// The server the tests of one binary share, started on first use.
pub fn shared_urls() -> Vec<String> {
    static SHARED: std::sync::OnceLock<Shared> = std::sync::OnceLock::new();
    match SHARED.get_or_init(Shared::start) {
        Shared::TestServer(s) => {
            let s = s.lock().unwrap_or_else(|e| e.into_inner());
            vec![s.url.clone()]
        }
        Shared::Kit(urls) => urls.clone(),
        Shared::External(url) => vec![url.clone()],
    }
}

enum Shared {
    TestServer(std::sync::Mutex<TestServer>),
    /// The kit's supervisor stops it when the test binary exits (statics are
    /// never dropped).
    Kit(Vec<String>),
    External(String),
}

impl Shared {
    fn start() -> Shared {
        match kind() {
            Kind::TestServer => {
                Shared::TestServer(std::sync::Mutex::new(TestServer::start(ServerOptions {
                    admin: true,
                    persistent: false,
                })))
            }
            Kind::Kit => Shared::Kit(leak_kit(Kit::single())),
            Kind::Cluster => Shared::Kit(leak_kit(Kit::cluster(3))),
            Kind::External => Shared::External(
                external_url()
                    .unwrap_or_else(|| panic!("SPIEGEL_TEST_SERVER=external needs {EXTERNAL_ENV}")),
            ),
        }
    }
}

/// Keeps the kit running until the process exits: its supervisor's stdin
/// stays open until then.
fn leak_kit(kit: Kit) -> Vec<String> {
    let urls = kit.urls.clone();
    std::mem::forget(kit);
    urls
}

/// The shared server's admin password, for tests that check it never
/// shows in logs.
pub fn admin_password() -> String {
    let url = url::Url::parse(&shared_urls()[0]).expect("the server's URL");
    let password = url.password().expect("an admin URL has a password");
    percent_encoding::percent_decode_str(password)
        .decode_utf8_lossy()
        .into_owned()
}
