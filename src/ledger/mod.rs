//! The usage ledger: moves attempt records from the Redis outbox stream into
//! PostgreSQL, exactly once.
//!
//! Every attempt's end appends one record to `B:outbox` in the same script as
//! the ack (see `lib.lua`, `outbox()`). A [`LedgerWriter`] in each worker
//! reads the stream through the consumer group `ledger`, inserts a batch with
//! one multi-row `INSERT ... ON CONFLICT DO NOTHING` (unique per job id and
//! attempt), and only then acknowledges and deletes the entries. A crash
//! between insert and ack replays the batch, which inserts nothing new;
//! entries held by a writer that died are taken over after
//! [`LedgerWriter::claim_idle`] via `XAUTOCLAIM`. PostgreSQL being down only
//! delays the ledger: records wait in the stream. A record PostgreSQL
//! refuses, or an entry that is not a record, never holds the stream up: it
//! is repaired where possible and kept in `usage_ledger_rejects` (see
//! `rejects.rs`). Each partition's stream moves on its own: one that cannot
//! be written (its entries stay pending with the writer, retried first)
//! does not hold up the others.

mod rejects;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::Datelike;
use fred::prelude::*;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio_util::sync::CancellationToken;

use crate::queue::{Queue, QueueError};
pub use rejects::RejectReason;
use rejects::{Hint, Problem, Raw, Source, Unfit};

/// Consumer group name on the outbox stream.
pub const GROUP: &str = "ledger";

/// Ledger errors.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// PostgreSQL failed or is unreachable.
    #[error("postgres: {0}")]
    Db(#[from] sqlx::Error),
    /// Applying migrations failed.
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// Redis failed.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// Some partitions' outboxes could not be written (every one was tried).
    #[error("{}", each_partition(failures))]
    Partitions {
        /// Each partition that failed, and why.
        failures: Vec<PartitionFailure>,
    },
}

/// A partition whose outbox could not be written in one pass.
#[derive(Debug)]
pub struct PartitionFailure {
    /// The partition.
    pub partition: u32,
    /// Why.
    pub error: LedgerError,
}

/// "partition 0: why; partition 3: why".
fn each_partition(failures: &[PartitionFailure]) -> String {
    let each: Vec<String> = failures
        .iter()
        .map(|f| format!("partition {}: {}", f.partition, f.error))
        .collect();
    each.join("; ")
}

impl From<fred::error::Error> for LedgerError {
    fn from(e: fred::error::Error) -> Self {
        LedgerError::Queue(e.into())
    }
}

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

/// Upsert tiers into the `tiers` table (for billing joins and reports).
pub async fn record_tiers(
    pool: &PgPool,
    tiers: &[crate::admission::Tier],
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

/// Order of the values in a packed outbox entry (`lib.lua`, `outbox()`);
/// the worker id is last so that nothing it contains can shift the others.
pub const PACKED_FIELDS: [&str; 20] = [
    "job",
    "attempt",
    "tenant",
    "queue",
    "kind",
    "outcome",
    "enqueued_at",
    "started_at",
    "finished_at",
    "wait_ms",
    "run_ms",
    "cpu_ms",
    "peak_rss",
    "exit_code",
    "signal",
    "api_calls",
    "input_tokens",
    "output_tokens",
    "cost_micros",
    "worker",
];

/// An outbox entry's fields by name (`job`, `attempt`, ..., `error`), whether
/// the entry is packed or written by an earlier version field by field.
pub fn outbox_fields(mut f: HashMap<String, String>) -> HashMap<String, String> {
    match f.remove("r") {
        Some(packed) => unpack(&packed, f.get("e").map_or("", |e| e.as_str())),
        None => f,
    }
}

fn unpack(packed: &str, error: &str) -> HashMap<String, String> {
    let mut f: HashMap<String, String> = PACKED_FIELDS
        .iter()
        .zip(packed.splitn(PACKED_FIELDS.len(), '\t'))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    f.insert("error".into(), error.to_string());
    f
}

/// One attempt's usage record, as stored in the outbox and the ledger.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    /// Job id.
    pub job_id: String,
    /// Attempt number.
    pub attempt: i32,
    /// Tenant.
    pub tenant: String,
    /// Queue.
    pub queue: String,
    /// Kind.
    pub kind: String,
    /// Outcome.
    pub outcome: String,
    /// Times, ms since the epoch (Redis clock).
    pub enqueued_at: i64,
    /// Start of the attempt.
    pub started_at: i64,
    /// End of the attempt (when its slot was released).
    pub finished_at: i64,
    /// Wait from ready to start.
    pub wait_ms: i64,
    /// Wall time of the attempt.
    pub run_ms: i64,
    /// CPU time.
    pub cpu_ms: i64,
    /// Peak RSS.
    pub peak_rss_bytes: i64,
    /// Exit code.
    pub exit_code: Option<i32>,
    /// Signal.
    pub signal: Option<i32>,
    /// Worker id.
    pub worker: String,
    /// Reported API calls.
    pub api_calls: i64,
    /// Reported input tokens.
    pub input_tokens: i64,
    /// Reported output tokens.
    pub output_tokens: i64,
    /// Price of the attempt at its tenant's rates, micro-dollars.
    pub cost_micros: i64,
    /// Error text.
    pub error: String,
}

