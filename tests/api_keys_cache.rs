//! The HTTP API's key cache against real `agentq serve` processes, Redis
//! and PostgreSQL: enqueues go on while PostgreSQL is unreachable (a TCP
//! proxy in front of it is cut), a key that cannot be checked gets 503
//! `auth_unavailable` (not 401), `agentq tenant key revoke` reaches every
//! serve within a second, a revoked key stays refused across a restart (and
//! one revoked in SQL is seen at the next cache refresh), and
//! the per-client state of failed authentications stays bounded.

mod common;

use std::net::Ipv4Addr;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentq::http::api::key_cache::KeyCacheConfig;
use agentq::http::api::{Api, ApiConfig, keys};
use common::{Proc, TestDb, TestQueue, agentq, eventually, run_to_end};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const PATIENCE: Duration = Duration::from_secs(30);
const JOB: &str = r#"{"queue":"q","kind":"echo","payload":{"n":1}}"#;

use common::http::{req, req_from};

/// A TCP forwarder to PostgreSQL that can be cut: every connection through
/// it is closed and new ones are closed as soon as accepted, as when the
/// database host goes away, for the one process pointed at it.
struct PgProxy {
    port: u16,
    cut: Arc<AtomicBool>,
    pumps: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl PgProxy {
    async fn start(upstream: String) -> PgProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let cut = Arc::new(AtomicBool::new(false));
        let pumps: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (c, p) = (cut.clone(), pumps.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if c.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(mut server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                let pump = tokio::spawn(async move {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
                p.lock().unwrap_or_else(|e| e.into_inner()).push(pump);
            }
        });
        PgProxy { port, cut, pumps }
    }

    /// Serve connections again after [`PgProxy::cut`].
    fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }

    /// Close every connection and refuse service from now on.
    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for p in self
            .pumps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            p.abort();
        }
    }
}

/// `url` with its host:port replaced by `authority`.
fn with_authority(url: &str, authority: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (auth, tail) = rest.split_at(end);
    let user = auth.rsplit_once('@').map(|(u, _)| format!("{u}@"));
    format!("{scheme}://{}{authority}{tail}", user.unwrap_or_default())
}

/// host:port of `url`.
fn authority_of(url: &str) -> String {
    let rest = url.split_once("://").expect("a URL").1;
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let auth = &rest[..end];
    let hostport = auth.rsplit_once('@').map_or(auth, |(_, h)| h);
    if hostport.contains(':') {
        hostport.to_string()
    } else {
        format!("{hostport}:5432")
    }
}

/// `agentq serve` on this namespace, with `database_url`; its port.
async fn spawn_serve(tq: &TestQueue, database_url: &str) -> (Proc, u16) {
    spawn_serve_with(tq, database_url, &[]).await
}

/// [`spawn_serve`] with more arguments.
async fn spawn_serve_with(tq: &TestQueue, database_url: &str, extra: &[&str]) -> (Proc, u16) {
    let port = agentq_servers::free_port().expect("port");
    let child = agentq()
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--rate-limit",
            "1000",
        ])
        .args(extra)
        .env("AGENTQ_REDIS_URL", tq.queue.config().redis_url.clone())
        .env("AGENTQ_NAMESPACE", &tq.ns)
        .env("AGENTQ_DATABASE_URL", database_url)
        .env("AGENTQ_LOG", "agentq=warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn agentq serve");
    let proc = Proc(child);
    eventually(PATIENCE, "agentq serve listening", || async {
        agentq_servers::listening(&format!("127.0.0.1:{port}")).then_some(())
    })
    .await;
    (proc, port)
}

/// `agentq tenant key revoke PREFIX` on this namespace and schema.
fn cli_revoke(tq: &TestQueue, db: &TestDb, prefix: &str) {
    let (code, out, err) = run_to_end(
        agentq()
            .args(["tenant", "key", "revoke", prefix])
            .env("AGENTQ_REDIS_URL", tq.queue.config().redis_url.clone())
            .env("AGENTQ_NAMESPACE", &tq.ns)
            .env("AGENTQ_DATABASE_URL", db.url())
            .env("AGENTQ_LOG", "off"),
    );
    assert_eq!(code, 0, "revoke: {out} {err}");
}

