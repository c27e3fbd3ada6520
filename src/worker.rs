//! The worker pool: claim fairly in batches, run each attempt, acknowledge
//! completions in batches, shut down gracefully.
//!
//! One loop claims (one script call per partition for all free slots), one
//! task per attempt runs it ([`crate::executor`]), one completer batches the
//! acks ([`Queue::complete`]), and the [`crate::lease`] tasks keep leases
//! alive and reap dead workers' leases.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fred::prelude::*;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::executor::lease_guard::{LeaseGuard, local_deadline, monotonic_ns};
use crate::executor::{self, Caps, Handlers, Outcome, Registry, Report, Stop, TaskInput, Watchdog};
use crate::lease::{self, AttemptKey, Held, HeldLease, StopReason};
use crate::queue::{Call, ClaimedJob, CompleteStatus, Completion, Queue, QueueError};

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

/// What a finished attempt sends to the completer.
enum Finished {
    /// Record the attempt's end.
    Complete {
        partition: u32,
        key: AttemptKey,
        completion: Completion,
        /// For metrics.
        queue: String,
        /// For metrics.
        tenant: String,
    },
    /// Hand the job back to ready without counting the attempt (shutdown).
    Release {
        partition: u32,
        key: AttemptKey,
        run_ms: u64,
    },
}

/// How an attempt that ended locally is closed.
#[derive(Debug, PartialEq, Eq)]
enum Closing {
    /// Its own end: complete it as reported.
    AsReported,
    /// Stopped for shutdown: hand it back.
    HandBack,
    /// Killed because its lease lapsed: close it as lost (like the reaper).
    Lost,
}

/// An attempt is handed back only if the shutdown stopped it; one that
/// ended by itself while the worker was shutting down is completed (it
/// must not run again). One killed because its lease lapsed (by this
/// worker, or by the lease guard while the worker was stopped: SIGKILL
/// after the deadline) closes as lost.
fn closing(report: &Report, reason: Option<StopReason>, lapsed: bool) -> Closing {
    let killed = report.signal == Some(libc::SIGKILL);
    match reason {
        Some(StopReason::Shutdown) if report.stopped => Closing::HandBack,
        Some(StopReason::LeaseLapsed) if report.stopped || killed => Closing::Lost,
        _ if killed && lapsed => Closing::Lost,
        _ => Closing::AsReported,
    }
}

/// A worker: a queue handle, the task programs and handlers it can run.
pub struct Worker {
    queue: Queue,
    cfg: WorkerConfig,
    registry: Arc<Registry>,
    handlers: Arc<Handlers>,
    ledger: Option<(sqlx::PgPool, Vec<crate::admission::Tier>)>,
}

