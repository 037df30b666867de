//! `on_change` documents: which changes call which API.
//!
//! An `on_change` document in the spiegel database says "when a document
//! changes in a database whose name matches `db_name`, and the document
//! matches `if` and `selector`, send this request". This module turns such a
//! document into an [`OnChangeRule`]: everything is validated once, when the
//! document is read, so that a mistake is reported against the document
//! instead of failing at every change; regular expressions are compiled once.
//! The request is kept as data ([`RequestSpec`]): filling in `$db_name`,
//! `$change`... and sending it is the job of the delivery.
//!
//! # Matching
//!
//! A rule applies to a change when its `db_name` matches the database name
//! and the changed document satisfies both `if` and `selector` (each one holds
//! when it is absent).
//!
//! - **`db_name`** (required) is a regular expression, tested against the
//!   (decoded) database name without anchoring, like JavaScript's
//!   `RegExp.test`: `user_` matches `user_1` and `my_user_1`; write
//!   `^user_` to match only names that start with it. Regular expressions
//!   use the Rust `regex` syntax, which differs little from JavaScript's for
//!   ordinary patterns; lookaround (`(?=`, `(?!`, `(?<=`, `(?<!`) and
//!   backreferences (`\1`) are not supported, and a document using them is
//!   rejected.
//! - **`if`** (optional) is an object whose keys are attribute names and
//!   whose values are regular expressions or `null`; every condition must
//!   hold.
//!   - `null` holds when the attribute is missing or null.
//!   - A regular expression is tested, unanchored, against the attribute's
//!     value turned into text: a string as it is; a number as JavaScript
//!     writes it (`1`, `1.5`, `-3`; a stored `1.0` reads `1`); a boolean as
//!     `true` or `false`; an object or an array as compact JSON
//!     (`{"a":1}`, `["x","y"]`). A missing attribute is tested as the text
//!     `undefined` and a null one as the text `null`, exactly as Spiegel 1.2
//!     did (it handed the value to JavaScript's `RegExp.test`). So a
//!     regular expression that can match those words also matches documents
//!     without the attribute: `.*` matches every document, `e` matches a
//!     document without the attribute (`undefined` contains an `e`), while
//!     `^work$` does not. Anchor your expressions; to require that an
//!     attribute is present, use `selector` with `$exists`.
//!   - A number or a boolean in place of a regular expression is taken as
//!     the regular expression of its text (`true` becomes `true`), as in
//!     Spiegel 1.2.
//!   - An attribute name containing dots is a path into nested objects:
//!     `"address.city": "^Paris$"` tests `doc.address.city`; a numeric
//!     segment indexes an array: `"items.0.sku"` tests the `sku` of the
//!     first item. When the document has a top-level key spelled with the
//!     dots (`"address.city"` itself), that key is used instead of the path,
//!     so Spiegel 1.2 documents keep their meaning.
//! - **`selector`** (optional) is a CouchDB Mango-style selector, of which
//!   this subset is supported:
//!   - `{"field": value}`: the field equals the value (`{"type": "invoice"}`).
//!     Equality is deep for arrays and objects, and numbers are equal by
//!     value (`1` equals `1.0`). An array value means equality with that
//!     array, not membership.
//!   - A field whose value is an object of field names (not operators)
//!     holds conditions on the nested fields:
//!     `{"address": {"city": "Paris"}}` is `{"address.city": "Paris"}`; an
//!     empty object `{}` means equality with `{}`.
//!     Field names are paths: dots separate segments, a numeric segment
//!     indexes an array, and `\.` is a literal dot (as in CouchDB).
//!   - Operators on a field, as in `{"age": {"$gte": 18, "$lt": 65}}` (all
//!     must hold): `$eq`, `$ne`; `$gt`, `$gte`, `$lt`, `$lte`, which compare
//!     numbers numerically and strings by Unicode code point, and are false
//!     when the field and the operand are not both numbers or both strings
//!     (unlike CouchDB, which orders values of different types);
//!     `$in`, `$nin` with an array operand (when the field is an array, `$in`
//!     holds if any of its elements is in the list, `$nin` if none is);
//!     `$exists` with `true` or `false` (a null field exists); `$regex` with
//!     a regular expression, which holds only for string fields.
//!   - `$and` and `$or` take an array of selectors, `$not` a selector; they
//!     may be used at the top level or inside a field
//!     (`{"status": {"$not": {"$eq": "draft"}}}`).
//!   - Every field operator except `$exists: false` is false when the field
//!     is missing, `$ne` and `$nin` included; `$not` inverts its selector,
//!     so `{"status": {"$not": {"$eq": "draft"}}}` holds for a document
//!     without `status`.
//!   - Any other operator (`$elemMatch`, `$size`...) makes the document
//!     invalid, with a message naming it.
//! - **Deleted documents** are matched too: for a deletion the changed
//!   document is CouchDB's stub `{"_id": ..., "_rev": ..., "_deleted": true}`.
//!   A rule with only `db_name` therefore fires for deletions, a rule with
//!   `selector: {"type": "invoice"}` does not, and a rule with
//!   `if: {"type": "^invoice$"}` does not either (the stub has no `type`, and
//!   `undefined` does not match `^invoice$`). To act on deletions only, use
//!   `selector: {"_deleted": true}`.
//!
//! # Other fields
//!
//! `block` (default `true`) and `debounce` (default `false`) must be
//! booleans. `url` (required) and `method` (GET, POST, PUT or DELETE, in any
//! case, default GET), `params` (an object), `headers`, `timeout` and `sign`
//! describe the request, see [`RequestSpec`]; `backoff` overrides the
//! retry options for this rule, see [`BackoffOverride`]. A field that is
//! `null` counts as absent. Unknown top-level fields (Spiegel 1.2's
//! bookkeeping, `_rev`, `type`...) are ignored, but unknown members inside
//! `sign` and `backoff` are errors, since a misspelt option there would
//! otherwise be silently dropped.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::time::Duration;

use regex::Regex;
use serde_json::{Map, Number, Value};

