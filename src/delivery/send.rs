//! Sending a built [`Request`] once. Retries, ordering and debounce belong
//! to the caller; this only says what happened, in words that are safe to
//! log.

use std::error::Error as _;
use std::time::Duration;

use reqwest::header::LOCATION;
use reqwest::redirect;

use super::request::Request;
use crate::couch::{origins_only, redact_credentials};

/// How much of an error answer's body is kept for logs and dead letters.
const EXCERPT_BYTES: usize = 1_000;

/// How much of an answer is read (and thrown away) so that the connection can
/// go back to the pool; a longer answer costs a new connection instead.
const DRAIN_LIMIT: usize = 64 * 1024;

/// Sends on_change requests over one pooled HTTP client.
#[derive(Clone, Debug)]
pub struct Sender {
    http: reqwest::Client,
    default_timeout: Duration,
}

/// A request the receiver accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delivered {
    /// The HTTP status it answered, a 2xx.
    pub status: u16,
}

/// Why a delivery failed. No variant ever holds a password: requests go out
/// without user info in the URL, and server text is redacted.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The receiver answered, but not with a 2xx.
    #[error("the receiver answered HTTP {status}: {body_excerpt}")]
    Status { status: u16, body_excerpt: String },
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// No connection: refused, connect timeout, DNS or TLS failure. The
    /// whole endpoint's trouble, whatever the request.
    #[error("network error: {0}")]
    Unreachable(String),
    /// The connection broke during the exchange (reset, closed early...).
    #[error("network error: {0}")]
    Network(String),
    #[error("the request could not be built: {0}")]
    Build(String),
}

impl Delivered {
    /// Its class in `spiegel_webhook_requests`: `2xx`.
    pub fn class(&self) -> String {
        format!("{}xx", self.status / 100)
    }
}

impl DeliveryError {
    /// The endpoint's trouble, which counts towards opening its circuit: no
    /// answer, a timeout, a 5xx or a 429. A 4xx or a redirect is the
    /// request's own.
    pub fn is_endpoint_fault(&self) -> bool {
        match self {
            DeliveryError::Unreachable(_)
            | DeliveryError::Network(_)
            | DeliveryError::Timeout(_) => true,
            DeliveryError::Status { status, .. } => *status >= 500 || *status == 429,
            DeliveryError::Build(_) => false,
        }
    }