struct Ctx {
    queue: Queue,
    cfg: WorkerConfig,
    registry: Arc<Registry>,
    handlers: Arc<Handlers>,
    held: Arc<Held>,
    guard: Option<Arc<LeaseGuard>>,
    done: mpsc::UnboundedSender<Finished>,
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
        tiers: Vec<crate::admission::Tier>,
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
        let _sub = subscribe_wake(&self.queue, wake.clone(), woken.clone()).await?;
        crate::metrics::register_zeroes();
        let guard = self.cfg.lease_guard.as_deref().and_then(|bin| {
            LeaseGuard::spawn(bin)
                .inspect_err(|e| tracing::warn!(error = %e, program = %bin.display(),
                    "could not start the lease guard; tasks of a stalled worker may outlive their leases"))
                .ok()
                .map(Arc::new)
        });
        let heartbeat = tokio::spawn(lease::heartbeat(
            self.queue.clone(),
            held.clone(),
            self.cfg.lease,
            guard.clone(),
            background.clone(),
        ));
        let reaper = tokio::spawn(lease::reaper(
            self.queue.clone(),
            self.cfg.reap_interval,
            background.clone(),
        ));
        let writer = self.ledger.clone().map(|(pool, tiers)| {
            let mut w =
                crate::ledger::LedgerWriter::new(self.queue.clone(), pool, self.cfg.id.clone());
            w.tiers = tiers;
            tokio::spawn(w.run(background.clone()))
        });
        let sampler = self.cfg.sample_metrics.map(|every| {
            tokio::spawn(crate::metrics::sample(
                self.queue.clone(),
                self.cfg.id.clone(),
                every,
                background.clone(),
            ))
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

/// Subscribe to every partition's wake channel; each message marks its
/// partition in `woken` and wakes the claim loop.
async fn subscribe_wake(
    queue: &Queue,
    wake: Arc<Notify>,
    woken: Arc<Vec<AtomicBool>>,
) -> Result<fred::clients::SubscriberClient, QueueError> {
    let config = Config::from_url(&queue.config().redis_url)?;
    let sub = Builder::from_config(config)
        .set_policy(ReconnectPolicy::new_exponential(0, 100, 5_000, 2))
        .build_subscriber_client()?;
    sub.init().await?;
    // Detached: it resubscribes after reconnects for as long as the client lives.
    drop(sub.manage_subscriptions());
    let channels: Vec<String> = (0..queue.partitions())
        .map(|p| queue.keys(p).key(&["wake"]))
        .collect();
    let by_channel: std::collections::HashMap<String, usize> = channels
        .iter()
        .enumerate()
        .map(|(p, c)| (c.clone(), p))
        .collect();
    sub.subscribe(channels).await?;
    let mut rx = sub.message_rx();
    tokio::spawn(async move {
        loop {
            match rx.recv().await {
                Ok(m) => {
                    if let Some(flag) = by_channel.get(&*m.channel) {
                        woken[*flag].store(true, Ordering::Relaxed);
                    }
                    wake.notify_one()
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    woken.iter().for_each(|w| w.store(true, Ordering::Relaxed));
                    wake.notify_one()
                }
                Err(_) => return,
            }
        }
    });
    Ok(sub)
}

/// What wakes or stops the claim loop.
struct ClaimSignals<'a> {
    /// A local slot became free.
    slot_freed: &'a Notify,
    /// A tenant became claimable somewhere (pub/sub).
    wake: &'a Notify,
    /// Which partitions' wake channels spoke since their last claim.
    woken: &'a [AtomicBool],
    /// Stop claiming.
    shutdown: &'a CancellationToken,
}

/// Claim for every free slot until shutdown: split the free slots across
/// partitions by their admissible weight ([`SlotSplit`]), claim each share
/// in one script call, hand leftovers to partitions that filled theirs, and
/// sleep until a slot frees, a tenant becomes claimable or something is due.
async fn claim_loop(ctx: &Arc<Ctx>, counters: &Arc<Counters>, signals: &ClaimSignals<'_>) {
    let mut split = SlotSplit::new(ctx.queue.partitions());
    // One call per partition, repeated after an error (a lost reply) until
    // it answers, so a claim that ran is never lost (see `Call`).
    let mut calls: Vec<Call> = (0..ctx.queue.partitions())
        .map(|_| Call::new(ctx.cfg.id.clone()))
        .collect();
    let mut error_backoff = Duration::from_millis(100);
    while !signals.shutdown.is_cancelled() {
        crate::metrics::slots(ctx.held.len(), ctx.cfg.concurrency);
        let free = ctx.cfg.concurrency.saturating_sub(ctx.held.len());
        if free == 0 {
            tokio::select! {
                _ = signals.slot_freed.notified() => {}
                _ = signals.shutdown.cancelled() => {}
            }
            continue;
        }
        let round = claim_round(ctx, counters, signals, &mut split, &mut calls, free).await;
        if round.failed {
            tokio::select! {
                _ = tokio::time::sleep(error_backoff) => {}
                _ = signals.shutdown.cancelled() => {}
            }
            error_backoff = (error_backoff * 2).min(Duration::from_secs(5));
            continue;
        }
        error_backoff = Duration::from_millis(100);
        if round.claimed == 0 {
            let wait = split
                .next_due(Instant::now())
                .map_or(ctx.cfg.idle_poll, |d| d.min(ctx.cfg.idle_poll));
            tokio::select! {
                _ = signals.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = signals.shutdown.cancelled() => {}
            }
        }
    }
}

/// What one round of claims did.
struct Round {
    claimed: usize,
    failed: bool,
}

/// One round: claim each partition's share of `free`, then offer what a
/// partition could not use to the partitions that used all of theirs.
async fn claim_round(
    ctx: &Arc<Ctx>,
    counters: &Arc<Counters>,
    signals: &ClaimSignals<'_>,
    split: &mut SlotSplit,
    calls: &mut [Call],
    free: usize,
) -> Round {
    let mut round = Round {
        claimed: 0,
        failed: false,
    };
    let now = Instant::now();
    for (p, flag) in signals.woken.iter().enumerate() {
        if flag.swap(false, Ordering::Relaxed) {
            split.wake(p as u32);
        }
    }
    let mut plan = split.plan(free, now, ctx.cfg.idle_poll);
    let mut left = free;
    // At most one pass per partition: each pass either fills slots or drops
    // the partitions that could not use theirs.
    for _ in 0..=ctx.queue.partitions() {
        let mut unused = 0;
        let mut full = Vec::new();
        for (p, batch) in plan {
            let batch = batch.min(left);
            let call = &mut calls[p as usize];
            let sent = monotonic_ns();
            match ctx
                .queue
                .claim(p, call, batch, ctx.cfg.lease, &ctx.cfg.queues)
                .await
            {
                Ok(c) => {
                    call.renew();
                    split.update(p, c.weight, c.due_in, Instant::now());
                    let got = c.jobs.len().min(batch);
                    left -= got;
                    round.claimed += got;
                    if got == batch && c.weight > 0.0 {
                        full.push(p);
                    } else {
                        unused += batch - got;
                    }
                    for job in c.jobs {
                        start_claimed(ctx, counters, job, sent);
                    }
                }
                Err(e) => {
                    round.failed = true;
                    unused += batch;
                    tracing::warn!(error = %e, partition = p, "claim failed; pausing claims");
                }
            }
        }
        if unused == 0 || left == 0 || full.is_empty() {
            break;
        }
        plan = split.plan_among(&full, unused.min(left));
    }
    round
}

/// `sent`: when the claim was sent (`CLOCK_MONOTONIC` ns), where the
/// lease's local deadline counts from.
fn start_claimed(ctx: &Arc<Ctx>, counters: &Counters, job: ClaimedJob, sent: u64) {
    counters.started.fetch_add(1, Ordering::Relaxed);
    let wait = (job.started_at_ms - job.enqueued_at_ms).max(0) as u64;
    crate::metrics::started(&job.queue, &job.tenant, Duration::from_millis(wait));
    start_attempt(ctx, job, sent);
}

/// How a worker splits its free slots across partitions: in proportion to
/// the admissible weight each partition reported on its last claim, so a
/// tenant alone in a partition gets its weight's share of the fleet, not
/// the partition's. Fractions carry over from round to round (a worker
/// freeing one slot at a time still splits exactly over time). A partition
/// with no admissible weight is asked again (with a batch as if it were as
/// loaded as the busiest) when its wake channel speaks, when something in it
/// is due, or after `idle_poll`.
#[derive(Debug)]
pub(crate) struct SlotSplit {
    parts: Vec<PartShare>,
}

#[derive(Clone, Debug)]
struct PartShare {
    /// Admissible weight on the worker's queues at the last claim.
    weight: f64,
    /// The fraction of a slot this partition is owed from earlier rounds.
    carry: f64,
    /// When its earliest delayed job or held tenant is due.
    due_at: Option<Instant>,
    /// When it was last claimed from.
    checked: Option<Instant>,
    /// Its wake channel spoke since.
    woken: bool,
}

impl SlotSplit {
    pub(crate) fn new(partitions: u32) -> SlotSplit {
        let unknown = PartShare {
            weight: 0.0,
            carry: 0.0,
            due_at: None,
            checked: None,
            woken: true,
        };
        SlotSplit {
            parts: vec![unknown; partitions as usize],
        }
    }

    fn wake(&mut self, p: u32) {
        if let Some(s) = self.parts.get_mut(p as usize) {
            s.woken = true;
        }
    }

    fn update(&mut self, p: u32, weight: f64, due_in: Option<Duration>, now: Instant) {
        if let Some(s) = self.parts.get_mut(p as usize) {
            s.weight = weight;
            s.due_at = due_in.map(|d| now + d);
            s.checked = Some(now);
            if weight <= 0.0 {
                s.carry = 0.0;
            }
        }
    }

    /// Time until the earliest due time of any partition.
    fn next_due(&self, now: Instant) -> Option<Duration> {
        self.parts
            .iter()
            .filter_map(|s| s.due_at)
            .min()
            .map(|d| d.saturating_duration_since(now))
    }

    /// `(partition, batch)` for this round: every partition with weight,
    /// plus each weightless one that is due a look (its batch may be 0).
    pub(crate) fn plan(&mut self, free: usize, now: Instant, idle: Duration) -> Vec<(u32, usize)> {
        let busiest = self.parts.iter().map(|s| s.weight).fold(1.0, f64::max);
        let mut weights = Vec::new();
        for (p, s) in self.parts.iter_mut().enumerate() {
            let due = s.due_at.is_some_and(|d| d <= now);
            let stale = s.checked.is_none_or(|c| now.duration_since(c) >= idle);
            if s.weight > 0.0 {
                weights.push((p as u32, s.weight));
            } else if std::mem::take(&mut s.woken) || due || stale {
                weights.push((p as u32, busiest));
            }
        }
        self.allot(free, &weights)
    }

    /// Split `free` among `among` only, by their weights (leftovers).
    fn plan_among(&mut self, among: &[u32], free: usize) -> Vec<(u32, usize)> {
        let weights: Vec<(u32, f64)> = among
            .iter()
            .filter_map(|&p| Some((p, self.parts.get(p as usize)?.weight)))
            .collect();
        self.allot(free, &weights)
    }

    /// Largest remainder with carried fractions: each partition gets
    /// `free * w / W` plus what it was owed, rounded down, and the slots
    /// left go to the largest fractions.
    fn allot(&mut self, free: usize, weights: &[(u32, f64)]) -> Vec<(u32, usize)> {
        let total: f64 = weights.iter().map(|(_, w)| w).sum();
        if total <= 0.0 {
            return Vec::new();
        }
        let mut out: Vec<(u32, usize, f64)> = weights
            .iter()
            .map(|&(p, w)| {
                let owed = free as f64 * w / total + self.parts[p as usize].carry;
                let whole = owed.floor().max(0.0);
                (p, whole as usize, owed - whole)
            })
            .collect();
        let given: usize = out.iter().map(|(_, n, _)| n).sum();
        let mut rest = free.saturating_sub(given);
        out.sort_by(|a, b| b.2.total_cmp(&a.2));
        for o in out.iter_mut() {
            if rest == 0 {
                break;
            }
            o.1 += 1;
            o.2 -= 1.0;
            rest -= 1;
        }
        for &(p, _, carry) in &out {
            self.parts[p as usize].carry = carry.clamp(-1.0, 1.0);
        }
        out.into_iter().map(|(p, n, _)| (p, n)).collect()
    }
}

fn start_attempt(ctx: &Arc<Ctx>, job: ClaimedJob, sent: u64) {
    let key = AttemptKey {
        id: job.id.clone(),
        attempt: job.attempt,
    };
    let deadline = Arc::new(AtomicU64::new(local_deadline(sent, ctx.cfg.lease)));
    let stop = Stop {
        watchdog: ctx.guard.as_ref().map(|g| Watchdog {
            guard: g.clone(),
            key: key.to_string(),
            deadline_ns: deadline.clone(),
        }),
        ..Stop::default()
    };
    ctx.held.insert(
        key.clone(),
        HeldLease {
            partition: job.partition,
            started: Instant::now(),
            stop: stop.clone(),
            reason: None,
            done: false,
            deadline_ns: deadline.clone(),
        },
    );
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let started = Instant::now();
        let report = execute(&ctx, &job, stop).await;
        ctx.held.mark_done(&key);
        let lapsed = deadline.load(Ordering::Relaxed) <= monotonic_ns();
        let finished = match closing(&report, ctx.held.reason(&key), lapsed) {
            Closing::HandBack => Finished::Release {
                partition: job.partition,
                key,
                run_ms: started.elapsed().as_millis() as u64,
            },
            how => Finished::Complete {
                partition: job.partition,
                key,
                completion: completion(&ctx.cfg, &job, report, how == Closing::Lost),
                queue: job.queue.clone(),
                tenant: job.tenant.clone(),
            },
        };
        // The completer outlives every job task (it ends when all senders drop).
        let _ = ctx.done.send(finished);
    });
}

