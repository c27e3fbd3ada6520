//! The command line: bad input is exit 2 with one clear line and writes
//! nothing; listings have --json; state changes say what they changed.

mod common;

use common::TestQueue;

async fn nothing_enqueued(tq: &TestQueue) {
    let stats = agentq::queue::inspect::queue_stats(&tq.queue)
        .await
        .expect("stats");
    assert!(
        stats.iter().all(|s| s.ready + s.delayed == 0),
        "nothing may be enqueued: {stats:?}"
    );
}

fn assert_usage_error(out: (i32, String, String), needle: &str) {
    let (code, stdout, stderr) = out;
    assert_eq!(code, 2, "exit 2 for bad input; stderr: {stderr}");
    assert!(stdout.is_empty(), "nothing on stdout: {stdout}");
    let first = stderr.lines().next().unwrap_or("");
    assert!(first.starts_with("error: "), "{stderr}");
    assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
}

#[tokio::test]
async fn bad_enqueue_input_is_exit_2_and_writes_nothing() {
    let tq = TestQueue::new("cli-bad").await;
    let base = ["enqueue", "--queue", "q", "--tenant", "t", "--kind", "echo"];
    let with = |extra: &[&str]| -> Vec<String> {
        base.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let run = |args: Vec<String>| tq.cli(&args.iter().map(String::as_str).collect::<Vec<_>>());

    assert_usage_error(run(with(&["--payload", "{not json"])), "not valid JSON");
    let big = tempfile::NamedTempFile::new().expect("tmp");
    std::fs::write(big.path(), format!("\"{}\"", "x".repeat(2 << 20))).expect("write");
    let at = format!("@{}", big.path().display());
    assert_usage_error(run(with(&["--payload", &at])), "over the limit");
    assert_usage_error(
        tq.cli(&[
            "enqueue",
            "--queue",
            "q",
            "--tenant",
            "bad tenant!",
            "--kind",
            "echo",
        ]),
        "tenant \"bad tenant!\" must be",
    );
    assert_usage_error(
        tq.cli(&[
            "enqueue", "--queue", "q{x}", "--tenant", "t", "--kind", "echo",
        ]),
        "queue",
    );
    assert_usage_error(
        tq.cli(&[
            "enqueue", "--queue", "q", "--tenant", "t", "--kind", "../etc",
        ]),
        "kind",
    );
    assert_usage_error(run(with(&["--timeout", "5parsecs"])), "invalid duration");
    assert_usage_error(run(with(&["--memory", "lots"])), "size");
    assert_usage_error(run(with(&["--priority", "500"])), "priority");
    assert_usage_error(run(with(&["--max-attempts", "0"])), "max attempts");
    assert_usage_error(
        run(with(&["--payload", "@/no/such/file"])),
        "cannot read payload file",
    );
    // Over the tenant's cap: refused, never clipped.
    assert_eq!(tq.cli(&["tenant", "set", "t", "--max-timeout", "1m"]).0, 0);
    assert_usage_error(
        run(with(&["--timeout", "2m"])),
        "exceeds tenant t's max_timeout of 1m",
    );
    nothing_enqueued(&tq).await;

    // Limits out of range.
    assert_usage_error(
        tq.cli(&["tenant", "set", "t", "--max-concurrency", "0"]),
        "--max-concurrency",
    );
    assert_usage_error(
        tq.cli(&["tenant", "set", "t", "--weight", "100000"]),
        "--weight",
    );
    assert_usage_error(
        tq.cli(&["tenant", "set", "t", "--max-memory", "1KiB"]),
        "--max-memory",
    );
    assert_usage_error(tq.cli(&["tenant", "set", "t"]), "nothing to set");
    let shown = tq.cli(&["tenant", "show", "t", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&shown.1).expect("json");
    assert_eq!(
        v["limits"]["max_concurrency"], 10,
        "the refused change wrote nothing"
    );
    tq.cleanup().await;
}

#[tokio::test]
async fn enqueue_inspect_and_listings() {
    let tq = TestQueue::new("cli-list").await;
    let (code, id, err) = tq.cli(&[
        "enqueue",
        "--queue",
        "q",
        "--tenant",
        "t",
        "--kind",
        "echo",
        "--payload",
        "{\"a\":1}",
        "--priority",
        "-5",
    ]);
    assert_eq!(code, 0, "{err}");
    let id = id.trim().to_string();
    assert!(
        agentq::queue::partition_of_job(&id).is_some(),
        "prints the job id alone: {id:?}"
    );
    let idem = [
        "enqueue",
        "--queue",
        "q",
        "--tenant",
        "t",
        "--kind",
        "echo",
        "--idempotency-key",
        "k1",
    ];
    let (again, again2) = (tq.cli(&idem).1, tq.cli(&idem).1);
    assert_eq!(again, again2);

    let (code, out, _) = tq.cli(&["inspect", &id, "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).expect("inspect json");
    for k in [
        "id",
        "tenant",
        "queue",
        "kind",
        "state",
        "attempts",
        "outcome",
        "enqueued_at",
        "started_at",
        "finished_at",
        "last_error",
    ] {
        assert!(v.get(k).is_some(), "inspect --json has {k}: {v}");
    }
    assert_eq!(v["state"], "ready");
    assert_eq!(v["payload"]["a"], 1);
    assert!(
        v["enqueued_at"].as_str().unwrap_or("").ends_with('Z')
            && v["enqueued_at"].as_str().unwrap_or("").contains('.')
    );

    let (_, out, _) = tq.cli(&["queues", "--json"]);
    let q: serde_json::Value = serde_json::from_str(&out).expect("queues json");
    assert_eq!(q[0]["queue"], "q");
    assert_eq!(q[0]["ready"], 2);
    let (_, out, _) = tq.cli(&["queues"]);
    assert!(
        out.lines().next().unwrap_or("").starts_with("queue"),
        "a table with a header: {out}"
    );
    let (_, out, _) = tq.cli(&["tenants", "--json"]);
    let t: serde_json::Value = serde_json::from_str(&out).expect("tenants json");
    assert_eq!(t[0]["tenant"], "t");
    assert_eq!(t[0]["ready"], 2);
    let (_, out, _) = tq.cli(&["jobs", "--queue", "q", "--state", "ready", "--json"]);
    let j: serde_json::Value = serde_json::from_str(&out).expect("jobs json");
    assert_eq!(j.as_array().map(Vec::len), Some(2));

    let (code, out, _) = tq.cli(&["pause", "q", "--tenant", "t"]);
    assert_eq!((code, out.trim()), (0, "paused tenant t on queue q"));
    let (_, out, _) = tq.cli(&["tenants", "--json"]);
    let t: serde_json::Value = serde_json::from_str(&out).expect("tenants json");
    assert_eq!(t[0]["held"], "paused");
    let (_, out, _) = tq.cli(&["resume", "q", "--tenant", "t"]);
    assert_eq!(out.trim(), "resumed tenant t on queue q");

    let (code, _, err) = tq.cli(&["inspect", "0-ffff"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no job 0-ffff"));
    tq.cleanup().await;
}

#[test]
fn unreachable_redis_is_exit_1_with_a_clear_line() {
    let out = std::process::Command::new(common::bin())
        .args(["queues"])
        .env("AGENTQ_REDIS_URL", "redis://127.0.0.1:1")
        .env("AGENTQ_LOG", "off")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach Redis"), "{err}");
}
