//! agentq on a real Redis Cluster: three primaries on loopback ports, made by
//! the test itself, with the namespace's partitions spread over all three.
//! Worker processes are SIGKILLed and restarted mid-run; no job is lost,
//! per-tenant caps hold fleet-wide, the ledger has exactly one row per
//! attempt, and every operator command works across the shards.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agentq::admission::{LimitsUpdate, Target};
use agentq::queue::inspect::{job_info, queue_stats};
use agentq::queue::{JobSpec, Queue, QueueConfig, partition_of};
use agentq::servers::PrivateRedisCluster;
use common::{TestDb, bin, database_url, eventually, workers_dir};
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
    /// An `agentq worker` process with id `id`, writing the ledger.
    fn spawn(&self, id: &str) -> Child {
        Command::new(bin())
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
            .expect("spawn agentq worker")
    }

    /// Run the CLI against the cluster; returns (exit code, stdout, stderr).
    fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(bin())
            .args(args)
            .env("AGENTQ_REDIS_URL", &self.url)
            .env("AGENTQ_NAMESPACE", self.ns)
            .env("AGENTQ_PARTITIONS", PARTITIONS.to_string())
            .env("AGENTQ_DATABASE_URL", &self.db_url)
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
}

fn kill9(c: &mut Child) {
    let _ = c.kill(); // SIGKILL
    let _ = c.wait();
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

/// One ledger row: (job, attempt, tenant, outcome, started ms, finished ms).
type Row = (String, i32, String, String, i64, i64);

async fn ledger_rows(db: &TestDb) -> Vec<Row> {
    sqlx::query_as(
        "SELECT job_id, attempt, tenant, outcome, \
                (extract(epoch FROM started_at) * 1000)::bigint, \
                (extract(epoch FROM finished_at) * 1000)::bigint \
         FROM usage_ledger ORDER BY job_id, attempt",
    )
    .fetch_all(&db.pool)
    .await
    .expect("select ledger")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_survive_sigkill_on_a_three_shard_cluster() {
    let cluster = start_cluster().await;
    let (queue, ns) = spread_queue(&cluster, "cluster").await;
    let db = TestDb::new("cluster").await;
    let fleet = Fleet {
        url: cluster.url(),
        ns: &ns,
        db_url: format!("{}?options[search_path]={}", database_url(), db.schema),
    };

    // Four tenants per partition: one heavy (cap 2, 12 jobs), three light
    // (cap 1, 3 jobs each), so caps bind once the light tenants are done.
    let tenants = tenants_per_partition(4);
    let mut caps: HashMap<String, usize> = HashMap::new();
    let mut jobs = Vec::new();
    for (i, (t, _)) in tenants.iter().enumerate() {
        let (cap, n) = if i % 4 == 0 { (2, 12) } else { (1, 3) };
        caps.insert(t.clone(), cap);
        LimitsUpdate {
            max_concurrency: Some(cap as u64),
            ..Default::default()
        }
        .apply(&queue, Target::Tenant(t))
        .await
        .expect("set cap");
        for _ in 0..n {
            let mut s = JobSpec::new(t, "q", "sleep").payload(&json!({"ms": 300}));
            s.max_attempts = Some(20);
            jobs.push(s);
        }
    }
    let ids: Vec<String> = queue
        .enqueue_batch(&jobs)
        .await
        .expect("enqueue over every partition")
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(ids.len(), 6 * (12 + 3 * 3));

    let names = ["w0", "w1", "w2"];
    let mut workers: Vec<Child> = names.iter().map(|id| fleet.spawn(id)).collect();
    // Kill each worker once while it holds a running job, and restart it.
    for (i, name) in names.iter().enumerate() {
        eventually(
            Duration::from_secs(60),
            &format!("worker {name} runs a job"),
            || running_on(&queue, name),
        )
        .await;
        kill9(&mut workers[i]);
        workers[i] = fleet.spawn(&format!("{name}-again"));
    }
    common::drained(
        &common::TestQueue {
            queue: queue.clone(),
            ns: ns.clone(),
        },
        Duration::from_secs(120),
    )
    .await;

    // Every job succeeded, and the ledger holds exactly attempts 1..=n of each.
    let mut attempts: BTreeMap<String, u64> = BTreeMap::new();
    for id in &ids {
        let info = job_info(&queue, id).await.expect("inspect");
        assert_eq!(info.state, "succeeded", "{info:?}");
        attempts.insert(id.clone(), info.attempts);
    }
    let total: u64 = attempts.values().sum();
    let rows = eventually(
        Duration::from_secs(90),
        "the ledger holds every attempt",
        || async {
            let rows = ledger_rows(&db).await;
            (rows.len() as u64 >= total).then_some(rows)
        },
    )
    .await;
    let mut seen: BTreeMap<String, Vec<i32>> = BTreeMap::new();
    for (job, attempt, ..) in &rows {
        seen.entry(job.clone()).or_default().push(*attempt);
    }
    for (id, n) in &attempts {
        let want: Vec<i32> = (1..=*n as i32).collect();
        assert_eq!(seen.get(id), Some(&want), "ledger rows of job {id}");
    }
    assert_eq!(seen.len(), ids.len(), "no ledger rows for unknown jobs");
    assert!(
        rows.iter().any(|r| r.3 == "lost"),
        "the SIGKILLs cut running attempts (billed as lost)"
    );

    // Caps held fleet-wide: slot intervals from the ledger never overlap
    // more than the tenant's cap, and the heavy tenants' cap of 2 was reached.
    let mut reached = 0;
    for (t, cap) in &caps {
        let iv: Vec<(i64, i64)> = rows
            .iter()
            .filter(|r| &r.2 == t)
            .map(|r| (r.4, r.5))
            .collect();
        let peak = common::peak_overlap(&iv);
        assert!(
            peak <= *cap,
            "tenant {t}: {peak} attempts at once, cap {cap}"
        );
        if *cap == 2 && peak == 2 {
            reached += 1;
        }
    }
    assert!(reached > 0, "no heavy tenant ever ran two jobs at once");

    // The keys really live on all three shards, each partition on the shard
    // that owns its hash tag's slot.
    let owners = queue.partition_shards().expect("clustered");
    for port in cluster.ports() {
        let want: BTreeSet<u32> = owners
            .iter()
            .filter(|(_, node)| **node == format!("127.0.0.1:{port}"))
            .map(|(p, _)| *p)
            .collect();
        assert!(!want.is_empty(), "shard {port} owns a partition");
        assert_eq!(partitions_on_node(port, &ns), want, "partitions on {port}");
    }

    assert_routed_right(&cluster);

    // Operator reads sum over every shard.
    let (code, out, err) = fleet.cli(&["queues", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v[0]["queue"], "q", "{out}");
    assert_eq!(v[0]["ready"], 0, "{out}");
    let (code, out, err) = fleet.cli(&["tenants", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v.as_array().map(Vec::len), Some(tenants.len()), "{out}");
    let (code, out, err) = fleet.cli(&["inspect", &ids[ids.len() - 1], "--json"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("succeeded"), "{out}");

    for w in &mut workers {
        kill9(w);
    }
    assert!(
        queue_stats(&queue)
            .await
            .expect("stats")
            .iter()
            .all(|q| q.running == 0)
    );
    queue.delete_namespace().await.expect("delete namespace");
    for port in cluster.ports() {
        assert!(
            partitions_on_node(port, &ns).is_empty(),
            "keys left on {port} after delete_namespace"
        );
    }
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_script_runs_on_a_cluster_and_urls_are_checked() {
    let cluster = start_cluster().await;
    let (queue, ns) = spread_queue(&cluster, "cluster-ops").await;
    let fleet = Fleet {
        url: cluster.url(),
        ns: &ns,
        db_url: database_url(),
    };
    let tenants = tenants_per_partition(1);
    let run = |args: &[&str]| {
        let (code, out, err) = fleet.cli(args);
        assert_eq!(code, 0, "agentq {args:?}: {err}");
        out
    };
    // Limits: defaults and a tier go to every partition, a tenant to its own.
    run(&["tenant", "defaults", "--max-concurrency", "5"]);
    run(&["tenant", "set", &tenants[0].0, "--max-concurrency", "2"]);
    for (t, _) in &tenants {
        let id = run(&[
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
    let late = run(&[
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
    run(&["pause", "q", "--tenant", &tenants[2].0]);
    run(&["resume", "q", "--tenant", &tenants[2].0]);
    run(&["pause", "q"]);
    run(&["resume", "q"]);
    // Claim and complete: exit 65 is permanent, so every job is dead at once.
    let mut spec_worker = common::fast_worker(&["q"], 4);
    spec_worker.id = "ops".into();
    let registry = agentq::executor::Registry::load(&workers_dir()).expect("workers/");
    let stop = tokio_util::sync::CancellationToken::new();
    let w = agentq::worker::Worker::new(
        queue.clone(),
        spec_worker,
        registry,
        agentq::executor::Handlers::with_builtins(),
    );
    let handle = tokio::spawn(w.run(stop.clone()));
    eventually(Duration::from_secs(60), "every fail job dead", || async {
        let s = queue_stats(&queue).await.ok()?;
        (s.iter().map(|q| q.dead).sum::<i64>() == tenants.len() as i64).then_some(())
    })
    .await;
    // Dead retry (dead.lua) on every partition, then purge.
    let listed = run(&["dead", "q", "list", "--json"]);
    for (t, _) in &tenants {
        assert!(listed.contains(t.as_str()), "{t} in {listed}");
    }
    let said = run(&["dead", "q", "retry"]);
    assert!(said.contains(&format!(" {} jobs", tenants.len())), "{said}");
    eventually(
        Duration::from_secs(60),
        "retried jobs dead again",
        || async {
            let s = queue_stats(&queue).await.ok()?;
            (s.iter().map(|q| q.dead).sum::<i64>() == tenants.len() as i64).then_some(())
        },
    )
    .await;
    run(&["dead", "q", "purge"]);
    // Cancel (cancel.lua) and drain --purge (purge.lua).
    let listed = run(&["jobs", "--queue", "q", "--state", "delayed", "--json"]);
    assert!(listed.contains(late.trim()), "{listed}");
    assert_eq!(queue.cancel(late.trim()).await.expect("cancel"), "delayed");
    run(&[
        "enqueue",
        "--queue",
        "q",
        "--tenant",
        &tenants[4].0,
        "--kind",
        "noop",
        "--delay",
        "1h",
    ]);
    run(&["drain", "q", "--purge", "--timeout", "30s"]);
    stop.cancel();
    handle.await.expect("join").expect("worker");
    let s = queue_stats(&queue).await.expect("stats");
    assert!(
        s.iter()
            .all(|q| q.ready + q.delayed + q.running + q.dead == 0),
        "{s:?}"
    );

    // A plain redis:// URL at a cluster node is refused with the fix.
    let mut cfg = QueueConfig::new(format!("redis://127.0.0.1:{}", cluster.ports()[0]));
    cfg.namespace = ns.clone();
    let err = Queue::connect(cfg).await.err().expect("refused");
    assert!(err.is_input(), "{err}");
    assert!(err.to_string().contains("redis-cluster://"), "{err}");
    // And redis-cluster:// at a plain server says to use redis://.
    let plain = tokio::task::spawn_blocking(|| agentq::servers::PrivateRedis::start(&[]))
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

    assert_routed_right(&cluster);
    queue.delete_namespace().await.expect("delete namespace");
}
