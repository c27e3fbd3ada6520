//! A reply lost after Redis acted: the connection drops right after Redis
//! ran a script (a proxy that eats the reply and hangs up), or Redis stalls
//! past the client's timeout (`DEBUG SLEEP` on a private server). Nothing
//! may be done twice: no duplicate job from an enqueue, no claimed batch
//! stranded until its leases lapse (which would cost every job an attempt,
//! and with `max_attempts` 1 kill it unrun).

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use agentq::queue::{Call, JobSpec, Queue, QueueConfig, QueueError};
use agentq_servers::PrivateRedis;
use common::{TestQueue, eventually};
use fred::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A TCP proxy to Redis that, when armed, swallows the next reply and
/// closes the connection: the command reached Redis and ran, its reply
/// never reaches the client.
struct LossyProxy {
    port: u16,
    drop_next_reply: Arc<AtomicBool>,
}

impl LossyProxy {
    async fn start(upstream: String) -> LossyProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let drop_next_reply = Arc::new(AtomicBool::new(false));
        let armed = drop_next_reply.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                tokio::spawn(pump(client, server, armed.clone()));
            }
        });
        LossyProxy {
            port,
            drop_next_reply,
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn lose_next_reply(&self) {
        self.drop_next_reply.store(true, Ordering::SeqCst);
    }
}

async fn pump(client: TcpStream, server: TcpStream, armed: Arc<AtomicBool>) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n) = cr.read(&mut buf).await {
            if n == 0 || sw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    });
    let mut buf = vec![0u8; 64 << 10];
    while let Ok(n) = sr.read(&mut buf).await {
        if n == 0 || armed.swap(false, Ordering::SeqCst) {
            break; // the reply dies here, and the connection with it
        }
        if cw.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    up.abort();
}

async fn queue_at(url: &str, ns: &str) -> Queue {
    let mut cfg = QueueConfig::new(url);
    cfg.namespace = ns.to_string();
    Queue::connect(cfg).await.expect("connect")
}

#[tokio::test]
async fn an_enqueue_whose_reply_is_lost_is_not_done_twice() {
    let tq = TestQueue::new("lost-enqueue").await;
    let proxy = LossyProxy::start("127.0.0.1:6379".into()).await;
    let q = queue_at(&proxy.url(), &tq.ns).await;
    proxy.lose_next_reply();
    let r = q.enqueue(&JobSpec::new("t", "q", "noop")).await;
    assert!(
        matches!(r, Err(QueueError::Unknown(_))),
        "a lost reply is an unknown outcome, not a success nor a plain failure: {r:?}"
    );
    let msg = r.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(msg.contains("idempotency key"), "says how to retry: {msg}");
    let stats = agentq::queue::inspect::queue_stats(&tq.queue)
        .await
        .expect("stats");
    let ready: i64 = stats.iter().map(|s| s.ready).sum();
    assert_eq!(ready, 1, "the enqueue ran once (never re-sent)");
    tq.cleanup().await;
}

#[tokio::test]
async fn a_claim_whose_reply_is_lost_hands_out_its_jobs_when_repeated() {
    let tq = TestQueue::new("lost-claim").await;
    let jobs: Vec<JobSpec> = (0..6).map(|_| JobSpec::new("t", "q", "noop")).collect();
    tq.queue.enqueue_batch(&jobs).await.expect("enqueue");
    let proxy = LossyProxy::start("127.0.0.1:6379".into()).await;
    let q = queue_at(&proxy.url(), &tq.ns).await;
    let mut call = Call::new("w-lost");
    let queues = ["q".to_string()];
    let lease = Duration::from_secs(60);
    proxy.lose_next_reply();
    let first = q.claim(0, &call, 3, lease, &queues).await;
    assert!(
        matches!(first, Err(QueueError::Unknown(_))),
        "the lost reply surfaces: {first:?}"
    );
    // The worker repeats the call with the same id (once Redis answers).
    let again = eventually(Duration::from_secs(10), "the repeated claim", || async {
        q.claim(0, &call, 3, lease, &queues).await.ok()
    })
    .await;
    assert_eq!(
        again.jobs.len(),
        3,
        "the first call's jobs, handed out again"
    );
    assert_eq!(
        tq.leases().await.len(),
        3,
        "no other job was claimed: nothing is stranded under a lease nobody holds"
    );
    // A new call claims the rest.
    call.renew();
    let rest = q.claim(0, &call, 10, lease, &queues).await.expect("claim");
    assert_eq!(rest.jobs.len(), 3);
    let mut ids: Vec<String> = again
        .jobs
        .iter()
        .chain(&rest.jobs)
        .map(|j| j.id.clone())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 6, "six different jobs");
    tq.cleanup().await;
}

/// A worker whose Redis stalls past the client timeout (`DEBUG SLEEP`)
/// while it claims and completes: every job runs once, none loses an
/// attempt to a stranded lease, no completion is counted as refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_stall_past_the_client_timeout_runs_every_job_once() {
    let server =
        tokio::task::spawn_blocking(|| PrivateRedis::start(&["--enable-debug-command", "yes"]))
            .await
            .expect("join")
            .expect("redis-server");
    let ns = common::namespace("stall");
    let mut cfg = QueueConfig::new(server.url());
    cfg.namespace = ns.clone();
    cfg.command_timeout = Duration::from_millis(300);
    let q = Queue::connect(cfg).await.expect("connect");
    let tq = TestQueue {
        queue: q.clone(),
        ns,
    };
    // Due in 1.5 s: the worker's claims for them fall inside the stall.
    let jobs: Vec<JobSpec> = (0..8)
        .map(|i| {
            let mut s = JobSpec::new(format!("t{}", i % 2), "q", "noop");
            s.delay = Some(Duration::from_millis(1500));
            s.max_attempts = Some(1);
            s
        })
        .collect();
    let ids = tq.enqueue_all(&jobs).await;
    let mut wc = common::fast_worker(&["q"], 8);
    wc.lease = Duration::from_secs(3);
    let worker = tq.start_worker(wc);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let admin = Client::new(
        Config::from_url(&server.url()).expect("url"),
        None,
        None,
        None,
    );
    admin.init().await.expect("admin");
    let _: Value = admin
        .custom(fred::cmd!("DEBUG"), vec!["SLEEP", "1.5"])
        .await
        .expect("DEBUG SLEEP");
    common::drained(&tq, Duration::from_secs(30)).await;
    let summary = worker.stop().await;
    let states = tq.job_states(&ids).await;
    for (id, (state, attempts, err)) in ids.iter().zip(&states) {
        assert_eq!(
            (state.as_str(), *attempts),
            ("succeeded", 1),
            "job {id}: {err}"
        );
    }
    let outcomes: HashMap<String, usize> =
        tq.outbox()
            .await
            .into_iter()
            .fold(HashMap::new(), |mut m, r| {
                *m.entry(r["outcome"].clone()).or_default() += 1;
                m
            });
    assert_eq!(
        outcomes,
        HashMap::from([("succeeded".to_string(), 8)]),
        "one record per job, none lost to a stranded lease"
    );
    assert_eq!(summary.refused, 0, "no completion was wrongly refused");
    drop(server);
}
