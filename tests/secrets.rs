//! Secrets never reach logs, command output, Redis or the ledger: Redis and
//! PostgreSQL passwords in URLs (right and wrong ones, servers up and down)
//! and tenant API keys. Private servers with real password auth.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use agentq_servers::{PrivatePostgres, PrivateRedis, free_port};
use common::*;
use fred::prelude::*;

fn secret(tag: &str) -> String {
    format!("{tag}-S3cr3t-{:016x}", rand::random::<u64>())
}

/// Every occurrence of any of `secrets` in `text`, for a readable failure.
fn assert_clean(what: &str, text: &str, secrets: &[&str]) {
    for s in secrets {
        assert!(
            !text.contains(s),
            "{what} contains the secret {s:?}:\n{}",
            text.lines()
                .filter(|l| l.contains(s))
                .take(5)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

/// `agentq <args>` with a private namespace; stdout, then stderr.
fn run_cli(ns: &str, env: &[(&str, &str)], args: &[&str]) -> (i32, String) {
    let (code, out, err) = run_cli3(ns, env, args);
    (code, format!("{out}{err}"))
}

/// `agentq <args>`: exit code, stdout, stderr.
fn run_cli3(ns: &str, env: &[(&str, &str)], args: &[&str]) -> (i32, String, String) {
    run_to_end(
        agentq()
            .args(args)
            .env("AGENTQ_NAMESPACE", ns)
            .env("AGENTQ_LOG", "debug")
            .envs(env.iter().copied()),
    )
}

/// `agentq worker` with stderr to `log` (every target at debug level).
fn spawn_worker(ns: &str, env: &[(&str, &str)], log: &Path, extra: &[&str]) -> Child {
    agentq()
        .args(["worker", "--metrics-addr", "off", "--lease", "2s"])
        .args(extra)
        .env("AGENTQ_NAMESPACE", ns)
        .env("AGENTQ_WORKERS_DIR", workers_dir())
        .env("AGENTQ_LOG", "debug")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log file"))
        .spawn()
        .expect("spawn worker")
}

fn stop(mut c: Child) {
    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    let _ = c.wait();
}

/// Panics if what any key of `tq`'s namespace holds in Redis (its DUMP)
/// contains one of `secrets`.
async fn assert_redis_clean(tq: &TestQueue, secrets: &[&str]) {
    let keys: Vec<String> = tq
        .queue
        .client()
        .custom(fred::cmd!("KEYS"), vec![format!("{{{}:*", tq.ns)])
        .await
        .expect("keys");
    for k in keys {
        if let Ok(d) = tq
            .queue
            .client()
            .custom::<Vec<u8>, _>(fred::cmd!("DUMP"), vec![k])
            .await
        {
            assert_clean("Redis", &String::from_utf8_lossy(&d), secrets);
        }
    }
}

struct Servers {
    redis: PrivateRedis,
    pg: PrivatePostgres,
    redis_pw: String,
    pg_pw: String,
}

impl Servers {
    fn start() -> Servers {
        let redis_pw = secret("redispw");
        let pg_pw = secret("pgpw");
        let redis = PrivateRedis::start(&["--requirepass", &redis_pw]).expect("redis-server");
        let mut pg = PrivatePostgres::start().expect("private PostgreSQL");
        pg.secure(&pg_pw, None).expect("password auth");
        Servers {
            redis,
            pg,
            redis_pw,
            pg_pw,
        }
    }
    fn redis_url(&self, pw: &str) -> String {
        format!("redis://:{pw}@127.0.0.1:{}", self.redis.port)
    }
    fn pg_url(&self, pw: &str) -> String {
        format!(
            "postgres://postgres:{pw}@127.0.0.1:{}/postgres",
            self.pg.port
        )
    }
}

/// Good passwords: a worker runs jobs into the ledger, CLI commands work;
/// then wrong passwords and an unreachable PostgreSQL: errors are reported,
/// and no password ever shows in logs, output, Redis or the ledger.
#[tokio::test]
async fn passwords_stay_out_of_logs_output_and_ledger() {
    let s = Servers::start();
    let wrong = secret("wrongpw");
    let secrets = [s.redis_pw.as_str(), s.pg_pw.as_str(), wrong.as_str()];
    let ns = namespace("secrets");
    let tq = TestQueue::with_url("secrets", &s.redis_url(&s.redis_pw)).await;
    let ns_env = tq.ns.clone();
    let good = [
        ("AGENTQ_REDIS_URL", s.redis_url(&s.redis_pw)),
        ("AGENTQ_DATABASE_URL", s.pg_url(&s.pg_pw)),
    ];
    let good: Vec<(&str, &str)> = good.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let tmp = tempfile::tempdir().unwrap();
    let mut transcript = String::new();

    let (code, out) = run_cli(&ns_env, &good, &["migrate"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("postgres:***@"), "{out}");
    transcript += &out;

    let log = tmp.path().join("worker.log");
    let worker = spawn_worker(&ns_env, &good, &log, &[]);
    let mut ids = Vec::new();
    for (kind, payload) in [("echo", "{\"x\":1}"), ("fail", "{\"code\":65}")] {
        let (code, out, err) = run_cli3(
            &ns_env,
            &good,
            &[
                "enqueue",
                "--queue",
                "default",
                "--tenant",
                "acme",
                "--kind",
                kind,
                "--payload",
                payload,
            ],
        );
        assert_eq!(code, 0, "{err}");
        ids.push(out.trim().to_string());
        transcript += &out;
        transcript += &err;
    }
    let pool = agentq::ledger::connect(&s.pg_url(&s.pg_pw), None)
        .await
        .expect("connect with password");
    let rows: Vec<String> = eventually(Duration::from_secs(60), "two ledger rows", || async {
        let rows: Vec<(String,)> =
            sqlx::query_as("SELECT row_to_json(u)::text FROM usage_ledger u")
                .fetch_all(&pool)
                .await
                .ok()?;
        (rows.len() == 2).then(|| rows.into_iter().map(|r| r.0).collect())
    })
    .await;
    assert_clean("the ledger", &rows.join("\n"), &secrets);
    for args in [
        vec!["queues"],
        vec!["tenants"],
        vec!["inspect", ids[0].as_str()],
        vec!["usage"],
    ] {
        let (code, out) = run_cli(&ns_env, &good, &args);
        assert_eq!(code, 0, "{args:?}: {out}");
        transcript += &out;
    }
    stop(worker);
    transcript += &std::fs::read_to_string(&log).unwrap();

    // Everything the namespace holds in Redis.
    assert_redis_clean(&tq, &secrets).await;

    // Wrong Redis password: a clear failure, redacted.
    let bad_redis = [
        ("AGENTQ_REDIS_URL", s.redis_url(&wrong)),
        ("AGENTQ_DATABASE_URL", s.pg_url(&s.pg_pw)),
    ];
    let bad_redis: Vec<(&str, &str)> = bad_redis.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (code, out) = run_cli(&ns, &bad_redis, &["queues"]);
    assert_ne!(code, 0, "{out}");
    transcript += &out;
    let log2 = tmp.path().join("worker-bad-redis.log");
    let mut w = spawn_worker(&ns, &bad_redis, &log2, &[]);
    let mut status = None;
    for _ in 0..600 {
        status = w.try_wait().expect("try_wait");
        if status.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = status.expect("the worker gives up on a wrong Redis password within 30s");
    assert!(!status.success());
    transcript += &std::fs::read_to_string(&log2).unwrap();

    // Wrong PostgreSQL password, then PostgreSQL not listening at all: the
    // worker keeps running and logs the ledger failures, redacted.
    for (name, url) in [
        ("bad-pg", s.pg_url(&wrong)),
        (
            "no-pg",
            format!(
                "postgres://postgres:{wrong}@127.0.0.1:{}/postgres",
                free_port().unwrap()
            ),
        ),
        // The password as a query parameter, which sqlx also reads.
        (
            "query-pw",
            format!(
                "postgres://postgres@127.0.0.1:{}/postgres?password={wrong}",
                s.pg.port
            ),
        ),
    ] {
        let env = [
            ("AGENTQ_REDIS_URL", s.redis_url(&s.redis_pw)),
            ("AGENTQ_DATABASE_URL", url.clone()),
        ];
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (code, out) = run_cli(&ns_env, &env, &["migrate"]);
        assert_ne!(code, 0, "{name}: {out}");
        assert!(out.contains("***"), "{name}: {out}");
        transcript += &out;
        let (code, out) = run_cli(&ns_env, &env, &["usage"]);
        assert_ne!(code, 0, "{name}: {out}");
        transcript += &out;
        let log = tmp.path().join(format!("{name}.log"));
        let w = spawn_worker(&ns_env, &env, &log, &[]);
        let (code, out) = run_cli(
            &ns_env,
            &good,
            &[
                "enqueue", "--queue", "default", "--tenant", "acme", "--kind", "echo",
            ],
        );
        assert_eq!(code, 0, "{out}");
        eventually(
            Duration::from_secs(60),
            "a logged ledger failure",
            || async {
                let text = std::fs::read_to_string(&log).ok()?;
                text.lines()
                    .any(|l| l.contains("WARN") || l.contains("ERROR"))
                    .then_some(())
            },
        )
        .await;
        stop(w);
        transcript += &std::fs::read_to_string(&log).unwrap();
    }

    assert!(
        transcript.len() > 1000,
        "too little was captured to prove anything"
    );
    assert_clean("logs and command output", &transcript, &secrets);
    pool.close().await;
    tq.cleanup().await;
}

/// `agentq serve` with debug logging: requests with a valid key, a wrong
/// key of the same prefix and a malformed one. The key's secret part is
/// never logged, and only its hash is stored.
#[tokio::test]
async fn api_keys_stay_out_of_logs_and_storage() {
    let s = Servers::start();
    let tq = TestQueue::with_url("secrets-api", &s.redis_url(&s.redis_pw)).await;
    let env = [
        ("AGENTQ_REDIS_URL", s.redis_url(&s.redis_pw)),
        ("AGENTQ_DATABASE_URL", s.pg_url(&s.pg_pw)),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (code, out) = run_cli(&tq.ns, &env, &["migrate"]);
    assert_eq!(code, 0, "{out}");
    let out = agentq()
        .args(["tenant", "key", "create", "acme"])
        .env("AGENTQ_NAMESPACE", &tq.ns)
        .env("AGENTQ_LOG", "debug")
        .envs(env.iter().copied())
        .output()
        .expect("key create");
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let key = stdout
        .split_whitespace()
        .find(|w| w.starts_with("aq_"))
        .expect("a key on stdout")
        .to_string();
    let parts = agentq::http::api::keys::parse(&key).expect("key format");
    let (prefix, secret_part) = (parts.prefix, parts.secret);
    let (prefix, secret_part) = (prefix.to_string(), secret_part.to_string());
    let mut transcript = String::from_utf8_lossy(&out.stderr).into_owned();

    let port = free_port().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("serve.log");
    let serve = agentq()
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .env("AGENTQ_NAMESPACE", &tq.ns)
        .env("AGENTQ_LOG", "debug")
        .envs(env.iter().copied())
        .stdout(std::fs::File::create(tmp.path().join("serve.out")).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("serve");
    eventually(Duration::from_secs(30), "serve listening", || async {
        agentq_servers::listening(&format!("127.0.0.1:{port}")).then_some(())
    })
    .await;
    let wrong = format!("aq_{prefix}_{}", "0".repeat(64));
    let body = r#"{"queue":"default","kind":"echo","payload":{"x":1}}"#;
    let (status, _) = http(port, "POST", "/v1/jobs", Some(&key), body);
    assert!(status == 201 || status == 200, "{status}");
    let (status, _) = http(port, "GET", "/v1/usage", Some(&key), "");
    assert_eq!(status, 200);
    let (status, _) = http(port, "POST", "/v1/jobs", Some(&wrong), body);
    assert_eq!(status, 401);
    let (status, _) = http(port, "GET", "/v1/jobs/0-1", Some(&format!("{key}x")), "");
    assert_eq!(status, 401);
    stop(serve);
    transcript += &std::fs::read_to_string(&log).unwrap();
    transcript += &std::fs::read_to_string(tmp.path().join("serve.out")).unwrap();
    assert!(
        transcript.contains("/v1/jobs"),
        "the access log was captured: {transcript}"
    );
    let secrets = [
        key.as_str(),
        secret_part.as_str(),
        wrong.as_str(),
        s.redis_pw.as_str(),
        s.pg_pw.as_str(),
    ];
    assert_clean("serve logs", &transcript, &secrets);

    // Storage: the whole database dump and the namespace in Redis.
    let dump = Command::new("/usr/lib/postgresql/15/bin/pg_dump")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &s.pg.port.to_string(),
            "-U",
            "postgres",
            "postgres",
        ])
        .env("PGPASSWORD", &s.pg_pw)
        .output();
    let dump_text = match dump {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        _ => {
            // No pg_dump of that version: read every table as JSON instead.
            let pool = agentq::ledger::connect(&s.pg_url(&s.pg_pw), None)
                .await
                .unwrap();
            let tables: Vec<(String,)> = sqlx::query_as(
                "SELECT quote_ident(schemaname)||'.'||quote_ident(tablename) FROM pg_tables WHERE schemaname NOT IN ('pg_catalog','information_schema')",
            )
            .fetch_all(&pool)
            .await
            .unwrap();
            let mut all = String::new();
            for (t,) in tables {
                let rows: Vec<(String,)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT row_to_json(x)::text FROM {t} x"
                )))
                .fetch_all(&pool)
                .await
                .unwrap_or_default();
                for (r,) in rows {
                    all.push_str(&r);
                }
            }
            all
        }
    };
    assert!(dump_text.contains(&prefix), "the key's prefix is stored");
    assert_clean("the database", &dump_text, &secrets);
    assert_redis_clean(&tq, &secrets).await;
    tq.cleanup().await;
}

/// One HTTP/1.0 request; (status, body).
fn http(port: u16, method: &str, path: &str, key: Option<&str>, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.0\r\nHost: localhost\r\n");
    if let Some(k) = key {
        head.push_str(&format!("Authorization: Bearer {k}\r\n"));
    }
    head.push_str(&format!(
        "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ));
    s.write_all(head.as_bytes()).unwrap();
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (
        status,
        text.split_once("\r\n\r\n")
            .map(|x| x.1.to_string())
            .unwrap_or_default(),
    )
}
