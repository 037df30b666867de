//! Replicator documents: what to replicate when a database changes.
//!
//! Two kinds, told apart by `db_name`:
//! - plain (Spiegel 1.2): `source` names one database of this server; the
//!   document applies when that database changes;
//! - templated: `db_name` is a regular expression, and `${db_name}` in
//!   `source` and/or `target` stands for the (URL-encoded) name of each
//!   matching database. One document fans 10,000 user databases into one.
//!
//! Every other field is a `POST /_replicate` parameter and passes through
//! unchanged; Spiegel 1.2's bookkeeping fields are dropped.

use regex::Regex;
use serde_json::{Map, Value};

use crate::config::Passwords;
use crate::couch::{encode_segment, SecretUrl, UrlError};
use crate::replication::{Engine, Options, Unsupported};
use crate::rules::{nests_within, MAX_JSON_DEPTH};

/// Fields that are Spiegel's, never `_replicate`'s.
const NOT_PARAMETERS: [&str; 10] = [
    "_id",
    "_rev",
    "_conflicts",
    "type",
    "db_name",
    "dirty",
    "locked_at",
    "updated_at",
    "continuous",
    "engine",
];

const PLACEHOLDER: &str = "${db_name}";

/// Why a replicator document cannot be used.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ReplicatorDocError {
    #[error("no `{0}`: a replicator needs a source and a target URL")]
    Missing(&'static str),
    #[error("`{0}` must be a URL string or an object with a `url`")]
    NotAUrl(&'static str),
    #[error("`{field}` is not a usable URL: {reason}")]
    BadUrl { field: &'static str, reason: String },
    #[error("`db_name` is not a valid regular expression: {0}")]
    BadRegex(String),
    #[error("`db_name` must be a string (a regular expression)")]
    DbNameNotString,
    #[error("`${{db_name}}` appears in source or target but the document has no `db_name` regular expression")]
    PlaceholderWithoutRegex,
    #[error("the source names no database")]
    NoSourceDatabase,
    #[error("`engine` must be \"native\" or \"couchdb\"")]
    BadEngine,
    /// Nested deeper than any document CouchDB stores ([`MAX_JSON_DEPTH`]).
    #[error("the document nests more than 128 arrays and objects, one inside the other")]
    TooDeep,
}

/// Where the replicator doc's source lives, relative to this server.
#[derive(Debug, Clone, PartialEq)]
pub enum Trigger {
    /// A plain doc for one database of this server.
    Database(String),
    /// A templated doc: every database whose name matches.
    Pattern(String),
    /// The source is on another server: this server's updates never
    /// trigger it.
    Elsewhere,
}

/// One usable replicator document.
#[derive(Debug, Clone)]
pub struct ReplicatorRule {
    pub id: String,
    source: Endpoint,
    target: Endpoint,
    pattern: Option<Regex>,
    params: Map<String, Value>,
    pub trigger: Trigger,
    /// The doc asked for `continuous: true`, which is ignored.
    pub asked_continuous: bool,
    /// The engine the document asks for (none: `--replication-engine`).
    pub engine: Option<Engine>,
    /// How the native engine would run it, or why it cannot.
    pub native: Result<Options, Unsupported>,
}

/// A source or target: a URL (possibly templated) and, in CouchDB's object
/// form, the other members (headers, ...).
#[derive(Debug, Clone)]
struct Endpoint {
    url: String,
    extra: Option<Map<String, Value>>,
}

impl Endpoint {
    fn parse(doc: &Value, field: &'static str) -> Result<Self, ReplicatorDocError> {
        match doc.get(field) {
            None | Some(Value::Null) => Err(ReplicatorDocError::Missing(field)),
            Some(Value::String(url)) => Ok(Endpoint {
                url: url.clone(),
                extra: None,
            }),
            Some(Value::Object(obj)) => match obj.get("url") {
                Some(Value::String(url)) => {
                    let mut extra = obj.clone();
                    extra.remove("url");
                    Ok(Endpoint {
                        url: url.clone(),
                        extra: Some(extra),
                    })
                }
                _ => Err(ReplicatorDocError::NotAUrl(field)),
            },
            Some(_) => Err(ReplicatorDocError::NotAUrl(field)),
        }
    }

    /// The URL with `${db_name}` replaced, checked.
    fn resolve(
        &self,
        db: Option<&str>,
        field: &'static str,
    ) -> Result<SecretUrl, ReplicatorDocError> {
        let text = match db {
            Some(db) => self.url.replace(PLACEHOLDER, &encode_segment(db)),
            None => self.url.clone(),
        };
        SecretUrl::parse(&text).map_err(|e: UrlError| ReplicatorDocError::BadUrl {
            field,
            reason: e.to_string(),
        })
    }

    fn templated(&self) -> bool {
        self.url.contains(PLACEHOLDER)
    }
}

/// How credentials reach CouchDB in a `_replicate` request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthStyle {
    /// `user:password@` in the URL (CouchDB before 3.2).
    InUrl,
    /// `{"url": ..., "auth": {"basic": {...}}}`, preferred since 3.2.
    AuthObject,
}

impl AuthStyle {
    /// The style for a server version such as "3.5.0".
    pub fn for_version(version: &str) -> Self {
        let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        if (major, minor) >= (3, 2) {
            AuthStyle::AuthObject
        } else {
            AuthStyle::InUrl
        }
    }
}

impl ReplicatorRule {
    /// Parses a replicator doc; `server` is `--url`, to tell which sources
    /// are databases of this server.
    pub fn parse(id: &str, doc: &Value, server: &SecretUrl) -> Result<Self, ReplicatorDocError> {
        // Its parameters are copied and written by recursion.
        if !nests_within(doc, MAX_JSON_DEPTH) {
            return Err(ReplicatorDocError::TooDeep);
        }
        let source = Endpoint::parse(doc, "source")?;
        let target = Endpoint::parse(doc, "target")?;
        let pattern = db_name_pattern(doc)?;
        if pattern.is_none() && (source.templated() || target.templated()) {
            return Err(ReplicatorDocError::PlaceholderWithoutRegex);
        }
        // Check both URLs parse (with a stand-in name for templates).
        let sample = pattern.as_ref().map(|_| "db");
        let source_url = source.resolve(sample, "source")?;
        target.resolve(sample, "target")?;

        let trigger = Trigger::of(&source_url, pattern.as_ref(), server)?;
        let params = replicate_params(doc);
        let native = native_options(&source, &target, &params);
        Ok(ReplicatorRule {
            id: id.to_string(),
            source,
            target,
            pattern,
            params,
            trigger,
            asked_continuous: doc.get("continuous") == Some(&Value::Bool(true)),
            engine: requested_engine(doc)?,
            native,
        })
    }

    /// The source and target URLs for database `db`, with passwords filled
    /// in from the passwords file. Never log them.
    pub fn endpoints(
        &self,
        db: &str,
        passwords: &Passwords,
    ) -> Result<(SecretUrl, SecretUrl), ReplicatorDocError> {
        let name = self.pattern.as_ref().map(|_| db);
        let source = passwords.apply(&self.source.resolve(name, "source")?);
        let target = passwords.apply(&self.target.resolve(name, "target")?);
        Ok((source, target))
    }

    /// True when a change of database `db` of this server triggers the doc.
    pub fn applies_to(&self, db: &str) -> bool {
        match &self.trigger {
            Trigger::Database(name) => name == db,
            Trigger::Pattern(_) => self.pattern.as_ref().is_some_and(|re| re.is_match(db)),
            Trigger::Elsewhere => false,
        }
    }

    /// The `POST /_replicate` body for database `db`, with passwords filled
    /// in from the passwords file. Never log it: it holds credentials.
    pub fn request(
        &self,
        db: &str,
        passwords: &Passwords,
        style: AuthStyle,
    ) -> Result<Value, ReplicatorDocError> {
        let name = self.pattern.as_ref().map(|_| db);
        let mut body = self.params.clone();
        for (field, endpoint) in [("source", &self.source), ("target", &self.target)] {
            let url = passwords.apply(&endpoint.resolve(name, field)?);
            body.insert(
                field.to_string(),
                endpoint_json(&url, endpoint.extra.as_ref(), style),
            );
        }
        Ok(Value::Object(body))
    }

    /// The source and target for `db`, safe to show (passwords hidden).
    pub fn describe(&self, db: &str) -> String {
        let name = self.pattern.as_ref().map(|_| db);
        let show = |e: &Endpoint, f| {
            e.resolve(name, f)
                .map(|u| u.to_string())
                .unwrap_or_default()
        };
        format!(
            "{} -> {}",
            show(&self.source, "source"),
            show(&self.target, "target")
        )
    }

    /// Whether `_replicate` may create the target.
    pub fn creates_target(&self) -> bool {
        self.params.get("create_target") == Some(&Value::Bool(true))
    }
}

/// The `db_name` regular expression: a doc with one is templated.
fn db_name_pattern(doc: &Value) -> Result<Option<Regex>, ReplicatorDocError> {
    match doc.get("db_name") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(re)) => Regex::new(re)
            .map(Some)
            .map_err(|e| ReplicatorDocError::BadRegex(e.to_string())),
        Some(_) => Err(ReplicatorDocError::DbNameNotString),
    }
}

