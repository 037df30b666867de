//! Differential conformance of Spiegel's native replication engine with
//! CouchDB's own replicator.
//!
//! Each test builds a history in a source database, then replicates it
//! twice: into target A through a replicator document of the spiegel
//! database (`"engine": ENGINE`, run by a replicator worker), and into
//! target B with CouchDB's `POST /_replicate`, both with the same
//! parameters. A must become what B is, byte for byte as CouchDB's API
//! shows it (see [`same`]). Then more changes, both replicate again
//! (Spiegel by itself, on the source's update event), and A must match B
//! again.
//!
//! Documents are written as JSON texts where their bytes matter (numbers,
//! key order, escapes, nesting, size): see [`documents_as_written`]. The
//! generated test writes histories of documents made by proptest from a
//! fixed seed (`SPIEGEL_TEST_SEED` sets another) and compares both of
//! Spiegel's engines with CouchDB's `_replicate`.
//!
//! The comparison with CouchDB's replicator needs a real CouchDB:
//! `SPIEGEL_TEST_SERVER=kit SPIEGEL_TEST_KIT=/work/shared/couchdb`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use base64::Engine as _;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use reqwest::Method;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};
use sha2::Digest as _;
use spiegel::couch::encode_segment;

use common::*;

/// The engine of target A's replicator document. `"couchdb"` makes both
/// targets come from CouchDB's replicator, which must make them identical:
/// that validates the comparison and the histories.
const ENGINE: &str = "native";

/// How long target A may take to match target B.
const DEADLINE: Duration = Duration::from_secs(60);

/// The id of target A's replicator document in the spiegel database.
const REPLICATOR_DOC: &str = "under-test";

/// The `_replicate` parameters the native engine supports; a document with
/// any other goes to the couchdb engine, with a note in `spiegel status`.
const NATIVE_PARAMS: [&str; 10] = [
    "create_target",
    "create_target_params",
    "filter",
    "query_params",
    "selector",
    "doc_ids",
    "use_checkpoints",
    "since_seq",
    "winning_revs_only",
    "checkpoint_interval",
];

// ---------------------------------------------------------------------------
// Raw HTTP, for what `CouchClient` lacks.

/// Requests to the test server as its admin: `open_revs`, attachments,
/// `_local_docs`, `_changes?style=all_docs`, `new_edits: false`...
#[derive(Clone)]
struct Http {
    client: reqwest::Client,
    /// The server's URL without credentials nor trailing slash.
    base: String,
    user: String,
    password: Option<String>,
}

/// A request body.
enum Body<'a> {
    Empty,
    Json(&'a Value),
    /// A JSON text sent as it is written (key order, number text and
    /// escapes kept; a `Value` would sort keys and re-encode numbers).
    Text(&'a str),
    /// Raw bytes with their content type (an attachment).
    Bytes(&'a str, Vec<u8>),
}

impl Http {
    fn new(admin_url: &str) -> Http {
        let mut url = url::Url::parse(admin_url).expect("the server's URL");
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        };
        let user = decode(url.username());
        let password = url.password().map(decode);
        url.set_username("").expect("a URL with a host");
        url.set_password(None).expect("a URL with a host");
        Http {
            client: reqwest::Client::new(),
            base: url.as_str().trim_end_matches('/').to_string(),
            user,
            password,
        }
    }

    /// `method /path?query`: the status and the JSON answer (`Null` when
    /// the answer is not JSON).
    async fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Body<'_>,
    ) -> (u16, Value) {
        let (status, bytes) = self.send_raw(method, path, query, body).await;
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// `method /path?query`: the status and the answer's bytes.
    async fn send_raw(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Body<'_>,
    ) -> (u16, Vec<u8>) {
        let mut req = self
            .client
            .request(method.clone(), format!("{}/{path}", self.base))
            .query(query)
            .header("Accept", "application/json")
            .timeout(Duration::from_secs(120));
        if !self.user.is_empty() {
            req = req.basic_auth(&self.user, self.password.as_deref());
        }
        req = match body {
            Body::Empty => req,
            Body::Json(json) => req.json(json),
            Body::Text(text) => req
                .header("Content-Type", "application/json")
                .body(text.to_string()),
            Body::Bytes(content_type, bytes) => {
                req.header("Content-Type", content_type).body(bytes)
            }
        };
        let answer = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} /{path}: {e}"));
        let status = answer.status().as_u16();
        let bytes = answer
            .bytes()
            .await
            .unwrap_or_else(|e| panic!("{method} /{path}: {e}"));
        (status, bytes.to_vec())
    }

    async fn get(&self, path: &str, query: &[(&str, &str)]) -> (u16, Value) {
        self.send(Method::GET, path, query, Body::Empty).await
    }

    /// `GET /path?query`: the status and the answer as CouchDB wrote it.
    async fn get_text(&self, path: &str, query: &[(&str, &str)]) -> (u16, String) {
        let (status, bytes) = self.send_raw(Method::GET, path, query, Body::Empty).await;
        let text = String::from_utf8(bytes)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
        (status, text)
    }

    /// A request that must succeed (2xx); its answer.
    async fn ok(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Body<'_>,
    ) -> Value {
        let what = format!("{method} /{path}");
        let (status, answer) = self.send(method, path, query, body).await;
        assert!((200..300).contains(&status), "{what}: {status} {answer}");
        answer
    }

    /// The winning revision of `id`, if it exists and is not deleted.
    async fn rev(&self, db: &str, id: &str) -> Option<String> {
        let (status, doc) = self.get(&doc_path(db, id), &[]).await;
        (status == 200).then(|| doc["_rev"].as_str().expect("_rev").to_string())
    }

    /// Writes `body` as `id`, on top of its winning revision if it has one;
    /// returns the new revision.
    async fn put(&self, db: &str, id: &str, body: Value) -> String {
        self.put_text(db, id, &body.to_string()).await
    }

    /// Writes the JSON text `body` as `id`, as it is, on top of its winning
    /// revision if it has one (given as `?rev=`, so the text is not
    /// touched); returns the new revision.
    async fn put_text(&self, db: &str, id: &str, body: &str) -> String {
        let rev = self.rev(db, id).await;
        let query: Vec<(&str, &str)> = rev.iter().map(|rev| ("rev", rev.as_str())).collect();
        let answer = self
            .ok(Method::PUT, &doc_path(db, id), &query, Body::Text(body))
            .await;
        answer["rev"].as_str().expect("rev").to_string()
    }

    /// Changes the winning revision of `id` with `change` (attachment stubs
    /// kept, as a client that edits a document does); returns the new
    /// revision.
    async fn edit(
        &self,
        db: &str,
        id: &str,
        change: impl FnOnce(&mut Map<String, Value>),
    ) -> String {
        let (status, mut doc) = self.get(&doc_path(db, id), &[]).await;
        assert_eq!(status, 200, "GET {id}: {doc}");
        change(doc.as_object_mut().expect("a document"));
        let answer = self
            .ok(Method::PUT, &doc_path(db, id), &[], Body::Json(&doc))
            .await;
        answer["rev"].as_str().expect("rev").to_string()
    }

    /// Deletes revision `rev` of `id` (the winner when `None`), as
    /// `DELETE` does: the tombstone has no body. Returns its revision.
    async fn delete(&self, db: &str, id: &str, rev: Option<&str>) -> String {
        let rev = match rev {
            Some(rev) => rev.to_string(),
            None => self.rev(db, id).await.expect("a document to delete"),
        };
        let answer = self
            .ok(
                Method::DELETE,
                &doc_path(db, id),
                &[("rev", &rev)],
                Body::Empty,
            )
            .await;
        answer["rev"].as_str().expect("rev").to_string()
    }

    /// Adds or replaces attachment `name` of `id`'s winning revision;
    /// returns the new revision.
    async fn put_attachment(
        &self,
        db: &str,
        id: &str,
        name: &str,
        content_type: &str,
        data: Vec<u8>,
    ) -> String {
        let rev = self.rev(db, id).await.expect("a document to attach to");
        let path = format!("{}/{}", doc_path(db, id), encode_segment(name));
        let answer = self
            .ok(
                Method::PUT,
                &path,
                &[("rev", &rev)],
                Body::Bytes(content_type, data),
            )
            .await;
        answer["rev"].as_str().expect("rev").to_string()
    }

    /// Removes attachment `name` from `id`'s winning revision.
    async fn delete_attachment(&self, db: &str, id: &str, name: &str) -> String {
        let rev = self.rev(db, id).await.expect("a document");
        let path = format!("{}/{}", doc_path(db, id), encode_segment(name));
        let answer = self
            .ok(Method::DELETE, &path, &[("rev", &rev)], Body::Empty)
            .await;
        answer["rev"].as_str().expect("rev").to_string()
    }

    /// Stores a revision as given (`_bulk_docs` with `new_edits: false`, as
    /// a replicator writes): `{pos}-{hash(tag)}` on top of `parent` (a new
    /// root when `None`), with an explicit `_rev` and `_revisions`. Writing
    /// it beside an existing child of `parent` makes a conflict. Returns
    /// the revision.
    async fn branch(
        &self,
        db: &str,
        id: &str,
        parent: Option<&str>,
        tag: &str,
        body: Value,
    ) -> String {
        self.branch_text(db, id, parent, tag, &body.to_string())
            .await
    }

    /// [`Self::branch`] with the JSON text of an object as the body, kept
    /// as it is: `_id`, `_rev` and `_revisions` are written before its
    /// first member.
    async fn branch_text(
        &self,
        db: &str,
        id: &str,
        parent: Option<&str>,
        tag: &str,
        body: &str,
    ) -> String {
        let (start, mut ids) = match parent {
            None => (1, Vec::new()),
            Some(parent) => {
                let (status, doc) = self
                    .get(&doc_path(db, id), &[("rev", parent), ("revs", "true")])
                    .await;
                assert_eq!(status, 200, "GET {id}?rev={parent}: {doc}");
                let revisions = &doc["_revisions"];
                let ids: Vec<Value> = revisions["ids"].as_array().expect("ids").clone();
                (revisions["start"].as_u64().expect("start") + 1, ids)
            }
        };
        let hash = rev_hash(tag);
        ids.insert(0, json!(hash));
        let rev = format!("{start}-{hash}");
        let meta = json!({"_id": id, "_rev": rev, "_revisions": {"start": start, "ids": ids}});
        let meta = meta.to_string();
        let doc = with_members(&meta[1..meta.len() - 1], body);
        let path = format!("{}/_bulk_docs", encode_segment(db));
        let bulk = format!(r#"{{"new_edits":false,"docs":[{doc}]}}"#);
        let answer = self.ok(Method::POST, &path, &[], Body::Text(&bulk)).await;
        assert!(
            answer
                .as_array()
                .is_some_and(|a| a.iter().all(|r| r.get("error").is_none())),
            "{id} {rev}: {answer}"
        );
        rev
    }

    /// The update seq of `db` (opaque, to pass back as is).
    async fn update_seq(&self, db: &str) -> Value {
        let (status, info) = self.get(&encode_segment(db), &[]).await;
        assert_eq!(status, 200, "GET /{db}: {info}");
        info["update_seq"].clone()
    }

    /// The `_local` documents of `db`, with their bodies.
    async fn local_docs(&self, db: &str) -> Vec<Value> {
        let path = format!("{}/_local_docs", encode_segment(db));
        let (status, answer) = self.get(&path, &[("include_docs", "true")]).await;
        assert_eq!(status, 200, "GET /{db}/_local_docs: {answer}");
        answer["rows"]
            .as_array()
            .expect("rows")
            .iter()
            .map(|row| row["doc"].clone())
            .collect()
    }

    /// The leaves of `id` (`open_revs=all`): `(rev, deleted)`, sorted.
    async fn leaves(&self, db: &str, id: &str) -> Vec<(String, bool)> {
        let (_, answer) = self.get(&doc_path(db, id), &[("open_revs", "all")]).await;
        let mut leaves: Vec<(String, bool)> = answer
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|leaf| {
                let doc = leaf.get("ok")?;
                Some((
                    doc["_rev"].as_str()?.to_string(),
                    doc["_deleted"] == json!(true),
                ))
            })
            .collect();
        leaves.sort();
        leaves
    }
}

