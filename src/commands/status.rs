//! `spiegel status`: the workers of each role and their partitions, the
//! dead letters, and each document's state as the workers reported it in
//! their status documents ([`crate::status`]). Every document is read into
//! its type; the report is a typed value, printed as JSON or as text.

use std::collections::BTreeMap;
use std::fmt::Write;

use chrono::Utc;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::coordination::{DocIds, LeaseDoc, Settings, WorkerDoc};
use crate::couch::{AllDocsQuery, CouchClient, CouchError};
use crate::delivery::dead_letter::{self, DeadLetter};
use crate::ids::{settings_doc_id, status_doc_prefix};
use crate::status::{CatchUpStatus, DocStatus, Event, StatusDoc};

/// What `spiegel status` shows.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Dead letters waiting for `spiegel redeliver`.
    pub dead_letters: DeadLetterCounts,
    /// The spiegel database.
    pub database: String,
    /// Whether Spiegel is installed there.
    pub installed: bool,
    /// The installation's partition count.
    pub partitions: Option<u32>,
    /// Per role: its workers and partitions.
    pub roles: BTreeMap<String, RoleReport>,
    /// Per replicator or on_change document: what each worker reported.
    pub documents: BTreeMap<String, Vec<DocReport>>,
    /// Per document: the reports of every worker taken together.
    pub totals: BTreeMap<String, DocTotal>,
    /// The dead letters themselves, for the console.
    #[serde(skip)]
    pub letters: Vec<DeadLetter>,
    /// Circuits not closed, per worker that sees them: an endpoint's, or a
    /// rule's route to it (`<endpoint> (on_change <rule>)`).
    pub circuits: Vec<CircuitReport>,
    /// Catch-ups under way (a first start's, a takeover's), per worker.
    pub catch_ups: Vec<CatchUpReport>,
}

/// A worker's catch-up under way.
#[derive(Debug, Serialize)]
pub struct CatchUpReport {
    /// The worker's role.
    pub role: String,
    /// The worker.
    pub worker: String,
    /// How far it is.
    #[serde(flatten)]
    pub progress: CatchUpStatus,
}

/// A circuit a change-listener worker has open: an endpoint's, or a rule's
/// route to it.
#[derive(Debug, Serialize)]
pub struct CircuitReport {
    /// Scheme, host and port, followed by ` (on_change <rule>)` for a
    /// route's circuit.
    pub endpoint: String,
    /// `open` (its changes wait) or `half-open` (a probe is under way).
    pub state: String,
    /// The worker that reported it.
    pub worker: String,
}

/// One document's outcomes over every worker's report still kept (a
/// stopped worker's report stays for ten lease times, so a restart does
/// not hide the runs before it).
#[derive(Debug, Default, Serialize)]
pub struct DocTotal {
    /// The role of the workers that reported.
    pub role: String,
    /// How many workers reported on it.
    pub workers: usize,
    /// Counts summed; the latest success of any worker; the latest error
    /// of each failing database, whichever worker met it (one followed by
    /// a later success of that database is over); `invalid` and `note` of
    /// the latest report.
    #[serde(flatten)]
    pub status: DocStatus,
}

/// The dead letters, in total and per rule.
#[derive(Debug, Default, Serialize)]
pub struct DeadLetterCounts {
    /// All of them.
    pub total: usize,
    /// Per on_change rule.
    pub by_rule: BTreeMap<String, usize>,
}

/// One role's workers and partitions.
#[derive(Debug, Default, Serialize)]
pub struct RoleReport {
    /// Per worker id: its partitions and heartbeats.
    pub workers: BTreeMap<String, WorkerReport>,
    /// Partitions without an owner.
    pub free_partitions: Vec<u32>,
    /// How long ago the oldest checkpoint was saved: how much a takeover
    /// would replay.
    pub oldest_checkpoint_age_seconds: Option<i64>,
}

