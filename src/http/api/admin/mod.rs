//! The operator control plane under `/v1/admin`: tenants' limits and
//! restrictions, API keys, usage and cost per tenant, dead letters.
//!
//! Only admin-scope keys (`agentq tenant key create --admin`) reach it: a
//! tenant key or a JWT gets 403 `forbidden`, and an admin key gets 403 on
//! the tenant routes (it belongs to no tenant). Every route does what the
//! matching CLI command does, through the same library functions, so the
//! rules and error texts are the same: `tenant set`/`show` ([`tenants`]),
//! `tenant key create`/`revoke` ([`keys`]), `usage` and `dead
//! list`/`retry`/`purge` ([`ops`]), `webhook show`/`set`/`rm`/`test`
//! (`webhooks`). Errors have the tenant API's shape and
//! statuses; every write is logged on target `agentq::audit` with the
//! operator's key prefix.

mod invoices;
mod keys;
mod ops;
pub mod tenants;
mod webhooks;

use std::net::IpAddr;

use axum::Router;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{delete, get, post};
use serde::de::DeserializeOwned;

use super::{ApiError, AppState};
use crate::model::names::InvalidInput;
pub use tenants::{CheckedSet, NOTHING_TO_SET, TenantSet};

/// The `/v1/admin` routes (mounted by the API's router, under its layers).
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/admin/tenants", get(tenants::list))
        .route(
            "/v1/admin/tenants/{tenant}",
            get(tenants::show).put(tenants::set).patch(tenants::set),
        )
        .route(
            "/v1/admin/tenants/{tenant}/webhook",
            get(webhooks::show)
                .put(webhooks::set)
                .delete(webhooks::remove),
        )
        .route(
            "/v1/admin/tenants/{tenant}/webhook/test",
            post(webhooks::test),
        )
        .route("/v1/admin/keys", get(keys::list).post(keys::create))
        .route("/v1/admin/keys/{prefix}", delete(keys::revoke))
        .route("/v1/admin/usage", get(ops::usage))
        .route("/v1/admin/invoices", get(invoices::invoice))
        .route("/v1/admin/dead", get(ops::dead))
        .route("/v1/admin/dead/{id}", delete(ops::purge))
        .route("/v1/admin/dead/{id}/retry", post(ops::retry))
}

/// An authenticated operator.
struct Admin {
    /// Its key's prefix: who did it, in the audit log.
    prefix: String,
    /// The client address, also for the audit log.
    client: IpAddr,
}

/// Authenticate the request as an operator: an admin key, else 401 (no or
/// bad key) or 403 (a tenant key or a JWT).
async fn admin_of(st: &AppState, headers: &HeaderMap, client: IpAddr) -> Result<Admin, ApiError> {
    let caller = super::any_caller(st, headers, client).await?;
    match (caller.scope, caller.key_prefix) {
        (super::keys::Scope::Admin, Some(prefix)) => Ok(Admin { prefix, client }),
        _ => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the /v1/admin routes need an admin API key (agentq tenant key create --admin); \
             tenant keys and JWTs are refused",
        )),
    }
}

/// A JSON request body, read only after authentication (an unauthenticated
/// client learns nothing about what a body should hold).
fn body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| ApiError::bad(format!("invalid JSON body: {e}")))
}

/// Bad input, with the library's text unchanged.
fn invalid(e: InvalidInput) -> ApiError {
    ApiError::bad(e.0)
}

/// A 404 with `message`.
fn not_found(message: String) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
}
