//! The HTTP API (`agentq serve`): enqueue, status, cancel and usage for
//! services in any language, authenticated by tenant API keys.
//!
//! The tenant always comes from the key, never from the request. Errors are
//! `{"error": {"code", "message"}}` with 400 (malformed), 401 (no or bad
//! key), 403 (another tenant's job), 404, 409 (idempotency key reused with a
//! different job, or a job that can no longer be cancelled), 413 (payload too
//! large), 422 (over the tenant's caps), 429 (over the request rate, with
//! `Retry-After`) and 503 (Redis or PostgreSQL unavailable, or Redis full).

pub mod keys;
mod wire;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::queue::{Queue, QueueError};
pub use wire::{ApiJob, Decoded, decode_jobs};

/// The OpenAPI document served at `/v1/openapi.json`.
pub const OPENAPI: &str = include_str!("openapi.json");

/// Largest request body accepted (a batch of jobs).
pub const MAX_BODY: usize = 8 << 20;

/// An error response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after: Option<Duration>,
}

impl ApiError {
    /// An error with a status, a stable code and a one-line message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }
    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }
}

impl From<QueueError> for ApiError {
    fn from(e: QueueError) -> Self {
        let m = e.to_string();
        match e {
            QueueError::Invalid(_) => Self::bad(m),
            QueueError::OverCap(_) => Self::new(StatusCode::UNPROCESSABLE_ENTITY, "over_cap", m),
            QueueError::TooLarge(_) => {
                Self::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", m)
            }
            QueueError::NotFound(_) => Self::new(StatusCode::NOT_FOUND, "not_found", m),
            QueueError::Full(_) => {
                tracing::error!(error = %m, "queue full");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "queue_full",
                    "the queue's Redis is out of memory; nothing was written; retry later",
                )
            }
            QueueError::Unknown(_) => {
                tracing::error!(error = %m, "queue did not answer");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "outcome_unknown",
                    "the queue did not answer in time: the change may or may not have been made; \
                     check (GET /v1/jobs/{id}) or retry with the same idempotency_key",
                )
            }
            QueueError::Redis(_) | QueueError::Protocol(_) => {
                tracing::error!(error = %m, "queue unavailable");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "the queue is unavailable; retry later",
                )
            }
        }
    }
}

impl From<crate::ledger::LedgerError> for ApiError {
    fn from(e: crate::ledger::LedgerError) -> Self {
        tracing::error!(error = %e, "database unavailable");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the database is unavailable; retry later",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({ "error": { "code": self.code, "message": self.message } }));
        let mut r = (self.status, body).into_response();
        if let Some(wait) = self.retry_after {
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        r
    }
}

/// How the API server runs.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// Requests per second allowed per tenant (with a burst of twice that).
    pub tenant_rate: NonZeroU32,
    /// Failed authentications allowed per client address per minute.
    pub auth_failures_per_min: NonZeroU32,
    /// Longest a request may take.
    pub request_timeout: Duration,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            tenant_rate: NonZeroU32::new(100).unwrap_or(NonZeroU32::MIN),
            auth_failures_per_min: NonZeroU32::new(20).unwrap_or(NonZeroU32::MIN),
            request_timeout: Duration::from_secs(30),
        }
    }
}

struct Throttle {
    tenants: DefaultKeyedRateLimiter<String>,
    failures: DefaultKeyedRateLimiter<String>,
    blocked: Mutex<HashMap<String, Instant>>,
}

impl Throttle {
    fn blocked_for(&self, who: &str) -> Option<Duration> {
        let mut b = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
        match b.get(who) {
            Some(until) if *until > Instant::now() => Some(*until - Instant::now()),
            Some(_) => {
                b.remove(who);
                None
            }
            None => None,
        }
    }
    /// Count a failed authentication by `who`; past the allowance it is
    /// blocked until the limiter lets it try again.
    fn failed(&self, who: String) {
        if let Err(not_until) = self.failures.check_key(&who) {
            let wait = not_until.wait_time_from(governor::clock::Clock::now(
                &governor::clock::DefaultClock::default(),
            ));
            self.blocked
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(who, Instant::now() + wait);
        }
    }
}

#[derive(Clone)]
struct AppState {
    queue: Queue,
    db: PgPool,
    throttle: Arc<Throttle>,
}

/// Build the router.
pub fn router(queue: Queue, db: PgPool, cfg: &ApiConfig) -> Router {
    let throttle = Throttle {
        tenants: RateLimiter::keyed(
            Quota::per_second(cfg.tenant_rate).allow_burst(
                cfg.tenant_rate
                    .saturating_mul(NonZeroU32::MIN.saturating_add(1)),
            ),
        ),
        failures: RateLimiter::keyed(Quota::per_minute(cfg.auth_failures_per_min)),
        blocked: Mutex::new(HashMap::new()),
    };
    let state = AppState {
        queue,
        db,
        throttle: Arc::new(throttle),
    };
    Router::new()
        .route("/v1/jobs", axum::routing::post(post_jobs))
        .route("/v1/jobs/{id}", get(get_job).delete(delete_job))
        .route("/v1/usage", get(get_usage))
        .route("/v1/openapi.json", get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }))
        .route("/healthz", get(|| async { "ok\n" }))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, cfg.request_timeout))
        .layer(
            tower_http::trace::TraceLayer::new_for_http()
                .make_span_with(|r: &axum::http::Request<_>| tracing::info_span!("http", method = %r.method(), path = %r.uri().path()))
                .on_response(tower_http::trace::DefaultOnResponse::new().level(tracing::Level::INFO)),
        )
        .with_state(state)
}

