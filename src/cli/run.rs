//! `agentq worker`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use tokio_util::sync::CancellationToken;

use super::{CliError, CliResult, Global, duration_arg};
use crate::executor::sandbox::{BadTaskUser, SandboxConfig, TaskUser, parse_cgroup_parent};
use crate::executor::{Handlers, Registry};
use crate::queue::QueueError;
use crate::worker::{Worker, WorkerConfig};

/// `agentq worker`.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Queues to claim from, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "default")]
    queues: Vec<String>,
    /// Attempts run at once by this worker.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Folder of task kinds (`<kind>/worker.toml`).
    #[arg(long, env = "AGENTQ_WORKERS_DIR", default_value = "workers")]
    workers_dir: PathBuf,
    /// Wait this long for running attempts on SIGTERM before handing them back.
    #[arg(long, value_parser = duration_arg, default_value = "30s")]
    shutdown_grace: Duration,
    /// Lease duration: a crashed worker's jobs run again after this.
    #[arg(long, value_parser = duration_arg, default_value = "30s")]
    lease: Duration,
    /// SIGTERM-to-SIGKILL grace for task processes at their timeout.
    #[arg(long, value_parser = duration_arg, default_value = "5s")]
    kill_grace: Duration,
    /// First retry delay (doubles per attempt, with jitter).
    #[arg(long, value_parser = duration_arg, default_value = "1s")]
    backoff_base: Duration,
    /// Serve /metrics, /healthz and /readyz here ("off" to disable)
    /// [default: 0.0.0.0:9464; if that port is taken the worker warns and runs without it].
    #[arg(long)]
    metrics_addr: Option<String>,
    /// Tenant label values on metrics: all, top:N (the rest are "other") or none.
    #[arg(long, default_value = "top:100")]
    metrics_tenant_labels: crate::metrics::TenantLabels,
    /// Do not write the usage ledger to PostgreSQL (records wait in the Redis outbox).
    #[arg(long)]
    no_ledger: bool,
    /// Worker id [default: host-pid-random].
    #[arg(long)]
    id: Option<String>,
    /// Per-attempt cgroups go in <controller mount>/<this>/<worker id>/ ("off": rlimits only).
    #[arg(long, env = "AGENTQ_CGROUP_PARENT", default_value = crate::executor::sandbox::DEFAULT_CGROUP_PARENT)]
    cgroup_parent: String,
    /// Most processes and threads one attempt may have at once.
    #[arg(long, env = "AGENTQ_TASK_PIDS_MAX", default_value_t = crate::executor::sandbox::DEFAULT_PIDS_MAX,
          value_parser = clap::value_parser!(u64).range(1..))]
    task_pids_max: u64,
    /// Run task programs as this user: a name (nobody), uid, uid:gid, or a range FIRST-LAST
    /// (each running attempt gets its own uid) [default: the worker's user].
    #[arg(long, env = "AGENTQ_TASK_USER")]
    task_user: Option<String>,
    /// Replica confirmation of every claim: a claimed job starts only once
    /// this many replicas hold the claim, so a failover cannot hand it to
    /// another worker under the same attempt while it runs here.
    #[command(flatten)]
    ack: super::ReplicaAck,
    /// Tenant webhook delivery (README, "Tenant alerts").
    #[command(flatten)]
    webhooks: super::webhooks::WebhookWorkerArgs,
}

impl WorkerArgs {
    /// The worker configuration these flags describe.
    pub fn config(&self) -> Result<WorkerConfig, CliError> {
        for q in &self.queues {
            crate::queue::job::validate_name("queue", q)?;
        }
        if !(1..=4096).contains(&self.concurrency) {
            return Err(CliError::Usage("--concurrency must be 1..=4096".into()));
        }
        if self.lease < Duration::from_millis(300) {
            return Err(CliError::Usage("--lease must be at least 300ms".into()));
        }
        let mut cfg = WorkerConfig::new(self.queues.clone());
        if let Some(id) = &self.id {
            crate::queue::job::validate_name("worker id", id)?;
            cfg.id = id.clone();
        }
        cfg.concurrency = self.concurrency;
        cfg.shutdown_grace = self.shutdown_grace;
        cfg.lease = self.lease;
        cfg.kill_grace = self.kill_grace;
        cfg.backoff_base = self.backoff_base;
        cfg.sample_metrics = Some(Duration::from_secs(5));
        cfg.reap_interval =
            (self.lease / 4).clamp(Duration::from_millis(100), Duration::from_secs(1));
        // This binary runs the lease guard too (`agentq __lease-guard`).
        cfg.lease_guard = std::env::current_exe().ok();
        cfg.webhooks = self.webhooks.config()?;
        Ok(cfg)
    }

    /// The task containment these flags describe, for worker `worker_id`.
    pub fn sandbox(&self, worker_id: &str) -> Result<SandboxConfig, CliError> {
        let task_user = match self.task_user.as_deref().filter(|u| !u.is_empty()) {
            None => None,
            Some(u) => {
                let user: TaskUser = u
                    .parse()
                    .map_err(|e: BadTaskUser| CliError::Usage(format!("--task-user: {e}")))?;
                if let TaskUser::Range { first, last } = user
                    && u64::from(last - first) + 1 < self.concurrency as u64
                {
                    return Err(CliError::Usage(format!(
                        "--task-user range {first}-{last} has fewer uids than --concurrency {}: widen it",
                        self.concurrency
                    )));
                }
                Some(user)
            }
        };
        let cgroup_parent = parse_cgroup_parent(&self.cgroup_parent);
        if let Some(p) = &cgroup_parent
            && !crate::executor::cgroup::valid_parent(p)
        {
            return Err(CliError::Usage(format!(
                "--cgroup-parent {p:?} is not valid: use a relative path of letters, digits, '_', '.', '-' and '/', for example agentq (or off)"
            )));
        }
        Ok(SandboxConfig {
            cgroup_parent,
            worker_id: worker_id.to_string(),
            pids_max: self.task_pids_max,
            task_user,
        })
    }
}

