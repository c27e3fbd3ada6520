//! Volume pricing, spend caps, invoices and the cost forecast over real
//! Redis and PostgreSQL (README, "Volume pricing, spend caps, invoices").
//!
//! - Graduated prices: many concurrent completions (several tasks, each on
//!   its own connection, completing batches) race across step boundaries;
//!   every attempt is priced at the steps of the usage it added, and the
//!   month's cost equals a straight computation over the attempts in the
//!   order they were charged, to the micro-dollar.
//! - Spend caps hold a tenant as quotas do, overrunning by at most the
//!   attempts already running, and release it when raised or (test clock)
//!   when the month turns.
//! - Invoices: lines per step and kind, reconciled with the ledger; the CLI
//!   and the API refuse one that does not reconcile.
//! - The forecast of `agentq usage` and `/v1/usage`.

mod common;

use std::time::Duration;

use agentq::duties::ledger_writer::LedgerWriter;
use agentq::executor::{Outcome, TaskUsage};
use agentq::http::api::ApiConfig;
use agentq::http::api::keys::{self, KeySpec, Scope};
use agentq::model::limits::{
    LimitsUpdate, PriceSteps, PriceUnit, Target, parse_spend_cap, step_amount,
};
use agentq::queue::{Call, JobSpec, Queue, QueueConfig};
use common::http::req;
use common::{TestDb, TestQueue, agentq, claim, complete, done, eventually, run_to_end};
use fred::prelude::*;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const LEASE: Duration = Duration::from_secs(60);

fn minute_steps(s: &str) -> PriceSteps {
    PriceSteps::parse(s, PriceUnit::Minutes).expect("minute steps")
}

fn token_steps(s: &str) -> PriceSteps {
    PriceSteps::parse(s, PriceUnit::Tokens).expect("token steps")
}

async fn set(q: &Queue, tenant: &str, u: LimitsUpdate) {
    u.apply(q, Target::Tenant(tenant))
        .await
        .expect("set limits");
}

async fn fill(q: &Queue, tenant: &str, n: usize) {
    let specs: Vec<JobSpec> = (0..n).map(|_| JobSpec::new(tenant, "q", "echo")).collect();
    for chunk in specs.chunks(500) {
        q.enqueue_batch(chunk).await.expect("enqueue");
    }
}

/// Another connection to the test's namespace (its own client).
async fn connection(tq: &TestQueue) -> Queue {
    let mut cfg = QueueConfig::new(tq.queue.config().redis_url.clone());
    cfg.namespace = tq.ns.clone();
    Queue::connect(cfg).await.expect("connect")
}

/// Write every outbox record to the ledger.
async fn drain_ledger(tq: &TestQueue, db: &TestDb) {
    let writer = LedgerWriter::new(tq.queue.clone(), db.pool.clone(), "billing-writer");
    while writer.run_once().await.expect("drain") > 0 {}
    assert_eq!(tq.outbox_len().await, 0, "every record written");
}

/// A deterministic spread of run times (ms) and tokens per job.
fn usage_of(id: &str) -> (u64, u64) {
    let h = id.bytes().fold(1469598103934665603u64, |h, b| {
        (h ^ b as u64).wrapping_mul(1099511628211)
    });
    (500 + h % 4500, (h >> 20) % 2000)
}

/// One ledger row of the test: job, run_ms, tokens, cost, billing.
type Row = (String, i64, i64, i64, String);

async fn rows_of(db: &TestDb, tenant: &str) -> Vec<Row> {
    sqlx::query_as(
        "SELECT job_id, run_ms, input_tokens + output_tokens, cost_micros, billing
         FROM usage_ledger WHERE tenant = $1",
    )
    .bind(tenant)
    .fetch_all(&db.pool)
    .await
    .expect("rows")
}

