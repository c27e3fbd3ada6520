//! Redis going away and coming back: the worker pauses claiming, retries with
//! backoff and resumes without a restart; an acknowledged enqueue survives
//! (AOF, appendfsync always).

mod common;

use std::time::Duration;

use agentq::queue::JobSpec;
use agentq::queue::inspect::job_info;
use agentq_servers::PrivateRedis;
use common::{TestQueue, eventually, fast_worker};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_resumes_after_redis_restarts_and_nothing_acknowledged_is_lost() {
    let mut redis = PrivateRedis::start(&["--appendonly", "yes", "--appendfsync", "always"])
        .expect("redis-server");
    let tq = TestQueue::with_url("restart", &redis.url()).await;
    let w = tq.start_worker(fast_worker(&["q"], 2));
    let a = tq.enqueue(&JobSpec::new("t", "q", "echo")).await;
    common::job_in_state(&tq, &a, &["succeeded"]).await;

    // Pause the worker's view of the world: no Redis for a while.
    tq.queue.set_paused("q", None, true).await.expect("pause");
    let b = tq.enqueue(&JobSpec::new("t", "q", "echo")).await; // acknowledged
    redis.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    redis.restart().expect("restart redis");

    // The acknowledged job survived the crash; once resumed, the same worker runs it.
    let info = eventually(Duration::from_secs(60), "redis back", || async {
        job_info(&tq.queue, &b).await.ok()
    })
    .await;
    assert_eq!(info.state, "ready");
    eventually(Duration::from_secs(60), "resume", || async {
        tq.queue.set_paused("q", None, false).await.ok()
    })
    .await;
    let done = common::job_in_state(&tq, &b, &["succeeded"]).await;
    assert_eq!(done.attempts, 1);
    w.stop().await;
    tq.cleanup().await;
}