impl Trigger {
    /// Which of this server's changes trigger a doc whose (sample) source
    /// URL is `source`: only a source on this server can be triggered here.
    fn of(
        source: &SecretUrl,
        pattern: Option<&Regex>,
        server: &SecretUrl,
    ) -> Result<Self, ReplicatorDocError> {
        if !same_server(source, server) {
            Ok(Trigger::Elsewhere)
        } else if let Some(re) = pattern {
            Ok(Trigger::Pattern(re.as_str().to_string()))
        } else {
            db_name_in(source, server)
                .map(Trigger::Database)
                .ok_or(ReplicatorDocError::NoSourceDatabase)
        }
    }
}

/// The doc's `_replicate` parameters: every field but Spiegel's own and the
/// endpoints, which are resolved per database.
fn replicate_params(doc: &Value) -> Map<String, Value> {
    doc.as_object()
        .map(|o| {
            o.iter()
                .filter(|(k, _)| {
                    !NOT_PARAMETERS.contains(&k.as_str()) && *k != "source" && *k != "target"
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default()
}

/// The engine the doc asks for, if any (none: `--replication-engine`).
fn requested_engine(doc: &Value) -> Result<Option<Engine>, ReplicatorDocError> {
    match doc.get("engine") {
        None | Some(Value::Null) => Ok(None),
        Some(engine) => serde_json::from_value(engine.clone())
            .map(Some)
            .map_err(|_| ReplicatorDocError::BadEngine),
    }
}

/// How the native engine would run the doc, or why it cannot: it reads
/// endpoints given as URLs only, not the object form (headers, ...).
fn native_options(
    source: &Endpoint,
    target: &Endpoint,
    params: &Map<String, Value>,
) -> Result<Options, Unsupported> {
    match (&source.extra, &target.extra) {
        (None, None) => Options::parse(params),
        _ => Err(Unsupported("a source or target given as an object".into())),
    }
}

fn endpoint_json(url: &SecretUrl, extra: Option<&Map<String, Value>>, style: AuthStyle) -> Value {
    let user = url.username();
    let password = url.password();
    match (style, extra, &user, &password) {
        (AuthStyle::InUrl, None, _, _) | (_, None, None, _) => {
            Value::String(url.expose().to_string())
        }
        _ => {
            let mut obj = extra.cloned().unwrap_or_default();
            match (style, user, password) {
                (AuthStyle::AuthObject, Some(username), Some(password)) => {
                    obj.insert(
                        "url".into(),
                        Value::String(url.without_credentials().to_string()),
                    );
                    obj.insert(
                        "auth".into(),
                        serde_json::json!({ "basic": { "username": username, "password": password } }),
                    );
                }
                _ => {
                    obj.insert("url".into(), Value::String(url.expose().to_string()));
                }
            }
            Value::Object(obj)
        }
    }
}

/// Same scheme, host and port (the host compared case-insensitively).
fn same_server(url: &SecretUrl, server: &SecretUrl) -> bool {
    let (a, b) = (url.expose(), server.expose());
    a.scheme() == b.scheme()
        && a.host_str().map(str::to_ascii_lowercase) == b.host_str().map(str::to_ascii_lowercase)
        && a.port_or_known_default() == b.port_or_known_default()
        && a.path().starts_with(b.path().trim_end_matches('/'))
}

/// The database named by a URL of this server: the path after the
/// server's own path, one segment, percent-decoded (so `a%2Fb` is `a/b`).
fn db_name_in(url: &SecretUrl, server: &SecretUrl) -> Option<String> {
    let prefix = server.expose().path().trim_end_matches('/');
    let rest = url.expose().path().strip_prefix(prefix)?.trim_matches('/');
    if rest.is_empty() || rest.contains('/') {
        return None;
    }
    Some(
        percent_encoding::percent_decode_str(rest)
            .decode_utf8_lossy()
            .into_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hostile_input;
    use proptest::prelude::*;
    use serde_json::json;

    fn server() -> SecretUrl {
        SecretUrl::parse("http://admin:pw@127.0.0.1:5984").unwrap()
    }

    #[test]
    fn a_plain_doc_applies_to_its_decoded_source_database() {
        let doc = json!({"type": "replicator", "source": "http://u@127.0.0.1:5984/users%2Fbob",
                         "target": "https://u@backup.example.com/users%2Fbob", "dirty": true,
                         "filter": "app/f", "query_params": {"k": 1}});
        let rule = ReplicatorRule::parse("r1", &doc, &server()).unwrap();
        assert_eq!(rule.trigger, Trigger::Database("users/bob".into()));
        assert!(rule.applies_to("users/bob"));
        assert!(!rule.applies_to("users/bo"));
        let passwords = Passwords::parse(
            r#"{"127.0.0.1": {"u": "p1"}, "backup.example.com": {"u": "p2"}}"#,
            "f",
        )
        .unwrap();
        let body = rule
            .request("users/bob", &passwords, AuthStyle::InUrl)
            .unwrap();
        assert_eq!(body["source"], "http://u:p1@127.0.0.1:5984/users%2Fbob");
        assert_eq!(
            body["target"],
            "https://u:p2@backup.example.com/users%2Fbob"
        );
        assert_eq!(body["filter"], "app/f");
        assert_eq!(body["query_params"], json!({"k": 1}));
        assert!(body.get("dirty").is_none() && body.get("type").is_none());
        assert!(!rule.describe("users/bob").contains("p1"));
    }

    #[test]
    fn the_auth_object_carries_credentials_on_newer_servers() {
        let doc =
            json!({"source": "http://u@127.0.0.1:5984/a", "target": "http://127.0.0.1:5984/b"});
        let rule = ReplicatorRule::parse("r", &doc, &server()).unwrap();
        let passwords = Passwords::parse(r#"{"127.0.0.1": {"u": "p"}}"#, "f").unwrap();
        let body = rule
            .request("a", &passwords, AuthStyle::for_version("3.5.0"))
            .unwrap();
        assert_eq!(
            body["source"],
            json!({"url": "http://127.0.0.1:5984/a", "auth": {"basic": {"username": "u", "password": "p"}}})
        );
        assert_eq!(body["target"], "http://127.0.0.1:5984/b");
        assert_eq!(AuthStyle::for_version("3.1.2"), AuthStyle::InUrl);
        assert_eq!(AuthStyle::for_version("2.3.1"), AuthStyle::InUrl);
    }

    #[test]
    fn a_templated_doc_fans_matching_databases_in_with_encoded_names() {
        let doc = json!({"db_name": "^users/", "source": "http://127.0.0.1:5984/${db_name}",
                         "target": "http://127.0.0.1:5984/all_users", "continuous": true});
        let rule = ReplicatorRule::parse("fan", &doc, &server()).unwrap();
        assert!(rule.asked_continuous);
        assert!(rule.applies_to("users/a+b"));
        assert!(!rule.applies_to("other"));
        let body = rule
            .request("users/a+b", &Passwords::default(), AuthStyle::InUrl)
            .unwrap();
        assert_eq!(body["source"], "http://127.0.0.1:5984/users%2Fa%2Bb");
        assert!(
            body.get("continuous").is_none(),
            "continuous is never passed on"
        );
    }

    #[test]
    fn unusable_docs_say_why() {
        let s = server();
        let err = |doc: Value| ReplicatorRule::parse("x", &doc, &s).unwrap_err();
        assert_eq!(
            err(json!({"target": "http://h/b"})),
            ReplicatorDocError::Missing("source")
        );
        assert!(matches!(
            err(json!({"source": "nope", "target": "http://h/b"})),
            ReplicatorDocError::BadUrl { .. }
        ));
        assert!(matches!(
            err(json!({"db_name": "(", "source": "http://h/${db_name}", "target": "http://h/b"})),
            ReplicatorDocError::BadRegex(_)
        ));
        assert_eq!(
            err(json!({"source": "http://h/${db_name}", "target": "http://h/b"})),
            ReplicatorDocError::PlaceholderWithoutRegex
        );
        assert_eq!(
            err(json!({"source": 3, "target": "http://h/b"})),
            ReplicatorDocError::NotAUrl("source")
        );
    }

    #[test]
    fn a_source_on_another_server_is_never_triggered() {
        let doc = json!({"source": "http://other:5984/a", "target": "http://127.0.0.1:5984/b"});
        let rule = ReplicatorRule::parse("x", &doc, &server()).unwrap();
        assert_eq!(rule.trigger, Trigger::Elsewhere);
        assert!(!rule.applies_to("a"));
    }

    /// An endpoint: a URL on this server or another, templated or not,
    /// with any text after it, or any JSON.
    fn endpoint() -> impl Strategy<Value = Value> {
        let scheme = proptest::sample::select(
            &[
                "",
                "http://127.0.0.1:5984/",
                "http://u@127.0.0.1:5984/${db_name}",
                "https://u:p@backup.example.com/",
                "http://127.0.0.1:5984/a/",
            ][..],
        );
        prop_oneof![
            3 => (scheme.clone(), hostile_input::text()).prop_map(|(s, t)| json!(format!("{s}{t}"))),
            1 => (scheme, hostile_input::json()).prop_map(|(s, extra)| {
                json!({"url": format!("{s}db"), "headers": extra})
            }),
            1 => hostile_input::json(),
        ]
    }

    /// A member name of a replicator document, or any.
    fn member() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => proptest::sample::select(&[
                "db_name", "engine", "continuous", "create_target", "create_target_params",
                "filter", "query_params", "selector", "doc_ids", "since_seq",
                "use_checkpoints", "winning_revs_only", "worker_batch_size",
                "checkpoint_interval",
            ][..]).prop_map(String::from),
            1 => hostile_input::key(),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Ok or a clear Err for a document of any shape; a usable one
        /// answers for any database name without panicking, and its
        /// `_replicate` body has its source and target.
        #[test]
        fn a_replicator_document_of_any_json_parses_or_errs_without_panic(
            source in endpoint(),
            target in endpoint(),
            db_name in prop_oneof![
                2 => Just(Value::Null),
                2 => Just(json!("^users/")),
                1 => hostile_input::text().prop_map(Value::String),
                1 => hostile_input::json(),
            ],
            members in proptest::collection::vec((member(), hostile_input::json()), 0..6),
            db in hostile_input::text(),
        ) {
            let mut doc = hostile_input::object(members);
            doc.insert("source".into(), source);
            doc.insert("target".into(), target);
            doc.insert("db_name".into(), db_name);
            match ReplicatorRule::parse("r", &Value::Object(doc), &server()) {
                Ok(rule) => {
                    rule.applies_to(&db);
                    rule.describe(&db);
                    let passwords = Passwords::default();
                    let _ = rule.endpoints(&db, &passwords);
                    for style in [AuthStyle::InUrl, AuthStyle::AuthObject] {
                        if let Ok(body) = rule.request(&db, &passwords, style) {
                            prop_assert!(body.get("source").is_some() && body.get("target").is_some());
                        }
                    }
                }
                Err(error) => prop_assert!(!error.to_string().is_empty()),
            }
        }

        #[test]
        fn a_server_version_of_any_text_gives_an_auth_style(version in hostile_input::text()) {
            AuthStyle::for_version(&version);
        }
    }

    #[test]
    fn a_document_nested_far_deeper_than_json_allows_is_an_error_not_a_stack_overflow() {
        let deep = hostile_input::nested(10_000, json!(1), hostile_input::array);
        let mut doc = json!({"source": "http://127.0.0.1:5984/a", "target": "http://h/b"});
        doc["query_params"] = hostile_input::member("k", deep);
        assert_eq!(
            ReplicatorRule::parse("r", &doc, &server()).unwrap_err(),
            ReplicatorDocError::TooDeep
        );
        hostile_input::dismantle(doc);
    }
}