impl Record {
    /// Parse an outbox entry's fields; None if the entry is malformed.
    ///
    /// Entries are packed (`r`: the values in [`PACKED_FIELDS`] order joined
    /// by tabs, worker id last; `e`: the error text), one field per entry
    /// being far cheaper for the completing script than 21. Entries written
    /// by earlier versions, one stream field per record field, still parse.
    pub fn from_fields(f: &HashMap<String, String>) -> Option<Record> {
        match f.get("r") {
            Some(packed) => Self::from_packed(packed, f.get("e").map_or("", |e| e.as_str())),
            None => Self::from_named(f),
        }
    }

    fn from_packed(packed: &str, error: &str) -> Option<Record> {
        let f = unpack(packed, error);
        if f.len() != PACKED_FIELDS.len() + 1 {
            return None;
        }
        Self::from_named(&f)
    }

    fn from_named(f: &HashMap<String, String>) -> Option<Record> {
        let n = |k: &str| f.get(k).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
        let opt = |k: &str| f.get(k).and_then(|v| v.parse::<i32>().ok());
        let s = |k: &str| f.get(k).cloned().unwrap_or_default();
        let r = Record {
            job_id: f.get("job")?.clone(),
            attempt: f.get("attempt")?.parse().ok()?,
            tenant: s("tenant"),
            queue: s("queue"),
            kind: s("kind"),
            outcome: f.get("outcome")?.clone(),
            enqueued_at: n("enqueued_at"),
            started_at: n("started_at"),
            finished_at: n("finished_at"),
            wait_ms: n("wait_ms"),
            run_ms: n("run_ms"),
            cpu_ms: n("cpu_ms"),
            peak_rss_bytes: n("peak_rss"),
            exit_code: opt("exit_code"),
            signal: opt("signal"),
            worker: s("worker"),
            api_calls: n("api_calls"),
            input_tokens: n("input_tokens"),
            output_tokens: n("output_tokens"),
            cost_micros: n("cost_micros"),
            error: s("error"),
        };
        (r.attempt >= 1).then_some(r)
    }
}

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
    // per connection) and a batch binds 21 values instead of 21 per row.
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
     input_tokens, output_tokens, cost_micros, error) \
     SELECT * FROM UNNEST($1::text[], $2::int4[], $3::text[], $4::text[], $5::text[], $6::text[], \
     $7::timestamptz[], $8::timestamptz[], $9::timestamptz[], $10::int8[], $11::int8[], $12::int8[], \
     $13::int8[], $14::int4[], $15::int4[], $16::text[], $17::int8[], $18::int8[], $19::int8[], \
     $20::int8[], $21::text[])",
    ROLLUP_SQL!()
);

/// Moves outbox records to PostgreSQL; one per worker.
pub struct LedgerWriter {
    queue: Queue,
    pool: PgPool,
    consumer: String,
    /// Records per batch (one INSERT each; 2000 by default: larger batches
    /// amortise the round trips, and the arrays stay a few hundred KB).
    pub batch: usize,
    /// Entries pending this long with a consumer are taken over.
    pub claim_idle: Duration,
    /// Tiers recorded in the `tiers` table once migrations are applied.
    pub tiers: Vec<crate::admission::Tier>,
    /// Per partition: set when a batch failed, so this writer has entries
    /// of that partition pending to retry (one flag for all let a partition
    /// with nothing pending clear another's, whose entries then waited
    /// `claim_idle` for `XAUTOCLAIM`).
    retry_own: Vec<AtomicBool>,
    /// Outbox streams whose consumer group this writer has made sure of
    /// (forgotten on `NOGROUP`, e.g. after Redis lost its data).
    groups: std::sync::Mutex<BTreeSet<String>>,
    /// When each partition was last checked for a dead writer's entries.
    reclaimed: std::sync::Mutex<HashMap<u32, std::time::Instant>>,
}

