//! Pools, migrations and the monthly partitions of the ledger table.

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use super::LedgerError;

/// Connect to PostgreSQL; `schema` (for tests) becomes the search path.
pub async fn connect(url: &str, schema: Option<&str>) -> Result<PgPool, LedgerError> {
    let mut opts: PgConnectOptions = url.parse()?;
    if let Some(s) = schema {
        opts = opts.options([("search_path", s)]);
    }
    Ok(PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(opts)
        .await?)
}

/// A pool that connects on first use, so a worker starts while PostgreSQL is down.
pub fn connect_lazy(url: &str) -> Result<PgPool, LedgerError> {
    let opts: PgConnectOptions = url.parse()?;
    Ok(PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(opts))
}

/// Apply `migrations/` (idempotent).
pub async fn migrate(pool: &PgPool) -> Result<(), LedgerError> {
    sqlx::migrate!("./migrations").run(pool).await?;
    Ok(())
}

/// Create the ledger partitions of this month and the next `months` (each
/// batch also creates the partitions its rows need).
pub async fn ensure_partitions_ahead(pool: &PgPool, months: i32) -> Result<(), LedgerError> {
    sqlx::query(
        "SELECT agentq_ensure_ledger_partition((now() + make_interval(months => m))::date) \
         FROM generate_series(0, $1) AS m",
    )
    .bind(months)
    .execute(pool)
    .await?;
    Ok(())
}

/// Upsert tiers into the `tiers` table (for billing joins and reports).
pub async fn record_tiers(
    pool: &PgPool,
    tiers: &[crate::model::limits::Tier],
) -> Result<(), LedgerError> {
    for t in tiers {
        let settings = serde_json::to_value(&t.limits).unwrap_or_default();
        sqlx::query(
            "INSERT INTO tiers (name, settings) VALUES ($1, $2) \
             ON CONFLICT (name) DO UPDATE SET settings = excluded.settings, updated_at = now()",
        )
        .bind(&t.name)
        .bind(sqlx::types::Json(settings))
        .execute(pool)
        .await?;
    }
    Ok(())
}
