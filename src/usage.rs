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
    /// Spend counter in Redis before (`<month>:cost`, read by spend caps),
    /// micro-dollars.
    pub redis_cost_micros: u64,
    /// Cost in the ledger this month, micro-dollars.
    pub ledger_cost_micros: u64,
    /// Spend counter after (never lowered).
    pub after_cost_micros: u64,
}

/// Raise each tenant's Redis usage counter for the current month to at least
/// what the ledger holds (after a Redis loss), then re-check its admission.
pub async fn reconcile(queue: &Queue, pool: &PgPool) -> Result<Vec<Reconciled>, LedgerError> {
    let now = queue.server_time().await?;
    let today = now.date_naive();
    let month = now.format("%Y-%m").to_string();
    let sums: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT tenant, sum(agent_ms)::bigint, sum(cost_micros)::bigint FROM usage_daily WHERE day >= $1 GROUP BY tenant ORDER BY tenant",
    )
    .bind(month_start(today))
    .fetch_all(pool)
    .await?;
    let mut out = Vec::new();
    for (tenant, ledger_ms, ledger_cost) in sums {
        let ledger_ms = ledger_ms.max(0) as u64;
        let raised = queue.raise_usage(&tenant, &month, ledger_ms).await?;
        let (redis_ms, after_ms) = (raised.before_ms, raised.after_ms);
        // The spend counter is field <month>:cost of the same hash (lib/attempt.lua).
        let ledger_cost_micros = ledger_cost.max(0) as u64;
        let cost = queue
            .raise_usage(&tenant, &format!("{month}:cost"), ledger_cost_micros)
            .await?;
        out.push(Reconciled {
            tenant,
            redis_ms,
            ledger_ms,
            after_ms,
            redis_cost_micros: cost.before_ms,
            ledger_cost_micros,
            after_cost_micros: cost.after_ms,
        });
    }
    Ok(out)
}

/// The UTC bounds of a calendar month `YYYY-MM`: its first day and the
/// first day of the next month (invoices and spend counters count an
/// attempt in the UTC month of its `finished_at`).
pub fn month_bounds(month: &str) -> Option<(NaiveDate, NaiveDate)> {
    let start = NaiveDate::parse_from_str(&format!("{month}-01"), "%Y-%m-%d").ok()?;
    if format!("{:04}-{:02}", start.year(), start.month()) != month {
        return None;
    }
    let next = start.checked_add_months(chrono::Months::new(1))?;
    Some((start, next))
}

/// One line of an invoice: the attempts' usage billed in one price step (or
/// at a flat rate) of one kind of usage, and its amount.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct InvoiceLine {
    /// `agent_minutes`, `tokens`, or `flat` (rows of tenants priced flat,
    /// whose cost covers their agent time and tokens together).
    pub item: String,
    /// Where the step starts in the month's usage (ms of agent time, or
    /// tokens); None for `flat`.
    pub step_from: Option<u64>,
    /// The step's price, micro-dollars per agent-minute or per 1,000
    /// tokens; None for `flat`.
    pub rate_micros: Option<u64>,
    /// Agent time billed on this line, ms (0 on token lines).
    pub agent_ms: u64,
    /// Tokens billed on this line (0 on agent-minute lines).
    pub tokens: u64,
    /// Attempts with usage on this line.
    pub attempts: u64,
    /// Amount, micro-dollars: the sum of the rows' amounts as billed.
    pub amount_micros: i64,
}

/// A tenant's invoice for one UTC calendar month, from the ledger rows as
/// billed (a row keeps the price it was billed at).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Invoice {
    /// Tenant.
    pub tenant: String,
    /// `YYYY-MM`.
    pub month: String,
    /// First instant of the month, UTC (inclusive).
    pub period_start: String,
    /// First instant of the next month, UTC (exclusive).
    pub period_end: String,
    /// One line per kind of usage and price step, in order.
    pub lines: Vec<InvoiceLine>,
    /// Sum of the lines, micro-dollars.
    pub total_micros: i64,
    /// The month's ledger rows (attempts).
    pub attempts: i64,
    /// Sum of the month's ledger rows' `cost_micros` (PostgreSQL's sum).
    pub ledger_micros: i64,
    /// Sum of the month's daily rollup (`usage_daily.cost_micros`).
    pub rollup_micros: i64,
    /// True when the total equals both sums to the micro-dollar and every
    /// row's step amounts add up to its cost.
    pub reconciled: bool,
    /// Why it does not reconcile (empty when it does).
    pub problems: Vec<String>,
}

