//! Shared bench support: env knobs, a private namespace and schema per run,
//! a worker in the bench process, start/finish stamps for latency, a table,
//! percentiles and the JSON files the BullMQ comparison reads.
//!
//! Every bench includes this with `mod common;` and uses a subset of it.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use agentq::executor::{HandlerError, HandlerOutput, Handlers, Registry, TaskInput, handler_fn};
use agentq::model::limits::{LimitsUpdate, Target};
use agentq::queue::{JobSpec, Queue, QueueConfig};
use agentq::worker::{Worker, WorkerConfig, WorkerSummary};
use anyhow::Context;
use tokio_util::sync::CancellationToken;

/// True under `BENCH_QUICK=1`: sizes shrink so a bench runs in seconds.
pub fn quick() -> bool {
    std::env::var("BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Knob `name` from the environment; else `quick_default` under
/// `BENCH_QUICK=1`, else `default` (the size).
pub fn knob(name: &str, default: usize, quick_default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v.trim().replace('_', "").parse().unwrap_or_else(|_| {
            eprintln!("{name}={v:?} is not a whole number; using the default");
            if quick() { quick_default } else { default }
        }),
        Err(_) if quick() => quick_default,
        Err(_) => default,
    }
}

/// Knob `name` as a comma-separated list of numbers (e.g. `CONCURRENCY=64,256`).
pub fn knob_list(name: &str, default: &[usize]) -> Vec<usize> {
    let Ok(v) = std::env::var(name) else {
        return default.to_vec();
    };
    let parsed: Result<Vec<usize>, _> = v.split(',').map(|s| s.trim().parse()).collect();
    parsed.unwrap_or_else(|_| {
        eprintln!("{name}={v:?} is not a comma-separated list of numbers; using {default:?}");
        default.to_vec()
    })
}

/// The Redis the benches use.
pub fn redis_url() -> String {
    std::env::var("AGENTQ_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// The PostgreSQL the ledger runs use.
pub fn database_url() -> String {
    std::env::var("AGENTQ_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// The repository's task programs.
pub fn workers_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("workers")
}

/// A queue handle on a fresh namespace `bench-<tag>-<random>` at `url`,
/// its queue `bench` keeping succeeded jobs as the KEEP knob says.
pub async fn fresh_queue_at(tag: &str, url: &str) -> anyhow::Result<Queue> {
    let mut cfg = QueueConfig::new(url);
    cfg.namespace = format!("bench-{tag}-{:08x}", rand::random::<u32>());
    let queue = Queue::connect(cfg)
        .await
        .with_context(|| format!("connect to Redis at {url} (set AGENTQ_REDIS_URL)"))?;
    queue.set_keep_completed("bench", keep_completed()).await?;
    Ok(queue)
}

/// KEEP: how long the bench queue keeps succeeded jobs. `0` (the default)
/// removes them as they succeed, as the BullMQ peers run
/// (removeOnComplete); `default` keeps them for retention_ms (24 h); or a
/// duration such as `10m`.
pub fn keep_completed() -> Option<Duration> {
    let Ok(v) = std::env::var("KEEP") else {
        return Some(Duration::ZERO);
    };
    agentq::queue::parse_keep_completed(&v).unwrap_or_else(|e| {
        eprintln!("KEEP: {e}; using 0");
        Some(Duration::ZERO)
    })
}

/// The KEEP setting as printed in a bench's header and JSON.
pub fn keep_note() -> String {
    match keep_completed() {
        Some(d) if d.is_zero() => "succeeded jobs removed (KEEP=0)".into(),
        Some(d) => format!("succeeded jobs kept {d:?}"),
        None => "succeeded jobs kept for retention_ms (KEEP=default)".into(),
    }
}

/// [`fresh_queue_at`] on [`redis_url`].
pub async fn fresh_queue(tag: &str) -> anyhow::Result<Queue> {
    fresh_queue_at(tag, &redis_url()).await
}

/// A second handle on the same namespace (its own connection), as a
/// producer service would have.
pub async fn same_namespace(queue: &Queue) -> anyhow::Result<Queue> {
    Ok(Queue::connect(queue.config().clone()).await?)
}

/// Remove the namespace; a failure is reported, not fatal.
pub async fn remove_namespace(queue: &Queue) {
    if let Err(e) = queue.delete_namespace().await {
        eprintln!(
            "warning: could not delete namespace {}: {e}",
            queue.config().namespace
        );
    }
}

/// Tenant `t`'s concurrency cap.
pub async fn set_tenant_cap(queue: &Queue, tenant: &str, cap: u64) -> anyhow::Result<()> {
    cap_update(cap).apply(queue, Target::Tenant(tenant)).await?;
    Ok(())
}

/// Caps of tenants `tenant0..tenant<n>`, 32 writes in flight at a time.
pub async fn set_tenant_caps(queue: &Queue, n: usize, cap: u64) -> anyhow::Result<()> {
    use futures::StreamExt;
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(0..n)
        .map(|t| async move { set_tenant_cap(queue, &format!("tenant{t}"), cap).await })
        .buffer_unordered(32)
        .collect()
        .await;
    results.into_iter().collect()
}

/// The concurrency cap of every tenant that sets none.
pub async fn set_default_cap(queue: &Queue, cap: u64) -> anyhow::Result<()> {
    cap_update(cap).apply(queue, Target::Defaults).await?;
    Ok(())
}

fn cap_update(cap: u64) -> LimitsUpdate {
    LimitsUpdate {
        max_concurrency: Some(cap),
        ..Default::default()
    }
}

/// Enqueue `specs` in batches of `batch` (one script call each); returns the
/// seconds it took.
pub async fn enqueue_in_batches(
    queue: &Queue,
    specs: &[JobSpec],
    batch: usize,
) -> anyhow::Result<f64> {
    let t0 = Instant::now();
    for chunk in specs.chunks(batch.max(1)) {
        queue.enqueue_batch(chunk).await?;
    }
    Ok(t0.elapsed().as_secs_f64())
}

/// `jobs` specs of `kind` on queue `bench`, spread round-robin over
/// `tenants` tenants named `tenant<i>`.
pub fn round_robin_specs(jobs: usize, tenants: usize, kind: &str) -> Vec<JobSpec> {
    (0..jobs)
        .map(|i| JobSpec::new(format!("tenant{}", i % tenants.max(1)), "bench", kind))
        .collect()
}

/// INFO commandstats and the Redis main thread's CPU time at one moment,
/// so a run can say what the server spent per job (the same keys as the
/// BullMQ runners in `benches/compare/` write).
pub struct RedisStats {
    /// Command name to (calls, usec).
    cmds: std::collections::HashMap<String, (u64, u64)>,
    /// `used_cpu_user_main_thread + used_cpu_sys_main_thread` (seconds).
    cpu_s: f64,
}

impl RedisStats {
    /// Read INFO commandstats and INFO cpu from `queue`'s Redis.
    pub async fn snapshot(queue: &Queue) -> anyhow::Result<RedisStats> {
        use fred::prelude::*;
        let stats: String = queue
            .client()
            .info(Some(fred::types::InfoKind::CommandStats))
            .await?;
        let cpu: String = queue
            .client()
            .info(Some(fred::types::InfoKind::Cpu))
            .await?;
        Ok(RedisStats::parse(&stats, &cpu))
    }

    /// From the text of INFO commandstats and INFO cpu.
    pub fn parse(commandstats: &str, cpu: &str) -> RedisStats {
        let mut cmds = std::collections::HashMap::new();
        for line in commandstats.lines() {
            let Some((name, rest)) = line
                .trim()
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
                .find_map(|l| l.trim().strip_prefix(k)?.strip_prefix(':'))
                .and_then(|v| v.trim().parse::<f64>().ok())
        };
        // Redis 7 reports the main thread apart; older servers only the process.
        let cpu_s = match (
            cpu_field("used_cpu_user_main_thread"),
            cpu_field("used_cpu_sys_main_thread"),
        ) {
            (Some(u), Some(s)) => u + s,
            _ => {
                cpu_field("used_cpu_user").unwrap_or(0.0) + cpu_field("used_cpu_sys").unwrap_or(0.0)
            }
        };
        RedisStats { cmds, cpu_s }
    }

    /// What the server did between `self` and `after`, per job:
    /// `redis_us_per_job` {`all`: sum of every command's usec (Redis 7
    /// counts the commands a script runs both in their own entry and in the
    /// script's), `scripts`: EVAL/EVALSHA/FCALL usec (their inner commands
    /// included), `cpu`: the main thread's CPU time}, `redis_calls_per_job`
    /// and `redis_commands` (each command's calls and usec per job).
    pub fn per_job(&self, after: &RedisStats, jobs: usize) -> serde_json::Value {
        let n = jobs.max(1) as f64;
        let r3 = |x: f64| (x * 1000.0).round() / 1000.0;
        let (mut all, mut scripts) = ((0u64, 0u64), (0u64, 0u64));
        let mut by: Vec<(&String, u64, u64)> = Vec::new();
        for (name, &(c1, u1)) in &after.cmds {
            let (c0, u0) = self.cmds.get(name).copied().unwrap_or((0, 0));
            let (c, u) = (c1.saturating_sub(c0), u1.saturating_sub(u0));
            if c == 0 {
                continue;
            }
            all = (all.0 + c, all.1 + u);
            if matches!(
                name.as_str(),
                "eval" | "evalsha" | "eval_ro" | "evalsha_ro" | "fcall" | "fcall_ro"
            ) {
                scripts = (scripts.0 + c, scripts.1 + u);
            }
            by.push((name, c, u));
        }
        by.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| a.0.cmp(b.0)));
        let commands: serde_json::Map<String, serde_json::Value> = by
            .iter()
            .filter(|(_, c, _)| *c as f64 / n >= 0.001)
            .map(|(name, c, u)| {
                (
                    name.to_string(),
                    serde_json::json!({
                        "calls_per_job": r3(*c as f64 / n),
                        "us_per_job": r3(*u as f64 / n),
                    }),
                )
            })
            .collect();
        serde_json::json!({
            "redis_us_per_job": {
                "all": r3(all.1 as f64 / n),
                "scripts": r3(scripts.1 as f64 / n),
                "cpu": r3((after.cpu_s - self.cpu_s).max(0.0) * 1e6 / n),
            },
            "redis_calls_per_job": {
                "all": r3(all.0 as f64 / n),
                "scripts": r3(scripts.0 as f64 / n),
            },
            "redis_commands": commands,
        })
    }
}

/// Times of one backlog run, in seconds.
pub struct BacklogRun {
    /// Enqueueing the whole backlog (before the worker starts).
    pub enqueue_s: f64,
    /// From the worker's start until the queue was empty (every completion acknowledged).
    pub acked_s: f64,
    /// Until every job counted: acked, or with a ledger, its row in PostgreSQL.
    pub counted_s: f64,
    /// Completions the worker acknowledged.
    pub completed: u64,
    /// What Redis spent per job from the worker's start until every job
    /// counted ([`RedisStats::per_job`]), or why it could not be read.
    pub redis: serde_json::Value,
}

/// Enqueue `specs` (`batch` per call) with no worker running, then start
/// one with `concurrency` slots, the builtin handlers and `registry`'s task
/// programs (and the ledger writer into `ledger`), and time it until every
/// job counted.
pub async fn process_backlog(
    queue: &Queue,
    specs: &[JobSpec],
    batch: usize,
    concurrency: usize,
    registry: Registry,
    ledger: Option<&LedgerSchema>,
) -> anyhow::Result<BacklogRun> {
    let enqueue_s = enqueue_in_batches(queue, specs, batch).await?;
    let before = RedisStats::snapshot(queue).await;
    let worker = BenchWorker::start(
        queue,
        worker_config(concurrency),
        registry,
        Handlers::with_builtins(),
        ledger.map(|s| s.pool.clone()),
    );
    let t0 = Instant::now();
    let limit = Duration::from_secs(1800);
    wait_drained(queue, Duration::from_millis(10), limit).await?;
    let acked_s = t0.elapsed().as_secs_f64();
    let dead: i64 = agentq::queue::inspect::queue_stats(queue)
        .await?
        .iter()
        .map(|s| s.dead)
        .sum();
    anyhow::ensure!(
        dead == 0,
        "{dead} jobs went dead: the figures would be wrong"
    );
    let counted_s = match ledger {
        Some(s) => {
            s.wait_rows(specs.len() as i64, Duration::from_millis(50), limit)
                .await?;
            t0.elapsed().as_secs_f64()
        }
        None => acked_s,
    };
    let redis = match (before, RedisStats::snapshot(queue).await) {
        (Ok(b), Ok(a)) => b.per_job(&a, specs.len()),
        (Err(e), _) | (_, Err(e)) => serde_json::json!({ "redis_stats_error": e.to_string() }),
    };
    let summary = worker.stop().await?;
    anyhow::ensure!(
        summary.completed as usize >= specs.len(),
        "worker completed {} of {} jobs",
        summary.completed,
        specs.len()
    );
    Ok(BacklogRun {
        enqueue_s,
        acked_s,
        counted_s,
        completed: summary.completed,
        redis,
    })
}

/// Poll every `every` until no job of the namespace is ready, delayed or
/// running (completions acknowledged), or `limit` passes.
pub async fn wait_drained(queue: &Queue, every: Duration, limit: Duration) -> anyhow::Result<()> {
    let until = Instant::now() + limit;
    loop {
        let stats = agentq::queue::inspect::queue_stats(queue).await?;
        if stats.iter().all(|s| s.ready + s.running + s.delayed == 0) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < until,
            "jobs still waiting after {limit:?}: {stats:?}"
        );
        tokio::time::sleep(every).await;
    }
}

/// Jobs running right now across the namespace's queues.
pub async fn running_now(queue: &Queue) -> anyhow::Result<i64> {
    let stats = agentq::queue::inspect::queue_stats(queue).await?;
    Ok(stats.iter().map(|s| s.running).sum())
}

/// Worker settings for a bench: `concurrency` slots on queue `bench`.
pub fn worker_config(concurrency: usize) -> WorkerConfig {
    let mut cfg = WorkerConfig::new(vec!["bench".into()]);
    cfg.concurrency = concurrency;
    cfg.shutdown_grace = Duration::from_secs(5);
    cfg
}

/// A worker running inside the bench process.
pub struct BenchWorker {
    stop: CancellationToken,
    handle: tokio::task::JoinHandle<Result<WorkerSummary, agentq::queue::QueueError>>,
}

impl BenchWorker {
    /// Start a worker; `ledger` also runs the ledger writer into that pool.
    pub fn start(
        queue: &Queue,
        cfg: WorkerConfig,
        registry: Registry,
        handlers: Handlers,
        ledger: Option<sqlx::PgPool>,
    ) -> BenchWorker {
        let mut worker = Worker::new(queue.clone(), cfg, registry, handlers);
        if let Some(pool) = ledger {
            worker = worker.with_ledger(pool);
        }
        let stop = CancellationToken::new();
        let handle = tokio::spawn(worker.run(stop.clone()));
        BenchWorker { stop, handle }
    }

    /// Shut it down gracefully; returns what it did.
    pub async fn stop(self) -> anyhow::Result<WorkerSummary> {
        self.stop.cancel();
        Ok(self.handle.await??)
    }
}

/// A private, migrated PostgreSQL schema `bench_<tag>_<random>` for ledger
/// runs; [`drop`](Self::drop) removes it.
pub struct LedgerSchema {
    admin: sqlx::PgPool,
    /// Pool whose search path is the schema (give it to the worker).
    pub pool: sqlx::PgPool,
    /// Schema name.
    pub schema: String,
}

impl LedgerSchema {
    /// Create and migrate the schema.
    pub async fn create(tag: &str) -> anyhow::Result<LedgerSchema> {
        let url = database_url();
        let schema = format!("bench_{tag}_{:08x}", rand::random::<u32>());
        let admin = agentq::ledger::connect(&url, None)
            .await
            .with_context(|| "connect to PostgreSQL (set AGENTQ_DATABASE_URL)")?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&admin)
            .await?;
        let pool = agentq::ledger::connect(&url, Some(&schema)).await?;
        agentq::ledger::migrate(&pool).await?;
        Ok(LedgerSchema {
            admin,
            pool,
            schema,
        })
    }

    /// Rows in `usage_ledger`.
    pub async fn rows(&self) -> anyhow::Result<i64> {
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM usage_ledger")
            .fetch_one(&self.pool)
            .await?;
        Ok(n)
    }

    /// Poll every `every` until `usage_ledger` holds `want` rows, or `limit` passes.
    pub async fn wait_rows(
        &self,
        want: i64,
        every: Duration,
        limit: Duration,
    ) -> anyhow::Result<()> {
        let until = Instant::now() + limit;
        loop {
            let n = self.rows().await?;
            if n >= want {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < until,
                "ledger holds {n} of {want} rows after {limit:?}"
            );
            tokio::time::sleep(every).await;
        }
    }

    /// Drop the schema; a failure is reported, not fatal.
    pub async fn drop(self) {
        self.pool.close().await;
        let sql = format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema);
        if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&self.admin)
            .await
        {
            eprintln!("warning: could not drop schema {}: {e}", self.schema);
        }
    }
}

