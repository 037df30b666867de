//! Replicator and on_change documents: parsing, validation and matching of
//! database names and documents, and the follower that keeps them in memory.
//! An on_change document is compiled here, once, into the request the
//! delivery sends ([`on_change::Template`]); the delivery depends on this
//! module, never the other way round.

pub mod cache;
pub mod follower;
pub mod on_change;
pub mod replicator;

use serde_json::Value;

/// How many arrays and objects CouchDB's answers may nest, one inside the
/// other: `serde_json` refuses text deeper than 127, so no document read
/// from CouchDB is deeper. The parts of a document compiled or copied by
/// recursion (a selector, `params`, a replicator's parameters) are held to
/// it, so that a value built deeper some other way is refused instead of
/// overflowing the stack.
pub(crate) const MAX_JSON_DEPTH: usize = 128;

/// Whether `value` nests at most `max` arrays and objects (a scalar nests
/// none). Measured without recursion, so any value is measured safely.
pub(crate) fn nests_within(value: &Value, max: usize) -> bool {
    let mut pending = vec![(value, 1)];
    while let Some((value, level)) = pending.pop() {
        match value {
            Value::Array(_) | Value::Object(_) if level > max => return false,
            Value::Array(items) => pending.extend(items.iter().map(|v| (v, level + 1))),
            Value::Object(members) => pending.extend(members.values().map(|v| (v, level + 1))),
            _ => {}
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hostile_input::{array, dismantle, nested};
    use serde_json::json;

    #[test]
    fn nesting_is_counted_in_arrays_and_objects() {
        assert!(nests_within(&json!(1), 0));
        assert!(!nests_within(&json!([]), 0));
        assert!(nests_within(&json!({"a": [1, {}]}), 3));
        assert!(!nests_within(&json!({"a": [1, {"b": []}]}), 3));
    }

    #[test]
    fn nesting_far_beyond_the_limit_is_measured_without_overflowing_the_stack() {
        let deep = nested(100_000, json!(null), array);
        assert!(!nests_within(&deep, MAX_JSON_DEPTH));
        assert!(nests_within(&deep, 100_000));
        dismantle(deep);
    }

    #[test]
    fn text_as_deep_as_the_json_parser_reads_is_within_the_limit() {
        let deepest = format!("{}{}", "[".repeat(127), "]".repeat(127));
        let value: Value = serde_json::from_str(&deepest).unwrap();
        assert!(nests_within(&value, MAX_JSON_DEPTH));
        let deeper = format!("{}{}", "[".repeat(128), "]".repeat(128));
        assert!(serde_json::from_str::<Value>(&deeper).is_err());
    }
}
