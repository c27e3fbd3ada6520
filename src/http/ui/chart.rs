//! Usage per day as a server-rendered SVG bar chart (agent time, with the
//! day's cost on each bar) and the same numbers as a table.

use std::collections::BTreeMap;

use chrono::NaiveDate;
use maud::{Markup, html};

use super::page::{dollars, duration_ms};
use crate::usage::UsageRow;

const W: i64 = 720;
const H: i64 = 220;
const PAD: i64 = 28;

/// Per day: (agent ms, cost micros, attempts), summed over tenants.
fn per_day(rows: &[UsageRow]) -> BTreeMap<String, (i64, i64, i64)> {
    let mut days = BTreeMap::new();
    for r in rows {
        let d = days.entry(r.period.clone()).or_insert((0, 0, 0));
        d.0 += r.agent_ms;
        d.1 += r.cost_micros;
        d.2 += r.attempts;
    }
    days
}

/// The chart: one bar per day of `since..=until` (at most 62 days drawn).
fn svg(days: &BTreeMap<String, (i64, i64, i64)>, since: NaiveDate, until: NaiveDate) -> Markup {
    let all: Vec<NaiveDate> = since
        .iter_days()
        .take_while(|d| *d <= until)
        .take(62)
        .collect();
    let n = all.len().max(1) as i64;
    let slot = (W - 2 * PAD) / n;
    let bar = (slot * 7 / 10).clamp(2, 48);
    let max = days.values().map(|d| d.0).max().unwrap_or(0).max(1);
    html! {
        svg.chart viewBox=(format!("0 0 {W} {H}")) role="img" aria-labelledby="chart-title" {
            title #chart-title { "Agent time per day, with cost" }
            line x1=(PAD) y1=(H - PAD) x2=(W - PAD) y2=(H - PAD) class="axis" {}
            @for (i, day) in all.iter().enumerate() {
                @let key = day.format("%Y-%m-%d").to_string();
                @let (ms, cost, _) = days.get(&key).copied().unwrap_or((0, 0, 0));
                @let h = ms * (H - 2 * PAD - 14) / max;
                @let x = PAD + i as i64 * slot + (slot - bar) / 2;
                g {
                    title { (key) ": " (duration_ms(ms)) ", " (dollars(cost)) }
                    rect x=(x) y=(H - PAD - h) width=(bar) height=(h) class="bar" {}
                    @if ms > 0 && n <= 31 {
                        text x=(x + bar / 2) y=(H - PAD - h - 4) class="cost" { (dollars(cost)) }
                    }
                    @if n <= 16 || i % 5 == 0 {
                        text x=(x + bar / 2) y=(H - PAD + 14) class="day" { (day.format("%d")) }
                    }
                }
            }
        }
    }
}

/// Chart and table of `rows` (one per tenant and day).
pub(super) fn usage_section(rows: &[UsageRow], since: NaiveDate, until: NaiveDate) -> Markup {
    let days = per_day(rows);
    let total_cost: i64 = rows.iter().map(|r| r.cost_micros).sum();
    let total_ms: i64 = rows.iter().map(|r| r.agent_ms).sum();
    html! {
        section aria-labelledby="usage-h" {
            h2 #usage-h { "Per day, " (since) " to " (until) }
            p { "Total: " strong { (duration_ms(total_ms)) } " of agent time, " strong data-testid="total-cost" { (dollars(total_cost)) } "." }
            @if rows.is_empty() { p { "No usage recorded in this period." } }
            @else {
                (svg(&days, since, until))
                table {
                    caption { "Usage per tenant and day, from the ledger's daily rollup" }
                    thead { tr {
                        th scope="col" { "Day" } th scope="col" { "Tenant" } th scope="col" { "Attempts" }
                        th scope="col" { "Succeeded" } th scope="col" { "Failed" } th scope="col" { "Agent time" }
                        th scope="col" { "Tokens in/out" } th scope="col" { "Cost" }
                    } }
                    tbody { @for r in rows { tr {
                        td { (r.period) } th scope="row" { (r.tenant) } td.num { (r.attempts) }
                        td.num { (r.succeeded) } td.num { (r.failed + r.timed_out + r.memory_exceeded + r.lost) }
                        td.num { (duration_ms(r.agent_ms)) } td.num { (r.input_tokens) " / " (r.output_tokens) }
                        td.num { (dollars(r.cost_micros)) }
                    } } }
                }
            }
        }
    }
}
