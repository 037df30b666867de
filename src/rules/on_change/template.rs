//! The request of an on_change rule, compiled once: a [`Template`], filled
//! in for each change by its placeholders ([`super::placeholder`]).
//!
//! The request members of the document: `url` (required; an http(s) URL
//! once its placeholders are filled in, whose `user@host` gets its password
//! from the passwords file), `method` (GET, POST, PUT or DELETE, in any case,
//! default GET), `params` (an object), `headers` (an object of valid header
//! names and string values), `timeout` (seconds, above 0 and at most 3600)
//! and `sign` (where the signing secret is, and the header that carries the
//! signature). Everything the document only names (the signing secret, the
//! password of the URL's user) is looked up when the rule is compiled; how
//! the request goes on the wire is the delivery's business.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};

use super::placeholder::{fill_url, query_text, replace_all, write_object, ChangeContext};
use super::{option_members, present, string_member, OnChangeDocError, Result};
use crate::config::Passwords;
use crate::couch::{redact_credentials, SecretUrl, UrlError};
use crate::rules::{nests_within, MAX_JSON_DEPTH};

/// The signature header when `sign` does not name one.
pub const DEFAULT_SIGN_HEADER: &str = "X-Spiegel-Signature";

/// Upper bound of a per-rule timeout: an API that answers after an hour is
/// better treated as a failure and retried.
const MAX_TIMEOUT_SECS: f64 = 3600.0;

/// What every placeholder of a URL is replaced by to check, when the rule is
/// read, that the URL is well formed once filled in, even when a placeholder
/// stands for (part of) the host name.
const URL_SAMPLE: &str = "sample";

const SIGN_MEMBERS: [&str; 5] = [
    "secret_env",
    "secret_host",
    "secret_user",
    "header",
    "scheme",
];

/// The prefix of a Standard Webhooks secret: `whsec_` and the key in base64.
const STANDARD_SECRET_PREFIX: &str = "whsec_";

/// The request of a rule: validated, its secrets resolved, its placeholders
/// left in place since they depend on each change.
///
/// `Debug` shows neither header values nor secrets.
#[derive(Clone, Default)]
pub struct Template {
    /// The URL as written, placeholders in place. Checked to be an http(s)
    /// URL once they are filled in.
    pub url: String,
    pub method: Method,
    /// A JSON object when present; its placeholders are left in place.
    pub params: Option<Value>,
    /// Extra request headers, in the order of the document's `headers`
    /// object as read (names are valid HTTP header names).
    pub headers: Vec<(String, String)>,
    /// How long to wait for the response before counting a failure; `None`
    /// for the sender's default.
    pub timeout: Option<Duration>,
    /// How to sign the request, if at all.
    pub sign: Option<Signing>,
    /// The password the passwords file gives the URL's user.
    pub password: UrlPassword,
}

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

/// How to sign requests, the secret resolved from wherever the rule points.
#[derive(Clone, PartialEq, Eq)]
pub enum Signing {
    /// Spiegel's own: `sha256=<hex HMAC-SHA256>` of the payload, in `header`.
    Hmac { secret: String, header: String },
    /// The Standard Webhooks specification's: `webhook-id`,
    /// `webhook-timestamp` and `webhook-signature`, keyed with the bytes of
    /// a `whsec_` secret.
    StandardWebhooks { key: Vec<u8> },
}

/// The `sign` member as written: where the secret is, and the scheme.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignSpec {
    pub secret: SecretSource,
    pub scheme: SignScheme,
}

/// `"scheme"` of `sign`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignScheme {
    /// `"hmac-sha256"` (the default), with the header that carries it.
    Hmac { header: String },
    /// `"standard-webhooks"`.
    StandardWebhooks,
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

/// What the passwords file gives a `user@host` URL without a password.
#[derive(Clone, Default)]
pub enum UrlPassword {
    /// Nothing: the URL has no user, has its own password, or the file has
    /// no entry for its user and host.
    #[default]
    None,
    /// The password of the URL's user, looked up when the rule was compiled.
    Known(String),
    /// The URL's user or host holds a placeholder: the file is looked up for
    /// each change.
    PerChange(Arc<Passwords>),
}

