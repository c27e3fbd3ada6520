//! A tenant's alert webhook under `/v1/admin/tenants/{tenant}/webhook`: as
//! `agentq webhook show|set|rm|test` (same checks, same texts; README,
//! "Tenant alerts").

use std::net::SocketAddr;

use axum::Json;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::HeaderMap;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{admin_of, body, invalid, not_found};
use crate::duties::webhooks::{Outcome, WebhooksConfig, send_test};
use crate::http::api::{ApiError, AppState};
use crate::model::names::validate_name;
use crate::queue::alerts;

fn no_webhook(tenant: &str) -> ApiError {
    not_found(format!(
        "tenant {tenant} has no webhook: PUT /v1/admin/tenants/{tenant}/webhook sets one"
    ))
}

/// `GET /v1/admin/tenants/{tenant}/webhook`: url, events (never the
/// secret) and the newest dead-lettered alerts.
pub(super) async fn show(
    State(st): State<AppState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(tenant): Path<String>,
) -> Result<Json<Value>, ApiError> {
    admin_of(&st, &headers, client.ip()).await?;
    validate_name("tenant", &tenant).map_err(invalid)?;
    let hook = alerts::webhook(&st.queue, &tenant)
        .await?
        .ok_or_else(|| no_webhook(&tenant))?;
    let dead = alerts::dead_alerts(&st.queue, Some(&tenant), 20).await?;
    Ok(Json(json!({
        "tenant": hook.tenant,
        "url": hook.url,
        "events": hook.events,
        "dead": dead,
    })))
}

/// Alert groups: `"quota,dead"` or `["quota", "dead"]`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Groups {
    Text(String),
    List(Vec<String>),
}

/// The body of `PUT /v1/admin/tenants/{tenant}/webhook`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SetBody {
    url: String,
    secret: Option<String>,
    events: Option<Groups>,
}

/// `PUT /v1/admin/tenants/{tenant}/webhook`: set or replace it; a secret
/// left out is generated and returned in this reply only.
pub(super) async fn set(
    State(st): State<AppState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(tenant): Path<String>,
    bytes: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let admin = admin_of(&st, &headers, client.ip()).await?;
    let b: SetBody = body(&bytes)?;
    let generated = b.secret.is_none();
    let secret = b.secret.unwrap_or_else(alerts::generate_secret);
    let events = match b.events {
        None => "all".to_string(),
        Some(Groups::Text(s)) => s,
        Some(Groups::List(l)) => l.join(","),
    };
    let hook = alerts::check_webhook(&tenant, &b.url, &secret, &events)?;
    alerts::set_webhook(&st.queue, &hook).await?;
    tracing::info!(
        target: "agentq::audit",
        admin = %admin.prefix,
        client = %admin.client,
        action = "webhook.set",
        tenant = %tenant,
        url = %hook.url,
        events = %hook.events.join(","),
        "admin set a tenant's webhook"
    );
    let mut v = json!({ "tenant": hook.tenant, "url": hook.url, "events": hook.events });
    if generated {
        v["secret"] = json!(secret);
    }
    Ok(Json(v))
}

/// `DELETE /v1/admin/tenants/{tenant}/webhook`.
pub(super) async fn remove(
    State(st): State<AppState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(tenant): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let admin = admin_of(&st, &headers, client.ip()).await?;
    validate_name("tenant", &tenant).map_err(invalid)?;
    if !alerts::remove_webhook(&st.queue, &tenant).await? {
        return Err(no_webhook(&tenant));
    }
    tracing::info!(
        target: "agentq::audit",
        admin = %admin.prefix,
        client = %admin.client,
        action = "webhook.remove",
        tenant = %tenant,
        "admin removed a tenant's webhook"
    );
    Ok(Json(json!({ "tenant": tenant, "removed": true })))
}

/// `POST /v1/admin/tenants/{tenant}/webhook/test`: send a test alert now;
/// `delivered` with the receiver's status, or the failure.
pub(super) async fn test(
    State(st): State<AppState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(tenant): Path<String>,
) -> Result<Json<Value>, ApiError> {
    admin_of(&st, &headers, client.ip()).await?;
    validate_name("tenant", &tenant).map_err(invalid)?;
    if alerts::webhook(&st.queue, &tenant).await?.is_none() {
        return Err(no_webhook(&tenant));
    }
    Ok(Json(
        match send_test(&st.queue, &tenant, &WebhooksConfig::default()).await? {
            Outcome::Delivered(status) => json!({ "delivered": true, "status": status }),
            Outcome::Failed(error) => json!({ "delivered": false, "error": error }),
        },
    ))
}
