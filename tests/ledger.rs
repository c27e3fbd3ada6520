//! Outbox to PostgreSQL: one row per attempt, replays add nothing, a writer
//! that died between insert and ack duplicates nothing.

mod common;

use std::time::Duration;

use agentq::duties::ledger_writer::LedgerWriter;
use agentq::ledger;
use agentq::queue::JobSpec;
use common::{TestDb, TestQueue, drained, fast_worker};
use fred::prelude::*;
use serde_json::json;

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
    while writer.run_once().await.expect("drain") > 0 {}
    assert_eq!(tq.outbox_len().await, 0, "entries are deleted once written");
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
        .xgroup_create(&key, agentq::queue::outbox::GROUP, "0", true)
        .await
        .expect("group");
    let args: Vec<Value> = vec![
        "GROUP".into(),
        agentq::queue::outbox::GROUP.into(),
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
    writer.config.claim_idle = Duration::from_millis(1);
    tokio::time::sleep(Duration::from_millis(20)).await;
    while writer.run_once().await.expect("drain") > 0 {}
    assert_eq!(tq.outbox_len().await, 0);
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
    let ids: Vec<String> = tq.enqueue_all(&jobs).await;
    let worker = tq.start_ledger_worker(fast_worker(&["q"], 4), &db.pool);
    common::eventually(Duration::from_secs(60), "ledger rows", || async {
        (db.rows().await.len() == 10).then_some(())
    })
    .await;
    worker.stop().await;
    let rows = db.rows().await;
    let mut want = ids.clone();
    want.sort();
    assert_eq!(rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>(), want);
    assert_eq!(tq.outbox_len().await, 0);
    db.cleanup().await;
    tq.cleanup().await;
}

fn record(
    job: &str,
    attempt: i32,
    tenant: &str,
    outcome: &str,
    run_ms: i64,
    cost_micros: i64,
) -> ledger::Record {
    let now = chrono::Utc::now().timestamp_millis();
    ledger::Record {
        job_id: job.into(),
        attempt,
        tenant: tenant.into(),
        queue: "q".into(),
        kind: "echo".into(),
        outcome: outcome.into(),
        enqueued_at: now - run_ms - 10,
        started_at: now - run_ms,
        finished_at: now,
        wait_ms: 10,
        run_ms,
        cpu_ms: run_ms / 2,
        peak_rss_bytes: 1 << 20,
        exit_code: Some(0),
        signal: None,
        worker: "w".into(),
        api_calls: 1,
        input_tokens: 100,
        output_tokens: 50,
        cost_micros,
        error: String::new(),
        billing: String::new(),
    }
}

#[tokio::test]
async fn usage_rollup_is_exact_and_tenant_reads_are_fenced_by_the_database() {
    let db = TestDb::new("usage").await;
    let recs = vec![
        record("0-a1", 1, "a", "failed", 1000, 170),
        record("0-a1", 2, "a", "succeeded", 2000, 330),
        record("0-a2", 1, "a", "succeeded", 3000, 500),
        record("0-b1", 1, "b", "lost", 4000, 667),
    ];
    assert_eq!(ledger::insert(&db.pool, &recs).await.expect("insert"), 4);
    assert_eq!(ledger::insert(&db.pool, &recs).await.expect("replay"), 0);
    let today = chrono::Utc::now().date_naive();
    let since = agentq::usage::month_start(today);
    let all = agentq::usage::report(&db.pool, None, since, today, agentq::usage::Period::Month)
        .await
        .expect("report");
    assert_eq!(all.len(), 2);
    let a = &all[0];
    assert_eq!(
        (a.tenant.as_str(), a.attempts, a.succeeded, a.failed),
        ("a", 3, 2, 1)
    );
    assert_eq!(
        (a.agent_ms, a.cost_micros, a.input_tokens),
        (6000, 1000, 300),
        "the replay did not double-count"
    );
    assert_eq!((all[1].tenant.as_str(), all[1].lost), ("b", 1));

    // The tenant-scoped path sees only its own rows, enforced by row-level security.
    let mine =
        agentq::usage::tenant_report(&db.pool, "a", since, today, agentq::usage::Period::Day)
            .await
            .expect("tenant");
    assert!(
        !mine.is_empty() && mine.iter().all(|r| r.tenant == "a"),
        "{mine:?}"
    );
    let mut tx = db.pool.begin().await.expect("tx");
    agentq::usage::scope_to_tenant(&mut tx, "a")
        .await
        .expect("scope");
    let (visible,): (i64,) = sqlx::query_as("SELECT count(*) FROM usage_ledger")
        .fetch_one(&mut *tx)
        .await
        .expect("count");
    let (other,): (i64,) = sqlx::query_as("SELECT count(*) FROM usage_ledger WHERE tenant = 'b'")
        .fetch_one(&mut *tx)
        .await
        .expect("count b");
    let (rollup_other,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM usage_daily WHERE tenant <> 'a'")
            .fetch_one(&mut *tx)
            .await
            .expect("rollup");
    assert_eq!((visible, other, rollup_other), (3, 0, 0));
    let direct = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM usage_ledger_{}",
        today.format("%Y_%m")
    )))
    .fetch_one(&mut *tx)
    .await;
    assert!(
        direct.is_err(),
        "partitions are not readable directly by the tenant role"
    );
    drop(tx);
    db.cleanup().await;
}

