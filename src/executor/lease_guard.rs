//! The lease guard: a small process beside each worker that kills a task
//! whose lease the worker has stopped renewing, even while the worker itself
//! cannot act.
//!
//! A lease promises that once it lapses the job may run elsewhere. A worker
//! that is stopped (SIGSTOP, a frozen VM thread, a debugger) or cut off from
//! Redis cannot stop its own task processes in time: they go on running
//! while the reaper hands the job to another worker, and the job runs twice
//! at once, past its tenant's cap. So each worker starts one guard process
//! (`agentq __lease-guard`, in its own session so a stop aimed at the
//! worker's process group does not reach it) and tells it, over a pipe, each
//! task's process group and the local deadline of its lease; the worker
//! moves the deadline on after every successful renewal. When a deadline
//! passes, the guard SIGKILLs the task's process group (and every process of
//! its cgroup). Deadlines are on `CLOCK_MONOTONIC`, which both processes
//! share, and are set short of the lease Redis holds (see
//! [`local_deadline`]), so the task is dead before the reaper can give its
//! job to anyone else.
//!
//! Protocol (one line each, on the guard's stdin):
//! `arm <key> <pid> <starttime> <deadline_ns> [<cgroup.procs path>...]`
//! (pid 0: not started yet; the cgroup is armed before the spawn),
//! `pid <key> <pid> <starttime>`, `renew <key> <deadline_ns>`,
//! `disarm <key>`. Keys are `<job id>/<attempt>`.
//! The guard checks a process's start time before killing it (a pid the
//! kernel reused is left alone). When the worker dies its end of the pipe
//! closes: the guard kills what is still armed and exits.

use std::collections::HashMap;
use std::io::{self, BufRead, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

/// The hidden `agentq` subcommand that runs [`run_guard`].
pub const SUBCOMMAND: &str = "__lease-guard";

/// Nanoseconds on `CLOCK_MONOTONIC` (the same clock in every process).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec.max(0) as u64) * 1_000_000_000 + ts.tv_nsec.max(0) as u64
}

/// The local deadline of a lease of `lease` asked for at `sent_ns`: Redis
/// counts the lease from when it ran the call, which is no earlier, so a
/// tenth short of the lease (and never less than the lease minus 1 s) is
/// safely before Redis can let the job go.
pub fn local_deadline(sent_ns: u64, lease: Duration) -> u64 {
    let lease_ns = lease.as_nanos().min(u128::from(u64::MAX)) as u64;
    let margin = (lease_ns / 10).min(1_000_000_000);
    sent_ns.saturating_add(lease_ns - margin)
}

/// The worker's handle on its guard process.
pub struct LeaseGuard {
    stdin: Mutex<Option<ChildStdin>>,
    child: Mutex<Child>,
}

impl LeaseGuard {
    /// Start the guard: `program __lease-guard` (program is the agentq
    /// binary), in its own session, with a non-blocking pipe on its stdin so
    /// a stopped guard can never stall the worker.
    pub fn spawn(program: &Path) -> io::Result<LeaseGuard> {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(program);
        cmd.arg(SUBCOMMAND)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .env_clear();
        // SAFETY: setsid is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let mut child = cmd.spawn()?;
        let stdin = child.stdin.take();
        if let Some(s) = &stdin {
            // SAFETY: fcntl on a descriptor we own.
            unsafe {
                let fd = s.as_raw_fd();
                let flags = libc::fcntl(fd, libc::F_GETFL);
                libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
            }
        }
        Ok(LeaseGuard {
            stdin: Mutex::new(stdin),
            child: Mutex::new(child),
        })
    }

    /// Watch task `pid` (a process group leader) of attempt `key` until
    /// `deadline_ns`; `cgroup_procs` lists its cgroup's `cgroup.procs` files.
    pub fn arm(&self, key: &str, pid: libc::pid_t, deadline_ns: u64, cgroup_procs: &[PathBuf]) {
        let start = if pid > 0 {
            start_time(pid).unwrap_or(0)
        } else {
            0
        };
        let mut line = format!("arm {key} {pid} {start} {deadline_ns}");
        for p in cgroup_procs {
            line.push(' ');
            line.push_str(&p.display().to_string());
        }
        self.send(&line);
    }

    /// Attempt `key`'s process started as `pid` (its process group leader).
    pub fn set_pid(&self, key: &str, pid: libc::pid_t) {
        let start = start_time(pid).unwrap_or(0);
        self.send(&format!("pid {key} {pid} {start}"));
    }

    /// Move attempt `key`'s deadline on (its lease was renewed).
    pub fn renew(&self, key: &str, deadline_ns: u64) {
        self.send(&format!("renew {key} {deadline_ns}"));
    }

    /// Stop watching attempt `key` (its process is about to be reaped).
    pub fn disarm(&self, key: &str) {
        self.send(&format!("disarm {key}"));
    }

