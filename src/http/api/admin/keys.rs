//! `/v1/admin/keys`: list, create and revoke API keys, as `agentq tenant
//! key create|revoke` do (the same [`keys`](crate::http::api::keys)
//! functions: a revocation is announced on the namespace's revocation
//! stream, so every serve's key cache drops the key within a second).

use std::collections::HashMap;
use std::net::SocketAddr;

use axum::Json;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{admin_of, body, invalid, not_found};
use crate::http::api::keys::{self as api_keys, KeyError, KeySpec, Scope};
use crate::http::api::{ApiError, AppState};
use crate::model::names::validate_name;

/// `GET /v1/admin/keys?tenant=T`: every key (of T only if given; `*`:
/// the admin keys), never a secret.
pub(super) async fn list(
    State(st): State<AppState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    admin_of(&st, &headers, client.ip()).await?;
    let tenant = q.get("tenant").map(String::as_str);
    if let Some(t) = tenant.filter(|t| *t != api_keys::ADMIN_TENANT) {
        validate_name("tenant", t).map_err(invalid)?;
    }
    let keys = api_keys::list(&st.db, tenant).await?;
    Ok(Json(json!({ "keys": keys })))
}

/// The body of `POST /v1/admin/keys`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    /// The tenant of a tenant key (none for an admin key).
    tenant: Option<String>,
    /// `tenant` (default) or `admin`.
    #[serde(default)]
    scope: Scope,
    /// RFC 3339 time it stops working.
    expires_at: Option<String>,
    /// Or how long from now, e.g. "30d".
    expires_in: Option<String>,
}

/// `POST /v1/admin/keys`: a new key, its secret shown in this reply only.
pub(super) async fn create(
    State(st): State<AppState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    bytes: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let admin = admin_of(&st, &headers, client.ip()).await?;
    let b: CreateBody = body(&bytes)?;
    let expires_at =
        api_keys::expiry(b.expires_in.as_deref(), b.expires_at.as_deref()).map_err(invalid)?;
    let spec = KeySpec {
        tenant: b.tenant,
        scope: b.scope,
        expires_at,
    };
    let made = api_keys::create_key(&st.db, &spec)
        .await
        .map_err(|e| match e {
            KeyError::Invalid(e) => invalid(e),
            KeyError::Db(e) => e.into(),
        })?;
    tracing::info!(
        target: "agentq::audit",
        admin = %admin.prefix,
        client = %admin.client,
        action = "key.create",
        key = %made.prefix,
        tenant = %made.tenant,
        scope = made.scope.as_str(),
        expires_at = ?made.expires_at,
        "admin created an API key"
    );
    Ok((StatusCode::CREATED, Json(made)).into_response())
}

/// `DELETE /v1/admin/keys/{prefix}`: revoke, announced to every serve.
pub(super) async fn revoke(
    State(st): State<AppState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(prefix): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let admin = admin_of(&st, &headers, client.ip()).await?;
    if prefix.len() != 8 || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::bad(format!(
            "{prefix:?} is not a key prefix: give the 8 hex digits after aq_"
        )));
    }
    let Some(r) = api_keys::revoke(&st.db, Some(&st.queue), &prefix).await? else {
        return Err(not_found(format!(
            "no active key {prefix:?}: give the prefix printed at creation"
        )));
    };
    tracing::info!(
        target: "agentq::audit",
        admin = %admin.prefix,
        client = %admin.client,
        action = "key.revoke",
        key = %r.prefix,
        tenant = %r.tenant,
        announced = r.not_announced.is_none(),
        "admin revoked an API key"
    );
    if let Some(why) = &r.not_announced {
        tracing::warn!(key = %r.prefix, error = %why, "revocation not announced through Redis: serves refuse the key at their next key cache refresh");
    }
    Ok(Json(json!({
        "prefix": r.prefix,
        "tenant": r.tenant,
        "revoked": true,
        "announced": r.not_announced.is_none(),
    })))
}
