//! Latency: enqueue-to-start p50/p99/p99.9 of single enqueues arriving at a
//! steady (open-loop) rate, at a light load and at a share of the peak.
//!
//!     cargo bench --bench latency                  # 200 jobs/s for 15 s, then 80% of peak for 10 s
//!     BENCH_QUICK=1 cargo bench --bench latency    # 2 s each, small peak run
//!
//! Enqueue time: client-side, just before each `Queue::enqueue` call (from a
//! producer with its own Redis connection). Start time: when the worker
//! invokes the job's in-process handler (after claim, lease and dispatch,
//! so the moment user code runs); both on the bench process's monotonic
//! clock. The producer never waits for a reply before sending the next job
//! (open loop), so a slow queue shows as latency, not as a lower rate.
//!
//! Peak, measured in the same run unless PEAK=<jobs/s> is given:
//! PEAK_MODE=e2e (default) is the same workload with the producer going
//! as fast as it can (128 enqueues in flight): jobs started per second over
//! PEAK_SECS. PEAK_MODE=backlog is the throughput bench's figure (a batch-
//! enqueued backlog of PEAK_JOBS no-op jobs, then processed); on a small
//! machine where producer, Redis and worker share the cores, 80% of that is
//! more than single enqueues can sustain, and the heavy level then measures
//! a growing backlog (the table's "kept up" column says so).
//!
//! For a comparison at one offered rate on every system (benches/compare/run
//! measures every system's peak first, then runs the levels at 80% of the
//! slowest peak): PEAK_ONLY=1 measures the peak alone and writes
//! target/bench/agentq-latency-peak.json; HEAVY_RATE=<jobs/s> runs the
//! heavy level at that rate and measures no peak.
//!
//! Knobs: LIGHT_RATE (200), LIGHT_SECS (15), HEAVY_PCT (80), HEAVY_SECS (10),
//! HEAVY_RATE, PEAK, PEAK_ONLY, PEAK_MODE (e2e|backlog), PEAK_SECS (5),
//! PEAK_JOBS (20000), CONCURRENCY (64), TENANTS (50).
//! Writes target/bench/agentq-latency.json.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use agentq::executor::Registry;
use agentq::queue::Queue;
use common::{BenchWorker, Stamps, Table, knob};
use tokio::task::JoinSet;

/// One load level's result.
struct Level {
    name: &'static str,
    rate: f64,
    achieved: f64,
    jobs: usize,
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
    /// Last enqueue to last start: the backlog left when sending stopped.
    lag_ms: f64,
    /// Jobs started per second, first enqueue to last start.
    served: f64,
}

impl Level {
    /// The worker started jobs (nearly) as fast as they were sent.
    fn kept_up(&self) -> bool {
        self.served >= 0.95 * self.achieved
    }
}

struct Setup {
    concurrency: usize,
    tenants: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let setup = Setup {
        concurrency: knob("CONCURRENCY", 64, 64),
        tenants: knob("TENANTS", 50, 50),
    };
    let light_rate = knob("LIGHT_RATE", 200, 200) as f64;
    let light_secs = knob("LIGHT_SECS", 15, 2) as f64;
    let heavy_pct = knob("HEAVY_PCT", 80, 80) as f64;
    let heavy_secs = knob("HEAVY_SECS", 10, 2) as f64;
    println!(
        "latency: enqueue-to-start, worker concurrency {}, {} tenants; {}",
        setup.concurrency,
        setup.tenants,
        common::load_note()
    );

    if std::env::var("PEAK_ONLY").is_ok_and(|v| !v.is_empty() && v != "0") {
        let (peak, peak_source) = peak(&setup).await?;
        println!("peak {peak:.0} jobs/s ({peak_source})");
        let json = serde_json::json!({
            "peak_per_s": peak.round(),
            "peak_source": peak_source,
            "peak_secs": knob("PEAK_SECS", 5, 2),
            "in_flight": 128,
            "concurrency": setup.concurrency,
            "tenants": setup.tenants,
            "machine": common::load_note(),
        });
        let path = common::write_json("latency-peak", &json)?;
        println!("wrote {}", path.display());
        return Ok(());
    }
    let heavy_rate_knob = std::env::var("HEAVY_RATE")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|r| r.is_finite() && *r > 0.0);
    let (peak, peak_source, heavy_rate) = match heavy_rate_knob {
        // The caller chose the rate (e.g. 80% of the slowest system's peak).
        Some(rate) => {
            let peak = std::env::var("PEAK").ok().and_then(|v| v.parse().ok());
            (peak, "HEAVY_RATE", rate)
        }
        None => {
            let (peak, source) = peak(&setup).await?;
            (Some(peak), source, (peak * heavy_pct / 100.0).max(1.0))
        }
    };
    let peak_note = peak.map_or_else(|| "not measured".into(), |p| format!("{p:.0} jobs/s"));
    eprintln!("  peak {peak_note} ({peak_source}); heavy load {heavy_rate:.0} jobs/s");

    let queue = common::fresh_queue("latency").await?;
    let body = async {
        common::set_tenant_caps(&queue, setup.tenants, 1000).await?;
        let light = level(&queue, &setup, "light", light_rate, light_secs).await?;
        let heavy = level(&queue, &setup, "heavy", heavy_rate, heavy_secs).await?;
        Ok((light, heavy))
    };
    let (light, heavy) = common::with_cleanup(body, common::remove_namespace(&queue)).await?;
    report(&setup, peak, peak_source, &[light, heavy])
}

