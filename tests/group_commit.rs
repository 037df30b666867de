//! Group commit per target: native runs from several sources into one
//! target share their requests to it (checkpoint read, `_revs_diff`,
//! `_bulk_docs`), while each source keeps its own checkpoint, recorded only
//! after its documents are on the target.
//!
//! The worker reaches the server through a [`RewritingProxy`] that holds
//! every checkpoint write, so that the worker can be killed between a shared
//! write and the checkpoints it would have recorded.

mod common;

use std::time::Duration;

use serde_json::{json, Value};
use spiegel::couch::{encode_segment, BulkResult, ChangesQuery, Seq};

use common::*;

/// How long the documents may take to reach the target.
const DEADLINE: Duration = Duration::from_secs(60);

/// Sources fanned into the target, and documents in each.
const SOURCES: usize = 4;
const DOCS: usize = 25;

/// Marks a checkpoint document in a `_bulk_docs` body.
const CHECKPOINT: &str = "_local/spiegel-";

struct FanIn {
    s: Installation,
    proxy: RewritingProxy,
    sources: Vec<String>,
    target: String,
}

impl FanIn {
    /// Sources with documents, an empty target, and the replicator document
    /// that fans them in through the proxy (a checkpoint every run).
    async fn start(label: &str) -> FanIn {
        init_logs();
        let s = Installation::new(label).await;
        let sources: Vec<String> = (0..SOURCES).map(|i| s.db(&format!("u_{i}"))).collect();
        let target = s.db("all");
        s.couch.create_db(&target).await.expect("create the target");
        for (i, source) in sources.iter().enumerate() {
            s.couch.create_db(source).await.expect("create a source");
            let docs: Vec<Value> = (0..DOCS)
                .map(|d| json!({"_id": format!("s{i}-d{d}"), "n": 0.1 + d as f64, "k": [i, d]}))
                .collect();
            let written = s.couch.bulk_docs(source, &docs, true).await;
            assert!(written
                .expect("write a source")
                .iter()
                .all(|r| !r.is_failed()));
        }
        let proxy = RewritingProxy::start(&s.url).await;
        let server = proxy.url(s.url.trim_end_matches('/'));
        let doc = json!({
            "type": "replicator",
            "db_name": format!("^{}", regex::escape(&s.db("u_"))),
            "source": format!("{server}/${{db_name}}"),
            "target": format!("{server}/{}", encode_segment(&target)),
            "engine": "native",
            "checkpoint_interval": 1,
        });
        let put = s.couch.put_doc(&s.spiegel_db, "fan_in", &doc).await;
        put.expect("the replicator document");
        FanIn {
            s,
            proxy,
            sources,
            target,
        }
    }

    /// A replicator worker through the proxy; runs on one target wait up
    /// to 2 s for each other, so that the sources' first runs share.
    fn worker(&self) -> Spiegel {
        let url = self.proxy.url(&self.s.url);
        let args = ["--backoff-delay", "0.2", "--group-window", "2000"];
        self.s.start_worker_at(&url, "replicator", &args)
    }

    /// The documents in the target.
    async fn target_ids(&self) -> u64 {
        let info = self.s.couch.db_info(&self.target).await;
        info.map_or(0, |i| i.doc_count)
    }

    /// Waits until the target holds `n` documents.
    async fn wait_target_holds(&self, n: usize) {
        let n = n as u64;
        let what = format!("{n} documents in the target");
        wait_for(&what, DEADLINE, || async {
            (self.target_ids().await >= n).then_some(())
        })
        .await
    }

    /// The id of `source`'s checkpoint (`_local/<replication id>` on both
    /// sides), as the worker asked the source for it.
    fn checkpoint_id(&self, source: &str) -> String {
        let id = self.proxy.checkpoint_id(source);
        id.expect("the source's checkpoint was read")
    }

    /// `source`'s checkpoint on the source and on the target.
    async fn checkpoints(&self, source: &str) -> [Option<Value>; 2] {
        let id = self.checkpoint_id(source);
        let read = |db: String| {
            let id = id.clone();
            async move {
                self.s
                    .couch
                    .get_doc_opt::<Value>(&db, &id)
                    .await
                    .expect("a checkpoint")
            }
        };
        [
            read(source.to_string()).await,
            read(self.target.clone()).await,
        ]
    }

    /// `POST /{target}/_bulk_docs` requests so far: the data writes, as
    /// the checkpoints' are held.
    fn target_writes(&self) -> usize {
        let path = format!("POST /{}/_bulk_docs", encode_segment(&self.target));
        let requests = self.proxy.requests();
        requests.iter().filter(|r| r.starts_with(&path)).count()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_between_a_shared_write_and_the_checkpoints_loses_nothing_and_records_each_source(
) {
    let run = FanIn::start("groupkill").await;
    run.proxy.inject(Fault::BulkDocsHeld, CHECKPOINT, FOREVER);
    let mut worker = run.worker();
    run.wait_target_holds(SOURCES * DOCS).await;
    let what = "a checkpoint write held";
    wait_for(what, DEADLINE, || async {
        (run.proxy.injected(Fault::BulkDocsHeld) > 0).then_some(())
    })
    .await;
    let writes = run.target_writes();
    assert!(
        writes < SOURCES,
        "{SOURCES} sources' documents came in {writes} writes: shared"
    );
    worker.child.kill().expect("SIGKILL the worker");
    let _ = worker.child.wait();
    for source in &run.sources {
        let recorded = run.checkpoints(source).await;
        assert_eq!(recorded, [None, None], "no checkpoint of {source} recorded");
    }

    // After the kill: one more document in each source, and a worker whose
    // checkpoints go through.
    run.proxy.clear();
    for source in &run.sources {
        let doc = json!({"_id": "after-the-kill", "src": source});
        let written = run.s.couch.bulk_docs(source, &[doc], true).await;
        assert!(matches!(
            written.as_deref(),
            Ok([BulkResult::Written { .. }])
        ));
    }
    let _worker = run.worker();
    run.wait_target_holds(SOURCES * DOCS + 1).await;
    for source in &run.sources {
        let what = format!("{source}'s own checkpoint on both sides");
        wait_for(&what, DEADLINE, || async {
            let [Some(source_log), Some(target_log)] = run.checkpoints(source).await else {
                return None;
            };
            let same = source_log["session_id"] == target_log["session_id"];
            let seq = Seq::from(target_log["source_last_seq"].clone());
            let query = ChangesQuery {
                since: Some(seq),
                ..ChangesQuery::default()
            };
            let after = run.s.couch.changes(source, &query).await.ok()?;
            (same && after.results.is_empty()).then_some(())
        })
        .await;
    }
    let ids: std::collections::BTreeSet<String> =
        run.sources.iter().map(|s| run.checkpoint_id(s)).collect();
    assert_eq!(ids.len(), SOURCES, "one checkpoint per source");
    for (i, source) in run.sources.iter().enumerate() {
        for d in [0, DOCS - 1] {
            let id = format!("s{i}-d{d}");
            let url = |db: &str| format!("{}/{}/{id}?revs=true", run.s.url, encode_segment(db));
            let (from, to) = (
                http_get(&url(source)).await,
                http_get(&url(&run.target)).await,
            );
            assert_eq!(from, to, "{id} as the source stores it");
        }
    }
}
