//! Each background duty driven one pass at a time through `run_once`, as a
//! worker's loop drives it, against the real Redis: the reaper (once per
//! interval fleet-wide), the heartbeat (renews held leases, kills lost
//! ones), the sampler (one worker of the fleet at a time) and the tier
//! publisher. The ledger writer has its own suites (ledger*.rs). Every
//! duty's config rejects what it cannot work with.

mod common;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use agentq::duties::heartbeat::{Beat, Heartbeat, HeartbeatConfig};
use agentq::duties::ledger_writer::LedgerWriterConfig;
use agentq::duties::reaper::{Reaper, ReaperConfig};
use agentq::duties::sampler::{Sampler, SamplerConfig};
use agentq::duties::tier_publisher::{TierPublisher, TierPublisherConfig};
use agentq::executor::{Outcome, Stop};
use agentq::lease::{Held, HeldLease, StopReason};
use agentq::model::limits::{LimitsUpdate, Tier};
use agentq::queue::{AttemptKey, ClaimedJob};
use common::{TestQueue, claim, complete, done, eventually, fill};
use fred::prelude::*;
use tokio_util::sync::CancellationToken;

/// Wait until Redis's clock is past the lease of every job in `jobs`.
async fn until_expired(tq: &TestQueue, jobs: &[ClaimedJob], lease: Duration) {
    let until = jobs.iter().map(|j| j.started_at_ms).max().unwrap_or(0) + lease.as_millis() as i64;
    eventually(Duration::from_secs(10), "leases to expire", || async {
        (tq.redis_now_ms().await > until).then_some(())
    })
    .await;
}

/// A held attempt as a worker records it (partition 0, deadline far off).
fn hold(held: &Held, job: &ClaimedJob) -> Stop {
    let stop = Stop::from(CancellationToken::new());
    let far = Arc::new(AtomicU64::new(u64::MAX));
    held.insert(job.key(), HeldLease::new(job.partition, stop.clone(), far));
    stop
}

/// Lease expiry of job `id` in Redis (ms since the epoch).
async fn lease_expiry(tq: &TestQueue, id: &str) -> Option<f64> {
    tq.leases()
        .await
        .into_iter()
        .find(|(member, _)| member == id)
        .map(|(_, expiry)| expiry)
}

#[tokio::test]
async fn reaper_returns_expired_leases_once_per_interval_fleet_wide() {
    let tq = TestQueue::new("duty-reaper").await;
    fill(&tq.queue, "t", "q", 3).await;
    let lease = Duration::from_millis(300);
    let first = claim(&tq.queue, &["q"], 2, lease).await;
    assert_eq!(first.len(), 2);
    let config = ReaperConfig {
        interval: Duration::from_secs(60),
        batch: 500,
    };
    let reaper = Reaper::new(tq.queue.clone(), config.clone());
    // Nothing has expired yet: the pass runs, reaps nothing.
    assert_eq!(reaper.run_once().await.expect("reap"), 0);
    tq.queue
        .client()
        .del::<i64, _>(tq.queue.keys(0).key(&["reaper"]))
        .await
        .expect("del guard");

    until_expired(&tq, &first, lease).await;
    assert_eq!(reaper.run_once().await.expect("reap"), 2);
    let lost = tq.outbox_outcomes().await;
    assert_eq!(
        lost,
        vec!["lost", "lost"],
        "one ledger record per reaped attempt"
    );
    let again = claim(&tq.queue, &["q"], 3, lease).await;
    assert_eq!(again.len(), 3, "the reaped jobs are ready again");
    let mut attempts: Vec<u32> = again.iter().map(|j| j.attempt).collect();
    attempts.sort();
    assert_eq!(attempts, vec![1, 2, 2]);

    // Within the interval no pass runs again, from this worker or any other.
    until_expired(&tq, &again, lease).await;
    let other = Reaper::new(tq.queue.clone(), config);
    assert_eq!(reaper.run_once().await.expect("reap"), 0);
    assert_eq!(other.run_once().await.expect("reap"), 0);
    assert_eq!(
        tq.outbox_len().await,
        2,
        "nothing reaped inside the interval"
    );
    tq.cleanup().await;
}

