//! The leases this worker holds: one entry per attempt it runs, with how to
//! stop it and the local deadline of its lease. The heartbeat duty
//! ([`crate::duties::heartbeat`]) renews them; the reaper duty returns other
//! workers' expired ones to ready.
//!
//! A lease is the pair (job id, attempt number). The attempt number is the
//! fencing token: `extend.lua` and `complete.lua` act only when it still
//! matches the job, so a worker that lost its lease (paused, cut off, slow)
//! can neither extend it nor complete the job after someone else took it.
//!
//! Everything here is keyed by the pair ([`AttemptKey`]), never the job id
//! alone: a worker that stalled past its lease may be handed the same job
//! again as the next attempt while the first attempt's process still runs.
//! The moment the worker learns an attempt is no longer its own (a claim
//! hands out a newer attempt of its job, the heartbeat hears the lease is
//! gone, or the lease's local deadline passes unrenewed) it kills that
//! attempt's processes at once ([`StopReason::LeaseLost`],
//! [`StopReason::LeaseLapsed`]); the lease guard process
//! ([`crate::executor::lease_guard`]) does the same when the worker itself
//! is stopped.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::executor::Stop;
use crate::executor::lease_guard::monotonic_ns;
pub use crate::model::attempt::AttemptKey;

/// Why this worker stopped one of its attempts early.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// Redis says the attempt is no longer this worker's (its lease expired
    /// and was reaped, or the job was handed out again): killed at once.
    LeaseLost,
    /// The lease could not be renewed before its local deadline (Redis
    /// unreachable, or this worker stalled): killed at once, before Redis
    /// can hand the job to anyone else.
    LeaseLapsed,
    /// The worker is shutting down: stopped gracefully, handed back.
    Shutdown,
    /// The job was cancelled while running (`cancel.lua` marked the
    /// attempt and said so on the wake channel, or the heartbeat found the
    /// mark): killed at once; its completion closes it as `cancelled`.
    Cancelled,
}

impl StopReason {
    /// True when the attempt must die at once (it is, or is about to be,
    /// someone else's), rather than be asked to stop.
    pub fn kills_now(self) -> bool {
        matches!(
            self,
            StopReason::LeaseLost | StopReason::LeaseLapsed | StopReason::Cancelled
        )
    }
}

/// One attempt this worker holds.
#[derive(Debug)]
pub struct HeldLease {
    /// Partition of the job.
    pub partition: u32,
    /// When the attempt started here.
    pub started: Instant,
    /// Fired to stop the attempt (gracefully, or at once).
    pub stop: Stop,
    /// Set before `stop` fires.
    pub reason: Option<StopReason>,
    /// The attempt has ended locally and waits for its acknowledgement.
    pub done: bool,
    /// Local deadline of the lease (`CLOCK_MONOTONIC` ns): moved on by
    /// every renewal; past it, the attempt is killed. Shared with the
    /// attempt's [`crate::executor::Watchdog`].
    pub deadline_ns: Arc<AtomicU64>,
}

impl HeldLease {
    /// A lease on an attempt of partition `partition` that starts now,
    /// stopped through `stop`, lapsing at `deadline_ns` unless renewed.
    pub fn new(partition: u32, stop: Stop, deadline_ns: Arc<AtomicU64>) -> HeldLease {
        HeldLease {
            partition,
            started: Instant::now(),
            stop,
            reason: None,
            done: false,
            deadline_ns,
        }
    }
}

/// The attempts this worker holds, shared by job tasks, the heartbeat and
/// shutdown. An attempt stays here until its completion is acknowledged, so
/// its lease keeps being extended while the ack waits (Redis down).
#[derive(Debug, Default)]
pub struct Held {
    map: Mutex<HashMap<AttemptKey, HeldLease>>,
}

