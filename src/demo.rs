//! `agentq demo`: a worker pool and a mixed multi-tenant workload, with live
//! progress and a per-tenant summary at the end.
//!
//! It uses its own namespace (`demo-<random>`) and deletes it afterwards, so
//! it never touches real queues on the same Redis.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use fred::prelude::*;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::admission::LimitsUpdate;
use crate::cli::output;
use crate::cli::{CliError, CliResult, Global};
use crate::executor::{Handlers, Registry};
use crate::queue::{JobSpec, Queue};
use crate::servers::RedisSource;
use crate::worker::{Worker, WorkerConfig};

/// `agentq demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Workers in the pool (each its own claim loop).
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Slots per worker.
    #[arg(long, default_value_t = 6)]
    concurrency: usize,
    /// Folder of task kinds [default: ./workers, else the source tree's].
    #[arg(long)]
    workers_dir: Option<PathBuf>,
    /// Scale the flood tenant's job count (1 = 240 jobs).
    #[arg(long, default_value_t = 1)]
    scale: usize,
}

struct TenantPlan {
    name: &'static str,
    tier: &'static str,
    cap: u64,
    weight: u64,
}

const TENANTS: [TenantPlan; 3] = [
    TenantPlan {
        name: "acme",
        tier: "enterprise",
        cap: 6,
        weight: 3,
    },
    TenantPlan {
        name: "flood",
        tier: "free",
        cap: 4,
        weight: 1,
    },
    TenantPlan {
        name: "light",
        tier: "pro",
        cap: 3,
        weight: 2,
    },
];

fn workers_dir(arg: Option<PathBuf>) -> PathBuf {
    arg.unwrap_or_else(|| {
        let local = PathBuf::from("workers");
        if local.is_dir() {
            local
        } else {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("workers")
        }
    })
}

fn workload(scale: usize) -> Vec<JobSpec> {
    let mut jobs = Vec::new();
    // The flood arrives first: a free-tier tenant dumping a backlog.
    for _ in 0..240 * scale.max(1) {
        jobs.push(JobSpec::new("flood", "default", "sleep").payload(&json!({"ms": 100})));
    }
    for i in 0..36 {
        jobs.push(
            JobSpec::new("acme", "default", "agent-sim")
                .payload(&json!({"mean_ms": 250, "seed": i})),
        );
    }
    // Failures with their own outcomes: retried, timed out, over memory.
    let mut f = JobSpec::new("acme", "default", "fail")
        .payload(&json!({"code": 1, "message": "upstream API returned 503"}));
    f.max_attempts = Some(2);
    jobs.push(f);
    let mut t = JobSpec::new("acme", "default", "sleep").payload(&json!({"ms": 5000}));
    t.timeout = Some(Duration::from_millis(700));
    t.max_attempts = Some(1);
    jobs.push(t);
    let mut m = JobSpec::new("acme", "default", "memhog").payload(&json!({"mib": 400}));
    m.memory = Some(96 << 20);
    m.max_attempts = Some(1);
    jobs.push(m);
    jobs
}

fn light_jobs() -> Vec<JobSpec> {
    (0..12)
        .map(|i| {
            let kind = if i % 2 == 0 { "echo" } else { "agent-sim" };
            JobSpec::new("light", "default", kind).payload(&json!({"mean_ms": 150, "n": i}))
        })
        .collect()
}

