//! The CouchDB client against a real CouchDB-compatible server.

mod common;

use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};
use spiegel::couch::{
    AllDocsQuery, BulkResult, ChangesQuery, CouchError, DbUpdateKind, FeedOptions, Seq,
};

use common::*;

#[tokio::test]
async fn documents_are_created_read_updated_and_deleted_with_revisions() {
    let couch = client_for(&shared_url());
    let db = unique_name("crud");
    assert!(couch.create_db(&db).await.unwrap());
    assert!(
        !couch.create_db(&db).await.unwrap(),
        "second create reports existing"
    );

    let first = couch.put_doc(&db, "doc1", &json!({"n": 1})).await.unwrap();
    let doc: Value = couch.get_doc(&db, "doc1").await.unwrap();
    assert_eq!(doc["n"], 1);
    assert_eq!(doc["_rev"], first.rev.as_str());

    let second = couch
        .put_doc(&db, "doc1", &json!({"_rev": first.rev, "n": 2}))
        .await
        .unwrap();
    let stale = couch
        .put_doc(&db, "doc1", &json!({"_rev": first.rev, "n": 3}))
        .await;
    // On a cluster, a copy that has not received the update yet may accept
    // the stale write: CouchDB then keeps both revisions, in conflict.
    let conflicted = kind() == Kind::Cluster && stale.is_ok();
    assert!(
        matches!(stale, Err(CouchError::Conflict)) || conflicted,
        "{stale:?}"
    );

    couch.delete_doc(&db, "doc1", &second.rev).await.unwrap();
    if let (true, Ok(stale)) = (conflicted, &stale) {
        // A stale write acknowledged by one copy only (202) reaches the
        // others later; until it does, the document reads as deleted and
        // CouchDB refuses to delete it again (404).
        wait_for(
            "the conflicting branch to be deletable",
            Duration::from_secs(30),
            || async { couch.delete_doc(&db, "doc1", &stale.rev).await.ok() },
        )
        .await;
    }
    // On a cluster a deletion acknowledged by one copy (202) reaches the
    // others later: until then a quorum read may still show the branch.
    wait_for(
        "doc1 to read as deleted",
        Duration::from_secs(30),
        || async {
            match couch.get_doc::<Value>(&db, "doc1").await {
                Err(CouchError::DocNotFound { .. }) => Some(()),
                Ok(_) if kind() == Kind::Cluster => None,
                other => panic!("{other:?}"),
            }
        },
    )
    .await;
    assert!(couch
        .get_doc_opt::<Value>(&db, "doc1")
        .await
        .unwrap()
        .is_none());

    // On a cluster doc_count comes from one copy of each shard, which may
    // not have received the deletion yet.
    let info = wait_for("doc_count 0", Duration::from_secs(30), || async {
        let info = couch.db_info(&db).await.unwrap();
        (info.doc_count == 0).then_some(info)
    })
    .await;
    assert_eq!(info.db_name, db);

    couch.delete_db(&db).await.unwrap();
    let missing = couch.db_info(&db).await;
    assert!(
        matches!(missing, Err(CouchError::DbNotFound(_))),
        "{missing:?}"
    );
    let missing_doc = couch.get_doc::<Value>(&db, "x").await;
    assert!(
        matches!(missing_doc, Err(CouchError::DbNotFound(_))),
        "{missing_doc:?}"
    );
}