#[tokio::test]
async fn heartbeat_renews_held_leases_and_kills_lost_attempts() {
    let tq = TestQueue::new("duty-heartbeat").await;
    fill(&tq.queue, "t", "q", 3).await;
    let long = claim(&tq.queue, &["q"], 1, Duration::from_secs(60)).await;
    let short = claim(&tq.queue, &["q"], 1, Duration::from_millis(300)).await;
    let acked = claim(&tq.queue, &["q"], 1, Duration::from_secs(60)).await;
    let held = Arc::new(Held::default());
    let long_stop = hold(&held, &long[0]);
    let short_stop = hold(&held, &short[0]);
    let config = HeartbeatConfig {
        lease: Duration::from_secs(90),
    };
    let beat = Heartbeat::new(tq.queue.clone(), held.clone(), None, config);

    // Every held lease is extended to a full lease from now.
    let before = lease_expiry(&tq, &long[0].id).await.expect("leased");
    assert_eq!(
        beat.run_once().await,
        Beat {
            renewed: 2,
            lost: 0,
            failed: 0
        }
    );
    let after = lease_expiry(&tq, &long[0].id).await.expect("leased");
    assert!(after > before + 20_000.0, "extended: {before} -> {after}");
    assert!(!long_stop.now.is_cancelled() && !short_stop.now.is_cancelled());

    // The short lease expires before the next beat and is reaped; the job
    // goes to another worker as attempt 2. The next beat hears that the
    // lease is gone and kills this worker's attempt 1 at once.
    tq.queue
        .client()
        .zadd::<i64, _, _>(
            tq.queue.keys(0).key(&["leases"]),
            Some(SetOptions::XX),
            None,
            false,
            false,
            (0.0, short[0].id.as_str()),
        )
        .await
        .expect("expire the short lease now");
    let reaper = Reaper::new(tq.queue.clone(), ReaperConfig::default());
    assert_eq!(reaper.run_once().await.expect("reap"), 1);
    let retaken = claim(&tq.queue, &["q"], 1, Duration::from_secs(60)).await;
    assert_eq!(retaken[0].key(), AttemptKey::new(short[0].id.clone(), 2));
    assert_eq!(
        beat.run_once().await,
        Beat {
            renewed: 1,
            lost: 1,
            failed: 0
        }
    );
    assert!(short_stop.now.is_cancelled(), "the lost attempt is killed");
    assert_eq!(held.reason(&short[0].key()), Some(StopReason::LeaseLost));
    assert!(!long_stop.now.is_cancelled(), "the live attempt runs on");

    // An attempt that ended here and waits for its ack is not killed when
    // its own ack (completing the job) races the beat.
    let _ = hold(&held, &acked[0]);
    held.mark_done(&acked[0].key());
    complete(&tq.queue, &[done(&acked[0], Outcome::Succeeded)]).await;
    let third = beat.run_once().await;
    assert_eq!(
        third.lost, 1,
        "only the earlier lost attempt is named again"
    );
    tq.cleanup().await;
}

/// The Prometheus text this test binary's recorder renders (installed
/// once; only the sampler test records gauges here).
fn rendered() -> String {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .install_recorder()
                .expect("install the recorder")
        })
        .render()
}

#[tokio::test]
async fn sampler_samples_from_one_worker_at_a_time() {
    let tq = TestQueue::new("duty-sampler").await;
    let queue = format!("sampled-{}", tq.ns);
    fill(&tq.queue, "t", &queue, 3).await;
    let _ = rendered();
    let config = SamplerConfig {
        every: Duration::from_millis(200),
    };
    let a = Sampler::new(tq.queue.clone(), "w-a", config.clone());
    let b = Sampler::new(tq.queue.clone(), "w-b", config);
    assert!(a.run_once().await.expect("sample"), "a takes the lock");
    assert!(
        !b.run_once().await.expect("sample"),
        "b waits while a lives"
    );
    assert!(a.run_once().await.expect("sample"), "a keeps it");
    let line = format!("agentq_queue_jobs{{queue=\"{queue}\",state=\"ready\"}} 3");
    let text = rendered();
    assert!(text.lines().any(|l| l == line), "{line} in:\n{text}");

    // a stops (dies): within two periods b takes over, and a, back, waits.
    let took = eventually(Duration::from_secs(10), "b to take over", || async {
        b.run_once()
            .await
            .expect("sample")
            .then_some(Instant::now())
    })
    .await;
    assert!(!a.run_once().await.expect("sample"));
    assert!(took.elapsed() < Duration::from_secs(10));
    tq.cleanup().await;
}

