//! Outbox to PostgreSQL: one row per attempt, replays add nothing, a writer
//! that died between insert and ack duplicates nothing.

mod common;

use std::time::Duration;

use agentq::ledger::{self, LedgerWriter};
use agentq::queue::JobSpec;
use common::{TestQueue, drained, fast_worker};
use fred::prelude::*;
use serde_json::json;
use sqlx::PgPool;

fn database_url() -> String {
    std::env::var("AGENTQ_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A private schema for one test.
struct TestDb {
    pool: PgPool,
    admin: PgPool,
    schema: String,
}

impl TestDb {
    async fn new(test: &str) -> TestDb {
        let schema = format!("t_{test}_{:08x}", rand::random::<u32>());
        let admin = ledger::connect(&database_url(), None)
            .await
            .expect("connect to PostgreSQL (set AGENTQ_DATABASE_URL)");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&admin)
            .await
            .expect("create schema");
        let pool = ledger::connect(&database_url(), Some(&schema))
            .await
            .expect("connect");
        ledger::migrate(&pool).await.expect("migrate");
        TestDb {
            pool,
            admin,
            schema,
        }
    }
    async fn rows(&self) -> Vec<(String, i32, String)> {
        sqlx::query_as("SELECT job_id, attempt, outcome FROM usage_ledger ORDER BY job_id, attempt")
            .fetch_all(&self.pool)
            .await
            .expect("select")
    }
    async fn cleanup(self) {
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

async fn outbox_len(tq: &TestQueue) -> u64 {
    tq.queue
        .client()
        .xlen(tq.queue.keys(0).key(&["outbox"]))
        .await
        .expect("xlen")
}

#[tokio::test]
async fn every_attempt_lands_exactly_once() {
    let tq = TestQueue::new("ledger").await;
    let db = TestDb::new("ledger").await;
    let mut jobs = Vec::new();
    for t in ["a", "b", "c"] {
        for i in 0..10 {
            jobs.push(JobSpec::new(t, "q", "echo").payload(&json!({ "i": i })));
        }
        let mut f = JobSpec::new(t, "q", "fail").payload(&json!({"code": 2}));
        f.max_attempts = Some(2);
        jobs.push(f);
    }
    tq.queue.enqueue_batch(&jobs).await.expect("enqueue");
    let w = tq.start_worker(fast_worker(&["q"], 4));
    drained(&tq, Duration::from_secs(120)).await;
    w.stop().await;
    let records = tq.outbox().await;
    assert_eq!(records.len(), 30 + 3 * 2, "one record per attempt");

    // Replaying the same records first (as a crashed writer would) inserts them once.
    let parsed: Vec<ledger::Record> = records
        .iter()
        .filter_map(ledger::Record::from_fields)
        .collect();
    assert_eq!(ledger::insert(&db.pool, &parsed).await.expect("insert"), 36);
    assert_eq!(
        ledger::insert(&db.pool, &parsed).await.expect("replay"),
        0,
        "a replay adds nothing"
    );

    let writer = LedgerWriter::new(tq.queue.clone(), db.pool.clone(), "writer-1");
    while writer.drain_once().await.expect("drain") > 0 {}
    assert_eq!(outbox_len(&tq).await, 0, "entries are deleted once written");
    let rows = db.rows().await;
    assert_eq!(rows.len(), 36);
    assert_eq!(rows.iter().filter(|r| r.2 == "succeeded").count(), 30);
    assert_eq!(rows.iter().filter(|r| r.2 == "failed").count(), 6);
    db.cleanup().await;
    tq.cleanup().await;
}

#[tokio::test]
async fn a_writer_killed_between_insert_and_ack_duplicates_nothing() {
    let tq = TestQueue::new("ledger-crash").await;
    let db = TestDb::new("ledger_crash").await;
    let jobs: Vec<JobSpec> = (0..20)
        .map(|i| JobSpec::new("t", "q", "echo").payload(&json!({ "i": i })))
        .collect();
    tq.queue.enqueue_batch(&jobs).await.expect("enqueue");
    let w = tq.start_worker(fast_worker(&["q"], 4));
    drained(&tq, Duration::from_secs(120)).await;
    w.stop().await;

    // The doomed writer: reads its batch through the group, inserts, dies before XACK.
    let key = tq.queue.keys(0).key(&["outbox"]);
    let _: () = tq
        .queue
        .client()
        .xgroup_create(&key, ledger::GROUP, "0", true)
        .await
        .expect("group");
    let args: Vec<Value> = vec![
        "GROUP".into(),
        ledger::GROUP.into(),
        "doomed".into(),
        "COUNT".into(),
        "100".into(),
        "STREAMS".into(),
        key.as_str().into(),
        ">".into(),
    ];
    let _: Value = tq
        .queue
        .client()
        .custom(fred::cmd!("XREADGROUP"), args)
        .await
        .expect("xreadgroup");
    let records: Vec<ledger::Record> = tq
        .outbox()
        .await
        .iter()
        .filter_map(ledger::Record::from_fields)
        .collect();
    assert_eq!(
        ledger::insert(&db.pool, &records).await.expect("insert"),
        20
    );

    // A live writer takes the dead one's pending entries over and acks them.
    let mut writer = LedgerWriter::new(tq.queue.clone(), db.pool.clone(), "survivor");
    writer.claim_idle = Duration::from_millis(1);
    tokio::time::sleep(Duration::from_millis(20)).await;
    while writer.drain_once().await.expect("drain") > 0 {}
    assert_eq!(outbox_len(&tq).await, 0);
    assert_eq!(db.rows().await.len(), 20, "no duplicates");
    db.cleanup().await;
    tq.cleanup().await;
}

#[tokio::test]
async fn the_worker_writes_the_ledger_itself() {
    let tq = TestQueue::new("ledger-worker").await;
    let db = TestDb::new("ledger_worker").await;
    let jobs: Vec<JobSpec> = (0..10)
        .map(|i| JobSpec::new("t", "q", "echo").payload(&json!({ "i": i })))
        .collect();
    let ids: Vec<String> = tq
        .queue
        .enqueue_batch(&jobs)
        .await
        .expect("enqueue")
        .into_iter()
        .map(|e| e.id)
        .collect();
    let registry = agentq::executor::Registry::load(&common::workers_dir()).expect("registry");
    let stop = tokio_util::sync::CancellationToken::new();
    let worker = agentq::worker::Worker::new(
        tq.queue.clone(),
        fast_worker(&["q"], 4),
        registry,
        agentq::executor::Handlers::with_builtins(),
    )
    .with_ledger(db.pool.clone());
    let handle = tokio::spawn(worker.run(stop.clone()));
    common::eventually(Duration::from_secs(60), "ledger rows", || async {
        (db.rows().await.len() == 10).then_some(())
    })
    .await;
    stop.cancel();
    handle.await.expect("join").expect("worker");
    let rows = db.rows().await;
    let mut want = ids.clone();
    want.sort();
    assert_eq!(rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>(), want);
    assert_eq!(outbox_len(&tq).await, 0);
    db.cleanup().await;
    tq.cleanup().await;
}
