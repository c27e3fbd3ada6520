//! Which worker process made a leftover, and whether it is gone.
//!
//! A worker leaves things behind when it is killed: attempt cgroups
//! ([`super::cgroup`]) and the working directories of its attempts
//! ([`super::workdir`]). Their names carry the worker's identity, its
//! [`Owner`] tag `<pid namespace>.<pid>.<start time>`, so the next worker to
//! start can remove what belongs to workers that no longer run.
//!
//! - A pid alone is reused; the pid with the process's start time (clock
//!   ticks since boot, field 22 of `/proc/<pid>/stat`) names one process.
//! - A pid only means something inside its pid namespace. Workers in
//!   different containers may share one cgroup tree or one temp directory;
//!   there a live worker's pid is invisible, or names another process. So
//!   the tag starts with the pid namespace (the inode of `/proc/self/ns/pid`)
//!   and an owner from another namespace is never judged gone: its leftovers
//!   are only removed once empty, by whoever is allowed to.
//! - Attempt cgroups named before the namespace was added
//!   (`<pid>.<start>.<seq>`) are read as this namespace's, as they were.

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::sync::OnceLock;

/// A worker process: its pid namespace, pid and start time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Owner {
    /// Inode of the owner's `/proc/self/ns/pid` (0: unknown).
    pub pid_ns: u64,
    /// Process id inside that namespace.
    pub pid: u32,
    /// Start time in clock ticks since boot.
    pub start: u64,
}

impl Owner {
    /// This process (read once).
    pub fn me() -> Owner {
        static ME: OnceLock<Owner> = OnceLock::new();
        *ME.get_or_init(|| {
            let pid = std::process::id();
            Owner {
                pid_ns: pid_namespace().unwrap_or(0),
                pid,
                start: start_time(pid).unwrap_or(0),
            }
        })
    }

    /// The running process `pid` (as seen from here), if it exists.
    pub fn of(pid: u32) -> Option<Owner> {
        let ns = std::fs::metadata(format!("/proc/{pid}/ns/pid")).ok()?;
        Some(Owner {
            pid_ns: ns.ino(),
            pid,
            start: start_time(pid)?,
        })
    }

    /// Reads a tag `<pid namespace>.<pid>.<start>` (see [`Owner`]'s
    /// `Display`). None for anything else.
    pub fn parse(tag: &str) -> Option<Owner> {
        let mut parts = tag.split('.');
        let (Some(ns), Some(pid), Some(start), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        Some(Owner {
            pid_ns: number(ns)?,
            pid: u32::try_from(number(pid)?).ok().filter(|&p| p > 0)?,
            start: number(start)?,
        })
    }

    /// Reads an attempt name `<tag>.<seq>`, or the older `<pid>.<start>.<seq>`
    /// (read as this pid namespace's). None for anything else.
    pub fn parse_attempt(name: &str) -> Option<Owner> {
        let (rest, seq) = name.rsplit_once('.')?;
        number(seq)?;
        if rest.split('.').count() == 2 {
            return Owner::parse(&format!("{}.{rest}", Owner::me().pid_ns));
        }
        Owner::parse(rest)
    }

    /// True when this owner was in our pid namespace and no longer runs (no
    /// process with its pid and start time). False for owners in other
    /// namespaces, and when our own namespace is unknown: we cannot tell.
    pub fn is_gone(&self) -> bool {
        let me = Owner::me();
        me.pid_ns != 0 && self.pid_ns == me.pid_ns && start_time(self.pid) != Some(self.start)
    }
}

/// The tag: `<pid namespace>.<pid>.<start>`.
impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.pid_ns, self.pid, self.start)
    }
}

/// Plain decimal digits only (no sign, no spaces).
fn number(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Inode of this process's pid namespace.
fn pid_namespace() -> Option<u64> {
    std::fs::metadata("/proc/self/ns/pid").ok().map(|m| m.ino())
}

/// Field 22 of `/proc/<pid>/stat` (start time in clock ticks since boot).
pub(crate) fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    // rest starts at field 3 (state); starttime is field 22.
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pid above the kernel's maximum: never a running process.
    fn no_such_pid() -> u32 {
        let max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(4_194_304);
        max + 1
    }

    #[test]
    fn me_is_known_and_alive() {
        let me = Owner::me();
        assert_ne!(me.pid_ns, 0);
        assert_eq!(me.pid, std::process::id());
        assert_ne!(me.start, 0);
        assert!(!me.is_gone());
        assert_eq!(Owner::of(me.pid), Some(me));
        assert_eq!(Owner::of(no_such_pid()), None);
    }

    #[test]
    fn tags_round_trip() {
        let o = Owner {
            pid_ns: 4026531836,
            pid: 42,
            start: 123456,
        };
        assert_eq!(o.to_string(), "4026531836.42.123456");
        assert_eq!(Owner::parse(&o.to_string()), Some(o));
        assert_eq!(Owner::parse_attempt(&format!("{o}.7")), Some(o));
        for bad in [
            "", "1.2", "1.2.3.4", "a.b.c", "1.0.3", "1.-2.3", "1.+2.3", "1. 2.3", "1..3",
        ] {
            assert_eq!(Owner::parse(bad), None, "{bad:?}");
        }
        for bad in ["probe", "1.2", "1.2.3.4.5", "1.2.3.x", "a.b.c", "1.2.3."] {
            assert_eq!(Owner::parse_attempt(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn old_attempt_names_are_this_namespace() {
        let me = Owner::me();
        assert_eq!(
            Owner::parse_attempt("42.99.3"),
            Some(Owner {
                pid_ns: me.pid_ns,
                pid: 42,
                start: 99
            })
        );
    }

    #[test]
    fn only_dead_owners_of_this_namespace_are_gone() {
        let me = Owner::me();
        let dead = Owner {
            pid: no_such_pid(),
            ..me
        };
        assert!(dead.is_gone());
        // Our pid with another start time: a reused pid, the owner is gone.
        assert!(Owner { start: 1, ..me }.is_gone());
        // Another namespace: never judged, whatever its pid says here.
        assert!(
            !Owner {
                pid_ns: me.pid_ns + 1,
                ..dead
            }
            .is_gone()
        );
        assert!(
            !Owner {
                pid_ns: me.pid_ns + 1,
                start: 1,
                ..me
            }
            .is_gone()
        );
        let old = Owner::parse_attempt(&format!("{}.1.0", no_such_pid())).unwrap();
        assert!(old.is_gone());
    }
}
