//! BullMQ's Rust port (crate `bullmq-official`, lib `bullmq`: the same Lua
//! scripts and Redis layout as Node BullMQ) as agentq's second yardstick.
//!
//!     bullmq-rs-bench [throughput|footprint|peak|latency|all]...   (default: throughput footprint)
//!
//! Each scenario mirrors the one of the same name in
//! benches/compare/bullmq-bench.mjs and writes `bullmq-rs-<scenario>.json`
//! (`peak`: `bullmq-rs-latency-peak.json`) into BENCH_OUT_DIR with the Node
//! side's keys, plus `crate` and `crate_version`. benches/compare/run builds
//! this program in target/bench/bullmq-rs-scratch/ and runs it.
//!
//! - throughput: JOBS no-op jobs (data `{tenant}`) added with `add_bulk` in
//!   chunks of CHUNK into a fresh queue, then one Worker at each concurrency
//!   of CONCURRENCIES with a no-op processor; jobs/s from the Worker's start
//!   until its `Completed` event for every job. Remove-on-complete and
//!   remove-on-fail on (job default `true`, Worker `count: 0`). A fresh key
//!   prefix per run, obliterated and scanned away after. Also Redis's
//!   INFO commandstats and main-thread CPU before and after each drain.
//! - footprint: used_memory after − before a backlog of JOBS jobs on a
//!   private redis-server (FOOTPRINT_REDIS=shared: AGENTQ_REDIS_URL), one job
//!   added first; plus the sum of MEMORY USAGE over the queue's keys.
//! - peak: single `add` calls with 128 in flight into a running Worker
//!   (LATENCY_CONCURRENCY): jobs completed per second over PEAK_SECS after a
//!   second of warm-up (agentq's latency bench measures its peak the same way).
//! - latency: open-loop single `add` calls (every 2 ms tick sends the jobs now
//!   due, none waiting for its reply) at LIGHT_RATE for LIGHT_SECS and at
//!   HEAVY_RATE (benches/compare/run sets it: HEAVY_PCT of the lowest peak of
//!   all systems) or else HEAVY_PCT of the peak in bullmq-rs-latency-peak.json,
//!   for HEAVY_SECS; enqueue-to-start (processor invoked) p50/p99/p99.9 on one
//!   clock.
//!
//! Knobs (env, as on the Node side): JOBS (100000; QUICK 5000, footprint
//! QUICK 10000), TENANTS (50), CHUNK (500), CONCURRENCIES (64,256),
//! LIGHT_RATE (200), LIGHT_SECS (15; QUICK 2), HEAVY_RATE, PEAK (this side's
//! peak, recorded with HEAVY_RATE), HEAVY_PCT (80),
//! HEAVY_SECS (10; QUICK 2), LATENCY_CONCURRENCY (64), PEAK_SECS (5; QUICK 2),
//! FOOTPRINT_REDIS (private|shared), AGENTQ_REDIS_URL
//! (redis://127.0.0.1:6379), BENCH_OUT_DIR (target/bench), QUICK=1 or
//! BENCH_QUICK=1. Never flushes anything.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bullmq::options::RedisConnectionOptions;
use bullmq::types::RemoveOnFinish;
use bullmq::worker::WorkerEvent;
use bullmq::{BulkJob, Job, JobOptions, Queue, QueueOptions, Worker, WorkerOptions};
use serde_json::{json, Value};

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const SCENARIOS: [&str; 4] = ["throughput", "footprint", "peak", "latency"];
const CRATE: &str = "bullmq-official";

fn quick() -> bool {
    ["QUICK", "BENCH_QUICK"]
        .iter()
        .any(|k| std::env::var(k).is_ok_and(|v| v == "1"))
}

/// A positive number from the environment, or the default.
fn env_num(name: &str, default: f64) -> f64 {
    match std::env::var(name) {
        Ok(raw) if !raw.is_empty() => {
            match raw.trim().replace('_', "").parse::<f64>() {
                Ok(n) if n.is_finite() && n > 0.0 => n,
                _ => {
                    eprintln!("{name}={raw} is not a positive number; set it to e.g. {default} or unset it");
                    std::process::exit(2);
                }
            }
        }
        _ => default,
    }
}

