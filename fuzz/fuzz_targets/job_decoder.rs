//! Everything that decodes a job from bytes:
//! - the HTTP body decoder `agentq::http::api::decode_jobs` (one job, `[...]` or
//!   `{"jobs": [...]}`): never panics, refuses with 400/413 only, and what
//!   it accepts is a valid spec that the queue receives exactly as asked
//!   (no duration silently rounded to 0 = "the kind's default", none
//!   wrapped when converted to milliseconds); re-encoding an accepted body
//!   in canonical form decodes to the same specs;
//! - job ids (`agentq::queue::partition_of_job`);
//! - usage records read back from the outbox stream
//!   (`agentq::model::record::Record::from_fields`, `outbox_fields`).
#![no_main]

use std::collections::HashMap;
use std::time::Duration;

use agentq::http::api::{Decoded, decode_jobs};
use agentq::queue::JobSpec;
use agentq::model::units::{format_duration, format_size};
use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

/// Most milliseconds the enqueue script accepts for a timeout or a delay.
const SCRIPT_MAX_MS: u128 = 1_000_000_000_000_000;

fuzz_target!(|data: &[u8]| {
    body(data);
    if let Ok(jobs) = Unstructured::new(data).arbitrary::<Vec<Shaped>>() {
        // The same decoder on well-formed bodies with fuzzed values.
        let v: Vec<Value> = jobs.iter().map(Shaped::json).collect();
        body(serde_json::to_string(&v).expect("json").as_bytes());
    }
    ids_and_records(data);
});

/// A job body shaped as clients send it, with fuzzed values: names,
/// durations and sizes built from a number and a unit.
#[derive(Arbitrary, Debug)]
struct Shaped {
    queue: Name,
    kind: Name,
    payload: Option<(String, i64)>,
    timeout: Option<Quantity>,
    memory: Option<Quantity>,
    delay: Option<Quantity>,
    priority: Option<i32>,
    max_attempts: Option<u32>,
    idempotency_key: Option<String>,
}

#[derive(Arbitrary, Debug)]
enum Name {
    Plain,
    Other(String),
}

/// `<int>[.<frac>]<unit>`, e.g. `0.5ms`, `1.5GiB`, `99999999999d`.
#[derive(Arbitrary, Debug)]
struct Quantity {
    int: u64,
    frac: Option<u32>,
    unit: u8,
}

impl Quantity {
    fn text(&self) -> String {
        const UNITS: [&str; 12] = [
            "ms", "s", "m", "h", "d", "", "B", "KiB", "MiB", "GiB", "MB", "TB",
        ];
        let unit = UNITS[usize::from(self.unit) % UNITS.len()];
        match self.frac {
            Some(f) => format!("{}.{f}{unit}", self.int),
            None => format!("{}{unit}", self.int),
        }
    }
}

impl Shaped {
    fn json(&self) -> Value {
        let name = |n: &Name, plain: &str| match n {
            Name::Plain => plain.to_string(),
            Name::Other(s) => s.clone(),
        };
        let mut o = Map::new();
        o.insert("queue".into(), json!(name(&self.queue, "default")));
        o.insert("kind".into(), json!(name(&self.kind, "echo")));
        if let Some((k, v)) = &self.payload {
            o.insert("payload".into(), json!({ k: v }));
        }
        for (key, q) in [
            ("timeout", &self.timeout),
            ("memory", &self.memory),
            ("delay", &self.delay),
        ] {
            if let Some(q) = q {
                o.insert(key.into(), json!(q.text()));
            }
        }
        if let Some(p) = self.priority {
            o.insert("priority".into(), json!(p));
        }
        if let Some(n) = self.max_attempts {
            o.insert("max_attempts".into(), json!(n));
        }
        if let Some(k) = &self.idempotency_key {
            o.insert("idempotency_key".into(), json!(k));
        }
        Value::Object(o)
    }
}

