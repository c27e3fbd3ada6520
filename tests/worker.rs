//! A real worker running the real task programs against real Redis.

mod common;

use std::time::Duration;

use agentq::queue::JobSpec;
use agentq::queue::inspect::job_info;
use common::{TestQueue, drained, eventually, fast_worker};
use serde_json::json;

const LONG: Duration = Duration::from_secs(60);

async fn finished_state(tq: &TestQueue, id: &str) -> agentq::queue::inspect::JobInfo {
    common::job_in_state(tq, id, &["succeeded", "dead"]).await
}

#[tokio::test]
async fn caps_end_attempts_with_their_own_outcomes_and_the_worker_keeps_serving() {
    let tq = TestQueue::new("caps").await;
    let w = tq.start_worker(fast_worker(&["q"], 4));
    let mut slow = JobSpec::new("t", "q", "sleep").payload(&json!({"ms": 30_000}));
    slow.timeout = Some(Duration::from_secs(1));
    slow.max_attempts = Some(1);
    let mut hog = JobSpec::new("t", "q", "memhog").payload(&json!({"mib": 300}));
    hog.memory = Some(64 << 20);
    hog.max_attempts = Some(1);
    let slow_id = tq.enqueue(&slow).await;
    let hog_id = tq.enqueue(&hog).await;

    let s = finished_state(&tq, &slow_id).await;
    assert_eq!(
        (s.state.as_str(), s.outcome.as_deref()),
        ("dead", Some("timed_out")),
        "{s:?}"
    );
    let h = finished_state(&tq, &hog_id).await;
    assert_eq!(
        (h.state.as_str(), h.outcome.as_deref()),
        ("dead", Some("memory_exceeded")),
        "{h:?}"
    );

    // The ledger record of the timeout shows it ran about as long as its timeout.
    let rec = tq
        .outbox()
        .await
        .into_iter()
        .find(|r| r["job"] == slow_id)
        .expect("outbox record");
    let run_ms = common::num(&rec, "run_ms");
    assert!(run_ms >= 1000, "ran {run_ms}ms, at least its 1s timeout");
    assert!(
        run_ms < 20_000,
        "ran {run_ms}ms: it was stopped long before its 30s sleep"
    );

    let ok = tq
        .enqueue(&JobSpec::new("t", "q", "echo").payload(&json!({"after": "caps"})))
        .await;
    let o = finished_state(&tq, &ok).await;
    assert_eq!(o.state, "succeeded");
    assert_eq!(
        o.result
            .as_ref()
            .and_then(|r| r["payload"]["after"].as_str()),
        Some("caps")
    );
    w.stop().await;
    tq.cleanup().await;
}

#[tokio::test]
async fn failing_program_retries_then_dies_and_permanent_exit_is_not_retried() {
    let tq = TestQueue::new("fails").await;
    let w = tq.start_worker(fast_worker(&["q"], 4));
    let mut flaky =
        JobSpec::new("t", "q", "fail").payload(&json!({"code": 3, "message": "upstream said no"}));
    flaky.max_attempts = Some(3);
    let perm =
        JobSpec::new("t", "q", "fail").payload(&json!({"code": 65, "message": "bad request"}));
    let a = tq.enqueue(&flaky).await;
    let b = tq.enqueue(&perm).await;
    let fa = finished_state(&tq, &a).await;
    assert_eq!((fa.state.as_str(), fa.attempts), ("dead", 3));
    assert!(
        fa.last_error
            .as_deref()
            .unwrap_or("")
            .contains("upstream said no"),
        "{:?}",
        fa.last_error
    );
    let fb = finished_state(&tq, &b).await;
    assert_eq!((fb.state.as_str(), fb.attempts), ("dead", 1));
    let records = tq.outbox().await;
    assert_eq!(
        records.iter().filter(|r| r["job"] == a).count(),
        3,
        "one ledger record per attempt"
    );
    w.stop().await;
    tq.cleanup().await;
}