#[tokio::test]
async fn tier_publisher_writes_the_configured_tiers() {
    let tq = TestQueue::new("duty-tiers").await;
    let gold = Tier {
        name: "gold".into(),
        limits: LimitsUpdate {
            max_concurrency: Some(7),
            weight: Some(5),
            ..Default::default()
        },
    };
    let publisher = TierPublisher::new(
        tq.queue.clone(),
        TierPublisherConfig {
            tiers: vec![gold],
            interval: Duration::from_secs(300),
        },
    );
    publisher.config.validate().expect("valid tiers");
    for _ in 0..2 {
        publisher.run_once().await.expect("publish");
        let tiers = agentq::queue::limits::published_tiers(&tq.queue)
            .await
            .expect("read tiers");
        assert_eq!(tiers.len(), 1, "{tiers:?}");
        assert_eq!(tiers[0].name, "gold");
        assert_eq!(tiers[0].limits.max_concurrency, 7);
        assert_eq!(tiers[0].limits.weight, 5);
    }
    // A tenant on the tier is held to it from the next claim on.
    fill(&tq.queue, "t", "q", 9).await;
    agentq::model::limits::LimitsUpdate {
        tier: Some("gold".into()),
        ..Default::default()
    }
    .apply(&tq.queue, agentq::model::limits::Target::Tenant("t"))
    .await
    .expect("assign tier");
    let got = claim(&tq.queue, &["q"], 9, Duration::from_secs(60)).await;
    assert_eq!(got.len(), 7, "capped by the published tier");
    tq.cleanup().await;
}

#[test]
fn every_duty_config_rejects_what_it_cannot_work_with() {
    ReaperConfig::default().validate().expect("default reaper");
    HeartbeatConfig::default()
        .validate()
        .expect("default heartbeat");
    SamplerConfig::default()
        .validate()
        .expect("default sampler");
    TierPublisherConfig::default()
        .validate()
        .expect("default tiers");
    LedgerWriterConfig::default()
        .validate()
        .expect("default writer");

    let bad = [
        ReaperConfig {
            interval: Duration::from_millis(1),
            ..Default::default()
        }
        .validate(),
        ReaperConfig {
            batch: 0,
            ..Default::default()
        }
        .validate(),
        HeartbeatConfig {
            lease: Duration::from_millis(100),
        }
        .validate(),
        SamplerConfig {
            every: Duration::from_millis(10),
        }
        .validate(),
        LedgerWriterConfig {
            batch: 0,
            ..Default::default()
        }
        .validate(),
        LedgerWriterConfig {
            claim_idle: Duration::ZERO,
            ..Default::default()
        }
        .validate(),
        TierPublisherConfig {
            tiers: vec![Tier {
                name: "huge".into(),
                limits: LimitsUpdate {
                    max_concurrency: Some(0),
                    ..Default::default()
                },
            }],
            ..Default::default()
        }
        .validate(),
    ];
    let duties: Vec<&str> = bad
        .iter()
        .map(|r| r.as_ref().expect_err("rejected").duty)
        .collect();
    assert_eq!(
        duties,
        [
            "reaper",
            "reaper",
            "heartbeat",
            "sampler",
            "ledger writer",
            "ledger writer",
            "tier publisher"
        ]
    );
    let e = bad[6].as_ref().unwrap_err().to_string();
    assert!(
        e.contains("tier huge") && e.contains("max-concurrency"),
        "{e}"
    );
}
