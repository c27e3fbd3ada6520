//! Starting a task program: finding it, and what the child does between
//! `fork` and `exec` ([`child_setup`], async-signal-safe only): join the
//! attempt's cgroups, drop to the task user, die with the worker, set the
//! rlimits, close every inherited descriptor.

use std::ffi::{CString, OsString};
use std::io;
use std::path::{Path, PathBuf};

use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::executor::cgroup::{Attempt, CgroupLimits, CgroupStats, join_self};
use crate::executor::sandbox::{Sandbox, UserLease};
use crate::executor::{Caps, Manifest};
use crate::model::attempt::Report;

use super::wait::{ChildGuard, kill_cgroup};

/// Spawn retries on ETXTBSY (a program file that is still open for writing
/// in a concurrently forked process; transient).
pub(super) const TXTBSY_RETRIES: u32 = 10;

/// This process's resident anonymous memory in bytes (`/proc/self/statm`:
/// resident minus file-backed and shared), 0 when unreadable. That is what
/// fork copies into the child's page tables and so into its `ru_maxrss`:
/// file mappings the worker never wrote to (its binary's code, debug info a
/// backtrace mapped) are not copied but faulted in on use.
pub(super) fn own_rss() -> u64 {
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

/// Makes the (0700) working directory the task user's own.
pub(super) fn give_workdir(dir: &Path, uid: u32, gid: u32) -> io::Result<()> {
    std::os::unix::fs::chown(dir, Some(uid), Some(gid))
}

/// Why an attempt's process never started (its report says so).
pub(super) struct NotStarted {
    error: String,
    /// Retrying cannot help (no such program, permission denied, ...).
    permanent: bool,
}

impl NotStarted {
    fn new(error: impl Into<String>, permanent: bool) -> NotStarted {
        NotStarted {
            error: error.into(),
            permanent,
        }
    }

    /// The attempt's report: a failure, measured at nothing.
    pub(super) fn report(self) -> Report {
        Report::failed(self.error, self.permanent)
    }
}

/// Where an attempt runs, prepared before its process starts: the program,
/// a fresh 0700 working directory (inside the worker's own directory, swept
/// if the worker dies), the task user, the attempt's cgroup.
pub(super) struct Place<'a> {
    pub(super) program: PathBuf,
    pub(super) workdir: tempfile::TempDir,
    pub(super) user: Option<UserLease<'a>>,
    pub(super) cgroup: Option<Attempt>,
}

impl<'a> Place<'a> {
    /// Everything but the process; a failure is the attempt's report.
    pub(super) fn prepare(
        sb: &'a Sandbox,
        m: &Manifest,
        caps: &Caps,
    ) -> Result<Place<'a>, NotStarted> {
        let Some(program_name) = m.command.first() else {
            return Err(NotStarted::new(
                format!("kind {:?} has an empty command in its manifest", m.kind),
                true,
            ));
        };
        let program = resolve_program(program_name, &m.dir, std::env::var_os("PATH"))
            .map_err(|e| NotStarted::new(e, true))?;
        let workdir = sb.workdirs().create().map_err(|e| {
            NotStarted::new(
                format!("cannot create a working directory for the task: {e}"),
                false,
            )
        })?;
        let user = sb.lease_user().map_err(|e| NotStarted::new(e, false))?;
        if let Some(u) = &user {
            give_workdir(workdir.path(), u.uid, u.gid).map_err(|e| {
                NotStarted::new(
                    format!("cannot hand the working directory to uid {}: {e}", u.uid),
                    false,
                )
            })?;
        }
        let cgroup = match sb.cgroups() {
            None => None,
            Some(c) => Some(
                c.create(&CgroupLimits {
                    memory: caps.memory,
                    pids: Some(sb.pids_max()),
                })
                .map_err(|e| {
                    NotStarted::new(format!("cannot create the attempt's cgroup: {e}"), false)
                })?,
            ),
        };
        Ok(Place {
            program,
            workdir,
            user,
            cgroup,
        })
    }

    /// The `cgroup.procs` files of the attempt's cgroup (none without one).
    pub(super) fn cgroup_procs(&self) -> Vec<PathBuf> {
        self.cgroup
            .as_ref()
            .map(|c| {
                c.join_paths()
                    .iter()
                    .map(|p| PathBuf::from(std::ffi::OsStr::from_bytes(p.as_bytes())))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// SIGKILL every process left in the attempt's cgroup and wait until it
    /// is empty (on the blocking pool).
    pub(super) async fn kill_leftovers(mut self) -> Place<'a> {
        self.cgroup = kill_cgroup(self.cgroup.take()).await;
        self
    }

    /// Remove the cgroup and the working directory (on the blocking pool);
    /// returns what the cgroup recorded.
    pub(super) async fn close(self) -> Option<CgroupStats> {
        let Place {
            workdir,
            cgroup,
            user,
            ..
        } = self;
        let stats = cgroup.as_ref().map(Attempt::stats);
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(c) = cgroup {
                c.remove();
            }
            workdir.close()
        })
        .await;
        drop(user);
        stats
    }
}