impl Invoice {
    /// Why it is refused: `agentq invoice` exits 1 with this, the API
    /// answers 409 `invoice_unreconciled`.
    pub fn refusal(&self) -> String {
        format!(
            "the invoice of tenant {} for {} does not reconcile with the ledger, so it is not issued: {}",
            self.tenant,
            self.month,
            self.problems.join("; ")
        )
    }
}

/// One `m|t<from>:<micros>:<qty>:<amount>` word of a row's `billing`.
fn billing_parts(billing: &str) -> Vec<(char, u64, u64, u64, i64)> {
    billing
        .split_whitespace()
        .filter_map(|w| {
            let tag = w.chars().next()?;
            if tag != 'm' && tag != 't' {
                return None;
            }
            let mut it = w[1..].split(':');
            let from = it.next()?.parse().ok()?;
            let rate = it.next()?.parse().ok()?;
            let qty = it.next()?.parse().ok()?;
            let amount = it.next()?.parse().ok()?;
            Some((tag, from, rate, qty, amount))
        })
        .collect()
}

/// The month's usage before an attempt, from its `billing` word `u<ms>`
/// (`k<tokens>` with `tag` 'k'): the order in which attempts were charged.
pub fn billing_before(billing: &str, tag: char) -> Option<u64> {
    billing
        .split_whitespace()
        .find_map(|w| w.strip_prefix(tag).and_then(|v| v.parse().ok()))
}

