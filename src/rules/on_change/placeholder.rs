//! The placeholders of an on_change rule's request, defined once: which
//! there are, how they are found in a string, and what replaces them for a
//! change.
//!
//! Six placeholders are known: `$db_name` (the database name), `$change`
//! (the whole document, or the deletion stub), `$change.id`, `$change.rev`,
//! `$seq` (the `_changes` seq, opaque, as CouchDB sent it) and
//! `$delivery_id` (the request's idempotency key, see
//! [`ChangeContext::delivery_id`]). Each may also be written `${db_name}`,
//! `${change}`, `${change.id}`, `${change.rev}`, `${seq}`, `${delivery_id}`.
//!
//! - In `params`, at any depth (nested objects and arrays; keys are never
//!   templated), a string that is exactly one placeholder is replaced by the
//!   value itself with its JSON type: `$change` becomes the document object,
//!   its own text as CouchDB sent it (spliced in, never parsed and written
//!   again), `$seq` the seq as received (number or string), the others
//!   strings. As in
//!   Spiegel 1.2, unbalanced braces are tolerated in this whole-value case
//!   (`${db_name`, `$db_name}`, `{$db_name}`). A placeholder inside a longer
//!   string is replaced by text: `$change` as its own text, `$seq` as is when
//!   it is a string and as compact JSON otherwise. A bare placeholder ends
//!   where a name would end: `$db_names` and `$change.foo` are left alone; use
//!   the `${...}` form when text follows directly.
//! - In `url`, every placeholder (both forms) is replaced by its text,
//!   percent-encoded as one path segment (`a/b` becomes `a%2Fb`, `+`, `$`,
//!   `(` and `)` are encoded too). A text of `.` or `..` that would be a
//!   whole path segment is refused: a URL reads it as the current or parent
//!   path however it is encoded (`%2E%2E` too), so the request would go to
//!   another path with the rule's credentials.

use serde_json::value::RawValue;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::couch::{encode_segment, is_dot_segment, UrlError};

/// The change a request is built for.
#[derive(Clone, Copy, Debug)]
pub struct ChangeContext<'a> {
    /// The on_change document's id.
    pub rule: &'a str,
    pub db_name: &'a str,
    /// The whole document, or the deletion stub, as CouchDB sent it.
    pub doc: &'a RawValue,
    pub id: &'a str,
    pub rev: &'a str,
    /// The opaque `_changes` seq, passed on as is.
    pub seq: &'a Value,
}

impl ChangeContext<'_> {
    /// The idempotency key of the rule's request for this change: 32 hex
    /// digits of a SHA-256 of the rule, the database, the document id and
    /// the revision. The same for every attempt, redelivery and failover,
    /// different for any other rule, database or revision.
    pub fn delivery_id(&self) -> String {
        let mut hash = Sha256::new();
        for part in [self.rule, self.db_name, self.id, self.rev] {
            hash.update(part.as_bytes());
            hash.update([0]);
        }
        hex::encode(&hash.finalize()[..16])
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
    DeliveryId,
}