struct Cfg {
    url: String,
    out_dir: PathBuf,
    jobs: usize,
    footprint_jobs: usize,
    tenants: usize,
    chunk: usize,
    concurrencies: Vec<usize>,
    light_rate: f64,
    light_secs: f64,
    heavy_pct: f64,
    heavy_secs: f64,
    latency_concurrency: usize,
    peak_secs: f64,
    footprint_shared: bool,
}

impl Cfg {
    fn from_env() -> Cfg {
        let q = quick();
        let out_dir = std::env::var_os("BENCH_OUT_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                std::env::var_os("CARGO_TARGET_DIR")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from("target"))
                    .join("bench")
            });
        let concurrencies = std::env::var("CONCURRENCIES")
            .unwrap_or_else(|_| "64,256".into())
            .split(',')
            .map(|s| {
                s.trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|&c| c > 0)
                    .unwrap_or_else(|| {
                        eprintln!(
                            "CONCURRENCIES must be a comma-separated list of positive numbers"
                        );
                        std::process::exit(2)
                    })
            })
            .collect();
        Cfg {
            url: std::env::var("AGENTQ_REDIS_URL")
                .unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
            out_dir,
            jobs: env_num("JOBS", if q { 5000.0 } else { 100_000.0 }) as usize,
            footprint_jobs: env_num("JOBS", if q { 10_000.0 } else { 100_000.0 }) as usize,
            tenants: env_num("TENANTS", 50.0) as usize,
            chunk: env_num("CHUNK", 500.0) as usize,
            concurrencies,
            light_rate: env_num("LIGHT_RATE", 200.0),
            light_secs: env_num("LIGHT_SECS", if q { 2.0 } else { 15.0 }),
            heavy_pct: env_num("HEAVY_PCT", 80.0),
            heavy_secs: env_num("HEAVY_SECS", if q { 2.0 } else { 10.0 }),
            latency_concurrency: env_num("LATENCY_CONCURRENCY", 64.0) as usize,
            peak_secs: env_num("PEAK_SECS", if q { 2.0 } else { 5.0 }),
            footprint_shared: std::env::var("FOOTPRINT_REDIS").is_ok_and(|v| v == "shared"),
        }
    }
}

/// The bullmq-official version this program was built against (from the
/// committed Cargo.lock, which cargo keeps in step with the build).
fn crate_version() -> &'static str {
    let lock = include_str!("../Cargo.lock");
    let mut lines = lock.lines();
    while let Some(l) = lines.next() {
        if l == format!("name = \"{CRATE}\"") {
            if let Some(v) = lines.next().and_then(|v| v.strip_prefix("version = \"")) {
                return v.trim_end_matches('"');
            }
        }
    }
    "unknown"
}

/// The machine's CPU count and load average, stored with each result (the machine is shared).
fn load_note() -> String {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    format!("machine: {cpus} CPUs, load average {}", load.join(" "))
}

fn random_tag() -> String {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    format!("{:06x}", h.finish() & 0xff_ffff)
}

/// Milliseconds on one monotonic clock for the whole process (enqueue and start stamps).
fn now_ms() -> f64 {
    static T0: OnceLock<Instant> = OnceLock::new();
    T0.get_or_init(Instant::now).elapsed().as_secs_f64() * 1000.0
}

fn round(x: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (x * p).round() / p
}

fn median(xs: &[f64]) -> f64 {
    let mut s = xs.to_vec();
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

/// The Node side's percentile: the value at rank ceil(p% × n).
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0 * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn write_json(cfg: &Cfg, name: &str, mut value: Value) -> Res<()> {
    value["crate"] = json!(CRATE);
    value["crate_version"] = json!(crate_version());
    value["bullmq"] = json!(crate_version());
    value["machine"] = json!(load_note());
    std::fs::create_dir_all(&cfg.out_dir)?;
    let path = cfg.out_dir.join(format!("bullmq-rs-{name}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(&value)? + "\n")?;
    println!("wrote {}", path.display());
    Ok(())
}

// ---- Redis admin helpers ---------------------------------------------------

/// Prefixes of queues not cleaned up yet, so Ctrl-C can remove them.
static LIVE: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());
/// The private redis-server's pid while it runs, so Ctrl-C can stop it.
static PRIVATE_PID: Mutex<Option<u32>> = Mutex::new(None);

async fn admin(url: &str) -> Res<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(url)?;
    Ok(client.get_multiplexed_async_connection().await?)
}

async fn info(conn: &mut redis::aio::MultiplexedConnection, section: &str) -> Res<String> {
    Ok(redis::cmd("INFO").arg(section).query_async(conn).await?)
}

/// Every key under `prefix:`, by SCAN.
async fn scan_keys(conn: &mut redis::aio::MultiplexedConnection, prefix: &str) -> Res<Vec<String>> {
    let mut cursor: u64 = 0;
    let mut keys = Vec::new();
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await?;
        keys.extend(batch);
        cursor = next;
        if cursor == 0 {
            return Ok(keys);
        }
    }
}

