//! Prometheus metrics (prefix `agentq_`): every name agentq emits, the
//! functions that record them from plain values, and the bound on tenant
//! label cardinality. A sink: it imports nothing of agentq but the ground
//! floor ([`crate::model`]). The sampler duty turns Redis state into the
//! gauges; `crate::http::probes` serves `/metrics`.
//!
//! Recording goes through the `metrics` facade, so library users may install
//! any recorder; `agentq worker --metrics-addr` installs the Prometheus one.

use std::collections::HashSet;
use std::sync::{OnceLock, RwLock};
use std::time::Duration;

use crate::model::events::QueueEvent;
use crate::model::record::{Record, RejectReason};

/// Jobs enqueued by this process, by queue and tenant (recorded by
/// [`enqueued`], for library users' own enqueues; no agentq process calls
/// it, so fleet dashboards read [`SUBMITTED`]).
pub const ENQUEUED: &str = "agentq_jobs_enqueued_total";
/// Jobs Redis accepted from every producer (HTTP API, the published
/// script, clients, CLI; idempotent repeats included), the sum of the
/// partitions' job sequence counters (`B:seq`), sampled. Only goes up, but
/// is a gauge set to Redis's value, so it follows Redis (a reset after data
/// loss reads as a counter reset) rather than a counter's running maximum.
pub const SUBMITTED: &str = "agentq_jobs_submitted_total";
/// Attempts started, by queue and tenant.
pub const STARTED: &str = "agentq_jobs_started_total";
/// Attempts completed, by queue, tenant and outcome.
pub const COMPLETED: &str = "agentq_jobs_completed_total";
/// Attempts that failed and were scheduled to retry, by queue and tenant.
pub const RETRIED: &str = "agentq_jobs_retried_total";
/// Jobs moved to the dead-letter set, by queue and tenant.
pub const DEAD_LETTERED: &str = "agentq_jobs_dead_lettered_total";
/// Completions refused because the lease was lost (fencing).
pub const REFUSED: &str = "agentq_completions_refused_total";
/// Expired leases returned to ready by this worker's reaper.
pub const LEASE_EXPIRIES: &str = "agentq_lease_expiries_total";
/// Schedule slots that enqueued no job, by reason: `caps` (the tenant's
/// caps refuse the job's timeout or memory) or `forbidden` (its queue or
/// kind is not among the tenant's allowed ones).
pub const SCHEDULE_REFUSED: &str = "agentq_schedule_slots_refused_total";
/// Task programs' `{"progress": ...}` reports, by outcome: `sent` (a job
/// event), `coalesced` (replaced by a newer one within the interval),
/// `dropped_size` (over the size bound).
pub const PROGRESS_REPORTS: &str = "agentq_progress_reports_total";
/// The outcomes of [`PROGRESS_REPORTS`].
const PROGRESS_OUTCOMES: [&str; 3] = ["sent", "coalesced", "dropped_size"];
/// Tenants held from starting, by reason (concurrency, rate, quota, spend, paused), sampled.
pub const THROTTLED: &str = "agentq_tenants_throttled";
/// Seconds from ready to start, by queue and tenant.
pub const WAIT_SECONDS: &str = "agentq_job_wait_seconds";
/// Seconds an attempt ran, by queue, tenant and outcome.
pub const RUN_SECONDS: &str = "agentq_job_run_seconds";
/// Jobs per queue and state (ready, delayed, running, dead), sampled.
pub const QUEUE_JOBS: &str = "agentq_queue_jobs";
/// Running jobs per tenant (fleet-wide), sampled.
pub const TENANT_RUNNING: &str = "agentq_tenant_running";
/// Concurrency cap per tenant, sampled.
pub const TENANT_CAP: &str = "agentq_tenant_cap";
/// Share of the monthly quota used per tenant (0..1+), sampled.
pub const QUOTA_USE: &str = "agentq_tenant_quota_use_ratio";
/// This worker's busy slots.
pub const BUSY_SLOTS: &str = "agentq_worker_busy_slots";
/// This worker's slots.
pub const SLOTS: &str = "agentq_worker_slots";
/// Usage records waiting in the outbox, sampled.
pub const OUTBOX_BACKLOG: &str = "agentq_ledger_outbox_backlog";

