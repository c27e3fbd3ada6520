//! Shared test support: a private namespace on the real Redis per test,
//! worker processes, and polling with generous deadlines (never timing).
//!
//! Every `agentq` process started here dies with the test: it is spawned
//! with [`die_with_test`] (SIGKILL when the spawning thread exits, even if
//! the test process is aborted), and tests hold it in a [`Proc`] (SIGKILL
//! and reap when dropped, also while a failing test unwinds).
#![allow(dead_code)]

use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agentq::executor::{Handlers, Registry};
use agentq::queue::{Queue, QueueConfig};
use agentq::worker::{Worker, WorkerConfig};
use fred::prelude::*;
use tokio_util::sync::CancellationToken;

/// The Redis the tests use.
pub fn redis_url() -> String {
    std::env::var("AGENTQ_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A fresh namespace for one test.
pub fn namespace(test: &str) -> String {
    format!("t-{test}-{:08x}", rand::random::<u32>())
}

/// The repository's workers directory.
pub fn workers_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("workers")
}

/// The agentq binary built for these tests.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_agentq")
}

/// Makes the process `cmd` starts get SIGKILL when the thread that spawns
/// it exits (`PR_SET_PDEATHSIG`), so a test that fails, or a test process
/// that is aborted or killed, takes its agentq processes along (one was
/// found alive 27 minutes after a failed run, its binary already deleted).
///
/// The signal fires when the spawning *thread* exits, not the process. So
/// spawn from the test's own thread (a `#[tokio::test]` body, or tasks of a
/// current-thread runtime) or from tasks of the test's multi-thread runtime
/// (its worker threads live as long as the test); never from
/// `spawn_blocking`, `block_in_place` or a short-lived `std::thread`, whose
/// exit would kill the child in the middle of the test.
pub fn die_with_test(cmd: &mut Command) -> &mut Command {
    // SAFETY: plain syscall, before the fork.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the hook only makes async-signal-safe calls (prctl, getppid).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The test process died before prctl: no signal will come.
            if libc::getppid() != parent {
                libc::_exit(137);
            }
            Ok(())
        })
    }
}

/// `agentq` (the binary under test) that dies with the test (see
/// [`die_with_test`]); hold what it spawns in a [`Proc`].
pub fn agentq() -> Command {
    let mut cmd = Command::new(bin());
    die_with_test(&mut cmd);
    cmd
}

/// A test's own queue namespace; `cleanup` deletes it.
pub struct TestQueue {
    pub queue: Queue,
    pub ns: String,
}

impl TestQueue {
    pub async fn new(test: &str) -> TestQueue {
        Self::with_url(test, &redis_url()).await
    }

    pub async fn with_url(test: &str, url: &str) -> TestQueue {
        let ns = namespace(test);
        let mut cfg = QueueConfig::new(url);
        cfg.namespace = ns.clone();
        let queue = Queue::connect(cfg)
            .await
            .expect("connect to Redis (set AGENTQ_REDIS_URL)");
        TestQueue { queue, ns }
    }

    /// A fresh namespace whose tenants are spread over `partitions`.
    pub async fn with_partitions(test: &str, partitions: u32) -> TestQueue {
        let ns = namespace(test);
        let mut cfg = QueueConfig::new(redis_url());
        cfg.namespace = ns.clone();
        cfg.partitions = partitions;
        let queue = Queue::connect(cfg)
            .await
            .expect("connect to Redis (set AGENTQ_REDIS_URL)");
        TestQueue { queue, ns }
    }

    pub async fn cleanup(&self) {
        self.queue
            .delete_namespace()
            .await
            .expect("delete test namespace");
    }

    /// Every outbox record of partition 0, in order.
    pub async fn outbox(&self) -> Vec<HashMap<String, String>> {
        let v: Vec<(String, HashMap<String, String>)> = self
            .queue
            .client()
            .xrange(self.queue.keys(0).key(&["outbox"]), "-", "+", None)
            .await
            .expect("xrange");
        v.into_iter()
            .map(|(_, f)| agentq::ledger::outbox_fields(f))
            .collect()
    }