/// Resolve the attempt's caps: what the job asked for, else the kind's
/// default, never above the tenant's cap.
fn limits_for(
    job: &ClaimedJob,
    default_timeout: Duration,
    default_memory: Option<u64>,
    kill_grace: Duration,
) -> Caps {
    let timeout = if job.timeout_ms > 0 {
        Duration::from_millis(job.timeout_ms)
    } else {
        default_timeout.min(Duration::from_millis(job.max_timeout_ms.max(1)))
    };
    let memory = if job.memory > 0 {
        Some(job.memory)
    } else {
        Some(default_memory.map_or(job.max_memory, |m| m.min(job.max_memory)))
    };
    Caps {
        timeout,
        memory,
        kill_grace,
    }
}

async fn execute(ctx: &Ctx, job: &ClaimedJob, stop: Stop) -> Report {
    let payload = match serde_json::value::RawValue::from_string(job.payload.clone()) {
        Ok(p) => p,
        Err(e) => return Report::failed(format!("stored payload is not valid JSON: {e}"), true),
    };
    let input = TaskInput {
        id: job.id.clone(),
        tenant: job.tenant.clone(),
        queue: job.queue.clone(),
        kind: job.kind.clone(),
        attempt: job.attempt,
        payload,
    };
    if let Some(h) = ctx.handlers.get(&job.kind) {
        let limits = limits_for(
            job,
            executor::manifest::DEFAULT_TIMEOUT,
            None,
            ctx.cfg.kill_grace,
        );
        return executor::run_handler(h.as_ref(), input, &limits, stop).await;
    }
    match ctx.registry.get(&job.kind) {
        Some(m) => {
            let limits = limits_for(job, m.timeout, m.memory, ctx.cfg.kill_grace);
            executor::run_process(m, &input, &limits, stop).await
        }
        None => {
            let known: Vec<&str> = ctx.registry.kinds().chain(ctx.handlers.kinds()).collect();
            Report::failed(
                format!(
                    "unknown kind {:?}: worker {} has no program for it in {} (it knows: {})",
                    job.kind,
                    ctx.cfg.id,
                    ctx.registry.dir().display(),
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
                true,
            )
        }
    }
}

/// Exponential backoff with jitter: uniform in [d/2, d] with d = base * 2^(attempt-1), capped.
fn backoff(cfg: &WorkerConfig, attempt: u32) -> Duration {
    let exp = cfg
        .backoff_base
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
    let d = exp.min(cfg.backoff_max);
    let half = d / 2;
    half + Duration::from_millis(rand::random_range(0..=half.as_millis().max(1) as u64))
}

/// The completion of an attempt that ended here; `lapsed`: it was killed
/// because its lease lapsed, and closes as `lost` (as the reaper would),
/// ready again at once.
fn completion(cfg: &WorkerConfig, job: &ClaimedJob, mut r: Report, lapsed: bool) -> Completion {
    if lapsed {
        r.outcome = Outcome::Lost;
        r.error = Some(format!(
            "lease lapsed: worker {} could not renew it in time (stalled, or cut off from Redis), so it killed the attempt",
            cfg.id
        ));
    }
    let backoff_ms = if r.outcome == Outcome::Succeeded || lapsed {
        0
    } else {
        backoff(cfg, job.attempt).as_millis() as u64
    };
    if r.outcome != Outcome::Succeeded {
        tracing::info!(job = %job.id, tenant = %job.tenant, kind = %job.kind, attempt = job.attempt,
            outcome = r.outcome.as_str(), error = r.error.as_deref().unwrap_or(""), "attempt failed");
    }
    Completion {
        id: job.id.clone(),
        attempt: job.attempt,
        outcome: r.outcome,
        permanent: r.permanent,
        error: r.error.unwrap_or_default(),
        result: r.output.map(|o| o.to_string()),
        exit_code: r.exit_code,
        signal: r.signal,
        run_ms: r.wall_ms,
        cpu_ms: r.cpu_user_ms + r.cpu_sys_ms,
        peak_rss: r.peak_rss_bytes,
        usage: r.usage,
        backoff_ms,
    }
}

/// Acknowledge finished attempts in batches, one script call per partition.
/// Retries until Redis takes them: an unacknowledged attempt keeps its lease
/// (the heartbeat goes on), so nothing is lost or run twice meanwhile.
async fn complete_loop(
    queue: Queue,
    worker: String,
    mut rx: mpsc::UnboundedReceiver<Finished>,
    held: Arc<Held>,
    slot_freed: Arc<Notify>,
    counters: Arc<Counters>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < 512 {
            match rx.try_recv() {
                Ok(f) => batch.push(f),
                Err(_) => break,
            }
        }
        let mut done: BTreeMap<u32, Vec<Completion>> = BTreeMap::new();
        let mut labels: std::collections::HashMap<AttemptKey, (String, String)> =
            std::collections::HashMap::new();
        let mut back: BTreeMap<u32, Vec<(String, u32, u64)>> = BTreeMap::new();
        for f in batch {
            match f {
                Finished::Complete {
                    partition,
                    key,
                    completion,
                    queue,
                    tenant,
                } => {
                    labels.insert(key, (queue, tenant));
                    done.entry(partition).or_default().push(completion)
                }
                Finished::Release {
                    partition,
                    key,
                    run_ms,
                } => back
                    .entry(partition)
                    .or_default()
                    .push((key.id, key.attempt, run_ms)),
            }
        }
        for (p, list) in done {
            let call = Call::new(worker.clone());
            let statuses = retry("complete", || queue.complete(p, &call, &list)).await;
            for (c, s) in list.iter().zip(statuses) {
                let key = AttemptKey {
                    id: c.id.clone(),
                    attempt: c.attempt,
                };
                if let Some((q, t)) = labels.get(&key) {
                    crate::metrics::completed(
                        q,
                        t,
                        c.outcome.as_str(),
                        Duration::from_millis(c.run_ms),
                        s,
                    );
                }
                if s == CompleteStatus::Refused {
                    counters.refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(job = %c.id, attempt = c.attempt, "completion refused: the lease was lost and the job handed to another worker");
                } else {
                    counters.completed.fetch_add(1, Ordering::Relaxed);
                }
                held.remove(&key);
            }
        }
        for (p, list) in back {
            let call = Call::new(worker.clone());
            let n = retry("release", || {
                queue.release(p, &call, "interrupted: worker shutting down", &list)
            })
            .await;
            counters.released.fetch_add(n, Ordering::Relaxed);
            for (id, attempt, _) in &list {
                held.remove(&AttemptKey {
                    id: id.clone(),
                    attempt: *attempt,
                });
            }
        }
        slot_freed.notify_one();
    }
}

