//! The replicator role through the real binary, against the test CouchDB.

mod common;

use std::time::Duration;

use serde_json::{json, Value};
use spiegel::couch::SecretUrl;

use common::*;

impl Installation {
    /// The URL of a database of the test server, without credentials
    /// (the user name only, if `user`).
    fn db_url(&self, db: &str, user: bool) -> String {
        let parsed = SecretUrl::parse(&self.url).unwrap();
        let mut url = parsed.without_credentials();
        if let Some(name) = parsed.username().filter(|_| user) {
            url.set_username(&name).unwrap();
        }
        format!("{}{}", url.as_str(), spiegel::couch::encode_segment(db))
    }

    /// A passwords file with the test server's admin password.
    fn passwords(&self, dir: &tempfile::TempDir, password: Option<&str>) -> String {
        let url = SecretUrl::parse(&self.url).unwrap();
        let path = dir.path().join("passwords.json");
        let user = url.username().unwrap_or_default();
        let pw = password
            .map(String::from)
            .or_else(|| url.password())
            .unwrap_or_default();
        std::fs::write(
            &path,
            json!({ url.host().unwrap(): { user: pw } }).to_string(),
        )
        .unwrap();
        path.to_str().unwrap().to_string()
    }

    fn start(&self, extra: &[&str]) -> Spiegel {
        let mut args = vec!["--backoff-delay", "0.2"];
        args.extend_from_slice(extra);
        self.start_worker("replicator", &args)
    }

    async fn has_doc(&self, db: &str, id: &str) -> bool {
        self.couch
            .get_doc_opt::<Value>(db, id)
            .await
            .ok()
            .flatten()
            .is_some()
    }

    /// Waits up to 30 s for `id` in `db`. (A failure prints the workers'
    /// logs: `Spiegel` does on drop.)
    async fn wait_doc(&self, db: &str, id: &str) {
        let what = format!("{id} to reach {db}");
        wait_doc(&self.couch, db, id, true, Duration::from_secs(30), &what).await
    }
}

#[tokio::test]
async fn a_plain_replicator_doc_follows_edits_and_deletion_live() {
    plain_doc_follows_edits_and_deletion("couchdb").await;
}

#[tokio::test]
async fn a_plain_replicator_doc_follows_edits_and_deletion_live_on_the_native_engine() {
    plain_doc_follows_edits_and_deletion("native").await;
}

