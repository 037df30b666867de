//! Checkpoints, as CouchDB's replicator keeps them: a `_local/<replication
//! id>` document on both sides with a session history, so that the next
//! run starts where both sides last agreed.

use std::time::Instant;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::group::Member;
use super::options::Options;
use super::peer::Peer;
use super::skip::MissingRate;
use super::{ReplicationError, Report};
use crate::couch::{CouchError, Seq};

/// Sessions kept in a checkpoint's history (CouchDB keeps 50).
const HISTORY: usize = 50;

/// The replication id: a digest of what makes two replications the same
/// (the endpoints without credentials, what selects changes, and the filter
/// function's code), so that a different filter never resumes from
/// another's checkpoint.
pub fn replication_id(
    source: &Peer,
    target: &Peer,
    options: &Options,
    filter_code: Option<&str>,
) -> String {
    let mut identity = json!([
        "spiegel-native-1",
        source.location(),
        target.location(),
        options.filter,
        options.winning_revs_only,
    ]);
    // Only filtered replications have code to cover: the ids of the others
    // stay what they were.
    if let (Some(code), Value::Array(parts)) = (filter_code, &mut identity) {
        parts.push(Value::from(code));
    }
    let digest = Sha256::digest(identity.to_string().as_bytes());
    format!("spiegel-{}", hex::encode(&digest[..16]))
}

/// What this process keeps of a replication between its runs, as a
/// continuous CouchDB job keeps it while it runs: its session, the
/// checkpoint it last recorded on both sides, and where its last run ended.
/// A run that finds the target's checkpoint as this session left it starts
/// from there without reading the source's checkpoint, and reads no change
/// twice.
#[derive(Clone, Debug)]
pub struct Progress {
    session: Session,
    /// The seq of the checkpoint this session last wrote on both sides.
    recorded: Seq,
    recorded_at: Instant,
    /// Where the last run ended: `recorded` or beyond.
    reached: Seq,
    /// How much the target lacked of what it was asked about.
    missing: MissingRate,
}

/// A session: one process's replication, over one or more runs, whose
/// checkpoints replace each other's history entry.
#[derive(Clone, Debug)]
struct Session {
    id: String,
    start_time: String,
    /// Where the session started (None: from the beginning).
    start: Option<Seq>,
    /// The session's counts before the current run, which its checkpoints
    /// add up.
    counts: Report,
}

impl Session {
    fn new(start: Option<Seq>) -> Session {
        Session {
            id: hex::encode(rand::random::<[u8; 16]>()),
            start_time: crate::ids::timestamp(),
            start,
            counts: Report::default(),
        }
    }
}

impl Progress {
    #[cfg(test)]
    pub(super) fn for_tests() -> Progress {
        let mut logs = Logs::empty("x");
        logs.recorded = Some((Seq::from(json!("1-a")), Instant::now()));
        let report = Report {
            last_seq: Some(Seq::from(json!("2-b"))),
            ..Report::default()
        };
        // A session that recorded always gives its progress.
        logs.progress(&report).expect("recorded")
    }

    /// Whether the target's checkpoint is still the one this session
    /// recorded. Anything else (another worker's run, a target created
    /// again, a restored backup) sends the run to read both sides.
    fn holds_for(&self, target_log: Option<&Value>) -> bool {
        target_log.is_some_and(|log| {
            log["session_id"].as_str() == Some(self.session.id.as_str())
                && log["source_last_seq"] == *self.recorded.as_json()
        })
    }
}

/// The source's checkpoint, which a run that resumes its own progress reads
/// only when it records.
enum SourceLog {
    Read(Option<Value>),
    Unread,
}

/// The checkpoint documents of both sides, as read at the start of a run.
pub struct Logs {
    id: String,
    source: SourceLog,
    target: Option<Value>,
    session: Session,
    /// Where the run starts (None: from the beginning).
    start: Option<Seq>,
    /// This session's last checkpoint, and when it was written.
    recorded: Option<(Seq, Instant)>,
    /// How much the target lacked of what it was asked about.
    missing: MissingRate,
}

