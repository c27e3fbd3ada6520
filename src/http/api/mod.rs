//! The HTTP API (`agentq serve`): enqueue, status, cancel and usage for
//! services in any language, authenticated by tenant API keys or, with a
//! JWKS configured, by JWTs (see [`jwt`]).
//!
//! The tenant always comes from the key (or the JWT's tenant claim), never
//! from the request. Errors are `{"error": {"code", "message"}}` with 400
//! (malformed), 401 (no or bad key or JWT), 403 (another tenant's job, or a
//! queue or kind outside the tenant's restrictions, see [`allowed`]), 404, 409 (idempotency key reused with a
//! different job, or a job that can no longer be cancelled), 413 (payload too
//! large), 422 (over the tenant's caps), 429 (over the request rate, with
//! `Retry-After`) and 503 (Redis or PostgreSQL unavailable, or Redis full;
//! `auth_unavailable` when a key not in the [`key_cache`] cannot be checked
//! because PostgreSQL is down).
//!
//! Keys are checked against the [`key_cache`], so enqueues go on while
//! PostgreSQL is down. The failed-authentication limiters (per client
//! address and per key prefix) and the per-tenant request limiter are
//! pruned every [`ApiConfig::prune_every`], so their memory stays bounded
//! however many addresses or prefixes are tried.

pub mod allowed;
mod events;
pub mod jwt;
pub mod key_cache;
pub mod keys;
mod schedules;
// Operator control plane (admin-scope keys only).
pub mod admin;
// The web dashboard at /ui (src/http/ui/): a child of this module so it signs in through any_caller.
#[path = "../ui/mod.rs"]
pub mod ui;
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
            QueueError::NotReplicated(_) => {
                tracing::warn!(error = %m, "enqueue not confirmed by replicas");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not_replicated",
                    "the job was written to the Redis primary but too few replicas confirmed it \
                     in time (--min-replicas-ack): a failover could lose it; retry with the same \
                     idempotency_key",
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
    /// How often the rate limiters forget clients whose state is back to
    /// fresh, and expired blocks are dropped (default 10 s).
    pub prune_every: Duration,
    /// Clients (addresses and key prefixes) tracked by the failed-auth
    /// limiter above which it is pruned at once rather than at the next
    /// `prune_every` (default 100,000).
    pub max_tracked: usize,
    /// The API key cache.
    pub key_cache: key_cache::KeyCacheConfig,
    /// JWT sign-in (None: API keys only); see [`jwt`].
    pub jwt: Option<Arc<jwt::Jwt>>,
    /// How long a tenant's queue and kind restrictions are kept after a
    /// read (default 5 s); see [`allowed`].
    pub allowed_ttl: Duration,
    /// Event streams (SSE, WebSocket) and long polls one tenant may hold
    /// open on this server at once (default 100); past it, 429
    /// `too_many_streams`. Each holds a connection and a task, so without
    /// a bound one tenant could exhaust the server for all.
    pub max_streams_per_tenant: usize,
    /// The web dashboard at `/ui` (on by default); see [`ui`].
    pub ui: ui::UiConfig,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            tenant_rate: NonZeroU32::new(100).unwrap_or(NonZeroU32::MIN),
            auth_failures_per_min: NonZeroU32::new(20).unwrap_or(NonZeroU32::MIN),
            request_timeout: Duration::from_secs(30),
            prune_every: Duration::from_secs(10),
            max_tracked: 100_000,
            key_cache: key_cache::KeyCacheConfig::default(),
            jwt: None,
            ui: ui::UiConfig::default(),
            allowed_ttl: Duration::from_secs(5),
            max_streams_per_tenant: 100,
        }
    }
}

struct Throttle {
    tenants: DefaultKeyedRateLimiter<String>,
    failures: DefaultKeyedRateLimiter<String>,
    blocked: Mutex<HashMap<String, Instant>>,
    max_tracked: usize,
    last_forced: Mutex<Option<Instant>>,
}

/// How many clients the API server keeps state for (see [`Api::tracked`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tracked {
    /// Tenants in the request-rate limiter.
    pub tenants: usize,
    /// Client addresses and key prefixes in the failed-auth limiter.
    pub failures: usize,
    /// Addresses and prefixes currently blocked (429).
    pub blocked: usize,
    /// Keys in the key cache (revoked ones included).
    pub cached_keys: usize,
    /// Unknown prefixes remembered by the key cache.
    pub unknown_prefixes: usize,
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
        if self.failures.len() > self.max_tracked {
            self.prune_soon();
        }
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
    /// Prune now unless a forced prune ran less than a second ago (a flood
    /// of live clients would otherwise prune at every failure).
    fn prune_soon(&self) {
        {
            let mut last = self.last_forced.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                return;
            }
            *last = Some(Instant::now());
        }
        self.prune();
    }
    /// Forget clients whose limiter state is back to fresh and blocks that
    /// have ended.
    fn prune(&self) {
        for l in [&self.tenants, &self.failures] {
            l.retain_recent();
            l.shrink_to_fit();
        }
        let now = Instant::now();
        let mut b = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
        b.retain(|_, until| *until > now);
        b.shrink_to_fit();
    }
}

