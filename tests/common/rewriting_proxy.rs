//! An HTTP proxy on loopback that rewrites CouchDB's answers about one
//! document, for tests of what Spiegel does with a revision the source does
//! not give. It forwards every request to one CouchDB as it came (method,
//! path, query, headers with `Authorization`, body) and streams the answer
//! back (continuous feeds go through), except the answers it was told to
//! rewrite ([`Fault`]), a given number of times. It counts the rewrites, so
//! that a test can tell its fault was injected.
//!
//! A rewritten request still reaches CouchDB; only its answer changes.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use axum::body::{to_bytes, Body, Bytes};
use axum::extract::{Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::Response;
use serde::{Deserialize, Serialize};
use serde_json::json;
use serde_json::value::RawValue;

use super::proxy::pointed_at;

/// An answer rewritten when it is about the chosen document.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// `POST /{db}/_bulk_get`: each revision of the document comes as
    /// `{"error": {"id", "rev", "error": "not_found", "reason": "missing"}}`
    /// in place of `{"ok": doc}`.
    BulkGetError,
    /// `POST /{db}/_bulk_get`: the document's entry is left out of
    /// `results`.
    BulkGetDropped,
    /// `POST /{db}/_bulk_get` asking for the document: `200
    /// {"unexpected": true}`, an answer of another shape.
    BulkGetUnexpected,
    /// `GET /{db}/{id}?open_revs=[...]` of the document: `200 [{"missing":
    /// rev}]` for each revision asked.
    OpenRevsMissing,
    /// `POST /{db}/_bulk_docs` holding the document: `413 too_large`, as a
    /// proxy with a body limit answers. Not forwarded: nothing is written.
    BulkDocsTooLarge,
    /// `POST /{db}/_bulk_docs` whose body holds the text of the rule's id
    /// (such as `_local/spiegel-`, which names a checkpoint): never
    /// forwarded, never answered, so the client waits until it is killed.
    BulkDocsHeld,
}

/// The number of times of a fault that lasts until
/// [`RewritingProxy::clear`].
pub const FOREVER: u64 = u64::MAX;

pub struct RewritingProxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

struct Shared {
    /// The CouchDB's origin (`http://host:port`).
    backend: String,
    client: reqwest::Client,
    rules: Mutex<Vec<Rule>>,
    /// Each rewrite done, and when.
    injected: Mutex<Vec<(Fault, Instant)>>,
    /// `METHOD /path?query` of every request, in order.
    requests: Mutex<Vec<String>>,
}

/// Rewrite `left` more answers of the kind `fault` about document `id`.
struct Rule {
    fault: Fault,
    id: String,
    left: u64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl RewritingProxy {
    /// A proxy in front of the CouchDB at `server` (a URL; its credentials
    /// and path are not used), on a free port.
    pub async fn start(server: &str) -> RewritingProxy {
        let backend = url::Url::parse(server).expect("the server's URL");
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("an HTTP client");
        let shared = Arc::new(Shared {
            backend: backend.origin().ascii_serialization(),
            client,
            rules: Mutex::default(),
            injected: Mutex::default(),
            requests: Mutex::default(),
        });
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().expect("the proxy's address");
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("the proxy serves");
        });
        RewritingProxy {
            addr,
            shared,
            server,
        }
    }

    /// `url` (with its credentials and path) pointed at the proxy.
    pub fn url(&self, url: &str) -> String {
        pointed_at(url, self.addr)
    }

    /// Rewrites the next `times` answers of the kind `fault` about document
    /// `id` ([`FOREVER`]: until [`Self::clear`]).
    pub fn inject(&self, fault: Fault, id: &str, times: u64) {
        lock(&self.shared.rules).push(Rule {
            fault,
            id: id.to_string(),
            left: times,
        });
    }

    /// Rewrites nothing more.
    pub fn clear(&self) {
        lock(&self.shared.rules).clear();
    }

    /// When each rewrite of the kind `fault` was done.
    pub fn injected_at(&self, fault: Fault) -> Vec<Instant> {
        let injected = lock(&self.shared.injected);
        injected
            .iter()
            .filter(|(f, _)| *f == fault)
            .map(|(_, at)| *at)
            .collect()
    }

    /// How many answers of the kind `fault` were rewritten.
    pub fn injected(&self, fault: Fault) -> usize {
        self.injected_at(fault).len()
    }

    /// The id of the checkpoint (`_local/<replication id>`) a replication
    /// from database `db` read there, if it did.
    pub fn checkpoint_id(&self, db: &str) -> Option<String> {
        let prefix = format!("/{}/_local/", spiegel::couch::encode_segment(db));
        self.requests().iter().find_map(|request| {
            let at = request.find(&prefix)? + prefix.len();
            let name = request[at..].split('?').next()?;
            Some(format!("_local/{name}"))
        })
    }

    /// `METHOD /path?query` of every request so far.
    pub fn requests(&self) -> Vec<String> {
        lock(&self.shared.requests).clone()
    }
}

