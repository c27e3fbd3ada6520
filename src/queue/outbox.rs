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

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

use fred::prelude::*;

use super::{Queue, QueueError};

/// Consumer group name on the outbox stream.
pub const GROUP: &str = "ledger";

/// One outbox entry as read.
#[derive(Clone, Debug)]
pub struct Entry {
    /// The stream entry id.
    pub id: String,
    /// Its fields (name, value, name, value, ...) byte for byte; None when
    /// the entry was already deleted (its id still needs acknowledging).
    pub fields: Option<Vec<Vec<u8>>>,
}

/// Where a read takes entries from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Read {
    /// This reader's own unacknowledged entries (after a failed write;
    /// `XREADGROUP >` never returns them again).
    OwnPending,
    /// Entries idle at least this long with another (dead) reader.
    Reclaim(Duration),
    /// New entries.
    New,
}

/// Reads the outbox streams as one consumer of the group.
pub struct OutboxReader {
    queue: Queue,
    consumer: String,
    /// Streams whose consumer group this reader made sure of (forgotten on
    /// `NOGROUP`, e.g. after Redis lost its data).
    groups: Mutex<BTreeSet<String>>,
}

impl OutboxReader {
    /// A reader named `consumer` (the worker id).
    pub fn new(queue: Queue, consumer: impl Into<String>) -> OutboxReader {
        OutboxReader {
            queue,
            consumer: consumer.into(),
            groups: Mutex::new(BTreeSet::new()),
        }
    }

    /// The stream key of partition `p`.
    pub fn key(&self, p: u32) -> String {
        self.queue.keys(p).key(&["outbox"])
    }

    /// Up to `count` entries of partition `p`'s stream.
    pub async fn read(&self, p: u32, from: Read, count: usize) -> Result<Vec<Entry>, QueueError> {
        let key = self.key(p);
        self.ensure_group(&key).await?;
        let reply = match from {
            Read::Reclaim(idle) => self.autoclaim(&key, idle, count).await,
            _ => self.read_group(&key, from == Read::OwnPending, count).await,
        };
        let reply = reply.inspect_err(|e| {
            if e.to_string().contains("NOGROUP") {
                self.forget_group(&key);
            }
        })?;
        Ok(parse_entries(reply))
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

    async fn ensure_group(&self, key: &str) -> Result<(), QueueError> {
        if self.groups.lock().is_ok_and(|g| g.contains(key)) {
            return Ok(());
        }
        let r: Result<(), fred::error::Error> = self
            .queue
            .client()
            .xgroup_create(key, GROUP, "0", true)
            .await;
        match r {
            Err(e) if !e.details().contains("BUSYGROUP") => Err(e.into()),
            _ => {
                if let Ok(mut g) = self.groups.lock() {
                    g.insert(key.to_string());
                }
                Ok(())
            }
        }
    }

    fn forget_group(&self, key: &str) {
        if let Ok(mut g) = self.groups.lock() {
            g.remove(key);
        }
    }

    async fn autoclaim(
        &self,
        key: &str,
        idle: Duration,
        count: usize,
    ) -> Result<Value, QueueError> {
        let args: Vec<Value> = vec![
            key.into(),
            GROUP.into(),
            self.consumer.as_str().into(),
            idle.as_millis().to_string().into(),
            "0-0".into(),
            "COUNT".into(),
            count.to_string().into(),
        ];
        let reply: Value = self
            .queue
            .client()
            .custom(fred::cmd!("XAUTOCLAIM"), args)
            .await?;
        Ok(match reply {
            Value::Array(mut parts) if parts.len() >= 2 => parts.swap_remove(1),
            _ => Value::Null,
        })
    }

    async fn read_group(&self, key: &str, own: bool, count: usize) -> Result<Value, QueueError> {
        let args: Vec<Value> = vec![
            "GROUP".into(),
            GROUP.into(),
            self.consumer.as_str().into(),
            "COUNT".into(),
            count.to_string().into(),
            "STREAMS".into(),
            key.into(),
            if own { "0" } else { ">" }.into(),
        ];
        // Route by the stream key: by default a custom command is sent to
        // the slot of its first string argument, here "GROUP".
        let on_key = fred::types::ClusterHash::from(key);
        let reply: Value = self
            .queue
            .client()
            .custom(fred::cmd!("XREADGROUP", hash: on_key), args)
            .await?;
        // [[key, [entries...]]] (RESP2) or {key: [entries]} (RESP3)
        Ok(match reply {
            Value::Array(mut streams) if !streams.is_empty() => match streams.swap_remove(0) {
                Value::Array(mut kv) if kv.len() == 2 => kv.swap_remove(1),
                _ => Value::Null,
            },
            Value::Map(m) => m.inner().into_values().next().unwrap_or(Value::Null),
            _ => Value::Null,
        })
    }
}

/// Parse `[[id, [field, value, ...]], ...]`; an entry whose body is gone
/// keeps its id with no fields.
fn parse_entries(v: Value) -> Vec<Entry> {
    let Value::Array(entries) = v else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let Value::Array(mut pair) = e else { continue };
        if pair.len() != 2 {
            continue;
        }
        let fields = pair.pop().unwrap_or(Value::Null);
        let Some(id) = pair.pop().and_then(|i| i.as_string()) else {
            continue;
        };
        let fields = match fields {
            Value::Null => None,
            Value::Array(f) => Some(f.iter().map(bytes).collect()),
            other => Some(vec![bytes(&other)]),
        };
        out.push(Entry { id, fields });
    }
    out
}

/// A stream field's bytes as received.
fn bytes(v: &Value) -> Vec<u8> {
    v.as_bytes()
        .map(<[u8]>::to_vec)
        .or_else(|| v.as_string().map(String::into_bytes))
        .unwrap_or_default()
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
