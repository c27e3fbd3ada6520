//! One attempt as every layer sees it: which one ([`AttemptKey`]), how it
//! ended ([`Outcome`]), what the task said it used ([`TaskUsage`]) and
//! everything the runtime measured ([`Report`]).
//!
//! Pure data: the executor fills a [`Report`], the worker turns it into a
//! completion, the queue stores its outcome and the ledger bills it. Error
//! texts are always clean ([`clean_error`]): they quote task output, which
//! may be any bytes, and end up in Redis, PostgreSQL and on terminals.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// One attempt of one job: the unit of a lease. The attempt number is the
/// fencing token: scripts act on a job only while it still matches.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AttemptKey {
    /// Job id.
    pub id: String,
    /// Attempt number (the fencing token).
    pub attempt: u32,
}

impl AttemptKey {
    /// The key of attempt `attempt` of job `id`.
    pub fn new(id: impl Into<String>, attempt: u32) -> AttemptKey {
        AttemptKey {
            id: id.into(),
            attempt,
        }
    }
}

impl fmt::Display for AttemptKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.id, self.attempt)
    }
}

/// A running attempt handed back to ready (shutdown): which one, and how
/// long it ran here, so its ledger row bills the time it used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandBack {
    /// The attempt.
    pub key: AttemptKey,
    /// Milliseconds it ran on this worker before it was stopped.
    pub run_ms: u64,
}

/// Exit code that means "permanent failure, never retry" (EX_DATAERR).
pub const EXIT_PERMANENT: i32 = 65;

/// At most this many bytes of [`Report::error`] (summary and stderr tail).
pub const ERROR_MAX: usize = 4 << 10;

/// How an attempt ended.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Exit 0 with a valid (or empty) result.
    Succeeded,
    /// Any other failure (see [`Report::permanent`] for retry eligibility).
    Failed,
    /// The timeout was reached; the process group was killed.
    TimedOut,
    /// The memory cap was hit.
    MemoryExceeded,
    /// The worker running it disappeared (lease expired); set by the queue,
    /// never by the executor.
    Lost,
    /// Cancelled while running (`agentq cancel`, `DELETE /v1/jobs/{id}`);
    /// set by the queue, never by the executor.
    Cancelled,
}

impl Outcome {
    /// All outcomes, in declaration order.
    pub const ALL: [Outcome; 6] = [
        Outcome::Succeeded,
        Outcome::Failed,
        Outcome::TimedOut,
        Outcome::MemoryExceeded,
        Outcome::Lost,
        Outcome::Cancelled,
    ];

    /// The snake_case name: `succeeded`, `failed`, `timed_out`,
    /// `memory_exceeded`, `lost`, `cancelled`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
            Outcome::TimedOut => "timed_out",
            Outcome::MemoryExceeded => "memory_exceeded",
            Outcome::Lost => "lost",
            Outcome::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error returned by `Outcome::from_str` for an unknown name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown outcome {0:?}: expected one of succeeded, failed, timed_out, memory_exceeded, lost, cancelled"
)]
pub struct UnknownOutcome(pub String);

impl FromStr for Outcome {
    type Err = UnknownOutcome;

    fn from_str(s: &str) -> Result<Outcome, UnknownOutcome> {
        Outcome::ALL
            .into_iter()
            .find(|o| o.as_str() == s)
            .ok_or_else(|| UnknownOutcome(s.to_string()))
    }
}

/// Usage the task reported about itself (stored as reported, beside what the
/// runtime measured). Missing keys are 0.
#[derive(Default, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(default)]
pub struct TaskUsage {
    /// External API calls made.
    pub api_calls: u64,
    /// LLM input tokens.
    pub input_tokens: u64,
    /// LLM output tokens.
    pub output_tokens: u64,
}