    /// The fleet-wide running count of each tenant.
    pub async fn running(&self) -> HashMap<String, i64> {
        self.queue
            .client()
            .hgetall(self.queue.keys(0).key(&["running"]))
            .await
            .expect("hgetall")
    }

    /// A worker process on this namespace; `args` are extra flags. It dies
    /// with the spawning thread ([`die_with_test`]); hold it in a [`Proc`].
    pub fn spawn_worker(&self, args: &[&str]) -> Child {
        agentq()
            .arg("worker")
            .arg("--no-ledger") // these tests read the outbox; ledger tests give their own schema
            .args(if args.contains(&"--metrics-addr") {
                &[][..]
            } else {
                &["--metrics-addr", "off"][..]
            })
            .args(args)
            .env("AGENTQ_REDIS_URL", self.queue.config().redis_url.clone())
            .env("AGENTQ_NAMESPACE", &self.ns)
            .env("AGENTQ_WORKERS_DIR", workers_dir())
            .env("AGENTQ_LOG", "agentq=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn agentq worker")
    }

    /// Run the CLI on this namespace; returns (exit code, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = agentq()
            .args(args)
            .env("AGENTQ_REDIS_URL", self.queue.config().redis_url.clone())
            .env("AGENTQ_NAMESPACE", &self.ns)
            .env("AGENTQ_LOG", "off")
            .stdin(Stdio::null())
            .output()
            .expect("run agentq");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// An in-process worker with the repository's task programs.
    pub fn start_worker(&self, cfg: WorkerConfig) -> RunningWorker {
        let registry = Registry::load(&workers_dir()).expect("load workers/");
        let stop = CancellationToken::new();
        let w = Worker::new(self.queue.clone(), cfg, registry, Handlers::with_builtins());
        let handle = tokio::spawn(w.run(stop.clone()));
        RunningWorker { stop, handle }
    }
}

/// An in-process worker; `stop` shuts it down gracefully.
pub struct RunningWorker {
    pub stop: CancellationToken,
    pub handle:
        tokio::task::JoinHandle<Result<agentq::worker::WorkerSummary, agentq::queue::QueueError>>,
}

impl RunningWorker {
    pub async fn stop(self) -> agentq::worker::WorkerSummary {
        self.stop.cancel();
        self.handle.await.expect("worker task").expect("worker run")
    }
}

/// Worker config with short leases and backoffs for tests.
pub fn fast_worker(queues: &[&str], concurrency: usize) -> WorkerConfig {
    let mut c = WorkerConfig::new(queues.iter().map(|s| s.to_string()).collect());
    c.concurrency = concurrency;
    c.lease = Duration::from_secs(2);
    c.reap_interval = Duration::from_millis(200);
    c.backoff_base = Duration::from_millis(50);
    c.backoff_max = Duration::from_millis(200);
    c.kill_grace = Duration::from_millis(500);
    c.shutdown_grace = Duration::from_secs(5);
    c.idle_poll = Duration::from_millis(200);
    c.lease_guard = Some(PathBuf::from(bin()));
    c
}

/// Poll `f` until it returns Some, or panic after `limit` with `what`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Wait (up to a minute) until job `id` is in one of `states`; returns it.
pub async fn job_in_state(
    tq: &TestQueue,
    id: &str,
    states: &[&str],
) -> agentq::queue::inspect::JobInfo {
    eventually(
        Duration::from_secs(60),
        &format!("job {id} in {states:?}"),
        || async {
            let info = agentq::queue::inspect::job_info(&tq.queue, id).await.ok()?;
            states.contains(&info.state.as_str()).then_some(info)
        },
    )
    .await
}

