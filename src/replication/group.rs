//! Runs that write to the same target share its requests: one read of
//! their checkpoints, one `_revs_diff` and one `_bulk_docs`, as a database
//! commits concurrent transactions in one write ([`lane`](super::lane)).
//! Thousands of per-user databases replicated into one aggregate otherwise
//! cost the aggregate three requests per change.
//!
//! Each run keeps its own checkpoint, recorded only after its own documents
//! are on the target, and a shared request that fails fails each run it
//! carried as if that run had sent it alone.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::lane::{Lane, Limits, Request};
use super::peer::Peer;
use crate::couch::{BulkResult, CouchClient, CouchError, RawDoc, RevsDiff};

/// Revisions by document id, as `_revs_diff` takes them.
pub type Revs = BTreeMap<String, Vec<String>>;
type Diff = Result<BTreeMap<String, RevsDiff>, CouchError>;
/// A run's documents back, with the refusals among them.
type Written = (Vec<RawDoc>, Result<Vec<BulkResult>, CouchError>);
type Log = Result<Option<Value>, CouchError>;

/// The most revisions one shared `_bulk_docs` carries.
const WRITE_CAPACITY: usize = 1_000;
/// The most ids one shared `_revs_diff` or checkpoint read carries.
const READ_CAPACITY: usize = 5_000;

/// The targets being written, each with the runs on it; a target goes when
/// its last run ends.
#[derive(Clone)]
pub struct Groups {
    window: Duration,
    targets: Arc<Mutex<HashMap<String, Arc<Target>>>>,
}

/// The shared requests of one target, as reached with one set of
/// credentials (two rules with different users never share a write: a
/// validation function may tell them apart).
struct Target {
    client: CouchClient,
    db: String,
    runs: AtomicUsize,
    logs: Lane<String, Log>,
    diffs: Lane<Revs, Diff>,
    writes: Lane<Vec<RawDoc>, Written>,
    /// The server answered `_local_docs` with keys as unknown: checkpoints
    /// are read one by one.
    no_local_docs: Arc<AtomicBool>,
}

