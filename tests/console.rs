//! The web console of the admin server, against a running Spiegel: its
//! actions over HTTP, and the page itself in a real browser (headless
//! Chromium driven through chromedriver, the W3C WebDriver protocol).

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

use common::*;

const TOKEN: &str = "console-test-token";

/// A change-listener with the console on a port of its own.
struct Console {
    worker: Spiegel,
    base: String,
}

impl Console {
    /// Waits until the console's state shows `text` (the database held
    /// back, say).
    async fn wait_state(&self, text: &str) {
        wait_for(text, Duration::from_secs(20), || async {
            self.state().await.contains(text).then_some(())
        })
        .await;
    }

    async fn start(s: &Installation, role: &str, extra: &[&str]) -> Console {
        Console::start_at(s, &s.url, role, extra).await
    }

    /// [`Console::start`] with `url` as the worker's CouchDB (a proxy).
    async fn start_at(s: &Installation, url: &str, role: &str, extra: &[&str]) -> Console {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut args = vec!["--backoff-delay", "0.3", "--console", "--admin-addr", &addr];
        args.extend_from_slice(extra);
        let worker = s.start_worker_at(url, role, &args);
        let base = format!("http://{addr}");
        // Not `/`: a read made now would be the one the next requests share.
        wait_http_status(&format!("{base}/healthz"), 200, Duration::from_secs(20)).await;
        Console { worker, base }
    }

