//! Tenant alert webhooks end to end (README, "Tenant alerts"): real Redis,
//! PostgreSQL and `agentq worker` processes, and a receiver in the test (a
//! plain TCP server speaking enough HTTP/1.1) that records every request
//! and checks its signature.

mod common;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentq::model::events::verify_webhook_signature;
use agentq::model::limits::{LimitsUpdate, Rate};
use agentq::queue::JobSpec;
use common::{Proc, TestDb, TestQueue, WorkerProc, eventually, kill9, set_limits};
use fred::prelude::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PATIENCE: Duration = Duration::from_secs(60);
const SECRET: &str = "whsec_test_0123456789abcdef";

/// What the receiver answers a request with.
#[derive(Clone, Copy, Debug)]
enum Reply {
    Status(u16),
    /// Never answer (hold the connection until the test ends).
    Stall,
}

/// One request as received.
#[derive(Clone, Debug)]
struct Received {
    headers: HashMap<String, String>,
    body: Vec<u8>,
    json: Value,
}

impl Received {
    fn id(&self) -> &str {
        self.headers
            .get("agentq-delivery-id")
            .map_or("", String::as_str)
    }
    fn kind(&self) -> &str {
        self.json["type"].as_str().unwrap_or("")
    }
    /// The signature checks out with `secret`, within 5 minutes.
    fn verify(&self, secret: &str) -> Result<(), String> {
        let header = self
            .headers
            .get("agentq-signature")
            .ok_or("no Agentq-Signature header")?;
        verify_webhook_signature(
            header,
            secret.as_bytes(),
            &self.body,
            chrono::Utc::now().timestamp(),
            300,
        )
    }
}

/// A webhook receiver on 127.0.0.1: answers from `plan` in order, then 200.
#[derive(Clone)]
struct Receiver {
    port: u16,
    got: Arc<Mutex<Vec<Received>>>,
    plan: Arc<Mutex<VecDeque<Reply>>>,
}