impl Drop for RewritingProxy {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Forwards a request; rewrites its answer if a rule asks for it.
async fn handle(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let Ok(body) = to_bytes(body, usize::MAX).await else {
        return answer(StatusCode::BAD_REQUEST, HeaderMap::new(), Body::empty());
    };
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    lock(&shared.requests).push(format!("{} {target}", parts.method));
    let fault = shared.fault_for(&parts, &body);
    if let Some((Fault::BulkDocsTooLarge, id)) = &fault {
        if shared.consume(Fault::BulkDocsTooLarge, id) {
            let text = r#"{"error":"too_large","reason":"the request entity is too large"}"#;
            return answer(
                StatusCode::PAYLOAD_TOO_LARGE,
                HeaderMap::new(),
                Body::from(text),
            );
        }
    }
    if let Some((Fault::BulkDocsHeld, id)) = &fault {
        if shared.consume(Fault::BulkDocsHeld, id) {
            return std::future::pending().await;
        }
    }
    let upstream = match shared.forward(&parts, body).await {
        Ok(upstream) => upstream,
        Err(_) => return answer(StatusCode::BAD_GATEWAY, HeaderMap::new(), Body::empty()),
    };
    let (status, mut headers) = (upstream.status(), upstream.headers().clone());
    remove_hop_by_hop(&mut headers);
    let Some((fault, id)) = fault else {
        return answer(status, headers, Body::from_stream(upstream.bytes_stream()));
    };
    let Ok(original) = upstream.bytes().await else {
        return answer(StatusCode::BAD_GATEWAY, HeaderMap::new(), Body::empty());
    };
    match rewrite(fault, &id, &parts, &original) {
        Some(rewritten) if shared.consume(fault, &id) => {
            let mut headers = HeaderMap::new();
            let json = header::HeaderValue::from_static("application/json");
            headers.insert(header::CONTENT_TYPE, json);
            answer(StatusCode::OK, headers, Body::from(rewritten))
        }
        _ => answer(status, headers, Body::from(original)),
    }
}

fn answer(status: StatusCode, headers: HeaderMap, body: Body) -> Response {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

/// Headers about one connection, which the proxy's own connections set.
fn remove_hop_by_hop(headers: &mut HeaderMap) {
    for name in [
        header::HOST,
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::CONTENT_LENGTH,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
}

impl Shared {
    /// The first rule with rewrites left that `parts` and `body` ask for.
    fn fault_for(&self, parts: &Parts, body: &[u8]) -> Option<(Fault, String)> {
        let rules = lock(&self.rules);
        let rule = rules
            .iter()
            .find(|r| r.left > 0 && asks_for(r.fault, &r.id, parts, body))?;
        Some((rule.fault, rule.id.clone()))
    }

    /// Counts a rewrite against its rule; false if the rule has none left
    /// (used up or cleared meanwhile).
    fn consume(&self, fault: Fault, id: &str) -> bool {
        let mut rules = lock(&self.rules);
        let Some(rule) = rules
            .iter_mut()
            .find(|r| r.fault == fault && r.id == id && r.left > 0)
        else {
            return false;
        };
        rule.left = rule.left.saturating_sub(1);
        lock(&self.injected).push((fault, Instant::now()));
        true
    }

    /// The request as it came, to the CouchDB.
    async fn forward(&self, parts: &Parts, body: Bytes) -> reqwest::Result<reqwest::Response> {
        let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let mut headers = parts.headers.clone();
        remove_hop_by_hop(&mut headers);
        let mut request = self
            .client
            .request(parts.method.clone(), format!("{}{target}", self.backend))
            .headers(headers);
        if !body.is_empty() {
            request = request.body(body);
        }
        request.send().await
    }
}

/// Whether a request is one whose answer `fault` rewrites for document `id`.
fn asks_for(fault: Fault, id: &str, parts: &Parts, body: &[u8]) -> bool {
    match fault {
        Fault::OpenRevsMissing => {
            let segment = parts.uri.path().rsplit('/').next().unwrap_or_default();
            let asked = percent_encoding::percent_decode_str(segment).decode_utf8_lossy();
            parts.method == Method::GET && open_revs(parts).is_some() && asked == id
        }
        Fault::BulkDocsTooLarge => {
            let quoted = serde_json::to_string(id).unwrap_or_default();
            parts.method == Method::POST
                && parts.uri.path().ends_with("/_bulk_docs")
                && String::from_utf8_lossy(body).contains(&quoted)
        }
        Fault::BulkDocsHeld => {
            parts.method == Method::POST
                && parts.uri.path().ends_with("/_bulk_docs")
                && String::from_utf8_lossy(body).contains(id)
        }
        Fault::BulkGetError | Fault::BulkGetDropped | Fault::BulkGetUnexpected => {
            #[derive(Deserialize)]
            struct Asked {
                docs: Vec<AskedDoc>,
            }
            #[derive(Deserialize)]
            struct AskedDoc {
                id: String,
            }
            let asked = serde_json::from_slice::<Asked>(body).map(|a| a.docs);
            parts.method == Method::POST
                && parts.uri.path().ends_with("/_bulk_get")
                && asked.is_ok_and(|docs| docs.iter().any(|d| d.id == id))
        }
    }
}

/// The revisions of an `open_revs` query parameter.
fn open_revs(parts: &Parts) -> Option<Vec<String>> {
    let query = parts.uri.query()?;
    let (_, revs) =
        url::form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == "open_revs")?;
    serde_json::from_str(&revs).ok()
}

/// `_bulk_get`'s answer, each revision's entry kept as its exact text.
#[derive(Deserialize, Serialize)]
struct BulkGet {
    results: Vec<BulkGetResult>,
}

#[derive(Deserialize, Serialize)]
struct BulkGetResult {
    id: String,
    docs: Vec<Box<RawValue>>,
}

/// The answer `fault` makes of `original` for document `id`; None when
/// there is nothing about `id` in it to rewrite.
fn rewrite(fault: Fault, id: &str, parts: &Parts, original: &[u8]) -> Option<Vec<u8>> {
    let rewritten = match fault {
        // Answered without forwarding (see `handle`).
        Fault::BulkDocsTooLarge | Fault::BulkDocsHeld => return None,
        Fault::BulkGetUnexpected => json!({"unexpected": true}).to_string(),
        Fault::OpenRevsMissing => {
            let missing: Vec<_> = open_revs(parts)?
                .into_iter()
                .map(|rev| json!({ "missing": rev }))
                .collect();
            serde_json::to_string(&missing).ok()?
        }
        Fault::BulkGetDropped => {
            let mut answer: BulkGet = serde_json::from_slice(original).ok()?;
            let before = answer.results.len();
            answer.results.retain(|r| r.id != id);
            (answer.results.len() < before).then_some(())?;
            serde_json::to_string(&answer).ok()?
        }
        Fault::BulkGetError => {
            let mut answer: BulkGet = serde_json::from_slice(original).ok()?;
            let result = answer.results.iter_mut().find(|r| r.id == id)?;
            let mut changed = false;
            for entry in &mut result.docs {
                if let Some(error) = as_error(id, entry) {
                    *entry = error;
                    changed = true;
                }
            }
            changed.then_some(())?;
            serde_json::to_string(&answer).ok()?
        }
    };
    Some(rewritten.into_bytes())
}

/// A `_bulk_get` entry `{"ok": doc}` as the error CouchDB gives for a
/// revision it cannot read; None for an entry without `ok`.
fn as_error(id: &str, entry: &RawValue) -> Option<Box<RawValue>> {
    #[derive(Deserialize)]
    struct Entry {
        ok: Revision,
    }
    #[derive(Deserialize)]
    struct Revision {
        #[serde(rename = "_rev")]
        rev: String,
    }
    let Entry { ok } = serde_json::from_str(entry.get()).ok()?;
    let error =
        json!({"error": {"id": id, "rev": ok.rev, "error": "not_found", "reason": "missing"}});
    RawValue::from_string(error.to_string()).ok()
}
