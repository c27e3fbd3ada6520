//! Several worker processes on one Redis, killed with SIGKILL and restarted:
//! fleet-wide caps hold, crashed jobs run again, counters return to zero.

mod common;

use std::collections::HashMap;
use std::process::Child;
use std::time::Duration;

use agentq::queue::JobSpec;
use agentq::queue::inspect::{job_info, queue_stats};
use common::{TestQueue, drained, kill9, num, set_cap, set_rate};
use serde_json::json;

const WORKER_ARGS: [&str; 8] = [
    "--queues",
    "q",
    "--concurrency",
    "4",
    "--lease",
    "1s",
    "--backoff-base",
    "50ms",
];

/// The worker with the most task processes (children of any of its threads).
fn busiest(workers: &[Child]) -> usize {
    let children = |pid: u32| -> usize {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return 0;
        };
        tasks
            .flatten()
            .map(|t| {
                std::fs::read_to_string(t.path().join("children"))
                    .map(|c| c.split_whitespace().count())
                    .unwrap_or(0)
            })
            .sum()
    };
    (0..workers.len())
        .max_by_key(|&i| children(workers[i].id()))
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caps_hold_across_three_processes_while_workers_are_killed() {
    let tq = TestQueue::new("fleet").await;
    for (t, cap) in [("capped", 3), ("other", 2)] {
        set_cap(&tq.queue, t, cap).await;
    }
    let mut jobs = Vec::new();
    for (t, n) in [("capped", 36), ("other", 16)] {
        for _ in 0..n {
            let mut s = JobSpec::new(t, "q", "sleep").payload(&json!({"ms": 300}));
            s.max_attempts = Some(20);
            jobs.push(s);
        }
    }
    let ids: Vec<String> = tq.enqueue_all(&jobs).await;

    let mut workers: Vec<Child> = (0..3).map(|_| tq.spawn_worker(&WORKER_ARGS)).collect();
    // Sample the fleet-wide running counts while killing and restarting workers.
    let sampler_tq = common::TestQueue {
        queue: tq.queue.clone(),
        ns: tq.ns.clone(),
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let stop2 = stop.clone();
    let sampler = tokio::spawn(async move {
        let mut peak: HashMap<String, i64> = HashMap::new();
        while !stop2.is_cancelled() {
            for (t, n) in sampler_tq.running().await {
                let p = peak.entry(t).or_default();
                *p = (*p).max(n);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        peak
    });
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(1200)).await;
        // Kill a worker that is running tasks, so the kill cuts attempts short.
        let i = busiest(&workers);
        kill9(&mut workers[i]);
        workers[i] = tq.spawn_worker(&WORKER_ARGS);
    }
    drained(&tq, Duration::from_secs(240)).await;
    stop.cancel();
    let sampled = sampler.await.expect("sampler");
    for w in &mut workers {
        kill9(w);
    }

    assert!(
        sampled["capped"] <= 3 && sampled["other"] <= 2,
        "sampled running counts: {sampled:?}"
    );
    // Slot intervals from the ledger records: [claimed, closed] per attempt.
    let recs = tq.outbox().await;
    for (t, cap) in [("capped", 3usize), ("other", 2)] {
        let iv: Vec<(i64, i64)> = recs
            .iter()
            .filter(|r| r["tenant"] == t)
            .map(|r| (num(r, "started_at"), num(r, "finished_at")))
            .collect();
        let peak = common::peak_overlap(&iv);
        assert!(
            peak <= cap,
            "tenant {t}: {peak} attempts held slots at once, cap {cap}"
        );
        assert_eq!(
            peak, cap,
            "tenant {t}: the cap is reached, not just respected"
        );
    }
    // Every job succeeded; one ledger record per attempt; counters back to zero.
    for id in &ids {
        let info = job_info(&tq.queue, id).await.expect("inspect");
        assert_eq!(info.state, "succeeded", "{info:?}");
        let n = recs.iter().filter(|r| &r["job"] == id).count() as u64;
        assert_eq!(
            n, info.attempts,
            "job {id}: {n} records for {} attempts",
            info.attempts
        );
    }
    assert!(
        recs.iter().any(|r| r["outcome"] == "lost"),
        "some attempts were cut by the kills"
    );
    assert!(tq.running().await.values().all(|&n| n == 0));
    assert!(
        queue_stats(&tq.queue)
            .await
            .expect("stats")
            .iter()
            .all(|q| q.running == 0 && q.ready == 0)
    );
    tq.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_worker_is_killed_runs_again_after_its_lease() {
    let tq = TestQueue::new("rerun").await;
    let id = tq
        .enqueue(&JobSpec::new("t", "q", "sleep").payload(&json!({"ms": 1500})))
        .await;
    let mut first = tq.spawn_worker(&WORKER_ARGS);
    common::job_in_state(&tq, &id, &["running"]).await;
    kill9(&mut first);
    let mut second = tq.spawn_worker(&WORKER_ARGS);
    let info = common::job_in_state(&tq, &id, &["succeeded"]).await;
    kill9(&mut second);
    assert_eq!(info.attempts, 2);
    let outcomes = tq.outbox_outcomes().await;
    assert_eq!(outcomes, vec!["lost", "succeeded"]);
    tq.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_a_worker_process_cleanly() {
    let tq = TestQueue::new("sigterm").await;
    let id = tq
        .enqueue(&JobSpec::new("t", "q", "sleep").payload(&json!({"ms": 60000})))
        .await;
    let mut w = tq.spawn_worker(&[
        "--queues",
        "q",
        "--shutdown-grace",
        "200ms",
        "--lease",
        "10m",
    ]);
    common::job_in_state(&tq, &id, &["running"]).await;
    // SAFETY-free: libc::kill with a valid pid of our child.
    unsafe { libc::kill(w.id() as i32, libc::SIGTERM) };
    let status = tokio::task::spawn_blocking(move || w.wait())
        .await
        .expect("join")
        .expect("wait");
    assert_eq!(status.code(), Some(0));
    assert_eq!(
        job_info(&tq.queue, &id).await.expect("inspect").state,
        "ready"
    );
    tq.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_holds_across_two_worker_processes() {
    let tq = TestQueue::new("fleet-rate").await;
    set_rate(&tq.queue, "r", 5, Some(2)).await;
    let jobs: Vec<JobSpec> = (0..30).map(|_| JobSpec::new("r", "q", "noop")).collect();
    tq.queue.enqueue_batch(&jobs).await.expect("enqueue");
    let mut workers: Vec<Child> = (0..2).map(|_| tq.spawn_worker(&WORKER_ARGS)).collect();
    drained(&tq, Duration::from_secs(120)).await;
    for w in &mut workers {
        kill9(w);
    }
    let mut starts: Vec<i64> = tq
        .outbox()
        .await
        .iter()
        .map(|r| num(r, "started_at"))
        .collect();
    starts.sort();
    assert_eq!(starts.len(), 30);
    for (i, s) in starts.iter().enumerate() {
        let in_window = starts[i..].iter().take_while(|t| **t < s + 1000).count();
        assert!(
            in_window <= 5 + 2,
            "{in_window} starts within 1s from {s}: over rate 5/s plus burst 2"
        );
    }
    let span = starts[29] - starts[0];
    assert!(
        span >= 28 * 200,
        "30 starts at 5/s with burst 2 take at least 5.6s, took {span}ms"
    );
    tq.cleanup().await;
}