impl Receiver {
    async fn start(plan: Vec<Reply>) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let r = Receiver {
            port: listener.local_addr().expect("addr").port(),
            got: Arc::default(),
            plan: Arc::new(Mutex::new(plan.into())),
        };
        let me = r.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let me = me.clone();
                tokio::spawn(async move { me.serve(sock).await });
            }
        });
        r
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hooks/agentq", self.port)
    }

    async fn serve(&self, mut sock: tokio::net::TcpStream) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let mut headers = HashMap::new();
        for line in head.lines().skip(1) {
            if let Some((k, v)) = line.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let len: usize = headers
            .get("content-length")
            .and_then(|l| l.parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + len {
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body = buf[head_end..head_end + len].to_vec();
        let json = serde_json::from_slice(&body).unwrap_or(Value::Null);
        assert!(head.starts_with("POST /hooks/agentq HTTP/1.1"), "{head}");
        self.got.lock().unwrap().push(Received {
            headers,
            body,
            json,
        });
        let reply = self
            .plan
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(Reply::Status(200));
        match reply {
            Reply::Stall => tokio::time::sleep(Duration::from_secs(600)).await,
            Reply::Status(code) => {
                let text = format!(
                    "HTTP/1.1 {code} X\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
                );
                let _ = sock.write_all(text.as_bytes()).await;
                let _ = sock.shutdown().await;
            }
        }
    }

    fn got(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }

    /// The requests for alerts of `kind`.
    fn of_kind(&self, kind: &str) -> Vec<Received> {
        self.got()
            .into_iter()
            .filter(|r| r.kind() == kind)
            .collect()
    }
}

/// Entries ever added to partition 0's alert stream (`XINFO STREAM`'s
/// entries-added; 0 when the stream does not exist).
async fn alerts_added(tq: &TestQueue) -> u64 {
    let key = tq.queue.keys(0).key(&["alerts"]);
    let reply: Result<Value, _> = tq
        .queue
        .client()
        .custom::<fred::types::Value, _>(fred::cmd!("XINFO"), vec!["STREAM", key.as_str()])
        .await
        .map(|v: fred::types::Value| {
            let flat: Vec<fred::types::Value> = match v {
                fred::types::Value::Array(a) => a,
                fred::types::Value::Map(m) => m
                    .inner()
                    .into_iter()
                    .flat_map(|(k, v)| [fred::types::Value::from(k), v])
                    .collect(),
                _ => vec![],
            };
            let mut out = Value::Null;
            for pair in flat.chunks(2) {
                if pair[0].as_string().as_deref() == Some("entries-added") {
                    out = json!(pair[1].as_u64());
                }
            }
            out
        });
    reply.ok().and_then(|v| v.as_u64()).unwrap_or(0)
}

async fn xlen(tq: &TestQueue, parts: &[&str]) -> u64 {
    tq.queue
        .client()
        .xlen(tq.queue.keys(0).key(parts))
        .await
        .unwrap_or(0)
}

fn set_webhook(tq: &TestQueue, tenant: &str, url: &str, extra: &[&str]) {
    let mut args = vec!["webhook", "set", tenant, "--url", url, "--secret", SECRET];
    args.extend_from_slice(extra);
    let (code, out, err) = tq.cli(&args);
    assert_eq!(code, 0, "webhook set: {out}{err}");
}

/// A job that goes dead at once (exit 65: permanent failure).
fn doomed(tenant: &str) -> JobSpec {
    JobSpec::new(tenant, "q", "fail").payload(&json!({ "code": 65, "message": "boom" }))
}

fn sleeper(tenant: &str, ms: u64) -> JobSpec {
    JobSpec::new(tenant, "q", "sleep").payload(&json!({ "ms": ms }))
}

/// Quota 80% and 100%, rate 2x, a dead job and a test alert all reach the
/// tenant, signed, with a delivery id equal to the body's id; the same
/// events of a tenant without a webhook store nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_arrive_signed_with_their_ids() {
    let tq = TestQueue::new("webhooks-arrive").await;
    let db = TestDb::new("webhooks_arrive").await;
    let rx = Receiver::start(vec![]).await;

    // The CLI: refuses a bad URL (exit 2), sets, shows, tests.
    let (code, _, err) = tq.cli(&["webhook", "set", "acme", "--url", "ftp://x/"]);
    assert_eq!(code, 2, "{err}");
    let (code, out, err) = tq.cli(&["webhook", "set", "gen", "--url", &rx.url()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("secret: whsec_"),
        "a generated secret is printed once: {out}"
    );
    let (code, _, _) = tq.cli(&["webhook", "rm", "gen"]);
    assert_eq!(code, 0);
    set_webhook(
        &tq,
        "acme",
        &rx.url(),
        &["--events", "quota,spend,rate,dead"],
    );
    let (code, out, _) = tq.cli(&["webhook", "show", "acme", "--json"]);
    assert_eq!(code, 0);
    let shown: Value = serde_json::from_str(&out).expect("show --json");
    assert_eq!(shown["url"], rx.url());
    assert_eq!(shown["events"], json!(["quota", "spend", "rate", "dead"]));
    assert!(!out.contains(SECRET), "the secret is never shown");
    let (code, out, err) = tq.cli(&["webhook", "test", "acme"]);
    assert_eq!(code, 0, "webhook test: {out}{err}");
    let test = rx.of_kind("test");
    assert_eq!(test.len(), 1);
    test[0].verify(SECRET).expect("the test alert is signed");

    // Both tenants: quota 1s of agent time, expected rate 1/min.
    for t in ["acme", "quiet"] {
        set_limits(
            &tq.queue,
            t,
            LimitsUpdate {
                quota: Some(Duration::from_secs(1)),
                expected_rate: Some(Rate {
                    starts: 1,
                    period: Duration::from_secs(60),
                }),
                ..Default::default()
            },
        )
        .await;
    }
    // acme also pays $1 per agent-minute under a $0.0166 monthly spend cap:
    // 100% at 996 ms of agent time, just under the quota's 1 s, so the
    // attempt that crosses the quota crosses the cap too (a cap crossed
    // first would hold the job that must cross the quota).
    let (code, out, err) = tq.cli(&[
        "tenant",
        "set",
        "acme",
        "--price-per-minute",
        "1",
        "--spend-cap",
        "$0.0166/month",
    ]);
    assert_eq!(code, 0, "tenant set: {out}{err}");
    let _worker = Proc(tq.spawn_worker_with(
        &["--queues", "q", "--concurrency", "2"],
        &WorkerProc {
            database_url: Some(db.url()),
            ..Default::default()
        },
    ));

    // A dead job, more than twice the expected rate of starts in a minute,
    // then 900 ms and 300 ms of agent time (80% and 100% of the quota).
    let mut dead_ids = HashMap::new();
    for t in ["acme", "quiet"] {
        dead_ids.insert(t, tq.enqueue(&doomed(t)).await);
        // five starts: at least three fall in one minute window
        tq.enqueue_all(&[sleeper(t, 1), sleeper(t, 1), sleeper(t, 1), sleeper(t, 1)])
            .await;
    }
    for id in dead_ids.values() {
        common::job_in_state(&tq, id, &["dead"]).await;
    }
    for t in ["acme", "quiet"] {
        let id = tq.enqueue(&sleeper(t, 900)).await;
        common::job_in_state(&tq, &id, &["succeeded"]).await;
        tq.enqueue(&sleeper(t, 300)).await;
    }
    eventually(
        PATIENCE,
        "quota_80, quota_100, spend_80, spend_100, rate_2x and dead alerts",
        || async {
            let kinds: Vec<String> = rx.got().iter().map(|r| r.kind().to_string()).collect();
            [
                "quota_80",
                "quota_100",
                "spend_80",
                "spend_100",
                "rate_2x",
                "dead",
            ]
            .iter()
            .all(|k| kinds.iter().any(|g| g == k))
            .then_some(())
        },
    )
    .await;

    for r in rx.got() {
        r.verify(SECRET)
            .unwrap_or_else(|e| panic!("{} not signed: {e}", r.kind()));
        assert!(r.verify("whsec_some_other_secret").is_err());
        assert_eq!(
            r.json["tenant"], "acme",
            "only acme has a webhook: {:?}",
            r.json
        );
        assert_eq!(r.json["id"], r.id(), "Agentq-Delivery-Id is the body's id");
        assert_eq!(
            r.headers.get("agentq-event").map(String::as_str),
            Some(r.kind())
        );
        assert_eq!(
            r.headers.get("content-type").map(String::as_str),
            Some("application/json")
        );
    }
    let dead = rx.of_kind("dead");
    assert_eq!(dead[0].json["data"]["job"], dead_ids["acme"].as_str());
    assert_eq!(dead[0].json["data"]["queue"], "q");
    assert_eq!(dead[0].json["data"]["job_kind"], "fail");
    assert_eq!(rx.of_kind("quota_80")[0].json["data"]["percent"], 80);
    assert_eq!(rx.of_kind("quota_100")[0].json["data"]["percent"], 100);
    assert_eq!(rx.of_kind("spend_80")[0].json["data"]["percent"], 80);
    assert_eq!(rx.of_kind("spend_100")[0].json["data"]["percent"], 100);
    // Each fires once per crossing, and was delivered once (no failures).
    let mut ids: Vec<&str> = Vec::new();
    let got = rx.got();
    for r in got.iter().filter(|r| r.kind() != "test") {
        assert!(
            !ids.contains(&r.id()),
            "delivered twice without a failure: {}",
            r.id()
        );
        ids.push(r.id());
    }

    // Delivered alerts leave the stream; quiet's events were never stored:
    // only acme's six alerts were ever added.
    eventually(PATIENCE, "the alert stream emptied", || async {
        (xlen(&tq, &["alerts"]).await == 0).then_some(())
    })
    .await;
    assert_eq!(alerts_added(&tq).await, 6, "quiet's alerts were stored");
    assert_eq!(xlen(&tq, &["alerts", "dead"]).await, 0);
    let quiet_usage: HashMap<String, u64> = tq
        .queue
        .client()
        .hgetall(tq.queue.keys(0).key(&["usage", "quiet"]))
        .await
        .expect("usage");
    assert!(
        quiet_usage.values().any(|ms| *ms >= 1000),
        "quiet crossed its quota too: {quiet_usage:?}"
    );
    db.cleanup().await;
    tq.cleanup().await;
}

/// The worker is killed (-9) while the receiver holds the delivery open;
/// another worker takes the alert over and delivers it, with the same id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_survives_a_killed_worker() {
    let tq = TestQueue::new("webhooks-kill").await;
    let rx = Receiver::start(vec![Reply::Stall]).await;
    set_webhook(&tq, "acme", &rx.url(), &[]);
    let flags = [
        "--queues",
        "q",
        "--webhook-timeout",
        "3s",
        "--webhook-claim-idle",
        "6s",
    ];
    let mut first = Proc(tq.spawn_worker(&flags));
    let id = tq.enqueue(&doomed("acme")).await;
    let stalled = eventually(
        PATIENCE,
        "the first delivery reaches the receiver",
        || async { rx.got().first().cloned() },
    )
    .await;
    kill9(&mut first);
    assert_eq!(stalled.json["data"]["job"], id.as_str());
    assert_eq!(
        xlen(&tq, &["alerts"]).await,
        1,
        "the alert is still recorded"
    );

    let _second = Proc(tq.spawn_worker(&flags));
    let all = eventually(
        PATIENCE,
        "the alert delivered again by the second worker",
        || async {
            let got = rx.got();
            (got.len() >= 2).then_some(got)
        },
    )
    .await;
    for r in &all {
        assert_eq!(r.id(), stalled.id(), "repeats share the delivery id");
        r.verify(SECRET).expect("signed");
    }
    eventually(PATIENCE, "the delivered alert acknowledged", || async {
        (xlen(&tq, &["alerts"]).await == 0).then_some(())
    })
    .await;
    tq.cleanup().await;
}

