//! The change-listener role: when a database changes, read its `_changes`
//! from the database's checkpoint, call the API of every on_change rule
//! that matches each change, and save the checkpoint once the batch is
//! delivered.
//!
//! Order: with `block` (the default) the requests of change N+1 start only
//! after those of change N succeeded. Requests of `block: false` rules of a
//! batch go out concurrently, and the checkpoint waits for all of them.
//! A failed request is retried after the rule's backoff without holding a
//! concurrency slot (the run ends and the runtime runs the database again);
//! what was delivered meanwhile is remembered, so a retry sends only what
//! failed. After the last retry the request becomes a dead letter and
//! delivery moves on.

mod checkpoints;

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};

pub use self::checkpoints::Checkpoints;
use super::status::StatusBook;
use crate::backoff::Backoff;
use crate::config::{Config, Passwords};
use crate::couch::{Change, ChangesQuery, CouchClient, CouchError, Seq};
use crate::delivery::dead_letter::{self, DeadLetter};
use crate::delivery::{ChangeContext, DeliveryError, Request, RequestTemplate, Sender, Signing};
use crate::metrics::{ClassLabel, RoleMetrics};
use crate::rules::cache::{Parsed, RuleCache};
use crate::rules::follower::{self, DocsWatch};
use crate::rules::on_change::{self, OnChangeRule, SecretSource};
use crate::worker::{Outcome, Role, Wait};

pub const NAME: &str = "change-listener";

/// Requests of `block: false` rules sent at once, per run.
const PARALLEL_REQUESTS: usize = 8;

/// A rule ready to deliver: its signing secret resolved, its backoff built.
pub struct Prepared {
    pub rule: OnChangeRule,
    signing: Option<Signing>,
    backoff: Backoff,
}

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error(transparent)]
    Doc(#[from] on_change::OnChangeDocError),
    #[error("the signing secret is not available: {0}")]
    Secret(String),
}

impl Prepared {
    fn new(
        id: &str,
        doc: &Value,
        passwords: &Passwords,
        global: &Backoff,
    ) -> Result<Self, PrepareError> {
        let rule = OnChangeRule::parse(id, doc)?;
        let signing = match &rule.request.sign {
            None => None,
            Some(sign) => {
                let secret = match &sign.secret {
                    SecretSource::Env(name) => std::env::var(name).map_err(|_| {
                        PrepareError::Secret(format!("environment variable {name} is not set"))
                    })?,
                    SecretSource::Passwords { host, user } => passwords
                        .lookup(host, host, user)
                        .map(String::from)
                        .ok_or_else(|| {
                            PrepareError::Secret(format!(
                                "no password for {user}@{host} in the passwords file"
                            ))
                        })?,
                };
                Some(Signing {
                    secret,
                    header: sign.header.clone(),
                })
            }
        };
        let base = Backoff {
            jitter: false,
            ..global.clone()
        };
        let backoff = match &rule.backoff {
            Some(o) => o.apply(base),
            None => base,
        };
        Ok(Prepared {
            rule,
            signing,
            backoff,
        })
    }

    fn template(&self) -> RequestTemplate<'_> {
        let r = &self.rule.request;
        RequestTemplate {
            url: &r.url,
            method: r.method,
            params: r.params.as_ref(),
            headers: &r.headers,
            timeout: r.timeout,
            sign: self.signing.as_ref(),
        }
    }
}

pub struct ChangeListener {
    client: CouchClient,
    spiegel_db: String,
    namespace: String,
    docs: DocsWatch,
    passwords: Passwords,
    sender: Sender,
    backoff: Backoff,
    batch_size: u64,
    assume_deleted_after: Duration,
    checkpoints: Checkpoints,
    status: StatusBook,
    metrics: RoleMetrics,
    rules: RuleCache<Prepared>,
    progress: Mutex<HashMap<String, Progress>>,
}

/// One rule's delivery of one change. A change is its document id and
/// revision, never its seq: on a sharded database the same change can come
/// back with another seq when `_changes` is read again.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct DeliveryKey {
    rule: String,
    doc_id: String,
    rev: String,
}