/// Ledger rows inserted into PostgreSQL.
pub const LEDGER_ROWS: &str = "agentq_ledger_rows_written_total";
/// Ledger batches that failed to write (PostgreSQL down, ...).
pub const LEDGER_ERRORS: &str = "agentq_ledger_write_errors_total";
/// Outbox entries kept aside in `usage_ledger_rejects`, by reason
/// (`repaired`, `unrepairable`, `malformed`).
pub const LEDGER_REJECTS: &str = "agentq_ledger_rejects_total";
/// Cost of attempts written to the ledger, micro-dollars, by tenant.
pub const COST_MICROS: &str = "agentq_cost_micros_total";
/// Agent time written to the ledger, seconds with their fractions (each
/// attempt's `run_ms` / 1000), by tenant. It only goes up, like a counter,
/// but is exported as a gauge (`# TYPE ... gauge`): the `metrics` facade's
/// counters hold whole numbers, and whole seconds would drop every attempt
/// shorter than one. `rate()` and `increase()` read it as a counter.
pub const AGENT_SECONDS: &str = "agentq_agent_seconds_total";
/// Cost of the current UTC month so far, micro-dollars, by tenant (from
/// the ledger's daily rollup; `crate::usage::publish_forecast`).
pub const COST_MONTH_TO_DATE: &str = "agentq_cost_month_to_date_micros";
/// Projected cost of the current UTC month, micro-dollars, by tenant:
/// month-to-date + the last 7 days' daily average x the days left.
pub const COST_PROJECTED: &str = "agentq_cost_projected_month_micros";
/// Quota threshold crossings, by tenant and threshold (80, 100).
pub const QUOTA_ALERTS: &str = "agentq_quota_alerts_total";
/// Tenants starting jobs at twice their tier's expected rate, by tenant.
pub const RATE_ALERTS: &str = "agentq_rate_alerts_total";

/// A ledger batch landed: rows inserted, and per-tenant cost and agent time
/// of the records in it.
pub fn ledger_batch(inserted: u64, records: &[Record]) {
    ::metrics::counter!(LEDGER_ROWS).increment(inserted);
    for r in records {
        let tenant = tenant_label(&r.tenant);
        ::metrics::counter!(COST_MICROS, "tenant" => tenant.clone())
            .increment(r.cost_micros.max(0) as u64);
        ::metrics::gauge!(AGENT_SECONDS, "tenant" => tenant)
            .increment(r.run_ms.max(0) as f64 / 1000.0);
    }
}

/// A ledger batch failed to write.
pub fn ledger_error() {
    ::metrics::counter!(LEDGER_ERRORS).increment(1);
}

/// An outbox entry was kept aside in `usage_ledger_rejects`.
pub fn ledger_reject(reason: RejectReason) {
    ::metrics::counter!(LEDGER_REJECTS, "reason" => reason.as_str()).increment(1);
}

/// Count and log what the scripts reported (quota thresholds, rate
/// alerts), as structured warnings an operator can alert on.
pub fn record_events(events: &[QueueEvent]) {
    for e in events {
        match e {
            QueueEvent::QuotaCrossed { tenant, percent } => {
                quota_alert(tenant, if *percent >= 100 { "100" } else { "80" });
                if *percent >= 100 {
                    tracing::warn!(event = "quota_100", tenant = %tenant,
                        "tenant reached its monthly quota: its jobs wait until the quota is raised or the month ends");
                } else {
                    tracing::warn!(event = "quota_80", tenant = %tenant, "tenant crossed 80% of its monthly quota");
                }
            }
            QueueEvent::RateAlert { tenant } => {
                rate_alert(tenant);
                tracing::warn!(event = "rate_2x", tenant = %tenant, "tenant is starting jobs at twice its tier's expected rate");
            }
            QueueEvent::Other { kind, tenant } => {
                tracing::warn!(event = %kind, tenant = %tenant, "queue event")
            }
        }
    }
}

/// A quota threshold (80 or 100 percent) was crossed.
pub fn quota_alert(tenant: &str, threshold: &'static str) {
    ::metrics::counter!(QUOTA_ALERTS, "tenant" => tenant_label(tenant), "threshold" => threshold)
        .increment(1);
}

/// A tenant ran at twice its expected start rate.
pub fn rate_alert(tenant: &str) {
    ::metrics::counter!(RATE_ALERTS, "tenant" => tenant_label(tenant)).increment(1);
}

/// How many tenants get their own label value; the rest are `other`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TenantLabels {
    /// Every tenant (fine for tens or hundreds of tenants).
    All,
    /// The N tenants with the most ready plus running jobs (re-ranked by the sampler).
    Top(usize),
    /// None: every series says `tenant="other"`.
    None,
}

impl std::str::FromStr for TenantLabels {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "all" => Ok(TenantLabels::All),
            "none" => Ok(TenantLabels::None),
            other => other
                .strip_prefix("top:")
                .and_then(|n| n.parse().ok())
                .map(TenantLabels::Top)
                .ok_or_else(|| format!("invalid tenant label policy {s:?}: use all, top:N (for example top:50) or none")),
        }
    }
}

struct LabelPolicy {
    mode: TenantLabels,
    top: RwLock<HashSet<String>>,
}

static POLICY: OnceLock<LabelPolicy> = OnceLock::new();

/// Set the tenant label policy (once per process; default `all`).
pub fn set_tenant_labels(mode: TenantLabels) {
    let _ = POLICY.set(LabelPolicy {
        mode,
        top: RwLock::new(HashSet::new()),
    });
}

