//! Spiegel's own documents in the spiegel database: their ids and id
//! prefixes, and the time they carry for operators. On the ground floor, so
//! that coordination, status, delivery and the commands name the same
//! documents without importing each other.

/// The id prefix of every internal document except change-listener
/// checkpoints (whose ids are fixed by Spiegel 1.2 compatibility).
pub(crate) const INTERNAL_PREFIX: &str = "spiegel_";

/// Spiegel 1.2's change-listener checkpoint id: `spiegel_cl_<db_name>`.
pub fn change_listener_checkpoint_id(db_name: &str) -> String {
    format!("spiegel_cl_{db_name}")
}

/// The settings document that install writes (`<namespace>spiegel_settings`).
pub fn settings_doc_id(namespace: &str) -> String {
    format!("{namespace}{INTERNAL_PREFIX}settings")
}

/// The id prefix of the workers' status documents, every role's.
pub fn status_doc_prefix(namespace: &str) -> String {
    format!("{namespace}{INTERNAL_PREFIX}status_")
}

/// The id prefix of dead letters.
pub fn dead_letter_prefix(namespace: &str) -> String {
    format!("{namespace}{INTERNAL_PREFIX}dead_")
}

/// The id prefix of every role's leases.
pub fn lease_prefix(namespace: &str) -> String {
    format!("{namespace}{INTERNAL_PREFIX}lease_")
}

/// The id prefix of every role's membership documents.
pub fn worker_prefix(namespace: &str) -> String {
    format!("{namespace}{INTERNAL_PREFIX}worker_")
}

/// True for the ids of Spiegel's own bookkeeping documents (and design
/// documents): what the config follower skips without reading the body.
pub(crate) fn is_internal_doc_id(id: &str, namespace: &str) -> bool {
    id.starts_with("_design/")
        || id.starts_with(INTERNAL_PREFIX)
        || (!namespace.is_empty()
            && id
                .strip_prefix(namespace)
                .is_some_and(|rest| rest.starts_with(INTERNAL_PREFIX)))
}

/// Now, as the RFC 3339 text (UTC, milliseconds) that Spiegel's documents
/// carry for operators. Never used for coordination.
pub(crate) fn timestamp() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_ids_are_recognised() {
        assert!(is_internal_doc_id("spiegel_cl_db", ""));
        assert!(is_internal_doc_id("_design/x", ""));
        assert!(is_internal_doc_id("test_spiegel_settings", "test_"));
        assert!(!is_internal_doc_id("my-replicator", "test_"));
    }
}
