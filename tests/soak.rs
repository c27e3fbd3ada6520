//! HTTP soak: `agentq serve` and three `agentq worker` processes on real
//! Redis and PostgreSQL, 100 tenants enqueueing over HTTP from 50 concurrent
//! keep-alive clients for a bounded time (`AGENTQ_SOAK_SECS`, default 45),
//! then a drain. Five "hot" tenants send far above the per-tenant request
//! rate (`serve --rate-limit`), so 429s are part of the design; five others
//! have a job start rate (`tenant set --rate`), so the claim holds them too.
//!
//! Asserted (behaviour, never speed): no status other than the designed 429s
//! (and those only for hot tenants, within the limiter's bound), no
//! connection error; every accepted job succeeds exactly once (job state and
//! ledger rows against the accepted ids); worker and API RSS do not trend up
//! (median of the last third of the run against the middle third, generous
//! slack); the namespace's Redis memory other than the retained job hashes
//! returns near its baseline after the drain; no task process, no file
//! descriptor and no working directory (workers run with a private
//! `TMPDIR`) is left behind. Latency percentiles and the memory samples are
//! printed (`--nocapture`), not asserted.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentq::queue::{Queue, QueueConfig};
use common::{Proc, TestDb, TestQueue, WorkerProc, WorkerTmp, eventually};
use fred::prelude::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const TENANTS: usize = 100;
const CLIENTS: usize = 50;
const HOT: usize = 5;
const WORKERS: usize = 3;
const QUEUE: &str = "soak";
/// `serve --rate-limit`: requests per second per tenant (burst twice that).
const RATE_LIMIT: u64 = 10;
/// Cold clients wait this long between requests: each cold tenant stays at
/// or under 1000 / PACE / 2 requests per second, well under `RATE_LIMIT`.
const COLD_PACE: Duration = Duration::from_millis(150);
const HOT_PACE: Duration = Duration::from_millis(10);
/// Clients poll instead of enqueueing while this many jobs wait, so a slow
/// machine gets a bounded backlog (and drain) rather than a failing test.
const BACKLOG_MAX: i64 = 1500;

fn tenant(i: usize) -> String {
    format!("t{i:03}")
}

// ---- A minimal HTTP/1.1 keep-alive client --------------------------------

struct Http {
    port: u16,
    conn: Option<BufReader<TcpStream>>,
}

impl Http {
    fn new(port: u16) -> Http {
        Http { port, conn: None }
    }

    /// One request; (status, body). Any I/O problem is an error: the
    /// connection is dropped and the next request opens a new one.
    async fn request(
        &mut self,
        method: &str,
        path: &str,
        key: &str,
        body: &str,
    ) -> Result<(u16, String), String> {
        let r = tokio::time::timeout(
            Duration::from_secs(60),
            self.exchange(method, path, key, body),
        )
        .await
        .unwrap_or_else(|_| Err("no response within 60 s".into()));
        if r.is_err() {
            self.conn = None;
        }
        r
    }

    async fn exchange(
        &mut self,
        method: &str,
        path: &str,
        key: &str,
        body: &str,
    ) -> Result<(u16, String), String> {
        if self.conn.is_none() {
            let s = TcpStream::connect(("127.0.0.1", self.port))
                .await
                .map_err(|e| format!("connect: {e}"))?;
            s.set_nodelay(true).map_err(|e| e.to_string())?;
            self.conn = Some(BufReader::new(s));
        }
        let conn = self.conn.as_mut().ok_or("no connection")?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let w = conn.get_mut();
        w.write_all(head.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        w.write_all(body.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut line = String::new();
        let n = conn
            .read_line(&mut line)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("connection closed before a response".into());
        }
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("bad status line {line:?}"))?;
        let (mut len, mut close) = (None, false);
        loop {
            line.clear();
            conn.read_line(&mut line)
                .await
                .map_err(|e| format!("read: {e}"))?;
            let h = line.trim_end();
            if h.is_empty() {
                break;
            }
            let (name, value) = h.split_once(':').unwrap_or((h, ""));
            match name.to_ascii_lowercase().as_str() {
                "content-length" => len = value.trim().parse::<usize>().ok(),
                "connection" => close = value.trim().eq_ignore_ascii_case("close"),
                "transfer-encoding" => return Err(format!("unexpected {h:?}")),
                _ => {}
            }
        }
        let mut buf = vec![0; len.ok_or("no content-length")?];
        conn.read_exact(&mut buf)
            .await
            .map_err(|e| format!("read body: {e}"))?;
        if close {
            self.conn = None;
        }
        Ok((status, String::from_utf8_lossy(&buf).into_owned()))
    }
}

