//! `on_change` documents: which changes call which API.
//!
//! An `on_change` document in the spiegel database says "when a document
//! changes in a database whose name matches `db_name`, and the document
//! matches `if` and `selector`, send this request". This module compiles
//! such a document into an [`OnChangeRule`], once, when the document is
//! read: everything is validated, so that a mistake is reported against the
//! document instead of failing at every change; regular expressions are
//! compiled, and what the document only names (the signing secret, the
//! password of the URL's user, the retry options it leaves out) is looked
//! up. The request stays a [`Template`]: filling in `$db_name`, `$change`...
//! for a change is [`placeholder`]'s, and sending it the delivery's.
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
//! - **`if`** (optional): attribute names and regular expressions (or
//!   `null`), see [`conditions`].
//! - **`selector`** (optional): a CouchDB Mango-style selector (a subset),
//!   see [`selector`].
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
//! booleans. `url`, `method`, `params`, `headers`, `timeout` and `sign`
//! describe the request, see [`Template`]; `backoff` overrides the retry
//! options for this rule, member by member (`strategy`, `delay`,
//! `multiplier`, `limit`). A field that is `null` counts as absent. Unknown
//! top-level fields (Spiegel 1.2's bookkeeping, `_rev`, `type`...) are
//! ignored, but unknown members inside `sign` and `backoff` are errors,
//! since a misspelt option there would otherwise be silently dropped.
//!
//! # Unusable documents
//!
//! A document that does not compile but whose `db_name` does is still
//! loaded, as a rule that sends nothing and holds back the changes it
//! would match ([`OnChangeRule::load`]), so that a broken edit passes no
//! change over; without a usable `db_name` it cannot say which databases
//! it is for, and holds nothing.

pub mod conditions;
mod path;
pub mod placeholder;
pub mod selector;
pub mod template;

use std::time::Duration;

use regex::Regex;
use serde_json::{Map, Value};

use self::conditions::Conditions;
pub use self::placeholder::ChangeContext;
use self::selector::Selector;
use self::template::SignSpec;
pub use self::template::{Method, Signing, Template};
use crate::backoff::{Backoff, Strategy};
use crate::config::Passwords;
#[cfg(doc)]
use crate::rules::MAX_JSON_DEPTH;

/// The same ranges as the `--backoff-delay` and `--backoff-multiplier`
/// options, so that a rule cannot ask for what the command line refuses.
const MAX_BACKOFF_DELAY_SECS: f64 = 86_400.0 * 365.0;
const MAX_BACKOFF_MULTIPLIER: f64 = 1000.0;

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
    /// Nested deeper than any document CouchDB stores ([`MAX_JSON_DEPTH`]).
    #[error("`{0}` nests more than 128 arrays and objects, one inside the other")]
    TooDeep(&'static str),
    #[error("unknown selector operator `{0}`: supported are $eq, $ne, $gt, $gte, $lt, $lte, $in, $nin, $exists, $regex, $and, $or and $not")]
    UnknownOperator(String),
    #[error("bad `backoff`: {0}")]
    BadBackoff(String),
    #[error("bad `rate_limit`: must be a number of requests per second above 0 and at most 10000")]
    BadRateLimit,
    #[error("bad `batch`: {0}")]
    BadBatch(String),
    /// The document is valid, but the secret its `sign` names is not there.
    #[error("the signing secret is not available: {0}")]
    Secret(String),
}

type Result<T, E = OnChangeDocError> = std::result::Result<T, E>;

/// What on_change documents are compiled against: the passwords file (the
/// password of a `user@host` URL, signing secrets) and the `--backoff-*`
/// options that a rule's `backoff` overrides.
#[derive(Clone, Copy, Debug)]
pub struct Context<'a> {
    pub passwords: &'a Passwords,
    pub backoff: &'a Backoff,
}

