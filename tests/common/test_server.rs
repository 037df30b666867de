//! The project's test server: PouchDB Server with CouchDB 3's `_db_updates`
//! (`testing/couchdb/server.js`), started on a free port.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};

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