/// `{db}/{id}`, both encoded as CouchDB routes them: `_design/` and
/// `_local/` keep their slash, every other `/`, `+`, `%`... is encoded.
fn doc_path(db: &str, id: &str) -> String {
    let id = ["_design/", "_local/"]
        .iter()
        .find_map(|prefix| {
            id.strip_prefix(prefix)
                .map(|rest| format!("{prefix}{}", encode_segment(rest)))
        })
        .unwrap_or_else(|| encode_segment(id));
    format!("{}/{id}", encode_segment(db))
}

/// A revision hash (32 hex digits, like CouchDB's) named by `tag`.
fn rev_hash(tag: &str) -> String {
    hex::encode(sha2::Sha256::digest(tag.as_bytes()))[..32].to_string()
}

/// `len` bytes that do not compress, the same for the same `seed`.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            // xorshift64
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn base64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

// ---------------------------------------------------------------------------
// The comparison.

/// What is compared of one target, by name: a text for each (a document
/// as the bytes CouchDB answered); two targets are the same when their
/// facts are.
type Facts = BTreeMap<String, String>;

/// How a document's winner is read for the comparison: with its history,
/// conflicts, deleted conflicts, and attachments with their data inline.
const WINNER_QUERY: [(&str, &str); 4] = [
    ("revs", "true"),
    ("conflicts", "true"),
    ("deleted_conflicts", "true"),
    ("attachments", "true"),
];

/// How a document's leaves are read for the comparison.
const LEAVES_QUERY: [(&str, &str); 3] = [
    ("open_revs", "all"),
    ("revs", "true"),
    ("attachments", "true"),
];

/// Whether `target` holds what `reference` holds, byte for byte as
/// CouchDB's API shows it; `Err` is a readable diff naming `target` as
/// `label`. Compared: `doc_count` and `doc_del_count`; the `_all_docs` ids
/// and winning revs; for every document id of the source's
/// `_changes?style=all_docs` (deleted ones too) and of either target, the
/// bytes of its winner ([`WINNER_QUERY`]) and of each of its leaves
/// ([`LEAVES_QUERY`]), with their status. Nothing in these answers may
/// differ between two databases that hold the same revisions: `_rev`,
/// `_revisions`, `_conflicts`, the body as CouchDB keeps it (key order,
/// number text, escapes) and each attachment's `revpos`, `digest` and
/// data. And the source's `_local` documents `locals` must be in neither
/// target.
async fn same(
    http: &Http,
    source: &str,
    (label, target): (&str, &str),
    reference: &str,
    locals: &[String],
) -> Result<(), String> {
    for db in [target, reference] {
        for local in locals {
            let (status, doc) = http.get(&doc_path(db, local), &[]).await;
            if status != 404 {
                return Err(format!(
                    "{local} of the source was copied into {db}: {status} {doc}"
                ));
            }
        }
    }
    let (summary_a, ids_a) = summary(http, target).await;
    let (summary_b, ids_b) = summary(http, reference).await;
    diff(label, &summary_a, &summary_b)?;
    let mut ids = source_ids(http, source).await;
    ids.extend(ids_a);
    ids.extend(ids_b);
    let a = details(http, target, &ids).await;
    diff(label, &a, &details(http, reference, &ids).await)
}

/// The counts and `_all_docs` of `db`, and the ids `_all_docs` lists.
async fn summary(http: &Http, db: &str) -> (Facts, BTreeSet<String>) {
    let mut facts = Facts::new();
    let mut ids = BTreeSet::new();
    let (status, info) = http.get(&encode_segment(db), &[]).await;
    if status != 200 {
        facts.insert("GET /<target>".into(), format!("{status} {info}"));
        return (facts, ids);
    }
    for count in ["doc_count", "doc_del_count"] {
        facts.insert(count.into(), info[count].to_string());
    }
    let path = format!("{}/_all_docs", encode_segment(db));
    let (status, all) = http.get(&path, &[]).await;
    assert_eq!(status, 200, "GET /{db}/_all_docs: {all}");
    for row in all["rows"].as_array().expect("rows") {
        let id = row["id"].as_str().expect("id").to_string();
        facts.insert(format!("_all_docs {id:?}"), row["value"]["rev"].to_string());
        ids.insert(id);
    }
    (facts, ids)
}

