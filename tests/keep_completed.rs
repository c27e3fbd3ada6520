//! How long a queue keeps its succeeded jobs (`Queue::set_keep_completed`,
//! `agentq keep-completed`): zero removes a job's hash in the completion
//! that succeeds it, while its ledger record is written all the same and
//! failed jobs (retried or dead) keep theirs; a duration sets the hash's TTL;
//! `default` goes back to the partition's retention_ms.

mod common;

use std::time::Duration;

use agentq::executor::Outcome;
use agentq::queue::{CompleteStatus, JobSpec, QueueError};
use common::{TestQueue, claim, complete, done};
use fred::prelude::*;

const LEASE: Duration = Duration::from_secs(60);

/// Enqueue `n` jobs of tenant acme on queue q and claim them all.
async fn claimed(tq: &TestQueue, n: usize) -> Vec<agentq::queue::ClaimedJob> {
    let specs: Vec<JobSpec> = (0..n).map(|_| JobSpec::new("acme", "q", "noop")).collect();
    tq.enqueue_all(&specs).await;
    let jobs = claim(&tq.queue, &["q"], n, LEASE).await;
    assert_eq!(jobs.len(), n, "every job claimed");
    jobs
}

async fn ttl_ms(tq: &TestQueue, id: &str) -> i64 {
    let key = tq.queue.keys(0).job(id);
    tq.queue.client().pttl(&key).await.expect("PTTL")
}

#[tokio::test]
async fn zero_removes_succeeded_jobs_and_keeps_their_records() {
    let tq = TestQueue::new("keep_zero").await;
    tq.queue
        .set_keep_completed("q", Some(Duration::ZERO))
        .await
        .expect("keep 0");
    let jobs = claimed(&tq, 3).await;
    let mut permanent = done(&jobs[2], Outcome::Failed);
    permanent.permanent = true;
    let statuses = complete(
        &tq.queue,
        &[
            done(&jobs[0], Outcome::Succeeded),
            done(&jobs[1], Outcome::Failed),
            permanent,
        ],
    )
    .await;
    assert_eq!(
        statuses,
        [
            CompleteStatus::Succeeded,
            CompleteStatus::Ready,
            CompleteStatus::Dead
        ]
    );
    assert_eq!(
        ttl_ms(&tq, &jobs[0].id).await,
        -2,
        "succeeded job's hash gone"
    );
    assert_eq!(
        ttl_ms(&tq, &jobs[1].id).await,
        -1,
        "retried job kept, no TTL"
    );
    assert_eq!(
        ttl_ms(&tq, &jobs[2].id).await,
        -1,
        "dead job kept until purged"
    );
    assert_eq!(
        tq.outbox_outcomes().await.len(),
        3,
        "one ledger record per attempt, the removed job's too"
    );
    // The same completion repeated (a lost reply) changes nothing more.
    let again = complete(&tq.queue, &[done(&jobs[0], Outcome::Succeeded)]).await;
    assert_eq!(again, [CompleteStatus::Refused]);
    assert_eq!(tq.outbox_outcomes().await.len(), 3, "no second record");
    // The retried job succeeds on its second attempt and goes too.
    let retry = claim(&tq.queue, &["q"], 1, LEASE).await;
    assert_eq!(retry.len(), 1);
    let last = complete(&tq.queue, &[done(&retry[0], Outcome::Succeeded)]).await;
    assert_eq!(last, [CompleteStatus::Succeeded]);
    assert_eq!(ttl_ms(&tq, &jobs[1].id).await, -2, "gone once it succeeded");
    assert_eq!(tq.outbox_outcomes().await.len(), 4);
    tq.assert_quiet().await;
    tq.cleanup().await;
}

#[tokio::test]
async fn a_duration_sets_the_ttl_and_default_restores_retention() {
    let tq = TestQueue::new("keep_duration").await;
    tq.queue
        .set_keep_completed("q", Some(Duration::from_secs(5)))
        .await
        .expect("keep 5s");
    let jobs = claimed(&tq, 2).await;
    complete(&tq.queue, &[done(&jobs[0], Outcome::Succeeded)]).await;
    let ttl = ttl_ms(&tq, &jobs[0].id).await;
    assert!((1..=5_000).contains(&ttl), "TTL {ttl} ms, want at most 5 s");

    tq.queue
        .set_keep_completed("q", None)
        .await
        .expect("default");
    complete(&tq.queue, &[done(&jobs[1], Outcome::Succeeded)]).await;
    let ttl = ttl_ms(&tq, &jobs[1].id).await;
    assert!(
        ttl > 23 * 3_600_000 && ttl <= 24 * 3_600_000,
        "TTL {ttl} ms, want retention_ms (24 h)"
    );
    tq.cleanup().await;
}

#[tokio::test]
async fn bad_settings_are_refused() {
    let tq = TestQueue::new("keep_bad").await;
    let too_long = tq
        .queue
        .set_keep_completed("q", Some(Duration::from_secs(400 * 86_400)))
        .await;
    assert!(
        matches!(&too_long, Err(QueueError::Invalid(m)) if m.contains("365d")),
        "{too_long:?}"
    );
    let bad_name = tq.queue.set_keep_completed("no spaces", None).await;
    assert!(
        matches!(bad_name, Err(QueueError::Invalid(_))),
        "{bad_name:?}"
    );
    tq.cleanup().await;
}

#[tokio::test]
async fn the_cli_sets_and_resets_it() {
    let tq = TestQueue::new("keep_cli").await;
    let key = tq.queue.keys(0).key(&["qkeep"]);
    let stored = || async {
        let v: Option<String> = tq.queue.client().hget(&key, "q").await.expect("HGET");
        v
    };
    let (code, out, err) = tq.cli(&["keep-completed", "q", "0", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v, serde_json::json!({"queue": "q", "keep_completed_ms": 0}));
    assert_eq!(stored().await.as_deref(), Some("0"));

    let (code, out, _) = tq.cli(&["keep-completed", "q", "10m"]);
    assert_eq!(code, 0);
    assert!(out.contains("10m"), "{out}");
    assert_eq!(stored().await.as_deref(), Some("600000"));

    let (code, _, _) = tq.cli(&["keep-completed", "q", "default"]);
    assert_eq!(code, 0);
    assert_eq!(stored().await, None);

    let (code, _, err) = tq.cli(&["keep-completed", "q", "soon"]);
    assert_eq!(code, 2, "bad input is the caller's: {err}");
    assert!(err.contains("use 0, a duration"), "{err}");
    tq.cleanup().await;
}

#[tokio::test]
async fn a_setting_edited_by_hand_into_garbage_falls_back_to_retention() {
    let tq = TestQueue::new("keep_garbage").await;
    let key = tq.queue.keys(0).key(&["qkeep"]);
    let _: i64 = tq
        .queue
        .client()
        .hset(&key, ("q", "soon"))
        .await
        .expect("HSET");
    let jobs = claimed(&tq, 1).await;
    let statuses = complete(&tq.queue, &[done(&jobs[0], Outcome::Succeeded)]).await;
    assert_eq!(
        statuses,
        [CompleteStatus::Succeeded],
        "the completion still lands"
    );
    let ttl = ttl_ms(&tq, &jobs[0].id).await;
    assert!(
        ttl > 23 * 3_600_000,
        "TTL {ttl} ms, want retention_ms (24 h)"
    );
    tq.cleanup().await;
}
