//! Per-tenant recurring schedules against the real Redis: each slot fires
//! once fleet-wide however many duties run, a fire call repeated after a
//! lost reply enqueues nothing more, the missed-slot policies, and the CLI
//! and HTTP ways to manage them. (The cron/time-zone arithmetic, DST
//! included, is unit-tested in src/queue/schedules.rs.)

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use agentq::duties::schedules::{Schedules, SchedulesConfig};
use agentq::queue::Queue;
use agentq::queue::schedules::{FirePlan, Missed, Recurrence, ScheduleSpec};
use common::TestQueue;
use fred::prelude::*;

/// The ids of `tenant`'s ready jobs in `queue`, and the slot (ms) each was
/// fired for (from its idempotency key `schedule:<name>:<slot>`).
async fn scheduled_jobs(tq: &TestQueue, queue: &str, tenant: &str) -> Vec<(String, i64)> {
    let k = tq.queue.keys(tq.queue.partition_of(tenant));
    let ids: Vec<String> = tq
        .queue
        .client()
        .zrange(
            k.key(&["q", queue, "t", tenant]),
            0,
            -1,
            None,
            false,
            None,
            false,
        )
        .await
        .expect("zrange");
    let mut out = Vec::new();
    for id in ids {
        let idem: Option<String> = tq
            .queue
            .client()
            .hget(k.job(&id), "idem")
            .await
            .expect("hget");
        let slot = idem
            .as_deref()
            .and_then(|s| s.rsplit(':').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or(-1);
        out.push((id, slot));
    }
    out.sort_by_key(|(_, s)| *s);
    out
}

async fn redis_now_ms(q: &Queue) -> i64 {
    q.server_time().await.expect("TIME").timestamp_millis()
}

/// Set a schedule's next-due slot directly (as if nothing ran since then).
async fn set_next_due(tq: &TestQueue, tenant: &str, name: &str, ms: i64) {
    let k = tq.queue.keys(tq.queue.partition_of(tenant));
    let _: i64 = tq
        .queue
        .client()
        .zadd(
            k.key(&["schedules"]),
            None,
            None,
            false,
            false,
            (ms as f64, format!("{tenant}:{name}")),
        )
        .await
        .expect("zadd");
}

#[tokio::test]
async fn three_duties_fire_each_slot_of_an_every_second_schedule_once() {
    let tq = TestQueue::new("sched-three").await;
    let every = Recurrence::every(Duration::from_secs(1)).unwrap();
    let spec = ScheduleSpec::new("acme", "tick", every, "q", "noop");
    let added = tq.queue.add_schedule(&spec).await.expect("add");
    assert_eq!(added.next_due_ms % 1000, 0, "slots are whole seconds");

    // Three duties, each on its own connection, racing for ~4 s.
    let until = Instant::now() + Duration::from_millis(4200);
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let q = Queue::connect(tq.queue.config().clone())
            .await
            .expect("connect");
        tasks.push(tokio::spawn(async move {
            let duty = Schedules::new(q, SchedulesConfig::default());
            let mut fired = Vec::new();
            while Instant::now() < until {
                fired.extend(duty.run_once().await.expect("run_once").fired);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            fired
        }));
    }
    let mut fired = Vec::new();
    for t in tasks {
        fired.extend(t.await.unwrap());
    }
    assert!(tq.queue.remove_schedule("acme", "tick").await.unwrap());

    let jobs = scheduled_jobs(&tq, "q", "acme").await;
    let slots: Vec<i64> = jobs.iter().map(|(_, s)| *s).collect();
    assert!(jobs.len() >= 3, "about 4 slots in 4 s: {slots:?}");
    assert_eq!(
        fired.len(),
        jobs.len(),
        "every fired job reported once: {fired:?}"
    );
    assert_eq!(
        slots[0], added.next_due_ms,
        "the first slot is the first after the add"
    );
    for w in slots.windows(2) {
        assert_eq!(w[1] - w[0], 1000, "distinct, consecutive slots: {slots:?}");
    }
    // the jobs are ordinary jobs: counted as ready like an enqueue's
    let stats: HashMap<String, i64> = tq
        .queue
        .client()
        .hgetall(tq.queue.keys(0).key(&["q", "q", "stats"]))
        .await
        .unwrap();
    assert_eq!(stats.get("ready").copied(), Some(jobs.len() as i64));
    tq.cleanup().await;
}

#[tokio::test]
async fn a_fire_call_repeated_after_a_lost_reply_enqueues_nothing_more() {
    let tq = TestQueue::new("sched-repeat").await;
    let hourly = Recurrence::every(Duration::from_secs(3600)).unwrap();
    tq.queue
        .add_schedule(&ScheduleSpec::new("acme", "hourly", hourly, "q", "noop"))
        .await
        .unwrap();
    let now = redis_now_ms(&tq.queue).await;
    let slot = now - now % 3_600_000; // the latest hour, already past
    set_next_due(&tq, "acme", "hourly", slot).await;
    let plan = vec![FirePlan {
        member: "acme:hourly".into(),
        expected: slot,
        fire: Some(slot),
        next: slot + 3_600_000,
    }];
    let p = tq.queue.partition_of("acme");
    let first = tq.queue.fire_schedules(p, &plan).await.unwrap();
    assert_eq!(first[0].status, "fired");
    let job = first[0].job.clone().expect("a job");
    // The reply was lost: the caller repeats the same call.
    let again = tq.queue.fire_schedules(p, &plan).await.unwrap();
    assert_eq!(again[0].status, "moved", "{again:?}");
    assert_eq!(again[0].job, None);
    let jobs = scheduled_jobs(&tq, "q", "acme").await;
    assert_eq!(jobs, vec![(job.clone(), slot)]);
    let s = tq.queue.schedule("acme", "hourly").await.unwrap().unwrap();
    assert_eq!(s.next_due_ms, slot + 3_600_000);
    assert_eq!((s.fired, s.last_job.as_deref()), (1, Some(job.as_str())));

    // Even a replaced schedule put back on the same slot cannot fire it
    // twice: the job's idempotency key (schedule, slot) answers.
    let hourly = Recurrence::every(Duration::from_secs(3600)).unwrap();
    tq.queue
        .add_schedule(&ScheduleSpec::new("acme", "hourly", hourly, "q", "noop"))
        .await
        .unwrap();
    set_next_due(&tq, "acme", "hourly", slot).await;
    let third = tq.queue.fire_schedules(p, &plan).await.unwrap();
    assert_eq!(third[0].status, "fired");
    assert_eq!(third[0].job.as_deref(), Some(job.as_str()));
    assert_eq!(scheduled_jobs(&tq, "q", "acme").await.len(), 1);

    // A slot not yet due by Redis's clock does not fire.
    let later = slot + 3_600_000;
    let early = vec![FirePlan {
        member: "acme:hourly".into(),
        expected: later,
        fire: Some(later),
        next: later + 3_600_000,
    }];
    set_next_due(&tq, "acme", "hourly", later).await;
    assert_eq!(
        tq.queue.fire_schedules(p, &early).await.unwrap()[0].status,
        "early"
    );
    tq.cleanup().await;
}

#[tokio::test]
async fn missed_slots_skip_fires_none_and_once_fires_one() {
    let tq = TestQueue::new("sched-missed").await;
    for (name, missed) in [("skipper", Missed::Skip), ("oncer", Missed::Once)] {
        let mut spec = ScheduleSpec::new(
            "acme",
            name,
            Recurrence::every(Duration::from_secs(3600)).unwrap(),
            name,
            "noop",
        );
        spec.missed = missed;
        tq.queue.add_schedule(&spec).await.unwrap();
    }
    // Stay clear of an hour boundary (the grace below is 1 s).
    while redis_now_ms(&tq.queue).await % 3_600_000 < 2_000 {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let now = redis_now_ms(&tq.queue).await;
    let hour = now - now % 3_600_000; // the latest slot: missed (over 1 s old)
    for name in ["skipper", "oncer"] {
        set_next_due(&tq, "acme", name, hour - 10 * 3_600_000).await;
    }
    let duty = Schedules::new(
        tq.queue.clone(),
        SchedulesConfig {
            grace: Duration::from_secs(1),
            ..SchedulesConfig::default()
        },
    );
    let pass = duty.run_once().await.unwrap();
    assert_eq!((pass.fired.len(), pass.skipped), (1, 1), "{pass:?}");

    // skip: no job for the 11 missed slots; next due is the next hour
    assert!(scheduled_jobs(&tq, "skipper", "acme").await.is_empty());
    let s = tq.queue.schedule("acme", "skipper").await.unwrap().unwrap();
    assert_eq!((s.next_due_ms, s.fired), (hour + 3_600_000, 0));
    // once: one job, for the latest missed slot; next due the next hour
    let jobs = scheduled_jobs(&tq, "oncer", "acme").await;
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(jobs[0].1, hour);
    let s = tq.queue.schedule("acme", "oncer").await.unwrap().unwrap();
    assert_eq!((s.next_due_ms, s.fired), (hour + 3_600_000, 1));

    // a second pass finds nothing due
    let pass = duty.run_once().await.unwrap();
    assert!(pass.fired.is_empty() && pass.skipped == 0, "{pass:?}");
    tq.cleanup().await;
}

#[tokio::test]
async fn a_slot_the_tenants_caps_refuse_fires_no_job_and_says_why() {
    let tq = TestQueue::new("sched-cap").await;
    let mut spec = ScheduleSpec::new(
        "acme",
        "big",
        Recurrence::every(Duration::from_secs(3600)).unwrap(),
        "q",
        "noop",
    );
    spec.timeout = Some(Duration::from_secs(400 * 86_400));
    tq.queue.add_schedule(&spec).await.unwrap();
    let now = redis_now_ms(&tq.queue).await;
    let slot = now - now % 3_600_000;
    set_next_due(&tq, "acme", "big", slot).await;
    let plan = vec![FirePlan {
        member: "acme:big".into(),
        expected: slot,
        fire: Some(slot),
        next: slot + 3_600_000,
    }];
    let r = tq.queue.fire_schedules(0, &plan).await.unwrap();
    assert_eq!(r[0].status, "refused", "{r:?}");
    assert!(scheduled_jobs(&tq, "q", "acme").await.is_empty());
    let s = tq.queue.schedule("acme", "big").await.unwrap().unwrap();
    assert!(s.last_error.unwrap().contains("max_timeout"));
    assert_eq!(
        s.next_due_ms,
        slot + 3_600_000,
        "the schedule does not stall"
    );
    tq.cleanup().await;
}

#[tokio::test]
async fn schedules_live_in_their_tenants_partition() {
    let tq = TestQueue::with_partitions("sched-parts", 4).await;
    let tenants = ["t0", "t1", "t2", "t3", "t4", "t5"];
    for t in tenants {
        let spec = ScheduleSpec::new(
            t,
            "tick",
            Recurrence::every(Duration::from_secs(1)).unwrap(),
            "q",
            "noop",
        );
        tq.queue.add_schedule(&spec).await.unwrap();
    }
    let duty = Schedules::new(tq.queue.clone(), SchedulesConfig::default());
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < tenants.len() && Instant::now() < deadline {
        duty.run_once().await.unwrap();
        for t in tenants {
            if !scheduled_jobs(&tq, "q", t).await.is_empty() {
                seen.insert(t);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        seen.len(),
        tenants.len(),
        "every tenant's schedule fired: {seen:?}"
    );
    let all = tq.queue.schedules(None).await.unwrap();
    assert_eq!(all.len(), tenants.len());
    assert_eq!(tq.queue.schedules(Some("t3")).await.unwrap().len(), 1);
    tq.cleanup().await;
}

#[tokio::test]
async fn cli_add_list_rm_round_trip_with_json() {
    let tq = TestQueue::new("sched-cli").await;
    let (code, out, err) = tq.cli(&[
        "schedule",
        "add",
        "--tenant",
        "acme",
        "--name",
        "morning",
        "--cron",
        "0 9 * * MON-FRI",
        "--tz",
        "Europe/Paris",
        "--queue",
        "q",
        "--kind",
        "noop",
        "--payload",
        r#"{"a":1}"#,
        "--missed",
        "once",
        "--max-attempts",
        "2",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let added: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(added["cron"], "0 9 * * MON-FRI");
    assert_eq!(added["tz"], "Europe/Paris");
    assert_eq!(added["missed"], "once");
    assert_eq!(added["max_attempts"], 2);
    assert_eq!(added["payload"]["a"], 1);
    // next due: 09:00 in Paris, shown in UTC and in the zone
    let local = added["next_due_local"].as_str().unwrap();
    assert!(local.contains("T09:00:00.000+0"), "{local}");
    assert!(added["next_due"].as_str().unwrap().ends_with('Z'));

    let (code, _, err) = tq.cli(&[
        "schedule", "add", "--tenant", "other", "--name", "tick", "--every", "5m", "--queue", "q",
        "--kind", "noop",
    ]);
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = tq.cli(&["schedule", "list", "--json"]);
    assert_eq!(code, 0);
    let all: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let names: Vec<(&str, &str)> = all
        .iter()
        .map(|s| (s["tenant"].as_str().unwrap(), s["name"].as_str().unwrap()))
        .collect();
    assert_eq!(names, vec![("acme", "morning"), ("other", "tick")]);
    assert_eq!(all[1]["every_ms"], 300_000);
    let (_, out, _) = tq.cli(&["schedule", "list", "--tenant", "acme", "--json"]);
    let mine: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(mine.len(), 1);
    let (code, out, _) = tq.cli(&["schedule", "list"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("NEXT DUE (LOCAL)") && out.contains("Europe/Paris"),
        "{out}"
    );

    // bad input: exit 2, one clear line, nothing written
    let (code, _, err) = tq.cli(&[
        "schedule",
        "add",
        "--tenant",
        "acme",
        "--name",
        "bad",
        "--cron",
        "61 * * * *",
        "--queue",
        "q",
        "--kind",
        "noop",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("bad cron expression"), "{err}");
    let (code, _, err) = tq.cli(&[
        "schedule",
        "add",
        "--tenant",
        "acme",
        "--name",
        "bad",
        "--cron",
        "0 9 * * *",
        "--tz",
        "Europe/Atlantis",
        "--queue",
        "q",
        "--kind",
        "noop",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("unknown time zone"), "{err}");
    assert_eq!(tq.queue.schedules(None).await.unwrap().len(), 2);

    let (code, out, _) = tq.cli(&["schedule", "rm", "--tenant", "acme", "--name", "morning"]);
    assert_eq!(code, 0);
    assert!(out.contains("removed"));
    let (code, _, err) = tq.cli(&["schedule", "rm", "--tenant", "acme", "--name", "morning"]);
    assert_eq!(code, 2, "{err}");
    let (_, out, _) = tq.cli(&["schedule", "list", "--json"]);
    let left: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(left.len(), 1);
    tq.cleanup().await;
}

/// One request as tenant `key`; (status, JSON body).
async fn http(
    port: u16,
    method: &str,
    path: &str,
    key: &str,
    body: Option<&str>,
) -> (u16, serde_json::Value) {
    let r = common::http::req(port, method, path, Some(key), body).await;
    (r.status, r.body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_tenants_see_and_delete_only_their_own_schedules() {
    use agentq::http::api::{ApiConfig, keys};
    let tq = TestQueue::new("sched-http").await;
    let db = common::TestDb::new("sched_http").await;
    let a = keys::create(&db.pool, "a").await.expect("key a").key;
    let b = keys::create(&db.pool, "b").await.expect("key b").key;
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
    common::eventually(Duration::from_secs(10), "api listening", || async {
        agentq_servers::listening(&format!("127.0.0.1:{port}")).then_some(())
    })
    .await;

    let body = r#"{"name":"daily","cron":"30 6 * * *","tz":"America/New_York","queue":"q","kind":"noop","payload":{"x":[1,2]},"missed":"once"}"#;
    let (st, made) = http(port, "POST", "/v1/schedules", &a, Some(body)).await;
    assert_eq!(st, 201, "{made}");
    assert_eq!(
        (made["tenant"].as_str(), made["payload"]["x"][1].as_i64()),
        (Some("a"), Some(2))
    );
    assert!(
        made["next_due_local"]
            .as_str()
            .unwrap()
            .contains("T06:30:00.000-0")
    );
    let (st, _) = http(
        port,
        "POST",
        "/v1/schedules",
        &b,
        Some(r#"{"name":"tick","every":"1m","queue":"q","kind":"noop"}"#),
    )
    .await;
    assert_eq!(st, 201);
    // bad input: 400 with the reason
    let (st, e) = http(
        port,
        "POST",
        "/v1/schedules",
        &a,
        Some(r#"{"name":"x","cron":"0 9 * * *","tz":"Nowhere/Land","queue":"q","kind":"noop"}"#),
    )
    .await;
    assert_eq!(st, 400);
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("time zone"),
        "{e}"
    );
    let (st, _) = http(
        port,
        "POST",
        "/v1/schedules",
        &a,
        Some(r#"{"name":"x","every":"1m","queue":"q","kind":"noop","tenant":"b"}"#),
    )
    .await;
    assert_eq!(st, 400, "the tenant comes from the key");

    // each sees only its own
    let (st, list) = http(port, "GET", "/v1/schedules", &a, None).await;
    assert_eq!(st, 200);
    let names: Vec<&str> = list["schedules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["daily"]);
    let (_, list) = http(port, "GET", "/v1/schedules", &b, None).await;
    assert_eq!(list["schedules"].as_array().unwrap().len(), 1);
    assert_eq!(list["schedules"][0]["name"], "tick");

    // another tenant's name is not found, and stays
    let (st, e) = http(port, "DELETE", "/v1/schedules/tick", &a, None).await;
    assert_eq!((st, e["error"]["code"].as_str()), (404, Some("not_found")));
    assert!(tq.queue.schedule("b", "tick").await.unwrap().is_some());
    let (st, _) = http(port, "DELETE", "/v1/schedules/daily", &b, None).await;
    assert_eq!(st, 404);
    // the owner deletes it
    let (st, gone) = http(port, "DELETE", "/v1/schedules/daily", &a, None).await;
    assert_eq!((st, gone["deleted"].as_bool()), (200, Some(true)));
    assert!(tq.queue.schedule("a", "daily").await.unwrap().is_none());
    let (st, _) = http(port, "DELETE", "/v1/schedules/daily", &a, None).await;
    assert_eq!(st, 404);
    stop.cancel();
    db.cleanup().await;
    tq.cleanup().await;
}

#[test]
fn the_duty_config_has_documented_defaults_and_rejects_what_it_cannot_use() {
    let d = SchedulesConfig::default();
    assert_eq!(
        (d.interval, d.batch, d.grace),
        (Duration::from_secs(1), 100, Duration::from_secs(60))
    );
    assert!(d.validate().is_ok());
    for bad in [
        SchedulesConfig {
            interval: Duration::ZERO,
            ..d.clone()
        },
        SchedulesConfig {
            batch: 0,
            ..d.clone()
        },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
}

/// A schedule made while its queue and kind were allowed keeps its slots
/// from enqueueing forbidden jobs once the tenant is restricted
/// (`agentq tenant set --allowed-queues/--allowed-kinds`): the slot is
/// skipped, the schedule says why (`last_error`), the pass counts it, and
/// the schedule moves on; lifted, it fires again.
#[tokio::test]
async fn a_slot_for_a_queue_or_kind_the_tenant_may_no_longer_use_fires_no_job_and_says_why() {
    let tq = TestQueue::new("sched-allowed").await;
    let spec = ScheduleSpec::new(
        "acme",
        "rep",
        Recurrence::every(Duration::from_secs(3600)).unwrap(),
        "q",
        "noop",
    );
    tq.queue.add_schedule(&spec).await.unwrap();
    // A grace over an hour: this hour's slot is late, not missed.
    let duty = Schedules::new(
        tq.queue.clone(),
        SchedulesConfig {
            grace: Duration::from_secs(7200),
            ..SchedulesConfig::default()
        },
    );
    let now = redis_now_ms(&tq.queue).await;
    let hour = now - now % 3_600_000;
    let guard = tq.queue.keys(0).key(&["schedtick"]);
    for (flag, list, says) in [
        ("--allowed-queues", "other", "queue q"),
        ("--allowed-kinds", "echo", "kind noop"),
    ] {
        let (code, _, err) = tq.cli(&["tenant", "set", "acme", flag, list]);
        assert_eq!(code, 0, "{err}");
        set_next_due(&tq, "acme", "rep", hour).await;
        let _: i64 = tq.queue.client().del(&guard).await.unwrap();
        let pass = duty.run_once().await.unwrap();
        assert!(pass.fired.is_empty(), "{pass:?}");
        assert_eq!(pass.forbidden, 1, "{pass:?}");
        assert!(scheduled_jobs(&tq, "q", "acme").await.is_empty());
        let s = tq.queue.schedule("acme", "rep").await.unwrap().unwrap();
        let why = s.last_error.unwrap_or_default();
        assert!(
            why.contains(says) && why.contains("not allowed"),
            "{flag}: {why}"
        );
        assert_eq!(s.next_due_ms, hour + 3_600_000, "moved on, not stalled");
        // lift it again for the next round
        let (code, _, err) = tq.cli(&["tenant", "set", "acme", flag, "*"]);
        assert_eq!(code, 0, "{err}");
    }
    // Allowed again (listed, or no restriction): the slot fires.
    let (code, _, err) = tq.cli(&["tenant", "set", "acme", "--allowed-queues", "q,other"]);
    assert_eq!(code, 0, "{err}");
    set_next_due(&tq, "acme", "rep", hour).await;
    let _: i64 = tq.queue.client().del(&guard).await.unwrap();
    let pass = duty.run_once().await.unwrap();
    assert_eq!((pass.fired.len(), pass.forbidden), (1, 0), "{pass:?}");
    let s = tq.queue.schedule("acme", "rep").await.unwrap().unwrap();
    assert_eq!(s.last_error, None);
    tq.cleanup().await;
}

/// Commands `client`'s server ran since the last reset (`CONFIG
/// RESETSTAT`), those inside scripts included, but not the `INFO` that
/// reads them; and how many of them were script calls (`EVALSHA`).
async fn calls_since_reset(client: &fred::clients::Client) -> (u64, u64) {
    let info: String = client
        .custom(fred::cmd!("INFO"), vec!["commandstats"])
        .await
        .expect("INFO");
    let calls = |l: &str| -> u64 {
        l.split("calls=")
            .nth(1)
            .and_then(|c| c.split(',').next())
            .and_then(|c| c.parse().ok())
            .unwrap_or(0)
    };
    let lines: Vec<&str> = info.lines().filter(|l| l.starts_with("cmdstat_")).collect();
    let all = lines
        .iter()
        .filter(|l| !l.starts_with("cmdstat_info:") && !l.starts_with("cmdstat_config"))
        .map(|l| calls(l))
        .sum();
    let scripts = lines
        .iter()
        .filter(|l| l.starts_with("cmdstat_evalsha:"))
        .map(|l| calls(l))
        .sum();
    (all, scripts)
}

/// The pass every worker ran on every partition every second before the
/// fleet-wide tick guard (the duty's old `partition_once`, from the public
/// pieces): the baseline the guarded duty is measured against.
async fn unguarded_pass(q: &Queue, grace_ms: i64) -> Vec<String> {
    let mut fired = Vec::new();
    for p in 0..q.partitions() {
        for _ in 0..16 {
            let now = redis_now_ms(q).await;
            let due = q.due_schedules(p, now, 100).await.unwrap();
            let plans: Vec<FirePlan> = due
                .iter()
                .filter_map(|s| {
                    let r = s.recurrence().ok()?;
                    let (fire, next) =
                        agentq::queue::schedules::plan(&r, s.missed, s.next_due_ms, now, grace_ms)?;
                    Some(FirePlan {
                        member: format!("{}:{}", s.tenant, s.name),
                        expected: s.next_due_ms,
                        fire,
                        next,
                    })
                })
                .collect();
            if plans.is_empty() {
                break;
            }
            let got = q.fire_schedules(p, &plans).await.unwrap();
            let progressed = got
                .iter()
                .any(|f| f.status == "fired" || f.status == "skipped");
            fired.extend(
                got.into_iter()
                    .filter(|f| f.status == "fired")
                    .filter_map(|f| f.job),
            );
            if !progressed {
                break;
            }
        }
    }
    fired
}

/// N workers' schedules duties over 4 partitions on a private Redis (so
/// the command counts are theirs alone): before, every duty ran the whole
/// pass on every partition every second; now one duty per partition per
/// tick does (a fleet-wide SET NX PX guard), the others pay one SET.
/// Measured idle (hourly schedules, none due) and busy (8 schedules every
/// second) and printed, no timing assert (a note, quoted in the README);
/// checks that every slot fired exactly once fleet-wide.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_duties_share_each_partitions_tick_and_fire_each_slot_once() {
    let Ok(redis) = agentq_servers::PrivateRedis::start(&[]) else {
        eprintln!("no redis-server to start: skipped");
        return;
    };
    let mut cfg = agentq::queue::QueueConfig::new(redis.url());
    cfg.namespace = common::namespace("sched-load");
    cfg.partitions = 4;
    let q = Queue::connect(cfg.clone()).await.expect("connect");
    let tenants: Vec<String> = (0..8).map(|i| format!("t{i}")).collect();
    const N: usize = 4;
    let run_for = Duration::from_secs(3);
    let mut queues = Vec::new();
    for _ in 0..N {
        queues.push(Queue::connect(cfg.clone()).await.expect("connect"));
    }
    let mut fired_all: Vec<String> = Vec::new();
    let mut notes = Vec::new();
    for (busy, guarded) in [(false, false), (false, true), (true, false), (true, true)] {
        let every = if busy { 1 } else { 3600 };
        for t in &tenants {
            let spec = ScheduleSpec::new(
                t,
                "tick",
                Recurrence::every(Duration::from_secs(every)).unwrap(),
                "q",
                "noop",
            );
            if !busy || !guarded {
                // (re)placed when the load changes; the busy guarded phase
                // goes on from where the busy unguarded one stopped
                q.add_schedule(&spec).await.unwrap();
            }
        }
        let _: String = q
            .client()
            .custom(fred::cmd!("CONFIG"), vec!["RESETSTAT"])
            .await
            .expect("resetstat");
        let started = Instant::now();
        let mut tasks = Vec::new();
        for wq in &queues {
            let wq = wq.clone();
            tasks.push(tokio::spawn(async move {
                let duty = Schedules::new(wq.clone(), SchedulesConfig::default());
                let mut fired = Vec::new();
                while started.elapsed() < run_for {
                    if guarded {
                        fired.extend(duty.run_once().await.expect("run_once").fired);
                    } else {
                        fired.extend(unguarded_pass(&wq, 60_000).await);
                    }
                    tokio::time::sleep(duty.config.interval).await;
                }
                fired
            }));
        }
        for t in tasks {
            fired_all.extend(t.await.unwrap());
        }
        let secs = started.elapsed().as_secs_f64();
        let (all, scripts) = calls_since_reset(q.client()).await;
        let note = format!(
            "{N} workers, 4 partitions, 8 schedules {}, {}: {:.1} Redis commands/s ({:.1} schedule_fire calls/s)",
            if busy {
                "every 1 s"
            } else {
                "hourly (none due)"
            },
            if guarded {
                "tick guard (now)"
            } else {
                "every worker every partition (before)"
            },
            all as f64 / secs,
            scripts as f64 / secs,
        );
        eprintln!("{note}");
        notes.push(note);
    }
    // Each slot fired once fleet-wide: no job reported twice, one job per
    // (tenant, slot), consecutive slots.
    let mut unique = fired_all.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), fired_all.len(), "a job fired twice");
    let mut total = 0;
    for t in &tenants {
        let k = q.keys(q.partition_of(t));
        let ids: Vec<String> = q
            .client()
            .zrange(k.key(&["q", "q", "t", t]), 0, -1, None, false, None, false)
            .await
            .unwrap();
        total += ids.len();
        let mut slots = Vec::new();
        for id in &ids {
            let idem: String = q.client().hget(k.job(id), "idem").await.unwrap();
            slots.push(idem.rsplit(':').next().unwrap().parse::<i64>().unwrap());
        }
        slots.sort();
        let busy: Vec<i64> = slots
            .iter()
            .copied()
            .filter(|s| s % 3_600_000 != 0)
            .collect();
        assert!(busy.len() >= 4, "{t}: about 6 slots in 6 s: {slots:?}");
        for w in busy.windows(2) {
            assert_eq!(w[1] - w[0], 1000, "{t}: every slot once: {slots:?}");
        }
    }
    assert_eq!(total, fired_all.len(), "every job fired was reported once");
    drop(redis);
}
