//! Worker-wide containment of task programs: per-attempt cgroups when the
//! machine allows them (else rlimits), the process cap, the optional
//! unprivileged user tasks run as, and the worker's directory of attempt
//! working directories.
//!
//! One [`Sandbox`] per worker process, installed at startup with
//! [`install`]; [`current`] installs one from the environment when none was
//! (library use, tests). Either way the mode is logged once. Making one
//! removes what dead workers left behind: their attempt cgroups (cgroup
//! mode) and their working directories (every mode).

use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::{Mutex, OnceLock};

use super::cgroup::{Cgroups, Version};
use super::workdir::{self, WorkDirs};

/// Default cgroup parent below each controller's mount point.
pub const DEFAULT_CGROUP_PARENT: &str = "agentq";
/// Default cap on processes and threads of one attempt.
pub const DEFAULT_PIDS_MAX: u64 = 1024;

/// Settings for [`Sandbox::new`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxConfig {
    /// Where attempt cgroups go below each controller's mount point
    /// (`<mount>/<parent>/<worker id>/<attempt>`); `None` disables cgroups.
    pub cgroup_parent: Option<String>,
    /// This worker's id (its cgroup directory name).
    pub worker_id: String,
    /// Most processes and threads one attempt may have at once (cgroup
    /// `pids.max`; in rlimit mode `RLIMIT_NPROC`, which only applies with a
    /// task user).
    pub pids_max: u64,
    /// Run task programs as this user instead of the worker's.
    pub task_user: Option<TaskUser>,
}

impl SandboxConfig {
    /// Settings from `AGENTQ_CGROUP_PARENT` (`off` disables cgroups),
    /// `AGENTQ_TASK_USER` and `AGENTQ_TASK_PIDS_MAX`, else the defaults.
    /// Unreadable values are reported by [`Sandbox::describe`] and ignored.
    pub fn from_env(worker_id: &str) -> FromEnv {
        let mut problems = Vec::new();
        let var = |n: &str| std::env::var(n).ok().filter(|v| !v.is_empty());
        let task_user = var("AGENTQ_TASK_USER").and_then(|v| match v.parse() {
            Ok(u) => Some(u),
            Err(e) => {
                problems.push(format!("AGENTQ_TASK_USER ignored: {e}"));
                None
            }
        });
        let pids_max = match var("AGENTQ_TASK_PIDS_MAX").map(|v| v.parse::<u64>()) {
            Some(Ok(n)) if n > 0 => n,
            Some(_) => {
                problems.push("AGENTQ_TASK_PIDS_MAX ignored: not a positive number".into());
                DEFAULT_PIDS_MAX
            }
            None => DEFAULT_PIDS_MAX,
        };
        let config = SandboxConfig {
            cgroup_parent: parse_cgroup_parent(
                &var("AGENTQ_CGROUP_PARENT").unwrap_or_else(|| DEFAULT_CGROUP_PARENT.into()),
            ),
            worker_id: worker_id.to_string(),
            pids_max,
            task_user,
        };
        FromEnv { config, problems }
    }
}

/// Sandbox settings read from the environment, and what was ignored.
#[derive(Clone, Debug)]
pub struct FromEnv {
    /// The settings in effect.
    pub config: SandboxConfig,
    /// One line per unreadable variable (ignored: its default holds).
    pub problems: Vec<String>,
}

/// `off` (or `none`) means no cgroups; anything else is a parent path.
pub fn parse_cgroup_parent(value: &str) -> Option<String> {
    match value {
        "off" | "none" => None,
        v => Some(v.to_string()),
    }
}

/// The unprivileged identity task programs run as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskUser {
    /// Every attempt runs as this uid and gid.
    Fixed {
        /// User id.
        uid: u32,
        /// Group id.
        gid: u32,
    },
    /// Each running attempt gets a uid of its own from `first..=last`
    /// (gid = uid), so attempts cannot read each other's files or /proc.
    Range {
        /// First uid.
        first: u32,
        /// Last uid (inclusive).
        last: u32,
    },
}

/// A `--task-user` value that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "task user {0:?} is not valid: give a user name (nobody), a uid, uid:gid, or a range FIRST-LAST of unused uids (e.g. 200000-200063); uid 0 is not allowed"
)]
pub struct BadTaskUser(pub String);

impl FromStr for TaskUser {
    type Err = BadTaskUser;

    fn from_str(s: &str) -> Result<TaskUser, BadTaskUser> {
        let bad = || BadTaskUser(s.to_string());
        let num = |t: &str| t.parse::<u32>().ok().filter(|&n| n > 0);
        if let Some((a, b)) = s.split_once('-')
            && let (Some(first), Some(last)) = (num(a), num(b))
        {
            return if first <= last {
                Ok(TaskUser::Range { first, last })
            } else {
                Err(bad())
            };
        }
        if let Some((u, g)) = s.split_once(':') {
            return match (num(u), num(g)) {
                (Some(uid), Some(gid)) => Ok(TaskUser::Fixed { uid, gid }),
                _ => Err(bad()),
            };
        }
        if let Some(uid) = num(s) {
            return Ok(TaskUser::Fixed { uid, gid: uid });
        }
        match lookup_user(s) {
            Some((uid, gid)) if uid > 0 => Ok(TaskUser::Fixed { uid, gid }),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for TaskUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TaskUser::Fixed { uid, gid } => write!(f, "uid {uid} gid {gid}"),
            TaskUser::Range { first, last } => {
                write!(f, "a uid of its own from {first}-{last}")
            }
        }
    }
}

