//! The schedules duty: enqueues the due slots of tenants' recurring
//! schedules ([`crate::queue::schedules`]).
//!
//! Every worker runs it, but one worker per tick runs the pass fleet-wide:
//! a worker first takes the tick guard (`SET B:schedtick NX PX <interval>`
//! in partition 0, as the reaper's guard), and one that finds it taken
//! leaves this tick to the worker that holds it. So an idle fleet costs
//! Redis one `SET` per worker per second plus one pass (`TIME`, then one
//! `ZRANGEBYSCORE` per partition), not one pass per worker (N workers, P
//! partitions: about N + P commands a second instead of 2 N P; measured by
//! `tests/schedules.rs`, quoted in the README). `schedule_fire.lua` still
//! decides (compare-and-set on each schedule's next-due slot, by Redis's
//! clock), so each slot fires once fleet-wide even if two passes overlap
//! (a guard that lapsed mid-pass), and a pass repeated after a lost reply
//! fires nothing more. The Rust side only computes slots: for each due
//! schedule, the slot to fire and the next one
//! ([`crate::queue::schedules::plan`]), under the schedule's missed-slot
//! policy and this duty's grace period.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{ConfigError, pause};
use crate::queue::schedules::{FirePlan, Fired, plan};
use crate::queue::{Queue, QueueError};

/// How the schedules duty works.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchedulesConfig {
    /// Time between passes (default 1 s), and how long a partition's tick
    /// guard is held: a slot's job is enqueued within about this of the
    /// slot (plus the script call), by whichever worker takes the tick.
    pub interval: Duration,
    /// Most due schedules fired per partition per script call (default 100:
    /// bounds the time one call holds Redis); a pass calls again while a
    /// call moved a schedule on (a few rounds at most).
    pub batch: usize,
    /// How old a slot may be and still fire on its own (default 60 s):
    /// older slots are *missed* and follow the schedule's policy (`skip`:
    /// none of them fires; `once`: one job for all of them).
    pub grace: Duration,
}

impl Default for SchedulesConfig {
    fn default() -> Self {
        SchedulesConfig {
            interval: Duration::from_secs(1),
            batch: 100,
            grace: Duration::from_secs(60),
        }
    }
}

impl SchedulesConfig {
    /// Check the ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.interval < Duration::from_millis(10) || self.batch == 0 {
            return Err(ConfigError {
                duty: "schedules",
                problem: "interval must be at least 10ms and batch at least 1".into(),
            });
        }
        Ok(())
    }
}

/// What one pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SchedulesPass {
    /// Jobs enqueued.
    pub fired: Vec<String>,
    /// Schedules moved past missed slots without a job.
    pub skipped: u64,
    /// Slots whose job the tenant's caps refused.
    pub refused: u64,
    /// Slots whose job the tenant may no longer enqueue (its queue or kind
    /// is not among its allowed ones).
    pub forbidden: u64,
    /// Schedules another worker had moved on already (lost races).
    pub moved: u64,
    /// True when another worker held this tick (this pass did nothing).
    pub passed: bool,
}

/// Enqueues due schedule slots.
pub struct Schedules {
    /// Its settings.
    pub config: SchedulesConfig,
    queue: Queue,
}

impl Schedules {
    /// The duty over `queue`.
    pub fn new(queue: Queue, config: SchedulesConfig) -> Schedules {
        Schedules { config, queue }
    }

    /// One pass over every partition, if this worker takes the tick (else
    /// nothing: another worker runs this tick's pass). A partition that
    /// fails is skipped (tried again next tick, by whichever worker takes
    /// it); the error is returned if nothing fired.
    pub async fn run_once(&self) -> Result<SchedulesPass, QueueError> {
        let mut pass = SchedulesPass::default();
        if !self.queue.take_schedules_tick(self.config.interval).await? {
            pass.passed = true;
            return Ok(pass);
        }
        let mut failed = None;
        let mut now = Some(self.queue.server_time().await?.timestamp_millis());
        for p in 0..self.queue.partitions() {
            if let Err(e) = self.partition_once(p, now.take(), &mut pass).await {
                tracing::warn!(error = %e, partition = p, "schedules failed; will retry");
                failed = Some(e);
            }
        }
        match failed {
            Some(e) if pass.fired.is_empty() => Err(e),
            _ => Ok(pass),
        }
    }

    /// The pass over partition `p`: `first_now`, Redis's time read for
    /// this tick (read again when None, and for every later round).
    async fn partition_once(
        &self,
        p: u32,
        first_now: Option<i64>,
        pass: &mut SchedulesPass,
    ) -> Result<(), QueueError> {
        let grace = self.config.grace.as_millis() as i64;
        let mut first_now = first_now;
        // A bounded number of rounds: a schedule late by several slots
        // fires them one per round (each round's compare-and-set moves it).
        for _ in 0..16 {
            let now = match first_now.take() {
                Some(now) => now,
                None => self.queue.server_time().await?.timestamp_millis(),
            };
            let due = self.queue.due_schedules(p, now, self.config.batch).await?;
            let mut plans = Vec::with_capacity(due.len());
            for s in &due {
                let r = match s.recurrence() {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(tenant = %s.tenant, schedule = %s.name, error = %e,
                            "unreadable schedule; left alone");
                        continue;
                    }
                };
                if let Some((fire, next)) = plan(&r, s.missed, s.next_due_ms, now, grace) {
                    plans.push(FirePlan {
                        member: format!("{}:{}", s.tenant, s.name),
                        expected: s.next_due_ms,
                        fire,
                        next,
                    });
                }
            }
            if plans.is_empty() {
                return Ok(());
            }
            let results = self.queue.fire_schedules(p, &plans).await?;
            let mut progressed = false;
            for Fired {
                member,
                status,
                job,
                detail,
            } in results
            {
                match status.as_str() {
                    "fired" => {
                        progressed = true;
                        if let Some(j) = job {
                            tracing::debug!(schedule = %member, slot = %detail, job = %j, "schedule fired");
                            pass.fired.push(j);
                        }
                    }
                    "skipped" => {
                        progressed = true;
                        tracing::info!(schedule = %member, "schedule skipped missed slots");
                        pass.skipped += 1;
                    }
                    "refused" => {
                        progressed = true;
                        tracing::warn!(schedule = %member, why = %detail, "scheduled job refused");
                        crate::metrics::schedule_slot_refused("caps");
                        pass.refused += 1;
                    }
                    "forbidden" => {
                        progressed = true;
                        tracing::warn!(schedule = %member, why = %detail, "scheduled job not allowed");
                        crate::metrics::schedule_slot_refused("forbidden");
                        pass.forbidden += 1;
                    }
                    "moved" => pass.moved += 1,
                    _ => {}
                }
            }
            if !progressed {
                return Ok(());
            }
        }
        Ok(())
    }

    /// A pass every interval until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        while !pause(self.config.interval, &shutdown).await {
            let _ = self.run_once().await;
        }
    }
}
