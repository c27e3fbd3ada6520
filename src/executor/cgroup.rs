//! Per-attempt cgroups: memory cap, process cap, peak memory, OOM detection
//! and a kill of every process of the attempt.
//!
//! Layout: `<controller mount>/<parent>/<worker id>/<attempt>`, where
//! `parent` defaults to `agentq` and `attempt` is `<owner>.<seq>`: the
//! [`Owner`] tag `<pid namespace>.<pid>.<start time>` of the worker process
//! that made it, so a later worker can tell whether the owner is gone (see
//! [`Cgroups::sweep_stale`] and [`super::owner`]).
//!
//! - **cgroup v2** when a `cgroup2` mount offers both `memory` and `pids`:
//!   `memory.max`, `memory.swap.max = 0`, `memory.oom.group = 1`,
//!   `pids.max`; peak from `memory.peak`; OOM kills from `memory.events`;
//!   the kill is `cgroup.kill`.
//! - **cgroup v1** when the `memory` and `pids` hierarchies are writable:
//!   `memory.limit_in_bytes` (and `memory.memsw.limit_in_bytes` when swap
//!   accounting exists), `pids.max`; peak from `memory.max_usage_in_bytes`;
//!   OOM kills from `memory.oom_control`; the kill freezes the attempt
//!   (`freezer` hierarchy, when mounted), SIGKILLs every member and thaws,
//!   until `cgroup.procs` is empty.
//!
//! The child joins its cgroups itself between fork and exec (it writes `0`
//! to each `cgroup.procs`), so every process it ever starts is inside,
//! including ones that call `setsid` to leave the process group.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::owner::Owner;

/// How long [`Attempt::kill_all`] keeps trying before giving up.
const KILL_DEADLINE: Duration = Duration::from_secs(10);

/// Why cgroups cannot be used (the worker falls back to rlimits).
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// `/proc/self/mountinfo` shows no usable hierarchy.
    #[error(
        "no writable cgroup hierarchy with memory and pids controllers (need cgroup v2 with both enabled, or cgroup v1 memory and pids mounts)"
    )]
    NotMounted,
    /// The cgroup parent name is not a plain relative path.
    #[error(
        "cgroup parent {0:?} is not valid: use a relative path of letters, digits, '_', '.', '-' and '/', for example \"agentq\" (or \"off\")"
    )]
    BadParent(String),
    /// Creating or configuring the worker's cgroup failed.
    #[error("cannot use cgroup {path}: {source}")]
    Io {
        /// Directory or control file.
        path: PathBuf,
        /// OS error.
        source: io::Error,
    },
}

/// Which cgroup version is in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// Unified hierarchy.
    V2,
    /// Separate memory, pids (and freezer) hierarchies.
    V1,
}

/// One controller hierarchy this worker uses.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Hierarchy {
    /// What it is for: "unified", "memory", "pids" or "freezer".
    name: &'static str,
    /// `<mount>/<parent>`: where every worker's directory lives.
    parent_dir: PathBuf,
    /// `<mount>/<parent>/<worker id>`.
    worker_dir: PathBuf,
}

/// The cgroup directories of one worker; makes one cgroup per attempt.
#[derive(Debug)]
pub struct Cgroups {
    version: Version,
    hierarchies: Vec<Hierarchy>,
    owner: String,
    seq: AtomicU64,
}

/// Limits written into an attempt's cgroup.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupLimits {
    /// Memory cap in bytes (None: no cap, usage is still measured).
    pub memory: Option<u64>,
    /// Most processes and threads at once.
    pub pids: Option<u64>,
}

/// What an attempt's cgroup recorded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupStats {
    /// Highest memory use of all the attempt's processes together (bytes;
    /// anonymous memory, page cache they caused and kernel memory).
    pub peak_memory: Option<u64>,
    /// Processes the kernel OOM-killed at the memory cap.
    pub oom_kills: u64,
    /// Forks refused at the process cap.
    pub pids_refused: u64,
}

