//! Checkpoints, as CouchDB's replicator keeps them: a `_local/<replication
//! id>` document on both sides with a session history, so that the next
//! run starts where both sides last agreed.

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::options::Options;
use super::peer::Peer;
use super::{ReplicationError, Report};
use crate::couch::{CouchError, Seq};

/// Sessions kept in a checkpoint's history (CouchDB keeps 50).
const HISTORY: usize = 50;

/// The replication id: a digest of what makes two replications the same
/// (the endpoints without credentials, and what selects changes), so that
/// a different filter never resumes from another's checkpoint.
pub fn replication_id(source: &Peer, target: &Peer, options: &Options) -> String {
    let identity = json!([
        "spiegel-native-1",
        source.location(),
        target.location(),
        options.filter,
        options.winning_revs_only,
    ]);
    let digest = Sha256::digest(identity.to_string().as_bytes());
    format!("spiegel-{}", hex::encode(&digest[..16]))
}

/// The checkpoint documents of both sides, as read at the start of a run.
pub struct Logs {
    id: String,
    source: Option<Value>,
    target: Option<Value>,
    session: String,
    start_time: String,
}

impl Logs {
    /// Reads both checkpoints. A missing database is reported as such.
    pub async fn read(source: &Peer, target: &Peer, id: &str) -> Result<Logs, ReplicationError> {
        let local = format!("_local/{id}");
        let source_log = read_log(source, &local, ReplicationError::SourceMissing).await?;
        let target_log = read_log(target, &local, ReplicationError::TargetMissing).await?;
        Ok(Logs {
            source: source_log,
            target: target_log,
            ..Logs::empty(id)
        })
    }

    /// No checkpoint on either side: a first run.
    pub fn empty(id: &str) -> Logs {
        Logs {
            id: format!("_local/{id}"),
            source: None,
            target: None,
            session: hex::encode(rand::random::<[u8; 16]>()),
            start_time: crate::coordination::timestamp(),
        }
    }

    /// Where both sides last agreed: the newest session the two histories
    /// share (None: from the start).
    pub fn start_seq(&self) -> Option<Seq> {
        let (source, target) = (self.source.as_ref()?, self.target.as_ref()?);
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

    /// Whether the last recorded checkpoint is older than `interval` (or
    /// there is none, or its time cannot be read).
    pub fn due(&self, interval: std::time::Duration) -> bool {
        let recorded = self
            .source
            .as_ref()
            .and_then(|log| log["history"][0]["end_time"].as_str())
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
        let Some(recorded) = recorded else {
            return true;
        };
        let age = chrono::Utc::now().signed_duration_since(recorded);
        // A time ahead of ours (another worker's clock) counts as due.
        age.to_std().map_or(true, |age| age >= interval)
    }

    /// Writes the checkpoint on both sides: this session, up to `seq`.
    pub async fn record(
        &mut self,
        source: &Peer,
        target: &Peer,
        start: Option<&Seq>,
        seq: &Seq,
        report: &Report,
    ) -> Result<(), ReplicationError> {
        let entry = json!({
            "session_id": self.session,
            "start_time": self.start_time,
            "end_time": crate::coordination::timestamp(),
            "start_last_seq": start.map_or(json!(0), |s| s.as_json().clone()),
            "end_last_seq": seq.as_json(),
            "recorded_seq": seq.as_json(),
            "missing_checked": report.missing_checked,
            "missing_found": report.missing_found,
            "docs_read": report.docs_read,
            "docs_written": report.docs_written,
            "doc_write_failures": report.doc_write_failures,
        });
        let source_doc = self.next(self.source.as_ref(), &entry, seq);
        let target_doc = self.next(self.target.as_ref(), &entry, seq);
        let step = "writing the checkpoint";
        self.source = Some(
            source
                .client
                .save(&source.db, source_doc)
                .await
                .map_err(ReplicationError::couch(step))?,
        );
        self.target = Some(
            target
                .client
                .save(&target.db, target_doc)
                .await
                .map_err(ReplicationError::couch(step))?,
        );
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
            "session_id": self.session,
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
            source: Some(source),
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
    }
}
