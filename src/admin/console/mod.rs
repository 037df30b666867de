//! The web console (`--console`): one server-rendered page of the whole
//! deployment, read from the spiegel database like `spiegel status`, with
//! this process's memory added ([`Process`]): the databases its workers hold
//! waiting, and a live tail of its runs. Its actions (redeliver dead
//! letters, run a database now, pause or resume an on_change rule) need the
//! admin token; without one the console is read-only and open to whoever
//! reaches the admin server.
//!
//! With a token, reading the console needs it too (unless
//! `--console-public-read`): `/` is then a shell without data that asks for
//! the token, and its script fetches the state and the tail with it.
//!
//! The page, its style and its script are embedded in the binary. The
//! script only refreshes the page's parts and sends the actions, with the
//! token as a bearer header: a browser never sends that header to another
//! origin by itself, so another site cannot act through a visitor.
//!
//! However many ask, the installation is read from CouchDB at most once per
//! [`REFRESH`], and the dead letters page by page ([`Letters`]).

mod view;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use self::view::{Parts, View, REFRESH, WAITING_SHOWN};
use crate::commands::status::{Letters, Report};
use crate::commands::{redeliver, status};
use crate::config::RunArgs;
use crate::couch::{CouchClient, CouchError, Saved};
use crate::delivery::Delivery;
use crate::process::Process;

const PAGE: &str = include_str!("page.html");
const STATE: &str = include_str!("state.html");
const STYLE: &str = include_str!("console.css");
const SCRIPT: &str = include_str!("console.js");

/// Dead letters read in full at each refresh (in pages of
/// [`crate::delivery::dead_letter::LETTERS_PER_PAGE`]), the oldest: enough
/// to group them, bounded for a deployment whose API has been down for
/// long. The others are only counted, from their ids.
const LETTERS_READ: u64 = 1000;

/// Same-origin content only: no inline script, nothing from elsewhere.
const CONTENT_POLICY: &str = "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'";

/// The console's state, shared by its handlers.
#[derive(Clone)]
pub struct Console {
    inner: Arc<Inner>,
}

struct Inner {
    /// How the process runs: its connection, engine, token, delivery.
    args: RunArgs,
    client: CouchClient,
    process: Arc<Process>,
    /// Sends the dead letters redelivered from the console, through the
    /// circuits of this process's change-listener when it runs one.
    delivery: Delivery,
    templates: minijinja::Environment<'static>,
    /// The last read of the installation, and when it was made.
    last: tokio::sync::Mutex<Option<(Instant, Read)>>,
}

/// A read of the installation, shared by the requests that come while it
/// is fresh; a failure too, so that an unreachable CouchDB is not asked
/// once per request either.
type Read = Result<Arc<Report>, Arc<crate::error::Error>>;

impl Console {
    /// The console of `process`, run with `args`.
    pub fn new(
        args: &RunArgs,
        client: CouchClient,
        process: Arc<Process>,
    ) -> crate::error::Result<Self> {
        let mut templates = minijinja::Environment::new();
        templates.add_template("page.html", PAGE)?;
        templates.add_template("state.html", STATE)?;
        Ok(Console {
            inner: Arc::new(Inner {
                delivery: Delivery::new(&args.delivery)?,
                process,
                args: args.clone(),
                client,
                templates,
                last: tokio::sync::Mutex::new(None),
            }),
        })
    }

    pub(super) fn routes(self) -> Router {
        Router::new()
            .route("/", get(page))
            .route("/console/state", get(state_part))
            .route("/console/tail", get(tail))
            .route("/console/console.css", get(style))
            .route("/console/console.js", get(script))
            .route("/console/redeliver", post(redeliver))
            .route("/console/run-now", post(run_now))
            .route("/console/pause", post(pause))
            .with_state(self)
    }

    /// The installation as read at most [`REFRESH`] ago. The lock is held
    /// across the read: the requests that come meanwhile wait for it and
    /// share its result, so CouchDB sees one read per interval, whoever
    /// asks and however often.
    async fn report(&self) -> Read {
        let mut last = self.inner.last.lock().await;
        if let Some((at, read)) = last.as_ref() {
            if at.elapsed() < REFRESH {
                return read.clone();
            }
        }
        let args = &self.inner.args;
        let (db, namespace) = (&args.connection.db_name, &args.connection.namespace);
        let letters = Letters::Oldest(LETTERS_READ);
        let read = status::report_with(&self.inner.client, db, namespace, letters)
            .await
            .map(Arc::new)
            .map_err(Arc::new);
        *last = Some((Instant::now(), read.clone()));
        read
    }

