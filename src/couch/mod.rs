//! The CouchDB client: one pooled keep-alive HTTP client per server, typed
//! errors, percent-encoded paths, and continuous feeds that survive
//! disconnects (see [`feed`]).

mod error;
pub mod feed;
mod protocol;
mod replicate;
mod stream;
mod types;
mod update;
mod url;

use std::time::Duration;

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use reqwest::{Method, RequestBuilder, Response};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

pub use self::error::CouchError;
pub use self::feed::FeedOptions;
pub use self::protocol::{ChangesFilter, Fetched, OpenRevs, RawDoc, RevToFetch, RevsDiff};
pub use self::stream::{DocBody, Multipart};
pub use self::types::*;
pub(crate) use self::update::impl_revised;
pub use self::update::{Revised, Saved};
pub use self::url::{origins_only, redact_credentials, SecretUrl, UrlError};

/// The result of a CouchDB call.
pub type Result<T, E = CouchError> = std::result::Result<T, E>;

/// The database CouchDB 3 serves `_db_updates` from; it must exist.
pub const GLOBAL_CHANGES: &str = "_global_changes";

/// Characters left as they are in a path segment. Everything else, `/`, `+`,
/// `$`, `(`, `)` included, is percent-encoded: CouchDB decodes `+` in a path
/// as a space, so a database named `a+b` must be sent as `a%2Bb`.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Encodes a database name (or a document id) as one path segment.
pub fn encode_segment(name: &str) -> String {
    utf8_percent_encode(name, SEGMENT).to_string()
}

/// True for `.` and `..`, which a URL reads as the current and the parent
/// path. No encoding escapes this: the URL Standard, which the `url` crate
/// under every request follows, takes `%2E` and `%2E%2E` for them too.
pub(crate) fn is_dot_segment(segment: &str) -> bool {
    segment == "." || segment == ".."
}

/// Encodes a document id. Design and local documents keep their prefix's
/// slash, which CouchDB routes on. An id whose segment is `.` or `..` is
/// refused: its path would address the database or the server.
fn encode_doc_id(id: &str) -> Result<String> {
    let (prefix, rest) = ["_design/", "_local/"]
        .into_iter()
        .find_map(|prefix| Some((prefix, id.strip_prefix(prefix)?)))
        .unwrap_or(("", id));
    if is_dot_segment(rest) {
        return Err(CouchError::UnaddressableId(id.to_string()));
    }
    Ok(format!("{prefix}{}", encode_segment(rest)))
}

/// The path of a document: `{db}/{id}`, both encoded.
fn doc_path(db: &str, id: &str) -> Result<String> {
    Ok(format!("{}/{}", encode_segment(db), encode_doc_id(id)?))
}

/// Settings of the HTTP client. Every request has a deadline, so that a
/// connection that goes silent is dropped and the work retried, wherever it
/// happens.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Time limit of ordinary requests, answer included (not feeds, not
    /// `_replicate`).
    pub request_timeout: Duration,
    /// Longest silence while waiting for an answer or its next bytes, on
    /// every request but `_replicate` (feeds send heartbeats well within
    /// it).
    pub idle_timeout: Duration,
    /// Longest wait for a TCP connection.
    pub connect_timeout: Duration,
    /// How often a `POST /_replicate` in flight checks that CouchDB still
    /// runs its job; it is abandoned after two checks that find none.
    pub replication_probe: Duration,
    /// Time limit of a `POST /_replicate`, for servers whose jobs cannot be
    /// checked (no `_scheduler/jobs`).
    pub replication_timeout: Duration,
    /// Idle keep-alive connections kept per host.
    pub max_idle_connections: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            request_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(10),
            replication_probe: Duration::from_secs(10),
            replication_timeout: Duration::from_secs(3600),
            max_idle_connections: 32,
        }
    }
}

impl ClientOptions {
    /// Deadlines that follow a feed heartbeat: a silent connection is
    /// dropped after about two heartbeats.
    pub fn with_heartbeat(heartbeat: Duration) -> Self {
        ClientOptions {
            idle_timeout: heartbeat * 2,
            replication_probe: heartbeat,
            ..ClientOptions::default()
        }
    }
}

