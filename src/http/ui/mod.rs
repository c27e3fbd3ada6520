//! The web dashboard at `/ui`, served by `agentq serve` (off with
//! `--no-ui`): an operator view (queues, tenants, usage, dead letters,
//! jobs) for admin-scope keys and a tenant view (its own jobs, usage, cost
//! and quota) for tenant keys or JWTs.
//!
//! - Sign-in: the key (or JWT) is checked by the API's own
//!   [`any_caller`](super::any_caller) (same throttling of failed attempts,
//!   same request rate) and kept in a server-side [`session`]; the browser
//!   holds only a random session id in an `HttpOnly`, `SameSite=Strict`
//!   cookie (`Secure` with `--ui-secure-cookie` or when the request came
//!   through a proxy with `X-Forwarded-Proto: https`). The credential is
//!   re-checked on every page, so a revoked key or an expired JWT ends the
//!   session at once.
//! - CSRF: every form carries the session's token, checked on every POST,
//!   and a POST whose `Origin` (or `Referer`) is another site is refused.
//! - Actions call the library functions the CLI and `/v1/admin` call
//!   ([`Queue::set_paused`](crate::queue::Queue::set_paused),
//!   [`Queue::dead_jobs`](crate::queue::Queue::dead_jobs),
//!   [`Queue::purge_waiting`](crate::queue::Queue::purge_waiting)) and are
//!   logged on target `agentq::audit` like the admin routes.
//! - Pages are server-rendered HTML (maud escapes every value); one CSS
//!   and one small JS file, embedded with `include_str!`, keep counts live
//!   through a periodic server-sent event stream ([`live`]).

mod chart;
mod job;
mod live;
mod operator;
mod page;
mod session;
mod tenant;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};

use super::{ApiError, AppState};
pub use session::Viewer;

/// The stylesheet, embedded.
const CSS: &str = include_str!("assets/ui.css");
/// The live-update script, embedded.
const JS: &str = include_str!("assets/ui.js");

/// How the dashboard runs.
#[derive(Clone, Debug)]
pub struct UiConfig {
    /// Serve `/ui` at all (`agentq serve --no-ui` turns it off).
    pub enabled: bool,
    /// Always mark the session cookie `Secure` (serve behind TLS); it is
    /// also marked so for requests with `X-Forwarded-Proto: https`.
    pub secure_cookies: bool,
    /// How long a sign-in lasts (default 8 h).
    pub session_ttl: Duration,
    /// Cancelled when the server stops: ends the live streams, so a
    /// graceful shutdown does not wait for open dashboards to go away.
    pub stop: tokio_util::sync::CancellationToken,
}

impl Default for UiConfig {
    fn default() -> Self {
        UiConfig {
            enabled: true,
            secure_cookies: false,
            session_ttl: Duration::from_secs(8 * 3600),
            stop: tokio_util::sync::CancellationToken::new(),
        }
    }
}

/// The dashboard's own state beside the API's: its sessions.
pub(crate) struct Ui {
    sessions: session::Sessions,
    secure_cookies: bool,
    stop: tokio_util::sync::CancellationToken,
}

/// The `/ui` routes (none when disabled), with the API's state.
pub(super) fn routes(cfg: &UiConfig) -> Router<AppState> {
    if !cfg.enabled {
        return Router::new();
    }
    let ui = Arc::new(Ui {
        sessions: session::Sessions::new(cfg.session_ttl),
        secure_cookies: cfg.secure_cookies,
        stop: cfg.stop.clone(),
    });
    let timeout = tower_http::timeout::TimeoutLayer::with_status_code(
        StatusCode::REQUEST_TIMEOUT,
        Duration::from_secs(30),
    );
    let pages = Router::new()
        .route("/ui", get(home))
        .route("/ui/", get(home))
        .route("/ui/login", get(session::login_form).post(session::login))
        .route("/ui/logout", post(session::logout))
        .route("/ui/queues", get(operator::queues))
        .route("/ui/queues/{queue}/{action}", post(operator::queue_action))
        .route("/ui/tenants", get(operator::tenants))
        .route("/ui/usage", get(operator::usage))
        .route("/ui/dead", get(operator::dead))
        .route("/ui/dead/{id}/{action}", post(operator::dead_action))
        .route("/ui/jobs", get(job::lookup))
        .route("/ui/jobs/{id}", get(job::page))
        .route("/ui/tenant", get(tenant::home))
        .route("/ui/static/ui.css", get(|| asset("text/css", CSS)))
        .route("/ui/static/ui.js", get(|| asset("text/javascript", JS)))
        .layer(timeout);
    pages
        .route("/ui/live", get(live::stream))
        .layer(axum::middleware::map_response(security_headers))
        .layer(axum::Extension(ui))
}

