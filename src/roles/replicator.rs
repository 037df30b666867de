//! The replicator role: when a database changes, run every replicator
//! document that applies to it, each once on its engine: the native one
//! (`crate::replication`), or one `POST /_replicate` on the `--url` server.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;

use crate::backoff::Backoff;
use crate::config::{Passwords, RunArgs};
use crate::couch::{CouchClient, CouchError, SecretUrl};
use crate::flush::Flush;
use crate::metrics::{self, OutcomeLabel, RoleMetrics};
use crate::replication::{Engine, Groups, Peer, Replication, ReplicationError, Report, Sessions};
use crate::rules::cache::{Parsed, RuleCache};
use crate::rules::follower::{self, DocsWatch};
use crate::rules::replicator::{AuthStyle, ReplicatorRule, Trigger};
use crate::status::StatusBook;
use crate::worker::{Outcome, Role, Wait};

pub const NAME: &str = "replicator";

pub struct Replicator {
    client: CouchClient,
    server: SecretUrl,
    docs: DocsWatch,
    passwords: Passwords,
    auth: AuthStyle,
    /// The engine of documents that name none.
    engine: Engine,
    assume_deleted_after: Duration,
    status: StatusBook,
    metrics: RoleMetrics,
    rules: RuleCache<ReplicatorRule>,
    /// The native engine's progress between runs.
    sessions: Sessions,
    /// The runs on each target, which share their requests to it.
    groups: Groups,
}

/// One replication's result.
enum Replicated {
    Ok,
    Retry(String, Wait),
    Failed(String),
    SourceMissing,
}

impl Replicator {
    /// The role as `args` set it up.
    pub fn start(
        args: &RunArgs,
        client: CouchClient,
        docs: DocsWatch,
        auth: AuthStyle,
        status: StatusBook,
        metrics: RoleMetrics,
    ) -> Self {
        Replicator {
            client,
            server: args.connection.url.clone(),
            docs,
            passwords: args.rules.passwords.clone(),
            auth,
            engine: args.replication_engine,
            assume_deleted_after: args.worker.assume_deleted_after,
            status,
            metrics,
            rules: RuleCache::new("replicator"),
            sessions: Sessions::default(),
            groups: Groups::new(args.group_window),
        }
    }

    /// The current rules, re-parsed when the documents changed. Unusable
    /// documents are reported once per revision and skipped.
    async fn rules(&self) -> Arc<Vec<ReplicatorRule>> {
        let docs = follower::loaded(&mut self.docs.clone()).await;
        let rules = self.rules.rules(
            &docs,
            |id, doc| ReplicatorRule::parse(id, doc, &self.server),
            |id, parsed| match parsed {
                Parsed::Usable(rule) => {
                    if rule.asked_continuous {
                        tracing::warn!(doc = %id, "continuous: true is ignored: Spiegel replicates each change one-shot");
                    }
                    if rule.trigger == Trigger::Elsewhere {
                        tracing::warn!(doc = %id, "the source is on another server than --url: this server's updates never trigger it");
                    }
                    let note = match (rule.engine.unwrap_or(self.engine), &rule.native) {
                        (Engine::Native, Err(e)) => Some(format!("{e}: replicated by the couchdb engine")),
                        _ => None,
                    };
                    if let Some(note) = &note {
                        tracing::warn!(doc = %id, "{note}");
                    }
                    self.status.note(id, note);
                    self.status.invalid(id, None);
                }
                Parsed::Unusable(e) => {
                    tracing::error!(doc = %id, error = %e, "unusable replicator document: skipped");
                    self.status.invalid(id, Some(e.to_string()));
                }
            },
            // Statuses of deleted documents go with them.
            |docs| self.status.retain(|id| docs.contains_key(id)),
        );
        rules
    }

    /// The engine that replicates `rule`: its own choice, else the default;
    /// a document the native engine cannot run goes to `couchdb`.
    fn engine_of(&self, rule: &ReplicatorRule) -> Engine {
        match rule.engine.unwrap_or(self.engine) {
            Engine::Native if rule.native.is_err() => Engine::CouchDb,
            engine => engine,
        }
    }

