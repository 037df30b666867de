//! Parsed rules of one document type, re-parsed only when the followed
//! documents change. Shared by the roles: each gives its parser and learns
//! about unusable documents once per revision.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use serde_json::Value;

use super::follower::UserDocs;

/// What happened to a document when it was parsed, for the caller to log
/// and report; called once per document revision.
pub enum Parsed<'a, T, E> {
    Usable(&'a T),
    Unusable(&'a E),
}

pub struct RuleCache<T> {
    kind: &'static str,
    state: Mutex<State<T>>,
}

struct State<T> {
    rules: Arc<Vec<T>>,
    parsed_from: Option<Arc<UserDocs>>,
    seen: HashSet<(String, String)>,
}

impl<T> RuleCache<T> {
    /// A cache of the documents with `"type": kind`.
    pub fn new(kind: &'static str) -> Self {
        RuleCache {
            kind,
            state: Mutex::new(State {
                rules: Arc::new(Vec::new()),
                parsed_from: None,
                seen: HashSet::new(),
            }),
        }
    }

    /// The usable rules of `docs`. `parse` turns a document into a rule;
    /// `first_seen` is told about each document revision the first time;
    /// `reloaded` is called once each time the document set changed.
    pub fn rules<E>(
        &self,
        docs: &Arc<UserDocs>,
        parse: impl Fn(&str, &Value) -> Result<T, E>,
        mut first_seen: impl FnMut(&str, Parsed<'_, T, E>),
        reloaded: impl FnOnce(&UserDocs),
    ) -> Arc<Vec<T>> {
        // The state holds a cache only; a poisoned lock is safe to reuse.
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state
            .parsed_from
            .as_ref()
            .is_some_and(|p| Arc::ptr_eq(p, docs))
        {
            return state.rules.clone();
        }
        let mut rules = Vec::new();
        // Only the current revisions are kept: the set does not grow with edits.
        let mut seen = HashSet::new();
        for (id, doc) in docs
            .iter()
            .filter(|(_, d)| d.get("type").and_then(Value::as_str) == Some(self.kind))
        {
            let rev = doc
                .get("_rev")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let key = (id.clone(), rev);
            let first = !state.seen.contains(&key);
            seen.insert(key);
            match parse(id, doc) {
                Ok(rule) => {
                    if first {
                        first_seen(id, Parsed::Usable(&rule));
                    }
                    rules.push(rule);
                }
                Err(e) => {
                    if first {
                        first_seen(id, Parsed::Unusable(&e));
                    }
                }
            }
        }
        reloaded(docs);
        state.seen = seen;
        state.rules = Arc::new(rules);
        state.parsed_from = Some(docs.clone());
        state.rules.clone()
    }
}