/// The id of every document of `source` (deleted ones too).
async fn source_ids(http: &Http, source: &str) -> BTreeSet<String> {
    let path = format!("{}/_changes", encode_segment(source));
    let (status, changes) = http.get(&path, &[("style", "all_docs")]).await;
    assert_eq!(status, 200, "GET /{source}/_changes: {changes}");
    changes["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|change| change["id"].as_str().expect("id").to_string())
        .collect()
}

/// The winner and the leaves of each of `ids` in `db`, as CouchDB's bytes.
async fn details(http: &Http, db: &str, ids: &BTreeSet<String>) -> Facts {
    let mut facts = Facts::new();
    for id in ids {
        let path = doc_path(db, id);
        let (status, winner) = http.get_text(&path, &WINNER_QUERY).await;
        facts.insert(format!("{id:?} winner"), format!("{status} {winner}"));
        let (status, leaves) = http.get_text(&path, &LEAVES_QUERY).await;
        for (rev, text) in split_leaves(status, &leaves) {
            facts.insert(format!("{id:?} leaf {rev}"), text);
        }
    }
    facts
}

/// One element of an `open_revs` answer: a leaf, or a revision missing.
#[derive(serde::Deserialize)]
struct Leaf {
    ok: Option<Box<RawValue>>,
    missing: Option<String>,
}

/// The revision of a document, read from its text.
#[derive(serde::Deserialize)]
struct Rev {
    #[serde(rename = "_rev")]
    rev: String,
}

/// The elements of an `open_revs` answer by revision, each leaf as its
/// exact text (the answer is parsed only to split it: the order CouchDB
/// lists the leaves in is not compared); an answer that is not a list of
/// leaves as one element, with its status.
fn split_leaves(status: u16, answer: &str) -> Vec<(String, String)> {
    let leaves = match serde_json::from_str::<Vec<Leaf>>(answer) {
        Ok(leaves) if status == 200 => leaves,
        _ => return vec![("(answer)".into(), format!("{status} {answer}"))],
    };
    leaves
        .into_iter()
        .map(|leaf| match (leaf.ok, leaf.missing) {
            (Some(doc), _) => {
                let rev = serde_json::from_str::<Rev>(doc.get())
                    .map_or_else(|e| format!("(no _rev: {e})"), |doc| doc.rev);
                (rev, doc.get().to_string())
            }
            (None, missing) => (format!("{missing:?}"), "missing".into()),
        })
        .collect()
}

/// Facts a diff shows at most; the count of the others follows.
const SHOWN: usize = 30;

/// Texts up to this length are shown whole in a diff; longer ones only
/// around their first difference.
const WHOLE: usize = 400;

/// Bytes shown before and after the first difference of long texts.
const CONTEXT: usize = 80;

/// `Ok` when `a` (a target filled by engine `label`) and `b` (CouchDB's
/// `_replicate`) have the same facts, else each fact that differs (up to
/// [`SHOWN`]) with both texts.
fn diff(label: &str, a: &Facts, b: &Facts) -> Result<(), String> {
    let differing: Vec<&String> = a
        .keys()
        .chain(b.keys())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .filter(|key| a.get(*key) != b.get(*key))
        .collect();
    if differing.is_empty() {
        return Ok(());
    }
    let mut lines: Vec<String> = differing
        .iter()
        .take(SHOWN)
        .map(|key| {
            let (at, [text_a, text_b]) = texts(a.get(*key), b.get(*key));
            format!(
                "{key}: {at}\n    A (engine {label}): {text_a}\n    B (CouchDB's _replicate): {text_b}"
            )
        })
        .collect();
    if differing.len() > SHOWN {
        lines.push(format!("...and {} more", differing.len() - SHOWN));
    }
    Err(lines.join("\n"))
}

/// Where two texts of a fact first differ, and each text to show: whole
/// when both are short, else its length and the bytes around that offset
/// (escaped, so that an invisible difference shows).
fn texts(a: Option<&String>, b: Option<&String>) -> (String, [String; 2]) {
    let (Some(a), Some(b)) = (a, b) else {
        let show = |t: Option<&String>| t.map_or("(absent)".into(), |t| window(t, 0));
        return ("present on one side only".into(), [show(a), show(b)]);
    };
    let at = a
        .bytes()
        .zip(b.bytes())
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()));
    let shown = if a.len() <= WHOLE && b.len() <= WHOLE {
        [a.clone(), b.clone()]
    } else {
        [window(a, at), window(b, at)]
    };
    (format!("first difference at byte {at}"), shown)
}

/// `text`'s length and its bytes around offset `at`, escaped.
fn window(text: &str, at: usize) -> String {
    let from = at.saturating_sub(CONTEXT);
    let to = (at + CONTEXT).min(text.len());
    let bytes = text.as_bytes().get(from..to).unwrap_or_default();
    format!(
        "{} bytes; {from}..{to}: {:?}",
        text.len(),
        String::from_utf8_lossy(bytes)
    )
}

// ---------------------------------------------------------------------------
// One differential run.

/// A source, target A (filled by Spiegel's engine under test) and target B
/// (filled by CouchDB's `_replicate`), on a fresh installation.
struct Differential {
    s: Installation,
    http: Http,
    source: String,
    a: String,
    b: String,
    /// Target C, filled by Spiegel's `couchdb` engine (a replicator
    /// document of its own) and compared with B as A is; only after
    /// [`Self::with_couchdb_engine`].
    c: Option<String>,
    /// The replication parameters both targets get (`create_target: true`
    /// besides).
    params: Value,
    /// `_local` documents of the source, which no target may get.
    locals: Vec<String>,
    worker: Option<Spiegel>,
}

impl Differential {
    /// A fresh installation with an empty source.
    async fn new(label: &str) -> Differential {
        init_logs();
        let s = Installation::new(label).await;
        let http = Http::new(&s.url);
        let (source, a, b) = (s.db("source"), s.db("native"), s.db("couchdb"));
        s.couch.create_db(&source).await.expect("create the source");
        Differential {
            s,
            http,
            source,
            a,
            b,
            c: None,
            params: json!({}),
            locals: Vec::new(),
            worker: None,
        }
    }

    /// Adds target C: both of Spiegel's engines are then compared with
    /// CouchDB's `_replicate`.
    fn with_couchdb_engine(mut self) -> Differential {
        self.c = Some(self.s.db("spiegelcouchdb"));
        self
    }

    /// The targets Spiegel fills: their engine, replicator document and
    /// database.
    fn spiegel_targets(&self) -> Vec<(&str, &str, &str)> {
        let mut targets = vec![(ENGINE, REPLICATOR_DOC, self.a.as_str())];
        if let Some(c) = &self.c {
            targets.push(("couchdb", "under-test-couchdb", c.as_str()));
        }
        targets
    }

    /// The admin URL of database `db`.
    fn url(&self, db: &str) -> String {
        format!(
            "{}/{}",
            self.s.url.trim_end_matches('/'),
            encode_segment(db)
        )
    }

    /// `params` with `create_target: true` and the other `fields`.
    fn body(&self, fields: Value) -> Value {
        let mut body = self.params.clone();
        body["create_target"] = json!(true);
        for (k, v) in fields.as_object().expect("fields") {
            body[k] = v.clone();
        }
        body
    }

    /// Replicates the source into A with a replicator document and a
    /// running replicator worker, and into B with `POST /_replicate`, both
    /// with `params`; waits until A matches B.
    async fn replicate(&mut self, params: Value) {
        self.params = params;
        self.worker = Some(
            self.s
                .start_worker("replicator", &["--backoff-delay", "0.2"]),
        );
        for (engine, id, target) in self.spiegel_targets() {
            let doc = self.body(json!({
                "type": "replicator",
                "source": self.url(&self.source),
                "target": self.url(target),
                "engine": engine,
            }));
            self.s
                .couch
                .put_doc(&self.s.spiegel_db, id, &doc)
                .await
                .expect("the replicator document");
        }
        self.couchdb_replicates().await;
        self.converge().await;
        let params = self.params.as_object().expect("params");
        if ENGINE == "native" && params.keys().all(|k| NATIVE_PARAMS.contains(&k.as_str())) {
            self.assert_no_engine_note().await;
        }
    }

    /// Asserts the replicator document ran with no note in `spiegel
    /// status` (so not sent to the couchdb engine instead), once the
    /// status shows a success.
    async fn assert_no_engine_note(&self) {
        let what = format!("a success of {REPLICATOR_DOC} in spiegel status");
        let reports = wait_for(&what, DEADLINE, || async {
            let reports = self.s.reports(REPLICATOR_DOC).await;
            let succeeded = |r: &Value| r["succeeded"].as_u64().unwrap_or(0) > 0;
            reports.iter().any(succeeded).then_some(reports)
        })
        .await;
        assert!(
            reports.iter().all(|r| r.get("note").is_none()),
            "a document with parameters the native engine supports: {reports:#?}"
        );
    }

    /// Stops the Spiegel worker and starts another.
    fn restart_worker(&mut self) {
        if let Some(mut worker) = self.worker.take() {
            worker.stop();
        }
        let worker = self
            .s
            .start_worker("replicator", &["--backoff-delay", "0.2"]);
        self.worker = Some(worker);
    }

    /// After more changes to the source: Spiegel replicates them by itself
    /// (on the source's update event); `POST /_replicate` again for B; waits
    /// until A matches B.
    async fn replicate_again(&self) {
        self.couchdb_replicates().await;
        self.converge().await;
    }

    /// `POST /_replicate` from the source into B.
    async fn couchdb_replicates(&self) {
        let body =
            self.body(json!({"source": self.url(&self.source), "target": self.url(&self.b)}));
        let answer = self
            .s
            .couch
            .replicate(&body)
            .await
            .unwrap_or_else(|e| panic!("POST /_replicate into {}: {e}", self.b));
        assert_eq!(answer["ok"], json!(true), "POST /_replicate: {answer}");
    }

    /// Polls [`same`] until A (and C) match B; after [`DEADLINE`], panics
    /// with the last difference.
    async fn converge(&self) {
        let start = Instant::now();
        for (engine, _, target) in self.spiegel_targets() {
            loop {
                match self.same(engine, target).await {
                    Ok(()) => break,
                    Err(diff) if start.elapsed() > DEADLINE => panic!(
                        "after {DEADLINE:?}, {target} (engine {engine}) still differs from {} (CouchDB's _replicate):\n{diff}",
                        self.b
                    ),
                    Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
                }
            }
        }
    }

    /// Asserts A (and C) match B now (after [`Self::converge`], to say so).
    async fn assert_same(&self) {
        for (engine, _, target) in self.spiegel_targets() {
            if let Err(diff) = self.same(engine, target).await {
                panic!(
                    "{target} (engine {engine}) differs from {} (CouchDB's _replicate):\n{diff}",
                    self.b
                );
            }
        }
    }

    /// [`same`] for `target`, filled by `engine`, and B.
    async fn same(&self, engine: &str, target: &str) -> Result<(), String> {
        same(
            &self.http,
            &self.source,
            (engine, target),
            &self.b,
            &self.locals,
        )
        .await
    }
}

