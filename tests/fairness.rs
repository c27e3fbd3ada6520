//! Fairness across queues, pools, pauses and partitions: the claim script
//! driven directly (deterministic, no timing), and one real worker over
//! four partitions.
//!
//! The bounds under test (README, "Fairness and limits"): a tenant that
//! becomes admissible on a queue — new work, back from its cap, a hold or
//! a pause — is picked within one round of the tenants admissible there,
//! whatever other queues and pools do; a tenant's share is counted across
//! every queue a pool serves; a worker splits its slots across partitions
//! in proportion to the admissible weight in each.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use agentq::executor::Outcome;
use agentq::queue::{ClaimedJob, Completion, Queue, QueueConfig};
use common::{TestQueue, complete, done, eventually, fill, set_cap_and_weight};

const LEASE: Duration = Duration::from_secs(60);

/// One claim of up to `n` jobs from `queues` (a pool serving those queues).
async fn claim(q: &Queue, queues: &[&str], n: usize) -> Vec<ClaimedJob> {
    common::claim(q, queues, n, LEASE).await
}

/// Picks one job at a time from `queues`, completing each at once, until
/// `tenant` is picked; returns how many picks that took (None: not within
/// `limit`).
async fn picks_until(q: &Queue, queues: &[&str], tenant: &str, limit: usize) -> Option<usize> {
    for n in 1..=limit {
        let got = claim(q, queues, 1).await;
        let j = got.first().expect("work left");
        complete(q, &[done(j, Outcome::Succeeded)]).await;
        if j.tenant == tenant {
            return Some(n);
        }
    }
    None
}

/// Serves `picks` jobs from `queues` one batch at a time, completing them.
async fn serve(q: &Queue, queues: &[&str], picks: usize) -> HashMap<String, usize> {
    let mut by = HashMap::new();
    let mut left = picks;
    while left > 0 {
        let got = claim(q, queues, left.min(10)).await;
        assert!(!got.is_empty(), "work left on {queues:?}");
        left -= got.len();
        for j in &got {
            *by.entry(j.tenant.clone()).or_default() += 1;
        }
        let acks: Vec<Completion> = got.iter().map(|j| done(j, Outcome::Succeeded)).collect();
        complete(q, &acks).await;
    }
    by
}

/// Two pools: one on a busy queue, one on a quiet queue. A tenant that
/// arrives on the quiet queue, and one that comes back from its cap there,
/// are served within one round of the quiet queue's tenants however far
/// the busy queue has moved on.
#[tokio::test]
async fn a_newcomer_on_a_quiet_queue_does_not_wait_for_a_busy_queue() {
    let tq = TestQueue::new("fair-quiet").await;
    let q = &tq.queue;
    for t in ["b1", "b2", "b3", "qa", "qb", "new"] {
        set_cap_and_weight(q, t, 1000, 1).await;
    }
    set_cap_and_weight(q, "capped", 1, 1).await;
    for t in ["b1", "b2", "b3"] {
        fill(q, t, "busy", 300).await;
    }
    for t in ["qa", "qb"] {
        fill(q, t, "quiet", 100).await;
    }
    fill(q, "capped", "quiet", 10).await;
    // The quiet pool serves a little: `capped` takes its one slot and holds it.
    let first = claim(q, &["quiet"], 3).await;
    let held = first
        .iter()
        .find(|j| j.tenant == "capped")
        .expect("capped picked in the first round")
        .clone();
    let acks: Vec<Completion> = first
        .iter()
        .filter(|j| j.tenant != "capped")
        .map(|j| done(j, Outcome::Succeeded))
        .collect();
    complete(q, &acks).await;
    // Meanwhile the busy pool serves hundreds of jobs.
    serve(q, &["busy"], 600).await;

    // A newcomer on the quiet queue: W = 3 (qa, qb, new), w = 1.
    fill(q, "new", "quiet", 5).await;
    let n = picks_until(q, &["quiet"], "new", 50).await;
    assert!(
        n.is_some_and(|n| n <= 3),
        "newcomer picked after {n:?} quiet picks, want within ceil(W/w) = 3"
    );
    // Back from its cap: W = 4 (qa, qb, new, capped).
    complete(q, &[done(&held, Outcome::Succeeded)]).await;
    let n = picks_until(q, &["quiet"], "capped", 50).await;
    assert!(
        n.is_some_and(|n| n <= 4),
        "tenant back from its cap picked after {n:?} quiet picks, want within 4"
    );
    tq.cleanup().await;
}

/// One pool over two queues: a tenant with work on both gets one share,
/// not two (spreading work over queues gains nothing).
#[tokio::test]
async fn a_tenant_on_two_queues_of_one_pool_gets_one_share() {
    let tq = TestQueue::new("fair-spread").await;
    let q = &tq.queue;
    for t in ["spread", "single"] {
        set_cap_and_weight(q, t, 1000, 1).await;
    }
    fill(q, "spread", "q1", 200).await;
    fill(q, "spread", "q2", 200).await;
    fill(q, "single", "q1", 200).await;
    let by = serve(q, &["q1", "q2"], 200).await;
    let spread = by.get("spread").copied().unwrap_or(0);
    assert!(
        (90..=110).contains(&spread),
        "spread over two queues got {spread} of 200 picks, want its one share (100 ± 10): {by:?}"
    );
    tq.cleanup().await;
}

