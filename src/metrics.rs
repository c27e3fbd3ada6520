//! Prometheus metrics (prefix `agentq_`): every name agentq emits, the
//! helpers that record them, the bound on tenant label cardinality, the
//! sampler that turns Redis state into gauges, and the HTTP endpoint that
//! serves `/metrics`, `/healthz` and `/readyz`.
//!
//! Recording goes through the `metrics` facade, so library users may install
//! any recorder; `agentq worker --metrics-addr` installs the Prometheus one.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use fred::prelude::*;
use tokio_util::sync::CancellationToken;

use crate::queue::Queue;

/// Jobs enqueued by this process, by queue and tenant.
pub const ENQUEUED: &str = "agentq_jobs_enqueued_total";
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
/// Tenants held from starting, by reason (concurrency, rate, quota, paused), sampled.
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
/// Agent time written to the ledger, seconds, by tenant.
pub const AGENT_SECONDS: &str = "agentq_agent_seconds_total";
/// Quota threshold crossings, by tenant and threshold (80, 100).
pub const QUOTA_ALERTS: &str = "agentq_quota_alerts_total";
/// Tenants starting jobs at twice their tier's expected rate, by tenant.
pub const RATE_ALERTS: &str = "agentq_rate_alerts_total";

/// A ledger batch landed: rows inserted, and per-tenant cost and agent time
/// of the records in it.
pub fn ledger_batch(inserted: u64, records: &[crate::ledger::Record]) {
    ::metrics::counter!(LEDGER_ROWS).increment(inserted);
    for r in records {
        let tenant = tenant_label(&r.tenant);
        ::metrics::counter!(COST_MICROS, "tenant" => tenant.clone())
            .increment(r.cost_micros.max(0) as u64);
        ::metrics::counter!(AGENT_SECONDS, "tenant" => tenant)
            .increment((r.run_ms.max(0) / 1000) as u64);
    }
}

/// A ledger batch failed to write.
pub fn ledger_error() {
    ::metrics::counter!(LEDGER_ERRORS).increment(1);
}

