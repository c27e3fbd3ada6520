//! `agentq enqueue`, `agentq jobs`, `agentq inspect`, `agentq cancel`.

use std::io::Read;
use std::time::Duration;

use clap::Args;

use super::output::{self, opt};
use super::{CliError, CliResult, Global, duration_arg, size_arg};
use crate::queue::JobSpec;
use crate::queue::inspect::{self, JobState};

/// `agentq enqueue`.
#[derive(Debug, Args)]
pub struct EnqueueArgs {
    /// Queue name.
    #[arg(long)]
    queue: String,
    /// Tenant the job belongs to.
    #[arg(long)]
    tenant: String,
    /// Task kind (a folder in the workers directory).
    #[arg(long)]
    kind: String,
    /// Payload: JSON text, @file, or - for stdin.
    #[arg(long, default_value = "{}", allow_hyphen_values = true)]
    payload: String,
    /// Timeout, e.g. 30s (default: the kind's).
    #[arg(long, value_parser = duration_arg)]
    timeout: Option<Duration>,
    /// Memory cap, e.g. 256MiB (default: the kind's).
    #[arg(long, value_parser = size_arg)]
    memory: Option<u64>,
    /// Start no earlier than this from now, e.g. 5m.
    #[arg(long, value_parser = duration_arg)]
    delay: Option<Duration>,
    /// -100..=100, higher runs first within the tenant.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    priority: i32,
    /// Attempts before the job goes dead (default 3).
    #[arg(long)]
    max_attempts: Option<u32>,
    /// A second enqueue with the same key returns the first job's id.
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Replica confirmation of the enqueue.
    #[command(flatten)]
    ack: super::ReplicaAck,
}

fn read_payload(arg: &str) -> Result<String, CliError> {
    if arg == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| CliError::Usage(format!("cannot read the payload from stdin: {e}")))?;
        Ok(s)
    } else if let Some(path) = arg.strip_prefix('@') {
        std::fs::read_to_string(path)
            .map_err(|e| CliError::Usage(format!("cannot read payload file {path}: {e}")))
    } else {
        Ok(arg.to_string())
    }
}

pub(super) async fn enqueue(g: &Global, a: EnqueueArgs) -> CliResult {
    let spec = JobSpec {
        tenant: a.tenant,
        queue: a.queue,
        kind: a.kind,
        payload: read_payload(&a.payload)?.trim().to_string(),
        timeout: a.timeout,
        memory: a.memory,
        delay: a.delay,
        priority: a.priority,
        max_attempts: a.max_attempts,
        idempotency_key: a.idempotency_key,
    };
    // Check the input before touching the network: bad input is exit 2 even when Redis is down.
    spec.validate(1 << 20)?;
    let queue = g.queue_acked(&a.ack).await?;
    let e = queue.enqueue(&spec).await?;
    println!("{}", e.id);
    Ok(())
}

/// `agentq jobs`.
#[derive(Debug, Args)]
pub struct JobsArgs {
    /// Queue name.
    #[arg(long)]
    queue: String,
    /// Only this tenant's jobs.
    #[arg(long)]
    tenant: Option<String>,
    /// ready, delayed, running or dead (default: all).
    #[arg(long)]
    state: Option<JobState>,
    /// Most jobs to list.
    #[arg(long, default_value_t = 50)]
    limit: usize,
    /// Print JSON (with --follow: the listing as one JSON array on the
    /// first line, then one JSON event per line).
    #[arg(long)]
    json: bool,
    /// After the listing, print the queue's new job events (of --tenant, or
    /// of every tenant) as they happen, until Ctrl-C; --state keeps the
    /// events that bring a job into that state.
    #[arg(long)]
    follow: bool,
}

pub(super) async fn list(g: &Global, a: JobsArgs) -> CliResult {
    crate::queue::job::validate_name("queue", &a.queue)?;
    if let Some(t) = &a.tenant {
        crate::queue::job::validate_name("tenant", t)?;
    }
    let queue = g.queue().await?;
    // Fixed before the listing is read: a change during it is not missed.
    let follow = if a.follow {
        let f = super::watch::JobsFollow::start(&queue, &a.queue, a.tenant.as_deref(), a.state);
        Some(f.await?)
    } else {
        None
    };
    let jobs = inspect::list_jobs(
        &queue,
        &a.queue,
        a.tenant.as_deref(),
        a.state,
        a.limit.clamp(1, 10_000),
    )
    .await?;
    if a.json && follow.is_some() {
        println!(
            "{}",
            serde_json::to_string(&jobs).map_err(anyhow::Error::from)?
        );
    } else if a.json {
        output::json(&jobs);
    } else {
        print_jobs(&jobs);
    }
    match follow {
        Some(f) => f.run(a.json).await,
        None => Ok(()),
    }
}