#[tokio::test]
async fn unknown_kind_goes_dead_naming_kind_and_worker() {
    let tq = TestQueue::new("unknown").await;
    let mut cfg = fast_worker(&["q"], 2);
    cfg.id = "w-unknown-test".into();
    let w = tq.start_worker(cfg);
    let id = tq.enqueue(&JobSpec::new("t", "q", "no-such-kind")).await;
    let info = finished_state(&tq, &id).await;
    assert_eq!((info.state.as_str(), info.attempts), ("dead", 1));
    let err = info.last_error.unwrap_or_default();
    assert!(
        err.contains("no-such-kind") && err.contains("w-unknown-test"),
        "{err}"
    );
    let ok = tq.enqueue(&JobSpec::new("t", "q", "echo")).await;
    assert_eq!(finished_state(&tq, &ok).await.state, "succeeded");
    w.stop().await;
    tq.cleanup().await;
}

#[tokio::test]
async fn garbage_from_a_task_program_is_a_clear_failure() {
    let tq = TestQueue::new("garbage").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let kind = dir.path().join("garbage");
    std::fs::create_dir(&kind).expect("mkdir");
    std::fs::write(
        kind.join("worker.toml"),
        "command = [\"/bin/sh\", \"-c\", \"echo 'not json {'\"]\n",
    )
    .expect("manifest");
    let registry = agentq::executor::Registry::load(dir.path()).expect("registry");
    let mut cfg = fast_worker(&["q"], 2);
    cfg.backoff_base = Duration::from_millis(10);
    let worker = tq.start_worker_with(cfg, registry, None);
    let mut s = JobSpec::new("t", "q", "garbage");
    s.max_attempts = Some(1);
    let id = tq.enqueue(&s).await;
    let info = finished_state(&tq, &id).await;
    assert_eq!(info.outcome.as_deref(), Some("failed"));
    assert!(
        info.last_error
            .unwrap_or_default()
            .contains("not a JSON object")
    );
    worker.stop().await;
    tq.cleanup().await;
}

#[tokio::test]
async fn graceful_shutdown_hands_running_jobs_back_at_once() {
    let tq = TestQueue::new("grace").await;
    let mut cfg = fast_worker(&["q"], 2);
    cfg.lease = Duration::from_secs(600); // if the job were not released, it would sit for 10 minutes
    cfg.shutdown_grace = Duration::from_millis(300);
    let w = tq.start_worker(cfg);
    let id = tq
        .enqueue(&JobSpec::new("t", "q", "sleep").payload(&json!({"ms": 60_000})))
        .await;
    common::job_in_state(&tq, &id, &["running"]).await;
    let summary = w.stop().await;
    assert_eq!(summary.released, 1);
    let info = job_info(&tq.queue, &id).await.expect("inspect");
    assert_eq!(
        info.state, "ready",
        "back to ready at once, not after the lease"
    );
    assert_eq!(tq.running().await.get("t").copied().unwrap_or(0), 0);
    let recs = tq.outbox().await;
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0]["outcome"], "lost");
    assert!(recs[0]["error"].contains("shutting down"), "{:?}", recs[0]);
    tq.cleanup().await;
}

#[tokio::test]
async fn noisy_neighbour_does_not_delay_a_light_tenant() {
    let tq = TestQueue::new("noisy").await;
    let flood: Vec<JobSpec> = (0..1000)
        .map(|_| JobSpec::new("a", "q", "sleep").payload(&json!({"ms": 10})))
        .collect();
    tq.queue.enqueue_batch(&flood).await.expect("flood");
    let w = tq.start_worker(fast_worker(&["q"], 8));
    // B arrives once A is running.
    eventually(LONG, "flood started", || async {
        (tq.running().await.get("a").copied().unwrap_or(0) > 0).then_some(())
    })
    .await;
    let light: Vec<JobSpec> = (0..10).map(|_| JobSpec::new("b", "q", "echo")).collect();
    tq.queue.enqueue_batch(&light).await.expect("light");
    drained(&tq, Duration::from_secs(300)).await;
    w.stop().await;
    let recs = tq.outbox().await;
    let mut a_starts: Vec<i64> = recs
        .iter()
        .filter(|r| r["tenant"] == "a")
        .map(|r| common::num(r, "started_at"))
        .collect();
    a_starts.sort();
    let tenth = a_starts[99];
    let b_last = recs
        .iter()
        .filter(|r| r["tenant"] == "b")
        .map(|r| common::num(r, "started_at"))
        .max()
        .expect("b ran");
    assert_eq!(recs.iter().filter(|r| r["tenant"] == "b").count(), 10);
    assert!(
        b_last <= tenth,
        "B's last start ({b_last}) came before A's backlog was a tenth done ({tenth})"
    );
    tq.cleanup().await;
}