/// `GET path` on 127.0.0.1:port; returns (status, body).
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Wait until the namespace has no ready, delayed or running job left.
pub async fn drained(tq: &TestQueue, limit: Duration) {
    eventually(limit, "all jobs finished", || async {
        let s = agentq::queue::inspect::queue_stats(&tq.queue).await.ok()?;
        (s.iter()
            .all(|q| q.ready == 0 && q.delayed == 0 && q.running == 0))
        .then_some(())
    })
    .await
}

/// Most intervals open at once.
pub fn peak_overlap(intervals: &[(i64, i64)]) -> usize {
    agentq::demo::peak_overlap(intervals)
}

/// Number of a field of an outbox record.
pub fn num(r: &HashMap<String, String>, k: &str) -> i64 {
    r.get(k).and_then(|v| v.parse().ok()).unwrap_or(0)
}

pub fn database_url() -> String {
    std::env::var("AGENTQ_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A private schema for one test.
pub struct TestDb {
    pub pool: sqlx::PgPool,
    pub admin: sqlx::PgPool,
    pub schema: String,
}

impl TestDb {
    pub async fn new(test: &str) -> TestDb {
        let schema = format!("t_{test}_{:08x}", rand::random::<u32>());
        let admin = agentq::ledger::connect(&database_url(), None)
            .await
            .expect("connect to PostgreSQL (set AGENTQ_DATABASE_URL)");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&admin)
            .await
            .expect("create schema");
        let pool = agentq::ledger::connect(&database_url(), Some(&schema))
            .await
            .expect("connect");
        agentq::ledger::migrate(&pool).await.expect("migrate");
        TestDb {
            pool,
            admin,
            schema,
        }
    }
    pub async fn rows(&self) -> Vec<(String, i32, String)> {
        sqlx::query_as("SELECT job_id, attempt, outcome FROM usage_ledger ORDER BY job_id, attempt")
            .fetch_all(&self.pool)
            .await
            .expect("select")
    }
    pub async fn cleanup(self) {
        self.pool.close().await;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA {} CASCADE",
            self.schema
        )))
        .execute(&self.admin)
        .await
        .expect("drop schema");
    }
}

// ---- Fault-suite helpers: worker processes with a ledger or a skewed clock,
// signals, ledger reads, lease and counter checks.

/// How to start a worker process beyond [`TestQueue::spawn_worker`]'s defaults.
#[derive(Clone, Debug, Default)]
pub struct WorkerProc {
    /// Write the ledger to this PostgreSQL URL (None: `--no-ledger`).
    pub database_url: Option<String>,
    /// Extra environment, e.g. [`skewed_clock_env`].
    pub env: Vec<(String, String)>,
    /// Pipe stderr (read it with [`LogTail`]) instead of inheriting it.
    pub capture_stderr: bool,
    /// `AGENTQ_LOG` (default `agentq=warn`).
    pub log: Option<String>,
    /// `TMPDIR`: where the worker makes attempt working directories (a
    /// [`WorkerTmp`], to count what is left behind).
    pub tmpdir: Option<PathBuf>,
}

