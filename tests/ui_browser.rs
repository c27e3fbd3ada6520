//! The dashboard at /ui in a real browser: headless Chromium over
//! WebDriver (see tests/common/browser.rs) against a real `serve` (the
//! API's router, in process, as tests/api.rs starts it), Redis and
//! PostgreSQL on the test's own namespace and schema, and a real `agentq
//! worker` process that runs the jobs and writes the ledger.
//!
//! It signs in as an operator and sees the seeded queues and tenants, the
//! usage chart and the dead letters (a `<script>` in a job's error shows
//! as text and does not run), retries a dead job and watches it run on its
//! page without a reload, pauses a queue and sees it paused; a POST without
//! the CSRF token, or from another Origin, is refused; signed in as a
//! tenant it sees its own jobs and nothing of another tenant, whose job
//! page is a 404 like a job that does not exist. A screenshot of each view
//! goes to target/ui-screenshots/ (docs/screenshots/, which the README
//! shows, with AGENTQ_UPDATE_SCREENSHOTS=1).

#[path = "common/browser.rs"]
mod browser;
mod common;

use std::time::Duration;

use agentq::executor::Outcome;
use agentq::http::api::ApiConfig;
use agentq::http::api::keys::{self, KeySpec, Scope};
use agentq::model::limits::{LimitsUpdate, Target};
use agentq::queue::JobSpec;
use agentq::queue::inspect::{job_info, queue_stats};
use browser::Browser;
use common::{Proc, TestDb, TestQueue, WorkerProc, claim, complete, done, eventually};
use fantoccini::{Client, Locator};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// An error text no page may run.
const XSS: &str = "<script>window.__xss=1</script><b>boom</b>";

