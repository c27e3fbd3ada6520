//! Progress reports end to end: a real worker runs `workers/progress/`
//! against real Redis, and its `{"progress": ...}` lines become `progress`
//! events on the tenant's event stream: in order, under the attempt's
//! number, before the job's end; bounded in rate (coalesced) and size; never
//! taken for the result; unbroken by garbage bytes around them.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentq::executor::{
    Caps, Outcome, ProgressSink, TaskInput, parse_manifest, run_process_reporting,
};
use agentq::model::job_event::{EventId, JobEvent, JobEventType as T};
use agentq::queue::JobSpec;
use agentq::queue::inspect::JobInfo;
use common::{TestQueue, fast_worker};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// Run one `progress` job with `payload` on a worker of its own; its
/// final state and the tenant's events of it (enqueued and started left
/// out), oldest first.
async fn run(test: &str, payload: Value) -> (JobInfo, Vec<JobEvent>) {
    let tq = TestQueue::new(test).await;
    let w = tq.start_worker(fast_worker(&["q"], 2));
    let mut spec = JobSpec::new("t", "q", "progress").payload(&payload);
    spec.max_attempts = Some(1);
    let id = tq.enqueue(&spec).await;
    let info = common::job_in_state(&tq, &id, &["succeeded", "dead"]).await;
    w.stop().await;
    let events = tq
        .queue
        .job_events_after("t", EventId::START, 10_000)
        .await
        .expect("read events")
        .events;
    tq.cleanup().await;
    let events = events
        .into_iter()
        .filter(|e| e.job == id && !matches!(e.kind, T::Enqueued | T::Started))
        .collect();
    (info, events)
}

fn kinds(events: &[JobEvent]) -> Vec<T> {
    events.iter().map(|e| e.kind).collect()
}

fn reports(events: &[JobEvent]) -> Vec<Value> {
    events
        .iter()
        .filter(|e| e.kind == T::Progress)
        .map(|e| e.progress.clone().unwrap_or(Value::Null))
        .collect()
}

fn step(i: u64, of: u64) -> Value {
    json!({"step": i, "of": of})
}

/// Reports further apart than the rate bound each become an event, with
/// the attempt's number and the report's JSON, and the success (with the
/// result line's output) comes after them.
#[tokio::test]
async fn progress_lines_become_events_before_the_success() {
    let (info, events) = run("progress-order", json!({"n": 3, "ms": 400})).await;
    assert_eq!(info.state, "succeeded", "{info:?}");
    assert_eq!(
        kinds(&events),
        [T::Progress, T::Progress, T::Progress, T::Succeeded],
        "{events:?}"
    );
    assert_eq!(reports(&events), [step(1, 3), step(2, 3), step(3, 3)]);
    assert!(events.iter().all(|e| e.attempt == Some(1)), "{events:?}");
    let result = events.last().and_then(|e| e.result.clone());
    assert_eq!(result, Some(json!({"reported": 3})));
    assert_eq!(info.progress, Some(step(3, 3)), "latest kept on the job");
}

/// A burst of 1000 lines is coalesced: at most one event per 250 ms of the
/// attempt's run (plus the first and the final flush), the last one is the
/// last printed, and the success still comes after.
#[tokio::test]
async fn a_burst_is_coalesced_to_the_latest() {
    let (info, events) = run("progress-burst", json!({"n": 1000})).await;
    assert_eq!(info.state, "succeeded", "{info:?}");
    let got = reports(&events);
    let span_ms = events.last().map_or(0, |e| e.at) - events.first().map_or(0, |e| e.at);
    assert!(
        got.len() as u64 <= span_ms / 250 + 2,
        "{} events in {span_ms} ms",
        got.len()
    );
    eprintln!("burst: {} events in {span_ms} ms", got.len());
    assert!(got.len() < 100, "far fewer than 1000: {}", got.len());
    assert_eq!(got.last(), Some(&step(1000, 1000)), "the latest is sent");
    let steps: Vec<u64> = got.iter().filter_map(|r| r["step"].as_u64()).collect();
    assert!(steps.windows(2).all(|w| w[0] < w[1]), "in order: {steps:?}");
    assert_eq!(events.last().map(|e| e.kind), Some(T::Succeeded));
    assert_eq!(info.progress, Some(step(1000, 1000)));
}