impl Cgroups {
    /// Finds the hierarchies in `/proc/self/mountinfo`, creates
    /// `<mount>/<parent>/<worker_id>` in each and checks it works. Prefers
    /// v2 when it has both memory and pids.
    pub fn open(parent: &str, worker_id: &str) -> Result<Cgroups, CgroupError> {
        let mountinfo =
            std::fs::read_to_string("/proc/self/mountinfo").map_err(|source| CgroupError::Io {
                path: "/proc/self/mountinfo".into(),
                source,
            })?;
        Cgroups::open_with(&mountinfo, parent, worker_id)
    }

    /// [`Cgroups::open`] with the mount table given (for tests).
    pub fn open_with(
        mountinfo: &str,
        parent: &str,
        worker_id: &str,
    ) -> Result<Cgroups, CgroupError> {
        if !valid_parent(parent) {
            return Err(CgroupError::BadParent(parent.to_string()));
        }
        let mounts = parse_mountinfo(mountinfo);
        let v2 = mounts
            .iter()
            .find(|m| m.v2 && v2_has_controllers(&m.path))
            .map(|m| vec![("unified", m.path.clone())]);
        let v1 = || {
            let find = |c: &str| {
                mounts
                    .iter()
                    .find(|m| !m.v2 && m.controllers.iter().any(|x| x == c))
                    .map(|m| m.path.clone())
            };
            let mut list = vec![("memory", find("memory")?), ("pids", find("pids")?)];
            if let Some(f) = find("freezer") {
                list.push(("freezer", f));
            }
            Some(list)
        };
        let (version, list) = match (v2, v1()) {
            (Some(l), _) => (Version::V2, l),
            (None, Some(l)) => (Version::V1, l),
            (None, None) => return Err(CgroupError::NotMounted),
        };
        let hierarchies = list
            .into_iter()
            .map(|(name, mount)| Hierarchy {
                name,
                parent_dir: mount.join(parent),
                worker_dir: mount.join(parent).join(worker_id),
            })
            .collect();
        let cg = Cgroups {
            version,
            hierarchies,
            owner: Owner::me().to_string(),
            seq: AtomicU64::new(0),
        };
        cg.prepare()?;
        Ok(cg)
    }

    /// The version in use.
    pub fn version(&self) -> Version {
        self.version
    }

    /// The worker's directories, one per hierarchy.
    pub fn worker_dirs(&self) -> Vec<&Path> {
        self.hierarchies
            .iter()
            .map(|h| h.worker_dir.as_path())
            .collect()
    }

    /// Creates the worker directories (and, on v2, enables memory and pids
    /// for their children), then makes and removes a probe attempt.
    fn prepare(&self) -> Result<(), CgroupError> {
        for h in &self.hierarchies {
            mkdir_all(&h.worker_dir)?;
            let procs = h.worker_dir.join("cgroup.procs");
            if !procs.exists() {
                return Err(CgroupError::Io {
                    path: procs,
                    source: io::Error::other("not a cgroup file system"),
                });
            }
            if self.version == Version::V2 {
                enable_v2_controllers(&h.worker_dir)?;
            }
        }
        let probe = self.create(&CgroupLimits {
            memory: Some(64 << 20),
            pids: Some(16),
        })?;
        probe.remove();
        Ok(())
    }

    /// Makes the cgroup of one attempt with `limits` written in.
    pub fn create(&self, limits: &CgroupLimits) -> Result<Attempt, CgroupError> {
        let name = format!(
            "{}.{}",
            self.owner,
            self.seq.fetch_add(1, Ordering::Relaxed)
        );
        let mut attempt = Attempt {
            version: self.version,
            dirs: Vec::new(),
            join: Vec::new(),
            removed: false,
        };
        for h in &self.hierarchies {
            let dir = h.worker_dir.join(&name);
            // create_dir_all: another worker's sweep may have removed our
            // (then empty) worker directory.
            mkdir_all(&dir)?;
            attempt.dirs.push((h.name, dir.clone()));
            let procs = dir.join("cgroup.procs");
            let c = CString::new(procs.as_os_str().as_bytes()).map_err(|_| CgroupError::Io {
                path: procs.clone(),
                source: io::Error::other("path contains NUL"),
            })?;
            attempt.join.push(c);
        }
        attempt.write_limits(limits)?;
        Ok(attempt)
    }

