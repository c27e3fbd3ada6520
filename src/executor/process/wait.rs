//! Waiting for a task process without reaping it (pidfd and
//! `waitid(WNOWAIT)`), signalling its group and cgroup, and reaping it with
//! `wait4` for its CPU time and peak RSS. The zombie leader pins the process
//! group id until the reap, so the group can be killed safely until then;
//! [`ChildGuard`] kills and reaps a child whose future was dropped.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::executor::cgroup::Attempt;
use crate::executor::{Caps, Stop};

use super::classify::EndedBy;

/// SIGKILLs every process left in the attempt's cgroup and waits until it
/// is empty (on the blocking pool; the cgroup comes back for its stats).
pub(super) async fn kill_cgroup(cgroup: Option<Attempt>) -> Option<Attempt> {
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
pub(super) fn signal_all(pgid: libc::pid_t, cgroup: Option<&Attempt>, sig: libc::c_int) {
    signal_group(pgid, sig);
    if let Some(c) = cgroup {
        c.signal(sig);
    }
}

/// How the main process ended, decoded from the wait status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Status {
    Exited(i32),
    Signaled(i32),
}

/// Resource usage from wait4.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Usage {
    pub(super) cpu_user_ms: u64,
    pub(super) cpu_sys_ms: u64,
    pub(super) peak_rss_bytes: u64,
}

/// Sends `sig` to the process group `pgid`; ESRCH (nothing left) is fine.
pub(super) fn signal_group(pgid: libc::pid_t, sig: libc::c_int) {
    // SAFETY: plain syscall.
    unsafe {
        libc::killpg(pgid, sig);
    }
}

/// Waits until `pid` (our child) has exited, without reaping it.
pub(super) async fn wait_exit(pid: libc::pid_t) -> io::Result<()> {
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

pub(super) async fn wait_exit_blocking(pid: libc::pid_t) -> io::Result<()> {
    tokio::task::spawn_blocking(move || peek_exit(pid, 0).map(|_| ()))
        .await
        .map_err(|e| io::Error::other(e.to_string()))?
}

pub(super) fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
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
pub(super) fn has_exited(pid: libc::pid_t) -> io::Result<bool> {
    peek_exit(pid, libc::WNOHANG)
}

/// `waitid(WEXITED | WNOWAIT | extra)` on our child `pid`, retried on
/// EINTR: whether it has exited, leaving it unreaped (its pid stays ours
/// until [`reap_now`], so no signal can reach a recycled pid). Without
/// `WNOHANG` in `extra` it blocks until the child exits.
fn peek_exit(pid: libc::pid_t, extra: libc::c_int) -> io::Result<bool> {
    loop {
        // SAFETY: zeroed siginfo_t is a valid out-parameter.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointer; pid is our child.
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT | extra,
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
pub(super) fn reap_now(pid: libc::pid_t) -> io::Result<(Status, Usage)> {
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

/// Kills and reaps the child if `run_process` is dropped before it did.
pub(super) struct ChildGuard {
    pub(super) pid: libc::pid_t,
    pub(super) reaped: bool,
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

/// Wait for the exit, the timeout or a stop. Biased: a program that has
/// already exited ended by itself, even if a stop arrived at the same moment
/// (it is then completed, not run again). At the timeout or a graceful stop
/// the group (and cgroup) gets SIGTERM, then SIGKILL after the kill grace;
/// a stop `now` gets SIGKILL at once. Returns why the runtime ended it (None:
/// it ended by itself) and whether the exit was observed.
pub(super) async fn wait_or_stop(
    pid: libc::pid_t,
    cgroup: Option<&Attempt>,
    caps: &Caps,
    stop: &Stop,
) -> (Option<EndedBy>, io::Result<()>) {
    let mut exited = std::pin::pin!(wait_exit(pid));
    let ended_by = tokio::select! {
        biased;
        r = &mut exited => return (None, r),
        _ = tokio::time::sleep(caps.timeout) => EndedBy::Timeout,
        _ = stop.graceful.cancelled() => EndedBy::Cancel,
        _ = stop.now.cancelled() => EndedBy::Kill,
    };
    if ended_by == EndedBy::Kill {
        signal_all(pid, cgroup, libc::SIGKILL);
        return (Some(ended_by), exited.await);
    }
    signal_all(pid, cgroup, libc::SIGTERM);
    // A stopped process would not act on SIGTERM until continued.
    signal_all(pid, cgroup, libc::SIGCONT);
    let r = match tokio::time::timeout(caps.kill_grace, &mut exited).await {
        Ok(r) => r,
        Err(_) => {
            signal_all(pid, cgroup, libc::SIGKILL);
            exited.await
        }
    };
    (Some(ended_by), r)
}

/// Reap `pid` once it has exited; if its exit could not be observed
/// (`exit` failed), make sure it dies and reap it on the blocking pool.
pub(super) async fn reap_after(
    pid: libc::pid_t,
    exit: io::Result<()>,
) -> io::Result<(Status, Usage)> {
    if exit.is_ok() {
        return reap_now(pid);
    }
    // SAFETY: plain syscall; pid is our unreaped child.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    match tokio::task::spawn_blocking(move || reap_now(pid)).await {
        Ok(r) => r,
        Err(e) => Err(io::Error::other(e.to_string())),
    }
}
