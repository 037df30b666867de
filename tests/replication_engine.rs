//! The native replication engine through the library, against a real
//! server: resuming after a run cut short, and large attachments.

mod common;

use std::time::Duration;

use serde_json::{json, Map, Value};
use spiegel::couch::{ChangesQuery, CouchClient, SecretUrl, Seq};
use spiegel::replication::{Options, Peer, Progress, Replication, ReplicationError, Report};

use common::*;

/// One run of `replication` under its id, from `known` progress.
async fn run_once(
    replication: &Replication,
    known: Option<Progress>,
) -> Result<(Report, Option<Progress>), ReplicationError> {
    let id = replication.id().await?;
    replication.run(&id, known).await
}

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
        group: None,
    }
}

/// How many of `ids` `db` holds (see [`missing_ids`]).
async fn present<S: AsRef<str>>(couch: &CouchClient, db: &str, ids: &[S]) -> u64 {
    (ids.len() - missing_ids(couch, db, ids).await.len()) as u64
}

/// Writes `id` to `db` and waits until `_changes` after `since` shows it: on
/// a cluster the copy a feed reads may not have a write yet (it comes
/// with the copy's own update event), and these tests count what one run
/// reads.
async fn write_visible(couch: &CouchClient, db: &str, id: &str, since: Option<&Seq>) {
    couch.put_doc(db, id, &json!({})).await.unwrap();
    let query = ChangesQuery {
        since: since.cloned(),
        ..Default::default()
    };
    wait_for("the write in _changes", Duration::from_secs(10), || async {
        let page = couch.changes(db, &query).await.ok()?;
        page.results.iter().any(|c| c.id == id).then_some(())
    })
    .await;
}

