//! The worker: claims fairly in batches, runs each attempt, acknowledges
//! completions in batches, and shuts down gracefully, with its background
//! duties (heartbeat, reaper, ledger writer, sampler, schedules, webhooks)
//! beside it.
//!
//! Files: `claim` (the claim loop), `slots` (splitting slots across
//! partitions), `attempt` (one attempt, start to close), `complete` (the
//! completion loop), `wake` (pub/sub wake-ups). The duties are
//! [`crate::duties`].

mod attempt;
mod claim;
mod complete;
mod slots;
mod wake;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::duties::heartbeat::{Heartbeat, HeartbeatConfig};
use crate::duties::ledger_writer::LedgerWriter;
use crate::duties::reaper::{Reaper, ReaperConfig};
use crate::duties::sampler::{Sampler, SamplerConfig};
use crate::duties::schedules::{Schedules, SchedulesConfig};
use crate::duties::webhooks::{Webhooks, WebhooksConfig};
use crate::executor::lease_guard::LeaseGuard;
use crate::executor::{self, Handlers, Registry};
use crate::lease::{Held, StopReason};
use crate::queue::{Queue, QueueError};

use attempt::Finished;
use claim::{ClaimSignals, claim_loop};
use complete::complete_loop;
use wake::subscribe_wake;

/// How a worker runs.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Worker id (host-pid-random by default), recorded on jobs and ledger rows.
    pub id: String,
    /// Queues to claim from.
    pub queues: Vec<String>,
    /// Attempts run at once by this worker.
    pub concurrency: usize,
    /// Lease duration; extended every third of it.
    pub lease: Duration,
    /// How long shutdown waits for running attempts before handing them back.
    pub shutdown_grace: Duration,
    /// SIGTERM-to-SIGKILL grace for task processes.
    pub kill_grace: Duration,
    /// First retry delay; doubles per attempt, with jitter.
    pub backoff_base: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// Reaper interval (fleet-wide guard).
    pub reap_interval: Duration,
    /// Longest idle wait between claims when nothing wakes the worker.
    pub idle_poll: Duration,
    /// Sample queue depth and tenant state into gauges this often (one
    /// worker of the fleet at a time); None: never.
    pub sample_metrics: Option<Duration>,
    /// The agentq binary, to start the lease guard process
    /// ([`crate::executor::lease_guard`]) that kills a task whose lease this
    /// worker stopped renewing even while the worker itself is stopped.
    /// None: no guard (the worker still kills lapsed attempts itself while
    /// it runs). `agentq worker` sets it to itself.
    pub lease_guard: Option<std::path::PathBuf>,
    /// Tenant webhook delivery ([`crate::duties::webhooks`]).
    pub webhooks: WebhooksConfig,
}

impl WorkerConfig {
    /// Defaults for `queues`: concurrency 8, 30 s leases, 30 s shutdown grace.
    pub fn new(queues: Vec<String>) -> Self {
        WorkerConfig {
            id: default_worker_id(),
            queues,
            concurrency: 8,
            lease: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
            kill_grace: executor::DEFAULT_KILL_GRACE,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            reap_interval: Duration::from_secs(1),
            idle_poll: Duration::from_secs(1),
            sample_metrics: None,
            lease_guard: None,
            webhooks: WebhooksConfig::default(),
        }
    }
}

/// `<host>-<pid>-<4 hex>`.
pub fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into());
    format!(
        "{host}-{}-{:04x}",
        std::process::id(),
        rand::random::<u16>()
    )
}

/// What a worker did, returned when it stops.
#[derive(Clone, Debug, Default)]
pub struct WorkerSummary {
    /// Attempts started.
    pub started: u64,
    /// Completions acknowledged.
    pub completed: u64,
    /// Completions refused (lease lost).
    pub refused: u64,
    /// Attempts handed back at shutdown.
    pub released: u64,
}

#[derive(Default)]
struct Counters {
    started: AtomicU64,
    completed: AtomicU64,
    refused: AtomicU64,
    released: AtomicU64,
}

/// A worker: a queue handle, the task programs and handlers it can run.
pub struct Worker {
    queue: Queue,
    cfg: WorkerConfig,
    registry: Arc<Registry>,
    handlers: Arc<Handlers>,
    ledger: Option<(sqlx::PgPool, Vec<crate::model::limits::Tier>)>,
}

struct Ctx {
    queue: Queue,
    cfg: WorkerConfig,
    registry: Arc<Registry>,
    handlers: Arc<Handlers>,
    held: Arc<Held>,
    guard: Option<Arc<LeaseGuard>>,
    done: mpsc::UnboundedSender<Finished>,
    /// Notified when a slot frees: an attempt ended here, or completions
    /// were acknowledged.
    slot_freed: Arc<Notify>,
}

impl Worker {
    /// A worker over `queue` running `registry`'s programs and `handlers`.
    pub fn new(queue: Queue, cfg: WorkerConfig, registry: Registry, handlers: Handlers) -> Self {
        Worker {
            queue,
            cfg,
            registry: Arc::new(registry),
            handlers: Arc::new(handlers),
            ledger: None,
        }
    }

