//! Job events end to end over real Redis, PostgreSQL and `agentq serve`:
//! what the scripts publish for every state change, their retention and the
//! per-queue switch; SSE for one job and for a tenant (resumed with
//! `Last-Event-ID`), the WebSocket, the long poll, and that a tenant sees
//! only its own events.

mod common;

use std::time::Duration;

use agentq::executor::Outcome;
use agentq::http::api::{ApiConfig, keys};
use agentq::model::job_event::{EventId, JobEvent, JobEventType as T};
use agentq::queue::JobSpec;
use common::{TestDb, TestQueue, claim, complete, done};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const LEASE: Duration = Duration::from_secs(30);
const WAIT: Duration = Duration::from_secs(10);

async fn events_of(tq: &TestQueue, tenant: &str) -> Vec<JobEvent> {
    tq.queue
        .job_events_after(tenant, EventId::START, 10_000)
        .await
        .expect("read events")
        .events
}

fn kinds_of(events: &[JobEvent], job: &str) -> Vec<T> {
    events
        .iter()
        .filter(|e| e.job == job)
        .map(|e| e.kind)
        .collect()
}

/// Claim everything ready on `q` and complete each job with `outcome`.
async fn run_all(tq: &TestQueue, q: &str, outcome: Outcome, result: Option<&str>) {
    let jobs = claim(&tq.queue, &[q], 100, LEASE).await;
    let acks: Vec<_> = jobs
        .iter()
        .map(|j| {
            let mut c = done(j, outcome);
            c.result = result.map(str::to_string);
            c.error = if outcome == Outcome::Succeeded {
                String::new()
            } else {
                "boom".into()
            };
            c
        })
        .collect();
    complete(&tq.queue, &acks).await;
}