/// A Spiegel 1.2 document, unchanged, on either engine (`--replication-engine`).
async fn plain_doc_follows_edits_and_deletion(engine: &str) {
    let s = Installation::new("plain").await;
    let (src, t1, t2, t3) = (s.db("src"), s.db("t1"), s.db("t2"), s.db("t3"));
    for db in [&src, &t1, &t2, &t3] {
        s.couch.create_db(db).await.unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let passwords = s.passwords(&dir, None);
    let doc = json!({"type": "replicator", "source": s.db_url(&src, true), "target": s.db_url(&t1, true),
                     "dirty": true, "locked_at": null});
    s.couch.put_doc(&s.spiegel_db, "r1", &doc).await.unwrap();
    let worker = s.start(&[
        "--passwords-file",
        &passwords,
        "--replication-engine",
        engine,
    ]);

    s.couch
        .put_doc(&src, "doc1", &json!({"v": 1}))
        .await
        .unwrap();
    s.wait_doc(&t1, "doc1").await;

    // Edit: a new target, live.
    let mut current: Value = s.couch.get_doc(&s.spiegel_db, "r1").await.unwrap();
    current["target"] = json!(s.db_url(&t2, true));
    s.couch
        .put_doc(&s.spiegel_db, "r1", &current)
        .await
        .unwrap();
    s.wait_doc(&t2, "doc1").await; // the edit alone replicates
    s.couch
        .put_doc(&src, "doc2", &json!({"v": 2}))
        .await
        .unwrap();
    s.wait_doc(&t2, "doc2").await;
    assert!(
        !s.has_doc(&t1, "doc2").await,
        "the old target is not used any more"
    );

    // Delete r1; r3 (created after) tells when the source's next change
    // was handled.
    let current: Value = s.couch.get_doc(&s.spiegel_db, "r1").await.unwrap();
    s.couch
        .delete_doc(&s.spiegel_db, "r1", current["_rev"].as_str().unwrap())
        .await
        .unwrap();
    let r3 = json!({"type": "replicator", "source": s.db_url(&src, true), "target": s.db_url(&t3, true)});
    s.couch.put_doc(&s.spiegel_db, "r3", &r3).await.unwrap();
    s.couch
        .put_doc(&src, "doc3", &json!({"v": 3}))
        .await
        .unwrap();
    s.wait_doc(&t3, "doc3").await;
    // The follower of the spiegel database may see r3 a moment before r1's
    // deletion (on a cluster its `_changes` is not write order): the next
    // change tells.
    s.couch
        .put_doc(&src, "doc4", &json!({"v": 4}))
        .await
        .unwrap();
    s.wait_doc(&t3, "doc4").await;
    assert!(
        !s.has_doc(&t2, "doc4").await,
        "a deleted replicator doc does nothing"
    );
    assert!(
        !worker.logs().contains(&common::admin_password()),
        "a password reached the logs"
    );
}

#[tokio::test]
async fn one_templated_doc_fans_200_databases_into_one() {
    let s = Installation::new("fanin").await;
    let aggregate = s.db("all");
    s.couch.create_db(&aggregate).await.unwrap();
    let sources: Vec<String> = (0..200).map(|i| s.db(&format!("user/{i}"))).collect();
    for (i, db) in sources.iter().enumerate() {
        s.couch.create_db(db).await.unwrap();
        s.couch
            .put_doc(db, &format!("from{i}"), &json!({"i": i}))
            .await
            .unwrap();
    }
    let worker = s.start(&[]);
    let source = format!("{}/${{db_name}}", s.url.trim_end_matches('/'));
    let doc = json!({"type": "replicator", "db_name": format!("^{}_user/", s.prefix),
                     "source": source, "target": format!("{}/{}", s.url, aggregate)});
    s.couch
        .put_doc(&s.spiegel_db, "fan-in", &doc)
        .await
        .unwrap();

    let all = wait_for(
        "every document of every source",
        Duration::from_secs(90),
        || async {
            let n = s.couch.db_info(&aggregate).await.unwrap().doc_count;
            (n >= 200).then_some(n)
        },
    )
    .await;
    assert_eq!(
        all,
        200,
        "every document of every source arrives\n{}",
        worker.logs()
    );

    // A database created after the start is picked up.
    let late = s.db("user/late");
    s.couch.create_db(&late).await.unwrap();
    s.couch
        .put_doc(&late, "late-doc", &json!({}))
        .await
        .unwrap();
    s.wait_doc(&aggregate, "late-doc").await;
}

/// A first start over 150 databases with history, one run of history at a
/// time: its progress shows in `spiegel status` and the metrics, and a
/// change made meanwhile goes ahead of the history.
#[tokio::test]
async fn a_first_start_shows_its_progress_and_lets_live_changes_go_first() {
    const HISTORY: u64 = 150;
    let s = Installation::new("firststart").await;
    let aggregate = s.db("all");
    s.couch.create_db(&aggregate).await.unwrap();
    for i in 0..HISTORY {
        let db = s.db(&format!("u_{i:03}"));
        s.couch.create_db(&db).await.unwrap();
        let doc = json!({"i": i});
        s.couch
            .put_doc(&db, &format!("old{i}"), &doc)
            .await
            .unwrap();
    }
    let source = format!("{}/${{db_name}}", s.url.trim_end_matches('/'));
    let doc = json!({"type": "replicator", "db_name": format!("^{}_u_", s.prefix),
                     "source": source, "target": format!("{}/{}", s.url, aggregate)});
    s.couch
        .put_doc(&s.spiegel_db, "fan-in", &doc)
        .await
        .unwrap();
    let admin = format!("127.0.0.1:{}", free_port());
    let args = ["--concurrency", "2", "--catch-up-concurrency", "1"];
    let worker = s.start(&[&args[..], &["--admin-addr", &admin]].concat());

    let what = "the catch-up in spiegel status";
    let shown = wait_for(what, Duration::from_secs(60), || async {
        let status = s.status().await;
        let catch_up = status["catch_ups"].as_array()?.first()?.clone();
        (catch_up["role"] == "replicator").then_some(catch_up)
    })
    .await;
    let handled = shown["handled"].as_u64().unwrap();
    assert!(handled < HISTORY, "shown while under way: {shown}");

    let live = s.db("u_live");
    s.couch.create_db(&live).await.unwrap();
    s.couch.put_doc(&live, "new", &json!({})).await.unwrap();
    s.wait_doc(&aggregate, "new").await;
    let copied = s.couch.db_info(&aggregate).await.unwrap().doc_count;
    assert!(
        copied < HISTORY,
        "the change went ahead of the history ({copied} copied before it)\n{}",
        worker.logs()
    );

    let metrics = format!("http://{admin}/metrics");
    let gauge = |text: &str, name: &str| -> Option<u64> {
        let series = format!("spiegel_{name}{{role=\"replicator\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&series)?.parse().ok())
    };
    let what = "the catch-up done in the metrics and gone from the status";
    wait_for(what, Duration::from_secs(120), || async {
        let (_, text) = http_get(&metrics).await?;
        let found = gauge(&text, "catch_up_databases_found")?;
        let handled = gauge(&text, "catch_up_databases_handled")?;
        let shown = s.status().await["catch_ups"].as_array()?.len();
        (found >= HISTORY && found == handled && shown == 0).then_some(())
    })
    .await;
    let all = s.couch.db_info(&aggregate).await.unwrap().doc_count;
    assert_eq!(all, HISTORY + 1);
    assert!(worker.logs().contains("catch-up done"));
}

#[tokio::test]
async fn a_new_templated_doc_skips_empty_databases_until_their_first_write() {
    let s = Installation::new("empty").await;
    let before = current_seq(&s.couch).await;
    // '$' sorts before digits: the empty databases come first in the pass.
    let empty: Vec<String> = (0..3).map(|i| s.db(&format!("user/$e{i}"))).collect();
    let full: Vec<String> = (0..3).map(|i| s.db(&format!("user/{i}"))).collect();
    for db in empty.iter().chain(&full) {
        s.couch.create_db(db).await.unwrap();
    }
    for db in &full {
        s.couch.put_doc(db, "doc", &json!({})).await.unwrap();
    }
    // Every run of this document fails (its target does not exist) and
    // leaves an error for its database in the status.
    let source = format!("{}/${{db_name}}", s.url.trim_end_matches('/'));
    let doc = json!({"type": "replicator", "db_name": format!("^{}_user/", s.prefix),
                     "source": source, "target": format!("{}/{}", s.url, s.db("missing"))});
    s.couch.put_doc(&s.spiegel_db, "t", &doc).await.unwrap();
    // No creation or write may reach the worker's live feed late: CouchDB
    // publishes updates up to about half a second late, and on a cluster
    // each node that holds a copy publishes its own event.
    wait_for(
        "the writes in _db_updates",
        Duration::from_secs(20),
        || async {
            let page = s.couch.db_updates(Some(&before), None).await.ok()?;
            let seen: std::collections::HashSet<&str> =
                page.results.iter().map(|u| u.db_name.as_str()).collect();
            empty
                .iter()
                .chain(&full)
                .chain([&s.spiegel_db])
                .all(|db| seen.contains(db.as_str()))
                .then_some(())
        },
    )
    .await;
    let all: Vec<String> = empty.iter().chain(&full).cloned().collect();
    wait_quiet(&s.couch, &all, Duration::from_secs(2)).await;
    let worker = s.start(&["--since", "now"]);
    let errors_of = |status: &Value| -> Vec<String> {
        status["documents"]["t"][0]["errors"]
            .as_object()
            .map(|e| e.keys().cloned().collect())
            .unwrap_or_default()
    };
    wait_for(
        "a run of every database with a document",
        Duration::from_secs(60),
        || async {
            let errors = errors_of(&s.status().await);
            full.iter().all(|db| errors.contains(db)).then_some(())
        },
    )
    .await;

    // Its first write runs an empty database; the others were never run.
    s.couch
        .put_doc(&empty[0], "first", &json!({}))
        .await
        .unwrap();
    let errors = wait_for(
        "a run of the written database",
        Duration::from_secs(60),
        || async {
            let errors = errors_of(&s.status().await);
            errors.contains(&empty[0]).then_some(errors)
        },
    )
    .await;
    assert!(
        !errors.contains(&empty[1]) && !errors.contains(&empty[2]),
        "empty databases were run: {errors:?}\n{}",
        worker.logs()
    );
}

#[tokio::test]
async fn replication_parameters_pass_through() {
    filter_and_query_params_apply("couchdb").await;
}

#[tokio::test]
async fn the_native_engine_applies_filter_and_query_params() {
    filter_and_query_params_apply("native").await;
}

#[tokio::test]
async fn a_parameter_the_native_engine_lacks_sends_the_document_to_couchdb_with_a_note() {
    let s = Installation::new("fallback").await;
    let (src, dst) = (s.db("src"), s.db("dst"));
    s.couch.create_db(&src).await.unwrap();
    s.couch.put_doc(&src, "a", &json!({})).await.unwrap();
    let _worker = s.start(&["--replication-engine", "native"]);
    let doc = json!({"type": "replicator", "source": format!("{}/{}", s.url, src),
                     "target": format!("{}/{}", s.url, dst), "create_target": true,
                     "connection_timeout": 30000});
    s.couch.put_doc(&s.spiegel_db, "tuned", &doc).await.unwrap();
    s.wait_doc(&dst, "a").await;
    let note = wait_for(
        "the note in the status",
        Duration::from_secs(20),
        || async {
            let status = s.status().await;
            status["documents"]["tuned"][0]["note"]
                .as_str()
                .map(String::from)
        },
    )
    .await;
    assert!(
        note.contains("connection_timeout") && note.contains("couchdb"),
        "{note}"
    );
    let detail = s.status().await["documents"]["tuned"][0]["last_success"]["detail"].clone();
    assert!(!detail.to_string().contains("engine=native"), "{detail}");
}

/// A filter function with `query_params`, on `engine`.
async fn filter_and_query_params_apply(engine: &str) {
    let s = Installation::new("params").await;
    let (src, dst) = (s.db("src"), s.db("dst"));
    s.couch.create_db(&src).await.unwrap();
    s.couch.create_db(&dst).await.unwrap();
    let ddoc = json!({"filters": {"chosen": "function(doc, req) { return doc.keep === true || doc.keep === req.query.flag; }"}});
    s.couch.put_doc(&src, "_design/app", &ddoc).await.unwrap();
    for (id, keep) in [("a", json!(true)), ("b", json!("yes")), ("c", json!(false))] {
        s.couch
            .put_doc(&src, id, &json!({"keep": keep}))
            .await
            .unwrap();
    }
    let _worker = s.start(&[]);
    let doc = json!({"type": "replicator", "source": format!("{}/{}", s.url, src),
                     "target": format!("{}/{}", s.url, dst), "filter": "app/chosen",
                     "query_params": {"flag": "yes"}, "engine": engine});
    s.couch
        .put_doc(&s.spiegel_db, "filtered", &doc)
        .await
        .unwrap();
    s.wait_doc(&dst, "a").await;
    s.wait_doc(&dst, "b").await;
    assert!(
        !s.has_doc(&dst, "c").await,
        "the filter and its query_params were applied"
    );
}

#[tokio::test]
async fn an_edited_filter_function_starts_a_new_native_replication() {
    edited_filter_starts_over("native").await;
}

#[tokio::test]
#[cfg_attr(
    spiegel_test_server = "test-server",
    ignore = "PouchDB Server's _replicate leaves the filter's code out of its replication id"
)]
async fn an_edited_filter_function_starts_a_new_couchdb_replication() {
    edited_filter_starts_over("couchdb").await;
}