/// Build `tenant`'s invoice for `month` (`YYYY-MM`, UTC) from the ledger
/// rows finished in it, and check that it reconciles.
pub async fn invoice(pool: &PgPool, tenant: &str, month: &str) -> Result<Invoice, LedgerError> {
    use std::collections::BTreeMap;
    let (start, end) = month_bounds(month).unwrap_or_else(|| {
        let d = chrono::Utc::now().date_naive();
        let s = month_start(d);
        (s, s.checked_add_months(chrono::Months::new(1)).unwrap_or(s))
    });
    let at = |d: NaiveDate| d.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc();
    let rows: Vec<(String, i32, i64, i64, i64, String)> = sqlx::query_as(
        "SELECT job_id, attempt, run_ms, input_tokens + output_tokens, cost_micros, billing
         FROM usage_ledger WHERE tenant = $1 AND finished_at >= $2 AND finished_at < $3
         ORDER BY finished_at, job_id, attempt",
    )
    .bind(tenant)
    .bind(at(start))
    .bind(at(end))
    .fetch_all(pool)
    .await?;
    let (ledger_micros, attempts): (i64, i64) = sqlx::query_as(
        "SELECT coalesce(sum(cost_micros), 0)::bigint, count(*) FROM usage_ledger
         WHERE tenant = $1 AND finished_at >= $2 AND finished_at < $3",
    )
    .bind(tenant)
    .bind(at(start))
    .bind(at(end))
    .fetch_one(pool)
    .await?;
    let rollup_micros: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(cost_micros), 0)::bigint FROM usage_daily
         WHERE tenant = $1 AND day >= $2 AND day < $3",
    )
    .bind(tenant)
    .bind(start)
    .bind(end)
    .fetch_one(pool)
    .await?;
    // (item order, from, rate) -> line
    let mut lines: BTreeMap<(u8, u64, u64), InvoiceLine> = BTreeMap::new();
    let mut problems = Vec::new();
    let mut bad_rows = 0;
    for (job, attempt, run_ms, tokens, cost, billing) in &rows {
        let parts = billing_parts(billing);
        if billing.is_empty() {
            let l = lines.entry((2, 0, 0)).or_insert_with(|| InvoiceLine {
                item: "flat".into(),
                step_from: None,
                rate_micros: None,
                agent_ms: 0,
                tokens: 0,
                attempts: 0,
                amount_micros: 0,
            });
            l.agent_ms += (*run_ms).max(0) as u64;
            l.tokens += (*tokens).max(0) as u64;
            l.attempts += 1;
            l.amount_micros += cost;
            continue;
        }
        let billed: i64 = parts.iter().map(|p| p.4).sum();
        if billed != *cost {
            bad_rows += 1;
            if bad_rows <= 5 {
                problems.push(format!(
                    "ledger row {job} attempt {attempt}: its step amounts sum to {billed} micro-dollars but its cost_micros is {cost}"
                ));
            }
        }
        for (tag, from, rate, qty, amount) in parts {
            let minutes = tag == 'm';
            let l = lines
                .entry((if minutes { 0 } else { 1 }, from, rate))
                .or_insert_with(|| InvoiceLine {
                    item: if minutes { "agent_minutes" } else { "tokens" }.into(),
                    step_from: Some(from),
                    rate_micros: Some(rate),
                    agent_ms: 0,
                    tokens: 0,
                    attempts: 0,
                    amount_micros: 0,
                });
            if minutes {
                l.agent_ms += qty;
            } else {
                l.tokens += qty;
            }
            l.attempts += 1;
            l.amount_micros += amount;
        }
    }
    if bad_rows > 5 {
        problems.push(format!("... and {} more such rows", bad_rows - 5));
    }
    let lines: Vec<InvoiceLine> = lines.into_values().collect();
    let total_micros: i64 = lines.iter().map(|l| l.amount_micros).sum();
    if bad_rows == 0 && total_micros != ledger_micros {
        problems.push(format!(
            "the invoice's lines total {total_micros} micro-dollars but the month's ledger rows' cost_micros sum to {ledger_micros}"
        ));
    }
    if rollup_micros != ledger_micros {
        problems.push(format!(
            "the daily rollup (usage_daily) holds {rollup_micros} micro-dollars for the month but the ledger rows sum to {ledger_micros}: re-price both together (docs/runbook.md#re-pricing-a-month)"
        ));
    }
    Ok(Invoice {
        tenant: tenant.to_string(),
        month: format!("{:04}-{:02}", start.year(), start.month()),
        period_start: at(start).to_rfc3339(),
        period_end: at(end).to_rfc3339(),
        lines,
        total_micros,
        attempts,
        ledger_micros,
        rollup_micros,
        reconciled: problems.is_empty(),
        problems,
    })
}

/// A tenant's month-to-date cost and a month-end projection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Forecast {
    /// Tenant.
    pub tenant: String,
    /// `YYYY-MM` (UTC).
    pub month: String,
    /// Cost from the first of the month to today inclusive, micro-dollars.
    pub month_to_date_micros: i64,
    /// Cost of the last 7 UTC days (today and the 6 before), micro-dollars.
    pub last_7_days_micros: i64,
    /// Whole days of the month after today.
    pub days_left: i64,
    /// `month_to_date + last_7_days / 7 x days_left`, micro-dollars
    /// (integer arithmetic, rounded down).
    pub projected_micros: i64,
}

const FORECAST: &str = "SELECT tenant,
    coalesce(sum(cost_micros) FILTER (WHERE day >= $1), 0)::bigint,
    coalesce(sum(cost_micros) FILTER (WHERE day >= $2), 0)::bigint
FROM usage_daily
WHERE day >= least($1, $2) AND day <= $3 AND ($4::text IS NULL OR tenant = $4)
GROUP BY tenant ORDER BY tenant";