    /// Removes attempt cgroups whose worker process is gone (killing what
    /// still runs in them), then empty worker directories of other workers.
    /// Attempts of workers in other pid namespaces are never judged (see
    /// [`Owner::is_gone`]). Returns the number of attempt cgroup
    /// directories removed (one per hierarchy).
    pub fn sweep_stale(&self) -> usize {
        let mut removed = 0;
        for h in &self.hierarchies {
            let Ok(workers) = std::fs::read_dir(&h.parent_dir) else {
                continue;
            };
            for w in workers.flatten() {
                let wdir = w.path();
                if !wdir.is_dir() {
                    continue;
                }
                for a in std::fs::read_dir(&wdir).into_iter().flatten().flatten() {
                    let adir = a.path();
                    let Some(name) = adir.file_name().and_then(|n| n.to_str()) else {
                        continue;
                    };
                    let gone = Owner::parse_attempt(name).is_some_and(|o| o.is_gone());
                    if adir.is_dir() && gone {
                        let mut stale = Attempt {
                            version: self.version,
                            dirs: vec![(h.name, adir.clone())],
                            join: Vec::new(),
                            removed: false,
                        };
                        if stale.finish() {
                            removed += 1;
                        }
                    }
                }
                if wdir != h.worker_dir {
                    // Fails (fine) while the directory still has attempts.
                    let _ = std::fs::remove_dir(&wdir);
                }
            }
        }
        removed
    }
}

/// The cgroup of one attempt. Dropping it kills what is left and removes it.
#[derive(Debug)]
pub struct Attempt {
    version: Version,
    dirs: Vec<(&'static str, PathBuf)>,
    join: Vec<CString>,
    removed: bool,
}

impl Attempt {
    /// `cgroup.procs` of each hierarchy: the child writes `0` to each
    /// between fork and exec (see [`join_self`]).
    pub fn join_paths(&self) -> &[CString] {
        &self.join
    }

    fn dir(&self, name: &str) -> Option<&Path> {
        self.dirs
            .iter()
            .find(|(n, _)| *n == name || *n == "unified")
            .map(|(_, d)| d.as_path())
    }

    fn write_limits(&self, limits: &CgroupLimits) -> Result<(), CgroupError> {
        let (mem_dir, pids_dir) = match (self.dir("memory"), self.dir("pids")) {
            (Some(m), Some(p)) => (m, p),
            _ => return Ok(()),
        };
        if let Some(pids) = limits.pids {
            write_file(&pids_dir.join("pids.max"), &pids.to_string())?;
        }
        match self.version {
            Version::V2 => {
                if let Some(cap) = limits.memory {
                    write_file(&mem_dir.join("memory.max"), &cap.to_string())?;
                    // Without swap the cap is a cap on memory, not on RAM.
                    let _ = write_file(&mem_dir.join("memory.swap.max"), "0");
                }
                // One OOM kill takes the whole attempt, not a random member.
                let _ = write_file(&mem_dir.join("memory.oom.group"), "1");
            }
            Version::V1 => {
                if let Some(cap) = limits.memory {
                    write_file(&mem_dir.join("memory.limit_in_bytes"), &cap.to_string())?;
                    let memsw = mem_dir.join("memory.memsw.limit_in_bytes");
                    if memsw.exists() {
                        let _ = write_file(&memsw, &cap.to_string());
                    }
                }
            }
        }
        Ok(())
    }

    /// Process ids currently in the attempt.
    pub fn pids(&self) -> Vec<libc::pid_t> {
        let Some((_, dir)) = self.dirs.first() else {
            return Vec::new();
        };
        read_pids(&dir.join("cgroup.procs"))
    }