// ---------------------------------------------------------------------------
// Histories.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    spiegel_test_server = "test-server",
    ignore = "compares with CouchDB's own replicator: needs real CouchDB"
)]
async fn native_replication_matches_couchdbs_for_updates_deletions_and_recreations() {
    let mut d = Differential::new("updates").await;
    let (h, src) = (d.http.clone(), d.source.clone());
    h.put(&src, "new", json!({"v": 1})).await;
    for v in 1..=3 {
        h.put(&src, "updated", json!({"v": v})).await;
    }
    h.put(&src, "deleted", json!({"v": 1})).await;
    h.delete(&src, "deleted", None).await;
    h.put(&src, "recreated", json!({"v": 1})).await;
    h.delete(&src, "recreated", None).await;
    h.put(&src, "recreated", json!({"v": "again"})).await;
    // A tombstone with a body, as PUT {_deleted: true, ...} leaves it.
    h.put(&src, "tombstone-with-body", json!({"v": 1})).await;
    h.put(
        &src,
        "tombstone-with-body",
        json!({"_deleted": true, "why": "gone"}),
    )
    .await;
    d.replicate(json!({})).await;
    d.assert_same().await;
    let recreated = h.rev(&d.b, "recreated").await.expect("recreated in B");
    assert!(recreated.starts_with("3-"), "{recreated}");
    assert_eq!(h.rev(&d.b, "deleted").await, None);

    // After more changes.
    h.put(&src, "new", json!({"v": 2})).await;
    h.delete(&src, "updated", None).await;
    h.put(&src, "deleted", json!({"v": "back"})).await;
    h.delete(&src, "recreated", None).await;
    h.put(&src, "later", json!({"v": 1})).await;
    d.replicate_again().await;
    d.assert_same().await;
    assert_eq!(h.rev(&d.b, "updated").await, None);
    assert!(h.rev(&d.b, "later").await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    spiegel_test_server = "test-server",
    ignore = "compares with CouchDB's own replicator: needs real CouchDB"
)]
async fn native_replication_matches_couchdbs_for_conflicts_and_deleted_conflicts() {
    let mut d = Differential::new("conflicts").await;
    let (h, src) = (d.http.clone(), d.source.clone());
    // Two live branches and a deleted one on a common root.
    let root = h.put(&src, "c", json!({"v": 1})).await;
    h.branch(&src, "c", Some(&root), "c-a", json!({"branch": "a"}))
        .await;
    let c_b = h
        .branch(&src, "c", Some(&root), "c-b", json!({"branch": "b"}))
        .await;
    h.branch(&src, "c", Some(&root), "c-del", json!({"_deleted": true}))
        .await;
    // A document that exists only as revisions written with their history,
    // three deep, and a second root beside it.
    let r1 = h.branch(&src, "remote", None, "r1", json!({"v": 1})).await;
    let r2 = h
        .branch(&src, "remote", Some(&r1), "r2", json!({"v": 2}))
        .await;
    h.branch(&src, "remote", Some(&r2), "r3", json!({"v": 3}))
        .await;
    h.branch(&src, "remote", None, "other-root", json!({"v": "x"}))
        .await;
    // Every branch deleted: the document is deleted, its conflicts hidden.
    let root = h.put(&src, "all-deleted", json!({"v": 1})).await;
    h.branch(
        &src,
        "all-deleted",
        Some(&root),
        "ad-1",
        json!({"_deleted": true}),
    )
    .await;
    h.branch(
        &src,
        "all-deleted",
        Some(&root),
        "ad-2",
        json!({"_deleted": true}),
    )
    .await;
    // A longer branch that ends in a deletion beside a shorter live one:
    // the live one wins (a deleted leaf never wins over a live one).
    let root = h.put(&src, "deleted-longer", json!({"v": 1})).await;
    let long = h
        .branch(&src, "deleted-longer", Some(&root), "dl-1", json!({"v": 2}))
        .await;
    h.branch(
        &src,
        "deleted-longer",
        Some(&long),
        "dl-2",
        json!({"_deleted": true}),
    )
    .await;
    h.branch(
        &src,
        "deleted-longer",
        Some(&root),
        "dl-live",
        json!({"v": "live"}),
    )
    .await;
    d.replicate(json!({})).await;
    d.assert_same().await;
    let (_, c) = h
        .get(
            &doc_path(&d.b, "c"),
            &[("conflicts", "true"), ("deleted_conflicts", "true")],
        )
        .await;
    assert_eq!(c["_conflicts"].as_array().map(Vec::len), Some(1), "{c}");
    assert_eq!(
        c["_deleted_conflicts"].as_array().map(Vec::len),
        Some(1),
        "{c}"
    );
    assert_eq!(h.leaves(&d.b, "all-deleted").await.len(), 2);

    // After more changes: a new conflict, a branch deleted, the winner
    // updated, a conflicted document deleted.
    let root = h.put(&src, "fresh", json!({"v": 1})).await;
    h.branch(&src, "fresh", Some(&root), "f-a", json!({"v": "a"}))
        .await;
    h.branch(&src, "fresh", Some(&root), "f-b", json!({"v": "b"}))
        .await;
    h.delete(&src, "c", Some(&c_b)).await;
    h.put(&src, "c", json!({"v": "winner updated"})).await;
    h.delete(&src, "remote", None).await;
    d.replicate_again().await;
    d.assert_same().await;
    assert_eq!(h.leaves(&d.b, "fresh").await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    spiegel_test_server = "test-server",
    ignore = "compares with CouchDB's own replicator: needs real CouchDB"
)]
async fn native_replication_matches_couchdbs_for_attachments_small_large_replaced_and_removed() {
    let mut d = Differential::new("attachments").await;
    let (h, src) = (d.http.clone(), d.source.clone());
    // Inline at creation (revpos 1), compressible.
    let inline =
        json!({"inline.txt": {"content_type": "text/plain", "data": base64(b"hello, inline")}});
    h.put(&src, "small", json!({"v": 1, "_attachments": inline}))
        .await;
    // 5 MB that do not compress.
    h.put(&src, "big", json!({"v": 1})).await;
    h.put_attachment(
        &src,
        "big",
        "big.bin",
        "application/octet-stream",
        noise(5 << 20, 1),
    )
    .await;
    // Replaced by a newer revision of the same name.
    h.put(&src, "replaced", json!({"v": 1})).await;
    h.put_attachment(&src, "replaced", "a.txt", "text/plain", b"first".to_vec())
        .await;
    h.put_attachment(
        &src,
        "replaced",
        "a.txt",
        "text/plain",
        b"second, longer".to_vec(),
    )
    .await;
    // One of two removed.
    h.put(&src, "removed", json!({"v": 1})).await;
    h.put_attachment(&src, "removed", "keep.txt", "text/plain", b"kept".to_vec())
        .await;
    h.put_attachment(
        &src,
        "removed",
        "drop.json",
        "application/json",
        b"{\"x\":1}".to_vec(),
    )
    .await;
    h.delete_attachment(&src, "removed", "drop.json").await;
    // The body edited, the attachment carried over as a stub.
    h.put(&src, "kept", json!({"v": 1})).await;
    h.put_attachment(
        &src,
        "kept",
        "k.bin",
        "application/octet-stream",
        noise(10_000, 2),
    )
    .await;
    h.edit(&src, "kept", |doc| {
        doc.insert("v".into(), json!(2));
    })
    .await;
    // Two branches with different attachments.
    let root = h
        .put(&src, "att-conflict", json!({"_attachments": {"r.txt": {"content_type": "text/plain", "data": base64(b"root")}}}))
        .await;
    h.branch(
        &src,
        "att-conflict",
        Some(&root),
        "ac-a",
        json!({"_attachments": {"a.txt": {"content_type": "text/plain", "data": base64(b"branch a")}}}),
    )
    .await;
    h.branch(
        &src,
        "att-conflict",
        Some(&root),
        "ac-b",
        json!({"_attachments": {"b.bin": {"content_type": "application/octet-stream", "data": base64(&noise(3000, 3))}}}),
    )
    .await;
    d.replicate(json!({})).await;
    d.assert_same().await;
    let (_, big) = h.get(&doc_path(&d.b, "big"), &[]).await;
    assert_eq!(big["_attachments"]["big.bin"]["length"], json!(5 << 20));

    // After more changes: the big document's body edited (its attachment a
    // stub), an attachment added, one replaced again, a document deleted.
    h.edit(&src, "big", |doc| {
        doc.insert("v".into(), json!(2));
    })
    .await;
    h.put_attachment(
        &src,
        "small",
        "added.txt",
        "text/plain",
        b"added later".to_vec(),
    )
    .await;
    h.put_attachment(&src, "replaced", "a.txt", "text/plain", b"third".to_vec())
        .await;
    h.delete(&src, "removed", None).await;
    d.replicate_again().await;
    d.assert_same().await;
}

