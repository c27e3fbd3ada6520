//! TLS with passwords to Redis (`rediss://`) and PostgreSQL (`sslmode=`),
//! against private servers with certificates from a throwaway CA made with
//! `openssl`. The CA is trusted through `SSL_CERT_FILE` (Redis: rustls with
//! the platform roots, which that variable replaces) and `sslrootcert=`
//! (PostgreSQL).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use agentq_servers::{PrivatePostgres, PrivateRedis, free_port};
use common::*;

/// CA and server certificate (SAN 127.0.0.1 and localhost) in `dir`.
struct Certs {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("openssl is installed (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn make_certs(dir: &Path) -> Certs {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=agentq test CA",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
    Certs {
        ca: dir.join("ca.crt"),
        cert: dir.join("server.crt"),
        key: dir.join("server.key"),
    }
}

struct TlsServers {
    _redis: PrivateRedis,
    tls_port: u16,
    pg: PrivatePostgres,
    redis_pw: String,
    pg_pw: String,
    certs: Certs,
    _dir: tempfile::TempDir,
}

impl TlsServers {
    fn start() -> TlsServers {
        let dir = tempfile::tempdir().unwrap();
        let certs = make_certs(dir.path());
        let redis_pw = format!("tls-redis-{:016x}", rand::random::<u64>());
        let pg_pw = format!("tls-pg-{:016x}", rand::random::<u64>());
        let tls_port = free_port().unwrap();
        let redis = PrivateRedis::start(&[
            "--requirepass",
            &redis_pw,
            "--tls-port",
            &tls_port.to_string(),
            "--tls-cert-file",
            &certs.cert.display().to_string(),
            "--tls-key-file",
            &certs.key.display().to_string(),
            "--tls-ca-cert-file",
            &certs.ca.display().to_string(),
            "--tls-auth-clients",
            "no",
        ])
        .expect("redis-server with TLS (Debian's is built with it)");
        let mut pg = PrivatePostgres::start().expect("private PostgreSQL");
        pg.secure(&pg_pw, Some((&certs.cert, &certs.key)))
            .expect("PostgreSQL with ssl=on and a password");
        TlsServers {
            _redis: redis,
            tls_port,
            pg,
            redis_pw,
            pg_pw,
            certs,
            _dir: dir,
        }
    }

    fn redis_url(&self) -> String {
        format!("rediss://:{}@127.0.0.1:{}", self.redis_pw, self.tls_port)
    }

    fn pg_url(&self, sslmode: &str, with_ca: bool) -> String {
        let mut u = format!(
            "postgres://postgres:{}@127.0.0.1:{}/postgres?sslmode={sslmode}",
            self.pg_pw, self.pg.port
        );
        if with_ca {
            u.push_str(&format!("&sslrootcert={}", self.certs.ca.display()));
        }
        u
    }
}

/// `agentq <args>` in namespace `ns` with `env`; (exit code, stdout, stderr).
fn cli(ns: &str, env: &[(&str, String)], args: &[&str]) -> (i32, String, String) {
    run_to_end(
        agentq()
            .args(args)
            .env("AGENTQ_NAMESPACE", ns)
            .env("AGENTQ_LOG", "info")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str()))),
    )
}

