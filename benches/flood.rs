//! Fairness under a flood: tenant A enqueues a backlog of 50 ms tasks, then
//! tenant B enqueues a few; how long does B wait, and what does fairness
//! cost in drain time against a plain FIFO run of the same jobs?
//!
//!     cargo bench --bench flood                   # A: 2000 jobs, B: 10 jobs, 50 ms each, concurrency 20
//!     BENCH_QUICK=1 cargo bench --bench flood     # A: 400 jobs
//!
//! Tasks are an in-process handler that sleeps TASK_MS (no process spawn,
//! so the figures are about scheduling, not fork/exec). The worker runs
//! before anything is enqueued, as in production. Wait: client-side stamp
//! just before the enqueue call to the handler's start. Drain: first
//! enqueue to the last task's end. FIFO run: the same jobs in the same
//! order, all under one tenant, so agentq's stride scheduler has nothing to
//! interleave and serves them oldest first. Both tenants' caps are set
//! above the worker's concurrency so caps play no part.
//!
//! Knobs: A_JOBS (2000), B_JOBS (10), TASK_MS (50), CONCURRENCY (20).
//! Targets (issue 6): B's max wait <= 2 task durations; fair drain within
//! 5% of FIFO. Writes target/bench/agentq-flood.json.

mod common;

use std::time::Duration;

use agentq::executor::Registry;
use agentq::queue::{JobSpec, Queue};
use common::{BenchWorker, Stamps, Table, knob};

struct Sizes {
    a_jobs: usize,
    b_jobs: usize,
    task_ms: u64,
    concurrency: usize,
}

/// One run's result.
struct Run {
    b_mean: f64,
    b_max: f64,
    a_mean: f64,
    drain: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let sizes = Sizes {
        a_jobs: knob("A_JOBS", 2000, 400),
        b_jobs: knob("B_JOBS", 10, 10),
        task_ms: knob("TASK_MS", 50, 50) as u64,
        concurrency: knob("CONCURRENCY", 20, 20),
    };
    println!(
        "flood: tenant A {} jobs then tenant B {} jobs, {} ms each, worker concurrency {}; {}",
        sizes.a_jobs,
        sizes.b_jobs,
        sizes.task_ms,
        sizes.concurrency,
        common::load_note()
    );
    let fair = run(&sizes, true).await?;
    let fifo = run(&sizes, false).await?;
    report(&sizes, &fair, &fifo)
}

/// `fair`: A's and B's jobs under two tenants; else all under one tenant.
async fn run(sizes: &Sizes, fair: bool) -> anyhow::Result<Run> {
    let queue = common::fresh_queue("flood").await?;
    let body = async {
        let (a, b) = ("tenantA", if fair { "tenantB" } else { "tenantA" });
        for t in [a, b] {
            common::set_tenant_cap(&queue, t, 1000).await?;
        }
        let n = sizes.a_jobs + sizes.b_jobs;
        let stamps = Stamps::new(n);
        let worker = BenchWorker::start(
            &queue,
            common::worker_config(sizes.concurrency),
            Registry::empty(),
            stamps.handlers("task", Duration::from_millis(sizes.task_ms)),
            None,
        );
        // Let the worker connect and subscribe first.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let producer = common::same_namespace(&queue).await?;
        let a_specs: Vec<JobSpec> = (0..sizes.a_jobs)
            .map(|i| common::stamped_spec(a, "task", i))
            .collect();
        let b_specs: Vec<JobSpec> = (sizes.a_jobs..n)
            .map(|i| common::stamped_spec(b, "task", i))
            .collect();
        enqueue_stamped(&producer, &stamps, &a_specs, 0).await?;
        enqueue_stamped(&producer, &stamps, &b_specs, sizes.a_jobs).await?;
        let expected = Duration::from_millis(sizes.task_ms * n as u64 / sizes.concurrency as u64);
        stamps
            .wait_done(n, Duration::from_secs(120) + 4 * expected)
            .await?;
        worker.stop().await?;
        let b_waits = stamps.waits_ms(sizes.a_jobs..n);
        let a_waits = stamps.waits_ms(0..sizes.a_jobs);
        Ok(Run {
            b_mean: common::mean(&b_waits),
            b_max: common::max(&b_waits),
            a_mean: common::mean(&a_waits),
            drain: stamps.span_ms(),
        })
    };
    common::with_cleanup(body, common::remove_namespace(&queue)).await
}

/// Enqueue `specs` (jobs `first..`) in batches of 500, stamping each batch's
/// jobs just before its call.
async fn enqueue_stamped(
    producer: &Queue,
    stamps: &Stamps,
    specs: &[JobSpec],
    first: usize,
) -> anyhow::Result<()> {
    for (k, chunk) in specs.chunks(500).enumerate() {
        let base = first + k * 500;
        (base..base + chunk.len()).for_each(|i| stamps.enqueue(i));
        producer.enqueue_batch(chunk).await?;
    }
    Ok(())
}

fn report(sizes: &Sizes, fair: &Run, fifo: &Run) -> anyhow::Result<()> {
    let mut t = Table::new(&[
        "run",
        "B mean wait ms",
        "B max wait ms",
        "A mean wait ms",
        "drain ms",
    ]);
    for (name, r) in [("fair (agentq)", fair), ("FIFO (one tenant)", fifo)] {
        t.row(vec![
            name.into(),
            format!("{:.1}", r.b_mean),
            format!("{:.1}", r.b_max),
            format!("{:.1}", r.a_mean),
            format!("{:.0}", r.drain),
        ]);
    }
    t.print();
    let b_limit = 2.0 * sizes.task_ms as f64;
    let overhead = (fair.drain / fifo.drain - 1.0) * 100.0;
    println!(
        "target B max wait <= {b_limit:.0} ms: {} ({:.1} ms)",
        verdict(fair.b_max <= b_limit),
        fair.b_max
    );
    println!(
        "target fair drain within 5% of FIFO: {} ({overhead:+.1}%)",
        verdict(overhead <= 5.0)
    );
    let run_json = |r: &Run| {
        serde_json::json!({
            "b_mean_wait_ms": common::r1(r.b_mean),
            "b_max_wait_ms": common::r1(r.b_max),
            "a_mean_wait_ms": common::r1(r.a_mean),
            "drain_ms": r.drain.round(),
        })
    };
    let json = serde_json::json!({
        "task_ms": sizes.task_ms,
        "a_jobs": sizes.a_jobs,
        "b_jobs": sizes.b_jobs,
        "concurrency": sizes.concurrency,
        "fair": run_json(fair),
        "fifo": run_json(fifo),
        "fair_drain_overhead_pct": common::r1(overhead),
        "machine": common::load_note(),
    });
    let path = common::write_json("flood", &json)?;
    println!("wrote {}", path.display());
    Ok(())
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}