use crate::backoff::{Backoff, Strategy};
use crate::couch::SecretUrl;

/// The signature header when `sign` does not name one.
pub const DEFAULT_SIGN_HEADER: &str = "X-Spiegel-Signature";

/// Upper bound of a per-rule timeout: an API that answers after an hour is
/// better treated as a failure and retried.
const MAX_TIMEOUT_SECS: f64 = 3600.0;
/// The same ranges as the `--backoff-delay` and `--backoff-multiplier`
/// options, so that a rule cannot ask for what the command line refuses.
const MAX_BACKOFF_DELAY_SECS: f64 = 86_400.0 * 365.0;
const MAX_BACKOFF_MULTIPLIER: f64 = 1000.0;

/// Placeholders that may appear in a URL, longest first where one is a
/// prefix of another. They are replaced by [`URL_SAMPLE`] only to check that
/// the URL is well formed once filled in, even when a placeholder stands for
/// (part of) the host name.
const URL_PLACEHOLDERS: [&str; 10] = [
    "${db_name}",
    "${seq}",
    "${change.id}",
    "${change.rev}",
    "${change}",
    "$db_name",
    "$seq",
    "$change.id",
    "$change.rev",
    "$change",
];
const URL_SAMPLE: &str = "sample";

const SIGN_MEMBERS: [&str; 4] = ["secret_env", "secret_host", "secret_user", "header"];
const BACKOFF_MEMBERS: [&str; 4] = ["strategy", "delay", "multiplier", "limit"];

/// Why an `on_change` document cannot be used. One variant per problem, so
/// that the message logged against the document says what to fix.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum OnChangeDocError {
    #[error("no `db_name`: an on_change rule needs a regular expression matching the names of the databases it applies to")]
    MissingDbName,
    #[error("`db_name` must be a string (a regular expression)")]
    DbNameNotString,
    #[error("`{field}` is not a valid regular expression: {reason}")]
    BadRegex { field: String, reason: String },
    #[error("`if` must be an object of attribute names and regular expressions (or null)")]
    IfNotObject,
    #[error("`if.{0}` must be a regular expression string or null")]
    BadIfCondition(String),
    #[error("no `url`: an on_change rule needs the URL of the API to call")]
    MissingUrl,
    #[error("`url` is not a usable http(s) URL: {0}")]
    BadUrl(String),
    #[error("unknown `method` {0}: expected GET, POST, PUT or DELETE")]
    UnknownMethod(String),
    #[error("params must be an object")]
    ParamsNotObject,
    #[error("bad `headers`: {0}")]
    BadHeaders(String),
    #[error("bad `timeout`: must be a number of seconds above 0 and at most 3600")]
    BadTimeout,
    #[error("bad `sign`: {0}")]
    BadSign(String),
    #[error("`{0}` must be true or false")]
    NotABoolean(&'static str),
    #[error("bad `selector`: {0}")]
    BadSelector(String),
    #[error("unknown selector operator `{0}`: supported are $eq, $ne, $gt, $gte, $lt, $lte, $in, $nin, $exists, $regex, $and, $or and $not")]
    UnknownOperator(String),
    #[error("bad `backoff`: {0}")]
    BadBackoff(String),
}

type Result<T, E = OnChangeDocError> = std::result::Result<T, E>;

/// One usable `on_change` document.
#[derive(Debug, Clone)]
pub struct OnChangeRule {
    /// The document's `_id`, to name the rule in logs and metrics.
    pub id: String,
    db_name: Regex,
    conditions: Vec<IfCondition>,
    selector: Option<Selector>,
    pub request: RequestSpec,
    /// Whether the response must arrive before the next change of the same
    /// database is handled.
    pub block: bool,
    /// Whether an identical request (same URL and params) that is already
    /// pending absorbs this one.
    pub debounce: bool,
    /// This rule's retry options, member by member over the global ones.
    pub backoff: Option<BackoffOverride>,
}

/// The request of a rule, validated but not filled in: placeholders stay as
/// the user wrote them, since they depend on each change.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestSpec {
    /// The URL as written; `${db_name}`, `${seq}`, `${change.id}`,
    /// `${change.rev}` (and their `$name` forms) are left in place. Checked
    /// to be an http(s) URL once they are filled in.
    pub url: String,
    pub method: Method,
    /// A JSON object when present; its placeholders are left in place.
    pub params: Option<Value>,
    /// Extra request headers, in the order of the document's `headers`
    /// object as read (names are valid HTTP header names).
    pub headers: Vec<(String, String)>,
    /// How long to wait for the response before counting a failure; `None`
    /// for the delivery's default.
    pub timeout: Option<Duration>,
    /// How to sign the request body, if at all.
    pub sign: Option<SignSpec>,
}

/// The HTTP method of a rule (the delivery's own type: one definition).
pub use crate::delivery::Method;

/// How a rule's requests are signed: the secret, and the header that carries
/// the signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignSpec {
    pub secret: SecretSource,
    pub header: String,
}

/// Where a signing secret comes from. Never the document itself: the spiegel
/// database is readable by more people than should hold the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// `"sign": {"secret_env": "NAME"}`: the environment variable `NAME` of
    /// the Spiegel process.
    Env(String),
    /// `"sign": {"secret_host": "...", "secret_user": "..."}`: that user's
    /// password for that host in the passwords file.
    Passwords { host: String, user: String },
}

/// A rule's own retry options (`"backoff": {...}`); a member left out keeps
/// the value of the corresponding `--backoff-*` option.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BackoffOverride {
    /// `"linear"` or `"exponential"`, in any case in the document.
    pub strategy: Option<Strategy>,
    /// Seconds before the first retry, 0 to one year.
    pub delay: Option<f64>,
    /// Factor between waits with the exponential strategy, above 0 and at
    /// most 1000.
    pub multiplier: Option<f64>,
    /// Retries after the first attempt; 0 retries forever.
    pub limit: Option<u32>,
}