async fn unlink_prefix(url: &str, prefix: &str) -> Res<()> {
    let mut conn = admin(url).await?;
    let keys = scan_keys(&mut conn, prefix).await?;
    for chunk in keys.chunks(500) {
        let _: i64 = redis::cmd("UNLINK")
            .arg(chunk)
            .query_async(&mut conn)
            .await?;
    }
    Ok(())
}

/// INFO commandstats and the main thread's CPU time at one moment.
struct RedisStats {
    cmds: HashMap<String, (u64, u64)>,
    cpu_s: f64,
}

impl RedisStats {
    async fn snapshot(conn: &mut redis::aio::MultiplexedConnection) -> Res<RedisStats> {
        let stats = info(conn, "commandstats").await?;
        let cpu = info(conn, "cpu").await?;
        let mut cmds = HashMap::new();
        for line in stats.lines() {
            let Some((name, rest)) = line
                .strip_prefix("cmdstat_")
                .and_then(|l| l.split_once(':'))
            else {
                continue;
            };
            let field = |k: &str| {
                rest.split(',')
                    .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            cmds.insert(name.to_string(), (field("calls"), field("usec")));
        }
        let cpu_field = |k: &str| {
            cpu.lines()
                .find_map(|l| l.strip_prefix(k)?.strip_prefix(':'))
                .and_then(|v| v.trim().parse::<f64>().ok())
        };
        // Redis 7 has per-thread figures; older servers only the process's.
        let cpu_s = match (
            cpu_field("used_cpu_user_main_thread"),
            cpu_field("used_cpu_sys_main_thread"),
        ) {
            (Some(u), Some(s)) => u + s,
            _ => {
                cpu_field("used_cpu_user").unwrap_or(0.0) + cpu_field("used_cpu_sys").unwrap_or(0.0)
            }
        };
        Ok(RedisStats { cmds, cpu_s })
    }

    /// What the server did between `self` and `after`, per job: the keys
    /// the report reads (`redis_us_per_job`, `redis_calls_per_job`, ...).
    fn per_job(&self, after: &RedisStats, jobs: usize) -> Value {
        let n = jobs as f64;
        let mut all = (0u64, 0u64);
        let mut scripts = (0u64, 0u64);
        let mut by: Vec<(String, u64, u64)> = Vec::new();
        for (name, &(c1, u1)) in &after.cmds {
            let (c0, u0) = self.cmds.get(name).copied().unwrap_or((0, 0));
            let (c, u) = (c1.saturating_sub(c0), u1.saturating_sub(u0));
            if c == 0 {
                continue;
            }
            all = (all.0 + c, all.1 + u);
            if matches!(
                name.as_str(),
                "evalsha" | "eval" | "evalsha_ro" | "eval_ro" | "fcall" | "fcall_ro"
            ) {
                scripts = (scripts.0 + c, scripts.1 + u);
            }
            by.push((name.clone(), c, u));
        }
        by.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| a.0.cmp(&b.0)));
        let commands: serde_json::Map<String, Value> = by
            .iter()
            .filter(|(_, c, _)| *c as f64 / n >= 0.001)
            .map(|(name, c, u)| {
                (
                    name.clone(),
                    json!({"calls_per_job": round(*c as f64 / n, 3), "us_per_job": round(*u as f64 / n, 3)}),
                )
            })
            .collect();
        json!({
            "redis_us_per_job": {
                "all": round(all.1 as f64 / n, 3),
                "scripts": round(scripts.1 as f64 / n, 3),
                "cpu": round((after.cpu_s - self.cpu_s) * 1e6 / n, 3),
            },
            "redis_calls_per_job": {
                "all": round(all.0 as f64 / n, 3),
                "scripts": round(scripts.0 as f64 / n, 3),
            },
            "redis_commands": commands,
        })
    }
}