    async fn replicate(&self, rule: &ReplicatorRule, db: &str) -> Replicated {
        match self.engine_of(rule) {
            Engine::CouchDb => self.replicate_couchdb(rule, db).await,
            Engine::Native => self.replicate_native(rule, db).await,
        }
    }

    /// Counts a successful replication and reports it in the status.
    fn succeeded(&self, rule: &ReplicatorRule, db: &str, counts: [u64; 3], extra: &str) {
        let [read, written, failures] = counts;
        let label = metrics::role(NAME);
        self.metrics.docs_read.get_or_create(&label).inc_by(read);
        self.metrics
            .docs_written
            .get_or_create(&label)
            .inc_by(written);
        self.metrics
            .doc_write_failures
            .get_or_create(&label)
            .inc_by(failures);
        let detail =
            format!("docs_read={read} docs_written={written} doc_write_failures={failures}{extra}");
        self.status.success(&rule.id, db, Some(detail));
    }

    async fn replicate_native(&self, rule: &ReplicatorRule, db: &str) -> Replicated {
        let Ok(options) = &rule.native else {
            return Replicated::Failed("the native engine cannot run this document".into());
        };
        let (source, target) = match rule.endpoints(db, &self.passwords) {
            Ok(urls) => urls,
            Err(e) => return Replicated::Failed(e.to_string()),
        };
        let (Some(source), Some(target)) = (
            Peer::at(&self.client, &source),
            Peer::at(&self.client, &target),
        ) else {
            return Replicated::Failed("the source or the target URL names no database".into());
        };
        let replication = Replication {
            group: Some(self.groups.join(&target)),
            source,
            target,
            options: options.clone(),
        };
        let started = std::time::Instant::now();
        match self.run_native(&replication, db).await {
            Ok(report) => {
                let seq = report.last_seq.map(|s| s.to_string()).unwrap_or_default();
                let mut extra = format!(
                    " missing_checked={} engine=native seq={seq} took_ms={}",
                    report.missing_checked,
                    started.elapsed().as_millis()
                );
                if !report.refused.is_empty() {
                    let refused = report.refused.join(", ");
                    extra.push_str(&format!(" refused=[{refused}]"));
                    self.status.passed_over(&rule.id, db, refused);
                }
                let counts = [
                    report.docs_read,
                    report.docs_written,
                    report.doc_write_failures,
                ];
                self.succeeded(rule, db, counts, &extra);
                Replicated::Ok
            }
            Err(ReplicationError::SourceMissing) => Replicated::SourceMissing,
            Err(e) => match e.couch_error() {
                Some(c) if c.is_transient() => Replicated::Retry(e.to_string(), Wait::for_couch(c)),
                _ => Replicated::Failed(e.to_string()),
            },
        }
    }

    /// One run under the replication's id, from and into the progress
    /// this process keeps of it.
    async fn run_native(
        &self,
        replication: &Replication,
        db: &str,
    ) -> Result<Report, ReplicationError> {
        let id = replication.id().await?;
        let known = self.sessions.take(db, &id);
        let (ran, progress) = match replication.run(&id, known).await {
            Ok((report, progress)) => (Ok(report), progress),
            Err(e) => (Err(e), None),
        };
        self.sessions.finish(db, id, progress);
        ran
    }