/// An outbox entry was kept aside in `usage_ledger_rejects`.
pub fn ledger_reject(reason: crate::ledger::RejectReason) {
    ::metrics::counter!(LEDGER_REJECTS, "reason" => reason.as_str()).increment(1);
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

fn rank_tenants(mut by_load: Vec<(String, i64)>) {
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
pub fn completed(
    queue: &str,
    tenant: &str,
    outcome: &'static str,
    run: Duration,
    status: crate::queue::CompleteStatus,
) {
    use crate::queue::CompleteStatus as S;
    let (q, t) = (queue.to_string(), tenant_label(tenant));
    match status {
        S::Refused => {
            ::metrics::counter!(REFUSED).increment(1);
            return;
        }
        S::Delayed | S::Ready => {
            ::metrics::counter!(RETRIED, "queue" => q.clone(), "tenant" => t.clone()).increment(1)
        }
        S::Dead => ::metrics::counter!(DEAD_LETTERED, "queue" => q.clone(), "tenant" => t.clone())
            .increment(1),
        S::Succeeded => {}
    }
    ::metrics::counter!(COMPLETED, "queue" => q.clone(), "tenant" => t.clone(), "outcome" => outcome).increment(1);
    ::metrics::histogram!(RUN_SECONDS, "queue" => q, "tenant" => t, "outcome" => outcome)
        .record(run.as_secs_f64());
}

/// The reaper returned `n` expired leases to ready.
pub fn lease_expiries(n: u64) {
    ::metrics::counter!(LEASE_EXPIRIES).increment(n);
}

/// Create the fleet-level counters at zero, so `increase()` sees their
/// first event (Prometheus misses a series' first sample otherwise).
pub fn register_zeroes() {
    for name in [REFUSED, LEASE_EXPIRIES, LEDGER_ROWS, LEDGER_ERRORS] {
        ::metrics::counter!(name).increment(0);
    }
    for reason in crate::ledger::RejectReason::ALL {
        ::metrics::counter!(LEDGER_REJECTS, "reason" => reason.as_str()).increment(0);
    }
}

/// This worker's slot use.
pub fn slots(busy: usize, total: usize) {
    ::metrics::gauge!(BUSY_SLOTS).set(busy as f64);
    ::metrics::gauge!(SLOTS).set(total as f64);
}

/// Turn Redis state into gauges every `every`, from one worker at a time
/// across the fleet: the first to take the sampler lock keeps it while it
/// lives (so a stale copy of the gauges exists only on a dead worker), and
/// another takes over within two periods after it dies.
pub async fn sample(queue: Queue, worker: String, every: Duration, stop: CancellationToken) {
    let key = queue.keys(0).key(&["sampler"]);
    let hold = every * 2;
    loop {
        let mine = match queue.client().get::<Option<String>, _>(&key).await {
            Ok(Some(holder)) if holder == worker => {
                let _: Result<bool, _> = queue
                    .client()
                    .pexpire(&key, hold.as_millis() as i64, None)
                    .await;
                true
            }
            Ok(Some(_)) => false,
            Ok(None) => queue
                .client()
                .set::<Option<String>, _, _>(
                    &key,
                    worker.as_str(),
                    Some(Expiration::PX(hold.as_millis() as i64)),
                    Some(SetOptions::NX),
                    false,
                )
                .await
                .is_ok_and(|r| r.is_some()),
            Err(_) => false,
        };
        if mine && let Err(e) = sample_once(&queue).await {
            tracing::debug!(error = %e, "metrics sampling failed");
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

async fn sample_once(queue: &Queue) -> Result<(), crate::queue::QueueError> {
    use crate::queue::inspect;
    for q in inspect::queue_stats(queue).await? {
        for (state, v) in [
            ("ready", q.ready),
            ("delayed", q.delayed),
            ("running", q.running),
            ("dead", q.dead),
        ] {
            ::metrics::gauge!(QUEUE_JOBS, "queue" => q.queue.clone(), "state" => state)
                .set(v as f64);
        }
    }
    let tenants = inspect::tenant_stats(queue, None).await?;
    rank_tenants(
        tenants
            .iter()
            .map(|t| (t.tenant.clone(), t.ready + t.running))
            .collect(),
    );
    let mut held = std::collections::HashMap::from([
        ("concurrency", 0.0),
        ("rate", 0.0),
        ("quota", 0.0),
        ("paused", 0.0),
    ]);
    for t in &tenants {
        let label = tenant_label(&t.tenant);
        ::metrics::gauge!(TENANT_RUNNING, "tenant" => label.clone()).set(t.running as f64);
        ::metrics::gauge!(TENANT_CAP, "tenant" => label.clone()).set(t.cap as f64);
        if t.quota_ms > 0 {
            ::metrics::gauge!(QUOTA_USE, "tenant" => label)
                .set(t.usage_ms as f64 / t.quota_ms as f64);
        }
        let reason = match t.held.as_deref() {
            Some("cap") => Some("concurrency"),
            Some("rate") => Some("rate"),
            Some("quota") => Some("quota"),
            Some("paused") => Some("paused"),
            _ => None,
        };
        if let Some(r) = reason {
            *held.entry(r).or_default() += 1.0;
        }
    }
    for (reason, n) in held {
        ::metrics::gauge!(THROTTLED, "reason" => reason).set(n);
    }
    ::metrics::gauge!(OUTBOX_BACKLOG).set(inspect::outbox_backlog(queue).await? as f64);
    Ok(())
}

/// What `/readyz` checks.
#[derive(Clone)]
pub struct Readiness {
    /// The queue (Redis).
    pub queue: Queue,
    /// The ledger database, if this worker writes it.
    pub db: Option<sqlx::PgPool>,
}

impl Readiness {
    async fn check(&self) -> Result<(), String> {
        let pong: Result<String, _> = self.queue.client().ping(None).await;
        pong.map_err(|e| format!("redis: {e}"))?;
        if let Some(db) = &self.db {
            sqlx::query("SELECT 1")
                .execute(db)
                .await
                .map_err(|e| format!("postgres: {e}"))?;
        }
        Ok(())
    }
}

/// Install the Prometheus recorder and serve `/metrics`, `/healthz`
/// (liveness: the process answers) and `/readyz` (Redis and PostgreSQL
/// answer) on `addr` until `stop`. Returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    ready: Readiness,
    stop: CancellationToken,
) -> std::io::Result<SocketAddr> {
    use axum::{Router, http::StatusCode, routing::get};
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&[
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
            900.0, 3600.0,
        ])
        .and_then(|b| b.install_recorder())
        .map_err(|e| std::io::Error::other(format!("metrics recorder: {e}")))?;
    let ready = Arc::new(ready);
    let app = Router::new()
        .route("/metrics", get(move || std::future::ready(handle.render())))
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.clone();
                async move {
                    match ready.check().await {
                        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
                        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")),
                    }
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "metrics endpoint stopped");
        }
    });
    Ok(bound)
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
