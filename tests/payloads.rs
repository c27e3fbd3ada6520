//! The enqueue script (what a client in another language calls) and the
//! Rust check (`agentq::queue::payload::check`, used by the CLI, the HTTP
//! API and the Rust client) accept exactly the same payloads, and the
//! worker reads every accepted one: shared vectors, hand-written and
//! generated. Also: the script refuses a tenant sent to the wrong partition.

mod common;

use agentq::queue::{JobSpec, Queue, QueueConfig, ScriptName, payload, script_source};
use common::TestQueue;
use fred::prelude::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

/// Call the published enqueue script the way a foreign client does, with
/// one job of `tenant` and `payload` sent to partition `p`.
async fn raw_enqueue(q: &Queue, p: u32, tenant: &str, payload: &[u8]) -> Result<Value, String> {
    let args: Vec<Value> = vec![
        "1".into(),
        tenant.into(),
        "q".into(),
        "noop".into(),
        Value::Bytes(payload.to_vec().into()),
        "0".into(),
        "0".into(),
        "0".into(),
        "0".into(),
        "0".into(),
        "".into(),
    ];
    q.client()
        .eval::<Value, _, _, _>(script_source(ScriptName::Enqueue), q.keys(p).base(), args)
        .await
        .map_err(|e| e.details().to_string())
}

/// Whether the script takes `payload` (and, if so, that the worker can read
/// what it stored).
async fn script_accepts(q: &Queue, payload: &[u8]) -> bool {
    match raw_enqueue(q, 0, "t", payload).await {
        Ok(_) => true,
        Err(e) => {
            assert!(
                e.contains("agentq invalid: payload is not valid JSON"),
                "refused for the payload, with a clear error: {e}"
            );
            false
        }
    }
}

fn rust_accepts(payload: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(payload) else {
        return false;
    };
    let ok = payload::check(text).is_ok();
    if ok {
        assert!(
            serde_json::value::RawValue::from_string(text.to_string()).is_ok(),
            "the worker reads every accepted payload: {text:?}"
        );
        assert!(
            serde_json::from_str::<serde_json::Value>(text).is_ok(),
            "the HTTP API and handlers read every accepted payload: {text:?}"
        );
    }
    let spec = JobSpec {
        payload: text.to_string(),
        ..JobSpec::new("t", "q", "noop")
    };
    assert_eq!(
        spec.validate(1 << 20).is_ok(),
        ok,
        "JobSpec::validate agrees"
    );
    ok
}

