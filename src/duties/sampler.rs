//! The sampler: turns Redis state into gauges (jobs per queue and state,
//! running and cap per tenant, quota use, held tenants by reason, the
//! outbox backlog, jobs submitted by every producer), from one worker of
//! the fleet at a time.
//!
//! The first worker to take the sampler lock (`B:sampler`) keeps it while
//! it lives, so a stale copy of the gauges exists only on a dead worker;
//! another takes over within two periods after it dies.

use std::time::Duration;

use fred::prelude::*;
use tokio_util::sync::CancellationToken;

use super::{ConfigError, pause};
use crate::metrics as m;
use crate::queue::{Queue, QueueError, inspect};

/// How the sampler works.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SamplerConfig {
    /// Time between samples (default 5 s); the lock is held for two.
    pub every: Duration,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            every: Duration::from_secs(5),
        }
    }
}

impl SamplerConfig {
    /// Check the range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.every < Duration::from_millis(100) {
            return Err(ConfigError {
                duty: "sampler",
                problem: "every must be at least 100ms".into(),
            });
        }
        Ok(())
    }
}

/// Samples gauges while this worker holds the sampler lock.
pub struct Sampler {
    /// Its settings.
    pub config: SamplerConfig,
    queue: Queue,
    worker: String,
}

impl Sampler {
    /// A sampler for worker `worker`.
    pub fn new(queue: Queue, worker: impl Into<String>, config: SamplerConfig) -> Sampler {
        Sampler {
            config,
            queue,
            worker: worker.into(),
        }
    }

    /// Take or keep the lock, and sample if this worker holds it; whether
    /// it sampled.
    pub async fn run_once(&self) -> Result<bool, QueueError> {
        if !self.hold_lock().await? {
            return Ok(false);
        }
        sample(&self.queue).await?;
        Ok(true)
    }

    /// A sample every period until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            if let Err(e) = self.run_once().await {
                tracing::debug!(error = %e, "metrics sampling failed");
            }
            if pause(self.config.every, &shutdown).await {
                return;
            }
        }
    }

    async fn hold_lock(&self) -> Result<bool, QueueError> {
        let key = self.queue.keys(0).key(&["sampler"]);
        let hold = (self.config.every * 2).as_millis() as i64;
        let client = self.queue.client();
        match client.get::<Option<String>, _>(&key).await? {
            Some(holder) if holder == self.worker => {
                let _: bool = client.pexpire(&key, hold, None).await?;
                Ok(true)
            }
            Some(_) => Ok(false),
            None => Ok(client
                .set::<Option<String>, _, _>(
                    &key,
                    self.worker.as_str(),
                    Some(Expiration::PX(hold)),
                    Some(SetOptions::NX),
                    false,
                )
                .await?
                .is_some()),
        }
    }
}

async fn sample(queue: &Queue) -> Result<(), QueueError> {
    for q in inspect::queue_stats(queue).await? {
        for (state, v) in [
            ("ready", q.ready),
            ("delayed", q.delayed),
            ("running", q.running),
            ("dead", q.dead),
        ] {
            ::metrics::gauge!(m::QUEUE_JOBS, "queue" => q.queue.clone(), "state" => state)
                .set(v as f64);
        }
    }
    let tenants = inspect::tenant_stats(queue, None).await?;
    m::rank_tenants(
        tenants
            .iter()
            .map(|t| (t.tenant.clone(), t.ready + t.running))
            .collect(),
    );
    let mut held = std::collections::HashMap::from([
        ("concurrency", 0.0),
        ("rate", 0.0),
        ("quota", 0.0),
        ("spend", 0.0),
        ("paused", 0.0),
    ]);
    for t in &tenants {
        let label = m::tenant_label(&t.tenant);
        ::metrics::gauge!(m::TENANT_RUNNING, "tenant" => label.clone()).set(t.running as f64);
        ::metrics::gauge!(m::TENANT_CAP, "tenant" => label.clone()).set(t.cap as f64);
        if t.quota_ms > 0 {
            ::metrics::gauge!(m::QUOTA_USE, "tenant" => label)
                .set(t.usage_ms as f64 / t.quota_ms as f64);
        }
        let reason = match t.held.as_deref() {
            Some("cap") => Some("concurrency"),
            Some("rate") => Some("rate"),
            Some("quota") => Some("quota"),
            Some("spend") => Some("spend"),
            Some("paused") => Some("paused"),
            _ => None,
        };
        if let Some(r) = reason {
            *held.entry(r).or_default() += 1.0;
        }
    }
    for (reason, n) in held {
        ::metrics::gauge!(m::THROTTLED, "reason" => reason).set(n);
    }
    ::metrics::gauge!(m::OUTBOX_BACKLOG).set(crate::queue::outbox::backlog(queue).await? as f64);
    // Every enqueue, whoever made it, reserves its jobs' sequence numbers
    // with one INCRBY of its partition's B:seq (enqueue.lua).
    let mut submitted = 0u64;
    for p in 0..queue.partitions() {
        let n: Option<u64> = queue.client().get(queue.keys(p).key(&["seq"])).await?;
        submitted += n.unwrap_or(0);
    }
    ::metrics::gauge!(m::SUBMITTED).set(submitted as f64);
    Ok(())
}