// ---- one queue under its own prefix ----------------------------------------

struct Bench {
    url: String,
    prefix: String,
    queue: Queue,
    admin: redis::aio::MultiplexedConnection,
}

const QUEUE: &str = "bench";

fn connection(url: &str) -> RedisConnectionOptions {
    RedisConnectionOptions::new().url(url)
}

impl Bench {
    async fn new(label: &str, url: &str) -> Res<Bench> {
        let prefix = format!(
            "bullrsbench-{label}-{}-{}",
            std::process::id(),
            random_tag()
        );
        LIVE.lock().unwrap().push((url.to_string(), prefix.clone()));
        // Completed jobs are removed at once: agentq keeps no completed job bodies either.
        let defaults = JobOptions::new()
            .remove_on_complete(RemoveOnFinish::Bool(true))
            .remove_on_fail(RemoveOnFinish::Bool(true));
        let opts = QueueOptions::new()
            .connection(connection(url))
            .prefix(prefix.clone())
            .default_job_options(defaults);
        let queue = Queue::with_options(QUEUE, opts).await?;
        Ok(Bench {
            url: url.to_string(),
            prefix,
            queue,
            admin: admin(url).await?,
        })
    }

    /// One Worker with the whole concurrency and a processor; it starts at once.
    async fn worker<F, Fut>(&self, concurrency: usize, processor: F) -> Res<Arc<Worker>>
    where
        F: Fn(Job, bullmq::worker::CancellationToken) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<Value, bullmq::Error>> + Send + 'static,
    {
        let opts = WorkerOptions::new()
            .connection(connection(&self.url))
            .prefix(self.prefix.clone())
            .concurrency(concurrency)
            .remove_on_complete(RemoveOnFinish::Count(0))
            .remove_on_fail(RemoveOnFinish::Count(0));
        Ok(Arc::new(
            Worker::with_options(QUEUE, processor, opts).await?,
        ))
    }

    /// Adds `n` jobs from `data(i)` in CHUNK-sized add_bulk calls; returns the seconds.
    async fn add_bulk(&self, n: usize, chunk: usize, data: impl Fn(usize) -> Value) -> Res<f64> {
        let t0 = Instant::now();
        for start in (0..n).step_by(chunk.max(1)) {
            let jobs: Vec<BulkJob> = (start..(start + chunk).min(n))
                .map(|i| BulkJob::new("noop", data(i)))
                .collect();
            self.queue.add_bulk(jobs).await?;
        }
        Ok(t0.elapsed().as_secs_f64())
    }

    async fn used_memory(&mut self) -> Res<u64> {
        let mem = info(&mut self.admin, "memory").await?;
        mem.lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| "INFO memory has no used_memory".into())
    }

    /// Keys under this run's prefix and the sum of their MEMORY USAGE.
    async fn key_bytes(&mut self) -> Res<(usize, u64)> {
        let keys = scan_keys(&mut self.admin, &self.prefix).await?;
        let mut bytes = 0;
        for chunk in keys.chunks(1000) {
            let mut p = redis::pipe();
            for k in chunk {
                p.cmd("MEMORY").arg("USAGE").arg(k).arg("SAMPLES").arg(0);
            }
            let sizes: Vec<Option<u64>> = p.query_async(&mut self.admin).await?;
            bytes += sizes.into_iter().flatten().sum::<u64>();
        }
        Ok((keys.len(), bytes))
    }

    /// Obliterates the queue and deletes any key left under the prefix.
    async fn cleanup(self) {
        if let Err(e) = self.queue.obliterate(true, 1000).await {
            eprintln!("obliterate: {e}");
        }
        self.queue.close().await;
        if let Err(e) = unlink_prefix(&self.url, &self.prefix).await {
            eprintln!("warning: could not delete keys under {}: {e}", self.prefix);
        }
        LIVE.lock().unwrap().retain(|(_, p)| p != &self.prefix);
    }
}

