//! No outbox record can stop the ledger. A record PostgreSQL refuses (a NUL
//! byte or invalid UTF-8 in a task's error, an outcome the table does not
//! allow) or an entry that is not a record at all is found by splitting the
//! batch; a cleaned copy is written when cleaning helps, so billing still
//! sees the attempt, and the raw entry is kept in `usage_ledger_rejects`.
//! Each partition's outbox moves on its own while another cannot be written.
//!
//! The outbox entries are written here with XADD in the packed format of
//! `lib.lua` `outbox()`, so the bytes are exactly the ones under test.

mod common;

use std::future::Future;
use std::time::Duration;

use agentq::duties::ledger_writer::LedgerWriter;
use agentq::ledger;
use agentq::queue::JobSpec;
use common::{TestDb, TestQueue, eventually, fast_worker};
use fred::prelude::*;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};

/// A packed outbox record (`ledger::PACKED_FIELDS` order) of an attempt
/// with known figures: wait 50, run 250, cpu 120 ms, peak 4096 B, exit 1,
/// 3 calls, 100 + 40 tokens, 777 micro-dollars.
fn packed(job: &str, attempt: &str, tenant: &str, outcome: &str) -> Vec<u8> {
    assert_eq!(
        ledger::PACKED_FIELDS.len(),
        20,
        "update this test's records"
    );
    let now = chrono::Utc::now().timestamp_millis();
    let (enqueued, started, finished) = (
        (now - 300).to_string(),
        (now - 250).to_string(),
        now.to_string(),
    );
    [
        job, attempt, tenant, "q", "fail", outcome, &enqueued, &started, &finished, "50", "250",
        "120", "4096", "1", "", "3", "100", "40", "777", "worker-1",
    ]
    .join("\t")
    .into_bytes()
}

/// Raw stream fields: name, value, name, value, ...
type Fields = Vec<(String, Vec<u8>)>;

fn fields(r: &[u8], e: &[u8]) -> Fields {
    vec![("r".into(), r.to_vec()), ("e".into(), e.to_vec())]
}

fn outbox_key(tq: &TestQueue, p: u32) -> String {
    tq.queue.keys(p).key(&["outbox"])
}

/// Append an entry to partition `p`'s outbox under `id` (`*`: a new one).
async fn xadd(tq: &TestQueue, p: u32, id: &str, f: &Fields) -> String {
    let mut args: Vec<Value> = vec![outbox_key(tq, p).into(), id.into()];
    for (name, value) in f {
        args.push(name.as_str().into());
        args.push(value.as_slice().into());
    }
    tq.queue
        .client()
        .custom(fred::cmd!("XADD"), args)
        .await
        .expect("xadd")
}

/// (entries in partition `p`'s outbox, entries pending with the ledger group).
async fn outbox_state(tq: &TestQueue, p: u32) -> (u64, i64) {
    let key = outbox_key(tq, p);
    let len: u64 = tq.queue.client().xlen(&key).await.expect("xlen");
    let summary: Value = tq
        .queue
        .client()
        .custom(
            fred::cmd!("XPENDING"),
            vec![Value::from(key), Value::from(agentq::queue::outbox::GROUP)],
        )
        .await
        .expect("xpending");
    let pending = match summary {
        Value::Array(v) => v.first().and_then(|c| c.as_i64()).expect("pending count"),
        other => panic!("XPENDING summary: {other:?}"),
    };
    (len, pending)
}

/// One ledger row with every figure billing reads.
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
struct Row {
    job_id: String,
    attempt: i32,
    tenant: String,
    outcome: String,
    wait_ms: i64,
    run_ms: i64,
    cpu_ms: i64,
    peak_rss_bytes: i64,
    exit_code: Option<i32>,
    api_calls: i64,
    input_tokens: i64,
    output_tokens: i64,
    cost_micros: i64,
    worker: String,
    error: String,
}

async fn rows(db: &TestDb) -> Vec<Row> {
    sqlx::query_as(
        "SELECT job_id, attempt, tenant, outcome, wait_ms, run_ms, cpu_ms, peak_rss_bytes, exit_code, \
         api_calls, input_tokens, output_tokens, cost_micros, worker, error \
         FROM usage_ledger ORDER BY job_id, attempt",
    )
    .fetch_all(&db.pool)
    .await
    .expect("ledger rows")
}

