//! Paths into a changed document, shared by `if` and `selector`.

use serde_json::Value;

/// One step of a path into a document: an object key, which is also an
/// array index when it is all digits. The index is worked out once, when
/// the rule is read.
#[derive(Debug, Clone)]
pub(super) struct Segment {
    pub(super) key: String,
    index: Option<usize>,
}

impl Segment {
    pub(super) fn new(key: String) -> Self {
        let index = if !key.is_empty() && key.bytes().all(|b| b.is_ascii_digit()) {
            key.parse().ok()
        } else {
            None
        };
        Segment { key, index }
    }
}

/// The value at `path` in `doc`, or `None` when some step is missing.
pub(super) fn lookup<'a>(doc: &'a Value, path: &[Segment]) -> Option<&'a Value> {
    path.iter().try_fold(doc, |value, segment| match value {
        Value::Object(members) => members.get(&segment.key),
        Value::Array(items) => segment.index.and_then(|i| items.get(i)),
        _ => None,
    })
}