#[derive(Clone)]
struct AppState {
    queue: Queue,
    db: PgPool,
    throttle: Arc<Throttle>,
    keys: Arc<key_cache::KeyCache>,
    jwt: Option<Arc<jwt::Jwt>>,
    allowed: Arc<allowed::AllowedCache>,
    hub: Arc<crate::queue::hub::EventHub>,
    streams: Arc<events::OpenStreams>,
}

/// The API server: its router, and the duties that keep its key cache
/// current and its per-client state bounded.
#[derive(Clone)]
pub struct Api {
    state: AppState,
    cfg: ApiConfig,
}

impl Api {
    /// A server over `queue` and `db`.
    pub fn new(queue: Queue, db: PgPool, cfg: &ApiConfig) -> Api {
        Api {
            state: state(queue, db, cfg),
            cfg: cfg.clone(),
        }
    }

    /// Its routes.
    pub fn router(&self) -> Router {
        routes(self.state.clone(), &self.cfg)
    }

    /// The key cache.
    pub fn key_cache(&self) -> &key_cache::KeyCache {
        &self.state.keys
    }

    /// One pruning pass over the per-client state (as the loop in
    /// [`Api::serve`] does every [`ApiConfig::prune_every`]); what is left.
    pub fn prune(&self) -> Tracked {
        self.state.throttle.prune();
        self.state.keys.prune();
        self.state.allowed.prune();
        self.tracked()
    }

    /// How many clients it holds state for.
    pub fn tracked(&self) -> Tracked {
        let t = &self.state.throttle;
        let c = self.state.keys.sizes();
        Tracked {
            tenants: t.tenants.len(),
            failures: t.failures.len(),
            blocked: t.blocked.lock().unwrap_or_else(|e| e.into_inner()).len(),
            cached_keys: c.keys,
            unknown_prefixes: c.unknown,
        }
    }

    /// Serve on `listener` until `stop` fires (in-flight requests finish),
    /// running the key cache and the pruning alongside.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        stop: CancellationToken,
    ) -> std::io::Result<()> {
        let duties = stop.child_token();
        let keys = self.state.keys.clone();
        let d = duties.clone();
        tokio::spawn(async move { keys.run(d).await });
        if let Some(jwt) = self.state.jwt.clone() {
            let d = duties.clone();
            tokio::spawn(async move { jwt.run(d).await });
        }
        let (pruner, d, every) = (self.clone(), duties.clone(), self.cfg.prune_every);
        tokio::spawn(async move {
            while !crate::duties::pause(every, &d).await {
                pruner.prune();
            }
        });
        let app = self
            .router()
            .into_make_service_with_connect_info::<SocketAddr>();
        let out = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        duties.cancel();
        out
    }
}

fn state(queue: Queue, db: PgPool, cfg: &ApiConfig) -> AppState {
    let throttle = Throttle {
        tenants: RateLimiter::keyed(
            Quota::per_second(cfg.tenant_rate).allow_burst(
                cfg.tenant_rate
                    .saturating_mul(NonZeroU32::MIN.saturating_add(1)),
            ),
        ),
        failures: RateLimiter::keyed(Quota::per_minute(cfg.auth_failures_per_min)),
        blocked: Mutex::new(HashMap::new()),
        max_tracked: cfg.max_tracked,
        last_forced: Mutex::new(None),
    };
    let keys = key_cache::KeyCache::new(queue.clone(), db.clone(), cfg.key_cache.clone());
    AppState {
        allowed: Arc::new(allowed::AllowedCache::new(queue.clone(), cfg.allowed_ttl)),
        hub: Arc::new(crate::queue::hub::EventHub::new(queue.clone())),
        streams: Arc::new(events::OpenStreams::new(cfg.max_streams_per_tenant)),
        queue,
        db,
        throttle: Arc::new(throttle),
        keys: Arc::new(keys),
        jwt: cfg.jwt.clone(),
    }
}

/// Build the router. Its key cache gets no refresh and hears no
/// revocations: servers use [`Api::serve`] (or [`serve`]), which runs them.
pub fn router(queue: Queue, db: PgPool, cfg: &ApiConfig) -> Router {
    Api::new(queue, db, cfg).router()
}

