//! The `selector` member of an on_change rule: a CouchDB Mango-style
//! selector, of which this subset is supported:
//!
//! - `{"field": value}`: the field equals the value (`{"type": "invoice"}`).
//!   Equality is deep for arrays and objects, and numbers are equal by
//!   value (`1` equals `1.0`); beyond 64-bit integers, by their nearest
//!   double (the document is read into a `Value`, which keeps no more). An array value means equality with that
//!   array, not membership.
//! - A field whose value is an object of field names (not operators) holds
//!   conditions on the nested fields: `{"address": {"city": "Paris"}}` is
//!   `{"address.city": "Paris"}`; an empty object `{}` means equality with
//!   `{}`. Field names are paths: dots separate segments, a numeric segment
//!   indexes an array, and `\.` is a literal dot (as in CouchDB).
//! - Operators on a field, as in `{"age": {"$gte": 18, "$lt": 65}}` (all
//!   must hold): `$eq`, `$ne`; `$gt`, `$gte`, `$lt`, `$lte`, which compare
//!   numbers numerically and strings by Unicode code point, and are false
//!   when the field and the operand are not both numbers or both strings
//!   (unlike CouchDB, which orders values of different types); `$in`,
//!   `$nin` with an array operand (when the field is an array, `$in` holds
//!   if any of its elements is in the list, `$nin` if none is); `$exists`
//!   with `true` or `false` (a null field exists); `$regex` with a regular
//!   expression, which holds only for string fields.
//! - `$and` and `$or` take an array of selectors, `$not` a selector; they
//!   may be used at the top level or inside a field
//!   (`{"status": {"$not": {"$eq": "draft"}}}`).
//! - Every field operator except `$exists: false` is false when the field
//!   is missing, `$ne` and `$nin` included; `$not` inverts its selector, so
//!   `{"status": {"$not": {"$eq": "draft"}}}` holds for a document without
//!   `status`.
//! - Any other operator (`$elemMatch`, `$size`...) makes the document
//!   invalid, with a message naming it.

use std::cmp::Ordering;

use regex::Regex;
use serde_json::{Map, Number, Value};

use super::path::{lookup, Segment};
use super::{regex, OnChangeDocError, Result};
use crate::rules::{nests_within, MAX_JSON_DEPTH};

/// A compiled selector. Field paths are split and regular expressions
/// compiled when the rule is read, so evaluation only walks the document.
///
/// A field's conditions are compiled beneath it, on paths relative to it:
/// `{"a.b": {"c": 1, "$ne": 2}}` is `At([a, b], All([At([c], Eq(1)),
/// Ne(2)]))`. Each path segment is thus made once, from the name that
/// writes it, and the compiled selector grows with the text of the
/// selector, not with the length of a path times the conditions under it.
#[derive(Debug, Clone)]
pub(super) enum Selector {
    All(Vec<Selector>),
    Any(Vec<Selector>),
    Not(Box<Selector>),
    /// The selector of the value at `path`, below the value it applies to
    /// (a missing value included: `$exists: false` holds for it).
    At {
        path: Vec<Segment>,
        inner: Box<Selector>,
    },
    /// An operator on the value the selector applies to.
    Test(FieldTest),
}

#[derive(Debug, Clone)]
pub(super) enum FieldTest {
    Eq(Value),
    Ne(Value),
    Gt(Value),
    Gte(Value),
    Lt(Value),
    Lte(Value),
    In(Vec<Value>),
    Nin(Vec<Value>),
    Exists(bool),
    Regex(Regex),
}

impl Selector {
    /// Compiles the value of `selector`. Err: anything outside the subset
    /// above, or a selector nested deeper than CouchDB's JSON parser
    /// allows (it is compiled and evaluated by recursion: the bound keeps
    /// the stack small).
    pub(super) fn parse(value: &Value) -> Result<Selector> {
        if !nests_within(value, MAX_JSON_DEPTH) {
            return Err(OnChangeDocError::TooDeep("selector"));
        }
        match value {
            Value::Object(members) => parse_members(&Place::Top, members),
            _ => Err(OnChangeDocError::BadSelector(
                "must be an object, such as {\"type\": \"invoice\"}".to_string(),
            )),
        }
    }

    /// Whether the document satisfies the selector.
    pub(super) fn matches(&self, doc: &Value) -> bool {
        self.holds(Some(doc))
    }

