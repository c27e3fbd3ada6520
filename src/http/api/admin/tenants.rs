//! A tenant's limits and HTTP restrictions: [`TenantSet`], the one change
//! both `agentq tenant set` and `PUT`/`PATCH /v1/admin/tenants/{tenant}`
//! make (same checks, same error texts), and the admin routes that read
//! and write them.

use std::collections::HashMap;
use std::net::SocketAddr;

use axum::Json;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::HeaderMap;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{admin_of, body, invalid};
use crate::http::api::allowed;
use crate::http::api::{ApiError, AppState};
use crate::model::limits::{self, LimitsUpdate, Target};
use crate::model::names::{InvalidInput, validate_name};
use crate::queue::{Queue, QueueError};

/// Refusal of a change that changes nothing (the flags are named as the
/// CLI spells them; the API's fields are the same names in snake_case).
pub const NOTHING_TO_SET: &str = "nothing to set: give at least one of --tier, --max-concurrency, --max-timeout, --max-memory, --weight, --rate, --burst, --quota, --price-per-minute, --price-per-1k-tokens, --price-steps, --token-price-steps, --spend-cap";

/// A change to one tenant: limits, and the queues and kinds it may
/// enqueue over the HTTP API (`a,b`; `*`: all; None: unchanged).
#[derive(Clone, Debug, Default)]
pub struct TenantSet {
    /// The limits to change.
    pub limits: LimitsUpdate,
    /// Allowed queues, as `--allowed-queues` takes them.
    pub allowed_queues: Option<String>,
    /// Allowed kinds, as `--allowed-kinds` takes them.
    pub allowed_kinds: Option<String>,
}

/// A [`TenantSet`] that passed [`TenantSet::check`].
#[derive(Clone, Debug)]
pub struct CheckedSet {
    /// The tenant.
    pub tenant: String,
    /// The limits to write (may be empty when only restrictions change).
    pub limits: LimitsUpdate,
    /// Allowed queues: None unchanged, Some(None) all.
    pub queues: Option<Option<Vec<String>>>,
    /// Allowed kinds: None unchanged, Some(None) all.
    pub kinds: Option<Option<Vec<String>>>,
}

impl TenantSet {
    /// Check everything before anything is written: the tenant's name, the
    /// lists' names, every limit's range, and that something changes.
    pub fn check(self, tenant: &str) -> Result<CheckedSet, InvalidInput> {
        validate_name("tenant", tenant)?;
        let parse = |what: &str, v: &Option<String>| {
            v.as_deref()
                .map(|s| allowed::parse_list(what, s))
                .transpose()
        };
        let queues = parse("queue", &self.allowed_queues)?;
        let kinds = parse("kind", &self.allowed_kinds)?;
        self.limits.validate()?;
        // Restrictions alone are a change; otherwise some limit must be.
        if self.limits.is_empty() && queues.is_none() && kinds.is_none() {
            return Err(InvalidInput(NOTHING_TO_SET.into()));
        }
        Ok(CheckedSet {
            tenant: tenant.to_string(),
            limits: self.limits,
            queues,
            kinds,
        })
    }
}

impl CheckedSet {
    /// Write the change: limits fleet-wide from the next claim on,
    /// restrictions within serve's [`allowed`] cache time.
    pub async fn apply(&self, q: &Queue) -> Result<(), QueueError> {
        if !self.limits.is_empty() {
            self.limits.apply(q, Target::Tenant(&self.tenant)).await?;
        }
        if self.restricts() {
            allowed::set(q, &self.tenant, self.queues.clone(), self.kinds.clone()).await?;
        }
        Ok(())
    }

    /// Whether the queue or kind restrictions change.
    pub fn restricts(&self) -> bool {
        self.queues.is_some() || self.kinds.is_some()
    }

    /// `(queues, kinds)` as printed: `unchanged`, `all` or `a,b`.
    pub fn describe_allowed(&self) -> (String, String) {
        let show = |v: &Option<Option<Vec<String>>>| match v {
            None => "unchanged".to_string(),
            Some(None) => "all".to_string(),
            Some(Some(l)) => l.join(","),
        };
        (show(&self.queues), show(&self.kinds))
    }
}

/// A tenant as `agentq tenant show --json` prints it: settings (tier,
/// limits in effect, own fields) and `allowed`.
async fn view(q: &Queue, tenant: &str) -> Result<Value, QueueError> {
    let s = crate::queue::limits::settings(q, Some(tenant)).await?;
    let a = allowed::read(q, tenant).await?;
    let mut v = serde_json::to_value(&s).unwrap_or_default();
    v["allowed"] = serde_json::to_value(&a).unwrap_or_default();
    Ok(v)
}

