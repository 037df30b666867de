//! Continuous feeds (`_changes`, `_db_updates`) as streams that survive.
//!
//! A feed asks CouchDB for a heartbeat newline; when no byte arrives within
//! twice that time the connection is taken for dead. A dead, dropped or
//! refused connection is reopened with capped exponential backoff and jitter,
//! resuming with `since=` the last seq received, so nothing is lost and at
//! most the events after that seq are seen again. A connection the server
//! (or a proxy) closes cleanly is reopened at once if it lasted at least a
//! heartbeat (a feed closed at its `timeout`), and after the same backoff
//! otherwise, so that a server that closes every feed at once is not asked
//! again in a tight loop. Errors that a reconnect
//! cannot fix (the database is gone, the credentials are refused) end the
//! stream with that error, or, with [`FeedOptions::retry_errors`], are
//! yielded and retried slowly.

use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use reqwest::Response;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::types::{Change, DbUpdate, Seq};
use super::{CouchClient, CouchError};
use crate::backoff::Backoff;

/// A feed of `T`: each item, or the error that ended the feed.
pub type Feed<T> = Pin<Box<dyn Stream<Item = Result<T, CouchError>> + Send>>;

/// How a continuous feed is read and kept alive.
#[derive(Clone, Debug)]
pub struct FeedOptions {
    /// How often CouchDB sends a newline on an idle feed.
    pub heartbeat: Duration,
    /// The longest wait between two reconnect attempts: short, so that a
    /// feed is back within about a second of CouchDB.
    pub max_reconnect_delay: Duration,
    /// Incremented at every reconnect, for metrics.
    pub reconnects: Arc<AtomicU64>,
    /// Errors a reconnect cannot fix (credentials refused, database
    /// missing) end the feed, unless this is set: then they are yielded and
    /// the feed tries again, at most this far apart (an operator can fix
    /// the cause without restarting Spiegel).
    pub retry_errors: Option<Duration>,
}

impl Default for FeedOptions {
    fn default() -> Self {
        FeedOptions {
            heartbeat: Duration::from_secs(10),
            max_reconnect_delay: Duration::from_secs(1),
            reconnects: Arc::default(),
            retry_errors: None,
        }
    }
}

/// An item of a feed: it carries the seq to resume after it.
pub trait FeedItem: DeserializeOwned + Send + 'static {
    /// Where the feed resumes after this item.
    fn seq(&self) -> &Seq;
}

impl FeedItem for Change {
    fn seq(&self) -> &Seq {
        &self.seq
    }
}

impl FeedItem for DbUpdate {
    fn seq(&self) -> &Seq {
        &self.seq
    }
}

/// What one connection of the feed ended with.
enum Ended {
    /// Worth reconnecting: the reason is logged.
    Retry(String),
    /// CouchDB closed the feed normally (it sends `last_seq` first).
    Closed,
}

/// A continuous feed of `path` that reconnects, resuming after the last seq
/// received.
pub(crate) fn continuous<T: FeedItem>(
    client: CouchClient,
    path: String,
    params: Vec<(String, String)>,
    since: Option<Seq>,
    options: FeedOptions,
    db: Option<String>,
) -> Feed<T> {
    let stream = async_stream::stream! {
        let mut reconnect = Reconnect::new(&options);
        let mut since = since;
        loop {
            let query = feed_query(&params, options.heartbeat, since.as_ref());
            let ended = match client.open_stream(&path, &query, db.as_deref()).await {
                Err(e) if e.is_transient() => Ended::Retry(e.to_string()),
                Err(e) => {
                    yield Err(e);
                    if !reconnect.wait_after_error().await {
                        return;
                    }
                    continue;
                }
                Ok(resp) => {
                    reconnect.opened();
                    let mut reads = pin!(read_connection::<T>(resp, options.heartbeat * 2));
                    let mut ended = Ended::Closed;
                    while let Some(read) = reads.next().await {
                        match read {
                            Read::Alive => reconnect.connection_works(),
                            Read::LastSeq(seq) => since = Some(seq),
                            Read::Item(item) => {
                                since = Some(item.seq().clone());
                                yield Ok(item);
                            }
                            Read::Ended(reason) => ended = reason,
                        }
                    }
                    ended
                }
            };
            reconnect.before_reconnect(ended, &path).await;
        }
    };
    Box::pin(stream)
}

/// The query of one connection: the caller's parameters, the continuous
/// feed with its heartbeat, and the seq to resume after.
fn feed_query(
    params: &[(String, String)],
    heartbeat: Duration,
    since: Option<&Seq>,
) -> Vec<(String, String)> {
    let mut query = params.to_vec();
    query.push(("feed".into(), "continuous".into()));
    query.push(("heartbeat".into(), heartbeat.as_millis().to_string()));
    if let Some(seq) = since {
        query.push(("since".into(), seq.as_param()));
    }
    query
}

