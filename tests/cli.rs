//! The spiegel binary: configuration styles, errors, install and uninstall.

mod common;

use std::process::{Output, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use spiegel::ids::settings_doc_id;
use spiegel::install::admins_only_security;

use common::*;

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = spiegel();
    cmd.args(args).args(["--log-format", "json"]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run spiegel")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn version_prints_the_package_version() {
    let out = run(&["--version"], &[]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn a_bad_option_is_one_line_naming_the_option() {
    let out = run(
        &["install", "--url", "http://h", "--concurrency", "lots"],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("--concurrency"), "{err}");

    let out = run(
        &[
            "install",
            "--url",
            "http://h",
            "--backoff-strategy",
            "random",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--backoff-strategy"));

    let out = run(&["--url", "http://h"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("command is required"),
        "{}",
        stderr(&out)
    );

    let out = run(&["install"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--url"), "{}", stderr(&out));

    let out = run(&["replicator", "--type=install", "--url=http://h"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("two different commands"));
}

#[test]
fn a_malformed_url_is_rejected_without_echoing_its_password() {
    let out = run(&["install", "--url", "http//admin:hunter2@host"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("--url"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
}

#[test]
fn bad_passwords_files_are_rejected_with_clear_messages() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.json");
    let invalid = dir.path().join("invalid.json");
    std::fs::write(&invalid, "{\"host\": {\"user\": \"pw\"").unwrap();
    let shape = dir.path().join("shape.json");
    std::fs::write(&shape, r#"{"host": ["user", "topsecret"]}"#).unwrap();

    for (file, expected) in [
        (&missing, "cannot read passwords file"),
        (&invalid, "not valid JSON"),
        (&shape, "wrong shape"),
    ] {
        let out = run(
            &[
                "install",
                "--url",
                "http://127.0.0.1:1",
                "--passwords-file",
                file.to_str().unwrap(),
            ],
            &[],
        );
        assert_eq!(out.status.code(), Some(2));
        let err = stderr(&out);
        assert!(
            err.contains(expected) && err.contains(file.to_str().unwrap()),
            "{err}"
        );
        assert!(!err.contains("topsecret"), "{err}");
    }
}

#[test]
fn obsolete_spiegel_options_are_accepted_with_a_warning() {
    let out = run(
        &[
            "update-listener",
            "--url",
            "http://127.0.0.1:1",
            "--retry-after",
            "5",
            "--help",
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "help still works with obsolete options"
    );

    // Through the environment, Spiegel 1.2's Docker style: TYPE and URL.
    let mut child = spiegel()
        .env("TYPE", "update-listener")
        .env("URL", "http://admin:pw@127.0.0.1:1")
        .env("BATCH_TIMEOUT", "500")
        .env("LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    // The update-listener explains itself, then idles until SIGTERM.
    let mut lines = Vec::new();
    while !lines
        .iter()
        .any(|l: &String| l.contains("no longer needed"))
    {
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the update-listener explains why it idles");
        lines.push(line);
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "update-listener must keep running"
    );
    signal(&child, libc::SIGTERM);
    let status = wait_exit(&mut child, Duration::from_secs(10)).expect("exit after SIGTERM");
    assert!(status.success(), "{status:?}");
    lines.extend(rx.try_iter());
    let text = lines.join("\n");
    assert!(
        text.contains("--batch-timeout") && text.contains("no effect"),
        "{text}"
    );
    assert!(text.contains("no longer needed"), "{text}");
    assert!(!text.contains(":pw@"), "{text}");
    for line in &lines {
        serde_json::from_str::<Value>(line)
            .unwrap_or_else(|_| panic!("not a JSON log line: {line}"));
    }
}

#[tokio::test]
async fn install_is_idempotent_and_locks_the_database_to_admins() {
    let url = shared_url();
    let couch = client_for(&url);
    let db = unique_name("spiegel");
    for _ in 0..2 {
        let out = run(
            &[
                "install",
                "--url",
                &url,
                "--db-name",
                &db,
                "--partitions",
                "8",
            ],
            &[],
        );
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(
            !stderr(&out).contains(&common::admin_password()),
            "password in logs"
        );
    }
    assert_eq!(
        couch.get_security(&db).await.unwrap(),
        admins_only_security()
    );
    let settings: Value = couch.get_doc(&db, &settings_doc_id("")).await.unwrap();
    assert_eq!(settings["partitions"], 8);
    assert!(
        settings["_rev"].as_str().unwrap().starts_with("1-"),
        "written once: {settings}"
    );
    couch
        .db_info("_global_changes")
        .await
        .expect("_global_changes exists");

    // Another partition count later keeps the installed one.
    let out = run(
        &[
            "install",
            "--url",
            &url,
            "--db-name",
            &db,
            "--partitions",
            "4",
        ],
        &[],
    );
    assert!(out.status.success());
    assert!(stderr(&out).contains("keeping the installed partition count"));
    let settings: Value = couch.get_doc(&db, &settings_doc_id("")).await.unwrap();
    assert_eq!(settings["partitions"], 8);

    let out = run(&["uninstall", "--url", &url, "--db-name", &db], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        couch.db_info(&db).await.is_err(),
        "no user docs: the database goes"
    );
}

#[tokio::test]
async fn install_from_both_styles_and_env_keeps_spiegel_1_2_user_docs_and_checkpoints() {
    let url = shared_url();
    let couch = client_for(&url);
    let db = unique_name("legacy");
    // A Spiegel 1.2 database: user docs, a checkpoint, a legacy design doc.
    couch.create_db(&db).await.unwrap();
    couch
        .put_doc(&db, "r1", &json!({"type": "replicator", "source": "http://h/a", "target": "http://h/b", "dirty": true}))
        .await
        .unwrap();
    couch
        .put_doc(
            &db,
            "spiegel_cl_users",
            &json!({"type": "change-listener", "db_name": "users", "last_seq": "5-abc"}),
        )
        .await
        .unwrap();
    couch
        .put_doc(
            &db,
            "_design/dirty_replicators",
            &json!({"views": {"dirty_replicators": {"map": "function(doc){}"}}}),
        )
        .await
        .unwrap();

    // Spiegel 1.2's style, all from the environment.
    let out = run(&[], &[("TYPE", "install"), ("URL", &url), ("DB_NAME", &db)]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Spiegel 1.2's style with flags, and the subcommand style.
    let out = run(
        &[
            "--type=install",
            &format!("--url={url}"),
            &format!("--db-name={db}"),
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run(&["install", "--url", &url, "--db-name", &db], &[]);
    assert!(out.status.success(), "{}", stderr(&out));

    let r1: Value = couch.get_doc(&db, "r1").await.unwrap();
    assert_eq!(r1["type"], "replicator");
    let cl: Value = couch.get_doc(&db, "spiegel_cl_users").await.unwrap();
    assert_eq!(cl["last_seq"], "5-abc");
    assert!(couch
        .get_doc_opt::<Value>(&db, "_design/dirty_replicators")
        .await
        .unwrap()
        .is_none());

    // uninstall keeps the user's docs unless told otherwise.
    let out = run(&["uninstall", "--url", &url, "--db-name", &db], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(couch
        .get_doc_opt::<Value>(&db, "r1")
        .await
        .unwrap()
        .is_some());
    assert!(couch
        .get_doc_opt::<Value>(&db, "spiegel_cl_users")
        .await
        .unwrap()
        .is_none());
    assert!(couch
        .get_doc_opt::<Value>(&db, &settings_doc_id(""))
        .await
        .unwrap()
        .is_none());
    let out = run(
        &[
            "uninstall",
            "--url",
            &url,
            "--db-name",
            &db,
            "--delete-user-docs",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(couch.db_info(&db).await.is_err());
}

#[test]
fn an_unreachable_server_fails_install_with_a_clear_error() {
    let out = run(&["install", "--url", "http://admin:pw@127.0.0.1:9"], &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("unreachable"), "{err}");
    assert!(
        err.trim_end()
            .lines()
            .last()
            .is_some_and(|l| l.starts_with("error: ")),
        "a one-shot command's error is plain text, even with JSON logs: {err}"
    );
    assert!(
        err.contains("is CouchDB running at http://admin:***@127.0.0.1:9/")
            && err.contains("--url"),
        "what was tried, and where to fix it: {err}"
    );
    assert!(!err.contains(":pw@"), "{err}");
}

#[test]
fn a_one_shot_command_stops_at_once_on_sigint_or_sigterm() {
    // A server that accepts connections and never answers: `status` waits.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://127.0.0.1:{}", silent.local_addr().unwrap().port());
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let mut child = spiegel()
            .args(["status", "--url", &url])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Its request is under way once the server sees the connection.
        silent.set_nonblocking(true).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while silent.accept().is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "status never connected"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        signal(&child, sig);
        let status = wait_exit(&mut child, Duration::from_secs(5));
        assert!(
            status.is_some_and(|s| !s.success()),
            "signal {sig}: {status:?}"
        );
    }
}
