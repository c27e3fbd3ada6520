//! Outbox entries PostgreSQL refuses, set aside so that no data can stop the
//! ledger.
//!
//! A batch insert that fails because of what a record holds (SQLSTATE class
//! 22, data exception, such as a NUL byte in `text`; class 23, integrity
//! violation, such as an outcome the CHECK does not allow) is split in
//! halves until each refused record is alone ([`insert_splitting`]); the
//! others land. A refused record is then repaired, every text field cleaned
//! by [`clean`] (NUL, control characters and invalid UTF-8 become U+FFFD,
//! lengths are bounded), and inserted again, so billing still sees the
//! attempt with all its figures. Either way the raw entry (its stream fields
//! byte for byte), PostgreSQL's error, the stream, entry id and partition go
//! to `usage_ledger_rejects`: reason `repaired` or `unrepairable`. Entries
//! that are not usage records at all go there as `malformed`. A reject is
//! unique per stream and entry id, so a batch replayed after a crash
//! between insert and acknowledgement adds none.
//!
//! Any other failure (connection lost, pool timeout, the server shutting
//! down or out of disk, a trigger raising an error) is an outage, not the
//! data's fault: the batch stays in the outbox and is retried whole.

use std::collections::HashMap;
use std::ops::Range;

use sqlx::PgPool;

use super::{LedgerError, Record, insert};
pub use crate::model::record::RejectReason;
use crate::model::text::clean;

/// Bound on a cleaned name (job id, tenant, queue, kind, outcome, worker):
/// valid ones are far shorter.
const NAME_MAX: usize = 256;
/// Bound on a cleaned error: the executor's error is a summary line and at
/// most 2 KiB of stderr.
const ERROR_MAX: usize = 8 << 10;
/// Bound on a stored database error message.
const REASON_MAX: usize = 2 << 10;
/// The error stored for a record whose fields were not valid UTF-8 (text
/// PostgreSQL could not even be sent).
const NOT_UTF8: &str = "outbox entry is not valid UTF-8";

/// An outbox entry as received: its id and its stream fields (name, value,
/// name, value, ...), kept to be stored byte for byte if it is set aside.
pub(crate) struct Raw {
    pub id: String,
    pub fields: Vec<Vec<u8>>,
}

/// What the rejects table says about an entry's attempt, as far as the
/// entry names it.
#[derive(Default)]
pub(crate) struct Hint {
    job_id: Option<String>,
    attempt: Option<i32>,
    tenant: Option<String>,
}

impl Hint {
    fn of_record(r: &Record) -> Hint {
        Hint {
            job_id: Some(clean(&r.job_id, NAME_MAX)),
            attempt: Some(r.attempt),
            tenant: Some(clean(&r.tenant, NAME_MAX)),
        }
    }

    /// From an entry's fields by name (see [`super::outbox_fields`]).
    pub fn of_fields(f: &HashMap<String, String>) -> Hint {
        Hint {
            job_id: f.get("job").map(|v| clean(v, NAME_MAX)),
            attempt: f.get("attempt").and_then(|v| v.parse().ok()),
            tenant: f.get("tenant").map(|v| clean(v, NAME_MAX)),
        }
    }
}

/// An entry that cannot be inserted as it was read.
pub(crate) struct Unfit {
    pub raw: Raw,
    pub problem: Problem,
}

/// What is wrong with an [`Unfit`] entry.
pub(crate) enum Problem {
    /// A record, read with its invalid UTF-8 replaced: stored cleaned.
    NotUtf8(Box<Record>),
    /// Not a usage record.
    Malformed { why: String, hint: Hint },
}

/// The outbox stream a batch was read from.
pub struct Source<'a> {
    /// The stream key.
    pub stream: &'a str,
    /// Its partition.
    pub partition: u32,
}

