//! How the runtime ends an attempt early, and who watches it when the
//! worker cannot.
//!
//! Two ways to stop an attempt: gracefully (the worker shuts down: SIGTERM,
//! SIGKILL after the kill grace, the job is handed back) and at once (the
//! attempt is no longer this worker's: its lease was lost or lapsed, so the
//! job may already run elsewhere and every moment it runs here breaks its
//! tenant's cap). A [`Watchdog`] hands the task's process group to the lease
//! guard process ([`super::lease_guard`]), which kills it when its lease's
//! local deadline passes even if the worker is stopped.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio_util::sync::CancellationToken;

use super::lease_guard::LeaseGuard;

/// The stop signals of one attempt.
#[derive(Clone, Debug, Default)]
pub struct Stop {
    /// Stop gracefully (SIGTERM, then SIGKILL after the kill grace).
    pub graceful: CancellationToken,
    /// Kill at once (SIGKILL to the group and the cgroup).
    pub now: CancellationToken,
    /// Who kills the task if the worker cannot (task programs only).
    pub watchdog: Option<Watchdog>,
}

impl From<CancellationToken> for Stop {
    /// A graceful stop only.
    fn from(graceful: CancellationToken) -> Stop {
        Stop {
            graceful,
            ..Stop::default()
        }
    }
}

/// One attempt's registration with the lease guard.
#[derive(Clone)]
pub struct Watchdog {
    /// The worker's guard process.
    pub guard: Arc<LeaseGuard>,
    /// `<job id>/<attempt>`.
    pub key: String,
    /// The lease's local deadline (`CLOCK_MONOTONIC` ns), moved on by the
    /// heartbeat; read when the task starts.
    pub deadline_ns: Arc<AtomicU64>,
}

impl std::fmt::Debug for Watchdog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watchdog")
            .field("key", &self.key)
            .field("deadline_ns", &self.deadline_ns.load(Ordering::Relaxed))
            .finish()
    }
}

impl Watchdog {
    /// Hand the attempt (its cgroup's `procs` files, if any) to the guard
    /// before its process starts; the returned value takes it back when
    /// dropped or disarmed, which must happen before the task's process is
    /// reaped (the guard kills by process group id).
    pub(crate) fn arm(&self, procs: &[PathBuf]) -> Armed {
        let deadline = self.deadline_ns.load(Ordering::Relaxed);
        self.guard.arm(&self.key, 0, deadline, procs);
        Armed {
            dog: Some(self.clone()),
        }
    }
}

/// A task the guard watches; dropping it disarms.
pub(crate) struct Armed {
    dog: Option<Watchdog>,
}

impl Armed {
    /// The task's process (its group leader) has started as `pid`.
    pub(crate) fn set_pid(&self, pid: libc::pid_t) {
        if let Some(d) = &self.dog {
            d.guard.set_pid(&d.key, pid);
        }
    }

    /// Take the task back from the guard (before reaping it).
    pub(crate) fn disarm(mut self) {
        self.release();
    }

    fn release(&mut self) {
        if let Some(d) = self.dog.take() {
            d.guard.disarm(&d.key);
        }
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        self.release();
    }
}
