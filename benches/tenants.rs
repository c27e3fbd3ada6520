//! Scale of tenants: processing throughput of the same backlog spread over
//! 10, 1,000 and 10,000 backlogged tenants (each with its own cap set).
//!
//!     cargo bench --bench tenants                  # 50k no-op jobs, concurrency 64
//!     BENCH_QUICK=1 cargo bench --bench tenants    # 10k jobs
//!
//! Knobs: JOBS (50000), TENANTS (10,1000,10000), CONCURRENCY (64), CAP (1000).
//! Target (issue 6): 10,000 tenants within 15% of 10.
//! Writes target/bench/agentq-tenants.json.

mod common;

use agentq::executor::Registry;
use common::{Table, grouped, knob, knob_list};

struct Run {
    tenants: usize,
    enqueue_per_s: f64,
    jobs_per_s: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let jobs = knob("JOBS", 50_000, 10_000);
    let concurrency = knob("CONCURRENCY", 64, 64);
    let cap = knob("CAP", 1000, 1000) as u64;
    let counts = knob_list("TENANTS", &[10, 1_000, 10_000]);
    println!(
        "tenants: {jobs} no-op jobs round-robin over N tenants (cap {cap} each), worker concurrency {concurrency}; {}",
        common::load_note()
    );
    let mut runs = Vec::new();
    for &tenants in &counts {
        let run = run_once(jobs, tenants, concurrency, cap).await?;
        eprintln!("  {tenants} tenants: {:.0} jobs/s", run.jobs_per_s);
        runs.push(run);
    }
    report(jobs, concurrency, &runs)
}

async fn run_once(
    jobs: usize,
    tenants: usize,
    concurrency: usize,
    cap: u64,
) -> anyhow::Result<Run> {
    let queue = common::fresh_queue("tenants").await?;
    let body = async {
        common::set_tenant_caps(&queue, tenants, cap).await?;
        let specs = common::round_robin_specs(jobs, tenants, "noop");
        let run =
            common::process_backlog(&queue, &specs, 500, concurrency, Registry::empty(), None)
                .await?;
        Ok(Run {
            tenants,
            enqueue_per_s: jobs as f64 / run.enqueue_s,
            jobs_per_s: jobs as f64 / run.acked_s,
        })
    };
    common::with_cleanup(body, common::remove_namespace(&queue)).await
}

fn report(jobs: usize, concurrency: usize, runs: &[Run]) -> anyhow::Result<()> {
    let mut t = Table::new(&["tenants", "enqueue jobs/s", "processing jobs/s", "vs first"]);
    let base = runs.first().map_or(1.0, |r| r.jobs_per_s);
    for r in runs {
        t.row(vec![
            grouped(r.tenants as f64),
            grouped(r.enqueue_per_s),
            grouped(r.jobs_per_s),
            format!("{:+.1}%", (r.jobs_per_s / base - 1.0) * 100.0),
        ]);
    }
    t.print();
    let find = |n: usize| runs.iter().find(|r| r.tenants == n);
    if let (Some(few), Some(many)) = (find(10), find(10_000)) {
        let change = (many.jobs_per_s / few.jobs_per_s - 1.0) * 100.0;
        let verdict = if change >= -15.0 { "met" } else { "MISSED" };
        println!("target 10,000 tenants within 15% of 10: {verdict} ({change:+.1}%)");
    }
    let json = serde_json::json!({
        "jobs": jobs,
        "concurrency": concurrency,
        "runs": runs.iter().map(|r| serde_json::json!({
            "tenants": r.tenants,
            "jobs_per_s": r.jobs_per_s.round(),
            "enqueue_per_s": r.enqueue_per_s.round(),
        })).collect::<Vec<_>>(),
        "machine": common::load_note(),
    });
    let path = common::write_json("tenants", &json)?;
    println!("wrote {}", path.display());
    Ok(())
}