/// Pausing a queue (as drain does) and resuming it hands its tenants no
/// credit for the time away: after the resume, a pool over both queues
/// shares picks by weight again at once.
#[tokio::test]
async fn a_resumed_queue_earns_no_credit_for_its_pause() {
    let tq = TestQueue::new("fair-pause").await;
    let q = &tq.queue;
    for t in ["a", "b"] {
        set_cap_and_weight(q, t, 1000, 1).await;
    }
    fill(q, "a", "q1", 200).await;
    fill(q, "b", "q2", 200).await;
    serve(q, &["q1", "q2"], 10).await;
    q.set_paused("q1", None, true).await.expect("pause");
    let during = serve(q, &["q1", "q2"], 60).await;
    assert_eq!(during.get("a"), None, "a paused queue is not served");
    q.set_paused("q1", None, false).await.expect("resume");
    let after = serve(q, &["q1", "q2"], 20).await;
    let a = after.get("a").copied().unwrap_or(0);
    assert!(
        (8..=12).contains(&a),
        "after the resume a got {a} of 20 picks, want its share (10 ± 2): {after:?}"
    );
    // A tenant paused alone comes back at the queue's virtual time: not
    // ahead (no credit) and not behind everyone.
    for t in ["c", "d", "e"] {
        set_cap_and_weight(q, t, 1000, 1).await;
        fill(q, t, "q3", 100).await;
    }
    q.set_paused("q3", Some("c"), true).await.expect("pause c");
    serve(q, &["q3"], 40).await;
    q.set_paused("q3", Some("c"), false)
        .await
        .expect("resume c");
    let back = serve(q, &["q3"], 9).await;
    let c = back.get("c").copied().unwrap_or(0);
    assert!(
        (2..=4).contains(&c),
        "tenant resumed alone got {c} of the next 9 picks, want its share (3 ± 1): {back:?}"
    );
    tq.cleanup().await;
}

/// Names of `n` tenants that live in partition `p` of `parts`.
fn tenants_in(p: u32, parts: u32, n: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("p{p}-t{i}"))
        .filter(|t| agentq::queue::partition_of(t, parts) == p)
        .take(n)
        .collect()
}

/// Four partitions with one, nine, two and three tenants (weights 1 and 2):
/// a worker splits its slots by the admissible weight in each partition,
/// so every tenant's share of starts is within 10% of its weight's share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_follow_weights_across_four_partitions() {
    const PARTS: u32 = 4;
    let ns = common::namespace("fair-parts");
    let mut cfg = QueueConfig::new(common::redis_url());
    cfg.namespace = ns.clone();
    cfg.partitions = PARTS;
    let q = Queue::connect(cfg).await.expect("connect");
    let tq = TestQueue {
        queue: q.clone(),
        ns,
    };
    let mut weights: HashMap<String, u64> = HashMap::new();
    for (p, n) in [(0, 1), (1, 9), (2, 2), (3, 3)] {
        for (i, t) in tenants_in(p, PARTS, n).into_iter().enumerate() {
            weights.insert(t, if p == 3 && i == 0 { 2 } else { 1 });
        }
    }
    for (t, w) in &weights {
        set_cap_and_weight(&q, t, 1000, *w).await;
        fill(&q, t, "q", 400).await;
    }
    let total_weight: u64 = weights.values().sum();
    let mut cfg = common::fast_worker(&["q"], 8);
    cfg.lease = LEASE;
    let worker = tq.start_worker(cfg);
    // Stop well before any tenant runs dry, so all stay backlogged.
    let target = 1500;
    eventually(Duration::from_secs(120), "1500 jobs done", || async {
        let n: i64 = agentq::queue::inspect::queue_stats(&q)
            .await
            .ok()?
            .iter()
            .map(|s| s.ready)
            .sum();
        (weights.len() as i64 * 400 - n >= target).then_some(())
    })
    .await;
    worker.stop().await;
    let mut started: HashMap<String, u64> = HashMap::new();
    for p in 0..PARTS {
        let entries: Vec<(String, HashMap<String, String>)> =
            fred::prelude::StreamsInterface::xrange(
                q.client(),
                q.keys(p).key(&["outbox"]),
                "-",
                "+",
                None,
            )
            .await
            .expect("xrange");
        for (_, f) in entries {
            let f = agentq::model::record::outbox_fields(f);
            *started.entry(f["tenant"].clone()).or_default() += 1;
        }
    }
    let all: u64 = started.values().sum();
    let mut worst = String::new();
    for (t, w) in &weights {
        let want = all as f64 * *w as f64 / total_weight as f64;
        let got = started.get(t).copied().unwrap_or(0) as f64;
        if (got - want).abs() > 0.1 * want {
            worst.push_str(&format!(" {t}: {got} vs {want:.0};"));
        }
    }
    assert!(
        worst.is_empty(),
        "shares off by more than 10% of {all} starts:{worst} (all: {started:?})"
    );
    tq.cleanup().await;
}
