//! Probes served by every long-running agentq process (worker and serve):
//! `/metrics` (Prometheus), `/healthz` (liveness: the process answers) and
//! `/readyz` (readiness: Redis, and PostgreSQL where the process writes it,
//! answer).

use std::net::SocketAddr;
use std::sync::Arc;

use fred::prelude::*;
use tokio_util::sync::CancellationToken;

use crate::queue::Queue;

/// What `/readyz` checks.
#[derive(Clone)]
pub struct Readiness {
    /// The queue (Redis).
    pub queue: Queue,
    /// The ledger database, if this worker writes it.
    pub db: Option<sqlx::PgPool>,
}

impl Readiness {
    async fn check(&self) -> Result<(), String> {
        let pong: Result<String, _> = self.queue.client().ping(None).await;
        pong.map_err(|e| format!("redis: {e}"))?;
        if let Some(db) = &self.db {
            sqlx::query("SELECT 1")
                .execute(db)
                .await
                .map_err(|e| format!("postgres: {e}"))?;
        }
        Ok(())
    }
}

/// Install the Prometheus recorder and serve `/metrics`, `/healthz`
/// (liveness: the process answers) and `/readyz` (Redis and PostgreSQL
/// answer) on `addr` until `stop`. Returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    ready: Readiness,
    stop: CancellationToken,
) -> std::io::Result<SocketAddr> {
    use axum::{Router, http::StatusCode, routing::get};
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&[
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
            900.0, 3600.0,
        ])
        .and_then(|b| b.install_recorder())
        .map_err(|e| std::io::Error::other(format!("metrics recorder: {e}")))?;
    let ready = Arc::new(ready);
    let app = Router::new()
        .route("/metrics", get(move || std::future::ready(handle.render())))
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.clone();
                async move {
                    match ready.check().await {
                        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
                        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")),
                    }
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "metrics endpoint stopped");
        }
    });
    Ok(bound)
}