impl Template {
    /// Validates the request members of an on_change document (`url`,
    /// `method`, `params`, `timeout`, `headers`; `sign` is [`SignSpec`]'s).
    /// Nothing is looked up yet: see [`Template::resolve`].
    pub(super) fn parse(doc: &Value) -> Result<Self> {
        let url = match present(doc, "url") {
            None => return Err(OnChangeDocError::MissingUrl),
            Some(Value::String(url)) => url,
            Some(_) => return Err(OnChangeDocError::BadUrl("must be a string".to_string())),
        };
        // The error never repeats the URL, which may hold a password.
        sample_url(url).map_err(|e| OnChangeDocError::BadUrl(e.to_string()))?;
        let method = match present(doc, "method") {
            None => Method::Get,
            Some(Value::String(name)) => Method::from_name(name)
                .ok_or_else(|| OnChangeDocError::UnknownMethod(format!("{name:?}")))?,
            Some(other) => return Err(OnChangeDocError::UnknownMethod(other.to_string())),
        };
        let params = match present(doc, "params") {
            None => None,
            // Filled in for each change by recursion: see `MAX_JSON_DEPTH`.
            Some(params) if !nests_within(params, MAX_JSON_DEPTH) => {
                return Err(OnChangeDocError::TooDeep("params"))
            }
            Some(params @ Value::Object(_)) => Some(params.clone()),
            Some(_) => return Err(OnChangeDocError::ParamsNotObject),
        };
        let timeout = present(doc, "timeout").map(parse_timeout).transpose()?;
        Ok(Template {
            url: url.clone(),
            method,
            params,
            headers: present(doc, "headers").map_or(Ok(Vec::new()), parse_headers)?,
            timeout,
            sign: None,
            password: UrlPassword::None,
        })
    }

    /// Completes a parsed template with what the document only names: the
    /// signing secret, and the password of the URL's user.
    pub(super) fn resolve(self, sign: Option<&SignSpec>, passwords: &Passwords) -> Result<Self> {
        let standard = sign.is_some_and(|s| s.scheme == SignScheme::StandardWebhooks);
        if standard && !self.method.has_body() {
            return Err(OnChangeDocError::BadSign(
                "the standard-webhooks scheme signs a body: use the POST or PUT method".into(),
            ));
        }
        Ok(Template {
            sign: sign.map(|s| s.resolve(passwords)).transpose()?,
            password: UrlPassword::lookup(&self.url, passwords),
            ..self
        })
    }

    /// The URL for one change: each placeholder replaced by its text,
    /// percent-encoded as one path segment, and the password of its user
    /// filled in. Err: the URL does not parse, or a text is a whole path
    /// segment `.` or `..` (see [`fill_url`]).
    pub fn url_for(&self, change: &ChangeContext) -> Result<SecretUrl, UrlError> {
        Ok(self
            .password
            .apply(SecretUrl::parse(&fill_url(&self.url, change)?)?))
    }

    /// The params for one change as a JSON body, placeholders filled in
    /// at any depth (`$change` is the document's own text); `{}` when
    /// absent or `null`. Err: the JSON type of params that are not an
    /// object.
    pub fn body_for(&self, change: &ChangeContext) -> std::result::Result<String, &'static str> {
        let mut body = String::new();
        match self.params_object()? {
            None => body.push_str("{}"),
            Some(map) => write_object(&mut body, map, change),
        }
        Ok(body)
    }

    /// The params for one change as query pairs of names and texts (see
    /// [`query_text`]); none when absent or `null`. Err: as
    /// [`Template::body_for`].
    pub fn query_for(
        &self,
        change: &ChangeContext,
    ) -> std::result::Result<Vec<(&str, String)>, &'static str> {
        Ok(self
            .params_object()?
            .into_iter()
            .flatten()
            .map(|(name, value)| (name.as_str(), query_text(value, change)))
            .collect())
    }

    /// The params object; `null` counts as absent.
    fn params_object(&self) -> std::result::Result<Option<&Map<String, Value>>, &'static str> {
        match &self.params {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(map)) => Ok(Some(map)),
            Some(other) => Err(json_type(other)),
        }
    }
}