impl DeliveryKey {
    fn of(rule: &str, change: &Change) -> Self {
        DeliveryKey {
            rule: rule.to_string(),
            doc_id: change.id.clone(),
            rev: rev_of(change).to_string(),
        }
    }
}

/// What a database's failed run leaves for its retry.
#[derive(Default)]
struct Progress {
    /// Requests already delivered (or dead-lettered) since the checkpoint.
    delivered: HashSet<DeliveryKey>,
    /// Attempts of the requests that failed.
    attempts: HashMap<DeliveryKey, Attempts>,
    /// Deleted while we held it: the next run starts from the beginning.
    deleted: bool,
    /// Not found since (the database was deleted without our seeing it).
    missing_since: Option<Instant>,
}

struct Attempts {
    count: u32,
    first_at: String,
}

/// A request to make for a change.
struct Job<'a> {
    key: DeliveryKey,
    rule: &'a Prepared,
    change: &'a Change,
    request: Request,
}

/// The change's revision, `""` when `_changes` gave none.
fn rev_of(change: &Change) -> &str {
    change.changes.first().map_or("", |c| c.rev.as_str())
}

/// The changed document, or its deletion stub.
fn doc_of(change: &Change) -> Cow<'_, Value> {
    match &change.doc {
        Some(doc) if !change.deleted => Cow::Borrowed(doc),
        _ => Cow::Owned(json!({ "_id": change.id, "_rev": rev_of(change), "_deleted": true })),
    }
}

enum Sent {
    Ok,
    /// Failed; retry after the wait.
    Retry(Duration, String),
    /// Failed for the last time: dead-lettered, moving on.
    Dead,
}