    /// Whether the endpoint could not be reached at all: its own circuit's
    /// trouble, not one route's.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, DeliveryError::Unreachable(_))
    }

    /// Whether the endpoint answered (with a status that is a failure).
    pub fn answered(&self) -> bool {
        matches!(self, DeliveryError::Status { .. })
    }

    /// Its class in `spiegel_webhook_requests`: `3xx`, `4xx`, `5xx`,
    /// `timeout` or `network`.
    pub fn class(&self) -> String {
        match self {
            DeliveryError::Status { status, .. } => format!("{}xx", status / 100),
            DeliveryError::Timeout(_) => "timeout".into(),
            DeliveryError::Unreachable(_) | DeliveryError::Network(_) | DeliveryError::Build(_) => {
                "network".into()
            }
        }
    }

    /// The HTTP status the endpoint answered, if it did.
    pub fn status(&self) -> Option<u16> {
        match self {
            DeliveryError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

impl Sender {
    /// A client with rustls, a 10 s connect timeout and at most
    /// `max_idle_per_host` idle keep-alive connections per receiver.
    ///
    /// Redirects are not followed: a 3xx is a failure, so that the rule's
    /// headers (API keys, signature) and Basic auth never go to a host the
    /// rule did not name, and a POST is never silently turned into a GET.
    pub fn new(default_timeout: Duration, max_idle_per_host: usize) -> Result<Self, DeliveryError> {
        let http = reqwest::Client::builder()
            .use_rustls_tls()
            .connect_timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(max_idle_per_host)
            .tcp_keepalive(Duration::from_secs(30))
            .tcp_nodelay(true)
            .redirect(redirect::Policy::none())
            .build()
            .map_err(|e| DeliveryError::Build(describe(&e)))?;
        Ok(Sender {
            http,
            default_timeout,
        })
    }

    /// Sends once, within the rule's timeout or the default one. Any 2xx is
    /// success (Spiegel 1.2 wanted exactly 200, its issue 177).
    pub async fn send(&self, req: &Request) -> Result<Delivered, DeliveryError> {
        let timeout = req.timeout().unwrap_or(self.default_timeout);
        let mut builder = self
            .http
            .request(req.method().into(), req.target())
            .headers(req.headers())
            .timeout(timeout);
        if let Some((user, password)) = req.basic_auth() {
            builder = builder.basic_auth(user, password);
        }
        if let Some(body) = req.body() {
            builder = builder.body(body.clone());
        }
        let mut response = builder.send().await.map_err(|e| classify(&e, timeout))?;

        let status = response.status();
        if status.is_success() {
            read_prefix(&mut response, 0).await;
            return Ok(Delivered {
                status: status.as_u16(),
            });
        }
        let location = response
            .headers()
            .get(LOCATION)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        let body = read_prefix(&mut response, EXCERPT_BYTES).await;
        let mut excerpt = String::from_utf8_lossy(&body).into_owned();
        if let (true, Some(location)) = (status.is_redirection(), location) {
            excerpt = format!("redirect to {location} not followed; {excerpt}");
        }
        Err(DeliveryError::Status {
            status: status.as_u16(),
            body_excerpt: redact_credentials(&excerpt),
        })
    }
}

/// Reads the answer's body up to [`DRAIN_LIMIT`] and keeps its first `keep`
/// bytes. Best effort: the status already decided the outcome, so a body
/// that breaks off only shortens the excerpt.
async fn read_prefix(response: &mut reqwest::Response, keep: usize) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut seen = 0;
    while seen < DRAIN_LIMIT {
        let Ok(Some(chunk)) = response.chunk().await else {
            break;
        };
        seen += chunk.len();
        let room = keep.saturating_sub(kept.len()).min(chunk.len());
        kept.extend_from_slice(&chunk[..room]);
    }
    kept
}

fn classify(e: &reqwest::Error, timeout: Duration) -> DeliveryError {
    if e.is_builder() {
        DeliveryError::Build(describe(e))
    } else if e.is_connect() {
        // Includes the 10 s connect timeout: the receiver is unreachable,
        // which is not the same as slow.
        DeliveryError::Unreachable(describe(e))
    } else if e.is_timeout() {
        DeliveryError::Timeout(timeout)
    } else {
        DeliveryError::Network(describe(e))
    }
}

/// The error and its causes on one line ("connection refused" is only in a
/// cause), for logs, statuses and dead letters. Every URL in it is cut to
/// its origin: an API's path or query can be its secret (a webhook URL
/// often is), and its user info is one.
fn describe(e: &reqwest::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    origins_only(&message)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::net::SocketAddr;

    use hmac::{Hmac, KeyInit, Mac};
    use serde_json::{json, Value};
    use sha2::Sha256;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::task::JoinHandle;

    use super::*;
    use crate::config::Passwords;

    #[test]
    fn only_the_endpoints_trouble_counts_for_its_circuit_and_each_outcome_has_a_class() {
        let status = |status| DeliveryError::Status {
            status,
            body_excerpt: String::new(),
        };
        let cases = [
            (status(503), true, "5xx"),
            (status(429), true, "4xx"),
            (status(404), false, "4xx"),
            (status(302), false, "3xx"),
            (
                DeliveryError::Timeout(Duration::from_secs(1)),
                true,
                "timeout",
            ),
            (DeliveryError::Network("reset".into()), true, "network"),
            (
                DeliveryError::Unreachable("refused".into()),
                true,
                "network",
            ),
        ];
        for (error, fault, class) in cases {
            assert_eq!(
                (error.is_endpoint_fault(), error.class()),
                (fault, class.into())
            );
        }
        assert_eq!(Delivered { status: 204 }.class(), "2xx");
    }
    use crate::rules::on_change::template::UrlPassword;
    use crate::rules::on_change::{ChangeContext, Method, Signing, Template};

    /// What the test server saw.
    #[derive(Debug)]
    struct Received {
        request_line: String,
        headers: HashMap<String, String>,
        body: Vec<u8>,
    }

    async fn read_request(socket: &mut TcpStream) -> Received {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break pos;
            }
            let n = socket.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed before the end of the head");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
        let mut lines = head.split("\r\n");
        let request_line = lines.next().unwrap().to_string();
        let headers: HashMap<String, String> = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let length: usize = headers
            .get("content-length")
            .map_or(0, |v| v.parse().unwrap());
        let mut body = buf[head_end + 4..].to_vec();
        while body.len() < length {
            let n = socket.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed before the end of the body");
            body.extend_from_slice(&chunk[..n]);
        }
        Received {
            request_line,
            headers,
            body,
        }
    }

    /// A one-request HTTP/1.1 server on 127.0.0.1 that answers `response`
    /// (or never answers when it is `None`).
    async fn serve_once(response: Option<String>) -> (SocketAddr, JoinHandle<Received>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handle = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let received = read_request(&mut socket).await;
            match response {
                Some(response) => {
                    socket.write_all(response.as_bytes()).await.unwrap();
                    socket.shutdown().await.unwrap();
                }
                None => tokio::time::sleep(Duration::from_secs(30)).await,
            }
            received
        });
        (addr, handle)
    }

    fn response(status_line: &str, extra_headers: &str, body: &str) -> Option<String> {
        Some(format!(
            "HTTP/1.1 {status_line}\r\n{extra_headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ))
    }

    const SECRET: &str = "hook-secret";

    fn build(addr: SocketAddr, method: Method, timeout: Option<Duration>) -> Request {
        let passwords =
            Passwords::parse(r#"{"127.0.0.1": {"bob": "s3cret"}}"#, "passwords.json").unwrap();
        let doc = serde_json::value::to_raw_value(&json!({"_id": "d1", "_rev": "1-a"})).unwrap();
        let seq = json!("5-abc");
        let change = ChangeContext {
            rule: "rule",
            db_name: "a/b",
            doc: &doc,
            id: "d1",
            rev: "1-a",
            seq: &seq,
        };
        let params = json!({"db": "$db_name", "change": "$change", "seq": "$seq"});
        let signing = Signing::Hmac {
            secret: SECRET.into(),
            header: "X-Spiegel-Signature".into(),
        };
        let url = format!("http://bob@{addr}/hook/${{db_name}}");
        let t = Template {
            password: UrlPassword::lookup(&url, &passwords),
            url,
            method,
            params: Some(params),
            headers: Vec::new(),
            timeout,
            sign: Some(signing),
        };
        Request::build(&t, &change).unwrap()
    }

    fn signature(payload: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(payload);
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    }

    fn sender() -> Sender {
        Sender::new(Duration::from_secs(5), 4).unwrap()
    }

    #[tokio::test]
    async fn a_200_is_delivered_with_auth_agent_type_and_signature() {
        let (addr, server) = serve_once(response("200 OK", "", "ok")).await;
        let req = build(addr, Method::Post, None);
        let delivered = sender().send(&req).await.unwrap();
        assert_eq!(delivered, Delivered { status: 200 });

        let got = server.await.unwrap();
        assert_eq!(got.request_line, "POST /hook/a%2Fb HTTP/1.1");
        // base64("bob:s3cret"), the password from the passwords file.
        assert_eq!(got.headers["authorization"], "Basic Ym9iOnMzY3JldA==");
        assert_eq!(
            got.headers["user-agent"],
            concat!("spiegel/", env!("CARGO_PKG_VERSION"))
        );
        assert_eq!(got.headers["content-type"], "application/json");
        assert_eq!(got.headers["x-spiegel-signature"], signature(&got.body));
        let body: Value = serde_json::from_slice(&got.body).unwrap();
        assert_eq!(
            body,
            json!({"db": "a/b", "change": {"_id": "d1", "_rev": "1-a"}, "seq": "5-abc"})
        );
    }

    #[tokio::test]
    async fn a_204_is_delivered_and_a_get_signs_its_query() {
        let (addr, server) = serve_once(response("204 No Content", "", "")).await;
        let req = build(addr, Method::Get, None);
        let delivered = sender().send(&req).await.unwrap();
        assert_eq!(delivered.status, 204);

        let got = server.await.unwrap();
        let (path, query) = got
            .request_line
            .trim_start_matches("GET ")
            .trim_end_matches(" HTTP/1.1")
            .split_once('?')
            .unwrap();
        assert_eq!(path, "/hook/a%2Fb");
        assert_eq!(Some(query), req.query());
        assert_eq!(got.headers["authorization"], "Basic Ym9iOnMzY3JldA==");
        assert!(!got.headers.contains_key("content-type"));
        assert_eq!(
            got.headers["x-spiegel-signature"],
            signature(query.as_bytes())
        );
        assert!(got.body.is_empty());
    }

    #[tokio::test]
    async fn a_500_is_a_status_error_with_a_redacted_excerpt() {
        let body = format!(
            "failed to reach http://admin:pw@db.example/x {}",
            "y".repeat(3_000)
        );
        let (addr, server) = serve_once(response("500 Internal Server Error", "", &body)).await;
        let err = sender()
            .send(&build(addr, Method::Put, None))
            .await
            .unwrap_err();
        let DeliveryError::Status {
            status,
            body_excerpt,
        } = &err
        else {
            panic!("expected a status error, got {err:?}");
        };
        assert_eq!(*status, 500);
        assert!(body_excerpt.starts_with("failed to reach http://admin:***@db.example/x yyy"));
        assert!(!err.to_string().contains(":pw@"));
        // 1,000 bytes kept, plus one for "pw" becoming "***".
        assert_eq!(body_excerpt.len(), EXCERPT_BYTES + 1);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_redirect_is_not_followed() {
        let (addr, server) = serve_once(response(
            "302 Found",
            "Location: http://u:pw@elsewhere.example/\r\n",
            "",
        ))
        .await;
        let err = sender()
            .send(&build(addr, Method::Post, None))
            .await
            .unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, DeliveryError::Status { status: 302, .. }));
        assert!(
            message.contains("redirect to http://u:***@elsewhere.example/"),
            "{message}"
        );
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_silent_server_is_a_timeout_of_the_rule_or_the_default() {
        let (addr, server) = serve_once(None).await;
        let short = Duration::from_millis(200);
        let err = sender()
            .send(&build(addr, Method::Post, Some(short)))
            .await
            .unwrap_err();
        assert!(
            matches!(err, DeliveryError::Timeout(d) if d == short),
            "{err:?}"
        );
        server.abort();

        let (addr, server) = serve_once(None).await;
        let sender = Sender::new(Duration::from_millis(150), 1).unwrap();
        let err = sender
            .send(&build(addr, Method::Get, None))
            .await
            .unwrap_err();
        assert!(
            matches!(err, DeliveryError::Timeout(d) if d == Duration::from_millis(150)),
            "{err:?}"
        );
        server.abort();
    }

    #[tokio::test]
    async fn a_closed_port_is_a_network_error_without_the_password() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let err = sender()
            .send(&build(addr, Method::Post, None))
            .await
            .unwrap_err();
        assert!(matches!(err, DeliveryError::Unreachable(_)), "{err:?}");
        let message = err.to_string();
        assert!(
            !message.contains("s3cret") && !message.contains("bob"),
            "{message}"
        );
    }
}
