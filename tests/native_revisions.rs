//! No revision skipped, on the native engine. A revision that `_bulk_get`
//! does not give (an error in its place, left out of the answer, or an
//! answer of another shape) is fetched on its own with `GET
//! /{db}/{id}?open_revs=`; one that the source says is missing there too is
//! tried again after CouchDB's `missing_doc_retry_msec` (2 s), and otherwise
//! the run fails without recording a checkpoint past it, and is retried.
//! Only a write the target refuses for good (a validate function, a
//! document too large for it) is counted in `doc_write_failures`, named in
//! the status, and passed over, as CouchDB's replicator passes it over.
//!
//! A request the target finds too large (413) is split in halves until
//! the revision it refuses is alone: the others go through.
//!
//! Spiegel reaches the server through a [`RewritingProxy`] (the worker's
//! `--url`, and the replicator document's source and target: a source on
//! another server than `--url` would never be triggered). The proxy
//! rewrites the answers about one document.

mod common;

use std::time::Duration;

use serde_json::{json, Value};
use spiegel::couch::{encode_segment, BulkResult, ChangesQuery, Seq};

use common::*;

/// How long a revision may take to reach the target.
const DEADLINE: Duration = Duration::from_secs(30);

/// The replicator document's id in the spiegel database.
const REPLICATOR_DOC: &str = "r";

/// The document whose fetch the proxy spoils.
const VICTIM: &str = "victim";

/// A source and a target on a fresh installation, and a replicator worker
/// that reaches the server through the proxy.
struct Run {
    s: Installation,
    proxy: RewritingProxy,
    src: String,
    dst: String,
    /// The worker's Prometheus metrics.
    metrics: String,
    _worker: Spiegel,
}

impl Run {
    async fn start(label: &str) -> Run {
        init_logs();
        let s = Installation::new(label).await;
        let (src, dst) = (s.db("src"), s.db("dst"));
        for db in [&src, &dst] {
            s.couch.create_db(db).await.expect("create a database");
        }
        let proxy = RewritingProxy::start(&s.url).await;
        let admin = format!("127.0.0.1:{}", free_port());
        let args = ["--backoff-delay", "0.2", "--admin-addr", &admin];
        let worker = s.start_worker_at(&proxy.url(&s.url), "replicator", &args);
        Run {
            s,
            proxy,
            src,
            dst,
            metrics: format!("http://{admin}/metrics"),
            _worker: worker,
        }
    }

    /// Writes the replicator document: the native engine, from the source
    /// to the target, both through the proxy, recording a checkpoint every run
    /// (`checkpoint_interval` 1 ms).
    async fn replicate(&self) {
        let server = self.s.url.trim_end_matches('/');
        let doc = json!({
            "type": "replicator",
            "source": format!("{}/{}", self.proxy.url(server), encode_segment(&self.src)),
            "target": format!("{}/{}", self.proxy.url(server), encode_segment(&self.dst)),
            "engine": "native",
            "checkpoint_interval": 1,
        });
        self.s
            .couch
            .put_doc(&self.s.spiegel_db, REPLICATOR_DOC, &doc)
            .await
            .expect("the replicator document");
    }

    /// Writes documents `ids` to the source in one request (so one batch
    /// of changes); returns each id with its revision.
    async fn write(&self, ids: &[&str]) -> Vec<(String, String)> {
        let docs: Vec<Value> = ids.iter().map(|id| json!({"_id": id, "v": 1})).collect();
        let written = self.s.couch.bulk_docs(&self.src, &docs, true).await;
        written
            .expect("write to the source")
            .into_iter()
            .map(|result| match result {
                BulkResult::Written { id, rev, .. } => (id, rev),
                failed => panic!("a write to the source failed: {failed:?}"),
            })
            .collect()
    }

    /// The winning revision of `id` in the target, if it is there.
    async fn target_rev(&self, id: &str) -> Option<String> {
        let doc = self.s.couch.get_doc_opt::<Value>(&self.dst, id).await;
        let rev = doc.ok()??["_rev"].as_str()?.to_string();
        Some(rev)
    }

    /// Waits until revision `rev` of `id` is the target's.
    async fn wait_arrived(&self, id: &str, rev: &str) {
        let what = format!("{id} {rev} in the target");
        wait_for(&what, DEADLINE, || async {
            (self.target_rev(id).await.as_deref() == Some(rev)).then_some(())
        })
        .await
    }

    /// Waits until the proxy has rewritten an answer of the kind `fault`.
    async fn wait_injected(&self, fault: Fault) {
        let what = format!("{fault:?} injected");
        wait_for(&what, DEADLINE, || async {
            (self.proxy.injected(fault) > 0).then_some(())
        })
        .await
    }

