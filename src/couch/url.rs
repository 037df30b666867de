//! A URL that may carry credentials and never prints them.
//!
//! Every URL a user gives Spiegel (`--url`, replicator sources and targets,
//! webhook URLs) can hold a password. Wrapping it in [`SecretUrl`] makes the
//! safe thing the default: `Display` and `Debug` show `***` in place of the
//! password, so a URL can go into a log line or an error message as it is.

use std::fmt;

use url::Url;

/// A parsed URL whose password is hidden when displayed.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SecretUrl(Url);

/// Why a URL was rejected.
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    /// Not a URL.
    #[error("invalid URL: {0}")]
    Parse(#[from] url::ParseError),
    /// Not `http` or `https`.
    #[error("unsupported URL scheme {0:?}: expected http or https")]
    Scheme(String),
    /// A text put in the URL as a whole path segment is `.` or `..`, which a
    /// URL reads as the current or parent path, however it is encoded.
    #[error("{0:?} cannot be a path segment: the URL would address another path")]
    DotSegment(String),
}

impl SecretUrl {
    /// Parses an http(s) URL. The error never repeats the input, which may
    /// hold a password.
    pub fn parse(input: &str) -> Result<Self, UrlError> {
        let url = Url::parse(input.trim())?;
        match url.scheme() {
            "http" | "https" => Ok(SecretUrl(url)),
            other => Err(UrlError::Scheme(other.to_string())),
        }
    }

    /// The user name from the URL's user info, percent-decoded, if any.
    pub fn username(&self) -> Option<String> {
        let user = self.0.username();
        (!user.is_empty()).then(|| decode(user))
    }

    /// The password from the URL's user info, percent-decoded, if any.
    pub fn password(&self) -> Option<String> {
        self.0.password().map(decode)
    }

    /// The host name, without port or credentials.
    pub fn host(&self) -> Option<&str> {
        self.0.host_str()
    }

    /// `host` or `host:port` as the user wrote it (the passwords file is keyed
    /// by host name; some users add the port).
    pub fn host_with_port(&self) -> Option<String> {
        let host = self.0.host_str()?;
        Some(match self.0.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_string(),
        })
    }

    /// A copy with the given password set (used to inject a password from the
    /// passwords file).
    pub fn with_password(&self, password: &str) -> Self {
        let mut url = self.0.clone();
        // Only fails for URLs that cannot have a host, which `parse` rejected.
        let _ = url.set_password(Some(password));
        SecretUrl(url)
    }

    /// The URL without any user info: safe to send in a request line or to
    /// show anywhere.
    pub fn without_credentials(&self) -> Url {
        let mut url = self.0.clone();
        let _ = url.set_username("");
        let _ = url.set_password(None);
        url
    }

    /// The full URL, credentials included. Only for building requests; never
    /// log the result.
    pub fn expose(&self) -> &Url {
        &self.0
    }

    /// The URL's path segments, percent-decoded (a database name may hold
    /// an encoded `/`).
    pub fn decoded_path(&self) -> String {
        decode(self.0.path())
    }
}

fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.password().is_some() {
            let mut shown = self.0.clone();
            let _ = shown.set_password(Some("***"));
            f.write_str(shown.as_str())
        } else {
            f.write_str(self.0.as_str())
        }
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretUrl({self})")
    }
}

impl std::str::FromStr for SecretUrl {
    type Err = UrlError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SecretUrl::parse(s)
    }
}

/// Replaces the password of every `scheme://user:password@` found in `text`
/// with `***`.
///
/// CouchDB echoes URLs back in error reasons (for example a `_replicate`
/// failure names the source it could not open), so text that came from the
/// server goes through this before it reaches a log or a status.
pub fn redact_credentials(text: &str) -> String {
    rewrite_urls(text, |authority, rest| {
        let masked = match authority.rsplit_once('@') {
            Some((userinfo, host)) => match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:***@{host}"),
                None => authority.to_string(),
            },
            None => authority.to_string(),
        };
        masked + rest
    })
}

/// `text` with every URL in it cut to its origin, without credentials:
/// an API's path or query can be its secret (a webhook URL often is).
pub fn origins_only(text: &str) -> String {
    rewrite_urls(text, |authority, rest| {
        let host = authority
            .rsplit_once('@')
            .map_or(authority, |(_, host)| host);
        match rest {
            "" => host.to_string(),
            _ => format!("{host}/…"),
        }
    })
}

