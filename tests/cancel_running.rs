//! Cancelling running work (issue 16): `agentq cancel` on a job a real
//! worker process is running kills its task within a second (the wake
//! channel's `cancel <job> <attempt>`; the lease here is 30 s, so the
//! heartbeat fallback would take 10 s), the job ends `cancelled` with one
//! ledger row billing the time the worker measured, it is not retried, and
//! its tenant's slot (cap 1) goes to the next job once the attempt is
//! closed; the library call and `DELETE /v1/jobs/{id}` do the same.
//!
//! The cancelled attempt keeps its slot until it is closed (scripts driven
//! directly: nothing else of the tenant is admitted meanwhile); its
//! worker's completion, the reaper (the worker died) or a shutdown
//! hand-back closes it as `cancelled`; a task that succeeded before the
//! kill stays succeeded; a worker that missed the wake-channel message
//! kills it at its next heartbeat. Repeats are harmless: a job being
//! cancelled answers alike, an already cancelled one succeeds; queued jobs
//! cancel as before; succeeded and dead ones are refused with one line.

mod common;

use std::time::{Duration, Instant};

use agentq::queue::JobSpec;
use agentq::queue::inspect::job_info;
use common::{Proc, TestDb, TestQueue, WorkerProc, eventually};
use serde_json::json;

fn sleep_job(ms: u64) -> JobSpec {
    let mut s = JobSpec::new("t", "q", "sleep").payload(&json!({ "ms": ms }));
    s.max_attempts = Some(5);
    s
}

async fn state(tq: &TestQueue, id: &str) -> (String, u64) {
    let j = job_info(&tq.queue, id).await.expect("job");
    (j.state, j.attempts)
}

