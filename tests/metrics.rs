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
            // Six jobs submitted to Redis (by this test, not a worker):
            // the sampler reads the partitions' sequence counters.
            (dead == 1.0
                && value(&b, "agentq_jobs_submitted_total", &[]) == Some(6.0)
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

/// `agentq_agent_seconds_total` counts fractions of a second: a 0.3 s task
/// adds about 0.3 (the attempt's `run_ms` in the ledger, in seconds), not
/// the whole seconds of it (which would be 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_seconds_count_fractions_of_a_second() {
    let tq = TestQueue::new("metrics_agent_s").await;
    let db = common::TestDb::new("metrics_agent_s").await;
    let port = agentq_servers::free_port().expect("port");
    let addr = format!("127.0.0.1:{port}");
    let mut w = common::Proc(tq.spawn_worker_with(
        &[
            "--queues",
            "q",
            "--metrics-addr",
            &addr,
            "--metrics-tenant-labels",
            "all",
        ],
        &common::WorkerProc {
            database_url: Some(db.url()),
            ..Default::default()
        },
    ));
    tq.queue
        .enqueue(&JobSpec::new("short", "q", "sleep").payload(&json!({"ms": 300})))
        .await
        .expect("enqueue");
    drained(&tq, Duration::from_secs(60)).await;
    let run_ms: i64 = eventually(Duration::from_secs(60), "the ledger row", || async {
        sqlx::query_scalar::<_, i64>("SELECT run_ms FROM usage_ledger WHERE tenant = 'short'")
            .fetch_optional(&db.pool)
            .await
            .ok()
            .flatten()
    })
    .await;
    assert!(
        (300..5_000).contains(&run_ms),
        "the attempt slept 300 ms: run_ms {run_ms}"
    );
    let seconds = eventually(
        Duration::from_secs(30),
        "agentq_agent_seconds_total for tenant short",
        || async {
            let (s, b) = http_get(port, "/metrics").ok()?;
            (s == 200)
                .then(|| value(&b, "agentq_agent_seconds_total", &[("tenant", "short")]))
                .flatten()
        },
    )
    .await;
    assert!(
        (seconds - run_ms as f64 / 1000.0).abs() < 1e-6,
        "agentq_agent_seconds_total = {seconds}, the ledger says {run_ms} ms"
    );
    assert!(
        seconds >= 0.3,
        "a 0.3 s task adds about 0.3 agent-seconds, not 0: {seconds}"
    );
    let _ = w.kill();
    let _ = w.wait();
    tq.cleanup().await;
    db.cleanup().await;
}
