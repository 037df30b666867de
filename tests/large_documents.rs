//! Large documents: a revision with a 200 MB attachment is copied by the
//! native engine streamed, intact, with memory that does not grow with
//! its size. On its own in this binary: it writes 400 MB to CouchDB, which
//! would slow the tests that run beside it.

mod common;

use std::time::Duration;

use serde_json::{json, Value};

use common::*;

/// Peak resident memory of a process (`VmHWM`), in bytes.
fn peak_rss(pid: u32) -> u64 {
    proc_status_bytes(pid, "VmHWM:")
}

/// Resident memory of a process now (`VmRSS`), in bytes.
fn rss(pid: u32) -> u64 {
    proc_status_bytes(pid, "VmRSS:")
}

/// The attachment `name` of `doc` as the database describes it: its
/// digest and length, which CouchDB computes from the bytes it stored.
async fn attachment_facts(s: &Installation, db: &str, doc: &str, name: &str) -> Option<Value> {
    let found = s.couch.get_doc_opt::<Value>(db, doc).await.ok()??;
    let att = &found["_attachments"][name];
    Some(json!({"rev": found["_rev"], "digest": att["digest"], "length": att["length"]}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    spiegel_test_server = "test-server",
    ignore = "PouchDB Server sends attachments inline, never as multipart: needs real CouchDB"
)]
#[cfg_attr(
    spiegel_test_server = "cluster",
    ignore = "run on the single node: three copies of 400 MB would take minutes of CI"
)]
async fn a_200_mb_attachment_replicates_intact_streamed_in_less_than_twice_its_size() {
    let s = Installation::new("att200").await;
    let (src, dst) = (s.db("src"), s.db("dst"));
    s.couch.create_db(&src).await.unwrap();
    s.couch.put_doc(&src, "small", &json!({})).await.unwrap();
    let doc = json!({"type": "replicator", "source": format!("{}/{}", s.url, src),
                     "target": format!("{}/{}", s.url, dst), "create_target": true});
    s.couch.put_doc(&s.spiegel_db, "r", &doc).await.unwrap();
    // The default lease, so the client's default idle timeout (20 s): the
    // machine is busy writing 400 MB.
    let args = [
        "--replication-engine",
        "native",
        "--lease-time",
        "15",
        "--backoff-delay",
        "0.2",
    ];
    let worker = s.start_worker("replicator", &args);
    let what = "the small document in the target";
    wait_doc(&s.couch, &dst, "small", true, Duration::from_secs(30), what).await;
    let idle = rss(worker.child.id());

    let size = 200 * 1024 * 1024;
    let url = format!(
        "{}/{}/big/blob",
        s.url,
        spiegel::couch::encode_segment(&src)
    );
    let put = reqwest::Client::new()
        .put(&url)
        .header("Content-Type", "application/octet-stream")
        .body(incompressible(size))
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success(), "{}", put.status());
    let source = attachment_facts(&s, &src, "big", "blob").await;
    assert_eq!(source.as_ref().unwrap()["length"], json!(size));
    wait_for(
        "the attachment intact in the target",
        Duration::from_secs(180),
        || async { (attachment_facts(&s, &dst, "big", "blob").await == source).then_some(()) },
    )
    .await;
    let grown = peak_rss(worker.child.id()).saturating_sub(idle);
    eprintln!(
        "RSS {} MB idle; the peak grew {} MB over it replicating a {} MB attachment",
        idle >> 20,
        grown >> 20,
        size >> 20
    );
    assert!(
        grown <= 2 * size as u64,
        "grew by {} MB for a {} MB attachment",
        grown >> 20,
        size >> 20
    );
}
