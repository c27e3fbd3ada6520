//! `GET /v1/admin/invoices?tenant=T&month=YYYY-MM`: a tenant's invoice for
//! one UTC calendar month, as `agentq invoice --json` prints it; refused
//! with 409 `invoice_unreconciled` (the reasons in `message`) when it does
//! not equal the month's ledger rows to the micro-dollar.

use std::collections::HashMap;
use std::net::SocketAddr;

use axum::Json;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode};
use serde_json::Value;

use super::{admin_of, invalid};
use crate::http::api::{ApiError, AppState};
use crate::model::names::validate_name;
use crate::usage;

/// The invoice route.
pub(super) async fn invoice(
    State(st): State<AppState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    admin_of(&st, &headers, client.ip()).await?;
    let tenant = q
        .get("tenant")
        .ok_or_else(|| ApiError::bad("tenant is required: ?tenant=T&month=YYYY-MM"))?;
    validate_name("tenant", tenant).map_err(invalid)?;
    let month = match q.get("month") {
        Some(m) if usage::month_bounds(m).is_some() => m.clone(),
        Some(m) => {
            return Err(ApiError::bad(format!(
                "month={m:?}: use YYYY-MM, for example 2026-11"
            )));
        }
        None => chrono::Utc::now().format("%Y-%m").to_string(),
    };
    let inv = usage::invoice(&st.db, tenant, &month).await?;
    if !inv.reconciled {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "invoice_unreconciled",
            inv.refusal(),
        ));
    }
    Ok(Json(serde_json::to_value(&inv).unwrap_or_default()))
}
