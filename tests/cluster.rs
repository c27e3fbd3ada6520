//! agentq on a real Redis Cluster: three primaries on loopback ports, made by
//! the test itself, with the namespace's partitions spread over all three.
//! Worker processes are SIGKILLed and restarted mid-run; no job is lost,
//! per-tenant caps hold fleet-wide, the ledger has exactly one row per
//! attempt, and every operator command works across the shards.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agentq::queue::inspect::{job_info, queue_stats};
use agentq::queue::{JobSpec, Queue, QueueConfig, partition_of};
use agentq_servers::PrivateRedisCluster;
use common::{
    LedgerRow, Proc, TestDb, TestQueue, database_url, eventually, ledger_rows, workers_dir,
};
use fred::prelude::*;
use serde_json::json;

const PARTITIONS: u32 = 6;

/// Start a three-primary cluster (blocking work off the runtime).
async fn start_cluster() -> PrivateRedisCluster {
    tokio::task::spawn_blocking(|| PrivateRedisCluster::start(3))
        .await
        .expect("join")
        .expect("start a Redis Cluster (redis-server and redis-cli on PATH)")
}

/// A queue on the cluster whose partitions land on every primary: the
/// namespace is drawn again until each shard owns at least one partition, so
/// the test always exercises all three.
async fn spread_queue(cluster: &PrivateRedisCluster, test: &str) -> (Queue, String) {
    for _ in 0..50 {
        let ns = common::namespace(test);
        let mut cfg = QueueConfig::new(cluster.url());
        cfg.namespace = ns.clone();
        cfg.partitions = PARTITIONS;
        let queue = Queue::connect(cfg).await.expect("connect to the cluster");
        let owners = queue.partition_shards().expect("clustered client");
        let used: BTreeSet<&String> = owners.values().collect();
        if used.len() == cluster.ports().len() {
            return (queue, ns);
        }
    }
    panic!("no namespace spread {PARTITIONS} partitions over 3 shards in 50 draws");
}

/// `n` tenant names for each partition (tenant -> partition is FNV-1a).
fn tenants_per_partition(n: usize) -> Vec<(String, u32)> {
    let mut count = vec![0usize; PARTITIONS as usize];
    let mut out = Vec::new();
    for i in 0.. {
        if count.iter().all(|&c| c == n) {
            break;
        }
        let t = format!("tenant{i}");
        let p = partition_of(&t, PARTITIONS);
        if count[p as usize] < n {
            count[p as usize] += 1;
            out.push((t, p));
        }
    }
    out
}

/// Keys of `ns` held by the node on `port` (SCAN on that node alone),
/// grouped by partition.
fn partitions_on_node(port: u16, ns: &str) -> BTreeSet<u32> {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "--scan", "--pattern"])
        .arg(format!("{{{ns}:*"))
        .output()
        .expect("redis-cli --scan");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|k| {
            let tag = k.strip_prefix('{')?.split_once('}')?.0;
            tag.rsplit_once(':')?.1.parse().ok()
        })
        .collect()
}

/// No node ever answered MOVED, ASK or CROSSSLOT: every command went to the
/// shard owning its key's slot (the ledger writer's XREADGROUP used to be
/// routed by its first argument, "GROUP", and was redirected each time), and
/// every multi-key command and script stayed in one slot.
fn assert_routed_right(cluster: &PrivateRedisCluster) {
    for port in cluster.ports() {
        let out = Command::new("redis-cli")
            .args(["-p", &port.to_string(), "info", "errorstats"])
            .output()
            .expect("redis-cli info errorstats");
        let text = String::from_utf8_lossy(&out.stdout);
        for bad in ["errorstat_MOVED:", "errorstat_ASK:", "errorstat_CROSSSLOT:"] {
            assert!(!text.contains(bad), "node {port} answered {bad} {text}");
        }
    }
}

struct Fleet<'a> {
    url: String,
    ns: &'a str,
    db_url: String,
}