impl ChangeListener {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: CouchClient,
        spiegel_db: &str,
        namespace: &str,
        docs: DocsWatch,
        passwords: Passwords,
        sender: Sender,
        backoff: Backoff,
        batch_size: u64,
        assume_deleted_after: Duration,
        checkpoints: Checkpoints,
        status: StatusBook,
        metrics: RoleMetrics,
    ) -> Self {
        ChangeListener {
            client,
            spiegel_db: spiegel_db.into(),
            namespace: namespace.into(),
            docs,
            passwords,
            sender,
            backoff,
            batch_size: batch_size.max(1),
            assume_deleted_after,
            checkpoints,
            status,
            metrics,
            rules: RuleCache::new("on_change"),
            progress: Mutex::default(),
        }
    }

    fn progress(&self) -> std::sync::MutexGuard<'_, HashMap<String, Progress>> {
        // Bookkeeping only; a poisoned lock is safe to reuse.
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub async fn rules(&self) -> Arc<Vec<Prepared>> {
        let docs = follower::loaded(&mut self.docs.clone()).await;
        self.rules.rules(
            &docs,
            |id, doc| Prepared::new(id, doc, &self.passwords, &self.backoff),
            |id, parsed| match parsed {
                Parsed::Usable(_) => self.status.invalid(id, None),
                Parsed::Unusable(e) => {
                    tracing::error!(doc = %id, error = %e, "unusable on_change document: skipped");
                    self.status.invalid(id, Some(e.to_string()));
                }
            },
            // Statuses of deleted documents go with them.
            |docs| self.status.retain(|id| docs.contains_key(id)),
        )
    }

    /// The job is done with (delivered or dead-lettered): a retry skips it.
    fn settle(&self, db: &str, key: &DeliveryKey) {
        let mut progress = self.progress();
        let p = progress.entry(db.to_string()).or_default();
        p.attempts.remove(key);
        p.delivered.insert(key.clone());
    }

    /// Sends one request once, recording the outcome.
    async fn send(&self, job: &Job<'_>, db: &str) -> Sent {
        let result = self.sender.send(&job.request).await;
        let class = match &result {
            Ok(d) => format!("{}xx", d.status / 100),
            Err(DeliveryError::Status { status, .. }) => format!("{}xx", status / 100),
            Err(DeliveryError::Timeout(_)) => "timeout".into(),
            Err(_) => "network".into(),
        };
        self.metrics
            .webhook_requests
            .get_or_create(&ClassLabel { class })
            .inc();
        match result {
            Ok(delivered) => {
                self.status.success(
                    &job.rule.rule.id,
                    db,
                    Some(format!("HTTP {}", delivered.status)),
                );
                self.settle(db, &job.key);
                Sent::Ok
            }
            Err(error) => {
                let text = error.to_string();
                self.status.failure(&job.rule.rule.id, db, text.clone());
                let now = crate::coordination::timestamp();
                let (count, first_at) = {
                    let mut progress = self.progress();
                    let p = progress.entry(db.to_string()).or_default();
                    let a = p.attempts.entry(job.key.clone()).or_insert(Attempts {
                        count: 0,
                        first_at: now.clone(),
                    });
                    a.count += 1;
                    (a.count, a.first_at.clone())
                };
                let retries = count - 1;
                if !job.rule.backoff.exhausted(retries) {
                    self.metrics.webhook_retries.inc();
                    return Sent::Retry(job.rule.backoff.wait(count), text);
                }
                let letter = DeadLetter {
                    kind: DeadLetter::KIND.into(),
                    rule: job.rule.rule.id.clone(),
                    db_name: db.into(),
                    seq: job.change.seq.as_json().clone(),
                    doc_id: job.change.id.clone(),
                    rev: rev_of(job.change).to_string(),
                    change: doc_of(job.change).into_owned(),
                    request: job.request.redacted(),
                    last_status: match &error {
                        DeliveryError::Status { status, .. } => Some(*status),
                        _ => None,
                    },
                    last_error: text.clone(),
                    attempts: count,
                    first_attempt_at: first_at,
                    last_attempt_at: now,
                };
                if let Err(e) =
                    dead_letter::store(&self.client, &self.spiegel_db, &self.namespace, &letter)
                        .await
                {
                    // Without its dead letter the request must not be dropped.
                    return Sent::Retry(
                        job.rule.backoff.wait(count),
                        format!("cannot store the dead letter: {e}"),
                    );
                }
                tracing::error!(rule = %job.rule.rule.id, db, doc = %job.change.id, attempts = count, error = %text, "request failed for the last time: stored as a dead letter");
                self.metrics.dead_letters.inc();
                self.settle(db, &job.key);
                Sent::Dead
            }
        }
    }

    /// The requests of one batch, in change order, debounced.
    fn jobs<'a>(&self, db: &str, rules: &[&'a Prepared], changes: &'a [Change]) -> Vec<Job<'a>> {
        let delivered = self
            .progress()
            .get(db)
            .map(|p| p.delivered.clone())
            .unwrap_or_default();
        let mut jobs: Vec<Job<'a>> = Vec::new();
        let mut debounced = HashSet::new();
        for change in changes {
            let rev = rev_of(change);
            let doc = doc_of(change);
            for rule in rules.iter().filter(|r| r.rule.matches(&doc)) {
                let context = ChangeContext {
                    db_name: db,
                    doc: &doc,
                    id: &change.id,
                    rev,
                    seq: change.seq.as_json(),
                };
                let request = match Request::build(&rule.template(), &context, &self.passwords) {
                    Ok(request) => request,
                    Err(e) => {
                        tracing::error!(rule = %rule.rule.id, db, error = %e, "cannot build the request: skipped");
                        self.status.failure(
                            &rule.rule.id,
                            db,
                            format!("cannot build the request: {e}"),
                        );
                        continue;
                    }
                };
                if rule.rule.debounce && !debounced.insert(request.identity()) {
                    continue;
                }
                let key = DeliveryKey::of(&rule.rule.id, change);
                if delivered.contains(&key) {
                    continue;
                }
                jobs.push(Job {
                    key,
                    rule,
                    change,
                    request,
                });
            }
        }
        jobs
    }

    /// Delivers a batch. Ok(()) when everything is delivered; otherwise the
    /// seq of the last change whose requests all succeeded, the wait and
    /// the reason.
    async fn deliver(
        &self,
        db: &str,
        rules: &[&Prepared],
        changes: &[Change],
    ) -> Result<(), (Option<Seq>, Duration, String)> {
        let jobs = self.jobs(db, rules, changes);
        let (parallel, ordered): (Vec<&Job>, Vec<&Job>) =
            jobs.iter().partition(|j| !j.rule.rule.block);

        let mut failure: Option<(Duration, String)> = None;
        let mut waiting = parallel.iter();
        let mut in_flight = futures::stream::FuturesUnordered::new();
        for job in waiting.by_ref().take(PARALLEL_REQUESTS) {
            in_flight.push(self.send(job, db));
        }
        while let Some(sent) = in_flight.next().await {
            if let Sent::Retry(wait, reason) = sent {
                failure.get_or_insert((wait, reason));
            }
            if let Some(job) = waiting.next() {
                in_flight.push(self.send(job, db));
            }
        }
        let parallel_failed = failure.is_some();

        // Blocking requests, strictly in change order.
        let mut upto: Option<Seq> = None;
        let mut jobs_by_change = ordered.iter().peekable();
        for change in changes {
            while let Some(job) = jobs_by_change.next_if(|j| std::ptr::eq(j.change, change)) {
                if let Sent::Retry(wait, reason) = self.send(job, db).await {
                    let progress = if parallel_failed { None } else { upto };
                    return Err((progress, wait, reason));
                }
            }
            upto = Some(change.seq.clone());
        }
        match failure {
            None => Ok(()),
            Some((wait, reason)) => Err((None, wait, reason)),
        }
    }

    fn missing(&self, db: &str) -> Outcome {
        let since = *self
            .progress()
            .entry(db.to_string())
            .or_default()
            .missing_since
            .get_or_insert_with(Instant::now);
        if since.elapsed() >= self.assume_deleted_after {
            self.checkpoints.forget(db);
            self.progress().remove(db);
            tracing::info!(db, "database taken for deleted: its checkpoint is removed");
            Outcome::Gone
        } else {
            Outcome::retry("the database does not exist")
        }
    }
}

