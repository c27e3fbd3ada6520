//! The reaper: returns attempts whose lease expired (their worker died or
//! was cut off) to ready, closing each as `lost` with a ledger record, and
//! frees their tenants' slots.
//!
//! Every worker runs it; the script's guard (`B:reaper`, `SET NX PX`) lets
//! one pass per interval count fleet-wide, so a bigger fleet does not reap
//! more often.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{ConfigError, pause};
use crate::queue::{Queue, QueueError};

/// How the reaper works.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReaperConfig {
    /// Time between passes, fleet-wide (default 1 s; `agentq worker` uses a
    /// quarter of the lease, 100 ms to 1 s). A crashed worker's jobs run
    /// again within its lease plus this.
    pub interval: Duration,
    /// Most expired leases reaped per partition per pass (default 500:
    /// bounds the time one script call holds Redis).
    pub batch: usize,
}

impl Default for ReaperConfig {
    fn default() -> Self {
        ReaperConfig {
            interval: Duration::from_secs(1),
            batch: 500,
        }
    }
}

impl ReaperConfig {
    /// Check the ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.interval < Duration::from_millis(10) || self.batch == 0 {
            return Err(ConfigError {
                duty: "reaper",
                problem: "interval must be at least 10ms and batch at least 1".into(),
            });
        }
        Ok(())
    }
}

/// Returns expired leases to ready.
pub struct Reaper {
    /// Its settings.
    pub config: ReaperConfig,
    queue: Queue,
}

impl Reaper {
    /// A reaper over `queue`.
    pub fn new(queue: Queue, config: ReaperConfig) -> Reaper {
        Reaper { config, queue }
    }

    /// One pass over every partition: how many attempts were reaped (0 when
    /// another worker holds this interval's guard). A partition that fails
    /// is skipped (tried again next pass).
    pub async fn run_once(&self) -> Result<u64, QueueError> {
        let mut reaped = 0;
        let mut failed = None;
        for p in 0..self.queue.partitions() {
            match self
                .queue
                .reap(p, self.config.interval, self.config.batch)
                .await
            {
                Ok(r) => {
                    crate::metrics::record_events(&r.events);
                    if r.reaped > 0 {
                        crate::metrics::lease_expiries(r.reaped);
                        tracing::warn!(
                            reaped = r.reaped,
                            partition = p,
                            "returned expired leases to ready"
                        );
                    }
                    reaped += r.reaped;
                }
                Err(e) => {
                    tracing::warn!(error = %e, partition = p, "reaper failed; will retry");
                    failed = Some(e);
                }
            }
        }
        match failed {
            Some(e) if reaped == 0 => Err(e),
            _ => Ok(reaped),
        }
    }

    /// A pass every interval until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        while !pause(self.config.interval, &shutdown).await {
            let _ = self.run_once().await;
        }
    }
}
