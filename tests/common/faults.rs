//! What the fault suites check after killing workers, Redis or PostgreSQL:
//! the working directories dead workers leave in their private `TMPDIR`
//! ([`WorkerTmp`], swept by the next worker), and exactly one record per
//! attempt, in the ledger or the outbox.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::procs::{Proc, WorkerProc};
use super::queue::{TestQueue, num};

/// A private temp directory (`TMPDIR`) for worker processes, to check
/// what they leave behind: attempt working directories (`agentq-task-*`)
/// and worker directories (`agentq-w-<owner>`, see
/// `agentq::executor::workdir`).
pub struct WorkerTmp(tempfile::TempDir);

impl WorkerTmp {
    pub fn new() -> WorkerTmp {
        WorkerTmp(
            tempfile::Builder::new()
                .prefix("agentq-test-tmp-")
                .tempdir()
                .expect("test temp directory"),
        )
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }

    /// Worker processes started with this directory as their `TMPDIR`.
    pub fn worker_proc(&self) -> WorkerProc {
        WorkerProc {
            tmpdir: Some(self.path().to_path_buf()),
            ..Default::default()
        }
    }

    /// Names of everything agentq made here (`agentq-*`), with the
    /// attempt directories inside worker directories.
    pub fn agentq_entries(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (name, path) in list_dir(self.path()) {
            if !name.starts_with("agentq-") {
                continue;
            }
            out.push(name.clone());
            if name.starts_with(agentq::executor::workdir::WORKER_PREFIX) {
                out.extend(
                    list_dir(&path)
                        .into_iter()
                        .map(|(n, _)| format!("{name}/{n}")),
                );
            }
        }
        out
    }

    /// What dead workers left: worker directories of owners that are gone
    /// (or unreadable names), and attempt directories outside any worker
    /// directory.
    pub fn leaks(&self) -> Vec<String> {
        use agentq::executor::owner::Owner;
        use agentq::executor::workdir::{TASK_PREFIX, WORKER_PREFIX};
        list_dir(self.path())
            .into_iter()
            .map(|(name, _)| name)
            .filter(|name| {
                name.starts_with(TASK_PREFIX)
                    || name
                        .strip_prefix(WORKER_PREFIX)
                        .is_some_and(|tag| Owner::parse(tag).is_none_or(|o| o.is_gone()))
            })
            .collect()
    }

    /// For a test that SIGKILLed workers, after its last worker is gone:
    /// starts a worker on this directory (on a queue nobody uses), waits
    /// until its startup sweep has removed every dead worker's directory,
    /// stops it, and panics if anything of agentq is left.
    pub async fn sweep_and_assert_clean(&self, tq: &TestQueue) {
        let how = self.worker_proc();
        assert!(
            !self.leaks().is_empty(),
            "the killed workers left their directories in {}: {:?}",
            self.path().display(),
            self.agentq_entries()
        );
        let sweeper = Proc(tq.spawn_worker_with(&["--queues", "agentq-sweep-only"], &how));
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.leaks().is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            self.leaks(),
            Vec::<String>::new(),
            "the next worker's startup sweep left these in {}",
            self.path().display()
        );
        // It runs no attempt, so it made no directory of its own.
        drop(sweeper);
        self.assert_clean();
    }

    /// Panics if anything of agentq is left (every worker stopped).
    pub fn assert_clean(&self) {
        let left = self.agentq_entries();
        assert!(
            left.is_empty(),
            "left in the workers' temp directory {}: {left:?}",
            self.path().display()
        );
    }
}

/// (name, path) of each entry of `dir` (none if unreadable).
fn list_dir(dir: &Path) -> Vec<(String, PathBuf)> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .collect()
}

/// Panic unless each job has exactly one record per attempt, numbered
/// 1..=n where n is the job's attempt count, and no record names another
/// job. `records` are (job id, attempt) pairs from the ledger or the outbox.
pub fn assert_one_record_per_attempt(records: &[(String, i64)], ids: &[String], attempts: &[u64]) {
    let mut seen: HashMap<&str, Vec<i64>> = HashMap::new();
    for (job, attempt) in records {
        seen.entry(job.as_str()).or_default().push(*attempt);
    }
    for (id, &n) in ids.iter().zip(attempts) {
        let mut got = seen.remove(id.as_str()).unwrap_or_default();
        got.sort();
        let want: Vec<i64> = (1..=n as i64).collect();
        assert_eq!(got, want, "job {id}: records vs its {n} attempts");
    }
    assert!(
        seen.is_empty(),
        "records of jobs nobody enqueued: {:?}",
        seen.keys()
    );
}

/// (job id, attempt) of every outbox record.
pub fn outbox_attempts(records: &[HashMap<String, String>]) -> Vec<(String, i64)> {
    records
        .iter()
        .map(|r| (r["job"].clone(), num(r, "attempt")))
        .collect()
}
