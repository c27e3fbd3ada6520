//! An apalis 1.0 worker on an agentq queue: handlers run, results are
//! acknowledged through the fenced completion script (ledger records and
//! retries included), and tenant caps still hold.
#![cfg(feature = "apalis")]

mod common;

use std::time::Duration;

use agentq::apalis::AgentqBackend;
use agentq::model::limits::{LimitsUpdate, Target};
use agentq::queue::JobSpec;
use apalis_core::error::BoxDynError;
use apalis_core::worker::builder::WorkerBuilder;
use common::TestQueue;
use serde_json::{Value, json};

async fn handle(job: Value) -> Result<(), BoxDynError> {
    tokio::time::sleep(Duration::from_millis(job["ms"].as_u64().unwrap_or(0))).await;
    if job["fail"] == true {
        Err("asked to fail".into())
    } else {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apalis_handlers_run_on_agentq_with_caps_fencing_and_ledger() {
    let tq = TestQueue::new("apalis").await;
    LimitsUpdate {
        max_concurrency: Some(1),
        ..Default::default()
    }
    .apply(&tq.queue, Target::Tenant("t"))
    .await
    .expect("cap");
    let mut jobs: Vec<JobSpec> = (0..4)
        .map(|_| JobSpec::new("t", "q", "any").payload(&json!({"ms": 50})))
        .collect();
    let mut failing = JobSpec::new("t", "q", "any").payload(&json!({"fail": true}));
    failing.max_attempts = Some(1);
    jobs.push(failing);
    let ids: Vec<String> = tq.enqueue_all(&jobs).await;

    let backend = AgentqBackend::<Value>::new(tq.queue.clone(), vec!["q".into()], "apalis-test")
        .lease(Duration::from_secs(5));
    let worker = WorkerBuilder::new("apalis-test")
        .backend(backend)
        .build(handle);
    let stop = tokio_util::sync::CancellationToken::new();
    let stop2 = stop.clone();
    let run = tokio::spawn(async move {
        worker
            .run_until(async move {
                stop2.cancelled().await;
                Ok::<(), std::io::Error>(())
            })
            .await
    });
    for id in &ids[..4] {
        common::job_in_state(&tq, id, &["succeeded"]).await;
    }
    let dead = common::job_in_state(&tq, &ids[4], &["dead"]).await;
    assert!(
        dead.last_error
            .unwrap_or_default()
            .contains("asked to fail")
    );
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), run).await;

    let recs = tq.outbox().await;
    assert_eq!(recs.len(), 5, "one ledger record per attempt");
    assert!(recs.iter().all(|r| r["worker"] == "apalis-test"));
    let iv: Vec<(i64, i64)> = recs
        .iter()
        .map(|r| (common::num(r, "started_at"), common::num(r, "finished_at")))
        .collect();
    assert_eq!(
        common::peak_overlap(&iv),
        1,
        "the tenant's cap of 1 holds under apalis too"
    );
    tq.cleanup().await;
}

#[derive(Debug, serde::Deserialize)]
struct Typed {
    #[allow(dead_code)]
    n: u32,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_the_handler_cannot_decode_goes_dead_with_a_clear_error() {
    let tq = TestQueue::new("apalis-decode").await;
    let mut bad = JobSpec::new("t", "q", "any").payload(&json!({"n": "not a number"}));
    bad.max_attempts = Some(3);
    let id = tq.enqueue(&bad).await;
    let backend = AgentqBackend::<Typed>::new(tq.queue.clone(), vec!["q".into()], "apalis-typed");
    let worker = WorkerBuilder::new("apalis-typed")
        .backend(backend)
        .build(|_t: Typed| async { Ok::<(), BoxDynError>(()) });
    let run = tokio::spawn(worker.run());
    let info = common::job_in_state(&tq, &id, &["dead"]).await;
    assert_eq!(info.attempts, 1, "permanent: not retried");
    assert!(
        info.last_error
            .unwrap_or_default()
            .contains("does not decode")
    );
    run.abort();
    tq.cleanup().await;
}
