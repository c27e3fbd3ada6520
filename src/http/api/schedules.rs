//! `GET/POST /v1/schedules`, `DELETE /v1/schedules/{name}`: the caller's
//! tenant's recurring schedules ([`crate::queue::schedules`]). The tenant
//! comes from the API key, as everywhere: a name of another tenant's
//! schedule is simply not found (404).

use std::net::SocketAddr;

use axum::Json;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use super::{ApiError, AppState, caller_of, check_allowed, tenant_of};
use crate::queue::schedules::{Missed, Recurrence, ScheduleSpec};

/// The body of `POST /v1/schedules`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSchedule {
    /// Name, unique per tenant (a POST with an existing name replaces it).
    pub name: String,
    /// Cron expression (5 fields, or 6 with seconds first); or `every`.
    pub cron: Option<String>,
    /// IANA zone of `cron` (default UTC).
    pub tz: Option<String>,
    /// Interval, e.g. "5m" (slots aligned to the Unix epoch); or `cron`.
    pub every: Option<String>,
    /// Queue of its jobs.
    pub queue: String,
    /// Kind of its jobs.
    pub kind: String,
    /// Payload of its jobs, any JSON (missing: `{}`).
    pub payload: Option<Box<RawValue>>,
    /// For example "30s".
    pub timeout: Option<String>,
    /// For example "256MiB".
    pub memory: Option<String>,
    /// -100..=100.
    pub priority: Option<i32>,
    /// 1..=1000.
    pub max_attempts: Option<u32>,
    /// "skip" (default) or "once".
    pub missed: Option<String>,
    /// Refused: the tenant comes from the API key.
    pub tenant: Option<Value>,
}

impl ApiSchedule {
    fn into_spec(self, tenant: &str) -> Result<ScheduleSpec, ApiError> {
        if self.tenant.is_some() {
            return Err(ApiError::bad(
                "remove the tenant field: the tenant comes from the API key",
            ));
        }
        let recurrence = match (self.cron, self.every) {
            (Some(c), None) => Recurrence::cron(&c, self.tz.as_deref().unwrap_or("UTC"))?,
            (None, Some(e)) if self.tz.is_none() => {
                let d = crate::model::units::parse_duration(&e)
                    .map_err(|err| ApiError::bad(format!("every: {err}")))?;
                Recurrence::every(d)?
            }
            _ => {
                return Err(ApiError::bad(
                    "give either cron (with an optional tz) or every, e.g. \
                     {\"cron\": \"0 9 * * MON-FRI\", \"tz\": \"Europe/Paris\"} or {\"every\": \"5m\"}",
                ));
            }
        };
        let mut spec = ScheduleSpec::new(tenant, self.name, recurrence, self.queue, self.kind);
        if let Some(p) = self.payload {
            spec.payload = p.get().to_string();
        }
        spec.timeout = self
            .timeout
            .map(|s| {
                crate::model::units::parse_duration(&s)
                    .map_err(|e| ApiError::bad(format!("timeout: {e}")))
            })
            .transpose()?;
        spec.memory = self
            .memory
            .map(|s| {
                crate::model::units::parse_size(&s)
                    .map_err(|e| ApiError::bad(format!("memory: {e}")))
            })
            .transpose()?;
        spec.priority = self.priority.unwrap_or(0);
        spec.max_attempts = self.max_attempts;
        if let Some(m) = self.missed {
            spec.missed = m.parse::<Missed>()?;
        }
        Ok(spec)
    }
}

/// `GET /v1/schedules`: the caller's schedules.
pub(super) async fn list(
    State(st): State<AppState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let tenant = tenant_of(&st, &headers, client.ip()).await?;
    let all = st.queue.schedules(Some(&tenant)).await?;
    Ok(Json(json!({ "schedules": all })))
}

/// `POST /v1/schedules`: add or replace one of the caller's schedules.
pub(super) async fn create(
    State(st): State<AppState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let caller = caller_of(&st, &headers, client.ip()).await?;
    let req: ApiSchedule = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad(format!("invalid schedule JSON: {e}")))?;
    let spec = req.into_spec(&caller.tenant)?;
    check_allowed(&st, &caller, [(spec.queue.as_str(), spec.kind.as_str())]).await?;
    let s = st.queue.add_schedule(&spec).await?;
    Ok((StatusCode::CREATED, Json(s)).into_response())
}

/// `DELETE /v1/schedules/{name}`: remove one of the caller's schedules.
pub(super) async fn remove(
    State(st): State<AppState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let tenant = tenant_of(&st, &headers, client.ip()).await?;
    let not_found = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no schedule {name:?} (GET /v1/schedules lists yours)"),
        )
    };
    if crate::model::names::validate_name("schedule", &name).is_err() {
        return Err(not_found());
    }
    if st.queue.remove_schedule(&tenant, &name).await? {
        Ok(Json(json!({ "name": name, "deleted": true })))
    } else {
        Err(not_found())
    }
}