/// A client for one CouchDB server. Cheap to clone: clones share the
/// connection pool.
#[derive(Clone)]
pub struct CouchClient {
    http: reqwest::Client,
    /// For `POST /_replicate`, which is silent until the replication is
    /// done: no idle limit; a watchdog stands in for it.
    http_silent: reqwest::Client,
    jobs: replicate::JobsCache,
    /// The server URL without credentials and without a trailing slash.
    base: ::url::Url,
    auth: Option<(String, Option<String>)>,
    display: SecretUrl,
    options: ClientOptions,
    metrics: Option<crate::metrics::CouchMetrics>,
}

impl std::fmt::Debug for CouchClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CouchClient")
            .field("url", &self.display)
            .finish()
    }
}

impl CouchClient {
    /// A client for the server at `url`; user info in the URL becomes Basic
    /// auth on every request.
    pub fn new(url: &SecretUrl, options: ClientOptions) -> Result<Self> {
        let builder = || {
            reqwest::Client::builder()
                .user_agent(concat!("spiegel/", env!("CARGO_PKG_VERSION")))
                .connect_timeout(options.connect_timeout)
                .pool_max_idle_per_host(options.max_idle_connections)
                .tcp_keepalive(Duration::from_secs(30))
                .tcp_nodelay(true)
        };
        let http = builder()
            .read_timeout(options.idle_timeout)
            .build()
            .map_err(CouchError::from_transport)?;
        let http_silent = builder().build().map_err(CouchError::from_transport)?;
        let mut base = url.without_credentials();
        let path = base.path().trim_end_matches('/').to_string();
        base.set_path(&path);
        base.set_query(None);
        base.set_fragment(None);
        let auth = url.username().map(|user| (user, url.password()));
        Ok(CouchClient {
            http,
            http_silent,
            jobs: replicate::JobsCache::default(),
            base,
            auth,
            display: url.clone(),
            options,
            metrics: None,
        })
    }

    /// A client for the server of `url`, with `url`'s credentials, that
    /// shares this client's connection pools, deadlines and metrics: the
    /// native replication engine reaches the servers of replicator
    /// documents through it.
    pub fn at(&self, url: &SecretUrl) -> Self {
        let mut base = url.without_credentials();
        let path = base.path().trim_end_matches('/').to_string();
        base.set_path(&path);
        base.set_query(None);
        base.set_fragment(None);
        CouchClient {
            base,
            auth: url.username().map(|user| (user, url.password())),
            display: url.clone(),
            jobs: replicate::JobsCache::default(),
            ..self.clone()
        }
    }

    /// The server URL, safe to display.
    pub fn url(&self) -> &SecretUrl {
        &self.display
    }

    /// The URL of a database, with the client's credentials: what
    /// `_replicate` needs to reach a database of this server.
    pub fn db_url(&self, db: &str) -> SecretUrl {
        let mut url = self.display.expose().clone();
        let path = format!(
            "{}/{}",
            url.path().trim_end_matches('/'),
            encode_segment(db)
        );
        url.set_path(&path);
        url.set_query(None);
        SecretUrl::parse(url.as_str()).unwrap_or_else(|_| self.display.clone())
    }

    fn url_for(&self, path: &str) -> ::url::Url {
        let mut url = self.base.clone();
        let full = format!("{}/{}", self.base.path().trim_end_matches('/'), path);
        url.set_path(&full);
        url
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.authorized(self.http.request(method, self.url_for(path)))
    }

    fn authorized(&self, req: RequestBuilder) -> RequestBuilder {
        match &self.auth {
            Some((user, pass)) => req.basic_auth(user, pass.as_deref()),
            None => req,
        }
    }

    /// Sends a request and turns an error answer into a [`CouchError`].
    async fn send(
        &self,
        req: RequestBuilder,
        db: Option<&str>,
        doc: Option<&str>,
    ) -> Result<Response> {
        self.send_on(&self.http, req, db, doc).await
    }