/// The peak rate and how it was found: PEAK=<jobs/s> if given, else
/// measured by PEAK_MODE: `e2e` (default) or `backlog`.
async fn peak(setup: &Setup) -> anyhow::Result<(f64, &'static str)> {
    if let Some(p) = std::env::var("PEAK").ok().and_then(|v| v.parse().ok()) {
        return Ok((p, "PEAK"));
    }
    match std::env::var("PEAK_MODE").as_deref() {
        Ok("backlog") => Ok((backlog_peak(setup).await?, "backlog")),
        _ => Ok((e2e_peak(setup).await?, "e2e")),
    }
}

/// Processing rate of a no-op backlog at the bench's concurrency (enqueued
/// in batches before the worker starts, as in the throughput bench).
async fn backlog_peak(setup: &Setup) -> anyhow::Result<f64> {
    let jobs = knob("PEAK_JOBS", 20_000, 3_000);
    let queue = common::fresh_queue("latency-peak").await?;
    let body = async {
        common::set_tenant_caps(&queue, setup.tenants, 1000).await?;
        let specs = common::round_robin_specs(jobs, setup.tenants, "noop");
        let run = common::process_backlog(
            &queue,
            &specs,
            500,
            setup.concurrency,
            Registry::empty(),
            None,
        )
        .await?;
        Ok(jobs as f64 / run.acked_s)
    };
    common::with_cleanup(body, common::remove_namespace(&queue)).await
}

