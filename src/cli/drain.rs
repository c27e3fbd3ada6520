//! `agentq drain` and `agentq dead`: stopping a queue before a deploy, and
//! dealing with dead-lettered jobs.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};

use super::output::{self, opt};
use super::{CliError, CliResult, Global, duration_arg};
use crate::queue::inspect::{self, JobState};
use crate::queue::job::validate_name;

/// `agentq drain`.
#[derive(Debug, Args)]
pub struct DrainArgs {
    /// Queue to drain.
    queue: String,
    /// Give up (exit 1) if jobs still run after this long.
    #[arg(long, value_parser = duration_arg, default_value = "10m")]
    timeout: Duration,
    /// Once nothing runs, delete the queue's ready and delayed jobs.
    #[arg(long)]
    purge: bool,
}

async fn running_in(q: &crate::queue::Queue, queue: &str) -> Result<i64, CliError> {
    let stats = inspect::queue_stats(q).await?;
    Ok(stats
        .iter()
        .find(|s| s.queue == queue)
        .map_or(0, |s| s.running))
}

fn print_counts(verb: &str, counts: &BTreeMap<String, u64>) {
    let total: u64 = counts.values().sum();
    let per: Vec<String> = counts.iter().map(|(t, n)| format!("{t}: {n}")).collect();
    if per.is_empty() {
        println!("{verb} 0 jobs");
    } else {
        println!("{verb} {total} jobs ({})", per.join(", "));
    }
}

pub(super) async fn drain(g: &Global, a: DrainArgs) -> CliResult {
    validate_name("queue", &a.queue)?;
    let q = g.queue().await?;
    q.set_paused(&a.queue, None, true).await?;
    println!(
        "paused queue {}: no new starts fleet-wide (undo with agentq resume {})",
        a.queue, a.queue
    );
    let tty = std::io::stdout().is_terminal();
    let start = Instant::now();
    let mut last: Option<(i64, Instant)> = None;
    loop {
        let running = running_in(&q, &a.queue).await?;
        if running == 0 {
            if tty {
                print!("\r\x1b[K");
            }
            println!(
                "drained {}: nothing running ({:.1}s)",
                a.queue,
                start.elapsed().as_secs_f64()
            );
            break;
        }
        let line = format!(
            "draining {}: {running} running, {:.0}s elapsed",
            a.queue,
            start.elapsed().as_secs_f64()
        );
        if tty {
            print!("\r\x1b[K{line}");
            let _ = std::io::stdout().flush();
        } else if last.is_none_or(|(n, at)| n != running || at.elapsed() >= Duration::from_secs(10))
        {
            println!("{line}");
            last = Some((running, Instant::now()));
        }
        if start.elapsed() >= a.timeout {
            if tty {
                println!();
            }
            let jobs = inspect::list_jobs(&q, &a.queue, None, Some(JobState::Running), 20).await?;
            let rows: Vec<Vec<String>> = jobs
                .iter()
                .map(|j| {
                    vec![
                        j.id.clone(),
                        j.tenant.clone(),
                        j.kind.clone(),
                        j.attempts.to_string(),
                    ]
                })
                .collect();
            output::table(&["id", "tenant", "kind", "attempts"], &rows);
            return Err(CliError::Runtime(anyhow::anyhow!(
                "{running} jobs still running in {} after {}; the queue stays paused (agentq resume {} to undo)",
                a.queue,
                crate::model::units::format_duration(a.timeout),
                a.queue
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    if a.purge {
        let waiting: BTreeMap<String, u64> = inspect::tenant_stats(&q, Some(&a.queue))
            .await?
            .into_iter()
            .filter(|t| t.ready + t.delayed > 0)
            .map(|t| (t.tenant, (t.ready + t.delayed) as u64))
            .collect();
        print_counts("purging", &waiting);
        let done = q.purge_waiting(&a.queue).await?;
        print_counts("purged", &done);
    }
    Ok(())
}

/// `agentq dead Q ...`.
#[derive(Debug, Args)]
pub struct DeadArgs {
    /// Queue.
    queue: String,
    /// What to do.
    #[command(subcommand)]
    action: DeadAction,
}

/// Which dead jobs.
#[derive(Debug, Args)]
pub struct DeadFilter {
    /// Only this tenant's.
    #[arg(long)]
    tenant: Option<String>,
    /// Only these jobs (repeatable).
    #[arg(long = "job")]
    jobs: Vec<String>,
    /// Only jobs dead for at least this long, e.g. 7d.
    #[arg(long, value_parser = duration_arg)]
    older_than: Option<Duration>,
}

/// `agentq dead` actions.
#[derive(Debug, Subcommand)]
pub enum DeadAction {
    /// List dead jobs with their last error.
    List {
        /// Which jobs.
        #[command(flatten)]
        filter: DeadFilter,
        /// Most jobs to list.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run dead jobs again with fresh attempts and their original payload.
    Retry(DeadFilter),
    /// Delete dead jobs.
    Purge(DeadFilter),
}

impl DeadFilter {
    fn check(&self) -> Result<(), CliError> {
        if let Some(t) = &self.tenant {
            validate_name("tenant", t)?;
        }
        Ok(())
    }
}

pub(super) async fn dead(g: &Global, a: DeadArgs) -> CliResult {
    validate_name("queue", &a.queue)?;
    match a.action {
        DeadAction::List {
            filter,
            limit,
            json,
        } => {
            filter.check()?;
            let q = g.queue().await?;
            let mut jobs = inspect::list_jobs(
                &q,
                &a.queue,
                filter.tenant.as_deref(),
                Some(JobState::Dead),
                limit.clamp(1, 10_000),
            )
            .await?;
            if !filter.jobs.is_empty() {
                jobs.retain(|j| filter.jobs.contains(&j.id));
            }
            if let Some(age) = filter.older_than {
                let cutoff =
                    chrono::Utc::now() - chrono::Duration::milliseconds(age.as_millis() as i64);
                jobs.retain(|j| {
                    j.finished_at
                        .as_deref()
                        .and_then(|f| chrono::DateTime::parse_from_rfc3339(f).ok())
                        .is_some_and(|f| f <= cutoff)
                });
            }
            if json {
                output::json(&jobs);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = jobs
                .iter()
                .map(|j| {
                    vec![
                        j.id.clone(),
                        j.tenant.clone(),
                        j.kind.clone(),
                        j.attempts.to_string(),
                        opt(&j.finished_at),
                        output::first_line(&j.last_error, 80),
                    ]
                })
                .collect();
            output::table(
                &["id", "tenant", "kind", "attempts", "died_at", "last_error"],
                &rows,
            );
        }
        DeadAction::Retry(f) => change_dead(g, &a.queue, true, f).await?,
        DeadAction::Purge(f) => change_dead(g, &a.queue, false, f).await?,
    }
    Ok(())
}

/// `dead retry` and `dead purge`: act on the selected dead jobs, print counts.
async fn change_dead(g: &Global, queue: &str, retry: bool, f: DeadFilter) -> CliResult {
    f.check()?;
    let q = g.queue().await?;
    let age = f.older_than.unwrap_or_default();
    let done = q
        .dead_jobs(retry, queue, f.tenant.as_deref(), age, &f.jobs)
        .await?;
    let verb = if retry {
        format!("retried (back to ready in {queue})")
    } else {
        format!("purged dead from {queue}")
    };
    print_counts(&verb, &done);
    Ok(())
}
