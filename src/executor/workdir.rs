//! Working directories of attempts, grouped per worker process so that the
//! ones a killed worker leaves behind are found and removed.
//!
//! Layout: `<temp dir>/agentq-w-<owner>/agentq-task-<random>/`, where
//! `<owner>` is the worker's [`Owner`] tag (the same identity its attempt
//! cgroups carry). Each attempt gets a fresh 0700 directory, removed when
//! the attempt ends. A worker that is SIGKILLed cannot remove them; the
//! next worker to start on the same temp directory does ([`sweep_stale`]),
//! for owners in its own pid namespace that are gone.
//!
//! - The worker directory is 0711: a task user can reach its own working
//!   directory inside (it is chowned to that user) but cannot list the
//!   others.
//! - The temp directory may be a shared `/tmp`. A worker directory that
//!   already exists is used only when it is a real directory of this user
//!   (not a symlink, not someone else's), and the sweep only removes
//!   directories of this user.

use std::fs::DirBuilder;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use super::owner::Owner;

/// Name prefix of a worker's directory in the temp directory.
pub const WORKER_PREFIX: &str = "agentq-w-";
/// Name prefix of an attempt's working directory.
pub const TASK_PREFIX: &str = "agentq-task-";

/// Mode of a worker directory: traversable, not listable, by others.
const WORKER_MODE: u32 = 0o711;
/// Mode of an attempt's working directory.
const TASK_MODE: u32 = 0o700;

/// One worker process's directory of attempt working directories.
#[derive(Debug)]
pub struct WorkDirs {
    root: PathBuf,
    /// Set once the directory was made or checked to be ours.
    checked: AtomicBool,
}

impl WorkDirs {
    /// The directory of this process in `temp` (made on first use).
    pub fn new(temp: &Path) -> WorkDirs {
        WorkDirs {
            root: temp.join(format!("{WORKER_PREFIX}{}", Owner::me())),
            checked: AtomicBool::new(false),
        }
    }

    /// `<temp>/agentq-w-<owner>`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A fresh, empty 0700 working directory for one attempt; removed when
    /// the returned value is dropped or closed.
    pub fn create(&self) -> io::Result<tempfile::TempDir> {
        if !self.checked.load(Ordering::Acquire) {
            self.make_root()?;
            self.checked.store(true, Ordering::Release);
        }
        match self.make_task_dir() {
            // Removed under us (a temp cleaner): make it again.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.make_root()?;
                self.make_task_dir()
            }
            r => r,
        }
    }

    /// Removes the worker directory if it is empty (on clean shutdown;
    /// anything left is swept after this process is gone).
    pub fn remove(&self) {
        let _ = std::fs::remove_dir(&self.root);
    }

    fn make_task_dir(&self) -> io::Result<tempfile::TempDir> {
        tempfile::Builder::new()
            .prefix(TASK_PREFIX)
            .permissions(std::fs::Permissions::from_mode(TASK_MODE))
            .tempdir_in(&self.root)
    }

    /// Makes the worker directory, or checks that an existing one is ours.
    fn make_root(&self) -> io::Result<()> {
        match DirBuilder::new().mode(WORKER_MODE).create(&self.root) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => check_ours(&self.root)?,
            Err(e) => return Err(e),
        }
        // The umask may have taken bits away.
        std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(WORKER_MODE))
    }
}

/// Fails unless `dir` is a directory (not a symlink) of this user.
fn check_ours(dir: &Path) -> io::Result<()> {
    let m = std::fs::symlink_metadata(dir)?;
    if m.file_type().is_dir() && m.uid() == effective_uid() {
        return Ok(());
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!(
            "{} exists and is not a directory of this user; remove it or give the worker another TMPDIR",
            dir.display()
        ),
    ))
}

fn effective_uid() -> u32 {
    // SAFETY: plain syscall.
    unsafe { libc::geteuid() }
}

/// Removes, from `temp`, the worker directories of owners that are gone
/// (in our pid namespace, see [`Owner::is_gone`]) with everything in them.
/// Only real directories of this user are touched. Returns how many were
/// removed.
pub fn sweep_stale(temp: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(temp) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let path = e.path();
        let stale = e
            .file_name()
            .to_str()
            .and_then(|n| n.strip_prefix(WORKER_PREFIX))
            .and_then(Owner::parse)
            .is_some_and(|o| o.is_gone());
        if !stale || check_ours(&path).is_err() {
            continue;
        }
        match std::fs::remove_dir_all(&path) {
            Ok(()) => removed += 1,
            Err(e) => tracing::warn!(dir = %path.display(), error = %e,
                "could not remove the working directories of a worker that died"),
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
    }

    /// A tag of a worker of ours that is gone (a pid that cannot exist).
    fn gone() -> Owner {
        let max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        Owner {
            pid: max + 1,
            ..Owner::me()
        }
    }

    #[test]
    fn attempt_directories_live_in_the_worker_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let dirs = WorkDirs::new(tmp.path());
        assert_eq!(
            dirs.root(),
            tmp.path().join(format!("agentq-w-{}", Owner::me()))
        );
        let a = dirs.create().unwrap();
        let b = dirs.create().unwrap();
        assert_eq!(a.path().parent(), Some(dirs.root()));
        assert_ne!(a.path(), b.path());
        assert_eq!(mode(dirs.root()), 0o711);
        assert_eq!(mode(a.path()), 0o700);
        // Removed from under us: made again.
        drop((a, b));
        std::fs::remove_dir(dirs.root()).unwrap();
        let c = dirs.create().unwrap();
        drop(c);
        dirs.remove();
        assert!(!dirs.root().exists());
    }

    #[test]
    fn a_planted_symlink_is_not_used() {
        let tmp = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let dirs = WorkDirs::new(tmp.path());
        std::os::unix::fs::symlink(elsewhere.path(), dirs.root()).unwrap();
        let e = dirs.create().unwrap_err();
        assert!(
            e.to_string().contains("not a directory of this user"),
            "{e}"
        );
        assert_eq!(std::fs::read_dir(elsewhere.path()).unwrap().count(), 0);
    }

    #[test]
    fn the_sweep_removes_only_gone_owners_of_this_namespace() {
        let tmp = tempfile::tempdir().unwrap();
        let me = Owner::me();
        let foreign = Owner {
            pid_ns: me.pid_ns + 1,
            ..gone()
        };
        let make = |name: String| {
            let d = tmp.path().join(name);
            std::fs::create_dir_all(d.join("agentq-task-x")).unwrap();
            std::fs::write(d.join("agentq-task-x/file"), "left").unwrap();
            d
        };
        let dead = make(format!("agentq-w-{}", gone()));
        let mine = make(format!("agentq-w-{me}"));
        let theirs = make(format!("agentq-w-{foreign}"));
        let other = make("agentq-w-not-a-tag".into());
        let unrelated = make(format!("something-{}", gone()));
        // A symlink with a dead owner's name: not followed, not removed.
        let target = make("target".into());
        let link = tmp
            .path()
            .join(format!("agentq-w-{}", Owner { start: 7, ..gone() }));
        std::os::unix::fs::symlink(&target, &link).unwrap();

        assert_eq!(sweep_stale(tmp.path()), 1);
        assert!(!dead.exists());
        for kept in [&mine, &theirs, &other, &unrelated, &target] {
            assert!(
                kept.join("agentq-task-x/file").exists(),
                "{}",
                kept.display()
            );
        }
        assert!(link.is_symlink());
        assert_eq!(sweep_stale(&tmp.path().join("missing")), 0);
    }
}