fn forecasts(rows: Vec<(String, i64, i64)>, today: NaiveDate) -> Vec<Forecast> {
    let start = month_start(today);
    let next = start
        .checked_add_months(chrono::Months::new(1))
        .unwrap_or(start);
    let days_left = (next - today).num_days() - 1;
    rows.into_iter()
        .map(|(tenant, mtd, last7)| Forecast {
            tenant,
            month: format!("{:04}-{:02}", today.year(), today.month()),
            month_to_date_micros: mtd,
            last_7_days_micros: last7,
            days_left,
            projected_micros: mtd + last7 * days_left / 7,
        })
        .collect()
}

/// Month-to-date cost and the month-end projection of every tenant (or
/// one) as of `today` (UTC), from the daily rollup.
pub async fn forecast(
    pool: &PgPool,
    tenant: Option<&str>,
    today: NaiveDate,
) -> Result<Vec<Forecast>, LedgerError> {
    let week = today - chrono::Days::new(6);
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(FORECAST)
        .bind(month_start(today))
        .bind(week)
        .bind(today)
        .bind(tenant)
        .fetch_all(pool)
        .await?;
    Ok(forecasts(rows, today))
}

/// [`forecast`] for the tenant-facing `/v1/usage`, under row-level security.
pub async fn tenant_forecast(
    pool: &PgPool,
    tenant: &str,
    today: NaiveDate,
) -> Result<Forecast, LedgerError> {
    let mut tx = pool.begin().await?;
    scope_to_tenant(&mut tx, tenant).await?;
    let week = today - chrono::Days::new(6);
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(FORECAST)
        .bind(month_start(today))
        .bind(week)
        .bind(today)
        .bind(None::<String>)
        .fetch_all(&mut *tx)
        .await?;
    tx.rollback().await?;
    let mut f = forecasts(rows, today);
    let mut one = f
        .pop()
        .unwrap_or_else(|| forecasts(vec![(tenant.to_string(), 0, 0)], today).remove(0));
    one.tenant = tenant.to_string();
    Ok(one)
}

/// Export every tenant's month-to-date cost and projection as gauges
/// ([`crate::metrics::COST_MONTH_TO_DATE`], [`crate::metrics::COST_PROJECTED`]),
/// at most once a minute per process (the ledger writer calls it when idle).
pub async fn publish_forecast(pool: &PgPool) -> Result<(), LedgerError> {
    use std::collections::HashMap;
    static LAST: std::sync::Mutex<Option<std::time::Instant>> = std::sync::Mutex::new(None);
    {
        let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(60)) {
            return Ok(());
        }
        *last = Some(std::time::Instant::now());
    }
    let today = chrono::Utc::now().date_naive();
    let mut by_label: HashMap<String, (i64, i64)> = HashMap::new();
    for f in forecast(pool, None, today).await? {
        let e = by_label
            .entry(crate::metrics::tenant_label(&f.tenant))
            .or_default();
        e.0 += f.month_to_date_micros;
        e.1 += f.projected_micros;
    }
    for (label, (mtd, projected)) in by_label {
        ::metrics::gauge!(crate::metrics::COST_MONTH_TO_DATE, "tenant" => label.clone())
            .set(mtd as f64);
        ::metrics::gauge!(crate::metrics::COST_PROJECTED, "tenant" => label).set(projected as f64);
    }
    Ok(())
}

/// Raise `tenant`'s spend counter for this month (what its spend cap is
/// checked against) to at least the ledger's month-to-date cost: `tenant
/// set --spend-cap` does it, since tenants without a cap keep no spend
/// counter in Redis. Returns the counter after, micro-dollars.
pub async fn raise_spend(queue: &Queue, pool: &PgPool, tenant: &str) -> Result<u64, LedgerError> {
    let now = queue.server_time().await?;
    let month = now.format("%Y-%m").to_string();
    let cost: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(cost_micros), 0)::bigint FROM usage_daily WHERE tenant = $1 AND day >= $2",
    )
    .bind(tenant)
    .bind(month_start(now.date_naive()))
    .fetch_one(pool)
    .await?;
    let r = queue
        .raise_usage(tenant, &format!("{month}:cost"), cost.max(0) as u64)
        .await?;
    Ok(r.after_ms)
}
