//! Throughput: batch-enqueue a backlog of no-op jobs over many tenants (each
//! with a concurrency cap set), then process it with an in-process worker
//! (builtin `noop` kind) at each concurrency, ledger off and on.
//!
//!     cargo bench --bench throughput                 # 100k jobs, 50 tenants, concurrency 64 and 256
//!     BENCH_QUICK=1 cargo bench --bench throughput   # 5k jobs, seconds
//!
//! Knobs: JOBS (100000), TENANTS (50), BATCH (500 jobs per enqueue call),
//! CONCURRENCY (64,256), LEDGER (off,on), CAP (1000, each tenant's cap), KEEP
//! (0: succeeded jobs removed, as the BullMQ peers run; `default`: kept 24 h),
//! EVENTS (on: the bench queue publishes job events, the default; off; or
//! `on,off` to run both side by side and read their cost), PRICE_STEPS
//! (off: tenants priced flat, the default; on: every tenant has graduated
//! price steps, so each completion reads and increments its month's usage
//! counter and writes a billing note; `off,on,off,on,off,on` alternates
//! runs for a median of pairs on a noisy machine).
//! Ledger on: a job counts only once its row is in PostgreSQL (the run ends
//! when `usage_ledger` holds every row). Also what Redis spent per job over
//! each run (INFO commandstats and the main thread's CPU time, before the
//! worker starts and after every job counted; the whole server, so run it
//! on a Redis of its own for clean figures, as benches/compare/run does).
//! Writes target/bench/agentq-throughput.json.

mod common;

use agentq::executor::Registry;
use common::{LedgerSchema, Table, grouped, knob, knob_list};

/// One processing run's results.
struct Run {
    concurrency: usize,
    ledger: bool,
    events: bool,
    steps: bool,
    enqueue_per_s: f64,
    /// Jobs/s until the queue was empty (every completion acknowledged).
    acked_per_s: f64,
    /// Jobs/s until the job counted: acked (ledger off) or its row in PostgreSQL (on).
    jobs_per_s: f64,
    completed: u64,
    /// Redis per job over the run ([`common::RedisStats::per_job`]).
    redis: serde_json::Value,
}

struct Sizes {
    jobs: usize,
    tenants: usize,
    batch: usize,
    cap: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let sizes = Sizes {
        jobs: knob("JOBS", 100_000, 5_000),
        tenants: knob("TENANTS", 50, 50),
        batch: knob("BATCH", 500, 500),
        cap: knob("CAP", 1000, 1000) as u64,
    };
    let concurrencies = knob_list("CONCURRENCY", &[64, 256]);
    let ledgers = ledger_modes();
    let events = on_off_list("EVENTS", "on");
    let steps = on_off_list("PRICE_STEPS", "off");
    println!(
        "throughput: {} no-op jobs over {} tenants (cap {} each), batch enqueue {} per call, {}; {}",
        sizes.jobs,
        sizes.tenants,
        sizes.cap,
        sizes.batch,
        common::keep_note(),
        common::load_note()
    );

    let mut runs = Vec::new();
    for &ledger in &ledgers {
        for &c in &concurrencies {
            for &ev in &events {
                for &st in &steps {
                    let run = run_once(&sizes, c, ledger, ev, st).await?;
                    eprintln!(
                        "  concurrency {c}, ledger {}, events {}, price steps {}: {:.0} jobs/s, Redis CPU {} us/job",
                        on_off(ledger),
                        on_off(ev),
                        on_off(st),
                        run.jobs_per_s,
                        redis_us(&run.redis, "cpu")
                    );
                    runs.push(run);
                }
            }
        }
    }
    report(&sizes, &runs)
}

/// `LEDGER=off`, `on` or `off,on` (default).
fn ledger_modes() -> Vec<bool> {
    on_off_list("LEDGER", "off,on")
}

/// A knob of `on`/`off` values, comma-separated, in the order given.
fn on_off_list(name: &str, default: &str) -> Vec<bool> {
    let v = std::env::var(name).unwrap_or_else(|_| default.into());
    let modes: Vec<bool> = v
        .split(',')
        .filter_map(|s| match s.trim() {
            "off" | "false" | "0" => Some(false),
            "on" | "true" | "1" => Some(true),
            _ => None,
        })
        .collect();
    if modes.is_empty() {
        eprintln!("{name}={v:?}: use off, on or off,on; running {default}");
        return on_off_list_default(default);
    }
    modes
}

fn on_off_list_default(default: &str) -> Vec<bool> {
    default.split(',').map(|s| s == "on").collect()
}

/// `redis_us_per_job.<key>` of a run's Redis figures, for the table.
fn redis_us(redis: &serde_json::Value, key: &str) -> String {
    redis["redis_us_per_job"][key]
        .as_f64()
        .map_or_else(|| "-".into(), |x| format!("{x:.1}"))
}