/// Run the demo.
pub async fn run(g: &Global, a: DemoArgs) -> CliResult {
    let settings = g.settings()?;
    let source = RedisSource::find(&settings.redis_url, settings.redis_is_default())
        .map_err(|e| CliError::Runtime(e.into()))?;
    match &source {
        RedisSource::Private(p) => println!(
            "No Redis configured or listening on 6379: started a private redis-server on {} (data in {})",
            p.url(),
            p.dir().display()
        ),
        RedisSource::External(u) => println!("Redis: {}", crate::config::redact_url(u)),
    }
    let mut s = settings.clone();
    s.namespace = format!("demo-{:06x}", rand::random::<u32>() & 0xff_ffff);
    let queue = crate::cli::connect(&s, &source.url()).await?;
    let dir = workers_dir(a.workers_dir);
    let registry = Registry::load(&dir).map_err(|e| CliError::Usage(e.to_string()))?;
    println!(
        "Task kinds from {}: {}",
        dir.display(),
        registry.kinds().collect::<Vec<_>>().join(", ")
    );
    println!("Namespace {} (removed at the end)\n", s.namespace);

    for t in &TENANTS {
        LimitsUpdate {
            max_concurrency: Some(t.cap),
            weight: Some(t.weight),
            tier: Some(t.tier.into()),
            ..Default::default()
        }
        .apply(&queue, crate::admission::Target::Tenant(t.name))
        .await?;
        println!(
            "tenant {:<6} tier {:<10} cap {}  weight {}",
            t.name, t.tier, t.cap, t.weight
        );
    }

    let shutdown = CancellationToken::new();
    crate::cli::cancel_on_signals(shutdown.clone())?;
    let mut pool = Vec::new();
    for i in 0..a.workers.max(1) {
        let mut cfg = WorkerConfig::new(vec!["default".into()]);
        cfg.id = format!("demo-worker-{i}");
        cfg.concurrency = a.concurrency.max(1);
        cfg.backoff_base = Duration::from_millis(200);
        cfg.kill_grace = Duration::from_millis(500);
        let w = Worker::new(
            queue.clone(),
            cfg,
            registry.clone(),
            Handlers::with_builtins(),
        );
        pool.push(tokio::spawn(w.run(shutdown.clone())));
    }
    println!(
        "\n{} workers x {} slots started",
        a.workers.max(1),
        a.concurrency.max(1)
    );

    let started = Instant::now();
    let mut total = 0;
    let main = workload(a.scale);
    total += main.len();
    queue.enqueue_batch(&main).await?;
    println!(
        "enqueued {} jobs (flood: {}, acme: {})",
        main.len(),
        main.len() - 39,
        39
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let light = light_jobs();
    total += light.len();
    queue.enqueue_batch(&light).await?;
    println!(
        "enqueued {} jobs for light, behind the flood\n",
        light.len()
    );

    let outcome = progress(&queue, total, &shutdown).await;
    shutdown.cancel();
    for w in pool {
        let _ = w.await;
    }
    let result = match outcome {
        Ok(()) => summary(&queue, started.elapsed()).await,
        Err(e) => Err(e),
    };
    cleanup(&queue).await;
    result
}

/// Jobs finished for good (succeeded or dead), from the queue counters.
async fn finished(queue: &Queue) -> Result<(i64, i64, HashMap<String, i64>), CliError> {
    let stats = crate::queue::inspect::queue_stats(queue).await?;
    let pending: i64 = stats.iter().map(|s| s.ready + s.delayed + s.running).sum();
    let dead: i64 = stats.iter().map(|s| s.dead).sum();
    let running: HashMap<String, i64> = queue
        .client()
        .hgetall(queue.keys(0).key(&["running"]))
        .await
        .map_err(crate::queue::QueueError::from)?;
    Ok((pending, dead, running))
}

async fn progress(queue: &Queue, total: usize, stop: &CancellationToken) -> CliResult {
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut last_line = Instant::now() - Duration::from_secs(10);
    loop {
        let (pending, dead, running) = finished(queue).await?;
        let done = total as i64 - pending;
        let run: Vec<String> = TENANTS
            .iter()
            .map(|t| {
                format!(
                    "{} {}/{}",
                    t.name,
                    running.get(t.name).copied().unwrap_or(0),
                    t.cap
                )
            })
            .collect();
        let line = format!(
            "[{done:>4}/{total}] dead {dead}  running: {}",
            run.join("  ")
        );
        if tty {
            print!("\r{line}   ");
            let _ = std::io::stdout().flush();
        } else if last_line.elapsed() >= Duration::from_secs(2) {
            println!("{line}");
            last_line = Instant::now();
        }
        if pending == 0 {
            println!("{}", if tty { "\n" } else { "" });
            return Ok(());
        }
        tokio::select! {
            _ = stop.cancelled() => return Err(CliError::Runtime(anyhow::anyhow!("interrupted"))),
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}

#[derive(Default)]
struct Row {
    jobs: std::collections::BTreeSet<String>,
    outcomes: BTreeMap<String, u64>,
    longest_wait_ms: u64,
    agent_ms: u64,
    peak_rss: u64,
    intervals: Vec<(i64, i64)>,
}

/// Per-tenant table from the ledger outbox (every attempt's usage record).
async fn summary(queue: &Queue, elapsed: Duration) -> CliResult {
    let entries: Vec<(String, HashMap<String, String>)> = queue
        .client()
        .xrange(queue.keys(0).key(&["outbox"]), "-", "+", None)
        .await
        .map_err(crate::queue::QueueError::from)?;
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    for (_, f) in &entries {
        let num = |k: &str| f.get(k).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
        let r = rows
            .entry(f.get("tenant").cloned().unwrap_or_default())
            .or_default();
        r.jobs.insert(f.get("job").cloned().unwrap_or_default());
        *r.outcomes
            .entry(f.get("outcome").cloned().unwrap_or_default())
            .or_default() += 1;
        r.longest_wait_ms = r.longest_wait_ms.max(num("wait_ms").max(0) as u64);
        r.agent_ms += num("run_ms").max(0) as u64;
        r.peak_rss = r.peak_rss.max(num("peak_rss").max(0) as u64);
        r.intervals
            .push((num("started_at"), num("started_at") + num("run_ms")));
    }
    println!(
        "Per tenant ({} attempts in {:.1}s):",
        entries.len(),
        elapsed.as_secs_f64()
    );
    let table: Vec<Vec<String>> = TENANTS
        .iter()
        .map(|t| {
            let r = rows.remove(t.name).unwrap_or_default();
            let outcomes: Vec<String> =
                r.outcomes.iter().map(|(k, v)| format!("{k}:{v}")).collect();
            vec![
                t.name.to_string(),
                t.tier.to_string(),
                r.jobs.len().to_string(),
                outcomes.join(" "),
                format!("{:.1}", r.agent_ms as f64 / 1000.0),
                crate::units::format_size(r.peak_rss),
                format!("{:.2}s", r.longest_wait_ms as f64 / 1000.0),
                format!("{}/{}", peak_overlap(&r.intervals), t.cap),
            ]
        })
        .collect();
    output::table(
        &[
            "tenant",
            "tier",
            "jobs",
            "attempts by outcome",
            "agent-s",
            "peak mem",
            "longest wait",
            "peak running/cap",
        ],
        &table,
    );
    println!(
        "\nlight's longest wait stayed short although flood's backlog was queued first: fair scheduling across tenants."
    );
    Ok(())
}

/// Most intervals open at once (start inclusive, end exclusive).
pub fn peak_overlap(intervals: &[(i64, i64)]) -> usize {
    let mut ev: Vec<(i64, i32)> = intervals
        .iter()
        .flat_map(|&(s, e)| [(s, 1), (e, -1)])
        .collect();
    ev.sort();
    let (mut cur, mut peak) = (0i32, 0i32);
    for (_, d) in ev {
        cur += d;
        peak = peak.max(cur);
    }
    peak.max(0) as usize
}

async fn cleanup(queue: &Queue) {
    if let Err(e) = queue.delete_namespace().await {
        eprintln!("warning: could not remove the demo namespace: {e}");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn overlap_counts_concurrent_intervals() {
        assert_eq!(super::peak_overlap(&[(0, 10), (5, 15), (10, 20)]), 2);
        assert_eq!(super::peak_overlap(&[]), 0);
    }
}