    /// [`Self::send`] on one of the two HTTP clients.
    async fn send_on(
        &self,
        http: &reqwest::Client,
        req: RequestBuilder,
        db: Option<&str>,
        doc: Option<&str>,
    ) -> Result<Response> {
        let request = req.build().map_err(CouchError::from_transport)?;
        let op = self.operation(&request);
        let started = std::time::Instant::now();
        let result = match http.execute(request).await {
            Err(e) => Err(CouchError::from_transport(e)),
            Ok(resp) if resp.status().is_success() => Ok(resp),
            Ok(resp) => {
                let status = resp.status();
                let body = resp.bytes().await.unwrap_or_default();
                Err(CouchError::from_response(status, &body, db, doc))
            }
        };
        if let Some(m) = &self.metrics {
            m.observe(
                &op,
                started.elapsed(),
                result.as_ref().err().map(CouchError::kind),
            );
        }
        result
    }

    /// The request's operation, for metrics: the method and the shape of
    /// the path (`GET doc`, `POST db/_bulk_docs`, `GET _db_updates`), never
    /// a database name.
    fn operation(&self, request: &reqwest::Request) -> String {
        let base = self.base.path().trim_end_matches('/');
        let path = request.url().path().strip_prefix(base).unwrap_or("");
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let shape = match segments.as_slice() {
            [] => "server".to_string(),
            [first, ..] if first.starts_with('_') => (*first).to_string(),
            [_] => "db".to_string(),
            [_, second, ..]
                if second.starts_with('_') && *second != "_design" && *second != "_local" =>
            {
                format!("db/{second}")
            }
            _ => "doc".to_string(),
        };
        format!("{} {shape}", request.method())
    }

