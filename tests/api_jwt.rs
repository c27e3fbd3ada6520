//! JWT sign-in and per-tenant queue/kind restrictions of the HTTP API,
//! against real `agentq serve` processes, Redis and PostgreSQL. The test
//! makes its own RSA and P-256 keys (`openssl genpkey`), publishes them as a
//! JWKS (a file, or a tiny HTTP server counting its requests) and signs
//! tokens with `jsonwebtoken`.

mod common;

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentq::http::api::keys;
use common::{Proc, TestDb, TestQueue, agentq, eventually, run_to_end};
use jsonwebtoken::{Algorithm, EncodingKey, Header, jwk::Jwk};
use serde_json::{Value, json};

const PATIENCE: Duration = Duration::from_secs(30);
const ISS: &str = "https://idp.example.test";
const AUD: &str = "agentq";
const JOB: &str = r#"{"queue":"q","kind":"echo","payload":{"n":1}}"#;

use common::http::{req, req_from};

/// `agentq serve` on this namespace and schema with `extra` arguments; its port.
async fn spawn_serve(tq: &TestQueue, db: &TestDb, extra: &[&str]) -> (Proc, u16) {
    let port = agentq_servers::free_port().expect("port");
    let child = agentq()
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--rate-limit",
            "1000",
            "--jwt-issuer",
            ISS,
            "--jwt-audience",
            AUD,
        ])
        .args(extra)
        .env("AGENTQ_REDIS_URL", tq.queue.config().redis_url.clone())
        .env("AGENTQ_NAMESPACE", &tq.ns)
        .env("AGENTQ_DATABASE_URL", db.url())
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

/// A signing key made by `openssl genpkey`, with its `kid`.
struct SigningKey {
    alg: Algorithm,
    kid: String,
    key: EncodingKey,
}

impl SigningKey {
    fn new(dir: &Path, alg: Algorithm, kid: &str) -> SigningKey {
        let file = dir.join(format!("{kid}.pem"));
        let opts: &[&str] = match alg {
            Algorithm::RS256 => &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
            _ => &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
        };
        let out = std::process::Command::new("openssl")
            .arg("genpkey")
            .args(opts)
            .arg("-out")
            .arg(&file)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pem = std::fs::read(&file).expect("pem");
        let key = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem),
            _ => EncodingKey::from_ec_pem(&pem),
        }
        .expect("a private key");
        SigningKey {
            alg,
            kid: kid.into(),
            key,
        }
    }

    /// Its public JWK (n/e or x/y, base64url) with its kid.
    fn jwk(&self) -> Value {
        let mut j = serde_json::to_value(Jwk::from_encoding_key(&self.key, self.alg).expect("jwk"))
            .expect("json");
        j["kid"] = json!(self.kid);
        j["use"] = json!("sig");
        j
    }

    /// A token with `claims`, signed with this key, naming `kid`.
    fn sign_as(&self, kid: &str, claims: &Value) -> String {
        let mut h = Header::new(self.alg);
        h.kid = Some(kid.to_string());
        jsonwebtoken::encode(&h, claims, &self.key).expect("sign")
    }

    fn sign(&self, claims: &Value) -> String {
        self.sign_as(&self.kid, claims)
    }
}