impl Logs {
    /// Reads the checkpoints: the target's only when `known` still holds
    /// for it. A missing database is reported as such.
    /// The target's is read with those of the other runs on it (`group`).
    pub async fn read(
        source: &Peer,
        target: &Peer,
        group: Option<&Member>,
        id: &str,
        known: Option<Progress>,
    ) -> Result<Logs, ReplicationError> {
        let local = format!("_local/{id}");
        let mut target_log = None;
        if let Some(known) = known {
            let log = read_target_log(target, group, &local).await?;
            if known.holds_for(log.as_ref()) {
                return Ok(Logs::resumed(id, known, log));
            }
            target_log = Some(log);
        }
        let source_log = read_log(source, &local, ReplicationError::SourceMissing).await?;
        let target_log = match target_log {
            Some(log) => log,
            None => read_target_log(target, group, &local).await?,
        };
        let start = start_seq(source_log.as_ref(), target_log.as_ref());
        Ok(Logs {
            source: SourceLog::Read(source_log),
            target: target_log,
            session: Session::new(start.clone()),
            start,
            ..Logs::empty(id)
        })
    }

    /// No checkpoint on either side: a first run, in a new session.
    pub fn empty(id: &str) -> Logs {
        Logs {
            id: format!("_local/{id}"),
            source: SourceLog::Read(None),
            target: None,
            session: Session::new(None),
            start: None,
            recorded: None,
            missing: MissingRate::default(),
        }
    }

    /// This process's session, going on where its last run ended.
    fn resumed(id: &str, known: Progress, target_log: Option<Value>) -> Logs {
        Logs {
            id: format!("_local/{id}"),
            source: SourceLog::Unread,
            target: target_log,
            session: known.session,
            start: Some(known.reached),
            recorded: Some((known.recorded, known.recorded_at)),
            missing: known.missing,
        }
    }

    /// Where the run starts (None: from the beginning).
    pub fn start_seq(&self) -> Option<Seq> {
        self.start.clone()
    }

    /// How much the target lacked, which the run updates as it asks.
    pub fn missing_rate(&mut self) -> &mut MissingRate {
        &mut self.missing
    }

    /// Starts a new session at `seq` (`since_seq`) instead.
    pub fn start_from(&mut self, seq: Seq) {
        self.session = Session::new(Some(seq.clone()));
        self.start = Some(seq);
    }

    /// Whether the last recorded checkpoint is older than `interval` (or
    /// there is none, or its time cannot be read).
    pub fn due(&self, interval: std::time::Duration) -> bool {
        if let Some((_, at)) = &self.recorded {
            return at.elapsed() >= interval;
        }
        let SourceLog::Read(Some(log)) = &self.source else {
            return true;
        };
        let recorded = log["history"][0]["end_time"]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
        let Some(recorded) = recorded else {
            return true;
        };
        let age = chrono::Utc::now().signed_duration_since(recorded);
        // A time ahead of ours (another worker's clock) counts as due.
        age.to_std().map_or(true, |age| age >= interval)
    }

    /// What to keep for the next run, after this one did `report`: nothing
    /// until this session recorded a checkpoint.
    pub fn progress(self, report: &Report) -> Option<Progress> {
        let (recorded, recorded_at) = self.recorded?;
        let counts = self.session.counts.plus(report);
        Some(Progress {
            reached: report.last_seq.clone()?,
            session: Session {
                counts,
                ..self.session
            },
            recorded,
            recorded_at,
            missing: self.missing,
        })
    }

