//! The Rust client following jobs: `wait_until_finished`, `events(id)` in
//! order and ending after the final event, `tenant_events` only of its
//! tenant, and both resuming after Redis restarts without losing or
//! repeating an event.

mod common;

use std::time::{Duration, Instant};

use agentq::Client;
use agentq::model::job_event::{EventId, JobEvent, JobEventType as T};
use agentq::queue::{JobSpec, QueueError};
use agentq_servers::PrivateRedis;
use common::{TestQueue, eventually, fast_worker};
use futures::{Stream, StreamExt};

/// Every item of `s` until it ends (within a minute).
async fn all_of<S: Stream<Item = Result<JobEvent, QueueError>>>(s: S) -> Vec<JobEvent> {
    let items = tokio::time::timeout(Duration::from_secs(60), s.collect::<Vec<_>>())
        .await
        .expect("the stream ends after the final event");
    items.into_iter().map(|r| r.expect("no error")).collect()
}

fn kinds(events: &[JobEvent]) -> Vec<T> {
    events.iter().map(|e| e.kind).collect()
}

/// Ok events of `s` until one satisfies `done` (errors while Redis is away
/// are skipped: the stream goes on by itself).
async fn until<S>(s: &mut S, done: impl Fn(&JobEvent) -> bool) -> Vec<JobEvent>
where
    S: Stream<Item = Result<JobEvent, QueueError>> + Unpin,
{
    let mut seen = Vec::new();
    let read = async {
        while let Some(item) = s.next().await {
            let Ok(e) = item else { continue };
            let stop = done(&e);
            seen.push(e);
            if stop {
                return;
            }
        }
    };
    let ended = tokio::time::timeout(Duration::from_secs(60), read).await;
    assert!(
        ended.is_ok(),
        "no matching event within a minute; saw {seen:?}"
    );
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_until_finished_and_job_events_in_order() {
    let tq = TestQueue::new("client-events").await;
    let client = Client::from_queue(tq.queue.clone());
    let w = tq.start_worker(fast_worker(&["q"], 2));
    let ok = client
        .enqueue(&JobSpec::new("t", "q", "echo"))
        .await
        .expect("enqueue")
        .id;
    let job = client
        .wait_until_finished(&ok, Duration::from_secs(60))
        .await
        .expect("wait");
    assert_eq!((job.state.as_str(), job.attempts), ("succeeded", 1));
    let events = all_of(client.events(&ok)).await;
    assert_eq!(kinds(&events), [T::Enqueued, T::Started, T::Succeeded]);
    assert!(events.iter().all(|e| e.job == ok && e.queue == "q"));
    assert!(
        events
            .windows(2)
            .all(|p| EventId::parse(&p[0].id) < EventId::parse(&p[1].id))
    );

    let mut bad = JobSpec::new("t", "q", "sleep");
    bad.payload = "{\"bad\":1}".into();
    let dead = client.enqueue(&bad).await.expect("enqueue").id;
    // Followed while it runs, not only replayed afterwards.
    let live = all_of(client.events(&dead)).await;
    assert_eq!(kinds(&live), [T::Enqueued, T::Started, T::Failed, T::Dead]);
    let info = client
        .wait_until_finished(&dead, Duration::from_secs(5))
        .await
        .expect("wait");
    assert_eq!(info.state, "dead");
    w.stop().await;

    // Nothing runs it: the wait runs out and returns the job as it stands.
    let waiting = client
        .enqueue(&JobSpec::new("t", "q", "echo"))
        .await
        .expect("enqueue")
        .id;
    let started = Instant::now();
    let info = client
        .wait_until_finished(&waiting, Duration::from_millis(1500))
        .await
        .expect("wait");
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert!(!info.is_final() && info.state == "ready", "{}", info.state);
    let unknown = client
        .wait_until_finished("0-ffff", Duration::from_secs(5))
        .await;
    assert!(
        matches!(unknown, Err(QueueError::NotFound(_))),
        "{:?}",
        unknown.err()
    );
    tq.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_events_yield_only_that_tenants_jobs() {
    let tq = TestQueue::with_partitions("client-tenants", 2).await;
    let client = Client::from_queue(tq.queue.clone());
    let mut a_events = client.tenant_events("a", Some(EventId::START));
    let (mut a_ids, mut b_ids) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        a_ids.push(tq.enqueue(&JobSpec::new("a", "q", "echo")).await);
        b_ids.push(tq.enqueue(&JobSpec::new("b", "q", "echo")).await);
    }
    let last = a_ids[4].clone();
    let seen = until(&mut a_events, |e| e.job == last).await;
    let jobs: Vec<&str> = seen.iter().map(|e| e.job.as_str()).collect();
    assert_eq!(
        jobs,
        a_ids.iter().map(String::as_str).collect::<Vec<_>>(),
        "a's jobs, in order, once"
    );
    assert!(seen.iter().all(|e| !b_ids.contains(&e.job)));
    assert!(matches!(
        client.tenant_events("bad tenant!", None).next().await,
        Some(Err(QueueError::Invalid(_)))
    ));
    tq.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_resume_after_redis_restarts() {
    let mut redis = PrivateRedis::start(&["--appendonly", "yes", "--appendfsync", "always"])
        .expect("redis-server");
    let tq = TestQueue::with_url("client-restart", &redis.url()).await;
    let client = Client::from_queue(tq.queue.clone());
    let mut tenant = client.tenant_events("t", Some(EventId::START));
    let first = tq.enqueue(&JobSpec::new("t", "q", "echo")).await;
    let mut job = client.events(&first);
    assert_eq!(until(&mut tenant, |_| true).await[0].job, first);
    assert_eq!(until(&mut job, |_| true).await[0].kind, T::Enqueued);

    redis.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    redis.restart().expect("restart redis");
    let second = eventually(Duration::from_secs(60), "redis back", || async {
        tq.queue
            .enqueue(&JobSpec::new("t", "q", "echo"))
            .await
            .ok()
            .map(|e| e.id)
    })
    .await;
    eventually(Duration::from_secs(60), "cancel", || async {
        tq.queue.cancel(&first).await.ok()
    })
    .await;

    let after = until(&mut tenant, |e| e.job == first && e.kind == T::Cancelled).await;
    let got: Vec<(&str, T)> = after.iter().map(|e| (e.job.as_str(), e.kind)).collect();
    assert_eq!(
        got,
        [
            (second.as_str(), T::Enqueued),
            (first.as_str(), T::Cancelled)
        ],
        "nothing lost or repeated"
    );
    let rest = job
        .filter_map(|r| async move { r.ok() })
        .collect::<Vec<_>>();
    let rest = tokio::time::timeout(Duration::from_secs(60), rest)
        .await
        .expect("the job's stream ends");
    assert_eq!(
        kinds(&rest),
        [T::Cancelled],
        "the job's stream resumed and ended"
    );
    tq.cleanup().await;
}
