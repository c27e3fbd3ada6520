//! Jobs as the queue sees them: what is enqueued, what a claim hands out, what
//! a completion reports.

use std::time::Duration;

use serde::Serialize;

use super::QueueError;
use crate::model::attempt::{AttemptKey, Outcome, TaskUsage};
use crate::model::events::QueueEvent;

/// Highest and lowest `priority`; higher runs first within a tenant.
pub const PRIORITY_RANGE: std::ops::RangeInclusive<i32> = -100..=100;
/// Most attempts a job may ask for.
pub const MAX_ATTEMPTS_LIMIT: u32 = 1000;

/// Longest timeout or delay a job may ask for, in ms (the enqueue script's bound).
const MAX_DURATION_MS: u128 = 1_000_000_000_000_000;

/// Timeouts and delays are stored in whole milliseconds: refuse a fraction
/// (it would be silently dropped) and anything past the script's bound.
fn check_whole_ms(what: &str, d: Option<Duration>) -> Result<(), QueueError> {
    let Some(d) = d else { return Ok(()) };
    if d.subsec_nanos() % 1_000_000 != 0 {
        return Err(QueueError::Invalid(format!(
            "{what} {d:?} is not a whole number of milliseconds: round it, for example 1500ms"
        )));
    }
    if d.as_millis() > MAX_DURATION_MS {
        return Err(QueueError::Invalid(format!(
            "{what} {d:?} is too long: at most {MAX_DURATION_MS} ms"
        )));
    }
    Ok(())
}

/// Check a tenant, queue or kind name (see [`crate::model::names`]).
pub fn validate_name(what: &str, name: &str) -> Result<(), QueueError> {
    Ok(crate::model::names::validate_name(what, name)?)
}

/// A job to enqueue.
#[derive(Clone, Debug)]
pub struct JobSpec {
    /// Tenant the job belongs to (limits, fairness and billing).
    pub tenant: String,
    /// Queue name.
    pub queue: String,
    /// Task kind: a program in the workers directory or an in-process handler.
    pub kind: String,
    /// Payload, JSON text.
    pub payload: String,
    /// Requested timeout; `None` takes the kind's default.
    pub timeout: Option<Duration>,
    /// Requested memory cap in bytes; `None` takes the kind's default.
    pub memory: Option<u64>,
    /// Start no earlier than this from now.
    pub delay: Option<Duration>,
    /// -100..=100, higher first (within the tenant; fairness is across tenants).
    pub priority: i32,
    /// Attempts before the job goes dead; `None` takes the default (3).
    pub max_attempts: Option<u32>,
    /// A second enqueue with the same key (per tenant) returns the first job.
    pub idempotency_key: Option<String>,
}

impl JobSpec {
    /// A job with an empty object payload and every option at its default.
    pub fn new(
        tenant: impl Into<String>,
        queue: impl Into<String>,
        kind: impl Into<String>,
    ) -> Self {
        JobSpec {
            tenant: tenant.into(),
            queue: queue.into(),
            kind: kind.into(),
            payload: "{}".into(),
            timeout: None,
            memory: None,
            delay: None,
            priority: 0,
            max_attempts: None,
            idempotency_key: None,
        }
    }

    /// Set the payload from a JSON value.
    pub fn payload(mut self, payload: &serde_json::Value) -> Self {
        self.payload = payload.to_string();
        self
    }

    /// Check everything that can be checked without Redis; the enqueue script
    /// checks the same again (plus the tenant's caps) for other clients.
    pub fn validate(&self, max_payload: usize) -> Result<(), QueueError> {
        validate_name("tenant", &self.tenant)?;
        validate_name("queue", &self.queue)?;
        validate_name("kind", &self.kind)?;
        if self.payload.len() > max_payload {
            return Err(QueueError::TooLarge(format!(
                "payload is {} bytes, over the limit of {max_payload} bytes; store large inputs elsewhere and pass a reference",
                self.payload.len()
            )));
        }
        super::payload::check(&self.payload).map_err(QueueError::Invalid)?;
        if !PRIORITY_RANGE.contains(&self.priority) {
            return Err(QueueError::Invalid(format!(
                "priority {} is out of range: use -100..=100 (higher runs first)",
                self.priority
            )));
        }
        if let Some(n) = self.max_attempts
            && (n == 0 || n > MAX_ATTEMPTS_LIMIT)
        {
            return Err(QueueError::Invalid(format!(
                "max attempts {n} is out of range: use 1..={MAX_ATTEMPTS_LIMIT}"
            )));
        }
        if let Some(k) = &self.idempotency_key
            && (k.is_empty() || k.len() > 200)
        {
            return Err(QueueError::Invalid(
                "idempotency key must be 1-200 bytes".into(),
            ));
        }
        if self.timeout == Some(Duration::ZERO) {
            return Err(QueueError::Invalid(
                "timeout must be above zero, for example 30s".into(),
            ));
        }
        for (what, d) in [("timeout", self.timeout), ("delay", self.delay)] {
            check_whole_ms(what, d)?;
        }
        if self.memory == Some(0) {
            return Err(QueueError::Invalid(
                "memory must be above zero, for example 256MiB".into(),
            ));
        }
        Ok(())
    }

