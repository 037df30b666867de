//! The admin HTTP server: `/healthz` (the process is alive), `/readyz`
//! (CouchDB answers, and every hosted worker follows its feed and holds a
//! fresh lease) and `/metrics` (Prometheus text format), for orchestrators'
//! probes and for scraping.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::coordination::Timing;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use serde_json::json;

use crate::couch::CouchClient;
use crate::metrics::Metrics;

/// What the workers of this process report about themselves.
#[derive(Debug, Default)]
pub struct Health {
    roles: Mutex<BTreeMap<String, RoleHealth>>,
}

#[derive(Debug, Clone)]
struct RoleHealth {
    feed_ok: bool,
    last_beat: Option<Instant>,
    timing: Timing,
}

impl Health {
    fn with(&self, role: &str, f: impl FnOnce(&mut RoleHealth)) {
        // Plain flags; a poisoned lock is safe to reuse.
        let mut roles = self.roles.lock().unwrap_or_else(|e| e.into_inner());
        let entry = roles.entry(role.to_string()).or_insert(RoleHealth {
            feed_ok: false,
            last_beat: None,
            timing: Timing {
                lease: Duration::from_secs(15),
                heartbeat: Duration::from_secs(5),
                drain: Duration::from_secs(30),
            },
        });
        f(entry);
    }

    /// A worker of `role` will run: the process is unready until it starts.
    pub fn expect(&self, role: &str) {
        self.with(role, |_| {});
    }

    /// A worker of `role` started (its feed is open).
    pub fn started(&self, role: &str, timing: &Timing) {
        self.with(role, |r| {
            r.feed_ok = true;
            r.timing = timing.clone();
        });
    }

    /// Records whether the role's `_db_updates` feed is connected.
    pub fn feed(&self, role: &str, ok: bool) {
        self.with(role, |r| r.feed_ok = ok);
    }

    /// Records the role's last successful heartbeat.
    pub fn heartbeat(&self, role: &str, at: Instant) {
        self.with(role, |r| r.last_beat = Some(at));
    }

    /// Problems that make the process unready, by role.
    fn problems(&self) -> Vec<String> {
        let roles = self.roles.lock().unwrap_or_else(|e| e.into_inner());
        let mut problems = Vec::new();
        for (role, r) in roles.iter() {
            if !r.feed_ok {
                problems.push(format!("{role}: not following _db_updates"));
            }
            // Unready as soon as the worker fences itself (it runs nothing).
            let last_beat = r.last_beat.map(tokio::time::Instant::from_std);
            match last_beat {
                None => problems.push(format!("{role}: no heartbeat yet")),
                Some(_) if r.timing.fenced(last_beat, tokio::time::Instant::now()) => {
                    problems.push(format!("{role}: heartbeats failing, leases lost"))
                }
                Some(_) => {}
            }
        }
        problems
    }
}

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    client: CouchClient,
}

/// Binds before serving, so that a wrong `--admin-addr` stops the start
/// with a clear message.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

/// Serves until the process ends.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    client: CouchClient,
) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(AppState {
            metrics,
            health,
            client,
        });
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "the admin HTTP server stopped");
    }
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let mut problems = state.health.problems();
    match tokio::time::timeout(Duration::from_secs(3), state.client.server_info()).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => problems.insert(0, format!("CouchDB: {e}")),
        Err(_) => problems.insert(0, "CouchDB: no answer within 3 s".into()),
    }
    let status = if problems.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        axum::Json(json!({ "ready": problems.is_empty(), "problems": problems })),
    )
}

async fn metrics_text(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}
