//! Inserting a batch of records: one statement for the whole batch (column
//! arrays through `UNNEST`, prepared once per connection), skipping rows
//! already present (unique per job, attempt and finish time), and folding
//! only the rows actually inserted into the daily rollup, so a replay
//! changes neither table. Each month's partition is made sure of once per
//! process.

use std::collections::BTreeSet;

use chrono::Datelike;
use sqlx::PgPool;

use super::{LedgerError, Record};

fn ts(ms: i64) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

// The rest of `insert`'s statement: rollup and tenants from the rows
// actually inserted. Ordered so concurrent writers lock rollup rows in the
// same order (no deadlock).
macro_rules! ROLLUP_SQL {
    () => {
        " ON CONFLICT DO NOTHING
    RETURNING tenant, finished_at, outcome, run_ms, cpu_ms, peak_rss_bytes, api_calls, input_tokens,
              output_tokens, cost_micros),
roll AS (
    INSERT INTO usage_daily AS d (tenant, day, attempts, succeeded, failed, timed_out, memory_exceeded, lost,
        agent_ms, cpu_ms, peak_rss_bytes, api_calls, input_tokens, output_tokens, cost_micros)
    SELECT tenant, (finished_at AT TIME ZONE 'UTC')::date, count(*),
        count(*) FILTER (WHERE outcome = 'succeeded'), count(*) FILTER (WHERE outcome = 'failed'),
        count(*) FILTER (WHERE outcome = 'timed_out'), count(*) FILTER (WHERE outcome = 'memory_exceeded'),
        count(*) FILTER (WHERE outcome = 'lost'), sum(run_ms)::bigint, sum(cpu_ms)::bigint,
        max(peak_rss_bytes), sum(api_calls)::bigint, sum(input_tokens)::bigint, sum(output_tokens)::bigint,
        sum(cost_micros)::bigint
    FROM ins GROUP BY 1, 2 ORDER BY 1, 2
    ON CONFLICT (tenant, day) DO UPDATE SET
        attempts = d.attempts + excluded.attempts, succeeded = d.succeeded + excluded.succeeded,
        failed = d.failed + excluded.failed, timed_out = d.timed_out + excluded.timed_out,
        memory_exceeded = d.memory_exceeded + excluded.memory_exceeded, lost = d.lost + excluded.lost,
        agent_ms = d.agent_ms + excluded.agent_ms, cpu_ms = d.cpu_ms + excluded.cpu_ms,
        peak_rss_bytes = greatest(d.peak_rss_bytes, excluded.peak_rss_bytes),
        api_calls = d.api_calls + excluded.api_calls, input_tokens = d.input_tokens + excluded.input_tokens,
        output_tokens = d.output_tokens + excluded.output_tokens, cost_micros = d.cost_micros + excluded.cost_micros),
ten AS (INSERT INTO tenants (name) SELECT DISTINCT tenant FROM ins ORDER BY 1 ON CONFLICT DO NOTHING)
SELECT count(*) FROM ins"
    };
}

/// Insert records and fold the ones actually inserted into `usage_daily`, in
/// one statement; rows already present are skipped (so a replay changes
/// neither table). Returns rows inserted.
pub async fn insert(pool: &PgPool, records: &[Record]) -> Result<u64, LedgerError> {
    if records.is_empty() {
        return Ok(0);
    }
    ensure_months(pool, records).await?;
    // One array per column: the statement text never changes (prepared once
    // per connection) and a batch binds 22 values instead of 22 per row.
    let col = |f: fn(&Record) -> String| records.iter().map(f).collect::<Vec<_>>();
    let int = |f: fn(&Record) -> i64| records.iter().map(f).collect::<Vec<_>>();
    let at = |f: fn(&Record) -> i64| records.iter().map(|r| ts(f(r))).collect::<Vec<_>>();
    let inserted: i64 = sqlx::query_scalar(INSERT)
        .bind(col(|r| r.job_id.clone()))
        .bind(records.iter().map(|r| r.attempt).collect::<Vec<_>>())
        .bind(col(|r| r.tenant.clone()))
        .bind(col(|r| r.queue.clone()))
        .bind(col(|r| r.kind.clone()))
        .bind(col(|r| r.outcome.clone()))
        .bind(at(|r| r.enqueued_at))
        .bind(at(|r| r.started_at))
        .bind(at(|r| r.finished_at))
        .bind(int(|r| r.wait_ms))
        .bind(int(|r| r.run_ms))
        .bind(int(|r| r.cpu_ms))
        .bind(int(|r| r.peak_rss_bytes))
        .bind(records.iter().map(|r| r.exit_code).collect::<Vec<_>>())
        .bind(records.iter().map(|r| r.signal).collect::<Vec<_>>())
        .bind(col(|r| r.worker.clone()))
        .bind(int(|r| r.api_calls))
        .bind(int(|r| r.input_tokens))
        .bind(int(|r| r.output_tokens))
        .bind(int(|r| r.cost_micros))
        .bind(col(|r| r.error.clone()))
        .bind(col(|r| r.billing.clone()))
        .fetch_one(pool)
        .await?;
    Ok(inserted.max(0) as u64)
}

/// Make sure each month the records finish in has its ledger partition,
/// asking PostgreSQL once per month per process.
async fn ensure_months(pool: &PgPool, records: &[Record]) -> Result<(), LedgerError> {
    static ENSURED: std::sync::Mutex<BTreeSet<(String, chrono::NaiveDate)>> =
        std::sync::Mutex::new(BTreeSet::new());
    let o = pool.connect_options();
    // Partitions live in a schema of a database: tests use many schemas.
    let db = format!(
        "{}:{}/{}?{}",
        o.get_host(),
        o.get_port(),
        o.get_database().unwrap_or(""),
        o.get_options().unwrap_or("")
    );
    let mut months: BTreeSet<chrono::NaiveDate> = BTreeSet::new();
    for r in records {
        let d = ts(r.finished_at).date_naive();
        months.insert(d.with_day(1).unwrap_or(d));
    }
    for m in months {
        let key = (db.clone(), m);
        if ENSURED.lock().map(|s| s.contains(&key)).unwrap_or(false) {
            continue;
        }
        sqlx::query("SELECT agentq_ensure_ledger_partition($1)")
            .bind(m)
            .execute(pool)
            .await?;
        if let Ok(mut s) = ENSURED.lock() {
            s.insert(key);
        }
    }
    Ok(())
}

/// [`insert`]'s statement: the batch as column arrays, then the rollup.
const INSERT: &str = concat!(
    "WITH ins AS (INSERT INTO usage_ledger (job_id, attempt, tenant, queue, kind, outcome, enqueued_at, \
     started_at, finished_at, wait_ms, run_ms, cpu_ms, peak_rss_bytes, exit_code, signal, worker, api_calls, \
     input_tokens, output_tokens, cost_micros, error, billing) \
     SELECT * FROM UNNEST($1::text[], $2::int4[], $3::text[], $4::text[], $5::text[], $6::text[], \
     $7::timestamptz[], $8::timestamptz[], $9::timestamptz[], $10::int8[], $11::int8[], $12::int8[], \
     $13::int8[], $14::int4[], $15::int4[], $16::text[], $17::int8[], $18::int8[], $19::int8[], \
     $20::int8[], $21::text[], $22::text[])",
    ROLLUP_SQL!()
);
