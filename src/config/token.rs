//! The admin token: what allows the console's actions.

use std::fmt;

use axum::http::{header, HeaderMap};
use sha2::{Digest, Sha256};

/// The token of `--admin-token`. Never printed.
#[derive(Clone)]
pub struct AdminToken(String);

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(***)")
    }
}

impl AdminToken {
    /// The token as given (an empty one allows nothing: the caller gives
    /// none instead).
    pub fn new(token: String) -> Self {
        AdminToken(token)
    }

    /// Whether the request carries `Authorization: Bearer <token>`. The
    /// digests are compared, so the time taken says nothing about the
    /// token.
    pub fn allows(&self, headers: &HeaderMap) -> bool {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        given.is_some_and(|given| Sha256::digest(given) == Sha256::digest(&self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bearer(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, value.parse().expect("a header"));
        headers
    }

    #[test]
    fn only_the_bearer_token_itself_is_allowed() {
        let token = AdminToken::new("s3cret".into());
        assert!(token.allows(&bearer("Bearer s3cret")));
        assert!(!token.allows(&bearer("Bearer s3cre")));
        assert!(!token.allows(&bearer("s3cret")));
        assert!(!token.allows(&HeaderMap::new()));
        assert_eq!(format!("{token:?}"), "AdminToken(***)");
    }
}