    /// Writes the checkpoint on both sides: this session, up to `seq`.
    pub async fn record(
        &mut self,
        source: &Peer,
        target: &Peer,
        seq: &Seq,
        report: &Report,
    ) -> Result<(), ReplicationError> {
        let session = &self.session;
        let start = session.start.as_ref();
        let counts = session.counts.plus(report);
        let entry = json!({
            "session_id": session.id,
            "start_time": session.start_time,
            "end_time": crate::ids::timestamp(),
            "start_last_seq": start.map_or(json!(0), |s| s.as_json().clone()),
            "end_last_seq": seq.as_json(),
            "recorded_seq": seq.as_json(),
            "missing_checked": counts.missing_checked,
            "missing_found": counts.missing_found,
            "docs_read": counts.docs_read,
            "docs_written": counts.docs_written,
            "doc_write_failures": counts.doc_write_failures,
        });
        let source_log = match std::mem::replace(&mut self.source, SourceLog::Unread) {
            SourceLog::Read(log) => log,
            SourceLog::Unread => {
                read_log(source, &self.id, ReplicationError::SourceMissing).await?
            }
        };
        let source_doc = self.next(source_log.as_ref(), &entry, seq);
        let target_doc = self.next(self.target.as_ref(), &entry, seq);
        let step = "writing the checkpoint";
        let saved = source.client.save(&source.db, source_doc).await;
        self.source = SourceLog::Read(Some(saved.map_err(ReplicationError::couch(step))?));
        let saved = target.client.save(&target.db, target_doc).await;
        self.target = Some(saved.map_err(ReplicationError::couch(step))?);
        self.recorded = Some((seq.clone(), Instant::now()));
        Ok(())
    }

    /// A side's next checkpoint document: this session's entry first, then
    /// the older sessions (this session's earlier entry replaced).
    fn next(&self, previous: Option<&Value>, entry: &Value, seq: &Seq) -> Value {
        let older = previous
            .and_then(|p| p["history"].as_array().cloned())
            .unwrap_or_default()
            .into_iter()
            .filter(|h| h["session_id"] != entry["session_id"]);
        let history: Vec<Value> = std::iter::once(entry.clone())
            .chain(older)
            .take(HISTORY)
            .collect();
        let mut doc = json!({
            "_id": self.id,
            "session_id": self.session.id,
            "source_last_seq": seq.as_json(),
            "replication_id_version": "spiegel-native-1",
            "history": history,
        });
        if let Some(rev) = previous.and_then(|p| p.get("_rev")) {
            doc["_rev"] = rev.clone();
        }
        doc
    }
}

/// A side's checkpoint document, if any; `when_missing` if its database
/// does not exist.
async fn read_log(
    peer: &Peer,
    local: &str,
    when_missing: ReplicationError,
) -> Result<Option<Value>, ReplicationError> {
    let log = peer.client.get_doc_opt(&peer.db, local).await;
    log.map_err(|e| missing(e, when_missing, "reading a checkpoint"))
}

/// The target's checkpoint document, read with the other runs' where
/// there are any.
async fn read_target_log(
    target: &Peer,
    group: Option<&Member>,
    local: &str,
) -> Result<Option<Value>, ReplicationError> {
    let step = "reading a checkpoint";
    match group.map(|g| g.read_log(local)) {
        Some(shared) => match shared.await {
            Ok(log) => log.map_err(|e| missing(e, ReplicationError::TargetMissing, step)),
            Err(local) => read_log(target, &local, ReplicationError::TargetMissing).await,
        },
        None => read_log(target, local, ReplicationError::TargetMissing).await,
    }
}

/// Where both sides last agreed: the newest session the two histories
/// share (None: from the start).
fn start_seq(source: Option<&Value>, target: Option<&Value>) -> Option<Seq> {
    let (source, target) = (source?, target?);
    if source["session_id"] == target["session_id"] && !source["session_id"].is_null() {
        return seq_of(&source["source_last_seq"]);
    }
    let history = |log: &Value| log["history"].as_array().cloned().unwrap_or_default();
    let (source_history, target_history) = (history(source), history(target));
    for entry in &source_history {
        let shared = target_history
            .iter()
            .any(|t| t["session_id"] == entry["session_id"]);
        if shared {
            return seq_of(&entry["recorded_seq"]);
        }
    }
    None
}

