//! `agentq queues`, `tenants`, `pause`, `resume`, `keep-completed`,
//! `tenant set|show|defaults`.

use std::time::Duration;

use clap::{Args, Subcommand};

use super::output::{self, opt};
use super::{CliResult, Global, duration_arg, size_arg};
use crate::model::limits::{self, LimitsUpdate, Target};
use crate::model::units::{format_duration, format_size};
use crate::queue::inspect;
use crate::queue::job::validate_name;

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
    let backlog = inspect::outbox_backlog(&q).await?;
    println!("\nledger outbox: {backlog} usage records waiting for PostgreSQL");
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
            let usage = if s.quota_ms > 0 {
                format!(
                    "{}/{} ({:.0}%)",
                    format_duration(Duration::from_millis(s.usage_ms)),
                    format_duration(Duration::from_millis(s.quota_ms)),
                    s.usage_ms as f64 * 100.0 / s.quota_ms as f64
                )
            } else {
                format!("{}/-", format_duration(Duration::from_millis(s.usage_ms)))
            };
            vec![
                s.tenant.clone(),
                opt(&s.tier),
                s.ready.to_string(),
                s.delayed.to_string(),
                format!("{}/{}", s.running, s.cap),
                s.weight.to_string(),
                s.dead.to_string(),
                opt(&s.held),
                usage,
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
            "usage/quota (month)",
        ],
        &rows,
    );
    Ok(())
}