/// `GET /v1/admin/tenants`: every tenant known to the queue (it enqueued or
/// was configured), with its limits, restrictions and current counts.
pub(super) async fn list(
    State(st): State<AppState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    admin_of(&st, &headers, client.ip()).await?;
    let stats = crate::queue::inspect::tenant_stats(&st.queue, None).await?;
    let mut out = Vec::with_capacity(stats.len());
    for s in stats {
        let mut v = view(&st.queue, &s.tenant).await?;
        v["ready"] = json!(s.ready);
        v["delayed"] = json!(s.delayed);
        v["running"] = json!(s.running);
        v["dead"] = json!(s.dead);
        v["held"] = json!(s.held);
        v["usage_ms"] = json!(s.usage_ms);
        out.push(v);
    }
    Ok(Json(json!({ "tenants": out })))
}

/// `GET /v1/admin/tenants/{tenant}`: as `agentq tenant show --json`.
pub(super) async fn show(
    State(st): State<AppState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(tenant): Path<String>,
) -> Result<Json<Value>, ApiError> {
    admin_of(&st, &headers, client.ip()).await?;
    validate_name("tenant", &tenant).map_err(invalid)?;
    Ok(Json(view(&st.queue, &tenant).await?))
}

/// A list of names: `"a,b"` (as the CLI takes it) or `["a", "b"]`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Names {
    Text(String),
    List(Vec<String>),
}

impl Names {
    fn text(self) -> String {
        match self {
            Names::Text(s) => s,
            Names::List(v) => v.join(","),
        }
    }
}

/// The body of `PUT`/`PATCH /v1/admin/tenants/{tenant}`: `agentq tenant
/// set`'s flags in snake_case, values written as on the command line.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SetBody {
    tier: Option<String>,
    max_concurrency: Option<u64>,
    max_timeout: Option<String>,
    max_memory: Option<String>,
    weight: Option<u64>,
    rate: Option<String>,
    burst: Option<u64>,
    quota: Option<String>,
    price_per_minute: Option<f64>,
    price_per_1k_tokens: Option<f64>,
    price_steps: Option<String>,
    token_price_steps: Option<String>,
    spend_cap: Option<String>,
    allowed_queues: Option<Names>,
    allowed_kinds: Option<Names>,
}

/// Parse one text value with the parser the CLI's flag uses.
fn text<T>(
    flag: &str,
    v: Option<String>,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Option<T>, InvalidInput> {
    v.map(|s| parse(&s).map_err(|e| InvalidInput(format!("invalid value {s:?} for {flag}: {e}"))))
        .transpose()
}

impl SetBody {
    fn into_set(self) -> Result<TenantSet, InvalidInput> {
        let duration = |s: &str| crate::model::units::parse_duration(s).map_err(|e| e.to_string());
        let size = |s: &str| crate::model::units::parse_size(s).map_err(|e| e.to_string());
        Ok(TenantSet {
            limits: LimitsUpdate {
                max_concurrency: self.max_concurrency,
                max_timeout: text("--max-timeout", self.max_timeout, duration)?,
                max_memory: text("--max-memory", self.max_memory, size)?,
                weight: self.weight,
                rate: text("--rate", self.rate, limits::parse_rate)?,
                burst: self.burst,
                quota: text("--quota", self.quota, limits::parse_quota)?,
                tier: self.tier,
                price_per_minute: self.price_per_minute,
                price_per_1k_tokens: self.price_per_1k_tokens,
                expected_rate: None,
                price_steps: text("--price-steps", self.price_steps, |s| {
                    limits::PriceSteps::parse(s, limits::PriceUnit::Minutes)
                })?,
                token_price_steps: text("--token-price-steps", self.token_price_steps, |s| {
                    limits::PriceSteps::parse(s, limits::PriceUnit::Tokens)
                })?,
                spend_cap: text("--spend-cap", self.spend_cap, limits::parse_spend_cap)?,
            },
            allowed_queues: self.allowed_queues.map(Names::text),
            allowed_kinds: self.allowed_kinds.map(Names::text),
        })
    }
}

/// `PUT`/`PATCH /v1/admin/tenants/{tenant}`: as `agentq tenant set` (both
/// change only the fields given); returns the tenant as it now is.
pub(super) async fn set(
    State(st): State<AppState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(tenant): Path<String>,
    bytes: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let admin = admin_of(&st, &headers, client.ip()).await?;
    let b: SetBody = body(&bytes)?;
    let change = b
        .into_set()
        .and_then(|s| s.check(&tenant))
        .map_err(invalid)?;
    change.apply(&st.queue).await?;
    if change.limits.spend_cap.is_some_and(|c| c > 0) {
        // As the CLI: the spend counter counts from the ledger's month-to-date.
        crate::usage::raise_spend(&st.queue, &st.db, &tenant).await?;
    }
    let (queues, kinds) = change.describe_allowed();
    tracing::info!(
        target: "agentq::audit",
        admin = %admin.prefix,
        client = %admin.client,
        action = "tenant.set",
        tenant = %tenant,
        limits = %change.limits.describe(),
        allowed_queues = %queues,
        allowed_kinds = %kinds,
        "admin changed a tenant"
    );
    let mut v = view(&st.queue, &tenant).await?;
    v["changed"] = json!({
        "limits": change.limits.fields().into_iter().collect::<HashMap<_, _>>(),
        "allowed_queues": queues,
        "allowed_kinds": kinds,
    });
    Ok(Json(v))
}