// ---- What the clients saw ---------------------------------------------------

#[derive(Default)]
struct Tally {
    requests: u64,
    posts: u64,
    gets: u64,
    limited: u64,
    latencies_ms: Vec<f64>,
    accepted_latencies_ms: Vec<f64>,
    /// Per tenant: requests that passed the limiter, requests refused (429).
    passed: HashMap<usize, u64>,
    refused: HashMap<usize, u64>,
    accepted: Vec<String>,
    errors: Vec<String>,
    error_count: u64,
    /// Client turns that polled instead of enqueueing (backlog over the cap).
    held_turns: u64,
}

impl Tally {
    fn error(&mut self, e: String) {
        self.error_count += 1;
        if self.errors.len() < 10 {
            self.errors.push(e);
        }
    }
}

/// The job ids in a 201 body (one job or `{"jobs": [...]}`), all created.
fn created_ids(body: &str) -> Result<Vec<String>, String> {
    let v: serde_json::Value = serde_json::from_str(body).map_err(|e| format!("{e}: {body}"))?;
    let items = match v.get("jobs") {
        Some(serde_json::Value::Array(a)) => a.clone(),
        _ => vec![v],
    };
    items
        .iter()
        .map(|j| match (j["id"].as_str(), j["created"].as_bool()) {
            (Some(id), Some(true)) => Ok(id.to_string()),
            _ => Err(format!("not a created job: {body}")),
        })
        .collect()
}

