//! What the console page shows, as one value for the template: the
//! deployment as the spiegel database tells it ([`Report`]), with this
//! process's memory added (the databases its workers hold waiting, which
//! of the workers are its own), and never a secret: no URL but an API's
//! origin, and every error text with its credentials masked.

use std::collections::BTreeMap;

use chrono::Utc;
use serde::Serialize;
use serde_json::Value;

use crate::commands::status::{age, catch_up_line, DocTotal, Report, RoleReport};
use crate::couch::origins_only;
use crate::delivery::circuit::CircuitState;
use crate::delivery::dead_letter::DeadLetter;
use crate::replication::Engine;
use crate::rules::follower::UserDocs;
use crate::status::Event;
use crate::worker::control::{WaitState, WaitingDb};

/// How often the page refreshes its state, and how long one read of the
/// installation serves every request for it.
pub const REFRESH: std::time::Duration = std::time::Duration::from_secs(5);

/// Waiting databases shown, at most.
pub const WAITING_SHOWN: usize = 50;

/// Distinct errors shown per dead-letter group.
const ERRORS_SHOWN: usize = 5;

#[derive(Debug, Serialize)]
pub struct View {
    pub database: String,
    pub installed: bool,
    pub partitions: Option<u32>,
    /// When the view was read.
    pub now: String,
    pub roles: Vec<RoleView>,
    pub documents: Vec<DocView>,
    pub waiting: Vec<WaitView>,
    pub dead_letters: Vec<LetterGroup>,
    pub dead_total: usize,
    /// The dead letters grouped: the oldest, when there are many.
    pub dead_grouped: usize,
    /// This process's API endpoints whose circuit is not closed.
    pub circuits: Vec<(String, String)>,
    /// Catch-ups under way, over every worker.
    pub catch_ups: Vec<CatchUpView>,
    /// Whether actions are possible (a token is set).
    pub actions: bool,
    /// The page's refresh interval ([`REFRESH`]).
    pub refresh_ms: u128,
}

/// A worker's catch-up, as a bar and a line.
#[derive(Debug, Serialize)]
pub struct CatchUpView {
    pub role: String,
    pub worker: String,
    pub handled: u64,
    pub found: u64,
    pub line: String,
}