impl Fleet<'_> {
    /// An `agentq worker` process with id `id`, writing the ledger. It dies
    /// with the test ([`common::die_with_test`]).
    fn spawn(&self, id: &str) -> Proc {
        Proc(
            common::agentq()
                .args(["worker", "--queues", "q", "--concurrency", "4"])
                .args(["--lease", "1s", "--backoff-base", "50ms"])
                .args(["--metrics-addr", "off", "--id", id])
                .env("AGENTQ_REDIS_URL", &self.url)
                .env("AGENTQ_NAMESPACE", self.ns)
                .env("AGENTQ_PARTITIONS", PARTITIONS.to_string())
                .env("AGENTQ_DATABASE_URL", &self.db_url)
                .env("AGENTQ_WORKERS_DIR", workers_dir())
                .env("AGENTQ_LOG", "agentq=warn")
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("spawn agentq worker"),
        )
    }

    /// Run the CLI against the cluster; returns (exit code, stdout, stderr).
    fn cli(&self, args: &[&str]) -> (i32, String, String) {
        common::run_to_end(
            common::agentq()
                .args(args)
                .env("AGENTQ_REDIS_URL", &self.url)
                .env("AGENTQ_NAMESPACE", self.ns)
                .env("AGENTQ_PARTITIONS", PARTITIONS.to_string())
                .env("AGENTQ_DATABASE_URL", &self.db_url)
                .env("AGENTQ_LOG", "off"),
        )
    }

    /// Run the CLI against the cluster, panicking unless it exits 0; its
    /// stdout.
    fn run(&self, args: &[&str]) -> String {
        let (code, out, err) = self.cli(args);
        assert_eq!(code, 0, "agentq {args:?}: {err}");
        out
    }
}

/// A job this worker is running right now (its lease names the worker).
async fn running_on(queue: &Queue, worker: &str) -> Option<String> {
    for p in 0..queue.partitions() {
        let ids: Vec<String> = queue
            .client()
            .zrange(
                queue.keys(p).key(&["leases"]),
                0,
                -1,
                None,
                false,
                None,
                false,
            )
            .await
            .ok()?;
        for id in ids {
            let w: Option<String> = queue
                .client()
                .hget(queue.keys(p).job(&id), "worker")
                .await
                .ok()?;
            if w.as_deref() == Some(worker) {
                return Some(id);
            }
        }
    }
    None
}

/// Four tenants per partition: one heavy (cap 2, 12 jobs of 300 ms), three
/// light (cap 1, 3 jobs each), so caps bind once the light tenants are
/// done. Returns each tenant's cap and the job ids.
async fn enqueue_capped_tenants(tq: &TestQueue) -> (HashMap<String, usize>, Vec<String>) {
    let mut caps: HashMap<String, usize> = HashMap::new();
    let mut jobs = Vec::new();
    for (i, (t, _)) in tenants_per_partition(4).iter().enumerate() {
        let (cap, n) = if i % 4 == 0 { (2, 12) } else { (1, 3) };
        caps.insert(t.clone(), cap);
        common::set_cap(&tq.queue, t, cap as u64).await;
        for _ in 0..n {
            let mut s = JobSpec::new(t, "q", "sleep").payload(&json!({"ms": 300}));
            s.max_attempts = Some(20);
            jobs.push(s);
        }
    }
    let ids = tq.enqueue_all(&jobs).await;
    assert_eq!(ids.len(), 6 * (12 + 3 * 3));
    (caps, ids)
}

/// Starts workers w0, w1, w2, then SIGKILLs each once while it holds a
/// running job and restarts it (as `<name>-again`). Returns the workers.
async fn kill_each_worker_once_while_running(fleet: &Fleet<'_>, queue: &Queue) -> Vec<Proc> {
    let names = ["w0", "w1", "w2"];
    let mut workers: Vec<Proc> = names.iter().map(|id| fleet.spawn(id)).collect();
    for (i, name) in names.iter().enumerate() {
        eventually(
            Duration::from_secs(60),
            &format!("worker {name} runs a job"),
            || running_on(queue, name),
        )
        .await;
        common::kill9(&mut workers[i]);
        workers[i] = fleet.spawn(&format!("{name}-again"));
    }
    workers
}

/// Every job succeeded, and the ledger holds exactly attempts 1..=n of
/// each, some of them cut short by the kills (billed as lost). The rows.
async fn assert_every_attempt_in_the_ledger_once(
    tq: &TestQueue,
    db: &TestDb,
    ids: &[String],
) -> Vec<LedgerRow> {
    let mut attempts = Vec::new();
    for id in ids {
        let info = job_info(&tq.queue, id).await.expect("inspect");
        assert_eq!(info.state, "succeeded", "{info:?}");
        attempts.push(info.attempts);
    }
    let total: u64 = attempts.iter().sum();
    let rows = eventually(
        Duration::from_secs(90),
        "the ledger holds every attempt",
        || async {
            let rows = ledger_rows(&db.pool).await?;
            (rows.len() as u64 >= total).then_some(rows)
        },
    )
    .await;
    common::assert_one_record_per_attempt(&common::row_attempts(&rows), ids, &attempts);
    assert!(
        rows.iter().any(|r| r.outcome == "lost"),
        "the SIGKILLs cut running attempts (billed as lost)"
    );
    rows
}