/// Counts the Worker's `Completed` events; `wait(n)` returns when `n` jobs completed.
struct Completions {
    done: Arc<AtomicUsize>,
    notify: Arc<tokio::sync::Notify>,
    failed: Arc<Mutex<Option<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Completions {
    fn watch(worker: &Arc<Worker>) -> Completions {
        let done = Arc::new(AtomicUsize::new(0));
        let notify = Arc::new(tokio::sync::Notify::new());
        let failed = Arc::new(Mutex::new(None));
        let (w, d, nt, f) = (worker.clone(), done.clone(), notify.clone(), failed.clone());
        let task = tokio::spawn(async move {
            while let Some(ev) = w.next_event().await {
                match ev {
                    WorkerEvent::Completed { .. } => {
                        d.fetch_add(1, Ordering::SeqCst);
                        nt.notify_waiters();
                    }
                    WorkerEvent::Failed { job_id, error } => {
                        *f.lock().unwrap() = Some(format!("job {job_id} failed: {error}"));
                        nt.notify_waiters();
                    }
                    WorkerEvent::Error(e) => eprintln!("worker error: {e}"),
                    WorkerEvent::Closed => break,
                    _ => {}
                }
            }
        });
        Completions {
            done,
            notify,
            failed,
            task,
        }
    }

    fn count(&self) -> usize {
        self.done.load(Ordering::SeqCst)
    }

    /// Waits until `n` jobs completed (or one failed, or `limit` passed); returns the moment.
    async fn wait(&self, n: usize, limit: Duration) -> Res<Instant> {
        let until = Instant::now() + limit;
        loop {
            let notified = self.notify.notified();
            if self.count() >= n {
                return Ok(Instant::now());
            }
            if let Some(e) = self.failed.lock().unwrap().clone() {
                return Err(e.into());
            }
            if Instant::now() >= until {
                return Err(format!(
                    "only {} of {n} jobs completed after {limit:?}",
                    self.count()
                )
                .into());
            }
            // Notify::notify_waiters wakes only registered waiters; the timeout covers a race.
            let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
        }
    }

    async fn stop(self, worker: &Worker) {
        if let Err(e) = worker.close(5000).await {
            eprintln!("worker close: {e}");
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.task).await;
    }
}

fn tenant_data(tenants: usize) -> impl Fn(usize) -> Value {
    move |i| json!({ "tenant": format!("tenant{}", i % tenants.max(1)) })
}

// ---- scenarios ---------------------------------------------------------------

/// Backlog of JOBS no-op jobs, drained once per concurrency.
async fn throughput(cfg: &Cfg) -> Res<()> {
    let mut enqueue_rates = Vec::new();
    let mut runs = Vec::new();
    for &concurrency in &cfg.concurrencies {
        let bench = Bench::new("tp", &cfg.url).await?;
        let result = async {
            let enq_s = bench.add_bulk(cfg.jobs, cfg.chunk, tenant_data(cfg.tenants)).await?;
            enqueue_rates.push(cfg.jobs as f64 / enq_s);
            let mut stats_conn = admin(&cfg.url).await?;
            let before = RedisStats::snapshot(&mut stats_conn).await?;
            let t0 = Instant::now();
            let worker = bench
                .worker(concurrency, |_job: Job, _token| async { Ok(Value::Null) })
                .await?;
            let completions = Completions::watch(&worker);
            let t1 = completions.wait(cfg.jobs, Duration::from_secs(1800)).await;
            let after = RedisStats::snapshot(&mut stats_conn).await;
            completions.stop(&worker).await;
            let t1 = t1?;
            let rate = cfg.jobs as f64 / (t1 - t0).as_secs_f64();
            let mut run = json!({
                "concurrency": concurrency,
                "ledger": false,
                "jobs_per_s": round(rate, 1),
                "workers": 1,
            });
            let redis = before.per_job(&after?, cfg.jobs);
            for (k, v) in redis.as_object().unwrap() {
                run[k] = v.clone();
            }
            println!(
                "throughput: add_bulk {:.1} jobs/s, process c={concurrency} {:.1} jobs/s, Redis {} µs CPU per job",
                cfg.jobs as f64 / enq_s,
                rate,
                run["redis_us_per_job"]["cpu"]
            );
            runs.push(run);
            Res::Ok(())
        }
        .await;
        bench.cleanup().await;
        result?;
    }
    write_json(
        cfg,
        "throughput",
        json!({
            "jobs": cfg.jobs,
            "tenants": cfg.tenants,
            // Every run enqueues the same backlog; the median is the figure (as on the agentq side).
            "enqueue_per_s": round(median(&enqueue_rates), 1),
            "enqueue_runs_per_s": enqueue_rates.iter().map(|r| round(*r, 1)).collect::<Vec<_>>(),
            "enqueue_batch": cfg.chunk,
            "process": runs,
            "redis_note": "INFO commandstats and main-thread CPU of the whole server from the Worker's start to the last completion: other clients count too; Redis 7 also counts the commands a script runs, so 'all' holds them on top of 'scripts'",
        }),
    )
}

/// A private redis-server on a free port, so other users of the shared one cannot move used_memory.
struct PrivateRedis {
    url: String,
    child: std::process::Child,
}

impl PrivateRedis {
    async fn start() -> Res<PrivateRedis> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--loglevel", "warning"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .map_err(|e| {
                format!("redis-server: {e}; install Redis or set FOOTPRINT_REDIS=shared")
            })?;
        *PRIVATE_PID.lock().unwrap() = Some(child.id());
        let mut redis = PrivateRedis {
            url: format!("redis://127.0.0.1:{port}"),
            child,
        };
        for _ in 0..100 {
            if let Ok(mut c) = admin(&redis.url).await {
                if redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .is_ok()
                {
                    return Ok(redis);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        redis.stop();
        Err(format!("redis-server on port {port} did not answer PING within 5 s").into())
    }

    fn stop(&mut self) {
        terminate(self.child.id());
        let _ = self.child.wait();
        *PRIVATE_PID.lock().unwrap() = None;
    }
}

/// Redis memory per queued (waiting) job, as the Node side measures it.
async fn footprint(cfg: &Cfg) -> Res<()> {
    let mut private = if cfg.footprint_shared {
        None
    } else {
        Some(PrivateRedis::start().await?)
    };
    let url = private.as_ref().map_or(cfg.url.clone(), |p| p.url.clone());
    let result = async {
        let mut bench = Bench::new("fp", &url).await?;
        let r = async {
            // A first job loads the scripts and creates the queue's fixed keys (meta, id counter, events stream).
            bench.queue.add("noop", json!({"tenant": "tenant0"})).await?;
            let before = bench.used_memory().await?;
            let keys_before = bench.key_bytes().await?;
            bench.add_bulk(cfg.footprint_jobs, cfg.chunk, tenant_data(cfg.tenants)).await?;
            let after = bench.used_memory().await?;
            let keys_after = bench.key_bytes().await?;
            let n = cfg.footprint_jobs as f64;
            Res::Ok(json!({
                "jobs": cfg.footprint_jobs,
                "tenants": cfg.tenants,
                "redis_bytes_per_job": ((after as f64 - before as f64) / n).round() as i64,
                "redis_key_bytes_per_job": ((keys_after.1 as f64 - keys_before.1 as f64) / n).round() as i64,
                "redis_keys_per_job": round((keys_after.0 as f64 - keys_before.0 as f64) / n, 3),
                "redis_used_memory_before": before,
                "redis_used_memory_after": after,
                "redis": if cfg.footprint_shared { "shared" } else { "private" },
            }))
        }
        .await;
        bench.cleanup().await;
        r
    }
    .await;
    if let Some(p) = private.as_mut() {
        p.stop();
    }
    let out = result?;
    println!(
        "footprint ({} redis): {} B/job (used_memory delta), {} B/job (MEMORY USAGE of the queue's keys)",
        out["redis"].as_str().unwrap_or("?"),
        out["redis_bytes_per_job"],
        out["redis_key_bytes_per_job"]
    );
    write_json(cfg, "footprint", out)
}

/// A Worker that records enqueue-to-start waits from the job data's `t` stamp.
async fn stamping_worker(
    bench: &Bench,
    cfg: &Cfg,
    waits: &Arc<Mutex<Vec<f64>>>,
) -> Res<Arc<Worker>> {
    let waits = waits.clone();
    let worker = bench
        .worker(cfg.latency_concurrency, move |job: Job, _token| {
            if let Some(t) = job.data().get("t").and_then(Value::as_f64) {
                waits.lock().unwrap().push(now_ms() - t);
            }
            async { Ok(Value::Null) }
        })
        .await?;
    // Let the worker connect and block for jobs first, as both other sides do.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(worker)
}

fn stamped(i: usize, tenants: usize) -> Value {
    json!({ "tenant": format!("tenant{}", i % tenants.max(1)), "t": now_ms() })
}

/// Single `add` calls with 128 in flight into a running Worker: jobs
/// completed per second over PEAK_SECS after a second of warm-up.
async fn peak(cfg: &Cfg) -> Res<()> {
    let bench = Bench::new("peak", &cfg.url).await?;
    let result = async {
        let waits = Arc::new(Mutex::new(Vec::new()));
        let worker = stamping_worker(&bench, cfg, &waits).await?;
        let completions = Completions::watch(&worker);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let next = Arc::new(AtomicUsize::new(0));
        let mut producers = tokio::task::JoinSet::new();
        for _ in 0..128 {
            let (q, stop, next, tenants) =
                (bench.queue.clone(), stop.clone(), next.clone(), cfg.tenants);
            producers.spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    q.add("noop", stamped(i, tenants)).await?;
                }
                Res::Ok(())
            });
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (d0, t0) = (completions.count(), Instant::now());
        tokio::time::sleep(Duration::from_secs_f64(cfg.peak_secs)).await;
        let peak = (completions.count() - d0) as f64 / t0.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        while let Some(r) = producers.join_next().await {
            r??;
        }
        // Every number taken was followed by its add (an error ends the run).
        let sent = next.load(Ordering::Relaxed);
        let waited = completions.wait(sent, Duration::from_secs(300)).await;
        completions.stop(&worker).await;
        waited?;
        println!(
            "peak (e2e, c={}): {peak:.0} jobs/s",
            cfg.latency_concurrency
        );
        Res::Ok(json!({
            "peak_per_s": peak.round(),
            "peak_mode": "e2e",
            "peak_secs": cfg.peak_secs,
            "in_flight": 128,
            "concurrency": cfg.latency_concurrency,
            "tenants": cfg.tenants,
        }))
    }
    .await;
    bench.cleanup().await;
    write_json(cfg, "latency-peak", result?)
}