/// (attempt, outcome, run_ms) of every ledger row of `id`.
async fn rows_of(db: &TestDb, id: &str) -> Vec<(i32, String, i64)> {
    sqlx::query_as(
        "SELECT attempt, outcome, run_ms FROM usage_ledger WHERE job_id = $1 ORDER BY attempt",
    )
    .bind(id)
    .fetch_all(&db.pool)
    .await
    .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_running_job_kills_it_bills_it_once_and_frees_the_slot() {
    let db = TestDb::new("cancel_running").await;
    let tq = TestQueue::new("cancel-running").await;
    let (code, _, err) = tq.cli(&["tenant", "set", "t", "--max-concurrency", "1"]);
    assert_eq!(code, 0, "tenant set: {err}");
    let w = Proc(tq.spawn_worker_with(
        &["--queues", "q", "--lease", "30s", "--concurrency", "2"],
        &WorkerProc {
            database_url: Some(db.url()),
            ..WorkerProc::default()
        },
    ));
    let long = tq.enqueue(&sleep_job(60_000)).await;
    let wpid = w.id();
    let task = eventually(Duration::from_secs(30), "the task starts", || async move {
        common::task_leaders(wpid).first().copied()
    })
    .await;
    let started = Instant::now();
    // The same tenant's next job waits behind the cap of 1.
    let next = tq.enqueue(&sleep_job(100)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(state(&tq, &next).await.0, "ready", "held by the cap");

    let (code, out, err) = tq.cli(&["cancel", &long]);
    let cancelled_at = Instant::now();
    let ran = started.elapsed();
    assert_eq!(code, 0, "cancel: {out} {err}");
    assert!(out.contains("cancelling (was running)"), "{out}");
    // Repeated (a lost reply, an impatient user): the same answer.
    let (code, again, err) = tq.cli(&["cancel", &long]);
    assert_eq!(code, 0, "cancel again: {again} {err}");
    assert!(
        again.contains("cancelling (was running)") || again.contains("already cancelled"),
        "{again}"
    );
    assert!(
        common::wait_dead(task as i32, Duration::from_secs(1)).await,
        "the task process outlived the cancel by more than 1 s"
    );
    let gone_in = cancelled_at.elapsed();
    assert!(common::task_leaders(wpid).iter().all(|p| *p != task));
    assert_eq!(state(&tq, &long).await, ("cancelled".to_string(), 1));

    // The slot is free: the next job of the same tenant runs to the end.
    eventually(Duration::from_secs(20), "the next job succeeds", || {
        let tq = &tq;
        let next = next.clone();
        async move { (state(tq, &next).await.0 == "succeeded").then_some(()) }
    })
    .await;

    // Exactly one ledger row for the cancelled attempt, billing the time it ran.
    let rows = eventually(Duration::from_secs(20), "the ledger rows land", || {
        let db = &db;
        let long = long.clone();
        async move {
            let r = rows_of(db, &long).await;
            (!r.is_empty()).then_some(r)
        }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let again = rows_of(&db, &long).await;
    assert_eq!(rows, again, "no second row arrives");
    assert_eq!(rows.len(), 1, "{rows:?}");
    let (attempt, outcome, run_ms) = rows[0].clone();
    assert_eq!((attempt, outcome.as_str()), (1, "cancelled"));
    let ran_ms = ran.as_millis() as i64;
    assert!(
        run_ms > 1000 && run_ms <= ran_ms + 2000,
        "run_ms {run_ms}, ran about {ran_ms} ms"
    );
    // No retry: the attempts did not grow and the state stayed.
    assert_eq!(state(&tq, &long).await, ("cancelled".to_string(), 1));
    assert!(
        common::task_leaders(wpid).is_empty(),
        "nothing runs any more"
    );
    eprintln!("task gone {gone_in:?} after the cancel returned; run_ms {run_ms}, ran {ran_ms} ms");

    // Cancelling it again succeeds and says it was already cancelled;
    // other finished jobs are refused with one line, exit 2, and left alone.
    let (code, out, err) = tq.cli(&["cancel", &long]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("already cancelled"), "{out}");
    let (code, out, err) = tq.cli(&["cancel", &long, "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(
        (v["state"].as_str(), v["was"].as_str()),
        (Some("cancelled"), Some("cancelled"))
    );
    let (code, _, err) = tq.cli(&["cancel", &next]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("is succeeded: only jobs that have not finished can be cancelled"),
        "{err}"
    );
    assert_eq!(state(&tq, &next).await.0, "succeeded");

    // A queued job cancels as before, through the CLI and the library.
    let mut later = sleep_job(100);
    later.delay = Some(Duration::from_secs(600));
    let delayed = tq.enqueue(&later).await;
    let (code, out, err) = tq.cli(&["cancel", &delayed]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("cancelled (was delayed)"), "{out}");
    let delayed2 = tq.enqueue(&later).await;
    assert_eq!(tq.queue.cancel(&delayed2).await.expect("cancel"), "delayed");
    assert_eq!(state(&tq, &delayed2).await.0, "cancelled");

    drop(w);
    tq.cleanup().await;
    db.cleanup().await;
}

/// The library call cancels a running job too; the worker's own completion
/// of the killed attempt closes it as `cancelled` (one record in the
/// outbox, with the worker's CPU and peak RSS) and frees the slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_job_cancelled_through_the_library_leaves_one_record() {
    let tq = TestQueue::new("cancel-running-lib").await;
    let w = Proc(tq.spawn_worker(&["--queues", "q", "--lease", "30s"]));
    let id = tq.enqueue(&sleep_job(60_000)).await;
    let wpid = w.id();
    let task = eventually(Duration::from_secs(30), "the task starts", || async move {
        common::task_leaders(wpid).first().copied()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(tq.queue.cancel(&id).await.expect("cancel"), "running");
    assert!(
        common::wait_dead(task as i32, Duration::from_secs(1)).await,
        "the task process outlived the cancel by more than 1 s"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let recs = records_of(&tq, &id).await;
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0].0, "cancelled");
    assert!(!recs[0].2.is_empty() && !recs[0].3.is_empty(), "{recs:?}");
    assert_eq!(state(&tq, &id).await, ("cancelled".to_string(), 1));
    assert_eq!(tq.running().await.get("t").copied().unwrap_or(0), 0);
    drop(w);
    tq.cleanup().await;
}

/// `DELETE /v1/jobs/{id}` on a running job: 200 `cancelling`, the task gone
/// within a second; again: 200, `cancelled` once the attempt is closed; a
/// succeeded job: 409 not_cancellable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_job_cancelled_over_http_is_killed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let db = TestDb::new("cancel_running_http").await;
    let tq = TestQueue::new("cancel-running-http").await;
    let key = agentq::http::api::keys::create(&db.pool, "t")
        .await
        .expect("key")
        .key;
    let port = agentq_servers::free_port().expect("port");
    let stop = tokio_util::sync::CancellationToken::new();
    let (q, pool, s) = (tq.queue.clone(), db.pool.clone(), stop.clone());
    tokio::spawn(async move {
        let cfg = agentq::http::api::ApiConfig::default();
        agentq::http::api::serve(([127, 0, 0, 1], port).into(), q, pool, cfg, s).await
    });
    eventually(Duration::from_secs(10), "api listening", || async {
        agentq_servers::listening(&format!("127.0.0.1:{port}")).then_some(())
    })
    .await;
    let delete = |id: String| {
        let key = key.clone();
        async move {
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("connect");
            let head = format!(
                "DELETE /v1/jobs/{id} HTTP/1.0\r\nHost: localhost\r\nAuthorization: Bearer {key}\r\nContent-Length: 0\r\n\r\n"
            );
            s.write_all(head.as_bytes()).await.expect("write");
            let mut raw = Vec::new();
            s.read_to_end(&mut raw).await.expect("read");
            String::from_utf8_lossy(&raw).into_owned()
        }
    };
    let w = Proc(tq.spawn_worker(&["--queues", "q", "--lease", "30s"]));
    let id = tq.enqueue(&sleep_job(60_000)).await;
    let wpid = w.id();
    let task = eventually(Duration::from_secs(30), "the task starts", || async move {
        common::task_leaders(wpid).first().copied()
    })
    .await;
    let first = delete(id.clone()).await;
    assert!(
        first.starts_with("HTTP/1.0 200") || first.starts_with("HTTP/1.1 200"),
        "{first}"
    );
    assert!(first.contains(r#""state":"cancelling""#), "{first}");
    assert!(first.contains(r#""was":"running""#), "{first}");
    assert!(
        common::wait_dead(task as i32, Duration::from_secs(1)).await,
        "the task process outlived the cancel by more than 1 s"
    );
    common::job_in_state(&tq, &id, &["cancelled"]).await;
    let again = delete(id.clone()).await;
    assert!(again.contains(" 200 "), "{again}");
    assert!(
        again.contains(r#""state":"cancelled""#) && again.contains(r#""was":"cancelled""#),
        "{again}"
    );
    assert_eq!(state(&tq, &id).await, ("cancelled".to_string(), 1));
    // A succeeded job is still refused.
    let quick = tq.enqueue(&sleep_job(10)).await;
    common::job_in_state(&tq, &quick, &["succeeded"]).await;
    let done = delete(quick).await;
    assert!(
        done.contains(" 409 ") && done.contains("not_cancellable"),
        "{done}"
    );
    stop.cancel();
    drop(w);
    tq.cleanup().await;
    db.cleanup().await;
}

// ---- The slot is held until the attempt is closed (scripts driven directly).

const LEASE: Duration = Duration::from_secs(30);

fn echo() -> JobSpec {
    JobSpec::new("t", "q", "echo")
}

/// Outbox records of `id`: (outcome, run_ms, cpu_ms, peak_rss).
async fn records_of(tq: &TestQueue, id: &str) -> Vec<(String, String, String, String)> {
    tq.outbox()
        .await
        .into_iter()
        .filter(|r| r["job"] == id)
        .map(|r| {
            (
                r["outcome"].clone(),
                r["run_ms"].clone(),
                r["cpu_ms"].clone(),
                r["peak_rss"].clone(),
            )
        })
        .collect()
}

async fn event_kinds(tq: &TestQueue, id: &str) -> Vec<String> {
    use agentq::model::job_event::EventId;
    tq.queue
        .job_events_after("t", EventId::START, 10_000)
        .await
        .expect("read events")
        .events
        .into_iter()
        .filter(|e| e.job == id)
        .map(|e| format!("{:?}", e.kind).to_lowercase())
        .collect()
}

fn statuses(s: Vec<agentq::queue::CompleteStatus>) -> Vec<&'static str> {
    s.into_iter().map(|s| s.as_str()).collect()
}

/// The worker's completion of an attempt it killed: SIGKILL, measured
/// time, CPU and peak RSS, and the backoff it would ask for a failure.
fn killed(j: &agentq::queue::ClaimedJob) -> agentq::queue::Completion {
    let mut c = common::done(j, agentq::executor::Outcome::Failed);
    c.exit_code = None;
    c.signal = Some(9);
    c.error = "killed by signal 9".into();
    c.run_ms = 1234;
    c.cpu_ms = 56;
    c.peak_rss = 7 << 20;
    c.backoff_ms = 1000;
    c
}

/// Cap 1: cancelling A (running) does not free the tenant's slot; B is not
/// admitted until A's worker reports; the report closes A as `cancelled`
/// (no retry, not dead), billed with the worker's measured time, CPU and
/// peak RSS, one record, one `cancelled` event. Repeated cancels answer alike.
#[tokio::test]
async fn a_cancelled_attempt_keeps_its_slot_until_its_worker_reports() {
    let tq = TestQueue::new("cancel-holds-slot").await;
    common::set_cap(&tq.queue, "t", 1).await;
    let a = tq.enqueue(&echo()).await;
    let b = tq.enqueue(&echo()).await;
    let got = common::claim(&tq.queue, &["q"], 2, LEASE).await;
    assert_eq!(
        got.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(),
        [a.as_str()]
    );

    assert_eq!(tq.queue.cancel(&a).await.expect("cancel"), "running");
    assert_eq!(
        tq.queue.cancel(&a).await.expect("cancel again"),
        "running",
        "a repeated cancel answers as the first"
    );
    assert!(
        common::claim(&tq.queue, &["q"], 1, LEASE).await.is_empty(),
        "the cancelled attempt still holds the tenant's only slot"
    );
    assert_eq!(tq.running().await.get("t").copied(), Some(1));
    assert_eq!(state(&tq, &a).await, ("running".to_string(), 1));
    assert!(records_of(&tq, &a).await.is_empty(), "billed when it ends");

    let st = common::complete(&tq.queue, &[killed(&got[0])]).await;
    assert_eq!(statuses(st), ["cancelled"]);
    assert_eq!(state(&tq, &a).await, ("cancelled".to_string(), 1));
    assert_eq!(
        records_of(&tq, &a).await,
        [(
            "cancelled".to_string(),
            "1234".to_string(),
            "56".to_string(),
            (7u64 << 20).to_string()
        )]
    );
    assert_eq!(
        event_kinds(&tq, &a).await,
        ["enqueued", "started", "cancelled"]
    );
    assert_eq!(tq.running().await.get("t").copied().unwrap_or(0), 0);
    // Now B gets the slot; A is not retried.
    let next = common::claim(&tq.queue, &["q"], 2, LEASE).await;
    assert_eq!(next.iter().map(|j| j.id.clone()).collect::<Vec<_>>(), [b]);
    assert_eq!(tq.queue.cancel(&a).await.expect("cancel done"), "cancelled");
    assert_eq!(records_of(&tq, &a).await.len(), 1);
    tq.cleanup().await;
}

/// A task that finished before the kill keeps its success: the cancel
/// came too late, and the job is `succeeded`, billed as such.
#[tokio::test]
async fn an_attempt_that_succeeded_before_the_kill_stays_succeeded() {
    let tq = TestQueue::new("cancel-late-success").await;
    let a = tq.enqueue(&echo()).await;
    let got = common::claim(&tq.queue, &["q"], 1, LEASE).await;
    assert_eq!(tq.queue.cancel(&a).await.expect("cancel"), "running");
    let ok = common::done(&got[0], agentq::executor::Outcome::Succeeded);
    assert_eq!(
        statuses(common::complete(&tq.queue, &[ok]).await),
        ["succeeded"]
    );
    assert_eq!(state(&tq, &a).await.0, "succeeded");
    assert_eq!(records_of(&tq, &a).await[0].0, "succeeded");
    assert_eq!(
        event_kinds(&tq, &a).await,
        ["enqueued", "started", "succeeded"]
    );
    assert_eq!(tq.queue.cancel(&a).await.expect("cancel"), "succeeded");
    tq.cleanup().await;
}

/// The worker died after the cancel: the reaper closes the expired
/// attempt as `cancelled` (not retried), and the slot goes to the next job.
#[tokio::test]
async fn the_reaper_closes_an_expired_cancelled_attempt_as_cancelled() {
    let tq = TestQueue::new("cancel-reaped").await;
    common::set_cap(&tq.queue, "t", 1).await;
    let mut spec = echo();
    spec.max_attempts = Some(5);
    let a = tq.enqueue(&spec).await;
    let b = tq.enqueue(&echo()).await;
    common::claim(&tq.queue, &["q"], 1, Duration::from_millis(200)).await;
    assert_eq!(tq.queue.cancel(&a).await.expect("cancel"), "running");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let reaped = tq
        .queue
        .reap(0, Duration::from_millis(1), 100)
        .await
        .expect("reap");
    assert_eq!(reaped.reaped, 1);
    assert_eq!(state(&tq, &a).await, ("cancelled".to_string(), 1));
    let recs = records_of(&tq, &a).await;
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0].0, "cancelled");
    assert_eq!(
        event_kinds(&tq, &a).await,
        ["enqueued", "started", "cancelled"]
    );
    let next = common::claim(&tq.queue, &["q"], 2, LEASE).await;
    assert_eq!(next.iter().map(|j| j.id.clone()).collect::<Vec<_>>(), [b]);
    tq.cleanup().await;
}

/// A worker shutting down hands back a cancelled attempt as `cancelled`,
/// never to ready: it does not run again.
#[tokio::test]
async fn a_released_cancelled_attempt_closes_as_cancelled() {
    use agentq::model::attempt::{AttemptKey, HandBack};
    let tq = TestQueue::new("cancel-released").await;
    let a = tq.enqueue(&echo()).await;
    let got = common::claim(&tq.queue, &["q"], 1, LEASE).await;
    assert_eq!(tq.queue.cancel(&a).await.expect("cancel"), "running");
    let back = HandBack {
        key: AttemptKey::new(a.clone(), got[0].attempt),
        run_ms: 500,
    };
    let r = tq
        .queue
        .release(0, &agentq::queue::Call::new("w-test"), "shutdown", &[back])
        .await
        .expect("release");
    assert_eq!(r.released, 0, "closed as cancelled, not handed back");
    assert_eq!(state(&tq, &a).await, ("cancelled".to_string(), 1));
    let recs = records_of(&tq, &a).await;
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(
        (recs[0].0.as_str(), recs[0].1.as_str()),
        ("cancelled", "500")
    );
    assert_eq!(
        event_kinds(&tq, &a).await,
        ["enqueued", "started", "cancelled"]
    );
    assert!(common::claim(&tq.queue, &["q"], 1, LEASE).await.is_empty());
    tq.cleanup().await;
}

/// A worker that missed the wake-channel message (pub/sub is fire and
/// forget: a subscriber reconnecting at that moment never hears it) learns
/// of the cancel from its next heartbeat, a third of the lease later, and
/// kills the attempt. The test writes the mark as `cancel.lua` does
/// (`cancel` = the attempt, on the job hash) but publishes nothing: exactly
/// what such a worker sees, with no test hook in the worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missed_cancel_message_still_kills_within_a_third_of_the_lease() {
    let tq = TestQueue::new("cancel-missed-message").await;
    let w = Proc(tq.spawn_worker(&["--queues", "q", "--lease", "3s"]));
    let id = tq.enqueue(&sleep_job(60_000)).await;
    let wpid = w.id();
    let task = eventually(Duration::from_secs(30), "the task starts", || async move {
        common::task_leaders(wpid).first().copied()
    })
    .await;
    let jk = tq.queue.keys(0).key(&["job", &id]);
    let _: i64 = fred::prelude::HashesInterface::hset(tq.queue.client(), &jk, ("cancel", "1"))
        .await
        .expect("mark");
    // A beat every second: killed within it (plus slack for a loaded VM).
    assert!(
        common::wait_dead(task as i32, Duration::from_millis(2500)).await,
        "the task outlived the heartbeat that reports its cancel"
    );
    common::job_in_state(&tq, &id, &["cancelled"]).await;
    let recs = records_of(&tq, &id).await;
    assert_eq!(recs.len(), 1, "{recs:?}");
    let (outcome, run_ms, cpu_ms, peak_rss) = recs[0].clone();
    assert_eq!(outcome, "cancelled");
    // The worker's own figures: its measured time, CPU and peak RSS.
    assert!(run_ms.parse::<u64>().unwrap_or(0) > 0, "{run_ms}");
    assert!(cpu_ms.parse::<u64>().is_ok(), "cpu_ms {cpu_ms:?}");
    assert!(peak_rss.parse::<u64>().is_ok(), "peak_rss {peak_rss:?}");
    drop(w);
    tq.cleanup().await;
}