#[tokio::test]
async fn reconcile_restores_quota_counters_from_the_ledger() {
    let tq = TestQueue::new("reconcile").await;
    let db = TestDb::new("reconcile").await;
    ledger::insert(&db.pool, &[record("0-r1", 1, "t", "succeeded", 5000, 0)])
        .await
        .expect("insert");
    let month = agentq::queue::inspect::current_month(&tq.queue)
        .await
        .expect("month");
    let key = tq.queue.keys(0).key(&["usage", "t"]);
    let done = agentq::usage::reconcile(&tq.queue, &db.pool)
        .await
        .expect("reconcile");
    assert_eq!(
        done.iter()
            .map(|r| (r.redis_ms, r.ledger_ms, r.after_ms))
            .collect::<Vec<_>>(),
        vec![(0, 5000, 5000)]
    );
    let now: Option<u64> = tq.queue.client().hget(&key, &month).await.expect("hget");
    assert_eq!(now, Some(5000));
    // Never lowered: Redis may know of attempts still in the outbox.
    let _: () = tq
        .queue
        .client()
        .hset(&key, (month.as_str(), 9000u64))
        .await
        .expect("hset");
    let again = agentq::usage::reconcile(&tq.queue, &db.pool)
        .await
        .expect("reconcile");
    assert_eq!(again[0].after_ms, 9000);
    db.cleanup().await;
    tq.cleanup().await;
}

#[tokio::test]
async fn usage_command_prints_json_per_tenant() {
    let tq = TestQueue::new("usage-cli").await;
    let db = TestDb::new("usage_cli").await;
    ledger::insert(
        &db.pool,
        &[record("0-c1", 1, "acme", "succeeded", 60_000, 10_000)],
    )
    .await
    .expect("insert");
    let url = db.url();
    let (code, out, err) = tq.cli(&["usage", "--json", "--database-url", &url]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v[0]["tenant"], "acme");
    assert_eq!(v[0]["agent_ms"], 60_000);
    assert_eq!(v[0]["cost_micros"], 10_000);
    let (code, _, err) = tq.cli(&["usage", "--since", "2026-13-01", "--database-url", &url]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("YYYY-MM-DD"));
    db.cleanup().await;
    tq.cleanup().await;
}

#[tokio::test]
async fn a_writer_recreates_its_group_when_redis_lost_the_outbox() {
    let tq = TestQueue::new("ledger-nogroup").await;
    let db = TestDb::new("ledger_nogroup").await;
    let writer = LedgerWriter::new(tq.queue.clone(), db.pool.clone(), "writer-1");
    let run = |n: usize| {
        let jobs: Vec<JobSpec> = (0..n)
            .map(|i| JobSpec::new("t", "q", "echo").payload(&json!({ "i": i })))
            .collect();
        let tq = &tq;
        async move {
            tq.queue.enqueue_batch(&jobs).await.expect("enqueue");
            let w = tq.start_worker(fast_worker(&["q"], 4));
            drained(tq, Duration::from_secs(120)).await;
            w.stop().await;
        }
    };
    run(3).await;
    while writer.run_once().await.expect("drain") > 0 {}
    assert_eq!(db.rows().await.len(), 3);

    // Redis loses the stream and its group (a restart without persistence);
    // new records arrive in a fresh stream with no group.
    let _: i64 = tq
        .queue
        .client()
        .del(tq.queue.keys(0).key(&["outbox"]))
        .await
        .expect("del");
    run(2).await;
    let first = writer.run_once().await;
    assert!(
        first
            .as_ref()
            .is_err_and(|e| e.to_string().contains("NOGROUP")),
        "the first read finds no group: {first:?}"
    );
    while writer.run_once().await.expect("drain after NOGROUP") > 0 {}
    assert_eq!(db.rows().await.len(), 5, "the writer made its group again");
    assert_eq!(tq.outbox_len().await, 0);
    db.cleanup().await;
    tq.cleanup().await;
}