/// `agentq keep-completed`.
#[derive(Debug, Args)]
pub struct KeepArgs {
    /// Queue name.
    queue: String,
    /// How long its succeeded jobs keep their hash: `0` (removed as they
    /// succeed; their ledger rows are written all the same), `10m`, `24h`,
    /// or `default` (the partition's retention_ms, 24 h unless set).
    keep: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub(super) async fn keep_completed(g: &Global, a: KeepArgs) -> CliResult {
    validate_name("queue", &a.queue)?;
    let keep = crate::queue::parse_keep_completed(&a.keep)?;
    let q = g.queue().await?;
    q.set_keep_completed(&a.queue, keep).await?;
    let keep_ms = keep.map(|d| d.as_millis() as u64);
    if a.json {
        output::json(&serde_json::json!({ "queue": a.queue, "keep_completed_ms": keep_ms }));
        return Ok(());
    }
    match keep {
        None => println!(
            "queue {}: succeeded jobs keep their hash for retention_ms",
            a.queue
        ),
        Some(d) if d.is_zero() => println!(
            "queue {}: succeeded jobs are removed as they succeed",
            a.queue
        ),
        Some(d) => println!(
            "queue {}: succeeded jobs keep their hash for {}",
            a.queue,
            format_duration(d)
        ),
    }
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
    /// Change the limits of tenants that set none themselves (and have no tier value).
    Defaults(LimitFlags),
    /// Show a tenant's limits and where each comes from.
    Show(TenantShowArgs),
    /// API keys for the HTTP API.
    #[command(subcommand)]
    Key(super::serve::KeyCommand),
}

/// The limit flags shared by `tenant set` and `tenant defaults`.
#[derive(Debug, Args)]
pub struct LimitFlags {
    /// Tier (free, pro, enterprise, or one from agentq.toml).
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
    /// Job starts per period, fleet-wide, e.g. 10/s or 600/m (none: unlimited).
    #[arg(long, value_parser = limits::parse_rate)]
    rate: Option<limits::Rate>,
    /// Starts allowed at once above the steady rate (0: equal to the rate).
    #[arg(long)]
    burst: Option<u64>,
    /// Agent time per calendar month, e.g. 100h/month (none: no quota).
    #[arg(long, value_parser = limits::parse_quota)]
    quota: Option<Duration>,
    /// Price per agent-minute in dollars, e.g. 0.01.
    #[arg(long)]
    price_per_minute: Option<f64>,
    /// Price per 1,000 reported tokens in dollars.
    #[arg(long)]
    price_per_1k_tokens: Option<f64>,
    /// Graduated price per agent-minute by the month's agent time:
    /// PRICE[, PRICE@FROM]..., e.g. '0.010, 0.008@10000m, 0.006@50000m'
    /// (none: the flat --price-per-minute).
    #[arg(long, value_parser = minute_steps_arg)]
    price_steps: Option<limits::PriceSteps>,
    /// Graduated price per 1,000 tokens by the month's tokens, e.g.
    /// '0.002, 0.0015@10M, 0.001@100M' (none: the flat --price-per-1k-tokens).
    #[arg(long, value_parser = token_steps_arg)]
    token_price_steps: Option<limits::PriceSteps>,
    /// Spend per calendar month (UTC) at which the tenant's jobs are held,
    /// e.g. '$500/month' (none: no cap).
    #[arg(long, value_parser = limits::parse_spend_cap)]
    spend_cap: Option<u64>,
}

fn minute_steps_arg(s: &str) -> Result<limits::PriceSteps, String> {
    limits::PriceSteps::parse(s, limits::PriceUnit::Minutes)
}

fn token_steps_arg(s: &str) -> Result<limits::PriceSteps, String> {
    limits::PriceSteps::parse(s, limits::PriceUnit::Tokens)
}

impl LimitFlags {
    fn update(&self) -> LimitsUpdate {
        LimitsUpdate {
            max_concurrency: self.max_concurrency,
            max_timeout: self.max_timeout,
            max_memory: self.max_memory,
            weight: self.weight,
            rate: self.rate,
            burst: self.burst,
            quota: self.quota,
            tier: self.tier.clone(),
            price_per_minute: self.price_per_minute,
            price_per_1k_tokens: self.price_per_1k_tokens,
            expected_rate: None,
            price_steps: self.price_steps.clone(),
            token_price_steps: self.token_price_steps.clone(),
            spend_cap: self.spend_cap,
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
    /// Queues the tenant may enqueue to over the HTTP API, e.g. a,b (* : all).
    #[arg(long)]
    allowed_queues: Option<String>,
    /// Kinds the tenant may enqueue over the HTTP API, e.g. echo,sleep (* : all).
    #[arg(long)]
    allowed_kinds: Option<String>,
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

fn checked(u: LimitsUpdate) -> Result<LimitsUpdate, super::CliError> {
    u.validate()?;
    if u.is_empty() {
        return Err(super::CliError::Usage(
            crate::http::api::admin::NOTHING_TO_SET.into(),
        ));
    }
    Ok(u)
}

fn rate_text(l: &limits::TenantLimits) -> String {
    if l.rate == 0 {
        return "unlimited".into();
    }
    let burst = if l.burst > 0 { l.burst } else { l.rate };
    format!(
        "{}/{} (burst {burst})",
        l.rate,
        format_duration(Duration::from_millis(l.rate_period_ms))
    )
}

fn quota_text(ms: u64) -> String {
    if ms == 0 {
        "none".into()
    } else {
        format!("{}/month", format_duration(Duration::from_millis(ms)))
    }
}

fn spend_text(micros: u64) -> String {
    if micros == 0 {
        "none".into()
    } else {
        format!("{}/month", dollars(micros))
    }
}

fn dollars(micros: u64) -> String {
    format!("${:.4}", micros as f64 / 1e6)
}

pub(super) async fn tenant(g: &Global, c: TenantCommand) -> CliResult {
    match c {
        TenantCommand::Set(a) => {
            // The one change `PUT /v1/admin/tenants/{tenant}` makes too.
            let change = crate::http::api::admin::TenantSet {
                limits: a.limits.update(),
                allowed_queues: a.allowed_queues,
                allowed_kinds: a.allowed_kinds,
            }
            .check(&a.tenant)?;
            let q = g.queue().await?;
            change.apply(&q).await?;
            if !change.limits.is_empty() {
                println!("tenant {}: set {}", a.tenant, change.limits.describe());
            }
            if change.limits.spend_cap.is_some_and(|c| c > 0) {
                // The spend counter counts from the ledger's month-to-date.
                let seeded = match super::usage::database(g).await {
                    Ok(pool) => crate::usage::raise_spend(&q, &pool, &a.tenant)
                        .await
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                match seeded {
                    Ok(m) => println!(
                        "tenant {}: spend this month so far {}",
                        a.tenant,
                        dollars(m)
                    ),
                    Err(e) => eprintln!(
                        "warning: the spend counter was not raised to the ledger's month-to-date ({e}); run agentq usage --reconcile"
                    ),
                }
            }
            if change.restricts() {
                let (queues, kinds) = change.describe_allowed();
                println!(
                    "tenant {}: allowed queues {queues}, allowed kinds {kinds} (HTTP API)",
                    a.tenant
                );
            }
        }
        TenantCommand::Defaults(f) => {
            let u = checked(f.update())?;
            if u.tier.is_some() {
                return Err(super::CliError::Usage(
                    "--tier applies to a tenant: use agentq tenant set T --tier NAME".into(),
                ));
            }
            let q = g.queue().await?;
            u.apply(&q, Target::Defaults).await?;
            println!("defaults: set {}", u.describe());
        }
        TenantCommand::Key(c) => return super::serve::key(g, c).await,
        TenantCommand::Show(a) => {
            validate_name("tenant", &a.tenant)?;
            let q = g.queue().await?;
            let s = crate::queue::limits::settings(&q, Some(&a.tenant)).await?;
            let allowed = crate::http::api::allowed::read(&q, &a.tenant).await?;
            if a.json {
                let mut v = serde_json::to_value(&s).unwrap_or_default();
                v["allowed"] = serde_json::to_value(&allowed).unwrap_or_default();
                output::json(&v);
                return Ok(());
            }
            let list = |l: &Option<Vec<String>>| l.as_ref().map_or("all".into(), |l| l.join(","));
            let src = |fs: &[&str]| {
                if fs.iter().any(|f| s.own.iter().any(|o| o == f)) {
                    "tenant".to_string()
                } else if s.tier.is_some() {
                    "tier or default".to_string()
                } else {
                    "default".to_string()
                }
            };
            let l = s.limits;
            output::table(
                &["limit", "value", "from"],
                &[
                    vec!["tier".into(), opt(&s.tier), src(&["tier"])],
                    vec![
                        "max_concurrency".into(),
                        l.max_concurrency.to_string(),
                        src(&["max_concurrency"]),
                    ],
                    vec![
                        "max_timeout".into(),
                        format_duration(Duration::from_millis(l.max_timeout_ms)),
                        src(&["max_timeout_ms"]),
                    ],
                    vec![
                        "max_memory".into(),
                        format_size(l.max_memory),
                        src(&["max_memory"]),
                    ],
                    vec!["weight".into(), l.weight.to_string(), src(&["weight"])],
                    vec!["rate".into(), rate_text(&l), src(&["rate", "burst"])],
                    vec!["quota".into(), quota_text(l.quota_ms), src(&["quota_ms"])],
                    vec![
                        "price/agent-minute".into(),
                        dollars(l.price_minute_micros),
                        src(&["price_minute_micros"]),
                    ],
                    vec![
                        "price/1k tokens".into(),
                        dollars(l.price_ktok_micros),
                        src(&["price_ktok_micros"]),
                    ],
                    vec![
                        "price steps/agent-minute".into(),
                        s.price_steps.describe(limits::PriceUnit::Minutes),
                        src(&["price_minute_steps"]),
                    ],
                    vec![
                        "price steps/1k tokens".into(),
                        s.token_price_steps.describe(limits::PriceUnit::Tokens),
                        src(&["price_ktok_steps"]),
                    ],
                    vec![
                        "spend cap".into(),
                        spend_text(l.spend_cap_micros),
                        src(&["spend_cap_micros"]),
                    ],
                    vec![
                        "allowed queues (HTTP)".into(),
                        list(&allowed.queues),
                        "tenant".into(),
                    ],
                    vec![
                        "allowed kinds (HTTP)".into(),
                        list(&allowed.kinds),
                        "tenant".into(),
                    ],
                ],
            );
        }
    }
    Ok(())
}

pub(super) async fn tiers(g: &Global, a: ListArgs) -> CliResult {
    let q = g.queue().await?;
    let tiers = crate::queue::limits::published_tiers(&q).await?;
    if a.json {
        output::json(&tiers);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = tiers
        .iter()
        .map(|t| {
            let l = &t.limits;
            vec![
                t.name.clone(),
                l.max_concurrency.to_string(),
                format_duration(Duration::from_millis(l.max_timeout_ms)),
                format_size(l.max_memory),
                l.weight.to_string(),
                rate_text(l),
                quota_text(l.quota_ms),
                if t.price_steps.is_empty() {
                    dollars(l.price_minute_micros)
                } else {
                    t.price_steps.describe(limits::PriceUnit::Minutes)
                },
                if t.token_price_steps.is_empty() {
                    dollars(l.price_ktok_micros)
                } else {
                    t.token_price_steps.describe(limits::PriceUnit::Tokens)
                },
                spend_text(l.spend_cap_micros),
            ]
        })
        .collect();
    output::table(
        &[
            "tier",
            "max_concurrency",
            "max_timeout",
            "max_memory",
            "weight",
            "rate",
            "quota",
            "$/agent-min",
            "$/1k tokens",
            "spend cap",
        ],
        &rows,
    );
    if tiers.is_empty() {
        eprintln!(
            "no tiers published yet: workers publish the tiers of their agentq.toml (or the built-in free, pro, enterprise) at start"
        );
    }
    Ok(())
}