/// Where a batch is read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Read {
    /// This writer's own unacknowledged entries (after a failed insert).
    OwnPending,
    /// Entries idle with another (dead) writer.
    Reclaim,
    /// New entries.
    New,
}

/// A batch read from one partition's outbox.
#[derive(Default)]
struct Batch {
    /// Every id read: all are acknowledged once the batch is handled.
    ids: Vec<String>,
    /// The records read from valid UTF-8, to insert as they are.
    records: Vec<Record>,
    /// The entry each record was read from, in the same order.
    raws: Vec<Raw>,
    /// Entries that cannot be inserted as they are.
    unfit: Vec<Unfit>,
}

impl LedgerWriter {
    /// A writer reading as consumer `consumer` (the worker id).
    pub fn new(queue: Queue, pool: PgPool, consumer: impl Into<String>) -> Self {
        LedgerWriter {
            pool,
            consumer: consumer.into(),
            batch: 2000,
            claim_idle: Duration::from_secs(30),
            tiers: Vec::new(),
            retry_own: (0..queue.partitions())
                .map(|_| AtomicBool::new(false))
                .collect(),
            groups: std::sync::Mutex::new(BTreeSet::new()),
            reclaimed: std::sync::Mutex::new(HashMap::new()),
            queue,
        }
    }

    /// Run until `stop`, draining every partition's outbox; errors (Redis or
    /// PostgreSQL down) are logged and retried with backoff.
    pub async fn run(self, stop: CancellationToken) {
        let mut wait = Duration::from_millis(100);
        let mut migrated = false;
        while !stop.is_cancelled() {
            let step = async {
                if !migrated {
                    migrate(&self.pool).await?;
                    record_tiers(&self.pool, &self.tiers).await?;
                    ensure_partitions_ahead(&self.pool, 2).await?;
                    migrated = true;
                    tracing::info!(consumer = %self.consumer, "ledger writer ready: migrations applied");
                }
                self.drain_once().await
            };
            let pause = match step.await {
                Ok(n) if n > 0 => {
                    wait = Duration::from_millis(100);
                    continue;
                }
                Ok(_) => Duration::from_millis(200),
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?wait, "ledger write failed; records stay in the outbox");
                    wait = (wait * 2).min(Duration::from_secs(5));
                    wait
                }
            };
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Move one batch per partition; returns the records handled. Every
    /// partition is tried: one that fails (its entries stay pending, retried
    /// first next time) does not hold up the others. Fails, after trying
    /// them all, if any failed, so that [`run`](Self::run) backs off.
    pub async fn drain_once(&self) -> Result<usize, LedgerError> {
        let mut total = 0;
        let mut failures = Vec::new();
        for p in 0..self.queue.partitions() {
            match self.drain_partition(p).await {
                Ok(n) => total += n,
                Err(error) => {
                    self.set_retry_own(p, true);
                    failures.push(PartitionFailure {
                        partition: p,
                        error,
                    });
                }
            }
        }
        if failures.is_empty() {
            Ok(total)
        } else {
            Err(LedgerError::Partitions { failures })
        }
    }

    /// Move one batch of partition `p`'s outbox; returns the entries handled.
    async fn drain_partition(&self, p: u32) -> Result<usize, LedgerError> {
        let key = self.queue.keys(p).key(&["outbox"]);
        self.ensure_group(&key).await?;
        let batch = self.next_batch(p, &key).await?;
        if batch.ids.is_empty() {
            return Ok(0);
        }
        let from = Source {
            stream: &key,
            partition: p,
        };
        let inserted = rejects::write(&self.pool, &from, &batch.records, &batch.raws, &batch.unfit)
            .await
            .inspect_err(|_| crate::metrics::ledger_error())?;
        let client = self.queue.client();
        // Delete before acknowledging: a writer killed in between leaves
        // pending ids with no body, which the next read acknowledges
        // (XAUTOCLAIM drops them itself), so nothing stays in the stream.
        let _: i64 = client.xdel(&key, batch.ids.clone()).await?;
        let _: i64 = client.xack(&key, GROUP, batch.ids.clone()).await?;
        tracing::debug!(
            partition = p,
            read = batch.ids.len(),
            inserted,
            "ledger batch written"
        );
        Ok(batch.ids.len())
    }

