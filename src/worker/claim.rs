//! The claim loop: for every free slot, claim fairly across partitions
//! ([`super::slots::SlotSplit`]) in one script call per partition, start
//! each claimed attempt, and sleep until a slot frees, a tenant becomes
//! claimable or something is due. A claim that failed (perhaps after Redis
//! acted) is repeated with the same call id, so its jobs are never
//! stranded.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::executor::lease_guard::monotonic_ns;
use crate::model::backoff::Pacing;
use crate::queue::{Call, ClaimedJob};

use super::attempt::start_attempt;
use super::slots::SlotSplit;
use super::{Counters, Ctx};

/// What wakes or stops the claim loop.
pub(super) struct ClaimSignals<'a> {
    /// A local slot became free.
    pub(super) slot_freed: &'a Notify,
    /// A tenant became claimable somewhere (pub/sub).
    pub(super) wake: &'a Notify,
    /// Which partitions' wake channels spoke since their last claim.
    pub(super) woken: &'a [AtomicBool],
    /// Stop claiming.
    pub(super) shutdown: &'a CancellationToken,
}

/// Claim for every free slot until shutdown: split the free slots across
/// partitions by their admissible weight ([`SlotSplit`]), claim each share
/// in one script call, hand leftovers to partitions that filled theirs, and
/// sleep until a slot frees, a tenant becomes claimable or something is due.
pub(super) async fn claim_loop(
    ctx: &Arc<Ctx>,
    counters: &Arc<Counters>,
    signals: &ClaimSignals<'_>,
) {
    let mut split = SlotSplit::new(ctx.queue.partitions());
    // One call per partition, repeated after an error (a lost reply) until
    // it answers, so a claim that ran is never lost (see `Call`).
    let mut calls: Vec<Call> = (0..ctx.queue.partitions())
        .map(|_| Call::new(ctx.cfg.id.clone()))
        .collect();
    let mut pacing = Pacing::default();
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
                _ = tokio::time::sleep(pacing.next_delay()) => {}
                _ = signals.shutdown.cancelled() => {}
            }
            continue;
        }
        pacing.reset();
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
pub(super) struct Round {
    claimed: usize,
    failed: bool,
}

/// One round: claim each partition's share of `free`, then offer what a
/// partition could not use to the partitions that used all of theirs.
pub(super) async fn claim_round(
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
pub(super) fn start_claimed(ctx: &Arc<Ctx>, counters: &Counters, job: ClaimedJob, sent: u64) {
    counters.started.fetch_add(1, Ordering::Relaxed);
    let wait = (job.started_at_ms - job.enqueued_at_ms).max(0) as u64;
    crate::metrics::started(&job.queue, &job.tenant, Duration::from_millis(wait));
    start_attempt(ctx, job, sent);
}
