//! PostgreSQL going away while jobs run: jobs keep running, their records wait
//! in the Redis outbox, and once PostgreSQL is back the ledger holds every
//! attempt exactly once.

mod common;

use std::time::Duration;

use agentq::ledger;
use agentq::queue::JobSpec;
use agentq_servers::{PostgresSource, PrivatePostgres};
use common::{TestQueue, drained, eventually, fast_worker};
use serde_json::json;
use sqlx::PgPool;

/// Generous "eventually" deadline; nothing here measures speed.
const PATIENCE: Duration = Duration::from_secs(120);

/// (rows, distinct (job_id, attempt), succeeded rows), or None while
/// PostgreSQL or the table is not there (yet).
async fn ledger_counts(pool: &PgPool) -> Option<(i64, i64, i64)> {
    sqlx::query_as(
        "SELECT count(*), count(DISTINCT (job_id, attempt)), \
                count(*) FILTER (WHERE outcome = 'succeeded') \
         FROM usage_ledger",
    )
    .fetch_one(pool)
    .await
    .ok()
}

fn sleep_jobs(n: usize) -> Vec<JobSpec> {
    (0..n)
        .map(|i| JobSpec::new(format!("t{}", i % 3), "q", "sleep").payload(&json!({ "ms": 50 })))
        .collect()
}

// Multi-threaded: stopping and starting PostgreSQL blocks (`block_in_place`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_loses_and_duplicates_nothing() {
    let mut pg = PrivatePostgres::start().expect("start a private PostgreSQL");
    let tq = TestQueue::new("ledger-outage").await;
    // The test's own view of the ledger; lazy, so it survives the outage.
    let reader = ledger::connect_lazy(&pg.url()).expect("reader pool");

    let worker = tq.start_ledger_worker(
        fast_worker(&["q"], 4),
        &ledger::connect_lazy(&pg.url()).expect("worker pool"),
    );

    // Phase 1, PostgreSQL up: the writer migrates and rows start to land.
    let mut ids = tq.enqueue_all(&sleep_jobs(10)).await;
    eventually(PATIENCE, "first ledger rows in PostgreSQL", || async {
        ledger_counts(&reader)
            .await
            .is_some_and(|(rows, _, _)| rows > 0)
            .then_some(())
    })
    .await;

    // Phase 2, PostgreSQL down: stop it with work still in flight, then add
    // more, which must run to completion without it.
    tokio::task::block_in_place(|| pg.stop());
    assert!(!pg.is_running());
    ids.extend(
        tq.queue
            .enqueue_batch(&sleep_jobs(30))
            .await
            .expect("enqueue while PostgreSQL is down")
            .into_iter()
            .map(|e| e.id),
    );
    drained(&tq, PATIENCE).await;
    let waiting = tq.outbox_len().await;
    assert!(
        waiting >= 30,
        "the records of jobs finished while PostgreSQL was down wait in the outbox, got {waiting}"
    );
    assert!(
        ledger_counts(&reader).await.is_none(),
        "PostgreSQL is really down"
    );

    // Every attempt ever made: one outbox record each.
    let mut attempts = 0i64;
    for id in &ids {
        let info = agentq::queue::inspect::job_info(&tq.queue, id)
            .await
            .expect("job info");
        assert_eq!(info.state, "succeeded", "job {id}");
        attempts += i64::try_from(info.attempts).expect("attempts");
    }
    assert!(attempts >= 40, "40 jobs made {attempts} attempts");

    // Phase 3, PostgreSQL back: the writer catches up by itself, first
    // retrying the batches it read but failed to insert (pending with it).
    tokio::task::block_in_place(|| pg.restart()).expect("restart PostgreSQL");
    let (rows, distinct, succeeded) =
        eventually(PATIENCE, "every attempt in the ledger", || async {
            let c = ledger_counts(&reader).await?;
            (c.0 >= attempts && tq.outbox_len().await == 0).then_some(c)
        })
        .await;
    assert_eq!(rows, attempts, "one row per attempt");
    assert_eq!(distinct, rows, "no (job_id, attempt) twice");
    assert_eq!(succeeded, rows, "every attempt succeeded");
    let mut in_ledger: Vec<String> = sqlx::query_scalar("SELECT DISTINCT job_id FROM usage_ledger")
        .fetch_all(&reader)
        .await
        .expect("select job ids");
    in_ledger.sort();
    ids.sort();
    assert_eq!(in_ledger, ids, "every job is in the ledger");
    assert_eq!(tq.outbox_len().await, 0, "the outbox is empty");

    worker.stop().await;
    reader.close().await;
    tq.cleanup().await;
    tokio::task::block_in_place(|| pg.stop());
}

#[test]
fn an_explicit_postgres_url_is_external() {
    let url = "postgres://someone@db.example:6543/billing";
    let src = PostgresSource::find(url, false).expect("find");
    assert!(matches!(src, PostgresSource::External(_)), "{src:?}");
    assert_eq!(src.url(), url);
}
