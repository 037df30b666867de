//! Errors of the CouchDB client, typed so that a caller can decide what to do:
//! retry ([`CouchError::is_transient`]), give up on a database that is gone,
//! resolve a conflict, or report a configuration problem.

use reqwest::StatusCode;
use serde::Deserialize;

use super::url::redact_credentials;

/// What went wrong talking to CouchDB, classified so that callers can tell a retry from a mistake.
#[derive(Clone, Debug, thiserror::Error)]
pub enum CouchError {
    /// The database does not exist.
    #[error("database {0:?} does not exist")]
    DbNotFound(String),
    /// The document does not exist (or was deleted).
    #[error("document {id:?} not found in database {db:?} ({reason})")]
    DocNotFound {
        /// The database.
        db: String,
        /// The document id.
        id: String,
        /// CouchDB's reason (`missing` or `deleted`).
        reason: String,
    },
    /// Not found, about no database of the request's path: a peer of
    /// `POST /_replicate` (CouchDB 3 answers its missing source or target
    /// with `db_not_found` and status 404 or 500).
    #[error("not found: {0}")]
    NotFound(String),
    /// The write was based on a revision that is not the current one.
    #[error("document update conflict")]
    Conflict,
    /// CouchDB refused the credentials (401).
    #[error("unauthorized: {0} (check the credentials in the URL or passwords file)")]
    Unauthorized(String),
    /// The credentials lack a permission (403).
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// CouchDB refused the request as malformed (400).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The database already exists, or a precondition failed (412).
    #[error("precondition failed: {0}")]
    PreconditionFailed(String),
    /// Worth retrying: a 5xx or 429 answer, a feed that stopped sending.
    #[error("transient CouchDB error: {0}")]
    Transient(String),
    /// No answer: the connection was refused, reset, or stayed silent past
    /// its deadline. Worth retrying as soon as CouchDB answers again.
    #[error("CouchDB unreachable: {0}")]
    Unreachable(String),
    /// Any other answer the client does not know how to classify.
    #[error("unexpected CouchDB answer {status}: {error}: {reason}")]
    Unexpected {
        /// The HTTP status (0 for a document of `_bulk_docs`).
        status: u16,
        /// CouchDB's error.
        error: String,
        /// CouchDB's reason.
        reason: String,
    },
    /// The answer is not the JSON expected.
    #[error("cannot decode CouchDB answer: {0}")]
    Decode(String),
    /// A document id no request path can carry: `.` or `..` (after a
    /// `_design/` or `_local/` prefix too) is read as the current or parent
    /// path whatever its encoding, so the request would address the
    /// database or the server. Such a document is still read and written
    /// through `_bulk_get`, `_all_docs` and `_bulk_docs`.
    #[error("document id {0:?} cannot be sent in a URL path: it would address another path")]
    UnaddressableId(String),
}

impl CouchError {
    /// A short name of the error's kind, for metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            CouchError::DbNotFound(_) => "db_not_found",
            CouchError::DocNotFound { .. } => "doc_not_found",
            // A peer of `POST /_replicate`: a database too, and as routine
            // (the alert in docs/operations.md leaves it out).
            CouchError::NotFound(_) => "db_not_found",
            CouchError::Conflict => "conflict",
            CouchError::Unauthorized(_) => "unauthorized",
            CouchError::Forbidden(_) => "forbidden",
            CouchError::BadRequest(_) => "bad_request",
            CouchError::PreconditionFailed(_) => "precondition_failed",
            CouchError::Transient(_) => "transient",
            CouchError::Unreachable(_) => "unreachable",
            CouchError::Unexpected { .. } => "unexpected",
            CouchError::Decode(_) => "decode",
            CouchError::UnaddressableId(_) => "bad_request",
        }
    }

    /// True for failures that a later attempt may not see.
    pub fn is_transient(&self) -> bool {
        matches!(self, CouchError::Transient(_) | CouchError::Unreachable(_))
    }

    /// A transport error: no answer, or an answer cut short. (Spiegel
    /// decodes JSON itself, so reqwest's "error decoding response body"
    /// only ever means that reading the body failed.) The message goes
    /// through [`redact_credentials`] because reqwest includes the URL.
    pub(crate) fn from_transport(err: reqwest::Error) -> Self {
        CouchError::Unreachable(redact_credentials(&describe(&err)))
    }

    /// Classifies an error answer. `db` and `doc` say what the request was
    /// about, so that a 404 can tell a missing database from a missing
    /// document.
    pub(crate) fn from_response(
        status: StatusCode,
        body: &[u8],
        db: Option<&str>,
        doc: Option<&str>,
    ) -> Self {
        let parsed: ErrorBody = serde_json::from_slice(body).unwrap_or_default();
        let error = redact_credentials(&parsed.error.unwrap_or_default());
        let reason = redact_credentials(&match parsed.reason {
            Some(serde_json::Value::String(s)) => s,
            Some(other) => other.to_string(),
            None => String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
        });
        if error == "db_not_found" && db.is_none() {
            return CouchError::NotFound(join(&error, &reason));
        }
        match status.as_u16() {
            400 => CouchError::BadRequest(join(&error, &reason)),
            // The variant names the error already: "unauthorized: <reason>".
            401 => CouchError::Unauthorized(reason_or(&error, reason)),
            403 => CouchError::Forbidden(reason_or(&error, reason)),
            404 => match (db, doc) {
                (Some(db), Some(id)) if !is_missing_db(&error, &reason) => {
                    CouchError::DocNotFound {
                        db: db.to_string(),
                        id: id.to_string(),
                        reason,
                    }
                }
                (Some(db), _) => CouchError::DbNotFound(db.to_string()),
                _ => CouchError::NotFound(join(&error, &reason)),
            },
            409 => CouchError::Conflict,
            412 => CouchError::PreconditionFailed(join(&error, &reason)),
            408 | 429 | 500..=599 => CouchError::Transient(format!(
                "HTTP {}: {}",
                status.as_u16(),
                join(&error, &reason)
            )),
            code => CouchError::Unexpected {
                status: code,
                error,
                reason,
            },
        }
    }
}

