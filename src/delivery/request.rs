//! Building the HTTP request of an on_change rule for one change.
//!
//! # Templating
//!
//! Five placeholders are known: `$db_name` (the database name), `$change`
//! (the whole document, or the deletion stub), `$change.id`, `$change.rev`
//! and `$seq` (the `_changes` seq, opaque, as CouchDB sent it). Each may also
//! be written `${db_name}`, `${change}`, `${change.id}`, `${change.rev}`,
//! `${seq}`.
//!
//! - In `params`, at any depth (nested objects and arrays; keys are never
//!   templated), a string that is exactly one placeholder is replaced by the
//!   value itself with its JSON type: `$change` becomes the document object,
//!   `$seq` the seq as received (number or string), the others strings. As in
//!   Spiegel 1.2, unbalanced braces are tolerated in this whole-value case
//!   (`${db_name`, `$db_name}`, `{$db_name}`). A placeholder inside a longer
//!   string is replaced by text: `$change` as compact JSON, `$seq` as is when
//!   it is a string and as compact JSON otherwise. A bare placeholder ends
//!   where a name would end: `$db_names` and `$change.foo` are left alone; use
//!   the `${...}` form when text follows directly.
//! - In `url`, every placeholder (both forms) is replaced by its text,
//!   percent-encoded as one path segment (`a/b` becomes `a%2Fb`, `+`, `$`,
//!   `(` and `)` are encoded too). The result must parse as an http(s) URL;
//!   then the passwords file fills in the password of a `user@host` URL.
//! - GET and DELETE send the params as the query string, appended to any
//!   query the URL already has: string values as they are, every other value
//!   (number, boolean, null, object, array) as compact JSON text, all
//!   `application/x-www-form-urlencoded` (a space becomes `+`). POST and PUT
//!   send the params as a JSON body, `{}` when the rule has no params (as
//!   Spiegel 1.2 did); GET and DELETE never send a body.
//!
//! # Headers
//!
//! The rule's headers, then `User-Agent: spiegel/<version>` and
//! `Content-Type: application/json` (with a body) unless the rule sets them,
//! Basic auth from the URL's user info unless the rule sets `Authorization`
//! (credentials never travel in the request URL), and the signature.
//!
//! # Signature
//!
//! With signing on, the request carries the header named by the rule, whose
//! value is `sha256=` followed by the lowercase hex HMAC-SHA256, keyed with
//! the secret, of the payload: the exact body bytes for POST and PUT, and for
//! GET and DELETE the exact query string as sent (after the `?`, without it;
//! empty when there is none). A receiver verifies it on the raw bytes, before
//! parsing anything, for example in Python:
//!
//! ```python
//! import hashlib, hmac
//!
//! def verify(secret: bytes, payload: bytes, header_value: str) -> bool:
//!     # payload: request.get_data() for POST/PUT,
//!     #          request.query_string for GET/DELETE (b"" when absent)
//!     expected = "sha256=" + hmac.new(secret, payload, hashlib.sha256).hexdigest()
//!     return hmac.compare_digest(expected, header_value)
//! ```
//!
//! The signature proves the payload came from someone holding the secret; it
//! does not cover the method, the path or the time, so a receiver that must
//! refuse replays should put `$seq` or `$change.rev` in the params and
//! remember what it has handled.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use reqwest::header::{
    HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE, USER_AGENT,
};
use serde_json::{Map, Value};
use sha2::Sha256;
use url::Url;

use crate::config::Passwords;
use crate::couch::{encode_segment, SecretUrl, UrlError};

/// The HTTP methods an on_change rule may use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Method {
    /// Spiegel 1.2's default when a rule names no method.
    #[default]
    Get,
    Post,
    Put,
    Delete,
}

impl Method {
    /// Parses a method name case-insensitively (Spiegel 1.2 upper-cased it).
    pub fn from_name(name: &str) -> Option<Method> {
        match name.to_ascii_uppercase().as_str() {
            "GET" => Some(Method::Get),
            "POST" => Some(Method::Post),
            "PUT" => Some(Method::Put),
            "DELETE" => Some(Method::Delete),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
        }
    }