fn body(data: &[u8]) {
    let Decoded { specs, batch } = match decode_jobs("acme", data) {
        Ok(ok) => ok,
        Err(e) => {
            let status = e.status().as_u16();
            assert!(status == 400 || status == 413, "status {status}: {e:?}");
            return;
        }
    };
    assert!(
        !specs.is_empty() && specs.len() <= 1000 /* api::wire::MAX_BATCH */
    );
    assert!(batch || specs.len() == 1);
    for s in &specs {
        assert_eq!(s.tenant, "acme", "the tenant comes from the key");
        s.validate(1 << 20).expect("an accepted spec validates");
        // The queue sends durations to the enqueue script in whole ms
        // (`JobSpec::wire_fields`, `as_millis() as u64`), where a timeout
        // of 0 means "the kind's default".
        for (what, d) in [("timeout", s.timeout), ("delay", s.delay)] {
            if let Some(d) = d {
                assert!(
                    d.as_millis() <= SCRIPT_MAX_MS,
                    "{what} {d:?} accepted but beyond what the queue can send"
                );
                assert_eq!(
                    d.subsec_nanos() % 1_000_000,
                    0,
                    "{what} {d:?} accepted but sent rounded down to whole ms"
                );
            }
        }
        if let Some(t) = s.timeout {
            assert!(
                t >= Duration::from_millis(1),
                "timeout {t:?} accepted but sent as 0 ms, i.e. the kind's default"
            );
        }
    }
    let canonical = encode(&specs, batch, data.len().is_multiple_of(2));
    let Decoded {
        specs: again,
        batch: batch2,
    } = decode_jobs("acme", canonical.as_bytes())
        .unwrap_or_else(|e| panic!("canonical form refused: {e:?}\n{canonical}"));
    assert_eq!(batch, batch2);
    assert_eq!(format!("{specs:?}"), format!("{again:?}"), "{canonical}");
}

#[derive(Serialize)]
struct Job<'a> {
    queue: &'a str,
    kind: &'a str,
    payload: &'a RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    memory: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    delay: Option<String>,
    priority: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_attempts: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    idempotency_key: Option<&'a str>,
}

/// The specs as a request body, durations and sizes in their canonical text.
fn encode(specs: &[JobSpec], batch: bool, wrapped: bool) -> String {
    let raw: Vec<Box<RawValue>> = specs
        .iter()
        .map(|s| RawValue::from_string(s.payload.clone()).expect("payload is JSON"))
        .collect();
    let jobs: Vec<Job<'_>> = specs
        .iter()
        .zip(&raw)
        .map(|(s, payload)| Job {
            queue: &s.queue,
            kind: &s.kind,
            payload,
            timeout: s.timeout.map(format_duration),
            memory: s.memory.map(format_size),
            delay: s.delay.map(format_duration),
            priority: s.priority,
            max_attempts: s.max_attempts,
            idempotency_key: s.idempotency_key.as_deref(),
        })
        .collect();
    let v = match (batch, wrapped) {
        (false, _) => serde_json::to_value(&jobs[0]),
        (true, false) => serde_json::to_value(&jobs),
        (true, true) => serde_json::to_value(HashMap::from([("jobs", &jobs)])),
    };
    v.expect("serialize").to_string()
}

fn ids_and_records(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Some(p) = agentq::queue::partition_of_job(&text) {
        let (_, rest) = text.split_once('-').expect("a dash");
        assert_eq!(
            agentq::queue::partition_of_job(&format!("{p}-{rest}")),
            Some(p)
        );
    }
    // An outbox entry: `r` packed (tab-separated values), `e` the error.
    let (r, e) = text.split_once('\u{0}').unwrap_or((&text, ""));
    let fields = HashMap::from([
        ("r".to_string(), r.to_string()),
        ("e".to_string(), e.to_string()),
    ]);
    if let Some(rec) = agentq::model::record::Record::from_fields(&fields) {
        assert!(rec.attempt >= 1);
        assert_eq!(rec.error, e);
    }
    let named = agentq::model::record::outbox_fields(fields);
    assert_eq!(named.get("error").map(String::as_str), Some(e));
    // Entries written field by field by earlier versions.
    let mut old: HashMap<String, String> = text
        .split('\n')
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    old.remove("r"); // that would be a packed entry
    if let Some(rec) = agentq::model::record::Record::from_fields(&old) {
        assert!(rec.attempt >= 1);
        assert_eq!(Some(&rec.job_id), old.get("job"));
    }
}