/// uid and gid of a user name from the system's user database (NSS: files,
/// LDAP, ... through `getpwnam_r`, via the `nix` crate).
fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let u = nix::unistd::User::from_name(name).ok()??;
    Some((u.uid.as_raw(), u.gid.as_raw()))
}

/// How task programs are contained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// One cgroup per attempt.
    Cgroup(Version),
    /// rlimits and the process group only.
    Rlimit,
}

/// Containment shared by every attempt of a worker.
#[derive(Debug)]
pub struct Sandbox {
    cgroups: Option<Cgroups>,
    why_not_cgroups: Option<String>,
    problems: Vec<String>,
    pids_max: u64,
    user: Option<TaskUser>,
    uids_in_use: Mutex<BTreeSet<u32>>,
    workdirs: WorkDirs,
}

impl Sandbox {
    /// Opens the cgroups (falling back to rlimits when they are not
    /// usable) and removes stale attempt cgroups and working directories
    /// of dead workers. Working directories go in the temp directory
    /// (`TMPDIR`, else `/tmp`).
    pub fn new(cfg: SandboxConfig) -> Sandbox {
        Sandbox::new_in(cfg, &std::env::temp_dir())
    }

    /// [`Sandbox::new`] with working directories in `temp`.
    pub fn new_in(cfg: SandboxConfig, temp: &Path) -> Sandbox {
        let (cgroups, why_not) = match &cfg.cgroup_parent {
            None => (None, Some("disabled (cgroup parent \"off\")".to_string())),
            Some(parent) => match Cgroups::open(parent, &cfg.worker_id) {
                Ok(c) => {
                    let n = c.sweep_stale();
                    if n > 0 {
                        tracing::info!(
                            removed = n,
                            "removed attempt cgroups left by workers that died"
                        );
                    }
                    (Some(c), None)
                }
                Err(e) => (None, Some(e.to_string())),
            },
        };
        // After the cgroup sweep, which killed what still ran in them.
        let swept = workdir::sweep_stale(temp);
        if swept > 0 {
            tracing::info!(
                removed = swept,
                dir = %temp.display(),
                "removed working directories left by workers that died"
            );
        }
        Sandbox {
            cgroups,
            why_not_cgroups: why_not,
            problems: Vec::new(),
            pids_max: cfg.pids_max.max(1),
            user: cfg.task_user,
            uids_in_use: Mutex::new(BTreeSet::new()),
            workdirs: WorkDirs::new(temp),
        }
    }

    /// No cgroups, no task user: the rlimit path (tests, `--cgroup-parent off`).
    pub fn rlimit_only() -> Sandbox {
        Sandbox::new(SandboxConfig {
            cgroup_parent: None,
            worker_id: String::new(),
            pids_max: DEFAULT_PIDS_MAX,
            task_user: None,
        })
    }

    /// The mode in use.
    pub fn mode(&self) -> Mode {
        match &self.cgroups {
            Some(c) => Mode::Cgroup(c.version()),
            None => Mode::Rlimit,
        }
    }

    /// The per-attempt cgroups, when in cgroup mode.
    pub fn cgroups(&self) -> Option<&Cgroups> {
        self.cgroups.as_ref()
    }

    /// Where attempts' working directories are made.
    pub fn workdirs(&self) -> &WorkDirs {
        &self.workdirs
    }

    /// Process cap per attempt.
    pub fn pids_max(&self) -> u64 {
        self.pids_max
    }

    /// The task user, if any.
    pub fn task_user(&self) -> Option<TaskUser> {
        self.user
    }

    /// Removes this worker's (empty) cgroup directories and directory of
    /// working directories; call after the last attempt ended. Leftovers
    /// are swept by the next worker.
    pub fn shutdown(&self) {
        if let Some(c) = &self.cgroups {
            for d in c.worker_dirs() {
                let _ = std::fs::remove_dir(d);
            }
        }
        self.workdirs.remove();
    }

    /// One line for the startup log: the mode and what it implies.
    pub fn describe(&self) -> String {
        let user = match self.user {
            Some(u) => format!("tasks run as {u}"),
            None => "tasks run as the worker's user".into(),
        };
        let mut s = match (&self.cgroups, &self.why_not_cgroups) {
            (Some(c), _) => format!(
                "task containment: cgroup {} per attempt in {} (memory cap, {} processes at most, peak memory and OOM kills from the cgroup, every process killed at the end); {user}",
                match c.version() {
                    Version::V2 => "v2",
                    Version::V1 => "v1",
                },
                c.worker_dirs()
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                self.pids_max,
            ),
            (None, why) => format!(
                "task containment: rlimits (memory cap is RLIMIT_DATA per process, no process cap{}, descendants that leave the process group can outlive the attempt, peak RSS only known when it rises above the worker's own RSS, else reported as 0) because cgroups are not used: {}; {user}",
                if self.user.is_some() {
                    " beyond RLIMIT_NPROC per uid"
                } else {
                    ""
                },
                why.as_deref().unwrap_or("unknown"),
            ),
        };
        s.push_str(&format!(
            "; working directories in {}",
            self.workdirs.root().display()
        ));
        for p in &self.problems {
            s.push_str("; ");
            s.push_str(p);
        }
        s
    }

