//! The published enqueue script is a stable wire format: a service with any
//! Redis client (here plain redis-cli) can enqueue, and the job runs.

mod common;

use std::process::Command;

use common::{TestQueue, fast_worker};

fn redis_cli(url: &str, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .arg("-u")
        .arg(url)
        .arg("--no-raw")
        .args(args)
        .output()
        .expect("redis-cli (apt-get install redis-tools)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The arguments of an EVALSHA of the enqueue script `sha` on partition
/// key `base`: one job of tenant acme, queue q, kind echo, with `payload`
/// and every option at its default.
fn enqueue_call<'a>(sha: &'a str, base: &'a str, payload: &'a str) -> [&'a str; 15] {
    [
        "EVALSHA", sha, "1", base, "1", "acme", "q", "echo", payload, "0", "0", "0", "0", "0", "",
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_redis_client_enqueues_through_the_published_script() {
    let tq = TestQueue::new("wire").await;
    let url = tq.queue.config().redis_url.clone();
    let source = String::from_utf8(
        Command::new(common::bin())
            .args(["script", "enqueue"])
            .output()
            .expect("agentq script")
            .stdout,
    )
    .expect("utf8");
    let sha_printed = String::from_utf8(
        Command::new(common::bin())
            .args(["script", "enqueue", "--sha"])
            .output()
            .expect("sha")
            .stdout,
    )
    .expect("utf8");
    let loaded = redis_cli(&url, &["SCRIPT", "LOAD", &source]);
    assert_eq!(
        loaded.trim().trim_matches('"'),
        sha_printed.trim(),
        "agentq script --sha is what SCRIPT LOAD returns"
    );
    let base = format!("{{{}:0}}", tq.ns);
    let reply = redis_cli(
        &url,
        &enqueue_call(sha_printed.trim(), &base, r#"{"from":"redis-cli"}"#),
    );
    // 1) "0-..." 2) (integer) 1
    let id = reply
        .lines()
        .next()
        .and_then(|l| l.split('"').nth(1))
        .expect("job id in reply")
        .to_string();
    assert!(reply.contains("(integer) 1"), "{reply}");
    let bad = Command::new("redis-cli")
        .args(["-u", &url])
        .args(enqueue_call(sha_printed.trim(), &base, "{not json"))
        .output()
        .expect("redis-cli");
    assert!(
        String::from_utf8_lossy(&bad.stdout).contains("payload is not valid JSON"),
        "script validates for every client"
    );
    let w = tq.start_worker(fast_worker(&["q"], 2));
    let info = common::job_in_state(&tq, &id, &["succeeded"]).await;
    assert_eq!(
        info.result
            .as_ref()
            .and_then(|r| r["payload"]["from"].as_str()),
        Some("redis-cli")
    );
    w.stop().await;
    tq.cleanup().await;
}