/// One usable `on_change` document, compiled.
#[derive(Debug, Clone)]
pub struct OnChangeRule {
    /// The document's `_id`, to name the rule in logs and metrics.
    pub id: String,
    db_name: Regex,
    conditions: Conditions,
    selector: Option<Selector>,
    /// The request to send for each matching change.
    pub request: Template,
    /// Whether the response must arrive before the next change of the same
    /// database is handled.
    pub block: bool,
    /// Whether an identical request (same URL and params) that is already
    /// pending absorbs this one.
    pub debounce: bool,
    /// `rate_limit`: at most this many requests per second, per worker.
    pub rate_limit: Option<f64>,
    /// `batch`: one request carries up to this many changes of a database.
    pub batch: Option<Batch>,
    /// This rule's retry options: its `backoff` member by member over the
    /// global ones, without jitter.
    pub backoff: Backoff,
    /// `"paused": true`: its requests wait, and with them the databases'
    /// checkpoints, until the document is resumed.
    pub paused: bool,
    /// Why the document cannot be used, for a rule made of an unusable
    /// document (see [`OnChangeRule::load`]): it sends nothing and holds
    /// the changes it would match, as a paused rule does.
    pub unusable: Option<OnChangeDocError>,
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
    /// Compiles an `on_change` document. `id` is the document's `_id`. A
    /// document with several problems is reported for the first of:
    /// `db_name`, `if`, `selector`, the request, `block`, `debounce`,
    /// `backoff`, and last a signing secret that is not available.
    pub fn compile(id: &str, doc: &Value, context: &Context) -> Result<Self> {
        let db_name = match present(doc, "db_name") {
            None => return Err(OnChangeDocError::MissingDbName),
            Some(Value::String(pattern)) => regex(pattern, || "db_name".into())?,
            Some(_) => return Err(OnChangeDocError::DbNameNotString),
        };
        let conditions = Conditions::parse(present(doc, "if"))?;
        let selector = present(doc, "selector").map(Selector::parse).transpose()?;
        let request = Template::parse(doc)?;
        let sign = present(doc, "sign").map(SignSpec::parse).transpose()?;
        let block = flag(doc, "block", true)?;
        let debounce = flag(doc, "debounce", false)?;
        let batch = present(doc, "batch").map(Batch::parse).transpose()?;
        if batch.is_some() && !request.method.has_body() {
            return Err(OnChangeDocError::BadBatch(
                "a batch is sent as a JSON array body: use the POST or PUT method".into(),
            ));
        }
        let rate_limit = match present(doc, "rate_limit") {
            None => None,
            Some(v) => match v.as_f64() {
                Some(r) if r > 0.0 && r <= 10_000.0 => Some(r),
                _ => return Err(OnChangeDocError::BadRateLimit),
            },
        };
        let paused = flag(doc, "paused", false)?;
        let backoff = present(doc, "backoff")
            .map(BackoffOverride::parse)
            .transpose()?;
        let base = Backoff {
            jitter: false,
            ..context.backoff.clone()
        };
        Ok(OnChangeRule {
            id: id.to_string(),
            db_name,
            conditions,
            selector,
            request: request.resolve(sign.as_ref(), context.passwords)?,
            block,
            debounce,
            rate_limit,
            batch,
            paused,
            backoff: match backoff {
                Some(o) => o.apply(base),
                None => base,
            },
            unusable: None,
        })
    }

    /// The rule of a document, usable or not. An unusable document whose
    /// `db_name` compiles still holds back the databases it names, so that
    /// an edit that broke it passes no change over: it becomes a rule that
    /// sends nothing and matches the changes its `if` and `selector` say,
    /// or every change when they are what is broken. Err: the document
    /// cannot say which databases it is for; it holds nothing.
    pub fn load(id: &str, doc: &Value, context: &Context) -> Result<Self> {
        Self::compile(id, doc, context).or_else(|error| Self::holding(id, doc, error, context))
    }