fn vectors() -> Vec<Vec<u8>> {
    let deep = |d: usize| format!("{}{}", "[".repeat(d), "]".repeat(d)).into_bytes();
    let deep_obj = |d: usize| format!("{}1{}", "{\"k\":".repeat(d), "}".repeat(d)).into_bytes();
    let mut v: Vec<Vec<u8>> = [
        "{}",
        "[]",
        "null",
        "true",
        "false",
        "0",
        "-0",
        "1",
        "-1.5e-3",
        "1E5",
        "1e+5",
        "0.0e-0",
        "\"\"",
        "\"é ☃ 😀\"",
        "\"\\u00e9\\n\\t\\\"\\\\\\/\"",
        "\"\\ud83d\\ude00\"",
        "{\"a\":[1,{\"b\":null}]}",
        " {\"a\" : 1 } ",
        "{\"a\":1,\"a\":2}",
        "1e-400",
        "9.99e307",
        "99999999999999999999e287",
        "123456789012345678901234567890e-10",
        "0e99999999999999999999",
        // refused by both
        "",
        " ",
        "NaN",
        "-NaN",
        "Infinity",
        "-Infinity",
        "inf",
        "0x10",
        "0X1f",
        "+1",
        "01",
        "-01",
        "1.",
        ".5",
        "1e",
        "1e+",
        "--1",
        "[1,]",
        "{\"a\":1,}",
        "[1 2]",
        "{\"a\" 1}",
        "{a:1}",
        "{'a':1}",
        "'x'",
        "\"\\x\"",
        "\"\\u00\"",
        "\"\\ud800\"",
        "\"\\udc00\"",
        "\"\\ud800\\u0041\"",
        "\"\\ud800x\"",
        "1e308",
        "-1e308",
        "1.7976931348623157e308",
        "1e400",
        "[1e400]",
        "{\"a\":1}}",
        "[]]",
        "[[]",
        "nul",
        "tru",
        "[] []",
        "1 2",
        "\"unterminated",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    v.push(format!("1{}", "0".repeat(307)).into_bytes()); // 1e307: taken
    v.push(format!("1{}", "0".repeat(308)).into_bytes()); // 1e308: refused
    v.push(format!("0.{}1e370", "0".repeat(61)).into_bytes()); // 1e308: refused
    v.extend([deep(127), deep(128), deep_obj(127), deep_obj(128)]);
    // bytes no Rust string can hold, and control characters
    v.extend(
        [
            &b"\"\x01\""[..],
            b"\"a\x00b\"",
            b"\"\x1f\"",
            b"\"\x7f\"",
            b"\"\xff\"",
            b"\"\xc3\"",
            b"\"\xc0\xaf\"",
            b"\"\xed\xa0\x80\"",
            b"\"\xf4\x90\x80\x80\"",
            b"\"\xe2\x82\"",
            b"\xef\xbb\xbf{}",
        ]
        .iter()
        .map(|b| b.to_vec()),
    );
    v
}

/// Any JSON value serde_json can write (finite numbers, any strings).
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(serde_json::Value::from),
        any::<String>().prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
            proptest::collection::btree_map(any::<String>(), inner, 0..6)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

#[tokio::test]
async fn the_script_and_the_rust_check_accept_the_same_payloads() {
    let tq = TestQueue::new("payloads").await;
    let mut differ = Vec::new();
    for p in vectors() {
        let (lua, rust) = (script_accepts(&tq.queue, &p).await, rust_accepts(&p));
        if lua != rust {
            differ.push(format!(
                "{:?}: script {lua}, rust {rust}",
                String::from_utf8_lossy(&p[..p.len().min(40)])
            ));
        }
    }
    assert!(
        differ.is_empty(),
        "the two checks differ on:\n{}",
        differ.join("\n")
    );

    // Generated: JSON-ish text and arbitrary bytes.
    let mut runner = TestRunner::new(Config {
        cases: 400,
        ..Config::default()
    });
    let strategy = prop_oneof![
        "[\\[\\]{}\",:0-9eE+.\\-a-z\\\\ ]{0,40}",
        proptest::collection::vec(any::<u8>(), 0..24)
            .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        json_value().prop_map(|v| v.to_string()),
    ];
    let samples = std::sync::Mutex::new(Vec::new());
    runner
        .run(&strategy, |s| {
            samples.lock().expect("lock").push(s);
            Ok(())
        })
        .expect("generate");
    let samples = samples.into_inner().expect("lock");
    for s in samples {
        let (lua, rust) = (
            script_accepts(&tq.queue, s.as_bytes()).await,
            rust_accepts(s.as_bytes()),
        );
        assert_eq!(lua, rust, "the two checks differ on {s:?}");
    }
    tq.cleanup().await;
}

#[tokio::test]
async fn the_script_refuses_a_tenant_sent_to_another_partition() {
    let ns = common::namespace("wrong-part");
    let mut cfg = QueueConfig::new(common::redis_url());
    cfg.namespace = ns.clone();
    cfg.partitions = 4;
    let q = Queue::connect(cfg).await.expect("connect");
    let tq = TestQueue {
        queue: q.clone(),
        ns: ns.clone(),
    };
    let home = agentq::queue::partition_of("acme", 4);
    let wrong = (home + 1) % 4;
    let e = raw_enqueue(&q, wrong, "acme", b"{}")
        .await
        .expect_err("refused");
    assert!(
        e.contains(&format!("belongs to partition {home} of 4")),
        "says where the tenant belongs: {e}"
    );
    raw_enqueue(&q, home, "acme", b"{}")
        .await
        .expect("its own partition takes it");
    // A process with another partition count for this namespace is refused.
    let mut other = QueueConfig::new(common::redis_url());
    other.namespace = ns;
    other.partitions = 2;
    let e = Queue::connect(other).await.err().map(|e| e.to_string());
    assert!(
        e.as_deref()
            .is_some_and(|e| e.contains("laid out in 4 partitions")),
        "{e:?}"
    );
    tq.cleanup().await;
}
