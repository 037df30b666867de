//! The benchmark's own CouchDB access: setup, writes and counts.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

#[derive(Clone)]
pub(crate) struct Couch {
    pub(crate) http: reqwest::Client,
    /// Without credentials, no trailing slash.
    pub(crate) base: String,
    /// With credentials: what Spiegel and the documents get.
    pub(crate) auth_url: String,
    pub(crate) auth: Option<(String, String)>,
    pub(crate) port: u16,
}

/// One path segment (or query value), percent-encoded as Spiegel does.
pub(crate) use spiegel::couch::encode_segment as enc;

impl Couch {
    pub(crate) fn new(url: &str) -> Result<Couch> {
        let parsed = url::Url::parse(url).context("--url")?;
        let auth = (!parsed.username().is_empty()).then(|| {
            let dec = |s: &str| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8_lossy()
                    .to_string()
            };
            (dec(parsed.username()), dec(parsed.password().unwrap_or("")))
        });
        let port = parsed
            .port_or_known_default()
            .ok_or_else(|| anyhow!("--url has no port"))?;
        let mut bare = parsed.clone();
        let _ = bare.set_username("");
        let _ = bare.set_password(None);
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .pool_idle_timeout(Duration::from_secs(30))
            .build()?;
        Ok(Couch {
            http,
            base: bare.as_str().trim_end_matches('/').to_string(),
            auth_url: parsed.as_str().trim_end_matches('/').to_string(),
            auth,
            port,
        })
    }

    pub(crate) fn req(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let rb = self.http.request(method, format!("{}/{}", self.base, path));
        match &self.auth {
            Some((u, p)) => rb.basic_auth(u, Some(p)),
            None => rb,
        }
    }

    pub(crate) async fn send(&self, rb: reqwest::RequestBuilder) -> Result<(StatusCode, Value)> {
        let resp = rb.send().await?;
        let status = resp.status();
        let body = resp.bytes().await?;
        let value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        Ok((status, value))
    }

    pub(crate) async fn get(&self, path: &str) -> Result<Value> {
        let (status, v) = self.send(self.req(Method::GET, path)).await?;
        if !status.is_success() {
            bail!("GET {path}: {status} {v}");
        }
        Ok(v)
    }

    /// Creates a database; an existing one is fine.
    pub(crate) async fn create_db(&self, name: &str) -> Result<()> {
        for attempt in 0..5 {
            match self.send(self.req(Method::PUT, &enc(name))).await {
                Ok((s, _)) if s.is_success() || s == StatusCode::PRECONDITION_FAILED => {
                    return Ok(())
                }
                Ok((s, v)) if attempt == 4 => bail!("PUT /{name}: {s} {v}"),
                Err(e) if attempt == 4 => return Err(e),
                _ => tokio::time::sleep(Duration::from_millis(200 << attempt)).await,
            }
        }
        unreachable!()
    }

    pub(crate) async fn delete_db(&self, name: &str) {
        let _ = self.send(self.req(Method::DELETE, &enc(name))).await;
    }

    pub(crate) async fn put_doc(&self, db: &str, doc: &Value) -> Result<()> {
        let id = doc["_id"].as_str().unwrap_or_default();
        let (s, v) = self
            .send(
                self.req(Method::PUT, &format!("{}/{}", enc(db), enc(id)))
                    .json(doc),
            )
            .await?;
        if !s.is_success() {
            bail!("PUT /{db}/{id}: {s} {v}");
        }
        Ok(())
    }

    /// _bulk_docs; returns the ids that were written.
    pub(crate) async fn bulk(&self, db: &str, docs: &[Value]) -> Result<Vec<String>> {
        let (s, v) = self
            .send(
                self.req(Method::POST, &format!("{}/_bulk_docs", enc(db)))
                    .json(&json!({ "docs": docs })),
            )
            .await?;
        if !s.is_success() {
            bail!("POST /{db}/_bulk_docs: {s} {v}");
        }
        Ok(v.as_array()
            .map(|rows| {
                rows.iter()
                    .filter(|r| r.get("error").is_none())
                    .filter_map(|r| r["id"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Writes made to a database so far: the sum of the revision
    /// generations of its documents, deleted ones included (a deletion is a
    /// write; its tombstone's generation counts it). Portable: it does not
    /// parse `update_seq`.
    pub(crate) async fn writes_in(&self, db: &str) -> Result<u64> {
        let v = self.get(&format!("{}/_changes", enc(db))).await?;
        let mut sum = 0;
        for row in v["results"].as_array().into_iter().flatten() {
            let rev = row["changes"][0]["rev"].as_str().unwrap_or("0-");
            sum += rev
                .split('-')
                .next()
                .and_then(|g| g.parse::<u64>().ok())
                .unwrap_or(0);
        }
        Ok(sum)
    }

    /// The scheduler's state of each `_replicator` document whose id starts
    /// with `prefix` (`running`, `pending`, ...), from `_scheduler/docs`;
    /// `None` on a server without the replication scheduler.
    pub(crate) async fn replicator_states(
        &self,
        prefix: &str,
    ) -> Result<Option<std::collections::HashMap<String, String>>> {
        let mut states = std::collections::HashMap::new();
        let page = 1000;
        for skip in (0..).step_by(page) {
            let path = format!("_scheduler/docs/_replicator?limit={page}&skip={skip}");
            let (status, v) = self.send(self.req(Method::GET, &path)).await?;
            if status == StatusCode::NOT_FOUND || status == StatusCode::BAD_REQUEST {
                return Ok(None);
            }
            if !status.is_success() {
                bail!("GET {path}: {status} {v}");
            }
            let docs = v["docs"].as_array().cloned().unwrap_or_default();
            for d in &docs {
                if let Some(id) = d["doc_id"].as_str().filter(|id| id.starts_with(prefix)) {
                    let state = d["state"].as_str().unwrap_or("initializing");
                    states.insert(id.to_string(), state.to_string());
                }
            }
            if docs.len() < page {
                break;
            }
        }
        Ok(Some(states))
    }
}
