//! The claim and completion scripts driven directly, as a worker would call
//! them but without one: deterministic, no processes, no timing.

use std::time::Duration;

use agentq::executor::{Outcome, TaskUsage};
use agentq::queue::{Call, ClaimedJob, CompleteStatus, Completion, Queue};

/// One claim on partition 0 of up to `n` jobs from `queues` (a worker, or
/// a pool, serving those queues), each leased for `lease`.
pub async fn claim(q: &Queue, queues: &[&str], n: usize, lease: Duration) -> Vec<ClaimedJob> {
    let queues: Vec<String> = queues.iter().map(|s| s.to_string()).collect();
    q.claim(0, &Call::new("w-test"), n, lease, &queues)
        .await
        .expect("claim")
        .jobs
}

/// The completion of claimed job `j` with `outcome`: exit code 0, a 1 ms
/// run, no usage, not permanent, no backoff.
pub fn done(j: &ClaimedJob, outcome: Outcome) -> Completion {
    Completion {
        id: j.id.clone(),
        attempt: j.attempt,
        outcome,
        permanent: false,
        error: String::new(),
        result: None,
        exit_code: Some(0),
        signal: None,
        run_ms: 1,
        cpu_ms: 0,
        peak_rss: 0,
        usage: TaskUsage::default(),
        backoff_ms: 0,
    }
}

/// Report `acks` on partition 0; the status of each.
pub async fn complete(q: &Queue, acks: &[Completion]) -> Vec<CompleteStatus> {
    q.complete(0, &Call::new("w"), acks)
        .await
        .expect("complete")
        .statuses
}