#[tokio::test]
async fn bulk_docs_answers_per_document_with_conflicts_isolated() {
    let couch = client_for(&shared_url());
    let db = unique_name("bulk");
    couch.create_db(&db).await.unwrap();
    let existing = couch.put_doc(&db, "b", &json!({"v": 0})).await.unwrap();

    let results = couch
        .bulk_docs(
            &db,
            &[
                json!({"_id": "a", "v": 1}),
                json!({"_id": "b", "v": 1}), // no _rev: conflicts with the existing doc
                json!({"_id": "c", "v": 1}),
            ],
            true,
        )
        .await
        .unwrap();
    assert_eq!(results.len(), 3);
    assert!(matches!(&results[0], BulkResult::Written { id, .. } if id == "a"));
    assert!(matches!(&results[2], BulkResult::Written { id, .. } if id == "c"));
    // On a cluster, a copy that has not received "b" yet may accept the
    // write: CouchDB then keeps both revisions, in conflict.
    let conflicted = kind() == Kind::Cluster && !results[1].is_failed();
    assert!(results[1].is_conflict() || conflicted, "{:?}", results[1]);
    if !conflicted {
        let b: Value = couch.get_doc(&db, "b").await.unwrap();
        assert_eq!(
            b["_rev"],
            existing.rev.as_str(),
            "the conflicting write changed nothing"
        );
    }

    let all = couch
        .all_docs(
            &db,
            &AllDocsQuery {
                keys: Some(vec!["a".into(), "missing".into(), "c".into()]),
                include_docs: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(all.rows.len(), 3);
    assert_eq!(all.rows[0].doc.as_ref().unwrap()["v"], 1);
    assert_eq!(all.rows[1].error.as_deref(), Some("not_found"));
    assert_eq!(all.rows[2].id.as_deref(), Some("c"));
    couch.delete_db(&db).await.unwrap();
}

#[tokio::test]
async fn database_names_with_special_characters_round_trip() {
    let couch = client_for(&shared_url());
    let db = unique_name("a/b+c$d(e)-f");
    assert!(couch.create_db(&db).await.unwrap());
    couch
        .put_doc(&db, "id/with+chars", &json!({"x": 1}))
        .await
        .unwrap();
    let doc: Value = couch.get_doc(&db, "id/with+chars").await.unwrap();
    assert_eq!(doc["_id"], "id/with+chars");
    assert_eq!(couch.db_info(&db).await.unwrap().db_name, db);

    let names = couch.all_dbs(Some(&db), Some(5)).await.unwrap();
    assert_eq!(names.first(), Some(&db), "{names:?}");

    // On a cluster, `_changes` may be answered by a copy that has not
    // received the write yet: wait for it.
    let query = ChangesQuery {
        include_docs: true,
        ..Default::default()
    };
    let page = wait_for("the write in _changes", Duration::from_secs(10), || async {
        let page = couch.changes(&db, &query).await.unwrap();
        (!page.results.is_empty()).then_some(page)
    })
    .await;
    assert_eq!(page.results.len(), 1);
    assert_eq!(page.results[0].id, "id/with+chars");
    couch.delete_db(&db).await.unwrap();
    assert!(matches!(
        couch.db_info(&db).await,
        Err(CouchError::DbNotFound(_))
    ));
}

#[tokio::test]
async fn security_object_is_written_and_read() {
    let couch = client_for(&shared_url());
    let db = unique_name("security");
    couch.create_db(&db).await.unwrap();
    let security = json!({
        "admins": {"names": ["spiegel_test_admin"], "roles": ["_admin"]},
        "members": {"names": ["spiegel_test_member"], "roles": ["_admin"]}
    });
    couch.put_security(&db, &security).await.unwrap();
    // On a cluster a read may come from a shard copy that has not received
    // the write yet (it shows CouchDB 3's admin-only default): poll.
    wait_for(
        "the security object read back",
        Duration::from_secs(10),
        || async { (couch.get_security(&db).await.unwrap() == security).then_some(()) },
    )
    .await;
    couch.delete_db(&db).await.unwrap();
}

#[tokio::test]
async fn changes_pages_resume_from_an_opaque_seq() {
    let couch = client_for(&shared_url());
    let db = unique_name("changes");
    couch.create_db(&db).await.unwrap();
    for i in 0..5 {
        couch
            .put_doc(&db, &format!("d{i}"), &json!({"i": i}))
            .await
            .unwrap();
    }
    // On a cluster a page may come from a copy that has not received every
    // write yet: read both pages again until they hold all five.
    let (first, rest) = wait_for(
        "two pages holding all five",
        Duration::from_secs(10),
        || async {
            let first = couch
                .changes(
                    &db,
                    &ChangesQuery {
                        limit: Some(2),
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            let query = ChangesQuery {
                since: Some(first.last_seq.clone()),
                include_docs: true,
                ..Default::default()
            };
            let rest = couch.changes(&db, &query).await.unwrap();
            (first.results.len() + rest.results.len() >= 5).then_some((first, rest))
        },
    )
    .await;
    assert_eq!(first.results.len(), 2);
    let mut ids: Vec<String> = first
        .results
        .iter()
        .chain(&rest.results)
        .map(|c| c.id.clone())
        .collect();
    ids.sort();
    assert_eq!(ids, ["d0", "d1", "d2", "d3", "d4"]);
    assert!(rest.results.iter().all(|c| c.doc.is_some()));
    couch.delete_db(&db).await.unwrap();
}

#[tokio::test]
async fn db_updates_reports_created_updated_deleted_and_resumes_after_since() {
    let couch = client_for(&shared_url());
    couch.create_db("_global_changes").await.unwrap();
    let start = couch
        .db_updates(Some(&Seq::now()), None)
        .await
        .unwrap()
        .last_seq;
    let db = unique_name("updates");
    let options = FeedOptions {
        heartbeat: Duration::from_millis(500),
        ..Default::default()
    };
    let mut feed = couch.db_updates_feed(Some(start.clone()), options);

    // Events of one database can come out of order, or again, across
    // shards (a cluster sent an `updated` before its `created`): wait for
    // each kind.
    let mut next_event_for = async |db: &str, kind: DbUpdateKind| loop {
        let update = tokio::time::timeout(Duration::from_secs(20), feed.next())
            .await
            .expect("an event within 20 s")
            .expect("feed open")
            .expect("no feed error");
        if update.db_name == db && update.kind == kind {
            return update;
        }
    };

    couch.create_db(&db).await.unwrap();
    next_event_for(&db, DbUpdateKind::Created).await;
    couch.put_doc(&db, "x", &json!({})).await.unwrap();
    next_event_for(&db, DbUpdateKind::Updated).await;
    couch.delete_db(&db).await.unwrap();
    next_event_for(&db, DbUpdateKind::Deleted).await;

    // From an old seq CouchDB keeps at most the latest event of each kind
    // per database (its _global_changes docs are "<kind>:<db>"): no
    // repeats, and the deletion is there.
    let page = couch.db_updates(Some(&start), None).await.unwrap();
    let ours: Vec<&DbUpdateKind> = page
        .results
        .iter()
        .filter(|u| u.db_name == db)
        .map(|u| &u.kind)
        .collect();
    assert!(ours.contains(&&DbUpdateKind::Deleted), "{ours:?}");
    let mut kinds = ours.clone();
    kinds.dedup();
    assert_eq!(kinds.len(), ours.len(), "no kind repeated: {ours:?}");

    // Resuming after the last event leaves nothing of ours. (Not on a
    // cluster: there `since` may rewind to an older point of a shard copy
    // other than the one that issued the seq, and CouchDB sends again.)
    if kind() == Kind::Cluster {
        return;
    }
    let after = couch.db_updates(Some(&page.last_seq), None).await.unwrap();
    assert!(
        after.results.iter().all(|u| u.db_name != db),
        "{:?}",
        after.results
    );
}

#[tokio::test]
#[cfg_attr(
    spiegel_test_server = "external",
    ignore = "owns its CouchDB: kills and restarts it"
)]
async fn continuous_changes_survive_a_server_kill_and_restart() {
    let mut server = OwnServer::start();
    let couch = client_for(&server.url());
    let db = unique_name("survive");
    couch.create_db(&db).await.unwrap();
    for i in 0..5 {
        couch
            .put_doc(&db, &format!("before{i}"), &json!({}))
            .await
            .unwrap();
    }
    let options = FeedOptions {
        heartbeat: Duration::from_millis(200),
        max_reconnect_delay: Duration::from_millis(500),
        ..Default::default()
    };
    let reconnects = options.reconnects.clone();
    let mut feed = couch.changes_feed(&db, &ChangesQuery::default(), options);
    let mut seen = Vec::new();
    while seen.len() < 5 {
        let change = tokio::time::timeout(Duration::from_secs(10), feed.next())
            .await
            .expect("change before the kill")
            .unwrap()
            .unwrap();
        seen.push(change.id);
    }

    server.kill();
    // The feed keeps trying while the server is down.
    let reading = tokio::spawn(async move {
        let mut after = Vec::new();
        while after.len() < 5 {
            match feed.next().await {
                Some(Ok(change)) => after.push(change.id),
                other => panic!("feed ended: {other:?}"),
            }
        }
        after
    });
    wait_for("a reconnect attempt", Duration::from_secs(10), || {
        let n = reconnects.load(std::sync::atomic::Ordering::Relaxed);
        async move { (n > 0).then_some(()) }
    })
    .await;
    server.restart();
    let couch = client_for(&server.url());
    for i in 0..5 {
        couch
            .put_doc(&db, &format!("after{i}"), &json!({}))
            .await
            .unwrap();
    }
    let mut after = tokio::time::timeout(Duration::from_secs(30), reading)
        .await
        .expect("changes after the restart")
        .unwrap();
    after.sort();
    assert_eq!(
        after,
        ["after0", "after1", "after2", "after3", "after4"],
        "no change lost or replayed"
    );
}

#[tokio::test]
async fn continuous_feed_of_a_missing_database_ends_with_db_not_found() {
    let couch = client_for(&shared_url());
    let db = unique_name("nofeed");
    let mut feed = couch.changes_feed(&db, &ChangesQuery::default(), FeedOptions::default());
    let first = tokio::time::timeout(Duration::from_secs(10), feed.next())
        .await
        .unwrap();
    assert!(
        matches!(first, Some(Err(CouchError::DbNotFound(_)))),
        "{first:?}"
    );
    assert!(feed.next().await.is_none());
}

#[tokio::test]
async fn wrong_credentials_are_unauthorized_not_transient() {
    let url = shared_url();
    let mut parsed = url::Url::parse(&url).unwrap();
    if parsed.username().is_empty() {
        eprintln!("skipped: the server has no admin");
        return;
    }
    parsed.set_password(Some("wrong-password")).unwrap();
    let couch = client_for(parsed.as_str());
    let err = couch.db_updates(None, Some(1)).await.unwrap_err();
    assert!(matches!(err, CouchError::Unauthorized(_)), "{err:?}");
    assert!(!err.to_string().contains("wrong-password"));
}

#[tokio::test]
async fn a_feed_the_server_closes_at_once_is_reopened_with_backoff_not_in_a_loop() {
    // Answers every request with 200 and an empty body: each feed
    // connection is closed cleanly as soon as it opens.
    let (receiver, url) = Receiver::start().await;
    let couch = client_for(&url);
    let options = FeedOptions {
        heartbeat: Duration::from_millis(500),
        max_reconnect_delay: Duration::from_millis(500),
        ..Default::default()
    };
    let mut feed = couch.db_updates_feed(None, options);
    let watched = Duration::from_secs(3);
    let read = tokio::time::timeout(watched, feed.next()).await;
    assert!(read.is_err(), "nothing to read: {read:?}");
    // Each wait of the backoff is at least 0.125 s (0.25 s, then 0.5 s,
    // each drawn from [w/2, w]): at most 1 + 3 / 0.125 connections in 3 s.
    let opened = receiver.on("/_db_updates").len();
    assert!(
        (2..=25).contains(&opened),
        "{opened} connections in {watched:?}"
    );
}

#[tokio::test]
async fn a_document_id_dot_dot_is_read_in_bulk_and_never_addresses_the_parent_path() {
    let couch = client_for(&shared_url());
    let db = unique_name("dots");
    couch.create_db(&db).await.unwrap();
    let docs = [json!({"_id": "..", "n": 2}), json!({"_id": ".", "n": 1})];
    let written = couch.bulk_docs(&db, &docs, true).await.unwrap();
    assert!(written.iter().all(|r| !r.is_failed()), "{written:?}");
    let query = AllDocsQuery {
        keys: Some(vec!["..".into(), ".".into()]),
        include_docs: true,
        ..Default::default()
    };
    let rows = couch.all_docs(&db, &query).await.unwrap().rows;
    let read: Vec<(Option<String>, Value)> = rows
        .into_iter()
        .map(|r| (r.id, r.doc.map_or(Value::Null, |d| d["n"].clone())))
        .collect();
    assert_eq!(
        read,
        [(Some("..".into()), json!(2)), (Some(".".into()), json!(1))]
    );
    // A path would name the server (`/db/..`) or the database (`/db/.`),
    // whatever the encoding: refused, never read as the document.
    for id in ["..", "."] {
        let refused = |e: &CouchError| e.to_string().contains("cannot be sent in a URL path");
        let got = couch.get_doc::<Value>(&db, id).await;
        assert!(got.as_ref().is_err_and(refused), "{id}: {got:?}");
        let put = couch.put_doc(&db, id, &json!({"n": 3})).await;
        assert!(put.as_ref().is_err_and(refused), "{id}: {put:?}");
    }
}
