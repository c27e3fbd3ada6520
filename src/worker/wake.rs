//! Waking idle claim loops: every partition has a pub/sub channel
//! (`B:wake`) on which scripts announce that a tenant became claimable; a
//! message marks its partition and wakes the loop. `cancel.lua` says
//! `cancel <job> <attempt>` on the same channel when it cancels a running
//! job: the worker holding that attempt kills it at once and completes it
//! (`complete.lua` closes it as `cancelled`; the slot is held until then).
//! Should the message be missed, the next heartbeat (`extend.lua`) reports
//! the cancel, a third of a lease later at most.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use fred::prelude::*;
use tokio::sync::Notify;

use crate::lease::{AttemptKey, Held, StopReason};
use crate::queue::{Queue, QueueError};

/// The attempt a `cancel <job> <attempt>` message names.
fn cancelled_attempt(msg: &str) -> Option<AttemptKey> {
    let mut parts = msg.strip_prefix("cancel ")?.split(' ');
    let id = parts.next()?;
    let attempt = parts.next()?.parse().ok()?;
    Some(AttemptKey::new(id, attempt))
}

/// Subscribe to every partition's wake channel; each message marks its
/// partition in `woken` and wakes the claim loop.
pub(super) async fn subscribe_wake(
    queue: &Queue,
    wake: Arc<Notify>,
    woken: Arc<Vec<AtomicBool>>,
    held: Arc<Held>,
) -> Result<fred::clients::SubscriberClient, QueueError> {
    // The queue's own connection settings and URL forms: behind Sentinels
    // the subscriber asks them for the primary at every reconnect, so after
    // a failover it resubscribes on the promoted replica.
    let sub =
        crate::queue::client_builder(&queue.config().redis_url, queue.config().command_timeout)?
            .build_subscriber_client()?;
    sub.init().await?;
    // Detached: it resubscribes after reconnects for as long as the client lives.
    drop(sub.manage_subscriptions());
    let channels: Vec<String> = (0..queue.partitions())
        .map(|p| queue.keys(p).key(&["wake"]))
        .collect();
    let by_channel: std::collections::HashMap<String, usize> = channels
        .iter()
        .enumerate()
        .map(|(p, c)| (c.clone(), p))
        .collect();
    sub.subscribe(channels).await?;
    let mut rx = sub.message_rx();
    tokio::spawn(async move {
        loop {
            match rx.recv().await {
                Ok(m) => {
                    if let Some(key) = m.value.as_str().as_deref().and_then(cancelled_attempt)
                        && held.stop(&key, StopReason::Cancelled)
                    {
                        tracing::info!(attempt = %key, "job cancelled while running; killing the attempt");
                    }
                    if let Some(flag) = by_channel.get(&*m.channel) {
                        woken[*flag].store(true, Ordering::Relaxed);
                    }
                    wake.notify_one()
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    woken.iter().for_each(|w| w.store(true, Ordering::Relaxed));
                    wake.notify_one()
                }
                Err(_) => return,
            }
        }
    });
    Ok(sub)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_messages_name_one_attempt() {
        assert_eq!(
            cancelled_attempt("cancel 0-18f3a 2"),
            Some(AttemptKey::new("0-18f3a", 2))
        );
        assert_eq!(cancelled_attempt("1"), None);
        assert_eq!(cancelled_attempt("cancel 0-18f3a x"), None);
    }
}