/// The label value for `tenant` under the policy.
pub fn tenant_label(tenant: &str) -> String {
    let Some(p) = POLICY.get() else {
        return tenant.to_string();
    };
    match p.mode {
        TenantLabels::All => tenant.to_string(),
        TenantLabels::None => "other".into(),
        TenantLabels::Top(_) => {
            let top = p.top.read().unwrap_or_else(|e| e.into_inner());
            if top.contains(tenant) {
                tenant.to_string()
            } else {
                "other".into()
            }
        }
    }
}

/// Re-rank which tenants get their own label (`top:N`), by load.
pub fn rank_tenants(mut by_load: Vec<(String, i64)>) {
    let Some(p) = POLICY.get() else { return };
    let TenantLabels::Top(n) = p.mode else { return };
    by_load.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let keep: HashSet<String> = by_load.into_iter().take(n).map(|(t, _)| t).collect();
    *p.top.write().unwrap_or_else(|e| e.into_inner()) = keep;
}

/// Jobs enqueued by this process.
pub fn enqueued(queue: &str, tenant: &str) {
    ::metrics::counter!(ENQUEUED, "queue" => queue.to_string(), "tenant" => tenant_label(tenant))
        .increment(1);
}

/// An attempt started after waiting `wait` since it was enqueued or ready.
pub fn started(queue: &str, tenant: &str, wait: Duration) {
    let (q, t) = (queue.to_string(), tenant_label(tenant));
    ::metrics::counter!(STARTED, "queue" => q.clone(), "tenant" => t.clone()).increment(1);
    ::metrics::histogram!(WAIT_SECONDS, "queue" => q, "tenant" => t).record(wait.as_secs_f64());
}

/// An attempt ended with `outcome` after running `run`; `status` is where
/// the completion sent the job.
/// `status` is the job's state after the completion script (`succeeded`,
/// `delayed`, `ready`, `dead`, or `refused` for a fenced-out completion).
pub fn completed(queue: &str, tenant: &str, outcome: &'static str, run: Duration, status: &str) {
    let (q, t) = (queue.to_string(), tenant_label(tenant));
    match status {
        "refused" => {
            ::metrics::counter!(REFUSED).increment(1);
            return;
        }
        "delayed" | "ready" => {
            ::metrics::counter!(RETRIED, "queue" => q.clone(), "tenant" => t.clone()).increment(1)
        }
        "dead" => ::metrics::counter!(DEAD_LETTERED, "queue" => q.clone(), "tenant" => t.clone())
            .increment(1),
        _ => {}
    }
    ::metrics::counter!(COMPLETED, "queue" => q.clone(), "tenant" => t.clone(), "outcome" => outcome).increment(1);
    ::metrics::histogram!(RUN_SECONDS, "queue" => q, "tenant" => t, "outcome" => outcome)
        .record(run.as_secs_f64());
}

/// The reaper returned `n` expired leases to ready.
pub fn lease_expiries(n: u64) {
    ::metrics::counter!(LEASE_EXPIRIES).increment(n);
}

/// A schedule slot enqueued no job, for `reason` (`caps`, `forbidden`).
pub fn schedule_slot_refused(reason: &'static str) {
    ::metrics::counter!(SCHEDULE_REFUSED, "reason" => reason).increment(1);
}

/// One attempt's progress reports: sent, coalesced and dropped for size.
pub fn progress_reports(sent: u64, coalesced: u64, dropped_size: u64) {
    for (outcome, n) in PROGRESS_OUTCOMES
        .into_iter()
        .zip([sent, coalesced, dropped_size])
    {
        if n > 0 {
            ::metrics::counter!(PROGRESS_REPORTS, "outcome" => outcome).increment(n);
        }
    }
}

/// Create the fleet-level counters at zero, so `increase()` sees their
/// first event (Prometheus misses a series' first sample otherwise).
pub fn register_zeroes() {
    for name in [REFUSED, LEASE_EXPIRIES, LEDGER_ROWS, LEDGER_ERRORS] {
        ::metrics::counter!(name).increment(0);
    }
    for reason in RejectReason::ALL {
        ::metrics::counter!(LEDGER_REJECTS, "reason" => reason.as_str()).increment(0);
    }
    for reason in ["caps", "forbidden"] {
        ::metrics::counter!(SCHEDULE_REFUSED, "reason" => reason).increment(0);
    }
    for outcome in PROGRESS_OUTCOMES {
        ::metrics::counter!(PROGRESS_REPORTS, "outcome" => outcome).increment(0);
    }
}

/// This worker's slot use.
pub fn slots(busy: usize, total: usize) {
    ::metrics::gauge!(BUSY_SLOTS).set(busy as f64);
    ::metrics::gauge!(SLOTS).set(total as f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_policies_parse() {
        assert_eq!("all".parse::<TenantLabels>(), Ok(TenantLabels::All));
        assert_eq!("top:50".parse::<TenantLabels>(), Ok(TenantLabels::Top(50)));
        assert_eq!("none".parse::<TenantLabels>(), Ok(TenantLabels::None));
        assert!("top:x".parse::<TenantLabels>().is_err());
    }
}
