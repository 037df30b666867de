//! An HTTP server on loopback standing for a user's API: it records every
//! request and answers with planned statuses.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use serde_json::Value;

use super::wait_for;

#[derive(Clone, Debug)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub at: Instant,
    /// The wall clock at arrival, for the times a request carries.
    pub wall: std::time::SystemTime,
}

impl Received {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// An HTTP server that records every request and answers with planned
/// statuses (per path), 200 otherwise.
#[derive(Clone, Default)]
pub struct Receiver {
    pub log: Arc<Mutex<Vec<Received>>>,
    pub plan: Arc<Mutex<HashMap<String, VecDeque<u16>>>>,
    pub failing: Arc<Mutex<Option<u16>>>,
    /// While set, requests get no answer (the client gives up first).
    pub hanging: Arc<std::sync::atomic::AtomicBool>,
    /// Paths whose requests get no answer, while listed.
    pub hanging_paths: Arc<Mutex<std::collections::HashSet<String>>>,
}

async fn record(
    State(r): State<Receiver>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let path = uri.path().to_string();
    while r.hanging.load(std::sync::atomic::Ordering::Relaxed)
        || r.hanging_paths.lock().unwrap().contains(&path)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    r.log.lock().unwrap().push(Received {
        method: method.to_string(),
        path: path.clone(),
        query: uri.query().unwrap_or("").to_string(),
        headers,
        body,
        at: Instant::now(),
        wall: std::time::SystemTime::now(),
    });
    let planned = r
        .plan
        .lock()
        .unwrap()
        .get_mut(&path)
        .and_then(VecDeque::pop_front);
    let status = planned.or(*r.failing.lock().unwrap()).unwrap_or(200);
    StatusCode::from_u16(status).unwrap()
}

impl Receiver {
    pub async fn start() -> (Receiver, String) {
        let receiver = Receiver::default();
        let app = axum::Router::new()
            .fallback(record)
            .with_state(receiver.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (receiver, format!("http://127.0.0.1:{}", addr.port()))
    }

    pub fn received(&self) -> Vec<Received> {
        self.log.lock().unwrap().clone()
    }

    pub fn on(&self, path: &str) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }

    /// Waits up to 30 s until what was received satisfies `ok`. (A failure
    /// prints the workers' logs: `Spiegel` does on drop.)
    pub async fn wait(&self, what: &str, ok: impl Fn(&[Received]) -> bool) {
        wait_for(what, Duration::from_secs(30), || async {
            ok(&self.received()).then_some(())
        })
        .await
    }
}
