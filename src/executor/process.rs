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
//!    concurrently into bounded tail buffers.
//! 4. Wait for the exit without reaping (pidfd + `waitid(WNOWAIT)`), racing
//!    the timeout and the cancel token. At the deadline (or on cancel) the
//!    group gets SIGTERM, then SIGKILL after the grace.
//! 5. Once the main process has exited, SIGKILL the whole group (while the
//!    zombie leader still pins the group id) so descendants that outlive it
//!    die too, then reap it with `wait4` to get CPU times and peak RSS.
//! 6. Classify the result and remove the working directory.
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

use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::value::RawValue;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, Interest};
use tokio_util::sync::CancellationToken;

use super::cgroup::{Attempt, CgroupLimits, CgroupStats, join_self};
use super::sandbox::{self, Sandbox};
use super::stop::Stop;
use super::{
    EXIT_PERMANENT, INTERRUPTED, KILLED, Limits, Manifest, Outcome, Report, TaskInput, TaskUsage,
    clean_error,
};
use crate::units::{format_duration, format_size};

/// At most this much of stdout is kept (the tail); the result is its last
/// non-empty line.
pub const STDOUT_KEEP: usize = 1 << 20;
/// At most this much of stderr is kept (the tail).
pub const STDERR_KEEP: usize = 4 << 10;
/// At most this much of the stderr tail goes into [`Report::error`].
pub const ERROR_TAIL: usize = 2 << 10;
/// At most this many characters of a garbage result line are quoted.
const SHOWN_CHARS: usize = 200;
/// How long to keep reading stdout/stderr after the process group was
/// killed. Only matters when a descendant escaped the group (setsid) and
/// still holds the pipes open.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// Spawn retries on ETXTBSY (a program file that is still open for writing
/// in a concurrently forked process; transient).
const TXTBSY_RETRIES: u32 = 10;

/// Markers in stderr that mean an allocation failed (matched case-insensitively).
const ALLOC_FAILURE_MARKERS: [&str; 6] = [
    "memoryerror",
    "memory allocation of",
    "out of memory",
    "cannot allocate memory",
    "bad_alloc",
    "enomem",
];

/// Decides whether a failed attempt ran out of memory.
///
/// True when a cap was set, the attempt failed (non-zero exit or signal), and
/// either stderr shows an allocation failure (`MemoryError`, `memory
/// allocation of`, `out of memory`, `Cannot allocate memory`, `bad_alloc`,
/// `ENOMEM`, case-insensitive) or the peak RSS reached 90% of the cap.
/// `peak_rss` must be the task's own peak, 0 when unknown (see
/// [`task_peak`]): a figure that includes the worker's memory would make
/// every failure of a job capped below the worker's size a memory failure.
///
/// With `RLIMIT_DATA` the kernel does not kill the program: its allocations
/// fail and it usually dies with one of these messages (or aborts), which is
/// why the classification looks at stderr.
pub fn is_memory_exceeded(
    cap: Option<u64>,
    failed: bool,
    peak_rss: u64,
    stderr_tail: &str,
) -> bool {
    let Some(cap) = cap else { return false };
    if !failed {
        return false;
    }
    let lower = stderr_tail.to_ascii_lowercase();
    ALLOC_FAILURE_MARKERS.iter().any(|m| lower.contains(m))
        || u128::from(peak_rss) * 10 >= u128::from(cap) * 9
}

/// The task's own peak RSS from `wait4`'s `ru_maxrss` (bytes), given the
/// worker's resident anonymous memory around the spawn (what the forked
/// child copied): `ru_maxrss` when it rose above that by a margin (1 MiB or
/// an eighth of the worker's, whichever is larger), else 0 (unknown: the
/// task stayed under the copy of the worker that it started as, and the two
/// cannot be told apart).
pub fn task_peak(ru_maxrss: u64, worker_rss: u64) -> u64 {
    if ru_maxrss > worker_rss.saturating_add(fork_margin(worker_rss)) {
        ru_maxrss
    } else {
        0
    }
}

/// How far above the worker's RSS a `ru_maxrss` must be to be the task's:
/// the child also copies the pages the worker wrote in private file
/// mappings (data sections) and touches a few of its own before exec, and
/// the worker's RSS can move between the readings around the fork (other
/// attempts' buffers), so 1 MiB or an eighth of the worker's, whichever is
/// larger. Erring high only loses peaks that barely exceed the worker's.
fn fork_margin(worker_rss: u64) -> u64 {
    (1u64 << 20).max(worker_rss / 8)
}

/// This process's resident anonymous memory in bytes (`/proc/self/statm`:
/// resident minus file-backed and shared), 0 when unreadable. That is what
/// fork copies into the child's page tables and so into its `ru_maxrss`:
/// file mappings the worker never wrote to (its binary's code, debug info a
/// backtrace mapped) are not copied but faulted in on use.
fn own_rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let mut fields = statm.split_whitespace().skip(1).map(str::parse::<u64>);
    let (Some(Ok(resident)), Some(Ok(shared))) = (fields.next(), fields.next()) else {
        return 0;
    };
    // SAFETY: plain libc call.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    resident
        .saturating_sub(shared)
        .saturating_mul(u64::try_from(page).unwrap_or(4096))
}

/// Runs one attempt of `m` with `input` on stdin under `limits`.
///
/// Never panics and always returns a [`Report`]: spawn failures (missing
/// program, permission denied) are permanent failures; timeouts are
/// [`Outcome::TimedOut`]; hitting the memory cap is
/// [`Outcome::MemoryExceeded`]; exit code 65 is a permanent failure. When
/// `stop.graceful` fires (worker shutdown) the group gets SIGTERM, SIGKILL
/// after `limits.kill_grace`, and the report is a retryable failure with
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
    limits: &Limits,
    stop: impl Into<Stop>,
) -> Report {
    run_process_in(sandbox::current(), m, input, limits, stop).await
}