/// Makes this process not dumpable (`PR_SET_DUMPABLE` 0): a process of the
/// same uid that is not privileged, such as a task program when the worker
/// runs without `--task-user`, can no longer read its `/proc/<pid>/environ`
/// (database URL, Redis password), `mem`, `fd/` or attach to it. The
/// programs it starts are dumpable again after their `execve` (the kernel
/// resets the flag for a binary that changes no credentials), which they
/// need for nothing of ours. Called first thing by `worker` and `serve`.
pub(super) fn forbid_dumping() -> Result<(), CliError> {
    // SAFETY: plain syscall with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(CliError::Runtime(anyhow::anyhow!(
            "cannot make the process non-dumpable (prctl PR_SET_DUMPABLE): {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// Cancel `token` on SIGINT or SIGTERM.
pub fn cancel_on_signals(token: CancellationToken) -> Result<(), CliError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(anyhow::Error::from)?;
    let mut int = signal(SignalKind::interrupt()).map_err(anyhow::Error::from)?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping"),
            _ = int.recv() => tracing::info!("SIGINT: stopping"),
        }
        token.cancel();
    });
    Ok(())
}

pub(super) async fn worker(g: &Global, a: WorkerArgs) -> CliResult {
    forbid_dumping()?;
    let cfg = a.config()?;
    let sandbox = crate::executor::sandbox::install(a.sandbox(&cfg.id)?);
    let registry = Registry::load(&a.workers_dir).map_err(|e| CliError::Usage(e.to_string()))?;
    if registry.is_empty() {
        tracing::warn!(dir = %a.workers_dir.display(), "no task kinds found; only in-process kinds (noop) will run");
    }
    let queue = g.queue_acked(&a.ack).await?;
    let shutdown = CancellationToken::new();
    cancel_on_signals(shutdown.clone())?;
    let tiers = g.settings()?.tiers;
    match crate::queue::limits::publish_tiers(&queue, &tiers).await {
        // A full Redis must not stop workers: running them is how it drains.
        Err(QueueError::Full(why)) => {
            tracing::warn!(%why, "could not publish tiers (Redis is full); keeping the ones already there")
        }
        r => r?,
    }
    let mut worker = Worker::new(queue.clone(), cfg, registry, Handlers::with_builtins());
    let mut db = None;
    if !a.no_ledger {
        let url = g.settings()?.database_url;
        let pool = crate::ledger::connect_lazy(&url).map_err(|e| {
            CliError::Usage(format!(
                "database URL {} is not valid: {e}",
                crate::model::redact::redact_url(&url)
            ))
        })?;
        db = Some(pool.clone());
        worker = worker.with_ledger_and_tiers(pool, tiers);
    }
    crate::metrics::set_tenant_labels(a.metrics_tenant_labels.clone());
    serve_metrics(
        a.metrics_addr.as_deref(),
        crate::http::probes::Readiness { queue, db },
        shutdown.clone(),
    )
    .await?;
    let summary = worker.run(shutdown).await?;
    sandbox.shutdown();
    tracing::info!(
        started = summary.started,
        completed = summary.completed,
        refused = summary.refused,
        released = summary.released,
        "worker stopped"
    );
    Ok(())
}

pub(super) async fn migrate(g: &Global) -> CliResult {
    let url = g.settings()?.database_url;
    let pool = super::usage::database(g).await?;
    crate::ledger::migrate(&pool)
        .await
        .map_err(|e| CliError::Runtime(e.into()))?;
    println!(
        "migrations applied to {}",
        crate::model::redact::redact_url(&url)
    );
    Ok(())
}

/// Start the metrics endpoint: an explicit address must bind (exit 1
/// otherwise); the default one only warns, so several workers can share a host.
pub(super) async fn serve_metrics(
    addr: Option<&str>,
    ready: crate::http::probes::Readiness,
    stop: CancellationToken,
) -> Result<(), CliError> {
    let (text, explicit) = match addr {
        Some("off") => return Ok(()),
        Some(a) => (a, true),
        None => ("0.0.0.0:9464", false),
    };
    let sock: std::net::SocketAddr = text.parse().map_err(|_| {
        CliError::Usage(format!(
            "--metrics-addr {text:?} is not HOST:PORT, for example 0.0.0.0:9464 (or off)"
        ))
    })?;
    match crate::http::probes::serve(sock, ready, stop).await {
        Ok(bound) => {
            tracing::info!(addr = %bound, "metrics on http://{bound}/metrics (health: /healthz, /readyz)");
            Ok(())
        }
        Err(e) if !explicit => {
            tracing::warn!(addr = %sock, error = %e, "metrics endpoint not started (pass --metrics-addr to choose a port)");
            Ok(())
        }
        Err(e) => Err(CliError::Runtime(anyhow::anyhow!(
            "cannot serve metrics on {sock}: {e}"
        ))),
    }
}