impl OnChangeRule {
    /// Validates an `on_change` document. `id` is the document's `_id`.
    pub fn parse(id: &str, doc: &Value) -> Result<Self> {
        let db_name = match present(doc, "db_name") {
            None => return Err(OnChangeDocError::MissingDbName),
            Some(Value::String(pattern)) => compile(pattern, "db_name")?,
            Some(_) => return Err(OnChangeDocError::DbNameNotString),
        };
        let conditions = match present(doc, "if") {
            None => Vec::new(),
            Some(Value::Object(attrs)) => attrs
                .iter()
                .map(|(name, test)| IfCondition::parse(name, test))
                .collect::<Result<_>>()?,
            Some(_) => return Err(OnChangeDocError::IfNotObject),
        };
        let selector = present(doc, "selector").map(parse_selector).transpose()?;
        Ok(OnChangeRule {
            id: id.to_string(),
            db_name,
            conditions,
            selector,
            request: RequestSpec::parse(doc)?,
            block: flag(doc, "block", true)?,
            debounce: flag(doc, "debounce", false)?,
            backoff: present(doc, "backoff")
                .map(BackoffOverride::parse)
                .transpose()?,
        })
    }

    /// Whether the rule applies to the database of this (decoded) name.
    pub fn applies_to_db(&self, db_name: &str) -> bool {
        self.db_name.is_match(db_name)
    }

    /// Whether a changed document (or a deletion stub) satisfies `if` and
    /// `selector`.
    pub fn matches(&self, doc: &Value) -> bool {
        self.conditions.iter().all(|c| c.holds(doc))
            && self.selector.as_ref().is_none_or(|s| s.holds(doc))
    }
}

/// A member of the document, `null` counting as absent (Spiegel 1.2 treated
/// both as "not given").
fn present<'a>(doc: &'a Value, field: &str) -> Option<&'a Value> {
    doc.get(field).filter(|v| !v.is_null())
}

fn flag(doc: &Value, field: &'static str, default: bool) -> Result<bool> {
    match present(doc, field) {
        None => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(OnChangeDocError::NotABoolean(field)),
    }
}

fn compile(pattern: &str, field: impl Into<String>) -> Result<Regex> {
    Regex::new(pattern).map_err(|e| OnChangeDocError::BadRegex {
        field: field.into(),
        reason: e.to_string(),
    })
}

/// One step of a path into a document: an object key, which is also an
/// array index when it is all digits. The index is worked out once, when
/// the rule is read.
#[derive(Debug, Clone)]
struct Segment {
    key: String,
    index: Option<usize>,
}

impl Segment {
    fn new(key: String) -> Self {
        let index = if !key.is_empty() && key.bytes().all(|b| b.is_ascii_digit()) {
            key.parse().ok()
        } else {
            None
        };
        Segment { key, index }
    }
}

/// The value at `path` in `doc`, or `None` when some step is missing.
fn lookup<'a>(doc: &'a Value, path: &[Segment]) -> Option<&'a Value> {
    path.iter().try_fold(doc, |value, segment| match value {
        Value::Object(members) => members.get(&segment.key),
        Value::Array(items) => segment.index.and_then(|i| items.get(i)),
        _ => None,
    })
}

/// One entry of `if`.
#[derive(Debug, Clone)]
struct IfCondition {
    /// The attribute name as written, looked up literally first.
    name: String,
    /// The name split on dots, when it has any.
    path: Option<Vec<Segment>>,
    test: IfTest,
}

#[derive(Debug, Clone)]
enum IfTest {
    Regex(Regex),
    MissingOrNull,
}

impl IfCondition {
    fn parse(name: &str, test: &Value) -> Result<Self> {
        let field = format!("if.{name}");
        let test = match test {
            Value::Null => IfTest::MissingOrNull,
            Value::String(pattern) => IfTest::Regex(compile(pattern, field)?),
            // Spiegel 1.2 passed these to `new RegExp`, which reads their text.
            Value::Number(n) => IfTest::Regex(compile(&number_text(n), field)?),
            Value::Bool(b) => IfTest::Regex(compile(&b.to_string(), field)?),
            Value::Array(_) | Value::Object(_) => {
                return Err(OnChangeDocError::BadIfCondition(name.to_string()))
            }
        };
        let path = name.contains('.').then(|| {
            name.split('.')
                .map(|s| Segment::new(s.to_string()))
                .collect()
        });
        Ok(IfCondition {
            name: name.to_string(),
            path,
            test,
        })
    }

    fn holds(&self, doc: &Value) -> bool {
        let value = doc
            .get(&self.name)
            .or_else(|| self.path.as_deref().and_then(|path| lookup(doc, path)));
        match &self.test {
            IfTest::MissingOrNull => value.is_none_or(Value::is_null),
            IfTest::Regex(re) => re.is_match(&if_text(value)),
        }
    }
}

/// The text an `if` regular expression is tested against. Missing and null
/// read `undefined` and `null`, as JavaScript's `RegExp.test` in Spiegel 1.2
/// made of them.
fn if_text(value: Option<&Value>) -> Cow<'_, str> {
    match value {
        None => Cow::Borrowed("undefined"),
        Some(Value::Null) => Cow::Borrowed("null"),
        Some(Value::String(s)) => Cow::Borrowed(s),
        Some(Value::Bool(true)) => Cow::Borrowed("true"),
        Some(Value::Bool(false)) => Cow::Borrowed("false"),
        Some(Value::Number(n)) => Cow::Owned(number_text(n)),
        Some(other) => Cow::Owned(other.to_string()),
    }
}

/// A number as JavaScript writes it for ordinary values: integers without a
/// fraction, even when stored as `1.0` (as a Python client writes them), so
/// that `^1$` means the same as in Spiegel 1.2.
fn number_text(n: &Number) -> String {
    match n.as_f64() {
        Some(f) if n.is_f64() && f == 0.0 => "0".to_string(),
        Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() < 1e21 => format!("{f}"),
        _ => n.to_string(),
    }
}