/// [`run_process`] under an explicit [`Sandbox`] (containment mode, process
/// cap, task user) instead of the worker-wide one.
pub async fn run_process_in(
    sb: &Sandbox,
    m: &Manifest,
    input: &TaskInput,
    limits: &Limits,
    stop: impl Into<Stop>,
) -> Report {
    let stop: Stop = stop.into();
    if stop.graceful.is_cancelled() || stop.now.is_cancelled() {
        let mut r = Report::failed(INTERRUPTED, false);
        r.stopped = true;
        return r;
    }
    let Some(program_name) = m.command.first() else {
        return Report::failed(
            format!("kind {:?} has an empty command in its manifest", m.kind),
            true,
        );
    };
    let program = match resolve_program(program_name, &m.dir, std::env::var_os("PATH")) {
        Ok(p) => p,
        Err(e) => return Report::failed(e, true),
    };
    let stdin_bytes = encode_input(input);
    // 0700, inside the worker's own directory (swept if the worker dies).
    let workdir = match sb.workdirs().create() {
        Ok(d) => d,
        Err(e) => {
            return Report::failed(
                format!("cannot create a working directory for the task: {e}"),
                false,
            );
        }
    };

    let user = match sb.lease_user() {
        Ok(u) => u,
        Err(e) => return Report::failed(e, false),
    };
    if let Some(u) = &user
        && let Err(e) = give_workdir(workdir.path(), u.uid, u.gid)
    {
        return Report::failed(
            format!("cannot hand the working directory to uid {}: {e}", u.uid),
            false,
        );
    }
    let cgroup = match sb.cgroups() {
        None => None,
        Some(c) => match c.create(&CgroupLimits {
            memory: limits.memory,
            pids: Some(sb.pids_max()),
        }) {
            Ok(a) => Some(a),
            Err(e) => {
                return Report::failed(format!("cannot create the attempt's cgroup: {e}"), false);
            }
        },
    };

    // From before the spawn until just before the reap, the lease guard may
    // kill the attempt if the worker cannot: by its cgroup from the start
    // (the child joins it before exec, so a stall between fork and the
    // registration of its pid is covered too), and by its process group
    // once the pid is known.
    let watched = stop.watchdog.as_ref().map(|w| {
        let procs: Vec<PathBuf> = cgroup
            .as_ref()
            .map(|c| {
                c.join_paths()
                    .iter()
                    .map(|p| PathBuf::from(std::ffi::OsStr::from_bytes(p.as_bytes())))
                    .collect()
            })
            .unwrap_or_default();
        w.arm(&procs)
    });

    let mut cmd = std::process::Command::new(&program);
    cmd.args(&m.command[1..])
        .env_clear()
        .current_dir(workdir.path())
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for name in &m.env {
        if let Some(value) = std::env::var_os(name) {
            cmd.env(name, value);
        }
    }
    let setup = ChildSetup {
        // In cgroup mode the cgroup is the cap (for all processes together).
        rlimit_data: if cgroup.is_none() {
            limits.memory
        } else {
            None
        },
        // RLIMIT_NPROC counts per uid and does not bind root.
        rlimit_nproc: (cgroup.is_none() && user.is_some()).then(|| sb.pids_max()),
        join: cgroup
            .as_ref()
            .map(|c| c.join_paths().to_vec())
            .unwrap_or_default(),
        ids: user.as_ref().map(|u| (u.uid, u.gid)),
        // SAFETY: plain syscall.
        parent: unsafe { libc::getpid() },
    };
    // SAFETY: the hook only calls async-signal-safe functions (open, write,
    // setgroups, setgid, setuid, umask, prctl, getppid, setrlimit, the
    // close_range syscall) and does not allocate.
    unsafe {
        cmd.pre_exec(move || child_setup(&setup));
    }

    // The worker's RSS around the fork bounds what the child copied of it
    // (see the module docs); read before and after, keep the larger.
    let rss_before = own_rss();
    let mut attempt = 0;
    let (start, mut child) = loop {
        let start = Instant::now();
        match cmd.spawn() {
            Ok(child) => break (start, child),
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && attempt < TXTBSY_RETRIES => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(10 * u64::from(attempt))).await;
            }
            Err(e) => {
                let _ = workdir.close();
                return Report::failed(
                    format!(
                        "cannot start task program {:?} ({}): {e}",
                        program_name,
                        program.display()
                    ),
                    spawn_error_is_permanent(&e),
                );
            }
        }
    };
    let worker_rss = rss_before.max(own_rss());
    let pid = child.id() as libc::pid_t;
    let mut guard = ChildGuard { pid, reaped: false };
    if let Some(w) = &watched {
        w.set_pid(pid);
    }

    // Pipes: stdin is written by its own task; stdout/stderr read into
    // bounded buffers. `readers_stop` ends the readers early (drain timeout,
    // drop).
    let readers_stop = CancellationToken::new();
    let _readers_stop_on_drop = readers_stop.clone().drop_guard();
    let stdin_task = AbortOnDrop(child.stdin.take().map(|s| {
        tokio::spawn(async move {
            if let Ok(mut s) = tokio::process::ChildStdin::from_std(s) {
                // BrokenPipe (the program closed stdin or exited) is fine.
                let _ = s.write_all(&stdin_bytes).await;
                let _ = s.shutdown().await;
            }
        })
    }));
    let stdout_task = child
        .stdout
        .take()
        .and_then(|s| tokio::process::ChildStdout::from_std(s).ok())
        .map(|s| tokio::spawn(read_tail(s, STDOUT_KEEP, readers_stop.clone())));
    let stderr_task = child
        .stderr
        .take()
        .and_then(|s| tokio::process::ChildStderr::from_std(s).ok())
        .map(|s| tokio::spawn(read_tail(s, STDERR_KEEP, readers_stop.clone())));
    // The std Child is only a pid now; dropping it neither waits nor kills.
    drop(child);

    // Wait for the exit, the deadline or a stop.
    let mut exited = pin!(wait_exit(pid));
    let mut exit_result = None;
    let mut ended_by = None;
    // Biased: a program that has already exited ended by itself, even if a
    // stop arrived at the same moment (it is then completed, not run again).
    tokio::select! {
        biased;
        r = &mut exited => exit_result = Some(r),
        _ = tokio::time::sleep(limits.timeout) => ended_by = Some(EndedBy::Timeout),
        _ = stop.graceful.cancelled() => ended_by = Some(EndedBy::Cancel),
        _ = stop.now.cancelled() => ended_by = Some(EndedBy::Kill),
    }
    let exit_result = match exit_result {
        Some(r) => r,
        None if ended_by == Some(EndedBy::Kill) => {
            signal_all(pid, cgroup.as_ref(), libc::SIGKILL);
            exited.await
        }
        None => {
            signal_all(pid, cgroup.as_ref(), libc::SIGTERM);
            // A stopped process would not act on SIGTERM until continued.
            signal_all(pid, cgroup.as_ref(), libc::SIGCONT);
            match tokio::time::timeout(limits.kill_grace, &mut exited).await {
                Ok(r) => r,
                Err(_) => {
                    signal_all(pid, cgroup.as_ref(), libc::SIGKILL);
                    exited.await
                }
            }
        }
    };
    let wall = start.elapsed();

    // Kill whatever is left of the group while the (zombie) leader still pins
    // the group id, and everything in the attempt's cgroup (descendants that
    // left the group too), then reap the leader.
    signal_group(pid, libc::SIGKILL);
    let cgroup = kill_cgroup(cgroup).await;
    if let Some(w) = watched {
        w.disarm();
    }
    let reaped = match exit_result {
        Ok(()) => reap_now(pid),
        Err(_) => {
            // Could not observe the exit; make sure it dies and reap blocking.
            // SAFETY: plain syscall; pid is our unreaped child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            match tokio::task::spawn_blocking(move || reap_now(pid)).await {
                Ok(r) => r,
                Err(e) => Err(io::Error::other(e.to_string())),
            }
        }
    };
    if reaped.is_ok() {
        guard.reaped = true;
    }

    // Collect output; bounded in time in case a descendant escaped the group.
    let stopper = AbortOnDrop(Some({
        let readers_stop = readers_stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(DRAIN_TIMEOUT).await;
            readers_stop.cancel();
        })
    }));
    let stdout = match stdout_task {
        Some(t) => t.await.unwrap_or_default(),
        None => Vec::new(),
    };
    let stderr = match stderr_task {
        Some(t) => t.await.unwrap_or_default(),
        None => Vec::new(),
    };
    drop(stopper);
    drop(stdin_task);
    let cgroup_stats = cgroup.as_ref().map(Attempt::stats);
    let _ = tokio::task::spawn_blocking(move || {
        if let Some(c) = cgroup {
            c.remove();
        }
        workdir.close()
    })
    .await;
    drop(user);

    let stderr_text = tail_text(&stderr, ERROR_TAIL);
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
    classify(Finished {
        ended_by,
        status,
        usage,
        wall,
        limits,
        stdout: &stdout,
        stderr_tail: &stderr_text,
        cgroup: cgroup_stats,
        pids_max: sb.pids_max(),
        worker_rss,
    })
}

