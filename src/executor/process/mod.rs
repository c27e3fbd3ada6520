//! One task attempt as its own process (Linux).
//!
//! Lifecycle of [`run_process`]:
//! 1. Resolve the program, create a fresh working directory (in the
//!    worker's directory of them, see [`super::workdir`]).
//! 2. Spawn with `std::process::Command`: clean environment (only the
//!    manifest's `env` names), its own process group, stdin/stdout/stderr
//!    piped, and a `pre_exec` hook that sets the memory cap (`RLIMIT_DATA`)
//!    and marks every descriptor >= 3 close-on-exec.
//! 3. Write the job JSON to stdin from a separate task (a program that never
//!    reads stdin cannot block the worker), read stdout and stderr
//!    concurrently into bounded tail buffers; with a progress sink
//!    ([`run_process_reporting`]), stdout's progress lines go to it as they
//!    arrive, from a task of the attempt's own ([`super::progress`]).
//! 4. Wait for the exit without reaping (pidfd + `waitid(WNOWAIT)`), racing
//!    the timeout and the cancel token. At the deadline (or on cancel) the
//!    group gets SIGTERM, then SIGKILL after the grace.
//! 5. Once the main process has exited, SIGKILL the whole group (while the
//!    zombie leader still pins the group id) so descendants that outlive it
//!    die too, then reap it with `wait4` to get CPU times and peak RSS.
//! 6. Send the last pending progress report (so it lands before the
//!    completion), classify the result and remove the working directory.
//!
//! Peak memory: in cgroup mode it is the cgroup's peak (every process of the
//! attempt, nothing else). In rlimit mode it comes from `wait4`'s
//! `ru_maxrss`, which on Linux also holds the RSS the forked child had
//! before `exec`: a copy of the worker's own anonymous memory (exec folds
//! the old image's high-water mark into the process's). So a `ru_maxrss` no
//! higher than that says nothing about the task; only a peak above it (by a
//! margin) is the task's own. Below that the task's peak is
//! unknown: it is reported as 0 and not used to classify memory failures
//! (stderr markers still are). See [`task_peak`].
//!
//! If the future is dropped midway, a guard kills the group and reaps the
//! child on a helper thread, so no process or zombie is left behind.

mod classify;
mod pipes;
mod spawn;
mod wait;

pub use classify::{is_memory_exceeded, task_peak};
pub use pipes::{STDERR_KEEP, STDOUT_KEEP};

use super::progress::{Forwarder, ProgressSink};
use super::protocol::{TaskInput, encode_input};
use super::sandbox::{self, Sandbox};
use super::stop::Stop;
use super::{Caps, Manifest};
use crate::model::attempt::{INTERRUPTED, Report};
use classify::*;
use pipes::*;
use spawn::*;
use wait::*;

/// Runs one attempt of `m` with `input` on stdin under `caps`.
///
/// Never panics and always returns a [`Report`]: spawn failures (missing
/// program, permission denied) are permanent failures; timeouts are
/// [`Outcome::TimedOut`]; hitting the memory cap is
/// [`Outcome::MemoryExceeded`]; exit code 65 is a permanent failure. When
/// `stop.graceful` fires (worker shutdown) the group gets SIGTERM, SIGKILL
/// after `caps.kill_grace`, and the report is a retryable failure with
/// error `"interrupted: worker shutting down"`; when `stop.now` fires (the
/// lease is gone) the group and the cgroup get SIGKILL at once. Either way
/// [`Report::stopped`] is set. A [`Stop::watchdog`] gets the task's process
/// group from its start until just before it is reaped.
///
/// Must be called inside a tokio runtime with I/O and time enabled (it
/// registers a pidfd with the reactor; without pidfd support it falls back
/// to a blocking `waitid` on the blocking pool).
pub async fn run_process(
    m: &Manifest,
    input: &TaskInput,
    caps: &Caps,
    stop: impl Into<Stop>,
) -> Report {
    run_process_in(sandbox::current(), m, input, caps, stop).await
}

