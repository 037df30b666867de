//! `scripts/demo.sh --short`, the README's "see it work" command: it starts
//! its own test CouchDB and webhook receiver, runs this build's spiegel
//! binary, and checks that every document it writes is replicated and every
//! note delivered.

mod common;

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// The demo gives up by itself after 60 s without progress; this is only a
/// safety net for a demo that hangs.
const DEADLINE: Duration = Duration::from_secs(120);

#[test]
fn the_short_demo_replicates_and_delivers_every_document() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let mut child = Command::new("bash")
        .arg(root.join("scripts/demo.sh"))
        .arg("--short")
        .current_dir(&root)
        .env("SPIEGEL_BIN", env!("CARGO_BIN_EXE_spiegel"))
        .env("TMPDIR", tmp.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start scripts/demo.sh");
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let out = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let err = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });

    let status = match wait_exit(&mut child, DEADLINE) {
        Some(status) => status,
        None => {
            // SIGTERM lets the demo stop what it started.
            signal(&child, libc::SIGTERM);
            if wait_exit(&mut child, Duration::from_secs(30)).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
            panic!(
                "the demo did not finish within {DEADLINE:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                out.join().unwrap_or_default(),
                err.join().unwrap_or_default()
            );
        }
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    let report = format!("--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}");

    assert!(status.success(), "the demo failed: {status:?}\n{report}");
    assert!(stdout.contains("demo: ok ("), "{report}");
    assert!(
        stdout.lines().any(|l| l.starts_with("[replicated] ")),
        "{report}"
    );
    assert!(
        stdout.lines().any(|l| l.starts_with("[webhook] ")),
        "{report}"
    );
    assert!(
        stdout
            .trim_end()
            .ends_with("demo: stopped: spiegel, the test CouchDB and the webhook receiver"),
        "the last line says that everything is stopped: {report}"
    );
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .expect("the temporary directory")
        .flatten()
        .map(|e| e.file_name())
        .filter(|name| name.to_string_lossy().starts_with("spiegel-demo."))
        .collect();
    assert!(left.is_empty(), "the demo left {left:?} behind");
}
