//! The tier publisher: writes the configured tiers (`agentq.toml`, or the
//! built-in free/pro/enterprise) to Redis, where the scripts read them, so
//! that every tenant on a tier is held to its limits fleet-wide from the
//! next claim on.
//!
//! A worker publishes at start and again every interval, so a Redis that
//! lost its data (a restart without persistence) gets them back. A full
//! Redis (`noeviction`) is not a reason to stop: the tiers already there
//! stay, and running workers is how a full Redis drains.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{ConfigError, pause};
use crate::model::limits::Tier;
use crate::queue::{Queue, QueueError};

/// How the tier publisher works.
#[derive(Clone, Debug, PartialEq)]
pub struct TierPublisherConfig {
    /// The tiers to publish.
    pub tiers: Vec<Tier>,
    /// Time between publications (default 5 min).
    pub interval: Duration,
}

impl Default for TierPublisherConfig {
    fn default() -> Self {
        TierPublisherConfig {
            tiers: crate::model::limits::builtin_tiers(),
            interval: Duration::from_secs(300),
        }
    }
}

impl TierPublisherConfig {
    /// Check every tier's limits.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for t in &self.tiers {
            t.limits.validate().map_err(|e| ConfigError {
                duty: "tier publisher",
                problem: format!("tier {}: {e}", t.name),
            })?;
        }
        Ok(())
    }
}

/// Publishes tiers to Redis.
pub struct TierPublisher {
    /// Its settings.
    pub config: TierPublisherConfig,
    queue: Queue,
}

impl TierPublisher {
    /// A publisher over `queue`.
    pub fn new(queue: Queue, config: TierPublisherConfig) -> TierPublisher {
        TierPublisher { config, queue }
    }

    /// Publish once; a full Redis is a warning, not a failure.
    pub async fn run_once(&self) -> Result<(), QueueError> {
        match crate::queue::limits::publish_tiers(&self.queue, &self.config.tiers).await {
            Err(QueueError::Full(why)) => {
                tracing::warn!(%why, "could not publish tiers (Redis is full); keeping the ones already there");
                Ok(())
            }
            r => r,
        }
    }

    /// Publish every interval until `shutdown` (the first is the caller's
    /// [`run_once`](Self::run_once) at start).
    pub async fn run(self, shutdown: CancellationToken) {
        while !pause(self.config.interval, &shutdown).await {
            if let Err(e) = self.run_once().await {
                tracing::warn!(error = %e, "publishing tiers failed; will retry");
            }
        }
    }
}
