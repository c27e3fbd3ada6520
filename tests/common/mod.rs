//! Shared test support: a private namespace on the real Redis per test,
//! worker processes, and polling with generous deadlines (never timing).
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
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
        v.into_iter().map(|(_, f)| f).collect()
    }

    /// The fleet-wide running count of each tenant.
    pub async fn running(&self) -> HashMap<String, i64> {
        self.queue
            .client()
            .hgetall(self.queue.keys(0).key(&["running"]))
            .await
            .expect("hgetall")
    }

    /// A worker process on this namespace; `args` are extra flags.
    pub fn spawn_worker(&self, args: &[&str]) -> Child {
        Command::new(bin())
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
        let out = Command::new(bin())
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