    /// The next batch of partition `p`: this writer's own entries left
    /// pending by a failure first (`XREADGROUP >` never returns them again),
    /// then a dead writer's, then new ones.
    async fn next_batch(&self, p: u32, key: &str) -> Result<Batch, LedgerError> {
        for from in [Read::OwnPending, Read::Reclaim, Read::New] {
            if from == Read::OwnPending && !self.retry_own_due(p) {
                continue;
            }
            if from == Read::Reclaim && !self.reclaim_due(p) {
                continue;
            }
            let batch = self.read(key, from).await.inspect_err(|e| {
                if e.to_string().contains("NOGROUP") {
                    self.forget_group(key);
                }
            })?;
            if from == Read::OwnPending && batch.ids.is_empty() {
                self.set_retry_own(p, false);
            }
            if !batch.ids.is_empty() {
                return Ok(batch);
            }
        }
        Ok(Batch::default())
    }

    /// Whether partition `p` may have entries pending with this writer
    /// since a failure.
    fn retry_own_due(&self, p: u32) -> bool {
        let flag = self.retry_own.get(p as usize);
        flag.is_none_or(|f| f.load(Ordering::Relaxed))
    }

    fn set_retry_own(&self, p: u32, on: bool) {
        if let Some(f) = self.retry_own.get(p as usize) {
            f.store(on, Ordering::Relaxed);
        }
    }

    async fn ensure_group(&self, key: &str) -> Result<(), LedgerError> {
        if self.groups.lock().is_ok_and(|g| g.contains(key)) {
            return Ok(());
        }
        let r: Result<(), fred::error::Error> = self
            .queue
            .client()
            .xgroup_create(key, GROUP, "0", true)
            .await;
        match r {
            Err(e) if !e.details().contains("BUSYGROUP") => Err(e.into()),
            _ => {
                if let Ok(mut g) = self.groups.lock() {
                    g.insert(key.to_string());
                }
                Ok(())
            }
        }
    }

    fn forget_group(&self, key: &str) {
        if let Ok(mut g) = self.groups.lock() {
            g.remove(key);
        }
    }

    /// Whether partition `p` is due a look for a dead writer's entries: a
    /// quarter of `claim_idle` apart, so a busy writer does not pay an
    /// `XAUTOCLAIM` round trip per batch.
    fn reclaim_due(&self, p: u32) -> bool {
        let now = std::time::Instant::now();
        let Ok(mut last) = self.reclaimed.lock() else {
            return true;
        };
        match last.get(&p) {
            Some(t) if now.duration_since(*t) < self.claim_idle / 4 => false,
            _ => {
                last.insert(p, now);
                true
            }
        }
    }

    /// Read a batch: own pending entries, another consumer's idle ones, or new ones.
    async fn read(&self, key: &str, from: Read) -> Result<Batch, LedgerError> {
        let client = self.queue.client();
        let count = self.batch.to_string();
        let v: Value = if from == Read::Reclaim {
            let idle = self.claim_idle.as_millis().to_string();
            let args: Vec<Value> = vec![
                key.into(),
                GROUP.into(),
                self.consumer.as_str().into(),
                idle.into(),
                "0-0".into(),
                "COUNT".into(),
                count.into(),
            ];
            let reply: Value = client.custom(fred::cmd!("XAUTOCLAIM"), args).await?;
            match reply {
                Value::Array(mut parts) if parts.len() >= 2 => parts.swap_remove(1),
                _ => Value::Null,
            }
        } else {
            let args: Vec<Value> = vec![
                "GROUP".into(),
                GROUP.into(),
                self.consumer.as_str().into(),
                "COUNT".into(),
                count.into(),
                "STREAMS".into(),
                key.into(),
                if from == Read::OwnPending { "0" } else { ">" }.into(),
            ];
            // Route by the stream key: by default a custom command is sent to
            // the slot of its first string argument, here "GROUP".
            let on_key = fred::types::ClusterHash::from(key);
            let reply: Value = client
                .custom(fred::cmd!("XREADGROUP", hash: on_key), args)
                .await?;
            // [[key, [entries...]]] (RESP2) or {key: [entries]} (RESP3)
            match reply {
                Value::Array(mut streams) if !streams.is_empty() => match streams.swap_remove(0) {
                    Value::Array(mut kv) if kv.len() == 2 => kv.swap_remove(1),
                    _ => Value::Null,
                },
                Value::Map(m) => m.inner().into_values().next().unwrap_or(Value::Null),
                _ => Value::Null,
            }
        };
        Ok(parse_entries(v))
    }
}