/// One worker of a role.
#[derive(Debug, Default, Serialize)]
pub struct WorkerReport {
    /// The partitions it holds.
    pub partitions: Vec<u32>,
    /// Heartbeats written (absent when it has no membership document).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeats: Option<u64>,
    /// Seconds since its last heartbeat, by its own clock.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeat_age_seconds: Option<i64>,
    /// Its lease time: a worker silent for longer is taken for dead.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_seconds: Option<f64>,
}

/// What one worker reported about one document.
#[derive(Debug, Serialize)]
pub struct DocReport {
    /// The counts, last success and errors.
    #[serde(flatten)]
    pub status: DocStatus,
    /// The reporting worker's role.
    pub role: String,
    /// The reporting worker.
    pub worker: String,
    /// When it saved the report.
    pub reported_at: String,
}

/// Which dead letters a report reads in full.
#[derive(Clone, Copy, Debug)]
pub enum Letters {
    /// Every one.
    All,
    /// The oldest `n`; the others are only counted.
    Oldest(u64),
}

/// Reads the installation's documents into a [`Report`].
pub async fn report(
    client: &CouchClient,
    db: &str,
    namespace: &str,
) -> crate::error::Result<Report> {
    report_with(client, db, namespace, Letters::All).await
}

/// [`report`], reading the dead letters as `letters` says.
pub async fn report_with(
    client: &CouchClient,
    db: &str,
    namespace: &str,
    letters: Letters,
) -> crate::error::Result<Report> {
    let settings: Option<Settings> = match client.get_doc_opt(db, &settings_doc_id(namespace)).await
    {
        Err(CouchError::DbNotFound(_)) => return Err(crate::error::Error::not_installed(db)),
        read => read?,
    };
    let workers: Vec<WorkerDoc> = read_prefix(client, db, &DocIds::all_workers(namespace)).await?;
    let leases: Vec<LeaseDoc> = read_prefix(client, db, &DocIds::all_leases(namespace)).await?;
    let statuses: Vec<StatusDoc> = read_prefix(client, db, &status_doc_prefix(namespace)).await?;
    let (letters, total) = read_letters(client, db, namespace, letters).await?;
    let circuits = statuses
        .iter()
        .flat_map(|s| {
            s.circuits.iter().map(|(endpoint, state)| CircuitReport {
                endpoint: endpoint.clone(),
                state: state.clone(),
                worker: s.worker_id.clone(),
            })
        })
        .collect();
    let now = Utc::now();
    // A worker updates its catch-up every 10 s: an older one stopped.
    let current = |s: &&StatusDoc| age(&s.updated_at, now).is_some_and(|a| a <= 60);
    let catch_ups = statuses
        .iter()
        .filter(current)
        .filter_map(|s| {
            Some(CatchUpReport {
                role: s.role.clone(),
                worker: s.worker_id.clone(),
                progress: s.catch_up.clone()?,
            })
        })
        .collect();
    let documents = documents(statuses);
    let mut dead_letters = dead_letter_counts(&letters);
    dead_letters.total = total;
    Ok(Report {
        dead_letters,
        database: db.into(),
        installed: settings.is_some(),
        partitions: settings.map(|s| s.partitions),
        roles: roles(&leases, &workers),
        totals: documents_totals(&documents),
        documents,
        letters: letters.into_iter().map(|(_, _, letter)| letter).collect(),
        circuits,
        catch_ups,
    })
}

/// The dead letters `shown` asks for, and how many there are in all.
async fn read_letters(
    client: &CouchClient,
    db: &str,
    namespace: &str,
    shown: Letters,
) -> Result<(Vec<dead_letter::Listed>, usize), CouchError> {
    match shown {
        Letters::All => {
            let all = dead_letter::list(client, db, namespace).await?;
            let total = all.len();
            Ok((all, total))
        }
        Letters::Oldest(n) => {
            let some = dead_letter::list_some(client, db, namespace, Some(n)).await?;
            let total = match some.len() as u64 {
                len if len < n => some.len(),
                _ => dead_letter::count(client, db, namespace).await?,
            };
            Ok((some, total))
        }
    }
}

