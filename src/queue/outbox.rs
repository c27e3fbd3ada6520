//! The outbox: each partition's stream of usage records (`B:outbox`),
//! written by the scripts that close attempts and read by the ledger writer
//! through the consumer group [`GROUP`].
//!
//! Reading is at-least-once: an entry stays pending with the consumer that
//! read it until [`OutboxReader::ack`], and entries pending too long with a
//! consumer that died are taken over (`XAUTOCLAIM`). [`OutboxReader::ack`]
//! deletes before acknowledging: a reader killed in between leaves pending
//! ids with no body, which the next read hands back as [`Entry::fields`]
//! `None` (to acknowledge), so nothing stays in the stream.

use fred::prelude::*;

use super::group_reader::GroupReader;
use super::{Queue, QueueError};

/// Consumer group name on the outbox stream.
pub const GROUP: &str = "ledger";

pub use super::group_reader::{Entry, Read};

/// Reads the outbox streams as one consumer of the group.
pub struct OutboxReader {
    queue: Queue,
    reader: GroupReader,
}

impl OutboxReader {
    /// A reader named `consumer` (the worker id).
    pub fn new(queue: Queue, consumer: impl Into<String>) -> OutboxReader {
        OutboxReader {
            reader: GroupReader::new(queue.clone(), GROUP, consumer.into()),
            queue,
        }
    }

    /// The stream key of partition `p`.
    pub fn key(&self, p: u32) -> String {
        self.queue.keys(p).key(&["outbox"])
    }

    /// Up to `count` entries of partition `p`'s stream.
    pub async fn read(&self, p: u32, from: Read, count: usize) -> Result<Vec<Entry>, QueueError> {
        self.reader.read(&self.key(p), from, count).await
    }

    /// Delete, then acknowledge, the entries `ids` of partition `p`.
    pub async fn ack(&self, p: u32, ids: &[String]) -> Result<(), QueueError> {
        if ids.is_empty() {
            return Ok(());
        }
        let key = self.key(p);
        let client = self.queue.client();
        let _: i64 = client.xdel(&key, ids.to_vec()).await?;
        let _: i64 = client.xack(&key, GROUP, ids.to_vec()).await?;
        Ok(())
    }
}

/// Usage records waiting in every partition's outbox: growing while
/// PostgreSQL is down, zero when the ledger has caught up.
pub async fn backlog(q: &Queue) -> Result<u64, QueueError> {
    let mut n = 0;
    for p in 0..q.partitions() {
        let len: u64 = q.client().xlen(q.keys(p).key(&["outbox"])).await?;
        n += len;
    }
    Ok(n)
}
