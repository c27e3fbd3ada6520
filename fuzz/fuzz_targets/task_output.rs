//! `agentq::executor::parse_task_output` (a task program's stdout): never
//! panics; an error is one line; only the last non-empty line counts
//! (trailing blank lines and earlier log lines change nothing); and a
//! result line written by a task program (`{"output": .., "usage": {..}}`)
//! reads back exactly, missing usage keys as 0. `progress_report` (one
//! stdout line) never panics, its report is one line of valid JSON, and a
//! progress line printed last is no result.
#![no_main]

use agentq::executor::{TaskResult, TaskUsage, parse_task_output, progress_report};
use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value, json};

fuzz_target!(|data: &[u8]| {
    raw(data);
    progress(data);
    if let Ok(line) = Unstructured::new(data).arbitrary::<ResultLine>() {
        round_trip(&line);
    }
});

fn raw(data: &[u8]) {
    let got = parse_task_output(data);
    match &got {
        Err(e) => assert!(!e.contains('\n'), "error on one line: {e:?}"),
        Ok(result) => assert_ne!(result.output, Some(Value::Null), "null output is None"),
    }
    let mut trailing = data.to_vec();
    trailing.extend_from_slice(b"\n \r\n\t\n\n");
    assert_eq!(parse_task_output(&trailing), got, "trailing blank lines");
    let has_line = String::from_utf8_lossy(data)
        .lines()
        .any(|l| !l.trim().is_empty());
    if has_line {
        let mut logged = b"starting {\"output\": 1}\n[log] not json\n".to_vec();
        logged.extend_from_slice(data);
        assert_eq!(parse_task_output(&logged), got, "earlier lines");
    }
}

fn progress(data: &[u8]) {
    for line in data.split(|&b| b == b'\n') {
        let Some(report) = progress_report(line) else {
            continue;
        };
        assert!(!report.contains('\n'), "one line: {report:?}");
        // RawValue checks the syntax only (a Value would take serde's
        // private raw-value key for a token).
        let valid = serde_json::from_str::<Box<serde_json::value::RawValue>>(&report);
        assert!(valid.is_ok(), "a report is JSON: {report:?}");
        let mut stdout = b"{\"output\": 1}\n".to_vec();
        stdout.extend_from_slice(line);
        assert_eq!(
            parse_task_output(&stdout),
            Ok(TaskResult::default()),
            "a progress line last is no result"
        );
    }
}

/// A JSON value without floats (whose text form is not the point here).
#[derive(Arbitrary, Debug)]
enum Out {
    Str(String),
    Int(i64),
    Bool(bool),
    List(Vec<String>),
    Obj(Vec<(String, Option<i64>)>),
}

impl Out {
    fn json(&self) -> Value {
        match self {
            Out::Str(s) => json!(s),
            Out::Int(n) => json!(n),
            Out::Bool(b) => json!(b),
            Out::List(v) => json!(v),
            Out::Obj(kv) => Value::Object(kv.iter().map(|(k, v)| (k.clone(), json!(v))).collect()),
        }
    }
}

#[derive(Arbitrary, Debug)]
struct ResultLine {
    log: Vec<String>,
    output: Option<Out>,
    usage: Option<[Option<u64>; 3]>,
    extra_key: Option<String>,
}

fn round_trip(r: &ResultLine) {
    let mut obj = Map::new();
    if let Some(o) = &r.output {
        obj.insert("output".into(), o.json());
    }
    let mut want = TaskUsage::default();
    if let Some(u) = &r.usage {
        let mut m = Map::new();
        for (key, v, slot) in [
            ("api_calls", u[0], &mut want.api_calls),
            ("input_tokens", u[1], &mut want.input_tokens),
            ("output_tokens", u[2], &mut want.output_tokens),
        ] {
            if let Some(v) = v {
                m.insert(key.into(), json!(v));
                *slot = v;
            }
        }
        obj.insert("usage".into(), Value::Object(m));
    }
    if let Some(k) = &r.extra_key
        && k != "output"
        && k != "usage"
    {
        obj.insert(k.clone(), json!("ignored"));
    }
    let mut stdout = Vec::new();
    for l in &r.log {
        stdout.extend_from_slice(l.replace('\n', " ").as_bytes());
        stdout.push(b'\n');
    }
    stdout.extend_from_slice(Value::Object(obj).to_string().as_bytes());
    stdout.push(b'\n');
    let TaskResult { output, usage } = parse_task_output(&stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&stdout)));
    assert_eq!(output, r.output.as_ref().map(Out::json));
    assert_eq!(usage, want);
}