/// Serve on `addr` until `stop` fires (in-flight requests finish).
pub async fn serve(
    addr: SocketAddr,
    queue: Queue,
    db: PgPool,
    cfg: ApiConfig,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "agentq API listening");
    let app = router(queue, db, &cfg).into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
}

/// Resolve the tenant from `Authorization: Bearer <key>` (or `X-Api-Key`),
/// throttling failed attempts per client address and per key prefix, then
/// apply the tenant's request rate.
async fn tenant_of(st: &AppState, headers: &HeaderMap, client: IpAddr) -> Result<String, ApiError> {
    let key = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
        .map(str::trim);
    let Some(key) = key else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing API key: send Authorization: Bearer aq_...",
        ));
    };
    let ip = format!("ip:{client}");
    let prefix = format!("key:{}", keys::parse(key).map_or("malformed", |k| k.prefix));
    for who in [&ip, &prefix] {
        if let Some(wait) = st.throttle.blocked_for(who) {
            let mut e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many failed authentications; retry later",
            );
            e.retry_after = Some(wait);
            return Err(e);
        }
    }
    let Some(tenant) = keys::verify(&st.db, key).await? else {
        st.throttle.failed(ip);
        st.throttle.failed(prefix);
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "invalid or revoked API key",
        ));
    };
    if let Err(not_until) = st.throttle.tenants.check_key(&tenant) {
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "over the request rate for this tenant; retry later",
        );
        e.retry_after = Some(not_until.wait_time_from(governor::clock::Clock::now(
            &governor::clock::DefaultClock::default(),
        )));
        return Err(e);
    }
    Ok(tenant)
}

async fn post_jobs(
    State(st): State<AppState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let tenant = tenant_of(&st, &headers, client.ip()).await?;
    let Decoded { specs, batch } = decode_jobs(&tenant, &body)?;
    let out = st.queue.enqueue_batch(&specs).await?;
    let mut results = Vec::with_capacity(out.len());
    for (spec, e) in specs.iter().zip(&out) {
        if !e.created {
            check_same_job(&st.queue, &e.id, spec).await?;
        }
        results.push(json!({ "id": e.id, "created": e.created }));
    }
    let status = if out.iter().any(|e| e.created) {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let body = if batch {
        json!({ "jobs": results })
    } else {
        results.pop().unwrap_or(Value::Null)
    };
    Ok((status, Json(body)).into_response())
}

/// An idempotency key that returned an earlier job must describe the same job.
async fn check_same_job(
    queue: &Queue,
    id: &str,
    spec: &crate::queue::JobSpec,
) -> Result<(), ApiError> {
    let info = crate::queue::inspect::job_info(queue, id).await?;
    let payload: Value = serde_json::from_str(&spec.payload).unwrap_or(Value::Null);
    if info.queue != spec.queue || info.kind != spec.kind || info.payload != payload {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "idempotency_conflict",
            format!(
                "idempotency key already used for job {id} with a different queue, kind or payload"
            ),
        ));
    }
    Ok(())
}

async fn own_job(
    st: &AppState,
    tenant: &str,
    id: &str,
) -> Result<crate::queue::inspect::JobInfo, ApiError> {
    let info = crate::queue::inspect::job_info(&st.queue, id).await?;
    if info.tenant != tenant {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this job belongs to another tenant",
        ));
    }
    Ok(info)
}

async fn get_job(
    State(st): State<AppState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<crate::queue::inspect::JobInfo>, ApiError> {
    let tenant = tenant_of(&st, &headers, client.ip()).await?;
    Ok(Json(own_job(&st, &tenant, &id).await?))
}

async fn delete_job(
    State(st): State<AppState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let tenant = tenant_of(&st, &headers, client.ip()).await?;
    own_job(&st, &tenant, &id).await?;
    let before = st.queue.cancel(&id).await?;
    if before == "ready" || before == "delayed" {
        Ok(Json(json!({ "id": id, "state": "cancelled" })))
    } else {
        Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_cancellable",
            format!("job {id} is {before}: only jobs that have not started can be cancelled"),
        ))
    }
}

async fn get_usage(
    State(st): State<AppState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let tenant = tenant_of(&st, &headers, client.ip()).await?;
    let today = chrono::Utc::now().date_naive();
    let date = |k: &str, default| -> Result<chrono::NaiveDate, ApiError> {
        match q.get(k) {
            None => Ok(default),
            Some(v) => chrono::NaiveDate::parse_from_str(v, "%Y-%m-%d")
                .map_err(|_| ApiError::bad(format!("{k}={v:?} is not a date: use YYYY-MM-DD"))),
        }
    };
    let since = date("since", crate::usage::month_start(today))?;
    let until = date("until", today)?;
    let rows =
        crate::usage::tenant_report(&st.db, &tenant, since, until, crate::usage::Period::Day)
            .await?;
    Ok(Json(
        json!({ "tenant": tenant, "since": since, "until": until, "days": rows }),
    ))
}
