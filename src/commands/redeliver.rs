//! `spiegel redeliver`: sends dead letters again (all, or those of one rule
//! and/or database), each with its rule's current URL, headers and
//! signature, and removes the ones that succeed. A failure keeps the letter,
//! with the new error. Letters go the way every request goes ([`Delivery`]):
//! at the rule's `rate_limit`, through the endpoint's circuit and share; one
//! that the circuit holds back is kept as it is. Each letter is claimed
//! before it is sent (written with `redelivering_since`), so that two
//! redeliveries at once send it once; a letter someone else changes or
//! removes meanwhile is left as it is and the others go on. It needs no
//! worker to be running, and does not check the rule's `if` or `selector`
//! again.

use std::collections::{HashMap, HashSet};

use serde::Serialize;
use serde_json::Value;

use crate::config::RedeliverArgs;
use crate::couch::{AllDocsQuery, CouchClient, CouchError};
use crate::delivery::circuit::Held;
use crate::delivery::dead_letter::{self, DeadLetter};
use crate::delivery::{self, Delivery, Request};
use crate::rules::on_change::{ChangeContext, Context, OnChangeRule};

/// What `spiegel redeliver` did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Redelivered {
    /// Dead letters delivered and removed.
    pub delivered: usize,
    /// Dead letters that failed again and were kept.
    pub failed: usize,
    /// Dead letters not sent because their endpoint's circuit is open (or
    /// its share in use): kept as they were, not an attempt.
    pub held: usize,
    /// Dead letters whose on_change document no longer exists (kept).
    pub orphaned: usize,
    /// Dead letters another redelivery was sending (left to it).
    pub skipped: usize,
}

/// How long a claim keeps other redeliveries off a letter: longer than an
/// attempt takes. A redelivery stopped midway leaves its claims, which
/// expire after this.
const CLAIM_LIFETIME: chrono::TimeDelta = chrono::TimeDelta::minutes(10);

/// Sends the dead letters that `--rule` and `--database` select once each,
/// and removes the ones delivered.
pub async fn redeliver(
    client: &CouchClient,
    args: &RedeliverArgs,
    delivery: &Delivery,
) -> Result<Redelivered, CouchError> {
    let spiegel_db = &args.connection.db_name;
    let (rule_filter, db_filter) = (args.rule.as_deref(), args.database.as_deref());
    let letters: Vec<_> = dead_letter::list(client, spiegel_db, &args.connection.namespace)
        .await?
        .into_iter()
        .filter(|(_, _, letter)| {
            rule_filter.is_none_or(|r| r == letter.rule)
                && db_filter.is_none_or(|d| d == letter.db_name)
        })
        .collect();
    let rules = rules_of(client, args, &letters).await?;
    let mut report = Redelivered::default();
    for (id, rev, letter) in letters {
        let Some(rule) = rules.get(&letter.rule) else {
            tracing::warn!(letter = %id, rule = %letter.rule, "the on_change document of this dead letter is gone: kept");
            report.orphaned += 1;
            continue;
        };
        let Some((rev, letter)) = claim(client, spiegel_db, (&id, &rev), letter).await? else {
            tracing::info!(letter = %id, "another redelivery has this dead letter: skipped");
            report.skipped += 1;
            continue;
        };
        let again = send_again(rule, &letter, delivery).await;
        settle(client, spiegel_db, (&id, &rev), letter, again, &mut report).await?;
    }
    Ok(report)
}

/// What one more attempt at a letter came to.
enum Again {
    Delivered,
    /// Not sent: the endpoint's circuit or share held it back, for this
    /// reason.
    Held(String),
    /// Sent, or not buildable, and failed with this error, in words safe to
    /// store.
    Failed(String),
}