    /// The page's value: the spiegel database's documents and this
    /// process's workers' waiting databases.
    async fn view(&self) -> Result<View, Arc<crate::error::Error>> {
        let (inner, args) = (&self.inner, &self.inner.args);
        let report = self.report().await?;
        let workers = inner.process.workers();
        let mut waiting = Vec::new();
        for worker in &workers {
            waiting.extend(worker.waiting(WAITING_SHOWN).await);
        }
        let docs = inner.process.docs();
        Ok(View::build(Parts {
            report: &report,
            docs: docs.as_deref(),
            waiting,
            here: workers.into_iter().map(|w| w.worker_id).collect(),
            default_engine: args.replication_engine,
            circuits: inner.process.circuits(),
            actions: args.admin.token.is_some(),
        }))
    }

    /// The template `name` (the page, or its parts that refresh).
    async fn render(&self, name: &str) -> Response {
        let view = match self.view().await {
            Ok(view) => view,
            Err(e) => return unavailable(&e),
        };
        let rendered = self
            .inner
            .templates
            .get_template(name)
            .and_then(|template| template.render(&view));
        match rendered {
            Ok(html) => (secure_headers(), Html(html)).into_response(),
            Err(e) => not_rendered(&e),
        }
    }

    /// Whether a request may read the console: without a token it is open
    /// (and read-only), `--console-public-read` opens the reading, and
    /// otherwise the request must carry the token.
    fn may_read(&self, headers: &HeaderMap) -> bool {
        let admin = &self.inner.args.admin;
        match &admin.token {
            None => true,
            Some(token) => admin.public_read || token.allows(headers),
        }
    }

    /// The page without data, for a browser that has not given the token
    /// yet: its script asks for it and then fetches the state with it.
    fn shell(&self) -> Response {
        let context = minijinja::context! {
            locked => true,
            actions => true,
            refresh_ms => REFRESH.as_millis(),
        };
        let rendered = self.inner.templates.get_template("page.html");
        match rendered.and_then(|template| template.render(context)) {
            Ok(html) => (secure_headers(), Html(html)).into_response(),
            Err(e) => not_rendered(&e),
        }
    }

    /// An action's request, once it is known to be allowed: a token is set
    /// and the request has it. Only then is its body read.
    fn authorize<T: DeserializeOwned>(
        &self,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<T, ActionError> {
        match &self.inner.args.admin.token {
            None => return Err(ActionError::ReadOnly),
            Some(token) if !token.allows(headers) => return Err(ActionError::Unauthorized),
            Some(_) => {}
        }
        serde_json::from_slice(body).map_err(|e| ActionError::BadRequest(e.to_string()))
    }
}

fn secure_headers() -> [(header::HeaderName, &'static str); 3] {
    [
        (header::CONTENT_SECURITY_POLICY, CONTENT_POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::CACHE_CONTROL, "no-store"),
    ]
}

fn not_rendered(error: &minijinja::Error) -> Response {
    tracing::error!(error = %error, "cannot render the console page");
    let text = "cannot render the page\n";
    (StatusCode::INTERNAL_SERVER_ERROR, text).into_response()
}

/// A read of the console without the token it needs.
fn unauthorized() -> Response {
    let text = "the console needs the admin token (Authorization: Bearer <token>)\n";
    let headers = [
        (header::WWW_AUTHENTICATE, "Bearer"),
        (header::CACHE_CONTROL, "no-store"),
    ];
    (StatusCode::UNAUTHORIZED, headers, text).into_response()
}

/// The page when CouchDB cannot be read.
fn unavailable(error: &crate::error::Error) -> Response {
    tracing::warn!(error = %error, "the console cannot read the spiegel database");
    let error = crate::couch::origins_only(&error.to_string());
    let text = format!("Spiegel's console cannot read the spiegel database: {error}\n");
    (StatusCode::SERVICE_UNAVAILABLE, secure_headers(), text).into_response()
}

async fn page(State(console): State<Console>, headers: HeaderMap) -> Response {
    match console.may_read(&headers) {
        true => console.render("page.html").await,
        false => console.shell(),
    }
}

async fn state_part(State(console): State<Console>, headers: HeaderMap) -> Response {
    match console.may_read(&headers) {
        true => console.render("state.html").await,
        false => unauthorized(),
    }
}

#[derive(Deserialize)]
struct TailQuery {
    #[serde(default)]
    after: u64,
}

async fn tail(
    State(console): State<Console>,
    headers: HeaderMap,
    Query(q): Query<TailQuery>,
) -> Response {
    if !console.may_read(&headers) {
        return unauthorized();
    }
    let entries = console.inner.process.tail.since(q.after);
    ([(header::CACHE_CONTROL, "no-store")], Json(entries)).into_response()
}

async fn style() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE)
}

async fn script() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        SCRIPT,
    )
}