struct Client {
    http: Http,
    tenants: Vec<(usize, String)>,
    hot: bool,
    tally: Arc<Mutex<Tally>>,
    hold: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Client {
    async fn run(mut self, id: usize) {
        let mut mine: Vec<(usize, String)> = Vec::new();
        let mut n: u64 = 0;
        while !self.stop.load(Ordering::Relaxed) {
            let (mut t, mut key) = self.tenants[(n as usize) % self.tenants.len()].clone();
            n += 1;
            let held = self.hold.load(Ordering::Relaxed);
            let get = (held || (!self.hot && n.is_multiple_of(3))) && !mine.is_empty();
            if held {
                self.tally
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .held_turns += 1;
            }
            let started = Instant::now();
            let (method, path, body) = if get {
                // One of this client's jobs, asked for with its tenant's key.
                let (jt, job) = &mine[(n as usize * 7919) % mine.len()];
                (t, key) = self
                    .tenants
                    .iter()
                    .find(|(i, _)| i == jt)
                    .cloned()
                    .expect("the job's tenant");
                ("GET", format!("/v1/jobs/{job}"), String::new())
            } else if held {
                tokio::time::sleep(COLD_PACE).await;
                continue;
            } else {
                let echo = |i: u64| {
                    format!(r#"{{"queue":"{QUEUE}","kind":"echo","payload":{{"c":{id},"n":{i}}}}}"#)
                };
                let body = match n % 10 {
                    0 if !self.hot => format!(
                        r#"{{"jobs":[{},{},{}]}}"#,
                        echo(n),
                        echo(n + 1),
                        echo(n + 2)
                    ),
                    5 if !self.hot => {
                        format!(r#"{{"queue":"{QUEUE}","kind":"sleep","payload":{{"ms":20}}}}"#)
                    }
                    _ => echo(n),
                };
                ("POST", "/v1/jobs".to_string(), body)
            };
            let res = self.http.request(method, &path, &key, &body).await;
            let ms = started.elapsed().as_secs_f64() * 1000.0;
            self.record(t, get, method, &path, ms, res, &mut mine);
            tokio::time::sleep(if self.hot { HOT_PACE } else { COLD_PACE }).await;
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        t: usize,
        get: bool,
        method: &str,
        path: &str,
        ms: f64,
        res: Result<(u16, String), String>,
        mine: &mut Vec<(usize, String)>,
    ) {
        let mut tally = self.tally.lock().unwrap_or_else(|p| p.into_inner());
        tally.requests += 1;
        if get {
            tally.gets += 1;
        } else {
            tally.posts += 1;
        }
        match res {
            Err(e) => tally.error(format!("{method} {path} as {}: {e}", tenant(t))),
            Ok((status, body)) => {
                tally.latencies_ms.push(ms);
                match (status, get) {
                    (429, _) if self.hot => {
                        tally.limited += 1;
                        *tally.refused.entry(t).or_default() += 1;
                    }
                    (201, false) => match created_ids(&body) {
                        Ok(ids) => {
                            *tally.passed.entry(t).or_default() += 1;
                            tally.accepted_latencies_ms.push(ms);
                            for id in ids {
                                mine.push((t, id.clone()));
                                tally.accepted.push(id);
                            }
                        }
                        Err(e) => tally.error(e),
                    },
                    (200, true) if body.contains(&format!("\"tenant\":\"{}\"", tenant(t))) => {
                        *tally.passed.entry(t).or_default() += 1;
                    }
                    _ => tally.error(format!(
                        "{method} {path} as {}: {status} {}",
                        tenant(t),
                        body.chars().take(300).collect::<String>()
                    )),
                }
            }
        }
    }
}

// ---- Processes, descriptors, memory ---------------------------------------

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// (pid, parent pid, cmdline) of every process.
fn processes() -> Vec<(u32, u32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0);
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        out.push((pid, ppid, cmd));
    }
    out
}

/// Task processes: descendants of `roots` (but their lease guards), plus
/// anything (an orphan reparented to init) whose command line is under
/// `tasks_dir`.
fn task_processes(roots: &[u32], tasks_dir: &Path) -> Vec<String> {
    let all: Vec<(u32, u32, String)> = processes()
        .into_iter()
        .filter(|(_, _, cmd)| !cmd.contains("__lease-guard"))
        .collect();
    let dir = tasks_dir.display().to_string();
    let mut found: HashSet<u32> = HashSet::new();
    let mut frontier: Vec<u32> = roots.to_vec();
    while let Some(p) = frontier.pop() {
        for (pid, ppid, _) in &all {
            if *ppid == p && found.insert(*pid) {
                frontier.push(*pid);
            }
        }
    }
    all.iter()
        .filter(|(pid, _, cmd)| found.contains(pid) || (cmd.contains(&dir) && !roots.contains(pid)))
        .map(|(pid, ppid, cmd)| format!("{pid} (parent {ppid}): {cmd}"))
        .collect()
}

/// Bytes of the namespace's keys in Redis: (job hashes, everything else, keys).
async fn namespace_memory(q: &Queue) -> (u64, u64, usize) {
    use futures::TryStreamExt;
    let pattern = format!("{{{}:*", q.config().namespace);
    let keys: Vec<fred::types::Key> = q
        .client()
        .scan_buffered(pattern, Some(1000), None)
        .try_collect()
        .await
        .expect("scan namespace");
    let (mut jobs, mut rest) = (0u64, 0u64);
    for chunk in keys.chunks(500) {
        let sizes = futures::future::join_all(chunk.iter().map(|k| {
            q.client().custom::<Option<u64>, _>(
                fred::cmd!("MEMORY"),
                vec![Value::from("USAGE"), Value::from(k.clone())],
            )
        }))
        .await;
        for (k, size) in chunk.iter().zip(sizes) {
            let size = size.expect("MEMORY USAGE").unwrap_or(0);
            // Job hashes and the tenants' job event streams are kept on
            // purpose (retention_ms; events_max and events_ttl_ms): counted
            // apart from what must go back to its baseline.
            if k.as_str()
                .is_some_and(|s| s.contains(":job:") || s.contains(":events:"))
            {
                jobs += size;
            } else {
                rest += size;
            }
        }
    }
    (jobs, rest, keys.len())
}

async fn redis_used_memory(q: &Queue) -> u64 {
    let info: String = q
        .client()
        .info(Some(fred::types::InfoKind::Memory))
        .await
        .unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return 0.0;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

#[derive(Clone, Debug)]
struct Sample {
    at_s: f64,
    rss_kib: Vec<u64>,
    redis_used: u64,
    backlog: i64,
}

/// Removes the namespace and the schema however the test ends (the
/// processes, declared later, are killed first by their own guards).
struct Cleanup {
    ns: String,
    schema: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let (ns, schema) = (self.ns.clone(), self.schema.clone());
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let mut cfg = QueueConfig::new(common::redis_url());
                cfg.namespace = ns;
                if let Ok(q) = Queue::connect(cfg).await {
                    let _ = q.delete_namespace().await;
                }
                if let Ok(admin) = agentq::ledger::connect(&common::database_url(), None).await {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP SCHEMA IF EXISTS {schema} CASCADE"
                    )))
                    .execute(&admin)
                    .await;
                }
            });
        })
        .join();
    }
}

