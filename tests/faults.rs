//! Fault suite (issue 7): worker crashes, a Redis SIGKILL and restart, Redis
//! full, a PostgreSQL outage while workers are killed, skewed worker clocks,
//! and SIGTERM under load.
//!
//! Each test starts what it needs (private servers on free ports where it
//! must stop them), works in its own namespace and schema, and cleans up, so
//! the tests run in parallel. Workers run with a private `TMPDIR`
//! ([`WorkerTmp`]); each test ends by checking that no working directory is
//! left, after the startup sweep of a fresh worker where it killed some. Deadlines are generous; nothing here measures
//! speed. `cargo test --test faults -- --nocapture` prints the figures.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentq::queue::inspect::queue_stats;
use agentq::queue::{JobSpec, QueueError};
use agentq_servers::{PrivatePostgres, PrivateRedis};
use common::{
    LedgerRow, Proc, TestDb, TestQueue, WorkerProc, WorkerTmp, drained, eventually, ledger_rows,
    sigterm,
};
use fred::prelude::*;
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// Generous deadline for anything that waits; never a speed assertion.
const PATIENCE: Duration = Duration::from_secs(240);

/// What a job was built to do, so its end can be judged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Meant {
    /// echo or a short sleep: must succeed.
    Succeed,
    /// exits 1 every time: retried, then dead with its own error.
    FailRetried,
    /// exits 65: dead at once with its own error.
    FailPermanent,
    /// sleeps past its timeout: timed out, retried, then dead.
    TimeOut,
}

/// Set each tenant's concurrency cap.
async fn set_caps(tq: &TestQueue, caps: &HashMap<String, u64>) {
    for (t, &cap) in caps {
        common::set_cap(&tq.queue, t, cap).await;
    }
}

/// True when no job of the namespace is ready, delayed or running.
async fn is_drained(tq: &TestQueue) -> bool {
    queue_stats(&tq.queue).await.is_ok_and(|s| {
        s.iter()
            .all(|q| q.ready == 0 && q.delayed == 0 && q.running == 0)
    })
}

/// A fleet of worker processes that a killer task SIGKILLs and restarts.
struct Fleet {
    procs: Arc<Mutex<Vec<Proc>>>,
    kills: Arc<Mutex<u32>>,
}

impl Fleet {
    fn start(tq: &TestQueue, n: usize, args: &[&str], how: &WorkerProc) -> Fleet {
        let procs = (0..n)
            .map(|_| Proc(tq.spawn_worker_with(args, how)))
            .collect();
        Fleet {
            procs: Arc::new(Mutex::new(procs)),
            kills: Arc::new(Mutex::new(0)),
        }
    }