    /// GET and DELETE carry the params in the query string, POST and PUT in
    /// a JSON body, as in Spiegel 1.2.
    fn has_body(self) -> bool {
        matches!(self, Method::Post | Method::Put)
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<Method> for reqwest::Method {
    fn from(method: Method) -> Self {
        match method {
            Method::Get => reqwest::Method::GET,
            Method::Post => reqwest::Method::POST,
            Method::Put => reqwest::Method::PUT,
            Method::Delete => reqwest::Method::DELETE,
        }
    }
}

/// What a rule asks for, before templating (the rule parser fills it).
///
/// Not `Debug`: the rule's headers may carry API keys.
#[derive(Clone, Copy)]
pub struct RequestTemplate<'a> {
    /// May contain placeholders, see the module documentation.
    pub url: &'a str,
    pub method: Method,
    /// A JSON object when present; `null` counts as absent.
    pub params: Option<&'a Value>,
    pub headers: &'a [(String, String)],
    /// `None`: the sender's default.
    pub timeout: Option<Duration>,
    pub sign: Option<&'a Signing>,
}

/// How to sign requests: the secret (already resolved from wherever the rule
/// points) and the name of the header that carries the signature.
#[derive(Clone)]
pub struct Signing {
    pub secret: String,
    pub header: String,
}

impl fmt::Debug for Signing {
    // The secret must never reach a log line through `{:?}`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signing")
            .field("secret", &"***")
            .field("header", &self.header)
            .finish()
    }
}

/// The change being delivered.
#[derive(Clone, Copy, Debug)]
pub struct ChangeContext<'a> {
    pub db_name: &'a str,
    /// The whole document, or the deletion stub.
    pub doc: &'a Value,
    pub id: &'a str,
    pub rev: &'a str,
    /// The opaque `_changes` seq, passed on as is.
    pub seq: &'a Value,
}

/// Why a rule's request could not be built. Messages never quote a header
/// value or a URL, either of which may hold a secret.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("on_change url, once templated, is not usable: {0}")]
    Url(#[from] UrlError),
    #[error("on_change params must be a JSON object, not {0}")]
    ParamsNotObject(&'static str),
    #[error("invalid header name {0:?}")]
    HeaderName(String),
    #[error("invalid value for header {0:?}")]
    HeaderValue(String),
}

/// A request ready to send: templated, with credentials and signature.
#[derive(Clone)]
pub struct Request {
    method: Method,
    /// The full URL with credentials and the query as sent.
    url: SecretUrl,
    body: Option<Bytes>,
    /// Everything sent except Basic auth, which comes from `url` at send time.
    headers: HeaderMap,
    timeout: Option<Duration>,
    /// Redacted like a credential, so a log does not help forge requests.
    signature_header: Option<HeaderName>,
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Request({})", self.redacted())
    }
}

impl Request {
    /// Templates the rule's URL and params for one change, applies the
    /// passwords file, and signs.
    pub fn build(
        t: &RequestTemplate,
        change: &ChangeContext,
        passwords: &Passwords,
    ) -> Result<Request, RequestError> {
        let url = substitute(t.url, |p| encode_segment(&p.text(change)));
        let url = passwords.apply(&SecretUrl::parse(&url)?);

        let params = match t.params {
            None | Some(Value::Null) => None,
            Some(Value::Object(map)) => Some(template_object(map, change)),
            Some(other) => return Err(RequestError::ParamsNotObject(json_type(other))),
        };

        let mut full = url.expose().clone();
        full.set_fragment(None);
        let body = if t.method.has_body() {
            let params = Value::Object(params.unwrap_or_default());
            Some(Bytes::from(params.to_string()))
        } else {
            let query = query_string(full.query(), params.as_ref());
            full.set_query((!query.is_empty()).then_some(query.as_str()));
            None
        };
        // Re-parsed so that the stored URL is exactly the one sent.
        let url = SecretUrl::parse(full.as_str())?;

        let mut headers = HeaderMap::new();
        for (name, value) in t.headers {
            let (name, value) = header(name, value)?;
            headers.append(name, value);
        }
        if !headers.contains_key(USER_AGENT) {
            headers.insert(
                USER_AGENT,
                HeaderValue::from_static(concat!("spiegel/", env!("CARGO_PKG_VERSION"))),
            );
        }
        if body.is_some() && !headers.contains_key(CONTENT_TYPE) {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }

        let signature_header = match t.sign {
            Some(signing) => {
                let payload = match &body {
                    Some(body) => body.as_ref(),
                    None => url.expose().query().unwrap_or("").as_bytes(),
                };
                let (name, value) = header(&signing.header, &sign(&signing.secret, payload))?;
                headers.insert(name.clone(), value);
                Some(name)
            }
            None => None,
        };

        Ok(Request {
            method: t.method,
            url,
            body,
            headers,
            timeout: t.timeout,
            signature_header,
        })
    }

