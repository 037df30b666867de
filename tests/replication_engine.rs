//! The native replication engine through the library, against a real
//! server: resuming after a run cut short, and large attachments.

mod common;

use std::time::Duration;

use serde_json::{json, Map, Value};
use spiegel::couch::{CouchClient, SecretUrl};
use spiegel::replication::{Options, Peer, Progress, Replication};

use common::*;

/// A replication from `source` to `target` of the shared server, with the
/// `_replicate` parameters `params`.
fn replication(couch: &CouchClient, source: &str, target: &str, params: Value) -> Replication {
    let peer = |db: &str| {
        let url = SecretUrl::parse(&format!("{}/{}", shared_url(), db)).unwrap();
        Peer::at(couch, &url).unwrap()
    };
    let params: Map<String, Value> = params.as_object().cloned().unwrap_or_default();
    Replication {
        source: peer(source),
        target: peer(target),
        options: Options::parse(&params).unwrap(),
    }
}

async fn doc_count(couch: &CouchClient, db: &str) -> u64 {
    couch.db_info(db).await.map(|i| i.doc_count).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_cut_short_resumes_from_its_checkpoint_and_fetches_only_what_is_missing() {
    let couch = client_for(&shared_url());
    let (source, target) = (unique_name("cut_src"), unique_name("cut_dst"));
    couch.create_db(&source).await.unwrap();
    let docs: Vec<Value> = (0..500)
        .map(|i| json!({"_id": format!("d{i:03}"), "i": i}))
        .collect();
    couch.bulk_docs(&source, &docs, true).await.unwrap();
    let params = json!({"create_target": true, "worker_batch_size": 10});

    // The first run is cut short (its future dropped, as a killed process
    // stops) once a few batches have reached the target.
    let first = replication(&couch, &source, &target, params.clone());
    let run = tokio::spawn(async move { first.run(None).await.map(|_| ()) });
    let cut = wait_for("a few batches written", Duration::from_secs(60), || {
        let ended = run.is_finished();
        let couch = &couch;
        let target = &target;
        async move {
            if ended {
                return Some(false);
            }
            (doc_count(couch, target).await >= 150).then_some(true)
        }
    })
    .await;
    run.abort();
    let ended = run.await;
    assert!(cut, "the first run ended before it was cut: {ended:?}");
    let present = doc_count(&couch, &target).await;
    assert!(
        present < 500,
        "cut short before the end ({present} written)"
    );

    // The second run reads the changes since the checkpoint (at most one
    // batch before what was written) and fetches only what is missing.
    let second = replication(&couch, &source, &target, params);
    let (report, _) = second.run(None).await.unwrap();
    assert_eq!(doc_count(&couch, &target).await, 500);
    // The batch in flight at the cut may still land after `present` was
    // counted (the server finishes a request its client dropped).
    let left = 500 - present;
    assert!(
        (left - 10..=left).contains(&report.docs_read),
        "{present} present after the cut: {report:?}"
    );
    assert_eq!(report.missing_found, report.docs_read, "{report:?}");
    assert!(
        report.missing_checked <= 500 - present + 2 * 10,
        "changes read again from the checkpoint, not from the start: {report:?}"
    );
    // A third run finds nothing to do.
    let third = replication(&couch, &source, &target, json!({}));
    let (report, _) = third.run(None).await.unwrap();
    assert_eq!(
        (report.missing_checked, report.docs_read),
        (0, 0),
        "{report:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_20_mb_attachment_replicates_intact() {
    let couch = client_for(&shared_url());
    let (source, target) = (unique_name("big_src"), unique_name("big_dst"));
    couch.create_db(&source).await.unwrap();
    let data = incompressible(20 * 1024 * 1024);
    let url = format!(
        "{}/{}/big/blob",
        shared_url(),
        spiegel::couch::encode_segment(&source)
    );
    let put = reqwest::Client::new()
        .put(&url)
        .header("Content-Type", "application/octet-stream")
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success(), "{}", put.status());

    let (report, _) = replication(&couch, &source, &target, json!({"create_target": true}))
        .run(None)
        .await
        .unwrap();
    assert_eq!(report.docs_written, 1, "{report:?}");
    let url = format!(
        "{}/{}/big/blob",
        shared_url(),
        spiegel::couch::encode_segment(&target)
    );
    let copied = reqwest::get(&url).await.unwrap().bytes().await.unwrap();
    assert_eq!(copied.len(), data.len());
    assert!(copied.as_ref() == data.as_slice(), "the bytes differ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_batch_run_records_its_checkpoint_at_most_every_checkpoint_interval() {
    let couch = client_for(&shared_url());
    let (source, target) = (unique_name("ival_src"), unique_name("ival_dst"));
    couch.create_db(&source).await.unwrap();
    let params = json!({"create_target": true});
    let run = |params: Value, known: Option<Progress>| {
        let replication = replication(&couch, &source, &target, params);
        async move { replication.run(known).await.unwrap() }
    };
    couch.put_doc(&source, "a", &json!({})).await.unwrap();
    // The first run finds no checkpoint: it records one.
    let (report, known) = run(params.clone(), None).await;
    assert_eq!(report.missing_checked, 1);
    // The next one-batch runs come within the default 30 s: they record
    // nothing, and each goes on where the one before ended.
    couch.put_doc(&source, "b", &json!({})).await.unwrap();
    let (report, known) = run(params.clone(), known).await;
    assert_eq!(report.missing_checked, 1, "b only: {report:?}");
    couch.put_doc(&source, "c", &json!({})).await.unwrap();
    let (report, _) = run(params.clone(), known).await;
    assert_eq!(report.missing_checked, 1, "c only: {report:?}");
    // Another process (no progress in memory) starts from the recorded
    // checkpoint: b and c are checked again, and not fetched.
    couch.put_doc(&source, "d", &json!({})).await.unwrap();
    let (report, _) = run(params.clone(), None).await;
    assert!(report.missing_checked >= 3, "b, c again, and d: {report:?}");
    assert_eq!(report.docs_read, 1, "only d is fetched: {report:?}");
    // With a short interval, every run records: the one after it checks
    // only what came since.
    let every = json!({"create_target": true, "checkpoint_interval": 1});
    run(every.clone(), None).await;
    couch.put_doc(&source, "e", &json!({})).await.unwrap();
    let (report, _) = run(every, None).await;
    assert!(report.missing_checked < 3, "{report:?}");
    assert_eq!(doc_count(&couch, &target).await, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_in_memory_is_not_trusted_once_the_target_is_created_again() {
    let couch = client_for(&shared_url());
    let (source, target) = (unique_name("again_src"), unique_name("again_dst"));
    couch.create_db(&source).await.unwrap();
    let params = json!({"create_target": true});
    let run = |known: Option<Progress>| {
        let replication = replication(&couch, &source, &target, params.clone());
        async move { replication.run(known).await.unwrap() }
    };
    for id in ["a", "b", "c"] {
        couch.put_doc(&source, id, &json!({})).await.unwrap();
    }
    let (_, known) = run(None).await;
    assert!(known.is_some(), "the first run recorded a checkpoint");
    // The target is deleted and created again (here by the next run's
    // create_target): its checkpoint went with it, so the run starts from
    // the beginning instead of where the last run ended.
    couch.delete_db(&target).await.unwrap();
    couch.put_doc(&source, "d", &json!({})).await.unwrap();
    let (report, _) = run(known).await;
    assert_eq!(report.docs_written, 4, "{report:?}");
    assert_eq!(doc_count(&couch, &target).await, 4);
}
