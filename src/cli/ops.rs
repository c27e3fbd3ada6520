//! `agentq queues`, `tenants`, `pause`, `resume`, `tenant set|show|defaults`.

use std::time::Duration;

use clap::{Args, Subcommand};

use super::output::{self, opt};
use super::{CliResult, Global, duration_arg, size_arg};
use crate::admission::{self, LimitsUpdate};
use crate::queue::inspect;
use crate::queue::job::validate_name;
use crate::units::{format_duration, format_size};

/// A listing's only option.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub(super) async fn queues(g: &Global, a: ListArgs) -> CliResult {
    let q = g.queue().await?;
    let stats = inspect::queue_stats(&q).await?;
    if a.json {
        output::json(&stats);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = stats
        .iter()
        .map(|s| {
            vec![
                s.queue.clone(),
                s.ready.to_string(),
                s.delayed.to_string(),
                s.running.to_string(),
                s.dead.to_string(),
                if s.paused { "yes" } else { "no" }.into(),
            ]
        })
        .collect();
    output::table(
        &["queue", "ready", "delayed", "running", "dead", "paused"],
        &rows,
    );
    Ok(())
}

/// `agentq tenants`.
#[derive(Debug, Args)]
pub struct TenantsArgs {
    /// Only count this queue's jobs.
    #[arg(long)]
    queue: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub(super) async fn tenants(g: &Global, a: TenantsArgs) -> CliResult {
    if let Some(name) = &a.queue {
        validate_name("queue", name)?;
    }
    let q = g.queue().await?;
    let stats = inspect::tenant_stats(&q, a.queue.as_deref()).await?;
    if a.json {
        output::json(&stats);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = stats
        .iter()
        .map(|s| {
            vec![
                s.tenant.clone(),
                opt(&s.tier),
                s.ready.to_string(),
                s.delayed.to_string(),
                format!("{}/{}", s.running, s.cap),
                s.weight.to_string(),
                s.dead.to_string(),
                opt(&s.held),
            ]
        })
        .collect();
    output::table(
        &[
            "tenant",
            "tier",
            "ready",
            "delayed",
            "running/cap",
            "weight",
            "dead",
            "held",
        ],
        &rows,
    );
    Ok(())
}

/// `agentq pause|resume`.
#[derive(Debug, Args)]
pub struct PauseArgs {
    /// Queue name.
    queue: String,
    /// Only this tenant on the queue.
    #[arg(long)]
    tenant: Option<String>,
}

pub(super) async fn pause(g: &Global, a: PauseArgs, on: bool) -> CliResult {
    validate_name("queue", &a.queue)?;
    if let Some(t) = &a.tenant {
        validate_name("tenant", t)?;
    }
    let q = g.queue().await?;
    let changed = q.set_paused(&a.queue, a.tenant.as_deref(), on).await?;
    let what = match &a.tenant {
        Some(t) => format!("tenant {t} on queue {}", a.queue),
        None => format!("queue {}", a.queue),
    };
    let verb = if on { "paused" } else { "resumed" };
    if changed {
        println!("{verb} {what}");
    } else {
        println!("{what} was already {verb}; nothing changed");
    }
    Ok(())
}

/// `agentq tenant ...`.
#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Change a tenant's limits (effective fleet-wide on the next claim).
    Set(TenantSetArgs),
    /// Change the limits of tenants that set none themselves.
    Defaults(LimitFlags),
    /// Show a tenant's limits.
    Show(TenantShowArgs),
}

/// The limit flags shared by `tenant set` and `tenant defaults`.
#[derive(Debug, Args)]
pub struct LimitFlags {
    /// Tier label.
    #[arg(long)]
    tier: Option<String>,
    /// Most jobs running at once, fleet-wide (1..=100000).
    #[arg(long)]
    max_concurrency: Option<u64>,
    /// Longest timeout a job may request, e.g. 10m (1s..=7d).
    #[arg(long, value_parser = duration_arg)]
    max_timeout: Option<Duration>,
    /// Largest memory a job may request, e.g. 1GiB (1MiB..=1TiB).
    #[arg(long, value_parser = size_arg)]
    max_memory: Option<u64>,
    /// Share of starts among backlogged tenants (1..=1000).
    #[arg(long)]
    weight: Option<u64>,
}

impl LimitFlags {
    fn update(&self) -> LimitsUpdate {
        LimitsUpdate {
            max_concurrency: self.max_concurrency,
            max_timeout: self.max_timeout,
            max_memory: self.max_memory,
            weight: self.weight,
            tier: self.tier.clone(),
        }
    }
}

/// `agentq tenant set`.
#[derive(Debug, Args)]
pub struct TenantSetArgs {
    /// Tenant name.
    tenant: String,
    /// The limits to change.
    #[command(flatten)]
    limits: LimitFlags,
}

/// `agentq tenant show`.
#[derive(Debug, Args)]
pub struct TenantShowArgs {
    /// Tenant name.
    tenant: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn describe(u: &LimitsUpdate) -> String {
    let mut parts = Vec::new();
    if let Some(v) = u.max_concurrency {
        parts.push(format!("max_concurrency={v}"));
    }
    if let Some(v) = u.max_timeout {
        parts.push(format!("max_timeout={}", format_duration(v)));
    }
    if let Some(v) = u.max_memory {
        parts.push(format!("max_memory={}", format_size(v)));
    }
    if let Some(v) = u.weight {
        parts.push(format!("weight={v}"));
    }
    if let Some(v) = &u.tier {
        parts.push(format!("tier={v}"));
    }
    parts.join(" ")
}

pub(super) async fn tenant(g: &Global, c: TenantCommand) -> CliResult {
    match c {
        TenantCommand::Set(a) => {
            validate_name("tenant", &a.tenant)?;
            let u = a.limits.update();
            u.validate()?;
            if u.is_empty() {
                return Err(super::CliError::Usage(
                    "nothing to set: give at least one of --max-concurrency, --max-timeout, --max-memory, --weight, --tier".into(),
                ));
            }
            let q = g.queue().await?;
            u.apply(&q, Some(&a.tenant)).await?;
            println!("tenant {}: set {}", a.tenant, describe(&u));
        }
        TenantCommand::Defaults(f) => {
            let u = f.update();
            u.validate()?;
            if u.is_empty() {
                return Err(super::CliError::Usage(
                    "nothing to set: give at least one limit flag".into(),
                ));
            }
            let q = g.queue().await?;
            u.apply(&q, None).await?;
            println!("defaults: set {}", describe(&u));
        }
        TenantCommand::Show(a) => {
            validate_name("tenant", &a.tenant)?;
            let q = g.queue().await?;
            let s = admission::settings(&q, Some(&a.tenant)).await?;
            if a.json {
                output::json(&s);
                return Ok(());
            }
            let src = |f: &str| {
                if s.own.iter().any(|o| o == f) {
                    "tenant"
                } else {
                    "default"
                }
                .to_string()
            };
            let l = s.limits;
            output::table(
                &["limit", "value", "from"],
                &[
                    vec!["tier".into(), opt(&s.tier), src("tier")],
                    vec![
                        "max_concurrency".into(),
                        l.max_concurrency.to_string(),
                        src("max_concurrency"),
                    ],
                    vec![
                        "max_timeout".into(),
                        format_duration(Duration::from_millis(l.max_timeout_ms)),
                        src("max_timeout_ms"),
                    ],
                    vec![
                        "max_memory".into(),
                        format_size(l.max_memory),
                        src("max_memory"),
                    ],
                    vec!["weight".into(), l.weight.to_string(), src("weight")],
                ],
            );
        }
    }
    Ok(())
}
