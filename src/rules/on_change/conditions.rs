//! The `if` member of an on_change rule: an object whose keys are attribute
//! names and whose values are regular expressions or `null`; every
//! condition must hold.
//!
//! - `null` holds when the attribute is missing or null.
//! - A regular expression is tested, unanchored, against the attribute's
//!   value turned into text: a string as it is; a number as JavaScript
//!   writes it (`1`, `1.5`, `-3`; a stored `1.0` reads `1`; an integer
//!   beyond 64 bits as its nearest double, as JavaScript would); a boolean as
//!   `true` or `false`; an object or an array as compact JSON
//!   (`{"a":1}`, `["x","y"]`). A missing attribute is tested as the text
//!   `undefined` and a null one as the text `null`, exactly as Spiegel 1.2
//!   did (it handed the value to JavaScript's `RegExp.test`). So a regular
//!   expression that can match those words also matches documents without
//!   the attribute: `.*` matches every document, `e` matches a document
//!   without the attribute (`undefined` contains an `e`), while `^work$`
//!   does not. Anchor your expressions; to require that an attribute is
//!   present, use `selector` with `$exists`.
//! - A number or a boolean in place of a regular expression is taken as the
//!   regular expression of its text (`true` becomes `true`), as in Spiegel
//!   1.2.
//! - An attribute name containing dots is a path into nested objects:
//!   `"address.city": "^Paris$"` tests `doc.address.city`; a numeric segment
//!   indexes an array: `"items.0.sku"` tests the `sku` of the first item.
//!   When the document has a top-level key spelled with the dots
//!   (`"address.city"` itself), that key is used instead of the path, so
//!   Spiegel 1.2 documents keep their meaning.

use std::borrow::Cow;

use regex::Regex;
use serde_json::{Number, Value};

use super::path::{lookup, Segment};
use super::{regex, OnChangeDocError, Result};

/// The conditions of `if`, compiled; none when the rule has no `if`.
#[derive(Debug, Clone, Default)]
pub(super) struct Conditions(Vec<IfCondition>);

/// One entry of `if`.
#[derive(Debug, Clone)]
struct IfCondition {
    /// The attribute name as written, looked up literally first.
    name: String,
    /// The name split on dots, when it has any.
    path: Option<Vec<Segment>>,
    test: IfTest,
}

#[derive(Debug, Clone)]
enum IfTest {
    Regex(Regex),
    MissingOrNull,
}

impl Conditions {
    /// Compiles the value of `if` (`None` when the member is absent or null).
    pub(super) fn parse(conditions: Option<&Value>) -> Result<Self> {
        match conditions {
            None => Ok(Conditions::default()),
            Some(Value::Object(attrs)) => attrs
                .iter()
                .map(|(name, test)| IfCondition::parse(name, test))
                .collect::<Result<_>>()
                .map(Conditions),
            Some(_) => Err(OnChangeDocError::IfNotObject),
        }
    }

    /// Whether every condition holds for the document.
    pub(super) fn matches(&self, doc: &Value) -> bool {
        self.0.iter().all(|c| c.holds(doc))
    }
}

impl IfCondition {
    fn parse(name: &str, test: &Value) -> Result<Self> {
        let field = || format!("if.{name}");
        let test = match test {
            Value::Null => IfTest::MissingOrNull,
            Value::String(pattern) => IfTest::Regex(regex(pattern, field)?),
            // Spiegel 1.2 passed these to `new RegExp`, which reads their text.
            Value::Number(n) => IfTest::Regex(regex(&number_text(n), field)?),
            Value::Bool(b) => IfTest::Regex(regex(&b.to_string(), field)?),
            Value::Array(_) | Value::Object(_) => {
                return Err(OnChangeDocError::BadIfCondition(name.to_string()))
            }
        };
        let path = name.contains('.').then(|| {
            name.split('.')
                .map(|s| Segment::new(s.to_string()))
                .collect()
        });
        Ok(IfCondition {
            name: name.to_string(),
            path,
            test,
        })
    }

