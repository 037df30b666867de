//! The `_replicate` parameters the native engine honours, read from a
//! replicator document. Any other parameter makes the document run on the
//! `couchdb` engine instead: a parameter is never dropped silently.

use std::time::Duration;

use serde_json::{Map, Value};

use crate::couch::{ChangesFilter, Seq};

/// Changes read, and revisions fetched, per batch (CouchDB's replicator
/// uses 500; smaller batches bound memory with large attachments).
const BATCH: u64 = 100;

/// How long the progress of runs may go unrecorded (CouchDB's default
/// `checkpoint_interval`).
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(30);

/// How one replication runs.
#[derive(Clone, Debug, PartialEq)]
pub struct Options {
    /// Create the target if it does not exist.
    pub create_target: bool,
    /// Parameters of the target's creation (`q`, `n`, `partitioned`).
    pub create_target_params: Map<String, Value>,
    /// Which changes of the source are replicated.
    pub filter: ChangesFilter,
    /// Read and write checkpoints (CouchDB's default: true).
    pub use_checkpoints: bool,
    /// Start here instead of at the checkpoint.
    pub since_seq: Option<Seq>,
    /// Replicate each document's winning revision only.
    pub winning_revs_only: bool,
    /// Changes per batch.
    pub batch: u64,
    /// A run that copies one batch records its checkpoint only if the last
    /// one is older than this (`checkpoint_interval`, in ms).
    pub checkpoint_interval: Duration,
}

/// Why a document cannot run on the native engine.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("the native engine does not support {0}")]
pub struct Unsupported(pub String);

impl Options {
    /// The options of a document's `_replicate` parameters.
    pub fn parse(params: &Map<String, Value>) -> Result<Options, Unsupported> {
        let mut options = Options {
            create_target: false,
            create_target_params: Map::new(),
            filter: ChangesFilter::default(),
            use_checkpoints: true,
            since_seq: None,
            winning_revs_only: false,
            batch: BATCH,
            checkpoint_interval: CHECKPOINT_INTERVAL,
        };
        for (name, value) in params {
            options.set(name, value)?;
        }
        if !options.filter.query_params.is_empty() && options.filter.filter.is_none() {
            return Err(Unsupported("`query_params` without a `filter`".into()));
        }
        Ok(options)
    }

    fn set(&mut self, name: &str, value: &Value) -> Result<(), Unsupported> {
        let wrong = || Unsupported(format!("`{name}` = {value}"));
        match (name, value) {
            ("create_target", Value::Bool(b)) => self.create_target = *b,
            ("create_target_params", Value::Object(p)) => self.create_target_params = p.clone(),
            ("filter", Value::String(f)) if f.starts_with('_') => return Err(wrong()),
            ("filter", Value::String(f)) => self.filter.filter = Some(f.clone()),
            ("query_params", Value::Object(p)) => self.filter.query_params = p.clone(),
            ("selector", Value::Object(_)) => self.filter.selector = Some(value.clone()),
            ("doc_ids", Value::Array(ids)) => {
                let ids: Option<Vec<String>> =
                    ids.iter().map(|i| i.as_str().map(unquote)).collect();
                self.filter.doc_ids = Some(ids.ok_or_else(wrong)?);
            }
            ("use_checkpoints", Value::Bool(b)) => self.use_checkpoints = *b,
            ("since_seq", seq) if !seq.is_null() => self.since_seq = Some(Seq::from(seq.clone())),
            ("winning_revs_only", Value::Bool(b)) => self.winning_revs_only = *b,
            ("worker_batch_size", Value::Number(n)) => {
                self.batch = n.as_u64().filter(|&n| n > 0).ok_or_else(wrong)?
            }
            ("checkpoint_interval", Value::Number(n)) => {
                self.checkpoint_interval = Duration::from_millis(n.as_u64().ok_or_else(wrong)?)
            }
            _ => return Err(Unsupported(format!("the parameter `{name}`"))),
        }
        Ok(())
    }
}

/// A `doc_ids` entry as CouchDB's replicator reads it: URL-decoded, `+`
/// as a space (`["c+d", "e%2Ff"]` replicates `c d` and `e/f`).
fn unquote(id: &str) -> String {
    let spaced = id.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(params: Value) -> Result<Options, Unsupported> {
        Options::parse(params.as_object().unwrap())
    }

    #[test]
    fn the_supported_parameters_are_read() {
        let o = parse(json!({"create_target": true, "filter": "app/by_kind",
            "query_params": {"kind": "a"}, "use_checkpoints": false,
            "since_seq": "5-abc", "winning_revs_only": true, "checkpoint_interval": 5000}))
        .unwrap();
        assert!(o.create_target && !o.use_checkpoints && o.winning_revs_only);
        assert_eq!(o.checkpoint_interval, Duration::from_secs(5));
        assert_eq!(o.filter.filter.as_deref(), Some("app/by_kind"));
        assert_eq!(o.since_seq, Some(Seq::from(json!("5-abc"))));
        let o = parse(json!({"doc_ids": ["a", "b/c"]})).unwrap();
        assert_eq!(
            o.filter.doc_ids,
            Some(vec!["a".to_string(), "b/c".to_string()])
        );
    }

    #[test]
    fn any_other_parameter_is_named_as_unsupported() {
        let e = parse(json!({"source_proxy": "http://p"})).unwrap_err();
        assert!(e.to_string().contains("source_proxy"), "{e}");
        assert!(parse(json!({"doc_ids": [1]})).is_err());
        assert!(parse(json!({"query_params": {"k": 1}})).is_err());
        assert!(parse(json!({"filter": "_view"})).is_err());
    }
}