/// A document the old filter left out arrives once the filter's code is
/// edited to let it through, although the document itself did not change:
/// the replication id covers the code, so the run starts over instead of
/// resuming from the checkpoint taken under the old code.
async fn edited_filter_starts_over(engine: &str) {
    let s = Installation::new("refilter").await;
    let (src, dst) = (s.db("src"), s.db("dst"));
    s.couch.create_db(&src).await.unwrap();
    s.couch.create_db(&dst).await.unwrap();
    let ddoc = json!({"filters": {"chosen": "function(doc) { return doc.keep === true; }"}});
    let rev = s
        .couch
        .put_doc(&src, "_design/app", &ddoc)
        .await
        .unwrap()
        .rev;
    s.couch
        .put_doc(&src, "in", &json!({"keep": true}))
        .await
        .unwrap();
    s.couch
        .put_doc(&src, "out", &json!({"keep": false}))
        .await
        .unwrap();
    let _worker = s.start(&[]);
    let doc = json!({"type": "replicator", "source": format!("{}/{}", s.url, src),
                     "target": format!("{}/{}", s.url, dst), "filter": "app/chosen",
                     "engine": engine});
    s.couch
        .put_doc(&s.spiegel_db, "filtered", &doc)
        .await
        .unwrap();
    s.wait_doc(&dst, "in").await;
    // The run that copied "in" has recorded its checkpoint past "out".
    wait_for(
        "a success in the status",
        Duration::from_secs(30),
        || async {
            let status = s.status().await;
            (status["documents"]["filtered"][0]["succeeded"].as_u64() > Some(0)).then_some(())
        },
    )
    .await;
    assert!(
        !s.has_doc(&dst, "out").await,
        "the first filter left it out"
    );
    let ddoc = json!({"_rev": rev, "filters": {"chosen": "function(doc) { return doc._id === 'out' || doc.keep === true; }"}});
    s.couch.put_doc(&src, "_design/app", &ddoc).await.unwrap();
    s.wait_doc(&dst, "out").await;
}