    /// Also run a ledger writer that moves usage records from the outbox to
    /// this database (it applies migrations first; PostgreSQL may be down
    /// meanwhile: records wait in the outbox).
    pub fn with_ledger(self, pool: sqlx::PgPool) -> Self {
        self.with_ledger_and_tiers(pool, Vec::new())
    }

    /// [`with_ledger`](Self::with_ledger), also recording `tiers` in the
    /// database's `tiers` table.
    pub fn with_ledger_and_tiers(
        mut self,
        pool: sqlx::PgPool,
        tiers: Vec<crate::model::limits::Tier>,
    ) -> Self {
        self.ledger = Some((pool, tiers));
        self
    }

    /// Run until `shutdown` fires, then stop claiming, wait up to the grace
    /// for running attempts, hand the rest back to ready and return.
    pub async fn run(self, shutdown: CancellationToken) -> Result<WorkerSummary, QueueError> {
        let held = Arc::new(Held::default());
        let counters = Arc::new(Counters::default());
        let slot_freed = Arc::new(Notify::new());
        let wake = Arc::new(Notify::new());
        let background = CancellationToken::new();
        let (tx, rx) = mpsc::unbounded_channel();

        let woken: Arc<Vec<AtomicBool>> = Arc::new(
            (0..self.queue.partitions())
                .map(|_| AtomicBool::new(true))
                .collect(),
        );
        let _sub = subscribe_wake(&self.queue, wake.clone(), woken.clone(), held.clone()).await?;
        crate::metrics::register_zeroes();
        let guard = self.cfg.lease_guard.as_deref().and_then(|bin| {
            LeaseGuard::spawn(bin)
                .inspect_err(|e| tracing::warn!(error = %e, program = %bin.display(),
                    "could not start the lease guard; tasks of a stalled worker may outlive their leases"))
                .ok()
                .map(Arc::new)
        });
        let heartbeat = Heartbeat::new(
            self.queue.clone(),
            held.clone(),
            guard.clone(),
            HeartbeatConfig {
                lease: self.cfg.lease,
            },
        );
        let heartbeat = tokio::spawn(heartbeat.run(background.clone()));
        let reaper = Reaper::new(
            self.queue.clone(),
            ReaperConfig {
                interval: self.cfg.reap_interval,
                ..ReaperConfig::default()
            },
        );
        let reaper = tokio::spawn(reaper.run(background.clone()));
        let schedules = tokio::spawn(
            Schedules::new(self.queue.clone(), SchedulesConfig::default()).run(background.clone()),
        );
        let webhooks = tokio::spawn(
            Webhooks::new(
                self.queue.clone(),
                self.cfg.id.clone(),
                self.cfg.webhooks.clone(),
            )
            .run(background.clone()),
        );
        let writer = self.ledger.clone().map(|(pool, tiers)| {
            let mut w = LedgerWriter::new(self.queue.clone(), pool, self.cfg.id.clone());
            w.tiers = tiers;
            tokio::spawn(w.run(background.clone()))
        });
        let sampler = self.cfg.sample_metrics.map(|every| {
            let s = Sampler::new(
                self.queue.clone(),
                self.cfg.id.clone(),
                SamplerConfig { every },
            );
            tokio::spawn(s.run(background.clone()))
        });
        let completer = tokio::spawn(complete_loop(
            self.queue.clone(),
            self.cfg.id.clone(),
            rx,
            held.clone(),
            slot_freed.clone(),
            counters.clone(),
        ));
        tracing::info!(worker = %self.cfg.id, queues = ?self.cfg.queues, concurrency = self.cfg.concurrency, "worker started");

        let ctx = Arc::new(Ctx {
            queue: self.queue.clone(),
            cfg: self.cfg.clone(),
            registry: self.registry.clone(),
            handlers: self.handlers.clone(),
            held: held.clone(),
            guard,
            done: tx,
            slot_freed: slot_freed.clone(),
        });
        let signals = ClaimSignals {
            slot_freed: &slot_freed,
            wake: &wake,
            woken: &woken,
            shutdown: &shutdown,
        };
        claim_loop(&ctx, &counters, &signals).await;

        // Graceful stop: no new claims; let running attempts finish within the grace.
        tracing::info!(running = held.len(), grace = ?self.cfg.shutdown_grace, "shutting down: waiting for running attempts");
        let deadline = Instant::now() + self.cfg.shutdown_grace;
        while !held.is_empty() && Instant::now() < deadline {
            let _ = tokio::time::timeout(Duration::from_millis(100), slot_freed.notified()).await;
        }
        if !held.is_empty() {
            tracing::warn!(
                running = held.len(),
                "grace over: handing the remaining attempts back to ready"
            );
            held.stop_all(StopReason::Shutdown);
        }
        drop(ctx); // the completer ends once every job task has dropped its sender
        let _ = completer.await;
        background.cancel();
        let _ = heartbeat.await;
        let _ = reaper.await;
        let _ = schedules.await;
        let _ = webhooks.await;
        for task in [writer, sampler].into_iter().flatten() {
            let _ = task.await;
        }
        Ok(WorkerSummary {
            started: counters.started.load(Ordering::Relaxed),
            completed: counters.completed.load(Ordering::Relaxed),
            refused: counters.refused.load(Ordering::Relaxed),
            released: counters.released.load(Ordering::Relaxed),
        })
    }
}
