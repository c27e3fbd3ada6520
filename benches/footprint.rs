//! Footprint: Redis memory per queued job, and a real `agentq worker`
//! process's RSS idle and with 256 attempts running.
//!
//!     cargo bench --bench footprint                # 100k queued jobs
//!     BENCH_QUICK=1 cargo bench --bench footprint  # 10k queued jobs, shorter sleeps
//!
//! Redis: by default a private `redis-server` (started on a free port and
//! stopped at the end), so other users of the shared server cannot move
//! `used_memory`; FOOTPRINT_REDIS=shared uses AGENTQ_REDIS_URL instead.
//! Bytes per job = (INFO memory `used_memory` after enqueueing the backlog
//! of no-op jobs over 50 tenants - before) / jobs; also the sum of `MEMORY
//! USAGE` over the namespace's keys / jobs.
//!
//! Worker RSS: the `agentq` binary cargo built for this bench (release
//! profile under `cargo bench`), run as `agentq worker --concurrency 256
//! --no-ledger`; VmRSS from /proc/<pid>/status after it has been idle for
//! 2 s, and the highest VmRSS seen while 256 `sleep` task programs run
//! (plus VmHWM). Task processes are not counted, only the worker.
//!
//! Knobs: JOBS (100000), TENANTS (50), SLEEP_MS (5000), CONCURRENCY (256),
//! FOOTPRINT_REDIS (private|shared). Writes target/bench/agentq-footprint.json.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agentq::queue::{JobSpec, Queue};
use agentq_servers::PrivateRedis;
use common::{Table, grouped, knob};
use fred::prelude::*;

struct Memory {
    before: u64,
    after: u64,
    namespace_bytes: u64,
}

struct Rss {
    idle_kb: u64,
    busy_kb: u64,
    hwm_kb: u64,
    running_seen: i64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let jobs = knob("JOBS", 100_000, 10_000);
    let tenants = knob("TENANTS", 50, 50);
    let concurrency = knob("CONCURRENCY", 256, 256);
    let sleep_ms = knob("SLEEP_MS", 5000, 2500) as u64;
    let shared = std::env::var("FOOTPRINT_REDIS").is_ok_and(|v| v == "shared");
    // Dropping the handle stops the private server.
    let private = if shared {
        None
    } else {
        Some(PrivateRedis::start(&[])?)
    };
    let url = private
        .as_ref()
        .map_or_else(common::redis_url, PrivateRedis::url);
    let redis_kind = if shared { "shared" } else { "private" };
    println!(
        "footprint: {jobs} queued no-op jobs over {tenants} tenants on a {redis_kind} Redis; worker at concurrency {concurrency}; {}",
        common::load_note()
    );

    let mem = redis_memory(&url, jobs, tenants).await?;
    let rss = worker_rss(&url, concurrency, sleep_ms).await?;
    drop(private);

    let per_job = mem.after.saturating_sub(mem.before) as f64 / jobs as f64;
    let per_job_keys = mem.namespace_bytes as f64 / jobs as f64;
    let mut t = Table::new(&["measure", "value"]);
    t.row(vec![
        "Redis used_memory per queued job".into(),
        format!("{per_job:.0} B"),
    ]);
    t.row(vec![
        "Redis MEMORY USAGE of keys per job".into(),
        format!("{per_job_keys:.0} B"),
    ]);
    t.row(vec![
        "worker RSS idle".into(),
        format!("{} KiB", grouped(rss.idle_kb as f64)),
    ]);
    t.row(vec![
        format!("worker RSS, {} running", rss.running_seen),
        format!("{} KiB", grouped(rss.busy_kb as f64)),
    ]);
    t.row(vec![
        "worker peak RSS (VmHWM)".into(),
        format!("{} KiB", grouped(rss.hwm_kb as f64)),
    ]);
    t.print();
    let json = serde_json::json!({
        "jobs": jobs,
        "tenants": tenants,
        "redis_bytes_per_job": per_job.round(),
        "redis_key_bytes_per_job": per_job_keys.round(),
        "redis_used_memory_before": mem.before,
        "redis_used_memory_after": mem.after,
        "redis": redis_kind,
        "worker_rss_idle_kb": rss.idle_kb,
        "worker_rss_c256_kb": rss.busy_kb,
        "worker_rss_hwm_kb": rss.hwm_kb,
        "worker_concurrency": concurrency,
        "worker_running_seen": rss.running_seen,
        "worker": "agentq worker process (release build), VmRSS from /proc",
        "machine": common::load_note(),
    });
    let path = common::write_json("footprint", &json)?;
    println!("wrote {}", path.display());
    Ok(())
}

/// `used_memory` before and after enqueueing the backlog, and the keys' own size.
async fn redis_memory(url: &str, jobs: usize, tenants: usize) -> anyhow::Result<Memory> {
    let queue = common::fresh_queue_at("footprint", url).await?;
    let body = async {
        common::set_tenant_caps(&queue, tenants, 1000).await?;
        let specs = common::round_robin_specs(jobs, tenants, "noop");
        let before = used_memory(&queue).await?;
        common::enqueue_in_batches(&queue, &specs, 500).await?;
        let after = used_memory(&queue).await?;
        let namespace_bytes = namespace_bytes(&queue).await?;
        Ok(Memory {
            before,
            after,
            namespace_bytes,
        })
    };
    common::with_cleanup(body, common::remove_namespace(&queue)).await
}