/// Per-job times (ns since a common origin) for jobs numbered `0..n`: when
/// the client enqueued each one, when its handler was invoked, and when the
/// handler returned. Unset slots hold 0.
///
/// Start is taken when the in-process handler is invoked: after the claim,
/// the lease and the dispatch to a task, i.e. the moment user code runs.
pub struct Stamps {
    origin: Instant,
    enqueued: Vec<AtomicU64>,
    started: Vec<AtomicU64>,
    finished: Vec<AtomicU64>,
    done: AtomicUsize,
}

impl Stamps {
    /// Room for jobs `0..n`.
    pub fn new(n: usize) -> Arc<Stamps> {
        let zeroes = || (0..n).map(|_| AtomicU64::new(0)).collect();
        Arc::new(Stamps {
            origin: Instant::now(),
            enqueued: zeroes(),
            started: zeroes(),
            finished: zeroes(),
            done: AtomicUsize::new(0),
        })
    }

    fn now(&self) -> u64 {
        // +1 so that a stamp is never 0 (0 means unset).
        self.origin.elapsed().as_nanos() as u64 + 1
    }

    /// Mark job `i` enqueued now (call just before the enqueue call).
    pub fn enqueue(&self, i: usize) {
        self.enqueued[i].store(self.now(), Ordering::Relaxed);
    }