/// A worker, the CLI and the ledger all over TLS with passwords: the job
/// runs, its ledger row lands, the PostgreSQL session is encrypted, and the
/// passwords appear nowhere in the output.
#[tokio::test]
async fn worker_cli_and_ledger_over_tls_with_passwords() {
    let s = TlsServers::start();
    let ns = namespace("tls");
    let env = vec![
        ("AGENTQ_REDIS_URL", s.redis_url()),
        ("AGENTQ_DATABASE_URL", s.pg_url("verify-full", true)),
        ("SSL_CERT_FILE", s.certs.ca.display().to_string()),
    ];
    let mut transcript = String::new();
    let (code, out, err) = cli(&ns, &env, &["migrate"]);
    assert_eq!(code, 0, "{err}");
    transcript += &(out + &err);
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("worker.log");
    let mut worker = agentq()
        .args(["worker", "--metrics-addr", "off"])
        .env("AGENTQ_NAMESPACE", &ns)
        .env("AGENTQ_WORKERS_DIR", workers_dir())
        .env("AGENTQ_LOG", "info")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn worker");
    let (code, id, err) = cli(
        &ns,
        &env,
        &[
            "enqueue",
            "--queue",
            "default",
            "--tenant",
            "acme",
            "--kind",
            "echo",
            "--payload",
            "{\"over\":\"tls\"}",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let id = id.trim().to_string();
    let pool = agentq::ledger::connect(&s.pg_url("verify-full", true), None)
        .await
        .expect("sqlx over TLS with the CA from sslrootcert");
    let (encrypted,): (bool,) =
        sqlx::query_as("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(encrypted, "the PostgreSQL session is not encrypted");
    let outcome: String = eventually(Duration::from_secs(60), "the ledger row", || async {
        sqlx::query_as::<_, (String,)>("SELECT outcome FROM usage_ledger WHERE job_id = $1")
            .bind(&id)
            .fetch_optional(&pool)
            .await
            .ok()
            .flatten()
            .map(|r| r.0)
    })
    .await;
    assert_eq!(outcome, "succeeded");
    let (code, out, err) = cli(&ns, &env, &["inspect", &id]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("succeeded"), "{out}");
    transcript += &(out + &err);
    unsafe { libc::kill(worker.id() as i32, libc::SIGTERM) };
    assert!(worker.wait().unwrap().success());
    transcript += &std::fs::read_to_string(&log).unwrap();
    for secret in [&s.redis_pw, &s.pg_pw] {
        assert!(
            !transcript.contains(secret.as_str()),
            "a password was printed:\n{transcript}"
        );
    }
    // Clean up the namespace through TLS as well.
    let (code, _, err) = cli(
        &ns,
        &env,
        &["drain", "default", "--purge", "--timeout", "30s"],
    );
    assert_eq!(code, 0, "{err}");
    pool.close().await;
}

/// What must fail does, with one clear line: a certificate nobody trusts
/// (Redis, and PostgreSQL with verify-full), plain text to the TLS port, a
/// wrong password over TLS. `sslmode=require` encrypts without verifying.
#[tokio::test]
async fn untrusted_certificates_and_wrong_passwords_are_refused() {
    let s = TlsServers::start();
    let ns = namespace("tls-refused");
    // An unrelated CA: the server's certificate is not trusted.
    let other = tempfile::tempdir().unwrap();
    let other_ca = make_certs(other.path()).ca;
    let untrusted = [("SSL_CERT_FILE", other_ca.display().to_string())];
    let (code, _, err) = cli(
        &ns,
        &[("AGENTQ_REDIS_URL", s.redis_url()), untrusted[0].clone()],
        &["queues"],
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("cannot reach Redis at rediss://:***@"),
        "{err}"
    );
    assert!(
        err.contains("SSL_CERT_FILE"),
        "the line says how to fix it: {err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(!err.contains(&s.redis_pw));

    let plain = format!("redis://:{}@127.0.0.1:{}", s.redis_pw, s.tls_port);
    let (code, _, err) = cli(&ns, &[("AGENTQ_REDIS_URL", plain)], &["queues"]);
    assert_ne!(code, 0, "plain text to the TLS port worked: {err}");
    assert!(!err.contains(&s.redis_pw));

    let wrong = format!(
        "rediss://:wrong-{}@127.0.0.1:{}",
        rand::random::<u32>(),
        s.tls_port
    );
    let (code, _, err) = cli(
        &ns,
        &[
            ("AGENTQ_REDIS_URL", wrong),
            ("SSL_CERT_FILE", s.certs.ca.display().to_string()),
        ],
        &["queues"],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("***") && err.contains("password"), "{err}");

    // PostgreSQL: verify-full without the CA fails; require encrypts anyway.
    let (code, _, err) = cli(
        &ns,
        &[("AGENTQ_DATABASE_URL", s.pg_url("verify-full", false))],
        &["migrate"],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("postgres:***@"), "{err}");
    assert!(!err.contains(&s.pg_pw));
    let pool = agentq::ledger::connect(&s.pg_url("require", false), None)
        .await
        .expect("sslmode=require without a CA");
    let (encrypted,): (bool,) =
        sqlx::query_as("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(encrypted);
    pool.close().await;
    let bad_pw = s
        .pg_url("verify-full", true)
        .replace(&s.pg_pw, "not-the-password");
    let (code, _, err) = cli(&ns, &[("AGENTQ_DATABASE_URL", bad_pw)], &["migrate"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("***"), "{err}");
}
