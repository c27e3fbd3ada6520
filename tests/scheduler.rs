//! The claim script's admission and fairness, driven directly (no processes):
//! deterministic, no timing.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use agentq::executor::Outcome;
use agentq::model::limits::LimitsUpdate;
use agentq::queue::{ClaimedJob, CompleteStatus, Completion, JobSpec, QueueError};
use common::{TestQueue, complete, done, fill, set_cap_and_weight};
use fred::prelude::*;

const LEASE: Duration = Duration::from_secs(30);

/// One claim of up to `n` jobs from queue q.
async fn claim(tq: &TestQueue, n: usize) -> Vec<ClaimedJob> {
    common::claim(&tq.queue, &["q"], n, LEASE).await
}

#[tokio::test]
async fn weighted_shares_follow_weights() {
    let tq = TestQueue::new("weights").await;
    for (t, w) in [("a", 5), ("b", 3), ("c", 2)] {
        set_cap_and_weight(&tq.queue, t, 1000, w).await;
        fill(&tq.queue, t, "q", 400).await;
    }
    // 500 starts while all three stay backlogged; completing each batch keeps caps out of the way.
    let mut starts: HashMap<String, usize> = HashMap::new();
    for _ in 0..50 {
        let batch = claim(&tq, 10).await;
        assert_eq!(batch.len(), 10);
        for j in &batch {
            *starts.entry(j.tenant.clone()).or_default() += 1;
        }
        let acks: Vec<Completion> = batch.iter().map(|j| done(j, Outcome::Succeeded)).collect();
        complete(&tq.queue, &acks).await;
    }
    for (t, want) in [("a", 0.5), ("b", 0.3), ("c", 0.2)] {
        let share = starts[t] as f64 / 500.0;
        assert!(
            (share - want).abs() <= want * 0.1,
            "tenant {t}: share {share:.3}, want {want} ±10% ({starts:?})"
        );
    }
    tq.cleanup().await;
}

#[tokio::test]
async fn light_tenant_is_served_within_one_pick_of_a_flood() {
    let tq = TestQueue::new("flood").await;
    set_cap_and_weight(&tq.queue, "a", 1000, 1).await;
    fill(&tq.queue, "a", "q", 1000).await;
    // A drains for a while before B arrives.
    for j in claim(&tq, 50).await {
        complete(&tq.queue, &[done(&j, Outcome::Succeeded)]).await;
    }
    fill(&tq.queue, "b", "q", 10).await;
    let next = claim(&tq, 20).await;
    let b_positions: Vec<usize> = next
        .iter()
        .enumerate()
        .filter(|(_, j)| j.tenant == "b")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        b_positions.len(),
        10,
        "all of B's 10 jobs start within the next 20 picks: {b_positions:?}"
    );
    assert_eq!(
        b_positions[0], 0,
        "B is served first: it arrived with the lowest virtual time"
    );
    tq.cleanup().await;
}

#[tokio::test]
async fn concurrency_cap_is_reached_and_never_exceeded() {
    let tq = TestQueue::new("cap").await;
    set_cap_and_weight(&tq.queue, "capped", 3, 1).await;
    fill(&tq.queue, "capped", "q", 10).await;
    fill(&tq.queue, "free", "q", 2).await;
    let first = claim(&tq, 10).await;
    let capped: Vec<&ClaimedJob> = first.iter().filter(|j| j.tenant == "capped").collect();
    assert_eq!(capped.len(), 3, "exactly the cap is admitted");
    assert_eq!(
        first.iter().filter(|j| j.tenant == "free").count(),
        2,
        "other tenants are not held back"
    );
    assert!(
        claim(&tq, 10).await.is_empty(),
        "nothing more while at the cap"
    );
    // One completion frees exactly one slot.
    complete(&tq.queue, &[done(capped[0], Outcome::Succeeded)]).await;
    let next = claim(&tq, 10).await;
    assert_eq!(next.len(), 1);
    // Raising the cap takes effect on the next claim, fleet-wide.
    set_cap_and_weight(&tq.queue, "capped", 5, 1).await;
    assert_eq!(claim(&tq, 10).await.len(), 2);
    assert_eq!(tq.running().await["capped"], 5);
    tq.cleanup().await;
}