/// A private copy of the echo and sleep task programs, so that any process
/// running one of them is recognisably this test's.
fn task_programs() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("agentq-soak-")
        .tempdir()
        .expect("tempdir");
    for kind in ["echo", "sleep"] {
        let from: PathBuf = common::workers_dir().join(kind);
        let to = dir.path().join(kind);
        std::fs::create_dir(&to).expect("mkdir");
        for f in ["worker.toml", "run"] {
            std::fs::copy(from.join(f), to.join(f)).expect("copy task program");
        }
    }
    dir
}

/// An API key for each tenant; five of them (after the hot ones) with a
/// job start rate of 5/s. The keys, by tenant.
async fn create_tenants(tq: &TestQueue, db: &TestDb) -> Vec<String> {
    let mut keys = Vec::new();
    for i in 0..TENANTS {
        keys.push(
            agentq::http::api::keys::create(&db.pool, &tenant(i))
                .await
                .expect("create key")
                .key,
        );
    }
    for i in HOT..2 * HOT {
        common::set_rate(&tq.queue, &tenant(i), 5, None).await;
    }
    keys
}

/// `agentq serve` and the workers, by name (serve, worker1..).
struct Processes {
    serve: Proc,
    workers: Vec<Proc>,
    names: Vec<String>,
}

impl Processes {
    /// `agentq serve` on `port` (per-tenant `--rate-limit`) and three
    /// workers running the task programs of `tasks` (ledger on, `TMPDIR`
    /// in `tmp`); returns once serve listens.
    async fn start(
        tq: &TestQueue,
        db: &TestDb,
        port: u16,
        tasks: &Path,
        tmp: &WorkerTmp,
    ) -> Processes {
        let serve = Proc(
            common::agentq()
                .args([
                    "serve",
                    "--listen",
                    &format!("127.0.0.1:{port}"),
                    "--rate-limit",
                    &RATE_LIMIT.to_string(),
                ])
                .env("AGENTQ_REDIS_URL", common::redis_url())
                .env("AGENTQ_NAMESPACE", &tq.ns)
                .env("AGENTQ_DATABASE_URL", db.url())
                .env("AGENTQ_LOG", "agentq=warn")
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("spawn agentq serve"),
        );
        let tasks_dir = tasks.display().to_string();
        let how = WorkerProc {
            database_url: Some(db.url()),
            ..tmp.worker_proc()
        };
        let workers: Vec<Proc> = (0..WORKERS)
            .map(|_| {
                Proc(tq.spawn_worker_with(
                    &[
                        "--queues",
                        QUEUE,
                        "--concurrency",
                        "8",
                        "--workers-dir",
                        &tasks_dir,
                    ],
                    &how,
                ))
            })
            .collect();
        eventually(
            Duration::from_secs(60),
            "agentq serve listening",
            || async { agentq_servers::listening(&format!("127.0.0.1:{port}")).then_some(()) },
        )
        .await;
        let names: Vec<String> = std::iter::once("serve".to_string())
            .chain((1..=WORKERS).map(|i| format!("worker{i}")))
            .collect();
        Processes {
            serve,
            workers,
            names,
        }
    }