/// Batches of 5 over 40 new documents: after three batches that found the
/// target lacking everything, the native engine stops asking `_revs_diff`
/// (one batch in ten still asks), and copies revisions with attachments
/// whole. The second replication goes on in the same session, still
/// skipping, over documents the target partly has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    spiegel_test_server = "test-server",
    ignore = "compares with CouchDB's own replicator: needs real CouchDB"
)]
async fn native_replication_matches_couchdbs_while_it_skips_revs_diff_over_many_batches() {
    let mut d = Differential::new("skipdiff").await;
    let (h, src) = (d.http.clone(), d.source.clone());
    for i in 0..40 {
        let id = format!("d{i:02}");
        let root = h.put(&src, &id, json!({"i": i, "x": 0.1 * i as f64})).await;
        if i % 4 == 0 {
            let data = noise(2000 + i, i as u64);
            h.put_attachment(&src, &id, "a.bin", "application/octet-stream", data)
                .await;
        }
        if i % 7 == 0 {
            let body = json!({"branch": i});
            h.branch(&src, &id, Some(&root), &format!("b{i}"), body)
                .await;
        }
    }
    d.replicate(json!({"worker_batch_size": 5})).await;
    d.assert_same().await;
    for i in (0..40).step_by(3) {
        h.edit(&src, &format!("d{i:02}"), |doc| {
            doc.insert("edited".into(), json!(true));
        })
        .await;
    }
    h.put_attachment(&src, "d05", "late.txt", "text/plain", b"late".to_vec())
        .await;
    d.replicate_again().await;
    d.assert_same().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    spiegel_test_server = "test-server",
    ignore = "compares with CouchDB's own replicator: needs real CouchDB"
)]
async fn native_replication_matches_couchdbs_for_design_docs_special_ids_and_never_copies_local_docs(
) {
    let mut d = Differential::new("ids").await;
    let (h, src) = (d.http.clone(), d.source.clone());
    let ddoc = json!({
        "views": {"by_v": {"map": "function(doc) { emit(doc.v, null); }"}},
        "filters": {"all": "function(doc, req) { return true; }"},
    });
    h.put(&src, "_design/app", ddoc).await;
    h.put(&src, "_design/gone", json!({"views": {}})).await;
    h.delete(&src, "_design/gone", None).await;
    h.put(&src, "_local/x", json!({"never": "copied"})).await;
    for id in ["a/b", "c+d", "é文", "q?x=1&y#z", "50% off", " lead space"] {
        h.put(&src, id, json!({"id": id})).await;
    }
    d.locals = vec!["_local/x".into(), "_local/y".into()];
    d.replicate(json!({})).await;
    d.assert_same().await;
    assert!(h.rev(&d.b, "_design/app").await.is_some());
    assert!(h.rev(&d.b, "é文").await.is_some());

    // After more changes.
    h.edit(&src, "_design/app", |doc| {
        doc.insert("language".into(), json!("javascript"));
    })
    .await;
    h.put(&src, "_local/x", json!({"still": "never copied"}))
        .await;
    h.put(&src, "_local/y", json!({"never": "copied"})).await;
    h.put(&src, "é文", json!({"v": 2})).await;
    h.delete(&src, "c+d", None).await;
    h.put(&src, "new/é+%", json!({"v": 1})).await;
    d.replicate_again().await;
    d.assert_same().await;
}

// ---------------------------------------------------------------------------
// Documents as written: the bytes CouchDB keeps must reach the targets.

/// Doubles printed shortest-round-trip that need all 17 significant digits
/// (random ones, and the extremes), and other texts CouchDB reads as
/// doubles. CouchDB keeps a double as its parser read it, printed
/// shortest-round-trip with an explicit exponent sign (`1.7976931348623157e+308`),
/// and 3.5 stores `-0.0` and `5e-324` as `0.0`, `1E5` as `100000.0`: the
/// targets must get those texts, byte for byte.
const DOUBLES: &str = "[0.30848182410193437,0.18072637992393747,0.20595871281932654,\
0.45318437637077535,0.29976699686368236,0.24409651072215288,-1.5432835417340557e+88,\
1.3647584518757569e-192,-1.7160537630466207e+197,4.6678633181812096e-36,\
0.30000000000000004,0.9469046488777645,2.2250738585072014e-308,5e-324,\
1.7976931348623157e308,-0.0,1E5,1.0]";

/// Integers beyond 64 bits, positive and negative, and one beyond a
/// double's 53 bits.
const BIG_INTEGERS: &str =
    "[18446744073709551616,-9223372036854775809,123456789012345678901234567890,9007199254740993]";

/// The JSON texts of [`documents_as_written`] and what each checks: keys
/// out of alphabetical order at every level, numbers, escapes (control
/// characters, a surrogate pair, U+2028, non-ASCII raw and escaped), 40
/// levels of nesting, over 2 MB.
fn documents_as_written() -> Vec<(&'static str, String)> {
    let numbers = format!(
        r#"{{"z":{DOUBLES},"big":{BIG_INTEGERS},"m":{{"y":-1.3701135617873088e-206,"b":0}}}}"#
    );
    let keys = r#"{"zeta":1,"alpha":{"z":1,"":2,"a":{"y":[{"b":1,"a":2}],"x":3}},"":"empty key","mid":true,"b":null}"#;
    let escapes = format!(
        r#"{{"ctl":"\u0001\u001f","pair":"\ud83d\ude00","ls":"\u2028\u2029","escaped":"\u00e9\u6587","short":"\"\\\/\b\f\n\r\t","raw":"{}","k\u00e9y":1,"\ud83d\ude00":2,"é":3}}"#,
        "😀 é 文 \u{2028}"
    );
    vec![
        ("numbers", numbers),
        ("keys", keys.to_string()),
        ("escapes", escapes),
        ("nested", nested(40)),
        // 2.5 MiB as written, 2.1 MB as CouchDB stores it (escapes decoded).
        ("large", large_body(5 << 19)),
    ]
}

