//! `agentq usage`: agent time, CPU, outcomes, tokens and cost per tenant.

use chrono::NaiveDate;
use clap::Args;

use super::output;
use super::{CliError, CliResult, Global};
use crate::usage::{self, Period};

/// `agentq usage`.
#[derive(Debug, Args)]
pub struct UsageArgs {
    /// Only this tenant.
    #[arg(long)]
    tenant: Option<String>,
    /// First UTC day, YYYY-MM-DD [default: the first of this month].
    #[arg(long, value_parser = date_arg)]
    since: Option<NaiveDate>,
    /// Last UTC day, inclusive [default: today].
    #[arg(long, value_parser = date_arg)]
    until: Option<NaiveDate>,
    /// One row per tenant and day or month.
    #[arg(long, value_enum, default_value = "month")]
    by: Period,
    /// Raise the Redis quota counters of this month to what the ledger holds
    /// (after a Redis loss), and print what changed.
    #[arg(long)]
    reconcile: bool,
    /// Only this month's cost so far and its month-end projection per
    /// tenant (month-to-date + the last 7 days' daily average x the days
    /// left; UTC days). Without it the table ends with them too.
    #[arg(long, conflicts_with = "reconcile")]
    forecast: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn date_arg(s: &str) -> Result<NaiveDate, String> {
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .map_err(|_| format!("invalid date {s:?}: use YYYY-MM-DD, for example 2026-11-01"))
}

/// Connect to PostgreSQL with a clear error.
pub(super) async fn database(g: &Global) -> Result<sqlx::PgPool, CliError> {
    let url = g.settings()?.database_url;
    crate::ledger::connect(&url, None).await.map_err(|e| {
        CliError::Runtime(anyhow::anyhow!(
            "cannot reach PostgreSQL at {}: {e}; is it running? (set AGENTQ_DATABASE_URL or --database-url)",
            crate::model::redact::redact_url(&url)
        ))
    })
}

pub(super) async fn usage(g: &Global, a: UsageArgs) -> CliResult {
    if let Some(t) = &a.tenant {
        crate::queue::job::validate_name("tenant", t)?;
    }
    let today = chrono::Utc::now().date_naive();
    let since = a.since.unwrap_or_else(|| usage::month_start(today));
    let until = a.until.unwrap_or(today);
    if since > until {
        return Err(CliError::Usage(format!(
            "--since {since} is after --until {until}"
        )));
    }
    let pool = database(g).await?;
    if a.reconcile {
        let q = g.queue().await?;
        let done = usage::reconcile(&q, &pool)
            .await
            .map_err(|e| CliError::Runtime(e.into()))?;
        if a.json {
            output::json(&done);
        } else {
            let rows: Vec<Vec<String>> = done
                .iter()
                .map(|r| {
                    vec![
                        r.tenant.clone(),
                        r.redis_ms.to_string(),
                        r.ledger_ms.to_string(),
                        r.after_ms.to_string(),
                        r.ledger_cost_micros.to_string(),
                        r.after_cost_micros.to_string(),
                    ]
                })
                .collect();
            output::table(
                &[
                    "tenant",
                    "redis_ms",
                    "ledger_ms",
                    "now_ms",
                    "ledger_cost_micros",
                    "spend_now_micros",
                ],
                &rows,
            );
            println!(
                "reconciled {} tenants' quota and spend counters for this month",
                done.len()
            );
        }
        return Ok(());
    }
    let forecasts = usage::forecast(&pool, a.tenant.as_deref(), today)
        .await
        .map_err(|e| CliError::Runtime(e.into()))?;
    if a.forecast {
        if a.json {
            output::json(&forecasts);
        } else {
            print_forecast(&forecasts);
        }
        return Ok(());
    }
    let rows = usage::report(&pool, a.tenant.as_deref(), since, until, a.by)
        .await
        .map_err(|e| CliError::Runtime(e.into()))?;
    if a.json {
        output::json(&rows);
        return Ok(());
    }
    let secs = |ms: i64| format!("{:.1}", ms as f64 / 1000.0);
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.tenant.clone(),
                r.period.clone(),
                r.attempts.to_string(),
                r.succeeded.to_string(),
                (r.failed + r.timed_out + r.memory_exceeded).to_string(),
                r.lost.to_string(),
                secs(r.agent_ms),
                secs(r.cpu_ms),
                r.api_calls.to_string(),
                (r.input_tokens + r.output_tokens).to_string(),
                format!("{:.4}", r.cost_micros as f64 / 1e6),
            ]
        })
        .collect();
    output::table(
        &[
            "tenant",
            "period",
            "attempts",
            "succeeded",
            "failed",
            "lost",
            "agent-s",
            "cpu-s",
            "api_calls",
            "tokens",
            "cost $",
        ],
        &table,
    );
    println!();
    print_forecast(&forecasts);
    Ok(())
}

/// Month-to-date cost and the month-end projection, per tenant.
fn print_forecast(f: &[usage::Forecast]) {
    let d = |m: i64| format!("{:.2}", m as f64 / 1e6);
    let rows: Vec<Vec<String>> = f
        .iter()
        .map(|f| {
            vec![
                f.tenant.clone(),
                f.month.clone(),
                d(f.month_to_date_micros),
                d(f.last_7_days_micros),
                f.days_left.to_string(),
                d(f.projected_micros),
            ]
        })
        .collect();
    output::table(
        &[
            "tenant",
            "month",
            "month-to-date $",
            "last 7 days $",
            "days left",
            "projected $",
        ],
        &rows,
    );
    println!("projected = month-to-date + last 7 days / 7 x days left (UTC days)");
}
