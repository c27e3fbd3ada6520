//! Small holes, each closed with the test that found it (issue 12, item 8):
//! an attempt named twice in one completion, a cancelled job's stale
//! scheduling entry, a tenant's dead jobs hidden behind other tenants',
//! and a usage reconcile racing completions.

mod common;

use std::time::Duration;

use agentq::executor::Outcome;
use agentq::queue::{ClaimedJob, CompleteStatus, Completion, JobSpec, Queue};
use common::{TestDb, TestQueue, complete, done};
use fred::prelude::*;

const LEASE: Duration = Duration::from_secs(60);

async fn claim(q: &Queue, n: usize) -> Vec<ClaimedJob> {
    common::claim(q, &["q"], n, LEASE).await
}

async fn sched_score(q: &Queue, tenant: &str) -> Option<f64> {
    q.client()
        .zscore(q.keys(0).key(&["q", "q", "sched"]), tenant)
        .await
        .expect("zscore")
}

#[tokio::test]
async fn an_attempt_named_twice_in_one_completion_is_applied_once() {
    let tq = TestQueue::new("dup-complete").await;
    let q = &tq.queue;
    q.enqueue(&JobSpec::new("t", "q", "noop"))
        .await
        .expect("enqueue");
    let j = claim(q, 1).await.pop().expect("claimed");
    let c = done(&j, Outcome::Succeeded);
    let statuses = complete(q, &[c.clone(), c]).await;
    assert_eq!(
        statuses,
        vec![CompleteStatus::Succeeded, CompleteStatus::Succeeded]
    );
    assert_eq!(
        tq.running().await.get("t").copied().unwrap_or(0),
        0,
        "the running count went down once, not to -1"
    );
    assert_eq!(
        tq.outbox().await.len(),
        1,
        "one ledger record for one attempt"
    );
    tq.cleanup().await;
}

#[tokio::test]
async fn cancelling_a_tenants_last_ready_job_leaves_no_scheduling_entry() {
    let tq = TestQueue::new("cancel-sched").await;
    let q = &tq.queue;
    let e = q
        .enqueue(&JobSpec::new("t", "q", "noop"))
        .await
        .expect("enqueue");
    assert!(sched_score(q, "t").await.is_some(), "waiting to be picked");
    assert_eq!(q.cancel(&e.id).await.expect("cancel"), "ready");
    assert_eq!(sched_score(q, "t").await, None, "nothing left to pick");
    let w: Option<f64> = q
        .client()
        .hget(q.keys(0).key(&["qw"]), "q")
        .await
        .expect("hget");
    assert_eq!(
        w.unwrap_or(0.0),
        0.0,
        "no admissible weight left on the queue"
    );
    tq.cleanup().await;
}

/// Dead jobs of `tenant`: enqueue, claim and fail them for good.
async fn make_dead(q: &Queue, tenant: &str, n: usize) {
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let specs: Vec<JobSpec> = chunk
            .iter()
            .map(|_| {
                let mut s = JobSpec::new(tenant, "q", "noop");
                s.max_attempts = Some(1);
                s
            })
            .collect();
        q.enqueue_batch(&specs).await.expect("enqueue");
        let jobs = claim(q, chunk.len()).await;
        let acks: Vec<Completion> = jobs.iter().map(|j| done(j, Outcome::Failed)).collect();
        complete(q, &acks).await;
    }
}

#[tokio::test]
async fn a_tenants_dead_jobs_are_found_behind_any_number_of_older_ones() {
    let tq = TestQueue::new("dead-tenant").await;
    let q = &tq.queue;
    common::set_cap(q, "noisy", 100_000).await;
    make_dead(q, "noisy", 10_500).await;
    make_dead(q, "mine", 3).await;
    let retried = q
        .dead_jobs(true, "q", Some("mine"), Duration::ZERO, &[])
        .await
        .expect("dead retry");
    assert_eq!(retried.get("mine").copied(), Some(3), "{retried:?}");
    let purged = q
        .dead_jobs(false, "q", Some("noisy"), Duration::ZERO, &[])
        .await
        .expect("dead purge");
    assert_eq!(purged.get("noisy").copied(), Some(10_500));
    tq.cleanup().await;
}

/// `usage --reconcile` raises a tenant's counter to the ledger's figure
/// while completions add to it: no completion's time is overwritten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_never_overwrites_a_concurrent_completion() {
    let tq = TestQueue::new("reconcile-race").await;
    let db = TestDb::new("reconcile_race").await;
    let q = tq.queue.clone();
    let month = q
        .server_time()
        .await
        .expect("time")
        .format("%Y-%m")
        .to_string();
    sqlx::query(
        "INSERT INTO usage_daily (tenant, day, agent_ms) VALUES ('t', now()::date, 100000)",
    )
    .execute(&db.pool)
    .await
    .expect("ledger figure");
    let key = q.keys(0).key(&["usage", "t"]);
    // Completions keep adding agent time until the reconcile is done.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let adder = {
        let (client, key, month, stop) =
            (q.client().clone(), key.clone(), month.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || n < 100 {
                let _: i64 = client.hincrby(&key, &month, 1).await.expect("hincrby");
                n += 1;
            }
            n
        })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    let rows = agentq::usage::reconcile(&q, &db.pool)
        .await
        .expect("reconcile");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let adds = adder.await.expect("adder");
    let r = rows.iter().find(|r| r.tenant == "t").expect("t reconciled");
    let now: i64 = q.client().hget(&key, &month).await.expect("hget");
    assert_eq!(r.after_ms, 100_000, "raised to the ledger's figure");
    assert_eq!(
        now,
        r.after_ms as i64 + (adds - r.redis_ms as i64),
        "every completion after the raise still counts (before: {}, after: {})",
        r.redis_ms,
        r.after_ms
    );
    // And it never lowers a counter that is ahead of the ledger.
    let again = agentq::usage::reconcile(&q, &db.pool)
        .await
        .expect("reconcile");
    assert_eq!(again[0].after_ms, now as u64);
    db.cleanup().await;
    tq.cleanup().await;
}
