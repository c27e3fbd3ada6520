//! Waking idle claim loops: every partition has a pub/sub channel
//! (`B:wake`) on which scripts announce that a tenant became claimable; a
//! message marks its partition and wakes the loop.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use fred::prelude::*;
use tokio::sync::Notify;

use crate::queue::{Queue, QueueError};

/// Subscribe to every partition's wake channel; each message marks its
/// partition in `woken` and wakes the claim loop.
pub(super) async fn subscribe_wake(
    queue: &Queue,
    wake: Arc<Notify>,
    woken: Arc<Vec<AtomicBool>>,
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