    /// SIGKILL a random worker every `every` (jittered), restarting it at
    /// once, until the returned [`Killer`] is stopped.
    fn kill_randomly(
        &self,
        tq: &TestQueue,
        every: Duration,
        args: &[&str],
        how: &WorkerProc,
    ) -> Killer {
        let (procs, kills) = (self.procs.clone(), self.kills.clone());
        let tq = tq.clone();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let how = how.clone();
        let stop = CancellationToken::new();
        let cancelled = stop.clone();
        let task = tokio::spawn(async move {
            loop {
                let ms = every.as_millis() as u64;
                let wait = Duration::from_millis(rand::random_range(ms / 2..=ms * 3 / 2));
                tokio::select! {
                    _ = cancelled.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                let argv: Vec<&str> = args.iter().map(String::as_str).collect();
                let mut ps = procs.lock().unwrap_or_else(|p| p.into_inner());
                let i = rand::random_range(0..ps.len());
                // Dropping the old one SIGKILLs it.
                ps[i] = Proc(tq.spawn_worker_with(&argv, &how));
                *kills.lock().unwrap_or_else(|p| p.into_inner()) += 1;
            }
        });
        Killer { stop, task }
    }

    fn kills(&self) -> u32 {
        *self.kills.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every worker is still the process it was (none exited by itself).
    fn all_alive(&self) -> bool {
        let mut ps = self.procs.lock().unwrap_or_else(|p| p.into_inner());
        ps.iter_mut().all(|c| matches!(c.try_wait(), Ok(None)))
    }

    fn kill_all(&self) {
        self.procs.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

/// The task that SIGKILLs a [`Fleet`]'s workers.
struct Killer {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Killer {
    /// No more kills; returns once the task has ended.
    async fn stop(self) {
        self.stop.cancel();
        self.task.await.expect("killer");
    }
}

/// Outbox entries delivered to a ledger writer and not yet acknowledged.
async fn outbox_pending(tq: &TestQueue) -> u64 {
    let key = tq.queue.keys(0).key(&["outbox"]);
    let v: Result<Vec<Value>, _> = tq
        .queue
        .client()
        .custom(
            fred::cmd!("XPENDING"),
            vec![Value::from(key), Value::from(agentq::queue::outbox::GROUP)],
        )
        .await;
    v.ok()
        .and_then(|v| v.first().and_then(|n| n.as_u64()))
        .unwrap_or(0)
}

/// Wait until the ledger holds `total` rows and the outbox is empty (nothing
/// pending, nothing left in the stream). Returns the rows.
async fn ledger_caught_up(tq: &TestQueue, pool: &sqlx::PgPool, total: u64) -> Vec<LedgerRow> {
    eventually(PATIENCE, "every attempt in the ledger", || async {
        let rows = ledger_rows(pool).await?;
        // Written rows leave the outbox entirely (deleted, then acknowledged),
        // even when a writer was killed between the insert and the delete.
        let done = rows.len() as u64 >= total
            && outbox_pending(tq).await == 0
            && tq.outbox().await.is_empty();
        done.then_some(rows)
    })
    .await
}

// ---------------------------------------------------------------------------
// Worker crashes: 5,000 mixed jobs, 20 tenants, 3 workers, SIGKILL every few s.

const TENANTS: usize = 20;
const JOBS: usize = 5000;

/// Job `i` of the crash workload: tenant `t00`..`t19`; per tenant (250
/// jobs) 3 that always fail (6 attempts), 3 permanent failures, 2 that time
/// out (6 attempts, so kills are unlikely to use them all up before their
/// own failure shows), the rest echo or a 10-50 ms sleep (20 attempts, so
/// crashes alone never use them up).
fn crash_job(i: usize) -> (JobSpec, Meant) {
    let tenant = format!("t{:02}", i % TENANTS);
    let n = i / TENANTS;
    let (mut s, meant, attempts) = match n {
        _ if n % 80 == 1 => (
            JobSpec::new(&tenant, "q", "fail")
                .payload(&json!({"code": 1, "message": format!("flaky-{i}")})),
            Meant::FailRetried,
            6,
        ),
        _ if n % 80 == 2 => (
            JobSpec::new(&tenant, "q", "fail")
                .payload(&json!({"code": 65, "message": format!("bad-input-{i}")})),
            Meant::FailPermanent,
            20,
        ),
        _ if n % 120 == 3 => {
            let mut s = JobSpec::new(&tenant, "q", "sleep").payload(&json!({"ms": 5000}));
            s.timeout = Some(Duration::from_millis(300));
            (s, Meant::TimeOut, 6)
        }
        _ if n.is_multiple_of(2) => (
            JobSpec::new(&tenant, "q", "sleep").payload(&json!({"ms": 10 + (i * 7) % 41})),
            Meant::Succeed,
            20,
        ),
        _ => (
            JobSpec::new(&tenant, "q", "echo").payload(&json!({"i": i})),
            Meant::Succeed,
            20,
        ),
    };
    s.max_attempts = Some(attempts);
    (s, meant)
}

/// Panic unless the job ended as it was built to: succeeded, or dead with
/// at least one attempt that failed for its own reason (a crash can use up
/// an attempt, but never makes a job die that had no failure of its own).
fn assert_own_end(id: &str, meant: Meant, state: &str, last_error: &str, rows: &[&LedgerRow]) {
    let own = |outcome: &str, text: &str| {
        rows.iter()
            .any(|r| r.outcome == outcome && r.error.contains(text))
    };
    match meant {
        Meant::Succeed => assert_eq!(state, "succeeded", "job {id}: {last_error}"),
        Meant::FailPermanent => {
            assert_eq!(state, "dead", "job {id}");
            assert!(last_error.contains("bad-input-"), "job {id}: {last_error}");
        }
        Meant::FailRetried => {
            assert_eq!(state, "dead", "job {id}");
            assert!(own("failed", "flaky-"), "job {id}: {rows:?}");
        }
        Meant::TimeOut => {
            assert_eq!(state, "dead", "job {id}");
            assert!(own("timed_out", ""), "job {id}: {rows:?}");
        }
    }
}

/// Each tenant's cap in the crash workload: 2 or 3, summing to 50.
fn crash_caps() -> HashMap<String, u64> {
    (0..TENANTS)
        .map(|t| (format!("t{t:02}"), 2 + (t % 2) as u64))
        .collect()
}

/// 3 x 16 slots against caps summing to 50: the caps, not the slots, bind.
const CRASH_ARGS: [&str; 10] = [
    "--queues",
    "q",
    "--concurrency",
    "16",
    "--lease",
    "2s",
    "--backoff-base",
    "50ms",
    "--kill-grace",
    "200ms",
];

/// Once the namespace is drained, the writers (still running) move every
/// record to PostgreSQL: waits until the ledger holds every attempt of the
/// jobs whose (state, attempts, last error) are `states`. The attempt
/// counts and the ledger rows.
async fn ledger_has_every_attempt(
    tq: &TestQueue,
    pool: &sqlx::PgPool,
    states: &[(String, u64, String)],
) -> (Vec<u64>, Vec<LedgerRow>) {
    let attempts: Vec<u64> = states.iter().map(|s| s.1).collect();
    let total: u64 = attempts.iter().sum();
    let rows = ledger_caught_up(tq, pool, total).await;
    (attempts, rows)
}

/// Panic unless each job ended as it was built to ([`assert_own_end`]),
/// judged by its state, last error and its own ledger rows.
fn assert_each_job_ended_as_meant(
    ids: &[String],
    meant: &[Meant],
    states: &[(String, u64, String)],
    rows: &[LedgerRow],
) {
    let mut by_job: HashMap<&str, Vec<&LedgerRow>> = HashMap::new();
    for r in rows {
        by_job.entry(r.job_id.as_str()).or_default().push(r);
    }
    for ((id, m), (state, _, err)) in ids.iter().zip(meant).zip(states) {
        assert_own_end(id, *m, state, err, &by_job[id.as_str()]);
    }
}

/// Panic unless no tenant ever had more attempts holding slots at once
/// than its cap, and at least half the tenants reached theirs. How many
/// did.
fn assert_every_cap_held_and_binding(rows: &[LedgerRow], caps: &HashMap<String, u64>) -> usize {
    let peaks = common::peak_overlap_by_tenant(rows);
    for (t, &cap) in caps {
        assert!(
            peaks[t] <= cap as usize,
            "tenant {t}: {} attempts held slots at once, cap {cap}",
            peaks[t]
        );
    }
    let at_cap = caps
        .iter()
        .filter(|(t, c)| peaks[*t] == **c as usize)
        .count();
    assert!(
        at_cap >= TENANTS / 2,
        "caps bind: {at_cap} tenants reached theirs ({peaks:?})"
    );
    at_cap
}

/// Panic unless some ledger rows are attempts the kills cut short (lost);
/// how many.
fn assert_kills_cut_attempts_short(rows: &[LedgerRow]) -> usize {
    let lost = rows.iter().filter(|r| r.outcome == "lost").count();
    assert!(lost > 0, "the kills cut attempts short");
    lost
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_crashes_lose_no_job_and_keep_every_cap() {
    let started = std::time::Instant::now();
    let tq = TestQueue::new("faults-crash").await;
    let db = TestDb::new("faults_crash").await;
    let caps = crash_caps();
    set_caps(&tq, &caps).await;
    let (specs, meant): (Vec<JobSpec>, Vec<Meant>) = (0..JOBS).map(crash_job).unzip();
    let ids = tq.enqueue_all(&specs).await;

    let tmp = WorkerTmp::new();
    let how = WorkerProc {
        database_url: Some(db.url()),
        ..tmp.worker_proc()
    };
    let fleet = Fleet::start(&tq, 3, &CRASH_ARGS, &how);
    let killer = fleet.kill_randomly(&tq, Duration::from_secs(2), &CRASH_ARGS, &how);
    drained(&tq, PATIENCE).await;
    killer.stop().await;
    let ran_for = started.elapsed();
    let states = tq.job_states(&ids).await;
    let (attempts, rows) = ledger_has_every_attempt(&tq, &db.pool, &states).await;
    fleet.kill_all();

    common::assert_one_record_per_attempt(&common::row_attempts(&rows), &ids, &attempts);
    assert_each_job_ended_as_meant(&ids, &meant, &states, &rows);
    let at_cap = assert_every_cap_held_and_binding(&rows, &caps);
    let lost = assert_kills_cut_attempts_short(&rows);
    tq.assert_quiet().await;
    eprintln!(
        "crashes: {JOBS} jobs, {} attempts, {} rows, {lost} lost to {} kills, \
         {at_cap}/{TENANTS} tenants at cap, drained in {ran_for:?}; outbox empty",
        attempts.iter().sum::<u64>(),
        rows.len(),
        fleet.kills()
    );
    tmp.sweep_and_assert_clean(&tq).await;
    db.cleanup().await;
    tq.cleanup().await;
}

// ---------------------------------------------------------------------------
// Redis SIGKILL and restart (AOF, appendfsync always) while jobs run.

/// Enqueue one job at a time until `stop`, each with its own idempotency key
/// and retried until acknowledged (the pattern for exactly-once enqueue over
/// a flaky connection). Returns the acknowledged ids and the errors seen.
async fn enqueue_until(tq: &TestQueue, stop: CancellationToken) -> (Vec<String>, u32) {
    let (mut acked, mut errors) = (Vec::new(), 0);
    for i in 0.. {
        if stop.is_cancelled() {
            break;
        }
        let kind = if i % 2 == 0 { "echo" } else { "sleep" };
        let mut s =
            JobSpec::new(format!("r{}", i % 4), "q", kind).payload(&json!({"ms": 20 + i % 50}));
        s.max_attempts = Some(20);
        s.idempotency_key = Some(format!("e{i}"));
        loop {
            match tq.queue.enqueue(&s).await {
                Ok(e) => {
                    acked.push(e.id);
                    break;
                }
                Err(_) => {
                    errors += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (acked, errors)
}

/// While a producer enqueues ([`enqueue_until`]): 2 s of work, Redis
/// SIGKILLed (no shutdown, no final fsync), down for longer than the
/// lease, restarted, 2 s more. Returns the acknowledged ids, the enqueue
/// errors retried, and how many jobs ran at the kill.
async fn kill_and_restart_redis_while_enqueueing(
    tq: &TestQueue,
    redis: &mut PrivateRedis,
) -> (Vec<String>, u32, i64) {
    let stop = CancellationToken::new();
    let producer = {
        let (tq, stop) = (tq.clone(), stop.clone());
        tokio::spawn(async move { enqueue_until(&tq, stop).await })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let running_at_kill = tq.running().await.values().sum::<i64>();
    redis.kill(); // SIGKILL: no shutdown, no final fsync
    tokio::time::sleep(Duration::from_secs(3)).await; // longer than the lease
    tokio::task::block_in_place(|| redis.restart()).expect("restart redis");
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    let (acked, errors) = producer.await.expect("producer");
    (acked, errors, running_at_kill)
}

/// Panic unless every acknowledged job succeeded, with one outbox record
/// per attempt and no record of another job. The records.
async fn assert_each_acknowledged_job_succeeded_once(
    tq: &TestQueue,
    acked: &[String],
) -> Vec<HashMap<String, String>> {
    let states = tq.job_states(acked).await;
    for (id, (state, _, err)) in acked.iter().zip(&states) {
        assert_eq!(state, "succeeded", "acknowledged job {id}: {err}");
    }
    // One record per attempt, and no job but the acknowledged ones.
    let records = tq.outbox().await;
    let attempts: Vec<u64> = states.iter().map(|s| s.1).collect();
    common::assert_one_record_per_attempt(&common::outbox_attempts(&records), acked, &attempts);
    records
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_run_loses_no_acknowledged_enqueue() {
    let mut redis = PrivateRedis::start(&["--appendonly", "yes", "--appendfsync", "always"])
        .expect("redis-server");
    let tq = TestQueue::with_url("faults-redis", &redis.url()).await;
    let args = [
        "--queues",
        "q",
        "--concurrency",
        "4",
        "--lease",
        "1s",
        "--backoff-base",
        "50ms",
    ];
    let tmp = WorkerTmp::new();
    let fleet = Fleet::start(&tq, 2, &args, &tmp.worker_proc());
    let (acked, errors, running_at_kill) =
        kill_and_restart_redis_while_enqueueing(&tq, &mut redis).await;
    drained(&tq, PATIENCE).await;
    assert!(
        fleet.all_alive(),
        "the same workers reconnected by themselves"
    );
    let records = assert_each_acknowledged_job_succeeded_once(&tq, &acked).await;
    tq.assert_quiet().await;
    let lost = records.iter().filter(|r| r["outcome"] == "lost").count();
    eprintln!(
        "redis restart: {} acknowledged enqueues, {errors} enqueue errors retried, \
         {running_at_kill} running at the kill, {lost} attempts reaped as lost",
        acked.len()
    );
    fleet.kill_all();
    tmp.sweep_and_assert_clean(&tq).await;
    tq.cleanup().await;
}

// ---------------------------------------------------------------------------
// Redis full: maxmemory with noeviction.

/// Write filler until Redis refuses even a small write for memory; returns
/// the filler keys. Sizes shrink so that memory really stays over the limit
/// (a refused big write frees its own buffer again).
async fn fill_redis(tq: &TestQueue) -> Vec<String> {
    let mut keys = Vec::new();
    for size in [256 * 1024, 16 * 1024, 1024, 64] {
        let blob = "x".repeat(size);
        loop {
            let key = format!("filler:{}:{}", tq.ns, keys.len());
            let r: Result<(), _> = tq
                .queue
                .client()
                .set(&key, blob.as_str(), None, None, false)
                .await;
            match r {
                Ok(()) => keys.push(key),
                Err(e) => {
                    assert!(
                        e.details().contains("OOM"),
                        "filling stopped for memory: {e}"
                    );
                    break;
                }
            }
            assert!(
                keys.len() < 100_000,
                "Redis never filled up: is maxmemory set?"
            );
        }
    }
    // Filled to within a few bytes of the limit, memory would drift back
    // under it as client buffers are freed; set the limit 1 MB below what is
    // used, so every write is refused until the filler is deleted.
    let info: String = tq
        .queue
        .client()
        .custom(fred::cmd!("INFO"), vec!["memory"])
        .await
        .expect("INFO memory");
    let used: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("used_memory in INFO");
    let _: String = tq
        .queue
        .client()
        .custom(
            fred::cmd!("CONFIG"),
            vec![
                "SET".to_string(),
                "maxmemory".into(),
                (used - (1 << 20)).to_string(),
            ],
        )
        .await
        .expect("CONFIG SET maxmemory");
    keys
}

/// One HTTP/1.0 POST with a bearer key; (status, body as JSON).
async fn post_json(port: u16, path: &str, key: &str, body: &str) -> (u16, serde_json::Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let head = format!(
        "POST {path} HTTP/1.0\r\nHost: localhost\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.expect("write");
    s.write_all(body.as_bytes()).await.expect("write body");
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.expect("read");
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, serde_json::from_str(body).unwrap_or_default())
}

/// The HTTP API on a free port, in process; its port.
async fn start_api(tq: &TestQueue, db: &TestDb, stop: CancellationToken) -> u16 {
    let port = agentq_servers::free_port().expect("port");
    let (q, pool) = (tq.queue.clone(), db.pool.clone());
    let cfg = agentq::http::api::ApiConfig::default();
    tokio::spawn(async move {
        agentq::http::api::serve(([127, 0, 0, 1], port).into(), q, pool, cfg, stop).await
    });
    eventually(Duration::from_secs(30), "api listening", || async {
        agentq_servers::listening(&format!("127.0.0.1:{port}")).then_some(())
    })
    .await;
    port
}

/// 40 echo jobs of tenants a and b on queue q, paused so that none runs
/// yet; their specs and ids.
async fn queue_paused_jobs(tq: &TestQueue) -> (Vec<JobSpec>, Vec<String>) {
    tq.queue.set_paused("q", None, true).await.expect("pause");
    let specs: Vec<JobSpec> = (0..40)
        .map(|i| {
            JobSpec::new(if i % 2 == 0 { "a" } else { "b" }, "q", "echo").payload(&json!({"i": i}))
        })
        .collect();
    let ids = tq.enqueue_all(&specs).await;
    (specs, ids)
}

/// Library, CLI and HTTP all refuse an enqueue while Redis is full, saying
/// why.
async fn assert_every_enqueue_path_refuses_clearly(
    tq: &TestQueue,
    specs: &[JobSpec],
    port: u16,
    key: &str,
) {
    let one = tq.queue.enqueue(&JobSpec::new("a", "q", "echo")).await;
    assert!(matches!(one, Err(QueueError::Full(_))), "{one:?}");
    let msg = one.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        msg.contains("redis is full") && msg.contains("maxmemory"),
        "{msg}"
    );
    let batch = tq.queue.enqueue_batch(&specs[..3]).await;
    assert!(matches!(batch, Err(QueueError::Full(_))), "{batch:?}");
    let (code, out, err) = tq.cli(&["enqueue", "--queue", "q", "--tenant", "a", "--kind", "echo"]);
    assert_eq!((code, out.as_str()), (1, ""), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains("redis is full"), "{err}");
    eprintln!("redis full: the CLI said: {}", err.trim());
    let (status, body) = post_json(port, "/v1/jobs", key, r#"{"queue":"q","kind":"echo"}"#).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("queue_full")),
        "{body}"
    );
}

/// Nothing already queued was harmed (all 40 still ready), and no id was
/// even allocated (the id sequence is as it was: `seq_before`).
async fn assert_queued_jobs_untouched(tq: &TestQueue, ids: &[String], seq_before: Option<String>) {
    let seq_after: Option<String> = tq
        .queue
        .client()
        .get(tq.queue.keys(0).key(&["seq"]))
        .await
        .expect("seq");
    assert_eq!(seq_after, seq_before, "a refused enqueue writes nothing");
    assert!(tq.job_states(ids).await.iter().all(|s| s.0 == "ready"));
    let q = queue_stats(&tq.queue).await.expect("stats");
    assert_eq!(q.iter().map(|s| s.ready).sum::<i64>(), 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_full_refuses_enqueue_clearly_and_harms_nothing_queued() {
    let redis = PrivateRedis::start(&["--maxmemory", "24mb", "--maxmemory-policy", "noeviction"])
        .expect("redis-server");
    let tq = TestQueue::with_url("faults-full", &redis.url()).await;
    let db = TestDb::new("faults_full").await;
    let key = agentq::http::api::keys::create(&db.pool, "a")
        .await
        .expect("key")
        .key;
    let api_stop = CancellationToken::new();
    let port = start_api(&tq, &db, api_stop.clone()).await;

    // Jobs queued before Redis fills up, and a worker that holds off (paused).
    let (specs, ids) = queue_paused_jobs(&tq).await;
    let tmp = WorkerTmp::new();
    let mut worker = Proc(tq.spawn_worker_with(
        &["--queues", "q", "--concurrency", "4", "--lease", "1s"],
        &tmp.worker_proc(),
    ));
    let seq_key = tq.queue.keys(0).key(&["seq"]);
    let seq_before: Option<String> = tq.queue.client().get(&seq_key).await.expect("seq");
    let filler = fill_redis(&tq).await;
    assert_every_enqueue_path_refuses_clearly(&tq, &specs, port, &key).await;
    assert_queued_jobs_untouched(&tq, &ids, seq_before).await;

    // Memory back: the same worker runs every queued job, enqueue works again.
    let _: i64 = tq.queue.client().del(filler).await.expect("del filler");
    tq.queue.set_paused("q", None, false).await.expect("resume");
    drained(&tq, PATIENCE).await;
    assert!(
        matches!(worker.try_wait(), Ok(None)),
        "the worker rode it out"
    );
    let states = tq.job_states(&ids).await;
    assert!(states.iter().all(|s| s.0 == "succeeded"), "{states:?}");
    let attempts: Vec<u64> = states.iter().map(|s| s.1).collect();
    common::assert_one_record_per_attempt(
        &common::outbox_attempts(&tq.outbox().await),
        &ids,
        &attempts,
    );
    let (status, body) = post_json(port, "/v1/jobs", &key, r#"{"queue":"q","kind":"echo"}"#).await;
    assert_eq!(status, 201, "{body}");
    drop(worker);
    tmp.sweep_and_assert_clean(&tq).await;
    api_stop.cancel();
    db.cleanup().await;
    tq.cleanup().await;
}

// ---------------------------------------------------------------------------
// PostgreSQL outage while workers are being SIGKILLed.

/// 1,200 jobs of six tenants: 10-60 ms sleeps and echoes, 20 attempts each
/// (kills alone never use them up).
fn outage_jobs() -> Vec<JobSpec> {
    (0..1200)
        .map(|i| {
            let t = format!("p{}", i % 6);
            let mut s = if i % 2 == 0 {
                JobSpec::new(t, "q", "sleep").payload(&json!({"ms": 20 + i % 40}))
            } else {
                JobSpec::new(t, "q", "echo")
            };
            s.max_attempts = Some(20);
            s
        })
        .collect()
}

/// Once the first rows are in PostgreSQL: stops it for 4 s while jobs run
/// and workers die (records wait in the outbox), then restarts it. How many
/// records waited.
async fn stop_postgres_for_a_while(
    pg: &mut PrivatePostgres,
    tq: &TestQueue,
    reader: &sqlx::PgPool,
) -> u64 {
    eventually(PATIENCE, "first rows in PostgreSQL", || async {
        ledger_rows(reader)
            .await
            .filter(|r| !r.is_empty())
            .map(|_| ())
    })
    .await;
    tokio::task::block_in_place(|| pg.stop());
    tokio::time::sleep(Duration::from_secs(4)).await; // jobs run, workers die, records wait
    let waiting = tq.outbox_len().await;
    assert!(ledger_rows(reader).await.is_none(), "PostgreSQL is down");
    tokio::task::block_in_place(|| pg.restart()).expect("restart PostgreSQL");
    waiting
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_while_workers_are_killed_lands_every_row_once() {
    let mut pg = tokio::task::block_in_place(PrivatePostgres::start).expect("private PostgreSQL");
    let tq = TestQueue::new("faults-pg").await;
    let reader = agentq::ledger::connect_lazy(&pg.url()).expect("reader pool");
    let ids = tq.enqueue_all(&outage_jobs()).await;
    let args = [
        "--queues",
        "q",
        "--concurrency",
        "6",
        "--lease",
        "1s",
        "--backoff-base",
        "50ms",
    ];
    let tmp = WorkerTmp::new();
    let how = WorkerProc {
        database_url: Some(pg.url()),
        ..tmp.worker_proc()
    };
    let fleet = Fleet::start(&tq, 3, &args, &how);
    let killer = fleet.kill_randomly(&tq, Duration::from_millis(1500), &args, &how);
    let waiting = stop_postgres_for_a_while(&mut pg, &tq, &reader).await;
    drained(&tq, PATIENCE).await;
    killer.stop().await;

    let states = tq.job_states(&ids).await;
    assert!(
        states.iter().all(|s| s.0 == "succeeded"),
        "every job succeeded"
    );
    let (attempts, rows) = ledger_has_every_attempt(&tq, &reader, &states).await;
    fleet.kill_all();
    common::assert_one_record_per_attempt(&common::row_attempts(&rows), &ids, &attempts);
    let lost = assert_kills_cut_attempts_short(&rows);
    assert!(
        waiting > 0,
        "records waited in the outbox during the outage"
    );
    tq.assert_quiet().await;
    eprintln!(
        "postgres outage: {} jobs, {} rows exactly once, {waiting} waiting during the outage, \
         {lost} lost to {} kills; outbox empty",
        ids.len(),
        attempts.iter().sum::<u64>(),
        fleet.kills()
    );
    tmp.sweep_and_assert_clean(&tq).await;
    reader.close().await;
    tq.cleanup().await;
    tokio::task::block_in_place(|| pg.stop());
}

// ---------------------------------------------------------------------------
// Clocks: one worker an hour ahead, one an hour behind, short leases.

/// Seconds between the first timestamp in a worker's log and the real clock.
fn log_clock_offset(lines: &[String]) -> Option<i64> {
    let strip = |l: &str| -> String {
        let mut out = String::new();
        let mut esc = false;
        for ch in l.chars() {
            match (esc, ch) {
                (false, '\u{1b}') => esc = true,
                (true, 'm') => esc = false,
                (true, _) => {}
                (false, c) => out.push(c),
            }
        }
        out
    };
    let line = lines
        .iter()
        .map(|l| strip(l))
        .find(|l| l.starts_with("20"))?;
    let stamp = line.split_whitespace().next()?;
    let t = chrono::DateTime::parse_from_rfc3339(stamp).ok()?;
    Some(t.timestamp() - chrono::Utc::now().timestamp())
}

/// 16 sleeps of 2.5-4 s (longer than the lease), 20 echoes, and 4 jobs that
/// fail twice (a delayed retry in between: due times come from Redis), of
/// three tenants.
fn clock_jobs() -> Vec<JobSpec> {
    let mut specs: Vec<JobSpec> = (0..16)
        .map(|i| {
            JobSpec::new(format!("c{}", i % 3), "q", "sleep")
                .payload(&json!({"ms": 2500 + 100 * i}))
        })
        .collect();
    specs.extend((0..20).map(|i| JobSpec::new(format!("c{}", i % 3), "q", "echo")));
    specs.extend((0..4).map(|i| {
        let mut s = JobSpec::new("c0", "q", "fail")
            .payload(&json!({"code": 1, "message": format!("retry-{i}")}));
        s.max_attempts = Some(2); // a delayed retry in between: due times come from Redis
        s
    }));
    specs
}

/// Two workers with 2 s leases, `clock-plus` an hour ahead and
/// `clock-minus` an hour behind (libfaketime), logging at info level.
fn start_skewed_workers(tq: &TestQueue, tmp: &WorkerTmp) -> (Vec<Proc>, Vec<common::LogTail>) {
    let mut tails = Vec::new();
    let mut workers = Vec::new();
    for (id, offset) in [("clock-plus", "+1h"), ("clock-minus", "-1h")] {
        let how = WorkerProc {
            env: common::skewed_clock_env(offset),
            capture_stderr: true,
            log: Some("agentq=info".into()),
            ..tmp.worker_proc()
        };
        let args = [
            "--queues",
            "q",
            "--concurrency",
            "4",
            "--lease",
            "2s",
            "--backoff-base",
            "300ms",
            "--id",
            id,
        ];
        let mut c = Proc(tq.spawn_worker_with(&args, &how));
        tails.push(common::LogTail::follow(&mut c));
        workers.push(c);
    }
    (workers, tails)
}

/// Until the namespace is drained: every lease deadline is Redis time +
/// the lease (`lease_ms`), never an hour off either way.
async fn assert_leases_follow_redis_time_until_drained(tq: &TestQueue, lease_ms: i64) {
    let mut samples = 0;
    while !is_drained(tq).await {
        let leases = tq.leases().await;
        let now = tq.redis_now_ms().await;
        for (id, deadline) in &leases {
            assert!(
                *deadline as i64 <= now + lease_ms,
                "job {id}: lease deadline {deadline} is beyond Redis time {now} + the lease"
            );
        }
        samples += leases.len();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(samples > 0, "leases were sampled while jobs ran");
}

/// The workers' own clocks really were an hour ahead and an hour behind.
fn assert_worker_clocks_were_skewed(tails: &[common::LogTail]) {
    for (tail, want) in tails.iter().zip([3600, -3600]) {
        let off = log_clock_offset(&tail.lines()).expect("a timestamped log line");
        assert!(
            (off - want).abs() < 300,
            "worker clock skewed by {off}s, wanted {want}s"
        );
    }
}

/// No attempt was lost or stolen and its times come from Redis; every job
/// ran once (the failing ones twice), with one record per attempt; both
/// workers ran jobs.
async fn assert_no_double_run_and_redis_time(tq: &TestQueue, ids: &[String]) {
    let states = tq.job_states(ids).await;
    let records = tq.outbox().await;
    let real_now = chrono::Utc::now().timestamp_millis();
    for r in &records {
        assert_ne!(r["outcome"], "lost", "no lease was lost or stolen: {r:?}");
        for k in ["started_at", "finished_at"] {
            let skew = (common::num(r, k) - real_now).abs();
            assert!(
                skew < 300_000,
                "{k} comes from Redis, not a skewed worker: {r:?}"
            );
        }
    }
    for (id, (state, attempts, err)) in ids.iter().zip(&states) {
        let want = if err.contains("retry-") {
            ("dead", 2)
        } else {
            ("succeeded", 1)
        };
        assert_eq!((state.as_str(), *attempts), want, "job {id}: {err}");
    }
    let attempts: Vec<u64> = states.iter().map(|s| s.1).collect();
    common::assert_one_record_per_attempt(&common::outbox_attempts(&records), ids, &attempts);
    for w in ["clock-plus", "clock-minus"] {
        assert!(records.iter().any(|r| r["worker"] == w), "{w} ran jobs");
    }
}

/// SIGTERM each worker and panic unless it exits 0.
async fn sigterm_and_assert_clean_exit(workers: Vec<Proc>) {
    for mut w in workers {
        sigterm(&w);
        assert_eq!(common::exit_code(&mut w, PATIENCE).await, Some(0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skewed_worker_clocks_neither_double_run_nor_steal_leases() {
    let tq = TestQueue::new("faults-clock").await;
    let ids = tq.enqueue_all(&clock_jobs()).await;
    let tmp = WorkerTmp::new();
    let (workers, tails) = start_skewed_workers(&tq, &tmp);
    assert_leases_follow_redis_time_until_drained(&tq, 2000).await;
    assert_worker_clocks_were_skewed(&tails);
    assert_no_double_run_and_redis_time(&tq, &ids).await;
    tq.assert_quiet().await;
    sigterm_and_assert_clean_exit(workers).await;
    // Stopped cleanly, the workers removed their working directories.
    tmp.assert_clean();
    tq.cleanup().await;
}

// ---------------------------------------------------------------------------
// Graceful drain: SIGTERM during a busy run.

/// A worker with id `id`, 6 slots and 10-minute leases (a lease left
/// behind would sit there for 10 minutes), that hands work back within
/// 300 ms of a SIGTERM.
fn term_worker(tq: &TestQueue, id: &str, tmp: &WorkerTmp) -> Proc {
    let args = [
        "--queues",
        "q",
        "--concurrency",
        "6",
        "--lease",
        "10m",
        "--shutdown-grace",
        "300ms",
        "--id",
        id,
    ];
    Proc(tq.spawn_worker_with(&args, &tmp.worker_proc()))
}

/// Leases held right now by worker `id`.
async fn leases_of(tq: &TestQueue, id: &str) -> Vec<String> {
    let mut mine = Vec::new();
    for (job, _) in tq.leases().await {
        let w: Option<String> = tq
            .queue
            .client()
            .hget(tq.queue.keys(0).job(&job), "worker")
            .await
            .expect("hget");
        if w.as_deref() == Some(id) {
            mine.push(job);
        }
    }
    mine
}

/// Wait until workers term-0, term-1 and term-2 each hold 3 leases or more
/// and records are in the outbox.
async fn all_three_workers_busy(tq: &TestQueue) {
    eventually(PATIENCE, "all three workers busy", || async {
        let held = [
            leases_of(tq, "term-0").await,
            leases_of(tq, "term-1").await,
            leases_of(tq, "term-2").await,
        ];
        (held.iter().all(|h| h.len() >= 3) && tq.outbox_len().await > 0).then_some(())
    })
    .await;
}

/// SIGTERM the first worker while the others keep going: it exits 0 and
/// hands back what it held. Then SIGTERM the others: they exit 0, no lease
/// and no running count is left, every job is done or ready again, and
/// some running attempts were handed back. How many.
async fn sigterm_one_then_the_others(
    tq: &TestQueue,
    mut workers: Vec<Proc>,
    ids: &[String],
) -> usize {
    let mut first = workers.remove(0);
    sigterm(&first);
    assert_eq!(common::exit_code(&mut first, PATIENCE).await, Some(0));
    assert_eq!(
        leases_of(tq, "term-0").await,
        Vec::<String>::new(),
        "term-0 left no lease"
    );
    for w in &workers {
        sigterm(w);
    }
    for w in &mut workers {
        assert_eq!(common::exit_code(w, PATIENCE).await, Some(0));
    }
    assert_eq!(tq.leases().await, vec![], "no lease left to expire");
    assert!(
        tq.running().await.values().all(|&n| n == 0),
        "running counters at zero"
    );
    let states = tq.job_states(ids).await;
    assert!(
        states.iter().all(|s| s.0 == "ready" || s.0 == "succeeded"),
        "every job is done or ready again: {states:?}"
    );
    let handed_back = tq
        .outbox()
        .await
        .iter()
        .filter(|r| r["outcome"] == "lost")
        .count();
    assert!(handed_back > 0, "some running attempts were handed back");
    handed_back
}

/// After fresh workers drained the rest: every job succeeded, no lease
/// expired (every hand-back was explicit), one record per attempt.
async fn assert_all_done_without_an_expired_lease(tq: &TestQueue, ids: &[String]) {
    let states = tq.job_states(ids).await;
    assert!(states.iter().all(|s| s.0 == "succeeded"), "{states:?}");
    let records = tq.outbox().await;
    assert!(
        records
            .iter()
            .all(|r| !r.get("error").is_some_and(|e| e.contains("lease expired"))),
        "no lease expired: every hand-back was explicit"
    );
    let attempts: Vec<u64> = states.iter().map(|s| s.1).collect();
    common::assert_one_record_per_attempt(&common::outbox_attempts(&records), ids, &attempts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_loses_nothing_and_leaves_no_lease() {
    let tq = TestQueue::new("faults-term").await;
    let specs: Vec<JobSpec> = (0..240)
        .map(|i| {
            JobSpec::new(format!("d{}", i % 5), "q", "sleep")
                .payload(&json!({"ms": 100 + (i * 37) % 800}))
        })
        .collect();
    let ids = tq.enqueue_all(&specs).await;
    let tmp = WorkerTmp::new();
    let workers: Vec<Proc> = (0..3)
        .map(|i| term_worker(&tq, &format!("term-{i}"), &tmp))
        .collect();
    all_three_workers_busy(&tq).await;
    let handed_back = sigterm_one_then_the_others(&tq, workers, &ids).await;

    // Fresh workers finish the rest; nothing was reaped, every attempt has one record.
    let again: Vec<Proc> = (3..5)
        .map(|i| term_worker(&tq, &format!("term-{i}"), &tmp))
        .collect();
    drained(&tq, PATIENCE).await;
    assert_all_done_without_an_expired_lease(&tq, &ids).await;
    tq.assert_quiet().await;
    eprintln!(
        "sigterm: {} jobs, {handed_back} attempts handed back at shutdown",
        ids.len()
    );
    drop(again); // SIGKILL: their directories stay for the sweep
    tmp.sweep_and_assert_clean(&tq).await;
    tq.cleanup().await;
}
