//! The admin HTTP server: `/healthz` (the process is alive), `/readyz`
//! (CouchDB answers, and every hosted worker follows its feed and holds a
//! fresh lease), `/metrics` (Prometheus text format), for orchestrators'
//! probes and for scraping, and with `--console` the web console at `/`
//! ([`console`]).

mod console;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use serde_json::json;

pub use self::console::Console;
use crate::couch::CouchClient;
use crate::process::Process;

/// What the admin server serves.
pub struct Admin {
    /// Its metrics at `/metrics`, its workers' readiness at `/readyz`.
    pub process: Arc<Process>,
    /// `/readyz` asks CouchDB too.
    pub client: CouchClient,
    /// The web console, if it is on.
    pub console: Option<Console>,
}

#[derive(Clone)]
struct AppState {
    process: Arc<Process>,
    client: CouchClient,
}

/// Binds before serving, so that a wrong `--admin-addr` stops the start
/// with a clear message.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

/// Serves until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, admin: Admin) {
    let mut app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(AppState {
            process: admin.process,
            client: admin.client,
        });
    if let Some(console) = admin.console {
        app = app.merge(console.routes());
    }
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "the admin HTTP server stopped");
    }
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let mut problems = state.process.health.problems();
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
        state.process.metrics.encode(),
    )
}