    /// The id of the replication's checkpoints (`_local/<replication id>`
    /// on both sides), as the engine asked the source for it.
    fn checkpoint_id(&self) -> Option<String> {
        self.proxy.checkpoint_id(&self.src)
    }

    /// Whether the source's changes since `seq` (a checkpoint's
    /// `source_last_seq`) hold document `id`.
    async fn changed_since(&self, seq: &Value, id: &str) -> bool {
        let query = ChangesQuery {
            since: Some(Seq::from(seq.clone())),
            ..ChangesQuery::default()
        };
        let page = self.s.couch.changes(&self.src, &query).await;
        let page = page.expect("the source's changes");
        page.results.iter().any(|change| change.id == id)
    }

    /// Waits until the target holds a checkpoint that satisfies `ok`.
    async fn wait_checkpoint(&self, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
        wait_for(what, DEADLINE, || async {
            let id = self.checkpoint_id()?;
            let checkpoint = self.s.couch.get_doc_opt::<Value>(&self.dst, &id).await;
            checkpoint.ok()?.filter(&ok)
        })
        .await
    }

    /// Waits until a worker reports something about the replicator
    /// document that `found` finds.
    async fn wait_report<T>(&self, what: &str, found: impl Fn(&Value) -> Option<T>) -> T {
        wait_for(what, DEADLINE, || async {
            self.s.reports(REPLICATOR_DOC).await.iter().find_map(&found)
        })
        .await
    }

    /// The worker's replication counter `name` (`docs_written`...), over
    /// all its runs.
    async fn total(&self, name: &str) -> Option<u64> {
        let series = format!("spiegel_replication_{name}_total{{role=\"replicator\"}} ");
        let (_, text) = http_get(&self.metrics).await?;
        text.lines()
            .find_map(|line| line.strip_prefix(&series)?.parse().ok())
    }

    /// Waits until the worker's counter `name` is at least `least`.
    async fn wait_total(&self, name: &str, least: u64) {
        let what = format!("{name} at {least} in the metrics");
        wait_for(&what, DEADLINE, || async {
            (self.total(name).await? >= least).then_some(())
        })
        .await
    }
}

/// The `history[0]` counter `name` of a checkpoint (0 if absent).
fn counter(checkpoint: &Value, name: &str) -> u64 {
    checkpoint["history"][0][name].as_u64().unwrap_or(0)
}