    fn holding(id: &str, doc: &Value, error: OnChangeDocError, context: &Context) -> Result<Self> {
        let Some(Ok(db_name)) = present(doc, "db_name")
            .and_then(Value::as_str)
            .map(|pattern| regex(pattern, || "db_name".into()))
        else {
            return Err(error);
        };
        let conditions = Conditions::parse(present(doc, "if"));
        let selector = present(doc, "selector").map(Selector::parse).transpose();
        let (conditions, selector) = match (conditions, selector) {
            (Ok(conditions), Ok(selector)) => (conditions, selector),
            _ => (Conditions::default(), None),
        };
        Ok(OnChangeRule {
            id: id.to_string(),
            db_name,
            conditions,
            selector,
            request: Template::default(),
            block: true,
            debounce: false,
            rate_limit: None,
            batch: None,
            backoff: context.backoff.clone(),
            paused: false,
            unusable: Some(error),
        })
    }

    /// Whether the rule holds back the changes it matches instead of
    /// sending them: it is paused, or unusable.
    pub fn holds(&self) -> bool {
        self.paused || self.unusable.is_some()
    }

    /// Whether the rule applies to the database of this (decoded) name.
    pub fn applies_to_db(&self, db_name: &str) -> bool {
        self.db_name.is_match(db_name)
    }

    /// Whether a changed document (or a deletion stub) satisfies `if` and
    /// `selector`.
    pub fn matches(&self, doc: &Value) -> bool {
        self.conditions.matches(doc) && self.selector.as_ref().is_none_or(|s| s.matches(doc))
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

/// A regular expression of the document; `field` names it in the error
/// (made only then: a selector's path is not copied for every `$regex`).
fn regex(pattern: &str, field: impl FnOnce() -> String) -> Result<Regex> {
    Regex::new(pattern).map_err(|e| OnChangeDocError::BadRegex {
        field: field(),
        reason: e.to_string(),
    })
}

/// The members of an object option (`sign`, `backoff`): `bad(expected)`
/// when it is not an object, and an error naming a member not in `known`.
fn option_members<'a>(
    option: &'a Value,
    known: &[&str],
    bad: fn(String) -> OnChangeDocError,
    expected: &str,
) -> Result<&'a Map<String, Value>> {
    let Value::Object(members) = option else {
        return Err(bad(expected.to_string()));
    };
    match members.keys().find(|k| !known.contains(&k.as_str())) {
        Some(name) => Err(bad(format!("unknown member `{name}`"))),
        None => Ok(members),
    }
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

/// A rule's `batch`: one request carries an ordered array of up to
/// `max_changes` changes of a database, sent when it is full, or
/// `max_wait` after its first change was seen, or at once when that is 0.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Batch {
    pub max_changes: usize,
    pub max_wait: Duration,
}

impl Batch {
    /// Changes one request carries, at most.
    const MAX_CHANGES: u64 = 1000;
    /// How long a batch may wait for more changes, at most, in ms.
    const MAX_WAIT_MS: u64 = 60_000;

    fn parse(batch: &Value) -> Result<Self> {
        let bad = OnChangeDocError::BadBatch;
        let members = option_members(
            batch,
            &["max_changes", "max_wait_ms"],
            bad,
            "must be an object with `max_changes` and an optional `max_wait_ms`",
        )?;
        let whole = |name: &str, max: u64| match members.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n <= max => Ok(Some(n)),
                _ => Err(bad(format!(
                    "`{name}` must be a whole number from 0 to {max}"
                ))),
            },
        };
        let max_changes = match whole("max_changes", Self::MAX_CHANGES)? {
            Some(n) if n > 0 => n as usize,
            _ => return Err(bad("`max_changes` is required, from 1 to 1000".into())),
        };
        let max_wait_ms = whole("max_wait_ms", Self::MAX_WAIT_MS)?.unwrap_or(0);
        Ok(Batch {
            max_changes,
            max_wait: Duration::from_millis(max_wait_ms),
        })
    }
}