/// Caps held fleet-wide: slot intervals from the ledger never overlap more
/// than the tenant's cap, and some heavy tenant's cap of 2 was reached.
fn assert_caps_held_fleet_wide(rows: &[LedgerRow], caps: &HashMap<String, usize>) {
    let peaks = common::peak_overlap_by_tenant(rows);
    let mut reached = 0;
    for (t, cap) in caps {
        let peak = peaks.get(t).copied().unwrap_or(0);
        assert!(
            peak <= *cap,
            "tenant {t}: {peak} attempts at once, cap {cap}"
        );
        if *cap == 2 && peak == 2 {
            reached += 1;
        }
    }
    assert!(reached > 0, "no heavy tenant ever ran two jobs at once");
}

/// The keys really live on all three shards, each partition on the shard
/// that owns its hash tag's slot.
fn assert_partitions_on_their_shards(queue: &Queue, cluster: &PrivateRedisCluster, ns: &str) {
    let owners = queue.partition_shards().expect("clustered");
    for port in cluster.ports() {
        let want: BTreeSet<u32> = owners
            .iter()
            .filter(|(_, node)| **node == format!("127.0.0.1:{port}"))
            .map(|(p, _)| *p)
            .collect();
        assert!(!want.is_empty(), "shard {port} owns a partition");
        assert_eq!(partitions_on_node(port, ns), want, "partitions on {port}");
    }
}

