//! Generated hostile inputs for the property tests of the parsers of
//! untrusted input: rule documents, CouchDB's answers, the passwords file.
//! Each parser's tests feed these and check that it answers Ok or a clear
//! Err, never panics, and builds no more than its input warrants.

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use serde_json::{Map, Value};

/// Pieces that parsers look for (placeholders, braces, URL parts, selector
/// operators, escapes) and characters that trip careless slicing.
const PIECES: &[&str] = &[
    "$",
    "{",
    "}",
    "${",
    "$db_name",
    "${db_name}",
    "$change",
    "${change.id}",
    "$change.rev",
    "${seq",
    "$delivery_id}",
    ".",
    "..",
    "/",
    "\\",
    "\\.",
    ":",
    "@",
    "://",
    "http://",
    "https://u:p@h/",
    "%",
    "%2E",
    "?",
    "#",
    "\0",
    "\n",
    "\r\n",
    "\"",
    "[",
    "]",
    "é",
    "\u{fffd}",
    "\u{10ffff}",
    "👍",
    "xn--",
    "$eq",
    "$and",
    "$regex",
    "(",
    "*",
];

/// Any text, biased toward the pieces parsers look for: any character
/// (NUL and every plane included), those pieces, and plain names.
pub fn text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        3 => any::<char>().prop_map(String::from),
        4 => select(PIECES).prop_map(String::from),
        2 => "[a-z0-9_]{1,8}",
    ];
    prop_oneof![
        8 => vec(piece, 0..24).prop_map(|pieces| pieces.concat()),
        1 => (select(PIECES), 0..2000usize).prop_map(|(piece, n)| piece.repeat(n)),
    ]
}

/// Any bytes: random ones, or the UTF-8 of [`text`] cut anywhere (invalid
/// UTF-8 at the cut), or JSON text of any shape.
pub fn bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        vec(any::<u8>(), 0..256),
        (text(), any::<prop::sample::Index>()).prop_map(|(text, cut)| {
            let mut bytes = text.into_bytes();
            if !bytes.is_empty() {
                bytes.truncate(cut.index(bytes.len()));
            }
            bytes
        }),
        json_text().prop_map(String::into_bytes),
    ]
}

/// A JSON number: small, at the ends of the 64-bit ranges, beyond them (a
/// double), tiny, huge.
pub fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON has no NaN or infinity", |x| x.is_finite())
            .prop_map(Value::from),
        select(vec![
            0.0,
            -0.0,
            1e308,
            -1e308,
            5e-324,
            1e-300,
            3600.0,
            3_600.000_000_1,
            18_446_744_073_709_551_616.0,
        ])
        .prop_map(Value::from),
    ]
}

/// An object key: one a parser gives a meaning (selector operators, rule
/// members, dotted paths, indexes) or any text.
pub fn key() -> impl Strategy<Value = String> {
    const KNOWN: &[&str] = &[
        "$eq",
        "$ne",
        "$gt",
        "$gte",
        "$lt",
        "$lte",
        "$in",
        "$nin",
        "$exists",
        "$regex",
        "$and",
        "$or",
        "$not",
        "$elemMatch",
        "$",
        "a",
        "a.b",
        "a\\.b",
        "a..b",
        ".",
        "0",
        "18446744073709551616",
        "",
        "url",
        "ok",
        "error",
        "docs",
        "id",
        "seq",
        "last_seq",
        "results",
        "doc",
    ];
    prop_oneof![
        3 => select(KNOWN).prop_map(String::from),
        1 => text(),
    ]
}

/// A JSON value of any shape: nested arrays and objects (up to 4 deep) of
/// any leaves, with keys from [`key`].
pub fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number(),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 24, 5, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..5).prop_map(Value::Array),
            vec((key(), inner), 0..5).prop_map(|members| Value::Object(object(members))),
        ]
    })
}

/// An object of `members`, the last of those with the same key winning.
pub fn object(members: Vec<(String, Value)>) -> Map<String, Value> {
    members.into_iter().collect()
}

/// JSON text, well formed or not: a value's text, cut anywhere, with any
/// text spliced in, or a run of unbalanced brackets.
pub fn json_text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => json().prop_map(|v| v.to_string()),
        2 => (json(), any::<prop::sample::Index>()).prop_map(|(v, cut)| {
            let text = v.to_string();
            let at = floor_char_boundary(&text, cut.index(text.len() + 1));
            text[..at].to_string()
        }),
        2 => (json(), any::<prop::sample::Index>(), text()).prop_map(|(v, at, garbage)| {
            let mut text = v.to_string();
            let at = floor_char_boundary(&text, at.index(text.len() + 1));
            text.insert_str(at, &garbage);
            text
        }),
        1 => (select(&["[", "{", "]", "}", "{\"a\":", "[1,"][..]), 0..300usize)
            .prop_map(|(piece, n)| piece.repeat(n)),
    ]
}

/// The largest char boundary of `text` at or before `at`.
fn floor_char_boundary(text: &str, at: usize) -> usize {
    (0..=at.min(text.len()))
        .rev()
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(0)
}

/// `depth` values, each wrapped in the next by `wrap`, around `inner`:
/// built without recursion, for the tests of nesting far deeper than the
/// JSON parser allows. Drop it with [`dismantle`].
pub fn nested(depth: usize, inner: Value, wrap: impl Fn(Value) -> Value) -> Value {
    (0..depth).fold(inner, |value, _| wrap(value))
}

/// `{key: value}`, moving `value` in (`json!` would copy it, by recursion).
pub fn member(key: &str, value: Value) -> Value {
    Value::Object(Map::from_iter([(key.to_string(), value)]))
}

/// `[value]`, moving `value` in.
pub fn array(value: Value) -> Value {
    Value::Array(vec![value])
}

/// Drops a value without recursion: dropping a value nested thousands deep
/// the ordinary way would overflow the test's stack.
pub fn dismantle(value: Value) {
    let mut stack = vec![value];
    while let Some(mut value) = stack.pop() {
        match &mut value {
            Value::Array(items) => stack.append(items),
            Value::Object(members) => {
                stack.extend(std::mem::take(members).into_iter().map(|(_, v)| v));
            }
            _ => {}
        }
    }
}

/// How many times `needle` occurs in `haystack`.
pub fn count(haystack: &[u8], needle: u8) -> usize {
    haystack.iter().filter(|b| **b == needle).count()
}