/// An object `levels` deep, objects and arrays in turn, keys out of order.
fn nested(levels: usize) -> String {
    let inner = (1..levels)
        .rev()
        .fold("\"bottom\"".to_string(), |inner, level| {
            if level % 2 == 0 {
                format!(r#"{{"z{level}":{inner},"a":{level}}}"#)
            } else {
                format!("[{level}.5,{inner},-0.0]")
            }
        });
    format!(r#"{{"top":{inner},"a":0}}"#)
}

/// An object of about `size` bytes: a string with escapes and raw
/// non-ASCII, and random doubles printed shortest-round-trip.
fn large_body(size: usize) -> String {
    let piece = r#"é\u00e9\n\ud83d\ude00 \"plain\" "#;
    let text = piece.repeat(size / 2 / piece.len());
    let numbers: Vec<String> = noise(size / 2 / 24 * 8, 5)
        .chunks_exact(8)
        .map(|bytes| f64::from_bits(u64::from_le_bytes(bytes.try_into().expect("8 bytes"))))
        .filter(|x| x.is_finite())
        .map(|x| format!("{x:?}"))
        .collect();
    format!(r#"{{"text":"{text}","numbers":[{}]}}"#, numbers.join(","))
}

/// `members` (JSON object members, comma-separated) written first in the
/// JSON text of object `body`, whose own members are kept as they are.
fn with_members(members: &str, body: &str) -> String {
    let rest = body
        .trim()
        .strip_prefix('{')
        .expect("the JSON text of an object")
        .trim_start();
    let separator = if rest.starts_with('}') { "" } else { "," };
    format!("{{{members}{separator}{rest}")
}

/// An inline attachment `name` holding `data`, as a JSON member.
fn inline_attachment(name: &str, content_type: &str, data: &[u8]) -> String {
    let attachment = json!({"content_type": content_type, "data": base64(data)});
    format!("{}:{attachment}", json!(name))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    spiegel_test_server = "test-server",
    ignore = "compares with CouchDB's own replicator: needs real CouchDB"
)]
async fn native_replication_matches_couchdbs_byte_for_byte_for_numbers_keys_escapes_nesting_and_2_mb(
) {
    let mut d = Differential::new("bytes").await;
    let (h, src) = (d.http.clone(), d.source.clone());
    let written = documents_as_written();
    for (id, text) in &written {
        h.put_text(&src, id, text).await;
    }
    // Conflicting branches and a deleted one, written as texts, with
    // attachments among their members.
    let attachments = format!(
        r#""_attachments":{{{},{}}}"#,
        inline_attachment("z.txt", "text/plain", "é\u{2028}".as_bytes()),
        inline_attachment("a.bin", "application/octet-stream", &noise(5000, 6)),
    );
    let root = h
        .put_text(
            &src,
            "conflicted",
            &with_members(&attachments, &written[1].1),
        )
        .await;
    h.branch_text(&src, "conflicted", Some(&root), "cf-a", &written[0].1)
        .await;
    h.branch_text(
        &src,
        "conflicted",
        Some(&root),
        "cf-b",
        &with_members(&attachments, &written[2].1),
    )
    .await;
    let tombstone = with_members(
        r#""_deleted":true"#,
        r#"{"why":1E5,"a":0.30000000000000004}"#,
    );
    h.branch_text(&src, "conflicted", Some(&root), "cf-del", &tombstone)
        .await;
    d.replicate(json!({})).await;
    d.assert_same().await;
    assert_kept_as_written(&h, &d.b).await;

    // After more changes: new texts on top, a branch, a deletion.
    h.put_text(&src, "numbers", &written[3].1).await;
    h.put_text(&src, "nested", &written[0].1).await;
    let keys = h.rev(&src, "keys").await.expect("keys");
    h.branch_text(&src, "keys", Some(&keys), "k-b", &written[2].1)
        .await;
    h.delete(&src, "escapes", None).await;
    d.replicate_again().await;
    d.assert_same().await;
}

/// Asserts that CouchDB's replicator kept in `target` the texts of
/// [`documents_as_written`] that a client re-encoding them would change:
/// the comparison can see such a change.
async fn assert_kept_as_written(h: &Http, target: &str) {
    let (_, numbers) = h.get_text(&doc_path(target, "numbers"), &[]).await;
    for text in BIG_INTEGERS.trim_matches(['[', ']']).split(',') {
        assert!(numbers.contains(text), "{text} in {numbers}");
    }
    let kept = [
        "0.30848182410193437",
        "-1.5432835417340557e+88",
        "1.7976931348623157e+308",
        r#"100000.0,1.0],"big":[18446744073709551616,"#,
    ];
    for text in kept {
        assert!(numbers.contains(text), "{text} in {numbers}");
    }
    let (_, keys) = h.get_text(&doc_path(target, "keys"), &[]).await;
    assert!(keys.contains(r#""zeta":1,"alpha":{"z":1,"":2"#), "{keys}");
}

// ---------------------------------------------------------------------------
// Generated documents and histories.

/// Generated histories, each a document, replicated together in one round.
const GENERATED: usize = 24;

/// The seed of the generated histories, unless `SPIEGEL_TEST_SEED` gives
/// another (a u64).
const SEED: u64 = 0x5eed_0021;

/// `strategy`'s value for `seed`: the same on every run.
fn generate<S: Strategy>(strategy: S, seed: u64) -> S::Value {
    let seed: Vec<u8> = seed.to_le_bytes().repeat(4);
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &seed);
    let mut runner = TestRunner::new_with_rng(Config::default(), rng);
    strategy
        .new_tree(&mut runner)
        .expect("a generated value")
        .current()
}

/// A JSON string: its text (plain characters, short escapes, `\u` escapes
/// and surrogate pairs, raw non-ASCII), and the string it stands for.
fn json_string() -> impl Strategy<Value = (String, String)> {
    let same = |c: char| (c.to_string(), c.to_string());
    let short = [
        ("\\\"", "\""),
        ("\\\\", "\\"),
        ("\\/", "/"),
        ("\\b", "\u{8}"),
        ("\\f", "\u{c}"),
        ("\\n", "\n"),
        ("\\r", "\r"),
        ("\\t", "\t"),
    ];
    let piece = prop_oneof![
        4 => proptest::char::range(' ', '~')
            .prop_filter("not \" nor \\", |c| !matches!(c, '"' | '\\'))
            .prop_map(same),
        1 => select(short.to_vec()).prop_map(|(text, s)| (text.to_string(), s.to_string())),
        1 => (any::<char>(), any::<bool>()).prop_map(|(c, upper)| (escaped(c, upper), c.to_string())),
        1 => any::<char>()
            .prop_filter("raw in a JSON string", |c| *c >= ' ' && !matches!(c, '"' | '\\'))
            .prop_map(same),
    ];
    vec(piece, 0..8).prop_map(|pieces| {
        let (texts, strings): (Vec<String>, Vec<String>) = pieces.into_iter().unzip();
        (format!("\"{}\"", texts.concat()), strings.concat())
    })
}

/// `c` as `\u` escapes (a surrogate pair beyond the BMP).
fn escaped(c: char, upper: bool) -> String {
    let mut units = [0u16; 2];
    c.encode_utf16(&mut units)
        .iter()
        .map(|u| match upper {
            true => format!("\\u{u:04X}"),
            false => format!("\\u{u:04x}"),
        })
        .collect()
}

/// A JSON number text: an integer of any size, a decimal, one with an
/// exponent (within a double's range), or a double printed
/// shortest-round-trip.
fn json_number() -> impl Strategy<Value = String> {
    prop_oneof![
        "-?(0|[1-9][0-9]{0,39})",
        "-?(0|[1-9][0-9]{0,15})\\.[0-9]{1,20}",
        "-?(0|[1-9][0-9]{0,2})(\\.[0-9]{1,6})?[eE][+-]?0?(0|[1-9][0-9]?|[12][0-9][0-9]|300)",
        any::<f64>()
            .prop_filter("finite", |x| x.is_finite())
            .prop_map(|x| format!("{x:?}")),
    ]
}

/// Whitespace between tokens.
fn space() -> impl Strategy<Value = &'static str> {
    select(&["", "", " ", "\n", "\t ", "\r\n  "][..])
}

/// A JSON value's text: nested arrays and objects of numbers, strings and
/// literals.
fn json_value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        3 => json_number(),
        3 => json_string().prop_map(|(text, _)| text),
        1 => select(&["true", "false", "null"][..]).prop_map(String::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            (vec(inner.clone(), 0..6), space()).prop_map(|(items, ws)| {
                format!("[{ws}{}{ws}]", items.join(&format!("{ws},{ws}")))
            }),
            (vec((json_string(), inner), 0..6), space())
                .prop_map(|(members, ws)| object(members, ws)),
        ]
    })
}

/// The JSON text of an object of `members` (key text, key, value text),
/// the first of those with the same key only, `ws` between tokens.
fn object(members: Vec<((String, String), String)>, ws: &str) -> String {
    let mut keys = BTreeSet::new();
    let members: Vec<String> = members
        .into_iter()
        .filter(|((_, key), _)| keys.insert(key.clone()))
        .map(|((text, _), value)| format!("{text}{ws}:{ws}{value}"))
        .collect();
    format!("{{{ws}{}{ws}}}", members.join(&format!("{ws},{ws}")))
}

/// A document's JSON text: an object whose keys start with `k` (CouchDB
/// reserves those that start with `_`).
fn json_document() -> impl Strategy<Value = String> {
    (vec((json_string(), json_value()), 0..8), space()).prop_map(|(members, ws)| {
        let members = members
            .into_iter()
            .map(|((text, key), value)| ((format!("\"k{}", &text[1..]), format!("k{key}")), value))
            .collect();
        object(members, ws)
    })
}

/// A step of a generated history.
#[derive(Debug, Clone)]
enum Step {
    /// A new revision of the winner with this text (a creation, or a
    /// recreation after a deletion).
    Put(String),
    /// The winner deleted.
    Delete,
    /// A revision written beside the others (`new_edits: false`), on top
    /// of the `on`th (modulo) revision written so far (a new root when
    /// none), deleted (with its body) or not.
    Branch {
        on: usize,
        deleted: bool,
        body: String,
    },
    /// An attachment added to the winner, compressible (`text/plain`) or
    /// not.
    Attach { text: bool, data: Vec<u8> },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => json_document().prop_map(Step::Put),
        1 => Just(Step::Delete),
        2 => (any::<usize>(), proptest::bool::weighted(0.3), json_document())
            .prop_map(|(on, deleted, body)| Step::Branch { on, deleted, body }),
        1 => (any::<bool>(), vec(any::<u8>(), 0..2000))
            .prop_map(|(text, data)| Step::Attach { text, data }),
    ]
}

/// A generated history: its steps before the first replication, and after.
fn history() -> impl Strategy<Value = (Vec<Step>, Vec<Step>)> {
    (vec(step(), 1..6), vec(step(), 0..3))
}

