//! Cancelling running work (issue 16): `agentq cancel` on a job a real
//! worker process is running kills its task within a second (the wake
//! channel's `cancel <job> <attempt>`; the lease here is 30 s, so the
//! heartbeat fallback would take 10 s), the job ends `cancelled` with one
//! ledger row billing the time it ran, it is not retried, and its tenant's
//! slot (cap 1) is free for the next job; the library call and
//! `DELETE /v1/jobs/{id}` do the same. Queued jobs cancel as before;
//! finished ones are refused with one line.

mod common;

use std::time::{Duration, Instant};

use agentq::queue::JobSpec;
use agentq::queue::inspect::job_info;
use common::{Proc, TestDb, TestQueue, WorkerProc, eventually};
use serde_json::json;

/// Live (not zombie) direct children of `parent` that run a task program:
/// not the lease guard (as in tests/stalled.rs).
fn task_leaders(parent: u32) -> Vec<u32> {
    let agentq = std::fs::canonicalize(common::bin()).unwrap_or_default();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let mut f = rest.split_whitespace();
        let (state, ppid) = (f.next(), f.next().and_then(|p| p.parse::<u32>().ok()));
        if ppid != Some(parent) || state == Some("Z") {
            continue;
        }
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
        if exe != agentq {
            out.push(pid);
        }
    }
    out
}

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
        task_leaders(wpid).first().copied()
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
    assert!(out.contains("cancelled (was running)"), "{out}");
    assert!(
        common::wait_dead(task as i32, Duration::from_secs(1)).await,
        "the task process outlived the cancel by more than 1 s"
    );
    let gone_in = cancelled_at.elapsed();
    assert!(task_leaders(wpid).iter().all(|p| *p != task));
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
    assert!(task_leaders(wpid).is_empty(), "nothing runs any more");
    eprintln!("task gone {gone_in:?} after the cancel returned; run_ms {run_ms}, ran {ran_ms} ms");

    // Finished jobs are refused with one line, exit 2, and left alone.
    let (code, _, err) = tq.cli(&["cancel", &long]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("is cancelled"), "{err}");
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
/// of the killed attempt is refused (no second record in the outbox).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_job_cancelled_through_the_library_leaves_one_record() {
    let tq = TestQueue::new("cancel-running-lib").await;
    let w = Proc(tq.spawn_worker(&["--queues", "q", "--lease", "30s"]));
    let id = tq.enqueue(&sleep_job(60_000)).await;
    let wpid = w.id();
    let task = eventually(Duration::from_secs(30), "the task starts", || async move {
        task_leaders(wpid).first().copied()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(tq.queue.cancel(&id).await.expect("cancel"), "running");
    assert!(
        common::wait_dead(task as i32, Duration::from_secs(1)).await,
        "the task process outlived the cancel by more than 1 s"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let outcomes: Vec<String> = tq
        .outbox()
        .await
        .into_iter()
        .filter(|r| r["job"] == id)
        .map(|r| r["outcome"].clone())
        .collect();
    assert_eq!(outcomes, vec!["cancelled".to_string()]);
    assert_eq!(state(&tq, &id).await, ("cancelled".to_string(), 1));
    assert_eq!(tq.running().await.get("t").copied().unwrap_or(0), 0);
    drop(w);
    tq.cleanup().await;
}

/// `DELETE /v1/jobs/{id}` on a running job: 200 cancelled, the task gone
/// within a second; again: 409 not_cancellable.
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
        task_leaders(wpid).first().copied()
    })
    .await;
    let first = delete(id.clone()).await;
    assert!(
        first.starts_with("HTTP/1.0 200") || first.starts_with("HTTP/1.1 200"),
        "{first}"
    );
    assert!(first.contains(r#""state":"cancelled""#), "{first}");
    assert!(
        common::wait_dead(task as i32, Duration::from_secs(1)).await,
        "the task process outlived the cancel by more than 1 s"
    );
    let again = delete(id.clone()).await;
    assert!(
        again.contains(" 409 ") && again.contains("not_cancellable"),
        "{again}"
    );
    assert_eq!(state(&tq, &id).await, ("cancelled".to_string(), 1));
    stop.cancel();
    drop(w);
    tq.cleanup().await;
    db.cleanup().await;
}