impl Held {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<AttemptKey, HeldLease>> {
        // A panic while holding this lock cannot leave the map inconsistent
        // (single inserts/removes), so recover from poisoning.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
    /// Number of attempts held (busy local slots).
    pub fn len(&self) -> usize {
        self.lock().len()
    }
    /// Number of attempts still running here (held and not yet ended).
    pub fn running(&self) -> usize {
        self.lock().values().filter(|h| !h.done).count()
    }
    /// True if nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Record a new attempt. Any other attempt of the same job held here is
    /// no longer this worker's (a claim handed out this newer one): it is
    /// killed at once. Returns how many were.
    pub fn insert(&self, key: AttemptKey, lease: HeldLease) -> usize {
        let mut map = self.lock();
        let mut killed = 0;
        for (k, h) in map.iter_mut() {
            if k.id == key.id && k.attempt != key.attempt && stop_one(h, StopReason::LeaseLost) {
                tracing::warn!(job = %k.id, attempt = k.attempt, newer = key.attempt,
                    "job handed out again: killing this worker's older attempt of it");
                killed += 1;
            }
        }
        map.insert(key, lease);
        killed
    }
    /// Forget an attempt (its completion was acknowledged).
    pub fn remove(&self, key: &AttemptKey) {
        self.lock().remove(key);
    }
    /// Why the attempt was stopped, if it was.
    pub fn reason(&self, key: &AttemptKey) -> Option<StopReason> {
        self.lock().get(key).and_then(|h| h.reason)
    }
    /// Mark an attempt as ended here (its acknowledgement is on the way).
    pub fn mark_done(&self, key: &AttemptKey) {
        if let Some(h) = self.lock().get_mut(key) {
            h.done = true;
        }
    }
    /// Stop a still-running attempt for `reason`; returns false if it is not
    /// held or already ended (then there is nothing to stop).
    pub fn stop(&self, key: &AttemptKey, reason: StopReason) -> bool {
        self.lock()
            .get_mut(key)
            .is_some_and(|h| stop_one(h, reason))
    }
    /// Stop every attempt for `reason`.
    pub fn stop_all(&self, reason: StopReason) {
        for h in self.lock().values_mut() {
            stop_one(h, reason);
        }
    }
    /// Every held attempt, by partition.
    pub fn by_partition(&self) -> BTreeMap<u32, Vec<AttemptKey>> {
        let mut out: BTreeMap<u32, Vec<AttemptKey>> = BTreeMap::new();
        for (k, h) in self.lock().iter() {
            out.entry(h.partition).or_default().push(k.clone());
        }
        out
    }
    /// Move the local deadline of `key` on to `deadline_ns`, unless it has
    /// already passed: a lease that lapsed here is dead here (the lease
    /// guard has killed, or is killing, its task), whatever Redis says.
    pub fn renew(&self, key: &AttemptKey, deadline_ns: u64) {
        if let Some(h) = self.lock().get_mut(key) {
            let now = monotonic_ns();
            let _ = h
                .deadline_ns
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |d| {
                    (d > now).then_some(d.max(deadline_ns))
                });
        }
    }
    /// Kill every running attempt whose local deadline has passed; returns
    /// the earliest deadline still ahead (ns), if any.
    pub fn stop_lapsed(&self, now_ns: u64) -> Option<u64> {
        let mut next = None::<u64>;
        for (k, h) in self.lock().iter_mut() {
            if h.done {
                continue;
            }
            let deadline = h.deadline_ns.load(Ordering::Relaxed);
            if deadline <= now_ns {
                if stop_one(h, StopReason::LeaseLapsed) {
                    tracing::warn!(job = %k.id, attempt = k.attempt,
                        "lease not renewed in time: killing the attempt before its job can run elsewhere");
                }
            } else {
                next = Some(next.map_or(deadline, |n| n.min(deadline)));
            }
        }
        next
    }
}

/// Stop one still-running attempt (the first reason given wins).
fn stop_one(h: &mut HeldLease, reason: StopReason) -> bool {
    if h.done {
        return false;
    }
    let reason = *h.reason.get_or_insert(reason);
    if reason.kills_now() {
        h.stop.now.cancel();
    } else {
        h.stop.graceful.cancel();
    }
    true
}