fn jwks(keys: &[&SigningKey]) -> String {
    json!({ "keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>() }).to_string()
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Valid claims for `tenant`.
fn claims(tenant: &str) -> Value {
    json!({ "iss": ISS, "aud": AUD, "exp": now() + 600, "iat": now(), "tenant": tenant })
}

fn b64(v: &Value) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

/// Enqueue `job` with `token`: the id, after checking 201.
async fn enqueue(port: u16, token: &str, job: &str) -> String {
    let r = req(port, "POST", "/v1/jobs", Some(token), Some(job)).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    r.body["id"].as_str().expect("id").to_string()
}

/// A JWKS over HTTP that counts the requests it answers.
struct JwksServer {
    port: u16,
    doc: Arc<Mutex<String>>,
    hits: Arc<AtomicU64>,
}

impl JwksServer {
    async fn start(doc: String) -> JwksServer {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let doc = Arc::new(Mutex::new(doc));
        let hits = Arc::new(AtomicU64::new(0));
        let (d, h) = (doc.clone(), hits.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let (d, h) = (d.clone(), h.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    if !buf.starts_with(b"GET /jwks.json ") {
                        let _ = s.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
                        return;
                    }
                    h.fetch_add(1, Ordering::SeqCst);
                    let body = d.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = s.write_all(head.as_bytes()).await;
                    let _ = s.write_all(body.as_bytes()).await;
                });
            }
        });
        JwksServer { port, doc, hits }
    }

    fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }

    fn publish(&self, doc: String) {
        *self.doc.lock().unwrap_or_else(|e| e.into_inner()) = doc;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwts_enqueue_as_their_tenant_and_bad_ones_get_401_with_a_code() {
    let tq = TestQueue::new("jwt-file").await;
    let db = TestDb::new("jwt_file").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let rsa = SigningKey::new(dir.path(), Algorithm::RS256, "r1");
    let ec = SigningKey::new(dir.path(), Algorithm::ES256, "e1");
    let other = SigningKey::new(dir.path(), Algorithm::RS256, "r-other");
    let file = dir.path().join("jwks.json");
    std::fs::write(&file, jwks(&[&rsa, &ec])).expect("write jwks");
    let file = file.to_string_lossy().into_owned();
    let api_key = keys::create(&db.pool, "keyed").await.expect("key").key;
    let (_serve, port) = spawn_serve(&tq, &db, &["--jwks-file", &file]).await;

    // RS256 and ES256 tokens enqueue as the tenant of their claim.
    let a_token = rsa.sign(&claims("acme"));
    let b_token = ec.sign(&claims("beta"));
    let a_job = enqueue(port, &a_token, JOB).await;
    let b_job = enqueue(port, &b_token, JOB).await;
    for (id, tenant) in [(&a_job, "acme"), (&b_job, "beta")] {
        let info = agentq::queue::inspect::job_info(&tq.queue, id)
            .await
            .expect("the job is in Redis");
        assert_eq!(info.tenant, tenant);
    }
    // API keys still work on the same server.
    enqueue(port, &api_key, JOB).await;

    // A tenant from a JWT reaches only its own jobs.
    let mine = req(
        port,
        "GET",
        &format!("/v1/jobs/{a_job}"),
        Some(&a_token),
        None,
    )
    .await;
    assert_eq!(
        (mine.status, mine.body["tenant"].as_str()),
        (200, Some("acme"))
    );
    let theirs = req(
        port,
        "GET",
        &format!("/v1/jobs/{a_job}"),
        Some(&b_token),
        None,
    )
    .await;
    assert_eq!((theirs.status, theirs.code()), (403, "forbidden"));
    let cancel = req(
        port,
        "DELETE",
        &format!("/v1/jobs/{a_job}"),
        Some(&b_token),
        None,
    )
    .await;
    assert_eq!(cancel.status, 403);

    // Refusals, each from its own address (the per-address throttle is
    // checked below).
    let hs_key = EncodingKey::from_secret(b"a shared secret").expect("hmac key");
    let mut hs_header = Header::new(Algorithm::HS256);
    hs_header.kid = Some("r1".into());
    let none_token = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "kid": "r1", "typ": "JWT"})),
        b64(&claims("acme"))
    );
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "wrong issuer",
            rsa.sign(&(json!({"iss": "https://evil.test", "aud": AUD, "exp": now() + 600, "tenant": "acme"}))),
            "jwt_wrong_issuer",
        ),
        (
            "wrong audience",
            rsa.sign(&(json!({"iss": ISS, "aud": "other", "exp": now() + 600, "tenant": "acme"}))),
            "jwt_wrong_audience",
        ),
        (
            "expired (past the 30 s leeway)",
            ec.sign(&(json!({"iss": ISS, "aud": AUD, "exp": now() - 120, "tenant": "acme"}))),
            "jwt_expired",
        ),
        (
            "not yet valid",
            ec.sign(&(json!({"iss": ISS, "aud": AUD, "exp": now() + 600, "nbf": now() + 120, "tenant": "acme"}))),
            "jwt_not_yet_valid",
        ),
        (
            "signed by another key under kid r1",
            other.sign_as("r1", &claims("acme")),
            "jwt_bad_signature",
        ),
        ("alg none", none_token, "jwt_alg_not_allowed"),
        (
            "HS256",
            jsonwebtoken::encode(&hs_header, &claims("acme"), &hs_key).expect("hs256"),
            "jwt_alg_not_allowed",
        ),
        (
            "unknown kid",
            other.sign(&claims("acme")),
            "jwt_unknown_kid",
        ),
        (
            "ES256 token naming an RSA kid",
            ec.sign_as("r1", &claims("acme")),
            "jwt_alg_mismatch",
        ),
        (
            "no tenant claim",
            rsa.sign(&json!({"iss": ISS, "aud": AUD, "exp": now() + 600})),
            "jwt_no_tenant",
        ),
        (
            "no exp",
            rsa.sign(&json!({"iss": ISS, "aud": AUD, "tenant": "acme"})),
            "jwt_missing_claim",
        ),
    ];
    for (i, (what, token, code)) in cases.iter().enumerate() {
        let from = Ipv4Addr::new(127, 0, 4, 2 + i as u8);
        let r = req_from(from, port, "POST", "/v1/jobs", Some(token), Some(JOB)).await;
        assert_eq!((r.status, r.code()), (401, *code), "{what}: {:?}", r.body);
    }

    // Failed JWTs count against the same per-address throttle as bad keys
    // (20 a minute by default): then 429, while others are unaffected.
    let from = Ipv4Addr::new(127, 0, 5, 2);
    let forged = other.sign_as("r1", &claims("acme"));
    let mut throttled = false;
    for _ in 0..30 {
        let r = req_from(from, port, "GET", "/v1/usage", Some(&forged), None).await;
        if r.status == 429 {
            assert_eq!(r.code(), "rate_limited");
            throttled = true;
            break;
        }
        assert_eq!(r.status, 401);
    }
    assert!(throttled, "repeated bad JWTs from one address get 429");
    let blocked = req_from(from, port, "POST", "/v1/jobs", Some(&a_token), Some(JOB)).await;
    assert_eq!(
        blocked.status, 429,
        "the address is blocked, whatever it sends"
    );
    enqueue(port, &a_token, JOB).await;
    db.cleanup().await;
    tq.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwks_url_is_fetched_rotated_and_not_hammered_by_unknown_kids() {
    let tq = TestQueue::new("jwt-url").await;
    let db = TestDb::new("jwt_url").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let k1 = SigningKey::new(dir.path(), Algorithm::RS256, "k1");
    let k2 = SigningKey::new(dir.path(), Algorithm::ES256, "k2");
    let idp = JwksServer::start(jwks(&[&k1])).await;
    let url = format!("http://127.0.0.1:{}/jwks.json", idp.port);
    let (_serve, port) =
        spawn_serve(&tq, &db, &["--jwks-url", &url, "--jwks-min-refetch", "2s"]).await;
    // serve listens only after its first read of the JWKS.
    let started = Instant::now();
    assert_eq!(idp.hits(), 1, "read once at start");
    enqueue(port, &k1.sign(&claims("acme")), JOB).await;
    assert_eq!(idp.hits(), 1, "a known kid needs no fetch");

    // Rotation: the IdP adds k2; the first token naming k2 is accepted
    // (once min-refetch has passed since the last read).
    idp.publish(jwks(&[&k1, &k2]));
    tokio::time::sleep(Duration::from_millis(2100).saturating_sub(started.elapsed())).await;
    let id = enqueue(port, &k2.sign(&claims("beta")), JOB).await;
    let info = agentq::queue::inspect::job_info(&tq.queue, &id)
        .await
        .expect("job");
    assert_eq!(info.tenant, "beta");
    assert_eq!(idp.hits(), 2, "one fetch for the new kid");

    // A flood of made-up kids (each from its own address, so the failed-auth
    // throttle does not cut it short) reads the JWKS at most once per 2 s.
    let before = idp.hits();
    let flood_start = Instant::now();
    let mut n = 0;
    while flood_start.elapsed() < Duration::from_secs(3) && n < 200 {
        let token = k1.sign_as(&format!("made-up-{n}"), &claims("acme"));
        let from = Ipv4Addr::new(127, 0, 6 + (n / 200) as u8, 2 + (n % 200) as u8);
        let r = req_from(from, port, "POST", "/v1/jobs", Some(&token), Some(JOB)).await;
        assert_eq!(
            (r.status, r.code()),
            (401, "jwt_unknown_kid"),
            "{:?}",
            r.body
        );
        n += 1;
    }
    let fetched = idp.hits() - before;
    let bound = 1 + flood_start.elapsed().as_secs() / 2 + 1;
    eprintln!(
        "{n} unknown kids in {} ms caused {fetched} JWKS fetches (bound {bound})",
        flood_start.elapsed().as_millis()
    );
    assert!(n >= 20, "the flood sent {n} tokens");
    assert!(fetched <= bound, "{fetched} fetches for {n} unknown kids");
    // Known kids still pass without fetching.
    let before = idp.hits();
    enqueue(port, &k1.sign(&claims("acme")), JOB).await;
    assert_eq!(idp.hits(), before);
    db.cleanup().await;
    tq.cleanup().await;
}