impl fmt::Debug for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let header_names: Vec<&str> = self.headers.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("Template")
            .field("url", &redact_credentials(&self.url))
            .field("method", &self.method)
            .field("params", &self.params)
            .field("headers", &header_names)
            .field("timeout", &self.timeout)
            .field("sign", &self.sign)
            .field("password", &self.password)
            .finish()
    }
}

/// The URL with every placeholder replaced by [`URL_SAMPLE`], parsed.
fn sample_url(url: &str) -> Result<SecretUrl, UrlError> {
    SecretUrl::parse(&replace_all(url, URL_SAMPLE))
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
    pub fn has_body(self) -> bool {
        matches!(self, Method::Post | Method::Put)
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Signing {
    // The secret must never reach a log line through `{:?}`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Signing::Hmac { header, .. } => f
                .debug_struct("Hmac")
                .field("secret", &"***")
                .field("header", header)
                .finish(),
            Signing::StandardWebhooks { .. } => f
                .debug_struct("StandardWebhooks")
                .field("key", &"***")
                .finish(),
        }
    }
}

impl SignSpec {
    pub(super) fn parse(sign: &Value) -> Result<Self> {
        let bad = OnChangeDocError::BadSign;
        let members = option_members(
            sign,
            &SIGN_MEMBERS,
            bad,
            "must be an object with `secret_env`, or `secret_host` and `secret_user`",
        )?;
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
        let header = string_member(members, "header", bad)?;
        let scheme = match (string_member(members, "scheme", bad)?, header) {
            (None | Some("hmac-sha256"), None) => SignScheme::Hmac {
                header: DEFAULT_SIGN_HEADER.to_string(),
            },
            (None | Some("hmac-sha256"), Some(name)) if is_header_name(name) => SignScheme::Hmac {
                header: name.to_string(),
            },
            (None | Some("hmac-sha256"), Some(name)) => {
                return Err(bad(format!("{name:?} is not a valid header name")))
            }
            (Some("standard-webhooks"), None) => SignScheme::StandardWebhooks,
            (Some("standard-webhooks"), Some(_)) => {
                return Err(bad(
                    "the standard-webhooks scheme has its own headers: remove `header`".into(),
                ))
            }
            (Some(other), _) => {
                return Err(bad(format!(
                    "scheme {other:?} is unknown: use \"hmac-sha256\" or \"standard-webhooks\""
                )))
            }
        };
        Ok(SignSpec { secret, scheme })
    }

    /// The secret, from the environment of the Spiegel process or from the
    /// passwords file.
    fn resolve(&self, passwords: &Passwords) -> Result<Signing> {
        let missing = OnChangeDocError::Secret;
        let secret = match &self.secret {
            SecretSource::Env(name) => std::env::var(name)
                .map_err(|_| missing(format!("environment variable {name} is not set")))?,
            SecretSource::Passwords { host, user } => passwords
                .lookup(host, host, user)
                .map(String::from)
                .ok_or_else(|| {
                    missing(format!(
                        "no password for {user}@{host} in the passwords file"
                    ))
                })?,
        };
        match &self.scheme {
            SignScheme::Hmac { header } => Ok(Signing::Hmac {
                secret,
                header: header.clone(),
            }),
            SignScheme::StandardWebhooks => Ok(Signing::StandardWebhooks {
                key: standard_key(&secret).ok_or_else(|| {
                    missing(format!(
                        "the secret is not a Standard Webhooks secret ({STANDARD_SECRET_PREFIX} and base64)"
                    ))
                })?,
            }),
        }
    }
}

/// The key of a `whsec_<base64>` secret.
fn standard_key(secret: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    let encoded = secret.trim().strip_prefix(STANDARD_SECRET_PREFIX)?;
    let key = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    (!key.is_empty()).then_some(key)
}