fn on_off(b: bool) -> &'static str {
    if b { "on" } else { "off" }
}

/// Fresh namespace (and schema): enqueue the backlog, then process it.
async fn run_once(
    sizes: &Sizes,
    concurrency: usize,
    ledger: bool,
    events: bool,
    steps: bool,
) -> anyhow::Result<Run> {
    let queue = common::fresh_queue("throughput").await?;
    queue.set_job_events("bench", events).await?;
    let schema = match ledger {
        true => Some(LedgerSchema::create("throughput").await?),
        false => None,
    };
    let body = async {
        common::set_tenant_caps(&queue, sizes.tenants, sizes.cap).await?;
        if steps {
            // Thresholds low enough that no-op jobs cross them.
            let u = agentq::model::limits::LimitsUpdate {
                price_steps: Some(
                    agentq::model::limits::PriceSteps::parse(
                        "0.010, 0.008@100ms, 0.006@500ms",
                        agentq::model::limits::PriceUnit::Minutes,
                    )
                    .map_err(anyhow::Error::msg)?,
                ),
                ..Default::default()
            };
            for t in 0..sizes.tenants {
                u.apply(
                    &queue,
                    agentq::model::limits::Target::Tenant(&format!("tenant{t}")),
                )
                .await?;
            }
        }
        let specs = common::round_robin_specs(sizes.jobs, sizes.tenants, "noop");
        let run = common::process_backlog(
            &queue,
            &specs,
            sizes.batch,
            concurrency,
            Registry::empty(),
            schema.as_ref(),
        )
        .await?;
        let jobs = sizes.jobs as f64;
        Ok(Run {
            concurrency,
            ledger,
            events,
            steps,
            enqueue_per_s: jobs / run.enqueue_s,
            acked_per_s: jobs / run.acked_s,
            jobs_per_s: jobs / run.counted_s,
            completed: run.completed,
            redis: run.redis,
        })
    };
    let result = body.await;
    common::remove_namespace(&queue).await;
    if let Some(s) = schema {
        s.drop().await;
    }
    result
}

fn report(sizes: &Sizes, runs: &[Run]) -> anyhow::Result<()> {
    let enqueue: Vec<f64> = runs.iter().map(|r| r.enqueue_per_s).collect();
    // Every run enqueues the same backlog; the median is the figure.
    let enqueue_per_s = common::percentile(&enqueue, 0.5);
    let mut t = Table::new(&[
        "measure",
        "concurrency",
        "ledger",
        "events",
        "price steps",
        "jobs/s",
        "Redis CPU us/job",
        "Redis cmd us/job",
    ]);
    t.row(vec![
        format!("batch enqueue ({}/call, median)", sizes.batch),
        "-".into(),
        "-".into(),
        "-".into(),
        "-".into(),
        grouped(enqueue_per_s),
        "-".into(),
        "-".into(),
    ]);
    for r in runs {
        t.row(vec![
            "processing".into(),
            r.concurrency.to_string(),
            on_off(r.ledger).into(),
            on_off(r.events).into(),
            on_off(r.steps).into(),
            grouped(r.jobs_per_s),
            redis_us(&r.redis, "cpu"),
            redis_us(&r.redis, "all"),
        ]);
    }
    t.print();
    let process: Vec<serde_json::Value> = runs
        .iter()
        .map(|r| {
            let mut run = serde_json::json!({
                "concurrency": r.concurrency,
                "ledger": r.ledger,
                "events": r.events,
                "price_steps": r.steps,
                "jobs_per_s": r.jobs_per_s.round(),
                "acked_per_s": r.acked_per_s.round(),
                "enqueue_per_s": r.enqueue_per_s.round(),
                "completed": r.completed,
            });
            if let (Some(run), Some(redis)) = (run.as_object_mut(), r.redis.as_object()) {
                run.extend(redis.clone());
            }
            run
        })
        .collect();
    let json = serde_json::json!({
        "jobs": sizes.jobs,
        "tenants": sizes.tenants,
        "enqueue_per_s": enqueue_per_s.round(),
        "enqueue_batch": sizes.batch,
        "tenant_cap": sizes.cap,
        "process": process,
        "redis_note": "INFO commandstats and the main thread's CPU time of the whole server from the worker's start until every job counted (acked, or its ledger row written), per job: other clients of that Redis count too. 'all' sums every command's usec (Redis 7 counts a script's inner commands in their own entries as well as in the script's); 'cpu' is used_cpu_user_main_thread + used_cpu_sys_main_thread",
        "keep_completed": common::keep_note(),
        "machine": common::load_note(),
    });
    let path = common::write_json("throughput", &json)?;
    println!("wrote {}", path.display());
    Ok(())
}
