//! The usage ledger in PostgreSQL: one row per attempt, written exactly once.
//!
//! Every attempt's end appends one record to its partition's outbox stream
//! in the same script as the ack (`lib.lua`, `outbox()`; the format is
//! [`crate::model::record`]). The ledger writer duty
//! ([`crate::duties::ledger_writer`]) reads a batch through the consumer
//! group `ledger` ([`crate::queue::outbox`]), inserts it here with one
//! statement that skips rows already present ([`insert`]), and only then
//! deletes and acknowledges the entries, so a crash in between replays a
//! batch that inserts nothing new. PostgreSQL being down only delays the
//! ledger: records wait in the stream. A record PostgreSQL refuses, or an
//! entry that is not a record, never holds the stream up: it is repaired
//! where possible and kept in `usage_ledger_rejects` ([`rejects`]).
//!
//! Files: `connect` (pools, migrations, monthly partitions), `insert` (the
//! batch statement and the daily rollup), `batch` (sorting read entries into
//! records and unfit ones), `rejects` (splitting and setting aside),
//! `reads` (rows for inspect and reports).

mod batch;
mod connect;
mod insert;
mod reads;
pub mod rejects;

use crate::queue::QueueError;

pub use batch::Batch;
pub use connect::{connect, connect_lazy, ensure_partitions_ahead, migrate, record_tiers};
pub use insert::insert;
pub use reads::{Row, rows_for_job};
pub use rejects::{RejectReason, Source};
// The record format lives on the ground floor; older paths keep working.
pub use crate::model::record::{PACKED_FIELDS, Record, outbox_fields};

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

/// Write a batch read from an outbox: its records in one statement when
/// PostgreSQL takes them all, as it usually does; otherwise split until the
/// refused ones are found, and repair and set aside those and the entries
/// that are not records. Returns rows inserted. Fails only on an outage,
/// and then nothing may be acknowledged.
pub async fn write(
    pool: &sqlx::PgPool,
    from: &Source<'_>,
    batch: &Batch,
) -> Result<u64, LedgerError> {
    rejects::write(pool, from, &batch.records, &batch.raws, &batch.unfit).await
}
