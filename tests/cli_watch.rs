//! Job events on the command line: `agentq watch` prints a job's events and
//! exits with how it ended, `agentq jobs --follow` prints new events as they
//! happen, `agentq job-events Q off` stops a queue's events.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use agentq::model::job_event::EventId;
use agentq::queue::JobSpec;
use common::{Proc, TestQueue, job_in_state};

/// A worker process on `tq`'s namespace serving queue `q`.
fn worker(tq: &TestQueue, q: &str) -> Proc {
    Proc(tq.spawn_worker(&["--queues", q, "--concurrency", "2"]))
}

fn spec(tenant: &str, queue: &str, kind: &str, payload: &str) -> JobSpec {
    let mut s = JobSpec::new(tenant, queue, kind);
    s.payload = payload.to_string();
    s
}

/// The event types of `watch`'s human lines (second column).
fn types(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
        .collect()
}

#[tokio::test]
async fn watch_exits_with_how_the_job_ended() {
    let tq = TestQueue::new("watch-exit").await;
    let _w = worker(&tq, "q");
    let ok = tq.enqueue(&spec("t", "q", "echo", "{\"n\":1}")).await;
    let (code, out, err) = tq.cli(&["watch", &ok, "--timeout", "60s"]);
    assert_eq!(code, 0, "succeeded is exit 0; stderr: {err}");
    assert_eq!(types(&out), ["enqueued", "started", "succeeded"], "{out}");
    assert!(
        out.lines().last().unwrap_or("").contains("attempt 1"),
        "{out}"
    );

    // A permanent failure (exit 65 of the sleep task): dead at once.
    let dead = tq.enqueue(&spec("t", "q", "sleep", "{\"bad\":1}")).await;
    let (code, out, err) = tq.cli(&["watch", &dead, "--json", "--timeout", "60s"]);
    assert_eq!(code, 3, "dead is exit 3; stderr: {err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON event per line"))
        .collect();
    let kinds: Vec<&str> = lines.iter().filter_map(|v| v["type"].as_str()).collect();
    assert_eq!(kinds, ["enqueued", "started", "failed", "dead"], "{out}");
    assert!(lines.iter().all(|v| v["job"] == dead.as_str()));

    // Not started within the timeout: exit 5; cancelled: exit 4.
    let later = tq
        .enqueue(&spec("t", "q", "echo", "{}").delay_for(3600))
        .await;
    let (code, _, err) = tq.cli(&["watch", &later, "--timeout", "1s"]);
    assert_eq!(code, 5, "timeout is exit 5: {err}");
    assert!(err.contains("has not ended"), "{err}");
    assert_eq!(tq.cli(&["cancel", &later]).0, 0);
    let (code, out, _) = tq.cli(&["watch", &later]);
    assert_eq!(
        (code, types(&out)),
        (4, vec!["enqueued".into(), "cancelled".into()])
    );
    let (code, _, err) = tq.cli(&["watch", "0-ffff"]);
    assert_eq!(code, 2, "no such job is bad input: {err}");
    tq.cleanup().await;
}

trait Delay {
    fn delay_for(self, secs: u64) -> Self;
}

impl Delay for JobSpec {
    fn delay_for(mut self, secs: u64) -> Self {
        self.delay = Some(Duration::from_secs(secs));
        self
    }
}

/// `agentq jobs --follow` as a child, its stdout lines on a channel.
fn follow(tq: &TestQueue, args: &[&str]) -> (Proc, mpsc::Receiver<String>) {
    let mut child = common::agentq()
        .args(args)
        .env("AGENTQ_REDIS_URL", tq.queue.config().redis_url.clone())
        .env("AGENTQ_NAMESPACE", &tq.ns)
        .env("AGENTQ_LOG", "off")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn agentq jobs --follow");
    let out = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    // A reading thread spawns nothing, so it may end at any time.
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    (Proc(child), rx)
}

/// Lines until one satisfies `done` (within a minute); all of them.
fn lines_until(
    rx: &mpsc::Receiver<String>,
    done: impl Fn(&serde_json::Value) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no matching line; saw {seen:?}"));
        let v: serde_json::Value = serde_json::from_str(&line).expect("JSON line");
        let stop = done(&v);
        seen.push(v);
        if stop {
            return seen;
        }
    }
}

#[tokio::test]
async fn jobs_follow_prints_new_jobs_events_of_its_queue() {
    let tq = TestQueue::new("jobs-follow").await;
    let listed = tq
        .enqueue(&spec("t", "q", "echo", "{}").delay_for(3600))
        .await;
    let (_f, rx) = follow(&tq, &["jobs", "--queue", "q", "--follow", "--json"]);
    // The listing comes first, as one JSON array: following has begun.
    let first = lines_until(&rx, |_| true);
    assert_eq!(first[0][0]["id"], listed.as_str(), "{first:?}");

    let _w = worker(&tq, "q");
    let elsewhere = tq.enqueue(&spec("t", "other", "echo", "{}")).await;
    let id = tq.enqueue(&spec("t2", "q", "echo", "{}")).await;
    let seen = lines_until(&rx, |v| v["job"] == id.as_str() && v["type"] == "succeeded");
    let mine: Vec<&str> = seen
        .iter()
        .filter(|v| v["job"] == id.as_str())
        .filter_map(|v| v["type"].as_str())
        .collect();
    assert_eq!(mine, ["enqueued", "started", "succeeded"], "{seen:?}");
    assert!(
        seen.iter().all(|v| v["job"] != elsewhere.as_str()),
        "only queue q: {seen:?}"
    );
    assert!(
        seen.iter()
            .filter(|v| v["job"] == id.as_str())
            .all(|v| v["tenant"] == "t2")
    );
    tq.cleanup().await;
}

#[tokio::test]
async fn job_events_off_writes_no_events_for_that_queue() {
    let tq = TestQueue::new("job-events-off").await;
    let (code, out, err) = tq.cli(&["job-events", "quiet", "off"]);
    assert_eq!(
        (code, out.trim()),
        (0, "queue quiet: job events off"),
        "{err}"
    );
    let (_, out, _) = tq.cli(&["job-events", "quiet", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["job_events"], false);

    let _w = worker(&tq, "quiet,loud");
    let quiet = tq.enqueue(&spec("t", "quiet", "echo", "{}")).await;
    let loud = tq.enqueue(&spec("t", "loud", "echo", "{}")).await;
    job_in_state(&tq, &quiet, &["succeeded"]).await;
    job_in_state(&tq, &loud, &["succeeded"]).await;
    let events = tq
        .queue
        .job_events_after("t", EventId::START, 1000)
        .await
        .expect("read events")
        .events;
    assert!(events.iter().all(|e| e.job != quiet), "{events:?}");
    assert_eq!(
        events.iter().filter(|e| e.job == loud).count(),
        3,
        "{events:?}"
    );

    // watch still ends, with the final state read from the job record.
    let (code, out, err) = tq.cli(&["watch", &quiet, "--timeout", "30s"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(
        out.contains("succeeded") && out.contains("from the job record"),
        "{out}"
    );
    assert_eq!(
        tq.cli(&["job-events", "quiet", "on"]).1.trim(),
        "queue quiet: job events on"
    );
    tq.cleanup().await;
}