/// Write a batch: `records` (read from `raws`, one each, in order) in one
/// statement when PostgreSQL takes them all, as it usually does; otherwise
/// split until the refused ones are found, and repair and set aside those
/// and the `unfit` entries. Returns rows inserted. Fails only on an outage,
/// and then nothing may be acknowledged.
pub(super) async fn write(
    pool: &PgPool,
    from: &Source<'_>,
    records: &[Record],
    raws: &[Raw],
    unfit: &[Unfit],
) -> Result<u64, LedgerError> {
    let split = insert_splitting(pool, records).await?;
    let mut inserted = split.inserted;
    let mut repaired = Vec::new();
    for refused in &split.refused {
        let (Some(record), Some(raw)) = (records.get(refused.index), raws.get(refused.index))
        else {
            continue;
        };
        if let Some(copy) = set_aside(pool, from, raw, record, &refused.error).await? {
            inserted += copy.inserted;
            repaired.push(copy.record);
        }
    }
    for u in unfit {
        match &u.problem {
            Problem::NotUtf8(record) => {
                if let Some(copy) = set_aside(pool, from, &u.raw, record, NOT_UTF8).await? {
                    inserted += copy.inserted;
                    repaired.push(copy.record);
                }
            }
            Problem::Malformed { why, hint } => {
                reject(pool, from, &u.raw, hint, RejectReason::Malformed, why).await?
            }
        }
    }
    count_landed(inserted, records, &split.refused, repaired);
    Ok(inserted)
}

/// Rows inserted, and the records PostgreSQL refused.
#[derive(Default)]
struct Split {
    inserted: u64,
    refused: Vec<Refused>,
}

/// A record PostgreSQL refused on its own, and why.
struct Refused {
    index: usize,
    error: String,
}

/// Insert `records`; when PostgreSQL refuses the data of a part, split that
/// part in halves until each refused record is alone. A batch with k
/// refused records of n costs about 2k·log2(n) statements more; one with
/// none costs one. Parts inserted before an outage are skipped on the retry
/// (unique per job and attempt), so nothing counts twice.
async fn insert_splitting(pool: &PgPool, records: &[Record]) -> Result<Split, LedgerError> {
    let mut split = Split::default();
    // Parts still to insert, as ranges of `records` (a stack).
    let mut todo: Vec<Range<usize>> = Vec::new();
    todo.push(0..records.len());
    while let Some(part) = todo.pop() {
        let Some(rows) = records.get(part.clone()) else {
            continue;
        };
        match insert(pool, rows).await {
            Ok(n) => split.inserted += n,
            Err(e) => {
                let error = refusal(&e).ok_or(e)?;
                if part.len() == 1 {
                    split.refused.push(Refused {
                        index: part.start,
                        error,
                    });
                } else {
                    let mid = part.start + part.len() / 2;
                    // Pushed last, popped first: the earlier half goes first.
                    todo.push(mid..part.end);
                    todo.push(part.start..mid);
                }
            }
        }
    }
    Ok(split)
}

/// PostgreSQL's reason when `e` refuses the data itself (SQLSTATE class 22
/// or 23); None for anything else, which is an outage.
fn refusal(e: &LedgerError) -> Option<String> {
    let LedgerError::Db(sqlx::Error::Database(db)) = e else {
        return None;
    };
    let code = db.code()?;
    is_data_class(&code).then(|| clean(&format!("{code}: {}", db.message()), REASON_MAX))
}

/// Class 22 (data exception) or 23 (integrity constraint violation): the
/// same record fails again however often it is retried.
fn is_data_class(sqlstate: &str) -> bool {
    sqlstate.starts_with("22") || sqlstate.starts_with("23")
}

/// A repaired copy that landed.
struct Landed {
    record: Record,
    inserted: u64,
}

/// Insert the cleaned copy of a refused record if PostgreSQL takes it, and
/// keep the raw entry either way. Returns the copy when it landed.
async fn set_aside(
    pool: &PgPool,
    from: &Source<'_>,
    raw: &Raw,
    record: &Record,
    error: &str,
) -> Result<Option<Landed>, LedgerError> {
    let copy = repaired(record);
    let hint = Hint::of_record(&copy);
    match insert(pool, std::slice::from_ref(&copy)).await {
        Ok(inserted) => {
            reject(pool, from, raw, &hint, RejectReason::Repaired, error).await?;
            Ok(Some(Landed {
                record: copy,
                inserted,
            }))
        }
        Err(e) => {
            let again = refusal(&e).ok_or(e)?;
            let why = if again == error {
                again
            } else {
                format!("{error}; cleaned copy refused too: {again}")
            };
            reject(pool, from, raw, &hint, RejectReason::Unrepairable, &why).await?;
            Ok(None)
        }
    }
}

/// `r` with every text field cleaned and bounded: what PostgreSQL can store.
fn repaired(r: &Record) -> Record {
    let name = |s: &str| clean(s, NAME_MAX);
    Record {
        job_id: name(&r.job_id),
        tenant: name(&r.tenant),
        queue: name(&r.queue),
        kind: name(&r.kind),
        outcome: name(&r.outcome),
        worker: name(&r.worker),
        error: clean(&r.error, ERROR_MAX),
        ..r.clone()
    }
}