fn print_jobs(jobs: &[inspect::JobSummary]) {
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            vec![
                j.id.clone(),
                j.tenant.clone(),
                j.kind.clone(),
                j.state.clone(),
                j.attempts.to_string(),
                opt(&j.enqueued_at),
                output::first_line(&j.last_error, 60),
            ]
        })
        .collect();
    output::table(
        &[
            "id",
            "tenant",
            "kind",
            "state",
            "attempts",
            "enqueued_at",
            "last_error",
        ],
        &rows,
    );
}

/// `agentq cancel`.
#[derive(Debug, Args)]
pub struct CancelArgs {
    /// Job id (as printed by enqueue).
    id: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Cancel a queued or running job. A queued one is cancelled at once; a
/// running one is marked and its worker kills it, the job ending
/// `cancelled` when the attempt is closed (printed as `cancelling`). A
/// repeat is harmless: a job being cancelled answers the same, one already
/// cancelled succeeds saying so; other finished jobs (succeeded, dead) are
/// refused with exit 2 and one line saying their state.
pub(super) async fn cancel(g: &Global, a: CancelArgs) -> CliResult {
    let queue = g.queue().await?;
    let before = queue.cancel(&a.id).await?;
    let (state, line) = match before.as_str() {
        "ready" | "delayed" => ("cancelled", format!("{} cancelled (was {before})", a.id)),
        "running" => (
            "cancelling",
            format!(
                "{} cancelling (was running): its worker is killing the attempt; the job \
                 ends cancelled once it has stopped (succeeded if it finished first)",
                a.id
            ),
        ),
        "cancelled" => ("cancelled", format!("{} already cancelled", a.id)),
        _ => {
            return Err(CliError::Usage(format!(
                "job {} is {before}: only jobs that have not finished can be cancelled",
                a.id
            )));
        }
    };
    if a.json {
        output::json(&serde_json::json!({ "id": a.id, "state": state, "was": before }));
    } else {
        println!("{line}");
    }
    Ok(())
}

/// `agentq inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Job id (as printed by enqueue).
    id: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub(super) async fn inspect(g: &Global, a: InspectArgs) -> CliResult {
    let queue = g.queue().await?;
    let info = inspect::job_info(&queue, &a.id).await?;
    // The ledger is best effort here: a job is inspectable while PostgreSQL is down.
    let ledger = match super::usage::database(g).await {
        Ok(pool) => match crate::ledger::rows_for_job(&pool, &a.id).await {
            Ok(rows) => Some(rows),
            Err(e) => {
                eprintln!("warning: ledger rows unavailable: {e}");
                None
            }
        },
        Err(e) => {
            eprintln!("warning: ledger rows unavailable: {e}");
            None
        }
    };
    let mut v = serde_json::to_value(&info).map_err(anyhow::Error::from)?;
    if a.json {
        v["ledger"] = serde_json::to_value(&ledger).map_err(anyhow::Error::from)?;
        output::json(&v);
        return Ok(());
    }
    if let serde_json::Value::Object(map) = v {
        let rows: Vec<Vec<String>> = map
            .into_iter()
            .map(|(k, v)| {
                let s = match v {
                    serde_json::Value::Null => "-".into(),
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                };
                vec![k, s]
            })
            .collect();
        output::table(&["field", "value"], &rows);
    }
    if let Some(rows) = ledger {
        println!("\nledger ({} rows):", rows.len());
        let table: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                vec![
                    r.attempt.to_string(),
                    r.outcome.clone(),
                    r.started_at.clone(),
                    r.run_ms.to_string(),
                    r.cpu_ms.to_string(),
                    crate::model::units::format_size(r.peak_rss_bytes.max(0) as u64),
                    r.worker.clone(),
                    format!("{:.6}", r.cost_micros as f64 / 1e6),
                ]
            })
            .collect();
        output::table(
            &[
                "attempt",
                "outcome",
                "started_at",
                "run_ms",
                "cpu_ms",
                "peak_rss",
                "worker",
                "cost $",
            ],
            &table,
        );
    }
    Ok(())
}

/// `agentq script`.
#[derive(Debug, Args)]
pub struct ScriptArgs {
    /// Which script (enqueue is the published wire format, v1).
    #[arg(default_value = "enqueue")]
    name: String,
    /// Print only its SHA1 (for EVALSHA after SCRIPT LOAD).
    #[arg(long)]
    sha: bool,
}

pub(super) fn script(a: ScriptArgs) -> CliResult {
    use crate::queue::ScriptName;
    let Some(name) = ScriptName::ALL
        .iter()
        .copied()
        .find(|n| n.as_str() == a.name)
    else {
        let names: Vec<&str> = ScriptName::ALL.iter().map(|n| n.as_str()).collect();
        return Err(CliError::Usage(format!(
            "no script {:?}: use one of {}",
            a.name,
            names.join(", ")
        )));
    };
    let source = crate::queue::script_source(name);
    if a.sha {
        println!("{}", fred::types::scripts::Script::from_lua(source).sha1());
    } else {
        print!("{source}");
    }
    Ok(())
}