/// Makes the (0700) working directory the task user's own.
fn give_workdir(dir: &Path, uid: u32, gid: u32) -> io::Result<()> {
    std::os::unix::fs::chown(dir, Some(uid), Some(gid))
}

/// SIGKILLs every process left in the attempt's cgroup and waits until it
/// is empty (on the blocking pool; the cgroup comes back for its stats).
async fn kill_cgroup(cgroup: Option<Attempt>) -> Option<Attempt> {
    let cgroup = cgroup?;
    tokio::task::spawn_blocking(move || {
        if let Err(e) = cgroup.kill_all() {
            tracing::warn!(error = %e, "processes of a finished attempt survived SIGKILL");
        }
        cgroup
    })
    .await
    .ok()
}

/// Sends `sig` to the process group and, in cgroup mode, to every process
/// of the attempt (those that called setsid are not in the group).
fn signal_all(pgid: libc::pid_t, cgroup: Option<&Attempt>, sig: libc::c_int) {
    signal_group(pgid, sig);
    if let Some(c) = cgroup {
        c.signal(sig);
    }
}

/// Why the runtime stopped the process (if it did).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EndedBy {
    Timeout,
    /// A graceful stop (worker shutdown).
    Cancel,
    /// A stop at once (the lease is gone).
    Kill,
}

/// How the main process ended, decoded from the wait status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Exited(i32),
    Signaled(i32),
}

/// Resource usage from wait4.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Usage {
    cpu_user_ms: u64,
    cpu_sys_ms: u64,
    peak_rss_bytes: u64,
}

struct Finished<'a> {
    ended_by: Option<EndedBy>,
    status: Status,
    usage: Usage,
    wall: Duration,
    limits: &'a Limits,
    stdout: &'a [u8],
    stderr_tail: &'a str,
    /// What the attempt's cgroup recorded (cgroup mode only).
    cgroup: Option<CgroupStats>,
    pids_max: u64,
    /// The worker's RSS at spawn (see [`task_peak`]).
    worker_rss: u64,
}

