//! `agentq invoice`: a tenant's invoice for one UTC calendar month, one
//! line per kind of usage and price step, reconciled with the ledger.

use clap::Args;

use super::output;
use super::{CliError, CliResult, Global};
use crate::usage;

/// `agentq invoice`.
#[derive(Debug, Args)]
pub struct InvoiceArgs {
    /// The tenant.
    #[arg(long)]
    tenant: String,
    /// The month, YYYY-MM (UTC: from the 1st 00:00 UTC to the next 1st)
    /// [default: this month].
    #[arg(long)]
    month: Option<String>,
    /// Print JSON.
    #[arg(long, conflicts_with = "csv")]
    json: bool,
    /// Print CSV (one row per line, then a total row).
    #[arg(long)]
    csv: bool,
}

/// `0.012345` dollars from micro-dollars, exactly.
pub fn dollars(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let m = micros.unsigned_abs();
    format!("{sign}{}.{:06}", m / 1_000_000, m % 1_000_000)
}

/// A line's description: `agent-minutes from 10000 min at $0.008000/min`.
pub fn describe(l: &usage::InvoiceLine) -> String {
    let rate = l.rate_micros.map(|r| dollars(r as i64)).unwrap_or_default();
    match (l.item.as_str(), l.step_from) {
        ("agent_minutes", Some(from)) => format!(
            "agent-minutes from {} min at ${rate}/min",
            fmt_minutes(from)
        ),
        ("tokens", Some(from)) => format!("tokens from {from} at ${rate}/1k"),
        _ => "agent time and tokens at flat rates".into(),
    }
}

fn fmt_minutes(ms: u64) -> String {
    if ms.is_multiple_of(60_000) {
        (ms / 60_000).to_string()
    } else {
        format!("{:.3}", ms as f64 / 60_000.0)
    }
}

pub(super) async fn invoice(g: &Global, a: InvoiceArgs) -> CliResult {
    crate::queue::job::validate_name("tenant", &a.tenant)?;
    let month = match a.month {
        Some(m) => {
            if usage::month_bounds(&m).is_none() {
                return Err(CliError::Usage(format!(
                    "invalid month {m:?}: use YYYY-MM, for example 2026-11"
                )));
            }
            m
        }
        None => chrono::Utc::now().format("%Y-%m").to_string(),
    };
    let pool = super::usage::database(g).await?;
    let inv = usage::invoice(&pool, &a.tenant, &month)
        .await
        .map_err(|e| CliError::Runtime(e.into()))?;
    if !inv.reconciled {
        return Err(CliError::Runtime(anyhow::anyhow!(inv.refusal())));
    }
    if a.json {
        output::json(&inv);
        return Ok(());
    }
    if a.csv {
        println!(
            "tenant,month,item,step_from,rate_micros,agent_ms,tokens,attempts,amount_micros,amount_usd"
        );
        for l in &inv.lines {
            println!(
                "{},{},{},{},{},{},{},{},{},{}",
                inv.tenant,
                inv.month,
                l.item,
                l.step_from.map(|v| v.to_string()).unwrap_or_default(),
                l.rate_micros.map(|v| v.to_string()).unwrap_or_default(),
                l.agent_ms,
                l.tokens,
                l.attempts,
                l.amount_micros,
                dollars(l.amount_micros)
            );
        }
        println!(
            "{},{},total,,,,,{},{},{}",
            inv.tenant,
            inv.month,
            inv.attempts,
            inv.total_micros,
            dollars(inv.total_micros)
        );
        return Ok(());
    }
    println!(
        "invoice: tenant {}, {} ({} to {}, UTC)",
        inv.tenant, inv.month, inv.period_start, inv.period_end
    );
    let rows: Vec<Vec<String>> = inv
        .lines
        .iter()
        .map(|l| {
            vec![
                describe(l),
                format!("{:.3}", l.agent_ms as f64 / 60_000.0),
                l.tokens.to_string(),
                l.attempts.to_string(),
                dollars(l.amount_micros),
            ]
        })
        .collect();
    output::table(
        &["line", "agent-min", "tokens", "attempts", "amount $"],
        &rows,
    );
    println!(
        "total ${} over {} attempts; reconciled: equals the month's ledger rows ({} micro-dollars) and daily rollup",
        dollars(inv.total_micros),
        inv.attempts,
        inv.ledger_micros
    );
    Ok(())
}