/// An embedded asset (cached for an hour: they change only with the binary).
async fn asset(kind: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        body,
    )
        .into_response()
}

/// Headers on every dashboard reply: nothing but our own files may run or
/// style the page, it may not be framed, and pages are not cached.
async fn security_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    let csp = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
               connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(csp),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    r
}

/// `/ui`: the viewer's start page, or the sign-in form.
async fn home(_st: State<AppState>, v: Result<Viewer, UiError>) -> Redirect {
    match v {
        Ok(v) if v.admin => Redirect::to("/ui/queues"),
        Ok(_) => Redirect::to("/ui/tenant"),
        Err(_) => Redirect::to("/ui/login"),
    }
}

/// Why a dashboard request failed.
#[derive(Debug, thiserror::Error)]
pub enum UiError {
    /// No session (or it ended): go to the sign-in form.
    #[error("sign in first")]
    SignIn,
    /// Not found, or not the viewer's to see (the same answer for both).
    #[error("not found")]
    NotFound,
    /// Refused: a missing or wrong CSRF token, another site's Origin.
    #[error("{0}")]
    Forbidden(String),
    /// Bad input.
    #[error("{0}")]
    Bad(String),
    /// What the API would have answered.
    #[error("{}", .0.message)]
    Api(ApiError),
}

impl From<ApiError> for UiError {
    fn from(e: ApiError) -> Self {
        if e.status == StatusCode::NOT_FOUND {
            return UiError::NotFound;
        }
        UiError::Api(e)
    }
}

impl From<crate::queue::QueueError> for UiError {
    fn from(e: crate::queue::QueueError) -> Self {
        ApiError::from(e).into()
    }
}

impl From<crate::ledger::LedgerError> for UiError {
    fn from(e: crate::ledger::LedgerError) -> Self {
        ApiError::from(e).into()
    }
}

impl From<crate::model::names::InvalidInput> for UiError {
    fn from(e: crate::model::names::InvalidInput) -> Self {
        UiError::Bad(e.0)
    }
}

impl UiError {
    fn status(&self) -> StatusCode {
        match self {
            UiError::SignIn => StatusCode::UNAUTHORIZED,
            UiError::NotFound => StatusCode::NOT_FOUND,
            UiError::Forbidden(_) => StatusCode::FORBIDDEN,
            UiError::Bad(_) => StatusCode::BAD_REQUEST,
            UiError::Api(e) => e.status,
        }
    }
}

impl IntoResponse for UiError {
    fn into_response(self) -> Response {
        if matches!(self, UiError::SignIn) {
            return Redirect::to("/ui/login").into_response();
        }
        let status = self.status();
        let text = match &self {
            UiError::NotFound => "Not found.".to_string(),
            other => other.to_string(),
        };
        (status, page::error_page(status, &text)).into_response()
    }
}

/// A value for a URL path segment or query value: everything but
/// unreserved characters percent-encoded.
pub(crate) fn url_part(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn url_parts_are_encoded() {
        assert_eq!(super::url_part("a b/<c>"), "a%20b%2F%3Cc%3E");
        assert_eq!(super::url_part("job-1_x.y"), "job-1_x.y");
    }
}
