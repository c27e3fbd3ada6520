//! Usage reports for billing and operators, read from the daily rollup; the
//! tenant-scoped read path enforced by row-level security; reconciliation
//! of the Redis quota counters from the ledger.

use chrono::{Datelike, NaiveDate};
use serde::Serialize;
use sqlx::PgPool;

use crate::ledger::LedgerError;
use crate::queue::Queue;

/// Report granularity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Period {
    /// One row per tenant and UTC day.
    Day,
    /// One row per tenant and calendar month.
    Month,
}

/// Usage of one tenant in one period.
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow)]
pub struct UsageRow {
    /// Tenant.
    pub tenant: String,
    /// `YYYY-MM-DD` or `YYYY-MM`.
    pub period: String,
    /// Attempts.
    pub attempts: i64,
    /// Attempts that succeeded.
    pub succeeded: i64,
    /// Attempts that failed.
    pub failed: i64,
    /// Attempts that timed out.
    pub timed_out: i64,
    /// Attempts over their memory cap.
    pub memory_exceeded: i64,
    /// Attempts lost with their worker (billed up to the last heartbeat).
    pub lost: i64,
    /// Agent time, ms (wall time of the attempts).
    pub agent_ms: i64,
    /// CPU time, ms.
    pub cpu_ms: i64,
    /// Highest peak RSS of any attempt, bytes.
    pub peak_rss_bytes: i64,
    /// API calls the tasks reported.
    pub api_calls: i64,
    /// Input tokens the tasks reported.
    pub input_tokens: i64,
    /// Output tokens the tasks reported.
    pub output_tokens: i64,
    /// Cost, micro-dollars.
    pub cost_micros: i64,
}

const REPORT: &str = "SELECT tenant, to_char(date_trunc($3, day), $4) AS period,
    sum(attempts)::bigint AS attempts, sum(succeeded)::bigint AS succeeded, sum(failed)::bigint AS failed,
    sum(timed_out)::bigint AS timed_out, sum(memory_exceeded)::bigint AS memory_exceeded, sum(lost)::bigint AS lost,
    sum(agent_ms)::bigint AS agent_ms, sum(cpu_ms)::bigint AS cpu_ms, max(peak_rss_bytes) AS peak_rss_bytes,
    sum(api_calls)::bigint AS api_calls, sum(input_tokens)::bigint AS input_tokens,
    sum(output_tokens)::bigint AS output_tokens, sum(cost_micros)::bigint AS cost_micros
FROM usage_daily
WHERE day >= $1 AND day <= $2 AND ($5::text IS NULL OR tenant = $5)
GROUP BY 1, 2 ORDER BY 1, 2";

fn trunc(by: Period) -> (&'static str, &'static str) {
    match by {
        Period::Day => ("day", "YYYY-MM-DD"),
        Period::Month => ("month", "YYYY-MM"),
    }
}

/// Operator report: every tenant (or one), `since..=until` (UTC days).
pub async fn report(
    pool: &PgPool,
    tenant: Option<&str>,
    since: NaiveDate,
    until: NaiveDate,
    by: Period,
) -> Result<Vec<UsageRow>, LedgerError> {
    let (unit, fmt) = trunc(by);
    Ok(sqlx::query_as(REPORT)
        .bind(since)
        .bind(until)
        .bind(unit)
        .bind(fmt)
        .bind(tenant)
        .fetch_all(pool)
        .await?)
}

/// Tenant-facing report: the same query with no tenant filter, run as role
/// `agentq_tenant` with `agentq.tenant` set, so row-level security in the
/// database (not this code) limits it to `tenant`'s rows.
pub async fn tenant_report(
    pool: &PgPool,
    tenant: &str,
    since: NaiveDate,
    until: NaiveDate,
    by: Period,
) -> Result<Vec<UsageRow>, LedgerError> {
    let mut tx = pool.begin().await?;
    scope_to_tenant(&mut tx, tenant).await?;
    let (unit, fmt) = trunc(by);
    let rows = sqlx::query_as(REPORT)
        .bind(since)
        .bind(until)
        .bind(unit)
        .bind(fmt)
        .bind(None::<String>)
        .fetch_all(&mut *tx)
        .await?;
    tx.rollback().await?;
    Ok(rows)
}

/// Make the rest of `tx` a tenant-scoped session: role `agentq_tenant` and
/// `agentq.tenant = tenant`, both local to the transaction.
pub async fn scope_to_tenant(tx: &mut sqlx::PgConnection, tenant: &str) -> Result<(), LedgerError> {
    sqlx::query("SET LOCAL ROLE agentq_tenant")
        .execute(&mut *tx)
        .await?;
    sqlx::query("SELECT set_config('agentq.tenant', $1, true)")
        .bind(tenant)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// First day of the month containing `d`.
pub fn month_start(d: NaiveDate) -> NaiveDate {
    d.with_day(1).unwrap_or(d)
}

/// One tenant's quota counter before and after reconciliation, ms.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Reconciled {
    /// Tenant.
    pub tenant: String,
    /// Counter in Redis before.
    pub redis_ms: u64,
    /// Agent time in the ledger this month.
    pub ledger_ms: u64,
    /// Counter after (never lowered: the outbox may hold records the
    /// ledger does not have yet).
    pub after_ms: u64,
}

/// Raise each tenant's Redis usage counter for the current month to at least
/// what the ledger holds (after a Redis loss), then re-check its admission.
pub async fn reconcile(queue: &Queue, pool: &PgPool) -> Result<Vec<Reconciled>, LedgerError> {
    let now = queue.server_time().await?;
    let today = now.date_naive();
    let month = now.format("%Y-%m").to_string();
    let sums: Vec<(String, i64)> = sqlx::query_as(
        "SELECT tenant, sum(agent_ms)::bigint FROM usage_daily WHERE day >= $1 GROUP BY tenant ORDER BY tenant",
    )
    .bind(month_start(today))
    .fetch_all(pool)
    .await?;
    let mut out = Vec::new();
    for (tenant, ledger_ms) in sums {
        let ledger_ms = ledger_ms.max(0) as u64;
        let raised = queue.raise_usage(&tenant, &month, ledger_ms).await?;
        let (redis_ms, after_ms) = (raised.before_ms, raised.after_ms);
        out.push(Reconciled {
            tenant,
            redis_ms,
            ledger_ms,
            after_ms,
        });
    }
    Ok(out)
}