/// Documents of the cut-short run: enough batches that the run cannot end
/// between two looks at the target.
const TOTAL: u64 = 2000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_cut_short_resumes_from_its_checkpoint_and_fetches_only_what_is_missing() {
    let couch = client_for(&shared_url());
    let (source, target) = (unique_name("cut_src"), unique_name("cut_dst"));
    couch.create_db(&source).await.unwrap();
    let ids: Vec<String> = (0..TOTAL).map(|i| format!("d{i:04}")).collect();
    let docs: Vec<Value> = ids.iter().map(|id| json!({"_id": id})).collect();
    couch.bulk_docs(&source, &docs, true).await.unwrap();
    let params = json!({"create_target": true, "worker_batch_size": 10});

    // The first run is cut short (its future dropped, as a killed process
    // stops) once a few batches have reached the target. Watched on the
    // first documents written, which come first in each shard's changes:
    // reading all of them by id, on a cluster, takes longer than the run.
    let first = replication(&couch, &source, &target, params.clone());
    let run = tokio::spawn(async move { run_once(&first, None).await.map(|_| ()) });
    let watched = &ids[..200];
    let cut = wait_for("a few batches written", Duration::from_secs(60), || {
        let ended = run.is_finished();
        let couch = &couch;
        let target = &target;
        async move {
            if ended {
                return Some(false);
            }
            (present(couch, target, watched).await >= 100).then_some(true)
        }
    })
    .await;
    run.abort();
    let ended = run.await;
    assert!(cut, "the first run ended before it was cut: {ended:?}");
    let written = present(&couch, &target, &ids).await;
    assert!(
        written < TOTAL,
        "cut short before the end ({written} written)"
    );

    // The second run reads the changes since the checkpoint (at most one
    // batch before what was written) and fetches only what is missing.
    let second = replication(&couch, &source, &target, params);
    let (report, _) = run_once(&second, None).await.unwrap();
    assert_eq!(present(&couch, &target, &ids).await, TOTAL);
    // The batch in flight at the cut may still land after `written` was
    // counted (the server finishes a request its client dropped).
    let left = TOTAL - written;
    assert!(
        (left - 10..=left).contains(&report.docs_read),
        "{written} present after the cut: {report:?}"
    );
    assert_eq!(report.missing_found, report.docs_read, "{report:?}");
    assert!(
        report.missing_checked <= TOTAL - written + 2 * 10,
        "changes read again from the checkpoint, not from the start: {report:?}"
    );
    // A third run finds nothing to do.
    let third = replication(&couch, &source, &target, json!({}));
    let (report, _) = run_once(&third, None).await.unwrap();
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

    let created = replication(&couch, &source, &target, json!({"create_target": true}));
    let (report, _) = run_once(&created, None).await.unwrap();
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
        async move { run_once(&replication, known).await.unwrap() }
    };
    write_visible(&couch, &source, "a", None).await;
    // The first run finds no checkpoint: it records one.
    let (report, known) = run(params.clone(), None).await;
    assert_eq!(report.missing_checked, 1);
    // The next one-batch runs come within the default 30 s: they record
    // nothing, and each goes on where the one before ended.
    write_visible(&couch, &source, "b", report.last_seq.as_ref()).await;
    let (report, known) = run(params.clone(), known).await;
    assert_eq!(report.missing_checked, 1, "b only: {report:?}");
    write_visible(&couch, &source, "c", report.last_seq.as_ref()).await;
    let (report, _) = run(params.clone(), known).await;
    assert_eq!(report.missing_checked, 1, "c only: {report:?}");
    // Another process (no progress in memory) starts from the recorded
    // checkpoint: b and c are checked again, and not fetched.
    write_visible(&couch, &source, "d", report.last_seq.as_ref()).await;
    let (report, _) = run(params.clone(), None).await;
    assert!(report.missing_checked >= 3, "b, c again, and d: {report:?}");
    assert_eq!(report.docs_read, 1, "only d is fetched: {report:?}");
    // With a short interval, every run records: the one after it checks
    // only what came since.
    let every = json!({"create_target": true, "checkpoint_interval": 1});
    let (report, _) = run(every.clone(), None).await;
    write_visible(&couch, &source, "e", report.last_seq.as_ref()).await;
    let (report, _) = run(every, None).await;
    assert!(report.missing_checked < 3, "{report:?}");
    assert_eq!(
        present(&couch, &target, &["a", "b", "c", "d", "e"]).await,
        5
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_in_memory_is_not_trusted_once_the_target_is_created_again() {
    let couch = client_for(&shared_url());
    let (source, target) = (unique_name("again_src"), unique_name("again_dst"));
    couch.create_db(&source).await.unwrap();
    let params = json!({"create_target": true});
    let run = |known: Option<Progress>| {
        let replication = replication(&couch, &source, &target, params.clone());
        async move { run_once(&replication, known).await.unwrap() }
    };
    for id in ["a", "b", "c"] {
        write_visible(&couch, &source, id, None).await;
    }
    let (_, known) = run(None).await;
    assert!(known.is_some(), "the first run recorded a checkpoint");
    // The target is deleted and created again (here by the next run's
    // create_target): its checkpoint went with it, so the run starts from
    // the beginning instead of where the last run ended.
    couch.delete_db(&target).await.unwrap();
    write_visible(&couch, &source, "d", None).await;
    let (report, _) = run(known).await;
    assert_eq!(report.docs_written, 4, "{report:?}");
    assert_eq!(present(&couch, &target, &["a", "b", "c", "d"]).await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_with_the_ids_dot_and_dot_dot_replicate_intact() {
    let couch = client_for(&shared_url());
    let (source, target) = (unique_name("dots_src"), unique_name("dots_dst"));
    couch.create_db(&source).await.unwrap();
    // No request path can name them: written, and read back, in bulk.
    let docs = [json!({"_id": "..", "n": 2}), json!({"_id": ".", "n": 1})];
    let written = couch.bulk_docs(&source, &docs, true).await.unwrap();
    assert!(written.iter().all(|r| !r.is_failed()), "{written:?}");

    let created = replication(&couch, &source, &target, json!({"create_target": true}));
    let (report, _) = run_once(&created, None).await.unwrap();
    assert_eq!(report.docs_written, 2, "{report:?}");
    let query = spiegel::couch::AllDocsQuery {
        keys: Some(vec![".".into(), "..".into()]),
        include_docs: true,
        ..Default::default()
    };
    let read = |db: String| {
        let (couch, query) = (couch.clone(), query.clone());
        async move {
            let rows = couch.all_docs_raw(&db, &query).await.unwrap().rows;
            let docs = rows.into_iter().map(|r| r.doc.map(|d| d.get().to_string()));
            docs.collect::<Vec<_>>()
        }
    };
    let copied = read(target).await;
    assert!(copied.iter().all(Option::is_some), "{copied:?}");
    assert_eq!(copied, read(source).await, "the same bodies, byte for byte");
}
