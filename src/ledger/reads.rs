//! Reading ledger rows back (inspect, reports).

use sqlx::PgPool;

use super::LedgerError;

/// One ledger row as shown by `agentq inspect`.
#[derive(Clone, Debug, serde::Serialize, sqlx::FromRow)]
pub struct Row {
    /// Attempt number.
    pub attempt: i32,
    /// Outcome.
    pub outcome: String,
    /// Start (RFC 3339, ms).
    pub started_at: String,
    /// End (RFC 3339, ms).
    pub finished_at: String,
    /// Wait before the start, ms.
    pub wait_ms: i64,
    /// Wall time, ms.
    pub run_ms: i64,
    /// CPU time, ms.
    pub cpu_ms: i64,
    /// Peak RSS, bytes.
    pub peak_rss_bytes: i64,
    /// Exit code.
    pub exit_code: Option<i32>,
    /// Signal.
    pub signal: Option<i32>,
    /// Worker.
    pub worker: String,
    /// Reported API calls.
    pub api_calls: i64,
    /// Reported input tokens.
    pub input_tokens: i64,
    /// Reported output tokens.
    pub output_tokens: i64,
    /// Cost, micro-dollars.
    pub cost_micros: i64,
}

/// The ledger rows of one job, by attempt.
pub async fn rows_for_job(pool: &PgPool, job_id: &str) -> Result<Vec<Row>, LedgerError> {
    Ok(sqlx::query_as(
        "SELECT attempt, outcome,
            to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS started_at,
            to_char(finished_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS finished_at,
            wait_ms, run_ms, cpu_ms, peak_rss_bytes, exit_code, signal, worker, api_calls, input_tokens,
            output_tokens, cost_micros
         FROM usage_ledger WHERE job_id = $1 ORDER BY attempt",
    )
    .bind(job_id)
    .fetch_all(pool)
    .await?)
}
