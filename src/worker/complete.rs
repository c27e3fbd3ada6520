//! The completion loop: acknowledges finished attempts in batches, one
//! script call per partition, repeating a call whose reply was lost with
//! the same call id until Redis answers. An unacknowledged attempt keeps
//! its lease (the heartbeat goes on), so nothing is lost or run twice
//! meanwhile.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{Notify, mpsc};

use crate::lease::{AttemptKey, Held};
use crate::model::attempt::HandBack;
use crate::queue::{Call, CompleteStatus, Completion, Queue, QueueError};

use super::Counters;
use super::attempt::Finished;

/// Acknowledge finished attempts in batches, one script call per partition.
/// Retries until Redis takes them: an unacknowledged attempt keeps its lease
/// (the heartbeat goes on), so nothing is lost or run twice meanwhile.
pub(super) async fn complete_loop(
    queue: Queue,
    worker: String,
    mut rx: mpsc::UnboundedReceiver<Finished>,
    held: Arc<Held>,
    slot_freed: Arc<Notify>,
    counters: Arc<Counters>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < 512 {
            match rx.try_recv() {
                Ok(f) => batch.push(f),
                Err(_) => break,
            }
        }
        let mut done: BTreeMap<u32, Vec<Completion>> = BTreeMap::new();
        let mut labels: std::collections::HashMap<AttemptKey, (String, String)> =
            std::collections::HashMap::new();
        let mut back: BTreeMap<u32, Vec<HandBack>> = BTreeMap::new();
        for f in batch {
            match f {
                Finished::Complete {
                    partition,
                    key,
                    completion,
                    queue,
                    tenant,
                } => {
                    labels.insert(key, (queue, tenant));
                    done.entry(partition).or_default().push(completion)
                }
                Finished::Release { partition, back: b } => {
                    back.entry(partition).or_default().push(b)
                }
            }
        }
        for (p, list) in done {
            let call = Call::new(worker.clone());
            let done = retry("complete", || queue.complete(p, &call, &list)).await;
            crate::metrics::record_events(&done.events);
            for (c, s) in list.iter().zip(done.statuses) {
                let key = AttemptKey::new(c.id.clone(), c.attempt);
                if let Some((q, t)) = labels.get(&key) {
                    crate::metrics::completed(
                        q,
                        t,
                        c.outcome.as_str(),
                        Duration::from_millis(c.run_ms),
                        s.as_str(),
                    );
                }
                if s == CompleteStatus::Refused {
                    counters.refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(job = %c.id, attempt = c.attempt, "completion refused: the lease was lost and the job handed to another worker");
                } else {
                    if s == CompleteStatus::Cancelled {
                        // complete.lua closed the marked attempt as cancelled
                        // with this worker's figures, and freed its slot.
                        tracing::info!(job = %c.id, attempt = c.attempt, "cancelled attempt closed");
                    }
                    counters.completed.fetch_add(1, Ordering::Relaxed);
                }
                held.remove(&key);
            }
        }
        for (p, list) in back {
            let call = Call::new(worker.clone());
            let back = retry("release", || {
                queue.release(p, &call, "interrupted: worker shutting down", &list)
            })
            .await;
            crate::metrics::record_events(&back.events);
            counters
                .released
                .fetch_add(back.released, Ordering::Relaxed);
            for b in &list {
                held.remove(&b.key);
            }
        }
        slot_freed.notify_one();
    }
}

/// Run `f` until it succeeds, with the shared retry pacing
/// ([`crate::model::backoff`]); the caller keeps the call id, so a repeat
/// after a lost reply answers as the first call did.
pub(super) async fn retry<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, QueueError>>,
{
    use backon::Retryable;
    loop {
        let attempt = (|| f())
            .retry(crate::model::backoff::policy())
            .sleep(tokio::time::sleep)
            .notify(|e: &QueueError, wait: Duration| {
                tracing::warn!(error = %e, retry_in = ?wait, "{what} failed; retrying");
            });
        match attempt.await {
            Ok(v) => return v,
            // The policy sets no limit; were one set, start over.
            Err(e) => tracing::warn!(error = %e, "{what}: retries ran out; starting over"),
        }
    }
}