/// Writes `steps` of the history of `id` into `db`; `revs` holds the
/// revisions written so far (what a branch grows on).
async fn write_steps(h: &Http, db: &str, id: &str, steps: &[Step], revs: &mut Vec<String>) {
    for step in steps {
        let n = revs.len();
        let winner = h.rev(db, id).await;
        let rev = match step {
            Step::Put(body) => Some(h.put_text(db, id, body).await),
            Step::Delete => match winner {
                Some(rev) => Some(h.delete(db, id, Some(&rev)).await),
                None => None,
            },
            Step::Branch { on, deleted, body } => {
                let parent = (n > 0).then(|| revs[on % n].as_str());
                let body = match deleted {
                    true => with_members(r#""_deleted":true"#, body),
                    false => body.clone(),
                };
                let tag = format!("{id}-{n}");
                Some(h.branch_text(db, id, parent, &tag, &body).await)
            }
            Step::Attach { text, data } if winner.is_some() => {
                let content_type = if *text {
                    "text/plain"
                } else {
                    "application/octet-stream"
                };
                let name = format!("att{n}");
                Some(
                    h.put_attachment(db, id, &name, content_type, data.clone())
                        .await,
                )
            }
            Step::Attach { .. } => None,
        };
        revs.extend(rev);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    spiegel_test_server = "test-server",
    ignore = "compares with CouchDB's own replicator: needs real CouchDB"
)]
async fn both_engines_match_couchdbs_byte_for_byte_on_generated_documents_and_histories() {
    let seed = match std::env::var("SPIEGEL_TEST_SEED") {
        Ok(seed) => seed.parse().expect("SPIEGEL_TEST_SEED: a u64"),
        Err(_) => SEED,
    };
    println!("generated histories of SPIEGEL_TEST_SEED={seed}");
    let histories = generate(vec(history(), GENERATED), seed);
    let mut d = Differential::new("generated").await.with_couchdb_engine();
    let (h, src) = (d.http.clone(), d.source.clone());
    let ids: Vec<String> = (0..GENERATED).map(|i| format!("g{i:02}")).collect();
    let mut revs = vec![Vec::new(); GENERATED];
    for ((id, (before, _)), revs) in ids.iter().zip(&histories).zip(&mut revs) {
        write_steps(&h, &src, id, before, revs).await;
    }
    d.replicate(json!({})).await;
    d.assert_same().await;

    for ((id, (_, after)), revs) in ids.iter().zip(&histories).zip(&mut revs) {
        write_steps(&h, &src, id, after, revs).await;
    }
    d.replicate_again().await;
    d.assert_same().await;
}

// ---------------------------------------------------------------------------
// Parameters.

/// Documents of kinds `a` and `b` for the filter and selector tests. Each
/// document changes at most once per phase, so that the result does not
/// depend on when Spiegel runs between the writes.
async fn kinds_before(h: &Http, src: &str) {
    for (id, kind) in [("a1", "a"), ("a2", "a"), ("b1", "b"), ("b2", "b")] {
        h.put(src, id, json!({"kind": kind})).await;
    }
    // A tombstone without a body no longer has a kind...
    h.put(src, "a-deleted", json!({"kind": "a"})).await;
    h.delete(src, "a-deleted", None).await;
    // ...one written with a body keeps it.
    h.put(src, "a-tombstone-with-kind", json!({"kind": "a"}))
        .await;
    h.put(
        src,
        "a-tombstone-with-kind",
        json!({"_deleted": true, "kind": "a"}),
    )
    .await;
    // Conflicting branches of different kinds.
    let root = h.put(src, "mixed", json!({"kind": "a"})).await;
    h.branch(
        src,
        "mixed",
        Some(&root),
        "m-a",
        json!({"kind": "a", "v": 2}),
    )
    .await;
    h.branch(
        src,
        "mixed",
        Some(&root),
        "m-b",
        json!({"kind": "b", "v": 2}),
    )
    .await;
}

/// The second phase of [`kinds_before`]: a replicated document deleted, one
/// changing kind each way, a new one.
async fn kinds_after(h: &Http, src: &str) {
    h.delete(src, "a1", None).await;
    h.put(src, "a2", json!({"kind": "b"})).await;
    h.put(src, "b1", json!({"kind": "a"})).await;
    h.put(src, "a3", json!({"kind": "a"})).await;
}

/// What CouchDB's replicator makes of [`kinds_before`] and [`kinds_after`]
/// with "kind a only", in `target`: the filter (or selector) sees each
/// leaf revision as it is, so a tombstone without a body never passes (the
/// deletion of a replicated document is not replicated), a document that
/// stops passing keeps its last passing revision, and of two conflicting
/// branches only the passing one is copied.
async fn assert_kinds_outcome(h: &Http, target: &str) {
    let leaves = |id: &'static str| h.leaves(target, id);
    assert_eq!(leaves("a1").await.len(), 1);
    assert_eq!(
        h.rev(target, "a1").await.as_deref().map(|r| &r[..2]),
        Some("1-")
    );
    assert!(leaves("a-deleted").await.is_empty());
    assert_eq!(leaves("a-tombstone-with-kind").await.len(), 1);
    let (_, a2) = h.get(&doc_path(target, "a2"), &[]).await;
    assert_eq!(a2["kind"], json!("a"), "{a2}");
    assert!(h.rev(target, "b1").await.is_some());
    assert!(h.rev(target, "b2").await.is_none());
    assert_eq!(leaves("mixed").await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    spiegel_test_server = "test-server",
    ignore = "compares with CouchDB's own replicator: needs real CouchDB"
)]
async fn native_filter_with_query_params_matches_couchdbs() {
    let d = Differential::new("filter").await;
    let src = d.source.clone();
    let ddoc = json!({"filters": {"by_kind": "function(doc, req) { return doc.kind === req.query.kind; }"}});
    d.http.put(&src, "_design/f", ddoc).await;
    kinds_match(
        d,
        json!({"filter": "f/by_kind", "query_params": {"kind": "a"}}),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    spiegel_test_server = "test-server",
    ignore = "compares with CouchDB's own replicator: needs real CouchDB"
)]
async fn native_selector_matches_couchdbs() {
    let d = Differential::new("selector").await;
    kinds_match(d, json!({"selector": {"kind": "a"}})).await;
}

/// The "kind a only" history ([`kinds_before`], then [`kinds_after`]),
/// replicated by both engines with `params`: a filter or a selector.
async fn kinds_match(mut d: Differential, params: Value) {
    let src = d.source.clone();
    kinds_before(&d.http, &src).await;
    d.replicate(params).await;
    d.assert_same().await;
    assert!(d.http.rev(&d.b, "a1").await.is_some());
    assert!(d.http.rev(&d.b, "b1").await.is_none());

    kinds_after(&d.http, &src).await;
    d.replicate_again().await;
    d.assert_same().await;
    assert_kinds_outcome(&d.http, &d.b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    spiegel_test_server = "test-server",
    ignore = "compares with CouchDB's own replicator: needs real CouchDB"
)]
async fn native_doc_ids_match_couchdbs() {
    let mut d = Differential::new("docids").await;
    let (h, src) = (d.http.clone(), d.source.clone());
    h.put(&src, "_design/app", json!({"views": {}})).await;
    for id in ["a/b", "é文", "plain", "other", "other/2"] {
        h.put(&src, id, json!({"id": id})).await;
    }
    let root = h.rev(&src, "plain").await.expect("plain");
    h.branch(&src, "plain", Some(&root), "p-live", json!({"v": 2}))
        .await;
    h.branch(
        &src,
        "plain",
        Some(&root),
        "p-del",
        json!({"_deleted": true}),
    )
    .await;
    let doc_ids = json!(["a/b", "é文", "_design/app", "plain", "absent", "later"]);
    d.replicate(json!({"doc_ids": doc_ids})).await;
    d.assert_same().await;
    assert!(h.rev(&d.b, "é文").await.is_some());
    assert!(h.rev(&d.b, "other").await.is_none());

    // After more changes: listed documents updated, deleted and created,
    // an unlisted one updated.
    h.put(&src, "a/b", json!({"v": 2})).await;
    h.delete(&src, "plain", None).await;
    h.put(&src, "later", json!({"v": 1})).await;
    h.put(&src, "other", json!({"v": 2})).await;
    d.replicate_again().await;
    d.assert_same().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    spiegel_test_server = "test-server",
    ignore = "compares with CouchDB's own replicator: needs real CouchDB"
)]
async fn native_doc_ids_are_url_decoded_like_couchdbs() {
    // CouchDB decodes each of `doc_ids` as a URL query value (`+` is a
    // space, `%2F` a slash) before it looks the documents up.
    let mut d = Differential::new("docidsdecoded").await;
    let (h, src) = (d.http.clone(), d.source.clone());
    for id in ["c+d", "c d", "e%2Ff", "e/f"] {
        h.put(&src, id, json!({"id": id})).await;
    }
    d.replicate(json!({"doc_ids": ["c+d", "e%2Ff"]})).await;
    d.assert_same().await;
    let (_, all) = h
        .get(&format!("{}/_all_docs", encode_segment(&d.b)), &[])
        .await;
    let ids: Vec<&str> = all["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .filter_map(|row| row["id"].as_str())
        .collect();
    assert_eq!(ids, ["c d", "e/f"], "CouchDB's outcome");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    spiegel_test_server = "test-server",
    ignore = "compares with CouchDB's own replicator: needs real CouchDB"
)]
async fn native_winning_revs_only_matches_couchdbs() {
    let mut d = Differential::new("winning").await;
    let (h, src) = (d.http.clone(), d.source.clone());
    let root = h.put(&src, "w", json!({"v": 1})).await;
    h.branch(&src, "w", Some(&root), "w-a", json!({"branch": "a"}))
        .await;
    h.branch(&src, "w", Some(&root), "w-b", json!({"branch": "b"}))
        .await;
    let root = h.put(&src, "wd", json!({"v": 1})).await;
    h.branch(&src, "wd", Some(&root), "wd-del", json!({"_deleted": true}))
        .await;
    h.branch(&src, "wd", Some(&root), "wd-live", json!({"v": 2}))
        .await;
    h.put(&src, "plain", json!({"v": 1})).await;
    h.put(&src, "gone", json!({"v": 1})).await;
    h.delete(&src, "gone", None).await;
    d.replicate(json!({"winning_revs_only": true})).await;
    d.assert_same().await;
    // Only winners are copied: no conflict, no deleted conflict.
    assert_eq!(h.leaves(&d.b, "w").await.len(), 1);
    assert_eq!(h.leaves(&d.b, "wd").await.len(), 1);

    // After more changes: the winner of `w` deleted, so that the other
    // branch wins; one write per document (see `kinds_before`).
    h.delete(&src, "w", None).await;
    h.put(&src, "plain", json!({"v": 2})).await;
    h.put(&src, "new", json!({"v": 1})).await;
    d.replicate_again().await;
    d.assert_same().await;
    // The new winner is copied beside the old one, whose deletion is not:
    // the target now has a conflict, and its winner is a revision deleted
    // in the source.
    let target = h.leaves(&d.b, "w").await;
    assert_eq!(target.len(), 2, "{target:?}");
    assert!(target.iter().all(|(_, deleted)| !deleted), "{target:?}");
    let winner = h.rev(&d.b, "w").await.expect("w in B");
    let in_source = h.leaves(&src, "w").await;
    assert!(
        !in_source.contains(&(winner.clone(), false)),
        "{winner} {in_source:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    spiegel_test_server = "test-server",
    ignore = "compares with CouchDB's own replicator: needs real CouchDB"
)]
async fn native_since_seq_matches_couchdbs() {
    let mut d = Differential::new("since").await;
    let (h, src) = (d.http.clone(), d.source.clone());
    for id in ["early", "early-updated", "early-deleted"] {
        h.put(&src, id, json!({"v": 1})).await;
    }
    let since = h.update_seq(&src).await;
    h.put(&src, "early-updated", json!({"v": 2})).await;
    h.delete(&src, "early-deleted", None).await;
    h.put(&src, "late", json!({"v": 1})).await;
    d.replicate(json!({"since_seq": since})).await;
    d.assert_same().await;
    assert!(h.rev(&d.b, "early").await.is_none());
    assert!(h.rev(&d.b, "late").await.is_some());

    h.put(&src, "early", json!({"v": 2})).await;
    h.put(&src, "later", json!({"v": 1})).await;
    d.replicate_again().await;
    d.assert_same().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    spiegel_test_server = "test-server",
    ignore = "compares with CouchDB's own replicator: needs real CouchDB"
)]
async fn native_create_target_params_shape_the_target_like_couchdbs() {
    let mut d = Differential::new("targetparams").await;
    d.http.put(&d.source, "doc", json!({"v": 1})).await;
    d.replicate(json!({"create_target_params": {"q": 1}})).await;
    d.assert_same().await;
    let (_, a) = d.http.get(&encode_segment(&d.a), &[]).await;
    let (_, b) = d.http.get(&encode_segment(&d.b), &[]).await;
    let (a, b) = (&a["cluster"], &b["cluster"]);
    assert_eq!(b["q"], json!(1), "{b}");
    assert_eq!(a, b, "the targets' shards");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    spiegel_test_server = "test-server",
    ignore = "compares with CouchDB's own replicator: needs real CouchDB"
)]
async fn native_doc_with_a_parameter_the_engine_lacks_still_replicates_like_couchdb() {
    let mut d = Differential::new("unsupported").await;
    for id in ["x", "y", "z"] {
        d.http.put(&d.source, id, json!({"v": 1})).await;
    }
    d.replicate(json!({"connection_timeout": 30000})).await;
    d.assert_same().await;
    if ENGINE == "native" {
        // The document ran on the couchdb engine, with a note in `spiegel
        // status` that names the parameter (the status is saved
        // periodically).
        let what = "a note about connection_timeout in spiegel status";
        wait_for(what, DEADLINE, || async {
            let status = d.s.status().await.to_string();
            status.contains("connection_timeout").then_some(())
        })
        .await;
    }
}

