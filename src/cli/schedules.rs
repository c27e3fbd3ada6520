//! `agentq schedule add|list|rm`: tenants' recurring schedules.

use std::time::Duration;

use clap::{Args, Subcommand};

use super::output;
use super::{CliError, CliResult, Global, duration_arg, size_arg};
use crate::queue::schedules::{Missed, Recurrence, Schedule, ScheduleSpec};

/// `agentq schedule ...`.
#[derive(Debug, Subcommand)]
pub enum ScheduleCommand {
    /// Add a recurring schedule (or replace the tenant's schedule of that name).
    Add(Box<AddArgs>),
    /// List schedules with their next due time (UTC and the schedule's zone).
    List(ListArgs),
    /// Remove a schedule (jobs it already enqueued stay).
    Rm(RmArgs),
}

/// `agentq schedule add`.
#[derive(Debug, Args)]
pub struct AddArgs {
    /// Tenant the jobs belong to.
    #[arg(long)]
    tenant: String,
    /// Schedule name, unique per tenant.
    #[arg(long)]
    name: String,
    /// Cron expression, 5 fields (or 6 with seconds first), e.g. "0 9 * * MON-FRI".
    #[arg(long, conflicts_with = "every", required_unless_present = "every")]
    cron: Option<String>,
    /// IANA time zone the cron expression is read in, e.g. Europe/Paris.
    #[arg(long, default_value = "UTC", requires = "cron")]
    tz: String,
    /// A fixed interval instead, e.g. 5m (slots aligned to the Unix epoch, UTC).
    #[arg(long, value_parser = duration_arg)]
    every: Option<Duration>,
    /// Queue of its jobs.
    #[arg(long)]
    queue: String,
    /// Task kind of its jobs.
    #[arg(long)]
    kind: String,
    /// Payload of its jobs: JSON text, or @file.
    #[arg(long, default_value = "{}")]
    payload: String,
    /// Timeout of its jobs, e.g. 30s (default: the kind's).
    #[arg(long, value_parser = duration_arg)]
    timeout: Option<Duration>,
    /// Memory cap of its jobs, e.g. 256MiB (default: the kind's).
    #[arg(long, value_parser = size_arg)]
    memory: Option<u64>,
    /// -100..=100, higher runs first within the tenant.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    priority: i32,
    /// Attempts before a job goes dead (default 3).
    #[arg(long)]
    max_attempts: Option<u32>,
    /// Slots missed while no worker ran: skip (none fires) or once (one job for all).
    #[arg(long, default_value = "skip")]
    missed: String,
    /// Print the schedule as JSON.
    #[arg(long)]
    json: bool,
}

/// `agentq schedule list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only this tenant's.
    #[arg(long)]
    tenant: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `agentq schedule rm`.
#[derive(Debug, Args)]
pub struct RmArgs {
    /// Tenant.
    #[arg(long)]
    tenant: String,
    /// Schedule name.
    #[arg(long)]
    name: String,
}

pub(super) async fn schedule(g: &Global, c: ScheduleCommand) -> CliResult {
    match c {
        ScheduleCommand::Add(a) => add(g, *a).await,
        ScheduleCommand::List(a) => list(g, a).await,
        ScheduleCommand::Rm(a) => rm(g, a).await,
    }
}

async fn add(g: &Global, a: AddArgs) -> CliResult {
    // Everything is checked before touching the network: bad input is exit 2.
    let recurrence = match (&a.cron, a.every) {
        (Some(expr), _) => Recurrence::cron(expr, &a.tz)?,
        (None, Some(d)) => Recurrence::every(d)?,
        (None, None) => {
            return Err(CliError::Usage(
                "give --cron EXPR [--tz ZONE] or --every DURATION".into(),
            ));
        }
    };
    let payload = match a.payload.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| CliError::Usage(format!("cannot read payload file {path}: {e}")))?,
        None => a.payload.clone(),
    };
    let mut spec = ScheduleSpec::new(&a.tenant, &a.name, recurrence, &a.queue, &a.kind);
    spec.payload = payload.trim().to_string();
    spec.timeout = a.timeout;
    spec.memory = a.memory;
    spec.priority = a.priority;
    spec.max_attempts = a.max_attempts;
    spec.missed = a.missed.parse::<Missed>()?;
    let q = g.queue().await?;
    let s = q.add_schedule(&spec).await?;
    if a.json {
        output::json(&s);
    } else {
        println!(
            "schedule {}/{}: {}, next due {} ({})",
            s.tenant,
            s.name,
            s.when(),
            s.next_due,
            s.next_due_local
        );
    }
    Ok(())
}

async fn list(g: &Global, a: ListArgs) -> CliResult {
    if let Some(t) = &a.tenant {
        crate::queue::job::validate_name("tenant", t)?;
    }
    let q = g.queue().await?;
    let all: Vec<Schedule> = q.schedules(a.tenant.as_deref()).await?;
    if a.json {
        output::json(&all);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|s| {
            vec![
                s.tenant.clone(),
                s.name.clone(),
                s.when(),
                s.queue.clone(),
                s.kind.clone(),
                s.missed.as_str().to_string(),
                s.next_due.clone(),
                s.next_due_local.clone(),
                s.fired.to_string(),
                s.last_error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    output::table(
        &[
            "TENANT",
            "NAME",
            "WHEN",
            "QUEUE",
            "KIND",
            "MISSED",
            "NEXT DUE (UTC)",
            "NEXT DUE (LOCAL)",
            "FIRED",
            "LAST ERROR",
        ],
        &rows,
    );
    Ok(())
}

async fn rm(g: &Global, a: RmArgs) -> CliResult {
    crate::queue::job::validate_name("tenant", &a.tenant)?;
    crate::queue::job::validate_name("schedule", &a.name)?;
    let q = g.queue().await?;
    if q.remove_schedule(&a.tenant, &a.name).await? {
        println!("removed schedule {}/{}", a.tenant, a.name);
        Ok(())
    } else {
        Err(CliError::Usage(format!(
            "tenant {} has no schedule {}: agentq schedule list --tenant {} lists them",
            a.tenant, a.name, a.tenant
        )))
    }
}
