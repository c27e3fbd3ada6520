//! `agentq drain` and `agentq dead` against a real worker.

mod common;

use agentq::queue::JobSpec;
use agentq::queue::inspect::{job_info, queue_stats};
use common::{TestQueue, fast_worker};
use serde_json::json;

async fn stats(tq: &TestQueue) -> agentq::queue::inspect::QueueStats {
    queue_stats(&tq.queue)
        .await
        .expect("stats")
        .into_iter()
        .find(|s| s.queue == "q")
        .expect("queue q")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_waits_for_running_jobs_then_purges_waiting_ones() {
    let tq = TestQueue::new("drain").await;
    let w = tq.start_worker(fast_worker(&["q"], 2));
    let long = tq
        .enqueue(&JobSpec::new("a", "q", "sleep").payload(&json!({"ms": 1500})))
        .await;
    common::job_in_state(&tq, &long, &["running"]).await;
    // Too short a timeout: exit 1, naming what still runs; the queue stays paused.
    let (code, out, err) = tq.cli(&["drain", "q", "--timeout", "100ms"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains(&long) && err.contains("still running"),
        "{out}{err}"
    );
    let waiting: Vec<JobSpec> = (0..3)
        .map(|i| JobSpec::new(if i == 0 { "a" } else { "b" }, "q", "echo"))
        .collect();
    tq.queue.enqueue_batch(&waiting).await.expect("enqueue");
    let (code, out, err) = tq.cli(&["drain", "q", "--timeout", "60s", "--purge"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("drained q: nothing running"), "{out}");
    assert!(
        out.contains("purging 3 jobs (a: 1, b: 2)") && out.contains("purged 3 jobs (a: 1, b: 2)"),
        "{out}"
    );
    assert_eq!(
        job_info(&tq.queue, &long).await.expect("inspect").state,
        "succeeded",
        "the running job finished"
    );
    let s = stats(&tq).await;
    assert_eq!((s.ready, s.delayed, s.running, s.paused), (0, 0, 0, true));
    // Resume undoes the drain.
    assert_eq!(tq.cli(&["resume", "q"]).0, 0);
    let after = tq.enqueue(&JobSpec::new("a", "q", "echo")).await;
    common::job_in_state(&tq, &after, &["succeeded"]).await;
    w.stop().await;
    tq.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_jobs_are_listed_retried_and_purged() {
    let tq = TestQueue::new("dead").await;
    let w = tq.start_worker(fast_worker(&["q"], 2));
    let mut ids = Vec::new();
    for t in ["a", "a", "b"] {
        let mut s = JobSpec::new(t, "q", "fail")
            .payload(&json!({"code": 65, "message": "bad input row 7"}));
        s.max_attempts = Some(1);
        ids.push(tq.enqueue(&s).await);
    }
    for id in &ids {
        common::job_in_state(&tq, id, &["dead"]).await;
    }
    w.stop().await; // nothing runs the retried job: we inspect it as it is
    let (code, out, _) = tq.cli(&["dead", "q", "list", "--json"]);
    assert_eq!(code, 0);
    let listed: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(listed.as_array().map(Vec::len), Some(3));
    assert!(
        listed[0]["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("bad input row 7")
    );

    let (code, out, _) = tq.cli(&["dead", "q", "retry", "--job", &ids[0]]);
    assert_eq!(
        (code, out.trim()),
        (0, "retried (back to ready in q) 1 jobs (a: 1)")
    );
    let info = job_info(&tq.queue, &ids[0]).await.expect("inspect");
    assert_eq!(
        (info.state.as_str(), info.attempts),
        ("ready", 1),
        "fresh attempts, numbering goes on"
    );
    assert_eq!(
        info.payload["message"], "bad input row 7",
        "original payload"
    );
    let (_, out, _) = tq.cli(&["dead", "q", "purge", "--tenant", "b"]);
    assert_eq!(out.trim(), "purged dead from q 1 jobs (b: 1)");
    let (_, out, _) = tq.cli(&["dead", "q", "purge", "--older-than", "1h"]);
    assert_eq!(
        out.trim(),
        "purged dead from q 0 jobs",
        "the remaining dead job is younger than an hour"
    );
    let s = stats(&tq).await;
    assert_eq!((s.ready, s.dead), (1, 1));
    assert!(
        job_info(&tq.queue, &ids[2]).await.is_err(),
        "purged jobs are gone"
    );
    tq.cleanup().await;
}