fn seq_of(value: &Value) -> Option<Seq> {
    (!value.is_null()).then(|| Seq::from(value.clone()))
}

/// A missing database as `when_missing`, any other error as a step failure.
pub(super) fn missing(
    e: CouchError,
    when_missing: ReplicationError,
    step: &'static str,
) -> ReplicationError {
    match e {
        CouchError::DbNotFound(_) => when_missing,
        e => ReplicationError::Couch { step, source: e },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logs(source: Value, target: Value) -> Logs {
        Logs {
            start: start_seq(Some(&source), Some(&target)),
            source: SourceLog::Read(Some(source)),
            target: Some(target),
            ..Logs::empty("x")
        }
    }

    #[test]
    fn a_checkpoint_is_due_once_the_last_is_older_than_the_interval() {
        let at = |age: i64| {
            let t = chrono::Utc::now() - chrono::Duration::seconds(age);
            let t = t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            logs(json!({"history": [{"end_time": t}]}), json!({}))
        };
        let interval = std::time::Duration::from_secs(30);
        assert!(!at(5).due(interval));
        assert!(at(31).due(interval));
        assert!(at(-60).due(interval), "a time ahead of ours");
        assert!(Logs::empty("x").due(interval), "no checkpoint yet");
    }

    #[test]
    fn a_session_resumes_where_it_ended_while_the_target_holds_its_checkpoint() {
        let mut first = logs(json!({}), json!({}));
        first.recorded = Some((Seq::from(json!("4-a")), Instant::now()));
        let session = first.session.id.clone();
        let ran = Report {
            docs_read: 2,
            last_seq: Some(Seq::from(json!("7-b"))),
            ..Report::default()
        };
        let known = first.progress(&ran).expect("recorded");
        let ours = json!({"session_id": session, "source_last_seq": "4-a"});
        assert!(known.holds_for(Some(&ours)));
        let resumed = Logs::resumed("x", known.clone(), Some(ours));
        assert_eq!(resumed.start_seq(), Some(Seq::from(json!("7-b"))));
        assert_eq!(resumed.session.id, session, "the same session goes on");
        let counts = resumed.session.counts.plus(&ran);
        assert_eq!(counts.docs_read, 4, "and counts on");
        assert!(!resumed.due(std::time::Duration::from_secs(30)));
        let moved = json!({"session_id": session, "source_last_seq": "9-c"});
        let other = json!({"session_id": "another", "source_last_seq": "4-a"});
        for log in [Some(&moved), Some(&other), None] {
            assert!(!known.holds_for(log), "{log:?}");
        }
        assert!(Logs::empty("x").progress(&ran).is_none());
    }

    #[test]
    fn both_sides_of_the_same_session_resume_from_its_seq() {
        let l = logs(
            json!({"session_id": "s2", "source_last_seq": "9-a", "history": []}),
            json!({"session_id": "s2", "source_last_seq": "9-a", "history": []}),
        );
        assert_eq!(l.start_seq(), Some(Seq::from(json!("9-a"))));
    }

    #[test]
    fn diverged_sides_resume_from_the_newest_shared_session() {
        // The target's last write of session s3 was lost (restored backup).
        let l = logs(
            json!({"session_id": "s3", "history": [
                {"session_id": "s3", "recorded_seq": "12-c"},
                {"session_id": "s2", "recorded_seq": "9-b"},
                {"session_id": "s1", "recorded_seq": "4-a"}]}),
            json!({"session_id": "s2", "history": [
                {"session_id": "s2", "recorded_seq": "9-b"},
                {"session_id": "s1", "recorded_seq": "4-a"}]}),
        );
        assert_eq!(l.start_seq(), Some(Seq::from(json!("9-b"))));
        let none = logs(
            json!({"session_id": "a", "history": []}),
            json!({"session_id": "b", "history": []}),
        );
        assert_eq!(none.start_seq(), None);
        assert_eq!(Logs::empty("x").start_seq(), None);
        assert_eq!(start_seq(None, Some(&json!({"session_id": "a"}))), None);
    }
}