/// Operator reads sum over every shard: queues, tenants, inspect.
fn assert_operator_reads_sum_over_shards(fleet: &Fleet, tenants: usize, last_id: &str) {
    let (code, out, err) = fleet.cli(&["queues", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v[0]["queue"], "q", "{out}");
    assert_eq!(v[0]["ready"], 0, "{out}");
    let (code, out, err) = fleet.cli(&["tenants", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v.as_array().map(Vec::len), Some(tenants), "{out}");
    let (code, out, err) = fleet.cli(&["inspect", last_id, "--json"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("succeeded"), "{out}");
}

/// Nothing runs any more, and deleting the namespace leaves no key on any
/// shard.
async fn assert_namespace_deleted_everywhere(
    queue: &Queue,
    cluster: &PrivateRedisCluster,
    ns: &str,
) {
    assert!(
        queue_stats(queue)
            .await
            .expect("stats")
            .iter()
            .all(|q| q.running == 0)
    );
    queue.delete_namespace().await.expect("delete namespace");
    for port in cluster.ports() {
        assert!(
            partitions_on_node(port, ns).is_empty(),
            "keys left on {port} after delete_namespace"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_survive_sigkill_on_a_three_shard_cluster() {
    let cluster = start_cluster().await;
    let (queue, ns) = spread_queue(&cluster, "cluster").await;
    let tq = TestQueue {
        queue: queue.clone(),
        ns: ns.clone(),
    };
    let db = TestDb::new("cluster").await;
    let fleet = Fleet {
        url: cluster.url(),
        ns: &ns,
        db_url: db.url(),
    };

    let (caps, ids) = enqueue_capped_tenants(&tq).await;
    let workers = kill_each_worker_once_while_running(&fleet, &queue).await;
    common::drained(&tq, Duration::from_secs(120)).await;

    let rows = assert_every_attempt_in_the_ledger_once(&tq, &db, &ids).await;
    assert_caps_held_fleet_wide(&rows, &caps);
    assert_partitions_on_their_shards(&queue, &cluster, &ns);
    assert_routed_right(&cluster);
    assert_operator_reads_sum_over_shards(&fleet, caps.len(), &ids[ids.len() - 1]);

    drop(workers); // SIGKILL
    assert_namespace_deleted_everywhere(&queue, &cluster, &ns).await;
    db.cleanup().await;
}

/// Limits (defaults to every partition, a tenant to its own), one job per
/// tenant that fails permanently (exit 65), a job delayed by an hour, and
/// pause and resume of a tenant and of the queue. The delayed job's id.
fn set_limits_enqueue_pause_and_resume(fleet: &Fleet, tenants: &[(String, u32)]) -> String {
    fleet.run(&["tenant", "defaults", "--max-concurrency", "5"]);
    fleet.run(&["tenant", "set", &tenants[0].0, "--max-concurrency", "2"]);
    for (t, _) in tenants {
        let id = fleet
            .run(&[
                "enqueue",
                "--queue",
                "q",
                "--tenant",
                t,
                "--kind",
                "fail",
                "--payload",
                r#"{"code":65}"#,
            ])
            .trim()
            .to_string();
        assert!(!id.is_empty());
    }
    let late = fleet.run(&[
        "enqueue",
        "--queue",
        "q",
        "--tenant",
        &tenants[1].0,
        "--kind",
        "noop",
        "--delay",
        "1h",
    ]);
    fleet.run(&["pause", "q", "--tenant", &tenants[2].0]);
    fleet.run(&["resume", "q", "--tenant", &tenants[2].0]);
    fleet.run(&["pause", "q"]);
    fleet.run(&["resume", "q"]);
    late
}

/// Wait until `n` jobs are dead, over every partition.
async fn dead_jobs(queue: &Queue, n: usize, what: &str) {
    eventually(Duration::from_secs(60), what, || async {
        let s = queue_stats(queue).await.ok()?;
        (s.iter().map(|q| q.dead).sum::<i64>() == n as i64).then_some(())
    })
    .await;
}

/// Dead list and retry (dead.lua) on every partition; once the retried
/// jobs are dead again, purge.
async fn retry_and_purge_dead_jobs(fleet: &Fleet<'_>, queue: &Queue, tenants: &[(String, u32)]) {
    let listed = fleet.run(&["dead", "q", "list", "--json"]);
    for (t, _) in tenants {
        assert!(listed.contains(t.as_str()), "{t} in {listed}");
    }
    let said = fleet.run(&["dead", "q", "retry"]);
    assert!(said.contains(&format!(" {} jobs", tenants.len())), "{said}");
    dead_jobs(queue, tenants.len(), "retried jobs dead again").await;
    fleet.run(&["dead", "q", "purge"]);
}

/// Cancel (cancel.lua) the delayed job `late`, delay another for `tenant`,
/// and drain --purge (purge.lua).
async fn cancel_then_drain_and_purge(fleet: &Fleet<'_>, queue: &Queue, late: &str, tenant: &str) {
    let listed = fleet.run(&["jobs", "--queue", "q", "--state", "delayed", "--json"]);
    assert!(listed.contains(late.trim()), "{listed}");
    assert_eq!(queue.cancel(late.trim()).await.expect("cancel"), "delayed");
    fleet.run(&[
        "enqueue", "--queue", "q", "--tenant", tenant, "--kind", "noop", "--delay", "1h",
    ]);
    fleet.run(&["drain", "q", "--purge", "--timeout", "30s"]);
}

/// A plain redis:// URL at a cluster node is refused with the fix, and
/// redis-cluster:// at a plain server says to use redis://.
async fn assert_urls_are_checked(cluster: &PrivateRedisCluster, ns: &str) {
    let mut cfg = QueueConfig::new(format!("redis://127.0.0.1:{}", cluster.ports()[0]));
    cfg.namespace = ns.to_string();
    let err = Queue::connect(cfg).await.err().expect("refused");
    assert!(err.is_input(), "{err}");
    assert!(err.to_string().contains("redis-cluster://"), "{err}");
    let plain = tokio::task::spawn_blocking(|| agentq_servers::PrivateRedis::start(&[]))
        .await
        .expect("join")
        .expect("private redis");
    let url = format!("redis-cluster://127.0.0.1:{}", plain.port);
    let started = Instant::now();
    let err = Queue::connect(QueueConfig::new(url))
        .await
        .err()
        .expect("refused");
    assert!(
        err.to_string().contains("not a cluster"),
        "{err} after {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_script_runs_on_a_cluster_and_urls_are_checked() {
    let cluster = start_cluster().await;
    let (queue, ns) = spread_queue(&cluster, "cluster-ops").await;
    let tq = TestQueue {
        queue: queue.clone(),
        ns: ns.clone(),
    };
    let fleet = Fleet {
        url: cluster.url(),
        ns: &ns,
        db_url: database_url(),
    };
    let tenants = tenants_per_partition(1);

    let late = set_limits_enqueue_pause_and_resume(&fleet, &tenants);
    // Claim and complete: exit 65 is permanent, so every job is dead at once.
    let mut cfg = common::fast_worker(&["q"], 4);
    cfg.id = "ops".into();
    let worker = tq.start_worker(cfg);
    dead_jobs(&queue, tenants.len(), "every fail job dead").await;
    retry_and_purge_dead_jobs(&fleet, &queue, &tenants).await;
    cancel_then_drain_and_purge(&fleet, &queue, &late, &tenants[4].0).await;
    worker.stop().await;
    let s = queue_stats(&queue).await.expect("stats");
    assert!(
        s.iter()
            .all(|q| q.ready + q.delayed + q.running + q.dead == 0),
        "{s:?}"
    );

    assert_urls_are_checked(&cluster, &ns).await;
    assert_routed_right(&cluster);
    queue.delete_namespace().await.expect("delete namespace");
}