fn routes(state: AppState, cfg: &ApiConfig) -> Router {
    Router::new()
        .route("/v1/jobs", axum::routing::post(post_jobs))
        .route("/v1/jobs/{id}", axum::routing::delete(delete_job))
        .route("/v1/usage", get(get_usage))
        .route("/v1/schedules", get(schedules::list).post(schedules::create))
        .route("/v1/schedules/{name}", axum::routing::delete(schedules::remove))
        .merge(admin::routes())
        .route("/v1/openapi.json", get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }))
        .route("/healthz", get(|| async { "ok\n" }))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, cfg.request_timeout))
        .layer(
            tower_http::trace::TraceLayer::new_for_http()
                .make_span_with(|r: &axum::http::Request<_>| tracing::info_span!("http", method = %r.method(), path = %r.uri().path()))
                .on_response(tower_http::trace::DefaultOnResponse::new().level(tracing::Level::INFO)),
        )
        .merge(streaming(cfg))
        .merge(ui::routes(&cfg.ui))
        .with_state(state)
}

/// Routes that answer for longer than the request timeout: the long poll
/// (`?wait=`, bounded by [`events::MAX_WAIT`]) and the event streams (until
/// the client leaves; SSE keep-alives every 15 s).
fn streaming(cfg: &ApiConfig) -> Router<AppState> {
    let get_job_timed = get(get_job).layer(tower_http::timeout::TimeoutLayer::with_status_code(
        StatusCode::REQUEST_TIMEOUT,
        cfg.request_timeout + events::MAX_WAIT,
    ));
    Router::new()
        .route("/v1/jobs/{id}", get_job_timed)
        .route("/v1/jobs/{id}/events", get(events::job_events))
        .route("/v1/events", get(events::tenant_events))
        .route("/v1/ws", get(events::websocket))
        .layer(
            tower_http::trace::TraceLayer::new_for_http()
                .make_span_with(|r: &axum::http::Request<_>| tracing::info_span!("http", method = %r.method(), path = %r.uri().path()))
                .on_response(tower_http::trace::DefaultOnResponse::new().level(tracing::Level::INFO)),
        )
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
    Api::new(queue, db, &cfg).serve(listener, stop).await
}

/// The caller of a request: its tenant and, for a JWT with `queues` or
/// `kinds` claims, what the token narrows it to (see [`check_allowed`]).
struct Caller {
    tenant: String,
    queues: Option<Vec<String>>,
    kinds: Option<Vec<String>>,
    // Admin keys reach only /v1/admin; JWTs are always tenant-scoped.
    scope: keys::Scope,
    // The key's prefix (None for a JWT): names an operator in the audit log.
    key_prefix: Option<String>,
}

/// The caller's tenant (see [`caller_of`]).
async fn tenant_of(st: &AppState, headers: &HeaderMap, client: IpAddr) -> Result<String, ApiError> {
    Ok(caller_of(st, headers, client).await?.tenant)
}

/// The caller of a tenant route (see [`any_caller`]): an admin key is
/// refused (403), as it belongs to no tenant.
async fn caller_of(st: &AppState, headers: &HeaderMap, client: IpAddr) -> Result<Caller, ApiError> {
    let caller = any_caller(st, headers, client).await?;
    if caller.scope == keys::Scope::Admin {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this is an admin API key: it works on /v1/admin routes only; use a tenant key here",
        ));
    }
    Ok(caller)
}

/// Resolve the caller from `Authorization: Bearer <key or JWT>` (or
/// `X-Api-Key`), throttling failed attempts per client address (and per key
/// prefix for keys), then apply the tenant's request rate.
async fn any_caller(
    st: &AppState,
    headers: &HeaderMap,
    client: IpAddr,
) -> Result<Caller, ApiError> {
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
            "missing API key: send Authorization: Bearer aq_... (or a JWT)",
        ));
    };
    let ip = format!("ip:{client}");
    // A JWT by shape (keys are aq_<hex>_<hex>): throttled per address only.
    let is_jwt = keys::parse(key).is_none() && jwt::looks_like_jwt(key);
    let prefix = format!("key:{}", keys::parse(key).map_or("malformed", |k| k.prefix));
    for who in [&ip, &prefix].into_iter().take(if is_jwt { 1 } else { 2 }) {
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
    if is_jwt {
        let verdict = match &st.jwt {
            Some(j) => j.verify(key).await,
            None => Err(jwt::JwtError::NotAccepted),
        };
        let v = match verdict {
            Ok(v) => v,
            Err(e @ jwt::JwtError::KeysUnavailable) => {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    e.code(),
                    e.to_string(),
                ));
            }
            Err(e) => {
                st.throttle.failed(ip);
                return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    e.code(),
                    e.to_string(),
                ));
            }
        };
        rate_limit(st, &v.tenant)?;
        return Ok(Caller {
            tenant: v.tenant,
            queues: v.queues,
            kinds: v.kinds,
            scope: keys::Scope::Tenant,
            key_prefix: None,
        });
    }
    let verdict = st.keys.verify(key).await.map_err(|e| {
        tracing::error!(error = %e, "API key not cached and PostgreSQL unavailable");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "auth_unavailable",
            "this API key cannot be checked now (the key database is unavailable and the key \
             was not used recently); retry later",
        )
    })?;
    let Some(v) = verdict else {
        st.throttle.failed(ip);
        st.throttle.failed(prefix);
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "invalid, revoked or expired API key",
        ));
    };
    // Admin keys share one request-rate bucket, "*" (no tenant has that name).
    rate_limit(st, &v.tenant)?;
    Ok(Caller {
        tenant: v.tenant,
        queues: None,
        kinds: None,
        scope: v.scope,
        key_prefix: Some(v.prefix),
    })
}