/// Rewrites every `scheme://` URL of free text with `rewrite(authority,
/// rest)`, where `rest` is its path, query and fragment. A URL ends at
/// whitespace, a quote or `<>`, without the punctuation that closes a
/// sentence or a parenthesis around it.
fn rewrite_urls(text: &str, rewrite: impl Fn(&str, &str) -> String) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find("://") {
        let (head, tail) = rest.split_at(pos + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| matches!(c, '"' | '\'' | '<' | '>') || c.is_whitespace())
            .unwrap_or(tail.len());
        let url = tail[..end].trim_end_matches([')', ']', ',', '.', ':', ';']);
        let authority_end = url.find(['/', '?', '#']).unwrap_or(url.len());
        out.push_str(&rewrite(&url[..authority_end], &url[authority_end..]));
        rest = &tail[url.len()..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn urls_in_texts_are_cut_to_their_origin() {
        let text = "error sending request for url (https://u:pw@hooks.example.com/services/T0/XYZ?k=1): refused";
        assert_eq!(
            origins_only(text),
            "error sending request for url (https://hooks.example.com/…): refused"
        );
        assert_eq!(origins_only("no url here"), "no url here");
        assert_eq!(
            origins_only("at https://u:p,w@h:1/x?a=1,2."),
            "at https://h:1/…."
        );
        assert_eq!(origins_only("at http://h:5984"), "at http://h:5984");
    }

    #[test]
    fn display_and_debug_hide_the_password() {
        let url = SecretUrl::parse("http://admin:s3cr%40t@localhost:5984/db").unwrap();
        assert_eq!(url.to_string(), "http://admin:***@localhost:5984/db");
        assert!(!format!("{url:?}").contains("s3cr"));
        assert_eq!(url.password().as_deref(), Some("s3cr@t"));
        assert_eq!(url.username().as_deref(), Some("admin"));
    }

    #[test]
    fn url_without_password_prints_as_is() {
        let url = SecretUrl::parse("https://user@example.com/a%2Fb").unwrap();
        assert_eq!(url.to_string(), "https://user@example.com/a%2Fb");
        assert_eq!(url.password(), None);
        assert_eq!(url.decoded_path(), "/a/b");
    }

    #[test]
    fn with_password_injects_and_still_redacts() {
        let url = SecretUrl::parse("https://user@example.com/db").unwrap();
        let full = url.with_password("pw");
        assert_eq!(full.password().as_deref(), Some("pw"));
        assert_eq!(full.to_string(), "https://user:***@example.com/db");
        assert_eq!(
            full.without_credentials().as_str(),
            "https://example.com/db"
        );
    }

    #[test]
    fn parse_errors_do_not_echo_the_input() {
        let err = SecretUrl::parse("ftp://u:topsecret@host/").unwrap_err();
        assert!(!err.to_string().contains("topsecret"));
        let err = SecretUrl::parse("not a url with pw topsecret").unwrap_err();
        assert!(!err.to_string().contains("topsecret"));
    }

    #[test]
    fn redact_credentials_in_free_text() {
        let text = r#"could not open http://admin:pw@127.0.0.1:5984/db/ and https://u@h/x"#;
        assert_eq!(
            redact_credentials(text),
            r#"could not open http://admin:***@127.0.0.1:5984/db/ and https://u@h/x"#
        );
        assert_eq!(redact_credentials("no url here"), "no url here");
        assert_eq!(redact_credentials("\"http://a:b@h\""), "\"http://a:***@h\"");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Text from the server, with URLs or not: each URL's password
        /// becomes `***` and each cut URL gains at most `/…`, so the text
        /// grows by at most 4 bytes a `://`.
        #[test]
        fn urls_in_any_text_are_redacted_without_panic(text in crate::hostile_input::text()) {
            let urls = text.matches("://").count();
            prop_assert!(redact_credentials(&text).len() <= text.len() + 3 * urls);
            prop_assert!(origins_only(&text).len() <= text.len() + 4 * urls);
            if let Ok(url) = SecretUrl::parse(&text) {
                prop_assert!(!url.to_string().is_empty());
            }
        }
    }
}