/// (tenant, attempts, failed, agent_ms, cost_micros) per tenant and day.
async fn daily(db: &TestDb) -> Vec<(String, i64, i64, i64, i64)> {
    sqlx::query_as(
        "SELECT tenant, attempts, failed, agent_ms, cost_micros FROM usage_daily ORDER BY tenant, day",
    )
    .fetch_all(&db.pool)
    .await
    .expect("usage_daily")
}

/// One quarantined outbox entry.
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
struct Reject {
    stream: String,
    entry_id: String,
    partition: i32,
    reason: String,
    job_id: Option<String>,
    error: String,
    fields: Vec<Vec<u8>>,
    rejected_at: chrono::DateTime<chrono::Utc>,
}

async fn rejects(db: &TestDb) -> Vec<Reject> {
    sqlx::query_as(
        "SELECT stream, entry_id, partition, reason, job_id, error, fields, rejected_at \
         FROM usage_ledger_rejects ORDER BY entry_id",
    )
    .fetch_all(&db.pool)
    .await
    .expect("usage_ledger_rejects")
}

fn flat(f: &Fields) -> Vec<Vec<u8>> {
    f.iter()
        .flat_map(|(n, v)| [n.as_bytes().to_vec(), v.clone()])
        .collect()
}

/// Run `body` on a current-thread runtime with a local metrics recorder;
/// returns `agentq_ledger_rejects_total` by reason.
fn with_metrics<F: Future<Output = ()>>(body: impl FnOnce() -> F) -> Vec<(String, u64)> {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(body())
    });
    let mut out: Vec<(String, u64)> = snap
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(k, ..)| k.key().name() == "agentq_ledger_rejects_total")
        .map(|(k, _, _, v)| {
            let reason = k
                .key()
                .labels()
                .find(|l| l.key() == "reason")
                .map(|l| l.value().to_string())
                .unwrap_or_default();
            let n = match v {
                DebugValue::Counter(n) => n,
                other => panic!("not a counter: {other:?}"),
            };
            (reason, n)
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    out.sort();
    out
}

/// The SQL block docs/runbook.md marks as run by this test.
fn runbook_inspect_sql() -> String {
    common::ops::runbook_sql_block(
        "tests/ledger_rejects.rs runs the SQL block below",
        "the rejects query",
    )
}

#[test]
fn refused_text_is_repaired_quarantined_and_replays_change_nothing() {
    let counted = with_metrics(|| async {
        let tq = TestQueue::new("rejects-repair").await;
        let db = TestDb::new("rejects_repair").await;
        let batch: Vec<Fields> = vec![
            fields(&packed("0-good1", "1", "acme", "failed"), b"exit 1"),
            fields(
                &packed("0-nul", "1", "acme", "failed"),
                b"exit 1\nstderr:\nbad\0bytes",
            ),
            fields(&packed("0-good2", "1", "acme", "failed"), b"exit 1"),
            fields(
                &packed("0-utf8", "1", "acme", "failed"),
                b"exit 1\nstderr:\nbad \xff\xfe end",
            ),
            fields(&packed("0-good3", "1", "acme", "failed"), b"exit 1"),
        ];
        let mut ids = Vec::new();
        for f in &batch {
            ids.push(xadd(&tq, 0, "*", f).await);
        }

        let writer = LedgerWriter::new(tq.queue.clone(), db.pool.clone(), "writer-1");
        let handled = writer
            .run_once()
            .await
            .expect("refused records do not fail the batch");
        assert_eq!(handled, 5);

        let landed = rows(&db).await;
        let jobs: Vec<&str> = landed.iter().map(|r| r.job_id.as_str()).collect();
        assert_eq!(jobs, ["0-good1", "0-good2", "0-good3", "0-nul", "0-utf8"]);
        let want = |job: &str, error: &str| Row {
            job_id: job.into(),
            attempt: 1,
            tenant: "acme".into(),
            outcome: "failed".into(),
            wait_ms: 50,
            run_ms: 250,
            cpu_ms: 120,
            peak_rss_bytes: 4096,
            exit_code: Some(1),
            api_calls: 3,
            input_tokens: 100,
            output_tokens: 40,
            cost_micros: 777,
            worker: "worker-1".into(),
            error: error.into(),
        };
        assert_eq!(
            landed[3],
            want("0-nul", "exit 1\nstderr:\nbad\u{FFFD}bytes"),
            "the repaired row keeps every figure"
        );
        assert_eq!(
            landed[4],
            want("0-utf8", "exit 1\nstderr:\nbad \u{FFFD}\u{FFFD} end")
        );
        assert_eq!(landed[0], want("0-good1", "exit 1"));
        assert_eq!(
            daily(&db).await,
            vec![("acme".to_string(), 5, 5, 1250, 3885)],
            "billing counts the repaired attempts"
        );

        let kept = rejects(&db).await;
        assert_eq!(kept.len(), 2, "{kept:#?}");
        for (r, i) in kept.iter().zip([1, 3]) {
            assert_eq!(r.entry_id, ids[i]);
            assert_eq!(r.stream, outbox_key(&tq, 0));
            assert_eq!((r.partition, r.reason.as_str()), (0, "repaired"));
            assert_eq!(r.fields, flat(&batch[i]), "the raw entry, byte for byte");
        }
        assert_eq!(kept[0].job_id.as_deref(), Some("0-nul"));
        assert!(kept[0].error.contains("0x00"), "{}", kept[0].error);
        assert!(kept[1].error.contains("UTF-8"), "{}", kept[1].error);
        assert_eq!(outbox_state(&tq, 0).await, (0, 0), "the outbox is empty");
        assert_eq!(writer.run_once().await.expect("drain"), 0);

        // The runbook's query shows the raw bytes, escaped.
        let shown: Vec<(String, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT entry_id, e FROM ({}) AS q ORDER BY entry_id",
            runbook_inspect_sql().trim().trim_end_matches(';')
        )))
        .fetch_all(&db.pool)
        .await
        .expect("runbook query");
        assert_eq!(
            shown,
            vec![
                (ids[1].clone(), "exit 1\nstderr:\nbad\\000bytes".into()),
                (ids[3].clone(), "exit 1\nstderr:\nbad \\377\\376 end".into()),
            ]
        );

        // A writer killed between insert and ack: the same entries, same
        // ids, are read again. Nothing changes.
        let before = (rows(&db).await, daily(&db).await, rejects(&db).await);
        let key = outbox_key(&tq, 0);
        let _: i64 = tq.queue.client().del(&key).await.expect("del");
        for (id, f) in ids.iter().zip(&batch) {
            xadd(&tq, 0, id, f).await;
        }
        let _: () = tq
            .queue
            .client()
            .xgroup_create(&key, agentq::queue::outbox::GROUP, "0", true)
            .await
            .expect("group");
        assert_eq!(writer.run_once().await.expect("replay"), 5);
        let after = (rows(&db).await, daily(&db).await, rejects(&db).await);
        assert_eq!(before, after, "a replay adds no row, count or reject");
        assert_eq!(outbox_state(&tq, 0).await, (0, 0));
        db.cleanup().await;
        tq.cleanup().await;
    });
    assert_eq!(
        counted,
        vec![("repaired".to_string(), 2)],
        "counted once, not again on the replay"
    );
}