    fn worker_pids(&self) -> Vec<u32> {
        self.workers.iter().map(|w| w.id()).collect()
    }

    /// Serve's pid, then the workers'.
    fn pids(&self) -> Vec<u32> {
        let mut pids = vec![self.serve.id()];
        pids.extend(self.worker_pids());
        pids
    }

    fn assert_alive(&self) {
        for (name, w) in self
            .names
            .iter()
            .zip(std::iter::once(&self.serve).chain(&self.workers))
        {
            assert!(
                std::fs::metadata(format!("/proc/{}", w.id())).is_ok(),
                "{name} died during the soak"
            );
        }
    }

    /// SIGTERM everything; panic unless each exits 0.
    async fn stop_cleanly(self) {
        let Processes {
            mut serve,
            mut workers,
            names,
        } = self;
        for w in workers.iter().chain(std::iter::once(&serve)) {
            common::sigterm(w);
        }
        for (name, w) in names[1..].iter().zip(workers.iter_mut()) {
            assert_eq!(
                common::exit_code(w, Duration::from_secs(120)).await,
                Some(0),
                "{name} exit"
            );
        }
        assert_eq!(
            common::exit_code(&mut serve, Duration::from_secs(120)).await,
            Some(0),
            "serve exit"
        );
    }
}

/// One job through the whole path (HTTP, worker, job state) before the
/// clock starts; its id.
async fn probe_the_whole_path(tq: &TestQueue, port: u16, key: &str) -> String {
    let mut probe = Http::new(port);
    let (status, body) = probe
        .request(
            "POST",
            "/v1/jobs",
            key,
            &format!(r#"{{"queue":"{QUEUE}","kind":"echo","payload":{{"probe":1}}}}"#),
        )
        .await
        .expect("probe request");
    assert_eq!(status, 201, "{body}");
    let probe_id = created_ids(&body).expect("probe id").remove(0);
    common::job_in_state(tq, &probe_id, &["succeeded"]).await;
    probe_id
}

/// What the load phase saw and measured.
struct Load {
    tally: Tally,
    samples: Vec<Sample>,
    /// Descriptors of each process a third into the load.
    fds_warm: Vec<usize>,
    max_backlog: i64,
    secs: f64,
}

/// `CLIENTS` clients (the first `HOT` each on a hot tenant, the others
/// sharing the cold tenants) for `secs` seconds, sampling memory and the
/// backlog every second and holding the clients while the backlog is over
/// `BACKLOG_MAX`; every process must stay alive.
async fn run_load(
    tq: &TestQueue,
    procs: &Processes,
    port: u16,
    keys: &[String],
    probe_id: String,
    secs: u64,
) -> Load {
    let tally = Arc::new(Mutex::new(Tally::default()));
    tally
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .accepted
        .push(probe_id);
    let hold = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let tenants: Vec<(usize, String)> = if c < HOT {
            vec![(c, keys[c].clone())]
        } else {
            (HOT..TENANTS)
                .filter(|t| (t - HOT) % (CLIENTS - HOT) == c - HOT)
                .map(|t| (t, keys[t].clone()))
                .collect()
        };
        let client = Client {
            http: Http::new(port),
            tenants,
            hot: c < HOT,
            tally: tally.clone(),
            hold: hold.clone(),
            stop: stop.clone(),
        };
        clients.push(tokio::spawn(client.run(c)));
    }
    let pids = procs.pids();
    let start = Instant::now();
    let load = Duration::from_secs(secs);
    let mut samples: Vec<Sample> = Vec::new();
    let mut fds_warm: Option<Vec<usize>> = None;
    let mut max_backlog = 0;
    while start.elapsed() < load {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let stats = agentq::queue::inspect::queue_stats(&tq.queue)
            .await
            .expect("queue stats");
        let backlog: i64 = stats.iter().map(|s| s.ready + s.delayed).sum();
        max_backlog = max_backlog.max(backlog);
        hold.store(backlog > BACKLOG_MAX, Ordering::Relaxed);
        samples.push(Sample {
            at_s: start.elapsed().as_secs_f64(),
            rss_kib: pids.iter().map(|&p| rss_kib(p)).collect(),
            redis_used: redis_used_memory(&tq.queue).await,
            backlog,
        });
        if fds_warm.is_none() && start.elapsed() >= load / 3 {
            fds_warm = Some(pids.iter().map(|&p| fd_count(p)).collect());
        }
        procs.assert_alive();
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.expect("client task");
    }
    let secs = start.elapsed().as_secs_f64();
    let fds_warm = fds_warm.expect("a warm sample");
    let tally = std::mem::take(&mut *tally.lock().unwrap_or_else(|p| p.into_inner()));
    Load {
        tally,
        samples,
        fds_warm,
        max_backlog,
        secs,
    }
}