/// Turns what was observed into a [`Report`] (pure).
fn classify(f: Finished<'_>) -> Report {
    let (exit_code, signal) = match f.status {
        Status::Exited(c) => (Some(c), None),
        Status::Signaled(s) => (None, Some(s)),
    };
    let result = parse_result(f.stdout);
    let (output, usage, garbage) = match result {
        Ok((o, u)) => (o, u, None),
        Err(e) => (None, TaskUsage::default(), Some(e)),
    };
    let with_tail = |summary: String| {
        if f.stderr_tail.is_empty() {
            summary
        } else {
            format!("{summary}\nstderr:\n{}", f.stderr_tail)
        }
    };
    let failed = f.status != Status::Exited(0);
    // The cgroup's peak covers every process of the attempt and nothing
    // else; ru_maxrss also holds the worker's RSS copied at fork.
    let peak = f
        .cgroup
        .and_then(|c| c.peak_memory)
        .unwrap_or_else(|| task_peak(f.usage.peak_rss_bytes, f.worker_rss));
    let out_of_memory = match f.cgroup {
        Some(c) => failed && c.oom_kills > 0,
        None => is_memory_exceeded(f.limits.memory, failed, peak, f.stderr_tail),
    };
    let (outcome, permanent, error) = match f.ended_by {
        Some(EndedBy::Cancel) => (Outcome::Failed, false, Some(INTERRUPTED.to_string())),
        Some(EndedBy::Kill) => (Outcome::Failed, false, Some(KILLED.to_string())),
        Some(EndedBy::Timeout) => (
            Outcome::TimedOut,
            false,
            Some(with_tail(format!(
                "timed out after {}",
                format_duration(f.limits.timeout)
            ))),
        ),
        None if !failed => match garbage {
            None => (Outcome::Succeeded, false, None),
            Some(g) => (Outcome::Failed, false, Some(with_tail(g))),
        },
        None if exit_code == Some(EXIT_PERMANENT) => (
            Outcome::Failed,
            true,
            Some(with_tail(format!(
                "task program failed permanently (exit code {EXIT_PERMANENT})"
            ))),
        ),
        None if out_of_memory => (
            Outcome::MemoryExceeded,
            false,
            Some(with_tail(match f.cgroup {
                Some(c) => format!(
                    "memory cap {} exceeded ({}, peak {}, {} process(es) killed by the kernel's OOM killer)",
                    format_size(f.limits.memory.unwrap_or(0)),
                    describe_status(f.status),
                    format_size(peak),
                    c.oom_kills
                ),
                None if peak == 0 => format!(
                    "memory cap {} exceeded ({})",
                    format_size(f.limits.memory.unwrap_or(0)),
                    describe_status(f.status),
                ),
                None => format!(
                    "memory cap {} exceeded ({}, peak RSS {})",
                    format_size(f.limits.memory.unwrap_or(0)),
                    describe_status(f.status),
                    format_size(peak)
                ),
            })),
        ),
        None => (
            Outcome::Failed,
            false,
            Some(with_tail(format!(
                "task program {}",
                describe_status(f.status)
            ))),
        ),
    };
    let error = match (error, f.cgroup) {
        (Some(e), Some(c)) if c.pids_refused > 0 => {
            Some(with_process_cap_note(&e, f.pids_max, c.pids_refused))
        }
        (e, _) => e,
    };
    Report {
        outcome,
        permanent,
        exit_code,
        signal,
        wall_ms: millis(f.wall),
        cpu_user_ms: f.usage.cpu_user_ms,
        cpu_sys_ms: f.usage.cpu_sys_ms,
        peak_rss_bytes: peak,
        output,
        usage,
        // Already clean piece by piece; this pass also bounds the whole.
        error: error.as_deref().map(clean_error),
        stopped: matches!(f.ended_by, Some(EndedBy::Cancel | EndedBy::Kill)),
    }
}

/// Appends "process cap N reached" to the summary (first line) of `error`.
fn with_process_cap_note(error: &str, cap: u64, refused: u64) -> String {
    let (summary, rest) = match error.split_once('\n') {
        Some((s, r)) => (s, Some(r)),
        None => (error, None),
    };
    let mut out = format!("{summary}; process cap {cap} reached ({refused} fork(s) refused)");
    if let Some(r) = rest {
        out.push('\n');
        out.push_str(r);
    }
    out
}

fn describe_status(s: Status) -> String {
    match s {
        Status::Exited(c) => format!("exited with code {c}"),
        Status::Signaled(sig) => match signal_name(sig) {
            Some(name) => format!("was killed by signal {sig} ({name})"),
            None => format!("was killed by signal {sig}"),
        },
    }
}

fn signal_name(sig: i32) -> Option<&'static str> {
    Some(match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        _ => return None,
    })
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Parses a task program's stdout as the runtime does (DESIGN.md, "Task
/// program contract"): the last non-empty line must be a JSON object with
/// optional `output` and `usage` keys; empty stdout is a valid empty result.
/// Returns the `output` value and the reported usage, or the one-line error
/// text an attempt that printed garbage fails with. Never panics on any
/// input (it is fuzzed: `fuzz/fuzz_targets/task_output.rs`).
pub fn parse_task_output(stdout: &[u8]) -> Result<(Option<serde_json::Value>, TaskUsage), String> {
    parse_result(stdout)
}