impl BackoffOverride {
    fn parse(backoff: &Value) -> Result<Self> {
        let bad = OnChangeDocError::BadBackoff;
        let members = option_members(
            backoff,
            &BACKOFF_MEMBERS,
            bad,
            "must be an object with `strategy`, `delay`, `multiplier` and/or `limit`",
        )?;
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
    use crate::hostile_input;
    use proptest::collection::vec;
    use proptest::prelude::{prop_assert, prop_assert_eq, prop_oneof, proptest, ProptestConfig};
    use proptest::strategy::Strategy as _;
    use serde_json::json;

    use super::template::{SecretSource, SignScheme, DEFAULT_SIGN_HEADER};

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

    /// The global retry options of these tests.
    fn base() -> Backoff {
        Backoff {
            strategy: Strategy::Linear,
            delay: Duration::from_secs(5),
            multiplier: 2.0,
            max_delay: None,
            limit: 0,
            jitter: true,
        }
    }

    /// What a rule without `backoff` retries with: the global options,
    /// without jitter.
    fn global() -> Backoff {
        Backoff {
            jitter: false,
            ..base()
        }
    }

    fn compile_with(id: &str, doc: &Value, passwords: &Passwords) -> Result<OnChangeRule> {
        let backoff = base();
        let context = Context {
            passwords,
            backoff: &backoff,
        };
        OnChangeRule::compile(id, doc, &context)
    }

    fn compile(id: &str, doc: &Value) -> Result<OnChangeRule> {
        compile_with(id, doc, &Passwords::default())
    }

    fn rule(extra: Value) -> OnChangeRule {
        compile("rule", &doc(extra)).unwrap()
    }

    fn error(extra: Value) -> OnChangeDocError {
        compile("rule", &doc(extra)).unwrap_err()
    }

    /// The `sign` member of a document, parsed (its secret not looked up).
    fn sign_spec(extra: Value) -> SignSpec {
        SignSpec::parse(&doc(extra)["sign"]).unwrap()
    }

    /// The `backoff` member of a document, parsed.
    fn backoff_override(extra: Value) -> BackoffOverride {
        BackoffOverride::parse(&doc(extra)["backoff"]).unwrap()
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
        let rule = compile("notify", &doc).unwrap();
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
        assert_eq!(rule.backoff, global());
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
        assert_eq!(rule.backoff, global());
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
            compile("r", &doc).unwrap_err(),
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
    fn missing_or_non_string_url_is_an_error() {
        let mut doc = doc(json!({}));
        doc.as_object_mut().unwrap().remove("url");
        assert_eq!(
            compile("r", &doc).unwrap_err(),
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
        let sign = sign_spec(json!({"sign": {"secret_env": "HOOK_SECRET"}}));
        assert_eq!(sign.secret, SecretSource::Env("HOOK_SECRET".to_string()));
        let header = DEFAULT_SIGN_HEADER.to_string();
        assert_eq!(sign.scheme, SignScheme::Hmac { header });

        let sign = sign_spec(json!({"sign": {
            "secret_host": "api.example.com",
            "secret_user": "hook",
            "header": "X-Hub-Signature-256"
        }}));
        assert_eq!(
            sign.secret,
            SecretSource::Passwords {
                host: "api.example.com".to_string(),
                user: "hook".to_string()
            }
        );
        let header = "X-Hub-Signature-256".to_string();
        assert_eq!(sign.scheme, SignScheme::Hmac { header });

        let sign = sign_spec(json!({"sign": {"secret_env": "S", "scheme": "standard-webhooks"}}));
        assert_eq!(sign.scheme, SignScheme::StandardWebhooks);
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
            json!({"secret_env": "A", "scheme": "rsa"}),
            json!({"secret_env": "A", "scheme": "standard-webhooks", "header": "X-Sig"}),
        ] {
            assert!(
                matches!(error(json!({ "sign": bad })), OnChangeDocError::BadSign(_)),
                "{bad}"
            );
        }
    }

    #[test]
    fn batch_needs_a_size_in_range_and_a_body() {
        let post = |batch: Value| json!({"method": "POST", "batch": batch});
        let ok = rule(post(json!({"max_changes": 50, "max_wait_ms": 250})));
        let expected = Batch {
            max_changes: 50,
            max_wait: Duration::from_millis(250),
        };
        assert_eq!(ok.batch, Some(expected));
        for bad in [
            json!({}),
            json!({"max_changes": 0}),
            json!({"max_changes": 1001}),
            json!({"max_changes": 2.5}),
            json!({"max_changes": 10, "max_wait_ms": -1}),
            json!({"max_changes": 10, "size": 3}),
            json!(10),
        ] {
            assert!(
                matches!(error(post(bad.clone())), OnChangeDocError::BadBatch(_)),
                "{bad}"
            );
        }
        let get = json!({"method": "GET", "batch": {"max_changes": 10}});
        assert!(matches!(error(get), OnChangeDocError::BadBatch(_)));
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
        let backoff = backoff_override(json!({"backoff": {
            "strategy": "Exponential", "delay": 0.5, "multiplier": 3, "limit": 10
        }}));
        assert_eq!(
            backoff,
            BackoffOverride {
                strategy: Some(Strategy::Exponential),
                delay: Some(0.5),
                multiplier: Some(3.0),
                limit: Some(10),
            }
        );
        let partial = backoff_override(json!({"backoff": {"limit": 0}}));
        assert_eq!(
            partial,
            BackoffOverride {
                limit: Some(0),
                ..BackoffOverride::default()
            }
        );
    }

    #[test]
    fn the_signing_secret_is_looked_up_when_the_rule_is_compiled() {
        let passwords =
            Passwords::parse(r#"{"api.example.com": {"hook": "s3cret"}}"#, "p.json").unwrap();
        let sign = json!({"sign": {"secret_host": "api.example.com", "secret_user": "hook"}});
        let rule = compile_with("rule", &doc(sign.clone()), &passwords).unwrap();
        let signing = rule.request.sign.clone().unwrap();
        let expected = Signing::Hmac {
            secret: "s3cret".into(),
            header: DEFAULT_SIGN_HEADER.into(),
        };
        assert!(signing == expected, "{signing:?}");
        assert!(!format!("{:?}", rule.request).contains("s3cret"));

        let err = compile("rule", &doc(sign)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the signing secret is not available: no password for hook@api.example.com in the passwords file"
        );
        let err = error(json!({"sign": {"secret_env": "SPIEGEL_TEST_SURELY_UNSET_8d1f"}}));
        assert_eq!(
            err,
            OnChangeDocError::Secret(
                "environment variable SPIEGEL_TEST_SURELY_UNSET_8d1f is not set".to_string()
            )
        );
        // A document that is wrong is reported as such first.
        assert_eq!(
            error(json!({"sign": {"secret_env": "SPIEGEL_TEST_SURELY_UNSET_8d1f"}, "block": 1})),
            OnChangeDocError::NotABoolean("block")
        );
    }

    #[test]
    fn the_rule_backoff_is_applied_over_the_global_options() {
        let rule = rule(json!({"backoff": {"strategy": "exponential", "limit": 3}}));
        assert_eq!(
            rule.backoff,
            Backoff {
                strategy: Strategy::Exponential,
                limit: 3,
                ..global()
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
    fn selector_and_if_must_both_hold() {
        let rule = rule(json!({"if": {"type": "^invoice$"}, "selector": {"total": {"$gt": 100}}}));
        assert!(rule.matches(&json!({"type": "invoice", "total": 200})));
        assert!(!rule.matches(&json!({"type": "invoice", "total": 50})));
        assert!(!rule.matches(&json!({"type": "order", "total": 200})));
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

    fn load(extra: Value) -> Result<OnChangeRule> {
        let (passwords, backoff) = (Passwords::default(), base());
        let context = Context {
            passwords: &passwords,
            backoff: &backoff,
        };
        OnChangeRule::load("rule", &doc(extra), &context)
    }

    #[test]
    fn an_unusable_document_with_a_usable_db_name_holds_what_it_would_match() {
        let bad_url =
            load(json!({"url": "ftp://api.example.com/", "if": {"type": "^order$"}})).unwrap();
        assert!(matches!(
            bad_url.unusable,
            Some(OnChangeDocError::BadUrl(_))
        ));
        assert!(bad_url.holds() && bad_url.block);
        assert!(bad_url.applies_to_db("user_1") && !bad_url.applies_to_db("other"));
        assert!(bad_url.matches(&json!({"type": "order"})));
        assert!(!bad_url.matches(&json!({"type": "note"})));

        // With `if` itself broken, every change is held.
        let bad_if = load(json!({"if": {"type": "(["}})).unwrap();
        assert!(bad_if.unusable.is_some());
        assert!(bad_if.matches(&json!({"type": "note"})));

        assert!(load(json!({})).unwrap().unusable.is_none());
        assert!(!load(json!({})).unwrap().holds());
    }

    #[test]
    fn an_unusable_document_without_a_usable_db_name_holds_nothing() {
        assert!(matches!(
            load(json!({"db_name": "(["})),
            Err(OnChangeDocError::BadRegex { .. })
        ));
        assert_eq!(
            load(json!({"db_name": null, "url": 3})).unwrap_err(),
            OnChangeDocError::MissingDbName
        );
        assert_eq!(
            load(json!({"db_name": 1})).unwrap_err(),
            OnChangeDocError::DbNameNotString
        );
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

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// A document of any shape compiles, loads as a rule that holds,
        /// or says why, without panicking; a compiled rule matches any
        /// document and any database name.
        #[test]
        fn an_on_change_document_of_any_json_compiles_or_errs_without_panic(
            members in vec((rule_member(), hostile_input::json()), 0..10),
            changed in hostile_input::json(),
            db in hostile_input::text(),
        ) {
            let doc = Value::Object(hostile_input::object(members));
            let compiled = compile("rule", &doc);
            if let Err(error) = &compiled {
                prop_assert!(!error.to_string().is_empty());
            }
            let passwords = Passwords::default();
            let backoff = base();
            let context = Context { passwords: &passwords, backoff: &backoff };
            if let Ok(rule) = OnChangeRule::load("rule", &doc, &context) {
                prop_assert_eq!(rule.unusable.is_some(), compiled.is_err());
                rule.matches(&changed);
                rule.applies_to_db(&db);
            }
        }

        /// Valid rules with hostile values where the document allows any:
        /// the request's texts, a selector, conditions.
        #[test]
        fn an_on_change_document_with_hostile_values_compiles_or_errs_without_panic(
            url in hostile_input::text(),
            db_name in hostile_input::text(),
            params in hostile_input::json(),
            headers in vec((hostile_input::text(), hostile_input::text()), 0..4),
            selector in hostile_input::json(),
            changed in hostile_input::json(),
        ) {
            let headers: Map<String, Value> =
                headers.into_iter().map(|(n, v)| (n, Value::String(v))).collect();
            for doc in [
                doc(json!({"url": format!("https://h/{url}"), "db_name": db_name})),
                doc(json!({"params": params, "headers": headers, "method": "POST"})),
                doc(json!({"selector": selector})),
            ] {
                if let Ok(rule) = compile("rule", &doc) {
                    rule.matches(&changed);
                }
            }
        }
    }

    /// A member name of an on_change document, or any.
    fn rule_member() -> impl proptest::strategy::Strategy<Value = String> {
        prop_oneof![
            4 => proptest::sample::select(&[
                "db_name", "if", "selector", "url", "method", "params", "headers", "timeout",
                "sign", "block", "debounce", "batch", "rate_limit", "paused", "backoff",
            ][..]).prop_map(String::from),
            1 => hostile_input::key(),
        ]
    }
}
