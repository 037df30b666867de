//! A document with attachments, streamed from one server into another, as
//! CouchDB's replicator copies one: read as `multipart/related` (the JSON,
//! then each attachment's bytes) and written with the same body by a
//! `PUT ?new_edits=false`. The bytes pass through in chunks, so memory does
//! not grow with the attachments' size, and the JSON part is the text the
//! source sent.
//!
//! Such a copy can take long. Its deadline is progress, not a total: it
//! fails when no chunk has moved for the client's idle timeout, from a
//! source that stopped sending or a target that stopped reading.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use reqwest::header::{ACCEPT, CONTENT_TYPE};
use reqwest::{Method, Response};

use super::{doc_path, CouchClient, CouchError, RawDoc, Result};

/// One revision as the source sent it.
pub enum DocBody {
    /// The JSON alone: every attachment is a stub, or the server does not
    /// send multipart.
    Json(RawDoc),
    /// `multipart/related`, still to read.
    Multipart(Multipart),
}

/// A `multipart/related` answer, passed on as it is.
pub struct Multipart {
    content_type: String,
    response: Response,
}

/// When a chunk last moved, and whether the last has.
#[derive(Clone)]
struct Progress(Arc<Mutex<(Instant, bool)>>);

impl Progress {
    fn new() -> Self {
        Progress(Arc::new(Mutex::new((Instant::now(), false))))
    }

    fn mark(&self, last: bool) {
        if let Ok(mut at) = self.0.lock() {
            *at = (Instant::now(), last);
        }
    }

    /// True once nothing has moved for `idle`, or, after the last chunk,
    /// for `answer` (the target writes and syncs before it answers).
    fn stalled(&self, idle: Duration, answer: Duration) -> bool {
        match self.0.lock() {
            Ok(at) if at.1 => at.0.elapsed() > answer,
            Ok(at) => at.0.elapsed() > idle,
            Err(_) => false,
        }
    }
}

impl CouchClient {
    /// `GET /{db}/{id}?rev=..&revs=true&attachments=true&atts_since=[..]`
    /// with `Accept: multipart/related`: the revision with its history and
    /// the attachments not in `atts_since`, which follow the JSON.
    pub async fn open_rev_streamed(
        &self,
        db: &str,
        id: &str,
        rev: &str,
        atts_since: &[String],
    ) -> Result<DocBody> {
        let mut query = vec![("rev", rev.to_string()), ("revs", "true".into())];
        query.push(("attachments", "true".into()));
        // Without ancestors, no `atts_since` at all: `[]` would still leave
        // as stubs the attachments of revision position 0, which a write
        // with `new_edits: false` can give.
        if !atts_since.is_empty() {
            let since = serde_json::to_string(atts_since);
            query.push((
                "atts_since",
                since.map_err(|e| CouchError::Decode(e.to_string()))?,
            ));
        }
        let req = self
            .authorized(
                self.http_silent
                    .request(Method::GET, self.url_for(&doc_path(db, id)?)),
            )
            .header(ACCEPT, "multipart/related, application/json;q=0.9")
            .query(&query);
        let send = self.send_on(&self.http_silent, req, Some(db), Some(id));
        let response = self.within_idle(send).await?;
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        if content_type.starts_with("multipart/related") {
            return Ok(DocBody::Multipart(Multipart {
                content_type,
                response,
            }));
        }
        let read = async { response.bytes().await.map_err(CouchError::from_transport) };
        let bytes = self.within_idle(read).await?;
        let doc = serde_json::from_slice(&bytes).map_err(|e| CouchError::Decode(e.to_string()))?;
        Ok(DocBody::Json(doc))
    }

    /// `PUT /{db}/{id}?new_edits=false` with a `multipart/related` body
    /// read from the source as it is sent.
    pub async fn put_replicated(&self, db: &str, id: &str, body: Multipart) -> Result<()> {
        let progress = Progress::new();
        let stream = watched(body.response, progress.clone());
        let req = self
            .authorized(
                self.http_silent
                    .request(Method::PUT, self.url_for(&doc_path(db, id)?)),
            )
            .header(CONTENT_TYPE, body.content_type)
            .query(&[("new_edits", "false")])
            .body(reqwest::Body::wrap_stream(stream));
        let put = self.send_on(&self.http_silent, req, Some(db), Some(id));
        tokio::pin!(put);
        let (idle, answer) = (self.options.idle_timeout, self.options.request_timeout);
        loop {
            tokio::select! {
                answer = &mut put => return answer.map(drop),
                () = tokio::time::sleep(idle / 4) => {}
            }
            if progress.stalled(idle, answer) {
                return Err(CouchError::Unreachable(format!(
                    "copying document {id:?}: no progress for {idle:?}, or no answer {answer:?} after the last byte"
                )));
            }
        }
    }

    /// `future`, or [`CouchError::Unreachable`] when it takes longer than
    /// the idle timeout (an answer's head, or a small body).
    async fn within_idle<T>(
        &self,
        future: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let idle = self.options.idle_timeout;
        match tokio::time::timeout(idle, future).await {
            Ok(answer) => answer,
            Err(_) => Err(CouchError::Unreachable(format!(
                "no answer within {idle:?}"
            ))),
        }
    }
}

/// The answer's body, each chunk marking progress.
fn watched(response: Response, progress: Progress) -> impl Stream<Item = reqwest::Result<Bytes>> {
    async_stream::stream! {
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            progress.mark(false);
            yield chunk;
        }
        progress.mark(true);
    }
}
