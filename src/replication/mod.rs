//! The native replication engine. Spiegel replicates a changed database
//! itself, over CouchDB's replication protocol, rather than asking CouchDB
//! to start a one-shot `_replicate` job (which waits up to `[replicator]
//! startup_jitter` before it starts).
//!
//! One run, batch by batch until the source has no more changes:
//! 1. read the checkpoints `_local/<replication id>` of both sides, and
//!    start from the newest session they share ([`checkpoint`]); or, when
//!    the target's checkpoint is the one this process's last run left,
//!    start where that run ended ([`Progress`]);
//! 2. read a page of the source's `_changes` (every leaf revision, with the
//!    document's filter, selector or ids);
//! 3. ask the target which revisions it lacks (`_revs_diff`), unless it has
//!    lacked nearly all lately ([`skip`]);
//! 4. fetch them with their history, attachments as stubs (`_bulk_get`,
//!    or `GET ?open_revs=` where it is missing; [`fetch`]);
//! 5. write them as they are (`_bulk_docs`, `new_edits: false`; [`write`]),
//!    except those with attachments: each is read as `multipart/related`
//!    with the attachments the target lacks and streamed into a `PUT
//!    ?new_edits=false`, as CouchDB's replicator copies them ([`attached`]);
//! 6. record the checkpoint on both sides (after each batch; a run of one
//!    batch only once the last checkpoint is `checkpoint_interval` old).
//!
//! Runs into the same target share its requests of steps 1, 3 and 5
//! ([`group`]), so that thousands of sources fanned into one aggregate do
//! not each cost it three requests per change.

mod attached;
mod checkpoint;
mod fetch;
mod group;
mod lane;
mod options;
mod peer;
mod sessions;
mod skip;
mod write;

use std::collections::BTreeMap;

use serde_json::Value;

use self::attached::split_attached;
pub use self::checkpoint::Progress;
use self::checkpoint::{missing, replication_id, Logs};
use self::group::Revs;
pub use self::group::{Groups, Member};
pub use self::options::{Options, Unsupported};
pub use self::peer::Peer;
pub use self::sessions::Sessions;
use self::skip::MissingRate;
use crate::couch::{Change, ChangesPage, CouchError, RevToFetch, RevsDiff, Seq};

/// Which engine replicates a document.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// Spiegel, over CouchDB's replication protocol: starts at once.
    Native,
    /// CouchDB's one-shot `POST /_replicate`.
    #[value(name = "couchdb")]
    CouchDb,
}

impl Engine {
    /// The engine's name, as in documents and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Native => "native",
            Engine::CouchDb => "couchdb",
        }
    }
}

/// What one run did, in the counts CouchDB's replicator reports.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Report {
    /// Revisions of changes that were checked against the target.
    pub missing_checked: u64,
    /// Revisions the target lacked.
    pub missing_found: u64,
    /// Revisions fetched from the source.
    pub docs_read: u64,
    /// Revisions written to the target.
    pub docs_written: u64,
    /// Revisions the target refused (`forbidden` or `unauthorized` from a
    /// validation function): the only revisions a run passes over.
    pub doc_write_failures: u64,
    /// The source seq the run reached.
    pub last_seq: Option<Seq>,
    /// The first revisions the target refused, each with why (at most
    /// [`REFUSALS_KEPT`]: the count is `doc_write_failures`).
    pub refused: Vec<String>,
}

/// Refusals a report names; the rest are counted only.
pub const REFUSALS_KEPT: usize = 10;

impl Report {
    /// Both runs' counts together (the seq of `other`).
    fn plus(&self, other: &Report) -> Report {
        Report {
            missing_checked: self.missing_checked + other.missing_checked,
            missing_found: self.missing_found + other.missing_found,
            docs_read: self.docs_read + other.docs_read,
            docs_written: self.docs_written + other.docs_written,
            doc_write_failures: self.doc_write_failures + other.doc_write_failures,
            last_seq: other.last_seq.clone(),
            refused: [&self.refused[..], &other.refused[..]]
                .concat()
                .into_iter()
                .take(REFUSALS_KEPT)
                .collect(),
        }
    }

    /// Counts a revision the target refused and will refuse again, names it
    /// in the report and the log: it is passed over, as CouchDB's
    /// replicator passes it over.
    fn refuse(&mut self, db: &str, id: &str, rev: &str, why: &str) {
        tracing::warn!(%db, %id, %rev, reason = why, "the target refused a revision: passed over");
        self.doc_write_failures += 1;
        if self.refused.len() < REFUSALS_KEPT {
            self.refused.push(format!("{id} {rev} ({why})"));
        }
    }
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// The source database does not exist.
    #[error("the source database does not exist")]
    SourceMissing,
    /// The target does not exist, and the document does not create it.
    #[error("the target database does not exist (set create_target: true to create it)")]
    TargetMissing,
    /// The filter function the document names is not on the source.
    #[error("the source has no filter function {0:?} (a design document's `filters`)")]
    Filter(String),
    /// A revision the source did not give, even asked on its own and again
    /// after a pause: the run stops before it, as CouchDB's replicator does.
    #[error("revision {rev} of document {id:?} could not be read from the source: {reason}")]
    Unreadable {
        /// The document's id.
        id: String,
        /// The revision.
        rev: String,
        /// What the source answered.
        reason: String,
    },
    /// The target refused a revision for another reason than a validation
    /// function (`forbidden`, `unauthorized`), which are passed over.
    #[error("the target refused revision {rev} of document {id:?}: {error}: {reason}")]
    Refused {
        /// The document's id.
        id: String,
        /// The revision.
        rev: String,
        /// CouchDB's error.
        error: String,
        /// CouchDB's explanation.
        reason: String,
    },
    /// A request failed.
    #[error("{step}: {source}")]
    Couch {
        /// What the engine was doing.
        step: &'static str,
        /// The request's error.
        source: CouchError,
    },
}

