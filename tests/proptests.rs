//! Property tests of the Redis job hash through the public API: a job body
//! with generated names, payload and options goes through the HTTP decoder
//! (`api::decode_jobs`), the enqueue script, then back out through both
//! decoders of the stored job: `inspect::job_info` (the hash as operators and
//! the API read it) and `Queue::claim` (the job as a worker receives it).
//! Every field must come back as sent, the payload byte for byte to the
//! worker. (The hash parser in `queue::job` is crate-private; this reaches
//! the same data through what the crate exports.)

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::TestQueue;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{Value, json};

/// Any JSON value without floats (their text form is serde_json's business,
/// not the queue's): nulls, booleans, integers of both signs, strings with
/// any characters, nested arrays and objects.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<String>().prop_map(Value::from),
        "[a-z\"\\\\/ ]{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 40, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map(any::<String>(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

#[derive(Debug, Clone)]
struct Case {
    tenant: String,
    queue: String,
    kind: String,
    payload: Option<Value>,
    timeout_ms: Option<u64>,
    memory: Option<u64>,
    priority: Option<i32>,
    max_attempts: Option<u32>,
    idempotency_key: Option<String>,
}

fn case() -> impl Strategy<Value = Case> {
    let name = "[A-Za-z0-9][A-Za-z0-9_.-]{0,40}";
    (
        (name, name, name),
        proptest::option::of(json_value()),
        proptest::option::of(1u64..=3_600_000),
        proptest::option::of(1u64..=(4 << 30)),
        proptest::option::of(-100i32..=100),
        proptest::option::of(1u32..=1000),
        proptest::option::of("[^\u{0}]{1,60}"),
    )
        .prop_map(
            |((tenant, queue, kind), payload, timeout_ms, memory, priority, max_attempts, idem)| {
                Case {
                    tenant,
                    queue,
                    kind,
                    payload,
                    timeout_ms,
                    memory,
                    priority,
                    max_attempts,
                    idempotency_key: idem,
                }
            },
        )
}

/// The case as an HTTP body; names made unique per run (each run's job is
/// the only one in its queue and its tenant's only running job).
fn body(c: &Case, n: u64) -> (String, Value) {
    let mut o = serde_json::Map::new();
    o.insert("queue".into(), json!(unique(&c.queue, n)));
    o.insert("kind".into(), json!(c.kind));
    if let Some(p) = &c.payload {
        o.insert("payload".into(), p.clone());
    }
    if let Some(t) = c.timeout_ms {
        o.insert("timeout".into(), json!(format!("{t}ms")));
    }
    if let Some(m) = c.memory {
        o.insert("memory".into(), json!(agentq::model::units::format_size(m)));
    }
    if let Some(p) = c.priority {
        o.insert("priority".into(), json!(p));
    }
    if let Some(a) = c.max_attempts {
        o.insert("max_attempts".into(), json!(a));
    }
    if let Some(k) = &c.idempotency_key {
        o.insert("idempotency_key".into(), json!(format!("{n}:{k}")));
    }
    (unique(&c.tenant, n), Value::Object(o))
}

fn unique(name: &str, n: u64) -> String {
    format!("{name}-{n}")
}

async fn round_trip(tq: &TestQueue, c: &Case, n: u64) -> Result<(), TestCaseError> {
    let (tenant, body) = body(c, n);
    let agentq::http::api::Decoded { specs, batch } =
        agentq::http::api::decode_jobs(&tenant, body.to_string().as_bytes())
            .map_err(|e| TestCaseError::fail(format!("decode refused {body}: {e:?}")))?;
    prop_assert!(!batch);
    let spec = &specs[0];
    let e = tq
        .queue
        .enqueue(spec)
        .await
        .map_err(|e| TestCaseError::fail(format!("enqueue refused {body}: {e}")))?;
    prop_assert!(e.created);

    let sent_payload = c.payload.clone().unwrap_or_else(|| json!({}));
    let info = agentq::queue::inspect::job_info(&tq.queue, &e.id)
        .await
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(&info.id, &e.id);
    prop_assert_eq!(&info.tenant, &tenant);
    prop_assert_eq!(&info.queue, &spec.queue);
    prop_assert_eq!(&info.kind, &c.kind);
    prop_assert_eq!(info.state.as_str(), "ready");
    prop_assert_eq!(info.attempts, 0);
    prop_assert_eq!(info.max_attempts, u64::from(c.max_attempts.unwrap_or(3)));
    prop_assert_eq!(info.priority, i64::from(c.priority.unwrap_or(0)));
    prop_assert_eq!(info.timeout_ms, c.timeout_ms.unwrap_or(0));
    prop_assert_eq!(info.memory, c.memory.unwrap_or(0));
    prop_assert_eq!(
        info.idempotency_key,
        c.idempotency_key.as_ref().map(|k| format!("{n}:{k}"))
    );
    prop_assert_eq!(&info.payload, &sent_payload);
    prop_assert!(info.enqueued_at.is_some() && info.started_at.is_none());

    let p = tq.queue.partition_of_job(&e.id).expect("partition");
    let claimed = tq
        .queue
        .claim(
            p,
            &agentq::queue::Call::new("proptest"),
            4,
            Duration::from_secs(60),
            std::slice::from_ref(&spec.queue),
        )
        .await
        .map_err(|e| TestCaseError::fail(e.to_string()))?
        .jobs;
    prop_assert_eq!(claimed.len(), 1, "the only job in its queue");
    let j = &claimed[0];
    prop_assert_eq!(&j.id, &e.id);
    prop_assert_eq!(j.attempt, 1);
    prop_assert_eq!(&j.tenant, &tenant);
    prop_assert_eq!(&j.queue, &spec.queue);
    prop_assert_eq!(&j.kind, &c.kind);
    prop_assert_eq!(&j.payload, &spec.payload, "the payload text, byte for byte");
    prop_assert_eq!(
        serde_json::from_str::<Value>(&j.payload).ok(),
        Some(sent_payload)
    );
    prop_assert_eq!(j.timeout_ms, c.timeout_ms.unwrap_or(0));
    prop_assert_eq!(j.memory, c.memory.unwrap_or(0));
    Ok(())
}

#[test]
fn jobs_read_back_from_redis_as_sent() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let tq = rt.block_on(TestQueue::new("proptest-job"));
    let cases: u32 = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let n = AtomicU64::new(0);
    let result = runner.run(&case(), |c| {
        rt.block_on(round_trip(&tq, &c, n.fetch_add(1, Ordering::Relaxed)))
    });
    rt.block_on(tq.cleanup());
    if let Err(e) = result {
        panic!("{e}");
    }
}
