//! Background duties: everything a worker does besides running attempts,
//! each as a named unit in the manner of River's maintenance services.
//!
//! Every duty has
//! - a `Config` with documented defaults (`Default`) and `validate()`,
//! - `run_once()`, one pass of its work, which tests call directly and which
//!   says what it did,
//! - `run(shutdown)`, the loop a worker spawns: `run_once`, then wait (its
//!   interval, or the shared retry pacing after a failure), until shutdown.
//!
//! | duty | does |
//! |---|---|
//! | [`heartbeat`] | extends this worker's leases; kills attempts whose lease is gone or lapsed |
//! | [`reaper`] | returns other workers' expired leases to ready (once per interval fleet-wide) |
//! | [`ledger_writer`] | moves usage records from the outbox to PostgreSQL, exactly once |
//! | [`sampler`] | turns Redis state into gauges (one worker of the fleet at a time) |
//! | [`schedules`] | enqueues the due slots of tenants' recurring schedules (each slot once fleet-wide) |
//! | [`tier_publisher`] | writes the configured tiers to Redis and PostgreSQL |
//! | [`webhooks`] | delivers tenant alerts to their webhooks, signed, at least once, retried with backoff |

pub mod heartbeat;
pub mod ledger_writer;
pub mod reaper;
pub mod sampler;
pub mod schedules;
pub mod tier_publisher;
pub mod webhooks;

/// A duty's configuration is out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{duty}: {problem}")]
pub struct ConfigError {
    /// Which duty.
    pub duty: &'static str,
    /// What is wrong and what would be right.
    pub problem: String,
}

/// Sleep `d` unless `shutdown` fires first; true if it fired.
pub(crate) async fn pause(
    d: std::time::Duration,
    shutdown: &tokio_util::sync::CancellationToken,
) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}