impl Role for ChangeListener {
    fn name(&self) -> &str {
        NAME
    }

    async fn handle(&self, db: &str) -> Outcome {
        let rules = self.rules().await;
        let rules: Vec<&Prepared> = rules.iter().filter(|r| r.rule.applies_to_db(db)).collect();
        if rules.is_empty() {
            return Outcome::Done;
        }
        let recreated = self
            .progress()
            .get_mut(db)
            .is_some_and(|p| std::mem::take(&mut p.deleted));
        let mut since = if recreated {
            // The database was deleted and created again: its seqs restarted.
            self.checkpoints.forget(db);
            None
        } else {
            match self.checkpoints.get(db).await {
                Ok(seq) => seq,
                Err(e) => return Outcome::couch_failed("cannot read the checkpoint", &e),
            }
        };
        loop {
            let query = ChangesQuery {
                since: since.clone(),
                limit: Some(self.batch_size),
                include_docs: true,
            };
            let page = match self.client.changes(db, &query).await {
                Ok(page) => page,
                Err(CouchError::DbNotFound(_)) => return self.missing(db),
                Err(e) => return Outcome::couch_failed("cannot read _changes", &e),
            };
            if let Some(p) = self.progress().get_mut(db) {
                p.missing_since = None;
            }
            if page.results.is_empty() {
                return Outcome::Done;
            }
            let full = page.results.len() as u64 >= self.batch_size;
            match self.deliver(db, &rules, &page.results).await {
                Ok(()) => {
                    self.checkpoints.set(db, page.last_seq.clone());
                    if let Some(p) = self.progress().get_mut(db) {
                        p.delivered.clear();
                    }
                    since = Some(page.last_seq);
                }
                Err((upto, wait, reason)) => {
                    if let Some(seq) = upto {
                        self.checkpoints.set(db, seq);
                    }
                    return Outcome::Retry {
                        wait: Wait::For(wait),
                        reason,
                    };
                }
            }
            if !full {
                return Outcome::Done;
            }
        }
    }