/// The documents whose ids start with `prefix` that parse as `T`; the
/// others are skipped with a warning.
async fn read_prefix<T: DeserializeOwned>(
    client: &CouchClient,
    db: &str,
    prefix: &str,
) -> Result<Vec<T>, CouchError> {
    let rows = client
        .all_docs(db, &AllDocsQuery::prefix(prefix))
        .await?
        .rows;
    let mut docs = Vec::new();
    for (id, doc) in rows.into_iter().filter_map(|r| Some((r.id?, r.doc?))) {
        match serde_json::from_value(doc) {
            Ok(doc) => docs.push(doc),
            Err(e) => tracing::warn!(id = %id, error = %e, "skipping a malformed document"),
        }
    }
    Ok(docs)
}

/// Per role: its workers with their partitions and heartbeats, the
/// partitions without an owner, and the age of the oldest checkpoint.
fn roles(leases: &[LeaseDoc], workers: &[WorkerDoc]) -> BTreeMap<String, RoleReport> {
    let mut roles: BTreeMap<String, RoleReport> = BTreeMap::new();
    let now = Utc::now();
    for lease in leases {
        let role = roles.entry(lease.role.clone()).or_default();
        let age = lease.checkpoint_at.as_deref().and_then(|t| age(t, now));
        if let Some(age) = age {
            let oldest = role.oldest_checkpoint_age_seconds.unwrap_or(0);
            role.oldest_checkpoint_age_seconds = Some(oldest.max(age));
        }
        match &lease.owner {
            Some(owner) => {
                let worker = role.workers.entry(owner.clone()).or_default();
                worker.partitions.push(lease.partition);
            }
            None => role.free_partitions.push(lease.partition),
        }
    }
    for worker in workers {
        let role = roles.entry(worker.role.clone()).or_default();
        let entry = role.workers.entry(worker.worker_id.clone()).or_default();
        entry.heartbeats = Some(worker.beats);
        entry.heartbeat_age_seconds = worker.beat_at.as_deref().and_then(|t| age(t, now));
        entry.lease_seconds = Some(worker.lease_ms as f64 / 1000.0);
    }
    roles
}

/// Seconds from an RFC 3339 time to `now`, at least 0.
pub(crate) fn age(time: &str, now: chrono::DateTime<Utc>) -> Option<i64> {
    let time = chrono::DateTime::parse_from_rfc3339(time).ok()?;
    Some((now - time.with_timezone(&Utc)).num_seconds().max(0))
}

/// A catch-up's progress in words: `1200 of 10000 databases (12 %), 85.0/s,
/// about 104 s left`.
pub(crate) fn catch_up_line(c: &CatchUpStatus) -> String {
    let percent = (c.handled * 100).checked_div(c.found).unwrap_or(0);
    let of = match c.listing {
        true => format!("{} of {}+ databases (still listing)", c.handled, c.found),
        false => format!("{} of {} databases ({percent} %)", c.handled, c.found),
    };
    let left = c
        .seconds_left
        .map_or(String::new(), |s| format!(", about {s} s left"));
    format!("{of}, {}/s{left}", c.per_second)
}

/// Per document id, the state each worker reported.
fn documents(statuses: Vec<StatusDoc>) -> BTreeMap<String, Vec<DocReport>> {
    let mut documents: BTreeMap<String, Vec<DocReport>> = BTreeMap::new();
    for status in statuses {
        for (id, state) in status.docs {
            documents.entry(id).or_default().push(DocReport {
                status: state,
                role: status.role.clone(),
                worker: status.worker_id.clone(),
                reported_at: status.updated_at.clone(),
            });
        }
    }
    documents
}

/// Per document, its workers' reports taken together.
fn documents_totals(documents: &BTreeMap<String, Vec<DocReport>>) -> BTreeMap<String, DocTotal> {
    documents
        .iter()
        .map(|(id, reports)| (id.clone(), total(reports)))
        .collect()
}