#[derive(Debug, Serialize)]
pub struct RoleView {
    pub name: String,
    pub workers: Vec<WorkerView>,
    pub free_partitions: usize,
    pub oldest_checkpoint: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct WorkerView {
    pub id: String,
    pub partitions: usize,
    /// The partitions as ranges: "0-15, 32".
    pub ranges: String,
    /// Since its last heartbeat, in words.
    pub heartbeat: Option<String>,
    /// Its heartbeat is within its lease time (or unknown).
    pub live: bool,
    /// The worker runs in this process.
    pub here: bool,
}

#[derive(Debug, Serialize)]
pub struct DocView {
    pub id: String,
    pub role: String,
    /// `replicator` or `on_change`, or empty for a report whose document
    /// is gone.
    pub kind: String,
    /// The engine of a replicator document; the method and the API's
    /// origin of an on_change one.
    pub how: String,
    pub paused: bool,
    pub succeeded: u64,
    pub failed: u64,
    pub last_success: Option<EventView>,
    /// The latest error of a database that is failing now.
    pub last_error: Option<EventView>,
    /// Databases failing now.
    pub failing: usize,
    pub invalid: Option<String>,
    pub note: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct EventView {
    pub db: String,
    pub ago: String,
    pub detail: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct WaitView {
    pub db: String,
    pub role: String,
    /// `queued`, `running`, `retrying`, `held` (this process) or `failing`
    /// (any worker's status).
    pub state: String,
    /// How long, in words.
    pub waited: String,
    #[serde(skip)]
    seconds: i64,
    pub why: Option<String>,
    /// Its runs are this process's: "run now" can act on it here.
    pub here: bool,
}

#[derive(Debug, Serialize)]
pub struct LetterGroup {
    pub rule: String,
    pub count: usize,
    pub databases: usize,
    pub oldest: String,
    /// Distinct last errors, most frequent first, with their counts.
    pub errors: Vec<(String, usize)>,
}

/// Everything the view is made of.
pub struct Parts<'a> {
    /// The installation as last read (shared by every request for a while).
    pub report: &'a Report,
    /// The followed documents; `None` before the first load.
    pub docs: Option<&'a UserDocs>,
    /// The databases this process's workers hold waiting.
    pub waiting: Vec<WaitingDb>,
    /// The worker ids of this process.
    pub here: Vec<String>,
    pub default_engine: Engine,
    /// This process's API endpoints and their circuits.
    pub circuits: Vec<(String, CircuitState)>,
    pub actions: bool,
}

impl View {
    pub fn build(parts: Parts<'_>) -> View {
        let now = Utc::now();
        let report = parts.report;
        let roles = report
            .roles
            .iter()
            .map(|(name, role)| role_view(name, role, &parts.here))
            .collect();
        let documents = documents(report, parts.docs, parts.default_engine, now);
        let waiting = waiting(&parts.waiting, &report.totals, parts.docs, now);
        View {
            database: report.database.clone(),
            installed: report.installed,
            partitions: report.partitions,
            now: now.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
            roles,
            documents,
            waiting,
            dead_letters: letter_groups(&report.letters, now),
            dead_total: report.dead_letters.total,
            dead_grouped: report.letters.len(),
            circuits: parts
                .circuits
                .into_iter()
                .filter(|(_, state)| *state != CircuitState::Closed)
                .map(|(origin, state)| (origin, circuit_name(state).to_string()))
                .collect(),
            catch_ups: report
                .catch_ups
                .iter()
                .map(|c| CatchUpView {
                    role: c.role.clone(),
                    worker: c.worker.clone(),
                    handled: c.progress.handled,
                    found: c.progress.found,
                    line: catch_up_line(&c.progress),
                })
                .collect(),
            actions: parts.actions,
            refresh_ms: REFRESH.as_millis(),
        }
    }
}

fn role_view(name: &str, role: &RoleReport, here: &[String]) -> RoleView {
    let workers = role
        .workers
        .iter()
        .map(|(id, w)| WorkerView {
            id: id.clone(),
            partitions: w.partitions.len(),
            ranges: ranges(&w.partitions),
            heartbeat: w.heartbeat_age_seconds.map(ago),
            live: match (w.heartbeat_age_seconds, w.lease_seconds) {
                (Some(age), Some(lease)) => (age as f64) <= lease.max(1.0),
                _ => true,
            },
            here: here.contains(id),
        })
        .collect();
    RoleView {
        name: name.into(),
        workers,
        free_partitions: role.free_partitions.len(),
        oldest_checkpoint: role.oldest_checkpoint_age_seconds.map(ago),
    }
}

/// Every document followed or reported on, by id.
fn documents(
    report: &Report,
    docs: Option<&UserDocs>,
    default_engine: Engine,
    now: chrono::DateTime<Utc>,
) -> Vec<DocView> {
    let empty = UserDocs::new();
    let docs = docs.unwrap_or(&empty);
    let no_total = DocTotal::default();
    let mut ids: Vec<&String> = docs.keys().chain(report.totals.keys()).collect();
    ids.sort();
    ids.dedup();
    ids.into_iter()
        .map(|id| {
            let total = report.totals.get(id).unwrap_or(&no_total);
            doc_view(id, docs.get(id), total, default_engine, now)
        })
        .collect()
}

fn doc_view(
    id: &str,
    doc: Option<&Value>,
    total: &DocTotal,
    default_engine: Engine,
    now: chrono::DateTime<Utc>,
) -> DocView {
    let kind = doc
        .and_then(|d| d.get("type"))
        .and_then(Value::as_str)
        .unwrap_or_default();
    let s = &total.status;
    let last_error = s.errors.values().max_by(|a, b| a.at.cmp(&b.at));
    let role = match (kind, total.role.as_str()) {
        ("replicator", "") => "replicator".to_string(),
        ("on_change", "") => "change-listener".to_string(),
        (_, role) => role.to_string(),
    };
    DocView {
        id: id.into(),
        role,
        kind: kind.into(),
        how: doc
            .map(|d| how(kind, d, default_engine))
            .unwrap_or_default(),
        paused: doc.and_then(|d| d.get("paused")) == Some(&Value::Bool(true)),
        succeeded: s.succeeded,
        failed: s.failed,
        last_success: s.last_success.as_ref().map(|e| event_view(e, now)),
        last_error: last_error.map(|e| event_view(e, now)),
        failing: s.errors.len(),
        invalid: s.invalid.as_deref().map(origins_only),
        note: s.note.clone(),
    }
}

/// The engine of a replicator document; the method and the API's origin
/// (never its path, query or credentials) of an on_change one.
fn how(kind: &str, doc: &Value, default_engine: Engine) -> String {
    let text = |field: &str| doc.get(field).and_then(Value::as_str);
    match kind {
        "replicator" => text("engine")
            .map(String::from)
            .unwrap_or_else(|| format!("{} (default)", default_engine.name())),
        "on_change" => {
            let method = text("method").unwrap_or("GET").to_uppercase();
            let origin = text("url")
                .and_then(|u| url::Url::parse(u).ok())
                .map(|u| u.origin().ascii_serialization())
                .filter(|o| o != "null")
                .unwrap_or_else(|| "(URL made per change)".into());
            format!("{method} {origin}")
        }
        _ => String::new(),
    }
}

fn event_view(event: &Event, now: chrono::DateTime<Utc>) -> EventView {
    EventView {
        db: event.db.clone(),
        ago: age(&event.at, now).map(ago).unwrap_or_default(),
        detail: event.detail.as_deref().map(origins_only),
    }
}

/// This process's waiting databases, and every worker's failing ones
/// (of documents that still exist), longest first.
fn waiting(
    local: &[WaitingDb],
    totals: &BTreeMap<String, DocTotal>,
    docs: Option<&UserDocs>,
    now: chrono::DateTime<Utc>,
) -> Vec<WaitView> {
    let mut views: Vec<WaitView> = local
        .iter()
        .map(|w| WaitView {
            db: w.db.clone(),
            role: w.role.clone(),
            state: state_name(w.state).into(),
            waited: ago(w.waited_seconds as i64),
            seconds: w.waited_seconds as i64,
            why: w.reason.as_deref().map(origins_only),
            here: true,
        })
        .collect();
    let exists = |id: &String| docs.is_none_or(|docs| docs.contains_key(id));
    for (_, total) in totals.iter().filter(|(id, _)| exists(id)) {
        for error in total.status.errors.values() {
            let known = views
                .iter()
                .any(|v| v.db == error.db && v.role == total.role);
            let since = error.since.as_deref().unwrap_or(&error.at);
            let Some(seconds) = age(since, now) else {
                continue;
            };
            if known {
                continue;
            }
            views.push(WaitView {
                db: error.db.clone(),
                role: total.role.clone(),
                state: "failing".into(),
                waited: ago(seconds),
                seconds,
                why: error.detail.as_deref().map(origins_only),
                here: false,
            });
        }
    }
    views.sort_by(|a, b| b.seconds.cmp(&a.seconds).then_with(|| a.db.cmp(&b.db)));
    views.truncate(WAITING_SHOWN);
    views
}

fn circuit_name(state: CircuitState) -> &'static str {
    match state {
        CircuitState::Closed => "closed",
        CircuitState::Open => "open",
        CircuitState::HalfOpen => "half-open",
    }
}

fn state_name(state: WaitState) -> &'static str {
    match state {
        WaitState::Queued => "queued",
        WaitState::Running => "running",
        WaitState::Retrying => "retrying",
        WaitState::Held => "held",
    }
}