/// `fault` spoils every `_bulk_get` of the victim: the victim and the
/// document written with it must still reach the target.
async fn fetched_on_its_own_despite(fault: Fault, label: &str) {
    let run = Run::start(label).await;
    run.replicate().await;
    run.proxy.inject(fault, VICTIM, FOREVER);
    let revs = run.write(&[VICTIM, "bystander"]).await;
    run.wait_injected(fault).await;
    for (id, rev) in &revs {
        run.wait_arrived(id, rev).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revision_bulk_get_answers_with_an_error_is_fetched_on_its_own() {
    fetched_on_its_own_despite(Fault::BulkGetError, "bgerror").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revision_left_out_of_bulk_gets_answer_is_fetched_on_its_own() {
    fetched_on_its_own_despite(Fault::BulkGetDropped, "bgdropped").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revisions_of_a_bulk_get_answer_of_another_shape_are_fetched_on_their_own() {
    fetched_on_its_own_despite(Fault::BulkGetUnexpected, "bgshape").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revision_the_source_says_is_missing_fails_the_run_and_no_checkpoint_passes_it() {
    let run = Run::start("missing").await;
    run.replicate().await;
    for (id, rev) in run.write(&["first"]).await {
        run.wait_arrived(&id, &rev).await;
    }
    let what = "the checkpoint of the run that copied the first document";
    let before = run
        .wait_checkpoint(what, |c| counter(c, "docs_written") >= 1)
        .await;

    // `_bulk_get` gives an error for the victim, and `open_revs` says it is
    // missing: every run fails.
    run.proxy.inject(Fault::BulkGetError, VICTIM, FOREVER);
    run.proxy.inject(Fault::OpenRevsMissing, VICTIM, FOREVER);
    let revs = run.write(&[VICTIM]).await;
    let src = run.src.clone();
    let error = run
        .wait_report("a failed run in spiegel status", |r| {
            r["errors"][&src]["detail"].as_str().map(String::from)
        })
        .await;
    let asked = run.proxy.injected_at(Fault::OpenRevsMissing);
    assert!(
        asked.len() >= 2,
        "fetched on its own, and again: {} times; the failure: {error}",
        asked.len()
    );
    assert!(
        asked[1].duration_since(asked[0]) >= Duration::from_secs(1),
        "tried again after about 2 s: {:?}",
        asked[1].duration_since(asked[0])
    );
    let id = run.checkpoint_id().expect("the checkpoint's id");
    let now = run.s.couch.get_doc::<Value>(&run.dst, &id).await;
    let now = now.expect("the target's checkpoint");
    assert!(
        run.changed_since(&now["source_last_seq"], VICTIM).await,
        "no checkpoint past the missing revision: {now:#}"
    );
    assert_eq!(run.target_rev(VICTIM).await, None);

    // The source gives it again: it arrives, and the checkpoint moves on.
    run.proxy.clear();
    for (id, rev) in &revs {
        run.wait_arrived(id, rev).await;
    }
    run.wait_checkpoint("the checkpoint past the victim", |c| {
        c["source_last_seq"] != before["source_last_seq"]
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revision_the_target_forbids_is_counted_and_passed_over() {
    let run = Run::start("forbidden").await;
    let guard = json!({"validate_doc_update":
        "function(doc) { if (doc._id.indexOf('forbidden') === 0) { throw({forbidden: 'not here'}); } }"});
    run.s
        .couch
        .put_doc(&run.dst, "_design/guard", &guard)
        .await
        .expect("the target's validate function");
    run.replicate().await;
    // One with an attachment too: its streamed write is refused as a
    // proxy could refuse it, and `_bulk_docs` tells the function's refusal.
    let attached =
        json!({"_attachments": {"a.txt": {"content_type": "text/plain", "data": "aGk="}}});
    run.s
        .couch
        .put_doc(&run.src, "forbidden-att", &attached)
        .await
        .expect("a document with an attachment");
    let revs = run.write(&["a", "forbidden", "b"]).await;
    for (id, rev) in revs.iter().filter(|(id, _)| id != "forbidden") {
        run.wait_arrived(id, rev).await;
    }
    run.wait_total("doc_write_failures", 2).await;
    assert_eq!(run.target_rev("forbidden").await, None);
    assert_eq!(run.target_rev("forbidden-att").await, None);

    // Passed over: the run recorded its checkpoint past it, and the next
    // run goes on from there without writing it again. (The counts of a
    // run's report in `spiegel status` are those of the worker's last run,
    // which may be one that found nothing new.)
    let what = "a checkpoint with the refused write";
    run.wait_checkpoint(what, |c| counter(c, "doc_write_failures") == 2)
        .await;
    for (id, rev) in run.write(&["c"]).await {
        run.wait_arrived(&id, &rev).await;
    }
    run.wait_total("docs_written", 3).await;
    let failures = run.total("doc_write_failures").await;
    assert_eq!(failures, Some(2), "each refused write was tried once");
}

#[tokio::test]
async fn a_document_too_large_for_the_target_is_named_in_the_status_and_passed_over_while_its_batch_goes_through(
) {
    let run = Run::start("rev-413").await;
    run.proxy.inject(Fault::BulkDocsTooLarge, VICTIM, FOREVER);
    run.replicate().await;
    let revs = run.write(&["a", VICTIM, "b"]).await;
    for (id, rev) in revs.iter().filter(|(id, _)| id != VICTIM) {
        run.wait_arrived(id, rev).await;
    }
    run.wait_total("doc_write_failures", 1).await;
    assert_eq!(run.target_rev(VICTIM).await, None);
    let what = "the refused document named in the status";
    let named = wait_for(what, DEADLINE, || async {
        let reports = run.s.reports(REPLICATOR_DOC).await;
        let passed = reports.iter().find_map(|r| {
            let detail = r["passed_over"][&run.src]["detail"].as_str()?;
            Some(detail.to_string())
        });
        passed
    })
    .await;
    assert!(
        named.contains(VICTIM) && named.contains("too large"),
        "{named}"
    );

    // Never retried forever: the run recorded its checkpoint past it, and
    // the next one goes on without sending it again.
    let what = "a checkpoint with the refused write";
    run.wait_checkpoint(what, |c| counter(c, "doc_write_failures") == 1)
        .await;
    let refusals = run.proxy.injected(Fault::BulkDocsTooLarge);
    for (id, rev) in run.write(&["c"]).await {
        run.wait_arrived(&id, &rev).await;
    }
    assert_eq!(run.proxy.injected(Fault::BulkDocsTooLarge), refusals);
    assert_eq!(run.total("doc_write_failures").await, Some(1));
}