    /// POSTs an action with `token` (none: no Authorization header).
    async fn act(&self, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
        let mut request = reqwest::Client::new()
            .post(format!("{}{path}", self.base))
            .json(&body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let answer = request.send().await.unwrap();
        (answer.status().as_u16(), answer.json().await.unwrap())
    }

    /// Pauses or resumes `rule`, with the token.
    async fn pause(&self, rule: &str, paused: bool) -> (u16, Value) {
        let body = json!({"rule": rule, "paused": paused});
        self.act("/console/pause", Some(TOKEN), body).await
    }

    /// The state, read with the token.
    async fn state(&self) -> String {
        self.get("/console/state", Some(TOKEN)).await.1
    }

    /// GETs `path` with `token` (none: no Authorization header).
    async fn get(&self, path: &str, token: Option<&str>) -> (u16, String) {
        let mut request = reqwest::Client::new().get(format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let answer = request.send().await.unwrap();
        (answer.status().as_u16(), answer.text().await.unwrap())
    }
}

impl Installation {
    async fn on_change(&self, id: &str, db: &str, url: String, extra: Value) {
        let mut doc = json!({"type": "on_change", "db_name": format!("^{db}$"), "url": url,
                             "method": "POST", "params": {"id": "$change.id"}});
        if let (Some(doc), Some(extra)) = (doc.as_object_mut(), extra.as_object()) {
            doc.extend(extra.clone());
        }
        self.couch
            .put_doc(&self.spiegel_db, id, &doc)
            .await
            .unwrap();
    }

    /// Edits the `url` of on_change document `id`.
    async fn set_url(&self, id: &str, url: &str) {
        let mut doc: Value = self.couch.get_doc(&self.spiegel_db, id).await.unwrap();
        doc["url"] = json!(url);
        self.couch
            .put_doc(&self.spiegel_db, id, &doc)
            .await
            .unwrap();
    }

    async fn dead_letters(&self) -> usize {
        spiegel::delivery::dead_letter::list(&self.couch, &self.spiegel_db, "")
            .await
            .unwrap()
            .len()
    }
}

#[tokio::test]
async fn the_console_is_served_only_when_asked_and_actions_need_a_token() {
    let s = Installation::new("con-off").await;
    let addr = format!("127.0.0.1:{}", free_port());
    let _plain = s.start_worker("change-listener", &["--admin-addr", &addr]);
    wait_http_status(
        &format!("http://{addr}/healthz"),
        200,
        Duration::from_secs(20),
    )
    .await;
    let page = reqwest::get(format!("http://{addr}/")).await.unwrap();
    assert_eq!(page.status(), 404, "no console without --console");

    let read_only = Console::start(&s, "change-listener", &[]).await;
    let (status, body) = read_only
        .act("/console/redeliver", Some(TOKEN), json!({}))
        .await;
    assert_eq!(status, 403, "{body}");
    assert!(body["error"].as_str().unwrap().contains("--admin-token"));

    let console = Console::start(&s, "change-listener", &["--admin-token", TOKEN]).await;
    for token in [None, Some("wrong")] {
        let (status, _) = console.act("/console/redeliver", token, json!({})).await;
        assert_eq!(status, 401, "token {token:?}");
    }
    let (status, body) = console
        .act("/console/redeliver", Some(TOKEN), json!({}))
        .await;
    assert_eq!((status, body["delivered"].as_u64()), (200, Some(0)));
    assert!(
        !console.worker.logs().contains(TOKEN),
        "the token is never logged"
    );
}

#[tokio::test]
async fn reading_the_console_needs_the_token_when_one_is_set() {
    let s = Installation::new("con-read").await;
    let console = Console::start(&s, "change-listener", &["--admin-token", TOKEN]).await;
    for path in ["/console/state", "/console/tail"] {
        for token in [None, Some("wrong")] {
            let (status, _) = console.get(path, token).await;
            assert_eq!(status, 401, "{path} with {token:?}");
        }
        let (status, _) = console.get(path, Some(TOKEN)).await;
        assert_eq!(status, 200, "{path} with the token");
    }
    let (status, shell) = console.get("/", None).await;
    assert_eq!(status, 200, "the page itself asks for the token");
    assert!(shell.contains("data-locked"), "{shell}");
    for data in ["dead-letters", s.spiegel_db.as_str()] {
        assert!(
            !shell.contains(data),
            "the page shows {data:?} without the token"
        );
    }
    let (_, page) = console.get("/", Some(TOKEN)).await;
    assert!(page.contains("dead-letters"), "{page}");

    let extra = ["--admin-token", TOKEN, "--console-public-read"];
    let public = Console::start(&s, "change-listener", &extra).await;
    let (status, state) = public.get("/console/state", None).await;
    assert_eq!(status, 200, "--console-public-read opens the reading");
    assert!(state.contains("dead-letters"), "{state}");
    let (status, _) = public.act("/console/redeliver", None, json!({})).await;
    assert_eq!(status, 401, "and the actions still need the token");

    let open = Console::start(&s, "change-listener", &[]).await;
    let (status, _) = open.get("/console/state", None).await;
    assert_eq!(
        status, 200,
        "without a token the console is open, read-only"
    );
}

/// How many requests through `proxy` listed the dead letters.
fn letter_listings(proxy: &RewritingProxy) -> Vec<String> {
    let requests = proxy.requests().into_iter();
    requests.filter(|r| r.contains("spiegel_dead_")).collect()
}

#[tokio::test]
async fn concurrent_reads_of_the_state_share_one_read_of_the_installation() {
    let s = Installation::new("con-cache").await;
    let proxy = RewritingProxy::start(&s.url).await;
    let console = Console::start_at(&s, &proxy.url(&s.url), "change-listener", &[]).await;
    let before = letter_listings(&proxy).len();
    let reads = (0..20).map(|_| console.get("/console/state", None));
    let states = futures::future::join_all(reads).await;
    assert!(states.iter().all(|(status, _)| *status == 200));
    let made = letter_listings(&proxy).len() - before;
    assert!(
        made <= 1,
        "{made} reads of the installation for 20 requests"
    );
}

/// A dead letter of `rule` as `spiegel_dead_...` document `n`.
fn letter(n: usize, rule: &str) -> Value {
    json!({"_id": format!("spiegel_dead_20260101T000000000_{n:08x}"),
           "type": "spiegel_dead_letter", "rule": rule, "db_name": "db", "seq": "1-a",
           "doc_id": format!("doc{n}"), "rev": "1-a", "change": {"_id": "d"},
           "request": null, "last_status": 503, "last_error": "HTTP 503", "attempts": 1,
           "first_attempt_at": "2026-01-01T00:00:00.000Z",
           "last_attempt_at": "2026-01-01T00:00:00.000Z"})
}

/// The `limit` of a request, if it has one.
fn limit_of(request: &str) -> Option<u64> {
    let value = request
        .split(['?', '&'])
        .find_map(|p| p.strip_prefix("limit="));
    value.and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn dead_letters_are_counted_and_grouped_page_by_page() {
    let s = Installation::new("con-pages").await;
    let rules = ["even", "odd"];
    let letters: Vec<Value> = (0..1150).map(|n| letter(n, rules[n % 2])).collect();
    s.couch
        .bulk_docs(&s.spiegel_db, &letters, true)
        .await
        .unwrap();
    let proxy = RewritingProxy::start(&s.url).await;
    let console = Console::start_at(&s, &proxy.url(&s.url), "change-listener", &[]).await;
    console
        .wait_state("Dead letters <span class=\"muted\">(1150)</span>")
        .await;
    let state = console.state().await;
    assert!(state.contains("Grouped over the oldest 1000."), "{state}");
    let listings = letter_listings(&proxy);
    assert!(listings.len() > 2, "{listings:?}");
    for request in &listings {
        let bound = match request.contains("include_docs=true") {
            true => 101,
            false => 1001,
        };
        let limit = limit_of(request);
        assert!(
            limit.is_some_and(|l| l <= bound),
            "an unpaged listing: {request}"
        );
    }
}

#[tokio::test]
async fn with_the_console_and_no_address_the_admin_server_listens_on_loopback_only() {
    let s = Installation::new("con-local").await;
    let mut cmd = spiegel();
    cmd.env_remove("ADMIN_ADDR").args([
        "change-listener",
        "--url",
        &s.url,
        "--db-name",
        &s.spiegel_db,
        "--lease-time",
        "1.5",
        "--console",
    ]);
    let worker = Spiegel::start_command(cmd);
    worker
        .wait_log("admin HTTP server", Duration::from_secs(30))
        .await;
    let logs = worker.logs();
    let line = logs.lines().find(|l| l.contains("admin HTTP server"));
    let line = line.expect("the admin server's line");
    assert!(line.contains("127.0.0.1:9090"), "{line}");
    assert!(!line.contains("0.0.0.0"), "{line}");
    // The port may be another process's (the line then says so).
    if !line.contains("not started") {
        assert!(line.contains("on this host only"), "{line}");
        let healthz = "http://127.0.0.1:9090/healthz";
        wait_http_status(healthz, 200, Duration::from_secs(20)).await;
    }
}

#[tokio::test]
async fn a_paused_rule_holds_its_changes_until_it_is_resumed() {
    let (s, receiver, base, db) = with_receiver("con-pause", "held").await;
    s.on_change("hook", &db, format!("{base}/hook"), json!({}))
        .await;
    let console = Console::start(&s, "change-listener", &["--admin-token", TOKEN]).await;
    s.couch.put_doc(&db, "before", &json!({})).await.unwrap();
    receiver
        .wait("the first change", |got| got.len() == 1)
        .await;

    let (status, body) = console.pause("hook", true).await;
    assert_eq!(status, 200, "{body}");
    let doc: Value = s.couch.get_doc(&s.spiegel_db, "hook").await.unwrap();
    assert_eq!(doc["paused"], true);
    // The worker has loaded the paused rule once its status notes it.
    wait_for(
        "the pause to be loaded",
        Duration::from_secs(20),
        || async {
            let reports = s.reports("hook").await;
            reports
                .iter()
                .any(|r| r["note"].as_str().is_some_and(|n| n.contains("paused")))
                .then_some(())
        },
    )
    .await;

    s.couch.put_doc(&db, "during", &json!({})).await.unwrap();
    console.wait_state("hook is paused").await;
    assert_eq!(receiver.received().len(), 1, "nothing is sent while paused");

    let (status, _) = console.pause("hook", false).await;
    assert_eq!(status, 200);
    // Well within the 60 s re-check: the resumption itself runs the database.
    wait_for("the held change", Duration::from_secs(15), || async {
        let got = receiver.received();
        got.iter().any(|r| r.json()["id"] == "during").then_some(())
    })
    .await;
    let doc: Value = s.couch.get_doc(&s.spiegel_db, "hook").await.unwrap();
    assert!(doc.get("paused").is_none());
}

#[tokio::test]
async fn a_rule_made_unusable_by_an_edit_holds_its_changes_until_it_is_fixed() {
    let (s, receiver, base, db) = with_receiver("con-unusable", "held").await;
    s.on_change("hook", &db, format!("{base}/hook"), json!({}))
        .await;
    let console = Console::start(&s, "change-listener", &[]).await;
    s.couch.put_doc(&db, "before", &json!({})).await.unwrap();
    receiver
        .wait("the first change", |got| got.len() == 1)
        .await;

    s.set_url("hook", "ftp://example.com/hook").await;
    wait_for(
        "the rule reported unusable and holding",
        Duration::from_secs(20),
        || async {
            let reports = s.reports("hook").await;
            reports
                .iter()
                .any(|r| {
                    r["invalid"].as_str().is_some_and(|i| i.contains("url"))
                        && r["note"].as_str().is_some_and(|n| n.contains("unusable"))
                })
                .then_some(())
        },
    )
    .await;

    s.couch.put_doc(&db, "during", &json!({})).await.unwrap();
    console.wait_state("hook is unusable").await;
    assert_eq!(
        receiver.received().len(),
        1,
        "nothing is sent while unusable"
    );
    // Whatever checkpoint is saved, `_changes` after it still holds "during".
    let checkpoint: Option<Value> = s
        .couch
        .get_doc(&s.spiegel_db, &format!("spiegel_cl_{db}"))
        .await
        .ok();
    let query = spiegel::couch::ChangesQuery {
        since: checkpoint.map(|c| spiegel::couch::Seq::from(c["last_seq"].clone())),
        ..Default::default()
    };
    let after = s.couch.changes(&db, &query).await.unwrap().results;
    assert!(
        after.iter().any(|c| c.id == "during"),
        "the checkpoint moved past the held change"
    );

    s.set_url("hook", &format!("{base}/hook")).await;
    // Well within the 60 s re-check: the fix itself runs the database.
    wait_for("the held change", Duration::from_secs(15), || async {
        let got = receiver.received();
        got.iter().any(|r| r.json()["id"] == "during").then_some(())
    })
    .await;
}

/// chromedriver and a headless Chromium of its own, both gone on drop.
struct Browser {
    client: Client,
    driver: Child,
    profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Browser {
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let profile = tempfile::tempdir().unwrap();
        let status = format!("http://127.0.0.1:{port}/status");
        wait_http_status(&status, 200, Duration::from_secs(20)).await;
        // Chromium as root in a sandbox-less container, with nothing that
        // reaches out to the network.
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-quic",
            "--no-first-run",
            "--window-size=1280,1000",
            &format!("--user-data-dir={}", profile.path().display()),
        ];
        let mut capabilities = serde_json::Map::new();
        capabilities.insert("goog:chromeOptions".into(), json!({ "args": args }));
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("a WebDriver session");
        Browser {
            client,
            driver,
            profile,
        }
    }

    async fn click(&self, css: &str) {
        let found = self.client.find(Locator::Css(css)).await.unwrap();
        found.click().await.unwrap();
    }

    async fn text(&self, css: &str) -> String {
        let found = self.client.find(Locator::Css(css)).await.unwrap();
        found.text().await.unwrap()
    }

    /// Waits until the element at `css` has a text that satisfies `ok`.
    async fn wait_text(&self, what: &str, css: &str, ok: impl Fn(&str) -> bool) -> String {
        wait_for(what, Duration::from_secs(30), || async {
            let found = self.client.find(Locator::Css(css)).await.ok()?;
            found.text().await.ok().filter(|t| ok(t))
        })
        .await
    }

    async fn close(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        // A browser left behind by a failed test goes too.
        let profile = self.profile.path().display().to_string();
        let _ = Command::new("pkill").args(["-f", &profile]).status();
    }
}

#[tokio::test]
#[cfg_attr(
    not(spiegel_has_chromium),
    ignore = "needs chromium and chromedriver on PATH (Debian: chromium, chromium-driver)"
)]
async fn the_page_shows_the_deployment_and_a_delivery_in_its_live_tail() {
    let (s, receiver, base, db) = with_receiver("con-page", "live").await;
    let secret_url = format!(
        "{}/hook?api_key=very-secret",
        base.replace("://", "://user:pw@")
    );
    s.on_change("hook", &db, secret_url, json!({})).await;
    // An API that refuses connections: its errors quote the URL, whose
    // path and query are secrets too.
    let closed = format!(
        "http://user:pw@127.0.0.1:{}/hooks/very-secret?api_key=very-secret",
        free_port()
    );
    let once = json!({"backoff": {"limit": 1, "delay": 0.2}});
    s.on_change("broken", &db, closed, once).await;
    let console = Console::start(&s, "run", &[]).await;
    let browser = Browser::start().await;
    browser
        .client
        .goto(&format!("{}/", console.base))
        .await
        .unwrap();

    let workers = browser.text("#workers").await;
    assert!(workers.contains("change-listener") && workers.contains("replicator"));
    assert!(workers.contains("this process"), "{workers}");
    let documents = browser.text("#documents").await;
    assert!(
        documents.contains("hook") && documents.contains("POST"),
        "{documents}"
    );
    assert!(
        browser.text("#read-only").await.contains("--admin-token"),
        "without a token the page says it is read-only"
    );

    s.couch.put_doc(&db, "seen-live", &json!({})).await.unwrap();
    receiver.wait("the delivery", |got| got.len() == 1).await;
    let row = format!("#tail tr[data-db=\"{db}\"]");
    let tail = browser
        .wait_text("the delivery in the live tail", &row, |t| {
            t.contains("HTTP 200")
        })
        .await;
    assert!(tail.contains("hook"), "{tail}");
    let failed = format!("#tail tr.failed[data-db=\"{db}\"]");
    browser
        .wait_text("the failure in the live tail", &failed, |t| {
            t.contains("broken")
        })
        .await;
    browser
        .wait_text("the failure in the documents", "#documents", |t| {
            t.contains("Connection refused")
        })
        .await;

    let source = browser.client.source().await.unwrap();
    assert!(source.contains("127.0.0.1"), "origins are shown");
    for secret in ["very-secret", "user:pw", "api_key"] {
        assert!(!source.contains(secret), "the page shows {secret:?}");
    }
    browser.close().await;
}