// ---------------------------------------------------------------------------
// Checkpoints.

/// The fields of a checkpoint document CouchDB's replicator writes (3.5:
/// `couch_replicator_scheduler_job:do_checkpoint`), and of each entry of
/// its `history`. Not required: the `bulk_get_docs` and `bulk_get_attempts`
/// counters CouchDB also writes there, the value of
/// `replication_id_version` (CouchDB's is the number 4), and the date
/// format of `start_time` and `end_time` (CouchDB's is RFC 1123).
const CHECKPOINT_FIELDS: [&str; 4] = [
    "session_id",
    "source_last_seq",
    "replication_id_version",
    "history",
];
const HISTORY_FIELDS: [&str; 11] = [
    "session_id",
    "start_time",
    "end_time",
    "start_last_seq",
    "end_last_seq",
    "recorded_seq",
    "missing_checked",
    "missing_found",
    "docs_read",
    "docs_written",
    "doc_write_failures",
];

/// The replication checkpoint of `target` (its one `_local` document with
/// a `history`), once there is one other than `not` (another session or
/// seq) and the source holds the same document (same id, same session and
/// `source_last_seq`), as CouchDB writes them: on both sides.
async fn checkpoint(http: &Http, source: &str, target: &str, not: Option<&Value>) -> Value {
    let what = format!("the same checkpoint in {target} and its source");
    wait_for(&what, DEADLINE, || async {
        let docs = http.local_docs(target).await;
        let checkpoints: Vec<&Value> = docs.iter().filter(|d| d["history"].is_array()).collect();
        assert!(
            checkpoints.len() <= 1,
            "one replication, one checkpoint: {docs:?}"
        );
        let found = (*checkpoints.first()?).clone();
        let seen = |c: &Value| {
            c["session_id"] == found["session_id"]
                && c["source_last_seq"] == found["source_last_seq"]
        };
        if not.is_some_and(seen) {
            return None;
        }
        let id = found["_id"].as_str().expect("_id");
        assert!(id.starts_with("_local/"), "{id}");
        let (_, on_source) = http.get(&doc_path(source, id), &[]).await;
        (on_source["session_id"] == found["session_id"]
            && on_source["source_last_seq"] == found["source_last_seq"])
            .then_some(found)
    })
    .await
}

/// Asserts `checkpoint` has CouchDB's checkpoint format, that its newest
/// history entry is its session, and that each entry starts where the
/// one before it was recorded.
fn assert_couchdb_checkpoint_format(checkpoint: &Value) {
    for field in CHECKPOINT_FIELDS {
        assert!(
            checkpoint.get(field).is_some(),
            "no {field}: {checkpoint:#}"
        );
    }
    assert!(checkpoint["session_id"].is_string(), "{checkpoint:#}");
    assert!(
        !checkpoint["replication_id_version"].is_null(),
        "{checkpoint:#}"
    );
    let history = checkpoint["history"].as_array().expect("history");
    assert!(!history.is_empty(), "{checkpoint:#}");
    for entry in history {
        for field in HISTORY_FIELDS {
            assert!(
                entry.get(field).is_some(),
                "no history.{field}: {checkpoint:#}"
            );
        }
        for counter in [
            "missing_checked",
            "missing_found",
            "docs_read",
            "docs_written",
            "doc_write_failures",
        ] {
            assert!(entry[counter].is_u64(), "history.{counter}: {checkpoint:#}");
        }
        assert!(entry["session_id"].is_string(), "{checkpoint:#}");
        assert_eq!(
            entry["recorded_seq"], entry["end_last_seq"],
            "{checkpoint:#}"
        );
    }
    assert_eq!(
        history[0]["session_id"], checkpoint["session_id"],
        "{checkpoint:#}"
    );
    assert_eq!(
        history[0]["recorded_seq"], checkpoint["source_last_seq"],
        "{checkpoint:#}"
    );
    for pair in history.windows(2) {
        assert_eq!(
            pair[0]["start_last_seq"], pair[1]["recorded_seq"],
            "a run resumes from the last checkpoint: {checkpoint:#}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    spiegel_test_server = "test-server",
    ignore = "compares with CouchDB's own replicator: needs real CouchDB"
)]
async fn native_checkpoints_have_couchdbs_format_on_both_sides_and_runs_resume_from_them() {
    let mut d = Differential::new("checkpoint").await;
    for id in ["x", "y", "z"] {
        d.http.put(&d.source, id, json!({"v": 1})).await;
    }
    // Every run records its checkpoint (`checkpoint_interval` 1 ms).
    d.replicate(json!({"use_checkpoints": true, "checkpoint_interval": 1}))
        .await;
    let first = checkpoint(&d.http, &d.source, &d.a, None).await;
    assert_couchdb_checkpoint_format(&first);
    // CouchDB's own, which the format is checked against.
    let couchdbs = checkpoint(&d.http, &d.source, &d.b, None).await;
    assert_couchdb_checkpoint_format(&couchdbs);

    // A later run of the same process goes on in its session, as one
    // continuous CouchDB job does: the checkpoint moves, and its history
    // entry is replaced.
    d.http.put(&d.source, "w", json!({"v": 1})).await;
    d.replicate_again().await;
    let second = checkpoint(&d.http, &d.source, &d.a, Some(&first)).await;
    assert_couchdb_checkpoint_format(&second);
    assert_eq!(second["session_id"], first["session_id"], "{second:#}");
    assert_eq!(
        second["history"].as_array().map(Vec::len),
        Some(1),
        "{second:#}"
    );
    assert_eq!(second["history"][0]["docs_written"], json!(4), "{second:#}");

    // Another process starts a session on top, where the last one was
    // recorded.
    d.restart_worker();
    d.http.put(&d.source, "v", json!({"v": 1})).await;
    d.replicate_again().await;
    let third = checkpoint(&d.http, &d.source, &d.a, Some(&second)).await;
    assert_couchdb_checkpoint_format(&third);
    assert_ne!(third["session_id"], first["session_id"], "{third:#}");
    let history = third["history"].as_array().expect("history");
    assert!(
        history
            .iter()
            .any(|e| e["session_id"] == first["session_id"]),
        "the first session stays in the history: {third:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    spiegel_test_server = "test-server",
    ignore = "compares with CouchDB's own replicator: needs real CouchDB"
)]
async fn native_use_checkpoints_false_writes_no_checkpoint_like_couchdb() {
    let mut d = Differential::new("nocheckpoint").await;
    for id in ["x", "y"] {
        d.http.put(&d.source, id, json!({"v": 1})).await;
    }
    d.replicate(json!({"use_checkpoints": false})).await;
    d.http.put(&d.source, "z", json!({"v": 1})).await;
    d.replicate_again().await;
    d.assert_same().await;
    for db in [&d.a, &d.b, &d.source] {
        let locals = d.http.local_docs(db).await;
        assert!(locals.is_empty(), "no checkpoint in {db}: {locals:?}");
    }
}