#[test]
fn unrepairable_and_malformed_entries_are_kept_aside_and_the_rest_lands() {
    let counted = with_metrics(|| async {
        let tq = TestQueue::new("rejects-bad").await;
        let db = TestDb::new("rejects_bad").await;
        let batch: Vec<Fields> = vec![
            fields(&packed("0-ok1", "1", "acme", "succeeded"), b""),
            fields(&packed("0-bogus", "1", "acme", "bogus"), b"exit 1"),
            fields(b"0-short\t1\tacme", b""),
            fields(&packed("0-zero", "0", "acme", "failed"), b"exit 1"),
            vec![("x".to_string(), b"not a record".to_vec())],
            fields(&packed("0-ok2", "1", "acme", "succeeded"), b""),
        ];
        let mut ids = Vec::new();
        for f in &batch {
            ids.push(xadd(&tq, 0, "*", f).await);
        }
        let writer = LedgerWriter::new(tq.queue.clone(), db.pool.clone(), "writer-1");
        assert_eq!(writer.run_once().await.expect("drain"), 6);

        let landed: Vec<String> = rows(&db).await.into_iter().map(|r| r.job_id).collect();
        assert_eq!(landed, ["0-ok1", "0-ok2"]);
        let kept = rejects(&db).await;
        let summary: Vec<(String, &str, Option<&str>)> = kept
            .iter()
            .map(|r| (r.entry_id.clone(), r.reason.as_str(), r.job_id.as_deref()))
            .collect();
        assert_eq!(
            summary,
            vec![
                (ids[1].clone(), "unrepairable", Some("0-bogus")),
                (ids[2].clone(), "malformed", Some("0-short")),
                (ids[3].clone(), "malformed", Some("0-zero")),
                (ids[4].clone(), "malformed", None),
            ]
        );
        assert!(
            kept[0].error.contains("usage_ledger_outcome_check"),
            "{}",
            kept[0].error
        );
        for (r, i) in kept.iter().zip(1..) {
            assert_eq!(r.fields, flat(&batch[i]));
            assert!(!r.error.is_empty());
        }
        assert_eq!(outbox_state(&tq, 0).await, (0, 0), "the outbox is empty");
        db.cleanup().await;
        tq.cleanup().await;
    });
    assert_eq!(
        counted,
        vec![
            ("malformed".to_string(), 3),
            ("unrepairable".to_string(), 1)
        ]
    );
}