#[tokio::test]
#[cfg_attr(
    not(spiegel_has_chromium),
    ignore = "needs chromium and chromedriver on PATH (Debian: chromium, chromium-driver)"
)]
async fn a_dead_letter_is_redelivered_from_the_page_with_the_token_only() {
    let (s, receiver, base, db) = with_receiver("con-dead", "dead").await;
    *receiver.failing.lock().unwrap() = Some(503);
    let backoff = json!({"backoff": {"limit": 1, "delay": 0.2}});
    s.on_change("hook", &db, format!("{base}/hook"), backoff)
        .await;
    let console = Console::start(&s, "change-listener", &["--admin-token", TOKEN]).await;
    s.couch.put_doc(&db, "doc1", &json!({})).await.unwrap();
    wait_for("a dead letter", Duration::from_secs(30), || async {
        (s.dead_letters().await == 1).then_some(())
    })
    .await;
    *receiver.failing.lock().unwrap() = None;
    let attempts = receiver.received().len();

    let browser = Browser::start().await;
    browser
        .client
        .goto(&format!("{}/", console.base))
        .await
        .unwrap();
    // The page asks for the token before it shows anything.
    browser
        .wait_text("the request of the token", "#message", |t| {
            t.contains("needs the admin token")
        })
        .await;
    let source = browser.client.source().await.unwrap();
    assert!(
        !source.contains("dead-letters"),
        "the state without the token"
    );
    let token = browser.client.find(Locator::Id("token")).await.unwrap();
    token.send_keys(&format!("{TOKEN}\u{E007}")).await.unwrap();
    let group = "#dead-letters tr[data-rule=\"hook\"]";
    let letters = browser
        .wait_text("the dead letter", group, |t| t.contains("503"))
        .await;
    assert!(letters.contains("hook"), "{letters}");
    let redeliver = format!("{group} button[data-action=\"redeliver\"]");

    // Without the token: refused, and the letter stays.
    token.clear().await.unwrap();
    browser.click(&redeliver).await;
    browser
        .wait_text("the refusal", "#message", |t| t.contains("Refused (401)"))
        .await;
    assert_eq!(s.dead_letters().await, 1);
    assert_eq!(receiver.received().len(), attempts);

    // With it: delivered, and the letter is gone.
    token.send_keys(TOKEN).await.unwrap();
    browser.click(&redeliver).await;
    browser
        .wait_text("the redelivery", "#message", |t| {
            t.contains("Redelivered 1")
        })
        .await;
    assert_eq!(s.dead_letters().await, 0);
    assert_eq!(receiver.received().len(), attempts + 1);
    browser.close().await;
}
