//! One attempt on this worker, from claim to its end: register it
//! ([`crate::lease::Held`], the lease guard's watchdog), run it (a task
//! program or an in-process handler, under caps resolved from the job, the
//! kind and the tenant), and decide how it closes ([`closing`]): as
//! reported, handed back (shutdown), or lost (its lease lapsed).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::executor::lease_guard::{local_deadline, monotonic_ns};
use crate::executor::{self, Caps, Outcome, ProgressSink, Report, Stop, TaskInput, Watchdog};
use crate::lease::{AttemptKey, HeldLease, StopReason};
use crate::model::attempt::HandBack;
use crate::queue::{ClaimedJob, Completion, Queue};

use super::{Ctx, WorkerConfig};

/// What a finished attempt sends to the completer.
pub(super) enum Finished {
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
    Release { partition: u32, back: HandBack },
}

/// How an attempt that ended locally is closed.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Closing {
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
pub(super) fn closing(report: &Report, reason: Option<StopReason>, lapsed: bool) -> Closing {
    let killed = report.signal == Some(libc::SIGKILL);
    match reason {
        Some(StopReason::Shutdown) if report.stopped => Closing::HandBack,
        Some(StopReason::LeaseLapsed) if report.stopped || killed => Closing::Lost,
        _ if killed && lapsed => Closing::Lost,
        _ => Closing::AsReported,
    }
}

pub(super) fn start_attempt(ctx: &Arc<Ctx>, job: ClaimedJob, sent: u64) {
    let key = job.key();
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
        HeldLease::new(job.partition, stop.clone(), deadline.clone()),
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
                back: HandBack {
                    key,
                    run_ms: started.elapsed().as_millis() as u64,
                },
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
        // Its slot is free now; the lease stays held until Redis takes the
        // completion (see `free_slots`).
        ctx.slot_freed.notify_one();
    });
}

/// Resolve the attempt's caps: what the job asked for, else the kind's
/// default, never above the tenant's cap.
pub(super) fn limits_for(
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

pub(super) async fn execute(ctx: &Ctx, job: &ClaimedJob, stop: Stop) -> Report {
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
            let progress = progress_sink(&ctx.queue, job);
            executor::run_process_reporting(m, &input, &limits, stop, progress).await
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

/// Publishes the attempt's progress reports as `progress` job events. A
/// Redis error is logged and never fails the attempt: progress is
/// advisory, the completion is what counts.
fn progress_sink(queue: &Queue, job: &ClaimedJob) -> ProgressSink {
    let (queue, id, attempt) = (queue.clone(), job.id.clone(), job.attempt);
    Arc::new(move |report: String| {
        let (queue, id) = (queue.clone(), id.clone());
        Box::pin(async move {
            match queue.report_progress(&id, attempt, &report).await {
                Ok(true) => {}
                // The attempt ended (reaped, cancelled): nothing to report to.
                Ok(false) => {
                    tracing::debug!(job = %id, attempt, "progress report after the attempt's end: ignored")
                }
                Err(e) => {
                    tracing::warn!(job = %id, attempt, error = %e, "could not publish a progress report")
                }
            }
        })
    })
}

/// The completion of an attempt that ended here; `lapsed`: it was killed
/// because its lease lapsed, and closes as `lost` (as the reaper would),
/// ready again at once.
pub(super) fn completion(
    cfg: &WorkerConfig,
    job: &ClaimedJob,
    mut r: Report,
    lapsed: bool,
) -> Completion {
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
        crate::model::backoff::retry_delay(cfg.backoff_base, cfg.backoff_max, job.attempt)
            .as_millis() as u64
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
}