impl Groups {
    /// Runs wait at most `window` for others on their target (zero: never
    /// share).
    pub fn new(window: Duration) -> Self {
        Groups {
            window,
            targets: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Target>>> {
        // Each change under the lock is one insert or remove.
        self.targets.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A run's place on `target` for as long as it runs.
    pub fn join(&self, target: &Peer) -> Member {
        let key = key_of(target);
        let shared = {
            let mut targets = self.lock();
            let shared = targets.entry(key.clone()).or_insert_with(|| {
                Arc::new(Target {
                    client: target.client.clone(),
                    db: target.db.clone(),
                    runs: AtomicUsize::new(0),
                    logs: Lane::new(),
                    diffs: Lane::new(),
                    writes: Lane::new(),
                    no_local_docs: Arc::default(),
                })
            });
            shared.runs.fetch_add(1, Ordering::SeqCst);
            shared.clone()
        };
        Member {
            groups: self.clone(),
            key,
            target: shared,
        }
    }

    /// Targets with a run on them.
    #[cfg(test)]
    fn targets(&self) -> usize {
        self.lock().len()
    }
}

/// Identifies a target with its credentials without keeping them in clear.
fn key_of(target: &Peer) -> String {
    let url = target.client.url().expose().to_string();
    let digest = Sha256::digest(format!("{url}\n{}", target.db).as_bytes());
    hex::encode(digest)
}

/// A run on a target: its requests there may be shared with the other runs
/// on it.
pub struct Member {
    groups: Groups,
    key: String,
    target: Arc<Target>,
}

impl Drop for Member {
    fn drop(&mut self) {
        let mut targets = self.groups.lock();
        if self.target.runs.fetch_sub(1, Ordering::SeqCst) == 1 {
            targets.remove(&self.key);
        }
    }
}

impl Member {
    fn limits(&self, capacity: usize) -> Limits {
        Limits {
            window: self.groups.window,
            capacity,
        }
    }

    fn runs(&self) -> usize {
        self.target.runs.load(Ordering::SeqCst)
    }

    /// The checkpoint `local`, read with those of the other runs. Err: read
    /// it alone.
    pub async fn read_log(&self, local: &str) -> Result<Log, String> {
        let (t, limits) = (&self.target, self.limits(READ_CAPACITY));
        let request = || read_logs(t.client.clone(), t.db.clone(), t.no_local_docs.clone());
        let joined = t
            .logs
            .join(local.to_string(), 1, self.runs(), limits, request);
        joined.await.map(answered)
    }

    /// What the target lacks of `revs`, asked with the other runs'. Err:
    /// ask alone.
    pub async fn revs_diff(&self, revs: Revs) -> Result<Diff, Revs> {
        let (t, limits) = (&self.target, self.limits(READ_CAPACITY));
        let weight = revs.len();
        let request = || diff(t.client.clone(), t.db.clone());
        let joined = t.diffs.join(revs, weight, self.runs(), limits, request);
        joined.await.map(answered)
    }

    /// Writes `docs` as they are, with the other runs' documents; gives
    /// them back with those the target refused. Err: write them alone.
    pub async fn write(&self, docs: Vec<RawDoc>) -> Result<Written, Vec<RawDoc>> {
        let (t, limits) = (&self.target, self.limits(WRITE_CAPACITY));
        let weight = docs.len();
        let request = || write(t.client.clone(), t.db.clone());
        let joined = t.writes.join(docs, weight, self.runs(), limits, request);
        let written = joined.await?;
        // Without an answer nothing is known written: the run fails and is
        // run again.
        Ok(written.unwrap_or_else(|| (Vec::new(), Err(unanswered()))))
    }
}

/// A shared request's answer; one that ended without an answer fails the
/// run, which is retried.
fn answered<T>(answer: Option<Result<T, CouchError>>) -> Result<T, CouchError> {
    answer.unwrap_or_else(|| Err(unanswered()))
}

fn unanswered() -> CouchError {
    CouchError::Transient("a shared request to the target ended without an answer".into())
}

/// Reads a group's checkpoints with `_local_docs`, else one by one.
fn read_logs(client: CouchClient, db: String, unknown: Arc<AtomicBool>) -> Request<String, Log> {
    Box::new(move |ids| {
        Box::pin(async move {
            if !unknown.load(Ordering::Relaxed) {
                match client.local_docs(&db, &ids).await {
                    Ok(docs) => return docs.into_iter().map(Ok).collect(),
                    Err(e @ (CouchError::DocNotFound { .. } | CouchError::BadRequest(_))) => {
                        tracing::debug!(%db, error = %e, "no _local_docs with keys: checkpoints are read one by one");
                        unknown.store(true, Ordering::Relaxed);
                    }
                    Err(e) => return ids.iter().map(|_| Err(e.clone())).collect(),
                }
            }
            let reads = ids.iter().map(|id| client.get_doc_opt(&db, id));
            futures::future::join_all(reads).await
        })
    })
}

/// One `_revs_diff` of every run's revisions; each run gets the answer
/// about its own.
fn diff(client: CouchClient, db: String) -> Request<Revs, Diff> {
    Box::new(move |asked| {
        Box::pin(async move {
            let mut all = Revs::new();
            for revs in &asked {
                for (id, rs) in revs {
                    let merged = all.entry(id.clone()).or_default();
                    for rev in rs {
                        if !merged.contains(rev) {
                            merged.push(rev.clone());
                        }
                    }
                }
            }
            let answer = client.revs_diff(&db, &all).await;
            let own = |revs: &Revs| match &answer {
                Ok(diff) => Ok(own_diff(diff, revs)),
                Err(e) => Err(e.clone()),
            };
            asked.iter().map(own).collect()
        })
    })
}

/// The part of `diff` about `revs`.
fn own_diff(diff: &BTreeMap<String, RevsDiff>, revs: &Revs) -> BTreeMap<String, RevsDiff> {
    revs.iter()
        .filter_map(|(id, rs)| {
            let d = diff.get(id)?;
            let missing: Vec<String> = d
                .missing
                .iter()
                .filter(|r| rs.contains(r))
                .cloned()
                .collect();
            let possible_ancestors = d.possible_ancestors.clone();
            (!missing.is_empty()).then(|| {
                (
                    id.clone(),
                    RevsDiff {
                        missing,
                        possible_ancestors,
                    },
                )
            })
        })
        .collect()
}

/// One `_bulk_docs` with `new_edits: false` of every run's revisions; each
/// run gets its documents back with the refusals among them.
fn write(client: CouchClient, db: String) -> Request<Vec<RawDoc>, Written> {
    Box::new(move |batches| {
        Box::pin(async move {
            let sizes: Vec<usize> = batches.iter().map(Vec::len).collect();
            let all: Vec<RawDoc> = batches.into_iter().flatten().collect();
            let answer = client.bulk_docs_replicated(&db, &all).await;
            let mut docs = all.into_iter();
            sizes
                .into_iter()
                .map(|n| {
                    let own: Vec<RawDoc> = docs.by_ref().take(n).collect();
                    let refused = match &answer {
                        Ok(refused) => Ok(refused_among(refused, &own)),
                        Err(e) => Err(e.clone()),
                    };
                    (own, refused)
                })
                .collect()
        })
    })
}

/// The refusals about `docs` (one without an id or revision is every run's:
/// none is taken for written that might not be).
fn refused_among(refused: &[BulkResult], docs: &[RawDoc]) -> Vec<BulkResult> {
    if refused.is_empty() {
        return Vec::new();
    }
    let heads: Vec<super::attached::Head> = docs.iter().map(super::attached::Head::of).collect();
    refused
        .iter()
        .filter(|r| match r {
            BulkResult::Failed {
                id: Some(id),
                rev: Some(rev),
                ..
            } => heads.iter().any(|h| &h.id == id && &h.rev == rev),
            _ => true,
        })
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::couch::{ClientOptions, SecretUrl};

    fn peer(url: &str, db: &str) -> Peer {
        let url = SecretUrl::parse(url).unwrap();
        let client = CouchClient::new(&url, ClientOptions::default()).unwrap();
        Peer {
            client,
            db: db.into(),
        }
    }

    #[test]
    fn a_target_is_shared_by_its_runs_with_the_same_credentials_and_goes_with_the_last() {
        let groups = Groups::new(Duration::from_millis(20));
        let a = groups.join(&peer("http://u:p@h:5984", "all"));
        let b = groups.join(&peer("http://u:p@h:5984", "all"));
        let other_user = groups.join(&peer("http://v:p@h:5984", "all"));
        assert_eq!(a.runs(), 2);
        assert_eq!(other_user.runs(), 1);
        assert_eq!(groups.targets(), 2);
        drop((a, other_user));
        assert_eq!(groups.targets(), 1);
        drop(b);
        assert_eq!(groups.targets(), 0);
    }

    #[test]
    fn each_run_gets_the_part_of_a_shared_revs_diff_about_its_own_revisions() {
        let diff: BTreeMap<String, RevsDiff> = serde_json::from_value(serde_json::json!({
            "a": {"missing": ["2-x", "2-y"], "possible_ancestors": ["1-a"]},
            "b": {"missing": ["1-b"]}
        }))
        .unwrap();
        let revs = |pairs: &[(&str, &str)]| -> Revs {
            let mut r = Revs::new();
            for (id, rev) in pairs {
                r.entry(id.to_string()).or_default().push(rev.to_string());
            }
            r
        };
        let mine = own_diff(&diff, &revs(&[("a", "2-y"), ("c", "1-c")]));
        assert_eq!(mine.len(), 1);
        assert_eq!(mine["a"].missing, ["2-y"]);
        assert_eq!(mine["a"].possible_ancestors, ["1-a"]);
        assert!(own_diff(&diff, &revs(&[("a", "1-a")])).is_empty());
    }

    #[test]
    fn a_refusal_goes_to_the_run_whose_revision_it_names() {
        let doc =
            |s: &str| RawDoc::from(serde_json::value::RawValue::from_string(s.into()).unwrap());
        let mine = vec![doc(r#"{"_id":"a","_rev":"1-x"}"#)];
        let failed = |id: Option<&str>, rev: &str| BulkResult::Failed {
            id: id.map(String::from),
            rev: Some(rev.into()),
            error: "forbidden".into(),
            reason: None,
        };
        let refused = [
            failed(Some("a"), "1-x"),
            failed(Some("a"), "1-y"),
            failed(None, "1-z"),
        ];
        let own = refused_among(&refused, &mine);
        assert_eq!(own, [refused[0].clone(), refused[2].clone()]);
    }
}