/// The tenant's request rate (429 past it).
fn rate_limit(st: &AppState, tenant: &str) -> Result<(), ApiError> {
    if let Err(not_until) = st.throttle.tenants.check_key(&tenant.to_string()) {
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
    Ok(())
}

/// Refuse (403 `forbidden_queue` / `forbidden_kind`) a job outside the
/// queues and kinds the tenant is restricted to (`agentq tenant set
/// --allowed-queues/--allowed-kinds`), or that its JWT's `queues`/`kinds`
/// claims narrow it to; nothing of a batch is enqueued if one is refused.
async fn check_allowed<'a>(
    st: &AppState,
    caller: &Caller,
    jobs: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<(), ApiError> {
    let tenant = st.allowed.get(&caller.tenant).await?;
    for (queue, kind) in jobs {
        if !allowed::Allowed::permits(&tenant.queues, queue)
            || !allowed::Allowed::permits(&caller.queues, queue)
        {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden_queue",
                format!(
                    "tenant {} may not enqueue to queue {queue:?}",
                    caller.tenant
                ),
            ));
        }
        if !allowed::Allowed::permits(&tenant.kinds, kind)
            || !allowed::Allowed::permits(&caller.kinds, kind)
        {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden_kind",
                format!(
                    "tenant {} may not enqueue jobs of kind {kind:?}",
                    caller.tenant
                ),
            ));
        }
    }
    Ok(())
}

async fn post_jobs(
    State(st): State<AppState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let caller = caller_of(&st, &headers, client.ip()).await?;
    let tenant = caller.tenant.clone();
    let Decoded { specs, batch } = decode_jobs(&tenant, &body)?;
    check_allowed(
        &st,
        &caller,
        specs.iter().map(|s| (s.queue.as_str(), s.kind.as_str())),
    )
    .await?;
    let out = st.queue.enqueue_batch(&specs).await?;
    let mut results = Vec::with_capacity(out.len());
    for (spec, e) in specs.iter().zip(&out) {
        if e.created {
            crate::metrics::enqueued(&spec.queue, &tenant);
        } else {
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
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<crate::queue::inspect::JobInfo>, ApiError> {
    let wait = events::parse_wait(q.get("wait"))?;
    let tenant = tenant_of(&st, &headers, client.ip()).await?;
    match wait {
        Some(w) => Ok(Json(events::wait_final(&st, &tenant, &id, w).await?)),
        None => Ok(Json(own_job(&st, &tenant, &id).await?)),
    }
}

async fn delete_job(
    State(st): State<AppState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let tenant = tenant_of(&st, &headers, client.ip()).await?;
    own_job(&st, &tenant, &id).await?;
    // 200 with the job's state after ("cancelled", or "cancelling" while
    // the worker kills a running attempt) and before ("was"); a repeat
    // answers alike, and one already cancelled is a success too.
    let before = st.queue.cancel(&id).await?;
    let state = match before.as_str() {
        "ready" | "delayed" | "cancelled" => "cancelled",
        "running" => "cancelling",
        _ => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "not_cancellable",
                format!("job {id} is {before}: only jobs that have not finished can be cancelled"),
            ));
        }
    };
    Ok(Json(json!({ "id": id, "state": state, "was": before })))
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
    // This month's cost so far and its month-end projection (README,
    // "Volume pricing, spend caps, invoices"), whatever since/until say.
    let forecast = crate::usage::tenant_forecast(&st.db, &tenant, today).await?;
    Ok(Json(
        json!({ "tenant": tenant, "since": since, "until": until, "days": rows, "forecast": forecast }),
    ))
}