    /// Jobs whose handler has returned.
    pub fn done(&self) -> usize {
        self.done.load(Ordering::Acquire)
    }

    /// Wait until `n` handlers have returned, or `limit` passes. (Times
    /// come from the stamps, so the polling step does not affect them.)
    pub async fn wait_done(&self, n: usize, limit: Duration) -> anyhow::Result<()> {
        let until = Instant::now() + limit;
        while self.done() < n {
            anyhow::ensure!(
                Instant::now() < until,
                "{} of {n} jobs done after {limit:?}",
                self.done()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    /// Enqueue-to-start of job `i` in ms (None if either is unset).
    pub fn wait_ms(&self, i: usize) -> Option<f64> {
        let e = self.enqueued[i].load(Ordering::Relaxed);
        let s = self.started[i].load(Ordering::Relaxed);
        (e > 0 && s > 0).then(|| s.saturating_sub(e) as f64 / 1e6)
    }

    /// Enqueue-to-start in ms of every job in `range` that has both stamps.
    pub fn waits_ms(&self, range: std::ops::Range<usize>) -> Vec<f64> {
        range.filter_map(|i| self.wait_ms(i)).collect()
    }

    /// From the first enqueue to the last finish, in ms.
    pub fn span_ms(&self) -> f64 {
        ms_between(first_set(&self.enqueued), last_set(&self.finished))
    }

    /// From the first enqueue to the last start, in ms.
    pub fn start_span_ms(&self) -> f64 {
        ms_between(first_set(&self.enqueued), last_set(&self.started))
    }

    /// From the last enqueue to the last start, in ms: near zero when the
    /// worker kept up, the leftover backlog's wait when it did not.
    pub fn lag_ms(&self) -> f64 {
        ms_between(last_set(&self.enqueued), last_set(&self.started))
    }

    /// Jobs it has room for.
    pub fn capacity(&self) -> usize {
        self.enqueued.len()
    }

    /// A handler for `kind` jobs with payload `{"i": n}`: stamps the start,
    /// sleeps `work` (if non-zero), stamps the finish.
    pub fn handlers(self: &Arc<Self>, kind: &str, work: Duration) -> Handlers {
        let stamps = self.clone();
        let mut h = Handlers::with_builtins();
        h.register(
            kind,
            handler_fn(move |input: TaskInput| {
                let stamps = stamps.clone();
                async move {
                    let i = job_index(&input)?;
                    if i >= stamps.capacity() {
                        return Err(HandlerError::permanent(format!(
                            "job number {i} out of range"
                        )));
                    }
                    stamps.started[i].store(stamps.now(), Ordering::Relaxed);
                    if !work.is_zero() {
                        tokio::time::sleep(work).await;
                    }
                    stamps.finished[i].store(stamps.now(), Ordering::Relaxed);
                    stamps.done.fetch_add(1, Ordering::AcqRel);
                    Ok(HandlerOutput::default())
                }
            }),
        );
        h
    }
}

fn first_set(v: &[AtomicU64]) -> u64 {
    v.iter()
        .map(|a| a.load(Ordering::Relaxed))
        .filter(|&x| x > 0)
        .min()
        .unwrap_or(0)
}

fn last_set(v: &[AtomicU64]) -> u64 {
    v.iter()
        .map(|a| a.load(Ordering::Relaxed))
        .max()
        .unwrap_or(0)
}

fn ms_between(from: u64, to: u64) -> f64 {
    to.saturating_sub(from) as f64 / 1e6
}

/// The job number `i` of a stamped job's payload `{"i": n}`.
fn job_index(input: &TaskInput) -> Result<usize, HandlerError> {
    #[derive(serde::Deserialize)]
    struct P {
        i: usize,
    }
    serde_json::from_str::<P>(input.payload.get())
        .map(|p| p.i)
        .map_err(|e| HandlerError::permanent(format!("bench payload must be {{\"i\": n}}: {e}")))
}

/// A stamped job: payload `{"i": i}`.
pub fn stamped_spec(tenant: &str, kind: &str, i: usize) -> JobSpec {
    JobSpec::new(tenant, "bench", kind).payload(&serde_json::json!({ "i": i }))
}

/// The value at quantile `q` (0..=1) of `values` (nearest rank); 0 when empty.
pub fn percentile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = (q * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// Mean of `values`; 0 when empty.
pub fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        0.0
    } else {
        values.iter().sum::<f64>() / values.len() as f64
    }
}

/// Largest of `values`; 0 when empty.
pub fn max(values: &[f64]) -> f64 {
    values.iter().copied().fold(0.0, f64::max)
}

/// Round to one decimal (for JSON).
pub fn r1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// `target/bench` (or `$CARGO_TARGET_DIR/bench`).
pub fn out_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("bench")
}

/// Write `value` to `target/bench/agentq-<name>.json`; returns the path.
pub fn write_json(name: &str, value: &serde_json::Value) -> anyhow::Result<PathBuf> {
    let dir = out_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let path = dir.join(format!("agentq-{name}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(value)? + "\n")
        .with_context(|| format!("write {}", path.display()))?;
    Ok(path)
}

/// A plain text table: first column left-aligned, the rest right-aligned.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column names.
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Add a row (cells already formatted).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Print it to stdout.
    pub fn print(&self) {
        let cols = self.header.len();
        let width = |c: usize| {
            std::iter::once(&self.header)
                .chain(&self.rows)
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        };
        let widths: Vec<usize> = (0..cols).map(width).collect();
        let line = |r: &Vec<String>| {
            let cells: Vec<String> = (0..cols)
                .map(|c| {
                    let s = r.get(c).map(String::as_str).unwrap_or("");
                    if c == 0 {
                        format!("{s:<w$}", w = widths[c])
                    } else {
                        format!("{s:>w$}", w = widths[c])
                    }
                })
                .collect();
            println!("{}", cells.join("  ").trim_end());
        };
        line(&self.header);
        println!(
            "{}",
            "-".repeat(widths.iter().sum::<usize>() + 2 * (cols - 1))
        );
        for r in &self.rows {
            line(r);
        }
    }
}

/// A number with thousands separators and no decimals.
pub fn grouped(x: f64) -> String {
    let n = x.round() as i64;
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (k, ch) in digits.chars().enumerate() {
        if k > 0 && (digits.len() - k).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    if n < 0 { format!("-{out}") } else { out }
}

/// One line about the machine's load, printed with every result so noisy
/// figures can be recognised later.
pub fn load_note() -> String {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!(
        "machine: {cpus} CPUs, load average {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    )
}

/// Run `body`, then `cleanup` whatever happened; `body`'s error wins.
pub async fn with_cleanup<T>(
    body: impl std::future::Future<Output = anyhow::Result<T>>,
    cleanup: impl std::future::Future<Output = ()>,
) -> anyhow::Result<T> {
    let r = body.await;
    cleanup.await;
    r
}
