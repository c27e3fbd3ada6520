//! The heartbeat: extends every lease this worker holds, one script call
//! per partition, a third of a lease apart; kills the attempts whose lease
//! is gone (Redis says another attempt owns the job), those whose job was
//! cancelled while they run (the fallback for a missed `cancel` message on
//! the wake channel: within a third of a lease) and, at its local
//! deadline and not only at the next beat, those whose lease could not be
//! renewed in time. Renewed deadlines go to the lease guard too, which
//! kills a task whose deadline passes while this worker cannot act.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::ConfigError;
use crate::executor::lease_guard::{LeaseGuard, local_deadline, monotonic_ns};
use crate::lease::{AttemptKey, Held, StopReason};
use crate::queue::Queue;

/// How the heartbeat works.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeartbeatConfig {
    /// Lease duration asked for at each renewal (default 30 s, as
    /// `agentq worker --lease`); beats come every third of it.
    pub lease: Duration,
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        HeartbeatConfig {
            lease: Duration::from_secs(30),
        }
    }
}

impl HeartbeatConfig {
    /// Check the range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.lease < Duration::from_millis(300) {
            return Err(ConfigError {
                duty: "heartbeat",
                problem: "lease must be at least 300ms".into(),
            });
        }
        Ok(())
    }

    /// Time between beats.
    pub fn every(&self) -> Duration {
        (self.lease / 3).max(Duration::from_millis(50))
    }
}

/// What one beat did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Beat {
    /// Leases extended.
    pub renewed: usize,
    /// Attempts killed because their lease is gone. (Attempts killed because
    /// their job was cancelled are logged, not counted here: their leases
    /// were renewed.)
    pub lost: usize,
    /// Partitions whose extension failed (retried next beat).
    pub failed: usize,
}

/// Renews this worker's leases.
pub struct Heartbeat {
    /// Its settings.
    pub config: HeartbeatConfig,
    queue: Queue,
    held: Arc<Held>,
    guard: Option<Arc<LeaseGuard>>,
}

impl Heartbeat {
    /// A heartbeat for the attempts in `held`; `guard`, if any, hears every
    /// renewed deadline.
    pub fn new(
        queue: Queue,
        held: Arc<Held>,
        guard: Option<Arc<LeaseGuard>>,
        config: HeartbeatConfig,
    ) -> Heartbeat {
        Heartbeat {
            config,
            queue,
            held,
            guard,
        }
    }

    /// One beat: extend every held lease; kill the lost and the cancelled
    /// ones.
    pub async fn run_once(&self) -> Beat {
        let mut beat = Beat::default();
        for (p, leases) in self.held.by_partition() {
            let sent = monotonic_ns();
            match self.queue.extend(p, self.config.lease, &leases).await {
                Ok(ext) => {
                    let lost = ext.lost;
                    beat.renewed += leases.len() - lost.len();
                    self.renew(&leases, &lost, local_deadline(sent, self.config.lease));
                    for key in ext.cancelled {
                        // Still leased (it holds its slot until its
                        // completion closes it as cancelled): kill it now.
                        if self.held.stop(&key, StopReason::Cancelled) {
                            tracing::info!(attempt = %key, "job cancelled while running (heard from the heartbeat); killing the attempt");
                        }
                    }
                    for key in lost {
                        // An attempt that already ended may race its own ack
                        // here; only a still-running one has really lost its lease.
                        if self.held.stop(&key, StopReason::LeaseLost) {
                            beat.lost += 1;
                            tracing::warn!(attempt = %key, "lease lost (expired and reaped); killing the attempt");
                        }
                    }
                }
                Err(e) => {
                    beat.failed += 1;
                    tracing::warn!(error = %e, partition = p, "lease extension failed; will retry");
                }
            }
        }
        beat
    }

    /// Beat every third of a lease until `shutdown`, and kill any attempt
    /// at the moment its local deadline passes unrenewed.
    pub async fn run(self, shutdown: CancellationToken) {
        let every = self.config.every();
        let mut next_beat = Instant::now() + every;
        loop {
            let lapse_at = self.held.stop_lapsed(monotonic_ns());
            let until_lapse =
                lapse_at.map(|d| Duration::from_nanos(d.saturating_sub(monotonic_ns())));
            let until_beat = next_beat.saturating_duration_since(Instant::now());
            let wait = until_lapse.map_or(until_beat, |l| l.min(until_beat));
            if super::pause(wait, &shutdown).await {
                return;
            }
            if Instant::now() < next_beat {
                continue;
            }
            next_beat = Instant::now() + every;
            self.run_once().await;
        }
    }

    /// Move the deadline of every extended attempt that was not lost.
    fn renew(&self, sent: &[AttemptKey], lost: &[AttemptKey], deadline_ns: u64) {
        for key in sent.iter().filter(|k| !lost.contains(k)) {
            self.held.renew(key, deadline_ns);
            if let Some(g) = &self.guard {
                g.renew(&key.to_string(), deadline_ns);
            }
        }
    }
}