#[tokio::test]
async fn rejects_are_for_operators_only() {
    let db = TestDb::new("rejects_rls").await;
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM usage_ledger_rejects")
        .fetch_one(&db.pool)
        .await
        .expect("the operator reads the rejects");
    assert_eq!(n, 0);
    let mut tx = db.pool.begin().await.expect("tx");
    agentq::usage::scope_to_tenant(&mut tx, "acme")
        .await
        .expect("scope");
    let read = sqlx::query("SELECT count(*) FROM usage_ledger_rejects")
        .fetch_one(&mut *tx)
        .await;
    assert!(
        read.as_ref()
            .is_err_and(|e| e.to_string().contains("permission denied")),
        "a tenant cannot read the rejects: {read:?}"
    );
    drop(tx);
    db.cleanup().await;
}

/// A tenant name of partition `p` of 2 starting with `prefix`.
fn tenant_in(p: u32, prefix: &str) -> String {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .find(|t| agentq::queue::partition_of(t, 2) == p)
        .expect("some name lands in each partition")
}

#[tokio::test]
async fn a_partition_that_cannot_be_written_does_not_hold_up_the_others() {
    let tq = TestQueue::with_partitions("rejects-parts", 2).await;
    let db = TestDb::new("rejects_parts").await;
    // Partition 0 is drained first: the one that fails must not stop 1.
    let blocked = tenant_in(0, "blocked");
    let free = tenant_in(1, "free");
    // Inserts of `blocked` fail with a non-data error (an outage as far as
    // the writer can tell) while its name is in ledger_block.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE ledger_block (tenant text PRIMARY KEY);
         INSERT INTO ledger_block VALUES ('{blocked}');
         CREATE FUNCTION block_tenant() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF EXISTS (SELECT 1 FROM ledger_block WHERE tenant = NEW.tenant) THEN
                 RAISE EXCEPTION 'ledger inserts of % blocked by the test', NEW.tenant
                     USING ERRCODE = 'P0001';
             END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER block_tenant BEFORE INSERT ON usage_ledger
             FOR EACH ROW EXECUTE FUNCTION block_tenant();"
    )))
    .execute(&db.pool)
    .await
    .expect("blocking trigger");
    let add = |p: u32, tenant: String, n: usize, tag: &'static str| {
        let tq = &tq;
        async move {
            for i in 0..n {
                let job = format!("{p}-{tag}{i}");
                xadd(
                    tq,
                    p,
                    "*",
                    &fields(&packed(&job, "1", &tenant, "failed"), b"x"),
                )
                .await;
            }
        }
    };
    add(0, blocked.clone(), 3, "b").await;
    add(1, free.clone(), 3, "f").await;
    let count = |tenant: String| {
        let pool = db.pool.clone();
        async move {
            let (n,): (i64,) =
                sqlx::query_as("SELECT count(*) FROM usage_ledger WHERE tenant = $1")
                    .bind(tenant)
                    .fetch_one(&pool)
                    .await
                    .expect("count");
            n
        }
    };
    // claim_idle stays at its default (30 s): nothing below waits for it.
    let writer = LedgerWriter::new(tq.queue.clone(), db.pool.clone(), "writer-1");
    assert_eq!(writer.config.claim_idle, Duration::from_secs(30));

    let first = writer.run_once().await;
    assert!(
        first
            .as_ref()
            .is_err_and(|e| e.to_string().contains("blocked by the test")),
        "the failing partition is reported: {first:?}"
    );
    assert_eq!(count(free.clone()).await, 3, "partition 1 was written");
    assert_eq!(count(blocked.clone()).await, 0);

    // Partition 0 keeps failing (its own pending entries retried); new
    // records of partition 1 keep landing.
    add(1, free.clone(), 2, "g").await;
    assert!(
        writer.run_once().await.is_err(),
        "partition 0's pending entries are retried, and fail again"
    );
    assert_eq!(count(free.clone()).await, 5);
    assert_eq!(outbox_state(&tq, 1).await, (0, 0));
    assert_eq!(outbox_state(&tq, 0).await, (3, 3), "held, pending with us");

    // PostgreSQL takes them again: they land at the next drains, without
    // waiting claim_idle for XAUTOCLAIM.
    sqlx::query("DELETE FROM ledger_block")
        .execute(&db.pool)
        .await
        .expect("unblock");
    for _ in 0..2 {
        writer.run_once().await.expect("drain after the outage");
    }
    assert_eq!(count(blocked.clone()).await, 3, "partition 0 caught up");
    assert_eq!(outbox_state(&tq, 0).await, (0, 0));
    assert!(rejects(&db).await.is_empty(), "an outage rejects nothing");
    db.cleanup().await;
    tq.cleanup().await;
}