fn total(reports: &[DocReport]) -> DocTotal {
    let mut total = DocTotal {
        workers: reports.len(),
        ..Default::default()
    };
    let mut by_age: Vec<&DocReport> = reports.iter().collect();
    by_age.sort_by(|a, b| a.reported_at.cmp(&b.reported_at));
    for r in by_age {
        let (sum, each) = (&mut total.status, &r.status);
        total.role.clone_from(&r.role);
        sum.succeeded += each.succeeded;
        sum.failed += each.failed;
        sum.invalid.clone_from(&each.invalid);
        sum.note.clone_from(&each.note);
        if let Some(success) = &each.last_success {
            if sum.last_success.as_ref().is_none_or(|l| l.at < success.at) {
                sum.last_success = Some(success.clone());
            }
        }
        newest(&mut sum.errors, &each.errors);
        newest(&mut sum.passed_over, &each.passed_over);
    }
    let sum = &mut total.status;
    if let Some(success) = &sum.last_success {
        sum.errors
            .retain(|db, e| !(db == &success.db && e.at < success.at));
    }
    total
}

/// Adds to `sum` each database's event of `each` that is newer.
fn newest(sum: &mut BTreeMap<String, Event>, each: &BTreeMap<String, Event>) {
    for (db, event) in each {
        if sum.get(db).is_none_or(|e| e.at < event.at) {
            sum.insert(db.clone(), event.clone());
        }
    }
}

fn dead_letter_counts(letters: &[dead_letter::Listed]) -> DeadLetterCounts {
    let mut counts = DeadLetterCounts {
        total: letters.len(),
        ..Default::default()
    };
    for (_, _, letter) in letters {
        *counts.by_rule.entry(letter.rule.clone()).or_default() += 1;
    }
    counts
}

/// The report as a readable text for a terminal: one entry per document,
/// or with `per_worker`, one per document and worker.
pub fn render(report: &Report, per_worker: bool) -> String {
    let mut out = String::new();
    let installed = match report.partitions {
        Some(n) if report.installed => format!("installed, {n} partitions"),
        _ => "not installed".into(),
    };
    let _ = writeln!(out, "spiegel database {}: {installed}", report.database);
    for (name, role) in &report.roles {
        render_role(&mut out, name, role);
    }
    let dead = &report.dead_letters;
    if dead.total > 0 {
        let _ = writeln!(
            out,
            "\ndead letters: {} (spiegel redeliver sends them again)",
            dead.total
        );
        for (rule, n) in &dead.by_rule {
            let _ = writeln!(out, "  {rule}: {n}");
        }
    }
    if !report.catch_ups.is_empty() {
        let _ = writeln!(out, "\nCatching up (a first start, or a takeover):");
        for c in &report.catch_ups {
            let _ = writeln!(
                out,
                "  {} on {}: {}",
                c.role,
                c.worker,
                catch_up_line(&c.progress)
            );
        }
    }
    if !report.circuits.is_empty() {
        let _ = writeln!(out, "\nCircuits not closed (their changes wait):");
        for c in &report.circuits {
            let _ = writeln!(out, "  {}: {} (worker {})", c.endpoint, c.state, c.worker);
        }
    }
    let _ = writeln!(out, "\ndocuments:");
    if per_worker {
        for (id, reports) in &report.documents {
            for r in reports {
                let who = format!("{} on {}", r.role, r.worker);
                render_doc(&mut out, id, &who, &r.status);
            }
        }
    } else {
        for (id, t) in &report.totals {
            let who = match t.workers {
                1 => format!("{}, 1 worker", t.role),
                n => format!("{}, {n} workers", t.role),
            };
            render_doc(&mut out, id, &who, &t.status);
        }
    }
    out
}

