//! The operator API under /v1/admin over real Redis, PostgreSQL and the
//! real HTTP server: admin keys reach only it and tenant keys are refused
//! there; tenant limits set over HTTP are what `agentq tenant show` and the
//! queue see, with the CLI's error texts; keys are created, listed and
//! revoked (every serve hears it); an expiring key stops working although
//! cached; usage per tenant comes from the ledger as `agentq usage` reports
//! it; dead letters are listed, retried and purged.

mod common;

use std::time::{Duration, Instant};

use agentq::http::api::ApiConfig;
use agentq::http::api::keys::{self, KeySpec, Scope};
use agentq::queue::JobSpec;
use agentq::queue::inspect::job_info;
use common::http::{Reply, req};
use common::{TestDb, TestQueue, agentq, eventually, fast_worker, run_to_end};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const JOB: &str = r#"{"queue":"q","kind":"echo","payload":{"n":1}}"#;

async fn start(tq: &TestQueue, db: &TestDb) -> (u16, CancellationToken) {
    let port = agentq_servers::free_port().expect("port");
    let stop = CancellationToken::new();
    let cfg = ApiConfig {
        tenant_rate: std::num::NonZeroU32::new(1000).expect("nonzero"),
        ..Default::default()
    };
    let (q, pool, s) = (tq.queue.clone(), db.pool.clone(), stop.clone());
    tokio::spawn(async move {
        agentq::http::api::serve(([127, 0, 0, 1], port).into(), q, pool, cfg, s).await
    });
    eventually(Duration::from_secs(10), "api listening", || async {
        agentq_servers::listening(&format!("127.0.0.1:{port}")).then_some(())
    })
    .await;
    (port, stop)
}

/// An admin key made through the library, as the CLI makes it.
async fn admin_key(db: &TestDb) -> String {
    let spec = KeySpec {
        scope: Scope::Admin,
        ..KeySpec::default()
    };
    keys::create_key(&db.pool, &spec)
        .await
        .expect("admin key")
        .key
}

/// The CLI on the test's namespace and schema: (exit code, stdout, stderr).
fn cli(tq: &TestQueue, db: &TestDb, args: &[&str]) -> (i32, String, String) {
    run_to_end(
        agentq()
            .args(args)
            .env("AGENTQ_REDIS_URL", tq.queue.config().redis_url.clone())
            .env("AGENTQ_NAMESPACE", &tq.ns)
            .env("AGENTQ_DATABASE_URL", db.url())
            .env("AGENTQ_LOG", "off"),
    )
}

fn message(r: &Reply) -> &str {
    r.body["error"]["message"].as_str().unwrap_or("")
}