#[tokio::test]
async fn a_task_writing_nul_and_invalid_utf8_to_stderr_is_billed() {
    let tq = TestQueue::new("rejects-e2e").await;
    let db = TestDb::new("rejects_e2e").await;
    let mut job = JobSpec::new("acme", "q", "badbytes");
    job.max_attempts = Some(1);
    let id = tq.queue.enqueue_batch(&[job]).await.expect("enqueue")[0]
        .id
        .clone();
    let worker = tq.start_ledger_worker(fast_worker(&["q"], 2), &db.pool);
    let landed = eventually(
        Duration::from_secs(60),
        "the attempt's ledger row",
        || async {
            let r = rows(&db).await;
            (!r.is_empty()).then_some(r)
        },
    )
    .await;
    worker.stop().await;

    assert_eq!(landed.len(), 1, "{landed:#?}");
    let row = &landed[0];
    assert_eq!((row.job_id.as_str(), row.attempt), (id.as_str(), 1));
    assert_eq!((row.outcome.as_str(), row.exit_code), ("failed", Some(1)));
    assert!(row.error.contains("bad"), "{:?}", row.error);
    assert!(!row.error.contains('\0'), "{:?}", row.error);
    let billed = daily(&db).await;
    assert_eq!(
        billed
            .iter()
            .map(|d| (d.0.as_str(), d.1))
            .collect::<Vec<_>>(),
        [("acme", 1)]
    );
    // Cleaned by the writer (a reject kept) or already at the source (none).
    let kept = rejects(&db).await;
    assert!(
        kept.iter()
            .all(|r| r.reason == "repaired" && r.job_id.as_deref() == Some(id.as_str())),
        "{kept:#?}"
    );
    assert!(kept.len() <= 1);
    assert_eq!(outbox_state(&tq, 0).await, (0, 0));
    db.cleanup().await;
    tq.cleanup().await;
}