fn render_role(out: &mut String, name: &str, role: &RoleReport) {
    let _ = writeln!(out, "\n{name}:");
    for (id, w) in &role.workers {
        let beat = w
            .heartbeat_age_seconds
            .map(|age| format!(", last heartbeat {age} s ago"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  worker {id}: {} partitions{beat}",
            w.partitions.len()
        );
    }
    if let Some(age) = role.oldest_checkpoint_age_seconds {
        let _ = writeln!(out, "  oldest checkpoint saved {age} s ago");
    }
    let free = role.free_partitions.len();
    if free > 0 {
        let _ = writeln!(out, "  {free} partitions without an owner");
    }
}

fn render_doc(out: &mut String, id: &str, who: &str, d: &DocStatus) {
    let unusable = d
        .invalid
        .as_deref()
        .map(|e| format!("; UNUSABLE: {e}"))
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "  {id} ({who}): {} succeeded, {} failed{unusable}",
        d.succeeded, d.failed
    );
    if let Some(note) = &d.note {
        let _ = writeln!(out, "    note: {note}");
    }
    for (db, e) in &d.errors {
        let detail = e.detail.as_deref().unwrap_or("");
        let _ = writeln!(out, "    {db}: {detail} ({})", e.at);
    }
    for (db, e) in &d.passed_over {
        let detail = e.detail.as_deref().unwrap_or("");
        let _ = writeln!(out, "    {db}: passed over: {detail} ({})", e.at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::Event;

    fn event(db: &str, at: &str) -> Event {
        Event {
            db: db.into(),
            at: at.into(),
            since: None,
            detail: Some(format!("{db} at {at}")),
        }
    }

    #[test]
    fn a_catch_up_reads_as_done_of_found_with_its_rate_and_time_left() {
        let mut c = CatchUpStatus {
            found: 10_000,
            handled: 1_200,
            listing: false,
            per_second: 85.0,
            seconds_left: Some(104),
        };
        assert_eq!(
            catch_up_line(&c),
            "1200 of 10000 databases (12 %), 85/s, about 104 s left"
        );
        c.listing = true;
        c.seconds_left = None;
        assert_eq!(
            catch_up_line(&c),
            "1200 of 10000+ databases (still listing), 85/s"
        );
    }

    fn report(worker: &str, at: &str, status: DocStatus) -> DocReport {
        DocReport {
            status,
            role: "replicator".into(),
            worker: worker.into(),
            reported_at: at.into(),
        }
    }

    #[test]
    fn a_document_is_one_entry_over_its_workers_reports() {
        let old = report(
            "w-old",
            "2026-01-01T00:00:00Z",
            DocStatus {
                succeeded: 2,
                failed: 1,
                last_success: Some(event("a", "2026-01-01T00:00:00Z")),
                errors: BTreeMap::from([
                    ("b".into(), event("b", "2026-01-01T00:00:00Z")),
                    ("c".into(), event("c", "2026-01-01T00:00:00Z")),
                ]),
                ..Default::default()
            },
        );
        let new = report(
            "w-new",
            "2026-01-02T00:00:00Z",
            DocStatus {
                succeeded: 3,
                failed: 0,
                last_success: Some(event("b", "2026-01-02T00:00:00Z")),
                ..Default::default()
            },
        );
        let t = total(&[new, old]);
        assert_eq!((t.workers, t.status.succeeded, t.status.failed), (2, 5, 1));
        assert_eq!(t.status.last_success.expect("a success").db, "b");
        assert_eq!(
            t.status.errors.keys().collect::<Vec<_>>(),
            ["c"],
            "b's error is over: b succeeded later"
        );
    }

    #[test]
    fn the_table_shows_one_line_per_document_unless_asked_per_worker() {
        let documents = BTreeMap::from([(
            "r".to_string(),
            vec![
                report("w1", "2026-01-01T00:00:00Z", DocStatus::default()),
                report("w2", "2026-01-01T00:00:01Z", DocStatus::default()),
            ],
        )]);
        let report = Report {
            dead_letters: DeadLetterCounts::default(),
            database: "spiegel".into(),
            installed: true,
            partitions: Some(4),
            roles: BTreeMap::new(),
            totals: documents_totals(&documents),
            documents,
            letters: Vec::new(),
            circuits: Vec::new(),
            catch_ups: Vec::new(),
        };
        let lines = |text: String| text.lines().filter(|l| l.starts_with("  r (")).count();
        assert_eq!(lines(render(&report, false)), 1);
        assert!(render(&report, false).contains("r (replicator, 2 workers): 0 succeeded"));
        assert_eq!(lines(render(&report, true)), 2);
    }
}