/// A report over 4 KiB is dropped whole (never cut into invalid JSON);
/// the next one is sent, and the job succeeds.
#[tokio::test]
async fn an_oversized_report_is_dropped_and_the_job_succeeds() {
    let (info, events) = run("progress-big", json!({"n": 1, "big": 5000})).await;
    assert_eq!(info.state, "succeeded", "{info:?}");
    assert_eq!(reports(&events), [step(1, 1)], "{events:?}");
    assert_eq!(info.result, Some(json!({"reported": 1})));
}

/// A progress line last is never the result: the job succeeds with none,
/// as if no result line was printed, and the report is still sent.
#[tokio::test]
async fn a_progress_line_last_is_no_result() {
    let (info, events) = run("progress-last", json!({"n": 2, "last": "progress"})).await;
    assert_eq!(info.state, "succeeded", "{info:?}");
    assert_eq!(info.result, None);
    assert_eq!(reports(&events).last(), Some(&step(2, 2)));
    assert_eq!(events.last().map(|e| e.kind), Some(T::Succeeded));
}

/// Lines of invalid UTF-8, control bytes and broken JSON between progress
/// lines are ordinary output: every report still arrives, and the result.
#[tokio::test]
async fn garbage_between_progress_lines_breaks_nothing() {
    let payload = json!({"n": 3, "ms": 400, "garbage": true});
    let (info, events) = run("progress-garbage", payload).await;
    assert_eq!(info.state, "succeeded", "{info:?}");
    assert_eq!(reports(&events), [step(1, 3), step(2, 3), step(3, 3)]);
    assert_eq!(info.result, Some(json!({"reported": 3})));
}

/// A steady stream (a line every few ms for over a second) reaches Redis
/// about once per 250 ms: the latest of each interval, in order, the last
/// one printed last.
#[tokio::test]
async fn a_steady_stream_is_sent_once_per_interval() {
    let (info, events) = run("progress-stream", json!({"n": 300, "ms": 4})).await;
    assert_eq!(info.state, "succeeded", "{info:?}");
    let got = reports(&events);
    let span_ms = events.last().map_or(0, |e| e.at) - events.first().map_or(0, |e| e.at);
    eprintln!("stream: {} events in {span_ms} ms", got.len());
    assert!(
        got.len() as u64 <= span_ms / 250 + 2,
        "{} events in {span_ms} ms",
        got.len()
    );
    assert!(got.len() >= 3, "sent at the ends of intervals too: {got:?}");
    let steps: Vec<u64> = got.iter().filter_map(|r| r["step"].as_u64()).collect();
    assert!(steps.windows(2).all(|w| w[0] < w[1]), "in order: {steps:?}");
    assert_eq!(got.last(), Some(&step(300, 300)));
    assert_eq!(events.last().map(|e| e.kind), Some(T::Succeeded));
}

/// Straight through the executor: a 64 MiB line that starts like a
/// progress line is dropped without being held whole (the stdout tail keeps
/// its bound), garbage bytes around progress lines are output, and the sink
/// gets the valid reports.
#[tokio::test]
async fn a_huge_progress_line_is_dropped_without_being_kept() {
    let script = r#"#!/usr/bin/env python3
import sys
out = sys.stdout.buffer
out.write(b'{"progress": "' + b"x" * (64 << 20) + b'"}\n\xff\x00{"progress"\n')
out.write(b'{"progress": {"ok": true}}\n{"output": "end"}\n')
"#;
    let tmp = tempfile::tempdir().expect("tempdir");
    let run = tmp.path().join("run");
    std::fs::write(&run, script).expect("write run");
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let toml = "command = [\"./run\"]\nenv = [\"PATH\"]";
    let m = parse_manifest("huge", tmp.path(), toml).expect("manifest");
    let input = TaskInput {
        id: "job-1".into(),
        tenant: "t".into(),
        queue: "q".into(),
        kind: "huge".into(),
        attempt: 1,
        payload: serde_json::value::RawValue::from_string("{}".into()).expect("payload"),
    };
    let caps = Caps {
        timeout: Duration::from_secs(60),
        memory: None,
        kill_grace: Duration::from_secs(1),
    };
    let got = Arc::new(Mutex::new(Vec::new()));
    let to = got.clone();
    let sink: ProgressSink = Arc::new(move |r| {
        to.lock().expect("lock").push(r);
        Box::pin(async {})
    });
    let r = run_process_reporting(&m, &input, &caps, CancellationToken::new(), sink).await;
    assert_eq!(r.outcome, Outcome::Succeeded, "{r:?}");
    assert_eq!(r.output, Some(json!("end")));
    assert_eq!(*got.lock().expect("lock"), [r#"{"ok":true}"#]);
}
