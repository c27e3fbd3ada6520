//! `agentq demo`: a worker pool and a mixed multi-tenant workload, with live
//! progress and a per-tenant table read back from the usage ledger.
//!
//! It uses its own Redis namespace (`demo-<random>`) and its own PostgreSQL
//! schema (`agentq_demo_<random>`), and removes both afterwards, so it never
//! touches real queues or billing data on the same servers.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use fred::prelude::*;
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::cli::output;
use crate::cli::{CliError, CliResult, Global};
use crate::executor::{Handlers, Registry};
use crate::model::limits::{LimitsUpdate, Rate, Target};
use crate::queue::{JobSpec, Queue};
use crate::worker::{Worker, WorkerConfig};
use agentq_servers::{PostgresSource, RedisSource};

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
    /// Serve the API and the dashboard (/ui) here while the demo runs (a
    /// free port if this one is taken).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// Don't serve the dashboard.
    #[arg(long, conflicts_with = "stay_up")]
    no_ui: bool,
    /// Keep the dashboard up after the workload until Ctrl-C (then clean up).
    #[arg(long)]
    stay_up: bool,
}

struct TenantPlan {
    name: &'static str,
    tier: &'static str,
    cap: u64,
    weight: u64,
    /// Starts per second (None: the tier's rate is lifted for the demo).
    rate: Option<u64>,
}