/// Why an action was not done.
#[derive(Debug, thiserror::Error)]
enum ActionError {
    #[error(
        "the console is read-only: start Spiegel with --admin-token (ADMIN_TOKEN) to allow actions"
    )]
    ReadOnly,
    #[error("this action needs the admin token (Authorization: Bearer <token>)")]
    Unauthorized,
    #[error("the request's body: {0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    NotHere(String),
    #[error("CouchDB: {0}")]
    Couch(#[from] CouchError),
}

impl IntoResponse for ActionError {
    fn into_response(self) -> Response {
        let status = match &self {
            ActionError::ReadOnly => StatusCode::FORBIDDEN,
            ActionError::Unauthorized => StatusCode::UNAUTHORIZED,
            ActionError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ActionError::NotFound(_) => StatusCode::NOT_FOUND,
            ActionError::NotHere(_) => StatusCode::CONFLICT,
            ActionError::Couch(_) => StatusCode::BAD_GATEWAY,
        };
        let body = Json(json!({ "error": self.to_string() }));
        match self {
            ActionError::Unauthorized => {
                (status, [(header::WWW_AUTHENTICATE, "Bearer")], body).into_response()
            }
            _ => (status, body).into_response(),
        }
    }
}

#[derive(Deserialize)]
struct RedeliverBody {
    /// Only this rule's dead letters; all when absent.
    rule: Option<String>,
}

/// Sends dead letters again, as `spiegel redeliver` does.
async fn redeliver(
    State(console): State<Console>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ActionError> {
    let body: RedeliverBody = console.authorize(&headers, &body)?;
    let inner = &console.inner;
    let args = inner.args.redeliver(body.rule.filter(|r| !r.is_empty()));
    let delivery = match inner.process.endpoints() {
        Some(endpoints) => inner.delivery.over(endpoints),
        None => inner.delivery.clone(),
    };
    let done = redeliver::redeliver(&inner.client, &args, &delivery).await?;
    tracing::info!(rule = ?args.rule, delivered = done.delivered, failed = done.failed, held = done.held, "console: dead letters redelivered");
    Ok(Json(json!({
        "delivered": done.delivered,
        "failed": done.failed,
        "held": done.held,
        "orphaned": done.orphaned,
        "skipped": done.skipped,
    })))
}

#[derive(Deserialize)]
struct RunNowBody {
    db: String,
    /// Only this role's worker; every worker of the process when absent.
    role: Option<String>,
}

/// Runs a database now in the workers of this process that hold its
/// partition, cutting a retry's wait short.
async fn run_now(
    State(console): State<Console>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ActionError> {
    let body: RunNowBody = console.authorize(&headers, &body)?;
    let mut roles = Vec::new();
    let workers = console.inner.process.workers().into_iter();
    let chosen = workers.filter(|w| body.role.as_ref().is_none_or(|r| *r == w.role));
    for worker in chosen {
        if worker.run_now(&body.db).await {
            roles.push(worker.role);
        }
    }
    if roles.is_empty() {
        return Err(ActionError::NotHere(format!(
            "no worker of this process holds the partition of {:?}: use the console of the process that does (see the workers' partitions), or it runs at its next change",
            body.db
        )));
    }
    tracing::info!(db = %body.db, ?roles, "console: run now");
    Ok(Json(json!({ "db": body.db, "roles": roles })))
}

#[derive(Deserialize)]
struct PauseBody {
    rule: String,
    paused: bool,
}

/// Pauses or resumes an on_change rule: `"paused": true` in its document,
/// which every change-listener follows.
async fn pause(
    State(console): State<Console>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ActionError> {
    let body: PauseBody = console.authorize(&headers, &body)?;
    let inner = &console.inner;
    let db = &inner.args.connection.db_name;
    let not_found = || ActionError::NotFound(format!("no on_change document {:?}", body.rule));
    let doc: Value = inner
        .client
        .get_doc_opt(db, &body.rule)
        .await?
        .filter(is_on_change)
        .ok_or_else(not_found)?;
    let set = |mut doc: Value| {
        if let Some(fields) = doc.as_object_mut() {
            match body.paused {
                true => fields.insert("paused".into(), Value::Bool(true)),
                false => fields.remove("paused"),
            };
        }
        doc
    };
    // Another writer's edit in between is kept: the flag is set on it.
    let rebase =
        |_: Value, stored: Option<&Value>| stored.filter(|d| is_on_change(d)).cloned().map(set);
    match inner
        .client
        .save_all(db, vec![set(doc)], rebase)
        .await?
        .pop()
    {
        Some(Saved::Written(_)) => {}
        Some(Saved::Refused(e)) => return Err(e.into()),
        Some(Saved::Superseded(_)) | None => return Err(not_found()),
    }
    tracing::info!(rule = %body.rule, paused = body.paused, "console: on_change rule paused or resumed");
    Ok(Json(json!({ "rule": body.rule, "paused": body.paused })))
}

fn is_on_change(doc: &Value) -> bool {
    doc.get("type").and_then(Value::as_str) == Some("on_change")
}
