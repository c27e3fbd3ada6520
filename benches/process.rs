//! Process path: jobs/s through the `echo` task program (workers/echo, one
//! process per attempt, via the manifest registry) against the machine's
//! bare spawn rate of the same program with no queue at all.
//!
//!     cargo bench --bench process                  # 2000 spawns each way, worker concurrency 16
//!     BENCH_QUICK=1 cargo bench --bench process    # 200 spawns
//!
//! Bare spawn: `std::process::Command` with a clean environment, the same
//! JSON line on stdin, stdout read to the end, then wait; first one at a
//! time, then on CONCURRENCY threads at once. Queue: a backlog of `echo`
//! jobs over 10 tenants, processed by an in-process worker with the
//! repository's workers/ (each attempt: private temp dir, process group,
//! rlimits, usage from wait4, as in production).
//!
//! Knobs: JOBS (2000), CONCURRENCY (16), PART (`all`; `bare` or `queue`
//! runs only concurrent bare spawn or only the queue path and prints its
//! rate, for profiling one of them: benches/profile/process-path). Target
//! (issue 6): >= 70% of bare spawn. Writes target/bench/agentq-process.json.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use agentq::executor::Registry;
use common::{Table, grouped, knob};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let jobs = knob("JOBS", 2000, 200);
    let concurrency = knob("CONCURRENCY", 16, 16);
    let program = common::workers_dir().join("echo").join("run");
    anyhow::ensure!(
        program.exists(),
        "{} is missing: run from the repository",
        program.display()
    );
    println!(
        "process: {jobs} runs of workers/echo each way, concurrency {concurrency}; {}",
        common::load_note()
    );
    match std::env::var("PART").as_deref() {
        Ok("bare") => {
            let rate = bare_spawn_rate(&program, jobs, concurrency).await?;
            println!("bare spawn, {concurrency} at once: {rate:.0}/s");
            return Ok(());
        }
        Ok("queue") => {
            let rate = queue_rate(jobs, concurrency).await?;
            println!("through agentq, concurrency {concurrency}: {rate:.0} jobs/s");
            return Ok(());
        }
        Ok("all") | Err(_) => {}
        Ok(other) => anyhow::bail!("PART={other}: use all, bare or queue"),
    }
    let bare = bare_spawn_rate(&program, jobs, 1).await?;
    eprintln!("  bare spawn, one at a time: {bare:.0}/s");
    let bare_concurrent = bare_spawn_rate(&program, jobs, concurrency).await?;
    eprintln!("  bare spawn, {concurrency} at once: {bare_concurrent:.0}/s");
    let queued = queue_rate(jobs, concurrency).await?;
    eprintln!("  through agentq: {queued:.0} jobs/s");

    let mut t = Table::new(&["path", "concurrency", "runs/s", "agentq vs this"]);
    t.row(vec![
        "bare spawn".into(),
        "1".into(),
        grouped(bare),
        format!("{:.0}%", 100.0 * queued / bare),
    ]);
    t.row(vec![
        "bare spawn".into(),
        concurrency.to_string(),
        grouped(bare_concurrent),
        format!("{:.0}%", 100.0 * queued / bare_concurrent),
    ]);
    t.row(vec![
        "agentq worker (echo jobs)".into(),
        concurrency.to_string(),
        grouped(queued),
        "-".into(),
    ]);
    t.print();
    let best_bare = bare.max(bare_concurrent);
    let verdict = if queued >= 0.7 * best_bare {
        "met"
    } else {
        "MISSED"
    };
    println!(
        "target >= 70% of the best bare spawn rate: {verdict} ({:.0}%)",
        100.0 * queued / best_bare
    );
    let json = serde_json::json!({
        "bare_spawn_per_s": bare.round(),
        "bare_spawn_concurrent_per_s": bare_concurrent.round(),
        "queue_echo_per_s": queued.round(),
        "concurrency": concurrency,
        "jobs": jobs,
        // Per-attempt cgroups below this parent ("off": none); the worker
        // falls back to rlimits when the cgroup hierarchy is not writable.
        "cgroup_parent": agentq::executor::sandbox::SandboxConfig::from_env("bench")
            .config
            .cgroup_parent
            .unwrap_or_else(|| "off".into()),
        "machine": common::load_note(),
    });
    let path = common::write_json("process", &json)?;
    println!("wrote {}", path.display());
    Ok(())
}

/// Runs of `program` per second, `runs` in all, `threads` at a time.
async fn bare_spawn_rate(program: &Path, runs: usize, threads: usize) -> anyhow::Result<f64> {
    let program: PathBuf = program.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let threads = threads.clamp(1, runs.max(1));
        let t0 = Instant::now();
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|k| {
                    // Thread k takes runs k, k+threads, ...
                    let mine = (k..runs).step_by(threads).count();
                    let program = &program;
                    s.spawn(move || (0..mine).try_for_each(|i| run_once(program, i)))
                })
                .collect();
            handles.into_iter().try_for_each(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("spawn thread panicked"))?
            })
        })?;
        Ok(runs as f64 / t0.elapsed().as_secs_f64())
    })
    .await?
}

/// One run: spawn, write the job line, read stdout to the end, wait.
fn run_once(program: &Path, i: usize) -> anyhow::Result<()> {
    let mut child = Command::new(program)
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let line = format!(
        "{{\"id\":\"bare-{i}\",\"tenant\":\"tenant0\",\"queue\":\"bench\",\"kind\":\"echo\",\"attempt\":1,\"payload\":{{}}}}\n"
    );
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(line.as_bytes())?;
    }
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        stdout.read_to_string(&mut out)?;
    }
    let status = child.wait()?;
    anyhow::ensure!(
        status.success() && out.contains("\"output\""),
        "echo failed: {status}, stdout {out:?}"
    );
    Ok(())
}

/// Jobs/s of an `echo` backlog through an in-process worker.
async fn queue_rate(jobs: usize, concurrency: usize) -> anyhow::Result<f64> {
    let registry = Registry::load(&common::workers_dir())?;
    let queue = common::fresh_queue("process").await?;
    let body = async {
        let tenants = 10;
        common::set_tenant_caps(&queue, tenants, 1000).await?;
        let specs = common::round_robin_specs(jobs, tenants, "echo");
        let run = common::process_backlog(&queue, &specs, 500, concurrency, registry, None).await?;
        Ok(jobs as f64 / run.acked_s)
    };
    common::with_cleanup(body, common::remove_namespace(&queue)).await
}