const TENANTS: [TenantPlan; 3] = [
    TenantPlan {
        name: "acme",
        tier: "enterprise",
        cap: 6,
        weight: 3,
        rate: None,
    },
    TenantPlan {
        name: "flood",
        tier: "free",
        cap: 4,
        weight: 1,
        rate: Some(25),
    },
    TenantPlan {
        name: "light",
        tier: "pro",
        cap: 3,
        weight: 2,
        rate: None,
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

/// The API and dashboard the demo serves on its own namespace and schema.
struct Dashboard {
    stop: CancellationToken,
    served: tokio::task::JoinHandle<std::io::Result<()>>,
    url: String,
}

impl Dashboard {
    /// Serve on `listen` (or a free port), with an operator key and a key
    /// of tenant acme to sign in with; printed.
    async fn start(listen: &str, queue: &Queue, pool: &PgPool) -> Result<Dashboard, CliError> {
        use crate::http::api::keys::{KeySpec, Scope, create_key};
        let fail = |e: &dyn std::fmt::Display| CliError::Runtime(anyhow::anyhow!("dashboard: {e}"));
        let listener = match tokio::net::TcpListener::bind(listen).await {
            Ok(l) => l,
            Err(_) => tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .map_err(|e| fail(&e))?,
        };
        let addr = listener.local_addr().map_err(|e| fail(&e))?;
        let admin = KeySpec {
            scope: Scope::Admin,
            ..KeySpec::default()
        };
        let admin = create_key(pool, &admin).await.map_err(|e| fail(&e))?;
        let acme = KeySpec {
            tenant: Some("acme".into()),
            ..KeySpec::default()
        };
        let acme = create_key(pool, &acme).await.map_err(|e| fail(&e))?;
        let stop = CancellationToken::new();
        let mut cfg = crate::http::api::ApiConfig::default();
        cfg.ui.stop = stop.clone();
        let api = crate::http::api::Api::new(queue.clone(), pool.clone(), &cfg);
        let served = tokio::spawn(api.serve(listener, stop.clone()));
        let url = format!("http://{addr}/ui");
        println!("Dashboard:  {url}");
        println!("  sign in as operator with {}", admin.key);
        println!("  or as tenant acme with   {}\n", acme.key);
        Ok(Dashboard { stop, served, url })
    }

    /// With `stay_up`, keep serving until Ctrl-C; then stop.
    async fn finish(self, stay_up: bool) {
        if stay_up {
            let ctrl_c = CancellationToken::new();
            if crate::cli::cancel_on_signals(ctrl_c.clone()).is_ok() {
                println!(
                    "\nDashboard still up at {} (--stay-up): Ctrl-C to stop and clean up",
                    self.url
                );
                ctrl_c.cancelled().await;
            }
        }
        self.stop.cancel();
        let _ = self.served.await;
    }
}

/// Run the demo.
pub async fn run(g: &Global, a: DemoArgs) -> CliResult {
    let settings = g.settings()?;
    let redis = RedisSource::find(&settings.redis_url, settings.redis_is_default())
        .map_err(|e| CliError::Runtime(e.into()))?;
    match &redis {
        RedisSource::Private(p) => println!(
            "No Redis configured or listening on 6379: started a private redis-server on {} (data in {})",
            p.url(),
            p.dir().display()
        ),
        RedisSource::External(u) => println!("Redis:      {}", crate::model::redact::redact_url(u)),
    }
    let pg = PostgresSource::find(&settings.database_url, settings.database_is_default())
        .map_err(|e| CliError::Runtime(e.into()))?;
    match &pg {
        PostgresSource::Private(p) => println!(
            "No PostgreSQL configured or listening on 5432: started a private one on {} (data in {})",
            p.url(),
            p.dir().display()
        ),
        PostgresSource::External(u) => {
            println!("PostgreSQL: {}", crate::model::redact::redact_url(u))
        }
    }
    let tag = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
    let mut s = settings.clone();
    s.namespace = format!("demo-{tag}");
    let queue = crate::cli::connect(&s, &redis.url()).await?;
    let ledger = DemoLedger::create(&pg.url(), &format!("agentq_demo_{tag}")).await?;
    let dir = workers_dir(a.workers_dir.clone());
    let registry = Registry::load(&dir).map_err(|e| CliError::Usage(e.to_string()))?;
    println!(
        "Task kinds: {} (from {})",
        registry.kinds().collect::<Vec<_>>().join(", "),
        dir.display()
    );
    println!(
        "Namespace {} and schema {} (both removed at the end)\n",
        s.namespace, ledger.schema
    );

    let ui = if a.no_ui {
        None
    } else {
        match Dashboard::start(&a.listen, &queue, &ledger.pool).await {
            Ok(d) => Some(d),
            Err(e) => {
                eprintln!("warning: {e}; the demo runs without it");
                None
            }
        }
    };
    let result = drive(&a, &queue, &ledger.pool, registry).await;
    if let Some(ui) = ui {
        ui.finish(a.stay_up && result.is_ok()).await;
    }
    if let Err(e) = queue.delete_namespace().await {
        eprintln!("warning: could not remove the demo namespace: {e}");
    }
    ledger.drop_schema().await;
    result
}

async fn drive(a: &DemoArgs, queue: &Queue, pool: &PgPool, registry: Registry) -> CliResult {
    let tiers = demo_tiers();
    crate::queue::limits::publish_tiers(queue, &tiers).await?;
    for t in &TENANTS {
        let rate = Rate {
            starts: t.rate.unwrap_or(0),
            period: Duration::from_secs(1),
        };
        LimitsUpdate {
            max_concurrency: Some(t.cap),
            weight: Some(t.weight),
            tier: Some(t.tier.into()),
            rate: Some(rate),
            ..Default::default()
        }
        .apply(queue, Target::Tenant(t.name))
        .await?;
        let rate = t.rate.map_or("unlimited".to_string(), |r| format!("{r}/s"));
        println!(
            "tenant {:<6} tier {:<10} cap {}  weight {}  rate {rate}",
            t.name, t.tier, t.cap, t.weight
        );
    }

    let shutdown = CancellationToken::new();
    crate::cli::cancel_on_signals(shutdown.clone())?;
    let mut workers = Vec::new();
    for i in 0..a.workers.max(1) {
        let mut cfg = WorkerConfig::new(vec!["default".into()]);
        cfg.id = format!("demo-worker-{i}");
        cfg.concurrency = a.concurrency.max(1);
        cfg.backoff_base = Duration::from_millis(200);
        cfg.kill_grace = Duration::from_millis(500);
        cfg.lease_guard = std::env::current_exe().ok();
        let w = Worker::new(
            queue.clone(),
            cfg,
            registry.clone(),
            Handlers::with_builtins(),
        )
        .with_ledger_and_tiers(pool.clone(), tiers.clone());
        workers.push(tokio::spawn(w.run(shutdown.clone())));
    }
    println!(
        "\n{} workers x {} slots started, each with a ledger writer",
        a.workers.max(1),
        a.concurrency.max(1)
    );

    let started = Instant::now();
    let main = workload(a.scale);
    let total = main.len() + 12;
    queue.enqueue_batch(&main).await?;
    println!(
        "enqueued {} jobs (flood: {}, acme: {})",
        main.len(),
        main.len() - 39,
        39
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    queue.enqueue_batch(&light_jobs()).await?;
    println!("enqueued 12 jobs for light, behind the flood\n");

    let outcome = progress(queue, total, &shutdown).await;
    let outcome = match outcome {
        Ok(()) => ledger_caught_up(queue, &shutdown).await,
        e => e,
    };
    shutdown.cancel();
    for w in workers {
        let _ = w.await;
    }
    outcome?;
    summary(pool, started.elapsed()).await
}

/// The demo's private schema on PostgreSQL, migrated.
struct DemoLedger {
    admin: PgPool,
    pool: PgPool,
    schema: String,
}

impl DemoLedger {
    async fn create(url: &str, schema: &str) -> Result<DemoLedger, CliError> {
        let unreachable = |e: crate::ledger::LedgerError| {
            CliError::Runtime(anyhow::anyhow!(
                "PostgreSQL at {}: {e}",
                crate::model::redact::redact_url(url)
            ))
        };
        // A private server accepts TCP a moment before it takes queries.
        let mut tries = 0;
        let admin = loop {
            match crate::ledger::connect(url, None).await {
                Ok(p) => break p,
                Err(_) if tries < 50 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(unreachable(e)),
            }
        };
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&admin)
            .await
            .map_err(|e| unreachable(e.into()))?;
        let pool = crate::ledger::connect(url, Some(schema))
            .await
            .map_err(unreachable)?;
        crate::ledger::migrate(&pool).await.map_err(unreachable)?;
        Ok(DemoLedger {
            admin,
            pool,
            schema: schema.to_string(),
        })
    }

    async fn drop_schema(self) {
        self.pool.close().await;
        let drop = format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema);
        if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(drop))
            .execute(&self.admin)
            .await
        {
            eprintln!(
                "warning: could not drop the demo schema {}: {e}",
                self.schema
            );
        }
    }
}