/// A receiver answering 500 three times gets the alert on the fourth try
/// (same id, Agentq-Attempt counting up); one that always fails has it
/// dead-lettered after --webhook-max-attempts, visible in `webhook dead`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_retried_then_dead_lettered() {
    let tq = TestQueue::new("webhooks-retry").await;
    let flaky = Receiver::start(vec![Reply::Status(500); 3]).await;
    let broken = Receiver::start(vec![Reply::Status(503); 100]).await;
    set_webhook(&tq, "flaky", &flaky.url(), &[]);
    set_webhook(&tq, "broken", &broken.url(), &[]);
    let _worker = Proc(tq.spawn_worker(&[
        "--queues",
        "q",
        "--webhook-retry-base",
        "200ms",
        "--webhook-max-attempts",
        "5",
    ]));
    tq.enqueue(&doomed("flaky")).await;
    let broken_job = tq.enqueue(&doomed("broken")).await;

    let got = eventually(PATIENCE, "the flaky receiver's fourth request", || async {
        let got = flaky.got();
        (got.len() >= 4).then_some(got)
    })
    .await;
    let attempts: Vec<&str> = got
        .iter()
        .map(|r| r.headers.get("agentq-attempt").map_or("", String::as_str))
        .collect();
    assert_eq!(attempts, ["1", "2", "3", "4"]);
    assert!(got.iter().all(|r| r.id() == got[0].id()), "one delivery id");
    for r in &got {
        r.verify(SECRET).expect("signed");
    }

    let dead = eventually(
        PATIENCE,
        "the broken receiver's alert dead-lettered",
        || async {
            let (code, out, _) = tq.cli(&["webhook", "dead", "--tenant", "broken", "--json"]);
            let v: Value = serde_json::from_str(&out).ok()?;
            (code == 0 && v.as_array().is_some_and(|a| !a.is_empty())).then_some(v)
        },
    )
    .await;
    assert_eq!(broken.got().len(), 5, "five attempts, then given up");
    assert_eq!(dead[0]["reason"], "max_attempts");
    assert_eq!(dead[0]["attempts"], 5);
    assert!(dead[0]["last_error"].as_str().unwrap_or("").contains("503"));
    assert_eq!(dead[0]["payload"]["data"]["job"], broken_job.as_str());
    assert_eq!(dead[0]["id"], broken.got()[0].id());
    eventually(PATIENCE, "nothing left pending", || async {
        (xlen(&tq, &["alerts"]).await == 0).then_some(())
    })
    .await;
    let tries: u64 = tq
        .queue
        .client()
        .hlen(tq.queue.keys(0).key(&["alerts", "tries"]))
        .await
        .expect("hlen");
    assert_eq!(tries, 0, "settled alerts forget their attempt counts");
    tq.cleanup().await;
}