/// Drain: every accepted job succeeds, once, and reaches the ledger. The
/// accepted ids and how long the drain took (s).
async fn drain_and_assert_each_accepted_job_succeeded_once(
    tq: &TestQueue,
    db: &TestDb,
    t: &Tally,
) -> (HashSet<String>, f64) {
    let drain_start = Instant::now();
    common::drained(tq, Duration::from_secs(900)).await;
    let drain_secs = drain_start.elapsed().as_secs_f64();
    let accepted: HashSet<String> = t.accepted.iter().cloned().collect();
    assert_eq!(accepted.len(), t.accepted.len(), "job ids are unique");
    let ledger_rows = eventually(
        Duration::from_secs(600),
        "every accepted job in the ledger and the outbox empty",
        || async {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_ledger")
                .fetch_one(&db.pool)
                .await
                .ok()?;
            (n as usize >= accepted.len() && tq.outbox_len().await == 0).then_some(n)
        },
    )
    .await;
    let rows: Vec<(String, i32, String)> = db.rows().await;
    assert_eq!(ledger_rows as usize, rows.len());
    let mut in_ledger: HashSet<String> = HashSet::new();
    for (job, attempt, outcome) in &rows {
        assert!(
            accepted.contains(job),
            "ledger row of a job nobody enqueued: {job}"
        );
        assert_eq!((*attempt, outcome.as_str()), (1, "succeeded"), "job {job}");
        assert!(in_ledger.insert(job.clone()), "two ledger rows for {job}");
    }
    assert_eq!(
        in_ledger.len(),
        accepted.len(),
        "one ledger row per accepted job"
    );
    let mut not_done = Vec::new();
    for chunk in t.accepted.chunks(256) {
        for (id, (state, attempts, err)) in chunk.iter().zip(tq.job_states(chunk).await) {
            if state != "succeeded" || attempts != 1 {
                not_done.push(format!("{id}: {state} after {attempts} attempts {err}"));
            }
        }
    }
    assert!(
        not_done.is_empty(),
        "{} accepted jobs did not succeed once: {:?}",
        not_done.len(),
        &not_done[..not_done.len().min(10)]
    );
    tq.assert_quiet().await;
    (accepted, drain_secs)
}

/// Nothing left behind after the drain: no task process (waited for), and
/// each process's descriptors back near their warm level (waited for).
/// The task processes and descriptors at the end.
async fn wait_until_nothing_is_left_behind(
    procs: &Processes,
    tasks: &Path,
    fds_warm: &[usize],
) -> (Vec<String>, Vec<usize>) {
    let tasks_after = eventually(Duration::from_secs(60), "task processes gone", || async {
        let left = task_processes(&procs.worker_pids(), tasks);
        left.is_empty().then_some(left)
    })
    .await;
    let pids = procs.pids();
    let fds_end = eventually(
        Duration::from_secs(60),
        "descriptors back to the warm level",
        || async {
            let now: Vec<usize> = pids.iter().map(|&p| fd_count(p)).collect();
            now.iter()
                .zip(fds_warm)
                .all(|(n, w)| *n <= w + 16)
                .then_some(now)
        },
    )
    .await;
    (tasks_after, fds_end)
}