/// `agentq tenant set T ARGS...` on this namespace.
fn tenant_set(tq: &TestQueue, args: &[&str]) -> String {
    let (code, out, err) = run_to_end(
        agentq()
            .args(["tenant", "set"])
            .args(args)
            .env("AGENTQ_REDIS_URL", tq.queue.config().redis_url.clone())
            .env("AGENTQ_NAMESPACE", &tq.ns)
            .env("AGENTQ_LOG", "off"),
    );
    assert_eq!(code, 0, "tenant set {args:?}: {out} {err}");
    out
}

fn job(queue: &str, kind: &str) -> String {
    json!({ "queue": queue, "kind": kind }).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restricted_tenants_get_403_outside_their_queues_and_kinds() {
    let tq = TestQueue::new("jwt-allowed").await;
    let db = TestDb::new("jwt_allowed").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let rsa = SigningKey::new(dir.path(), Algorithm::RS256, "r1");
    let file = dir.path().join("jwks.json");
    std::fs::write(&file, jwks(&[&rsa])).expect("write jwks");
    let file = file.to_string_lossy().into_owned();
    let out = tenant_set(
        &tq,
        &["a", "--allowed-queues", "q1,q2", "--allowed-kinds", "echo"],
    );
    assert!(out.contains("allowed queues q1,q2"), "{out}");
    let (code, shown, err) = run_to_end(
        agentq()
            .args(["tenant", "show", "a", "--json"])
            .env("AGENTQ_REDIS_URL", tq.queue.config().redis_url.clone())
            .env("AGENTQ_NAMESPACE", &tq.ns)
            .env("AGENTQ_LOG", "off"),
    );
    assert_eq!(code, 0, "{err}");
    let shown: Value = serde_json::from_str(&shown).expect("json");
    assert_eq!(
        shown["allowed"],
        json!({"queues": ["q1", "q2"], "kinds": ["echo"]})
    );
    // A bad name is a usage error and writes nothing.
    let (code, _, err) = run_to_end(
        agentq()
            .args(["tenant", "set", "a", "--allowed-queues", "q1,bad name"])
            .env("AGENTQ_REDIS_URL", tq.queue.config().redis_url.clone())
            .env("AGENTQ_NAMESPACE", &tq.ns)
            .env("AGENTQ_LOG", "off"),
    );
    assert_eq!(code, 2, "{err}");
    let a_key = keys::create(&db.pool, "a").await.expect("key").key;
    let b_key = keys::create(&db.pool, "b").await.expect("key").key;
    let (_serve, port) = spawn_serve(&tq, &db, &["--jwks-file", &file]).await;
    let a_jwt = rsa.sign(&claims("a"));

    for token in [&a_key, &a_jwt] {
        enqueue(port, token, &job("q1", "echo")).await;
        enqueue(port, token, &job("q2", "echo")).await;
        let r = req(
            port,
            "POST",
            "/v1/jobs",
            Some(token),
            Some(&job("q3", "echo")),
        )
        .await;
        assert_eq!(
            (r.status, r.code()),
            (403, "forbidden_queue"),
            "{:?}",
            r.body
        );
        let r = req(
            port,
            "POST",
            "/v1/jobs",
            Some(token),
            Some(&job("q1", "sleep")),
        )
        .await;
        assert_eq!(
            (r.status, r.code()),
            (403, "forbidden_kind"),
            "{:?}",
            r.body
        );
        // One job out of bounds refuses the whole batch.
        let batch = format!("[{},{}]", job("q1", "echo"), job("q9", "echo"));
        let r = req(port, "POST", "/v1/jobs", Some(token), Some(&batch)).await;
        assert_eq!((r.status, r.code()), (403, "forbidden_queue"));
    }
    let names = agentq::queue::inspect::queue_names(&tq.queue)
        .await
        .expect("queues");
    assert!(
        !names.iter().any(|q| q == "q9" || q == "q3"),
        "nothing refused was enqueued: {names:?}"
    );

    // An unrestricted tenant is unaffected; its JWT's queues claim narrows it.
    enqueue(port, &b_key, &job("q3", "sleep")).await;
    let b_narrow = rsa.sign(&json!({
        "iss": ISS, "aud": AUD, "exp": now() + 600, "tenant": "b",
        "queues": ["x"], "kinds": ["echo"]
    }));
    enqueue(port, &b_narrow, &job("x", "echo")).await;
    let r = req(
        port,
        "POST",
        "/v1/jobs",
        Some(&b_narrow),
        Some(&job("q3", "echo")),
    )
    .await;
    assert_eq!((r.status, r.code()), (403, "forbidden_queue"));
    let r = req(
        port,
        "POST",
        "/v1/jobs",
        Some(&b_narrow),
        Some(&job("x", "sleep")),
    )
    .await;
    assert_eq!((r.status, r.code()), (403, "forbidden_kind"));

    // Lifting the restriction is in force within the cache's 5 s.
    tenant_set(&tq, &["a", "--allowed-queues", "*", "--allowed-kinds", "*"]);
    eventually(Duration::from_secs(10), "restriction lifted", || async {
        (req(
            port,
            "POST",
            "/v1/jobs",
            Some(&a_key),
            Some(&job("q3", "sleep")),
        )
        .await
        .status
            == 201)
            .then_some(())
    })
    .await;
    db.cleanup().await;
    tq.cleanup().await;
}