/// Wait until the ledger writers have emptied every partition's outbox.
async fn ledger_caught_up(queue: &Queue, stop: &CancellationToken) -> CliResult {
    loop {
        let left = crate::queue::outbox::backlog(queue).await?;
        if left == 0 {
            return Ok(());
        }
        tokio::select! {
            _ = stop.cancelled() => return Err(CliError::Runtime(anyhow::anyhow!("interrupted"))),
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
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

#[derive(sqlx::FromRow)]
struct TenantRow {
    tenant: String,
    jobs: i64,
    attempts: i64,
    succeeded: i64,
    failed: i64,
    timed_out: i64,
    memory_exceeded: i64,
    agent_ms: i64,
    peak_rss: i64,
    longest_wait_ms: i64,
    cost_micros: i64,
}

/// The built-in tiers, with volume pricing on `pro` at thresholds a short
/// demo crosses (README, "Volume pricing"): $0.010 per agent-minute for the
/// first second of the month, $0.008 to 2 s, $0.006 beyond.
fn demo_tiers() -> Vec<crate::model::limits::Tier> {
    let mut tiers = crate::model::limits::builtin_tiers();
    for t in tiers.iter_mut().filter(|t| t.name == "pro") {
        t.limits.price_steps = crate::model::limits::PriceSteps::parse(
            "0.010, 0.008@1s, 0.006@2s",
            crate::model::limits::PriceUnit::Minutes,
        )
        .ok();
    }
    tiers
}

/// How a tenant's cost was billed, from its invoice lines: `flat`, or the
/// agent time in each price step (`20.0s@$0.0100 + 15.2s@$0.0080`).
async fn billed_steps(pool: &PgPool, tenant: &str) -> String {
    let month = chrono::Utc::now().format("%Y-%m").to_string();
    let Ok(inv) = crate::usage::invoice(pool, tenant, &month).await else {
        return "-".into();
    };
    let steps: Vec<String> = inv
        .lines
        .iter()
        .filter(|l| l.item == "agent_minutes")
        .map(|l| {
            format!(
                "{:.1}s@${:.4}",
                l.agent_ms as f64 / 1000.0,
                l.rate_micros.unwrap_or(0) as f64 / 1e6
            )
        })
        .collect();
    if steps.is_empty() {
        "flat".into()
    } else {
        steps.join(" + ")
    }
}

/// Per-tenant table read back from the ledger in PostgreSQL.
async fn summary(pool: &PgPool, elapsed: Duration) -> CliResult {
    let db = |e: sqlx::Error| CliError::Runtime(anyhow::anyhow!("reading the ledger: {e}"));
    let rows: Vec<TenantRow> = sqlx::query_as(
        "SELECT tenant, count(DISTINCT job_id) AS jobs, count(*) AS attempts,
            count(*) FILTER (WHERE outcome = 'succeeded') AS succeeded,
            count(*) FILTER (WHERE outcome = 'failed') AS failed,
            count(*) FILTER (WHERE outcome = 'timed_out') AS timed_out,
            count(*) FILTER (WHERE outcome = 'memory_exceeded') AS memory_exceeded,
            sum(run_ms)::bigint AS agent_ms, max(peak_rss_bytes) AS peak_rss,
            max(wait_ms) AS longest_wait_ms, sum(cost_micros)::bigint AS cost_micros
         FROM usage_ledger GROUP BY tenant ORDER BY tenant",
    )
    .fetch_all(pool)
    .await
    .map_err(db)?;
    let spans: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT tenant, (extract(epoch FROM started_at) * 1000)::bigint, (extract(epoch FROM finished_at) * 1000)::bigint
         FROM usage_ledger",
    )
    .fetch_all(pool)
    .await
    .map_err(db)?;
    let mut intervals: HashMap<String, Vec<(i64, i64)>> = HashMap::new();
    for (t, s, f) in spans {
        intervals.entry(t).or_default().push((s, f));
    }
    let attempts: i64 = rows.iter().map(|r| r.attempts).sum();
    println!(
        "Per tenant, from the usage ledger ({attempts} attempts in {:.1}s):",
        elapsed.as_secs_f64()
    );
    let mut priced = HashMap::new();
    for r in &rows {
        priced.insert(r.tenant.clone(), billed_steps(pool, &r.tenant).await);
    }
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let cap = TENANTS
                .iter()
                .find(|t| t.name == r.tenant)
                .map_or(0, |t| t.cap);
            let peak = peak_overlap(intervals.get(&r.tenant).map_or(&[][..], Vec::as_slice));
            let tier = TENANTS
                .iter()
                .find(|t| t.name == r.tenant)
                .map_or("-", |t| t.tier);
            vec![
                r.tenant.clone(),
                tier.to_string(),
                r.jobs.to_string(),
                format!(
                    "ok {} / failed {} / timeout {} / memory {}",
                    r.succeeded, r.failed, r.timed_out, r.memory_exceeded
                ),
                format!("{:.1}", r.agent_ms as f64 / 1000.0),
                crate::model::units::format_size(r.peak_rss.max(0) as u64),
                format!("{:.2}s", r.longest_wait_ms as f64 / 1000.0),
                format!("{peak}/{cap}"),
                format!("${:.4}", r.cost_micros as f64 / 1e6),
                priced.get(&r.tenant).cloned().unwrap_or_default(),
            ]
        })
        .collect();
    output::table(
        &[
            "tenant",
            "tier",
            "jobs",
            "attempts",
            "agent-s",
            "peak mem",
            "longest wait",
            "peak running/cap",
            "cost",
            "agent time per price step",
        ],
        &table,
    );
    println!(
        "\nlight waited little although flood queued first (fair scheduling); flood never ran more than its cap or faster than its rate."
    );
    println!(
        "the pro tier has volume pricing (0.010, 0.008@1s, 0.006@2s): its cost is billed per step of the month's agent time (agentq invoice --tenant T)."
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

#[cfg(test)]
mod tests {
    #[test]
    fn overlap_counts_concurrent_intervals() {
        assert_eq!(super::peak_overlap(&[(0, 10), (5, 15), (10, 20)]), 2);
        assert_eq!(super::peak_overlap(&[]), 0);
    }
}