async fn retry<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, QueueError>>,
{
    let mut wait = Duration::from_millis(100);
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?wait, "{what} failed; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_attempt_that_ended_by_itself_is_completed_even_at_shutdown() {
        let ok = |stopped: bool, signal: Option<i32>| Report {
            stopped,
            signal,
            ..Report::failed("x", false)
        };
        let shutdown = Some(StopReason::Shutdown);
        // Found in review: the worker handed back any attempt it had asked
        // to stop, even one whose process had already exited: it ran again.
        assert_eq!(
            closing(&ok(false, None), shutdown, false),
            Closing::AsReported
        );
        assert_eq!(closing(&ok(true, None), shutdown, false), Closing::HandBack);
        let lapsed = Some(StopReason::LeaseLapsed);
        assert_eq!(closing(&ok(true, None), lapsed, true), Closing::Lost);
        // Killed by the lease guard while the worker was stopped, noticed
        // by the heartbeat first or not.
        assert_eq!(
            closing(&ok(false, Some(libc::SIGKILL)), None, true),
            Closing::Lost
        );
        assert_eq!(
            closing(&ok(false, Some(libc::SIGKILL)), lapsed, false),
            Closing::Lost
        );
        // Ended by itself just as its lease lapsed: its own end.
        assert_eq!(closing(&ok(false, None), lapsed, true), Closing::AsReported);
        assert_eq!(
            closing(&ok(false, Some(libc::SIGKILL)), None, false),
            Closing::AsReported
        );
    }

    #[test]
    fn slots_split_by_weight_over_rounds() {
        let mut split = SlotSplit::new(4);
        let now = Instant::now();
        for (p, w) in [(0, 1.0), (1, 9.0), (2, 2.0), (3, 0.0)] {
            split.update(p, w, None, now);
        }
        let mut got = [0usize; 4];
        // One slot at a time, as a busy worker frees them.
        for _ in 0..1200 {
            for (p, n) in split.plan(1, now, Duration::from_secs(60)) {
                got[p as usize] += n;
            }
        }
        assert_eq!(got, [100, 900, 200, 0]);
        // A weightless partition is asked again once its wake channel speaks.
        split.wake(3);
        let plan = split.plan(12, now, Duration::from_secs(60));
        assert!(plan.iter().any(|&(p, _)| p == 3), "{plan:?}");
        assert_eq!(plan.iter().map(|(_, n)| n).sum::<usize>(), 12);
    }

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let mut cfg = WorkerConfig::new(vec!["q".into()]);
        cfg.backoff_base = Duration::from_millis(100);
        cfg.backoff_max = Duration::from_secs(1);
        for _ in 0..50 {
            let b1 = backoff(&cfg, 1);
            assert!(
                b1 >= Duration::from_millis(50) && b1 <= Duration::from_millis(101),
                "{b1:?}"
            );
            let b3 = backoff(&cfg, 3);
            assert!(
                b3 >= Duration::from_millis(200) && b3 <= Duration::from_millis(401),
                "{b3:?}"
            );
            assert!(backoff(&cfg, 30) <= Duration::from_millis(1001));
        }
    }
}
