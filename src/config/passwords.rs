//! The passwords file of Spiegel 1.2: `{"<host>": {"<user>": "<password>"}}`.
//!
//! URLs in replicator and on_change docs name a user without a password
//! (`https://user@host/db`); the password is looked up here, so that the
//! spiegel database never holds one.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

use crate::couch::SecretUrl;

/// Why a passwords file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PasswordsError {
    /// The file cannot be read.
    #[error("cannot read passwords file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not JSON.
    #[error("passwords file {path} is not valid JSON: {message}")]
    Json {
        /// The file.
        path: String,
        /// The parser's message.
        message: String,
    },
    /// The JSON is not `{host: {user: password}}`.
    #[error("passwords file {path} has the wrong shape: {message} (expected {{\"<host>\": {{\"<user>\": \"<password>\"}}}})")]
    Shape {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

/// Passwords by host, then by user.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Passwords(HashMap<String, HashMap<String, String>>);

impl Passwords {
    /// Reads and checks a passwords file.
    pub fn load(path: &Path) -> Result<Self, PasswordsError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| PasswordsError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text, &shown)
    }

    /// Parses the file's text; `path` only names it in errors. Errors never
    /// quote a password.
    pub fn parse(text: &str, path: &str) -> Result<Self, PasswordsError> {
        let value: Value = serde_json::from_str(text).map_err(|e| PasswordsError::Json {
            path: path.to_string(),
            // serde's message names the position, never the content.
            message: e.to_string(),
        })?;
        let shape = |message: String| PasswordsError::Shape {
            path: path.to_string(),
            message,
        };
        let Value::Object(hosts) = value else {
            return Err(shape("the top level is not an object".into()));
        };
        let mut passwords = HashMap::new();
        for (host, users) in hosts {
            let Value::Object(users) = users else {
                return Err(shape(format!("host {host:?} is not an object of users")));
            };
            let mut by_user = HashMap::new();
            for (user, password) in users {
                let Value::String(password) = password else {
                    return Err(shape(format!(
                        "the password of user {user:?} on host {host:?} is not a string"
                    )));
                };
                by_user.insert(user, password);
            }
            passwords.insert(host, by_user);
        }
        Ok(Passwords(passwords))
    }

    /// The password of `user` on `host` (or on `host:port` when the file
    /// names the port).
    pub fn lookup(&self, host_with_port: &str, host: &str, user: &str) -> Option<&str> {
        self.0
            .get(host_with_port)
            .and_then(|users| users.get(user))
            .or_else(|| self.0.get(host).and_then(|users| users.get(user)))
            .map(String::as_str)
    }

    /// Fills in the password of a URL that names a user but no password.
    /// A URL that already has a password, or whose user is unknown, is
    /// returned unchanged.
    pub fn apply(&self, url: &SecretUrl) -> SecretUrl {
        if url.password().is_some() {
            return url.clone();
        }
        let (Some(user), Some(host), Some(host_port)) =
            (url.username(), url.host(), url.host_with_port())
        else {
            return url.clone();
        };
        match self.lookup(&host_port, host, &user) {
            Some(password) => url.with_password(password),
            None => url.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hostile_input;
    use proptest::prelude::*;

    #[test]
    fn fills_in_the_password_for_user_at_host() {
        let p = Passwords::parse(
            r#"{"example.com": {"bob": "pw1"}, "h:5984": {"al": "pw2"}}"#,
            "f",
        )
        .unwrap();
        let url = SecretUrl::parse("https://bob@example.com/db").unwrap();
        assert_eq!(p.apply(&url).password().as_deref(), Some("pw1"));
        let url = SecretUrl::parse("http://al@h:5984/db").unwrap();
        assert_eq!(p.apply(&url).password().as_deref(), Some("pw2"));
        let url = SecretUrl::parse("http://al@h:5985/db").unwrap();
        assert_eq!(p.apply(&url).password(), None);
        let url = SecretUrl::parse("https://bob:own@example.com/db").unwrap();
        assert_eq!(p.apply(&url).password().as_deref(), Some("own"));
    }

    #[test]
    fn wrong_shapes_are_named_without_the_password() {
        let err = Passwords::parse(r#"{"h": {"u": 42}}"#, "p.json").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("p.json") && msg.contains("\"u\"") && msg.contains("\"h\""),
            "{msg}"
        );
        let err = Passwords::parse(r#"["x"]"#, "p.json").unwrap_err();
        assert!(err.to_string().contains("top level"));
        let err = Passwords::parse(r#"{"h": "secret"}"#, "p.json").unwrap_err();
        assert!(!err.to_string().contains("secret"));
        let err = Passwords::parse(r#"{"h": {"u": "secret""#, "p.json").unwrap_err();
        assert!(matches!(err, PasswordsError::Json { .. }));
        assert!(!err.to_string().contains("secret"));
    }

    /// A passwords file's text: any JSON, or hosts of users of any values.
    fn file() -> impl Strategy<Value = String> {
        let users = proptest::collection::vec((hostile_input::text(), hostile_input::json()), 0..4)
            .prop_map(|u| serde_json::Value::Object(hostile_input::object(u)));
        prop_oneof![
            hostile_input::json_text(),
            proptest::collection::vec((hostile_input::text(), users), 0..4)
                .prop_map(|h| serde_json::Value::Object(hostile_input::object(h)).to_string()),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any text gives passwords or a clear Err that never quotes a
        /// password; the passwords hold no more text than the file, and
        /// fill in any URL without panicking.
        #[test]
        fn a_passwords_file_of_any_text_parses_or_errs_without_panic(
            text in prop_oneof![file(), hostile_input::text()],
            url in hostile_input::text(),
        ) {
            match Passwords::parse(&text, "p.json") {
                Ok(passwords) => {
                    let held: usize = passwords.0.iter()
                        .map(|(host, users)| host.len() + users.iter().map(|(u, p)| u.len() + p.len()).sum::<usize>())
                        .sum();
                    prop_assert!(held <= text.len());
                    if let Ok(url) = SecretUrl::parse(&format!("https://{url}")) {
                        passwords.apply(&url);
                    }
                }
                Err(error) => {
                    let message = error.to_string();
                    prop_assert!(message.contains("p.json"));
                    let value: Option<Value> = serde_json::from_str(&text).ok();
                    for password in value.iter().flat_map(passwords_in) {
                        prop_assert!(!message.contains(&format!("{password:?}")), "{}", message);
                    }
                }
            }
        }
    }

    /// The strings where a file has its passwords (`{host: {user: here}}`),
    /// if long enough not to appear in a message by chance.
    fn passwords_in(value: &Value) -> Vec<String> {
        let users = value
            .as_object()
            .into_iter()
            .flat_map(|hosts| hosts.values());
        users
            .filter_map(Value::as_object)
            .flat_map(|users| users.values())
            .filter_map(Value::as_str)
            .filter(|p| p.len() >= 8)
            .map(String::from)
            .collect()
    }
}
