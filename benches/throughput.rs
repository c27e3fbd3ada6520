//! Throughput: batch enqueue of no-op jobs over many tenants, then processing
//! by an in-process worker pool (builtin `noop` kind, ledger outbox on).
//!
//!     cargo bench --bench throughput            # JOBS=20000 TENANTS=50 by default
//!     JOBS=100000 CONCURRENCY=256 cargo bench --bench throughput
//!
//! Prints a table and writes target/bench-throughput.json. Uses its own
//! namespace on AGENTQ_REDIS_URL (default redis://127.0.0.1:6379) and removes it.

use std::time::{Duration, Instant};

use agentq::admission::LimitsUpdate;
use agentq::executor::{Handlers, Registry};
use agentq::queue::{JobSpec, Queue, QueueConfig};
use agentq::worker::{Worker, WorkerConfig};
use tokio_util::sync::CancellationToken;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let jobs = env_usize("JOBS", 20_000);
    let tenants = env_usize("TENANTS", 50);
    let concurrency = env_usize("CONCURRENCY", 64);
    let url = std::env::var("AGENTQ_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let mut cfg = QueueConfig::new(url);
    cfg.namespace = format!("bench-{:06x}", rand::random::<u32>() & 0xff_ffff);
    let queue = Queue::connect(cfg).await?;
    for t in 0..tenants {
        LimitsUpdate {
            max_concurrency: Some(1000),
            ..Default::default()
        }
        .apply(
            &queue,
            agentq::admission::Target::Tenant(&format!("tenant{t}")),
        )
        .await?;
    }

    let specs: Vec<JobSpec> = (0..jobs)
        .map(|i| JobSpec::new(format!("tenant{}", i % tenants), "bench", "noop"))
        .collect();
    let t0 = Instant::now();
    for chunk in specs.chunks(500) {
        queue.enqueue_batch(chunk).await?;
    }
    let enqueue_s = t0.elapsed().as_secs_f64();

    let mut wc = WorkerConfig::new(vec!["bench".into()]);
    wc.concurrency = concurrency;
    let stop = CancellationToken::new();
    let worker = Worker::new(
        queue.clone(),
        wc,
        Registry::empty(),
        Handlers::with_builtins(),
    );
    let t1 = Instant::now();
    let handle = tokio::spawn(worker.run(stop.clone()));
    loop {
        let stats = agentq::queue::inspect::queue_stats(&queue).await?;
        if stats.iter().all(|s| s.ready + s.running + s.delayed == 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let process_s = t1.elapsed().as_secs_f64();
    stop.cancel();
    let summary = handle.await??;
    queue.delete_namespace().await?;

    let enq = jobs as f64 / enqueue_s;
    let proc_rate = summary.completed as f64 / process_s;
    println!(
        "throughput: {jobs} no-op jobs over {tenants} tenants, worker concurrency {concurrency}"
    );
    println!("{:<28} {:>12}", "measure", "jobs/s");
    println!("{:<28} {:>12.0}", "batch enqueue (500/call)", enq);
    println!("{:<28} {:>12.0}", "processing (outbox on)", proc_rate);
    let json = serde_json::json!({
        "jobs": jobs, "tenants": tenants, "concurrency": concurrency,
        "enqueue_jobs_per_s": enq.round(), "process_jobs_per_s": proc_rate.round(),
        "completed": summary.completed,
    });
    std::fs::create_dir_all("target")?;
    std::fs::write(
        "target/bench-throughput.json",
        serde_json::to_string_pretty(&json)?,
    )?;
    Ok(())
}
