//! What an ended attempt was: success, failure, timeout, memory cap, or a
//! stop by the runtime, with a clean one-line summary and the stderr tail
//! ([`classify`], pure). Memory failures in rlimit mode are read from the
//! stderr markers and from a peak that is the task's own (see
//! [`task_peak`]).

use std::time::Duration;

use crate::executor::Caps;
use crate::executor::cgroup::CgroupStats;
use crate::executor::protocol::parse_result;
use crate::model::attempt::{
    EXIT_PERMANENT, INTERRUPTED, KILLED, Outcome, Report, TaskUsage, clean_error,
};
use crate::model::units::{format_duration, format_size};

use super::wait::{Status, Usage};

/// At most this much of the stderr tail goes into [`Report::error`].
pub const ERROR_TAIL: usize = 2 << 10;

/// Markers in stderr that mean an allocation failed (matched case-insensitively).
pub(super) const ALLOC_FAILURE_MARKERS: [&str; 6] = [
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
pub(super) fn fork_margin(worker_rss: u64) -> u64 {
    (1u64 << 20).max(worker_rss / 8)
}

/// Why the runtime stopped the process (if it did).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum EndedBy {
    Timeout,
    /// A graceful stop (worker shutdown).
    Cancel,
    /// A stop at once (the lease is gone).
    Kill,
}

pub(super) struct Observed<'a> {
    pub(super) ended_by: Option<EndedBy>,
    pub(super) status: Status,
    pub(super) usage: Usage,
    pub(super) wall: Duration,
    pub(super) caps: &'a Caps,
    pub(super) stdout: &'a [u8],
    pub(super) stderr_tail: &'a str,
    /// What the attempt's cgroup recorded (cgroup mode only).
    pub(super) cgroup: Option<CgroupStats>,
    pub(super) pids_max: u64,
    /// The worker's RSS at spawn (see [`task_peak`]).
    pub(super) worker_rss: u64,
}

/// Turns what was observed into a [`Report`] (pure).
pub(super) fn classify(f: Observed<'_>) -> Report {
    let (exit_code, signal) = match f.status {
        Status::Exited(c) => (Some(c), None),
        Status::Signaled(s) => (None, Some(s)),
    };
    let result = parse_result(f.stdout);
    let (output, usage, garbage) = match result {
        Ok(r) => (r.output, r.usage, None),
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
        None => is_memory_exceeded(f.caps.memory, failed, peak, f.stderr_tail),
    };
    let (outcome, permanent, error) = match f.ended_by {
        Some(EndedBy::Cancel) => (Outcome::Failed, false, Some(INTERRUPTED.to_string())),
        Some(EndedBy::Kill) => (Outcome::Failed, false, Some(KILLED.to_string())),
        Some(EndedBy::Timeout) => (
            Outcome::TimedOut,
            false,
            Some(with_tail(format!(
                "timed out after {}",
                format_duration(f.caps.timeout)
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
                    format_size(f.caps.memory.unwrap_or(0)),
                    describe_status(f.status),
                    format_size(peak),
                    c.oom_kills
                ),
                None if peak == 0 => format!(
                    "memory cap {} exceeded ({})",
                    format_size(f.caps.memory.unwrap_or(0)),
                    describe_status(f.status),
                ),
                None => format!(
                    "memory cap {} exceeded ({}, peak RSS {})",
                    format_size(f.caps.memory.unwrap_or(0)),
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
pub(super) fn with_process_cap_note(error: &str, cap: u64, refused: u64) -> String {
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

pub(super) fn describe_status(s: Status) -> String {
    match s {
        Status::Exited(c) => format!("exited with code {c}"),
        Status::Signaled(sig) => match signal_name(sig) {
            Some(name) => format!("was killed by signal {sig} ({name})"),
            None => format!("was killed by signal {sig}"),
        },
    }
}

pub(super) fn signal_name(sig: i32) -> Option<&'static str> {
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

pub(super) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::super::spawn::own_rss;
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
}
