//! A stalled worker never runs a job twice (issue 12, item 5).
//!
//! A real `agentq worker` is stopped with SIGSTOP for several leases while
//! one of its tasks runs, then continued. The test samples every task
//! process the workers have (their direct children other than the lease
//! guard: each attempt's process group leader) every 50 ms and requires at
//! most one at any moment: the stopped worker's lease guard kills the task
//! when the lease lapses, before Redis can hand the job out again; and when
//! the worker comes back it neither runs its old attempt beside the new one
//! nor loses track of the new one.

mod common;

use std::time::{Duration, Instant};

use agentq::queue::JobSpec;
use common::{Proc, TestQueue, WorkerProc, eventually};
use serde_json::json;

const LEASE: &str = "2s";

fn signal(c: &Proc, sig: libc::c_int) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(c.id() as libc::pid_t, sig) };
}

/// Sample the task processes of `workers` until `until` returns true (or
/// `limit`); the most seen at once.
async fn most_at_once<F, Fut>(workers: &[u32], limit: Duration, mut until: F) -> usize
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    let mut most = 0;
    while start.elapsed() < limit {
        let n: usize = workers.iter().map(|w| common::task_leaders(*w).len()).sum();
        most = most.max(n);
        if until().await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    most
}

async fn enqueue_sleep(tq: &TestQueue, ms: u64) -> String {
    let mut s = JobSpec::new("t", "q", "sleep").payload(&json!({ "ms": ms }));
    s.max_attempts = Some(5);
    tq.enqueue(&s).await
}

fn worker(tq: &TestQueue) -> Proc {
    Proc(tq.spawn_worker_with(
        &["--queues", "q", "--lease", LEASE, "--concurrency", "2"],
        &WorkerProc::default(),
    ))
}

async fn wait_for_task(w: &Proc) {
    let pid = w.id();
    eventually(Duration::from_secs(30), "the task starts", || async move {
        (!common::task_leaders(pid).is_empty()).then_some(())
    })
    .await;
}

/// Attempts in the outbox for `id`, and how each ended.
async fn attempts(tq: &TestQueue, id: &str) -> Vec<(i64, String)> {
    let mut v: Vec<(i64, String)> = tq
        .outbox()
        .await
        .into_iter()
        .filter(|r| r["job"] == id)
        .map(|r| (common::num(&r, "attempt"), r["outcome"].clone()))
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_past_its_lease_runs_its_job_once_at_a_time() {
    let tq = TestQueue::new("stalled-one").await;
    let w = worker(&tq);
    let id = enqueue_sleep(&tq, 8000).await;
    wait_for_task(&w).await;
    signal(&w, libc::SIGSTOP);
    let during = most_at_once(&[w.id()], Duration::from_secs(6), || async { false }).await;
    let killed_in_stall = common::task_leaders(w.id()).is_empty();
    signal(&w, libc::SIGCONT);
    let after = most_at_once(&[w.id()], Duration::from_secs(40), || async {
        agentq::queue::inspect::job_info(&tq.queue, &id)
            .await
            .is_ok_and(|j| j.state == "succeeded")
    })
    .await;
    assert!(
        killed_in_stall,
        "the stopped worker's task outlived its lease (the lease guard did not kill it)"
    );
    assert!(
        during <= 1 && after <= 1,
        "task processes at once: {during} during the stall, {after} after"
    );
    let info = agentq::queue::inspect::job_info(&tq.queue, &id)
        .await
        .expect("job");
    assert_eq!(info.state, "succeeded");
    let seen = attempts(&tq, &id).await;
    assert_eq!(
        seen,
        vec![(1, "lost".to_string()), (2, "succeeded".to_string())],
        "one attempt killed with its lease, one that ran to the end; no third"
    );
    tq.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_workers_task_is_dead_before_another_worker_takes_its_job() {
    let tq = TestQueue::new("stalled-two").await;
    let w1 = worker(&tq);
    let id = enqueue_sleep(&tq, 4000).await;
    wait_for_task(&w1).await;
    let w2 = worker(&tq);
    signal(&w1, libc::SIGSTOP);
    let workers = [w1.id(), w2.id()];
    let during = most_at_once(&workers, Duration::from_secs(40), || async {
        agentq::queue::inspect::job_info(&tq.queue, &id)
            .await
            .is_ok_and(|j| j.state == "succeeded")
    })
    .await;
    signal(&w1, libc::SIGCONT);
    let after = most_at_once(&workers, Duration::from_secs(3), || async { false }).await;
    assert!(
        during <= 1 && after <= 1,
        "task processes at once across both workers: {during} while one was stopped, {after} after"
    );
    let seen = attempts(&tq, &id).await;
    assert_eq!(seen.len(), 2, "two attempts: {seen:?}");
    assert_eq!(seen[1], (2, "succeeded".to_string()), "{seen:?}");
    tq.cleanup().await;
}
