//! Prometheus metric names and the helpers that record them (prefix
//! `agentq_`). Recording goes through the `metrics` facade; the exporter and
//! the bound on tenant label cardinality are set up by the worker's
//! `--metrics-addr` (see the operating issue). Every metric agentq emits is
//! named here, so the set is documented in one place.

/// Ledger rows inserted into PostgreSQL.
pub const LEDGER_ROWS: &str = "agentq_ledger_rows_written_total";
/// Ledger batches that failed to write (PostgreSQL down, ...).
pub const LEDGER_ERRORS: &str = "agentq_ledger_write_errors_total";
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
        let tenant = r.tenant.clone();
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

/// A quota threshold (80 or 100 percent) was crossed.
pub fn quota_alert(tenant: &str, threshold: &'static str) {
    ::metrics::counter!(QUOTA_ALERTS, "tenant" => tenant.to_string(), "threshold" => threshold)
        .increment(1);
}

/// A tenant ran at twice its expected start rate.
pub fn rate_alert(tenant: &str) {
    ::metrics::counter!(RATE_ALERTS, "tenant" => tenant.to_string()).increment(1);
}
