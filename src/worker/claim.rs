//! The claim loop: for every free slot, claim fairly across partitions
//! ([`super::slots::SlotSplit`]) in one script call per partition, start
//! each claimed attempt, and sleep until a slot frees, a tenant becomes
//! claimable or something is due. A claim that failed (perhaps after Redis
//! acted) is repeated with the same call id, so its jobs are never
//! stranded. With `--min-replicas-ack` (`QueueConfig::min_replicas_ack`)
//! a claim returns only jobs that enough replicas confirmed: an
//! unconfirmed one fails as `NotReplicated` after `Queue::claim` handed
//! its jobs back, so nothing here ever starts a claim a failover could
//! hand to another worker under the same attempt number.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::executor::lease_guard::monotonic_ns;
use crate::lease::Held;
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
        let free = free_slots(&ctx.held, ctx.cfg.concurrency);
        crate::metrics::slots(ctx.cfg.concurrency - free, ctx.cfg.concurrency);
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

/// Free local slots. An attempt frees its slot when it ends here, not when
/// Redis acknowledges its completion, so the next claim and the pending
/// completions travel side by side (one wait for Redis per job, not two,
/// when other clients keep Redis busy); its lease stays held until the
/// acknowledgement. At most `concurrency` ended attempts wait for theirs:
/// past that, slots free only as acknowledgements come back.
pub(super) fn free_slots(held: &Held, concurrency: usize) -> usize {
    let running = held.running();
    let waiting = held.len().saturating_sub(running);
    concurrency
        .saturating_sub(running)
        .saturating_sub(waiting.saturating_sub(concurrency))
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use super::*;
    use crate::executor::Stop;
    use crate::lease::{AttemptKey, HeldLease};

    fn hold(held: &Held, n: usize, done: bool) {
        for _ in 0..n {
            let key = AttemptKey::new(format!("job-{}", held.len()), 1);
            let lease = HeldLease::new(0, Stop::default(), Arc::new(AtomicU64::new(0)));
            held.insert(key.clone(), lease);
            if done {
                held.mark_done(&key);
            }
        }
    }

    #[test]
    fn an_ended_attempt_frees_its_slot_before_its_ack_up_to_a_second_round() {
        let held = Held::default();
        assert_eq!(free_slots(&held, 4), 4);
        hold(&held, 3, false);
        assert_eq!(free_slots(&held, 4), 1);
        hold(&held, 4, true);
        assert_eq!(
            free_slots(&held, 4),
            1,
            "four ended attempts wait: still free"
        );
        hold(&held, 1, true);
        assert_eq!(free_slots(&held, 4), 0, "a fifth waiting one takes a slot");
    }
}
