//! The ledger writer: moves usage records from every partition's outbox to
//! the PostgreSQL ledger, exactly once (see [`crate::ledger`]).
//!
//! One pass ([`LedgerWriter::drain_once`]) moves one batch per partition:
//! this writer's own entries left pending by a failure first (`XREADGROUP >`
//! never returns them again), then a dead writer's (taken over after
//! [`LedgerWriterConfig::claim_idle`]), then new ones. Each partition moves
//! on its own: one that cannot be written (its entries stay pending,
//! retried first) does not hold up the others. Entries are deleted and
//! acknowledged only after their rows are in PostgreSQL.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::{ConfigError, pause};
use crate::ledger::{self, Batch, LedgerError, PartitionFailure, Source};
use crate::model::backoff::Pacing;
use crate::model::limits::Tier;
use crate::queue::Queue;
use crate::queue::outbox::{OutboxReader, Read};

/// How the ledger writer works.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LedgerWriterConfig {
    /// Records per batch, one INSERT each (default 2,000: larger batches
    /// amortise the round trips, and the column arrays stay a few hundred
    /// KB).
    pub batch: usize,
    /// Entries pending this long with another writer are taken over
    /// (default 30 s: longer than any batch takes, so a live writer's
    /// entries are left alone).
    pub claim_idle: Duration,
    /// Wait after a pass that found nothing (default 200 ms).
    pub idle_pause: Duration,
}

impl Default for LedgerWriterConfig {
    fn default() -> Self {
        LedgerWriterConfig {
            batch: 2000,
            claim_idle: Duration::from_secs(30),
            idle_pause: Duration::from_millis(200),
        }
    }
}

impl LedgerWriterConfig {
    /// Check the ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |problem: &str| {
            Err(ConfigError {
                duty: "ledger writer",
                problem: problem.to_string(),
            })
        };
        if !(1..=100_000).contains(&self.batch) {
            return bad("batch must be 1..=100000 records");
        }
        if self.claim_idle.is_zero() {
            return bad("claim_idle must be above zero, for example 30s");
        }
        Ok(())
    }
}

/// Moves outbox records to PostgreSQL; one per worker.
pub struct LedgerWriter {
    /// Its settings.
    pub config: LedgerWriterConfig,
    /// Tiers recorded in the `tiers` table once migrations are applied.
    pub tiers: Vec<Tier>,
    queue: Queue,
    pool: PgPool,
    consumer: String,
    outbox: OutboxReader,
    /// Per partition: set when a batch failed, so this writer has entries
    /// of that partition pending to retry (one flag for all let a partition
    /// with nothing pending clear another's, whose entries then waited
    /// `claim_idle` for `XAUTOCLAIM`).
    retry_own: Vec<AtomicBool>,
    /// When each partition was last checked for a dead writer's entries.
    reclaimed: Mutex<HashMap<u32, Instant>>,
}

impl LedgerWriter {
    /// A writer reading as consumer `consumer` (the worker id), with the
    /// default [`LedgerWriterConfig`].
    pub fn new(queue: Queue, pool: PgPool, consumer: impl Into<String>) -> Self {
        let consumer = consumer.into();
        LedgerWriter {
            config: LedgerWriterConfig::default(),
            tiers: Vec::new(),
            retry_own: (0..queue.partitions())
                .map(|_| AtomicBool::new(false))
                .collect(),
            reclaimed: Mutex::new(HashMap::new()),
            outbox: OutboxReader::new(queue.clone(), consumer.clone()),
            queue,
            pool,
            consumer,
        }
    }

    /// Run until `shutdown`: apply the migrations once, then drain every
    /// partition's outbox; errors (Redis or PostgreSQL down) are logged and
    /// retried with the shared pacing.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut pacing = Pacing::default();
        let mut migrated = false;
        while !shutdown.is_cancelled() {
            let step = async {
                if !migrated {
                    ledger::migrate(&self.pool).await?;
                    ledger::record_tiers(&self.pool, &self.tiers).await?;
                    ledger::ensure_partitions_ahead(&self.pool, 2).await?;
                    migrated = true;
                    tracing::info!(consumer = %self.consumer, "ledger writer ready: migrations applied");
                }
                self.run_once().await
            };
            let wait = match step.await {
                Ok(n) if n > 0 => {
                    pacing.reset();
                    continue;
                }
                Ok(_) => {
                    // Idle: refresh the cost forecast gauges (once a minute).
                    if let Err(e) = crate::usage::publish_forecast(&self.pool).await {
                        tracing::debug!(error = %e, "cost forecast not refreshed");
                    }
                    self.config.idle_pause
                }
                Err(e) => {
                    let wait = pacing.next_delay();
                    tracing::warn!(error = %e, retry_in = ?wait, "ledger write failed; records stay in the outbox");
                    wait
                }
            };
            if pause(wait, &shutdown).await {
                return;
            }
        }
    }

    /// Move one batch per partition; returns the records handled. Every
    /// partition is tried: one that fails (its entries stay pending, retried
    /// first next time) does not hold up the others. Fails, after trying
    /// them all, if any failed, so that [`run`](Self::run) backs off.
    pub async fn run_once(&self) -> Result<usize, LedgerError> {
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
        let batch = self.next_batch(p).await?;
        if batch.ids.is_empty() {
            return Ok(0);
        }
        let key = self.outbox.key(p);
        let from = Source {
            stream: &key,
            partition: p,
        };
        let inserted = ledger::write(&self.pool, &from, &batch)
            .await
            .inspect_err(|_| crate::metrics::ledger_error())?;
        self.outbox.ack(p, &batch.ids).await?;
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
    async fn next_batch(&self, p: u32) -> Result<Batch, LedgerError> {
        let reclaim = Read::Reclaim(self.config.claim_idle);
        for from in [Read::OwnPending, reclaim, Read::New] {
            if from == Read::OwnPending && !self.retry_own_due(p) {
                continue;
            }
            if from == reclaim && !self.reclaim_due(p) {
                continue;
            }
            let entries = self.outbox.read(p, from, self.config.batch).await?;
            let batch = Batch::from_entries(entries);
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

    /// Whether partition `p` is due a look for a dead writer's entries: a
    /// quarter of `claim_idle` apart, so a busy writer does not pay an
    /// `XAUTOCLAIM` round trip per batch.
    fn reclaim_due(&self, p: u32) -> bool {
        let now = Instant::now();
        let Ok(mut last) = self.reclaimed.lock() else {
            return true;
        };
        match last.get(&p) {
            Some(t) if now.duration_since(*t) < self.config.claim_idle / 4 => false,
            _ => {
                last.insert(p, now);
                true
            }
        }
    }
}