#[tokio::test]
async fn passwords_come_from_the_passwords_file_and_a_wrong_one_is_reported() {
    let s = Installation::new("auth").await;
    if SecretUrl::parse(&s.url).unwrap().password().is_none() {
        eprintln!("skipped: the server has no admin");
        return;
    }
    let (src, good, bad) = (s.db("src"), s.db("good"), s.db("bad"));
    for db in [&src, &good, &bad] {
        s.couch.create_db(db).await.unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let passwords = s.passwords(&dir, None);
    let worker = s.start(&["--passwords-file", &passwords]);
    let doc = json!({"type": "replicator", "source": s.db_url(&src, true), "target": s.db_url(&good, true)});
    s.couch.put_doc(&s.spiegel_db, "good", &doc).await.unwrap();
    s.couch.put_doc(&src, "x", &json!({})).await.unwrap();
    s.wait_doc(&good, "x").await;
    drop(worker);

    // The same with a wrong password: an error in the status, no crash.
    // (Another user than the admin: CouchDB 3.4+ locks an account out after
    // a few failed logins, and the tests share the admin.)
    let wrong_dir = tempfile::tempdir().unwrap();
    let wrong = wrong_dir.path().join("passwords.json");
    let url = SecretUrl::parse(&s.url).unwrap();
    let (admin, pw) = (url.username().unwrap(), url.password().unwrap());
    let entries = json!({ url.host().unwrap(): { admin: pw, "nobody": "not-the-password" } });
    std::fs::write(&wrong, entries.to_string()).unwrap();
    let wrong = wrong.to_str().unwrap();
    let mut worker = s.start(&["--passwords-file", wrong, "--backoff-limit", "1"]);
    let as_nobody = |db: &str| {
        let mut u = url.without_credentials();
        u.set_username("nobody").unwrap();
        format!("{}{}", u.as_str(), spiegel::couch::encode_segment(db))
    };
    let doc = json!({"type": "replicator", "source": as_nobody(&src), "target": as_nobody(&bad)});
    s.couch.put_doc(&s.spiegel_db, "bad", &doc).await.unwrap();
    let error = wait_for(
        "an error in the status",
        Duration::from_secs(30),
        || async {
            let status = s.status().await;
            status["documents"]["bad"][0]["errors"][&src]["detail"]
                .as_str()
                .map(String::from)
        },
    )
    .await;
    assert!(
        error.to_lowercase().contains("unauthorized") || error.contains("401"),
        "{error}"
    );
    assert!(!error.contains("not-the-password"), "{error}");
    assert!(
        worker.child.try_wait().unwrap().is_none(),
        "the worker keeps running"
    );
    let status = worker.stop().expect("stops");
    assert!(status.success());
    assert!(!worker.logs().contains("not-the-password"));
}

#[tokio::test]
async fn a_missing_source_is_retried_then_dropped_and_replicated_again_when_created() {
    let s = Installation::new("gone").await;
    let (src, dst) = (s.db("src"), s.db("dst"));
    s.couch.create_db(&dst).await.unwrap();
    // Its retries come from the document's nudge alone (a missing source
    // has no update events): a longer lease keeps a heartbeat slowed by a
    // loaded machine from dropping the partitions, and the retries with
    // them.
    let worker = s.start(&["--assume-deleted-after", "2", "--lease-time", "10"]);
    let doc = json!({"type": "replicator", "source": format!("{}/{}", s.url, src), "target": format!("{}/{}", s.url, dst)});
    s.couch.put_doc(&s.spiegel_db, "r", &doc).await.unwrap();
    // Retried while missing, then taken for deleted.
    wait_for(
        "the source taken for deleted",
        Duration::from_secs(30),
        || async {
            let status = s.status().await;
            status["documents"]["r"][0]["errors"][&src]["detail"]
                .as_str()?
                .contains("taken for deleted")
                .then_some(())
        },
    )
    .await;
    let logs = worker.logs();
    assert!(
        // At least one retry: on a real CouchDB each attempt can take up to
        // its startup jitter, so few fit in the test's short window.
        logs.matches("run failed; will retry").count() >= 1,
        "retried before giving up\n{logs}"
    );

    // Created again: replicated again.
    s.couch.create_db(&src).await.unwrap();
    s.couch.put_doc(&src, "back", &json!({})).await.unwrap();
    s.wait_doc(&dst, "back").await;
}

/// The native engine keeps each replication's progress between runs; a
/// source deleted and created again must start over from its beginning, or
/// its first changes would be skipped (where seqs are counters, as on the
/// test server) or read as another database's.
#[tokio::test]
async fn a_source_created_again_is_replicated_from_its_beginning_on_the_native_engine() {
    let s = Installation::new("reborn").await;
    let (src, dst) = (s.db("src"), s.db("dst"));
    for db in [&src, &dst] {
        s.couch.create_db(db).await.unwrap();
    }
    let _worker = s.start(&["--replication-engine", "native"]);
    let doc = json!({"type": "replicator", "source": format!("{}/{}", s.url, src), "target": format!("{}/{}", s.url, dst)});
    s.couch.put_doc(&s.spiegel_db, "r", &doc).await.unwrap();
    for i in 0..5 {
        let id = format!("first{i}");
        s.couch.put_doc(&src, &id, &json!({})).await.unwrap();
        s.wait_doc(&dst, &id).await;
    }
    s.couch.delete_db(&src).await.unwrap();
    s.couch.create_db(&src).await.unwrap();
    // Fewer changes than the first database had: a seq kept from it would
    // be past them.
    s.couch.put_doc(&src, "second0", &json!({})).await.unwrap();
    s.wait_doc(&dst, "second0").await;
    s.couch.put_doc(&src, "second1", &json!({})).await.unwrap();
    s.wait_doc(&dst, "second1").await;
}

#[tokio::test]
async fn two_replicator_workers_share_the_databases() {
    let s = Installation::new("two").await;
    let aggregate = s.db("all");
    s.couch.create_db(&aggregate).await.unwrap();
    let _a = s.start(&["--worker-id", "a"]);
    let _b = s.start(&["--worker-id", "b"]);
    let source = format!("{}/${{db_name}}", s.url.trim_end_matches('/'));
    let doc = json!({"type": "replicator", "db_name": format!("^{}_u", s.prefix),
                     "source": source, "target": format!("{}/{}", s.url, aggregate)});
    s.couch
        .put_doc(&s.spiegel_db, "fan-in", &doc)
        .await
        .unwrap();
    // Both own partitions before the load starts.
    wait_for("the partitions shared", Duration::from_secs(20), || async {
        let status = s.status().await;
        let workers = &status["roles"]["replicator"]["workers"];
        let owns = |w: &str| workers[w]["partitions"].as_array().map_or(0, Vec::len);
        (owns("a-replicator") == 2 && owns("b-replicator") == 2).then_some(())
    })
    .await;
    for i in 0..30 {
        let db = s.db(&format!("u{i}"));
        s.couch.create_db(&db).await.unwrap();
        s.couch
            .put_doc(&db, &format!("d{i}"), &json!({}))
            .await
            .unwrap();
    }
    for i in 0..30 {
        s.wait_doc(&aggregate, &format!("d{i}")).await;
    }
    // Both did some of the work.
    wait_for(
        "both workers to do some work",
        Duration::from_secs(20),
        || async {
            let workers = s
                .reports("fan-in")
                .await
                .iter()
                .filter(|r| r["succeeded"].as_u64().unwrap_or(0) > 0)
                .count();
            (workers == 2).then_some(())
        },
    )
    .await;
}

#[tokio::test]
#[cfg_attr(
    spiegel_test_server = "external",
    ignore = "starts a second server of its own"
)]
async fn credentials_for_a_source_and_a_target_on_two_servers_come_from_the_passwords_file() {
    let s = Installation::new("twoservers").await;
    let other = OwnServer::start();
    let other_couch = client_for(&other.url());
    let (src, dst) = (s.db("src"), s.db("dst"));
    s.couch.create_db(&src).await.unwrap();
    s.couch.put_doc(&src, "a", &json!({})).await.unwrap();
    // One entry per server (host and port); the bare host's entry is wrong,
    // so only a lookup by host and port can succeed.
    let here = SecretUrl::parse(&s.url).unwrap();
    let there = SecretUrl::parse(&other.url()).unwrap();
    let entry = |url: &SecretUrl| {
        let user = url.username().unwrap();
        (
            url.host_with_port().unwrap(),
            json!({ user: url.password().unwrap() }),
        )
    };
    let (here_key, here_user) = entry(&here);
    let (there_key, there_user) = entry(&there);
    let passwords = json!({ here_key: here_user, there_key: there_user,
                            here.host().unwrap(): { here.username().unwrap(): "wrong" } });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("passwords.json");
    std::fs::write(&path, passwords.to_string()).unwrap();
    let without_password = |url: &SecretUrl, db: &str| {
        let mut u = url.without_credentials();
        u.set_username(&url.username().unwrap()).unwrap();
        format!("{}{}", u.as_str(), spiegel::couch::encode_segment(db))
    };
    let doc = json!({"type": "replicator", "source": without_password(&here, &src),
                     "target": without_password(&there, &dst), "create_target": true});
    s.couch.put_doc(&s.spiegel_db, "r", &doc).await.unwrap();
    let worker = s.start(&["--passwords-file", path.to_str().unwrap()]);
    wait_doc(
        &other_couch,
        &dst,
        "a",
        true,
        Duration::from_secs(30),
        "a on the other server",
    )
    .await;
    assert!(!worker.logs().contains(&common::admin_password()));
}