impl ReplicationError {
    fn couch(step: &'static str) -> impl FnOnce(CouchError) -> Self {
        move |source| ReplicationError::Couch { step, source }
    }

    /// The CouchDB error behind a failed request, if that is what failed.
    pub fn couch_error(&self) -> Option<&CouchError> {
        match self {
            ReplicationError::Couch { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// One replication from `source` to `target`.
pub struct Replication {
    /// Where documents come from.
    pub source: Peer,
    /// Where they go.
    pub target: Peer,
    /// How.
    pub options: Options,
    /// This run's place among the runs writing to the same target, whose
    /// requests it shares (None: it sends its own).
    pub group: Option<Member>,
}

impl Replication {
    /// The replication id, which names the checkpoints. With a filter
    /// function it covers the function's code, read from the source, as
    /// CouchDB's does: an edited filter starts a new replication instead of
    /// resuming from a checkpoint taken under the old code.
    pub async fn id(&self) -> Result<String, ReplicationError> {
        let code = match &self.options.filter.filter {
            Some(name) => Some(self.filter_code(name).await?),
            None => None,
        };
        let (source, target) = (&self.source, &self.target);
        Ok(replication_id(
            source,
            target,
            &self.options,
            code.as_deref(),
        ))
    }

    /// The code of the filter function `ddoc/name` of the source.
    async fn filter_code(&self, name: &str) -> Result<String, ReplicationError> {
        let unknown = || ReplicationError::Filter(name.to_string());
        let (ddoc, function) = name.split_once('/').ok_or_else(unknown)?;
        let source = &self.source;
        let design = source
            .client
            .get_doc_opt::<Value>(&source.db, &format!("_design/{ddoc}"))
            .await
            .map_err(|e| missing(e, ReplicationError::SourceMissing, "reading the filter"))?;
        let code = design
            .as_ref()
            .and_then(|d| d["filters"][function].as_str());
        code.map(String::from).ok_or_else(unknown)
    }

    /// Replicates every change of the source since the last checkpoint of
    /// replication `id` ([`Self::id`]), or since `known` (what the last run of this process left) while the
    /// target's checkpoint shows nobody else wrote since. Returns what to
    /// keep for the next run.
    pub async fn run(
        &self,
        id: &str,
        known: Option<Progress>,
    ) -> Result<(Report, Option<Progress>), ReplicationError> {
        let mut logs = self.logs(id, known).await?;
        if let Some(seq) = &self.options.since_seq {
            logs.start_from(seq.clone());
        }
        let mut report = Report::default();
        let mut bulk_get = true;
        let mut since = logs.start_seq();
        let mut recorded = false;
        loop {
            let page = self.changes(since.as_ref()).await?;
            let count = page.results.len() as u64;
            if count > 0 {
                let missing = logs.missing_rate();
                self.copy(&page.results, &mut report, &mut bulk_get, missing)
                    .await?;
            }
            let last = count < self.options.batch;
            let moved = since.as_ref() != Some(&page.last_seq);
            // A run of one batch (the common case: a change or two) records
            // its progress only every `checkpoint_interval`: the next run
            // goes on from the progress kept in memory, and such a run
            // writes one document instead of three. Longer runs record
            // every batch.
            let worth = !last || recorded || logs.due(self.options.checkpoint_interval);
            if self.options.use_checkpoints && count > 0 && moved && worth {
                recorded = true;
                logs.record(&self.source, &self.target, &page.last_seq, &report)
                    .await?;
            }
            report.last_seq = Some(page.last_seq.clone());
            since = Some(page.last_seq);
            if last {
                let progress = logs.progress(&report);
                return Ok((report, progress));
            }
        }
    }

    /// A page of the source's changes since `since`.
    async fn changes(&self, since: Option<&Seq>) -> Result<ChangesPage, ReplicationError> {
        let options = &self.options;
        let page = self
            .source
            .client
            .changes_page(
                &self.source.db,
                since,
                options.batch,
                &options.filter,
                options.winning_revs_only,
            )
            .await;
        let step = "reading the source's changes";
        page.map_err(|e| missing(e, ReplicationError::SourceMissing, step))
    }

    /// The checkpoints (none without `use_checkpoints`), creating the
    /// target first if the document asks for it. `known` does not count
    /// with `since_seq`, which sets where every run starts.
    async fn logs(&self, id: &str, known: Option<Progress>) -> Result<Logs, ReplicationError> {
        if self.options.create_target {
            self.create_target().await?;
        }
        if !self.options.use_checkpoints {
            self.check_exists().await?;
            return Ok(Logs::empty(id));
        }
        let known = known.filter(|_| self.options.since_seq.is_none());
        Logs::read(&self.source, &self.target, self.group.as_ref(), id, known).await
    }

    async fn create_target(&self) -> Result<(), ReplicationError> {
        let target = &self.target;
        target
            .client
            .create_db_with(&target.db, &self.options.create_target_params)
            .await
            .map_err(ReplicationError::couch("creating the target"))?;
        Ok(())
    }

    async fn check_exists(&self) -> Result<(), ReplicationError> {
        let (source, target) = (&self.source, &self.target);
        let source_info = source.client.db_info(&source.db).await;
        source_info
            .map_err(|e| missing(e, ReplicationError::SourceMissing, "reading the source"))?;
        let target_info = target.client.db_info(&target.db).await;
        target_info
            .map_err(|e| missing(e, ReplicationError::TargetMissing, "reading the target"))?;
        Ok(())
    }

    /// Copies one page of changes: what the target lacks is fetched and
    /// written. Revisions with attachments are copied one by one, streamed,
    /// as CouchDB's replicator copies them; the others in one `_bulk_docs`.
    async fn copy(
        &self,
        changes: &[Change],
        report: &mut Report,
        bulk_get: &mut bool,
        missing: &mut MissingRate,
    ) -> Result<(), ReplicationError> {
        let wanted = self.missing(changes, report, missing).await?;
        if wanted.is_empty() {
            return Ok(());
        }
        let docs = self.fetch(&wanted, report, bulk_get).await?;
        let (plain, attached) = split_attached(docs);
        if let Some((id, rev)) = self.write(plain, report).await? {
            // Only a revision with attachments can lack one.
            let reason = "an attachment stub in a revision without attachments".into();
            let error = "missing_stub".into();
            return Err(ReplicationError::Refused {
                id,
                rev,
                error,
                reason,
            });
        }
        for head in attached {
            let since = wanted
                .iter()
                .find(|w| w.id == head.id)
                .map_or(&[][..], |w| &w.atts_since[..]);
            self.copy_attached(&head, since, report).await?;
        }
        Ok(())
    }

    /// The revisions of `changes` the target lacks (`_revs_diff`), each
    /// with the ancestors whose attachments the target has; every revision
    /// of `changes`, without asking, while the target has lacked nearly
    /// all ([`MissingRate`]).
    async fn missing(
        &self,
        changes: &[Change],
        report: &mut Report,
        rate: &mut MissingRate,
    ) -> Result<Vec<RevToFetch>, ReplicationError> {
        let mut revs = Revs::new();
        for change in changes {
            let leaves = change.changes.iter().map(|c| c.rev.clone());
            revs.entry(change.id.clone()).or_default().extend(leaves);
        }
        let checked = revs.values().map(|r| r.len() as u64).sum::<u64>();
        report.missing_checked += checked;
        let diff = if rate.skip() {
            tracing::debug!(db = %self.target.db, revisions = checked, "_revs_diff skipped: the target has lacked nearly everything");
            all_missing(revs)
        } else {
            let step = "comparing revisions with the target";
            let diff = self.revs_diff(revs).await;
            let diff = diff.map_err(ReplicationError::couch(step))?;
            let found = diff.values().map(|d| d.missing.len() as u64).sum();
            rate.asked(checked, found);
            diff
        };
        let wanted: Vec<RevToFetch> = diff
            .into_iter()
            .flat_map(|(id, d)| {
                let since = d.possible_ancestors;
                d.missing.into_iter().map(move |rev| RevToFetch {
                    id: id.clone(),
                    rev,
                    atts_since: since.clone(),
                })
            })
            .collect();
        report.missing_found += wanted.len() as u64;
        Ok(wanted)
    }

    /// `_revs_diff` on the target, shared with the other runs on it.
    async fn revs_diff(&self, revs: Revs) -> Result<BTreeMap<String, RevsDiff>, CouchError> {
        let revs = match &self.group {
            Some(group) => match group.revs_diff(revs).await {
                Ok(diff) => return diff,
                Err(revs) => revs,
            },
            None => revs,
        };
        self.target.client.revs_diff(&self.target.db, &revs).await
    }
}

/// Every revision of `revs` taken for missing, as `_revs_diff` would answer
/// of a target that has none of them.
fn all_missing(revs: Revs) -> BTreeMap<String, RevsDiff> {
    let missing = |(id, missing)| {
        let possible_ancestors = Vec::new();
        (
            id,
            RevsDiff {
                missing,
                possible_ancestors,
            },
        )
    };
    revs.into_iter().map(missing).collect()
}
