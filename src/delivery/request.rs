//! Building the HTTP request of an on_change rule for one change, from the
//! rule's compiled [`Template`] (placeholders are filled in there, see
//! [`crate::rules::on_change::template`]).
//!
//! # Query string and body
//!
//! GET and DELETE send the params as the query string, appended to any
//! query the URL already has: string values as they are, every other value
//! (number, boolean, null, object, array) as compact JSON text, all
//! `application/x-www-form-urlencoded` (a space becomes `+`). POST and PUT
//! send the params as a JSON body, `{}` when the rule has no params (as
//! Spiegel 1.2 did); GET and DELETE never send a body.
//!
//! # Headers
//!
//! The rule's headers, then `User-Agent: spiegel/<version>` and
//! `Content-Type: application/json` (with a body) unless the rule sets them,
//! Basic auth from the URL's user info unless the rule sets `Authorization`
//! (credentials never travel in the request URL), and the signature.
//!
//! # Idempotency key
//!
//! Every request carries `Idempotency-Key: <32 hex digits>`, unless the rule
//! sets that header itself: the same for every attempt, redelivery and
//! failover of the rule's request for one revision of one document of one
//! database ([`ChangeContext::delivery_id`], also the `$delivery_id`
//! placeholder). Delivery is at least once; a receiver that remembers the
//! keys it has handled sees each change once.
//!
//! # Signature
//!
//! With `"scheme": "standard-webhooks"`, the request is signed as the
//! Standard Webhooks specification says: `webhook-id` (the idempotency key),
//! `webhook-timestamp` (Unix seconds when the request is sent: taken and
//! signed after any wait for the rule's pace or the endpoint, so that a
//! receiver's tolerance of a few minutes holds however long it waited) and
//! `webhook-signature: v1,<base64 HMAC-SHA256>` of `<id>.<timestamp>.<body>`,
//! keyed with the bytes of the `whsec_` secret; any of the specification's
//! libraries verifies it.
//!
//! Otherwise (`"hmac-sha256"`, the default), the request carries the header named by the rule, whose
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
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use sha2::Sha256;
use url::Url;

use crate::couch::{SecretUrl, UrlError};

/// The header of the idempotency key.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
use crate::rules::on_change::{ChangeContext, Method, Signing, Template};

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
    #[error("a batch needs at least one change")]
    EmptyBatch,
}

/// The idempotency key of a batch: 32 hex digits of a SHA-256 of its
/// changes' keys, in order.
fn batch_id(changes: &[ChangeContext]) -> String {
    use sha2::Digest;
    let mut hash = Sha256::new();
    for change in changes {
        hash.update(change.delivery_id().as_bytes());
    }
    hex::encode(&hash.finalize()[..16])
}

/// A request ready to send: templated, with credentials and signature.
#[derive(Clone)]
pub struct Request {
    method: Method,
    /// The full URL with credentials and the query as sent.
    url: SecretUrl,
    body: Option<Bytes>,
    /// Everything sent except Basic auth, which comes from `url` at send
    /// time, and the Standard Webhooks timestamp and signature.
    headers: HeaderMap,
    /// The Standard Webhooks key, to sign with when the request is sent.
    standard_key: Option<Vec<u8>>,
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
    /// The rule's request for one change: URL and params filled in (with the
    /// password of the URL's user), query or body, headers, and signature.
    pub fn build(t: &Template, change: &ChangeContext) -> Result<Request, RequestError> {
        let url = t.url_for(change)?;
        let mut full = url.expose().clone();
        full.set_fragment(None);
        let body = if t.method.has_body() {
            let body = t.body_for(change).map_err(RequestError::ParamsNotObject)?;
            Some(Bytes::from(body))
        } else {
            let params = t.query_for(change).map_err(RequestError::ParamsNotObject)?;
            let query = query_string(full.query(), &params);
            full.set_query((!query.is_empty()).then_some(query.as_str()));
            None
        };
        Self::finish(t, full, body, change.delivery_id())
    }

