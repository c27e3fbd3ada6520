//! Usage alerts: crossing 80% and 100% of a tenant's quota, and starting at
//! twice the expected rate, each emit one event (log line and metric).

mod common;

use std::time::Duration;

use agentq::executor::Outcome;
use agentq::model::limits::{LimitsUpdate, Rate, Target};
use agentq::queue::{Completion, JobSpec};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};

type Entries = Vec<(
    metrics_util::CompositeKey,
    Option<metrics::Unit>,
    Option<metrics::SharedString>,
    DebugValue,
)>;

fn counters(all: &Entries, name: &str) -> Vec<(Vec<(String, String)>, u64)> {
    all.iter()
        .filter(|(k, ..)| k.key().name() == name)
        .map(|(k, _, _, v)| {
            let labels = k
                .key()
                .labels()
                .map(|l| (l.key().to_string(), l.value().to_string()))
                .collect();
            let n = match v {
                DebugValue::Counter(n) => *n,
                _ => 0,
            };
            (labels, n)
        })
        .collect()
}

#[test]
fn quota_and_rate_alerts_fire_once_at_their_thresholds() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let tq = common::TestQueue::new("alerts").await;
            LimitsUpdate {
                max_concurrency: Some(1),
                quota: Some(Duration::from_secs(1)),
                expected_rate: Some(Rate {
                    starts: 1,
                    period: Duration::from_secs(60),
                }),
                ..Default::default()
            }
            .apply(&tq.queue, Target::Tenant("t"))
            .await
            .expect("set");
            let jobs: Vec<JobSpec> = (0..6).map(|_| JobSpec::new("t", "q", "noop")).collect();
            tq.queue.enqueue_batch(&jobs).await.expect("enqueue");
            // 4 x 300ms: 300, 600, 900 (past 80%), 1200 (past 100%), then held.
            // The scripts report the thresholds; the caller records them,
            // as the worker does.
            let queues = ["q".to_string()];
            for _ in 0..6 {
                let claimed = tq
                    .queue
                    .claim(
                        0,
                        &agentq::queue::Call::new("w"),
                        1,
                        Duration::from_secs(30),
                        &queues,
                    )
                    .await
                    .expect("claim");
                agentq::metrics::record_events(&claimed.events);
                for j in claimed.jobs {
                    let c = Completion {
                        run_ms: 300,
                        ..common::done(&j, Outcome::Succeeded)
                    };
                    let done = tq
                        .queue
                        .complete(0, &agentq::queue::Call::new("w"), &[c])
                        .await
                        .expect("complete");
                    agentq::metrics::record_events(&done.events);
                }
            }
            tq.cleanup().await;
        });
    });
    // One snapshot: taking it drains the counters.
    let all = snap.snapshot().into_vec();
    let mut quota = counters(&all, agentq::metrics::QUOTA_ALERTS);
    quota.sort();
    let thresholds: Vec<(String, u64)> = quota
        .iter()
        .map(|(labels, n)| {
            (
                labels
                    .iter()
                    .find(|(k, _)| k == "threshold")
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default(),
                *n,
            )
        })
        .collect();
    assert_eq!(
        thresholds,
        vec![("100".to_string(), 1), ("80".to_string(), 1)],
        "{quota:?}"
    );
    // Expected 1 start/min: the third start in a minute is twice that.
    let rate = counters(&all, agentq::metrics::RATE_ALERTS);
    assert_eq!(rate.iter().map(|(_, n)| n).sum::<u64>(), 1, "{rate:?}");
}
