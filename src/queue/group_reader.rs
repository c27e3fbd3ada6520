//! One consumer of a Redis stream's consumer group, as both durable
//! outboxes are read: the ledger's usage records (`B:outbox`,
//! [`super::outbox`]) and the tenants' alerts (`B:alerts`,
//! [`super::alerts`]). A read takes this consumer's own pending entries,
//! entries idle too long with a dead consumer (`XAUTOCLAIM`), or new ones;
//! the group is created on first use and again after `NOGROUP` (Redis lost
//! its data). An entry deleted before it was acknowledged comes back with
//! no body ([`Entry::fields`] `None`), to be acknowledged.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

use fred::prelude::*;

use super::{Queue, QueueError};

/// One stream entry as read.
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

/// One consumer of one group, over any of its streams.
pub(crate) struct GroupReader {
    queue: Queue,
    group: &'static str,
    consumer: String,
    /// Streams whose group this reader made sure of (forgotten on
    /// `NOGROUP`).
    groups: Mutex<BTreeSet<String>>,
}

impl GroupReader {
    pub(crate) fn new(queue: Queue, group: &'static str, consumer: String) -> GroupReader {
        GroupReader {
            queue,
            group,
            consumer,
            groups: Mutex::new(BTreeSet::new()),
        }
    }

    /// The consumer name.
    pub(crate) fn consumer(&self) -> &str {
        &self.consumer
    }

    /// Up to `count` entries of the stream `key`.
    pub(crate) async fn read(
        &self,
        key: &str,
        from: Read,
        count: usize,
    ) -> Result<Vec<Entry>, QueueError> {
        self.ensure_group(key).await?;
        let reply = match from {
            Read::Reclaim(idle) => self.autoclaim(key, idle, count).await,
            _ => self.read_group(key, from == Read::OwnPending, count).await,
        };
        let reply = reply.inspect_err(|e| {
            if e.to_string().contains("NOGROUP") {
                self.forget_group(key);
            }
        })?;
        Ok(parse_entries(reply))
    }

    async fn ensure_group(&self, key: &str) -> Result<(), QueueError> {
        if self.groups.lock().is_ok_and(|g| g.contains(key)) {
            return Ok(());
        }
        let r: Result<(), fred::error::Error> = self
            .queue
            .client()
            .xgroup_create(key, self.group, "0", true)
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
            self.group.into(),
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
            self.group.into(),
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
pub(crate) fn parse_entries(v: Value) -> Vec<Entry> {
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