    fn send(&self, line: &str) {
        let Ok(mut guard) = self.stdin.lock() else {
            return;
        };
        let Some(stdin) = guard.as_mut() else { return };
        let mut msg = line.as_bytes().to_vec();
        msg.push(b'\n');
        // A full pipe means the guard is stopped or gone: stop using it
        // (the worker's own deadline check still stops lapsed attempts).
        if let Err(e) = stdin.write_all(&msg) {
            tracing::warn!(error = %e, "the lease guard stopped reading; tasks of a stalled worker may outlive their leases");
            *guard = None;
        }
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        // Closing stdin tells the guard to exit (after killing what is still
        // armed: nothing, after a clean shutdown).
        if let Ok(mut s) = self.stdin.lock() {
            s.take();
        }
        if let Ok(mut c) = self.child.lock() {
            let _ = c.wait();
        }
    }
}

/// Field 22 of `/proc/<pid>/stat` (start time in clock ticks since boot).
fn start_time(pid: libc::pid_t) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// One watched attempt.
struct Armed {
    pid: libc::pid_t,
    start: u64,
    deadline_ns: u64,
    cgroup_procs: Vec<PathBuf>,
}

/// Apply one protocol line to the watch list.
fn apply(armed: &mut HashMap<String, Armed>, line: &str) {
    let mut w = line.split(' ');
    match (w.next(), w.next()) {
        (Some("arm"), Some(key)) => {
            let nums: Vec<u64> = w.by_ref().take(3).filter_map(|x| x.parse().ok()).collect();
            if let [pid, start, deadline_ns] = nums[..] {
                armed.insert(
                    key.to_string(),
                    Armed {
                        pid: pid as libc::pid_t,
                        start,
                        deadline_ns,
                        cgroup_procs: w.map(PathBuf::from).collect(),
                    },
                );
            }
        }
        (Some("pid"), Some(key)) => {
            let nums: Vec<u64> = w.filter_map(|x| x.parse().ok()).collect();
            if let (Some(a), [pid, start]) = (armed.get_mut(key), &nums[..]) {
                a.pid = *pid as libc::pid_t;
                a.start = *start;
            }
        }
        (Some("renew"), Some(key)) => {
            if let (Some(a), Some(d)) = (armed.get_mut(key), w.next().and_then(|x| x.parse().ok()))
            {
                a.deadline_ns = d;
            }
        }
        (Some("disarm"), Some(key)) => {
            armed.remove(key);
        }
        _ => {}
    }
}

/// SIGKILL an attempt's process group and every process of its cgroup,
/// unless its pid now names another process.
fn kill(a: &Armed) {
    if a.pid > 1 && start_time(a.pid) == Some(a.start) {
        // SAFETY: plain syscalls.
        unsafe {
            libc::killpg(a.pid, libc::SIGKILL);
            libc::kill(a.pid, libc::SIGKILL);
        }
    }
    for procs in &a.cgroup_procs {
        let pids = std::fs::read_to_string(procs).unwrap_or_default();
        for pid in pids
            .lines()
            .filter_map(|l| l.trim().parse::<libc::pid_t>().ok())
        {
            // SAFETY: plain syscall.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// The guard's loop: read commands until the worker's end closes, killing
/// each attempt whose deadline passes. Returns when stdin closes (after
/// killing whatever is still armed).
pub fn run_guard() -> io::Result<()> {
    let stdin = io::stdin();
    let fd = stdin.as_raw_fd();
    let mut reader = io::BufReader::new(stdin.lock());
    let mut armed: HashMap<String, Armed> = HashMap::new();
    loop {
        let now = monotonic_ns();
        let expired: Vec<String> = armed
            .iter()
            .filter(|(_, a)| a.deadline_ns <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for key in expired {
            if let Some(a) = armed.remove(&key) {
                eprintln!(
                    "agentq lease guard: lease of attempt {key} lapsed; killing its processes"
                );
                kill(&a);
            }
        }
        let next = armed.values().map(|a| a.deadline_ns).min();
        let wait_ms = next.map_or(1000, |d| {
            d.saturating_sub(now).div_ceil(1_000_000).min(1000)
        });
        if reader.buffer().is_empty() && !readable(fd, wait_ms as i32) {
            continue;
        }
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            armed.values().for_each(kill);
            return Ok(());
        }
        apply(&mut armed, line.trim_end());
    }
}

/// Whether `fd` has input (or EOF) within `ms`.
fn readable(fd: i32, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, ms.max(0)) > 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_protocol_arms_renews_and_disarms() {
        let mut m = HashMap::new();
        apply(
            &mut m,
            "arm 0-1a/2 1234 99 5000 /sys/fs/cgroup/pids/x/cgroup.procs",
        );
        let a = &m["0-1a/2"];
        assert_eq!((a.pid, a.start, a.deadline_ns), (1234, 99, 5000));
        assert_eq!(a.cgroup_procs.len(), 1);
        apply(&mut m, "pid 0-1a/2 4321 77");
        assert_eq!((m["0-1a/2"].pid, m["0-1a/2"].start), (4321, 77));
        apply(&mut m, "renew 0-1a/2 9000");
        assert_eq!(m["0-1a/2"].deadline_ns, 9000);
        apply(&mut m, "renew nobody 1");
        apply(&mut m, "garbage line");
        apply(&mut m, "disarm 0-1a/2");
        assert!(m.is_empty());
    }

    #[test]
    fn deadlines_fall_short_of_the_lease() {
        let d = local_deadline(1_000, Duration::from_secs(30));
        assert_eq!(d, 1_000 + 29_000_000_000);
        let d = local_deadline(0, Duration::from_secs(2));
        assert_eq!(d, 1_800_000_000);
    }
}