impl UrlPassword {
    /// What the passwords file gives the user of a URL template. Looked up
    /// now unless a placeholder may stand in the URL's user info or host
    /// (the sample text shows there), which keeps the file for each change.
    pub fn lookup(url: &str, passwords: &Passwords) -> UrlPassword {
        let Ok(sample) = sample_url(url) else {
            return UrlPassword::None;
        };
        let authority = [
            sample.username(),
            sample.password(),
            sample.host_with_port(),
        ];
        if authority
            .iter()
            .flatten()
            .any(|part| part.contains(URL_SAMPLE))
        {
            return UrlPassword::PerChange(Arc::new(passwords.clone()));
        }
        let (None, Some(user), Some(host), Some(host_port)) = (
            sample.password(),
            sample.username(),
            sample.host(),
            sample.host_with_port(),
        ) else {
            return UrlPassword::None;
        };
        passwords
            .lookup(&host_port, host, &user)
            .map_or(UrlPassword::None, |p| UrlPassword::Known(p.to_string()))
    }

    /// The URL with its user's password filled in, as
    /// [`Passwords::apply`] would.
    fn apply(&self, url: SecretUrl) -> SecretUrl {
        match self {
            UrlPassword::None => url,
            UrlPassword::Known(password) => url.with_password(password),
            UrlPassword::PerChange(passwords) => passwords.apply(&url),
        }
    }
}

impl fmt::Debug for UrlPassword {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UrlPassword::None => "None",
            UrlPassword::Known(_) => "Known(***)",
            UrlPassword::PerChange(_) => "PerChange",
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hostile_input;
    use proptest::prelude::*;
    use serde_json::json;

    fn passwords() -> Passwords {
        Passwords::parse(
            r#"{"api.example.com": {"bob": "pw1"}, "alice.example.com": {"bob": "pw2"}}"#,
            "p.json",
        )
        .unwrap()
    }

    /// The URL of `template` for a change of database `db`, with credentials.
    fn url_for(url: &str, db: &str) -> SecretUrl {
        let template = Template {
            url: url.to_string(),
            password: UrlPassword::lookup(url, &passwords()),
            ..Template::default()
        };
        let (doc, seq) = (
            serde_json::value::to_raw_value(&json!({"_id": "d"})).unwrap(),
            json!(1),
        );
        let change = ChangeContext {
            rule: "rule",
            db_name: db,
            doc: &doc,
            id: "d",
            rev: "1-a",
            seq: &seq,
        };
        template.url_for(&change).unwrap()
    }

    #[test]
    fn the_url_password_is_looked_up_once_unless_the_host_is_a_placeholder() {
        let fixed = "https://bob@api.example.com/${db_name}";
        assert!(matches!(
            UrlPassword::lookup(fixed, &passwords()),
            UrlPassword::Known(p) if p == "pw1"
        ));
        assert_eq!(url_for(fixed, "x").password().as_deref(), Some("pw1"));

        let templated = "https://bob@${db_name}.example.com/hook";
        assert!(matches!(
            UrlPassword::lookup(templated, &passwords()),
            UrlPassword::PerChange(_)
        ));
        assert_eq!(
            url_for(templated, "alice").password().as_deref(),
            Some("pw2")
        );
        assert_eq!(url_for(templated, "carol").password(), None);

        for none in [
            "https://api.example.com/hook",
            "https://bob:own@api.example.com/hook",
            "https://eve@api.example.com/hook",
        ] {
            assert!(matches!(
                UrlPassword::lookup(none, &passwords()),
                UrlPassword::None
            ));
        }
        assert_eq!(
            url_for("https://bob:own@api.example.com/", "x")
                .password()
                .as_deref(),
            Some("own")
        );
        assert!(!format!("{:?}", UrlPassword::lookup(fixed, &passwords())).contains("pw1"));
    }

    /// A change of hostile texts, and the longest text a placeholder can
    /// stand for in it.
    fn with_change<T>(
        (db_name, id, rev, seq, doc): (String, String, String, Value, Value),
        body: impl FnOnce(&ChangeContext, usize) -> T,
    ) -> T {
        let doc = serde_json::value::to_raw_value(&doc).unwrap();
        let change = ChangeContext {
            rule: "rule",
            db_name: &db_name,
            doc: &doc,
            id: &id,
            rev: &rev,
            seq: &seq,
        };
        let longest = [
            db_name.len(),
            id.len(),
            rev.len(),
            seq.to_string().len(),
            doc.get().len(),
            32,
        ]
        .into_iter()
        .max()
        .unwrap_or(0);
        body(&change, longest)
    }