/// The admin API: PUT (a generated secret returned once), GET (never the
/// secret), POST .../test (signed, delivered), DELETE; bad input is 400,
/// a tenant key 403, no webhook 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_sets_shows_tests_and_removes_webhooks() {
    use agentq::http::api::ApiConfig;
    use agentq::http::api::keys::{self, KeySpec, Scope};
    use common::http::req;

    let tq = TestQueue::new("webhooks-admin").await;
    let db = TestDb::new("webhooks_admin").await;
    let rx = Receiver::start(vec![]).await;
    let port = agentq_servers::free_port().expect("port");
    let stop = tokio_util::sync::CancellationToken::new();
    let (q, pool, s) = (tq.queue.clone(), db.pool.clone(), stop.clone());
    tokio::spawn(async move {
        agentq::http::api::serve(
            ([127, 0, 0, 1], port).into(),
            q,
            pool,
            ApiConfig::default(),
            s,
        )
        .await
    });
    eventually(Duration::from_secs(10), "api listening", || async {
        agentq_servers::listening(&format!("127.0.0.1:{port}")).then_some(())
    })
    .await;
    let key = |scope, tenant: Option<&str>| KeySpec {
        scope,
        tenant: tenant.map(str::to_string),
        ..KeySpec::default()
    };
    let admin = keys::create_key(&db.pool, &key(Scope::Admin, None))
        .await
        .expect("admin key")
        .key;
    let tenant_key = keys::create_key(&db.pool, &key(Scope::Tenant, Some("acme")))
        .await
        .expect("tenant key")
        .key;
    let path = "/v1/admin/tenants/acme/webhook";

    let r = req(port, "GET", path, Some(&admin), None).await;
    assert_eq!((r.status, r.code()), (404, "not_found"));
    let r = req(
        port,
        "PUT",
        path,
        Some(&admin),
        Some(r#"{"url":"gopher://x"}"#),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
    let body = json!({ "url": rx.url(), "events": ["dead", "quota"] }).to_string();
    let r = req(port, "PUT", path, Some(&admin), Some(&body)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let secret = r.body["secret"]
        .as_str()
        .expect("generated secret")
        .to_string();
    assert!(secret.starts_with("whsec_"));
    assert_eq!(r.body["events"], json!(["quota", "dead"]));

    let r = req(port, "GET", path, Some(&admin), None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["url"], rx.url());
    assert!(
        r.body.get("secret").is_none(),
        "the secret is never shown again"
    );
    assert_eq!(r.body["dead"], json!([]));

    let r = req(port, "POST", &format!("{path}/test"), Some(&admin), None).await;
    assert_eq!(
        (r.status, &r.body["delivered"]),
        (200, &json!(true)),
        "{}",
        r.body
    );
    let got = rx.of_kind("test");
    assert_eq!(got.len(), 1);
    got[0]
        .verify(&secret)
        .expect("signed with the generated secret");

    let r = req(port, "GET", path, Some(&tenant_key), None).await;
    assert_eq!(r.status, 403, "a tenant key is refused");
    let r = req(port, "DELETE", path, Some(&admin), None).await;
    assert_eq!(r.status, 200);
    let r = req(port, "DELETE", path, Some(&admin), None).await;
    assert_eq!(r.status, 404);
    stop.cancel();
    db.cleanup().await;
    tq.cleanup().await;
}
