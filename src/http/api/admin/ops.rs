//! `/v1/admin/usage` (as `agentq usage`) and `/v1/admin/dead` (as `agentq
//! dead list|retry|purge`).

use std::collections::HashMap;
use std::net::SocketAddr;

use axum::Json;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use chrono::NaiveDate;
use serde_json::{Value, json};

use super::{Admin, admin_of, invalid};
use crate::http::api::{ApiError, AppState};
use crate::model::names::validate_name;
use crate::queue::inspect::{self, JobState};
use crate::usage::{self, Period};

/// A `YYYY-MM-DD` query parameter, or `default`.
fn date(q: &HashMap<String, String>, k: &str, default: NaiveDate) -> Result<NaiveDate, ApiError> {
    match q.get(k) {
        None => Ok(default),
        Some(v) => NaiveDate::parse_from_str(v, "%Y-%m-%d")
            .map_err(|_| ApiError::bad(format!("{k}={v:?} is not a date: use YYYY-MM-DD"))),
    }
}

/// An optional name parameter (`tenant`, `queue`), checked.
fn name<'a>(q: &'a HashMap<String, String>, k: &str) -> Result<Option<&'a str>, ApiError> {
    let v = q.get(k).map(String::as_str);
    if let Some(n) = v {
        validate_name(k, n).map_err(invalid)?;
    }
    Ok(v)
}

/// `GET /v1/admin/usage?since=&until=&tenant=&by=month|day`: usage and
/// cost per tenant from the ledger's rollup (defaults as `agentq usage`:
/// this month, by month).
pub(super) async fn usage(
    State(st): State<AppState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    admin_of(&st, &headers, client.ip()).await?;
    let tenant = name(&q, "tenant")?;
    let today = chrono::Utc::now().date_naive();
    let since = date(&q, "since", usage::month_start(today))?;
    let until = date(&q, "until", today)?;
    if since > until {
        return Err(ApiError::bad(format!(
            "since {since} is after until {until}"
        )));
    }
    let by = match q.get("by").map(String::as_str) {
        None | Some("month") => Period::Month,
        Some("day") => Period::Day,
        Some(other) => {
            return Err(ApiError::bad(format!("by={other:?}: use day or month")));
        }
    };
    let rows = usage::report(&st.db, tenant, since, until, by).await?;
    Ok(Json(json!({
        "since": since,
        "until": until,
        "by": if by == Period::Day { "day" } else { "month" },
        "rows": rows,
    })))
}

/// `GET /v1/admin/dead?queue=&tenant=&limit=`: dead jobs with their last
/// error, newest first per queue (every queue if none is given; `limit`
/// per queue, default 50, as `agentq dead Q list`).
pub(super) async fn dead(
    State(st): State<AppState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    admin_of(&st, &headers, client.ip()).await?;
    let tenant = name(&q, "tenant")?;
    let limit = match q.get("limit") {
        None => 50,
        Some(v) => v
            .parse::<usize>()
            .map_err(|_| ApiError::bad(format!("limit={v:?} is not a number")))?,
    }
    .clamp(1, 10_000);
    let queues = match name(&q, "queue")? {
        Some(one) => vec![one.to_string()],
        None => inspect::queue_names(&st.queue).await?,
    };
    let mut jobs = Vec::new();
    for queue in queues {
        let found =
            inspect::list_jobs(&st.queue, &queue, tenant, Some(JobState::Dead), limit).await?;
        for j in found {
            let mut v = serde_json::to_value(&j).unwrap_or_default();
            v["queue"] = json!(queue);
            jobs.push(v);
        }
    }
    Ok(Json(json!({ "jobs": jobs })))
}

/// `POST /v1/admin/dead/{id}/retry`: run a dead job again with fresh
/// attempts and its original payload (as `agentq dead Q retry --job ID`).
pub(super) async fn retry(
    State(st): State<AppState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let admin = admin_of(&st, &headers, client.ip()).await?;
    let (queue, tenant) = change_dead(&st, &admin, &id, true).await?;
    Ok(Json(
        json!({ "id": id, "queue": queue, "tenant": tenant, "state": "ready" }),
    ))
}

/// `DELETE /v1/admin/dead/{id}`: delete a dead job (as `agentq dead Q
/// purge --job ID`).
pub(super) async fn purge(
    State(st): State<AppState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let admin = admin_of(&st, &headers, client.ip()).await?;
    let (queue, tenant) = change_dead(&st, &admin, &id, false).await?;
    Ok(Json(
        json!({ "id": id, "queue": queue, "tenant": tenant, "purged": true }),
    ))
}

/// Retry or purge one dead job through the queue's dead-letter script;
/// 409 `not_dead` if it is not dead (or stopped being so meanwhile).
/// Returns its queue and tenant.
async fn change_dead(
    st: &AppState,
    admin: &Admin,
    id: &str,
    retry: bool,
) -> Result<(String, String), ApiError> {
    let Some(info) = st.queue.change_dead_job(id, retry).await? else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_dead",
            format!("job {id} is not dead: only dead jobs can be retried or purged here"),
        ));
    };
    tracing::info!(
        target: "agentq::audit",
        admin = %admin.prefix,
        client = %admin.client,
        action = if retry { "dead.retry" } else { "dead.purge" },
        job = %id,
        queue = %info.queue,
        tenant = %info.tenant,
        "admin changed a dead job"
    );
    Ok((info.queue, info.tenant))
}