    pub fn method(&self) -> Method {
        self.method
    }

    /// The URL with credentials and query; displays without the password.
    pub fn url(&self) -> &SecretUrl {
        &self.url
    }

    /// What goes on the wire: no user info, query included.
    pub fn target(&self) -> Url {
        self.url.without_credentials()
    }

    /// The query string as sent (without the `?`), if any.
    pub fn query(&self) -> Option<&str> {
        self.url.expose().query()
    }

    pub fn body(&self) -> Option<&Bytes> {
        self.body.as_ref()
    }

    /// Headers to send, Basic auth excepted (see [`Request::basic_auth`]).
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// User and password for Basic auth, from the URL's user info; `None`
    /// when the URL has no user or the rule sets `Authorization` itself.
    pub fn basic_auth(&self) -> Option<(String, Option<String>)> {
        if self.headers.contains_key(AUTHORIZATION) {
            return None;
        }
        self.url.username().map(|user| (user, self.url.password()))
    }

    /// The rule's own time limit, if it has one.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// What may be stored in a dead letter or shown in logs: method, URL
    /// without credentials, query, body (as JSON value), headers with the
    /// values of Authorization, the signature header and any header whose
    /// name contains "secret", "token", "key", "password" or "auth" replaced
    /// by `***`.
    pub fn redacted(&self) -> Value {
        let mut url = self.target();
        url.set_query(None);
        let mut headers = Map::new();
        for (name, value) in &self.headers {
            let shown = if self.is_sensitive(name) {
                "***".to_string()
            } else {
                String::from_utf8_lossy(value.as_bytes()).into_owned()
            };
            match headers.get_mut(name.as_str()) {
                Some(Value::String(previous)) => {
                    previous.push_str(", ");
                    previous.push_str(&shown);
                }
                _ => {
                    headers.insert(name.to_string(), Value::String(shown));
                }
            }
        }
        if self.basic_auth().is_some() {
            headers.insert(AUTHORIZATION.to_string(), Value::from("***"));
        }
        let body = self.body.as_ref().map(|body| {
            serde_json::from_slice(body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
        });
        serde_json::json!({
            "method": self.method.as_str(),
            "url": url.as_str(),
            "query": self.query(),
            "body": body,
            "headers": headers,
        })
    }

    /// The debounce key: method, URL without credentials with its query, and
    /// the body bytes. Equal exactly when those are equal; headers and
    /// credentials do not count.
    pub fn identity(&self) -> String {
        let body = self
            .body
            .as_deref()
            .map(String::from_utf8_lossy)
            .unwrap_or_default();
        // A URL never contains a space or a newline, so this cannot collide.
        format!("{} {}\n{}", self.method, self.target(), body)
    }

    fn is_sensitive(&self, name: &HeaderName) -> bool {
        let name = name.as_str();
        self.signature_header
            .as_ref()
            .is_some_and(|h| h.as_str() == name)
            || ["secret", "token", "key", "password", "auth"]
                .iter()
                .any(|word| name.contains(word))
    }
}

/// `sha256=<lowercase hex HMAC-SHA256(secret, payload)>`.
fn sign(secret: &str, payload: &[u8]) -> String {
    // HMAC takes keys of any length; this branch cannot be taken.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return String::new();
    };
    mac.update(payload);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

fn header(name: &str, value: &str) -> Result<(HeaderName, HeaderValue), RequestError> {
    let header_name = HeaderName::from_bytes(name.trim().as_bytes())
        .map_err(|_| RequestError::HeaderName(name.to_string()))?;
    let header_value = HeaderValue::from_str(value)
        .map_err(|_| RequestError::HeaderValue(header_name.to_string()))?;
    Ok((header_name, header_value))
}

/// The URL's own query followed by the params, form-encoded. Built here
/// rather than by the HTTP client so that the signed bytes are the sent ones.
fn query_string(existing: Option<&str>, params: Option<&Map<String, Value>>) -> String {
    let mut query = url::form_urlencoded::Serializer::new(existing.unwrap_or("").to_string());
    for (name, value) in params.into_iter().flatten() {
        match value {
            Value::String(s) => query.append_pair(name, s),
            other => query.append_pair(name, &other.to_string()),
        };
    }
    query.finish()
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// One of the known placeholders.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Placeholder {
    DbName,
    Change,
    ChangeId,
    ChangeRev,
    Seq,
}

/// Names without the `$`, longest first so that a bare `$change.id` is not
/// read as `$change` followed by `.id`.
const NAMES: [(&str, Placeholder); 5] = [
    ("change.rev", Placeholder::ChangeRev),
    ("change.id", Placeholder::ChangeId),
    ("db_name", Placeholder::DbName),
    ("change", Placeholder::Change),
    ("seq", Placeholder::Seq),
];

impl Placeholder {
    fn named(name: &str) -> Option<Placeholder> {
        NAMES.iter().find(|(n, _)| *n == name).map(|(_, p)| *p)
    }