/// The namespace's Redis memory: (job hashes, everything else, keys).
type NamespaceMemory = (u64, u64, usize);

/// Print the figures (`--nocapture`): requests, latencies, RSS and Redis
/// memory over the run, namespace memory, descriptors, task processes.
#[allow(clippy::too_many_arguments)]
fn print_figures(
    load: &Load,
    names: &[String],
    accepted: usize,
    drain_secs: f64,
    (ns_before, ns_after): (NamespaceMemory, NamespaceMemory),
    redis_after_drain: u64,
    fds_end: &[usize],
    (tasks_before, tasks_after): (usize, usize),
) {
    let (t, samples) = (&load.tally, &load.samples);
    let pct = |v: &[f64]| {
        format!(
            "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            percentile(v, 0.5),
            percentile(v, 0.99),
            percentile(v, 1.0)
        )
    };
    println!(
        "soak: {:.0} s load, {} requests ({} POST, {} GET), {} designed 429s, {} errors; \
         {accepted} jobs accepted, all succeeded once; drain {drain_secs:.1} s; max backlog {}, \
         {} client turns polled instead of enqueueing while it was over {BACKLOG_MAX}",
        load.secs,
        t.requests,
        t.posts,
        t.gets,
        t.limited,
        t.error_count,
        load.max_backlog,
        t.held_turns
    );
    println!("soak: latency, all responses: {}", pct(&t.latencies_ms));
    println!(
        "soak: latency, accepted POSTs: {}",
        pct(&t.accepted_latencies_ms)
    );
    for (i, name) in names.iter().enumerate() {
        let series: Vec<String> = samples
            .iter()
            .step_by((samples.len() / 10).max(1))
            .map(|s| format!("{}", s.rss_kib[i] / 1024))
            .collect();
        println!("soak: {name} RSS MiB over the run: {}", series.join(" "));
    }
    let redis_series: Vec<String> = samples
        .iter()
        .step_by((samples.len() / 10).max(1))
        .map(|s| format!("{:.0}s:{}MiB/{}", s.at_s, s.redis_used >> 20, s.backlog))
        .collect();
    println!(
        "soak: Redis used_memory (whole server)/backlog: {} | after drain {} MiB",
        redis_series.join(" "),
        redis_after_drain >> 20
    );
    let ((_, ns_rest0, _), (ns_jobs, ns_rest, ns_keys)) = (ns_before, ns_after);
    println!(
        "soak: namespace memory: before {} KiB non-job; after drain {} KiB non-job, {} KiB in {} retained job hashes ({} B/job), {ns_keys} keys",
        ns_rest0 >> 10,
        ns_rest >> 10,
        ns_jobs >> 10,
        accepted,
        ns_jobs / accepted.max(1) as u64
    );
    println!(
        "soak: fds warm {:?} end {fds_end:?} ({names:?}); task processes before {tasks_before} after {tasks_after}",
        load.fds_warm
    );
}

/// Client-side outcomes: no error but the designed 429s, and no tenant got
/// more requests through than the limiter's bound.
fn assert_only_designed_refusals(t: &Tally, load_secs: f64) {
    assert_eq!(
        t.error_count, 0,
        "only designed 429s may fail; first errors: {:#?}",
        t.errors
    );
    for (&tn, &passed) in &t.passed {
        // The limiter's bound: a burst of twice the rate, then the rate.
        let bound = 2 * RATE_LIMIT + (RATE_LIMIT as f64 * load_secs).ceil() as u64 + RATE_LIMIT;
        assert!(
            passed <= bound,
            "{} got {passed} requests through a limit of {RATE_LIMIT}/s over {load_secs:.0} s",
            tenant(tn)
        );
    }
}