/// INFO memory `used_memory`.
async fn used_memory(queue: &Queue) -> anyhow::Result<u64> {
    let info: String = queue
        .client()
        .info(Some(fred::types::InfoKind::Memory))
        .await?;
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("INFO memory has no used_memory line"))
}

/// Sum of `MEMORY USAGE key SAMPLES 0` over the namespace's keys.
async fn namespace_bytes(queue: &Queue) -> anyhow::Result<u64> {
    use futures::{StreamExt, TryStreamExt};
    let pattern = format!("{{{}:*", queue.config().namespace);
    let keys: Vec<fred::types::Key> = queue
        .client()
        .scan_buffered(pattern, Some(1000), None)
        .try_collect()
        .await?;
    let sizes: Vec<Result<Option<u64>, fred::error::Error>> = futures::stream::iter(keys)
        .map(|k| async move {
            let args: Vec<fred::types::Value> =
                vec!["USAGE".into(), k.into(), "SAMPLES".into(), "0".into()];
            queue.client().custom(fred::cmd!("MEMORY"), args).await
        })
        .buffer_unordered(256)
        .collect()
        .await;
    let mut total = 0;
    for s in sizes {
        total += s?.unwrap_or(0);
    }
    Ok(total)
}

/// Start a worker process, read its RSS idle and with `concurrency` sleeps running.
async fn worker_rss(url: &str, concurrency: usize, sleep_ms: u64) -> anyhow::Result<Rss> {
    let queue = common::fresh_queue_at("footprint-rss", url).await?;
    let mut child = spawn_worker(&queue, concurrency)?;
    let body = measure_rss(&queue, &child, concurrency, sleep_ms);
    let r = body.await;
    stop_worker(&mut child).await;
    common::remove_namespace(&queue).await;
    r
}

async fn measure_rss(
    queue: &Queue,
    child: &Child,
    concurrency: usize,
    sleep_ms: u64,
) -> anyhow::Result<Rss> {
    let pid = child.id();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_kb = status_kb(pid, "VmRSS")?;

    // Ten jobs per tenant; caps are lifted, so any split would do.
    let tenants = concurrency.div_ceil(10).max(1);
    common::set_tenant_caps(queue, tenants, 1000).await?;
    let payload = serde_json::json!({ "ms": sleep_ms });
    let specs: Vec<JobSpec> = common::round_robin_specs(concurrency, tenants, "sleep")
        .into_iter()
        .map(|s| s.payload(&payload))
        .collect();
    common::enqueue_in_batches(queue, &specs, 500).await?;

    // Sample while all the attempts run; keep the highest reading.
    let until = Instant::now() + Duration::from_millis(sleep_ms) + Duration::from_secs(60);
    let (mut busy_kb, mut running_seen, mut samples) = (0, 0, 0);
    while Instant::now() < until && samples < 10 {
        let running = common::running_now(queue).await?;
        running_seen = running_seen.max(running);
        if running >= concurrency as i64 {
            busy_kb = busy_kb.max(status_kb(pid, "VmRSS")?);
            samples += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::ensure!(
        samples > 0,
        "never saw {concurrency} attempts running at once (at most {running_seen}); raise SLEEP_MS"
    );
    common::wait_drained(queue, Duration::from_millis(100), Duration::from_secs(120)).await?;
    let hwm_kb = status_kb(pid, "VmHWM")?;
    Ok(Rss {
        idle_kb,
        busy_kb,
        hwm_kb,
        running_seen,
    })
}

/// `agentq worker` on the queue's namespace, without ledger or metrics endpoint.
fn spawn_worker(queue: &Queue, concurrency: usize) -> anyhow::Result<Child> {
    let bin = env!("CARGO_BIN_EXE_agentq");
    Command::new(bin)
        .args(["worker", "--no-ledger", "--metrics-addr", "off"])
        .args(["--queues", "bench", "--shutdown-grace", "2s"])
        .args(["--concurrency", &concurrency.to_string()])
        .arg("--workers-dir")
        .arg(common::workers_dir())
        .env("AGENTQ_REDIS_URL", &queue.config().redis_url)
        .env("AGENTQ_NAMESPACE", &queue.config().namespace)
        .env("AGENTQ_LOG", "agentq=warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| anyhow::anyhow!("start {bin}: {e}"))
}

/// SIGTERM, then SIGKILL if it has not exited within 10 s.
async fn stop_worker(child: &mut Child) {
    // SAFETY: kill(2) on a pid we spawned and have not reaped.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A `kB` field of /proc/<pid>/status.
fn status_kb(pid: u32, field: &str) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("/proc/{pid}/status has no {field}"))
}