#[tokio::test]
async fn priorities_order_a_tenants_jobs() {
    let tq = TestQueue::new("prio").await;
    let mut ids = HashMap::new();
    for p in [0, 10, -5, 100] {
        let mut s = JobSpec::new("t", "q", "noop");
        s.priority = p;
        ids.insert(tq.enqueue(&s).await, p);
    }
    let order: Vec<i32> = claim(&tq, 4).await.iter().map(|j| ids[&j.id]).collect();
    assert_eq!(order, vec![100, 10, 0, -5]);
    tq.cleanup().await;
}

#[tokio::test]
async fn idempotency_key_returns_the_first_job() {
    let tq = TestQueue::new("idem").await;
    let mut s = JobSpec::new("t", "q", "noop");
    s.idempotency_key = Some("order-42".into());
    let a = tq.queue.enqueue(&s).await.expect("first");
    let b = tq.queue.enqueue(&s).await.expect("second");
    assert!(a.created && !b.created);
    assert_eq!(a.id, b.id);
    // Same key, other tenant: a different job.
    let mut other = s.clone();
    other.tenant = "u".into();
    assert_ne!(
        tq.queue.enqueue(&other).await.expect("other tenant").id,
        a.id
    );
    // Duplicates inside one batch collapse too.
    let mut s2 = s.clone();
    s2.idempotency_key = Some("order-43".into());
    let batch = tq
        .queue
        .enqueue_batch(&[s2.clone(), s2])
        .await
        .expect("batch");
    assert_eq!(batch[0].id, batch[1].id);
    assert!(batch[0].created && !batch[1].created);
    let stats = agentq::queue::inspect::queue_stats(&tq.queue)
        .await
        .expect("stats");
    assert_eq!(stats[0].ready, 3);
    tq.cleanup().await;
}

#[tokio::test]
async fn pause_and_resume_queue_and_tenant() {
    let tq = TestQueue::new("pause").await;
    fill(&tq.queue, "a", "q", 2).await;
    fill(&tq.queue, "b", "q", 2).await;
    assert!(tq.queue.set_paused("q", None, true).await.expect("pause"));
    assert!(
        claim(&tq, 10).await.is_empty(),
        "a paused queue starts nothing"
    );
    assert!(tq.queue.set_paused("q", None, false).await.expect("resume"));
    assert!(
        tq.queue
            .set_paused("q", Some("a"), true)
            .await
            .expect("pause tenant")
    );
    let got = claim(&tq, 10).await;
    assert!(
        got.iter().all(|j| j.tenant == "b") && got.len() == 2,
        "only b runs while a is paused"
    );
    let held = agentq::queue::inspect::tenant_stats(&tq.queue, Some("q"))
        .await
        .expect("tenants");
    assert_eq!(
        held.iter()
            .find(|t| t.tenant == "a")
            .and_then(|t| t.held.clone())
            .as_deref(),
        Some("paused")
    );
    tq.queue
        .set_paused("q", Some("a"), false)
        .await
        .expect("resume tenant");
    assert_eq!(claim(&tq, 10).await.len(), 2);
    tq.cleanup().await;
}

#[tokio::test]
async fn expired_lease_is_reaped_and_late_completion_refused() {
    let tq = TestQueue::new("fence").await;
    tq.queue
        .enqueue(&JobSpec::new("t", "q", "noop"))
        .await
        .expect("enqueue");
    let short = Duration::from_millis(300);
    let first = common::claim(&tq.queue, &["q"], 1, short).await;
    assert_eq!(first.len(), 1);
    tokio::time::sleep(Duration::from_millis(600)).await; // lower bound only: the lease must have expired
    let reaped = tq
        .queue
        .reap(0, Duration::from_millis(1), 100)
        .await
        .expect("reap");
    assert_eq!((reaped.ran, reaped.reaped), (true, 1));
    assert_eq!(tq.running().await["t"], 0, "the reaper frees the slot");
    let lost = tq
        .queue
        .extend(0, LEASE, &[first[0].key()])
        .await
        .expect("extend");
    assert_eq!(
        lost.lost,
        vec![first[0].key()],
        "the old holder cannot extend"
    );
    assert!(lost.cancelled.is_empty());
    let second = claim(&tq, 1).await;
    assert_eq!(second[0].attempt, 2);
    let late = complete(&tq.queue, &[done(&first[0], Outcome::Succeeded)]).await;
    assert_eq!(late, vec![CompleteStatus::Refused]);
    let ok = complete(&tq.queue, &[done(&second[0], Outcome::Succeeded)]).await;
    assert_eq!(ok, vec![CompleteStatus::Succeeded]);
    let outcomes = tq.outbox_outcomes().await;
    assert_eq!(
        outcomes,
        vec!["lost", "succeeded"],
        "one ledger record per attempt"
    );
    tq.cleanup().await;
}