/// Parse `[[id, [field, value, ...]], ...]`. Pending ids whose entry was
/// already deleted are kept as ids with no record, so they are acknowledged
/// instead of blocking the stream forever.
fn parse_entries(v: Value) -> Batch {
    let mut batch = Batch::default();
    let Value::Array(entries) = v else {
        return batch;
    };
    for e in entries {
        let Value::Array(mut pair) = e else { continue };
        if pair.len() != 2 {
            continue;
        }
        let fields = pair.pop().unwrap_or(Value::Null);
        let Some(id) = pair.pop().and_then(|i| i.as_string()) else {
            continue;
        };
        batch.ids.push(id.clone());
        match fields {
            // written to the ledger and deleted by a writer that died before XACK
            Value::Null => {}
            Value::Array(fields) => batch.add(Raw { id, fields }),
            other => batch.add(Raw {
                id,
                fields: vec![other],
            }),
        }
    }
    batch
}

impl Batch {
    /// Sort one entry: a record to insert, or an entry to repair or set aside.
    fn add(&mut self, raw: Raw) {
        let mut utf8 = true;
        let mut named = HashMap::new();
        for kv in raw.fields.chunks(2) {
            if let [k, v] = kv {
                named.insert(text(k, &mut utf8), text(v, &mut utf8));
            }
        }
        let problem = match Record::from_fields(&named) {
            Some(r) if utf8 => {
                self.records.push(r);
                self.raws.push(raw);
                return;
            }
            Some(r) => Problem::NotUtf8(r),
            None => Problem::Malformed {
                why: why_malformed(&named),
                hint: Hint::of_fields(&outbox_fields(named)),
            },
        };
        self.unfit.push(Unfit { raw, problem });
    }
}

/// A stream field as text; invalid UTF-8 is replaced (and `utf8` cleared).
fn text(v: &Value, utf8: &mut bool) -> String {
    let Some(b) = v.as_bytes() else {
        return v.as_string().unwrap_or_default();
    };
    match std::str::from_utf8(b) {
        Ok(s) => s.to_string(),
        Err(_) => {
            *utf8 = false;
            String::from_utf8_lossy(b).into_owned()
        }
    }
}

/// Why an entry's fields are not a usage record, for the rejects table.
fn why_malformed(fields: &HashMap<String, String>) -> String {
    let want = PACKED_FIELDS.len();
    if let Some(packed) = fields.get("r") {
        let n = packed.splitn(want, '\t').count();
        if n < want {
            return format!("malformed outbox entry: {n} of {want} packed values");
        }
    }
    let named = outbox_fields(fields.clone());
    let attempt = named.get("attempt").and_then(|a| a.parse::<i32>().ok());
    if !named.contains_key("job") {
        "malformed outbox entry: no job id".into()
    } else if attempt.is_none_or(|a| a < 1) {
        format!(
            "malformed outbox entry: attempt {:?} is not a number of 1 or more",
            named.get("attempt").map_or("", |a| a.as_str())
        )
    } else {
        "malformed outbox entry: no outcome".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packed(worker: &str) -> HashMap<String, String> {
        let values = [
            "0-1a", "2", "acme", "q", "echo", "failed", "1000", "1500", "1700", "5", "200", "30",
            "4096", "1", "", "0", "10", "20", "33", worker,
        ];
        HashMap::from([
            ("r".to_string(), values.join("\t")),
            ("e".to_string(), "exit 1\twith a tab".to_string()),
        ])
    }

    #[test]
    fn packed_entries_parse_with_the_worker_last() {
        let r = Record::from_fields(&packed("host-1\tweird")).expect("parses");
        assert_eq!((r.job_id.as_str(), r.attempt), ("0-1a", 2));
        assert_eq!((r.tenant.as_str(), r.outcome.as_str()), ("acme", "failed"));
        assert_eq!((r.started_at, r.finished_at, r.run_ms), (1500, 1700, 200));
        assert_eq!((r.exit_code, r.signal, r.cost_micros), (Some(1), None, 33));
        assert_eq!(r.worker, "host-1\tweird");
        assert_eq!(r.error, "exit 1\twith a tab");
    }

    #[test]
    fn short_packed_entries_are_malformed_and_named_ones_still_parse() {
        let short = HashMap::from([("r".to_string(), "0-1a\t2\tacme".to_string())]);
        assert!(Record::from_fields(&short).is_none());
        let named = outbox_fields(packed("w"));
        assert_eq!(named.get("tenant").map(String::as_str), Some("acme"));
        let legacy = Record::from_fields(&named).expect("field-per-field entries parse");
        assert_eq!(legacy.attempt, 2);
    }
}
