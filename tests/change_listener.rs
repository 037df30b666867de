//! The change-listener role through the real binary: on_change rules
//! delivered to a real HTTP receiver on loopback that records what it gets.

mod common;

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use serde_json::{json, Value};

use common::*;

impl Installation {
    fn start(&self, extra: &[&str]) -> Spiegel {
        let mut args = vec!["--backoff-delay", "0.3"];
        args.extend_from_slice(extra);
        self.start_worker("change-listener", &args)
    }

    /// `spiegel redeliver --rule <rule>` on this installation.
    fn redeliver(&self, rule: &str) -> std::process::Output {
        self.redeliver_with(rule, &[])
    }

    /// `spiegel redeliver --rule <rule>` with `extra` options.
    fn redeliver_with(&self, rule: &str, extra: &[&str]) -> std::process::Output {
        let args = [
            "redeliver",
            "--url",
            &self.url,
            "--db-name",
            &self.spiegel_db,
        ];
        spiegel()
            .args(args)
            .args(["--rule", rule])
            .args(extra)
            .output()
            .unwrap()
    }

    /// A change-listener with only the given options, and `env`.
    fn listener(&self, args: &[&str], env: &[(&str, &str)]) -> Spiegel {
        let mut cmd = spiegel();
        cmd.args([
            "change-listener",
            "--url",
            &self.url,
            "--db-name",
            &self.spiegel_db,
        ]);
        cmd.args(args).envs(env.iter().copied());
        Spiegel::start_command(cmd)
    }

    async fn rule(&self, id: &str, rule: Value) {
        let mut doc = rule;
        doc["type"] = json!("on_change");
        self.couch
            .put_doc(&self.spiegel_db, id, &doc)
            .await
            .unwrap();
    }
}