/// A compiled selector. Field paths are split and regular expressions
/// compiled when the rule is read, so evaluation only walks the document.
#[derive(Debug, Clone)]
enum Selector {
    All(Vec<Selector>),
    Any(Vec<Selector>),
    Not(Box<Selector>),
    Field { path: Vec<Segment>, test: FieldTest },
}

#[derive(Debug, Clone)]
enum FieldTest {
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
    fn holds(&self, doc: &Value) -> bool {
        match self {
            Selector::All(parts) => parts.iter().all(|p| p.holds(doc)),
            Selector::Any(parts) => parts.iter().any(|p| p.holds(doc)),
            Selector::Not(inner) => !inner.holds(doc),
            Selector::Field { path, test } => test.holds(lookup(doc, path)),
        }
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

fn parse_selector(value: &Value) -> Result<Selector> {
    match value {
        Value::Object(members) => parse_members(&[], members),
        _ => Err(OnChangeDocError::BadSelector(
            "must be an object, such as {\"type\": \"invoice\"}".to_string(),
        )),
    }
}

/// The members of a selector object found at `path` (empty at the top
/// level): operators apply to `path`, other names extend it. All members
/// must hold.
fn parse_members(path: &[Segment], members: &Map<String, Value>) -> Result<Selector> {
    let mut parts = members
        .iter()
        .map(|(name, value)| {
            if name.starts_with('$') {
                parse_operator(path, name, value)
            } else {
                let mut nested = path.to_vec();
                nested.extend(field_segments(name));
                parse_field(nested, value)
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
fn parse_field(path: Vec<Segment>, value: &Value) -> Result<Selector> {
    match value {
        Value::Object(members) if !members.is_empty() => parse_members(&path, members),
        other => Ok(Selector::Field {
            path,
            test: FieldTest::Eq(other.clone()),
        }),
    }
}

fn parse_operator(path: &[Segment], operator: &str, operand: &Value) -> Result<Selector> {
    let at = path_text(path);
    let field_test = |test: FieldTest| {
        if path.is_empty() {
            Err(OnChangeDocError::BadSelector(format!(
                "`{operator}` needs a field, as in {{\"field\": {{\"{operator}\": ...}}}}"
            )))
        } else {
            Ok(Selector::Field {
                path: path.to_vec(),
                test,
            })
        }
    };
    let list = || match operand {
        Value::Array(items) => Ok(items.clone()),
        _ => Err(OnChangeDocError::BadSelector(format!(
            "`{operator}` on `{at}` needs an array"
        ))),
    };
    match operator {
        "$and" | "$or" => {
            let Value::Array(items) = operand else {
                return Err(OnChangeDocError::BadSelector(format!(
                    "`{operator}` needs an array of selectors"
                )));
            };
            let parts = items
                .iter()
                .map(|item| match item {
                    Value::Object(members) => parse_members(path, members),
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
        "$not" => match operand {
            Value::Object(members) => Ok(Selector::Not(Box::new(parse_members(path, members)?))),
            _ => Err(OnChangeDocError::BadSelector(
                "`$not` needs a selector (an object)".to_string(),
            )),
        },
        "$eq" => field_test(FieldTest::Eq(operand.clone())),
        "$ne" => field_test(FieldTest::Ne(operand.clone())),
        "$gt" => field_test(FieldTest::Gt(operand.clone())),
        "$gte" => field_test(FieldTest::Gte(operand.clone())),
        "$lt" => field_test(FieldTest::Lt(operand.clone())),
        "$lte" => field_test(FieldTest::Lte(operand.clone())),
        "$in" => field_test(FieldTest::In(list()?)),
        "$nin" => field_test(FieldTest::Nin(list()?)),
        "$exists" => match operand {
            Value::Bool(wanted) => field_test(FieldTest::Exists(*wanted)),
            _ => Err(OnChangeDocError::BadSelector(format!(
                "`$exists` on `{at}` needs true or false"
            ))),
        },
        "$regex" => match operand {
            Value::String(pattern) => field_test(FieldTest::Regex(compile(
                pattern,
                format!("selector.{at}.$regex"),
            )?)),
            _ => Err(OnChangeDocError::BadSelector(format!(
                "`$regex` on `{at}` needs a regular expression string"
            ))),
        },
        _ => Err(OnChangeDocError::UnknownOperator(operator.to_string())),
    }
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

/// A path for error messages.
fn path_text(path: &[Segment]) -> String {
    path.iter()
        .map(|s| s.key.as_str())
        .collect::<Vec<_>>()
        .join(".")
}

impl RequestSpec {
    fn parse(doc: &Value) -> Result<Self> {
        let url = match present(doc, "url") {
            None => return Err(OnChangeDocError::MissingUrl),
            Some(Value::String(url)) => url,
            Some(_) => return Err(OnChangeDocError::BadUrl("must be a string".to_string())),
        };
        let sample = URL_PLACEHOLDERS
            .iter()
            .fold(url.clone(), |text, placeholder| {
                text.replace(placeholder, URL_SAMPLE)
            });
        // The error never repeats the URL, which may hold a password.
        SecretUrl::parse(&sample).map_err(|e| OnChangeDocError::BadUrl(e.to_string()))?;

        let method = match present(doc, "method") {
            None => Method::Get,
            Some(Value::String(name)) => Method::from_name(name)
                .ok_or_else(|| OnChangeDocError::UnknownMethod(format!("{name:?}")))?,
            Some(other) => return Err(OnChangeDocError::UnknownMethod(other.to_string())),
        };
        let params = match present(doc, "params") {
            None => None,
            Some(params @ Value::Object(_)) => Some(params.clone()),
            Some(_) => return Err(OnChangeDocError::ParamsNotObject),
        };
        let timeout = match present(doc, "timeout") {
            None => None,
            Some(secs) => Some(parse_timeout(secs)?),
        };
        Ok(RequestSpec {
            url: url.clone(),
            method,
            params,
            headers: present(doc, "headers").map_or(Ok(Vec::new()), parse_headers)?,
            timeout,
            sign: present(doc, "sign").map(SignSpec::parse).transpose()?,
        })
    }
}

fn parse_timeout(secs: &Value) -> Result<Duration> {
    secs.as_f64()
        .filter(|s| s.is_finite() && *s > 0.0 && *s <= MAX_TIMEOUT_SECS)
        .map(Duration::from_secs_f64)
        .ok_or(OnChangeDocError::BadTimeout)
}

fn parse_headers(headers: &Value) -> Result<Vec<(String, String)>> {
    let Value::Object(headers) = headers else {
        return Err(OnChangeDocError::BadHeaders(
            "must be an object of header names and string values".to_string(),
        ));
    };
    headers
        .iter()
        .map(|(name, value)| {
            if !is_header_name(name) {
                return Err(OnChangeDocError::BadHeaders(format!(
                    "{name:?} is not a valid header name"
                )));
            }
            match value {
                Value::String(text) if is_header_value(text) => Ok((name.clone(), text.clone())),
                Value::String(_) => Err(OnChangeDocError::BadHeaders(format!(
                    "the value of {name:?} contains a control character"
                ))),
                _ => Err(OnChangeDocError::BadHeaders(format!(
                    "the value of {name:?} must be a string"
                ))),
            }
        })
        .collect()
}

/// An HTTP field name: one or more `tchar`s (RFC 9110, section 5.6.2).
/// Checked here so that a bad name is reported against the document, not
/// at every delivery.
fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// An HTTP field value as the HTTP client accepts it: no control characters
/// but tab (a CR or LF would let a document inject headers).
fn is_header_value(value: &str) -> bool {
    value
        .bytes()
        .all(|b| (b >= 0x20 && b != 0x7f) || b == b'\t')
}

/// Members of an object that are not in `known`, for `sign` and `backoff`.
fn unknown_member<'a>(members: &'a Map<String, Value>, known: &[&str]) -> Option<&'a str> {
    members
        .keys()
        .map(String::as_str)
        .find(|k| !known.contains(k))
}

/// A non-empty string member, `Ok(None)` when absent or null.
fn string_member<'a>(
    members: &'a Map<String, Value>,
    name: &str,
    error: impl Fn(String) -> OnChangeDocError,
) -> Result<Option<&'a str>> {
    match members.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.is_empty() => Ok(Some(s)),
        Some(_) => Err(error(format!("`{name}` must be a non-empty string"))),
    }
}

impl SignSpec {
    fn parse(sign: &Value) -> Result<Self> {
        let bad = OnChangeDocError::BadSign;
        let Value::Object(members) = sign else {
            return Err(bad(
                "must be an object with `secret_env`, or `secret_host` and `secret_user`"
                    .to_string(),
            ));
        };
        if let Some(name) = unknown_member(members, &SIGN_MEMBERS) {
            return Err(bad(format!("unknown member `{name}`")));
        }
        let env = string_member(members, "secret_env", bad)?;
        let host = string_member(members, "secret_host", bad)?;
        let user = string_member(members, "secret_user", bad)?;
        let secret = match (env, host, user) {
            (Some(name), None, None) => SecretSource::Env(name.to_string()),
            (None, Some(host), Some(user)) => SecretSource::Passwords {
                host: host.to_string(),
                user: user.to_string(),
            },
            (Some(_), _, _) => {
                return Err(bad(
                    "give either `secret_env` or `secret_host` and `secret_user`, not both"
                        .to_string(),
                ))
            }
            (None, None, None) => {
                return Err(bad(
                    "no secret: give `secret_env`, or `secret_host` and `secret_user`".to_string(),
                ))
            }
            (None, _, _) => {
                return Err(bad(
                    "`secret_host` and `secret_user` go together".to_string()
                ))
            }
        };
        let header = match string_member(members, "header", bad)? {
            None => DEFAULT_SIGN_HEADER.to_string(),
            Some(name) if is_header_name(name) => name.to_string(),
            Some(name) => return Err(bad(format!("{name:?} is not a valid header name"))),
        };
        Ok(SignSpec { secret, header })
    }
}

impl BackoffOverride {
    fn parse(backoff: &Value) -> Result<Self> {
        let bad = OnChangeDocError::BadBackoff;
        let Value::Object(members) = backoff else {
            return Err(bad(
                "must be an object with `strategy`, `delay`, `multiplier` and/or `limit`"
                    .to_string(),
            ));
        };
        if let Some(name) = unknown_member(members, &BACKOFF_MEMBERS) {
            return Err(bad(format!("unknown member `{name}`")));
        }
        let number = |name: &str| match members.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
            Some(_) => Err(bad(format!("`{name}` must be a number"))),
        };
        let strategy = match string_member(members, "strategy", bad)? {
            None => None,
            Some(s) => match s.to_ascii_lowercase().as_str() {
                "linear" => Some(Strategy::Linear),
                "exponential" => Some(Strategy::Exponential),
                _ => {
                    return Err(bad(format!(
                        "unknown `strategy` {s:?}: expected linear or exponential"
                    )))
                }
            },
        };
        let delay = number("delay")?;
        if delay.is_some_and(|d| !(0.0..=MAX_BACKOFF_DELAY_SECS).contains(&d)) {
            return Err(bad(
                "`delay` must be from 0 to one year of seconds".to_string()
            ));
        }
        let multiplier = number("multiplier")?;
        if multiplier.is_some_and(|m| !(m > 0.0 && m <= MAX_BACKOFF_MULTIPLIER)) {
            return Err(bad(
                "`multiplier` must be above 0 and at most 1000".to_string()
            ));
        }
        let limit = match number("limit")? {
            None => None,
            Some(l) if l.fract() == 0.0 && (0.0..=f64::from(u32::MAX)).contains(&l) => {
                // In range and whole, so the conversion is exact.
                Some(l as u32)
            }
            Some(_) => {
                return Err(bad(
                    "`limit` must be a whole number of retries (0 retries forever)".to_string(),
                ))
            }
        };
        Ok(BackoffOverride {
            strategy,
            delay,
            multiplier,
            limit,
        })
    }

    /// `base` with the fields this rule sets replaced.
    pub fn apply(&self, base: Backoff) -> Backoff {
        Backoff {
            strategy: self.strategy.unwrap_or(base.strategy),
            delay: self.delay.map_or(base.delay, Duration::from_secs_f64),
            multiplier: self.multiplier.unwrap_or(base.multiplier),
            limit: self.limit.unwrap_or(base.limit),
            ..base
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A minimal valid document with `extra` members merged in.
    fn doc(extra: Value) -> Value {
        let mut doc = json!({
            "type": "on_change",
            "db_name": "^user_",
            "url": "https://api.example.com/hook",
        });
        if let (Value::Object(base), Value::Object(extra)) = (&mut doc, extra) {
            base.extend(extra);
        }
        doc
    }

    fn rule(extra: Value) -> OnChangeRule {
        OnChangeRule::parse("rule", &doc(extra)).unwrap()
    }

    fn error(extra: Value) -> OnChangeDocError {
        OnChangeRule::parse("rule", &doc(extra)).unwrap_err()
    }

    fn with_selector(selector: Value) -> OnChangeRule {
        rule(json!({ "selector": selector }))
    }

    fn with_if(conditions: Value) -> OnChangeRule {
        rule(json!({ "if": conditions }))
    }

    #[test]
    fn a_spiegel_1_2_document_parses_and_matches() {
        let doc = json!({
            "_id": "notify",
            "_rev": "3-abc",
            "type": "on_change",
            "db_name": "^user_",
            "if": {"type": "^work$", "priority": "medium|high", "archived": null},
            "url": "https://apiuser@api.example.com/mon_${db_name}/${seq}",
            "params": {"db": "$db_name", "change": "$change", "id": "$change.id"},
            "method": "post",
            "block": false,
            "debounce": true,
            "dirty": false,
            "locked_at": null,
            "updated_at": "2018-01-01T00:00:00.000Z"
        });
        let rule = OnChangeRule::parse("notify", &doc).unwrap();
        assert_eq!(rule.id, "notify");
        assert_eq!(
            rule.request.url,
            "https://apiuser@api.example.com/mon_${db_name}/${seq}"
        );
        assert_eq!(rule.request.method, Method::Post);
        assert_eq!(
            rule.request.params,
            Some(json!({"db": "$db_name", "change": "$change", "id": "$change.id"}))
        );
        assert!(!rule.block);
        assert!(rule.debounce);
        assert_eq!(rule.backoff, None);
        assert!(rule.applies_to_db("user_1"));
        assert!(!rule.applies_to_db("admin"));
        assert!(rule.matches(&json!({"_id": "a", "type": "work", "priority": "high"})));
        assert!(rule.matches(&json!({"type": "work", "priority": "medium", "archived": null})));
        assert!(!rule.matches(&json!({"type": "work", "priority": "low"})));
        assert!(!rule.matches(&json!({"type": "work", "priority": "high", "archived": true})));
        assert!(!rule.matches(&json!({"type": "homework", "priority": "high"})));
    }

    #[test]
    fn defaults_are_get_blocking_without_debounce_or_extras() {
        let rule = rule(json!({}));
        assert_eq!(rule.request.method, Method::Get);
        assert!(rule.block);
        assert!(!rule.debounce);
        assert_eq!(rule.request.params, None);
        assert!(rule.request.headers.is_empty());
        assert_eq!(rule.request.timeout, None);
        assert_eq!(rule.request.sign, None);
        assert_eq!(rule.backoff, None);
        assert!(rule.matches(&json!({"anything": 1})));
    }

    #[test]
    fn null_fields_count_as_absent() {
        let rule = rule(json!({"method": null, "params": null, "block": null, "if": null}));
        assert_eq!(rule.request.method, Method::Get);
        assert!(rule.block);
        assert_eq!(rule.request.params, None);
    }

    #[test]
    fn method_is_case_insensitive() {
        for (written, method) in [
            ("get", Method::Get),
            ("Post", Method::Post),
            ("PUT", Method::Put),
            ("delete", Method::Delete),
        ] {
            assert_eq!(rule(json!({"method": written})).request.method, method);
        }
        assert_eq!(Method::Delete.as_str(), "DELETE");
    }

    #[test]
    fn db_name_is_an_unanchored_regex() {
        let rule = rule(json!({"db_name": "user"}));
        assert!(rule.applies_to_db("user_1"));
        assert!(rule.applies_to_db("my_user/with+slash"));
        assert!(!rule.applies_to_db("admin"));
    }

    #[test]
    fn missing_db_name_is_an_error() {
        let mut doc = doc(json!({}));
        doc.as_object_mut().unwrap().remove("db_name");
        assert_eq!(
            OnChangeRule::parse("r", &doc).unwrap_err(),
            OnChangeDocError::MissingDbName
        );
    }

    #[test]
    fn db_name_that_is_not_a_string_is_an_error() {
        assert_eq!(
            error(json!({"db_name": 3})),
            OnChangeDocError::DbNameNotString
        );
    }

    #[test]
    fn bad_regexes_name_their_field() {
        let field = |extra: Value| match error(extra) {
            OnChangeDocError::BadRegex { field, .. } => field,
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!(field(json!({"db_name": "("})), "db_name");
        assert_eq!(field(json!({"if": {"type": "[a"}})), "if.type");
        // Lookaround is not in Rust's regex syntax.
        assert_eq!(field(json!({"db_name": "^(?!admin)"})), "db_name");
        assert_eq!(
            field(json!({"selector": {"name": {"$regex": "("}}})),
            "selector.name.$regex"
        );
    }

    #[test]
    fn if_must_be_an_object_of_regexes_or_null() {
        assert_eq!(error(json!({"if": "type"})), OnChangeDocError::IfNotObject);
        assert_eq!(
            error(json!({"if": {"tags": ["a"]}})),
            OnChangeDocError::BadIfCondition("tags".to_string())
        );
    }

    #[test]
    fn missing_or_non_string_url_is_an_error() {
        let mut doc = doc(json!({}));
        doc.as_object_mut().unwrap().remove("url");
        assert_eq!(
            OnChangeRule::parse("r", &doc).unwrap_err(),
            OnChangeDocError::MissingUrl
        );
        assert!(matches!(
            error(json!({"url": 42})),
            OnChangeDocError::BadUrl(_)
        ));
    }

    #[test]
    fn url_must_be_http_once_placeholders_are_filled() {
        for bad in ["ftp://example.com/x", "not a url", "https://"] {
            assert!(
                matches!(error(json!({ "url": bad })), OnChangeDocError::BadUrl(_)),
                "{bad}"
            );
        }
        // A placeholder may stand for part of the host name.
        let rule = rule(json!({"url": "http://${db_name}.example.com/$db_name/${change.id}"}));
        assert_eq!(
            rule.request.url,
            "http://${db_name}.example.com/$db_name/${change.id}"
        );
    }

    #[test]
    fn bad_url_error_does_not_repeat_a_password() {
        let message = error(json!({"url": "ftp://user:hunter2@example.com"})).to_string();
        assert!(!message.contains("hunter2"), "{message}");
    }

    #[test]
    fn unknown_method_is_an_error() {
        assert_eq!(
            error(json!({"method": "patch"})),
            OnChangeDocError::UnknownMethod("\"patch\"".to_string())
        );
        assert!(matches!(
            error(json!({"method": 1})),
            OnChangeDocError::UnknownMethod(_)
        ));
    }

    #[test]
    fn params_must_be_an_object() {
        let err = error(json!({"params": "$change"}));
        assert_eq!(err, OnChangeDocError::ParamsNotObject);
        assert_eq!(err.to_string(), "params must be an object");
    }

    #[test]
    fn headers_are_validated_and_kept() {
        let rule = rule(json!({"headers": {"Authorization": "Bearer x", "X-Tenant": "t1"}}));
        assert_eq!(
            rule.request.headers,
            vec![
                ("Authorization".to_string(), "Bearer x".to_string()),
                ("X-Tenant".to_string(), "t1".to_string()),
            ]
        );
        for bad in [
            json!("Authorization: x"),
            json!({"Bad Name": "x"}),
            json!({"": "x"}),
            json!({"X-Num": 1}),
            json!({"X-Injected": "a\r\nHost: evil"}),
        ] {
            assert!(
                matches!(
                    error(json!({ "headers": bad })),
                    OnChangeDocError::BadHeaders(_)
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn timeout_is_seconds_with_fractions_up_to_an_hour() {
        assert_eq!(
            rule(json!({"timeout": 2.5})).request.timeout,
            Some(Duration::from_millis(2500))
        );
        assert_eq!(
            rule(json!({"timeout": 3600})).request.timeout,
            Some(Duration::from_secs(3600))
        );
        for bad in [json!(0), json!(-1), json!(3601), json!("10")] {
            assert_eq!(
                error(json!({ "timeout": bad })),
                OnChangeDocError::BadTimeout
            );
        }
    }

    #[test]
    fn sign_takes_a_secret_from_env_or_passwords_file() {
        let sign = rule(json!({"sign": {"secret_env": "HOOK_SECRET"}}))
            .request
            .sign
            .unwrap();
        assert_eq!(sign.secret, SecretSource::Env("HOOK_SECRET".to_string()));
        assert_eq!(sign.header, DEFAULT_SIGN_HEADER);

        let sign = rule(json!({"sign": {
            "secret_host": "api.example.com",
            "secret_user": "hook",
            "header": "X-Hub-Signature-256"
        }}))
        .request
        .sign
        .unwrap();
        assert_eq!(
            sign.secret,
            SecretSource::Passwords {
                host: "api.example.com".to_string(),
                user: "hook".to_string()
            }
        );
        assert_eq!(sign.header, "X-Hub-Signature-256");
    }

    #[test]
    fn bad_sign_is_an_error() {
        for bad in [
            json!("HOOK_SECRET"),
            json!({}),
            json!({"secret_env": ""}),
            json!({"secret_env": "A", "secret_host": "h", "secret_user": "u"}),
            json!({"secret_host": "h"}),
            json!({"secret_env": "A", "header": "Bad Header"}),
            json!({"secret": "inline"}),
        ] {
            assert!(
                matches!(error(json!({ "sign": bad })), OnChangeDocError::BadSign(_)),
                "{bad}"
            );
        }
    }

    #[test]
    fn block_and_debounce_must_be_booleans() {
        assert_eq!(
            error(json!({"block": "false"})),
            OnChangeDocError::NotABoolean("block")
        );
        assert_eq!(
            error(json!({"debounce": 1})),
            OnChangeDocError::NotABoolean("debounce")
        );
    }

    #[test]
    fn backoff_override_parses_each_member() {
        let backoff = rule(json!({"backoff": {
            "strategy": "Exponential", "delay": 0.5, "multiplier": 3, "limit": 10
        }}))
        .backoff
        .unwrap();
        assert_eq!(
            backoff,
            BackoffOverride {
                strategy: Some(Strategy::Exponential),
                delay: Some(0.5),
                multiplier: Some(3.0),
                limit: Some(10),
            }
        );
        let partial = rule(json!({"backoff": {"limit": 0}})).backoff.unwrap();
        assert_eq!(
            partial,
            BackoffOverride {
                limit: Some(0),
                ..BackoffOverride::default()
            }
        );
    }

    #[test]
    fn bad_backoff_is_an_error() {
        for bad in [
            json!(5),
            json!({"strategy": "fibonacci"}),
            json!({"delay": -1}),
            json!({"delay": "5"}),
            json!({"multiplier": 0}),
            json!({"limit": -1}),
            json!({"limit": 1.5}),
            json!({"delays": 5}),
        ] {
            assert!(
                matches!(
                    error(json!({ "backoff": bad })),
                    OnChangeDocError::BadBackoff(_)
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn if_null_means_missing_or_null() {
        let rule = with_if(json!({"archived": null}));
        assert!(rule.matches(&json!({})));
        assert!(rule.matches(&json!({"archived": null})));
        assert!(!rule.matches(&json!({"archived": false})));
        assert!(!rule.matches(&json!({"archived": ""})));
    }

    #[test]
    fn if_regex_tests_missing_as_undefined_and_null_as_null_like_spiegel_1_2() {
        let anything = with_if(json!({"type": ".*"}));
        assert!(anything.matches(&json!({})));
        assert!(anything.matches(&json!({"type": null})));

        let contains_e = with_if(json!({"type": "e"}));
        assert!(contains_e.matches(&json!({})), "`undefined` contains an e");

        let anchored = with_if(json!({"type": "^work$"}));
        assert!(!anchored.matches(&json!({})));
        assert!(!anchored.matches(&json!({"type": null})));

        assert!(with_if(json!({"type": "^null$"})).matches(&json!({"type": null})));
        assert!(with_if(json!({"type": "^undefined$"})).matches(&json!({})));
    }

    #[test]
    fn if_turns_numbers_booleans_objects_and_arrays_into_text() {
        assert!(with_if(json!({"n": "^1$"})).matches(&json!({"n": 1})));
        assert!(with_if(json!({"n": "^1$"})).matches(&json!({"n": 1.0})));
        assert!(with_if(json!({"n": "^1\\.5$"})).matches(&json!({"n": 1.5})));
        assert!(with_if(json!({"n": "^-3$"})).matches(&json!({"n": -3})));
        assert!(with_if(json!({"n": "^0$"})).matches(&json!({"n": -0.0})));
        assert!(with_if(json!({"done": "^true$"})).matches(&json!({"done": true})));
        assert!(!with_if(json!({"done": "^true$"})).matches(&json!({"done": false})));
        assert!(with_if(json!({"a": "^\\{\"b\":1\\}$"})).matches(&json!({"a": {"b": 1}})));
        assert!(
            with_if(json!({"tags": "^\\[\"x\",\"y\"\\]$"})).matches(&json!({"tags": ["x", "y"]}))
        );
    }

    #[test]
    fn if_accepts_numbers_and_booleans_as_regexes_of_their_text() {
        let done = with_if(json!({"done": true}));
        assert!(done.matches(&json!({"done": true})));
        assert!(!done.matches(&json!({"done": false})));
        let count = with_if(json!({"count": 5}));
        assert!(count.matches(&json!({"count": 5})));
        assert!(
            count.matches(&json!({"count": 15})),
            "unanchored, as in 1.2"
        );
    }

    #[test]
    fn if_dotted_names_are_paths_with_array_indexes() {
        let city = with_if(json!({"address.city": "^Paris$"}));
        assert!(city.matches(&json!({"address": {"city": "Paris"}})));
        assert!(!city.matches(&json!({"address": {"city": "Lyon"}})));
        assert!(!city.matches(&json!({"address": "Paris"})));

        let sku = with_if(json!({"items.0.sku": "^A1$"}));
        assert!(sku.matches(&json!({"items": [{"sku": "A1"}, {"sku": "B2"}]})));
        assert!(!sku.matches(&json!({"items": [{"sku": "B2"}, {"sku": "A1"}]})));
        assert!(!sku.matches(&json!({"items": []})));

        let missing = with_if(json!({"address.zip": null}));
        assert!(missing.matches(&json!({"address": {"city": "Paris"}})));
        assert!(missing.matches(&json!({})));
        assert!(!missing.matches(&json!({"address": {"zip": "75001"}})));
    }

    #[test]
    fn if_literal_dotted_key_takes_precedence_over_the_path() {
        let rule = with_if(json!({"address.city": "^Literal$"}));
        assert!(rule.matches(&json!({
            "address.city": "Literal",
            "address": {"city": "Nested"}
        })));
        assert!(
            !with_if(json!({"address.city": "^Nested$"})).matches(&json!({
                "address.city": "Literal",
                "address": {"city": "Nested"}
            }))
        );
    }

    #[test]
    fn if_conditions_must_all_hold() {
        let rule = with_if(json!({"type": "^work$", "owner": "^bob$"}));
        assert!(rule.matches(&json!({"type": "work", "owner": "bob"})));
        assert!(!rule.matches(&json!({"type": "work", "owner": "alice"})));
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
    fn selector_and_if_must_both_hold() {
        let rule = rule(json!({"if": {"type": "^invoice$"}, "selector": {"total": {"$gt": 100}}}));
        assert!(rule.matches(&json!({"type": "invoice", "total": 200})));
        assert!(!rule.matches(&json!({"type": "invoice", "total": 50})));
        assert!(!rule.matches(&json!({"type": "order", "total": 200})));
    }

    #[test]
    fn unknown_selector_operator_is_named() {
        let err = error(json!({"selector": {"tags": {"$elemMatch": {"$eq": "a"}}}}));
        assert_eq!(
            err,
            OnChangeDocError::UnknownOperator("$elemMatch".to_string())
        );
        assert!(err.to_string().contains("$elemMatch"));
        assert_eq!(
            error(json!({"selector": {"$nor": []}})),
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
                matches!(
                    error(json!({ "selector": bad })),
                    OnChangeDocError::BadSelector(_)
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn deletion_stubs_are_matched_like_any_document() {
        let stub = json!({"_id": "inv-1", "_rev": "2-b", "_deleted": true});
        assert!(rule(json!({})).matches(&stub));
        assert!(!with_if(json!({"type": "^invoice$"})).matches(&stub));
        assert!(!with_selector(json!({"type": "invoice"})).matches(&stub));
        assert!(with_selector(json!({"_deleted": true})).matches(&stub));
        assert!(!with_selector(json!({"_deleted": true})).matches(&json!({"_id": "inv-1"})));
        assert!(with_if(json!({"type": null})).matches(&stub));
    }

    #[test]
    fn errors_have_readable_messages() {
        assert_eq!(
            OnChangeDocError::NotABoolean("block").to_string(),
            "`block` must be true or false"
        );
        assert!(OnChangeDocError::MissingDbName
            .to_string()
            .contains("db_name"));
    }
}