    /// Whether the selector holds for a value, or for a missing one.
    fn holds(&self, value: Option<&Value>) -> bool {
        match self {
            Selector::All(parts) => parts.iter().all(|p| p.holds(value)),
            Selector::Any(parts) => parts.iter().any(|p| p.holds(value)),
            Selector::Not(inner) => !inner.holds(value),
            Selector::At { path, inner } => inner.holds(value.and_then(|v| lookup(v, path))),
            Selector::Test(test) => test.holds(value),
        }
    }
}

/// Where in the selector a part is compiled: at the top, or under the
/// fields named so far. Kept on the stack and read only for an error
/// message, so that no path is copied while compiling.
enum Place<'a> {
    Top,
    Field {
        parent: &'a Place<'a>,
        segments: &'a [Segment],
    },
}

impl Place<'_> {
    /// The field's whole path, for error messages.
    fn text(&self) -> String {
        let mut names = Vec::new();
        let mut place = self;
        while let Place::Field { parent, segments } = place {
            names.extend(segments.iter().rev().map(|s| s.key.as_str()));
            place = parent;
        }
        names.reverse();
        names.join(".")
    }
}

impl FieldTest {
    fn holds(&self, value: Option<&Value>) -> bool {
        let value = match (self, value) {
            (FieldTest::Exists(wanted), value) => return value.is_some() == *wanted,
            // As in CouchDB, every other operator needs the field.
            (_, None) => return false,
            (_, Some(value)) => value,
        };
        match self {
            FieldTest::Eq(operand) => json_eq(value, operand),
            FieldTest::Ne(operand) => !json_eq(value, operand),
            FieldTest::Gt(operand) => order(value, operand) == Some(Ordering::Greater),
            FieldTest::Gte(operand) => order(value, operand).is_some_and(Ordering::is_ge),
            FieldTest::Lt(operand) => order(value, operand) == Some(Ordering::Less),
            FieldTest::Lte(operand) => order(value, operand).is_some_and(Ordering::is_le),
            FieldTest::In(list) => in_list(value, list),
            FieldTest::Nin(list) => !in_list(value, list),
            FieldTest::Regex(re) => value.as_str().is_some_and(|s| re.is_match(s)),
            // Answered above, before the field was required.
            FieldTest::Exists(wanted) => *wanted,
        }
    }
}

/// `$in` as CouchDB has it: an array field is in the list when one of its
/// elements is.
fn in_list(value: &Value, list: &[Value]) -> bool {
    match value {
        Value::Array(items) => items
            .iter()
            .any(|item| list.iter().any(|x| json_eq(item, x))),
        _ => list.iter().any(|x| json_eq(value, x)),
    }
}

/// Deep equality where numbers are equal by value: `serde_json` tells `1`
/// from `1.0`, which JSON (and CouchDB) do not.
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => number_cmp(x, y) == Some(Ordering::Equal),
        (Value::Array(xs), Value::Array(ys)) => {
            xs.len() == ys.len() && xs.iter().zip(ys).all(|(x, y)| json_eq(x, y))
        }
        (Value::Object(xs), Value::Object(ys)) => {
            xs.len() == ys.len()
                && xs
                    .iter()
                    .all(|(k, x)| ys.get(k).is_some_and(|y| json_eq(x, y)))
        }
        _ => a == b,
    }
}

/// The order used by `$gt` and friends: numbers by value, strings by code
/// point, anything else unordered.
fn order(a: &Value, b: &Value) -> Option<Ordering> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => number_cmp(x, y),
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

/// Compares exactly when both numbers are integers (large ids stay exact),
/// as floating point otherwise.
fn number_cmp(x: &Number, y: &Number) -> Option<Ordering> {
    if let (Some(a), Some(b)) = (x.as_i64(), y.as_i64()) {
        return Some(a.cmp(&b));
    }
    if let (Some(a), Some(b)) = (x.as_u64(), y.as_u64()) {
        return Some(a.cmp(&b));
    }
    x.as_f64()?.partial_cmp(&y.as_f64()?)
}