/// Claims a letter for this redelivery: writes it over its revision `rev`
/// with `redelivering_since`. Its new revision, or `None` when another
/// redelivery has it (its claim is recent, or it wrote the letter first)
/// or it is gone: so that two redeliveries at once send it once.
async fn claim(
    client: &CouchClient,
    spiegel_db: &str,
    (id, rev): (&str, &str),
    mut letter: DeadLetter,
) -> Result<Option<(String, DeadLetter)>, CouchError> {
    if letter.redelivering_since.as_deref().is_some_and(recent) {
        return Ok(None);
    }
    letter.redelivering_since = Some(crate::ids::timestamp());
    match write_back(client, spiegel_db, (id, rev), &letter).await {
        Ok(rev) => Ok(Some((rev, letter))),
        Err(CouchError::Conflict | CouchError::DocNotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether a claim made at `since` still keeps others off the letter.
fn recent(since: &str) -> bool {
    chrono::DateTime::parse_from_rfc3339(since)
        .is_ok_and(|at| chrono::Utc::now().signed_duration_since(at) < CLAIM_LIFETIME)
}

/// Removes a delivered letter, or writes it back without its claim (a
/// failure with the new error and one more attempt), and counts it. A
/// letter changed or removed by someone else meanwhile is left as it is,
/// said in the log, and the others go on.
async fn settle(
    client: &CouchClient,
    spiegel_db: &str,
    (id, rev): (&str, &str),
    mut letter: DeadLetter,
    again: Again,
    report: &mut Redelivered,
) -> Result<(), CouchError> {
    letter.redelivering_since = None;
    let written = match again {
        Again::Delivered => {
            report.delivered += 1;
            client.delete_doc(spiegel_db, id, rev).await.map(|_| ())
        }
        Again::Held(why) => {
            tracing::info!(letter = %id, rule = %letter.rule, "{why}: kept");
            report.held += 1;
            write_back(client, spiegel_db, (id, rev), &letter)
                .await
                .map(|_| ())
        }
        Again::Failed(error) => {
            report.failed += 1;
            letter.attempts += 1;
            letter.last_error = error;
            letter.last_attempt_at = crate::ids::timestamp();
            write_back(client, spiegel_db, (id, rev), &letter)
                .await
                .map(|_| ())
        }
    };
    match written {
        Err(CouchError::Conflict | CouchError::DocNotFound { .. }) => {
            tracing::warn!(letter = %id, "dead letter changed or removed by someone else meanwhile: left as it is");
            Ok(())
        }
        other => other,
    }
}

/// Writes a letter over its revision `rev`; its new revision.
async fn write_back(
    client: &CouchClient,
    spiegel_db: &str,
    (id, rev): (&str, &str),
    letter: &DeadLetter,
) -> Result<String, CouchError> {
    let doc = Revised { rev, letter };
    Ok(client.put_doc(spiegel_db, id, &doc).await?.rev)
}

/// A dead letter written over its revision `rev`. Serialized as it is, so
/// that the documents it holds keep their text.
#[derive(Serialize)]
struct Revised<'a> {
    #[serde(rename = "_rev")]
    rev: &'a str,
    #[serde(flatten)]
    letter: &'a DeadLetter,
}

/// The usable on_change rules that the letters name, by id: only those
/// documents are read, not the whole spiegel database.
async fn rules_of(
    client: &CouchClient,
    args: &RedeliverArgs,
    letters: &[(String, String, DeadLetter)],
) -> Result<HashMap<String, OnChangeRule>, CouchError> {
    let keys: HashSet<&str> = letters.iter().map(|(_, _, l)| l.rule.as_str()).collect();
    let mut rules = HashMap::new();
    if keys.is_empty() {
        return Ok(rules);
    }
    let query = AllDocsQuery {
        keys: Some(keys.into_iter().map(String::from).collect()),
        include_docs: true,
        ..Default::default()
    };
    let context = Context {
        passwords: &args.rules.passwords,
        backoff: &args.rules.backoff,
    };
    let found = client.all_docs(&args.connection.db_name, &query).await?;
    for (id, doc) in found.rows.into_iter().filter_map(|r| Some((r.id?, r.doc?))) {
        if doc.get("type") == Some(&Value::from("on_change")) {
            if let Ok(rule) = OnChangeRule::compile(&id, &doc, &context) {
                rules.insert(id, rule);
            }
        }
    }
    Ok(rules)
}

/// One attempt at the letter's request (of one change, or of a batch),
/// built afresh from the rule.
async fn send_again(rule: &OnChangeRule, letter: &DeadLetter, delivery: &Delivery) -> Again {
    let context = |doc, id, rev, seq| ChangeContext {
        rule: &letter.rule,
        db_name: &letter.db_name,
        doc,
        id,
        rev,
        seq,
    };
    let built = match &letter.batch {
        None => Request::build(
            &rule.request,
            &context(&letter.change, &letter.doc_id, &letter.rev, &letter.seq),
        ),
        Some(members) => {
            let contexts: Vec<ChangeContext> = members
                .iter()
                .map(|m| context(&m.change, &m.doc_id, &m.rev, &m.seq))
                .collect();
            Request::build_batch(&rule.request, &contexts)
        }
    };
    let request = match built {
        Ok(request) => request,
        Err(e) => return Again::Failed(e.to_string()),
    };
    loop {
        return match delivery.deliver(&rule.id, rule.rate_limit, &request).await {
            delivery::Outcome::Delivered(_) => Again::Delivered,
            // A command holds no worker's slot: it waits its turn.
            delivery::Outcome::Wait(Held::Paced(wait, _)) => {
                tokio::time::sleep(wait).await;
                continue;
            }
            delivery::Outcome::Wait(held) => Again::Held(held.why().to_string()),
            delivery::Outcome::Failed(e) => Again::Failed(e.to_string()),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_letter_written_again_keeps_its_documents_text() {
        let doc = r#"{"_id":"a","z":1.0,"b":18446744073709551616}"#;
        let letter: DeadLetter = serde_json::from_value(serde_json::json!({
            "type": DeadLetter::KIND, "rule": "r", "db_name": "db", "seq": 1,
            "doc_id": "a", "rev": "1-x", "change": {}, "request": {},
            "last_status": null, "last_error": "e", "attempts": 1,
            "first_attempt_at": "t", "last_attempt_at": "t",
        }))
        .unwrap();
        let letter = DeadLetter {
            change: serde_json::value::RawValue::from_string(doc.into()).unwrap(),
            ..letter
        };
        let written = serde_json::to_string(&Revised {
            rev: "2-y",
            letter: &letter,
        })
        .unwrap();
        assert!(written.starts_with(r#"{"_rev":"2-y","type":"#), "{written}");
        assert!(
            written.contains(&format!(r#""change":{doc},"#)),
            "{written}"
        );
    }
}