/// What one connection of the feed gives, in order. Bytes and lines stay in
/// [`read_connection`]: [`continuous`] only tracks where to resume and when
/// to reconnect.
enum Read<T> {
    /// Bytes arrived, a heartbeat included: the connection works.
    Alive,
    /// CouchDB's `last_seq`, sent before it closes the feed.
    LastSeq(Seq),
    Item(T),
    /// Why the connection ended; nothing follows.
    Ended(Ended),
}

/// Reads one open connection line by line. A line can span chunks: its
/// bytes wait in a buffer until its newline arrives.
fn read_connection<T: FeedItem>(
    resp: Response,
    idle_limit: Duration,
) -> impl Stream<Item = Read<T>> + Send {
    async_stream::stream! {
        let mut body = resp.bytes_stream();
        let mut lines = Lines::default();
        loop {
            let chunk = match next_chunk(&mut body, idle_limit).await {
                Ok(chunk) => chunk,
                Err(ended) => {
                    yield Read::Ended(ended);
                    return;
                }
            };
            yield Read::Alive;
            lines.push(&chunk);
            while let Some(line) = lines.next_line() {
                match parse_line::<T>(line) {
                    Line::Heartbeat => {}
                    Line::LastSeq(seq) => yield Read::LastSeq(seq),
                    Line::Item(item) => yield Read::Item(item),
                    Line::Bad(reason) => {
                        yield Read::Ended(Ended::Retry(reason));
                        return;
                    }
                }
            }
        }
    }
}

/// The lines of a feed's body as its chunks arrive: a line can span
/// chunks, and its bytes wait here until its newline comes. Each byte is
/// searched for a newline once, so that a long line (a large document read
/// in many chunks) takes time in proportion to its length, not to its
/// length times its chunks; it is held once, in a buffer that at most
/// doubles as it grows.
#[derive(Default)]
struct Lines {
    buf: Vec<u8>,
    /// Where the first line not given yet starts.
    start: usize,
    /// How far `buf` has been searched for a newline.
    searched: usize,
}

impl Lines {
    /// Adds a chunk, after dropping the lines already given.
    fn push(&mut self, chunk: &[u8]) {
        self.buf.drain(..self.start);
        self.searched -= self.start;
        self.start = 0;
        self.buf.extend_from_slice(chunk);
    }

    /// The next whole line, its newline included.
    fn next_line(&mut self) -> Option<&[u8]> {
        let Some(at) = self.buf[self.searched..].iter().position(|b| *b == b'\n') else {
            self.searched = self.buf.len();
            return None;
        };
        let line = self.start..self.searched + at + 1;
        self.start = line.end;
        self.searched = line.end;
        Some(&self.buf[line])
    }
}

/// The next chunk of the body, or why the connection ended: no byte within
/// `idle_limit` (twice the heartbeat) means it is dead.
async fn next_chunk<S>(body: &mut S, idle_limit: Duration) -> Result<Bytes, Ended>
where
    S: Stream<Item = reqwest::Result<Bytes>> + Unpin,
{
    match tokio::time::timeout(idle_limit, body.next()).await {
        Err(_) => Err(Ended::Retry(format!("no data for {idle_limit:?}"))),
        Ok(None) => Err(Ended::Closed),
        Ok(Some(Err(e))) => Err(Ended::Retry(CouchError::from_transport(e).to_string())),
        Ok(Some(Ok(chunk))) => Ok(chunk),
    }
}

/// When the feed opens its next connection. Failures since the last byte
/// received set the wait, so a feed that worked comes back fast.
struct Reconnect {
    backoff: Backoff,
    /// For errors a reconnect cannot fix, when they are retried.
    slow: Option<Backoff>,
    /// Connections in a row that failed or closed at once.
    failures: u32,
    /// Errors in a row that a reconnect cannot fix. Counted apart: an
    /// error right after an outage (the server answers again, and says
    /// what is wrong) is retried soon, not after the outage's long waits.
    errors: u32,
    /// [`FeedOptions::reconnects`].
    count: Arc<AtomicU64>,
    /// [`FeedOptions::heartbeat`]: a connection closed sooner failed.
    heartbeat: Duration,
    /// When the current connection opened.
    opened: Instant,
}

impl Reconnect {
    fn new(options: &FeedOptions) -> Self {
        Reconnect {
            backoff: Backoff::reconnect(options.max_reconnect_delay),
            slow: options.retry_errors.map(Backoff::reconnect),
            failures: 0,
            errors: 0,
            count: options.reconnects.clone(),
            heartbeat: options.heartbeat,
            opened: Instant::now(),
        }
    }