    fn holds(&self, doc: &Value) -> bool {
        let value = doc
            .get(&self.name)
            .or_else(|| self.path.as_deref().and_then(|path| lookup(doc, path)));
        match &self.test {
            IfTest::MissingOrNull => value.is_none_or(Value::is_null),
            IfTest::Regex(re) => re.is_match(&if_text(value)),
        }
    }
}

/// The text an `if` regular expression is tested against. Missing and null
/// read `undefined` and `null`, as JavaScript's `RegExp.test` in Spiegel 1.2
/// made of them.
fn if_text(value: Option<&Value>) -> Cow<'_, str> {
    match value {
        None => Cow::Borrowed("undefined"),
        Some(Value::Null) => Cow::Borrowed("null"),
        Some(Value::String(s)) => Cow::Borrowed(s),
        Some(Value::Bool(true)) => Cow::Borrowed("true"),
        Some(Value::Bool(false)) => Cow::Borrowed("false"),
        Some(Value::Number(n)) => Cow::Owned(number_text(n)),
        Some(other) => Cow::Owned(other.to_string()),
    }
}

/// A number as JavaScript writes it for ordinary values: integers without a
/// fraction, even when stored as `1.0` (as a Python client writes them), so
/// that `^1$` means the same as in Spiegel 1.2.
fn number_text(n: &Number) -> String {
    match n.as_f64() {
        Some(f) if n.is_f64() && f == 0.0 => "0".to_string(),
        Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() < 1e21 => format!("{f}"),
        _ => n.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hostile_input;
    use proptest::collection::vec;
    use proptest::prelude::*;
    use serde_json::json;

    fn with_if(conditions: Value) -> Conditions {
        Conditions::parse(Some(&conditions)).unwrap()
    }

    fn error(conditions: Value) -> OnChangeDocError {
        Conditions::parse(Some(&conditions)).unwrap_err()
    }

    #[test]
    fn if_must_be_an_object_of_regexes_or_null() {
        assert_eq!(error(json!("type")), OnChangeDocError::IfNotObject);
        assert_eq!(
            error(json!({"tags": ["a"]})),
            OnChangeDocError::BadIfCondition("tags".to_string())
        );
    }

    #[test]
    fn if_null_means_missing_or_null() {
        let rule = with_if(json!({"archived": null}));
        assert!(rule.matches(&json!({})));
        assert!(rule.matches(&json!({"archived": null})));
        assert!(!rule.matches(&json!({"archived": false})));
        assert!(!rule.matches(&json!({"archived": ""})));
    }

    #[test]
    fn if_regex_tests_missing_as_undefined_and_null_as_null_like_spiegel_1_2() {
        let anything = with_if(json!({"type": ".*"}));
        assert!(anything.matches(&json!({})));
        assert!(anything.matches(&json!({"type": null})));

        let contains_e = with_if(json!({"type": "e"}));
        assert!(contains_e.matches(&json!({})), "`undefined` contains an e");

        let anchored = with_if(json!({"type": "^work$"}));
        assert!(!anchored.matches(&json!({})));
        assert!(!anchored.matches(&json!({"type": null})));

        assert!(with_if(json!({"type": "^null$"})).matches(&json!({"type": null})));
        assert!(with_if(json!({"type": "^undefined$"})).matches(&json!({})));
    }

    #[test]
    fn if_turns_numbers_booleans_objects_and_arrays_into_text() {
        assert!(with_if(json!({"n": "^1$"})).matches(&json!({"n": 1})));
        assert!(with_if(json!({"n": "^1$"})).matches(&json!({"n": 1.0})));
        assert!(with_if(json!({"n": "^1\\.5$"})).matches(&json!({"n": 1.5})));
        assert!(with_if(json!({"n": "^-3$"})).matches(&json!({"n": -3})));
        assert!(with_if(json!({"n": "^0$"})).matches(&json!({"n": -0.0})));
        let big: Value = serde_json::from_str(r#"{"n": 18446744073709551617}"#).unwrap();
        assert!(with_if(json!({"n": "^18446744073709552000$"})).matches(&big));
        assert!(with_if(json!({"done": "^true$"})).matches(&json!({"done": true})));
        assert!(!with_if(json!({"done": "^true$"})).matches(&json!({"done": false})));
        assert!(with_if(json!({"a": "^\\{\"b\":1\\}$"})).matches(&json!({"a": {"b": 1}})));
        assert!(
            with_if(json!({"tags": "^\\[\"x\",\"y\"\\]$"})).matches(&json!({"tags": ["x", "y"]}))
        );
    }

    #[test]
    fn if_accepts_numbers_and_booleans_as_regexes_of_their_text() {
        let done = with_if(json!({"done": true}));
        assert!(done.matches(&json!({"done": true})));
        assert!(!done.matches(&json!({"done": false})));
        let count = with_if(json!({"count": 5}));
        assert!(count.matches(&json!({"count": 5})));
        assert!(
            count.matches(&json!({"count": 15})),
            "unanchored, as in 1.2"
        );
    }

    #[test]
    fn if_dotted_names_are_paths_with_array_indexes() {
        let city = with_if(json!({"address.city": "^Paris$"}));
        assert!(city.matches(&json!({"address": {"city": "Paris"}})));
        assert!(!city.matches(&json!({"address": {"city": "Lyon"}})));
        assert!(!city.matches(&json!({"address": "Paris"})));

        let sku = with_if(json!({"items.0.sku": "^A1$"}));
        assert!(sku.matches(&json!({"items": [{"sku": "A1"}, {"sku": "B2"}]})));
        assert!(!sku.matches(&json!({"items": [{"sku": "B2"}, {"sku": "A1"}]})));
        assert!(!sku.matches(&json!({"items": []})));

        let missing = with_if(json!({"address.zip": null}));
        assert!(missing.matches(&json!({"address": {"city": "Paris"}})));
        assert!(missing.matches(&json!({})));
        assert!(!missing.matches(&json!({"address": {"zip": "75001"}})));
    }

    #[test]
    fn if_literal_dotted_key_takes_precedence_over_the_path() {
        let rule = with_if(json!({"address.city": "^Literal$"}));
        assert!(rule.matches(&json!({
            "address.city": "Literal",
            "address": {"city": "Nested"}
        })));
        assert!(
            !with_if(json!({"address.city": "^Nested$"})).matches(&json!({
                "address.city": "Literal",
                "address": {"city": "Nested"}
            }))
        );
    }

    #[test]
    fn if_conditions_must_all_hold() {
        let rule = with_if(json!({"type": "^work$", "owner": "^bob$"}));
        assert!(rule.matches(&json!({"type": "work", "owner": "bob"})));
        assert!(!rule.matches(&json!({"type": "work", "owner": "alice"})));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Ok or a clear Err for any JSON; what compiles has one condition
        /// per member, each path at most one segment more than the dots
        /// of its name, and tests any document.
        #[test]
        fn if_conditions_of_any_json_compile_or_err_without_panic(
            conditions in prop_oneof![
                3 => vec((hostile_input::key(), hostile_input::json()), 0..6)
                    .prop_map(|members| Value::Object(hostile_input::object(members))),
                1 => hostile_input::json(),
            ],
            doc in hostile_input::json(),
        ) {
            match Conditions::parse(Some(&conditions)) {
                Ok(compiled) => {
                    prop_assert_eq!(compiled.0.len(), conditions.as_object().map_or(0, |m| m.len()));
                    for condition in &compiled.0 {
                        let dots = hostile_input::count(condition.name.as_bytes(), b'.');
                        prop_assert!(condition.path.as_ref().map_or(0, Vec::len) <= dots + 1);
                    }
                    compiled.matches(&doc);
                }
                Err(error) => prop_assert!(!error.to_string().is_empty()),
            }
        }
    }
}