    /// The ten wire-format fields of this job (see `enqueue.lua`).
    pub(crate) fn wire_fields(&self) -> [String; 10] {
        [
            self.tenant.clone(),
            self.queue.clone(),
            self.kind.clone(),
            self.payload.clone(),
            self.timeout.map_or(0, |d| d.as_millis() as u64).to_string(),
            self.memory.unwrap_or(0).to_string(),
            self.delay.map_or(0, |d| d.as_millis() as u64).to_string(),
            self.priority.to_string(),
            self.max_attempts.unwrap_or(0).to_string(),
            self.idempotency_key.clone().unwrap_or_default(),
        ]
    }
}

/// The answer to one enqueued job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Enqueued {
    /// The job id (`<partition>-<hex>`).
    pub id: String,
    /// False when an idempotency key matched an earlier job (nothing created).
    pub created: bool,
}

/// A job handed to this worker by a claim, with its lease.
#[derive(Clone, Debug)]
pub struct ClaimedJob {
    /// Job id.
    pub id: String,
    /// Attempt number, also the lease's fencing token.
    pub attempt: u32,
    /// Partition the job lives in.
    pub partition: u32,
    /// Tenant.
    pub tenant: String,
    /// Queue.
    pub queue: String,
    /// Kind.
    pub kind: String,
    /// Payload JSON text.
    pub payload: String,
    /// Requested timeout in ms (0: the kind's default).
    pub timeout_ms: u64,
    /// Requested memory in bytes (0: the kind's default).
    pub memory: u64,
    /// Enqueue time, ms since the epoch (Redis clock).
    pub enqueued_at_ms: i64,
    /// Start time, ms since the epoch (Redis clock).
    pub started_at_ms: i64,
    /// The tenant's timeout cap in ms at claim time.
    pub max_timeout_ms: u64,
    /// The tenant's memory cap in bytes at claim time.
    pub max_memory: u64,
}

impl ClaimedJob {
    /// This attempt's key (its lease).
    pub fn key(&self) -> AttemptKey {
        AttemptKey::new(self.id.clone(), self.attempt)
    }
}

/// What one claim handed out, and what the worker needs to plan the next.
#[derive(Clone, Debug, Default)]
pub struct Claimed {
    /// The jobs, each with its lease.
    pub jobs: Vec<ClaimedJob>,
    /// How long until the partition's earliest delayed job or held tenant
    /// becomes due, by Redis's clock (None: nothing is waiting).
    pub due_in: Option<Duration>,
    /// The admissible weight left on the requested queues of the partition
    /// after this claim: workers split their slots across partitions in
    /// proportion to it.
    pub weight: f64,
    /// What the claim reported (rate alerts); the caller records them.
    pub events: Vec<QueueEvent>,
}

/// What a completion call did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Completed {
    /// Where each attempt's job went, in the order sent.
    pub statuses: Vec<CompleteStatus>,
    /// What it reported (quota thresholds crossed).
    pub events: Vec<QueueEvent>,
}

/// What a reaper pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reaped {
    /// False when another worker held this interval's guard (nothing done).
    pub ran: bool,
    /// Expired attempts closed as lost and returned to ready.
    pub reaped: u64,
    /// What it reported.
    pub events: Vec<QueueEvent>,
}

/// What a release (shutdown hand-back) did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Released {
    /// Attempts handed back.
    pub released: u64,
    /// What it reported.
    pub events: Vec<QueueEvent>,
}

/// How one attempt ended, as sent to the completion script.
#[derive(Clone, Debug)]
pub struct Completion {
    /// Job id.
    pub id: String,
    /// The attempt (fencing token) this completion is for.
    pub attempt: u32,
    /// Outcome.
    pub outcome: Outcome,
    /// Do not retry (exit 65, unknown kind).
    pub permanent: bool,
    /// Error text for failures.
    pub error: String,
    /// Result JSON text on success.
    pub result: Option<String>,
    /// Exit code, if the process exited.
    pub exit_code: Option<i32>,
    /// Signal, if the process was killed by one.
    pub signal: Option<i32>,
    /// Wall time in ms.
    pub run_ms: u64,
    /// CPU time (user + system) in ms.
    pub cpu_ms: u64,
    /// Peak resident set size in bytes.
    pub peak_rss: u64,
    /// What the task reported.
    pub usage: TaskUsage,
    /// Delay before a retry, if the attempt failed and attempts remain.
    pub backoff_ms: u64,
}