/// The documented guarantee, as CouchDB defines `_changes` order (on a
/// sharded database it is not write order): every change delivered after
/// another is in that database's `_changes` since the other's seq.
async fn assert_in_changes_order(
    couch: &spiegel::couch::CouchClient,
    db: &str,
    firsts: &[(String, Value)],
) {
    for (i, (id, seq)) in firsts.iter().enumerate() {
        let query = spiegel::couch::ChangesQuery {
            since: Some(spiegel::couch::Seq::from(seq.clone())),
            ..Default::default()
        };
        let after: std::collections::HashSet<String> = couch
            .changes(db, &query)
            .await
            .unwrap()
            .results
            .into_iter()
            .map(|c| c.id)
            .collect();
        for (later, _) in &firsts[i + 1..] {
            assert!(
                after.contains(later),
                "{db}: {later} was delivered after {id}, yet comes before it in _changes"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_matching_change_of_50_databases_arrives_in_changes_order() {
    let s = Installation::new("fifty").await;
    let (receiver, base) = Receiver::start().await;
    s.rule(
        "all",
        json!({"db_name": format!("^{}_match", s.prefix), "if": {"type": "^keep$"},
                         "url": format!("{base}/hook"), "method": "POST",
                         "params": {"db": "$db_name", "id": "$change.id", "rev": "$change.rev", "seq": "$seq"}}),
    )
    .await;
    let _worker = s.start(&[]);
    let dbs: Vec<String> = (0..50).map(|i| s.db(&format!("match{i}"))).collect();
    for db in &dbs {
        s.couch.create_db(db).await.unwrap();
    }
    let other = s.db("other");
    s.couch.create_db(&other).await.unwrap();
    let mut revs: HashMap<String, Vec<String>> = HashMap::new();
    for n in 0..4 {
        for db in &dbs {
            s.couch
                .put_doc(db, &format!("n{n}"), &json!({"type": "keep"}))
                .await
                .unwrap();
            // One document of each database gets a revision per round.
            let mut doc = json!({"type": "keep", "round": n});
            if let Some(rev) = revs.get(db).and_then(|r| r.last()) {
                doc["_rev"] = json!(rev);
            }
            let written = s.couch.put_doc(db, "u", &doc).await.unwrap();
            revs.entry(db.clone()).or_default().push(written.rev);
        }
    }
    for db in &dbs {
        s.couch
            .put_doc(db, "skip", &json!({"type": "other"}))
            .await
            .unwrap();
    }
    s.couch
        .put_doc(&other, "n0", &json!({"type": "keep"}))
        .await
        .unwrap();

    // Every document, and the last revision of "u", arrive.
    receiver
        .wait("every change", |got| {
            let field = |b: &Value, k: &str| b[k].as_str().unwrap_or("").to_string();
            let seen: std::collections::HashSet<(String, String, String)> = got
                .iter()
                .map(|r| r.json())
                .map(|b| (field(&b, "db"), field(&b, "id"), field(&b, "rev")))
                .collect();
            dbs.iter().all(|db| {
                let has = |id: &str| seen.iter().any(|(d, i, _)| d == db && i == id);
                let last = (
                    db.clone(),
                    "u".to_string(),
                    revs[db].last().unwrap().clone(),
                );
                (0..4).all(|n| has(&format!("n{n}"))) && seen.contains(&last)
            })
        })
        .await;
    let got = receiver.on("/hook");
    let mut by_db: HashMap<String, Vec<Value>> = HashMap::new();
    for r in &got {
        let b = r.json();
        by_db
            .entry(b["db"].as_str().unwrap().to_string())
            .or_default()
            .push(b);
    }
    assert_eq!(by_db.len(), 50, "only the matching databases");
    for (db, deliveries) in &by_db {
        assert!(
            deliveries.iter().all(|b| b["id"] != "skip"),
            "{db}: a non-matching document was delivered"
        );
        // Per document, revisions arrive in order.
        let generations: Vec<u64> = deliveries
            .iter()
            .filter(|b| b["id"] == "u")
            .map(|b| {
                b["rev"]
                    .as_str()
                    .unwrap()
                    .split('-')
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap()
            })
            .collect();
        assert!(
            generations.windows(2).all(|w| w[0] <= w[1]),
            "{db}: revisions of u out of order: {generations:?}"
        );
        // Per database, the first delivery of each change, in _changes order.
        let mut seen = std::collections::HashSet::new();
        let firsts: Vec<(String, Value)> = deliveries
            .iter()
            .filter(|b| seen.insert((b["id"].clone(), b["rev"].clone())))
            .filter(|b| b["id"] != "u")
            .map(|b| (b["id"].as_str().unwrap().to_string(), b["seq"].clone()))
            .collect();
        assert_in_changes_order(&s.couch, db, &firsts).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditions_select_changes_and_a_bad_rule_does_not_stop_the_others() {
    let (s, receiver, base, db) = with_receiver("match", "shop").await;
    let on_db = format!("^{}$", db);
    s.rule("regex", json!({"db_name": on_db, "if": {"type": "^order$", "paid": "true"}, "url": format!("{base}/regex")})).await;
    s.rule("if-null", json!({"db_name": on_db, "if": {"type": "^order$", "cancelled": null}, "url": format!("{base}/null")})).await;
    s.rule("nested", json!({"db_name": on_db, "if": {"address.city": "^Paris$"}, "url": format!("{base}/nested")})).await;
    s.rule("selector", json!({"db_name": on_db, "selector": {"total": {"$gte": 100}, "$or": [{"tags": {"$in": ["vip"]}}, {"rush": true}]},
                              "url": format!("{base}/selector")})).await;
    s.rule(
        "broken",
        json!({"db_name": "([", "url": format!("{base}/broken")}),
    )
    .await;
    let _worker = s.start(&[]);
    let docs = [
        (
            "a",
            json!({"type": "order", "paid": true, "total": 150, "tags": ["vip"], "address": {"city": "Paris"}}),
        ),
        (
            "b",
            json!({"type": "order", "paid": false, "cancelled": true, "total": 50, "rush": true}),
        ),
        (
            "c",
            json!({"type": "order", "paid": true, "cancelled": null, "total": 120, "rush": true, "address": {"city": "Lyon"}}),
        ),
        ("d", json!({"type": "note", "total": 500, "tags": ["x"]})),
    ];
    for (id, doc) in &docs {
        s.couch
            .put_doc(&db, id, doc)
            .await
            .unwrap_or_else(|e| panic!("{db}/{id}: {e}"));
    }
    receiver
        .wait("the selector's matches", |got| {
            got.iter().filter(|r| r.path == "/selector").count() >= 2
        })
        .await;
    receiver
        .wait("the other rules' matches", |got| {
            got.iter().filter(|r| r.path == "/regex").count() >= 2
                && got.iter().any(|r| r.path == "/nested")
        })
        .await;
    assert_eq!(receiver.on("/regex").len(), 2, "a and c are paid orders");
    assert_eq!(
        receiver.on("/null").len(),
        2,
        "a (no cancelled) and c (cancelled: null)"
    );
    assert_eq!(receiver.on("/nested").len(), 1, "only a is in Paris");
    assert_eq!(receiver.on("/selector").len(), 2, "a (vip) and c (rush)");
    assert!(receiver.on("/broken").is_empty());
    let reported = wait_for(
        "the bad rule reported in the status",
        Duration::from_secs(10),
        || async {
            let status = s.status().await;
            status["documents"]["broken"][0]["invalid"]
                .as_str()
                .map(String::from)
        },
    )
    .await;
    assert!(reported.contains("db_name"), "{reported}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_templated_signed_and_authenticated() {
    let s = Installation::new("tmpl").await;
    let (receiver, base) = Receiver::start().await;
    let db = s.db("a/b+c");
    s.couch.create_db(&db).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let passwords = dir.path().join("passwords.json");
    std::fs::write(
        &passwords,
        json!({"127.0.0.1": {"api": "api-secret", "signer": "hmac-key"}}).to_string(),
    )
    .unwrap();
    let port = base.rsplit(':').next().unwrap();
    let on_db = format!("^{}$", regex_escape(&db));
    s.rule("get", json!({"db_name": on_db, "url": format!("http://api@127.0.0.1:{port}/get/${{db_name}}"),
                         "params": {"db": "$db_name", "id": "${change.id}", "n": "$change.n", "doc": "$change", "note": "in $db_name"},
                         "headers": {"X-Tenant": "t1"}})).await;
    s.rule("post", json!({"db_name": on_db, "url": format!("http://api@127.0.0.1:{port}/post"), "method": "post",
                          "params": {"doc": "$change", "rev": "$change.rev", "seq": "$seq"},
                          "sign": {"secret_host": "127.0.0.1", "secret_user": "signer"}})).await;
    let worker = s.start(&["--passwords-file", passwords.to_str().unwrap()]);
    s.couch
        .put_doc(&db, "doc1", &json!({"n": 7}))
        .await
        .unwrap();
    receiver.wait("both requests", |got| got.len() >= 2).await;

    let get = &receiver
        .received()
        .into_iter()
        .find(|r| r.method == "GET")
        .unwrap();
    assert_eq!(
        get.path,
        format!("/get/{}", spiegel::couch::encode_segment(&db))
    );
    let query: HashMap<String, String> = url::form_urlencoded::parse(get.query.as_bytes())
        .into_owned()
        .collect();
    assert_eq!(query["db"], db);
    assert_eq!(query["id"], "doc1");
    assert_eq!(query["note"], format!("in {db}"));
    let doc: Value = serde_json::from_str(&query["doc"]).unwrap();
    assert_eq!(doc["n"], 7, "non-string values go as JSON text");
    assert_eq!(get.headers["x-tenant"], "t1");
    assert!(get.headers["user-agent"]
        .to_str()
        .unwrap()
        .starts_with("spiegel/"));
    let auth = get.headers["authorization"].to_str().unwrap();
    use base64::Engine as _;
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("api:api-secret")
    );
    assert_eq!(auth, expected, "the password comes from the passwords file");

    let post = &receiver
        .received()
        .into_iter()
        .find(|r| r.method == "POST")
        .unwrap();
    let body = post.json();
    assert_eq!(body["doc"]["n"], 7);
    assert_eq!(body["doc"]["_id"], "doc1");
    assert!(body["rev"].as_str().unwrap().starts_with("1-"));
    assert!(!body["seq"].is_null());
    // The receiver's check of the signature.
    use hmac::{KeyInit, Mac};
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"hmac-key").unwrap();
    mac.update(&post.body);
    let signature = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    assert_eq!(post.headers["x-spiegel-signature"], signature.as_str());
    assert!(!worker.logs().contains("api-secret") && !worker.logs().contains("hmac-key"));
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c.to_string()
            } else {
                format!("\\{c}")
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_api_is_retried_with_backoff_while_other_databases_flow() {
    let s = Installation::new("retry").await;
    let (receiver, base) = Receiver::start().await;
    let (slow, fast) = (s.db("slow"), s.db("fast"));
    s.couch.create_db(&slow).await.unwrap();
    s.couch.create_db(&fast).await.unwrap();
    receiver
        .plan
        .lock()
        .unwrap()
        .insert("/slow".into(), VecDeque::from([500, 500, 500]));
    s.rule(
        "slow",
        json!({"db_name": format!("^{}$", slow), "url": format!("{base}/slow"),
                          "params": {"id": "$change.id"}, "backoff": {"delay": 0.4}}),
    )
    .await;
    s.rule(
        "fast",
        json!({"db_name": format!("^{}$", fast), "url": format!("{base}/fast")}),
    )
    .await;
    let _worker = s.start(&[]);
    s.couch.put_doc(&slow, "x", &json!({})).await.unwrap();
    receiver
        .wait("the first failure", |got| {
            got.iter().any(|r| r.path == "/slow")
        })
        .await;
    // Meanwhile another database's change goes through.
    s.couch.put_doc(&fast, "y", &json!({})).await.unwrap();
    receiver
        .wait("the other database's change", |got| {
            got.iter().any(|r| r.path == "/fast")
        })
        .await;
    receiver
        .wait("the fourth attempt", |got| {
            got.iter().filter(|r| r.path == "/slow").count() >= 4
        })
        .await;
    let attempts = receiver.on("/slow");
    let fast_at = receiver.on("/fast")[0].at;
    assert!(
        fast_at < attempts[3].at,
        "the other database did not wait for the failing one"
    );
    for pair in attempts.windows(2).take(3) {
        let gap = pair[1].at - pair[0].at;
        assert!(
            gap >= Duration::from_millis(380),
            "backoff not respected: {gap:?}"
        );
        assert!(gap < Duration::from_secs(5), "waited far too long: {gap:?}");
    }
    // No fifth attempt after the success: a later change of the same
    // database is delivered after anything that would repeat it.
    s.couch.put_doc(&slow, "z", &json!({})).await.unwrap();
    receiver
        .wait("the later change", |got| {
            got.iter().any(|r| r.path == "/slow" && r.query == "id=z")
        })
        .await;
    let of_x = receiver
        .on("/slow")
        .iter()
        .filter(|r| r.query == "id=x")
        .count();
    assert_eq!(of_x, 4, "three failures and the success");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_keeps_failing_becomes_a_dead_letter_and_is_redelivered() {
    let (s, receiver, base, db) = with_receiver("dead", "d").await;
    *receiver.failing.lock().unwrap() = Some(503);
    s.rule(
        "hook",
        json!({"db_name": format!("^{}$", db), "url": format!("{base}/hook"), "method": "POST",
                          "params": {"id": "$change.id"}, "backoff": {"limit": 2, "delay": 0.2}}),
    )
    .await;
    let _worker = s.start(&[]);
    s.couch
        .put_doc(&db, "doc1", &json!({"v": 1}))
        .await
        .unwrap();
    receiver.wait("three attempts", |got| got.len() >= 3).await;
    let letter = wait_for("a dead letter", Duration::from_secs(20), || async {
        let letters = spiegel::delivery::dead_letter::list(&s.couch, &s.spiegel_db, "")
            .await
            .unwrap();
        letters.into_iter().next().map(|(_, _, letter)| letter)
    })
    .await;
    assert_eq!(letter.rule, "hook");
    assert_eq!(letter.db_name, db);
    assert_eq!(letter.doc_id, "doc1");
    assert!(letter.rev.starts_with("1-"));
    assert_eq!(letter.last_status, Some(503));
    assert_eq!(letter.attempts, 3, "the first attempt and 2 retries");
    let request: Value = serde_json::from_str(letter.request.get()).unwrap();
    assert_eq!(request["body"]["id"], "doc1");
    // Delivery moved on: a later change is delivered once the API is back.
    *receiver.failing.lock().unwrap() = None;
    s.couch.put_doc(&db, "doc2", &json!({})).await.unwrap();
    receiver
        .wait("the next change", |got| {
            got.iter().any(|r| r.json()["id"] == "doc2")
        })
        .await;
    let status = s.status().await;
    assert_eq!(status["dead_letters"]["total"], 1);

    let out = s.redeliver("hook");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let redelivered = receiver
        .received()
        .into_iter()
        .filter(|r| r.json()["id"] == "doc1")
        .count();
    assert_eq!(redelivered, 4, "three failed attempts and the redelivery");
    // `_all_docs` reads one copy of each shard, so on a cluster a deletion
    // shows in the listing a moment after the write returns.
    wait_no_dead_letters(&s, "the dead letter removed").await;
}

/// The dead letters of `rule`, with their attempts.
async fn letters_of(s: &Installation, rule: &str) -> Vec<u32> {
    let letters = spiegel::delivery::dead_letter::list(&s.couch, &s.spiegel_db, "")
        .await
        .unwrap();
    let mut attempts: Vec<u32> = letters
        .into_iter()
        .filter(|(_, _, l)| l.rule == rule)
        .map(|(_, _, l)| l.attempts)
        .collect();
    attempts.sort();
    attempts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_redeliveries_at_once_send_each_dead_letter_once_and_both_go_on_past_the_others() {
    let (s, receiver, base, db) = with_receiver("redeliver-twice", "d").await;
    // Paced, so that the two runs overlap.
    s.rule(
        "hook",
        json!({"db_name": format!("^{db}$"), "url": format!("{base}/hook"), "method": "POST",
               "params": {"id": "$change.id"}, "rate_limit": 20}),
    )
    .await;
    for n in 0..20 {
        let letter = json!({
            "type": "spiegel_dead_letter", "rule": "hook", "db_name": db, "seq": n,
            "doc_id": format!("doc{n}"), "rev": "1-a", "change": {"_id": format!("doc{n}")},
            "request": null, "last_status": 503, "last_error": "HTTP 503", "attempts": 3,
            "first_attempt_at": "2026-01-01T00:00:00Z", "last_attempt_at": "2026-01-01T00:00:00Z",
        });
        let letter = serde_json::from_value(letter).unwrap();
        spiegel::delivery::dead_letter::store(&s.couch, &s.spiegel_db, "", &letter)
            .await
            .unwrap();
    }
    let run = || {
        spiegel()
            .args(["redeliver", "--url", &s.url, "--db-name", &s.spiegel_db])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (first, second) = (run(), run());
    let mut redelivered = 0;
    for out in [first, second].map(|c| c.wait_with_output().unwrap()) {
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        eprintln!("{stdout}");
        assert!(out.status.success(), "{stdout}");
        let count = stdout
            .strip_prefix("redelivered ")
            .and_then(|s| s.split(',').next());
        redelivered += count.unwrap().parse::<usize>().unwrap();
    }
    assert_eq!(redelivered, 20, "each delivered by one of the two");

    let mut sent: HashMap<String, usize> = HashMap::new();
    for request in receiver.received() {
        let id = request.json()["id"].as_str().unwrap().to_string();
        *sent.entry(id).or_default() += 1;
    }
    assert_eq!(sent.len(), 20, "{sent:?}");
    assert!(sent.values().all(|n| *n == 1), "each once: {sent:?}");
    wait_for("the letters removed", Duration::from_secs(10), || async {
        letters_of(&s, "hook").await.is_empty().then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redeliver_goes_through_the_endpoints_circuit_and_the_rules_rate_limit() {
    let (s, paced, paced_base, db) = with_receiver("redeliver-paths", "d").await;
    let (broken, broken_base) = Receiver::start().await;
    for receiver in [&paced, &broken] {
        *receiver.failing.lock().unwrap() = Some(503);
    }
    let rule = |base: &str, extra: Value| {
        let mut rule = json!({"db_name": format!("^{db}$"), "url": format!("{base}/hook"),
                              "method": "POST", "params": {"id": "$change.id"},
                              "backoff": {"limit": 1, "delay": 0.1}});
        rule.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        rule
    };
    s.rule("broken", rule(&broken_base, json!({}))).await;
    s.rule("paced", rule(&paced_base, json!({"rate_limit": 5})))
        .await;
    let docs: Vec<Value> = (0..5).map(|n| json!({"_id": format!("doc{n}")})).collect();
    s.couch.bulk_docs(&db, &docs, true).await.unwrap();
    // The worker's own circuit must not hold the letters back.
    let worker = s.start(&["--circuit-failures", "100"]);
    wait_for("ten dead letters", Duration::from_secs(60), || async {
        let (a, b) = (
            letters_of(&s, "broken").await,
            letters_of(&s, "paced").await,
        );
        (a.len() + b.len() == 10).then_some(())
    })
    .await;
    drop(worker);
    assert_eq!(letters_of(&s, "broken").await, [2; 5]);

    // Two failures in a row open the endpoint's circuit: the other three
    // letters are not sent, and kept as they were.
    let sent = broken.received().len();
    let out = s.redeliver_with("broken", &["--circuit-failures", "2"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.contains("failed again 2, held by an open circuit 3,"),
        "{stdout}"
    );
    assert_eq!(broken.received().len(), sent + 2, "the circuit opened");
    // On a cluster the listing shows a write a moment after it returns.
    wait_for(
        "two letters with one more attempt",
        Duration::from_secs(10),
        || async { (letters_of(&s, "broken").await == [2, 2, 2, 3, 3]).then_some(()) },
    )
    .await;

    // Five letters at five a second: four gaps of 200 ms. The first
    // request also opens the connection, which on a loaded machine can
    // arrive late and shorten the first gap: the three gaps after it count.
    *paced.failing.lock().unwrap() = None;
    let sent = paced.received().len();
    let out = s.redeliver("paced");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let times: Vec<std::time::Instant> = paced.received()[sent..].iter().map(|r| r.at).collect();
    assert_eq!(times.len(), 5);
    let spread = times[4] - times[1];
    assert!(spread >= Duration::from_millis(550), "{spread:?}");
    wait_for(
        "the paced letters removed",
        Duration::from_secs(10),
        || async { letters_of(&s, "paced").await.is_empty().then_some(()) },
    )
    .await;
}

/// Documents whose text a parsed and re-encoded tree would change: numbers
/// needing 17 digits, extremes, `-0.0`, exponents, integers beyond 64 bits,
/// keys out of alphabetical order at every level, an empty key, escapes.
const ODD_DOCS: [(&str, &str); 2] = [
    (
        "odd1",
        r#"{"zeta":0.9469046488777645,"alpha":0.30000000000000004,"":"empty key","tiny":5e-324,"huge":1.7976931348623157e308,"negzero":-0.0,"exp":1E5,"one":1.0,"big":18446744073709551616,"neg":-9223372036854775809,"long":123456789012345678901234567890,"nested":{"y":[{"b":1,"a":[2.5,-0.0]}],"x":{"d":"\u0001","c":"\ud83d\ude00"}},"esc":"\u2028 é \u00e9 \"q\" \\ \/"}"#,
    ),
    (
        "odd2",
        r#"{"m":-18446744073709551617,"b":{"z":{},"a":[]},"a":"\ud834\udd1e","k":0.1}"#,
    ),
];

/// Each JSON object of a request body (the body, or each item of a batch)
/// with its `doc` member's text, as received.
fn sent_docs(body: &[u8]) -> Vec<String> {
    type Params = HashMap<String, Box<serde_json::value::RawValue>>;
    let items: Vec<Params> = match serde_json::from_slice::<Params>(body) {
        Ok(one) => vec![one],
        Err(_) => serde_json::from_slice(body).expect("a JSON object or array"),
    };
    items.iter().map(|i| i["doc"].get().to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_is_delivered_dead_lettered_and_redelivered_as_couchdb_serves_the_document() {
    let (s, receiver, base, src) = with_receiver("bytes", "src").await;
    // The failing rules on databases of their own: batches of a database
    // where another rule fails are a matter of their own.
    let dbs = [src, s.db("dead"), s.db("deadbatch")];
    for db in &dbs[1..] {
        s.couch.create_db(db).await.unwrap();
    }
    let rule = |db: &str, path: &str, method: &str, extra: Value| {
        let mut rule = json!({"db_name": format!("^{db}$"), "url": format!("{base}/{path}"),
                              "method": method, "params": {"doc": "$change"},
                              "backoff": {"limit": 1, "delay": 0.2}});
        rule.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        rule
    };
    let batch = json!({"batch": {"max_changes": 2}});
    let [src, dead, deadbatch] = &dbs;
    s.rule("one", rule(src, "one", "POST", json!({}))).await;
    s.rule("query", rule(src, "query", "GET", json!({}))).await;
    s.rule("batch", rule(src, "batch", "POST", batch.clone()))
        .await;
    s.rule("dead", rule(dead, "dead", "POST", json!({}))).await;
    s.rule("deadbatch", rule(deadbatch, "deadbatch", "POST", batch))
        .await;
    receiver.plan.lock().unwrap().extend([
        ("/dead".to_string(), VecDeque::from([503; 4])),
        ("/deadbatch".to_string(), VecDeque::from([503; 2])),
    ]);
    // Written as raw text; what the server answers for GET is the reference.
    let http = reqwest::Client::new();
    let mut served: Vec<String> = Vec::new();
    for (db, (id, text)) in dbs.iter().flat_map(|db| ODD_DOCS.map(|doc| (db, doc))) {
        let url = format!("{}/{}/{id}", s.url, spiegel::couch::encode_segment(db));
        let put = http
            .put(&url)
            .header("Content-Type", "application/json")
            .body(text)
            .send()
            .await
            .unwrap();
        assert!(put.status().is_success(), "{}", put.status());
        let got = http.get(&url).send().await.unwrap().text().await.unwrap();
        served.push(got.trim_end().to_string());
    }
    // By id and revision: each database holds its own revisions.
    let id_of = |doc: &str| {
        let doc: Value = serde_json::from_str(doc).unwrap();
        format!("{} {}", doc["_id"], doc["_rev"])
    };
    let expected: HashMap<String, String> =
        served.iter().map(|doc| (id_of(doc), doc.clone())).collect();
    // Every rule calls the same receiver: six 503s in a row would open
    // its circuit and hold the last dead letter for the 30 s cooldown. The
    // circuit is not what this test is about.
    let _worker = s.start(&["--circuit-failures", "100"]);

    let letters = wait_for("three dead letters", Duration::from_secs(30), || async {
        let letters = spiegel::delivery::dead_letter::list(&s.couch, &s.spiegel_db, "")
            .await
            .ok()?;
        (letters.len() >= 3).then_some(letters)
    })
    .await;
    for (_, _, letter) in &letters {
        let members = letter.batch.iter().flatten().map(|m| &m.change);
        for stored in std::iter::once(&letter.change).chain(members) {
            assert_eq!(stored.get(), expected[&id_of(stored.get())], "stored");
        }
        // The request it records holds the document as sent, too.
        let request = letter.request.get();
        assert!(
            request.contains(letter.change.get()),
            "the recorded request: {request}"
        );
    }
    for rule in ["dead", "deadbatch"] {
        let out = s.redeliver(rule);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // `_all_docs` reads one copy of each shard, so on a cluster a deletion
    // shows in the listing a moment after the write returns.
    wait_no_dead_letters(&s, "the dead letters redelivered").await;
    // At least once: a change may come twice, each time as it is stored.
    receiver
        .wait("every request", |got| {
            let on = |path: &str| got.iter().filter(|r| r.path == path).count();
            on("/one") >= 2 && on("/query") >= 2 && on("/batch") >= 1
        })
        .await;
    let on = |path: &str| receiver.on(path).len();
    assert!(
        on("/dead") >= 6 && on("/deadbatch") >= 3,
        "failures and redeliveries"
    );

    for r in receiver.received() {
        let docs = match r.method.as_str() {
            "GET" => url::form_urlencoded::parse(r.query.as_bytes())
                .filter(|(k, _)| k == "doc")
                .map(|(_, v)| v.into_owned())
                .collect(),
            _ => sent_docs(&r.body),
        };
        assert_eq!(
            docs.len(),
            if r.path.contains("batch") { 2 } else { 1 },
            "{}",
            r.path
        );
        for doc in docs {
            assert!(
                doc.as_bytes() == expected[&id_of(&doc)].as_bytes(),
                "{} sent\n{doc}\ninstead of\n{}",
                r.path,
                expected[&id_of(&doc)]
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debounce_sends_identical_pending_requests_once() {
    let (s, receiver, base, db) = with_receiver("debounce", "d").await;
    // Ten changes are pending when the worker starts: one batch.
    for i in 0..10 {
        s.couch
            .put_doc(&db, &format!("doc{i}"), &json!({}))
            .await
            .unwrap();
    }
    s.rule(
        "debounced",
        json!({"db_name": format!("^{}$", db), "url": format!("{base}/refresh"),
                               "params": {"db": "$db_name"}, "debounce": true}),
    )
    .await;
    s.rule(
        "each",
        json!({"db_name": format!("^{}$", db), "url": format!("{base}/each"),
                          "params": {"id": "$change.id"}}),
    )
    .await;
    let _worker = s.start(&[]);
    receiver
        .wait("every change on the plain rule", |got| {
            got.iter().filter(|r| r.path == "/each").count() >= 10
        })
        .await;
    assert_eq!(
        receiver.on("/refresh").len(),
        1,
        "identical requests collapsed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_documents_do_not_stop_the_worker() {
    let (s, receiver, base, db) = with_receiver("odd", "d").await;
    // On a database of its own: an unusable rule holds the databases it names.
    let elsewhere = format!("^{}$", s.db("elsewhere"));
    s.rule(
        "bad-params",
        json!({"db_name": elsewhere, "url": format!("{base}/bad"), "params": "not an object"}),
    )
    .await;
    s.rule(
        "all",
        json!({"db_name": format!("^{}$", db), "url": format!("{base}/all"), "method": "POST",
                         "params": {"id": "$change.id", "doc": "$change"}}),
    )
    .await;
    let _worker = s.start(&[]);
    let big = "x".repeat(1_000_000);
    s.couch
        .put_doc(&db, "big", &json!({"blob": big}))
        .await
        .unwrap();
    let gone = s.couch.put_doc(&db, "gone", &json!({})).await.unwrap();
    let deletion = s.couch.delete_doc(&db, "gone", &gone.rev).await.unwrap();
    // The creation of "gone" may be delivered too, if a run read it before
    // the deletion: the deletion must come, and come last.
    receiver
        .wait("the big document and the deletion", |got| {
            got.iter().any(|r| r.json()["id"] == "big")
                && got
                    .iter()
                    .any(|r| r.json()["id"] == "gone" && r.json()["doc"]["_deleted"] == true)
        })
        .await;
    let big_request = receiver
        .received()
        .into_iter()
        .find(|r| r.json()["id"] == "big")
        .unwrap();
    assert_eq!(
        big_request.json()["doc"]["blob"].as_str().unwrap().len(),
        1_000_000
    );
    let deleted = receiver
        .received()
        .into_iter()
        .filter(|r| r.json()["id"] == "gone")
        .last()
        .unwrap();
    assert_eq!(
        deleted.json()["doc"],
        json!({"_id": "gone", "_rev": deletion.rev, "_deleted": true}),
        "a deletion is delivered last, as its stub"
    );
    assert!(
        receiver.on("/bad").is_empty(),
        "a rule whose params is not an object is skipped"
    );
    let reported = wait_for("the bad rule reported", Duration::from_secs(10), || async {
        let status = s.status().await;
        let invalid = &status["documents"]["bad-params"][0]["invalid"];
        invalid.as_str().map(String::from)
    })
    .await;
    assert!(reported.contains("params"), "{reported}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_loses_no_change() {
    let s = Installation::new("kill").await;
    let (receiver, base) = Receiver::start().await;
    s.rule(
        "all",
        json!({"db_name": format!("^{}_k", s.prefix), "url": format!("{base}/k"), "method": "POST",
                         "params": {"db": "$db_name", "id": "$change.id"}}),
    )
    .await;
    let mut a = s.start(&["--worker-id", "a"]);
    let _b = s.start(&["--worker-id", "b"]);
    let dbs: Vec<String> = (0..8).map(|i| s.db(&format!("k{i}"))).collect();
    for db in &dbs {
        s.couch.create_db(db).await.unwrap();
    }
    let mut written = Vec::new();
    for n in 0..30 {
        for db in &dbs {
            s.couch
                .put_doc(db, &format!("n{n:02}"), &json!({}))
                .await
                .unwrap();
            written.push((db.clone(), format!("n{n:02}")));
        }
        if n == 10 {
            a.child.kill().unwrap(); // SIGKILL mid-stream
            a.child.wait().unwrap();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    receiver
        .wait("every change despite the kill", |got| {
            let seen: std::collections::HashSet<(String, String)> = got
                .iter()
                .map(|r| {
                    (
                        r.json()["db"].as_str().unwrap_or("").to_string(),
                        r.json()["id"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect();
            written.iter().all(|w| seen.contains(w))
        })
        .await;
    let total = receiver.on("/k").len();
    eprintln!(
        "{} changes, {} deliveries ({} duplicates around the kill)",
        written.len(),
        total,
        total - written.len()
    );
    drop(a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_database_loses_its_checkpoint_and_starts_over_when_created_again() {
    let (s, receiver, base, db) = with_receiver("recreate", "d").await;
    s.rule(
        "hook",
        json!({"db_name": format!("^{}$", db), "url": format!("{base}/hook"), "method": "POST",
                          "params": {"id": "$change.id", "rev": "$change.rev"}}),
    )
    .await;
    let _worker = s.start(&["--assume-deleted-after", "1"]);
    for id in ["a", "b"] {
        s.couch.put_doc(&db, id, &json!({})).await.unwrap();
    }
    receiver
        .wait("the first life's changes", |got| got.len() >= 2)
        .await;
    let checkpoint = spiegel::ids::change_listener_checkpoint_id(&db);
    wait_doc(
        &s.couch,
        &s.spiegel_db,
        &checkpoint,
        true,
        Duration::from_secs(10),
        "a saved checkpoint",
    )
    .await;

    s.couch.delete_db(&db).await.unwrap();
    wait_doc(
        &s.couch,
        &s.spiegel_db,
        &checkpoint,
        false,
        Duration::from_secs(15),
        "the checkpoint's removal",
    )
    .await;

    // Created again: its new first change is delivered (an old checkpoint
    // would have skipped it).
    s.couch.create_db(&db).await.unwrap();
    s.couch
        .put_doc(&db, "a", &json!({"again": true}))
        .await
        .unwrap();
    receiver
        .wait("the second life's first change", |got| {
            got.iter().filter(|r| r.json()["id"] == "a").count() >= 2
        })
        .await;
}

/// Spiegel 1.2 finds a database's checkpoint through this view (its
/// `install` creates it), and takes one without `dirty` for clean.
const SPIEGEL_1_2_VIEW: &str =
    r#"function(doc) { if (doc.type === "change_listener") { emit(doc.db_name, null); } }"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_rollback_spiegel_1_2_finds_every_checkpoint_and_resumes_after_it() {
    let s = Installation::new("rollback").await;
    let (receiver, base) = Receiver::start().await;
    let (db, older) = (s.db("d"), s.db("older"));
    for name in [&db, &older] {
        s.couch.create_db(name).await.unwrap();
    }
    // A checkpoint as Spiegel 2.0.0-alpha.1 wrote it: its type is put right
    // at its next save.
    let older_id = spiegel::ids::change_listener_checkpoint_id(&older);
    let alpha = json!({"type": "change-listener", "db_name": older, "last_seq": null});
    s.couch
        .put_doc(&s.spiegel_db, &older_id, &alpha)
        .await
        .unwrap();
    s.rule(
        "hook",
        json!({"db_name": format!("^{}_(d|older)$", s.prefix), "url": format!("{base}/hook"),
               "method": "POST", "params": {"id": "$change.id"}}),
    )
    .await;
    let _worker = s.start(&[]);
    for name in [&db, &older] {
        s.couch.put_doc(name, "doc", &json!({})).await.unwrap();
    }
    receiver.wait("both changes", |got| got.len() >= 2).await;

    let view = json!({"views": {"change_listeners_by_db_name": {"map": SPIEGEL_1_2_VIEW}}});
    s.couch
        .put_doc(&s.spiegel_db, "_design/change_listeners_by_db_name", &view)
        .await
        .unwrap();
    let path = format!(
        "{}/_design/change_listeners_by_db_name/_view/change_listeners_by_db_name",
        spiegel::couch::encode_segment(&s.spiegel_db)
    );
    let keys = serde_json::to_string(&[&db, &older]).unwrap();
    let url = format!(
        "{}/{path}?include_docs=true&keys={}",
        s.url,
        urlencode(&keys)
    );
    let http = reqwest::Client::new();
    // Checkpoints are saved within a second; then 1.2 sees every change
    // handled: `_changes` since each checkpoint is empty.
    wait_for(
        "checkpoints Spiegel 1.2 reads as caught up",
        Duration::from_secs(30),
        || async {
            let answer: Value = http.get(&url).send().await.ok()?.json().await.ok()?;
            let rows = answer["rows"].as_array()?;
            if rows.len() != 2 {
                return None;
            }
            for row in rows {
                let doc = &row["doc"];
                assert_eq!(doc["type"], "change_listener", "{doc}");
                assert!(
                    doc["dirty"] != json!(true) && doc.get("locked_at").is_none(),
                    "clean: {doc}"
                );
                let since = spiegel::couch::Seq::from(
                    doc.get("last_seq").filter(|s| !s.is_null())?.clone(),
                );
                let query = spiegel::couch::ChangesQuery {
                    since: Some(since),
                    ..Default::default()
                };
                let name = doc["db_name"].as_str()?;
                if !s.couch.changes(name, &query).await.ok()?.results.is_empty() {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
}

fn urlencode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

#[tokio::test]
async fn an_unusable_rule_is_reported_when_loaded_before_any_change() {
    let s = Installation::new("badrule").await;
    let _worker = s.start(&[]);
    // A regular expression that does not compile; no database matches or
    // changes.
    s.rule(
        "bad-regex",
        json!({"db_name": "^(unclosed", "url": "http://127.0.0.1:9/x"}),
    )
    .await;
    let reason = wait_for(
        "the rule reported unusable",
        Duration::from_secs(30),
        || async {
            let status = s.status().await;
            status["documents"]["bad-regex"][0]["invalid"]
                .as_str()
                .map(String::from)
        },
    )
    .await;
    assert!(reason.contains("db_name"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_duplicate_after_a_kill_carries_the_key_of_the_first_delivery() {
    let (s, receiver, base, db) = with_receiver("idem", "d").await;
    s.rule(
        "hook",
        json!({"db_name": format!("^{db}$"), "url": format!("{base}/hook"), "method": "POST",
               "params": {"id": "$change.id", "key": "$delivery_id"}}),
    )
    .await;
    // Checkpoints are saved every lease time (30 s): a worker killed
    // within seconds of its deliveries has saved none of them. It comes
    // back under its own id (a pod of a StatefulSet), so it takes its
    // partitions back without waiting for their leases to expire.
    let args = [
        "--lease-time",
        "30",
        "--save-seq-after",
        "60",
        "--worker-id",
        "w",
    ];
    let mut first = s.listener(&args, &[]);
    let ids: Vec<String> = (0..10).map(|n| format!("doc{n}")).collect();
    for id in &ids {
        s.couch.put_doc(&db, id, &json!({})).await.unwrap();
    }
    receiver
        .wait("every change", |got| got.len() >= ids.len())
        .await;
    signal(&first.child, libc::SIGKILL);
    let _ = wait_exit(&mut first.child, Duration::from_secs(10));
    let _again = s.listener(&args, &[]);
    // Its next change makes it read the database from its last saved
    // checkpoint: before every change delivered.
    s.couch.put_doc(&db, "later", &json!({})).await.unwrap();
    receiver
        .wait("the changes delivered again after the restart", |got| {
            got.len() > 2 * ids.len()
        })
        .await;

    let mut keys: HashMap<String, Vec<String>> = HashMap::new();
    for request in receiver.received() {
        let key = request.headers["idempotency-key"]
            .to_str()
            .unwrap()
            .to_string();
        assert_eq!(
            request.json()["key"],
            key.as_str(),
            "$delivery_id is the key"
        );
        let id = request.json()["id"].as_str().unwrap().to_string();
        keys.entry(id).or_default().push(key);
    }
    assert_eq!(keys.len(), ids.len() + 1);
    for (id, sent) in keys.iter().filter(|(id, _)| *id != "later") {
        assert!(sent.len() >= 2, "{id} was delivered again");
        assert!(sent.iter().all(|k| k == &sent[0]), "{id}: {sent:?}");
    }
    let distinct: std::collections::HashSet<&String> = keys.values().map(|k| &k[0]).collect();
    assert_eq!(distinct.len(), ids.len() + 1, "one key per change");
}

#[tokio::test]
async fn standard_webhooks_signatures_verify_with_the_reference_library() {
    // The specification's example secret format: whsec_ and base64.
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let (s, receiver, base, db) = with_receiver("stdhooks", "d").await;
    s.rule(
        "hook",
        json!({"db_name": format!("^{db}$"), "url": format!("{base}/hook"), "method": "POST",
               "params": {"doc": "$change"},
               "sign": {"scheme": "standard-webhooks", "secret_env": "HOOK_SECRET"}}),
    )
    .await;
    let _worker = s.listener(&["--lease-time", "1.5"], &[("HOOK_SECRET", SECRET)]);
    for n in 0..3 {
        s.couch
            .put_doc(&db, &format!("doc{n}"), &json!({"n": n, "text": "é \" \\"}))
            .await
            .unwrap();
    }
    receiver.wait("three requests", |got| got.len() >= 3).await;

    let requests: Vec<Value> = receiver.received().iter().map(standard_webhook).collect();
    let verify = |requests: &[Value]| verify_standard_webhooks(SECRET, requests);
    let (ok, out) = verify(&requests);
    assert!(ok, "{out}");
    assert_eq!(out.lines().filter(|l| *l == "ok").count(), 3, "{out}");

    // The check is not vacuous: a changed body fails it.
    let mut tampered = requests.clone();
    let body = tampered[0]["body"]
        .as_str()
        .unwrap()
        .replace("\"n\":", "\"n\": ");
    tampered[0]["body"] = json!(body);
    let (ok, out) = verify(&tampered);
    assert!(!ok && out.contains("failed"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_endpoint_opens_its_circuit_while_a_healthy_one_flows() {
    let (s, healthy, good_base, _) = with_receiver("circuit", "unused").await;
    let (broken, bad_base) = Receiver::start().await;
    broken
        .hanging
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let (good, bad): (Vec<String>, Vec<String>) = (
        (0..4).map(|i| s.db(&format!("good{i}"))).collect(),
        (0..4).map(|i| s.db(&format!("bad{i}"))).collect(),
    );
    for db in good.iter().chain(&bad) {
        s.couch.create_db(db).await.unwrap();
    }
    // The time a change waits on an open circuit counts as its retries'
    // schedule: eight retries from 0.2 s doubling give it 51 s.
    let rule = |db_name: String, base: &str| {
        json!({"db_name": db_name, "url": format!("{base}/hook"), "method": "POST",
               "params": {"db": "$db_name", "id": "$change.id"},
               "backoff": {"limit": 8, "delay": 0.2, "strategy": "exponential"}})
    };
    s.rule("bad", rule(format!("^{}_bad", s.prefix), &bad_base))
        .await;
    s.rule("good", rule(format!("^{}_good", s.prefix), &good_base))
        .await;
    // Four slots: the hanging endpoint may hold two of them at most.
    let admin = format!("127.0.0.1:{}", free_port());
    let args = [
        "--admin-addr",
        &admin,
        "--lease-time",
        "1.5",
        "--concurrency",
        "4",
        "--request-timeout",
        "3",
        "--circuit-failures",
        "2",
        "--circuit-cooldown",
        "3",
        "--save-seq-after",
        "1",
    ];
    let worker = s.listener(&args, &[]);
    // The healthy endpoint is in use: the broken one must share with it.
    s.couch.put_doc(&good[0], "warm", &json!({})).await.unwrap();
    healthy
        .wait("a first delivery", |got| !got.is_empty())
        .await;
    for db in &bad {
        s.couch.put_doc(db, "first", &json!({})).await.unwrap();
    }
    let written = std::time::Instant::now();
    for db in &good {
        s.couch.put_doc(db, "first", &json!({})).await.unwrap();
    }
    healthy
        .wait("the healthy endpoint's deliveries", |got| {
            got.len() > good.len()
        })
        .await;
    let took = written.elapsed();
    // Without the share, four requests would hang three seconds each, and
    // the healthy ones would wait behind them.
    assert!(took < Duration::from_millis(2500), "took {took:?}");
    worker
        .wait_log(
            "circuit open: the endpoint keeps failing",
            Duration::from_secs(20),
        )
        .await;
    // A hanging endpoint answers no rule: each rule's circuit there opens
    // (here the one rule's), not the whole endpoint's.
    let gauge = format!("spiegel_endpoint_circuit{{endpoint=\"{bad_base}\",rule=\"bad\"}} 1");
    let metrics = format!("http://{admin}/metrics");
    wait_for(
        "the open circuit in the metrics",
        Duration::from_secs(10),
        || async {
            let (_, text) = http_get(&metrics).await?;
            text.contains(&gauge).then_some(())
        },
    )
    .await;
    wait_for(
        "the circuit in spiegel status",
        Duration::from_secs(20),
        || async {
            let status = s.status().await;
            let circuits = status["circuits"].as_array()?.clone();
            circuits
                .iter()
                .any(|c| c["endpoint"] == format!("{bad_base} (on_change bad)"))
                .then_some(())
        },
    )
    .await;

    // The endpoint comes back: an answer closes the circuit, every held
    // change arrives, and the waits were not attempts: no dead letter.
    broken
        .hanging
        .store(false, std::sync::atomic::Ordering::Relaxed);
    broken
        .wait("every change of the endpoint that came back", |got| {
            let ids: std::collections::HashSet<String> = got
                .iter()
                .map(|r| r.json()["db"].as_str().unwrap_or("").to_string())
                .collect();
            bad.iter().all(|db| ids.contains(db))
        })
        .await;
    // The receiver records a request before answering it: the answer
    // reaches the worker a moment after. The answer that closes the circuit
    // is the probe's, or that of a request the endpoint held since before
    // the circuit opened.
    worker
        .wait_log("circuit closed: ", Duration::from_secs(10))
        .await;
    let letters = spiegel::delivery::dead_letter::list(&s.couch, &s.spiegel_db, "").await;
    assert_eq!(
        letters.unwrap().len(),
        0,
        "waiting on a circuit is not an attempt"
    );
}

/// The dead letters of `rule`, each with its attempts and last error.
async fn letters_with_errors(s: &Installation, rule: &str) -> Vec<(u32, String)> {
    let letters = spiegel::delivery::dead_letter::list(&s.couch, &s.spiegel_db, "")
        .await
        .unwrap();
    let mut found: Vec<(u32, String)> = letters
        .into_iter()
        .filter(|(_, _, l)| l.rule == rule)
        .map(|(_, _, l)| (l.attempts, l.last_error))
        .collect();
    found.sort();
    found
}

/// Writes one document in each of `dbs` and waits until `receiver` got
/// them all on `path`; returns the longest time from a write to its
/// delivery.
async fn round_trip(
    s: &Installation,
    receiver: &Receiver,
    path: &str,
    dbs: &[String],
    id: &str,
) -> Duration {
    let written = std::time::Instant::now();
    for db in dbs {
        s.couch.put_doc(db, id, &json!({})).await.unwrap();
    }
    receiver
        .wait(&format!("the healthy deliveries of {id}"), |got| {
            let of = got
                .iter()
                .filter(|r| r.path == path && r.json()["id"] == id);
            of.count() >= dbs.len()
        })
        .await;
    let arrived = receiver.on(path);
    let last = arrived
        .iter()
        .filter(|r| r.json()["id"] == id)
        .map(|r| r.at);
    last.max().unwrap() - written
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_route_holds_only_its_own_rule_whose_changes_end_as_dead_letters() {
    let (s, receiver, base, hanging_db) = with_receiver("route", "hang").await;
    receiver
        .hanging_paths
        .lock()
        .unwrap()
        .insert("/hang".into());
    let healthy: Vec<String> = (0..3).map(|i| s.db(&format!("ok{i}"))).collect();
    for db in &healthy {
        s.couch.create_db(db).await.unwrap();
    }
    let rule = |db_name: String, path: &str| {
        json!({"db_name": db_name, "url": format!("{base}{path}"), "method": "POST",
               "params": {"id": "$change.id"}, "backoff": {"limit": 1}})
    };
    s.rule("hang", rule(format!("^{hanging_db}$"), "/hang"))
        .await;
    s.rule("healthy", rule(format!("^{}_ok", s.prefix), "/ok"))
        .await;
    // Two timeouts open a circuit, which then waits the default 30 s.
    let worker = s.start(&["--request-timeout", "1", "--circuit-failures", "2"]);
    let docs: Vec<Value> = (0..3).map(|n| json!({"_id": format!("h{n}")})).collect();
    s.couch.bulk_docs(&hanging_db, &docs, true).await.unwrap();

    let bound = Duration::from_secs(3);
    let mut slowest = round_trip(&s, &receiver, "/ok", &healthy, "before").await;
    worker
        .wait_log(
            "circuit open: the endpoint keeps failing",
            Duration::from_secs(20),
        )
        .await;
    // The hanging route's circuit is open: the other rule's requests to
    // the same host go on.
    slowest = slowest.max(round_trip(&s, &receiver, "/ok", &healthy, "open").await);
    // The two attempts that opened the route's circuit, and no other: the
    // rest were held past their one retry's time. Which changes had them
    // depends on the order `_changes` gives when read again (q > 1).
    let letters = wait_for("three dead letters", Duration::from_secs(20), || async {
        let letters = letters_with_errors(&s, "hang").await;
        (letters.len() == 3).then_some(letters)
    })
    .await;
    let attempts: Vec<u32> = letters.iter().map(|l| l.0).collect();
    assert_eq!(attempts.iter().sum::<u32>(), 2, "{attempts:?}");
    for (_, error) in letters.iter().filter(|l| l.0 < 2) {
        assert!(error.starts_with("circuit open for "), "{error}");
        assert!(error.contains("(on_change hang): no answer"), "{error}");
    }
    slowest = slowest.max(round_trip(&s, &receiver, "/ok", &healthy, "after").await);
    assert!(slowest < bound, "a healthy delivery took {slowest:?}");
    assert_eq!(receiver.on("/ok").len(), 9, "each healthy change once");
    assert!(letters_of(&s, "healthy").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_against_a_refused_endpoint_and_a_401_ends_in_dead_letters_not_one_per_cooldown() {
    let (s, receiver, base, db) = with_receiver("burst", "d").await;
    let refused = format!("http://127.0.0.1:{}", free_port());
    receiver
        .plan
        .lock()
        .unwrap()
        .insert("/denied".into(), VecDeque::from([401; 12]));
    let rule = |url: String, extra: Value| {
        let mut rule = json!({"db_name": format!("^{db}$"), "url": url, "method": "POST",
                              "params": {"id": "$change.id"}});
        rule.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        rule
    };
    let once = json!({"backoff": {"limit": 1}});
    s.rule("refused", rule(format!("{refused}/hook"), once.clone()))
        .await;
    s.rule("denied", rule(format!("{base}/denied"), once)).await;
    s.rule("healthy", rule(format!("{base}/ok"), json!({})))
        .await;
    // The default circuit: five failures in a row, a 30 s cooldown.
    let _worker = s.start(&[]);
    let docs: Vec<Value> = (0..6).map(|n| json!({"_id": format!("doc{n}")})).collect();
    let written = std::time::Instant::now();
    s.couch.bulk_docs(&db, &docs, true).await.unwrap();
    // (refused letters, denied letters, healthy deliveries), last seen.
    let seen = std::sync::Mutex::new((0, 0, 0));
    let all = wait_for(
        "12 dead letters and 6 deliveries",
        Duration::from_secs(60),
        || async {
            let got = (
                letters_of(&s, "refused").await.len(),
                letters_of(&s, "denied").await.len(),
                receiver.on("/ok").len(),
            );
            *seen.lock().unwrap() = got;
            (got == (6, 6, 6)).then_some(())
        },
    );
    let done = tokio::time::timeout(Duration::from_secs(30), all).await;
    let took = written.elapsed();
    assert!(
        done.is_ok(),
        "after {took:?}: (refused letters, denied letters, deliveries) {:?}",
        seen.lock().unwrap()
    );
    assert_eq!(letters_of(&s, "denied").await, [2; 6]);
    // The first failures were attempts; once the endpoint's circuit
    // opened, the changes it held were dead-lettered past their retry.
    let refused_letters = letters_with_errors(&s, "refused").await;
    let held = refused_letters
        .iter()
        .filter(|(_, e)| e.starts_with(&format!("circuit open for {refused}: network error")))
        .count();
    assert!(held >= 1, "{refused_letters:?}");
    assert_eq!(receiver.on("/denied").len(), 12, "two attempts a change");
}

/// Runs the Standard Webhooks reference library over `requests` (their
/// three headers and body): whether all verify, and what it printed.
fn verify_standard_webhooks(secret: &str, requests: &[Value]) -> (bool, String) {
    let mut child = std::process::Command::new("node")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/testing/webhooks/verify.js"
        ))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("node");
    let input = json!({"secret": secret, "requests": requests}).to_string();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The three Standard Webhooks headers and the body of a received request.
fn standard_webhook(r: &Received) -> Value {
    let header = |name: &str| r.headers[name].to_str().unwrap().to_string();
    json!({
        "headers": {
            "webhook-id": header("webhook-id"),
            "webhook-timestamp": header("webhook-timestamp"),
            "webhook-signature": header("webhook-signature"),
        },
        "body": String::from_utf8(r.body.to_vec()).unwrap(),
    })
}

#[tokio::test]
async fn standard_webhooks_timestamps_are_taken_when_a_paced_request_is_sent() {
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let (s, receiver, base, db) = with_receiver("stdpaced", "d").await;
    s.rule(
        "hook",
        json!({"db_name": format!("^{db}$"), "url": format!("{base}/hook"), "method": "POST",
               "params": {"id": "$change.id"}, "rate_limit": 1,
               "sign": {"scheme": "standard-webhooks", "secret_env": "HOOK_SECRET"}}),
    )
    .await;
    // One page of five changes, planned together, sent a second apart.
    let docs: Vec<Value> = (0..5).map(|n| json!({"_id": format!("doc{n}")})).collect();
    s.couch.bulk_docs(&db, &docs, true).await.unwrap();
    let _worker = s.listener(&[], &[("HOOK_SECRET", SECRET)]);
    receiver.wait("every change", |got| got.len() >= 5).await;

    let received = receiver.received();
    for r in &received {
        let stamped: u64 = r.headers["webhook-timestamp"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let arrived = r.wall.duration_since(std::time::UNIX_EPOCH).unwrap();
        // Whole seconds: stamped in the second it was sent, or the one before.
        let age = arrived.as_secs_f64() - stamped as f64;
        assert!((0.0..2.0).contains(&age), "{} s old on arrival", age);
    }
    let requests: Vec<Value> = received.iter().map(standard_webhook).collect();
    let (ok, out) = verify_standard_webhooks(SECRET, &requests);
    assert!(ok, "{out}");
    assert_eq!(out.lines().filter(|l| *l == "ok").count(), 5, "{out}");
}

#[tokio::test]
async fn a_rate_limited_rule_spaces_its_requests() {
    let (s, receiver, base, db) = with_receiver("rate", "d").await;
    s.rule(
        "hook",
        json!({"db_name": format!("^{db}$"), "url": format!("{base}/hook"), "method": "POST",
               "params": {"id": "$change.id"}, "rate_limit": 5}),
    )
    .await;
    let docs: Vec<Value> = (0..8).map(|n| json!({"_id": format!("doc{n}")})).collect();
    s.couch.bulk_docs(&db, &docs, true).await.unwrap();
    let _worker = s.start(&[]);
    receiver
        .wait("every change", |got| got.len() >= docs.len())
        .await;
    let times: Vec<std::time::Instant> = receiver.received().iter().map(|r| r.at).collect();
    // Eight requests at five a second: seven gaps of 200 ms. The first
    // request also opens the connection, which on a loaded machine can
    // arrive late and shorten the first gap: the six gaps after it count.
    let spread = times[times.len() - 1] - times[1];
    assert!(spread >= Duration::from_millis(1100), "{spread:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_rule_sends_ordered_arrays_waits_for_more_and_dead_letters_a_batch_whole() {
    let (s, receiver, base, db) = with_receiver("batch", "full").await;
    let (slow, dead) = (s.db("slow"), s.db("dead"));
    for db in [&slow, &dead] {
        s.couch.create_db(db).await.unwrap();
    }
    let rule = |db: &str, path: &str, batch: Value, backoff: Value| {
        json!({"db_name": format!("^{db}$"), "url": format!("{base}/{path}"), "method": "POST",
               "params": {"id": "$change.id", "seq": "$seq", "key": "$delivery_id"},
               "batch": batch, "backoff": backoff})
    };
    let none = json!(null);
    s.rule(
        "full",
        rule(&db, "full", json!({"max_changes": 3}), none.clone()),
    )
    .await;
    let waits = json!({"max_changes": 100, "max_wait_ms": 1500});
    s.rule("slow", rule(&slow, "slow", waits, none)).await;
    let once = json!({"limit": 1, "delay": 0.2});
    s.rule(
        "dead",
        rule(&dead, "dead", json!({"max_changes": 10}), once),
    )
    .await;
    receiver
        .plan
        .lock()
        .unwrap()
        .insert("/dead".into(), VecDeque::from([503, 503]));
    let docs: Vec<Value> = (0..7).map(|n| json!({"_id": format!("doc{n}")})).collect();
    s.couch.bulk_docs(&db, &docs, true).await.unwrap();
    s.couch.bulk_docs(&dead, &docs[..2], true).await.unwrap();
    let _worker = s.start(&[]);
    let items = |r: &Received| r.json().as_array().cloned().unwrap_or_default();
    let ids = |r: &Received| -> Vec<String> {
        items(r)
            .iter()
            .map(|i| i["id"].as_str().unwrap_or("").to_string())
            .collect()
    };

    // Full batches of three, in _changes order.
    receiver
        .wait("every change in batches", |_| {
            receiver
                .on("/full")
                .iter()
                .map(|r| items(r).len())
                .sum::<usize>()
                >= 7
        })
        .await;
    let full = receiver.on("/full");
    let sizes: Vec<usize> = full.iter().map(|r| items(r).len()).collect();
    assert_eq!(sizes, [3, 3, 1], "one read of seven changes");
    let delivered: Vec<(String, Value)> = full
        .iter()
        .flat_map(items)
        .map(|i| (i["id"].as_str().unwrap_or("").to_string(), i["seq"].clone()))
        .collect();
    assert_eq!(delivered.len(), 7);
    assert_in_changes_order(&s.couch, &db, &delivered).await;
    assert_eq!(
        items(&full[0])[0]["key"].as_str().unwrap().len(),
        32,
        "each change keeps its own key"
    );

    // A batch waits for more changes, up to max_wait_ms.
    for n in 0..3 {
        s.couch
            .put_doc(&slow, &format!("s{n}"), &json!({}))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    receiver
        .wait("the waiting batch", |_| !receiver.on("/slow").is_empty())
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let slow_requests = receiver.on("/slow");
    assert_eq!(slow_requests.len(), 1, "one request for the three changes");
    let mut got = ids(&slow_requests[0]);
    got.sort();
    assert_eq!(got, ["s0", "s1", "s2"]);

    // A batch that keeps failing is one dead letter, redelivered whole.
    let letter = wait_for(
        "the batch's dead letter",
        Duration::from_secs(20),
        || async {
            let letters = spiegel::delivery::dead_letter::list(&s.couch, &s.spiegel_db, "")
                .await
                .ok()?;
            letters
                .into_iter()
                .find(|(_, _, l)| l.rule == "dead")
                .map(|(_, _, l)| l)
        },
    )
    .await;
    assert_eq!(letter.batch.as_ref().map(Vec::len), Some(2));
    assert!(s.redeliver("dead").status.success());
    let dead_requests = receiver.on("/dead");
    assert_eq!(dead_requests.len(), 3, "two attempts, then the redelivery");
    let last = &dead_requests[2];
    assert_eq!(
        ids(last),
        ids(&dead_requests[0]),
        "the same changes, in order"
    );
    assert_eq!(
        last.headers["idempotency-key"],
        dead_requests[0].headers["idempotency-key"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_delivered_whole_when_another_blocking_rule_fails_inside_it() {
    let (s, receiver, base, db) = with_receiver("batch-fail", "d").await;
    let on_db = format!("^{db}$");
    s.rule(
        "each",
        json!({"db_name": on_db, "url": format!("{base}/each/$change.id"), "method": "POST",
               "params": {"id": "$change.id"}}),
    )
    .await;
    s.rule(
        "batch",
        json!({"db_name": on_db, "url": format!("{base}/batch"), "method": "POST",
               "params": {"id": "$change.id"}, "batch": {"max_changes": 10}}),
    )
    .await;
    // The middle change fails once for the single rule.
    receiver
        .plan
        .lock()
        .unwrap()
        .insert("/each/doc5".into(), VecDeque::from([503]));
    let ids: Vec<String> = (0..10).map(|n| format!("doc{n}")).collect();
    let docs: Vec<Value> = ids.iter().map(|id| json!({"_id": id})).collect();
    // Written before the worker starts: its first read holds all ten, one batch.
    s.couch.bulk_docs(&db, &docs, true).await.unwrap();
    let _worker = s.start(&[]);

    let batched = || -> Vec<String> {
        let mut got: Vec<String> = receiver
            .on("/batch")
            .iter()
            .flat_map(|r| r.json().as_array().cloned().unwrap_or_default())
            .map(|i| i["id"].as_str().unwrap_or("").to_string())
            .collect();
        got.sort();
        got.dedup();
        got
    };
    receiver
        .wait("the batch's last change", |_| {
            batched().contains(&"doc9".to_string())
        })
        .await;
    receiver
        .wait("every change of the single rule", |got| {
            ids.iter()
                .all(|id| got.iter().any(|r| r.path == format!("/each/{id}")))
        })
        .await;
    assert_eq!(
        batched(),
        ids,
        "every change of the batch, those before the failed one included"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_cannot_be_built_becomes_a_dead_letter_and_the_next_changes_go_on() {
    let (s, receiver, base, db) = with_receiver("unbuildable", "d").await;
    // The host is the document's id: "bad host" is no host name, while the
    // URL parser reads "127.1" as 127.0.0.1.
    let port = base.rsplit(':').next().unwrap();
    s.rule(
        "by-host",
        json!({"db_name": format!("^{db}$"), "url": format!("http://${{change.id}}:{port}/hook"),
               "method": "POST", "params": {"id": "$change.id"}}),
    )
    .await;
    // The default --backoff-limit 0 (retry forever): still a dead letter,
    // since building the request again gives the same.
    let _worker = s.start(&[]);
    for id in ["127.0.0.1", "bad host", "127.1"] {
        s.couch.put_doc(&db, id, &json!({})).await.unwrap();
    }
    receiver
        .wait("the changes around the bad one", |got| {
            ["127.0.0.1", "127.1"]
                .iter()
                .all(|id| got.iter().any(|r| r.json()["id"] == *id))
        })
        .await;
    let letter = wait_for("the dead letter", Duration::from_secs(20), || async {
        let letters = spiegel::delivery::dead_letter::list(&s.couch, &s.spiegel_db, "")
            .await
            .ok()?;
        letters.into_iter().next().map(|(_, _, letter)| letter)
    })
    .await;
    assert_eq!(
        (
            letter.rule.as_str(),
            letter.db_name.as_str(),
            letter.doc_id.as_str()
        ),
        ("by-host", db.as_str(), "bad host")
    );
    assert!(
        letter.last_error.contains("cannot build the request") && letter.last_error.contains("url"),
        "{}",
        letter.last_error
    );
    assert_eq!(letter.request.get(), "null", "no request was built");
    assert_eq!((letter.attempts, letter.last_status), (0, None));
    assert_eq!(receiver.received().len(), 2, "nothing sent for the bad one");
}

/// Waits until the installation holds no dead letter (`what` names why).
async fn wait_no_dead_letters(s: &Installation, what: &str) {
    wait_for(what, Duration::from_secs(10), || async {
        spiegel::delivery::dead_letter::list(&s.couch, &s.spiegel_db, "")
            .await
            .ok()?
            .is_empty()
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_that_is_a_dot_segment_is_dead_lettered_never_sent_to_the_parent_path() {
    let (s, receiver, base, db) = with_receiver("dotseg", "d").await;
    s.rule(
        "files",
        json!({"db_name": format!("^{db}$"), "url": format!("{base}/files/${{change.id}}"),
               "method": "PUT"}),
    )
    .await;
    let _worker = s.start(&[]);
    s.couch.put_doc(&db, "a", &json!({})).await.unwrap();
    // `..` has no document path either: written through _bulk_docs.
    let dots = [json!({"_id": ".."})];
    let written = s.couch.bulk_docs(&db, &dots, true).await.unwrap();
    assert!(written.iter().all(|r| !r.is_failed()), "{written:?}");
    s.couch.put_doc(&db, "b", &json!({})).await.unwrap();
    receiver
        .wait("the changes around `..`", |got| {
            ["/files/a", "/files/b"]
                .iter()
                .all(|path| got.iter().any(|r| r.path == *path))
        })
        .await;
    let letter = wait_for(
        "a dead letter or a request for ..",
        Duration::from_secs(20),
        || async {
            if receiver.received().len() > 2 {
                return Some(None);
            }
            let letters = spiegel::delivery::dead_letter::list(&s.couch, &s.spiegel_db, "");
            letters
                .await
                .ok()?
                .into_iter()
                .next()
                .map(|(_, _, l)| Some(l))
        },
    )
    .await;
    let paths: Vec<String> = receiver.received().into_iter().map(|r| r.path).collect();
    assert_eq!(paths.len(), 2, "nothing sent for `..`: {paths:?}");
    let letter = letter.expect("a dead letter");
    assert_eq!(letter.doc_id, "..");
    assert!(
        letter.last_error.contains("path segment"),
        "{}",
        letter.last_error
    );
}