    async fn replicate_couchdb(&self, rule: &ReplicatorRule, db: &str) -> Replicated {
        let body = match rule.request(db, &self.passwords, self.auth) {
            Ok(body) => body,
            Err(e) => return Replicated::Failed(e.to_string()),
        };
        match self.client.replicate(&body).await {
            Ok(answer) if answer.get("ok") == Some(&Value::Bool(true)) => {
                let h = answer.get("history").and_then(|h| h.get(0));
                let count = |k: &str| {
                    h.and_then(|h| h.get(k))
                        .and_then(Value::as_u64)
                        .unwrap_or(0)
                };
                let counts = [
                    count("docs_read"),
                    count("docs_written"),
                    count("doc_write_failures"),
                ];
                self.succeeded(rule, db, counts, "");
                Replicated::Ok
            }
            Ok(answer) => Replicated::Retry(
                format!(
                    "unexpected _replicate answer: {}",
                    crate::couch::redact_credentials(&answer.to_string())
                ),
                Wait::Backoff,
            ),
            Err(e) if e.is_transient() => Replicated::Retry(e.to_string(), Wait::for_couch(&e)),
            Err(CouchError::NotFound(_)) | Err(CouchError::DbNotFound(_)) => {
                // Which end is missing? The source is a database of ours.
                match self.client.db_info(db).await {
                    Err(CouchError::DbNotFound(_)) => Replicated::SourceMissing,
                    Ok(_) if rule.creates_target() => {
                        Replicated::Retry("_replicate answered not found".into(), Wait::Backoff)
                    }
                    Ok(_) => Replicated::Failed(
                        "the target database does not exist (set create_target: true to create it)"
                            .into(),
                    ),
                    Err(e) => Replicated::Retry(e.to_string(), Wait::for_couch(&e)),
                }
            }
            Err(e) => Replicated::Failed(e.to_string()),
        }
    }
}

impl Role for Replicator {
    fn name(&self) -> &str {
        NAME
    }

    async fn handle(&self, db: &str) -> Outcome {
        let rules = self.rules().await;
        let mut retry = None;
        let mut missing = false;
        for rule in rules.iter().filter(|r| r.applies_to(db)) {
            let result = self.replicate(rule, db).await;
            let outcome = match &result {
                Replicated::Ok => "ok",
                Replicated::Failed(_) => "failed",
                Replicated::Retry(..) => "retry",
                Replicated::SourceMissing => "source_missing",
            };
            self.metrics
                .replications
                .get_or_create(&OutcomeLabel {
                    outcome: outcome.into(),
                    engine: self.engine_of(rule).name().into(),
                })
                .inc();
            match result {
                Replicated::Ok => {}
                // Nothing is taken for done that did not replicate: even an
                // error that looks permanent (a refusal, an answer that
                // does not decode, a document to fix) is retried with
                // backoff, and shown in the status meanwhile.
                Replicated::Failed(error) => {
                    tracing::error!(doc = %rule.id, db, %error, replication = %rule.describe(db), "replication failed");
                    self.status.failure(&rule.id, db, error.clone());
                    retry = Some((error, Wait::Backoff));
                }
                Replicated::Retry(error, wait) => {
                    self.status.failure(&rule.id, db, error.clone());
                    retry = Some((error, wait));
                }
                Replicated::SourceMissing => {
                    let error = "the source database does not exist (yet?); retrying";
                    self.status.failure(&rule.id, db, error.into());
                    missing = true;
                }
            }
        }
        if missing {
            // The runtime retries it, and takes it for deleted in time.
            return Outcome::Missing;
        }
        match retry {
            None => Outcome::Done,
            // The runtime applies --backoff-limit.
            Some((reason, wait)) => Outcome::Retry { wait, reason },
        }
    }

    async fn deleted(&self, db: &str) {
        self.sessions.forget(db);
    }

    async fn partition_gone(&self, partition: u32, partitions: u32) {
        use crate::coordination::partition_of;
        self.sessions
            .forget_where(|db| partition_of(db, partitions) == partition);
    }

    async fn forget(&self, db: &str) {
        self.sessions.forget(db);
        let error = format!(
            "the source database does not exist; taken for deleted after {:?}: replication resumes when it is created again",
            self.assume_deleted_after
        );
        for rule in self.rules().await.iter().filter(|r| r.applies_to(db)) {
            self.status.failure(&rule.id, db, error.clone());
        }
    }

    async fn save(&self) {
        self.status.flush().await;
    }
}

