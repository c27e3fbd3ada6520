//! A test's own PostgreSQL schema ([`TestDb`]), the URL worker processes
//! use to write into it, and the usage-ledger rows the tests read back.

use std::collections::HashMap;

/// The PostgreSQL the tests use.
pub fn database_url() -> String {
    std::env::var("AGENTQ_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A private schema for one test.
pub struct TestDb {
    pub pool: sqlx::PgPool,
    pub admin: sqlx::PgPool,
    pub schema: String,
}

impl TestDb {
    pub async fn new(test: &str) -> TestDb {
        let schema = format!("t_{test}_{:08x}", rand::random::<u32>());
        let admin = agentq::ledger::connect(&database_url(), None)
            .await
            .expect("connect to PostgreSQL (set AGENTQ_DATABASE_URL)");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&admin)
            .await
            .expect("create schema");
        let pool = agentq::ledger::connect(&database_url(), Some(&schema))
            .await
            .expect("connect");
        agentq::ledger::migrate(&pool).await.expect("migrate");
        TestDb {
            pool,
            admin,
            schema,
        }
    }
    pub async fn rows(&self) -> Vec<(String, i32, String)> {
        sqlx::query_as("SELECT job_id, attempt, outcome FROM usage_ledger ORDER BY job_id, attempt")
            .fetch_all(&self.pool)
            .await
            .expect("select")
    }
    pub async fn cleanup(self) {
        self.pool.close().await;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA {} CASCADE",
            self.schema
        )))
        .execute(&self.admin)
        .await
        .expect("drop schema");
    }
}

/// `url` with PostgreSQL's search path set to `schema`, for worker
/// processes that write the ledger into a test's schema.
pub fn database_url_in_schema(url: &str, schema: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options%5Bsearch_path%5D={schema}")
}

impl TestDb {
    /// This schema's URL, for worker processes.
    pub fn url(&self) -> String {
        database_url_in_schema(&database_url(), &self.schema)
    }
}

/// One usage-ledger row, as the fault tests check it.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct LedgerRow {
    pub job_id: String,
    pub attempt: i32,
    pub tenant: String,
    pub outcome: String,
    pub started_ms: i64,
    pub finished_ms: i64,
    pub error: String,
}

/// Every ledger row, or None while PostgreSQL or the table is not there.
pub async fn ledger_rows(pool: &sqlx::PgPool) -> Option<Vec<LedgerRow>> {
    sqlx::query_as(
        "SELECT job_id, attempt, tenant, outcome, error, \
                (extract(epoch FROM started_at) * 1000)::bigint AS started_ms, \
                (extract(epoch FROM finished_at) * 1000)::bigint AS finished_ms \
         FROM usage_ledger ORDER BY job_id, attempt",
    )
    .fetch_all(pool)
    .await
    .ok()
}

/// Most attempts of each tenant holding a slot at once, from
/// `[started, finished)` of its rows.
pub fn peak_overlap_by_tenant(rows: &[LedgerRow]) -> HashMap<String, usize> {
    let mut by: HashMap<String, Vec<(i64, i64)>> = HashMap::new();
    for r in rows {
        by.entry(r.tenant.clone())
            .or_default()
            .push((r.started_ms, r.finished_ms));
    }
    by.into_iter()
        .map(|(t, iv)| (t, super::peak_overlap(&iv)))
        .collect()
}

/// (job id, attempt) of every ledger row.
pub fn row_attempts(rows: &[LedgerRow]) -> Vec<(String, i64)> {
    rows.iter()
        .map(|r| (r.job_id.clone(), i64::from(r.attempt)))
        .collect()
}