async fn start(tq: &TestQueue, db: &TestDb, cfg: ApiConfig) -> (u16, CancellationToken) {
    let port = agentq_servers::free_port().expect("port");
    let stop = CancellationToken::new();
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

fn api_config() -> ApiConfig {
    ApiConfig {
        tenant_rate: std::num::NonZeroU32::new(1000).expect("nonzero"),
        ..Default::default()
    }
}

/// Tenants' limits, as an operator sets them.
async fn seed_limits(tq: &TestQueue) {
    for (t, tier, cap, weight, quota_h) in [("acme", "pro", 3, 2, 10), ("beta", "free", 2, 1, 1)] {
        LimitsUpdate {
            tier: Some(tier.into()),
            max_concurrency: Some(cap),
            weight: Some(weight),
            quota: Some(Duration::from_secs(quota_h * 3600)),
            price_per_minute: Some(6.0),
            ..Default::default()
        }
        .apply(&tq.queue, Target::Tenant(t))
        .await
        .expect("limits");
    }
}

/// A dead job of acme on queue "jobs" whose error holds markup, made
/// before any worker runs (claimed and failed here, as a worker would).
async fn seed_dead(tq: &TestQueue) -> String {
    let mut spec = JobSpec::new("acme", "jobs", "echo").payload(&json!({"note": "<img src=x>"}));
    spec.max_attempts = Some(1);
    let id = tq.enqueue(&spec).await;
    let got = claim(&tq.queue, &["jobs"], 1, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 1, "claimed the seeded job");
    let mut failed = done(&got[0], Outcome::Failed);
    failed.error = XSS.into();
    failed.exit_code = Some(1);
    complete(&tq.queue, &[failed]).await;
    assert_eq!(job_info(&tq.queue, &id).await.expect("job").state, "dead");
    id
}

/// Jobs that run to the end (usage in the ledger); returns beta's last id.
async fn seed_runs(tq: &TestQueue, db: &TestDb) -> String {
    let mut ids = Vec::new();
    for (i, t) in ["acme", "acme", "beta", "beta"].iter().enumerate() {
        let spec = JobSpec::new(*t, "jobs", "echo").payload(&json!({ "n": i }));
        ids.push(tq.enqueue(&spec).await);
    }
    for id in &ids {
        common::job_in_state(tq, id, &["succeeded"]).await;
    }
    eventually(Duration::from_secs(60), "ledger rows written", || async {
        // One row per job run here, and the seeded dead job's attempt.
        (db.rows().await.len() > ids.len()).then_some(())
    })
    .await;
    ids.pop().expect("beta's job")
}

async fn text(c: &Client, css: &str) -> String {
    c.wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .text()
        .await
        .expect("text")
}

async fn body_text(c: &Client) -> String {
    text(c, "body").await
}

/// Wait until the page's path ends with `suffix` (after a click).
async fn wait_path(c: &Client, suffix: &str) {
    let start = std::time::Instant::now();
    loop {
        let url = c.current_url().await.expect("url");
        if url.path().ends_with(suffix) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "at {url}, not {suffix}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn click(c: &Client, css: &str) {
    c.wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .click()
        .await
        .expect("click");
}

async fn sign_in(c: &Client, port: u16, key: &str) {
    c.goto(&format!("http://127.0.0.1:{port}/ui"))
        .await
        .expect("goto");
    wait_path(c, "/ui/login").await;
    c.find(Locator::Css("#key"))
        .await
        .expect("key field")
        .send_keys(key)
        .await
        .expect("type key");
    click(c, "main form button[type=submit]").await;
}

/// A PNG of the whole page (the window grown to its height, then back).
async fn screenshot(c: &Client, name: &str) {
    // Twice: the first resize can change the layout (and so the height).
    // The window is the page plus the browser's own ~150 px.
    for _ in 0..2 {
        let h = c
            .execute(
                "return Math.max(document.body.scrollHeight, document.documentElement.scrollHeight);",
                vec![],
            )
            .await
            .expect("height")
            .as_u64()
            .unwrap_or(900)
            .clamp(600, 2400) as u32;
        c.set_window_size(1280, h + 160).await.expect("resize");
    }
    let html = c.source().await.expect("source").len();
    eprintln!("page {name}: {html} bytes of HTML (plus ui.css and ui.js)");
    let png = c.screenshot().await.expect("screenshot");
    c.set_window_size(1280, 900).await.expect("resize back");
    // target/ui-screenshots on every run (a test run leaves the tree
    // clean); AGENTQ_UPDATE_SCREENSHOTS=1 writes the README's copies.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = if std::env::var_os("AGENTQ_UPDATE_SCREENSHOTS").is_some() {
        root.join("docs/screenshots")
    } else {
        root.join("target/ui-screenshots")
    };
    std::fs::create_dir_all(&dir).expect("screenshots dir");
    std::fs::write(dir.join(format!("{name}.png")), png).expect("write screenshot");
}

/// The status of a same-origin fetch from the page (cookies included).
async fn fetch_status(c: &Client, method: &str, path: &str, body: &str) -> u64 {
    let js = "const [m, p, b, done] = arguments; \
              fetch(p, {method: m, body: m === 'GET' ? undefined : b, credentials: 'same-origin', \
                 headers: m === 'GET' ? {} : {'Content-Type': 'application/x-www-form-urlencoded'}}) \
              .then(r => done(r.status), e => done(String(e)));";
    let v = c
        .execute_async(js, vec![json!(method), json!(path), json!(body)])
        .await
        .expect("fetch");
    v.as_u64().unwrap_or_else(|| panic!("fetch {path}: {v}"))
}

/// Wait until the element's text is `want`, without reloading the page.
async fn wait_text(c: &Client, css: &str, want: &str, limit: Duration) {
    let start = std::time::Instant::now();
    loop {
        let now = text(c, css).await;
        if now == want {
            return;
        }
        assert!(start.elapsed() < limit, "{css} is {now:?}, not {want:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn operator_views(c: &Client, port: u16, admin: &str, dead: &str) {
    sign_in(c, port, admin).await;
    wait_path(c, "/ui/queues").await;
    let page = body_text(c).await;
    assert!(page.contains("jobs") && page.contains("batch"), "{page}");
    wait_text(c, "#live-status", "live", Duration::from_secs(10)).await;

    c.goto(&format!("http://127.0.0.1:{port}/ui/tenants"))
        .await
        .expect("goto");
    let tenants = text(c, "main table").await;
    for want in ["acme", "beta", "pro", "free"] {
        assert!(tenants.contains(want), "{want} in {tenants}");
    }
    screenshot(c, "tenants").await;

    c.goto(&format!("http://127.0.0.1:{port}/ui/usage"))
        .await
        .expect("goto");
    c.find(Locator::Css("svg.chart rect.bar"))
        .await
        .expect("a bar per day");
    let usage = text(c, "main table").await;
    assert!(usage.contains("acme") && usage.contains("beta"), "{usage}");
    screenshot(c, "usage").await;

    c.goto(&format!("http://127.0.0.1:{port}/ui/dead"))
        .await
        .expect("goto");
    assert_eq!(
        text(c, "td.error-text").await,
        XSS,
        "the error shows as text"
    );
    let scripts = c
        .execute(
            "return [document.scripts.length, typeof window.__xss];",
            vec![],
        )
        .await
        .expect("js");
    assert_eq!(
        scripts,
        json!([1, "undefined"]),
        "only ui.js; the error's script never ran"
    );
    assert!(
        c.source()
            .await
            .expect("source")
            .contains("&lt;script&gt;window.__xss")
    );
    screenshot(c, "dead").await;

    // Retry: the job page follows it to its end without a reload.
    click(c, &format!("form[action='/ui/dead/{dead}/retry'] button")).await;
    wait_path(c, &format!("/ui/jobs/{dead}")).await;
    c.execute("window.__same_page = 1;", vec![])
        .await
        .expect("mark page");
    wait_text(c, "#job-state", "succeeded", Duration::from_secs(60)).await;
    let same = c
        .execute("return window.__same_page;", vec![])
        .await
        .expect("js");
    assert_eq!(same, json!(1), "the state changed live, not by a reload");
    eventually(
        Duration::from_secs(30),
        "second attempt in the ledger",
        || async {
            c.refresh().await.ok()?;
            let t = text(c, "main").await;
            (t.contains("failed") && t.contains("succeeded") && t.contains("Ledger")).then_some(())
        },
    )
    .await;
    screenshot(c, "job").await;
}

async fn pause_and_csrf(c: &Client, tq: &TestQueue, port: u16) {
    c.goto(&format!("http://127.0.0.1:{port}/ui/queues"))
        .await
        .expect("goto");
    click(c, "form[action='/ui/queues/batch/pause'] button").await;
    wait_path(c, "/ui/queues").await;
    let flash = text(c, "p.flash").await;
    assert!(flash.contains("Queue batch paused"), "{flash}");
    assert_eq!(text(c, "[data-live='q.batch.paused']").await, "yes");
    assert_eq!(text(c, "[data-live='q.jobs.paused']").await, "no");
    let paused = queue_stats(&tq.queue).await.expect("stats");
    assert!(paused.iter().any(|s| s.queue == "batch" && s.paused));
    screenshot(c, "queues").await;

    // CSRF: the same POST from the signed-in page but without the token.
    assert_eq!(
        fetch_status(c, "POST", "/ui/queues/jobs/pause", "").await,
        403
    );
    assert_eq!(
        fetch_status(c, "POST", "/ui/queues/jobs/pause", "csrf=wrong").await,
        403
    );
    // With the token but from another site (Origin): refused too.
    let sid = c.get_named_cookie("agentq_session").await.expect("cookie");
    assert_eq!(sid.http_only(), Some(true));
    assert_eq!(
        sid.same_site().map(|s| s.to_string()).as_deref(),
        Some("Strict")
    );
    let token = c
        .find(Locator::Css("input[name=csrf]"))
        .await
        .expect("csrf field")
        .attr("value")
        .await
        .expect("attr")
        .expect("token");
    let cross = raw_post(
        port,
        "/ui/queues/jobs/pause",
        sid.value(),
        &token,
        "http://evil.example",
    )
    .await;
    assert!(cross.starts_with("HTTP/1.1 403"), "{cross}");
    let ok = raw_post(
        port,
        "/ui/queues/nothing/resume",
        sid.value(),
        &token,
        &format!("http://127.0.0.1:{port}"),
    )
    .await;
    assert!(
        ok.starts_with("HTTP/1.1 303"),
        "the same request from this origin works: {ok}"
    );
    let stats = queue_stats(&tq.queue).await.expect("stats");
    assert!(
        stats.iter().all(|s| s.queue != "jobs" || !s.paused),
        "jobs never paused"
    );
}

/// A request of `head` (request line and headers) with no body; the reply.
async fn raw(port: u16, head: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let req = format!("{head}Host: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.expect("read");
    String::from_utf8_lossy(&out).into_owned()
}

/// A form POST with a session cookie, a token and an Origin; the raw reply.
async fn raw_post(port: u16, path: &str, sid: &str, token: &str, origin: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let body = format!("csrf={token}");
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: {origin}\r\nCookie: agentq_session={sid}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(head.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.expect("read");
    String::from_utf8_lossy(&out).into_owned()
}

async fn tenant_view(c: &Client, port: u16, key: &str, mine: &str, theirs: &str) {
    click(c, "form[action='/ui/logout'] button").await;
    wait_path(c, "/ui/login").await;
    sign_in(c, port, key).await;
    wait_path(c, "/ui/tenant").await;
    let src = c.source().await.expect("source");
    assert!(src.contains(mine), "acme's waiting job is listed");
    assert!(
        !src.contains("beta") && !src.contains(theirs),
        "nothing of beta shows"
    );
    assert!(body_text(c).await.contains("Tenant acme"));
    screenshot(c, "tenant").await;

    // Another tenant's job: the same 404 as a job that does not exist.
    assert_eq!(
        fetch_status(c, "GET", &format!("/ui/jobs/{theirs}"), "").await,
        404
    );
    assert_eq!(
        fetch_status(c, "GET", &format!("/ui/live?job={theirs}"), "").await,
        404
    );
    let missing = format!("{}0", &mine[..mine.len() - 1]);
    let missing = if missing == mine {
        format!("{}1", &mine[..mine.len() - 1])
    } else {
        missing
    };
    assert_eq!(
        fetch_status(c, "GET", &format!("/ui/jobs/{missing}"), "").await,
        404
    );
    c.goto(&format!("http://127.0.0.1:{port}/ui/jobs/{theirs}"))
        .await
        .expect("goto");
    let page = body_text(c).await;
    assert!(page.contains("404") && !page.contains("beta"), "{page}");
    // Operator pages are not there for a tenant.
    assert_eq!(fetch_status(c, "GET", "/ui/queues", "").await, 404);
    assert_eq!(
        fetch_status(c, "GET", &format!("/ui/jobs/{mine}"), "").await,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_and_tenants_use_the_dashboard_in_a_real_browser() {
    if browser::skipped() {
        eprintln!("AGENTQ_SKIP_BROWSER=1: browser test skipped");
        return;
    }
    // First: without chromedriver the test fails here, before any setup.
    let b = Browser::start().await;
    let tq = TestQueue::new("ui").await;
    let db = TestDb::new("ui").await;
    let admin_spec = KeySpec {
        scope: Scope::Admin,
        ..KeySpec::default()
    };
    let admin = keys::create_key(&db.pool, &admin_spec)
        .await
        .expect("admin key")
        .key;
    let acme = keys::create(&db.pool, "acme").await.expect("acme key").key;
    seed_limits(&tq).await;
    let dead = seed_dead(&tq).await;
    let how = WorkerProc {
        database_url: Some(db.url()),
        ..Default::default()
    };
    let worker = Proc(tq.spawn_worker_with(&["--queues", "jobs", "--concurrency", "2"], &how));
    let theirs = seed_runs(&tq, &db).await;
    // Waiting work on "batch", which no worker serves: one job per tenant.
    tq.enqueue(&JobSpec::new("beta", "batch", "echo")).await;
    let mine = tq.enqueue(&JobSpec::new("acme", "batch", "echo")).await;
    let (port, stop) = start(&tq, &db, api_config()).await;

    operator_views(&b.client, port, &admin, &dead).await;
    pause_and_csrf(&b.client, &tq, port).await;
    tenant_view(&b.client, port, &acme, &mine, &theirs).await;
    b.close().await;

    drop(worker);
    stop.cancel();
    tq.cleanup().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_ui_serves_no_dashboard_and_pages_need_a_session() {
    let tq = TestQueue::new("ui-off").await;
    let db = TestDb::new("ui_off").await;
    let mut cfg = api_config();
    cfg.ui.enabled = false;
    let (off, stop_off) = start(&tq, &db, cfg).await;
    assert_eq!(
        common::http::req(off, "GET", "/ui/login", None, None)
            .await
            .status,
        404
    );
    let (on, stop_on) = start(&tq, &db, api_config()).await;
    let login = common::http::req(on, "GET", "/ui/login", None, None).await;
    assert_eq!(login.status, 200);
    assert!(login.headers.contains("content-security-policy"));
    assert!(login.headers.contains("httponly; samesite=strict"));
    let proxied = raw(on, "GET /ui/login HTTP/1.1\r\nX-Forwarded-Proto: https\r\n").await;
    assert!(
        proxied.to_lowercase().contains("samesite=strict; secure"),
        "{proxied}"
    );
    let anon = common::http::req(on, "GET", "/ui/queues", None, None).await;
    assert_eq!(
        (anon.status, anon.headers.contains("location: /ui/login")),
        (303, true)
    );
    let post = common::http::req(on, "POST", "/ui/queues/jobs/pause", None, Some("csrf=x")).await;
    assert_ne!(post.status, 200);
    let r: Value = json!(queue_stats(&tq.queue).await.expect("stats"));
    assert_eq!(r, json!([]), "nothing was paused or created");
    stop_off.cancel();
    stop_on.cancel();
    tq.cleanup().await;
    db.cleanup().await;
}
