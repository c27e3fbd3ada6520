//! The `agentq` command line (README, "Command line").
//!
//! Exit codes: 0 success, 1 runtime failure, 2 bad usage or bad input (one
//! line saying what was wrong and how to fix it; nothing is written).

pub mod config;
pub mod demo;
mod drain;
mod invoice;
mod jobs;
mod ops;
pub mod output;
mod run;
mod schedules;
mod serve;
mod usage;
mod watch;
pub mod webhooks;

pub use run::cancel_on_signals;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::cli::config::{Overrides, Settings};
use crate::queue::{Queue, QueueConfig, QueueError};

/// A command's failure, carrying its exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad usage or input: exit 2.
    #[error("{0}")]
    Usage(String),
    /// Runtime failure: exit 1.
    #[error("{0:#}")]
    Runtime(#[from] anyhow::Error),
    /// Exit with this code; the command has already said why
    /// (`agentq watch`: how the job ended).
    #[error("exit {0}")]
    Exit(u8),
}

impl From<QueueError> for CliError {
    fn from(e: QueueError) -> Self {
        if e.is_input() {
            CliError::Usage(e.to_string())
        } else {
            CliError::Runtime(e.into())
        }
    }
}

impl From<crate::model::names::InvalidInput> for CliError {
    fn from(e: crate::model::names::InvalidInput) -> Self {
        CliError::Usage(e.0)
    }
}

impl From<crate::cli::config::ConfigError> for CliError {
    fn from(e: crate::cli::config::ConfigError) -> Self {
        CliError::Usage(e.to_string())
    }
}

/// Result of a command.
pub type CliResult = Result<(), CliError>;