/// A JSON value read as plain JSON, for untrusted text (task output, API
/// payloads). With serde_json's `raw_value` feature (on in this crate),
/// `serde_json::Value`'s own parser takes an object whose first key is
/// `$serde_json::private::RawValue` for an embedded raw value: it reads
/// `{"$serde_json::private::RawValue": "[1]"}` as `[1]`, and refuses the
/// object when that string is not JSON. Here every object stays an object.
pub(crate) struct PlainJson(pub(crate) serde_json::Value);

impl<'de> serde::Deserialize<'de> for PlainJson {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(PlainVisitor).map(PlainJson)
    }
}

struct PlainVisitor;

impl<'de> serde::de::Visitor<'de> for PlainVisitor {
    type Value = serde_json::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, Into::into))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }
    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(PlainVisitor)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
        let mut v = Vec::new();
        while let Some(PlainJson(x)) = a.next_element()? {
            v.push(x);
        }
        Ok(serde_json::Value::Array(v))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
        let mut m = serde_json::Map::new();
        while let Some((k, PlainJson(v))) = a.next_entry::<String, PlainJson>()? {
            m.insert(k, v);
        }
        Ok(serde_json::Value::Object(m))
    }
}

/// Parses the result line: the last non-empty line of stdout must be a JSON
/// object with optional `output` and `usage` keys. Empty stdout is a valid
/// empty result. Returns the error text for garbage.
fn parse_result(stdout: &[u8]) -> Result<(Option<serde_json::Value>, TaskUsage), String> {
    let text = String::from_utf8_lossy(stdout);
    let Some(line) = text.lines().map(str::trim).rev().find(|l| !l.is_empty()) else {
        return Ok((None, TaskUsage::default()));
    };
    let garbage = || {
        let shown: String = line.chars().take(SHOWN_CHARS).collect();
        // A character takes at most 4 bytes, cleaned too (U+FFFD takes 3).
        format!(
            "task program printed a result that is not a JSON object: {}",
            crate::text::clean(&shown, 4 * SHOWN_CHARS)
        )
    };
    let PlainJson(value) = serde_json::from_str(line).map_err(|_| garbage())?;
    let serde_json::Value::Object(mut obj) = value else {
        return Err(garbage());
    };
    let output = match obj.remove("output") {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => Some(v),
    };
    let usage = match obj.get("usage") {
        None | Some(serde_json::Value::Null) => TaskUsage::default(),
        Some(serde_json::Value::Object(u)) => {
            let field = |key: &str| -> Result<u64, String> {
                match u.get(key) {
                    None | Some(serde_json::Value::Null) => Ok(0),
                    Some(v) => v.as_u64().ok_or_else(|| {
                        let shown: String = v.to_string().chars().take(50).collect();
                        format!(
                            "task program printed a result with invalid usage: usage.{key} must be a non-negative integer, got {shown}"
                        )
                    }),
                }
            };
            TaskUsage {
                api_calls: field("api_calls")?,
                input_tokens: field("input_tokens")?,
                output_tokens: field("output_tokens")?,
            }
        }
        Some(_) => {
            return Err(
                "task program printed a result with invalid usage: usage must be an object like {\"api_calls\": 1, \"input_tokens\": 10, \"output_tokens\": 5}"
                    .to_string(),
            );
        }
    };
    Ok((output, usage))
}

/// The end of `bytes` (task output) as trimmed, clean text of at most `max`
/// bytes: invalid UTF-8 and control characters (but newline and tab) become
/// U+FFFD (see [`crate::text::clean_tail`]).
fn tail_text(bytes: &[u8], max: usize) -> String {
    crate::text::clean_tail(bytes, max).trim().to_string()
}

/// The job as one JSON line: `{"id","tenant","queue","kind","attempt","payload"}`.
/// The payload is passed through verbatim except that insignificant
/// whitespace is removed, so the object always fits on one line.
fn encode_input(input: &TaskInput) -> Vec<u8> {
    #[derive(Serialize)]
    struct Wire<'a> {
        id: &'a str,
        tenant: &'a str,
        queue: &'a str,
        kind: &'a str,
        attempt: u32,
        payload: &'a RawValue,
    }
    let compacted = RawValue::from_string(compact_json(input.payload.get())).ok();
    let payload: &RawValue = compacted.as_deref().unwrap_or(&input.payload);
    let wire = Wire {
        id: &input.id,
        tenant: &input.tenant,
        queue: &input.queue,
        kind: &input.kind,
        attempt: input.attempt,
        payload,
    };
    let mut out = serde_json::to_vec(&wire).unwrap_or_else(|_| b"{}".to_vec());
    out.push(b'\n');
    out
}

/// Removes whitespace outside strings from (valid) JSON text.
fn compact_json(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut in_string = false;
    let mut escaped = false;
    for c in s.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !matches!(c, ' ' | '\t' | '\n' | '\r') {
            out.push(c);
        }
    }
    out
}

/// Finds the program: absolute as is; containing a `/`: relative to the
/// kind's folder; a bare name: searched on the worker's `PATH`.
fn resolve_program(name: &str, dir: &Path, path_var: Option<OsString>) -> Result<PathBuf, String> {
    let p = Path::new(name);
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    if name.contains('/') {
        let base = if dir.is_absolute() {
            dir.to_path_buf()
        } else {
            std::env::current_dir()
                .map_err(|e| format!("cannot resolve {name:?}: current directory: {e}"))?
                .join(dir)
        };
        return Ok(base.join(p));
    }
    if let Some(path_var) = path_var {
        for d in std::env::split_paths(&path_var) {
            let candidate = d.join(p);
            if is_executable_file(&candidate) {
                return Ok(if candidate.is_absolute() {
                    candidate
                } else {
                    std::env::current_dir()
                        .map(|c| c.join(&candidate))
                        .unwrap_or(candidate)
                });
            }
        }
    }
    Err(format!(
        "cannot start task program {name:?}: not found on the worker's PATH (write an absolute path or ./name relative to the kind's folder)"
    ))
}