#[tokio::test]
async fn failures_retry_with_backoff_then_die() {
    let tq = TestQueue::new("retry").await;
    let mut s = JobSpec::new("t", "q", "noop");
    s.max_attempts = Some(2);
    let id = tq.enqueue(&s).await;
    let j = claim(&tq, 1).await.remove(0);
    let mut c = done(&j, Outcome::Failed);
    c.backoff_ms = 60_000;
    assert_eq!(
        complete(&tq.queue, &[c]).await,
        vec![CompleteStatus::Delayed]
    );
    assert!(
        claim(&tq, 1).await.is_empty(),
        "a backed-off retry is not ready yet"
    );
    let info = agentq::queue::inspect::job_info(&tq.queue, &id)
        .await
        .expect("inspect");
    assert_eq!(info.state, "delayed");
    assert!(info.run_at.is_some());
    // Second attempt (retry now), then dead.
    tq.queue
        .client()
        .zadd::<(), _, _>(
            tq.queue.keys(0).key(&["q", "q", "delayed"]),
            None,
            None,
            false,
            false,
            (0.0, id.as_str()),
        )
        .await
        .expect("make due");
    let j2 = claim(&tq, 1).await.remove(0);
    assert_eq!(j2.attempt, 2);
    assert_eq!(
        complete(&tq.queue, &[done(&j2, Outcome::TimedOut)]).await,
        vec![CompleteStatus::Dead]
    );
    let info = agentq::queue::inspect::job_info(&tq.queue, &id)
        .await
        .expect("inspect");
    assert_eq!(
        (info.state.as_str(), info.outcome.as_deref(), info.attempts),
        ("dead", Some("timed_out"), 2)
    );
    let stats = agentq::queue::inspect::queue_stats(&tq.queue)
        .await
        .expect("stats");
    assert_eq!(
        (
            stats[0].ready,
            stats[0].delayed,
            stats[0].running,
            stats[0].dead
        ),
        (0, 0, 0, 1)
    );
    tq.cleanup().await;
}

#[tokio::test]
async fn permanent_failure_is_not_retried() {
    let tq = TestQueue::new("perm").await;
    tq.queue
        .enqueue(&JobSpec::new("t", "q", "noop"))
        .await
        .expect("enqueue");
    let j = claim(&tq, 1).await.remove(0);
    let mut c = done(&j, Outcome::Failed);
    c.permanent = true;
    assert_eq!(complete(&tq.queue, &[c]).await, vec![CompleteStatus::Dead]);
    tq.cleanup().await;
}

#[tokio::test]
async fn delayed_jobs_wait_for_their_time() {
    let tq = TestQueue::new("delay").await;
    let mut s = JobSpec::new("t", "q", "noop");
    s.delay = Some(Duration::from_millis(400));
    tq.queue.enqueue(&s).await.expect("enqueue");
    let c = tq
        .queue
        .claim(
            0,
            &agentq::queue::Call::new("w"),
            1,
            LEASE,
            &["q".to_string()],
        )
        .await
        .expect("claim");
    let (due, jobs) = (c.due_in, c.jobs);
    assert!(
        jobs.is_empty() && due.is_some(),
        "not yet, and the claim says when"
    );
    let j = common::eventually(Duration::from_secs(10), "delayed job due", || async {
        claim(&tq, 1).await.pop()
    })
    .await;
    assert!(
        j.started_at_ms - j.enqueued_at_ms >= 400,
        "started {}ms after enqueue",
        j.started_at_ms - j.enqueued_at_ms
    );
    tq.cleanup().await;
}