    /// The value that replaces a whole string.
    fn value(self, c: &ChangeContext) -> Value {
        match self {
            Placeholder::DbName => Value::from(c.db_name),
            Placeholder::Change => c.doc.clone(),
            Placeholder::ChangeId => Value::from(c.id),
            Placeholder::ChangeRev => Value::from(c.rev),
            Placeholder::Seq => c.seq.clone(),
        }
    }

    /// The text that replaces a placeholder inside a longer string.
    fn text(self, c: &ChangeContext) -> String {
        match self {
            Placeholder::DbName => c.db_name.to_string(),
            Placeholder::Change => c.doc.to_string(),
            Placeholder::ChangeId => c.id.to_string(),
            Placeholder::ChangeRev => c.rev.to_string(),
            Placeholder::Seq => match c.seq {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            },
        }
    }
}

/// Spiegel 1.2's whole-value test: the string matches
/// `/^(\$?)\{?([^}]*)\}?$/` and the two groups joined name a placeholder.
/// Hence its tolerance of unbalanced braces, kept for compatibility.
fn whole_placeholder(s: &str) -> Option<Placeholder> {
    let (dollar, rest) = match s.strip_prefix('$') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let rest = rest.strip_prefix('{').unwrap_or(rest);
    let body = rest.strip_suffix('}').unwrap_or(rest);
    if body.contains('}') {
        return None;
    }
    let name = if dollar {
        body
    } else {
        body.strip_prefix('$')?
    };
    Placeholder::named(name)
}

/// Replaces every placeholder in `input`, both forms, by `render`'s text.
fn substitute(input: &str, mut render: impl FnMut(Placeholder) -> String) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        match placeholder_at(after) {
            Some((placeholder, len)) => {
                out.push_str(&render(placeholder));
                rest = &after[len..];
            }
            None => {
                out.push('$');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The placeholder right after a `$`, and how many bytes it spans.
fn placeholder_at(after: &str) -> Option<(Placeholder, usize)> {
    if let Some(inner) = after.strip_prefix('{') {
        let end = inner.find('}')?;
        return Placeholder::named(&inner[..end]).map(|p| (p, end + 2));
    }
    NAMES.iter().find_map(|(name, placeholder)| {
        let tail = after.strip_prefix(name)?;
        ends_name(tail).then_some((*placeholder, name.len()))
    })
}

/// Whether a bare name stops here: not followed by a name character, nor by
/// a dot and a name character (`$change.foo` is not `$change`).
fn ends_name(tail: &str) -> bool {
    let is_name_char = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut chars = tail.chars();
    match chars.next() {
        None => true,
        Some('.') => !chars.next().is_some_and(is_name_char),
        Some(c) => !is_name_char(c),
    }
}

fn template_object(map: &Map<String, Value>, c: &ChangeContext) -> Map<String, Value> {
    map.iter()
        .map(|(key, value)| (key.clone(), template_value(value, c)))
        .collect()
}

fn template_value(value: &Value, c: &ChangeContext) -> Value {
    match value {
        Value::String(s) => match whole_placeholder(s) {
            Some(placeholder) => placeholder.value(c),
            None => Value::String(substitute(s, |p| p.text(c))),
        },
        Value::Array(items) => Value::Array(items.iter().map(|v| template_value(v, c)).collect()),
        Value::Object(map) => Value::Object(template_object(map, c)),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc() -> Value {
        json!({"_id": "d/1", "_rev": "2-abc", "n": 5})
    }

    fn no_passwords() -> Passwords {
        Passwords::default()
    }

    /// The test change (`d/1` at `2-abc`) of `db`.
    fn context<'a>(db: &'a str, doc: &'a Value, seq: &'a Value) -> ChangeContext<'a> {
        ChangeContext {
            db_name: db,
            doc,
            id: "d/1",
            rev: "2-abc",
            seq,
        }
    }

    fn build_with(
        url: &str,
        method: Method,
        params: Option<&Value>,
        seq: &Value,
        db: &str,
    ) -> Result<Request, RequestError> {
        let doc = doc();
        let change = context(db, &doc, seq);
        let t = RequestTemplate {
            url,
            method,
            params,
            headers: &[],
            timeout: None,
            sign: None,
        };
        Request::build(&t, &change, &no_passwords())
    }

    fn body_json(req: &Request) -> Value {
        serde_json::from_slice(req.body().expect("a body")).expect("JSON body")
    }

    #[test]
    fn whole_values_keep_their_json_type_in_both_forms() {
        let seq = json!(42);
        for (dollar, braces) in [
            ("$db_name", "${db_name}"),
            ("$change", "${change}"),
            ("$change.id", "${change.id}"),
            ("$change.rev", "${change.rev}"),
            ("$seq", "${seq}"),
        ] {
            let params = json!({"a": dollar, "b": braces});
            let req = build_with("http://h/x", Method::Post, Some(&params), &seq, "db").unwrap();
            let body = body_json(&req);
            assert_eq!(body["a"], body["b"], "{dollar}");
        }
        let params = json!({
            "db": "$db_name", "doc": "$change", "id": "$change.id",
            "rev": "${change.rev}", "seq": "$seq"
        });
        let req = build_with("http://h/x", Method::Post, Some(&params), &seq, "db").unwrap();
        assert_eq!(
            body_json(&req),
            json!({"db": "db", "doc": doc(), "id": "d/1", "rev": "2-abc", "seq": 42})
        );
        let string_seq = json!("7-g1AAAA");
        let req = build_with("http://h/x", Method::Post, Some(&params), &string_seq, "db").unwrap();
        assert_eq!(body_json(&req)["seq"], json!("7-g1AAAA"));
    }

    #[test]
    fn unbalanced_braces_match_whole_values_as_in_spiegel_1_2() {
        for s in ["${db_name", "$db_name}", "{$db_name}", "{$db_name"] {
            assert_eq!(whole_placeholder(s), Some(Placeholder::DbName), "{s}");
        }
        for s in [
            "db_name",
            "{db_name}",
            "$$db_name",
            "$db_name}}",
            "$db_}name",
            "$other",
        ] {
            assert_eq!(whole_placeholder(s), None, "{s}");
        }
    }

    #[test]
    fn embedded_placeholders_become_text() {
        let params = json!({
            "a": "db=$db_name, id=${change.id} rev=$change.rev.",
            "b": "doc ${change} seq ${seq}",
            "c": "$db_names $change.foo ${nope} $ cost",
            "d": "${seq}${db_name}",
        });
        let seq = json!([1, "x"]);
        let req = build_with("http://h/x", Method::Put, Some(&params), &seq, "my db").unwrap();
        let body = body_json(&req);
        assert_eq!(body["a"], "db=my db, id=d/1 rev=2-abc.");
        assert_eq!(body["b"], format!("doc {} seq [1,\"x\"]", doc()).as_str());
        assert_eq!(body["c"], "$db_names $change.foo ${nope} $ cost");
        assert_eq!(body["d"], "[1,\"x\"]my db");
        let seq = json!("12-abc");
        let req = build_with("http://h/x", Method::Put, Some(&params), &seq, "db").unwrap();
        assert_eq!(body_json(&req)["d"], "12-abcdb");
    }

    #[test]
    fn nested_params_are_templated_but_keys_are_not() {
        let params = json!({
            "$db_name": {"inner": ["$change.id", {"deep": "${seq}"}, 3, null, true]},
        });
        let req = build_with("http://h/x", Method::Post, Some(&params), &json!(9), "db").unwrap();
        assert_eq!(
            body_json(&req),
            json!({"$db_name": {"inner": ["d/1", {"deep": 9}, 3, null, true]}})
        );
    }

    #[test]
    fn get_and_delete_send_a_query_with_json_text_for_non_strings() {
        let params = json!({
            "db": "$db_name", "n": 5, "t": true, "z": null,
            "o": {"a": 1}, "s": "a b&c", "seq": "$seq",
        });
        for method in [Method::Get, Method::Delete] {
            let req =
                build_with("http://h/x?k=v", method, Some(&params), &json!(3), "a/b").unwrap();
            assert!(req.body().is_none());
            assert!(!req.headers().contains_key(CONTENT_TYPE));
            let query = req.query().unwrap();
            assert_eq!(
                query,
                "k=v&db=a%2Fb&n=5&o=%7B%22a%22%3A1%7D&s=a+b%26c&seq=3&t=true&z=null"
            );
            let pairs: Vec<(String, String)> = req
                .target()
                .query_pairs()
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
            assert!(pairs.contains(&("o".into(), "{\"a\":1}".into())));
            assert!(pairs.contains(&("s".into(), "a b&c".into())));
        }
    }

    #[test]
    fn post_and_put_send_a_json_body_and_empty_object_without_params() {
        for method in [Method::Post, Method::Put] {
            let req = build_with("http://h/x", method, None, &json!(1), "db").unwrap();
            assert_eq!(req.body().unwrap().as_ref(), b"{}");
            assert_eq!(req.headers()[CONTENT_TYPE], "application/json");
            assert_eq!(req.query(), None);
        }
        let req = build_with("http://h/x", Method::Get, None, &json!(1), "db").unwrap();
        assert!(req.body().is_none());
        assert_eq!(req.query(), None);
        assert_eq!(req.target().as_str(), "http://h/x");
        let null = Value::Null;
        let req = build_with("http://h/x", Method::Post, Some(&null), &json!(1), "db").unwrap();
        assert_eq!(req.body().unwrap().as_ref(), b"{}");
    }

    #[test]
    fn params_that_are_not_an_object_are_refused() {
        let params = json!(["$db_name"]);
        let err =
            build_with("http://h/x", Method::Post, Some(&params), &json!(1), "db").unwrap_err();
        assert!(matches!(err, RequestError::ParamsNotObject("an array")));
    }

    #[test]
    fn url_placeholders_are_encoded_as_one_segment() {
        let db = "a/b+c$d(e)";
        for url in ["http://h/hooks/${db_name}/x", "http://h/hooks/$db_name/x"] {
            let req = build_with(url, Method::Get, None, &json!(1), db).unwrap();
            assert_eq!(
                req.target().as_str(),
                "http://h/hooks/a%2Fb%2Bc%24d%28e%29/x"
            );
        }
        let req = build_with(
            "http://h/${db_name}/${change.id}?rev=${change.rev}&seq=$seq",
            Method::Get,
            None,
            &json!("5-x y"),
            "db",
        )
        .unwrap();
        assert_eq!(
            req.target().as_str(),
            "http://h/db/d%2F1?rev=2-abc&seq=5-x%20y"
        );
    }

    #[test]
    fn an_unparsable_url_is_an_error_that_hides_the_password() {
        let err = build_with(
            "http://u:hunter2@[bad/${db_name}",
            Method::Get,
            None,
            &json!(1),
            "db",
        )
        .unwrap_err();
        assert!(matches!(err, RequestError::Url(_)));
        assert!(!err.to_string().contains("hunter2"));
        let err = build_with("ftp://u:hunter2@h/", Method::Get, None, &json!(1), "db").unwrap_err();
        assert!(!err.to_string().contains("hunter2"));
    }

    #[test]
    fn passwords_file_fills_in_basic_auth() {
        let passwords =
            Passwords::parse(r#"{"api.example.com": {"bob": "s3cret"}}"#, "p.json").unwrap();
        let doc = doc();
        let seq = json!(1);
        let change = context("db", &doc, &seq);
        let t = RequestTemplate {
            url: "https://bob@api.example.com/hook",
            method: Method::Post,
            params: None,
            headers: &[],
            timeout: Some(Duration::from_secs(3)),
            sign: None,
        };
        let req = Request::build(&t, &change, &passwords).unwrap();
        assert_eq!(
            req.basic_auth(),
            Some(("bob".to_string(), Some("s3cret".to_string())))
        );
        assert_eq!(req.url().password().as_deref(), Some("s3cret"));
        assert_eq!(req.target().as_str(), "https://api.example.com/hook");
        assert_eq!(req.timeout(), Some(Duration::from_secs(3)));
        assert!(!format!("{req:?}").contains("s3cret"));
        assert!(!req.redacted().to_string().contains("s3cret"));

        // A rule's own Authorization header wins over the URL's user info.
        let headers = [("Authorization".to_string(), "Bearer abc".to_string())];
        let t = RequestTemplate {
            headers: &headers,
            ..t
        };
        let req = Request::build(&t, &change, &passwords).unwrap();
        assert_eq!(req.basic_auth(), None);
        assert_eq!(req.headers()[AUTHORIZATION], "Bearer abc");
    }

    #[test]
    fn redacted_hides_secrets_and_keeps_the_rest() {
        let passwords = Passwords::parse(r#"{"h": {"bob": "pw"}}"#, "p").unwrap();
        let doc = doc();
        let seq = json!(1);
        let change = context("db", &doc, &seq);
        let headers: Vec<(String, String)> = [
            ("X-Api-Key", "k1"),
            ("X-Auth-Thing", "k2"),
            ("X-Access-Token", "k3"),
            ("X-Client-Secret", "k4"),
            ("X-Password", "k5"),
            ("X-Trace", "visible"),
        ]
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
        let signing = Signing {
            secret: "topsecret".into(),
            header: "X-Spiegel-Signature".into(),
        };
        let params = json!({"id": "$change.id"});
        let t = RequestTemplate {
            url: "http://bob@h/hook",
            method: Method::Post,
            params: Some(&params),
            headers: &headers,
            timeout: None,
            sign: Some(&signing),
        };
        let req = Request::build(&t, &change, &passwords).unwrap();
        let shown = req.redacted();
        let text = shown.to_string();
        for secret in ["pw", "k1", "k2", "k3", "k4", "k5", "topsecret", "sha256="] {
            assert!(!text.contains(&format!("\"{secret}")), "{secret} in {text}");
        }
        assert_eq!(shown["method"], "POST");
        assert_eq!(shown["url"], "http://h/hook");
        assert_eq!(shown["query"], Value::Null);
        assert_eq!(shown["body"], json!({"id": "d/1"}));
        let h = &shown["headers"];
        assert_eq!(h["x-trace"], "visible");
        assert_eq!(h["authorization"], "***");
        assert_eq!(h["x-spiegel-signature"], "***");
        assert_eq!(h["x-api-key"], "***");
        assert_eq!(h["content-type"], "application/json");
        assert!(h["user-agent"].as_str().unwrap().starts_with("spiegel/"));
        assert!(!format!("{signing:?}").contains("topsecret"));
    }

    #[test]
    fn identity_is_equal_for_identical_requests_only() {
        let p1 = json!({"id": "$change.id"});
        let p2 = json!({"id": "other"});
        let id = |url: &str, method, params: &Value, db: &str| {
            build_with(url, method, Some(params), &json!(1), db)
                .unwrap()
                .identity()
        };
        let base = id("http://h/${db_name}", Method::Post, &p1, "db");
        assert_eq!(base, id("http://h/${db_name}", Method::Post, &p1, "db"));
        // Credentials do not count.
        assert_eq!(base, id("http://u:p@h/${db_name}", Method::Post, &p1, "db"));
        assert_ne!(base, id("http://h/${db_name}", Method::Put, &p1, "db"));
        assert_ne!(base, id("http://h/${db_name}", Method::Post, &p2, "db"));
        assert_ne!(base, id("http://h/${db_name}", Method::Post, &p1, "db2"));
        let get = id("http://h/x", Method::Get, &p1, "db");
        assert_eq!(get, id("http://h/x", Method::Get, &p1, "db"));
        assert_ne!(get, id("http://h/x", Method::Get, &p2, "db"));
        assert_ne!(get, id("http://h/x", Method::Delete, &p1, "db"));
    }

    fn expected_signature(secret: &[u8], payload: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
        mac.update(payload);
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    }

    #[test]
    fn signature_covers_the_body_or_the_query_as_sent() {
        // RFC 4231 test case 2, so the expected value is independent of our code.
        assert_eq!(
            expected_signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let doc = doc();
        let seq = json!("3-xyz");
        let change = context("a/b", &doc, &seq);
        let signing = Signing {
            secret: "Jefe".into(),
            header: "X-Signature".into(),
        };
        let params = json!({"db": "$db_name", "seq": "$seq", "doc": "$change"});
        let mut t = RequestTemplate {
            url: "http://h/hook?x=1",
            method: Method::Post,
            params: Some(&params),
            headers: &[],
            timeout: None,
            sign: Some(&signing),
        };
        let req = Request::build(&t, &change, &no_passwords()).unwrap();
        let body = req.body().unwrap();
        assert_eq!(
            req.headers()["x-signature"],
            expected_signature(b"Jefe", body).as_str()
        );

        t.method = Method::Get;
        let req = Request::build(&t, &change, &no_passwords()).unwrap();
        let query = req.query().unwrap();
        assert!(query.starts_with("x=1&db=a%2Fb&doc="));
        assert!(req.target().as_str().ends_with(query));
        assert_eq!(
            req.headers()["x-signature"],
            expected_signature(b"Jefe", query.as_bytes()).as_str()
        );

        t.params = None;
        t.url = "http://h/hook";
        t.method = Method::Delete;
        let req = Request::build(&t, &change, &no_passwords()).unwrap();
        assert_eq!(req.query(), None);
        assert_eq!(
            req.headers()["x-signature"],
            expected_signature(b"Jefe", b"").as_str()
        );
    }

    #[test]
    fn invalid_headers_are_named_without_their_value() {
        let doc = doc();
        let seq = json!(1);
        let change = context("db", &doc, &seq);
        let headers = [("X-Token".to_string(), "bad\nvalue".to_string())];
        let t = RequestTemplate {
            url: "http://h/",
            method: Method::Get,
            params: None,
            headers: &headers,
            timeout: None,
            sign: None,
        };
        let err = Request::build(&t, &change, &no_passwords()).unwrap_err();
        assert!(matches!(err, RequestError::HeaderValue(_)));
        assert!(!err.to_string().contains("bad"));
        let headers = [("Bad Name".to_string(), "v".to_string())];
        let t = RequestTemplate {
            headers: &headers,
            ..t
        };
        let err = Request::build(&t, &change, &no_passwords()).unwrap_err();
        assert!(matches!(err, RequestError::HeaderName(_)));
    }

    #[test]
    fn user_agent_and_content_type_are_set_unless_the_rule_sets_them() {
        let req = build_with("http://h/", Method::Post, None, &json!(1), "db").unwrap();
        assert_eq!(
            req.headers()[USER_AGENT],
            concat!("spiegel/", env!("CARGO_PKG_VERSION"))
        );
        assert_eq!(req.headers()[CONTENT_TYPE], "application/json");

        let doc = doc();
        let seq = json!(1);
        let change = context("db", &doc, &seq);
        let headers = [
            ("User-Agent".to_string(), "mine".to_string()),
            (
                "Content-Type".to_string(),
                "application/vnd.x+json".to_string(),
            ),
        ];
        let t = RequestTemplate {
            url: "http://h/",
            method: Method::Put,
            params: None,
            headers: &headers,
            timeout: None,
            sign: None,
        };
        let req = Request::build(&t, &change, &no_passwords()).unwrap();
        assert_eq!(req.headers()[USER_AGENT], "mine");
        assert_eq!(req.headers()[CONTENT_TYPE], "application/vnd.x+json");
        assert_eq!(req.headers().len(), 2);
    }

    #[test]
    fn method_names_parse_case_insensitively() {
        assert_eq!(Method::from_name("post"), Some(Method::Post));
        assert_eq!(Method::from_name("Delete"), Some(Method::Delete));
        assert_eq!(Method::from_name("PATCH"), None);
        assert_eq!(Method::default(), Method::Get);
        assert_eq!(reqwest::Method::from(Method::Put), reqwest::Method::PUT);
    }
}