    async fn deleted(&self, db: &str) {
        {
            let mut progress = self.progress();
            let p = progress.entry(db.to_string()).or_default();
            p.deleted = true;
            p.delivered.clear();
            p.attempts.clear();
        }
        // The checkpoint goes once the database has stayed deleted.
        let client = self.client.clone();
        let checkpoints = self.checkpoints.clone();
        let wait = self.assume_deleted_after;
        let db = db.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            if matches!(client.db_info(&db).await, Err(CouchError::DbNotFound(_))) {
                // Load it first: only a known revision can be deleted.
                let _ = checkpoints.get(&db).await;
                checkpoints.forget(&db);
                checkpoints.flush().await;
                tracing::info!(db = %db, "deleted database: its checkpoint is removed");
            }
        });
    }

    async fn stop(&self) {
        self.checkpoints.flush().await;
    }
}

/// What `spiegel redeliver` did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Redelivered {
    pub delivered: usize,
    pub failed: usize,
    /// Dead letters whose on_change document no longer exists (kept).
    pub orphaned: usize,
}

/// Sends dead letters again (all, or those of one rule and/or database),
/// each with its rule's current URL, headers and signature, and removes the
/// ones that succeed. A failure keeps the letter, with the new error.
pub async fn redeliver(
    client: &CouchClient,
    config: &Config,
    sender: &Sender,
) -> Result<Redelivered, CouchError> {
    let (spiegel_db, namespace, passwords) =
        (&config.db_name, &config.namespace, &config.passwords);
    let (rule_filter, db_filter) = (config.rule.as_deref(), config.database.as_deref());
    use crate::couch::AllDocsQuery;
    let letters: Vec<_> = dead_letter::list(client, spiegel_db, namespace)
        .await?
        .into_iter()
        .filter(|(_, _, letter)| {
            rule_filter.is_none_or(|r| r == letter.rule)
                && db_filter.is_none_or(|d| d == letter.db_name)
        })
        .collect();
    // Only the on_change documents the letters name, not the whole database.
    let keys: HashSet<&str> = letters.iter().map(|(_, _, l)| l.rule.as_str()).collect();
    let mut rules = HashMap::new();
    if !keys.is_empty() {
        let query = AllDocsQuery {
            keys: Some(keys.into_iter().map(String::from).collect()),
            include_docs: true,
            ..Default::default()
        };
        let found = client.all_docs(spiegel_db, &query).await?;
        for (id, doc) in found.rows.into_iter().filter_map(|r| Some((r.id?, r.doc?))) {
            if doc.get("type") == Some(&Value::from("on_change")) {
                if let Ok(prepared) = Prepared::new(&id, &doc, passwords, &config.backoff) {
                    rules.insert(id, prepared);
                }
            }
        }
    }
    let mut report = Redelivered::default();
    for (id, rev, mut letter) in letters {
        let Some(rule) = rules.get(&letter.rule) else {
            tracing::warn!(letter = %id, rule = %letter.rule, "the on_change document of this dead letter is gone: kept");
            report.orphaned += 1;
            continue;
        };
        let context = ChangeContext {
            db_name: &letter.db_name,
            doc: &letter.change,
            id: &letter.doc_id,
            rev: &letter.rev,
            seq: &letter.seq,
        };
        let outcome = match Request::build(&rule.template(), &context, passwords) {
            Ok(request) => sender.send(&request).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match outcome {
            Ok(_) => {
                client.delete_doc(spiegel_db, &id, &rev).await?;
                report.delivered += 1;
            }
            Err(error) => {
                letter.attempts += 1;
                letter.last_error = error;
                letter.last_attempt_at = crate::coordination::timestamp();
                let mut doc = serde_json::to_value(&letter).unwrap_or(Value::Null);
                doc["_rev"] = Value::from(rev);
                client.put_doc(spiegel_db, &id, &doc).await?;
                report.failed += 1;
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(seq: &str) -> Change {
        serde_json::from_value(json!({"seq": seq, "id": "doc1", "changes": [{"rev": "1-a"}]}))
            .expect("a change")
    }

    #[test]
    fn a_change_read_again_with_another_seq_is_the_same_delivery() {
        // A sharded database can give one change another seq when its
        // `_changes` is read again (the shards' rows interleave otherwise).
        let first = DeliveryKey::of("hook", &change("3-g1AAAAbc"));
        let again = DeliveryKey::of("hook", &change("3-g1AAAAxy"));
        assert_eq!(first, again);
        assert_ne!(first, DeliveryKey::of("other", &change("3-g1AAAAbc")));
    }
}