/// agentq: durable, multi-tenant job queue workers with fair scheduling, hard limits and a usage ledger.
#[derive(Debug, Parser)]
#[command(name = "agentq", version, about, propagate_version = true)]
pub struct Cli {
    /// Connection settings.
    #[command(flatten)]
    pub global: Global,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Settings every command takes.
#[derive(Debug, Args)]
pub struct Global {
    /// Redis URL [env: AGENTQ_REDIS_URL, REDIS_URL] [default: redis://127.0.0.1:6379]
    #[arg(long, global = true)]
    pub redis_url: Option<String>,
    /// PostgreSQL URL [env: AGENTQ_DATABASE_URL, DATABASE_URL]
    #[arg(long, global = true)]
    pub database_url: Option<String>,
    /// Redis key namespace [env: AGENTQ_NAMESPACE] [default: agentq]
    #[arg(long, global = true)]
    pub namespace: Option<String>,
    /// Redis partitions tenants are spread over [env: AGENTQ_PARTITIONS] [default: 1]
    #[arg(long, global = true)]
    pub partitions: Option<u32>,
    /// Config file [default: ./agentq.toml if present]
    #[arg(long, global = true)]
    pub config: Option<String>,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply migrations/ to PostgreSQL.
    Migrate,
    /// Run a worker until SIGINT/SIGTERM.
    Worker(run::WorkerArgs),
    /// Enqueue one job; prints its id.
    Enqueue(jobs::EnqueueArgs),
    /// Per queue: ready, delayed, running, dead, paused.
    Queues(ops::ListArgs),
    /// Per tenant: ready, running/cap, why held.
    Tenants(ops::TenantsArgs),
    /// List jobs of a queue.
    Jobs(jobs::JobsArgs),
    /// Every field of one job.
    Inspect(jobs::InspectArgs),
    /// Print a job's events (from its enqueue) as they happen; exit when it ends.
    #[command(after_help = watch::WATCH_EXIT_CODES)]
    Watch(watch::WatchArgs),
    /// Turn a queue's job events on or off (or show the setting).
    JobEvents(watch::JobEventsArgs),
    /// Cancel a job that has not finished (queued, or running: killed).
    Cancel(jobs::CancelArgs),
    /// Stop new starts on a queue (or one tenant on it).
    Pause(ops::PauseArgs),
    /// Undo a pause or a drain.
    Resume(ops::PauseArgs),
    /// How long a queue's succeeded jobs keep their hash (0: removed on success).
    KeepCompleted(ops::KeepArgs),
    /// Stop new starts on a queue fleet-wide and wait until nothing runs.
    Drain(drain::DrainArgs),
    /// List, retry or purge dead jobs.
    Dead(drain::DeadArgs),
    /// Tenant limits.
    #[command(subcommand)]
    Tenant(ops::TenantCommand),
    /// Tiers as published in Redis.
    Tiers(ops::ListArgs),
    /// Tenants' recurring schedules: add, list, rm.
    #[command(subcommand)]
    Schedule(schedules::ScheduleCommand),
    /// Tenants' alert webhooks: set, show, rm, test, dead.
    #[command(subcommand)]
    Webhook(webhooks::WebhookCommand),
    /// Usage per tenant from the ledger: agent time, CPU, outcomes, tokens, cost.
    Usage(usage::UsageArgs),
    /// A tenant's invoice for a month: lines per price step, reconciled with the ledger.
    Invoice(invoice::InvoiceArgs),
    /// Print a Lua script as loaded into Redis (enqueue: the wire format for other languages).
    Script(jobs::ScriptArgs),
    /// HTTP API for enqueue, status, cancel and usage (tenant API keys).
    Serve(serve::ServeArgs),
    /// Run the demo: a worker pool and a mixed multi-tenant workload.
    Demo(crate::cli::demo::DemoArgs),
}

/// Parse `500ms`, `30s`, `5m` for clap.
pub fn duration_arg(s: &str) -> Result<Duration, String> {
    crate::model::units::parse_duration(s).map_err(|e| e.to_string())
}

/// Parse `256MiB` for clap.
pub fn size_arg(s: &str) -> Result<u64, String> {
    crate::model::units::parse_size(s).map_err(|e| e.to_string())
}

/// `--min-replicas-ack` and `--min-replicas-timeout`, for the commands
/// that enqueue and for the worker's claims (README, "Redis Sentinel").
#[derive(Debug, Args)]
pub struct ReplicaAck {
    /// Acknowledge an enqueue, or start a claimed job, only once this many
    /// replicas confirmed it (Redis WAIT); fewer within
    /// --min-replicas-timeout is an error (an enqueue: retry with the same
    /// idempotency key; a claim: its jobs are handed back unstarted).
    #[arg(long, env = "AGENTQ_MIN_REPLICAS_ACK", default_value_t = 0)]
    pub min_replicas_ack: u32,
    /// How long an enqueue or a claim waits for --min-replicas-ack replicas.
    #[arg(long, env = "AGENTQ_MIN_REPLICAS_TIMEOUT", default_value = "1s", value_parser = duration_arg)]
    pub min_replicas_timeout: Duration,
}

impl Global {
    /// Resolve the settings.
    pub fn settings(&self) -> Result<Settings, CliError> {
        Ok(Settings::resolve(&Overrides {
            redis_url: self.redis_url.clone(),
            database_url: self.database_url.clone(),
            namespace: self.namespace.clone(),
            partitions: self.partitions,
            config: self.config.clone(),
        })?)
    }

    /// Connect to the queue.
    pub async fn queue(&self) -> Result<Queue, CliError> {
        let s = self.settings()?;
        connect(&s, &s.redis_url).await
    }