    /// The rule's request for a batch of changes of one database, in
    /// change order: a JSON array body of each change's params (`{}` for a
    /// change without), the URL of the first change, and an idempotency
    /// key of its own, the same whenever the same changes are sent
    /// together. The rule's method has a body (checked when it is read).
    pub fn build_batch(t: &Template, changes: &[ChangeContext]) -> Result<Request, RequestError> {
        let first = changes.first().ok_or(RequestError::EmptyBatch)?;
        let mut body = String::from("[");
        for (i, change) in changes.iter().enumerate() {
            if i > 0 {
                body.push(',');
            }
            let params = t.body_for(change).map_err(RequestError::ParamsNotObject)?;
            body.push_str(&params);
        }
        body.push(']');
        let mut full = t.url_for(first)?.expose().clone();
        full.set_fragment(None);
        Self::finish(t, full, Some(Bytes::from(body)), batch_id(changes))
    }

    /// Headers, the idempotency key `id` and the signature.
    fn finish(
        t: &Template,
        full: Url,
        body: Option<Bytes>,
        id: String,
    ) -> Result<Request, RequestError> {
        // Re-parsed so that the stored URL is exactly the one sent.
        let url = SecretUrl::parse(full.as_str())?;
        let mut headers = headers(&t.headers, body.is_some())?;
        if !headers.contains_key(IDEMPOTENCY_KEY) {
            headers.insert(IDEMPOTENCY_KEY, header_value(&id)?);
        }
        let signature_header = match &t.sign {
            Some(Signing::Hmac { secret, header }) => {
                let payload = match &body {
                    Some(body) => body.as_ref(),
                    None => url.expose().query().unwrap_or("").as_bytes(),
                };
                Some(add_signature(&mut headers, header, secret, payload)?)
            }
            Some(Signing::StandardWebhooks { .. }) => {
                headers.insert(HeaderName::from_static("webhook-id"), header_value(&id)?);
                Some(WEBHOOK_SIGNATURE)
            }
            None => None,
        };
        let standard_key = match &t.sign {
            Some(Signing::StandardWebhooks { key }) => Some(key.clone()),
            _ => None,
        };

        Ok(Request {
            method: t.method,
            url,
            body,
            headers,
            standard_key,
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

    /// The endpoint: scheme, host and port.
    pub fn origin(&self) -> String {
        self.url.expose().origin().ascii_serialization()
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

    /// Headers to send, Basic auth excepted (see [`Request::basic_auth`]),
    /// with a Standard Webhooks timestamp and signature made now: called
    /// right before the request goes.
    pub fn headers(&self) -> HeaderMap {
        let mut headers = self.headers.clone();
        if let Some(key) = &self.standard_key {
            let id = self.headers.get("webhook-id").map(HeaderValue::as_bytes);
            let body = self.body.as_deref().unwrap_or_default();
            stamp(&mut headers, key, id.unwrap_or_default(), body);
        }
        headers
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
    pub fn redacted(&self) -> Box<RawValue> {
        let mut url = self.target();
        url.set_query(None);
        let mut headers = Map::new();
        for (name, value) in &self.headers() {
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
            let json = std::str::from_utf8(body).ok();
            match json.and_then(|text| serde_json::from_str::<&RawValue>(text).ok()) {
                Some(json) => Shown::Json(json),
                None => Shown::Text(String::from_utf8_lossy(body)),
            }
        });
        let record = Redacted {
            method: self.method.as_str(),
            url: url.as_str(),
            query: self.query(),
            body,
            headers,
        };
        // Strings, a map of strings and JSON text already parsed: it
        // serializes.
        serde_json::value::to_raw_value(&record).expect("a redacted request serializes")
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
        if name == IDEMPOTENCY_KEY {
            return false;
        }
        let name = name.as_str();
        self.signature_header
            .as_ref()
            .is_some_and(|h| h.as_str() == name)
            || ["secret", "token", "key", "password", "auth"]
                .iter()
                .any(|word| name.contains(word))
    }
}

/// The rule's headers, then `User-Agent` and, with a body, `Content-Type`
/// unless the rule sets them.
fn headers(rule_headers: &[(String, String)], has_body: bool) -> Result<HeaderMap, RequestError> {
    let mut headers = HeaderMap::new();
    for (name, value) in rule_headers {
        let (name, value) = header(name, value)?;
        headers.append(name, value);
    }
    if !headers.contains_key(USER_AGENT) {
        headers.insert(
            USER_AGENT,
            HeaderValue::from_static(concat!("spiegel/", env!("CARGO_PKG_VERSION"))),
        );
    }
    if has_body && !headers.contains_key(CONTENT_TYPE) {
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    Ok(headers)
}

/// Signs `payload` into the rule's signature header; returns its name.
fn add_signature(
    headers: &mut HeaderMap,
    header_name: &str,
    secret: &str,
    payload: &[u8],
) -> Result<HeaderName, RequestError> {
    let signature = format!(
        "sha256={}",
        hex::encode(hmac(secret.as_bytes(), &[payload]))
    );
    let (name, value) = header(header_name, &signature)?;
    headers.insert(name.clone(), value);
    Ok(name)
}

/// The header of the Standard Webhooks signature.
const WEBHOOK_SIGNATURE: HeaderName = HeaderName::from_static("webhook-signature");

/// Stamps the Standard Webhooks way: `webhook-timestamp` (now) and
/// `webhook-signature` over the id, the timestamp and the body.
fn stamp(headers: &mut HeaderMap, key: &[u8], id: &[u8], body: &[u8]) {
    use base64::Engine;
    let timestamp = chrono::Utc::now().timestamp();
    let signed = format!(".{timestamp}.");
    let mac = hmac(key, &[id, signed.as_bytes(), body]);
    let signature = format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac)
    );
    headers.insert(
        HeaderName::from_static("webhook-timestamp"),
        HeaderValue::from(timestamp),
    );
    // "v1," and base64 are visible ASCII: always a valid header value.
    if let Ok(value) = HeaderValue::from_str(&signature) {
        headers.insert(WEBHOOK_SIGNATURE, value);
    }
}

/// HMAC-SHA256 of the concatenated `parts`.
fn hmac(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    // HMAC takes keys of any length; this branch cannot be taken.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return Vec::new();
    };
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().to_vec()
}

fn header_value(value: &str) -> Result<HeaderValue, RequestError> {
    HeaderValue::from_str(value).map_err(|_| RequestError::HeaderValue(value.to_string()))
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
fn query_string(existing: Option<&str>, params: &[(&str, String)]) -> String {
    let mut query = url::form_urlencoded::Serializer::new(existing.unwrap_or("").to_string());
    for (name, text) in params {
        query.append_pair(name, text);
    }
    query.finish()
}

/// A request as a dead letter records it: its body as the JSON text sent
/// (a document in it keeps its key order and number text), or as text.
#[derive(Serialize)]
struct Redacted<'a> {
    method: &'a str,
    url: &'a str,
    query: Option<&'a str>,
    body: Option<Shown<'a>>,
    headers: Map<String, Value>,
}

/// A body as recorded.
#[derive(Serialize)]
#[serde(untagged)]
enum Shown<'a> {
    Json(&'a RawValue),
    Text(std::borrow::Cow<'a, str>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use serde_json::value::RawValue;

    use crate::config::Passwords;
    use crate::rules::on_change::template::UrlPassword;

    /// The test document, as CouchDB would send it: keys in its own order,
    /// numbers that a parsed `Value` would write differently.
    const DOC: &str = r#"{"_rev":"2-abc","_id":"d/1","n":5,"x":1.0,"big":18446744073709551616}"#;

    fn doc() -> Box<RawValue> {
        RawValue::from_string(DOC.to_string()).unwrap()
    }

    /// The test document parsed, to compare with a parsed body.
    fn doc_value() -> Value {
        serde_json::from_str(DOC).unwrap()
    }

    /// A rule's request to `url` without params, headers or signature.
    fn template(url: &str, method: Method) -> Template {
        Template {
            url: url.to_string(),
            method,
            ..Template::default()
        }
    }

    /// The template with the password `passwords` gives its URL's user.
    fn with_passwords(t: Template, passwords: &Passwords) -> Template {
        Template {
            password: UrlPassword::lookup(&t.url, passwords),
            ..t
        }
    }

    /// The test change (`d/1` at `2-abc`) of `db`.
    fn context<'a>(db: &'a str, doc: &'a RawValue, seq: &'a Value) -> ChangeContext<'a> {
        ChangeContext {
            rule: "rule",
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
        let t = Template {
            params: params.cloned(),
            ..template(url, method)
        };
        Request::build(&t, &change)
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
            json!({"db": "db", "doc": doc_value(), "id": "d/1", "rev": "2-abc", "seq": 42})
        );
        let string_seq = json!("7-g1AAAA");
        let req = build_with("http://h/x", Method::Post, Some(&params), &string_seq, "db").unwrap();
        assert_eq!(body_json(&req)["seq"], json!("7-g1AAAA"));
    }

    #[test]
    fn the_document_is_sent_as_its_own_text_in_bodies_batches_and_queries() {
        let params = json!({"doc": "$change", "in": ["${change}"], "t": "doc ${change}."});
        let seq = json!(7);
        let req = build_with("http://h/x", Method::Post, Some(&params), &seq, "db").unwrap();
        let text = Value::from(format!("doc {DOC}.")).to_string();
        let expected = format!(r#"{{"doc":{DOC},"in":[{DOC}],"t":{text}}}"#);
        assert_eq!(req.body().unwrap().as_ref(), expected.as_bytes());

        let doc = doc();
        let change = context("db", &doc, &seq);
        let t = Template {
            params: Some(json!({"doc": "$change"})),
            ..template("http://h/x", Method::Post)
        };
        let req = Request::build_batch(&t, &[change, change]).unwrap();
        let expected = format!(r#"[{{"doc":{DOC}}},{{"doc":{DOC}}}]"#);
        assert_eq!(req.body().unwrap().as_ref(), expected.as_bytes());

        let req = build_with("http://h/x", Method::Get, Some(&params), &seq, "db").unwrap();
        let target = req.target();
        let doc_pair = target.query_pairs().find(|(k, _)| k == "doc");
        assert_eq!(doc_pair.unwrap().1, DOC);
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
        let t = Template {
            timeout: Some(Duration::from_secs(3)),
            ..template("https://bob@api.example.com/hook", Method::Post)
        };
        let t = with_passwords(t, &passwords);
        let req = Request::build(&t, &change).unwrap();
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
        let headers = vec![("Authorization".to_string(), "Bearer abc".to_string())];
        let t = Template { headers, ..t };
        let req = Request::build(&t, &change).unwrap();
        assert_eq!(req.basic_auth(), None);
        assert_eq!(req.headers()[AUTHORIZATION], "Bearer abc");
    }

    /// The dead-letter record of `req`, parsed.
    fn shown(req: &Request) -> Value {
        serde_json::from_str(req.redacted().get()).unwrap()
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
        let signing = Signing::Hmac {
            secret: "topsecret".into(),
            header: "X-Spiegel-Signature".into(),
        };
        let params = json!({"id": "$change.id"});
        let t = Template {
            params: Some(params),
            headers,
            sign: Some(signing.clone()),
            ..template("http://bob@h/hook", Method::Post)
        };
        let req = Request::build(&with_passwords(t, &passwords), &change).unwrap();
        let text = req.redacted().get().to_string();
        let shown: Value = serde_json::from_str(&text).unwrap();
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

    #[test]
    fn every_request_carries_an_idempotency_key_stable_for_its_rule_and_revision() {
        let (doc, seq) = (doc(), json!("3-x"));
        let change = context("db", &doc, &seq);
        let t = Template {
            params: Some(json!({"key": "$delivery_id"})),
            ..template("http://h/hook", Method::Post)
        };
        let req = Request::build(&t, &change).unwrap();
        let id = change.delivery_id();
        assert_eq!(id.len(), 32);
        assert_eq!(req.headers()["idempotency-key"], id.as_str());
        let body: Value = serde_json::from_slice(req.body().unwrap()).unwrap();
        assert_eq!(body["key"], id.as_str(), "and as $delivery_id");
        assert_eq!(shown(&req)["headers"]["idempotency-key"], id.as_str());
        let other_seq = json!("9-y");
        assert_eq!(
            context("db", &doc, &other_seq).delivery_id(),
            id,
            "the seq does not count"
        );
        let others = [
            ChangeContext {
                rev: "3-def",
                ..change
            },
            ChangeContext {
                rule: "other",
                ..change
            },
            ChangeContext {
                db_name: "db2",
                ..change
            },
            ChangeContext {
                id: "d/2",
                ..change
            },
        ];
        for other in others {
            assert_ne!(other.delivery_id(), id, "{other:?}");
        }
    }

    #[test]
    fn standard_webhooks_signs_the_id_the_timestamp_and_the_body() {
        use base64::Engine;
        let (doc, seq) = (doc(), json!("3-x"));
        let change = context("db", &doc, &seq);
        let t = Template {
            params: Some(json!({"id": "$change.id"})),
            sign: Some(Signing::StandardWebhooks {
                key: b"a key".to_vec(),
            }),
            ..template("http://h/hook", Method::Post)
        };
        let req = Request::build(&t, &change).unwrap();
        let h = req.headers();
        let id = change.delivery_id();
        assert_eq!(h["webhook-id"], id.as_str());
        let timestamp = h["webhook-timestamp"].to_str().unwrap();
        let age = chrono::Utc::now().timestamp() - timestamp.parse::<i64>().unwrap();
        assert!((0..5).contains(&age), "{age}");
        let mut mac = Hmac::<Sha256>::new_from_slice(b"a key").unwrap();
        mac.update(format!("{id}.{timestamp}.").as_bytes());
        mac.update(req.body().unwrap());
        let expected =
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        assert_eq!(h["webhook-signature"], format!("v1,{expected}").as_str());
        assert_eq!(shown(&req)["headers"]["webhook-signature"], "***");
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
        let signing = Signing::Hmac {
            secret: "Jefe".into(),
            header: "X-Signature".into(),
        };
        let params = json!({"db": "$db_name", "seq": "$seq", "doc": "$change"});
        let mut t = Template {
            params: Some(params),
            sign: Some(signing),
            ..template("http://h/hook?x=1", Method::Post)
        };
        let req = Request::build(&t, &change).unwrap();
        let body = req.body().unwrap();
        assert_eq!(
            req.headers()["x-signature"],
            expected_signature(b"Jefe", body).as_str()
        );

        t.method = Method::Get;
        let req = Request::build(&t, &change).unwrap();
        let query = req.query().unwrap();
        assert!(query.starts_with("x=1&db=a%2Fb&doc="));
        assert!(req.target().as_str().ends_with(query));
        assert_eq!(
            req.headers()["x-signature"],
            expected_signature(b"Jefe", query.as_bytes()).as_str()
        );

        t.params = None;
        t.url = "http://h/hook".to_string();
        t.method = Method::Delete;
        let req = Request::build(&t, &change).unwrap();
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
        let headers = vec![("X-Token".to_string(), "bad\nvalue".to_string())];
        let t = Template {
            headers,
            ..template("http://h/", Method::Get)
        };
        let err = Request::build(&t, &change).unwrap_err();
        assert!(matches!(err, RequestError::HeaderValue(_)));
        assert!(!err.to_string().contains("bad"));
        let headers = vec![("Bad Name".to_string(), "v".to_string())];
        let t = Template { headers, ..t };
        let err = Request::build(&t, &change).unwrap_err();
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
        let headers = vec![
            ("User-Agent".to_string(), "mine".to_string()),
            (
                "Content-Type".to_string(),
                "application/vnd.x+json".to_string(),
            ),
        ];
        let t = Template {
            headers,
            ..template("http://h/", Method::Put)
        };
        let req = Request::build(&t, &change).unwrap();
        assert_eq!(req.headers()[USER_AGENT], "mine");
        assert_eq!(req.headers()[CONTENT_TYPE], "application/vnd.x+json");
        assert_eq!(req.headers().len(), 3, "and the idempotency key");
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