#[tokio::test]
async fn enqueue_refuses_over_cap_and_bad_input_writing_nothing() {
    let tq = TestQueue::new("refuse").await;
    LimitsUpdate {
        max_timeout: Some(Duration::from_secs(60)),
        max_memory: Some(64 << 20),
        ..Default::default()
    }
    .apply(&tq.queue, agentq::model::limits::Target::Tenant("t"))
    .await
    .expect("set");
    let mut over = JobSpec::new("t", "q", "noop");
    over.timeout = Some(Duration::from_secs(120));
    let e = tq.queue.enqueue(&over).await.unwrap_err();
    assert!(matches!(e, QueueError::OverCap(_)), "{e}");
    assert!(e.to_string().contains("max_timeout of 1m"), "{e}");
    let mut mem = JobSpec::new("t", "q", "noop");
    mem.memory = Some(128 << 20);
    assert!(
        tq.queue
            .enqueue(&mem)
            .await
            .unwrap_err()
            .to_string()
            .contains("max_memory of 64MiB")
    );
    // A batch with one bad job writes none of them.
    let good = JobSpec::new("t", "q", "noop");
    assert!(tq.queue.enqueue_batch(&[good.clone(), over]).await.is_err());
    let stats = agentq::queue::inspect::queue_stats(&tq.queue)
        .await
        .expect("stats");
    assert!(
        stats.iter().all(|s| s.ready == 0),
        "nothing was enqueued: {stats:?}"
    );
    tq.cleanup().await;
}

#[tokio::test]
async fn quota_holds_a_tenant_within_one_job_and_raising_it_releases() {
    let tq = TestQueue::new("quota").await;
    LimitsUpdate {
        max_concurrency: Some(1),
        quota: Some(Duration::from_secs(1)),
        ..Default::default()
    }
    .apply(&tq.queue, agentq::model::limits::Target::Tenant("q1"))
    .await
    .expect("set");
    fill(&tq.queue, "q1", "q", 5).await;
    fill(&tq.queue, "other", "q", 5).await;
    let mut q1_runs = 0;
    for _ in 0..5 {
        let batch = claim(&tq, 2).await;
        for j in &batch {
            let mut c = done(j, Outcome::Succeeded);
            c.run_ms = 600;
            complete(&tq.queue, &[c]).await;
        }
        q1_runs += batch.iter().filter(|j| j.tenant == "q1").count();
    }
    assert_eq!(
        q1_runs, 2,
        "admitted until its usage (1.2s) reached the 1s quota, then held"
    );
    let stats = agentq::queue::inspect::tenant_stats(&tq.queue, None)
        .await
        .expect("tenants");
    let q1 = stats.iter().find(|s| s.tenant == "q1").expect("q1");
    assert_eq!(
        (q1.held.as_deref(), q1.usage_ms, q1.ready),
        (Some("quota"), 1200, 3)
    );
    assert!(
        stats
            .iter()
            .find(|s| s.tenant == "other")
            .is_some_and(|s| s.ready == 0),
        "others kept running"
    );
    LimitsUpdate {
        quota: Some(Duration::from_secs(3600)),
        ..Default::default()
    }
    .apply(&tq.queue, agentq::model::limits::Target::Tenant("q1"))
    .await
    .expect("raise");
    assert_eq!(
        claim(&tq, 1).await.first().map(|j| j.tenant.as_str()),
        Some("q1"),
        "raising the quota releases it"
    );
    tq.cleanup().await;
}

#[tokio::test]
async fn rate_limit_admits_the_burst_then_holds() {
    let tq = TestQueue::new("rate").await;
    common::set_rate(&tq.queue, "r", 2, Some(2)).await;
    fill(&tq.queue, "r", "q", 10).await;
    let c = tq
        .queue
        .claim(
            0,
            &agentq::queue::Call::new("w"),
            10,
            LEASE,
            &["q".to_string()],
        )
        .await
        .expect("claim");
    let (due, first) = (c.due_in, c.jobs);
    assert_eq!(first.len(), 2, "the burst");
    assert!(
        due.is_some_and(|d| d <= Duration::from_secs(1)),
        "the claim says when the tenant may start again: {due:?}"
    );
    let stats = agentq::queue::inspect::tenant_stats(&tq.queue, None)
        .await
        .expect("tenants");
    assert_eq!(stats[0].held.as_deref(), Some("rate"));
    tokio::time::sleep(Duration::from_millis(600)).await; // lower bound: one emission interval (500ms)
    let later = claim(&tq, 10).await.len();
    assert!(
        (1..=2).contains(&later),
        "refilled by elapsed time, never past the burst: {later}"
    );
    tq.cleanup().await;
}