    /// Counts this client's requests, errors and latencies in `metrics`.
    pub fn with_metrics(mut self, metrics: crate::metrics::CouchMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    async fn json<T: DeserializeOwned>(
        &self,
        req: RequestBuilder,
        db: Option<&str>,
        doc: Option<&str>,
    ) -> Result<T> {
        let resp = self
            .send(req.timeout(self.options.request_timeout), db, doc)
            .await?;
        decode(resp).await
    }

    /// `GET /`.
    pub async fn server_info(&self) -> Result<ServerInfo> {
        self.json(self.request(Method::GET, ""), None, None).await
    }

    /// `PUT /{db}`. Returns false when the database already existed.
    pub async fn create_db(&self, db: &str) -> Result<bool> {
        self.create_db_with(db, &serde_json::Map::new()).await
    }

    /// `DELETE /{db}`.
    pub async fn delete_db(&self, db: &str) -> Result<()> {
        let req = self.request(Method::DELETE, &encode_segment(db));
        self.json::<Value>(req, Some(db), None).await.map(|_| ())
    }

    /// `GET /{db}`.
    pub async fn db_info(&self, db: &str) -> Result<DbInfo> {
        let req = self.request(Method::GET, &encode_segment(db));
        self.json(req, Some(db), None).await
    }

    /// `GET /_all_dbs`, one page in name order.
    pub async fn all_dbs(
        &self,
        start_key: Option<&str>,
        limit: Option<u64>,
    ) -> Result<Vec<String>> {
        let mut req = self.request(Method::GET, "_all_dbs");
        if let Some(key) = start_key {
            req = req.query(&[("startkey", Value::from(key).to_string())]);
        }
        if let Some(limit) = limit {
            req = req.query(&[("limit", limit)]);
        }
        self.json(req, None, None).await
    }

    /// The next page of `_all_dbs`: up to `limit` names strictly after
    /// `after` (the whole listing is read by passing each page's last name).
    pub async fn all_dbs_after(&self, after: Option<&str>, limit: u64) -> Result<Vec<String>> {
        let names = self.all_dbs(after, Some(limit + 1)).await?;
        Ok(after_key(names, after, |n| n.as_str(), limit))
    }

    /// The next page of `GET /_dbs_info` (CouchDB 3.2+), the info of many
    /// databases in one request: up to `limit` rows strictly after `after`.
    pub async fn dbs_info_after(&self, after: Option<&str>, limit: u64) -> Result<Vec<DbsInfoRow>> {
        let mut req = self
            .request(Method::GET, "_dbs_info")
            .query(&[("limit", limit + 1)]);
        if let Some(key) = after {
            req = req.query(&[("start_key", Value::from(key).to_string())]);
        }
        let rows: Vec<DbsInfoRow> = self.json(req, None, None).await?;
        Ok(after_key(rows, after, |r| r.key.as_str(), limit))
    }

    /// `GET /{db}/{id}` with extra query parameters (`conflicts=true`, `rev=`...).
    pub async fn get_doc_with<T: DeserializeOwned>(
        &self,
        db: &str,
        id: &str,
        query: &[(&str, &str)],
    ) -> Result<T> {
        let path = doc_path(db, id)?;
        let req = self.request(Method::GET, &path).query(query);
        self.json(req, Some(db), Some(id)).await
    }

    /// `GET /{db}/{id}`.
    pub async fn get_doc<T: DeserializeOwned>(&self, db: &str, id: &str) -> Result<T> {
        self.get_doc_with(db, id, &[]).await
    }

    /// `GET /{db}/{id}`, with a missing document as `None`.
    pub async fn get_doc_opt<T: DeserializeOwned>(&self, db: &str, id: &str) -> Result<Option<T>> {
        match self.get_doc(db, id).await {
            Ok(doc) => Ok(Some(doc)),
            Err(CouchError::DocNotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `PUT /{db}/{id}`. The revision to replace goes in the document's
    /// `_rev`; a stale one is [`CouchError::Conflict`].
    pub async fn put_doc<D: Serialize + ?Sized>(
        &self,
        db: &str,
        id: &str,
        doc: &D,
    ) -> Result<DocRev> {
        let path = doc_path(db, id)?;
        let req = self.request(Method::PUT, &path).json(doc);
        self.json(req, Some(db), Some(id)).await
    }

    /// `DELETE /{db}/{id}?rev=`.
    pub async fn delete_doc(&self, db: &str, id: &str, rev: &str) -> Result<DocRev> {
        let path = doc_path(db, id)?;
        let req = self.request(Method::DELETE, &path).query(&[("rev", rev)]);
        self.json(req, Some(db), Some(id)).await
    }

    /// `_all_docs`; with `keys`, a POST so that many ids fit.
    pub async fn all_docs(&self, db: &str, query: &AllDocsQuery) -> Result<AllDocs> {
        self.all_docs_as(db, query).await
    }

    /// [`Self::all_docs`] with each body as CouchDB sent it, to be stored
    /// or sent again byte for byte.
    pub async fn all_docs_raw(
        &self,
        db: &str,
        query: &AllDocsQuery,
    ) -> Result<AllDocs<Box<serde_json::value::RawValue>>> {
        self.all_docs_as(db, query).await
    }

    /// One page of [`Self::all_docs_raw`]: up to `limit` rows of `query`'s
    /// range with ids strictly after `after` (the whole range is read by
    /// passing each page's last id), so that no request asks for all.
    pub async fn all_docs_raw_after(
        &self,
        db: &str,
        query: &AllDocsQuery,
        after: Option<&str>,
        limit: u64,
    ) -> Result<Vec<AllDocsRow<Box<serde_json::value::RawValue>>>> {
        let page = AllDocsQuery {
            start_key: after
                .map(str::to_string)
                .or_else(|| query.start_key.clone()),
            limit: Some(limit + 1),
            ..query.clone()
        };
        let rows = self.all_docs_raw(db, &page).await?.rows;
        Ok(after_key(
            rows,
            after,
            |r| r.id.as_deref().unwrap_or(""),
            limit,
        ))
    }

    async fn all_docs_as<D: DeserializeOwned>(
        &self,
        db: &str,
        query: &AllDocsQuery,
    ) -> Result<AllDocs<D>> {
        let path = format!("{}/_all_docs", encode_segment(db));
        let mut req = match &query.keys {
            Some(keys) => self
                .request(Method::POST, &path)
                .json(&json!({ "keys": keys })),
            None => self.request(Method::GET, &path),
        };
        if query.include_docs {
            req = req.query(&[("include_docs", "true")]);
        }
        if query.conflicts {
            req = req.query(&[("conflicts", "true")]);
        }
        if let Some(key) = &query.start_key {
            req = req.query(&[("startkey", Value::from(key.as_str()).to_string())]);
        }
        if let Some(key) = &query.end_key {
            req = req.query(&[("endkey", Value::from(key.as_str()).to_string())]);
        }
        if let Some(limit) = query.limit {
            req = req.query(&[("limit", limit)]);
        }
        self.json(req, Some(db), None).await
    }

    /// `POST /{db}/_bulk_docs`: one result per document, in order.
    /// `new_edits: false` stores revisions as given (replication style).
    pub async fn bulk_docs<D: Serialize>(
        &self,
        db: &str,
        docs: &[D],
        new_edits: bool,
    ) -> Result<Vec<BulkResult>> {
        let path = format!("{}/_bulk_docs", encode_segment(db));
        let body = BulkDocs { docs, new_edits };
        let req = self.request(Method::POST, &path).json(&body);
        self.json(req, Some(db), None).await
    }

    /// One page of `_changes` (feed=normal).
    pub async fn changes(&self, db: &str, query: &ChangesQuery) -> Result<ChangesPage> {
        let path = format!("{}/_changes", encode_segment(db));
        let req = self
            .request(Method::GET, &path)
            .query(&changes_params(query));
        self.json(req, Some(db), None).await
    }

    /// `_changes?feed=continuous` as a stream that reconnects by itself
    /// (see [`feed`]).
    pub fn changes_feed(
        &self,
        db: &str,
        query: &ChangesQuery,
        options: FeedOptions,
    ) -> feed::Feed<Change> {
        let mut params = changes_params(query);
        params.retain(|(k, _)| k != "since");
        let path = format!("{}/_changes", encode_segment(db));
        feed::continuous(
            self.clone(),
            path,
            params,
            query.since.clone(),
            options,
            Some(db.to_string()),
        )
    }

    /// One page of `_db_updates` (feed=normal). Admin only.
    pub async fn db_updates(
        &self,
        since: Option<&Seq>,
        limit: Option<u64>,
    ) -> Result<DbUpdatesPage> {
        let mut req = self.request(Method::GET, "_db_updates");
        if let Some(since) = since {
            req = req.query(&[("since", since.as_param())]);
        }
        if let Some(limit) = limit {
            req = req.query(&[("limit", limit)]);
        }
        self.json(req, Some("_global_changes"), None).await
    }

    /// `_db_updates?feed=continuous` as a stream that reconnects by itself.
    pub fn db_updates_feed(
        &self,
        since: Option<Seq>,
        options: FeedOptions,
    ) -> feed::Feed<DbUpdate> {
        feed::continuous(
            self.clone(),
            "_db_updates".to_string(),
            Vec::new(),
            since,
            options,
            Some("_global_changes".to_string()),
        )
    }

    /// `POST /_replicate`. Without `continuous` CouchDB answers when the
    /// replication is done and sends nothing meanwhile: a watchdog checks
    /// that CouchDB still runs the job (see [`replicate`]).
    pub async fn replicate(&self, body: &Value) -> Result<Value> {
        replicate::watched(self, body).await
    }

    /// `GET /{db}/_security`.
    pub async fn get_security(&self, db: &str) -> Result<Value> {
        let path = format!("{}/_security", encode_segment(db));
        self.json(self.request(Method::GET, &path), Some(db), None)
            .await
    }

    /// `PUT /{db}/_security`.
    pub async fn put_security(&self, db: &str, security: &Value) -> Result<()> {
        let path = format!("{}/_security", encode_segment(db));
        let req = self.request(Method::PUT, &path).json(security);
        self.json::<Value>(req, Some(db), None).await.map(|_| ())
    }

    /// Opens a streaming GET (used by [`feed`]); no overall time limit.
    pub(crate) async fn open_stream(
        &self,
        path: &str,
        params: &[(String, String)],
        db: Option<&str>,
    ) -> Result<Response> {
        let req = self.request(Method::GET, path).query(params);
        self.send(req, db, None).await
    }
}

/// The body of `_bulk_docs`, serialized as it is: documents carried as raw
/// text stay as they are (a `json!` tree would re-encode them).
#[derive(Serialize)]
struct BulkDocs<'a, D> {
    docs: &'a [D],
    new_edits: bool,
}

/// Reads a successful answer's JSON body.
async fn decode<T: DeserializeOwned>(resp: Response) -> Result<T> {
    let bytes = resp.bytes().await.map_err(CouchError::from_transport)?;
    serde_json::from_slice(&bytes).map_err(|e| CouchError::Decode(e.to_string()))
}

/// CouchDB's `start_key` is inclusive: drops the row equal to `after` and
/// keeps at most `limit`.
fn after_key<T>(rows: Vec<T>, after: Option<&str>, key: impl Fn(&T) -> &str, limit: u64) -> Vec<T> {
    rows.into_iter()
        .filter(|r| after != Some(key(r)))
        .take(limit as usize)
        .collect()
}

fn changes_params(query: &ChangesQuery) -> Vec<(String, String)> {
    let mut params = Vec::new();
    if let Some(since) = &query.since {
        params.push(("since".into(), since.as_param()));
    }
    if let Some(limit) = query.limit {
        params.push(("limit".into(), limit.to_string()));
    }
    if query.include_docs {
        params.push(("include_docs".into(), "true".into()));
    }
    params
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_encoded_as_one_segment() {
        assert_eq!(encode_segment("a/b+c$d(e)"), "a%2Fb%2Bc%24d%28e%29");
        assert_eq!(encode_segment("_global_changes"), "_global_changes");
        assert_eq!(encode_doc_id("_design/x/y").unwrap(), "_design/x%2Fy");
        assert_eq!(encode_doc_id("_local/a b").unwrap(), "_local/a%20b");
        assert_eq!(encode_doc_id("spiegel_cl_a/b").unwrap(), "spiegel_cl_a%2Fb");
    }

    #[test]
    fn a_dot_segment_cannot_be_encoded_in_a_url() {
        // Why `.` and `..` are refused rather than encoded: the URL parser
        // under every request removes them in any spelling.
        for (path, parsed) in [
            ("a/..", "/db/"),
            ("a/%2E%2E", "/db/"),
            ("a/%2e.", "/db/"),
            ("a/%2E", "/db/a/"),
        ] {
            let url = ::url::Url::parse(&format!("http://h/db/{path}")).unwrap();
            assert_eq!(url.path(), parsed, "{path}");
        }
    }

    #[test]
    fn a_document_id_that_is_a_dot_segment_has_no_path() {
        for id in [".", "..", "_design/..", "_local/."] {
            assert!(
                matches!(doc_path("db", id), Err(CouchError::UnaddressableId(ref i)) if i == id),
                "{id}"
            );
        }
        assert_eq!(doc_path("db", "...").unwrap(), "db/...");
        assert_eq!(doc_path("db", "../a").unwrap(), "db/..%2Fa");
        assert_eq!(doc_path("db", "_design/.x").unwrap(), "db/_design/.x");
    }

    #[test]
    fn client_keeps_credentials_out_of_its_base_and_debug() {
        let url = SecretUrl::parse("http://admin:pw@127.0.0.1:5984/").unwrap();
        let client = CouchClient::new(&url, ClientOptions::default()).unwrap();
        assert_eq!(client.base.as_str(), "http://127.0.0.1:5984/");
        assert!(!format!("{client:?}").contains("pw"));
        assert_eq!(
            client.url_for("a%2Fb/_changes").as_str(),
            "http://127.0.0.1:5984/a%2Fb/_changes"
        );
        assert_eq!(client.db_url("a/b").password().as_deref(), Some("pw"));
        assert_eq!(client.db_url("a/b").decoded_path(), "/a/b");
    }

    #[test]
    fn bulk_docs_bodies_carry_raw_documents_byte_for_byte() {
        let text = r#"{"_id":"a","z":1,"big":123456789012345678901234567890,"d":0.9469046488777645,"e":1E5,"s":"\u2028\ud83d\ude00"}"#;
        let doc: RawDoc = serde_json::from_str(text).unwrap();
        let docs = [doc];
        let body = serde_json::to_string(&BulkDocs {
            docs: &docs,
            new_edits: false,
        })
        .unwrap();
        assert_eq!(body, format!(r#"{{"docs":[{text}],"new_edits":false}}"#));
    }

    #[test]
    fn a_path_prefix_in_the_server_url_is_kept() {
        let url = SecretUrl::parse("https://host/couch/").unwrap();
        let client = CouchClient::new(&url, ClientOptions::default()).unwrap();
        assert_eq!(client.url_for("db").as_str(), "https://host/couch/db");
    }
}