impl TestQueue {
    /// A worker process on this namespace, started as `how` says. It dies
    /// with the spawning thread ([`die_with_test`]); hold it in a [`Proc`].
    pub fn spawn_worker_with(&self, args: &[&str], how: &WorkerProc) -> Child {
        let mut cmd = agentq();
        cmd.arg("worker");
        if let Some(dir) = &how.tmpdir {
            cmd.env("TMPDIR", dir);
        }
        match &how.database_url {
            Some(url) => cmd.env("AGENTQ_DATABASE_URL", url),
            None => cmd.arg("--no-ledger"),
        };
        if !args.contains(&"--metrics-addr") {
            cmd.args(["--metrics-addr", "off"]);
        }
        cmd.args(args)
            .env("AGENTQ_REDIS_URL", self.queue.config().redis_url.clone())
            .env("AGENTQ_NAMESPACE", &self.ns)
            .env("AGENTQ_WORKERS_DIR", workers_dir())
            .env("AGENTQ_LOG", how.log.as_deref().unwrap_or("agentq=warn"))
            .envs(how.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(if how.capture_stderr {
                Stdio::piped()
            } else {
                Stdio::inherit()
            });
        cmd.spawn().expect("spawn agentq worker")
    }

    /// Outbox entries over every partition.
    pub async fn outbox_len(&self) -> u64 {
        let mut n = 0;
        for p in 0..self.queue.partitions() {
            let len: u64 = self
                .queue
                .client()
                .xlen(self.queue.keys(p).key(&["outbox"]))
                .await
                .expect("xlen");
            n += len;
        }
        n
    }

    /// Leases held right now (partition 0): job id -> deadline (Redis ms).
    pub async fn leases(&self) -> Vec<(String, f64)> {
        self.queue
            .client()
            .zrange(
                self.queue.keys(0).key(&["leases"]),
                0,
                -1,
                None,
                false,
                None,
                true,
            )
            .await
            .expect("zrange leases")
    }

    /// Redis server time in ms.
    pub async fn redis_now_ms(&self) -> i64 {
        let t: Vec<String> = self
            .queue
            .client()
            .custom(fred::cmd!("TIME"), Vec::<Value>::new())
            .await
            .expect("TIME");
        let secs: i64 = t[0].parse().expect("secs");
        let micros: i64 = t[1].parse().expect("micros");
        secs * 1000 + micros / 1000
    }

    /// Panic unless every counter says nothing runs or waits: the tenants'
    /// running counts, the queues' stats and the lease set.
    pub async fn assert_quiet(&self) {
        let running = self.running().await;
        assert!(
            running.values().all(|&n| n == 0),
            "running counters back to zero: {running:?}"
        );
        let stats = agentq::queue::inspect::queue_stats(&self.queue)
            .await
            .expect("stats");
        for s in &stats {
            assert_eq!(
                (s.ready, s.delayed, s.running),
                (0, 0, 0),
                "queue {} counters",
                s.queue
            );
        }
        assert_eq!(self.leases().await, vec![], "no lease left");
    }

    /// Every job's (state, attempts, last error), in the order of `ids`.
    pub async fn job_states(&self, ids: &[String]) -> Vec<(String, u64, String)> {
        let infos = futures::future::join_all(
            ids.iter()
                .map(|id| agentq::queue::inspect::job_info(&self.queue, id)),
        )
        .await;
        infos
            .into_iter()
            .zip(ids)
            .map(|(i, id)| {
                let i = i.unwrap_or_else(|e| panic!("job {id} is gone: {e}"));
                (i.state, i.attempts, i.last_error.unwrap_or_default())
            })
            .collect()
    }
}

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
        let how = WorkerProc {
            tmpdir: Some(self.path().to_path_buf()),
            ..Default::default()
        };
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

/// SIGKILL a child process and reap it.
pub fn kill9(c: &mut Child) {
    let _ = c.kill();
    let _ = c.wait();
}

/// Send SIGTERM to a child process.
pub fn sigterm(c: &Child) {
    let pid = libc::pid_t::try_from(c.id()).expect("pid");
    // SAFETY: signalling our own child, not yet reaped.
    unsafe { libc::kill(pid, libc::SIGTERM) };
}

/// A child process that is SIGKILLed and reaped when dropped, so a failing
/// test leaves no worker behind (an orphan holding the test's stderr would
/// also keep `cargo test` waiting for it).
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        kill9(&mut self.0);
    }
}