fn is_executable_file(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Spawn errors that retrying cannot fix.
fn spawn_error_is_permanent(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied
    ) || matches!(
        e.raw_os_error(),
        Some(
            libc::ENOEXEC
                | libc::ENOTDIR
                | libc::ELOOP
                | libc::ENAMETOOLONG
                | libc::EISDIR
                | libc::E2BIG
        )
    )
}

/// What the child does between fork and exec (built before the fork: no
/// allocation happens in the child).
struct ChildSetup {
    /// `RLIMIT_DATA` (rlimit mode).
    rlimit_data: Option<u64>,
    /// `RLIMIT_NPROC` (rlimit mode with a task user).
    rlimit_nproc: Option<u64>,
    /// `cgroup.procs` files to join (cgroup mode).
    join: Vec<CString>,
    /// uid and gid to switch to.
    ids: Option<(u32, u32)>,
    /// The worker's pid, to notice a worker that died before PDEATHSIG was set.
    parent: libc::pid_t,
}

/// Runs in the child between fork and exec: async-signal-safe calls only.
fn child_setup(s: &ChildSetup) -> io::Result<()> {
    // Join the attempt's cgroups first, while still privileged, so every
    // process the program starts is inside.
    join_self(&s.join)?;
    if let Some((uid, gid)) = s.ids {
        // SAFETY: plain syscalls with integer arguments (null list for
        // setgroups with size 0).
        unsafe {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(gid as libc::gid_t) != 0
                || libc::setuid(uid as libc::uid_t) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // Files the task creates (in /tmp, say) are its own by default.
            libc::umask(0o077);
        }
    }
    // Die with the worker: if the worker is SIGKILLed, its lease expires and
    // the job runs elsewhere, so a surviving orphan would break the tenant's
    // fleet-wide concurrency cap. PDEATHSIG fires when the spawning thread
    // exits; spawns happen on tokio's long-lived runtime threads. If the
    // worker already died before prctl, getppid() no longer matches. Set
    // after setuid, which clears it.
    // SAFETY: plain syscalls with integer arguments.
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::getppid() != s.parent {
            libc::_exit(137);
        }
    }
    if let Some(cap) = s.rlimit_data {
        // RLIMIT_DATA rather than RLIMIT_AS: since Linux 4.7 RLIMIT_DATA
        // counts private writable mappings (heap, anonymous mmap, i.e. the
        // memory a program actually allocates) but not PROT_NONE
        // reservations, shared file mappings or thread stacks. Runtimes such
        // as Go, the JVM, V8/Node and anything using jemalloc or large
        // guard regions reserve gigabytes of address space up front and
        // would fail to even start under an RLIMIT_AS of a few hundred MiB.
        set_rlimit(libc::RLIMIT_DATA, cap)?;
    }
    if let Some(n) = s.rlimit_nproc {
        set_rlimit(libc::RLIMIT_NPROC, n)?;
    }
    // No inherited descriptors beyond 0/1/2: mark everything else
    // close-on-exec (not closed outright: std reports exec failures through
    // its own CLOEXEC pipe, which must stay open until exec). Needs Linux
    // 5.11; on older kernels std's and tokio's descriptors are already
    // CLOEXEC, so failure is ignored.
    // SAFETY: plain syscall with integer arguments.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3 as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        );
    }
    Ok(())
}

fn set_rlimit(resource: libc::__rlimit_resource_t, value: u64) -> io::Result<()> {
    let rl = libc::rlimit {
        rlim_cur: value as libc::rlim_t,
        rlim_max: value as libc::rlim_t,
    };
    // SAFETY: plain syscall with a valid pointer.
    if unsafe { libc::setrlimit(resource, &rl) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sends `sig` to the process group `pgid`; ESRCH (nothing left) is fine.
fn signal_group(pgid: libc::pid_t, sig: libc::c_int) {
    // SAFETY: plain syscall.
    unsafe {
        libc::killpg(pgid, sig);
    }
}

/// Waits until `pid` (our child) has exited, without reaping it.
async fn wait_exit(pid: libc::pid_t) -> io::Result<()> {
    match pidfd_open(pid) {
        // SAFETY: the OwnedFd is a valid open descriptor owned by the AsyncFd
        // for its whole lifetime.
        Ok(fd) => match unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) } {
            Ok(afd) => loop {
                let mut ready = afd.readable().await?;
                if has_exited(pid)? {
                    return Ok(());
                }
                ready.clear_ready();
            },
            Err(_) => wait_exit_blocking(pid).await,
        },
        Err(_) => wait_exit_blocking(pid).await,
    }
}