/// Names without the `$`, longest first so that a bare `$change.id` is not
/// read as `$change` followed by `.id`.
const NAMES: [(&str, Placeholder); 6] = [
    ("delivery_id", Placeholder::DeliveryId),
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

    /// Writes the JSON that replaces a whole string: the document's own
    /// text for `$change`, the seq as received, a JSON string otherwise.
    fn write_json(self, out: &mut String, c: &ChangeContext) {
        match self {
            Placeholder::Change => out.push_str(c.doc.get()),
            Placeholder::Seq => out.push_str(&c.seq.to_string()),
            text => write_string(out, &text.text(c)),
        }
    }

    /// The text that replaces a placeholder inside a longer string.
    fn text(self, c: &ChangeContext) -> String {
        match self {
            Placeholder::DbName => c.db_name.to_string(),
            Placeholder::Change => c.doc.get().to_string(),
            Placeholder::ChangeId => c.id.to_string(),
            Placeholder::ChangeRev => c.rev.to_string(),
            Placeholder::Seq => match c.seq {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            },
            Placeholder::DeliveryId => c.delivery_id(),
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

/// A URL for a change: every placeholder replaced by its text,
/// percent-encoded as one path segment. Err: a text that would be a whole
/// path segment `.` or `..`.
pub(super) fn fill_url(url: &str, change: &ChangeContext) -> Result<String, UrlError> {
    let mut dot = None;
    let filled = substitute(url, |p, before, after| {
        let text = p.text(change);
        if is_dot_segment(&text) && whole_path_segment(before, after) {
            dot = Some(text.clone());
        }
        encode_segment(&text)
    });
    match dot {
        Some(text) => Err(UrlError::DotSegment(text)),
        None => Ok(filled),
    }
}

/// Whether text between `before` and `after` is a whole segment of a URL's
/// path: it follows a `/` of the path (no `?` or `#` before it) and ends
/// where the segment does.
fn whole_path_segment(before: &str, after: &str) -> bool {
    before.ends_with('/')
        && !before.contains(['?', '#'])
        && (after.is_empty() || after.starts_with(['/', '?', '#']))
}

/// `input` with every placeholder replaced by `text`.
pub(super) fn replace_all(input: &str, text: &str) -> String {
    substitute(input, |_, _, _| text.to_string())
}

/// Replaces every placeholder in `input`, both forms, by `render`'s text.
/// `render` is also given what is written before the placeholder and what
/// of `input` follows it.
fn substitute(input: &str, mut render: impl FnMut(Placeholder, &str, &str) -> String) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        match placeholder_at(after) {
            Some((placeholder, len)) => {
                rest = &after[len..];
                let text = render(placeholder, &out, rest);
                out.push_str(&text);
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

/// Writes params for a change as JSON text: placeholders filled in at any
/// depth, keys left as they are. The document's text is spliced in as it
/// is, never parsed and written again.
pub(super) fn write_object(out: &mut String, map: &Map<String, Value>, c: &ChangeContext) {
    out.push('{');
    for (i, (key, value)) in map.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_string(out, key);
        out.push(':');
        write_value(out, value, c);
    }
    out.push('}');
}

fn write_value(out: &mut String, value: &Value, c: &ChangeContext) {
    match value {
        Value::String(s) => match whole_placeholder(s) {
            Some(placeholder) => placeholder.write_json(out, c),
            None => write_string(out, &substitute(s, |p, _, _| p.text(c))),
        },
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(out, item, c);
            }
            out.push(']');
        }
        Value::Object(map) => write_object(out, map, c),
        other => out.push_str(&other.to_string()),
    }
}

/// The text of a param in a query string: a string filled in as text (a
/// whole `$change` is the document's own JSON text), anything else as
/// compact JSON.
pub(super) fn query_text(value: &Value, c: &ChangeContext) -> String {
    match value {
        Value::String(s) => match whole_placeholder(s) {
            Some(placeholder) => placeholder.text(c),
            None => substitute(s, |p, _, _| p.text(c)),
        },
        other => {
            let mut out = String::new();
            write_value(&mut out, other, c);
            out
        }
    }
}

/// Writes `s` as a JSON string.
fn write_string(out: &mut String, s: &str) {
    out.push_str(&Value::from(s).to_string());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hostile_input;
    use proptest::prelude::*;

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

    /// The URL of `template` for a change of document `id`.
    fn url_for_id(template: &str, id: &str) -> Result<String, UrlError> {
        let doc = serde_json::value::to_raw_value(&serde_json::json!({})).unwrap();
        let seq = Value::from(1);
        let change = ChangeContext {
            rule: "r",
            db_name: "db",
            doc: &doc,
            id,
            rev: "1-a",
            seq: &seq,
        };
        fill_url(template, &change)
    }

    #[test]
    fn an_id_that_is_a_dot_segment_is_refused_as_a_whole_path_segment() {
        for template in [
            "http://h/files/${change.id}",
            "http://h/files/$change.id",
            "http://h/files/${change.id}/x",
            "http://h/files/${change.id}?a=1",
            "http://h/files/${change.id}#top",
        ] {
            for id in [".", ".."] {
                assert!(
                    matches!(url_for_id(template, id), Err(UrlError::DotSegment(ref t)) if t == id),
                    "{template} {id}"
                );
            }
        }
    }

    #[test]
    fn dots_inside_a_segment_or_in_the_query_are_sent_as_they_are() {
        for (template, id, url) in [
            ("http://h/files/x${change.id}", "..", "http://h/files/x.."),
            (
                "http://h/files/${change.id}.json",
                "..",
                "http://h/files/...json",
            ),
            ("http://h/files/${change.id}", "...", "http://h/files/..."),
            (
                "http://h/files/${change.id}",
                "../a",
                "http://h/files/..%2Fa",
            ),
            (
                "http://h/files?id=${change.id}",
                "..",
                "http://h/files?id=..",
            ),
            (
                "http://h/files/?id=/${change.id}",
                ".",
                "http://h/files/?id=/.",
            ),
        ] {
            assert_eq!(url_for_id(template, id).unwrap(), url, "{template} {id}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any text, unbalanced braces and all: each placeholder found
        /// spans at least one `$` of it, so the text grows by at most the
        /// replacement per `$`.
        #[test]
        fn any_text_has_its_placeholders_replaced_without_panic(
            input in hostile_input::text(),
            by in hostile_input::text(),
        ) {
            let out = replace_all(&input, &by);
            let dollars = hostile_input::count(input.as_bytes(), b'$');
            prop_assert!(out.len() <= input.len() + dollars * by.len());
            whole_placeholder(&input);
        }

        /// A URL of any text is filled in for a change of any texts, each
        /// placeholder by at most its text percent-encoded (three bytes a
        /// byte), or refused for a `.` or `..` segment.
        #[test]
        fn any_url_is_filled_for_any_change_or_refused_as_a_dot_segment(
            url in hostile_input::text(),
            id in hostile_input::text(),
            db_name in hostile_input::text(),
            seq in prop_oneof![hostile_input::number(), hostile_input::text().prop_map(Value::String)],
        ) {
            let doc = serde_json::value::to_raw_value(&serde_json::json!({"_id": id})).unwrap();
            let change = ChangeContext { rule: "r", db_name: &db_name, doc: &doc, id: &id, rev: "1-a", seq: &seq };
            let longest = [db_name.len(), id.len(), seq.to_string().len(), doc.get().len(), 32]
                .into_iter().max().unwrap_or(0);
            match fill_url(&url, &change) {
                Ok(filled) => {
                    let dollars = hostile_input::count(url.as_bytes(), b'$');
                    prop_assert!(filled.len() <= url.len() + dollars * 3 * longest);
                }
                Err(UrlError::DotSegment(text)) => prop_assert!(is_dot_segment(&text)),
                Err(other) => prop_assert!(false, "{other}"),
            }
        }
    }
}