/// Open loop: single `add` calls at `rate` jobs/s for `secs` (every 2 ms
/// tick sends the jobs now due, none waiting for a reply), each stamped just
/// before its call; records enqueue-to-start (processor invoked).
async fn latency_run(cfg: &Cfg, rate: f64, secs: f64) -> Res<Value> {
    let bench = Bench::new("lat", &cfg.url).await?;
    let total = ((rate * secs).round() as usize).max(1);
    let result = async {
        let waits = Arc::new(Mutex::new(Vec::with_capacity(total)));
        let worker = stamping_worker(&bench, cfg, &waits).await?;
        let completions = Completions::watch(&worker);
        let mut pending = tokio::task::JoinSet::new();
        let t0 = Instant::now();
        let mut sent = 0;
        while sent < total {
            let due = ((t0.elapsed().as_secs_f64() * rate) as usize + 1).min(total);
            while sent < due {
                let (q, data) = (bench.queue.clone(), stamped(sent, cfg.tenants));
                pending.spawn(async move { q.add("noop", data).await.map(|_| ()) });
                sent += 1;
            }
            while let Some(r) = pending.try_join_next() {
                r??;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let send_s = t0.elapsed().as_secs_f64();
        while let Some(r) = pending.join_next().await {
            r??;
        }
        let waited = completions
            .wait(total, Duration::from_secs(120 + 2 * secs as u64))
            .await;
        completions.stop(&worker).await;
        waited?;
        let mut w = waits.lock().unwrap().clone();
        w.sort_by(f64::total_cmp);
        let out = json!({
            "rate_per_s": rate.round(),
            "sent_per_s": (total as f64 / send_s).round(),
            "jobs": w.len(),
            "p50_ms": round(percentile(&w, 50.0), 3),
            "p99_ms": round(percentile(&w, 99.0), 3),
            "p999_ms": round(percentile(&w, 99.9), 3),
            "max_ms": round(w.last().copied().unwrap_or(f64::NAN), 3),
        });
        println!(
            "latency @{}/s (sent {}/s): p50 {} ms, p99 {} ms, p99.9 {} ms, max {} ms",
            out["rate_per_s"],
            out["sent_per_s"],
            out["p50_ms"],
            out["p99_ms"],
            out["p999_ms"],
            out["max_ms"]
        );
        Res::Ok(out)
    }
    .await;
    bench.cleanup().await;
    result
}

/// HEAVY_RATE, or HEAVY_PCT of the peak in bullmq-rs-latency-peak.json.
fn heavy_rate(cfg: &Cfg) -> Res<(f64, Option<f64>, &'static str)> {
    if std::env::var("HEAVY_RATE").is_ok_and(|v| !v.is_empty()) {
        // The caller chose the rate (benches/compare/run: 80% of the slowest system's peak); PEAK is this side's, if given.
        let peak = std::env::var("PEAK")
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|p| *p > 0.0);
        return Ok((env_num("HEAVY_RATE", 1000.0), peak, "HEAVY_RATE"));
    }
    let file = cfg.out_dir.join("bullmq-rs-latency-peak.json");
    let peak = std::fs::read_to_string(&file)
        .ok()
        .and_then(|s| serde_json::from_str::<Value>(&s).ok())
        .and_then(|v| v["peak_per_s"].as_f64())
        .filter(|p| *p > 0.0)
        .ok_or("latency: no bullmq-rs-latency-peak.json yet; run the peak scenario first or set HEAVY_RATE")?;
    Ok((
        (peak * cfg.heavy_pct / 100.0).round(),
        Some(peak),
        "bullmq-rs-latency-peak.json",
    ))
}

async fn latency(cfg: &Cfg) -> Res<()> {
    let (heavy, peak, source) = heavy_rate(cfg)?;
    let light = latency_run(cfg, cfg.light_rate, cfg.light_secs).await?;
    let heavy_out = latency_run(cfg, heavy, cfg.heavy_secs).await?;
    write_json(
        cfg,
        "latency",
        json!({
            "light": light,
            "heavy": heavy_out,
            "peak_per_s": peak,
            "peak_source": source,
            "concurrency": cfg.latency_concurrency,
            "tenants": cfg.tenants,
            "start": "processor invoked",
        }),
    )
}

async fn run(cfg: &Cfg, wanted: &[String]) -> Res<()> {
    for s in SCENARIOS.iter().filter(|s| wanted.iter().any(|w| w == *s)) {
        match *s {
            "throughput" => throughput(cfg).await?,
            "footprint" => footprint(cfg).await?,
            "peak" => peak(cfg).await?,
            "latency" => latency(cfg).await?,
            _ => unreachable!(),
        }
    }
    Ok(())
}

/// SIGTERM to `pid` (redis-server saves nothing and exits), as the Node side
/// stops its private server; `Child::kill` would be SIGKILL.
fn terminate(pid: u32) {
    let _ = std::process::Command::new("kill")
        .arg(pid.to_string())
        .status();
}

/// Removes every queue still under way and stops a private redis-server
/// (Ctrl-C, SIGTERM or a failed run).
async fn cleanup_live() {
    if let Some(pid) = PRIVATE_PID.lock().unwrap().take() {
        terminate(pid);
    }
    let live = std::mem::take(&mut *LIVE.lock().unwrap());
    for (url, prefix) in live {
        let _ = unlink_prefix(&url, &prefix).await;
    }
}

#[tokio::main]
async fn main() {
    let mut wanted: Vec<String> = std::env::args().skip(1).collect();
    if wanted.is_empty() {
        wanted = vec!["throughput".into(), "footprint".into()];
    }
    if wanted.iter().any(|w| w == "all") {
        wanted = SCENARIOS.iter().map(|s| s.to_string()).collect();
    }
    let bad: Vec<&String> = wanted
        .iter()
        .filter(|w| !SCENARIOS.contains(&w.as_str()))
        .collect();
    if !bad.is_empty() {
        eprintln!(
            "unknown scenario {bad:?}; choose from {} or all",
            SCENARIOS.join(", ")
        );
        std::process::exit(2);
    }
    let cfg = Cfg::from_env();
    now_ms();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    let code = tokio::select! {
        r = run(&cfg, &wanted) => match r {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("bullmq-rs bench failed: {e}");
                1
            }
        },
        _ = tokio::signal::ctrl_c() => 130,
        _ = term.recv() => 143,
    };
    cleanup_live().await;
    std::process::exit(code);
}