/// [`run_process`] under an explicit [`Sandbox`] (containment mode, process
/// cap, task user) instead of the worker-wide one.
pub async fn run_process_in(
    sb: &Sandbox,
    m: &Manifest,
    input: &TaskInput,
    caps: &Caps,
    stop: impl Into<Stop>,
) -> Report {
    run_attempt(sb, m, input, caps, stop.into(), None).await
}

/// [`run_process`], handing the task's progress reports to `progress` while
/// it runs (bounded in size and rate: [`super::progress`]). The last
/// pending report is sent before this returns, so a completion recorded
/// after it follows every report.
pub async fn run_process_reporting(
    m: &Manifest,
    input: &TaskInput,
    caps: &Caps,
    stop: impl Into<Stop>,
    progress: ProgressSink,
) -> Report {
    let sb = sandbox::current();
    run_attempt(sb, m, input, caps, stop.into(), Some(progress)).await
}

async fn run_attempt(
    sb: &Sandbox,
    m: &Manifest,
    input: &TaskInput,
    caps: &Caps,
    stop: Stop,
    progress: Option<ProgressSink>,
) -> Report {
    if stop.graceful.is_cancelled() || stop.now.is_cancelled() {
        let mut r = Report::failed(INTERRUPTED, false);
        r.stopped = true;
        return r;
    }
    let place = match Place::prepare(sb, m, caps) {
        Ok(p) => p,
        Err(e) => return e.report(),
    };
    // From before the spawn until just before the reap, the lease guard may
    // kill the attempt if the worker cannot: by its cgroup from the start
    // (the child joins it before exec, so a stall between fork and the
    // registration of its pid is covered too), and by its process group
    // once the pid is known.
    let watched = stop.watchdog.as_ref().map(|w| w.arm(&place.cgroup_procs()));
    let mut started = match spawn(sb, m, caps, &place).await {
        Ok(s) => s,
        Err(e) => {
            place.close().await;
            return e.report();
        }
    };
    if let Some(w) = &watched {
        w.set_pid(started.pid);
    }
    let label = format!("{}/{}", input.id, input.attempt);
    let (forwarder, scanner) = progress.map(|sink| Forwarder::start(sink, label)).unzip();
    let pipes = Pipes::attach(&mut started.child, encode_input(input), scanner);
    // The std Child is only a pid now; dropping it neither waits nor kills.
    let Started {
        pid,
        mut guard,
        start,
        worker_rss,
        ..
    } = started;
    let (ended_by, exit) = wait_or_stop(pid, place.cgroup.as_ref(), caps, &stop).await;
    let wall = start.elapsed();
    // Kill whatever is left of the group while the (zombie) leader still
    // pins the group id, and everything in the attempt's cgroup
    // (descendants that left the group too), then reap the leader.
    signal_group(pid, libc::SIGKILL);
    let place = place.kill_leftovers().await;
    if let Some(w) = watched {
        w.disarm();
    }
    let reaped = reap_after(pid, exit).await;
    guard.reaped = reaped.is_ok();
    let output = pipes.collect().await;
    // Stdout is read to its end: no report can follow the pending one.
    if let Some(f) = forwarder {
        f.finish().await;
    }
    let cgroup = place.close().await;
    let (status, usage) = match reaped {
        Ok(r) => r,
        Err(e) => {
            let mut r = Report::failed(
                format!("lost track of the task program (pid {pid}): wait4 failed: {e}"),
                false,
            );
            r.wall_ms = millis(wall);
            return r;
        }
    };
    classify(Observed {
        ended_by,
        status,
        usage,
        wall,
        caps,
        stdout: &output.stdout,
        stderr_tail: &tail_text(&output.stderr, ERROR_TAIL),
        cgroup,
        pids_max: sb.pids_max(),
        worker_rss,
    })
}