    /// Connect to the queue, acknowledging enqueues as `ack` says.
    pub async fn queue_acked(&self, ack: &ReplicaAck) -> Result<Queue, CliError> {
        let s = self.settings()?;
        connect_with(&s, &s.redis_url, |cfg| {
            cfg.min_replicas_ack = ack.min_replicas_ack;
            cfg.min_replicas_timeout = ack.min_replicas_timeout;
        })
        .await
    }
}

/// Connect to Redis at `url` with the layout in `s`.
pub async fn connect(s: &Settings, url: &str) -> Result<Queue, CliError> {
    connect_with(s, url, |_| {}).await
}

/// [`connect`], with `adjust` changing the config first.
async fn connect_with(
    s: &Settings,
    url: &str,
    adjust: impl FnOnce(&mut QueueConfig),
) -> Result<Queue, CliError> {
    let mut cfg = QueueConfig::new(url);
    cfg.namespace = s.namespace.clone();
    cfg.partitions = s.partitions;
    adjust(&mut cfg);
    Queue::connect(cfg).await.map_err(|e| match e {
        QueueError::Redis(re) => CliError::Runtime(anyhow::anyhow!(
            "cannot reach Redis at {}: {re}; {}",
            crate::model::redact::redact_url(url),
            redis_hint(&re.to_string())
        )),
        other => other.into(),
    })
}

/// How to fix a Redis connection error, from its text.
fn redis_hint(error: &str) -> &'static str {
    if error.contains("Certificate") || error.contains("certificate") {
        "the server's TLS certificate is not trusted: point SSL_CERT_FILE at the CA's PEM file"
    } else if error.contains("WRONGPASS")
        || error.contains("NOAUTH")
        || error.contains("Authentication")
    {
        "the password (or user) in the URL is wrong: redis://:PASSWORD@host:port or redis://USER:PASSWORD@host:port"
    } else if error.contains("Sentinel") {
        "check that Sentinels listen at the URL's host and node= addresses and monitor the \
         name given as sentinelServiceName (redis-cli -p 26379 SENTINEL masters)"
    } else {
        "is redis-server running? (set AGENTQ_REDIS_URL or --redis-url; rediss:// for TLS, \
         redis-cluster:// for a Redis Cluster, \
         redis-sentinel://HOST:26379?sentinelServiceName=NAME behind Sentinels)"
    }
}

/// Log to stderr with the `AGENTQ_LOG` filter; the default is `info` for the
/// worker and quieter for commands whose stdout a person reads.
fn init_logging(command: &Command) {
    let default = match command {
        Command::Worker(_) | Command::Serve(_) => "agentq=info,warn",
        _ => "agentq=warn,error",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("AGENTQ_LOG")
        .unwrap_or_else(|_| default.into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Run a parsed command line and map the result to an exit code.
pub async fn run(cli: Cli) -> ExitCode {
    init_logging(&cli.command);
    let g = &cli.global;
    let result = match cli.command {
        Command::Migrate => run::migrate(g).await,
        Command::Worker(a) => run::worker(g, a).await,
        Command::Enqueue(a) => jobs::enqueue(g, a).await,
        Command::Queues(a) => ops::queues(g, a).await,
        Command::Tenants(a) => ops::tenants(g, a).await,
        Command::Jobs(a) => jobs::list(g, a).await,
        Command::Inspect(a) => jobs::inspect(g, a).await,
        Command::Watch(a) => watch::watch(g, a).await,
        Command::JobEvents(a) => watch::job_events(g, a).await,
        Command::Cancel(a) => jobs::cancel(g, a).await,
        Command::Pause(a) => ops::pause(g, a, true).await,
        Command::Resume(a) => ops::pause(g, a, false).await,
        Command::KeepCompleted(a) => ops::keep_completed(g, a).await,
        Command::Drain(a) => drain::drain(g, a).await,
        Command::Dead(a) => drain::dead(g, a).await,
        Command::Tenant(c) => ops::tenant(g, c).await,
        Command::Tiers(a) => ops::tiers(g, a).await,
        Command::Schedule(c) => schedules::schedule(g, c).await,
        Command::Webhook(c) => webhooks::webhook(g, c).await,
        Command::Usage(a) => usage::usage(g, a).await,
        Command::Invoice(a) => invoice::invoice(g, a).await,
        Command::Serve(a) => serve::serve(g, a).await,
        Command::Script(a) => jobs::script(a),
        Command::Demo(a) => crate::cli::demo::run(g, a).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError::Usage(m)) => {
            eprintln!("error: {m}");
            ExitCode::from(2)
        }
        Err(CliError::Runtime(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
        Err(CliError::Exit(code)) => ExitCode::from(code),
    }
}