/// The same workload as the latency levels (single enqueues while the
/// worker runs) with the producer as fast as it can go: jobs started per
/// second over PEAK_SECS, after a second of warm-up.
async fn e2e_peak(setup: &Setup) -> anyhow::Result<f64> {
    let secs = knob("PEAK_SECS", 5, 2) as f64;
    let queue = common::fresh_queue("latency-peak").await?;
    let body = async {
        common::set_tenant_caps(&queue, setup.tenants, 1000).await?;
        let stamps = Stamps::new(60_000 * (secs as usize + 2));
        let worker = BenchWorker::start(
            &queue,
            common::worker_config(setup.concurrency),
            Registry::empty(),
            stamps.handlers("stamp", Duration::ZERO),
            None,
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        let producer = common::same_namespace(&queue).await?;
        let flood = Flood::start(&producer, &stamps, setup.tenants);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (d0, t0) = (stamps.done(), std::time::Instant::now());
        tokio::time::sleep(Duration::from_secs_f64(secs)).await;
        let peak = (stamps.done() - d0) as f64 / t0.elapsed().as_secs_f64();
        let sent = flood.stop().await?;
        stamps.wait_done(sent, Duration::from_secs(300)).await?;
        worker.stop().await?;
        Ok(peak)
    };
    common::with_cleanup(body, common::remove_namespace(&queue)).await
}

/// Producer tasks enqueueing stamped jobs back to back until stopped.
struct Flood {
    stop: tokio_util::sync::CancellationToken,
    next: Arc<AtomicUsize>,
    tasks: JoinSet<anyhow::Result<()>>,
    capacity: usize,
}

impl Flood {
    /// 128 tasks in flight on `producer`'s connection.
    fn start(producer: &Queue, stamps: &Arc<Stamps>, tenants: usize) -> Flood {
        let stop = tokio_util::sync::CancellationToken::new();
        let next = Arc::new(AtomicUsize::new(0));
        let mut tasks = JoinSet::new();
        for _ in 0..128 {
            let (q, s, n, stop) = (producer.clone(), stamps.clone(), next.clone(), stop.clone());
            tasks.spawn(async move {
                while !stop.is_cancelled() {
                    let i = n.fetch_add(1, Ordering::Relaxed);
                    if i >= s.capacity() {
                        break;
                    }
                    let spec = common::stamped_spec(&format!("tenant{}", i % tenants), "stamp", i);
                    s.enqueue(i);
                    q.enqueue(&spec).await?;
                }
                Ok(())
            });
        }
        Flood {
            stop,
            next,
            tasks,
            capacity: stamps.capacity(),
        }
    }

    /// Stop sending; returns the number of jobs sent.
    async fn stop(mut self) -> anyhow::Result<usize> {
        self.stop.cancel();
        while let Some(r) = self.tasks.join_next().await {
            r??;
        }
        Ok(self.next.load(Ordering::Relaxed).min(self.capacity))
    }
}

/// Run `rate` jobs/s for `secs` against a fresh worker; percentiles of the waits.
async fn level(
    queue: &Queue,
    setup: &Setup,
    name: &'static str,
    rate: f64,
    secs: f64,
) -> anyhow::Result<Level> {
    let n = ((rate * secs).round() as usize).max(1);
    let stamps = Stamps::new(n);
    let worker = BenchWorker::start(
        queue,
        common::worker_config(setup.concurrency),
        Registry::empty(),
        stamps.handlers("stamp", Duration::ZERO),
        None,
    );
    // Let the worker connect and subscribe before the clock matters.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let producer = common::same_namespace(queue).await?;
    let achieved = paced(&producer, &stamps, n, rate, setup.tenants).await?;
    stamps
        .wait_done(n, Duration::from_secs(120 + 2 * secs as u64))
        .await?;
    worker.stop().await?;
    let waits = stamps.waits_ms(0..n);
    let level = Level {
        name,
        rate,
        achieved,
        jobs: waits.len(),
        p50: common::percentile(&waits, 0.5),
        p99: common::percentile(&waits, 0.99),
        p999: common::percentile(&waits, 0.999),
        max: common::max(&waits),
        lag_ms: stamps.lag_ms(),
        served: n as f64 / (stamps.start_span_ms() / 1000.0).max(1e-9),
    };
    eprintln!(
        "  {name}: {} jobs at {:.0}/s, p50 {:.2} ms, p99 {:.2} ms",
        level.jobs, level.achieved, level.p50, level.p99
    );
    if !level.kept_up() {
        eprintln!(
            "  warning: at {name} load the worker started only {:.0} jobs/s of {:.0} sent (backlog {:.0} ms at the end): these waits are queueing, not latency",
            level.served, level.achieved, level.lag_ms
        );
    }
    Ok(level)
}

/// Send jobs `0..n` at `rate` per second on a fixed schedule, each enqueue
/// on its own task so a slow reply never delays the next send; returns the
/// rate achieved.
async fn paced(
    producer: &Queue,
    stamps: &Arc<Stamps>,
    n: usize,
    rate: f64,
    tenants: usize,
) -> anyhow::Result<f64> {
    let t0 = tokio::time::Instant::now();
    let mut tasks = JoinSet::new();
    let mut next = 0;
    while next < n {
        let due = ((t0.elapsed().as_secs_f64() * rate) as usize + 1).min(n);
        while next < due {
            let spec = common::stamped_spec(&format!("tenant{}", next % tenants), "stamp", next);
            let (q, s, i) = (producer.clone(), stamps.clone(), next);
            tasks.spawn(async move {
                s.enqueue(i);
                q.enqueue(&spec).await
            });
            next += 1;
        }
        while let Some(r) = tasks.try_join_next() {
            r??;
        }
        let at = t0 + Duration::from_secs_f64(next as f64 / rate);
        tokio::time::sleep_until(at).await;
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(n as f64 / t0.elapsed().as_secs_f64())
}

fn report(
    setup: &Setup,
    peak: Option<f64>,
    peak_source: &str,
    levels: &[Level],
) -> anyhow::Result<()> {
    let mut t = Table::new(&[
        "load",
        "target/s",
        "sent/s",
        "started/s",
        "jobs",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
        "kept up",
    ]);
    for l in levels {
        t.row(vec![
            l.name.into(),
            format!("{:.0}", l.rate),
            format!("{:.0}", l.achieved),
            format!("{:.0}", l.served),
            l.jobs.to_string(),
            format!("{:.2}", l.p50),
            format!("{:.2}", l.p99),
            format!("{:.2}", l.p999),
            format!("{:.2}", l.max),
            if l.kept_up() { "yes" } else { "NO" }.into(),
        ]);
    }
    t.print();
    match peak {
        Some(p) => println!("peak {p:.0} jobs/s ({peak_source})"),
        None => println!("heavy rate from {peak_source}"),
    }
    let level_json = |l: &Level| {
        serde_json::json!({
            "rate_per_s": l.rate.round(),
            "sent_per_s": l.achieved.round(),
            "jobs": l.jobs,
            "p50_ms": round3(l.p50),
            "p99_ms": round3(l.p99),
            "p999_ms": round3(l.p999),
            "max_ms": round3(l.max),
            "started_per_s": l.served.round(),
            "end_lag_ms": round3(l.lag_ms),
            "kept_up": l.kept_up(),
        })
    };
    let json = serde_json::json!({
        "light": level_json(&levels[0]),
        "heavy": level_json(&levels[1]),
        "peak_per_s": peak.map(f64::round),
        "peak_source": peak_source,
        "concurrency": setup.concurrency,
        "tenants": setup.tenants,
        "start": "in-process handler invoked",
        "machine": common::load_note(),
    });
    let path = common::write_json("latency", &json)?;
    println!("wrote {}", path.display());
    Ok(())
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