const INSERT_REJECT: &str = "INSERT INTO usage_ledger_rejects \
    (stream, entry_id, partition, reason, job_id, attempt, tenant, error, fields) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (stream, entry_id) DO NOTHING";

/// Store the raw entry in `usage_ledger_rejects` (once: a replay finds it
/// there and adds nothing, and is not counted again).
async fn reject(
    pool: &PgPool,
    from: &Source<'_>,
    raw: &Raw,
    hint: &Hint,
    reason: RejectReason,
    error: &str,
) -> Result<(), LedgerError> {
    let fields: Vec<Vec<u8>> = raw.fields.clone();
    let added = sqlx::query(INSERT_REJECT)
        .bind(clean(from.stream, REASON_MAX))
        .bind(clean(&raw.id, NAME_MAX))
        .bind(i32::try_from(from.partition).unwrap_or(i32::MAX))
        .bind(reason.as_str())
        .bind(&hint.job_id)
        .bind(hint.attempt)
        .bind(&hint.tenant)
        .bind(clean(error, REASON_MAX))
        .bind(fields)
        .execute(pool)
        .await?
        .rows_affected();
    if added > 0 {
        crate::metrics::ledger_reject(reason);
        tracing::warn!(
            stream = from.stream,
            entry = %raw.id,
            job = hint.job_id.as_deref().unwrap_or(""),
            reason = reason.as_str(),
            error,
            "outbox entry kept in usage_ledger_rejects"
        );
    }
    Ok(())
}

/// Report the records that landed: all of them in the usual case, else
/// the ones not refused plus the repaired copies.
fn count_landed(inserted: u64, records: &[Record], refused: &[Refused], repaired: Vec<Record>) {
    if refused.is_empty() && repaired.is_empty() {
        crate::metrics::ledger_batch(inserted, records);
        return;
    }
    let mut landed: Vec<Record> = records
        .iter()
        .enumerate()
        .filter(|(i, _)| !refused.iter().any(|r| r.index == *i))
        .map(|(_, r)| r.clone())
        .collect();
    landed.extend(repaired);
    crate::metrics::ledger_batch(inserted, &landed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_data_exceptions_and_integrity_violations_are_the_data() {
        for code in ["22021", "22P02", "22003", "23514", "23502"] {
            assert!(is_data_class(code), "{code}");
        }
        // Connection, resources, operator intervention, system, raised by a
        // trigger, deadlock: retried, never set aside.
        for code in [
            "08006", "53100", "53300", "57P01", "58030", "P0001", "40P01", "42P01",
        ] {
            assert!(!is_data_class(code), "{code}");
        }
        assert_eq!(refusal(&LedgerError::Db(sqlx::Error::PoolTimedOut)), None);
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert_eq!(refusal(&LedgerError::Db(sqlx::Error::Io(io))), None);
    }

    #[test]
    fn repair_cleans_every_text_field_and_keeps_the_figures() {
        let r = Record {
            job_id: "0-1\0".into(),
            attempt: 2,
            tenant: "t\u{1b}".into(),
            queue: "q".into(),
            kind: "k".into(),
            outcome: "failed".into(),
            enqueued_at: 1,
            started_at: 2,
            finished_at: 3,
            wait_ms: 4,
            run_ms: 5,
            cpu_ms: 6,
            peak_rss_bytes: 7,
            exit_code: Some(1),
            signal: None,
            worker: "w\0".into(),
            api_calls: 8,
            input_tokens: 9,
            output_tokens: 10,
            cost_micros: 11,
            error: format!("bad\0{}", "x".repeat(ERROR_MAX)),
            billing: String::new(),
        };
        let c = repaired(&r);
        assert_eq!(
            (c.job_id.as_str(), c.tenant.as_str()),
            ("0-1\u{FFFD}", "t\u{FFFD}")
        );
        assert_eq!(c.worker, "w\u{FFFD}");
        assert!(c.error.starts_with("bad\u{FFFD}x") && c.error.len() <= ERROR_MAX);
        let figures = |r: &Record| {
            (
                r.attempt,
                r.finished_at,
                r.run_ms,
                r.cpu_ms,
                r.peak_rss_bytes,
                r.exit_code,
                r.api_calls + r.input_tokens + r.output_tokens,
                r.cost_micros,
            )
        };
        assert_eq!(figures(&c), figures(&r));
    }
}