/// The CLI's one-line error for `args` (exit 2), without "error: ".
fn cli_error(tq: &TestQueue, db: &TestDb, args: &[&str]) -> String {
    let (code, out, err) = cli(tq, db, args);
    assert_eq!(code, 2, "{args:?}: {out}{err}");
    err.trim().trim_start_matches("error: ").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_keys_reach_only_admin_routes_and_tenant_keys_are_refused() {
    let tq = TestQueue::new("admin-scope").await;
    let db = TestDb::new("admin_scope").await;
    let admin = admin_key(&db).await;
    let tenant = keys::create(&db.pool, "a").await.expect("key").key;
    let (port, stop) = start(&tq, &db).await;

    let ok = req(port, "GET", "/v1/admin/tenants", Some(&admin), None).await;
    assert_eq!(ok.status, 200, "{:?}", ok.body);
    assert!(ok.body["tenants"].is_array());
    // An admin key belongs to no tenant: refused on every tenant route.
    for (method, path, body) in [
        ("POST", "/v1/jobs", Some(JOB)),
        ("GET", "/v1/usage", None),
        ("GET", "/v1/schedules", None),
    ] {
        let r = req(port, method, path, Some(&admin), body).await;
        assert_eq!((r.status, r.code()), (403, "forbidden"), "{method} {path}");
        assert!(message(&r).contains("admin API key"), "{}", message(&r));
    }
    // A tenant key, or none, is refused on the admin routes.
    let r = req(port, "GET", "/v1/admin/tenants", Some(&tenant), None).await;
    assert_eq!((r.status, r.code()), (403, "forbidden"));
    assert!(
        message(&r).contains("need an admin API key"),
        "{}",
        message(&r)
    );
    let r = req(
        port,
        "POST",
        "/v1/admin/keys",
        Some(&tenant),
        Some(r#"{"tenant":"a"}"#),
    )
    .await;
    assert_eq!(r.status, 403, "a tenant key cannot mint keys");
    let r = req(port, "GET", "/v1/admin/tenants", None, None).await;
    assert_eq!((r.status, r.code()), (401, "unauthorized"));
    assert_eq!(
        req(port, "POST", "/v1/jobs", Some(&tenant), Some(JOB))
            .await
            .status,
        201,
        "the tenant key still works where it belongs"
    );

    // `agentq tenant key create --admin` makes one too, stored with tenant "*".
    let (code, out, err) = cli(&tq, &db, &["tenant", "key", "create", "--admin", "--json"]);
    assert_eq!(code, 0, "{err}");
    let made: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(
        (made["scope"].as_str(), made["tenant"].as_str()),
        (Some("admin"), Some("*"))
    );
    let cli_admin = made["key"].as_str().expect("key");
    let r = req(port, "GET", "/v1/admin/keys", Some(cli_admin), None).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let (code, _, err) = cli(&tq, &db, &["tenant", "key", "create", "a", "--admin"]);
    assert_eq!(code, 2, "a tenant and --admin together are refused: {err}");
    stop.cancel();
    db.cleanup().await;
    tq.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_limits_set_over_http_are_what_the_cli_and_the_queue_see() {
    let tq = TestQueue::new("admin-tenants").await;
    let db = TestDb::new("admin_tenants").await;
    let admin = admin_key(&db).await;
    let acme = keys::create(&db.pool, "acme").await.expect("key").key;
    let (port, stop) = start(&tq, &db).await;

    let body = r#"{"max_concurrency":3,"max_timeout":"2m","allowed_queues":"q1,q2"}"#;
    let r = req(
        port,
        "PUT",
        "/v1/admin/tenants/acme",
        Some(&admin),
        Some(body),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["limits"]["max_concurrency"], 3);
    // PATCH (like PUT, like the CLI) changes only what it names.
    let r = req(
        port,
        "PATCH",
        "/v1/admin/tenants/acme",
        Some(&admin),
        Some(r#"{"weight":5}"#),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        (
            r.body["limits"]["weight"].as_u64(),
            r.body["limits"]["max_concurrency"].as_u64()
        ),
        (Some(5), Some(3))
    );

    let (code, out, err) = cli(&tq, &db, &["tenant", "show", "acme", "--json"]);
    assert_eq!(code, 0, "{err}");
    let shown: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(shown["limits"]["max_concurrency"], 3);
    assert_eq!(shown["limits"]["max_timeout_ms"], 120_000);
    assert_eq!(shown["limits"]["weight"], 5);
    assert_eq!(shown["allowed"]["queues"], json!(["q1", "q2"]));
    let got = req(port, "GET", "/v1/admin/tenants/acme", Some(&admin), None).await;
    assert_eq!(got.body, shown, "GET is `agentq tenant show --json`");
    let listed = req(port, "GET", "/v1/admin/tenants", Some(&admin), None).await;
    let tenants = listed.body["tenants"].as_array().expect("tenants");
    assert!(
        tenants
            .iter()
            .any(|t| t["tenant"] == "acme" && t["limits"]["max_concurrency"] == 3),
        "{tenants:?}"
    );

    // The queue and the HTTP edge enforce them.
    let r = req(
        port,
        "POST",
        "/v1/jobs",
        Some(&acme),
        Some(r#"{"queue":"q3","kind":"echo"}"#),
    )
    .await;
    assert_eq!(r.code(), "forbidden_queue");
    let r = req(
        port,
        "POST",
        "/v1/jobs",
        Some(&acme),
        Some(r#"{"queue":"q1","kind":"echo","timeout":"3m"}"#),
    )
    .await;
    assert_eq!(r.code(), "over_cap");
    let r = req(
        port,
        "POST",
        "/v1/jobs",
        Some(&acme),
        Some(r#"{"queue":"q1","kind":"echo","timeout":"1m"}"#),
    )
    .await;
    assert_eq!(r.status, 201, "{:?}", r.body);

    // Bad input: the same text as `agentq tenant set`, nothing written.
    for (body, path, args) in [
        (
            r#"{"max_concurrency":0}"#,
            "/v1/admin/tenants/acme",
            vec!["tenant", "set", "acme", "--max-concurrency", "0"],
        ),
        (
            "{}",
            "/v1/admin/tenants/acme",
            vec!["tenant", "set", "acme"],
        ),
        (
            r#"{"weight":2}"#,
            "/v1/admin/tenants/a:b",
            vec!["tenant", "set", "a:b", "--weight", "2"],
        ),
        (
            r#"{"allowed_kinds":"ok,b d"}"#,
            "/v1/admin/tenants/acme",
            vec!["tenant", "set", "acme", "--allowed-kinds", "ok,b d"],
        ),
    ] {
        let r = req(port, "PUT", path, Some(&admin), Some(body)).await;
        assert_eq!((r.status, r.code()), (400, "invalid_request"), "{body}");
        assert_eq!(message(&r), cli_error(&tq, &db, &args), "{body}");
    }
    let r = req(
        port,
        "PUT",
        "/v1/admin/tenants/acme",
        Some(&admin),
        Some(r#"{"max_timeout":"2 fortnights"}"#),
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(message(&r).contains("--max-timeout"), "{}", message(&r));
    let r = req(
        port,
        "PUT",
        "/v1/admin/tenants/acme",
        Some(&admin),
        Some(r#"{"max_concurency":2}"#),
    )
    .await;
    assert_eq!(r.status, 400, "a misspelt field is refused, not ignored");
    let after = req(port, "GET", "/v1/admin/tenants/acme", Some(&admin), None).await;
    assert_eq!(after.body, shown, "refused changes wrote nothing");
    stop.cancel();
    db.cleanup().await;
    tq.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_created_listed_and_revoked_over_http() {
    let tq = TestQueue::new("admin-keys").await;
    let db = TestDb::new("admin_keys").await;
    let admin = admin_key(&db).await;
    let (port, stop) = start(&tq, &db).await;

    let made = req(
        port,
        "POST",
        "/v1/admin/keys",
        Some(&admin),
        Some(r#"{"tenant":"b"}"#),
    )
    .await;
    assert_eq!(made.status, 201, "{:?}", made.body);
    assert_eq!(
        (made.body["tenant"].as_str(), made.body["scope"].as_str()),
        (Some("b"), Some("tenant"))
    );
    let key = made.body["key"].as_str().expect("key").to_string();
    let prefix = made.body["prefix"].as_str().expect("prefix").to_string();
    // In use, so the serve's key cache holds it.
    assert_eq!(
        req(port, "GET", "/v1/usage", Some(&key), None).await.status,
        200
    );

    let listed = req(port, "GET", "/v1/admin/keys?tenant=b", Some(&admin), None).await;
    assert_eq!(listed.status, 200, "{:?}", listed.body);
    let rows = listed.body["keys"].as_array().expect("keys");
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0]["prefix"].as_str(), rows[0]["revoked"].as_bool()),
        (Some(prefix.as_str()), Some(false))
    );
    let secret = key.rsplit('_').next().expect("secret");
    assert!(
        !listed.body.to_string().contains(secret),
        "secrets are never listed"
    );
    assert!(rows[0].get("key").is_none() && rows[0].get("secret_hash").is_none());
    let all = req(port, "GET", "/v1/admin/keys", Some(&admin), None).await;
    assert_eq!(
        all.body["keys"].as_array().map(Vec::len),
        Some(2),
        "b's key and the admin key"
    );

    let gone = req(
        port,
        "DELETE",
        &format!("/v1/admin/keys/{prefix}"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(gone.status, 200, "{:?}", gone.body);
    assert_eq!(
        (
            gone.body["revoked"].as_bool(),
            gone.body["announced"].as_bool()
        ),
        (Some(true), Some(true))
    );
    eventually(
        Duration::from_secs(5),
        "revoked key refused by the cache",
        || async {
            (req(port, "GET", "/v1/usage", Some(&key), None).await.status == 401).then_some(())
        },
    )
    .await;
    let again = req(
        port,
        "DELETE",
        &format!("/v1/admin/keys/{prefix}"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!((again.status, again.code()), (404, "not_found"));
    let listed = req(port, "GET", "/v1/admin/keys?tenant=b", Some(&admin), None).await;
    assert_eq!(listed.body["keys"][0]["revoked"].as_bool(), Some(true));

    for bad in [
        r#"{"scope":"tenant"}"#,
        r#"{"tenant":"b","scope":"admin"}"#,
        r#"{"tenant":"b c"}"#,
        r#"{"tenant":"b","expires_at":"tomorrow"}"#,
        r#"{"tenant":"b","expires_at":"2020-01-01T00:00:00Z"}"#,
        r#"{"tenant":"b","expires_in":"1d","expires_at":"2099-01-01T00:00:00Z"}"#,
        r#"{"tenant":"b","scope":"root"}"#,
    ] {
        let r = req(port, "POST", "/v1/admin/keys", Some(&admin), Some(bad)).await;
        assert_eq!(
            (r.status, r.code()),
            (400, "invalid_request"),
            "{bad}: {:?}",
            r.body
        );
    }
    let r = req(port, "DELETE", "/v1/admin/keys/nothex", Some(&admin), None).await;
    assert_eq!(r.status, 400);
    stop.cancel();
    db.cleanup().await;
    tq.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiring_key_stops_working_even_when_cached() {
    let tq = TestQueue::new("admin-expiry").await;
    let db = TestDb::new("admin_expiry").await;
    let admin = admin_key(&db).await;
    let (port, stop) = start(&tq, &db).await;

    let made = req(
        port,
        "POST",
        "/v1/admin/keys",
        Some(&admin),
        Some(r#"{"tenant":"c","expires_in":"2s"}"#),
    )
    .await;
    assert_eq!(made.status, 201, "{:?}", made.body);
    assert!(made.body["expires_at"].is_string());
    let key = made.body["key"].as_str().expect("key").to_string();
    let t0 = Instant::now();
    // A short-lived admin key too, straight from the library.
    let spec = KeySpec {
        scope: Scope::Admin,
        expires_at: Some(chrono::Utc::now() + chrono::Duration::seconds(2)),
        ..KeySpec::default()
    };
    let short_admin = keys::create_key(&db.pool, &spec).await.expect("key").key;
    // Used at once: both are now in the cache, whose refresh is 60 s away.
    assert_eq!(
        req(port, "GET", "/v1/usage", Some(&key), None).await.status,
        200
    );
    assert_eq!(
        req(port, "GET", "/v1/admin/tenants", Some(&short_admin), None)
            .await
            .status,
        200
    );

    let refused = eventually(Duration::from_secs(15), "expired key refused", || async {
        let r = req(port, "GET", "/v1/usage", Some(&key), None).await;
        (r.status == 401).then_some(r)
    })
    .await;
    assert!(
        t0.elapsed() >= Duration::from_millis(1500),
        "not before its expiry"
    );
    assert!(
        message(&refused).contains("expired"),
        "{}",
        message(&refused)
    );
    eventually(
        Duration::from_secs(15),
        "expired admin key refused",
        || async {
            (req(port, "GET", "/v1/admin/tenants", Some(&short_admin), None)
                .await
                .status
                == 401)
                .then_some(())
        },
    )
    .await;
    let listed = req(port, "GET", "/v1/admin/keys?tenant=c", Some(&admin), None).await;
    assert_eq!(listed.body["keys"][0]["expired"].as_bool(), Some(true));

    // The CLI sets expiries too: a duration, or an RFC 3339 time.
    let (code, out, err) = cli(
        &tq,
        &db,
        &[
            "tenant",
            "key",
            "create",
            "c",
            "--expires-in",
            "30d",
            "--json",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let k: Value = serde_json::from_str(&out).expect("json");
    let at = chrono::DateTime::parse_from_rfc3339(k["expires_at"].as_str().expect("expires_at"))
        .expect("time");
    let days = (at.with_timezone(&chrono::Utc) - chrono::Utc::now()).num_days();
    assert!((29..=30).contains(&days), "{days}");
    let (code, out, _) = cli(
        &tq,
        &db,
        &[
            "tenant",
            "key",
            "create",
            "c",
            "--expires-at",
            "2099-01-01T00:00:00Z",
            "--json",
        ],
    );
    assert_eq!(code, 0);
    let k: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(k["expires_at"].as_str(), Some("2099-01-01T00:00:00Z"));
    let err = cli_error(
        &tq,
        &db,
        &["tenant", "key", "create", "c", "--expires-at", "soon"],
    );
    assert!(err.contains("RFC 3339"), "{err}");
    stop.cancel();
    db.cleanup().await;
    tq.cleanup().await;
}

fn ledger_row(job: &str, tenant: &str, cost: i64) -> agentq::model::record::Record {
    let now = chrono::Utc::now().timestamp_millis();
    agentq::model::record::Record {
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
        cost_micros: cost,
        error: String::new(),
        billing: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_per_tenant_comes_from_the_ledger_as_the_cli_reports_it() {
    let tq = TestQueue::new("admin-usage").await;
    let db = TestDb::new("admin_usage").await;
    let admin = admin_key(&db).await;
    let (port, stop) = start(&tq, &db).await;
    let rows = [
        ledger_row("0-1", "a", 100),
        ledger_row("0-2", "b", 200),
        ledger_row("0-3", "b", 300),
    ];
    agentq::ledger::insert(&db.pool, &rows)
        .await
        .expect("insert");

    let r = req(port, "GET", "/v1/admin/usage", Some(&admin), None).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let per: Vec<(String, i64, i64)> = r.body["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|x| {
            let n = |k: &str| x[k].as_i64().unwrap_or(-1);
            (
                x["tenant"].as_str().unwrap_or("").to_string(),
                n("attempts"),
                n("cost_micros"),
            )
        })
        .collect();
    assert_eq!(
        per,
        vec![("a".to_string(), 1, 100), ("b".to_string(), 2, 500)]
    );
    let (code, out, err) = cli(&tq, &db, &["usage", "--json"]);
    assert_eq!(code, 0, "{err}");
    let from_cli: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(r.body["rows"], from_cli, "the same report as agentq usage");

    let only_b = req(
        port,
        "GET",
        "/v1/admin/usage?tenant=b&by=day",
        Some(&admin),
        None,
    )
    .await;
    let b_rows = only_b.body["rows"].as_array().expect("rows");
    assert!(
        !b_rows.is_empty() && b_rows.iter().all(|x| x["tenant"] == "b"),
        "{b_rows:?}"
    );
    for bad in [
        "since=yesterday",
        "since=2026-12-02&until=2026-12-01",
        "by=week",
        "tenant=a:b",
    ] {
        let r = req(
            port,
            "GET",
            &format!("/v1/admin/usage?{bad}"),
            Some(&admin),
            None,
        )
        .await;
        assert_eq!((r.status, r.code()), (400, "invalid_request"), "{bad}");
    }
    stop.cancel();
    db.cleanup().await;
    tq.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_retried_and_purged_over_http() {
    let tq = TestQueue::new("admin-dead").await;
    let db = TestDb::new("admin_dead").await;
    let admin = admin_key(&db).await;
    let (port, stop) = start(&tq, &db).await;
    let w = tq.start_worker(fast_worker(&["q"], 2));
    let mut ids = Vec::new();
    for t in ["a", "a", "b"] {
        let mut s =
            JobSpec::new(t, "q", "fail").payload(&json!({"code": 65, "message": "bad row 7"}));
        s.max_attempts = Some(1);
        ids.push(tq.enqueue(&s).await);
    }
    for id in &ids {
        common::job_in_state(&tq, id, &["dead"]).await;
    }
    w.stop().await; // nothing runs the retried job: it is inspected as it is

    let all = req(port, "GET", "/v1/admin/dead", Some(&admin), None).await;
    assert_eq!(all.status, 200, "{:?}", all.body);
    let jobs = all.body["jobs"].as_array().expect("jobs");
    assert_eq!(jobs.len(), 3);
    assert!(
        jobs.iter()
            .all(|j| j["queue"] == "q"
                && j["last_error"].as_str().unwrap_or("").contains("bad row 7"))
    );
    let (_, out, _) = cli(&tq, &db, &["dead", "q", "list", "--json"]);
    let from_cli: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(
        from_cli.as_array().map(Vec::len),
        Some(3),
        "as agentq dead lists them"
    );
    let b = req(
        port,
        "GET",
        "/v1/admin/dead?queue=q&tenant=b",
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(b.body["jobs"].as_array().map(Vec::len), Some(1));
    assert_eq!(b.body["jobs"][0]["id"].as_str(), Some(ids[2].as_str()));

    let retried = req(
        port,
        "POST",
        &format!("/v1/admin/dead/{}/retry", ids[0]),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(retried.status, 200, "{:?}", retried.body);
    let info = job_info(&tq.queue, &ids[0]).await.expect("inspect");
    assert_eq!(
        (info.state.as_str(), info.payload["message"].as_str()),
        ("ready", Some("bad row 7"))
    );
    let twice = req(
        port,
        "POST",
        &format!("/v1/admin/dead/{}/retry", ids[0]),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!((twice.status, twice.code()), (409, "not_dead"));

    let purged = req(
        port,
        "DELETE",
        &format!("/v1/admin/dead/{}", ids[2]),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(purged.status, 200, "{:?}", purged.body);
    assert!(
        job_info(&tq.queue, &ids[2]).await.is_err(),
        "purged jobs are gone"
    );
    let left = req(port, "GET", "/v1/admin/dead?queue=q", Some(&admin), None).await;
    assert_eq!(left.body["jobs"].as_array().map(Vec::len), Some(1));
    let r = req(
        port,
        "GET",
        "/v1/admin/dead?queue=q",
        Some(&keys::create(&db.pool, "a").await.expect("key").key),
        None,
    )
    .await;
    assert_eq!(r.status, 403, "tenants cannot see dead letters here");
    stop.cancel();
    db.cleanup().await;
    tq.cleanup().await;
}