/// Memory trends: the last third of the run against the middle third.
fn assert_rss_does_not_trend_up(samples: &[Sample], names: &[String]) {
    let n = samples.len();
    for (i, name) in names.iter().enumerate() {
        let series: Vec<u64> = samples.iter().map(|s| s.rss_kib[i]).collect();
        let mid = median(series[n / 3..2 * n / 3].to_vec());
        let last = median(series[2 * n / 3..].to_vec());
        assert!(
            last <= mid + mid / 2 + 32 * 1024,
            "{name} RSS keeps growing: median {mid} KiB in the middle third, {last} KiB in the last"
        );
    }
}

/// The namespace's memory besides job hashes and job events is back near
/// its baseline, and what is retained of each job is small.
fn assert_namespace_memory_back(before: NamespaceMemory, after: NamespaceMemory, accepted: usize) {
    let ((_, ns_rest0, _), (ns_jobs, ns_rest, _)) = (before, after);
    assert!(
        ns_rest <= ns_rest0 + 256 * 1024 + 1024 * TENANTS as u64,
        "the namespace holds {} KiB besides job hashes after the drain, {} KiB before",
        ns_rest >> 10,
        ns_rest0 >> 10
    );
    assert!(
        ns_jobs <= 4096 * accepted as u64,
        "retained job hashes and job events take {} B per job",
        ns_jobs / accepted as u64
    );
}

/// Drained: each worker's directory is there, with no working directory
/// left in it.
fn assert_one_empty_directory_per_worker(tmp: &WorkerTmp) {
    let dirs = tmp.agentq_entries();
    assert!(
        dirs.len() == WORKERS
            && dirs
                .iter()
                .all(|d| d.starts_with("agentq-w-") && !d.contains('/')),
        "one empty directory per worker after the drain: {dirs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_soak_100_tenants_50_clients_3_workers() {
    let secs: u64 = std::env::var("AGENTQ_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(45)
        .max(6);
    let tq = TestQueue::new("soak").await;
    let db = TestDb::new("soak").await;
    let _cleanup = Cleanup {
        ns: tq.ns.clone(),
        schema: db.schema.clone(),
    };
    let tasks = task_programs();
    let keys = create_tenants(&tq, &db).await;
    let ns_before = namespace_memory(&tq.queue).await;
    assert_eq!(ns_before.0, 0);

    let port = agentq_servers::free_port().expect("port");
    let tmp = WorkerTmp::new();
    let procs = Processes::start(&tq, &db, port, tasks.path(), &tmp).await;
    let probe_id = probe_the_whole_path(&tq, port, &keys[HOT * 2]).await;
    let tasks_before = task_processes(&procs.worker_pids(), tasks.path());
    assert_eq!(tasks_before, Vec::<String>::new(), "no task running yet");

    let load = run_load(&tq, &procs, port, &keys, probe_id, secs).await;
    let (accepted, drain_secs) =
        drain_and_assert_each_accepted_job_succeeded_once(&tq, &db, &load.tally).await;
    let (tasks_after, fds_end) =
        wait_until_nothing_is_left_behind(&procs, tasks.path(), &load.fds_warm).await;
    let ns_after = namespace_memory(&tq.queue).await;
    let redis_after_drain = redis_used_memory(&tq.queue).await;
    print_figures(
        &load,
        &procs.names,
        accepted.len(),
        drain_secs,
        (ns_before, ns_after),
        redis_after_drain,
        &fds_end,
        (tasks_before.len(), tasks_after.len()),
    );

    assert_only_designed_refusals(&load.tally, load.secs);
    assert_rss_does_not_trend_up(&load.samples, &procs.names);
    assert_namespace_memory_back(ns_before, ns_after, accepted.len());
    assert_one_empty_directory_per_worker(&tmp);
    procs.stop_cleanly().await;
    // Stopped cleanly, the workers removed their working directories.
    tmp.assert_clean();
    db.pool.close().await;
}