    /// A connection is open: its age decides how a clean close is taken.
    fn opened(&mut self) {
        self.opened = Instant::now();
    }

    /// Any byte proves the connection works: the next failure starts over.
    fn connection_works(&mut self) {
        self.failures = 0;
        self.errors = 0;
    }

    /// Waits after an error a reconnect cannot fix, when such errors are
    /// retried; false when they end the feed.
    async fn wait_after_error(&mut self) -> bool {
        let Some(slow) = &self.slow else {
            return false;
        };
        // The server answered: the connection failures are over.
        self.failures = 0;
        self.errors += 1;
        tokio::time::sleep(slow.wait(self.errors)).await;
        true
    }

    /// Counts the reconnect, logs why the connection ended and waits before
    /// the next one. A clean close after at least a heartbeat is CouchDB
    /// ending a feed at its `timeout`: reopened at once. A sooner one is a
    /// failure, waited for like any other.
    async fn before_reconnect(&mut self, ended: Ended, path: &str) {
        self.count.fetch_add(1, Ordering::Relaxed);
        match ended {
            Ended::Closed if self.opened.elapsed() >= self.heartbeat => {
                tracing::debug!(feed = %path, "feed closed by the server, reopening");
            }
            Ended::Closed => {
                self.failures += 1;
                let wait = self.backoff.wait(self.failures);
                tracing::warn!(feed = %path, retry_in = ?wait, "feed closed by the server right after it opened, reopening later");
                tokio::time::sleep(wait).await;
            }
            Ended::Retry(reason) => {
                self.failures += 1;
                let wait = self.backoff.wait(self.failures);
                tracing::warn!(feed = %path, %reason, retry_in = ?wait, "feed interrupted, reconnecting");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

enum Line<T> {
    Heartbeat,
    LastSeq(Seq),
    Item(T),
    Bad(String),
}

fn parse_line<T: FeedItem>(line: &[u8]) -> Line<T> {
    let text = line.trim_ascii();
    if text.is_empty() {
        return Line::Heartbeat;
    }
    let value: Value = match serde_json::from_slice(text) {
        Ok(v) => v,
        Err(e) => return Line::Bad(format!("unreadable feed line: {e}")),
    };
    if let Some(error) = value.get("error") {
        let reason = value.get("reason").cloned().unwrap_or(Value::Null);
        return Line::Bad(super::redact_credentials(&format!(
            "error in feed: {error}: {reason}"
        )));
    }
    if value.get("seq").is_none() {
        if let Some(last) = value.get("last_seq") {
            return Line::LastSeq(Seq::from(last.clone()));
        }
    }
    // Read again from the text, so that a document keeps its own.
    match serde_json::from_slice(text) {
        Ok(item) => Line::Item(item),
        Err(e) => Line::Bad(format!("unexpected feed line: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hostile_input;
    use proptest::prelude::*;

    #[tokio::test(start_paused = true)]
    async fn an_error_right_after_an_outage_is_retried_soon() {
        let options = FeedOptions {
            retry_errors: Some(Duration::from_secs(60)),
            ..Default::default()
        };
        let mut reconnect = Reconnect::new(&options);
        for _ in 0..12 {
            let down = Ended::Retry("connection refused".into());
            reconnect.before_reconnect(down, "_db_updates").await;
        }
        let start = Instant::now();
        assert!(reconnect.wait_after_error().await);
        assert!(start.elapsed() <= Duration::from_millis(250));
        assert!(reconnect.wait_after_error().await);
        assert!(start.elapsed() <= Duration::from_millis(750));
    }

    #[test]
    fn lines_are_classified() {
        assert!(matches!(parse_line::<DbUpdate>(b"\n"), Line::Heartbeat));
        assert!(matches!(
            parse_line::<DbUpdate>(br#"{"last_seq":"9-x"}"#),
            Line::LastSeq(_)
        ));
        match parse_line::<DbUpdate>(br#"{"db_name":"a/b","type":"updated","seq":"3-y"}"#) {
            Line::Item(u) => assert_eq!(u.db_name, "a/b"),
            _ => panic!("expected an item"),
        }
        assert!(matches!(
            parse_line::<DbUpdate>(br#"{"error":"x","reason":"http://u:p@h/"}"#),
            Line::Bad(r) if !r.contains(":p@")
        ));
        assert!(matches!(parse_line::<DbUpdate>(b"{not json"), Line::Bad(_)));
    }

    /// Every line `input` gives when it arrives cut at `cuts`, and what is
    /// left waiting for its newline.
    fn lines_of(input: &[u8], cuts: &[prop::sample::Index]) -> (Vec<Vec<u8>>, Vec<u8>) {
        let mut at: Vec<usize> = cuts.iter().map(|c| c.index(input.len() + 1)).collect();
        at.push(0);
        at.push(input.len());
        at.sort_unstable();
        let mut lines = Lines::default();
        let mut got = Vec::new();
        for chunk in at.windows(2) {
            lines.push(&input[chunk[0]..chunk[1]]);
            while let Some(line) = lines.next_line() {
                got.push(line.to_vec());
            }
            assert_eq!(lines.searched, lines.buf.len(), "searched to the end");
        }
        (got, lines.buf[lines.start..].to_vec())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// However a body is cut into chunks, the lines are those of the
        /// whole body, each ended by its newline, and the rest waits.
        #[test]
        fn lines_are_the_same_however_the_body_is_cut(
            input in prop_oneof![
                hostile_input::bytes(),
                proptest::collection::vec(prop_oneof![Just(b'\n'), any::<u8>()], 0..512),
            ],
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..16),
        ) {
            let (got, rest) = lines_of(&input, &cuts);
            let mut whole: Vec<Vec<u8>> =
                input.split_inclusive(|b| *b == b'\n').map(<[u8]>::to_vec).collect();
            let partial = match whole.last() {
                Some(last) if !last.ends_with(b"\n") => whole.pop().unwrap_or_default(),
                _ => Vec::new(),
            };
            prop_assert_eq!(got, whole);
            prop_assert_eq!(rest, partial);
        }

        /// Any bytes make a heartbeat, a `last_seq`, an item or a clear
        /// reason to reconnect; the reason grows at most with the line.
        #[test]
        fn a_feed_line_of_any_bytes_is_read_or_refused_without_panic(line in hostile_input::bytes()) {
            for reason in [bad_reason(parse_line::<Change>(&line)), bad_reason(parse_line::<DbUpdate>(&line))]
                .into_iter()
                .flatten()
            {
                prop_assert!(!reason.is_empty());
                prop_assert!(reason.len() <= 6 * line.len() + 128, "{}", reason);
            }
        }

        /// Feed lines of hostile changes and events: read as items when
        /// they have the shape, each keeping its document's text.
        #[test]
        fn a_feed_line_of_hostile_json_is_read_or_refused_without_panic(
            id in hostile_input::text(),
            seq in prop_oneof![hostile_input::number(), hostile_input::text().prop_map(Value::String), hostile_input::json()],
            doc in hostile_input::json(),
            kind in prop_oneof![hostile_input::text(), Just("updated".to_string())],
        ) {
            let change = serde_json::json!({"seq": seq, "id": id, "changes": [{"rev": id}], "doc": doc});
            if let Line::Item(item) = parse_line::<Change>(change.to_string().as_bytes()) {
                let item: Change = item;
                let text = item.doc.map(|d| d.raw().get().to_string());
                prop_assert_eq!(text, (!doc.is_null()).then(|| doc.to_string()));
            }
            let update = serde_json::json!({"db_name": id, "type": kind, "seq": seq});
            let _ = bad_reason(parse_line::<DbUpdate>(update.to_string().as_bytes()));
        }
    }

    fn bad_reason<T>(line: Line<T>) -> Option<String> {
        match line {
            Line::Bad(reason) => Some(reason),
            _ => None,
        }
    }

    #[test]
    fn a_long_line_in_small_chunks_is_searched_once() {
        // Each chunk once searched the whole buffer again: 8 MB in 4 kB
        // chunks made 8 GB of comparisons.
        let mut lines = Lines::default();
        let chunk = vec![b'x'; 4096];
        for _ in 0..2048 {
            lines.push(&chunk);
            assert!(lines.next_line().is_none());
            assert_eq!(lines.searched, lines.buf.len());
        }
        lines.push(b"\n{");
        assert_eq!(
            lines.next_line().map(<[u8]>::len),
            Some(8 * 1024 * 1024 + 1)
        );
        assert!(lines.next_line().is_none());
        lines.push(b"}\n");
        assert_eq!(lines.next_line(), Some(&b"{}\n"[..]));
        assert!(lines.buf.len() <= 3, "the long line is dropped");
    }

    #[test]
    fn a_feed_line_nested_far_deeper_than_json_allows_is_refused_not_a_stack_overflow() {
        let deep = format!(
            r#"{{"seq":1,"id":"a","doc":{}{}}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert!(matches!(
            parse_line::<Change>(deep.as_bytes()),
            Line::Bad(_)
        ));
        let deep_seq = format!(
            r#"{{"last_seq":{}{}}}"#,
            "{\"a\":".repeat(100_000),
            "}".repeat(100_000)
        );
        assert!(matches!(
            parse_line::<DbUpdate>(deep_seq.as_bytes()),
            Line::Bad(_)
        ));
    }
}