    fn change() -> impl Strategy<Value = (String, String, String, Value, Value)> {
        (
            hostile_input::text(),
            hostile_input::text(),
            hostile_input::text(),
            prop_oneof![
                hostile_input::number(),
                hostile_input::text().prop_map(Value::String)
            ],
            hostile_input::json(),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Ok or a clear Err for any `url` text; what compiles keeps the
        /// URL as written, and gives each change a URL or an Err.
        #[test]
        fn a_template_of_any_text_compiles_or_errs_without_panic(
            url in hostile_input::text(),
            scheme in proptest::sample::select(&["", "http://", "https://u@h/", "https://${db_name}/"][..]),
            change in change(),
        ) {
            let url = format!("{scheme}{url}");
            match Template::parse(&json!({ "url": url })) {
                Ok(template) => {
                    prop_assert_eq!(&template.url, &url);
                    let template = template.resolve(None, &passwords()).unwrap();
                    with_change(change, |change, _| template.url_for(change).map(|_| ()).ok());
                }
                Err(error) => prop_assert!(matches!(error, OnChangeDocError::BadUrl(_))),
            }
        }

        /// Every member of the request may be of any shape: Ok or a clear
        /// Err, and a compiled request holds no more text than the document.
        #[test]
        fn a_request_of_any_json_compiles_or_errs_without_panic(
            members in proptest::collection::vec((
                prop_oneof![
                    4 => proptest::sample::select(&["url", "method", "params", "headers", "timeout", "sign"][..])
                        .prop_map(String::from),
                    1 => hostile_input::key(),
                ],
                prop_oneof![
                    hostile_input::json(),
                    hostile_input::number(),
                    Just(json!("https://u@api.example.com/$db_name")),
                ],
            ), 0..8),
        ) {
            let doc = Value::Object(hostile_input::object(members));
            let text = doc.to_string().len();
            let parsed = Template::parse(&doc);
            let sign = present(&doc, "sign").map(SignSpec::parse);
            if let (Ok(template), Some(Ok(sign))) = (parsed.clone(), &sign) {
                let _ = template.resolve(Some(sign), &passwords());
            }
            match parsed {
                Ok(template) => {
                    let held = template.url.len()
                        + template.headers.iter().map(|(n, v)| n.len() + v.len()).sum::<usize>()
                        + template.params.map_or(0, |p| p.to_string().len());
                    prop_assert!(held <= text);
                }
                Err(error) => prop_assert!(!error.to_string().is_empty()),
            }
        }

        /// For any params and any change, the body is JSON, and grows with
        /// the placeholders in it at most by what they stand for, escaped.
        #[test]
        fn filled_params_are_json_for_any_params_and_change(
            params in proptest::collection::vec((hostile_input::key(), hostile_input::json()), 0..6),
            change in change(),
        ) {
            let params = Value::Object(hostile_input::object(params));
            let text = params.to_string();
            let template = Template { params: Some(params), ..Template::default() };
            with_change(change, |change, longest| {
                let body = template.body_for(change).unwrap();
                prop_assert!(serde_json::from_str::<Value>(&body).is_ok(), "{}", body);
                let dollars = hostile_input::count(text.as_bytes(), b'$');
                prop_assert!(body.len() <= text.len() + dollars * 6 * longest);
                template.query_for(change).unwrap();
                Ok(())
            })?;
        }
    }

    #[test]
    fn params_nested_far_deeper_than_json_allows_are_an_error_not_a_stack_overflow() {
        let params = hostile_input::nested(10_000, json!("$change"), hostile_input::array);
        let doc = hostile_input::member("params", hostile_input::member("a", params));
        let mut doc = doc;
        doc["url"] = json!("https://h/");
        assert_eq!(
            Template::parse(&doc).unwrap_err(),
            OnChangeDocError::TooDeep("params")
        );
        hostile_input::dismantle(doc);
    }
}