/// Everything the runtime learned from one attempt.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Report {
    /// How the attempt ended.
    pub outcome: Outcome,
    /// True when the attempt must never be retried: exit code 65, a program
    /// that cannot be started, or a failure the caller marks permanent
    /// (unknown kind, ...).
    pub permanent: bool,
    /// Exit code when the process exited normally.
    pub exit_code: Option<i32>,
    /// Signal number when the process was killed by a signal.
    pub signal: Option<i32>,
    /// Wall time from start to exit, measured by the runtime.
    pub wall_ms: u64,
    /// User CPU time of the process and its reaped descendants.
    pub cpu_user_ms: u64,
    /// System CPU time of the process and its reaped descendants.
    pub cpu_sys_ms: u64,
    /// Peak memory of the task, in bytes. Cgroup mode: the attempt's
    /// cgroup peak (all its processes together). Rlimit mode: the peak RSS
    /// of the process or of one of its reaped descendants, when it rose
    /// above the worker's own RSS at spawn; 0 when it did not, since `wait4`
    /// then reports the worker's memory, not the task's (see
    /// [`process::task_peak`]). 0 also for in-process handlers.
    pub peak_rss_bytes: u64,
    /// The `output` key of the result line.
    pub output: Option<serde_json::Value>,
    /// The `usage` key of the result line, as reported (missing keys = 0).
    pub usage: TaskUsage,
    /// For anything but success: a one-line summary, then possibly a
    /// bounded tail of the program's stderr on the following lines. Always
    /// clean text (see [`clean_error`]).
    pub error: Option<String>,
    /// The runtime stopped the attempt before it ended by itself (a
    /// graceful stop at shutdown, or a kill because its lease was gone).
    /// False for an attempt that ended on its own, even if a stop came
    /// while it was ending: that one is completed, not handed back.
    #[serde(default)]
    pub stopped: bool,
}

impl Report {
    /// A failed report for failures before or without a process (unknown
    /// kind, bad input, ...). All measurements are zero. `msg` is stored
    /// through [`clean_error`], so it may be any text (a handler's message).
    pub fn failed(msg: impl Into<String>, permanent: bool) -> Report {
        Report {
            outcome: Outcome::Failed,
            permanent,
            exit_code: None,
            signal: None,
            wall_ms: 0,
            cpu_user_ms: 0,
            cpu_sys_ms: 0,
            peak_rss_bytes: 0,
            output: None,
            usage: TaskUsage::default(),
            error: Some(clean_error(&msg.into())),
            stopped: false,
        }
    }

    /// True when the caller may retry this attempt (while attempts remain).
    pub fn retryable(&self) -> bool {
        self.outcome != Outcome::Succeeded && !self.permanent
    }

    /// The first line of [`Report::error`] (the summary), if any.
    pub fn error_summary(&self) -> Option<&str> {
        self.error
            .as_deref()
            .map(|e| e.lines().next().unwrap_or(""))
    }
}

/// `text` made fit for [`Report::error`]: valid UTF-8 without NUL or control
/// characters other than newline and tab, at most [`ERROR_MAX`] bytes (the
/// start is kept: the summary comes first). Errors are stored in Redis and
/// PostgreSQL (whose `text` refuses NUL) and shown on terminals, and they
/// quote task output and handler messages, which may be any bytes.
pub fn clean_error(text: &str) -> String {
    super::text::clean(text, ERROR_MAX)
}

/// Error text used when an attempt is stopped because the worker shuts down.
pub const INTERRUPTED: &str = "interrupted: worker shutting down";

/// Error text used when an attempt is killed at once because its lease is
/// gone (the job may run elsewhere).
pub const KILLED: &str = "killed: this worker no longer holds the attempt's lease";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_names_round_trip() {
        for o in Outcome::ALL {
            assert_eq!(o.as_str().parse::<Outcome>().unwrap(), o);
            assert_eq!(
                serde_json::to_string(&o).unwrap(),
                format!("\"{}\"", o.as_str())
            );
        }
        assert!("nope".parse::<Outcome>().is_err());
    }
}
