//! A running worker process is scraped: counters move with real jobs, gauges
//! come from the sampler, health endpoints answer.

mod common;

use std::time::Duration;

use agentq::queue::JobSpec;
use common::{TestQueue, drained, eventually, http_get};
use serde_json::json;

/// The value of the series `name{...}` whose labels include every `labels` pair.
fn value(metrics: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (series, v) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            (n == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
            .then(|| v.parse().ok())?
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_and_gauges_move_with_real_jobs() {
    let tq = TestQueue::new("metrics").await;
    let port = agentq_servers::free_port().expect("port");
    let addr = format!("127.0.0.1:{port}");
    let mut w = tq.spawn_worker(&[
        "--queues",
        "q",
        "--metrics-addr",
        &addr,
        "--metrics-tenant-labels",
        "all",
    ]);
    let mut jobs: Vec<JobSpec> = (0..5).map(|_| JobSpec::new("m", "q", "echo")).collect();
    let mut bad = JobSpec::new("m", "q", "fail").payload(&json!({"code": 65}));
    bad.max_attempts = Some(1);
    jobs.push(bad);
    tq.queue.enqueue_batch(&jobs).await.expect("enqueue");
    drained(&tq, Duration::from_secs(60)).await;

    let scrape = || async {
        http_get(port, "/metrics")
            .ok()
            .filter(|(s, _)| *s == 200)
            .map(|(_, b)| b)
    };
    let body = eventually(
        Duration::from_secs(60),
        "counters and sampled gauges",
        || async {
            let b = scrape().await?;
            let dead = value(
                &b,
                "agentq_queue_jobs",
                &[("queue", "q"), ("state", "dead")],
            )?;
            (dead == 1.0
                && value(
                    &b,
                    "agentq_jobs_completed_total",
                    &[("outcome", "succeeded")],
                ) == Some(5.0))
            .then_some(b)
        },
    )
    .await;
    assert_eq!(
        value(
            &body,
            "agentq_jobs_started_total",
            &[("queue", "q"), ("tenant", "m")]
        ),
        Some(6.0)
    );
    assert_eq!(
        value(
            &body,
            "agentq_jobs_completed_total",
            &[("tenant", "m"), ("outcome", "failed")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(&body, "agentq_jobs_dead_lettered_total", &[("tenant", "m")]),
        Some(1.0)
    );
    assert_eq!(
        value(
            &body,
            "agentq_job_run_seconds_count",
            &[("outcome", "succeeded")]
        ),
        Some(5.0)
    );
    assert_eq!(
        value(&body, "agentq_tenant_cap", &[("tenant", "m")]),
        Some(10.0)
    );
    assert_eq!(value(&body, "agentq_worker_slots", &[]), Some(8.0));
    assert!(
        value(&body, "agentq_ledger_outbox_backlog", &[]).is_some_and(|v| v >= 6.0),
        "the ledger is off: records wait"
    );

    assert_eq!(http_get(port, "/healthz").expect("healthz").0, 200);
    assert_eq!(http_get(port, "/readyz").expect("readyz").0, 200);
    let _ = w.kill();
    let _ = w.wait();
    tq.cleanup().await;
}
