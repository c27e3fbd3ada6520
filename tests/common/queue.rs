//! A test's own queue namespace on the real Redis ([`TestQueue`]): jobs
//! enqueued, tenants' limits, workers run in process ([`RunningWorker`]),
//! what the namespace holds (outbox, running counts, leases, job states),
//! and polling with generous deadlines ([`eventually`]), never timing.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use agentq::executor::{Handlers, Registry};
use agentq::model::limits::{LimitsUpdate, Rate, Target};
use agentq::queue::{JobSpec, Queue, QueueConfig};
use agentq::worker::{Worker, WorkerConfig};
use fred::prelude::*;
use tokio_util::sync::CancellationToken;

use super::procs::{bin, workers_dir};

/// The Redis the tests use.
pub fn redis_url() -> String {
    std::env::var("AGENTQ_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A fresh namespace for one test.
pub fn namespace(test: &str) -> String {
    format!("t-{test}-{:08x}", rand::random::<u32>())
}

/// A test's own queue namespace; `cleanup` deletes it. A clone is another
/// handle on the same namespace (for a task or a thread).
#[derive(Clone)]
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
            .map(|(_, f)| agentq::model::record::outbox_fields(f))
            .collect()
    }

    /// The outcome of every outbox record of partition 0, in order.
    pub async fn outbox_outcomes(&self) -> Vec<String> {
        self.outbox()
            .await
            .iter()
            .map(|r| r["outcome"].clone())
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

    /// Enqueue one job; its id.
    pub async fn enqueue(&self, spec: &JobSpec) -> String {
        self.queue.enqueue(spec).await.expect("enqueue").id
    }

    /// Enqueue `specs` in batches of 500; the ids in order.
    pub async fn enqueue_all(&self, specs: &[JobSpec]) -> Vec<String> {
        let mut ids = Vec::with_capacity(specs.len());
        for chunk in specs.chunks(500) {
            let done = self.queue.enqueue_batch(chunk).await.expect("enqueue");
            ids.extend(done.into_iter().map(|e| e.id));
        }
        ids
    }

    /// An in-process worker with the repository's task programs.
    pub fn start_worker(&self, cfg: WorkerConfig) -> RunningWorker {
        let registry = Registry::load(&workers_dir()).expect("load workers/");
        self.start_worker_with(cfg, registry, None)
    }

    /// An in-process worker with the task programs of `registry` and the
    /// built-in handlers, writing the ledger to `ledger` if given.
    pub fn start_worker_with(
        &self,
        cfg: WorkerConfig,
        registry: Registry,
        ledger: Option<sqlx::PgPool>,
    ) -> RunningWorker {
        let stop = CancellationToken::new();
        let mut w = Worker::new(self.queue.clone(), cfg, registry, Handlers::with_builtins());
        if let Some(pool) = ledger {
            w = w.with_ledger(pool);
        }
        let handle = tokio::spawn(w.run(stop.clone()));
        RunningWorker { stop, handle }
    }

    /// An in-process worker with the repository's task programs that
    /// writes the ledger to `pool`.
    pub fn start_ledger_worker(&self, cfg: WorkerConfig, pool: &sqlx::PgPool) -> RunningWorker {
        let registry = Registry::load(&workers_dir()).expect("registry");
        self.start_worker_with(cfg, registry, Some(pool.clone()))
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
    agentq::cli::demo::peak_overlap(intervals)
}

/// Number of a field of an outbox record.
pub fn num(r: &HashMap<String, String>, k: &str) -> i64 {
    r.get(k).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Apply `update` to `tenant`'s limits.
pub async fn set_limits(q: &Queue, tenant: &str, update: LimitsUpdate) {
    update
        .apply(q, Target::Tenant(tenant))
        .await
        .expect("tenant set");
}

/// Set `tenant`'s concurrency cap.
pub async fn set_cap(q: &Queue, tenant: &str, cap: u64) {
    let update = LimitsUpdate {
        max_concurrency: Some(cap),
        ..Default::default()
    };
    set_limits(q, tenant, update).await;
}

/// Set `tenant`'s concurrency cap and fair-share weight.
pub async fn set_cap_and_weight(q: &Queue, tenant: &str, cap: u64, weight: u64) {
    let update = LimitsUpdate {
        max_concurrency: Some(cap),
        weight: Some(weight),
        ..Default::default()
    };
    set_limits(q, tenant, update).await;
}

/// Set `tenant`'s job start rate: `starts` per second, with `burst`.
pub async fn set_rate(q: &Queue, tenant: &str, starts: u64, burst: Option<u64>) {
    let update = LimitsUpdate {
        rate: Some(Rate {
            starts,
            period: Duration::from_secs(1),
        }),
        burst,
        ..Default::default()
    };
    set_limits(q, tenant, update).await;
}

/// `n` jobs of `tenant` on `queue` of kind noop, payloads `{"i": 0..n}`.
pub async fn fill(q: &Queue, tenant: &str, queue: &str, n: usize) {
    let jobs: Vec<JobSpec> = (0..n)
        .map(|i| JobSpec::new(tenant, queue, "noop").payload(&serde_json::json!({ "i": i })))
        .collect();
    q.enqueue_batch(&jobs).await.expect("enqueue");
}