    /// Sends `sig` to every process in the attempt (not atomic: a process
    /// forked meanwhile may be missed; use [`Attempt::kill_all`] to end it).
    pub fn signal(&self, sig: libc::c_int) {
        for pid in self.pids() {
            // SAFETY: plain syscall.
            unsafe { libc::kill(pid, sig) };
        }
    }

    /// SIGKILLs every process in the attempt and waits until none is left.
    /// Blocking (sleeps in short steps); bounded by ten seconds.
    pub fn kill_all(&self) -> io::Result<()> {
        let started = Instant::now();
        let mut pause = Duration::from_millis(1);
        loop {
            if self.pids().is_empty() {
                return Ok(());
            }
            if started.elapsed() > KILL_DEADLINE {
                return Err(io::Error::other(format!(
                    "processes still alive in {} after {KILL_DEADLINE:?}",
                    self.dirs
                        .first()
                        .map(|(_, d)| d.display().to_string())
                        .unwrap_or_default()
                )));
            }
            self.kill_round();
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    fn kill_round(&self) {
        if self.version == Version::V2 {
            if let Some(dir) = self.dir("unified")
                && write_file(&dir.join("cgroup.kill"), "1").is_ok()
            {
                return;
            }
            self.signal(libc::SIGKILL);
            return;
        }
        // v1: freeze so a fork bomb cannot fork between reading the list and
        // the kills, kill everyone, thaw so the kills are delivered.
        let freezer = self
            .dirs
            .iter()
            .find(|(n, _)| *n == "freezer")
            .map(|(_, d)| d.join("freezer.state"));
        let froze = freezer
            .as_deref()
            .is_some_and(|f| write_file(f, "FROZEN").is_ok());
        if let (true, Some(f)) = (froze, freezer.as_deref()) {
            wait_frozen(f);
        }
        self.signal(libc::SIGKILL);
        if let (true, Some(f)) = (froze, freezer.as_deref()) {
            let _ = write_file(f, "THAWED");
        }
    }

    /// What the attempt's cgroup recorded (read before [`Attempt::remove`]).
    pub fn stats(&self) -> CgroupStats {
        let mem = self.dir("memory");
        let pids = self.dir("pids");
        let read = |dir: Option<&Path>, file: &str| {
            dir.and_then(|d| std::fs::read_to_string(d.join(file)).ok())
        };
        let (peak, oom) = match self.version {
            Version::V2 => (
                read(mem, "memory.peak").and_then(|s| s.trim().parse().ok()),
                read(mem, "memory.events")
                    .map(|s| keyed_value(&s, "oom_kill").unwrap_or(0))
                    .unwrap_or(0),
            ),
            Version::V1 => (
                read(mem, "memory.max_usage_in_bytes").and_then(|s| s.trim().parse().ok()),
                read(mem, "memory.oom_control")
                    .map(|s| keyed_value(&s, "oom_kill").unwrap_or(0))
                    .unwrap_or(0),
            ),
        };
        CgroupStats {
            peak_memory: peak,
            oom_kills: oom,
            pids_refused: read(pids, "pids.events")
                .and_then(|s| keyed_value(&s, "max"))
                .unwrap_or(0),
        }
    }

    /// Kills what is left and removes the directories (best effort; a
    /// leftover is removed by the next worker's [`Cgroups::sweep_stale`]).
    pub fn remove(mut self) {
        self.finish();
    }

    /// Kill and remove once; true when the directories are gone.
    fn finish(&mut self) -> bool {
        if self.removed {
            return true;
        }
        self.removed = true;
        if let Err(e) = self.kill_all() {
            tracing::warn!(error = %e, "could not empty an attempt cgroup; leaving it for the next sweep");
            return false;
        }
        let ok = self.remove_dirs();
        if !ok {
            tracing::warn!(dirs = ?self.dirs, "could not remove an attempt cgroup; leaving it for the next sweep");
        }
        ok
    }

    /// rmdir each directory, retrying briefly (EBUSY right after the last
    /// process died). True when all are gone.
    fn remove_dirs(&self) -> bool {
        let mut all = true;
        for (_, dir) in &self.dirs {
            let mut ok = false;
            for i in 0..20u64 {
                match std::fs::remove_dir(dir) {
                    Ok(()) => {
                        ok = true;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        ok = true;
                        break;
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(1 + i * 5)),
                }
            }
            all &= ok;
        }
        all
    }
}

impl Drop for Attempt {
    /// Cleans up on a helper thread: drop may happen on an async runtime
    /// thread (a cancelled attempt), where waiting for processes to die
    /// would stall other tasks.
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        self.removed = true;
        // Marked removed, so if the thread cannot start, dropping the
        // closure does nothing and the next sweep cleans up.
        let rest = Attempt {
            version: self.version,
            dirs: std::mem::take(&mut self.dirs),
            join: Vec::new(),
            removed: true,
        };
        let _ = std::thread::Builder::new()
            .name("agentq-cgroup".into())
            .spawn(move || {
                let mut rest = rest;
                rest.removed = false;
                rest.finish();
            });
    }
}

/// Runs in the child between fork and exec: moves the calling process into
/// each cgroup by writing `0` to its `cgroup.procs`. Async-signal-safe (open,
/// write, close on pre-built paths; no allocation).
pub fn join_self(paths: &[CString]) -> io::Result<()> {
    for p in paths {
        // SAFETY: p is a valid NUL-terminated path; plain syscalls.
        unsafe {
            let fd = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let n = libc::write(fd, b"0".as_ptr().cast(), 1);
            let err = io::Error::last_os_error();
            libc::close(fd);
            if n != 1 {
                return Err(err);
            }
        }
    }
    Ok(())
}

/// A cgroup mount from mountinfo.
#[derive(Debug, PartialEq, Eq)]
struct Mount {
    path: PathBuf,
    v2: bool,
    controllers: Vec<String>,
}

/// cgroup and cgroup2 mounts in `/proc/self/mountinfo` text.
fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let path = left.split(' ').nth(4)?;
            let mut r = right.split(' ');
            let fstype = r.next()?;
            let _source = r.next();
            let opts = r.next().unwrap_or("");
            let v2 = match fstype {
                "cgroup2" => true,
                "cgroup" => false,
                _ => return None,
            };
            Some(Mount {
                path: PathBuf::from(unescape_mount_path(path)),
                v2,
                controllers: opts.split(',').map(str::to_string).collect(),
            })
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mount_path(p: &str) -> String {
    let b = p.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn v2_has_controllers(mount: &Path) -> bool {
    std::fs::read_to_string(mount.join("cgroup.controllers")).is_ok_and(|s| {
        let list: Vec<&str> = s.split_whitespace().collect();
        list.contains(&"memory") && list.contains(&"pids")
    })
}

/// Writes `+memory +pids` into `subtree_control` of every directory from
/// the mount down to (and including) `worker_dir`.
fn enable_v2_controllers(worker_dir: &Path) -> Result<(), CgroupError> {
    let mut chain: Vec<&Path> = worker_dir
        .ancestors()
        .take_while(|d| d.join("cgroup.subtree_control").exists())
        .collect();
    chain.reverse();
    for d in chain {
        write_file(&d.join("cgroup.subtree_control"), "+memory +pids")?;
    }
    Ok(())
}

/// True when `parent` is a relative path of safe components (letters,
/// digits, `_`, `.`, `-`; no `.` or `..` components).
pub fn valid_parent(parent: &str) -> bool {
    !parent.is_empty()
        && parent.split('/').all(|c| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        })
}

/// The number after `key ` on its own line (`oom_kill 3`, `max 12`).
fn keyed_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

fn read_pids(file: &Path) -> Vec<libc::pid_t> {
    std::fs::read_to_string(file)
        .map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn wait_frozen(state_file: &Path) {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(1) {
        match std::fs::read_to_string(state_file) {
            Ok(s) if s.trim() == "FROZEN" => return,
            Ok(_) => std::thread::sleep(Duration::from_micros(200)),
            Err(_) => return,
        }
    }
}

fn mkdir_all(dir: &Path) -> Result<(), CgroupError> {
    std::fs::create_dir_all(dir).map_err(|source| CgroupError::Io {
        path: dir.to_path_buf(),
        source,
    })
}

fn write_file(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(|source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
25 30 0:23 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
36 25 0:31 / /sys/fs/cgroup/memory rw,relatime shared:15 - cgroup cgroup rw,memory
37 25 0:32 / /sys/fs/cgroup/pids rw,relatime shared:16 - cgroup cgroup rw,pids
38 25 0:33 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
39 25 0:34 / /sys/fs/cgroup/my\\040dir rw - cgroup cgroup rw,freezer
";

    #[test]
    fn mountinfo_parsing() {
        let m = parse_mountinfo(MOUNTINFO);
        assert_eq!(m.len(), 4);
        assert_eq!(m[0].path, Path::new("/sys/fs/cgroup/memory"));
        assert!(!m[0].v2);
        assert!(m[0].controllers.contains(&"memory".to_string()));
        assert!(m[2].v2);
        assert_eq!(m[3].path, Path::new("/sys/fs/cgroup/my dir"));
    }

    #[test]
    fn parents_are_plain_relative_paths() {
        assert!(valid_parent("agentq"));
        assert!(valid_parent("a/b-c_d.e"));
        for bad in ["", "/abs", "a/../b", "..", "a//b", "a b", "a/./b"] {
            assert!(!valid_parent(bad), "{bad}");
        }
        assert!(matches!(
            Cgroups::open_with(MOUNTINFO, "../x", "w"),
            Err(CgroupError::BadParent(_))
        ));
    }

    #[test]
    fn counters_are_read() {
        assert_eq!(
            keyed_value("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n", "oom_kill"),
            Some(3)
        );
        assert_eq!(keyed_value("max 12\n", "max"), Some(12));
        assert_eq!(keyed_value("low 0\nhigh 1\n", "oom_kill"), None);
    }

    /// The sweep's verdict on an attempt directory name.
    fn swept(name: &str) -> bool {
        Owner::parse_attempt(name).is_some_and(|o| o.is_gone())
    }

    #[test]
    fn ownership_by_name() {
        let me = Owner::me();
        assert!(!swept(&format!("{me}.7")));
        // A pid that cannot exist, and a start time that does not match.
        assert!(swept(&format!("{}.4194305.1.0", me.pid_ns)));
        assert!(swept(&format!("{}.{}.1.0", me.pid_ns, me.pid)));
        // The same in another pid namespace: not ours to judge.
        assert!(!swept(&format!("{}.4194305.1.0", me.pid_ns + 1)));
        assert!(!swept(&format!("{}.{}.1.0", me.pid_ns + 1, me.pid)));
        // Names from before the namespace was added: ours, as they were.
        assert!(swept("4194305.1.0"));
        assert!(!swept(&format!("{}.{}.0", me.pid, me.start)));
        // Anything else is left alone.
        for other in ["probe", "1.2", "1.2.3.4.5", "a.b.c", "1.2.x"] {
            assert!(!swept(other), "{other}");
        }
    }

    #[test]
    fn no_hierarchy_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        // A "mount" that is a plain directory: no cgroup.procs appears, so
        // the probe cannot configure it.
        let fake = format!(
            "1 0 0:1 / {0}/m rw - cgroup cgroup rw,memory\n2 0 0:2 / {0}/p rw - cgroup cgroup rw,pids\n",
            tmp.path().display()
        );
        assert!(Cgroups::open_with(&fake, "agentq", "w").is_err());
        assert!(matches!(
            Cgroups::open_with("", "agentq", "w"),
            Err(CgroupError::NotMounted)
        ));
    }
}