impl Completion {
    pub(crate) fn wire_fields(&self) -> [String; 15] {
        let opt = |v: Option<i32>| v.map(|x| x.to_string()).unwrap_or_default();
        [
            self.id.clone(),
            self.attempt.to_string(),
            self.outcome.as_str().to_string(),
            if self.permanent { "1" } else { "0" }.to_string(),
            self.error.clone(),
            self.result.clone().unwrap_or_default(),
            opt(self.exit_code),
            opt(self.signal),
            self.run_ms.to_string(),
            self.cpu_ms.to_string(),
            self.peak_rss.to_string(),
            self.usage.api_calls.to_string(),
            self.usage.input_tokens.to_string(),
            self.usage.output_tokens.to_string(),
            self.backoff_ms.to_string(),
        ]
    }
}

/// Where a completed attempt sent its job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CompleteStatus {
    /// Done.
    Succeeded,
    /// Retry scheduled after a backoff.
    Delayed,
    /// Retry ready at once.
    Ready,
    /// No attempts left, or a permanent failure.
    Dead,
    /// The lease was no longer this attempt's: nothing was changed.
    Refused,
    /// The job was cancelled while this attempt ran (`cancel.lua` marked
    /// it): closed as `cancelled`, not retried.
    Cancelled,
}

impl CompleteStatus {
    /// The script's word for it (`succeeded`, `delayed`, `ready`, `dead`,
    /// `refused`, `cancelled`).
    pub fn as_str(self) -> &'static str {
        match self {
            CompleteStatus::Succeeded => "succeeded",
            CompleteStatus::Delayed => "delayed",
            CompleteStatus::Ready => "ready",
            CompleteStatus::Dead => "dead",
            CompleteStatus::Refused => "refused",
            CompleteStatus::Cancelled => "cancelled",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "succeeded" => CompleteStatus::Succeeded,
            "delayed" => CompleteStatus::Delayed,
            "ready" => CompleteStatus::Ready,
            "dead" => CompleteStatus::Dead,
            "refused" => CompleteStatus::Refused,
            "cancelled" => CompleteStatus::Cancelled,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(validate_name("tenant", "acme-1.prod_x").is_ok());
        for bad in ["", "-x", "a b", "a:b", "{x}", &"x".repeat(65)] {
            let e = validate_name("tenant", bad).unwrap_err().to_string();
            assert!(e.contains("tenant"), "{e}");
        }
    }

    #[test]
    fn timeouts_and_delays_are_whole_bounded_ms() {
        let mut s = JobSpec::new("t", "q", "echo");
        s.timeout = Some(Duration::from_micros(500));
        let e = s.validate(1024).unwrap_err().to_string();
        assert!(e.contains("whole number of milliseconds"), "{e}");
        s.timeout = Some(Duration::from_secs(u64::MAX / 1000));
        let e = s.validate(1024).unwrap_err().to_string();
        assert!(e.contains("too long"), "{e}");
        s.timeout = Some(Duration::from_millis(1500));
        s.delay = Some(Duration::from_nanos(1_000_000_001));
        let e = s.validate(1024).unwrap_err().to_string();
        assert!(e.starts_with("delay"), "{e}");
        s.delay = Some(Duration::from_secs(3600));
        assert!(s.validate(1024).is_ok());
    }

    #[test]
    fn specs_are_checked() {
        let ok = JobSpec::new("t", "q", "echo");
        assert!(ok.validate(1024).is_ok());
        let mut big = ok.clone();
        big.payload = format!("\"{}\"", "x".repeat(2000));
        assert!(
            big.validate(1024)
                .unwrap_err()
                .to_string()
                .contains("over the limit")
        );
        let mut bad = ok.clone();
        bad.payload = "{nope".into();
        assert!(
            bad.validate(1024)
                .unwrap_err()
                .to_string()
                .contains("not valid JSON")
        );
        let mut prio = ok.clone();
        prio.priority = 101;
        assert!(prio.validate(1024).is_err());
        let mut att = ok;
        att.max_attempts = Some(0);
        assert!(att.validate(1024).is_err());
    }
}