#[tokio::test]
async fn a_stopped_workers_status_is_kept_then_removed_after_ten_lease_times() {
    let s = Installation::new("statusgone").await;
    let (src, dst) = (s.db("src"), s.db("dst"));
    s.couch.create_db(&src).await.unwrap();
    s.couch.put_doc(&src, "a", &json!({})).await.unwrap();
    let doc = json!({"type": "replicator", "source": format!("{}/{}", s.url, src),
                     "target": format!("{}/{}", s.url, dst), "create_target": true});
    s.couch.put_doc(&s.spiegel_db, "r", &doc).await.unwrap();
    let mut first = s.start(&["--worker-id", "first"]);
    s.wait_doc(&dst, "a").await;
    // A clean stop saves the status: the run is reported after the stop.
    assert!(first.stop().expect("stops").success());
    let reports = s.status().await["documents"]["r"].clone();
    let workers: Vec<&str> = reports
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["worker"].as_str())
        .collect();
    assert_eq!(workers, ["first-replicator"], "{reports}");
    assert!(reports[0]["succeeded"].as_u64() >= Some(1), "{reports}");

    // Another worker removes it once it has been gone for ten lease times
    // (15 s here).
    let _second = s.start(&["--worker-id", "second"]);
    wait_for(
        "the stopped worker's status removed",
        Duration::from_secs(60),
        || async {
            let gone = s
                .reports("r")
                .await
                .iter()
                .all(|r| r["worker"] != "first-replicator");
            gone.then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_native_replication_killed_midway_resumes_from_its_checkpoint() {
    let s = Installation::new("killrepl").await;
    let (src, dst) = (s.db("src"), s.db("dst"));
    s.couch.create_db(&src).await.unwrap();
    s.couch.create_db(&dst).await.unwrap();
    let total = 1000;
    let ids: Vec<String> = (0..total).map(|i| format!("d{i:04}")).collect();
    let docs: Vec<Value> = ids
        .iter()
        .map(|id| json!({"_id": id, "pad": "x".repeat(2000)}))
        .collect();
    for chunk in docs.chunks(250) {
        s.couch.bulk_docs(&src, chunk, true).await.unwrap();
    }
    let count = |db: String| {
        let couch = s.couch.clone();
        async move { couch.db_info(&db).await.map(|i| i.doc_count).unwrap_or(0) }
    };
    let batch = 10;
    let doc = json!({"type": "replicator", "source": format!("{}/{}", s.url, src),
                     "target": format!("{}/{}", s.url, dst), "worker_batch_size": batch});
    s.couch.put_doc(&s.spiegel_db, "r", &doc).await.unwrap();

    // The first worker is killed (SIGKILL: nothing saved at exit) once a
    // part of the documents has reached the target.
    let mut first = s.start(&["--worker-id", "first", "--replication-engine", "native"]);
    let cut = wait_for("a part replicated", Duration::from_secs(60), || async {
        let n = count(dst.clone()).await;
        (n >= 150).then_some(n < total)
    })
    .await;
    signal(&first.child, libc::SIGKILL);
    wait_exit(&mut first.child, Duration::from_secs(10)).expect("killed");
    assert!(cut, "the replication ended before the kill");
    let present = count(dst.clone()).await;

    // The next worker resumes from the last checkpoint: it checks again at
    // most the batches written after it, not the whole history.
    let _second = s.start(&["--worker-id", "second", "--replication-engine", "native"]);
    let detail = wait_for(
        "the resumed run reported",
        Duration::from_secs(60),
        || async {
            s.reports("r")
                .await
                .iter()
                .find(|r| r["worker"] == "second-replicator")
                .and_then(|r| r["last_success"]["detail"].as_str().map(String::from))
        },
    )
    .await;
    let missing = missing_ids(&s.couch, &dst, &ids).await;
    assert!(missing.is_empty(), "{} missing; {detail}", missing.len());
    let field = |name: &str| -> u64 {
        let key = format!("{name}=");
        detail
            .split(' ')
            .find_map(|kv| kv.strip_prefix(key.as_str()))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} in {detail}"))
    };
    let left = total - present;
    assert!(
        field("missing_checked") <= left + 2 * batch,
        "{present} present at the kill; {detail}"
    );
    assert!(
        field("docs_read") <= left,
        "{present} present at the kill; {detail}"
    );
}

/// Peak resident memory of a process (`VmHWM`), in bytes.
fn peak_rss(pid: u32) -> u64 {
    proc_status_bytes(pid, "VmHWM:")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_grows_by_a_small_multiple_of_the_largest_document() {
    let s = Installation::new("bigmem").await;
    let (src, dst) = (s.db("src"), s.db("dst"));
    s.couch.create_db(&src).await.unwrap();
    s.couch.put_doc(&src, "small", &json!({})).await.unwrap();
    let doc = json!({"type": "replicator", "source": format!("{}/{}", s.url, src),
                     "target": format!("{}/{}", s.url, dst), "create_target": true});
    s.couch.put_doc(&s.spiegel_db, "r", &doc).await.unwrap();
    let worker = s.start(&["--replication-engine", "native"]);
    s.wait_doc(&dst, "small").await;
    let before = peak_rss(worker.child.id());

    let size = 20 * 1024 * 1024;
    let data = incompressible(size);
    let url = format!(
        "{}/{}/big/blob",
        s.url,
        spiegel::couch::encode_segment(&src)
    );
    let put = reqwest::Client::new()
        .put(&url)
        .header("Content-Type", "application/octet-stream")
        .body(data)
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success(), "{}", put.status());
    s.wait_doc(&dst, "big").await;
    let grown = peak_rss(worker.child.id()).saturating_sub(before);
    eprintln!(
        "peak RSS {} MB before, grew by {} MB replicating a {} MB attachment",
        before >> 20,
        grown >> 20,
        size >> 20
    );
    assert!(
        grown <= 8 * size as u64,
        "grew by {} MB for a {} MB document",
        grown >> 20,
        size >> 20
    );
}
