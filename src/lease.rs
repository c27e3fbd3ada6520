//! Leases held by this worker: the heartbeat that extends them and the
//! reaper that returns other workers' expired leases to ready.
//!
//! A lease is the pair (job id, attempt number). The attempt number is the
//! fencing token: `extend.lua` and `complete.lua` act only when it still
//! matches the job, so a worker that lost its lease (paused, cut off, slow)
//! can neither extend it nor complete the job after someone else took it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::queue::Queue;

/// Why this worker stopped one of its attempts early.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The lease was lost (expired and reaped): the attempt is someone else's.
    LeaseLost,
    /// The worker is shutting down: hand the job back at once.
    Shutdown,
}

/// One attempt this worker holds.
#[derive(Debug)]
pub struct HeldLease {
    /// Partition of the job.
    pub partition: u32,
    /// Attempt number (fencing token).
    pub attempt: u32,
    /// When the attempt started here.
    pub started: Instant,
    /// Fired to stop the attempt.
    pub cancel: CancellationToken,
    /// Set before `cancel` fires.
    pub reason: Option<StopReason>,
    /// The attempt has ended locally and waits for its acknowledgement.
    pub done: bool,
}

/// The attempts this worker holds, shared by job tasks, the heartbeat and
/// shutdown. An attempt stays here until its completion is acknowledged, so
/// its lease keeps being extended while the ack waits (Redis down).
#[derive(Debug, Default)]
pub struct Held {
    map: Mutex<HashMap<String, HeldLease>>,
}

impl Held {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, HeldLease>> {
        // A panic while holding this lock cannot leave the map inconsistent
        // (single inserts/removes), so recover from poisoning.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
    /// Number of attempts held (busy local slots).
    pub fn len(&self) -> usize {
        self.lock().len()
    }
    /// True if nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Record a new attempt.
    pub fn insert(&self, id: String, lease: HeldLease) {
        self.lock().insert(id, lease);
    }
    /// Forget an attempt (its completion was acknowledged).
    pub fn remove(&self, id: &str) {
        self.lock().remove(id);
    }
    /// Why the attempt was stopped, if it was.
    pub fn reason(&self, id: &str) -> Option<StopReason> {
        self.lock().get(id).and_then(|h| h.reason)
    }
    /// Mark an attempt as ended here (its acknowledgement is on the way).
    pub fn mark_done(&self, id: &str) {
        if let Some(h) = self.lock().get_mut(id) {
            h.done = true;
        }
    }
    /// Stop a still-running attempt for `reason`; returns false if it is not
    /// held or already ended (then there is nothing to stop).
    pub fn stop(&self, id: &str, reason: StopReason) -> bool {
        match self.lock().get_mut(id) {
            Some(h) if !h.done => {
                h.reason.get_or_insert(reason);
                h.cancel.cancel();
                true
            }
            _ => false,
        }
    }
    /// Stop every attempt for `reason`.
    pub fn stop_all(&self, reason: StopReason) {
        for h in self.lock().values_mut() {
            h.reason.get_or_insert(reason);
            h.cancel.cancel();
        }
    }
    /// `(id, attempt)` of every held attempt, by partition.
    pub fn by_partition(&self) -> BTreeMap<u32, Vec<(String, u32)>> {
        let mut out: BTreeMap<u32, Vec<(String, u32)>> = BTreeMap::new();
        for (id, h) in self.lock().iter() {
            out.entry(h.partition)
                .or_default()
                .push((id.clone(), h.attempt));
        }
        out
    }
}

/// Extend every held lease each `lease / 3`, one script call per partition,
/// until `stop` fires. Attempts whose lease is gone are stopped.
pub async fn heartbeat(queue: Queue, held: Arc<Held>, lease: Duration, stop: CancellationToken) {
    let every = (lease / 3).max(Duration::from_millis(50));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        for (p, leases) in held.by_partition() {
            match queue.extend(p, lease, &leases).await {
                Ok(lost) => {
                    for id in lost {
                        // An attempt that already ended may race its own ack here; only a
                        // still-running one has really lost its lease.
                        if held.stop(&id, StopReason::LeaseLost) {
                            tracing::warn!(job = %id, "lease lost (expired and reaped); stopping the attempt");
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, partition = p, "lease extension failed; will retry")
                }
            }
        }
    }
}

/// Run the reaper on every partition each `interval` until `stop` fires.
/// Every worker runs this loop; the script's guard makes one run count per
/// interval fleet-wide.
pub async fn reaper(queue: Queue, interval: Duration, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        for p in 0..queue.partitions() {
            match queue.reap(p, interval, 500).await {
                Ok(Some(n)) if n > 0 => {
                    crate::metrics::lease_expiries(n);
                    tracing::warn!(
                        reaped = n,
                        partition = p,
                        "returned expired leases to ready"
                    )
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, partition = p, "reaper failed; will retry"),
            }
        }
    }
}