async fn wait_exit_blocking(pid: libc::pid_t) -> io::Result<()> {
    tokio::task::spawn_blocking(move || {
        loop {
            // SAFETY: zeroed siginfo_t is a valid out-parameter.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: valid pointer; pid is our child.
            let r = unsafe {
                libc::waitid(
                    libc::P_PID,
                    pid as libc::id_t,
                    &mut info,
                    libc::WEXITED | libc::WNOWAIT,
                )
            };
            if r == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    })
    .await
    .map_err(|e| io::Error::other(e.to_string()))?
}

fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // pidfd_open sets O_CLOEXEC itself.
    // SAFETY: the syscall returned a new descriptor that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Non-blocking: has our child `pid` exited (not yet reaped)?
fn has_exited(pid: libc::pid_t) -> io::Result<bool> {
    loop {
        // SAFETY: zeroed siginfo_t is a valid out-parameter.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointer; pid is our child.
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        if r == 0 {
            // SAFETY: waitid filled in info (si_pid is 0 when nothing exited).
            return Ok(unsafe { info.si_pid() } != 0);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Reaps `pid` with wait4 (blocking until it exits) and decodes status and
/// rusage.
fn reap_now(pid: libc::pid_t) -> io::Result<(Status, Usage)> {
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: zeroed rusage is a valid out-parameter.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointers; pid is our child.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
        if r == pid {
            let st = if libc::WIFSIGNALED(status) {
                Status::Signaled(libc::WTERMSIG(status))
            } else {
                Status::Exited(libc::WEXITSTATUS(status))
            };
            let ms = |tv: libc::timeval| -> u64 {
                (tv.tv_sec.max(0) as u64) * 1000 + (tv.tv_usec.max(0) as u64) / 1000
            };
            let usage = Usage {
                cpu_user_ms: ms(ru.ru_utime),
                cpu_sys_ms: ms(ru.ru_stime),
                // ru_maxrss is in KiB on Linux.
                peak_rss_bytes: (ru.ru_maxrss.max(0) as u64).saturating_mul(1024),
            };
            return Ok((st, usage));
        }
        let e = io::Error::last_os_error();
        if r < 0 && e.kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return Err(if r < 0 {
            e
        } else {
            io::Error::other("wait4 returned an unexpected pid")
        });
    }
}

/// Reads `r` to the end (or until `stop`), keeping only the last `keep` bytes.
async fn read_tail<R: AsyncRead + Unpin>(
    mut r: R,
    keep: usize,
    stop: CancellationToken,
) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        let n = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            res = r.read(&mut chunk) => match res {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            },
        };
        buf.extend_from_slice(&chunk[..n]);
        // Amortized trimming: let the buffer grow to 2x before cutting.
        if buf.len() > keep * 2 {
            buf.drain(..buf.len() - keep);
        }
    }
    if buf.len() > keep {
        buf.drain(..buf.len() - keep);
    }
    buf
}