/// CouchDB says "Database does not exist." (3.x) or `no_db_file` (older).
fn is_missing_db(error: &str, reason: &str) -> bool {
    error == "no_db_file" || reason.contains("Database does not exist")
}

/// CouchDB's reason, or its error when it gave no reason.
fn reason_or(error: &str, reason: String) -> String {
    if reason.is_empty() {
        error.to_string()
    } else {
        reason
    }
}

fn join(error: &str, reason: &str) -> String {
    match (error.is_empty(), reason.is_empty()) {
        (false, false) => format!("{error}: {reason}"),
        (false, true) => error.to_string(),
        _ => reason.to_string(),
    }
}

/// reqwest's Display hides the cause ("error sending request"); the chain
/// says what happened (connection refused, timed out...).
fn describe(err: &reqwest::Error) -> String {
    let mut msg = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        msg.push_str(": ");
        msg.push_str(&cause.to_string());
        source = cause.source();
    }
    msg
}

#[derive(Default, Deserialize)]
struct ErrorBody {
    error: Option<String>,
    reason: Option<serde_json::Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classify(status: u16, body: &str, db: Option<&str>, doc: Option<&str>) -> CouchError {
        CouchError::from_response(
            StatusCode::from_u16(status).unwrap(),
            body.as_bytes(),
            db,
            doc,
        )
    }

    #[test]
    fn not_found_tells_database_from_document() {
        let missing_db = r#"{"error":"not_found","reason":"Database does not exist."}"#;
        let missing_doc = r#"{"error":"not_found","reason":"missing"}"#;
        assert!(matches!(
            classify(404, missing_db, Some("db"), Some("x")),
            CouchError::DbNotFound(_)
        ));
        assert!(matches!(
            classify(404, missing_doc, Some("db"), Some("x")),
            CouchError::DocNotFound { .. }
        ));
        assert!(matches!(
            classify(404, missing_doc, Some("db"), None),
            CouchError::DbNotFound(_)
        ));
    }

    #[test]
    fn a_missing_replication_peer_is_not_found_whatever_the_status() {
        // CouchDB 3.5 answers a missing `_replicate` source with 500.
        let body = r#"{"error":"db_not_found","reason":"could not open http://h/nope/"}"#;
        for status in [404, 500] {
            let e = classify(status, body, None, None);
            assert!(matches!(e, CouchError::NotFound(_)), "{status}: {e:?}");
            assert!(!e.is_transient());
            assert_eq!(
                e.kind(),
                "db_not_found",
                "counted as a routine missing database"
            );
        }
    }

    #[test]
    fn statuses_map_to_kinds() {
        assert!(matches!(
            classify(409, "{}", None, None),
            CouchError::Conflict
        ));
        assert!(matches!(
            classify(401, "{}", None, None),
            CouchError::Unauthorized(_)
        ));
        assert!(matches!(
            classify(403, "{}", None, None),
            CouchError::Forbidden(_)
        ));
        assert!(matches!(
            classify(400, "{}", None, None),
            CouchError::BadRequest(_)
        ));
        assert!(classify(503, "oops", None, None).is_transient());
        assert!(!classify(418, "{}", None, None).is_transient());
    }

    #[test]
    fn a_refused_login_says_unauthorized_once() {
        let body = r#"{"error":"unauthorized","reason":"Name or password is incorrect."}"#;
        let msg = classify(401, body, None, None).to_string();
        assert!(
            msg.starts_with("unauthorized: Name or password is incorrect."),
            "{msg}"
        );
        assert_eq!(msg.matches("unauthorized").count(), 1, "{msg}");
    }

    #[test]
    fn error_reasons_are_redacted() {
        let body =
            r#"{"error":"db_not_found","reason":"could not open http://admin:pw@h:5984/src/"}"#;
        let msg = classify(404, body, None, None).to_string();
        assert!(msg.contains("admin:***@h"), "{msg}");
        assert!(!msg.contains(":pw@"));
    }
}
