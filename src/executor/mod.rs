//! Runs one task attempt and measures what it used.
//!
//! Two ways to run a task:
//! - [`run_process`]: the task program contract (README, "Task programs"). One
//!   process per attempt in its own process group, clean environment, fresh
//!   working directory, job JSON on stdin, result JSON on the last stdout line,
//!   hard timeout (SIGTERM to the group, SIGKILL after a grace) and memory cap,
//!   usage measured with `wait4` rusage. [`run_process_reporting`] also
//!   hands the task's progress lines to a [`ProgressSink`] while it runs.
//! - [`run_handler`]: in-process Rust [`Handler`]s for library users (timeout
//!   and panic isolation, but no memory cap and no CPU/RSS measurement).
//!
//! Both return a [`Report`]; neither ever panics on anything the task does.

#![warn(missing_docs)]

use std::time::Duration;

pub mod cgroup;
pub mod handler;
pub mod lease_guard;
pub mod manifest;
pub mod owner;
pub mod process;
pub mod progress;
pub mod protocol;
pub mod sandbox;
pub mod stop;
pub mod workdir;

pub use handler::{Handler, HandlerError, HandlerOutput, Handlers, handler_fn, run_handler};
pub use manifest::{Manifest, ManifestError, Registry, parse_manifest};
pub use process::{
    is_memory_exceeded, run_process, run_process_in, run_process_reporting, task_peak,
};
pub use progress::{ProgressFuture, ProgressSink};
pub use protocol::{TaskInput, TaskResult, parse_task_output, progress_report};
// The attempt model lives on the ground floor; the executor produces it.
pub use crate::model::attempt::{
    ERROR_MAX, EXIT_PERMANENT, INTERRUPTED, KILLED, Outcome, Report, TaskUsage, UnknownOutcome,
    clean_error,
};
pub use sandbox::{Sandbox, SandboxConfig, TaskUser};
pub use stop::{Stop, Watchdog};

/// Default time between SIGTERM and SIGKILL when a limit is hit.
pub const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(5);

/// The caps of one attempt, already resolved by the caller (job request or
/// manifest default, within the tenant's limits).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caps {
    /// Wall-clock limit from the start of the process. At the deadline the
    /// process group gets SIGTERM, then SIGKILL after `kill_grace`.
    pub timeout: Duration,
    /// Memory cap in bytes (`None`: no cap).
    pub memory: Option<u64>,
    /// Time between SIGTERM and SIGKILL (timeout and shutdown).
    pub kill_grace: Duration,
}

impl Caps {
    /// The manifest's defaults with [`DEFAULT_KILL_GRACE`].
    pub fn from_manifest(m: &Manifest) -> Caps {
        Caps {
            timeout: m.timeout,
            memory: m.memory,
            kill_grace: DEFAULT_KILL_GRACE,
        }
    }
}