/// The members of a selector object found at `place`: operators apply
/// there, other names are fields beneath it. All members must hold.
fn parse_members(place: &Place, members: &Map<String, Value>) -> Result<Selector> {
    let mut parts = members
        .iter()
        .map(|(name, value)| {
            if name.starts_with('$') {
                parse_operator(place, name, value)
            } else {
                parse_field(place, field_segments(name), value)
            }
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(if parts.len() == 1 {
        parts.remove(0)
    } else {
        Selector::All(parts)
    })
}

/// A field's value: an object of operators and/or nested fields, or else a
/// value the field must equal.
fn parse_field(parent: &Place, path: Vec<Segment>, value: &Value) -> Result<Selector> {
    let inner = match value {
        Value::Object(members) if !members.is_empty() => {
            let place = Place::Field {
                parent,
                segments: &path,
            };
            parse_members(&place, members)?
        }
        other => Selector::Test(FieldTest::Eq(other.clone())),
    };
    Ok(Selector::At {
        path,
        inner: Box::new(inner),
    })
}

fn parse_operator(place: &Place, operator: &str, operand: &Value) -> Result<Selector> {
    match operator {
        "$and" | "$or" => parse_combination(place, operator, operand),
        "$not" => match operand {
            Value::Object(members) => Ok(Selector::Not(Box::new(parse_members(place, members)?))),
            _ => Err(OnChangeDocError::BadSelector(
                "`$not` needs a selector (an object)".to_string(),
            )),
        },
        _ => {
            let test = parse_field_test(place, operator, operand)?;
            if let Place::Top = place {
                return Err(OnChangeDocError::BadSelector(format!(
                    "`{operator}` needs a field, as in {{\"field\": {{\"{operator}\": ...}}}}"
                )));
            }
            Ok(Selector::Test(test))
        }
    }
}

/// `$and` or `$or`: an array of selectors at `place`.
fn parse_combination(place: &Place, operator: &str, operand: &Value) -> Result<Selector> {
    let Value::Array(items) = operand else {
        return Err(OnChangeDocError::BadSelector(format!(
            "`{operator}` needs an array of selectors"
        )));
    };
    let parts = items
        .iter()
        .map(|item| match item {
            Value::Object(members) => parse_members(place, members),
            _ => Err(OnChangeDocError::BadSelector(format!(
                "`{operator}` needs an array of selectors (objects)"
            ))),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(if operator == "$and" {
        Selector::All(parts)
    } else {
        Selector::Any(parts)
    })
}

/// A field operator and its operand; an unknown operator is an error.
fn parse_field_test(place: &Place, operator: &str, operand: &Value) -> Result<FieldTest> {
    let list = || match operand {
        Value::Array(items) => Ok(items.clone()),
        _ => Err(OnChangeDocError::BadSelector(format!(
            "`{operator}` on `{}` needs an array",
            place.text()
        ))),
    };
    Ok(match operator {
        "$eq" => FieldTest::Eq(operand.clone()),
        "$ne" => FieldTest::Ne(operand.clone()),
        "$gt" => FieldTest::Gt(operand.clone()),
        "$gte" => FieldTest::Gte(operand.clone()),
        "$lt" => FieldTest::Lt(operand.clone()),
        "$lte" => FieldTest::Lte(operand.clone()),
        "$in" => FieldTest::In(list()?),
        "$nin" => FieldTest::Nin(list()?),
        "$exists" => match operand {
            Value::Bool(wanted) => FieldTest::Exists(*wanted),
            _ => {
                return Err(OnChangeDocError::BadSelector(format!(
                    "`$exists` on `{}` needs true or false",
                    place.text()
                )))
            }
        },
        "$regex" => match operand {
            Value::String(pattern) => FieldTest::Regex(regex(pattern, || {
                format!("selector.{}.$regex", place.text())
            })?),
            _ => {
                return Err(OnChangeDocError::BadSelector(format!(
                    "`$regex` on `{}` needs a regular expression string",
                    place.text()
                )))
            }
        },
        _ => return Err(OnChangeDocError::UnknownOperator(operator.to_string())),
    })
}

/// A Mango field name split on dots; `\.` is a dot inside a segment.
fn field_segments(name: &str) -> Vec<Segment> {
    let mut segments = Vec::new();
    let mut current = String::new();
    let mut chars = name.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some('.') => current.push('.'),
                Some(other) => {
                    current.push('\\');
                    current.push(other);
                }
                None => current.push('\\'),
            },
            '.' => segments.push(Segment::new(std::mem::take(&mut current))),
            _ => current.push(c),
        }
    }
    segments.push(Segment::new(current));
    segments
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hostile_input;
    use proptest::collection::vec;
    use proptest::prelude::*;
    use serde_json::json;

    fn with_selector(selector: Value) -> Selector {
        Selector::parse(&selector).unwrap()
    }

    fn error(selector: Value) -> OnChangeDocError {
        Selector::parse(&selector).unwrap_err()
    }

    #[test]
    fn selector_implicit_equality_and_nested_objects() {
        let rule = with_selector(json!({"type": "invoice", "address": {"city": "Paris"}}));
        assert!(rule.matches(&json!({"type": "invoice", "address": {"city": "Paris", "zip": 1}})));
        assert!(!rule.matches(&json!({"type": "invoice", "address": {"city": "Lyon"}})));
        assert!(!rule.matches(&json!({"type": "invoice"})));

        let dotted = with_selector(json!({"address.city": "Paris", "lines.1.qty": 2}));
        assert!(dotted
            .matches(&json!({"address": {"city": "Paris"}, "lines": [{"qty": 1}, {"qty": 2.0}]})));

        let escaped = with_selector(json!({"a\\.b": 1}));
        assert!(escaped.matches(&json!({"a.b": 1})));
        assert!(!escaped.matches(&json!({"a": {"b": 1}})));
    }

    #[test]
    fn selector_equality_is_deep_and_numeric() {
        let rule = with_selector(json!({"tags": ["a", "b"], "meta": {"v": 1}}));
        assert!(rule.matches(&json!({"tags": ["a", "b"], "meta": {"v": 1.0}})));
        assert!(!rule.matches(&json!({"tags": ["a"], "meta": {"v": 1}})));
        assert!(!with_selector(json!({"tags": "a"})).matches(&json!({"tags": ["a", "b"]})));
        assert!(with_selector(json!({"n": {"$eq": 2}})).matches(&json!({"n": 2.0})));
    }

    #[test]
    fn selector_ne_needs_the_field() {
        let rule = with_selector(json!({"status": {"$ne": "draft"}}));
        assert!(rule.matches(&json!({"status": "sent"})));
        assert!(!rule.matches(&json!({"status": "draft"})));
        assert!(!rule.matches(&json!({})));
    }

    #[test]
    fn selector_ranges_compare_numbers_and_strings() {
        let adult = with_selector(json!({"age": {"$gte": 18, "$lt": 65}}));
        assert!(adult.matches(&json!({"age": 18})));
        assert!(adult.matches(&json!({"age": 64.5})));
        assert!(!adult.matches(&json!({"age": 65})));
        assert!(!adult.matches(&json!({"age": 17})));

        assert!(with_selector(json!({"n": {"$gt": 1}})).matches(&json!({"n": 1.5})));
        assert!(with_selector(json!({"n": {"$lte": -1}})).matches(&json!({"n": -1})));
        assert!(with_selector(json!({"big": {"$gt": 9007199254740992_u64}}))
            .matches(&json!({"big": 9007199254740993_u64})));
        // Beyond 64 bits, numbers compare as their nearest doubles (documented).
        let beyond: Value = serde_json::from_str(r#"{"big": 18446744073709551617}"#).unwrap();
        let selector: Value = serde_json::from_str(r#"{"big": 18446744073709551616}"#).unwrap();
        assert!(with_selector(selector).matches(&beyond));
        assert!(with_selector(json!({"name": {"$gt": "b"}})).matches(&json!({"name": "bob"})));
        assert!(!with_selector(json!({"name": {"$lt": "B"}})).matches(&json!({"name": "a"})));
    }

    #[test]
    fn selector_ranges_are_false_across_types() {
        for value in [
            json!("10"),
            json!(true),
            json!(null),
            json!([20]),
            json!({"n": 20}),
        ] {
            let doc = json!({ "n": value });
            for op in ["$gt", "$gte", "$lt", "$lte"] {
                assert!(
                    !with_selector(json!({"n": {op: 5}})).matches(&doc),
                    "{op} {doc}"
                );
            }
        }
        assert!(!with_selector(json!({"s": {"$gt": "a"}})).matches(&json!({"s": 5})));
    }

    #[test]
    fn selector_in_and_nin_with_scalar_and_array_fields() {
        let in_list = with_selector(json!({"status": {"$in": ["sent", "paid"]}}));
        assert!(in_list.matches(&json!({"status": "paid"})));
        assert!(!in_list.matches(&json!({"status": "draft"})));
        assert!(!in_list.matches(&json!({})));
        assert!(with_selector(json!({"tags": {"$in": ["urgent"]}}))
            .matches(&json!({"tags": ["x", "urgent"]})));

        let not_in = with_selector(json!({"status": {"$nin": ["draft"]}}));
        assert!(not_in.matches(&json!({"status": "sent"})));
        assert!(!not_in.matches(&json!({"status": "draft"})));
        assert!(!not_in.matches(&json!({})));
        assert!(!with_selector(json!({"tags": {"$nin": ["urgent"]}}))
            .matches(&json!({"tags": ["x", "urgent"]})));
    }

    #[test]
    fn selector_exists_counts_null_as_present() {
        let has = with_selector(json!({"paid_at": {"$exists": true}}));
        assert!(has.matches(&json!({"paid_at": null})));
        assert!(!has.matches(&json!({})));
        let lacks = with_selector(json!({"paid_at": {"$exists": false}}));
        assert!(lacks.matches(&json!({})));
        assert!(!lacks.matches(&json!({"paid_at": "2024"})));
    }

    #[test]
    fn selector_regex_applies_to_strings_only() {
        let rule = with_selector(json!({"email": {"$regex": "@example\\.com$"}}));
        assert!(rule.matches(&json!({"email": "a@example.com"})));
        assert!(!rule.matches(&json!({"email": "a@example.org"})));
        assert!(!with_selector(json!({"n": {"$regex": "1"}})).matches(&json!({"n": 1})));
    }

    #[test]
    fn selector_and_or_not_combine() {
        let rule = with_selector(json!({
            "$or": [{"type": "invoice"}, {"type": "refund"}],
            "$not": {"status": "draft"},
            "$and": [{"total": {"$gt": 0}}, {"currency": "EUR"}]
        }));
        assert!(rule
            .matches(&json!({"type": "refund", "status": "sent", "total": 5, "currency": "EUR"})));
        assert!(!rule
            .matches(&json!({"type": "refund", "status": "draft", "total": 5, "currency": "EUR"})));
        assert!(!rule
            .matches(&json!({"type": "order", "status": "sent", "total": 5, "currency": "EUR"})));
        assert!(!rule
            .matches(&json!({"type": "invoice", "status": "sent", "total": 0, "currency": "EUR"})));

        let field_level = with_selector(json!({"n": {"$or": [{"$lt": 0}, {"$gt": 10}]}}));
        assert!(field_level.matches(&json!({"n": 11})));
        assert!(!field_level.matches(&json!({"n": 5})));

        let not_draft = with_selector(json!({"status": {"$not": {"$eq": "draft"}}}));
        assert!(
            not_draft.matches(&json!({})),
            "$not holds without the field"
        );
        assert!(!not_draft.matches(&json!({"status": "draft"})));
    }

    #[test]
    fn unknown_selector_operator_is_named() {
        let err = error(json!({"tags": {"$elemMatch": {"$eq": "a"}}}));
        assert_eq!(
            err,
            OnChangeDocError::UnknownOperator("$elemMatch".to_string())
        );
        assert!(err.to_string().contains("$elemMatch"));
        assert_eq!(
            error(json!({"$nor": []})),
            OnChangeDocError::UnknownOperator("$nor".to_string())
        );
    }

    #[test]
    fn malformed_selectors_are_errors() {
        for bad in [
            json!("type == invoice"),
            json!({"$gt": 5}),
            json!({"tags": {"$in": "a"}}),
            json!({"tags": {"$nin": {}}}),
            json!({"a": {"$exists": "yes"}}),
            json!({"a": {"$regex": 1}}),
            json!({"$and": {"a": 1}}),
            json!({"$or": ["a"]}),
            json!({"$not": [{"a": 1}]}),
        ] {
            assert!(
                matches!(error(bad.clone()), OnChangeDocError::BadSelector(_)),
                "{bad}"
            );
        }
    }

    /// What a compiled selector holds: its nodes, path segments and their
    /// bytes, and the text of its operands.
    fn weight(selector: &Selector) -> usize {
        1 + match selector {
            Selector::All(parts) | Selector::Any(parts) => parts.iter().map(weight).sum(),
            Selector::Not(inner) => weight(inner),
            Selector::At { path, inner } => {
                path.iter().map(|s| 1 + s.key.len()).sum::<usize>() + weight(inner)
            }
            Selector::Test(test) => match test {
                FieldTest::Eq(v)
                | FieldTest::Ne(v)
                | FieldTest::Gt(v)
                | FieldTest::Gte(v)
                | FieldTest::Lt(v)
                | FieldTest::Lte(v) => v.to_string().len(),
                FieldTest::In(list) | FieldTest::Nin(list) => {
                    list.iter().map(|v| v.to_string().len()).sum()
                }
                FieldTest::Exists(_) => 0,
                FieldTest::Regex(re) => re.as_str().len(),
            },
        }
    }

    /// A selector-like object: members named by operators, paths or
    /// anything, of any value.
    fn selector_like() -> impl Strategy<Value = Value> {
        prop_oneof![
            3 => vec((hostile_input::key(), hostile_input::json()), 0..6)
                .prop_map(|members| Value::Object(hostile_input::object(members))),
            1 => hostile_input::json(),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Ok or a clear Err for any JSON; what compiles holds at most
        /// twice the selector's text and evaluates any document.
        #[test]
        fn a_selector_of_any_json_compiles_or_errs_without_panic(
            selector in selector_like(),
            doc in hostile_input::json(),
        ) {
            let text = selector.to_string().len();
            match Selector::parse(&selector) {
                Ok(compiled) => {
                    prop_assert!(weight(&compiled) <= 2 * text, "{} > 2 * {text}", weight(&compiled));
                    compiled.matches(&doc);
                }
                Err(error) => prop_assert!(!error.to_string().is_empty()),
            }
        }

    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Dots in a field name are the same as nested fields: the path
        /// is split where it is written, and each part applies below it.
        #[test]
        fn a_dotted_path_means_the_same_as_nested_fields(
            inner in selector_like(),
            doc in hostile_input::json(),
        ) {
            let Value::Object(members) = &inner else { return Ok(()) };
            prop_assume!(!members.is_empty());
            let dotted = Selector::parse(&json!({"a.b": inner}));
            let nested = Selector::parse(&json!({"a": {"b": inner}}));
            match (dotted, nested) {
                (Ok(dotted), Ok(nested)) => {
                    let doc = json!({"a": {"b": doc}});
                    prop_assert_eq!(dotted.matches(&doc), nested.matches(&doc));
                }
                (dotted, nested) => prop_assert_eq!(dotted.is_ok(), nested.is_ok()),
            }
        }

        /// A field name gives one segment more than its unescaped dots,
        /// holding no more bytes than the name.
        #[test]
        fn a_field_name_splits_into_at_most_its_bytes(name in hostile_input::text()) {
            let segments = field_segments(&name);
            prop_assert!(segments.len() <= hostile_input::count(name.as_bytes(), b'.') + 1);
            prop_assert!(segments.iter().map(|s| s.key.len()).sum::<usize>() <= name.len());
        }
    }

    #[test]
    fn a_selector_nested_far_deeper_than_json_allows_is_an_error_not_a_stack_overflow() {
        use hostile_input::{array, member};
        let wraps: [fn(Value) -> Value; 4] = [
            |v| member("$not", v),
            |v| member("$and", array(v)),
            |v| member("a", v),
            |v| member("a", member("$eq", array(v))),
        ];
        for wrap in wraps {
            let deep = hostile_input::nested(10_000, json!({"a": 1}), wrap);
            assert_eq!(
                Selector::parse(&deep).unwrap_err(),
                OnChangeDocError::TooDeep("selector")
            );
            hostile_input::dismantle(deep);
        }
    }

    #[test]
    fn a_selector_as_deep_as_a_couchdb_document_allows_compiles_and_matches() {
        // A document's members are one level down: its selector nests at
        // most 127 levels.
        let fields = format!("{}1{}", r#"{"a":"#.repeat(127), "}".repeat(127));
        let doc: Value = serde_json::from_str(&fields).unwrap();
        assert!(with_selector(doc.clone()).matches(&doc));
        let nots = format!(
            "{}{{\"a\":1}}{}",
            r#"{"$not":"#.repeat(126),
            "}".repeat(126)
        );
        let selector = with_selector(serde_json::from_str(&nots).unwrap());
        assert!(selector.matches(&json!({"a": 1})));
    }

    #[test]
    fn a_long_path_under_many_conditions_compiles_in_size_linear_in_the_selector() {
        // Every condition under a path once held its own copy of the path:
        // each of these 80 kB selectors compiled to 80 million segments,
        // about 6 GB.
        let path = vec!["a"; 20_000].join(".");
        let conditions: Vec<Value> = (0..4_000).map(|_| json!({"$eq": 1})).collect();
        let fields: Map<String, Value> = (0..4_000).map(|i| (format!("f{i}"), json!(1))).collect();
        for selector in [
            json!({ &path: {"$and": conditions} }),
            json!({ &path: fields }),
        ] {
            let compiled = with_selector(selector.clone());
            let text = selector.to_string().len();
            assert!(
                weight(&compiled) <= 2 * text,
                "{} > 2 * {text}",
                weight(&compiled)
            );
        }
    }
}