impl std::ops::Deref for Proc {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

/// Wait (up to `limit`) for a child to exit; its exit code.
pub async fn exit_code(c: &mut Child, limit: Duration) -> Option<i32> {
    let status = eventually(limit, "process exits", || {
        let s = c.try_wait().expect("try_wait");
        async move { s }
    })
    .await;
    status.code()
}

/// `url` with PostgreSQL's search path set to `schema`, for worker
/// processes that write the ledger into a test's schema.
pub fn database_url_in_schema(url: &str, schema: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options%5Bsearch_path%5D={schema}")
}

impl TestDb {
    /// This schema's URL, for worker processes.
    pub fn url(&self) -> String {
        database_url_in_schema(&database_url(), &self.schema)
    }
}

/// libfaketime's multi-threaded preload library, if installed.
pub fn faketime_lib() -> Option<PathBuf> {
    [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
        "/usr/lib/faketime/libfaketimeMT.so.1",
        "/usr/local/lib/faketime/libfaketimeMT.so.1",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
}

/// Environment that runs a process with its wall clock shifted by `offset`
/// (libfaketime syntax, e.g. "+1h", "-1h"). The monotonic clock is left
/// alone: only the wall clock is skewed, as on a host with a wrong clock.
pub fn skewed_clock_env(offset: &str) -> Vec<(String, String)> {
    let lib = faketime_lib().expect(
        "libfaketime is not installed: apt-get install faketime libfaketime (.ci/run does)",
    );
    vec![
        ("LD_PRELOAD".into(), lib.display().to_string()),
        ("FAKETIME".into(), offset.into()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
        ("FAKETIME_NO_CACHE".into(), "1".into()),
    ]
}

/// The lines a child writes to stderr, collected by a thread.
#[derive(Clone, Default)]
pub struct LogTail(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl LogTail {
    /// Start collecting the child's piped stderr.
    pub fn follow(c: &mut Child) -> LogTail {
        use std::io::BufRead;
        let tail = LogTail::default();
        let err = c.stderr.take().expect("stderr piped");
        let lines = tail.0.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                lines.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
        tail
    }
    /// The lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// One usage-ledger row, as the fault tests check it.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct LedgerRow {
    pub job_id: String,
    pub attempt: i32,
    pub tenant: String,
    pub outcome: String,
    pub started_ms: i64,
    pub finished_ms: i64,
    pub error: String,
}

/// Every ledger row, or None while PostgreSQL or the table is not there.
pub async fn ledger_rows(pool: &sqlx::PgPool) -> Option<Vec<LedgerRow>> {
    sqlx::query_as(
        "SELECT job_id, attempt, tenant, outcome, error, \
                (extract(epoch FROM started_at) * 1000)::bigint AS started_ms, \
                (extract(epoch FROM finished_at) * 1000)::bigint AS finished_ms \
         FROM usage_ledger ORDER BY job_id, attempt",
    )
    .fetch_all(pool)
    .await
    .ok()
}

/// Most attempts of each tenant holding a slot at once, from
/// `[started, finished)` of its rows.
pub fn peak_overlap_by_tenant(rows: &[LedgerRow]) -> HashMap<String, usize> {
    let mut by: HashMap<String, Vec<(i64, i64)>> = HashMap::new();
    for r in rows {
        by.entry(r.tenant.clone())
            .or_default()
            .push((r.started_ms, r.finished_ms));
    }
    by.into_iter()
        .map(|(t, iv)| (t, peak_overlap(&iv)))
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

/// (job id, attempt) of every ledger row.
pub fn row_attempts(rows: &[LedgerRow]) -> Vec<(String, i64)> {
    rows.iter()
        .map(|r| (r.job_id.clone(), i64::from(r.attempt)))
        .collect()
}

/// (job id, attempt) of every outbox record.
pub fn outbox_attempts(records: &[HashMap<String, String>]) -> Vec<(String, i64)> {
    records
        .iter()
        .map(|r| (r["job"].clone(), num(r, "attempt")))
        .collect()
}

/// The lease guard process (`agentq __lease-guard`) a worker started.
pub fn lease_guard_of(worker: u32) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let ppid: u32 = stat
            .rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        (ppid == worker && String::from_utf8_lossy(&cmdline).contains("__lease-guard"))
            .then_some(pid)
    })
}