/// Dead letters by rule, with their distinct errors.
fn letter_groups(letters: &[DeadLetter], now: chrono::DateTime<Utc>) -> Vec<LetterGroup> {
    let mut by_rule: BTreeMap<&str, Vec<&DeadLetter>> = BTreeMap::new();
    for letter in letters {
        by_rule.entry(&letter.rule).or_default().push(letter);
    }
    by_rule
        .into_iter()
        .map(|(rule, letters)| {
            let mut errors: BTreeMap<String, usize> = BTreeMap::new();
            for l in &letters {
                *errors.entry(origins_only(&l.last_error)).or_default() += 1;
            }
            let mut errors: Vec<(String, usize)> = errors.into_iter().collect();
            errors.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            errors.truncate(ERRORS_SHOWN);
            let mut dbs: Vec<&str> = letters.iter().map(|l| l.db_name.as_str()).collect();
            dbs.sort_unstable();
            dbs.dedup();
            let oldest = letters.iter().map(|l| l.first_attempt_at.as_str()).min();
            LetterGroup {
                rule: rule.into(),
                count: letters.len(),
                databases: dbs.len(),
                oldest: oldest
                    .and_then(|t| age(t, now))
                    .map(ago)
                    .unwrap_or_default(),
                errors,
            }
        })
        .collect()
}

/// Seconds in words: "42 s", "5 min", "3 h", "2 d".
fn ago(seconds: i64) -> String {
    match seconds {
        s if s < 120 => format!("{s} s"),
        s if s < 7200 => format!("{} min", s / 60),
        s if s < 172_800 => format!("{} h", s / 3600),
        s => format!("{} d", s / 86_400),
    }
}

/// Sorted partitions as ranges: `[0, 1, 2, 5]` is "0-2, 5".
fn ranges(partitions: &[u32]) -> String {
    let mut sorted = partitions.to_vec();
    sorted.sort_unstable();
    let mut out: Vec<String> = Vec::new();
    let mut iter = sorted.into_iter().peekable();
    while let Some(start) = iter.next() {
        let mut end = start;
        while iter.peek() == Some(&(end + 1)) {
            end += 1;
            iter.next();
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
    }
    out.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn partitions_read_as_ranges() {
        assert_eq!(ranges(&[5, 0, 1, 2, 7, 8]), "0-2, 5, 7-8");
        assert_eq!(ranges(&[]), "");
    }

    #[test]
    fn an_on_change_document_shows_its_method_and_origin_only() {
        let doc = json!({"type": "on_change", "method": "post",
            "url": "https://user:secret@api.example.com:8443/hook/$db_name?token=abc"});
        assert_eq!(
            how("on_change", &doc, Engine::Native),
            "POST https://api.example.com:8443"
        );
        let doc = json!({"type": "replicator"});
        assert_eq!(how("replicator", &doc, Engine::Native), "native (default)");
    }

    #[test]
    fn durations_read_in_the_largest_fitting_unit() {
        assert_eq!(ago(42), "42 s");
        assert_eq!(ago(600), "10 min");
        assert_eq!(ago(3 * 3600), "3 h");
        assert_eq!(ago(3 * 86_400), "3 d");
    }
}