#[tokio::test]
async fn every_state_change_is_one_event_in_order() {
    let tq = TestQueue::new("ev-order").await;
    let ok = tq.enqueue(&JobSpec::new("acme", "q", "echo")).await;
    run_all(&tq, "q", Outcome::Succeeded, Some(r#"{"answer":42}"#)).await;

    let mut retried = JobSpec::new("acme", "r", "echo");
    retried.max_attempts = Some(2);
    let twice = tq.enqueue(&retried).await;
    run_all(&tq, "r", Outcome::Failed, None).await;
    run_all(&tq, "r", Outcome::Failed, None).await;
    tq.queue
        .dead_jobs(true, "r", Some("acme"), Duration::ZERO, &[])
        .await
        .expect("retry dead");

    let mut later = JobSpec::new("acme", "d", "echo");
    later.delay = Some(Duration::from_secs(600));
    let delayed = tq.enqueue(&later).await;
    tq.queue.cancel(&delayed).await.expect("cancel");

    let running = tq.enqueue(&JobSpec::new("acme", "c", "echo")).await;
    let claimed = claim(&tq.queue, &["c"], 1, LEASE).await;
    assert!(
        tq.queue
            .report_progress(&running, claimed[0].attempt, r#"{"step":1}"#)
            .await
            .expect("progress")
    );
    tq.queue.cancel(&running).await.expect("cancel running");
    // The worker kills the attempt and reports it: closed as cancelled.
    complete(&tq.queue, &[done(&claimed[0], Outcome::Failed)]).await;
    assert!(
        !tq.queue
            .report_progress(&running, claimed[0].attempt, r#"{"step":2}"#)
            .await
            .expect("late progress"),
        "a report after the attempt ended is fenced out"
    );

    let ev = events_of(&tq, "acme").await;
    assert_eq!(kinds_of(&ev, &ok), [T::Enqueued, T::Started, T::Succeeded]);
    let done_ev = ev
        .iter()
        .find(|e| e.job == ok && e.kind == T::Succeeded)
        .expect("succeeded");
    assert_eq!(
        (done_ev.attempt, done_ev.result.clone()),
        (Some(1), Some(json!({"answer": 42})))
    );
    assert_eq!(
        kinds_of(&ev, &twice),
        [
            T::Enqueued,
            T::Started,
            T::Failed,
            T::Retrying,
            T::Started,
            T::Failed,
            T::Dead,
            T::Retrying
        ]
    );
    let failed = ev
        .iter()
        .find(|e| e.job == twice && e.kind == T::Failed)
        .expect("failed");
    assert_eq!(
        (failed.outcome.as_deref(), failed.error.as_deref()),
        (Some("failed"), Some("boom"))
    );
    assert_eq!(kinds_of(&ev, &delayed), [T::Enqueued, T::Cancelled]);
    assert!(
        ev.iter().any(|e| e.job == delayed && e.run_at.is_some()),
        "a delayed enqueue says when"
    );
    assert_eq!(
        kinds_of(&ev, &running),
        [T::Enqueued, T::Started, T::Progress, T::Cancelled]
    );
    let p = ev.iter().find(|e| e.kind == T::Progress).expect("progress");
    assert_eq!(p.progress, Some(json!({"step": 1})));
    // Positions only grow, and each event's time is its position's.
    let ids: Vec<EventId> = ev.iter().filter_map(|e| EventId::parse(&e.id)).collect();
    assert_eq!(ids.len(), ev.len());
    assert!(ids.windows(2).all(|w| w[0] < w[1]));
    assert!(
        ev.iter()
            .all(|e| EventId::parse(&e.id).is_some_and(|i| i.ms == e.at))
    );
    // Another tenant's stream holds none of them.
    assert!(events_of(&tq, "other").await.is_empty());
    tq.cleanup().await;
}

#[tokio::test]
async fn retention_is_bounded_and_a_queue_can_publish_nothing() {
    let tq = TestQueue::new("ev-retain").await;
    let c = tq.queue.client().clone();
    let defaults = tq.queue.keys(0).key(&["defaults"]);
    let _: () = fred::prelude::HashesInterface::hset(&c, &defaults, ("events_max", 50))
        .await
        .expect("set events_max");
    let specs: Vec<JobSpec> = (0..600)
        .map(|_| JobSpec::new("acme", "q", "echo"))
        .collect();
    tq.enqueue_all(&specs).await;
    let key = tq.queue.events_key("acme");
    let len: u64 = fred::prelude::StreamsInterface::xlen(&c, &key)
        .await
        .expect("xlen");
    // MAXLEN ~ trims whole stream nodes (100 entries each by default).
    assert!(
        (50..=250).contains(&len),
        "600 events kept {len} with events_max 50"
    );
    let ttl: i64 = fred::prelude::KeysInterface::pttl(&c, &key)
        .await
        .expect("pttl");
    assert!(
        ttl > 0 && ttl <= 3_600_000,
        "an idle stream expires: pttl {ttl}"
    );

    tq.queue.set_job_events("quiet", false).await.expect("off");
    assert!(!tq.queue.job_events_on("quiet").await.expect("read switch"));
    let quiet = tq.enqueue(&JobSpec::new("beta", "quiet", "echo")).await;
    run_all(&tq, "quiet", Outcome::Succeeded, None).await;
    assert!(
        events_of(&tq, "beta").await.is_empty(),
        "{quiet}: no events when off"
    );
    tq.queue.set_job_events("quiet", true).await.expect("on");
    let loud = tq.enqueue(&JobSpec::new("beta", "quiet", "echo")).await;
    assert_eq!(
        kinds_of(&events_of(&tq, "beta").await, &loud),
        [T::Enqueued]
    );
    tq.cleanup().await;
}

async fn start(tq: &TestQueue, db: &TestDb) -> (u16, CancellationToken) {
    start_with(tq, db, ApiConfig::default()).await
}

/// Serve with `cfg`, a request rate no test reaches.
async fn start_with(tq: &TestQueue, db: &TestDb, cfg: ApiConfig) -> (u16, CancellationToken) {
    let cfg = ApiConfig {
        tenant_rate: std::num::NonZeroU32::new(1000).expect("nonzero"),
        ..cfg
    };
    let port = agentq_servers::free_port().expect("port");
    let stop = CancellationToken::new();
    let (q, pool, s) = (tq.queue.clone(), db.pool.clone(), stop.clone());
    tokio::spawn(async move {
        agentq::http::api::serve(([127, 0, 0, 1], port).into(), q, pool, cfg, s).await
    });
    common::eventually(WAIT, "api listening", || async {
        agentq_servers::listening(&format!("127.0.0.1:{port}")).then_some(())
    })
    .await;
    (port, stop)
}

async fn post_job(port: u16, key: &str, queue: &str) -> String {
    let body = format!(r#"{{"queue":"{queue}","kind":"echo","payload":{{}}}}"#);
    let r = common::http::req(port, "POST", "/v1/jobs", Some(key), Some(&body)).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    r.body["id"].as_str().expect("id").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_follows_a_job_to_its_end_and_resumes_after_last_event_id() {
    let tq = TestQueue::new("ev-sse").await;
    let db = TestDb::new("ev_sse").await;
    let key = keys::create(&db.pool, "acme").await.expect("key").key;
    let (port, stop) = start(&tq, &db).await;
    let id = post_job(port, &key, "q").await;

    let path = format!("/v1/jobs/{id}/events");
    let mut s = common::sse::open(port, &path, Some(&key), &[]).await;
    assert_eq!(s.status, 200);
    let first = s.next(WAIT).await.expect("enqueued");
    assert_eq!(
        (first.event.as_str(), first.data["job"].as_str()),
        ("enqueued", Some(id.as_str()))
    );
    let claimed = claim(&tq.queue, &["q"], 1, LEASE).await;
    let started = s.next(WAIT).await.expect("started");
    assert_eq!(
        (started.event.as_str(), started.data["attempt"].as_u64()),
        ("started", Some(1))
    );
    let mut c = done(&claimed[0], Outcome::Succeeded);
    c.result = Some(r#"{"ok":true}"#.into());
    complete(&tq.queue, &[c]).await;
    let end = s.next(WAIT).await.expect("succeeded");
    assert_eq!(
        (end.event.as_str(), end.data["result"].clone()),
        ("succeeded", json!({"ok": true}))
    );
    assert!(
        s.next(WAIT).await.is_none(),
        "the stream ends after the job's end"
    );

    // Resumed after "started": only the end again, then it closes.
    let resume = format!("Last-Event-ID: {}", started.id);
    let mut again = common::sse::open(port, &path, Some(&key), &[&resume]).await;
    let only = again.next(WAIT).await.expect("succeeded again");
    assert_eq!(
        (only.event.as_str(), only.id.as_str()),
        ("succeeded", end.id.as_str())
    );
    assert!(again.next(WAIT).await.is_none());
    // A bad position is refused where it came in.
    let bad = common::http::req(
        port,
        "GET",
        &format!("{path}?after=yesterday"),
        Some(&key),
        None,
    )
    .await;
    assert_eq!((bad.status, bad.code()), (400, "invalid_request"));
    // A job whose queue publishes nothing still ends its stream (read from the job).
    tq.queue.set_job_events("quiet", false).await.expect("off");
    let quiet = post_job(port, &key, "quiet").await;
    let mut qs =
        common::sse::open(port, &format!("/v1/jobs/{quiet}/events"), Some(&key), &[]).await;
    run_all(&tq, "quiet", Outcome::Succeeded, None).await;
    let end = qs.next(WAIT).await.expect("the end, from the job record");
    assert_eq!(end.event, "succeeded");
    assert!(qs.next(WAIT).await.is_none());
    stop.cancel();
    tq.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_sees_only_its_own_events_over_sse_and_websocket() {
    use futures::StreamExt;
    let tq = TestQueue::new("ev-iso").await;
    let db = TestDb::new("ev_iso").await;
    let a = keys::create(&db.pool, "a").await.expect("key a").key;
    let b = keys::create(&db.pool, "b").await.expect("key b").key;
    let (port, stop) = start(&tq, &db).await;
    let mut b_sse = common::sse::open(port, "/v1/events", Some(&b), &[]).await;
    assert_eq!(b_sse.status, 200);
    let url = format!("ws://127.0.0.1:{port}/v1/ws?access_token={b}");
    let (mut b_ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("websocket");
    let (mut a_ws, _) =
        tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/v1/ws?access_token={a}"))
            .await
            .expect("websocket a");

    let a_job = post_job(port, &a, "q").await;
    let b_job = post_job(port, &b, "q").await;
    run_all(&tq, "q", Outcome::Succeeded, None).await;

    // b's SSE: exactly its job's three events.
    let mut seen = Vec::new();
    for _ in 0..3 {
        let e = b_sse.next(WAIT).await.expect("b event");
        seen.push((e.data["job"].as_str().unwrap_or("").to_string(), e.event));
    }
    assert_eq!(
        seen,
        [
            (b_job.clone(), "enqueued".into()),
            (b_job.clone(), "started".into()),
            (b_job.clone(), "succeeded".into())
        ]
    );
    // The same over the WebSocket, for each tenant.
    for (ws, job) in [(&mut b_ws, &b_job), (&mut a_ws, &a_job)] {
        let mut kinds = Vec::new();
        while kinds.len() < 3 {
            let m = tokio::time::timeout(WAIT, ws.next())
                .await
                .expect("ws in time")
                .expect("open")
                .expect("message");
            let Ok(text) = m.into_text() else { continue };
            let e: JobEvent = serde_json::from_str(&text).expect("a job event");
            assert_eq!(&e.job, job, "a tenant's socket carries only its jobs");
            kinds.push(e.kind);
        }
        assert_eq!(kinds, [T::Enqueued, T::Started, T::Succeeded]);
    }
    // Another tenant's job: refused before anything is read.
    let other = common::http::req(
        port,
        "GET",
        &format!("/v1/jobs/{a_job}/events"),
        Some(&b),
        None,
    )
    .await;
    assert_eq!((other.status, other.code()), (403, "forbidden"));
    let anon = common::http::req(port, "GET", "/v1/events", None, None).await;
    assert_eq!(anon.status, 401);
    stop.cancel();
    tq.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_long_poll_returns_when_the_job_ends_or_the_wait_runs_out() {
    let tq = TestQueue::new("ev-wait").await;
    let db = TestDb::new("ev_wait").await;
    let key = keys::create(&db.pool, "acme").await.expect("key").key;
    let (port, stop) = start(&tq, &db).await;
    let id = post_job(port, &key, "q").await;

    let path = format!("/v1/jobs/{id}?wait=30s");
    let k = key.clone();
    let poll =
        tokio::spawn(async move { common::http::req(port, "GET", &path, Some(&k), None).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!poll.is_finished(), "the poll waits while the job is ready");
    let asked = std::time::Instant::now();
    run_all(&tq, "q", Outcome::Succeeded, Some("7")).await;
    let r = poll.await.expect("poll task");
    assert_eq!(
        (r.status, r.body["state"].as_str(), r.body["result"].clone()),
        (200, Some("succeeded"), json!(7))
    );
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "answered at the end, not at the wait's end"
    );

    // A job that does not end: answered as it is when the wait runs out.
    let stuck = post_job(port, &key, "idle").await;
    let began = std::time::Instant::now();
    let r = common::http::req(
        port,
        "GET",
        &format!("/v1/jobs/{stuck}?wait=1s"),
        Some(&key),
        None,
    )
    .await;
    assert_eq!((r.status, r.body["state"].as_str()), (200, Some("ready")));
    assert!(began.elapsed() >= Duration::from_millis(900));
    let bad = common::http::req(
        port,
        "GET",
        &format!("/v1/jobs/{stuck}?wait=soon"),
        Some(&key),
        None,
    )
    .await;
    assert_eq!((bad.status, bad.code()), (400, "invalid_request"));
    stop.cancel();
    tq.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_cannot_hold_more_streams_than_its_share() {
    let tq = TestQueue::new("ev-cap").await;
    let db = TestDb::new("ev_cap").await;
    let a = keys::create(&db.pool, "a").await.expect("key a").key;
    let b = keys::create(&db.pool, "b").await.expect("key b").key;
    let cfg = ApiConfig {
        max_streams_per_tenant: 3,
        ..Default::default()
    };
    let (port, stop) = start_with(&tq, &db, cfg).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let s = common::sse::open(port, "/v1/events", Some(&a), &[]).await;
        assert_eq!(s.status, 200);
        held.push(s);
    }
    let over = common::http::req(port, "GET", "/v1/events", Some(&a), None).await;
    assert_eq!((over.status, over.code()), (429, "too_many_streams"));
    let id = post_job(port, &a, "q").await;
    let poll = common::http::req(
        port,
        "GET",
        &format!("/v1/jobs/{id}?wait=1s"),
        Some(&a),
        None,
    )
    .await;
    assert_eq!(
        (poll.status, poll.code()),
        (429, "too_many_streams"),
        "long polls count too"
    );
    // Another tenant is not affected; a closed stream gives its place back.
    assert_eq!(
        common::sse::open(port, "/v1/events", Some(&b), &[])
            .await
            .status,
        200
    );
    // The server learns a client left at its next write: a's next events.
    drop(held.pop());
    common::eventually(WAIT, "a place freed", || async {
        post_job(port, &a, "q").await;
        let s = common::sse::open(port, "/v1/events", Some(&a), &[]).await;
        (s.status == 200).then_some(())
    })
    .await;
    stop.cancel();
    tq.cleanup().await;
}

#[tokio::test]
async fn a_large_result_stays_on_the_job_not_in_every_stream_entry() {
    // A task may print a result of up to 1 MiB; kept in each of a tenant's
    // 10,000 retained events, that would be 10 GiB of Redis.
    let tq = TestQueue::new("ev-big").await;
    let small = tq.enqueue(&JobSpec::new("acme", "q", "echo")).await;
    let big = tq.enqueue(&JobSpec::new("acme", "q", "echo")).await;
    let jobs = claim(&tq.queue, &["q"], 10, LEASE).await;
    let large = format!("\"{}\"", "x".repeat(64 * 1024));
    let acks: Vec<_> = jobs
        .iter()
        .map(|j| {
            let mut c = done(j, Outcome::Succeeded);
            c.result = Some(if j.id == big {
                large.clone()
            } else {
                "1".into()
            });
            c
        })
        .collect();
    complete(&tq.queue, &acks).await;
    let ev = events_of(&tq, "acme").await;
    let end = |id: &str| {
        ev.iter()
            .find(|e| e.job == id && e.kind == T::Succeeded)
            .cloned()
            .expect("succeeded")
    };
    assert_eq!(
        (end(&small).result, end(&small).result_bytes),
        (Some(json!(1)), None)
    );
    let b = end(&big);
    assert_eq!(b.result, None, "a large result is left out of the event");
    assert_eq!(b.result_bytes, Some(large.len() as u64), "its size says so");
    let info = agentq::queue::inspect::job_info(&tq.queue, &big)
        .await
        .expect("job");
    assert_eq!(
        info.result,
        Some(json!("x".repeat(64 * 1024))),
        "the job keeps it"
    );
    tq.cleanup().await;
}
