//! The HTTP API over real Redis and PostgreSQL: tenant isolation, every
//! error status from a real request, the OpenAPI document against the routes.

mod common;

use std::time::Duration;

use agentq::http::api::{ApiConfig, keys};
use agentq::model::limits::{LimitsUpdate, Target};
use common::{TestDb, TestQueue};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use common::http::{Reply, req};

async fn start(tq: &TestQueue, db: &TestDb, cfg: ApiConfig) -> (u16, CancellationToken) {
    let port = agentq_servers::free_port().expect("port");
    let stop = CancellationToken::new();
    let (q, pool, s) = (tq.queue.clone(), db.pool.clone(), stop.clone());
    tokio::spawn(async move {
        agentq::http::api::serve(([127, 0, 0, 1], port).into(), q, pool, cfg, s).await
    });
    common::eventually(Duration::from_secs(10), "api listening", || async {
        agentq_servers::listening(&format!("127.0.0.1:{port}")).then_some(())
    })
    .await;
    (port, stop)
}

fn code(r: &Reply) -> &str {
    r.body["error"]["code"].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_reach_only_their_own_jobs_and_every_status_is_real() {
    let tq = TestQueue::new("api").await;
    let db = TestDb::new("api").await;
    let a = keys::create(&db.pool, "a").await.expect("key a").key;
    let b = keys::create(&db.pool, "b").await.expect("key b").key;
    LimitsUpdate {
        max_timeout: Some(Duration::from_secs(60)),
        ..Default::default()
    }
    .apply(&tq.queue, Target::Tenant("a"))
    .await
    .expect("caps");
    let cfg = ApiConfig {
        tenant_rate: std::num::NonZeroU32::new(1000).expect("nonzero"),
        ..Default::default()
    };
    let (port, stop) = start(&tq, &db, cfg).await;
    let job = r#"{"queue":"q","kind":"echo","payload":{"n":1},"idempotency_key":"k1"}"#;

    // 401: no key, bad key.
    assert_eq!(
        req(port, "POST", "/v1/jobs", None, Some(job)).await.status,
        401
    );
    let bad = req(
        port,
        "POST",
        "/v1/jobs",
        Some("aq_00000000_0000"),
        Some(job),
    )
    .await;
    assert_eq!((bad.status, code(&bad)), (401, "unauthorized"));
    // 201, then 200 for the same idempotency key, 409 for a different job under it.
    let made = req(port, "POST", "/v1/jobs", Some(&a), Some(job)).await;
    assert_eq!(made.status, 201, "{:?}", made.body);
    let id = made.body["id"].as_str().expect("id").to_string();
    let again = req(port, "POST", "/v1/jobs", Some(&a), Some(job)).await;
    assert_eq!(
        (
            again.status,
            again.body["id"].as_str(),
            again.body["created"].as_bool()
        ),
        (200, Some(id.as_str()), Some(false))
    );
    let other = r#"{"queue":"q","kind":"echo","payload":{"n":2},"idempotency_key":"k1"}"#;
    let conflict = req(port, "POST", "/v1/jobs", Some(&a), Some(other)).await;
    assert_eq!(
        (conflict.status, code(&conflict)),
        (409, "idempotency_conflict")
    );
    // 400s, 413, 422.
    assert_eq!(
        req(port, "POST", "/v1/jobs", Some(&a), Some("{oops"))
            .await
            .status,
        400
    );
    let tenant_field = req(
        port,
        "POST",
        "/v1/jobs",
        Some(&a),
        Some(r#"{"queue":"q","kind":"echo","tenant":"b"}"#),
    )
    .await;
    assert_eq!(tenant_field.status, 400);
    assert!(
        tenant_field.body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("API key")
    );
    let big = json!({"queue": "q", "kind": "echo", "payload": "x".repeat(2 << 20)}).to_string();
    assert_eq!(
        req(port, "POST", "/v1/jobs", Some(&a), Some(&big))
            .await
            .status,
        413
    );
    let over = req(
        port,
        "POST",
        "/v1/jobs",
        Some(&a),
        Some(r#"{"queue":"q","kind":"echo","timeout":"2m"}"#),
    )
    .await;
    assert_eq!((over.status, code(&over)), (422, "over_cap"));
    let batch = req(
        port,
        "POST",
        "/v1/jobs",
        Some(&b),
        Some(r#"{"jobs":[{"queue":"q","kind":"echo"},{"queue":"q","kind":"echo"}]}"#),
    )
    .await;
    assert_eq!(
        (batch.status, batch.body["jobs"].as_array().map(Vec::len)),
        (201, Some(2))
    );

    // Reads and cancels are fenced by tenant.
    let mine = req(port, "GET", &format!("/v1/jobs/{id}"), Some(&a), None).await;
    assert_eq!(
        (mine.status, mine.body["tenant"].as_str()),
        (200, Some("a"))
    );
    assert_eq!(
        req(port, "GET", &format!("/v1/jobs/{id}"), Some(&b), None)
            .await
            .status,
        403
    );
    assert_eq!(
        req(port, "DELETE", &format!("/v1/jobs/{id}"), Some(&b), None)
            .await
            .status,
        403
    );
    assert_eq!(
        req(port, "GET", "/v1/jobs/0-ffffff", Some(&a), None)
            .await
            .status,
        404
    );
    let cancelled = req(port, "DELETE", &format!("/v1/jobs/{id}"), Some(&a), None).await;
    assert_eq!(
        (cancelled.status, cancelled.body["state"].as_str()),
        (200, Some("cancelled"))
    );
    // A repeat (a lost reply) succeeds, saying it was cancelled already.
    let twice = req(port, "DELETE", &format!("/v1/jobs/{id}"), Some(&a), None).await;
    assert_eq!(
        (
            twice.status,
            twice.body["state"].as_str(),
            twice.body["was"].as_str()
        ),
        (200, Some("cancelled"), Some("cancelled"))
    );

    // Usage: only the caller's rows.
    let now = chrono::Utc::now().timestamp_millis();
    let row = |job: &str, tenant: &str| agentq::model::record::Record {
        job_id: job.into(),
        attempt: 1,
        tenant: tenant.into(),
        queue: "q".into(),
        kind: "echo".into(),
        outcome: "succeeded".into(),
        enqueued_at: now - 20,
        started_at: now - 10,
        finished_at: now,
        wait_ms: 10,
        run_ms: 10,
        cpu_ms: 1,
        peak_rss_bytes: 1,
        exit_code: Some(0),
        signal: None,
        worker: "w".into(),
        api_calls: 0,
        input_tokens: 0,
        output_tokens: 0,
        cost_micros: 0,
        error: String::new(),
        billing: String::new(),
    };
    agentq::ledger::insert(
        &db.pool,
        &[row("0-1", "a"), row("0-2", "b"), row("0-3", "b")],
    )
    .await
    .expect("insert");
    let usage = req(port, "GET", "/v1/usage", Some(&b), None).await;
    assert_eq!(usage.status, 200, "{:?}", usage.body);
    let days = usage.body["days"].as_array().expect("days");
    assert!(
        days.iter().all(|d| d["tenant"] == "b")
            && days
                .iter()
                .map(|d| d["attempts"].as_i64().unwrap_or(0))
                .sum::<i64>()
                == 2
    );
    assert_eq!(
        req(port, "GET", "/v1/usage?since=yesterday", Some(&b), None)
            .await
            .status,
        400
    );

    // A revoked key is refused (the server hears of it through Redis).
    let r = keys::revoke(&db.pool, Some(&tq.queue), &b)
        .await
        .expect("revoke")
        .expect("an active key");
    assert_eq!((r.tenant.as_str(), r.not_announced), ("b", None));
    common::eventually(Duration::from_secs(5), "revoked key refused", || async {
        (req(port, "GET", "/v1/usage", Some(&b), None).await.status == 401).then_some(())
    })
    .await;
    stop.cancel();
    db.cleanup().await;
    tq.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_rate_and_brute_force_get_429_with_retry_after() {
    let tq = TestQueue::new("api-429").await;
    let db = TestDb::new("api_429").await;
    let a = keys::create(&db.pool, "a").await.expect("key").key;
    let cfg = ApiConfig {
        tenant_rate: std::num::NonZeroU32::new(2).expect("nonzero"),
        auth_failures_per_min: std::num::NonZeroU32::new(3).expect("nonzero"),
        ..Default::default()
    };
    let (port, stop) = start(&tq, &db, cfg).await;
    let mut limited = None;
    for _ in 0..20 {
        let r = req(port, "GET", "/v1/usage", Some(&a), None).await;
        if r.status == 429 {
            limited = Some(r);
            break;
        }
    }
    let limited = limited.expect("a burst past 2/s (burst 4) gets 429");
    assert!(
        limited.headers.contains("retry-after:"),
        "{}",
        limited.headers
    );
    let mut blocked = false;
    for _ in 0..10 {
        if req(
            port,
            "GET",
            "/v1/usage",
            Some("aq_deadbeef_0000000000000000000000000000000000000000000000000000000000000000"),
            None,
        )
        .await
        .status
            == 429
        {
            blocked = true;
            break;
        }
    }
    assert!(blocked, "repeated bad keys from one address are throttled");
    stop.cancel();
    db.cleanup().await;
    tq.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_matches_the_routes() {
    let tq = TestQueue::new("api-doc").await;
    let db = TestDb::new("api_doc").await;
    let (port, stop) = start(&tq, &db, ApiConfig::default()).await;
    let served = req(port, "GET", "/v1/openapi.json", None, None).await;
    assert_eq!(served.status, 200);
    let file: Value =
        serde_json::from_str(agentq::http::api::OPENAPI).expect("openapi.json parses");
    assert_eq!(
        served.body, file,
        "the served document is the one in the repository"
    );
    let paths = file["paths"].as_object().expect("paths");
    // The operator routes (/v1/admin) are listed apart, below.
    let mut documented: Vec<String> = paths
        .keys()
        .filter(|p| !p.starts_with("/v1/admin/"))
        .cloned()
        .collect();
    documented.sort();
    let mut admin: Vec<&str> = paths
        .keys()
        .map(String::as_str)
        .filter(|p| p.starts_with("/v1/admin/"))
        .collect();
    admin.sort();
    assert_eq!(
        admin,
        vec![
            "/v1/admin/dead",
            "/v1/admin/dead/{id}",
            "/v1/admin/dead/{id}/retry",
            "/v1/admin/invoices",
            "/v1/admin/keys",
            "/v1/admin/keys/{prefix}",
            "/v1/admin/tenants",
            "/v1/admin/tenants/{tenant}",
            "/v1/admin/tenants/{tenant}/webhook",
            "/v1/admin/tenants/{tenant}/webhook/test",
            "/v1/admin/usage"
        ]
    );
    assert_eq!(
        documented,
        vec![
            "/v1/events",
            "/v1/jobs",
            "/v1/jobs/{id}",
            "/v1/jobs/{id}/events",
            "/v1/openapi.json",
            "/v1/schedules",
            "/v1/schedules/{name}",
            "/v1/usage",
            "/v1/ws"
        ]
    );
    for (path, ops) in paths {
        for method in ops
            .as_object()
            .expect("ops")
            .keys()
            .filter(|m| *m != "parameters")
        {
            let concrete = path
                .replace("{id}", "0-1")
                .replace("{tenant}", "a")
                .replace("{prefix}", "a1b2c3d4");
            let body = (method == "post").then_some("{}");
            let r = req(port, &method.to_uppercase(), &concrete, None, body).await;
            assert!(
                r.status != 404 && r.status != 405,
                "{method} {path} is documented but not routed ({})",
                r.status
            );
        }
    }
    // And nothing routed under /v1 is undocumented: an undocumented method is 405.
    assert_eq!(
        req(port, "PUT", "/v1/jobs", None, Some("{}")).await.status,
        405
    );
    assert_eq!(
        req(port, "PUT", "/v1/admin/keys", None, Some("{}"))
            .await
            .status,
        405
    );
    stop.cancel();
    db.cleanup().await;
    tq.cleanup().await;
}