/// Kills and reaps the child if `run_process` is dropped before it did.
struct ChildGuard {
    pid: libc::pid_t,
    reaped: bool,
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.reaped {
            return;
        }
        let pid = self.pid;
        signal_group(pid, libc::SIGKILL);
        // SAFETY: plain syscall; pid is our unreaped child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let _ = std::thread::Builder::new()
            .name("agentq-reap".into())
            .spawn(move || {
                let _ = reap_now(pid);
            });
    }
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(h) = &self.0 {
            h.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_classification() {
        let mib = 1 << 20;
        // No cap or not failed: never.
        assert!(!is_memory_exceeded(None, true, 10 * mib, "MemoryError"));
        assert!(!is_memory_exceeded(
            Some(64 * mib),
            false,
            64 * mib,
            "MemoryError"
        ));
        // Markers, case-insensitive.
        for s in [
            "Traceback...\nMemoryError",
            "memory allocation of 1048576 bytes failed",
            "fatal: Out of memory",
            "mmap: Cannot allocate memory",
            "terminate called after throwing an instance of 'std::bad_alloc'",
            "error: enomem",
        ] {
            assert!(is_memory_exceeded(Some(64 * mib), true, mib, s), "{s}");
        }
        // Peak RSS at >= 90% of the cap.
        assert!(is_memory_exceeded(Some(100 * mib), true, 90 * mib, ""));
        assert!(!is_memory_exceeded(
            Some(100 * mib),
            true,
            89 * mib,
            "segfault"
        ));
        assert!(is_memory_exceeded(Some(u64::MAX), true, u64::MAX, ""));
    }

    #[test]
    fn only_a_peak_above_the_worker_is_the_tasks() {
        let mib = 1 << 20;
        // At or near the worker's RSS: the copy made at fork, unknown.
        assert_eq!(task_peak(100 * mib, 100 * mib), 0);
        assert_eq!(task_peak(110 * mib, 100 * mib), 0);
        assert_eq!(task_peak(50 * mib, 100 * mib), 0);
        // Clearly above it: the task's own.
        assert_eq!(task_peak(200 * mib, 100 * mib), 200 * mib);
        // A small worker: at least 1 MiB of margin.
        assert_eq!(task_peak(4 * mib, 3 * mib + mib / 2), 0);
        assert_eq!(task_peak(8 * mib, 3 * mib), 8 * mib);
        // Unknown worker RSS (0): ru_maxrss above the margin is taken.
        assert_eq!(task_peak(2 * mib, 0), 2 * mib);
        assert_eq!(task_peak(u64::MAX, u64::MAX), 0);
        // Not a memory failure when the only evidence was the worker's RSS.
        let worker = 96 * mib;
        assert!(!is_memory_exceeded(
            Some(32 * mib),
            true,
            task_peak(worker, worker),
            ""
        ));
        assert!(own_rss() > 0);
    }

    #[test]
    fn result_line() {
        assert_eq!(parse_result(b"").unwrap(), (None, TaskUsage::default()));
        assert_eq!(
            parse_result(b"\n  \n").unwrap(),
            (None, TaskUsage::default())
        );
        let (o, u) = parse_result(
            b"log line\n{\"output\": {\"a\": 1}, \"usage\": {\"api_calls\": 2, \"input_tokens\": 3}}\n\n",
        )
        .unwrap();
        assert_eq!(o, Some(serde_json::json!({"a": 1})));
        assert_eq!(
            u,
            TaskUsage {
                api_calls: 2,
                input_tokens: 3,
                output_tokens: 0
            }
        );
        assert_eq!(parse_result(b"{}").unwrap(), (None, TaskUsage::default()));
        for bad in [
            &b"not json"[..],
            b"[1,2]",
            b"42",
            b"{\"usage\": {\"api_calls\": -1}}",
            b"{\"usage\": {\"api_calls\": 1.5}}",
            b"{\"usage\": 3}",
            b"{\"output\": 1}\ntrailing",
        ] {
            assert!(
                parse_result(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        // Found by `fuzz/` (target `task_output`): serde_json's Value parser
        // (feature raw_value) took this key for an embedded raw value and
        // refused, or rewrote, a valid result object.
        let magic = "$serde_json::private::RawValue";
        let line = format!(r#"{{"{magic}":"ignored","output":{{"{magic}":"[1]"}}}}"#);
        assert_eq!(
            parse_result(line.as_bytes()).unwrap(),
            (
                Some(serde_json::json!({ magic: "[1]" })),
                TaskUsage::default()
            )
        );
        // Quoted garbage is clean text: no NUL, escape or invalid UTF-8.
        let e = parse_result(b"x\0y\x1b[2J\xff z").unwrap_err();
        assert!(e.ends_with(": x\u{FFFD}y\u{FFFD}[2J\u{FFFD} z"), "{e:?}");
        let e = parse_result(b"hello").unwrap_err();
        assert_eq!(
            e,
            "task program printed a result that is not a JSON object: hello"
        );
    }

    proptest::proptest! {
        #[test]
        fn task_output_never_panics(stdout in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048)) {
            if let Err(e) = parse_task_output(&stdout) {
                proptest::prop_assert!(!e.contains('\n'), "{e:?}");
                proptest::prop_assert!(crate::text::is_clean(&e, usize::MAX), "{e:?}");
            }
        }

        #[test]
        fn task_output_jsonish_never_panics(
            lines in proptest::collection::vec(r#"[ {}\[\]":,0-9a-z_.\\-]{0,40}"#, 0..5),
        ) {
            let stdout = lines.join("\n");
            match parse_task_output(stdout.as_bytes()) {
                Err(e) => proptest::prop_assert!(!e.contains('\n'), "{e:?}"),
                Ok((output, _)) => proptest::prop_assert_ne!(output, Some(serde_json::Value::Null)),
            }
        }

        /// A result line as task programs write it, after log lines and
        /// before trailing blank lines, reads back exactly.
        #[test]
        fn result_lines_round_trip(
            log in proptest::collection::vec("[^\n]{0,60}", 0..4),
            output in proptest::option::of(proptest::prelude::any::<(String, i64, bool)>()),
            usage in proptest::option::of(proptest::prelude::any::<[Option<u64>; 3]>()),
            trailing in "[ \t\r\n]{0,6}",
        ) {
            let mut obj = serde_json::Map::new();
            let want_output = output.map(|(s, n, b)| serde_json::json!({"s": s, "n": n, "b": b}));
            if let Some(o) = &want_output {
                obj.insert("output".into(), o.clone());
            }
            let mut want = TaskUsage::default();
            if let Some([a, i, o]) = usage {
                let mut u = serde_json::Map::new();
                for (k, v, slot) in [
                    ("api_calls", a, &mut want.api_calls),
                    ("input_tokens", i, &mut want.input_tokens),
                    ("output_tokens", o, &mut want.output_tokens),
                ] {
                    if let Some(v) = v {
                        u.insert(k.into(), v.into());
                        *slot = v;
                    }
                }
                obj.insert("usage".into(), serde_json::Value::Object(u));
            }
            let mut stdout = log.join("\n");
            stdout.push('\n');
            stdout.push_str(&serde_json::Value::Object(obj).to_string());
            stdout.push_str(&trailing);
            let got = parse_task_output(stdout.as_bytes());
            proptest::prop_assert_eq!(got, Ok((want_output, want)), "{:?}", stdout);
        }
    }

    #[test]
    fn compacting_keeps_strings() {
        assert_eq!(
            compact_json("{ \"a b\" : [1,\n 2],\r\n\t\"c\\\" d\": \" x \" }"),
            "{\"a b\":[1,2],\"c\\\" d\":\" x \"}"
        );
        let input = TaskInput {
            id: "1".into(),
            tenant: "t".into(),
            queue: "q".into(),
            kind: "k".into(),
            attempt: 1,
            payload: RawValue::from_string("{\n \"x\": \"a\\nb\"\n}".into()).unwrap(),
        };
        let line = encode_input(&input);
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        assert!(line.ends_with(b"}\n"));
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["payload"]["x"], "a\nb");
    }

    #[test]
    fn program_resolution() {
        let dir = Path::new("/w/k");
        assert_eq!(
            resolve_program("./run", dir, None).unwrap(),
            Path::new("/w/k/./run")
        );
        assert_eq!(
            resolve_program("/bin/sh", dir, None).unwrap(),
            Path::new("/bin/sh")
        );
        assert!(resolve_program("sh", dir, Some("/usr/bin:/bin".into())).is_ok());
        let e = resolve_program("no-such-prog-xyz", dir, Some("/usr/bin".into())).unwrap_err();
        assert!(e.contains("no-such-prog-xyz"), "{e}");
    }

    #[test]
    fn tails_are_bounded() {
        let t = tail_text(&[b'a'; 10_000], ERROR_TAIL);
        assert_eq!(t.len(), ERROR_TAIL);
    }

    #[tokio::test]
    async fn read_tail_keeps_the_end() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let out = read_tail(&data[..], STDOUT_KEEP, CancellationToken::new()).await;
        assert_eq!(out.len(), STDOUT_KEEP);
        assert_eq!(&out[..], &data[data.len() - STDOUT_KEEP..]);
    }
}