    /// Takes the uid and gid for one attempt (None: run as the worker).
    /// With a range, a uid no other running attempt of this worker has.
    pub fn lease_user(&self) -> Result<Option<UserLease<'_>>, String> {
        let (uid, gid, ranged) = match self.user {
            None => return Ok(None),
            Some(TaskUser::Fixed { uid, gid }) => (uid, gid, false),
            Some(TaskUser::Range { first, last }) => {
                let mut used = self.uids_in_use.lock().unwrap_or_else(|p| p.into_inner());
                let Some(uid) = (first..=last).find(|u| !used.contains(u)) else {
                    return Err(format!(
                        "no free task uid: all of {first}-{last} are in use by running attempts (give --task-user a range at least as large as --concurrency)"
                    ));
                };
                used.insert(uid);
                (uid, uid, true)
            }
        };
        Ok(Some(UserLease {
            sandbox: self,
            uid,
            gid,
            ranged,
        }))
    }
}

/// The identity of one attempt; a ranged uid is given back on drop.
#[derive(Debug)]
pub struct UserLease<'a> {
    sandbox: &'a Sandbox,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    ranged: bool,
}

impl Drop for UserLease<'_> {
    fn drop(&mut self) {
        if self.ranged {
            let mut used = self
                .sandbox
                .uids_in_use
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            used.remove(&self.uid);
        }
    }
}

static GLOBAL: OnceLock<Sandbox> = OnceLock::new();

/// Installs the worker's sandbox (first call wins) and logs its mode once.
pub fn install(cfg: SandboxConfig) -> &'static Sandbox {
    install_with_problems(cfg, Vec::new())
}

fn install_with_problems(cfg: SandboxConfig, problems: Vec<String>) -> &'static Sandbox {
    let mut fresh = false;
    let sb = GLOBAL.get_or_init(|| {
        fresh = true;
        let mut sb = Sandbox::new(cfg);
        sb.problems = problems;
        sb
    });
    if fresh {
        match sb.mode() {
            Mode::Cgroup(_) => tracing::info!("{}", sb.describe()),
            Mode::Rlimit => tracing::warn!("{}", sb.describe()),
        }
    }
    sb
}

/// The installed sandbox; installs one from the environment
/// ([`SandboxConfig::from_env`], worker id `inproc-<pid>`) on first use.
pub fn current() -> &'static Sandbox {
    if let Some(sb) = GLOBAL.get() {
        return sb;
    }
    let env = SandboxConfig::from_env(&format!("inproc-{}", std::process::id()));
    install_with_problems(env.config, env.problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_user_values() {
        assert_eq!(
            "65534".parse::<TaskUser>().unwrap(),
            TaskUser::Fixed {
                uid: 65534,
                gid: 65534
            }
        );
        assert_eq!(
            "1000:100".parse::<TaskUser>().unwrap(),
            TaskUser::Fixed {
                uid: 1000,
                gid: 100
            }
        );
        assert_eq!(
            "200000-200003".parse::<TaskUser>().unwrap(),
            TaskUser::Range {
                first: 200000,
                last: 200003
            }
        );
        for bad in ["0", "root", "5-1", "x:1", "no-such-user-xyz", "", "0:0"] {
            let e = bad.parse::<TaskUser>().unwrap_err().to_string();
            assert!(e.contains("not valid"), "{bad}: {e}");
        }
        if lookup_user("nobody").is_some() {
            assert!(matches!(
                "nobody".parse::<TaskUser>().unwrap(),
                TaskUser::Fixed { .. }
            ));
        }
    }

    #[test]
    fn ranged_uids_are_distinct_and_returned() {
        let mut sb = Sandbox::rlimit_only();
        sb.user = Some(TaskUser::Range {
            first: 300000,
            last: 300001,
        });
        let a = sb.lease_user().unwrap().unwrap();
        let b = sb.lease_user().unwrap().unwrap();
        assert_ne!(a.uid, b.uid);
        assert!(sb.lease_user().unwrap_err().contains("no free task uid"));
        let freed = a.uid;
        drop(a);
        assert_eq!(sb.lease_user().unwrap().unwrap().uid, freed);
        drop(b);
    }

    #[test]
    fn off_means_rlimits() {
        assert_eq!(parse_cgroup_parent("off"), None);
        assert_eq!(parse_cgroup_parent("agentq"), Some("agentq".into()));
        let sb = Sandbox::rlimit_only();
        assert_eq!(sb.mode(), Mode::Rlimit);
        assert!(sb.describe().contains("rlimits"), "{}", sb.describe());
    }
}
