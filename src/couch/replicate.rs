//! `POST /_replicate` under a watchdog.
//!
//! Without `continuous`, CouchDB answers only when the replication is done
//! and sends nothing meanwhile, so silence cannot tell a long replication
//! from a connection that went dead, or from a job that ended without its
//! answer reaching us. While the request is in flight, the watchdog asks
//! `GET /_scheduler/jobs` whether CouchDB still runs a job for this source
//! and target; when two checks in a row find none, the request is abandoned
//! as [`CouchError::Unreachable`] and the caller retries it. A retry is
//! cheap either way: CouchDB joins a request to a job it still runs for the
//! same replication, and a new job resumes from the replication's
//! checkpoint. Servers without `_scheduler/jobs` get a time limit instead.
//!
//! The first checks come early because CouchDB 3.5 leaves a request
//! unanswered when it arrives while an identical replication is ending: it
//! joins the ending job, whose result was already sent, and waits forever.
//! Spiegel meets that race whenever a database changes during its run, so
//! the next run follows the last at once; the early checks recover from it
//! in about two seconds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::Mutex;

use super::{decode, CouchClient, CouchError, Result};

/// The request's operation in metrics, as the client names it.
const OPERATION: &str = "POST _replicate";

/// Missed checks after which a request is abandoned.
const MISSES: u32 = 2;

/// The first checks, before the regular ones.
const EARLY: [Duration; 2] = [Duration::from_secs(1), Duration::from_secs(1)];

/// A listing younger than this serves every request in flight, so that
/// twenty of them cost one listing, not twenty.
const FRESH: Duration = Duration::from_millis(500);

/// The last listing of CouchDB's jobs: when it was taken, and the jobs
/// (`None`: the server cannot list them).
#[derive(Clone, Default)]
pub(super) struct JobsCache(Arc<Mutex<Option<Listing>>>);

type Listing = (Instant, Option<Arc<Vec<Endpoints>>>);

/// A replication's source and target, as `_scheduler/jobs` shows them:
/// without credentials, percent-decoded, without a trailing slash.
#[derive(Debug, PartialEq, Eq)]
struct Endpoints {
    source: String,
    target: String,
}

impl Endpoints {
    /// The endpoints of a `_replicate` body (URL strings or `{"url": ...}`).
    fn of(body: &Value) -> Option<Endpoints> {
        let url = |v: &Value| match v {
            Value::String(s) => normalize(s),
            Value::Object(o) => o.get("url").and_then(Value::as_str).and_then(normalize),
            _ => None,
        };
        Some(Endpoints {
            source: url(body.get("source")?)?,
            target: url(body.get("target")?)?,
        })
    }
}

/// Scheme, host, port and decoded path of a URL, credentials left out.
fn normalize(raw: &str) -> Option<String> {
    let url = ::url::Url::parse(raw).ok()?;
    let path = percent_encoding::percent_decode_str(url.path()).decode_utf8_lossy();
    Some(format!(
        "{}://{}:{}{}",
        url.scheme(),
        url.host_str()?.to_ascii_lowercase(),
        url.port_or_known_default()?,
        path.trim_end_matches('/')
    ))
}

#[derive(Deserialize)]
struct Jobs {
    #[serde(default)]
    total_rows: usize,
    jobs: Vec<Job>,
}

/// Jobs per page of `_scheduler/jobs` (CouchDB answers 100 without a
/// `limit`).
const JOBS_PAGE: usize = 1000;

#[derive(Deserialize)]
struct Job {
    source: Option<String>,
    target: Option<String>,
}

pub(super) async fn watched(client: &CouchClient, body: &Value) -> Result<Value> {
    let options = &client.options;
    let req = client
        .authorized(client.http_silent.post(client.url_for("_replicate")))
        .timeout(options.replication_timeout)
        .json(body);
    let post = async { decode(client.send_on(&client.http_silent, req, None, None).await?).await };
    tokio::pin!(post);
    let Some(endpoints) = Endpoints::of(body) else {
        return post.await;
    };
    let sent = Instant::now();
    let waits = EARLY
        .into_iter()
        .chain(std::iter::repeat(options.replication_probe));
    let mut misses = 0;
    // The listing behind the last miss: a miss counts once per listing.
    let mut missed_in: Option<Instant> = None;
    for wait in waits {
        tokio::select! {
            answer = &mut post => return answer,
            () = tokio::time::sleep(wait) => {}
        }
        let (taken, jobs) = jobs(client).await;
        match jobs {
            Some(jobs) if !jobs.contains(&endpoints) => {
                if taken > sent + EARLY[0] && missed_in != Some(taken) {
                    misses += 1;
                    missed_in = Some(taken);
                }
                if misses >= MISSES {
                    let error = CouchError::Unreachable(format!(
                        "no answer to POST /_replicate after {:?}, and CouchDB runs no job for it",
                        sent.elapsed()
                    ));
                    if let Some(m) = &client.metrics {
                        m.observe(OPERATION, sent.elapsed(), Some(error.kind()));
                    }
                    return Err(error);
                }
            }
            // Running, or unknown (no `_scheduler/jobs`): keep waiting.
            _ => misses = 0,
        }
    }
    post.await
}

/// CouchDB's jobs, listed at most once per [`FRESH`].
async fn jobs(client: &CouchClient) -> Listing {
    let mut cache = client.jobs.0.lock().await;
    if let Some(listing) = cache.as_ref().filter(|(at, _)| at.elapsed() < FRESH) {
        return listing.clone();
    }
    let listing = (Instant::now(), list_jobs(client).await);
    *cache = Some(listing.clone());
    listing
}

/// Every job of every node, page by page.
async fn list_jobs(client: &CouchClient) -> Option<Arc<Vec<Endpoints>>> {
    let mut endpoints = Vec::new();
    let mut skip = 0;
    loop {
        let page = [("limit", JOBS_PAGE), ("skip", skip)];
        let req = client.request(Method::GET, "_scheduler/jobs").query(&page);
        let listed: Jobs = match client.json(req, None, None).await {
            Ok(listed) => listed,
            Err(e) => {
                tracing::debug!(error = %e, "cannot list CouchDB's replication jobs");
                return None;
            }
        };
        skip += listed.jobs.len();
        let done = listed.jobs.is_empty() || skip >= listed.total_rows;
        endpoints.extend(listed.jobs.into_iter().filter_map(|j| {
            Some(Endpoints {
                source: normalize(&j.source?)?,
                target: normalize(&j.target?)?,
            })
        }));
        if done {
            return Some(Arc::new(endpoints));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn endpoints_match_what_the_scheduler_shows() {
        let body = json!({
            "source": {"url": "http://admin:pw@127.0.0.1:5984/users%2Falice",
                       "auth": {"basic": {"username": "admin", "password": "pw"}}},
            "target": "http://u@LOCALHOST:5984/all/",
        });
        let shown = Endpoints {
            source: normalize("http://127.0.0.1:5984/users%2Falice/").unwrap(),
            target: normalize("http://localhost:5984/all/").unwrap(),
        };
        assert_eq!(Endpoints::of(&body), Some(shown));
        assert_eq!(
            normalize("https://h/db").as_deref(),
            Some("https://h:443/db")
        );
    }

    #[test]
    fn a_body_without_endpoints_is_not_watched() {
        assert_eq!(Endpoints::of(&json!({"source": "x"})), None);
        assert_eq!(Endpoints::of(&json!({"source": 1, "target": 2})), None);
    }
}