/// A task process that started.
pub(super) struct Started {
    pub(super) child: std::process::Child,
    pub(super) pid: libc::pid_t,
    /// Kills and reaps the child if the attempt's future is dropped.
    pub(super) guard: ChildGuard,
    pub(super) start: Instant,
    /// The worker's anonymous RSS around the fork (see [`super::task_peak`]).
    pub(super) worker_rss: u64,
}

/// Start the program in `place`: clean environment (the manifest's `env`
/// names only), its own process group, piped stdio, and [`child_setup`]
/// between fork and exec. Retries ETXTBSY (a program file still open for
/// writing in a concurrently forked process is transient).
pub(super) async fn spawn(
    sb: &Sandbox,
    m: &Manifest,
    caps: &Caps,
    place: &Place<'_>,
) -> Result<Started, NotStarted> {
    let mut cmd = command(sb, m, caps, place);
    // The worker's RSS around the fork bounds what the child copied of it
    // (see the module docs); read before and after, keep the larger.
    let rss_before = own_rss();
    let mut attempt = 0;
    loop {
        let start = Instant::now();
        match cmd.spawn() {
            Ok(child) => {
                let pid = child.id() as libc::pid_t;
                return Ok(Started {
                    child,
                    pid,
                    guard: ChildGuard { pid, reaped: false },
                    start,
                    worker_rss: rss_before.max(own_rss()),
                });
            }
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && attempt < TXTBSY_RETRIES => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(10 * u64::from(attempt))).await;
            }
            Err(e) => {
                return Err(NotStarted::new(
                    format!(
                        "cannot start task program {:?} ({}): {e}",
                        m.command.first().map_or("", String::as_str),
                        place.program.display()
                    ),
                    spawn_error_is_permanent(&e),
                ));
            }
        }
    }
}

fn command(sb: &Sandbox, m: &Manifest, caps: &Caps, place: &Place<'_>) -> Command {
    let mut cmd = Command::new(&place.program);
    cmd.args(&m.command[1..])
        .env_clear()
        .current_dir(place.workdir.path())
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for name in &m.env {
        if let Some(value) = std::env::var_os(name) {
            cmd.env(name, value);
        }
    }
    let cgroup = place.cgroup.as_ref();
    let setup = ChildSetup {
        // In cgroup mode the cgroup is the cap (for all processes together).
        rlimit_data: if cgroup.is_none() { caps.memory } else { None },
        // RLIMIT_NPROC counts per uid and does not bind root.
        rlimit_nproc: (cgroup.is_none() && place.user.is_some()).then(|| sb.pids_max()),
        join: cgroup.map(|c| c.join_paths().to_vec()).unwrap_or_default(),
        ids: place.user.as_ref().map(|u| (u.uid, u.gid)),
        // SAFETY: plain syscall.
        parent: unsafe { libc::getpid() },
    };
    // SAFETY: the hook only calls async-signal-safe functions (open, write,
    // setgroups, setgid, setuid, umask, prctl, getppid, setrlimit, the
    // close_range syscall) and does not allocate.
    unsafe {
        cmd.pre_exec(move || child_setup(&setup));
    }
    cmd
}

/// Finds the program: absolute as is; containing a `/`: relative to the
/// kind's folder; a bare name: searched on the worker's `PATH`.
pub(super) fn resolve_program(
    name: &str,
    dir: &Path,
    path_var: Option<OsString>,
) -> Result<PathBuf, String> {
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
    // The `which` crate: executable files only, relative PATH entries taken
    // from the current directory.
    let cwd = std::env::current_dir().unwrap_or_default();
    if let Some(found) = path_var.and_then(|pv| which::which_in(p, Some(pv), &cwd).ok()) {
        return Ok(found);
    }
    Err(format!(
        "cannot start task program {name:?}: not found on the worker's PATH (write an absolute path or ./name relative to the kind's folder)"
    ))
}

/// Spawn errors that retrying cannot fix.
pub(super) fn spawn_error_is_permanent(e: &io::Error) -> bool {
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
pub(super) struct ChildSetup {
    /// `RLIMIT_DATA` (rlimit mode).
    pub(super) rlimit_data: Option<u64>,
    /// `RLIMIT_NPROC` (rlimit mode with a task user).
    pub(super) rlimit_nproc: Option<u64>,
    /// `cgroup.procs` files to join (cgroup mode).
    pub(super) join: Vec<CString>,
    /// uid and gid to switch to.
    pub(super) ids: Option<(u32, u32)>,
    /// The worker's pid, to notice a worker that died before PDEATHSIG was set.
    pub(super) parent: libc::pid_t,
}

/// Runs in the child between fork and exec: async-signal-safe calls only.
pub(super) fn child_setup(s: &ChildSetup) -> io::Result<()> {
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

pub(super) fn set_rlimit(resource: libc::__rlimit_resource_t, value: u64) -> io::Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