/// Enqueue one job with `key` on `port`; its id.
async fn enqueue(port: u16, key: &str) -> String {
    let r = req(port, "POST", "/v1/jobs", Some(key), Some(JOB)).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    r.body["id"].as_str().expect("id").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_used_key_enqueues_while_postgres_is_unreachable() {
    let tq = TestQueue::new("keys-outage").await;
    let db = TestDb::new("keys_outage").await;
    let a = keys::create(&db.pool, "a").await.expect("key").key;
    let proxy = PgProxy::start(authority_of(&common::database_url())).await;
    let url = with_authority(&db.url(), &format!("127.0.0.1:{}", proxy.port));
    let (_serve, port) = spawn_serve(&tq, &url).await;
    enqueue(port, &a).await;

    proxy.cut();
    for n in 0..3 {
        let r = req(port, "POST", "/v1/jobs", Some(&a), Some(JOB)).await;
        assert_eq!(
            r.status, 201,
            "enqueue {n} with PostgreSQL unreachable: {:?}",
            r.body
        );
        let id = r.body["id"].as_str().expect("id");
        let info = agentq::queue::inspect::job_info(&tq.queue, id)
            .await
            .expect("the job is in Redis");
        assert_eq!((info.tenant.as_str(), info.state.as_str()), ("a", "ready"));
    }
    db.cleanup().await;
    tq.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uncached_key_gets_503_not_401_while_postgres_is_unreachable() {
    let tq = TestQueue::new("keys-503").await;
    let db = TestDb::new("keys_503").await;
    let a = keys::create(&db.pool, "a").await.expect("key").key;
    let b = keys::create(&db.pool, "b").await.expect("key").key;
    let proxy = PgProxy::start(authority_of(&common::database_url())).await;
    let url = with_authority(&db.url(), &format!("127.0.0.1:{}", proxy.port));
    let (_serve, port) = spawn_serve(&tq, &url).await;
    enqueue(port, &a).await;

    proxy.cut();
    let started = Instant::now();
    let r = req(port, "POST", "/v1/jobs", Some(&b), Some(JOB)).await;
    assert_eq!(
        (r.status, r.code()),
        (503, "auth_unavailable"),
        "{:?}",
        r.body
    );
    eprintln!(
        "503 auth_unavailable after {} ms",
        started.elapsed().as_millis()
    );
    // A known key still works, and an unknown one is still a retry, not a refusal.
    enqueue(port, &a).await;
    let r = req(port, "GET", "/v1/jobs/0-1", Some(&b), None).await;
    assert_eq!((r.status, r.code()), (503, "auth_unavailable"));
    db.cleanup().await;
    tq.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_revocation_reaches_two_serves_within_a_second() {
    let tq = TestQueue::new("keys-revoke").await;
    let db = TestDb::new("keys_revoke").await;
    let made = keys::create(&db.pool, "a").await.expect("key");
    let (_s1, p1) = spawn_serve(&tq, &db.url()).await;
    let (_s2, p2) = spawn_serve(&tq, &db.url()).await;
    let id = enqueue(p1, &made.key).await;
    enqueue(p2, &made.key).await; // both hold the key now

    let cli_start = Instant::now();
    cli_revoke(&tq, &db, &made.prefix);
    let revoked = Instant::now();
    let path = format!("/v1/jobs/{id}");
    let refused_after = |port: u16| {
        let (key, path) = (made.key.clone(), path.clone());
        async move {
            loop {
                let r = req(port, "GET", &path, Some(&key), None).await;
                match r.status {
                    200 => tokio::time::sleep(Duration::from_millis(10)).await,
                    401 => return revoked.elapsed(),
                    s => panic!("unexpected {s}: {:?}", r.body),
                }
                assert!(revoked.elapsed() < PATIENCE, "never refused on {port}");
            }
        }
    };
    let (t1, t2) = tokio::join!(refused_after(p1), refused_after(p2));
    eprintln!(
        "revocation propagation: serve 1 refused {} ms, serve 2 {} ms after the CLI exited \
         (the CLI itself took {} ms)",
        t1.as_millis(),
        t2.as_millis(),
        (revoked - cli_start).as_millis()
    );
    assert!(t1.max(t2) < Duration::from_millis(1500), "{t1:?} {t2:?}");
    // Refused for enqueues too.
    let r = req(p2, "POST", "/v1/jobs", Some(&made.key), Some(JOB)).await;
    assert_eq!(r.status, 401);
    db.cleanup().await;
    tq.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_stays_refused_after_serve_restarts() {
    let tq = TestQueue::new("keys-restart").await;
    let db = TestDb::new("keys_restart").await;
    let a = keys::create(&db.pool, "a").await.expect("key");
    let c = keys::create(&db.pool, "c").await.expect("key");
    let d = keys::create(&db.pool, "d").await.expect("key");
    let (s1, p1) = spawn_serve(&tq, &db.url()).await;
    enqueue(p1, &a.key).await;
    enqueue(p1, &c.key).await;
    cli_revoke(&tq, &db, &a.prefix);
    eventually(PATIENCE, "revoked key refused", || async {
        (req(p1, "POST", "/v1/jobs", Some(&a.key), Some(JOB))
            .await
            .status
            == 401)
            .then_some(())
    })
    .await;
    drop(s1);
    // Revoked straight in SQL while no serve runs: no announcement at all.
    sqlx::query("UPDATE api_keys SET revoked_at = now() WHERE prefix = $1")
        .bind(&c.prefix)
        .execute(&db.pool)
        .await
        .expect("revoke in SQL");

    let (_s2, p2) = spawn_serve(&tq, &db.url()).await;
    for k in [&a.key, &c.key] {
        let r = req(p2, "POST", "/v1/jobs", Some(k), Some(JOB)).await;
        assert_eq!((r.status, r.code()), (401, "unauthorized"), "{:?}", r.body);
    }
    enqueue(p2, &d.key).await;
    db.cleanup().await;
    tq.cleanup().await;
}

/// Start `api` in this process; its port.
async fn start_in_process(api: Api, stop: CancellationToken) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(api.serve(listener, stop));
    port
}

fn fake_key() -> String {
    format!("aq_{:08x}_{}", rand::random::<u32>(), "0".repeat(64))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_auth_state_stays_bounded_with_many_addresses_and_prefixes() {
    let tq = TestQueue::new("keys-prune").await;
    let db = TestDb::new("keys_prune").await;
    let a = keys::create(&db.pool, "a").await.expect("key").key;
    // 600 failures a minute: a cell comes back every 100 ms, so state is
    // fresh again (prunable) a second after ten failures.
    let cfg = ApiConfig {
        auth_failures_per_min: std::num::NonZeroU32::new(600).expect("nonzero"),
        prune_every: Duration::from_secs(3600), // pruned by hand below
        key_cache: KeyCacheConfig {
            max_negative: 50,
            negative_ttl: Duration::from_millis(500),
            ..Default::default()
        },
        ..Default::default()
    };
    let stop = CancellationToken::new();
    let api = Api::new(tq.queue.clone(), db.pool.clone(), &cfg);
    let port = start_in_process(api.clone(), stop.clone()).await;
    enqueue(port, &a).await;

    let addresses: Vec<Ipv4Addr> = (0..40).map(|i| Ipv4Addr::new(127, 0, 1, 2 + i)).collect();
    for i in 0..400 {
        let r = req_from(
            addresses[i % addresses.len()],
            port,
            "GET",
            "/v1/jobs/0-1",
            Some(&fake_key()),
            None,
        )
        .await;
        assert_eq!(r.status, 401, "{:?}", r.body);
        let t = api.tracked();
        assert!(t.unknown_prefixes <= 50, "unknown prefixes bounded: {t:?}");
    }
    let grown = api.tracked();
    assert!(
        grown.failures >= 400,
        "every address and prefix was tracked: {grown:?}"
    );
    assert_eq!(grown.tenants, 1, "{grown:?}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let pruned = api.prune();
    assert_eq!(
        (pruned.failures, pruned.blocked, pruned.unknown_prefixes),
        (0, 0, 0),
        "{pruned:?} (before: {grown:?})"
    );
    assert_eq!(pruned.cached_keys, 1, "the real key stays cached");
    stop.cancel();

    // The same, pruned by the server's own loop.
    let cfg = ApiConfig {
        prune_every: Duration::from_millis(200),
        ..cfg
    };
    let stop = CancellationToken::new();
    let api = Api::new(tq.queue.clone(), db.pool.clone(), &cfg);
    let port = start_in_process(api.clone(), stop.clone()).await;
    for i in 0..100 {
        let from = addresses[i % addresses.len()];
        let r = req_from(from, port, "GET", "/v1/usage", Some(&fake_key()), None).await;
        assert_eq!(r.status, 401);
    }
    eventually(Duration::from_secs(10), "pruned by the loop", || async {
        let t = api.tracked();
        (t.failures == 0 && t.blocked == 0 && t.unknown_prefixes == 0).then_some(())
    })
    .await;
    stop.cancel();
    db.cleanup().await;
    tq.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_made_in_sql_is_seen_at_the_next_refresh() {
    let tq = TestQueue::new("keys-refresh").await;
    let db = TestDb::new("keys_refresh").await;
    let a = keys::create(&db.pool, "a").await.expect("key");
    let stop = CancellationToken::new();
    let api = Api::new(tq.queue.clone(), db.pool.clone(), &ApiConfig::default());
    let port = start_in_process(api.clone(), stop.clone()).await;
    enqueue(port, &a.key).await;
    sqlx::query("UPDATE api_keys SET revoked_at = now() WHERE prefix = $1")
        .bind(&a.prefix)
        .execute(&db.pool)
        .await
        .expect("revoke in SQL");
    // Cached, and nothing was announced: accepted until the refresh.
    enqueue(port, &a.key).await;
    assert_eq!(api.key_cache().refresh().await.expect("refresh"), 1);
    let r = req(port, "POST", "/v1/jobs", Some(&a.key), Some(JOB)).await;
    assert_eq!((r.status, r.code()), (401, "unauthorized"));
    // A row deleted from the table is forgotten at the refresh after.
    sqlx::query("DELETE FROM api_keys WHERE prefix = $1")
        .bind(&a.prefix)
        .execute(&db.pool)
        .await
        .expect("delete");
    api.key_cache().refresh().await.expect("refresh");
    assert_eq!(api.tracked().cached_keys, 0);
    stop.cancel();
    db.cleanup().await;
    tq.cleanup().await;
}

/// `agentq serve --metrics-addr` exports the jobs it created over HTTP as
/// `agentq_jobs_enqueued_total{queue, tenant}`; an idempotent repeat
/// (200, nothing created) does not count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_counts_the_jobs_it_created() {
    let tq = TestQueue::new("keys-metrics").await;
    let db = TestDb::new("keys_metrics").await;
    let a = keys::create(&db.pool, "a").await.expect("key").key;
    let metrics_port = agentq_servers::free_port().expect("port");
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let (_serve, port) = spawn_serve_with(
        &tq,
        &db.url(),
        &[
            "--metrics-addr",
            &metrics_addr,
            "--metrics-tenant-labels",
            "all",
        ],
    )
    .await;
    for _ in 0..3 {
        enqueue(port, &a).await;
    }
    let once = r#"{"queue":"q","kind":"echo","idempotency_key":"k1"}"#;
    let first = req(port, "POST", "/v1/jobs", Some(&a), Some(once)).await;
    let again = req(port, "POST", "/v1/jobs", Some(&a), Some(once)).await;
    assert_eq!((first.status, again.status), (201, 200));
    let line = eventually(PATIENCE, "agentq_jobs_enqueued_total", || async {
        let (status, body) = common::http_get(metrics_port, "/metrics").ok()?;
        (status == 200).then_some(())?;
        body.lines()
            .find(|l| {
                l.starts_with("agentq_jobs_enqueued_total{")
                    && l.contains(r#"queue="q""#)
                    && l.contains(r#"tenant="a""#)
            })
            .map(String::from)
    })
    .await;
    let value: f64 = line
        .rsplit_once(' ')
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("a value: {line}"));
    assert_eq!(
        value, 4.0,
        "three plain enqueues and one idempotent pair: {line}"
    );
    db.cleanup().await;
    tq.cleanup().await;
}

/// `agentq serve` starts while PostgreSQL is unreachable (a restart during an
/// outage must not take the API down): it listens, answers keys it cannot
/// check with 503 `auth_unavailable`, and verifies them once PostgreSQL
/// answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_starts_while_postgres_is_unreachable_and_recovers() {
    let tq = TestQueue::new("keys-start").await;
    let db = TestDb::new("keys_start").await;
    let a = keys::create(&db.pool, "a").await.expect("key").key;
    let proxy = PgProxy::start(authority_of(&common::database_url())).await;
    proxy.cut();
    let url = with_authority(&db.url(), &format!("127.0.0.1:{}", proxy.port));
    let (_serve, port) = spawn_serve(&tq, &url).await;
    let r = req(port, "POST", "/v1/jobs", Some(&a), Some(JOB)).await;
    assert_eq!(
        (r.status, r.code()),
        (503, "auth_unavailable"),
        "{:?}",
        r.body
    );
    proxy.restore();
    eventually(
        PATIENCE,
        "the key is verified once PostgreSQL answers",
        || async {
            let r = req(port, "POST", "/v1/jobs", Some(&a), Some(JOB)).await;
            (r.status == 201).then_some(())
        },
    )
    .await;
    db.cleanup().await;
    tq.cleanup().await;
}