/// Sends the databases a changed document applies to, so that a document
/// added or edited takes effect at once (plain documents: their source;
/// templated ones: every matching database of the server).
///
/// At start, documents that some worker already ran (they appear in a status
/// document) wait for their sources' next change; the others (added while
/// Spiegel was stopped, or while it started) are run at once.
pub async fn nudge_on_changes(
    client: CouchClient,
    server: SecretUrl,
    mut docs: DocsWatch,
    already_run: HashSet<String>,
    nudges: mpsc::Sender<String>,
) {
    let mut known: HashMap<String, String> = HashMap::new();
    let mut first_load = true;
    loop {
        let current = follower::loaded(&mut docs).await;
        // Deleted documents are forgotten.
        known.retain(|id, _| current.contains_key(id));
        for (id, doc) in current
            .iter()
            .filter(|(_, d)| d.get("type").and_then(Value::as_str) == Some("replicator"))
        {
            let rev = doc
                .get("_rev")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            if known.get(id) == Some(&rev) {
                continue;
            }
            known.insert(id.clone(), rev);
            if first_load && already_run.contains(id) {
                continue;
            }
            let Ok(rule) = ReplicatorRule::parse(id, doc, &server) else {
                continue;
            };
            match &rule.trigger {
                Trigger::Database(db) => {
                    if nudges.send(db.clone()).await.is_err() {
                        return;
                    }
                }
                Trigger::Pattern(_) => {
                    if nudge_matching(&client, &rule, &nudges).await.is_err() {
                        return;
                    }
                }
                Trigger::Elsewhere => {}
            }
        }
        first_load = false;
        if docs.changed().await.is_err() {
            return;
        }
    }
}

/// The worker stopped listening to nudges.
struct Closed;

/// Nudges every database of the server that a templated document applies
/// to, except the empty ones: a database that never held a document has
/// nothing to replicate, and its first write brings an update event that
/// runs the document then. A document with `create_target` still runs for
/// every database, since each run creates its target. Without
/// `GET /_dbs_info` (CouchDB before 3.2) every matching database is nudged.
/// A listing that fails for a transient reason (CouchDB unreachable) is
/// retried until it succeeds.
async fn nudge_matching(
    client: &CouchClient,
    rule: &ReplicatorRule,
    nudges: &mpsc::Sender<String>,
) -> std::result::Result<(), Closed> {
    let mut listing = Listing {
        client: client.clone(),
        after: None,
        with_counts: true,
    };
    let retry = Backoff::reconnect(Duration::from_secs(30));
    let what = format!(
        "listing the databases for replicator document {:?}",
        rule.id
    );
    loop {
        let page = match retry
            .retry(&what, &mut listing, |l| Box::pin(l.next_page()))
            .await
        {
            Ok(page) => page,
            Err(e) => {
                tracing::error!(doc = %rule.id, error = %e, "listing the databases for a new replicator document failed; the databases not listed run at their next change");
                return Ok(());
            }
        };
        let Some((last, _)) = page.last() else {
            return Ok(());
        };
        listing.after = Some(last.clone());
        for (db, empty) in page {
            if rule.applies_to(&db) && (!empty || rule.creates_target()) {
                nudges.send(db).await.map_err(|_| Closed)?;
            }
        }
    }
}

/// A walk through the server's databases, a page at a time, with whether
/// each is empty (never held a document) where the server can tell.
struct Listing {
    client: CouchClient,
    after: Option<String>,
    /// `GET /_dbs_info` works (CouchDB 3.2 and later).
    with_counts: bool,
}

impl Listing {
    const PAGE: u64 = 100;

    /// The next page: `Err` to retry (transient), `Ok(Err)` to give up.
    async fn next_page(&mut self) -> Result<Result<Vec<(String, bool)>, CouchError>, CouchError> {
        let listed = if self.with_counts {
            self.client
                .dbs_info_after(self.after.as_deref(), Self::PAGE)
                .await
                .map(|rows| {
                    let empty = |i: &crate::couch::DbInfo| i.doc_count == 0 && i.doc_del_count == 0;
                    rows.into_iter()
                        .map(|row| (row.key, row.info.as_ref().is_some_and(empty)))
                        .collect()
                })
        } else {
            let names = self.client.all_dbs_after(self.after.as_deref(), 1000).await;
            names.map(|names| names.into_iter().map(|n| (n, false)).collect())
        };
        match listed {
            Err(e) if self.with_counts && self.after.is_none() && !e.is_transient() => {
                tracing::debug!(error = %e, "no GET /_dbs_info: every matching database is run");
                self.with_counts = false;
                Box::pin(self.next_page()).await
            }
            Err(e) if e.is_transient() => Err(e),
            other => Ok(other),
        }
    }
}