/// The usage counter of the month, field `suffix` ("" ms, ":tok", ":cost").
async fn counter(q: &Queue, tenant: &str, suffix: &str) -> u64 {
    let month = agentq::queue::inspect::current_month(q)
        .await
        .expect("month");
    let v: Option<u64> = q
        .client()
        .hget(
            q.keys(0).key(&["usage", tenant]),
            format!("{month}{suffix}"),
        )
        .await
        .expect("hget");
    v.unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn graduated_prices_race_across_step_boundaries_to_the_micro_dollar() {
    let tq = TestQueue::new("billing-race").await;
    let db = TestDb::new("billing_race").await;
    // Steps at 3 and 10 agent-minutes and 50k tokens: 400 attempts of
    // 0.5-5 s (about 18 minutes) and 0-2000 tokens cross all of them.
    let msteps = minute_steps("$0.010, 0.008@3m, 0.006@10m");
    let ksteps = token_steps("0.002, 0.001@50k");
    set(
        &tq.queue,
        "vol",
        LimitsUpdate {
            max_concurrency: Some(10_000),
            price_steps: Some(msteps.clone()),
            token_price_steps: Some(ksteps.clone()),
            ..Default::default()
        },
    )
    .await;
    set(
        &tq.queue,
        "flat",
        LimitsUpdate {
            max_concurrency: Some(10_000),
            price_per_minute: Some(0.01),
            price_per_1k_tokens: Some(0.002),
            ..Default::default()
        },
    )
    .await;
    fill(&tq.queue, "vol", 400).await;
    fill(&tq.queue, "flat", 40).await;

    // 8 tasks, each its own connection and worker name, claiming up to 6
    // jobs and completing them in one call (several charges per script).
    let mut tasks = Vec::new();
    for w in 0..8 {
        let q = connection(&tq).await;
        tasks.push(tokio::spawn(async move {
            let queues = vec!["q".to_string()];
            let mut call = Call::new(format!("w-{w}"));
            let mut done_n = 0;
            loop {
                let jobs = q
                    .claim(0, &call, 6, LEASE, &queues)
                    .await
                    .expect("claim")
                    .jobs;
                call.renew();
                if jobs.is_empty() {
                    break;
                }
                let acks: Vec<_> = jobs
                    .iter()
                    .map(|j| {
                        let (run_ms, tokens) = usage_of(&j.id);
                        let mut c = done(j, Outcome::Succeeded);
                        c.run_ms = run_ms;
                        c.usage = TaskUsage {
                            input_tokens: tokens / 2,
                            output_tokens: tokens - tokens / 2,
                            ..Default::default()
                        };
                        c
                    })
                    .collect();
                q.complete(0, &call, &acks).await.expect("complete");
                call.renew();
                done_n += acks.len();
            }
            done_n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("task");
    }
    let stats = agentq::queue::inspect::tenant_stats(&tq.queue, None)
        .await
        .expect("stats");
    assert_eq!(total, 440, "every job ran once: {stats:?}");
    drain_ledger(&tq, &db).await;

    let rows = rows_of(&db, "vol").await;
    assert_eq!(rows.len(), 400);
    let sum_ms: u64 = rows.iter().map(|r| r.1 as u64).sum();
    let sum_tok: u64 = rows.iter().map(|r| r.2 as u64).sum();
    assert!(sum_ms > 600_000 && sum_tok > 50_000, "crossed every step");
    assert_eq!(counter(&tq.queue, "vol", "").await, sum_ms);
    assert_eq!(counter(&tq.queue, "vol", ":tok").await, sum_tok);

    // The order of charging, from each row's usage-before: the rows tile
    // the month's usage with no gap and no overlap, so no two attempts
    // were priced for the same minutes (or tokens), however the workers
    // interleaved.
    let before = |r: &Row, tag: char| agentq::usage::billing_before(&r.4, tag);
    let mut by_ms: Vec<&Row> = rows.iter().collect();
    by_ms.sort_by_key(|r| before(r, 'u').expect("u<before> on every priced row"));
    let mut at = 0u64;
    let mut straight = 0u64;
    for r in &by_ms {
        assert_eq!(
            before(r, 'u'),
            Some(at),
            "row {} starts where the last ended",
            r.0
        );
        straight += msteps.price(PriceUnit::Minutes, at, r.1 as u64);
        at += r.1 as u64;
    }
    assert_eq!(at, sum_ms);
    let mut by_tok: Vec<&Row> = rows.iter().filter(|r| r.2 > 0).collect();
    by_tok.sort_by_key(|r| before(r, 'k').expect("k<before> on rows with tokens"));
    let mut at = 0u64;
    for r in &by_tok {
        assert_eq!(before(r, 'k'), Some(at), "row {} tokens", r.0);
        straight += ksteps.price(PriceUnit::Tokens, at, r.2 as u64);
        at += r.2 as u64;
    }
    assert_eq!(at, sum_tok);
    // Each row, priced alone at its place in that order, is what it was billed.
    for r in &rows {
        let mut want = msteps.price(PriceUnit::Minutes, before(r, 'u').unwrap_or(0), r.1 as u64);
        if r.2 > 0 {
            want += ksteps.price(PriceUnit::Tokens, before(r, 'k').unwrap_or(0), r.2 as u64);
        }
        assert_eq!(r.3 as u64, want, "row {} billed {}", r.0, r.4);
    }
    // The month: the ledger's sum, the straight computation in charging
    // order, and the price of the month's total usage (per-step floors
    // telescope, so any order gives the same total) agree exactly.
    let ledger: i64 = sqlx::query_scalar(
        "SELECT sum(cost_micros)::bigint FROM usage_ledger WHERE tenant = 'vol'",
    )
    .fetch_one(&db.pool)
    .await
    .expect("sum");
    let whole = msteps.total(PriceUnit::Minutes, sum_ms) + ksteps.total(PriceUnit::Tokens, sum_tok);
    assert_eq!((ledger as u64, straight), (whole, whole));

    // The invoice: one line per step and kind; each step line's amount is
    // the step's price of the month's usage in it.
    let month = agentq::queue::inspect::current_month(&tq.queue)
        .await
        .expect("month");
    let inv = agentq::usage::invoice(&db.pool, "vol", &month)
        .await
        .expect("invoice");
    assert!(inv.reconciled, "{:?}", inv.problems);
    assert_eq!(inv.total_micros, ledger);
    let items: Vec<(String, Option<u64>)> = inv
        .lines
        .iter()
        .map(|l| (l.item.clone(), l.step_from))
        .collect();
    assert_eq!(
        items,
        vec![
            ("agent_minutes".to_string(), Some(0)),
            ("agent_minutes".to_string(), Some(180_000)),
            ("agent_minutes".to_string(), Some(600_000)),
            ("tokens".to_string(), Some(0)),
            ("tokens".to_string(), Some(50_000)),
        ]
    );
    let split = |steps: &PriceSteps, used: u64| -> Vec<u64> {
        let s = &steps.0;
        (0..s.len())
            .map(|i| {
                let to = s.get(i + 1).map_or(used, |n| n.from.min(used));
                to.saturating_sub(s[i].from)
            })
            .collect()
    };
    let per_ms = split(&msteps, sum_ms);
    let per_tok = split(&ksteps, sum_tok);
    for (i, l) in inv.lines.iter().enumerate() {
        let (qty, per, rate) = if i < 3 {
            (per_ms[i], 60_000, msteps.0[i].micros)
        } else {
            (per_tok[i - 3], 1_000, ksteps.0[i - 3].micros)
        };
        assert_eq!(l.agent_ms + l.tokens, qty, "line {i}");
        assert_eq!(l.rate_micros, Some(rate));
        assert_eq!(
            l.amount_micros as u64,
            step_amount(qty, rate, per),
            "line {i}"
        );
    }

    // Tenants without steps are priced as before, with no billing note.
    for r in rows_of(&db, "flat").await {
        assert_eq!(r.4, "", "flat rows carry no billing");
        let want = (r.1 as f64 * 10_000.0 / 60_000.0 + r.2 as f64 * 2_000.0 / 1_000.0).floor();
        assert_eq!(r.3, want as i64);
    }
    tq.cleanup().await;
    db.cleanup().await;
}

#[test]
fn spend_caps_parse() {
    assert_eq!(parse_spend_cap("$500/month"), Ok(500_000_000));
    assert_eq!(parse_spend_cap("1,200.50/mo"), Ok(1_200_500_000));
    assert_eq!(parse_spend_cap("none"), Ok(0));
    assert!(parse_spend_cap("lots").is_err());
    assert!(parse_spend_cap("$-5").is_err());
}

#[tokio::test]
async fn a_spend_cap_holds_within_the_running_attempts_and_raising_it_releases() {
    let tq = TestQueue::new("billing-cap").await;
    // $0.01 a minute, one-minute attempts: $0.01 each; cap $0.05; 3 at once.
    set(
        &tq.queue,
        "cap",
        LimitsUpdate {
            max_concurrency: Some(3),
            price_per_minute: Some(0.01),
            spend_cap: Some(parse_spend_cap("$0.05/month").expect("cap")),
            ..Default::default()
        },
    )
    .await;
    fill(&tq.queue, "cap", 20).await;
    fill(&tq.queue, "other", 20).await;
    let minute = |j: &agentq::queue::ClaimedJob| {
        let mut c = done(j, Outcome::Succeeded);
        c.run_ms = 60_000;
        c
    };
    let mut ran = 0;
    let mut overrun_bound = 0u64;
    for _ in 0..10 {
        let batch = claim(&tq.queue, &["q"], 4, LEASE).await;
        let mine: Vec<_> = batch.iter().filter(|j| j.tenant == "cap").collect();
        ran += mine.len();
        // Completed one at a time: when one crosses the cap, the others of
        // the batch are still running, and they finish (and are billed).
        for (i, j) in mine.iter().enumerate() {
            let before = counter(&tq.queue, "cap", ":cost").await;
            complete(&tq.queue, &[minute(j)]).await;
            let after = counter(&tq.queue, "cap", ":cost").await;
            if before < 50_000 && after >= 50_000 {
                overrun_bound = 10_000 * (mine.len() - i - 1) as u64;
            }
        }
        for j in batch.iter().filter(|j| j.tenant != "cap") {
            complete(&tq.queue, &[done(j, Outcome::Succeeded)]).await;
        }
    }
    let spent = counter(&tq.queue, "cap", ":cost").await;
    assert!(spent >= 50_000, "reached the cap: {spent}");
    assert!(
        spent - 50_000 <= overrun_bound,
        "overran by {} micro-dollars, more than the attempts running at the crossing ({overrun_bound})",
        spent - 50_000
    );
    assert!(ran < 20, "held: ran {ran}");
    let stats = agentq::queue::inspect::tenant_stats(&tq.queue, None)
        .await
        .expect("tenants");
    let cap = stats.iter().find(|s| s.tenant == "cap").expect("cap");
    assert_eq!((cap.held.as_deref(), cap.running), (Some("spend"), 0));
    assert!(
        stats
            .iter()
            .find(|s| s.tenant == "other")
            .is_some_and(|s| s.ready == 0),
        "others kept running"
    );
    // Held until the month turns: B:throttled scores it at the next month.
    let score: Option<f64> = tq
        .queue
        .client()
        .zscore(tq.queue.keys(0).key(&["throttled"]), "cap")
        .await
        .expect("zscore");
    let now = tq.queue.server_time().await.expect("time");
    let next = agentq::usage::month_bounds(&now.format("%Y-%m").to_string())
        .expect("month")
        .1
        .and_hms_opt(0, 0, 0)
        .expect("midnight")
        .and_utc()
        .timestamp_millis();
    assert_eq!(score, Some(next as f64));
    assert!(claim(&tq.queue, &["q"], 3, LEASE).await.is_empty());

    set(
        &tq.queue,
        "cap",
        LimitsUpdate {
            spend_cap: Some(parse_spend_cap("$1/month").expect("cap")),
            ..Default::default()
        },
    )
    .await;
    let again = claim(&tq.queue, &["q"], 3, LEASE).await;
    assert_eq!(again.len(), 3, "raising the cap releases it");
    tq.cleanup().await;
}

/// With the test clock: a tenant at its spend cap at the end of a month
/// starts again in the next one (the counter is per month).
#[cfg(feature = "test-clock")]
#[tokio::test]
async fn a_spend_cap_releases_when_the_month_turns() {
    let ns = common::namespace("billing-month");
    let mut cfg = QueueConfig::new(common::redis_url());
    cfg.namespace = ns.clone();
    let q = Queue::connect_with_test_clock(cfg).await.expect("connect");
    let clock = q.keys(0).key(&["testclock"]);
    // 2026-11-30 23:00 UTC
    let late = chrono::DateTime::parse_from_rfc3339("2026-11-30T23:00:00Z")
        .expect("time")
        .timestamp_millis();
    let _: () = q
        .client()
        .set(&clock, late, None, None, false)
        .await
        .expect("clock");
    set(
        &q,
        "cap",
        LimitsUpdate {
            max_concurrency: Some(1),
            price_per_minute: Some(0.01),
            spend_cap: Some(10_000),
            ..Default::default()
        },
    )
    .await;
    fill(&q, "cap", 3).await;
    let j = claim(&q, &["q"], 1, LEASE).await;
    let mut c = done(&j[0], Outcome::Succeeded);
    c.run_ms = 60_000;
    complete(&q, &[c]).await;
    assert!(
        claim(&q, &["q"], 1, LEASE).await.is_empty(),
        "held at the cap"
    );
    // 2026-12-01 00:00:00.001 UTC: a new month, a new counter.
    let _: () = q
        .client()
        .set(&clock, late + 3_600_001, None, None, false)
        .await
        .expect("clock");
    assert_eq!(claim(&q, &["q"], 1, LEASE).await.len(), 1, "released");
    q.delete_namespace().await.expect("cleanup");
}

async fn start_api(tq: &TestQueue, db: &TestDb) -> (u16, CancellationToken) {
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

/// A ledger row finished at `finished_at` (ms) with `cost`.
fn record(job: &str, tenant: &str, finished_at: i64, cost: i64) -> agentq::model::record::Record {
    agentq::model::record::Record {
        job_id: job.into(),
        attempt: 1,
        tenant: tenant.into(),
        queue: "q".into(),
        kind: "echo".into(),
        outcome: "succeeded".into(),
        enqueued_at: finished_at - 20,
        started_at: finished_at - 10,
        finished_at,
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

#[tokio::test]
async fn invoices_reconcile_or_are_refused_by_the_cli_and_the_api() {
    let tq = TestQueue::new("billing-invoice").await;
    let db = TestDb::new("billing_invoice").await;
    set(
        &tq.queue,
        "vol",
        LimitsUpdate {
            max_concurrency: Some(100),
            price_steps: Some(minute_steps("0.010, 0.008@2m")),
            ..Default::default()
        },
    )
    .await;
    fill(&tq.queue, "vol", 6).await;
    let jobs = claim(&tq.queue, &["q"], 6, LEASE).await;
    let acks: Vec<_> = jobs
        .iter()
        .map(|j| {
            let mut c = done(j, Outcome::Succeeded);
            c.run_ms = 30_000;
            c
        })
        .collect();
    complete(&tq.queue, &acks).await;
    drain_ledger(&tq, &db).await;
    // 3 minutes: 2 at $0.010, 1 at $0.008.
    let now = tq.queue.server_time().await.expect("time");
    let month = now.format("%Y-%m").to_string();
    let (start, _) = agentq::usage::month_bounds(&month).expect("month");
    let start_ms = start
        .and_hms_opt(0, 0, 0)
        .expect("t")
        .and_utc()
        .timestamp_millis();
    // A flat row on the last ms of the previous month belongs to that month.
    agentq::ledger::insert(&db.pool, &[record("0-prev", "vol", start_ms - 1, 777)])
        .await
        .expect("insert");

    let (code, out, err) = cli(
        &tq,
        &db,
        &["invoice", "--tenant", "vol", "--month", &month, "--json"],
    );
    assert_eq!(code, 0, "{out}{err}");
    let inv: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(inv["total_micros"], 28_000, "{inv}");
    assert_eq!(inv["ledger_micros"], 28_000);
    assert_eq!(inv["reconciled"], true);
    let lines: Vec<(i64, i64, i64)> = inv["lines"]
        .as_array()
        .expect("lines")
        .iter()
        .map(|l| {
            (
                l["step_from"].as_i64().unwrap_or(-1),
                l["agent_ms"].as_i64().unwrap_or(-1),
                l["amount_micros"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    assert_eq!(lines, vec![(0, 120_000, 20_000), (120_000, 60_000, 8_000)]);
    let prev = (start - chrono::Days::new(1)).format("%Y-%m").to_string();
    let (code, out, _) = cli(
        &tq,
        &db,
        &["invoice", "--tenant", "vol", "--month", &prev, "--json"],
    );
    assert_eq!(code, 0);
    let p: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(
        (p["total_micros"].as_i64(), p["attempts"].as_i64()),
        (Some(777), Some(1))
    );
    assert_eq!(p["lines"][0]["item"], "flat");
    let (code, out, _) = cli(
        &tq,
        &db,
        &["invoice", "--tenant", "vol", "--month", &month, "--csv"],
    );
    assert_eq!(code, 0);
    assert!(
        out.lines()
            .last()
            .is_some_and(|l| l.contains(",total,") && l.ends_with(",28000,0.028000")),
        "{out}"
    );
    let (code, _, err) = cli(
        &tq,
        &db,
        &["invoice", "--tenant", "vol", "--month", "2026-13"],
    );
    assert_eq!(code, 2, "{err}");

    let (port, stop) = start_api(&tq, &db).await;
    let admin = keys::create_key(
        &db.pool,
        &KeySpec {
            scope: Scope::Admin,
            ..KeySpec::default()
        },
    )
    .await
    .expect("admin key")
    .key;
    let r = req(
        port,
        "GET",
        &format!("/v1/admin/invoices?tenant=vol&month={month}"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body, inv, "the same invoice as agentq invoice --json");
    let r = req(
        port,
        "GET",
        "/v1/admin/invoices?tenant=vol&month=11-2026",
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(r.status, 400);

    // A row whose cost no longer matches its billed steps (edited by hand):
    // refused, saying which row and why.
    sqlx::query("UPDATE usage_ledger SET cost_micros = cost_micros + 1 WHERE job_id = $1")
        .bind(&jobs[0].id)
        .execute(&db.pool)
        .await
        .expect("tamper");
    let (code, out, err) = cli(&tq, &db, &["invoice", "--tenant", "vol", "--month", &month]);
    assert_eq!(code, 1, "{out}");
    assert!(
        err.contains("does not reconcile") && err.contains(&jobs[0].id),
        "{err}"
    );
    let r = req(
        port,
        "GET",
        &format!("/v1/admin/invoices?tenant=vol&month={month}"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(
        (r.status, r.code()),
        (409, "invoice_unreconciled"),
        "{:?}",
        r.body
    );
    stop.cancel();
    tq.cleanup().await;
    db.cleanup().await;
}

#[tokio::test]
async fn usage_shows_month_to_date_cost_and_a_projection() {
    let tq = TestQueue::new("billing-forecast").await;
    let db = TestDb::new("billing_forecast").await;
    let now = chrono::Utc::now();
    let today = now.date_naive();
    let day_ms = 86_400_000;
    let t = now.timestamp_millis();
    // Today 700; 3 days ago 1400; 10 days ago 5000 (outside the 7 days).
    agentq::ledger::insert(
        &db.pool,
        &[
            record("0-a", "f", t - 1000, 700),
            record("0-b", "f", t - 3 * day_ms, 1400),
            record("0-c", "f", t - 10 * day_ms, 5000),
        ],
    )
    .await
    .expect("insert");
    let month_start = agentq::usage::month_start(today);
    let in_month = |days: i64| (today - chrono::Days::new(days as u64)) >= month_start;
    let mtd = 700 + if in_month(3) { 1400 } else { 0 } + if in_month(10) { 5000 } else { 0 };
    let next = month_start
        .checked_add_months(chrono::Months::new(1))
        .expect("next");
    let days_left = (next - today).num_days() - 1;
    let projected = mtd + 2100 * days_left / 7;

    let (code, out, err) = cli(
        &tq,
        &db,
        &["usage", "--forecast", "--json", "--tenant", "f"],
    );
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v[0]["month_to_date_micros"], mtd, "{v}");
    assert_eq!(v[0]["last_7_days_micros"], 2100);
    assert_eq!(v[0]["days_left"], days_left);
    assert_eq!(v[0]["projected_micros"], projected);
    let (code, out, _) = cli(&tq, &db, &["usage", "--tenant", "f"]);
    assert_eq!(code, 0);
    assert!(out.contains("projected $"), "{out}");

    // The tenant's own /v1/usage carries the same forecast.
    let (port, stop) = start_api(&tq, &db).await;
    let key = keys::create_key(
        &db.pool,
        &KeySpec {
            tenant: Some("f".into()),
            scope: Scope::Tenant,
            ..KeySpec::default()
        },
    )
    .await
    .expect("tenant key")
    .key;
    let r = req(port, "GET", "/v1/usage", Some(&key), None).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["forecast"], v[0], "{:?}", r.body);
    stop.cancel();
    tq.cleanup().await;
    db.cleanup().await;
}

/// docs/runbook.md#re-pricing-a-month: the SQL block re-prices a tenant's
/// month at a new schedule; the invoice then reconciles, and its total is
/// the new schedule's price of the month's usage. Other months and tenants
/// keep what they were billed.
#[tokio::test]
async fn the_runbook_re_prices_a_month_and_the_invoice_reconciles() {
    let db = TestDb::new("billing_reprice").await;
    let nov = chrono::DateTime::parse_from_rfc3339("2026-11-10T00:00:00Z")
        .expect("time")
        .timestamp_millis();
    let hour = 3_600_000;
    let mut rows = Vec::new();
    let mut total_ms = 0u64;
    let mut token_micros = 0u64;
    for i in 0..12 {
        // 12 rows of 300,000,000-400,000,000 ms: about 58,000 minutes in all,
        // across both thresholds of the new schedule.
        let mut r = record(&format!("0-{i}"), "acme", nov + i * hour, 123);
        r.run_ms = 300_000_000 + i * 9_000_000;
        r.input_tokens = 1_000 + i * 37;
        total_ms += r.run_ms as u64;
        token_micros += step_amount(r.input_tokens as u64, 2_000, 1_000);
        rows.push(r);
    }
    rows.push(record("0-dec", "acme", nov + 25 * 24 * hour, 999));
    rows.push(record("0-other", "other", nov, 555));
    agentq::ledger::insert(&db.pool, &rows)
        .await
        .expect("insert");
    let before = agentq::usage::invoice(&db.pool, "acme", "2026-11")
        .await
        .expect("invoice");
    assert_eq!((before.total_micros, before.reconciled), (12 * 123, true));

    let sql = common::ops::runbook_sql_block(
        "<!-- tests/billing.rs runs the SQL block below",
        "re-pricing a month",
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(&db.pool)
        .await
        .expect("the runbook's re-pricing runs");

    let inv = agentq::usage::invoice(&db.pool, "acme", "2026-11")
        .await
        .expect("invoice");
    let billing: Vec<String> = sqlx::query_scalar(
        "SELECT billing FROM usage_ledger WHERE tenant = 'acme' ORDER BY finished_at LIMIT 2",
    )
    .fetch_all(&db.pool)
    .await
    .expect("billing");
    assert!(inv.reconciled, "{:?} {billing:?}", inv.problems);
    let steps = minute_steps("0.010, 0.008@10000m, 0.006@50000m");
    assert_eq!(
        inv.total_micros as u64,
        steps.total(PriceUnit::Minutes, total_ms) + token_micros
    );
    assert_eq!(
        inv.lines.len(),
        4,
        "three minute steps and tokens: {:?}",
        inv.lines
    );
    let dec = agentq::usage::invoice(&db.pool, "acme", "2026-12")
        .await
        .expect("invoice");
    let other = agentq::usage::invoice(&db.pool, "other", "2026-11")
        .await
        .expect("invoice");
    assert_eq!(
        (dec.total_micros, other.total_micros),
        (999, 555),
        "untouched"
    );
    db.cleanup().await;
}

/// `agentq tenant set` takes the new flags (and names them when a value is
/// wrong), `tenant show` reports them, and setting a spend cap starts the
/// tenant's spend counter at the ledger's month-to-date cost.
#[tokio::test]
async fn tenant_set_takes_price_steps_and_a_spend_cap_seeded_from_the_ledger() {
    let tq = TestQueue::new("billing-cli").await;
    let db = TestDb::new("billing_cli").await;
    let now = tq
        .queue
        .server_time()
        .await
        .expect("time")
        .timestamp_millis();
    agentq::ledger::insert(&db.pool, &[record("0-spent", "acme", now - 1000, 5_000)])
        .await
        .expect("insert");
    let (code, out, err) = cli(
        &tq,
        &db,
        &[
            "tenant",
            "set",
            "acme",
            "--price-steps",
            "0.010, 0.008@10000m, 0.006@50000m",
            "--token-price-steps",
            "0.002, 0.001@10M",
            "--spend-cap",
            "$1/month",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(counter(&tq.queue, "acme", ":cost").await, 5_000, "{out}");
    let (code, out, _) = cli(&tq, &db, &["tenant", "show", "acme", "--json"]);
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["limits"]["spend_cap_micros"], 1_000_000, "{v}");
    assert_eq!(v["price_steps"][1]["from"], 600_000_000, "{v}");
    assert_eq!(v["token_price_steps"][1]["micros"], 1_000, "{v}");
    for (flag, bad) in [
        ("--price-steps", "0.01, 0.008"),
        ("--token-price-steps", "0.002@5M"),
        ("--spend-cap", "lots"),
    ] {
        let (code, _, err) = cli(&tq, &db, &["tenant", "set", "acme", flag, bad]);
        assert_eq!(code, 2, "{flag} {bad}: {err}");
        assert!(err.contains(flag), "{err}");
    }
    tq.cleanup().await;
    db.cleanup().await;
}
