//! Reading job events: each tenant's stream `B:events:<tenant>`, written by
//! the scripts in the same atomic step as the state change
//! (`scripts/lib/feed.lua`).
//!
//! Two ways in. [`Queue::job_events_after`] reads what is retained after a
//! position (a catch-up, or a poll) on the queue's shared connection.
//! [`EventReader`] waits for new events (`XREAD BLOCK`) on a connection of
//! its own, because a blocked connection holds up every command queued
//! behind it: one reader per partition serves every follower of that
//! partition's tenants (see `http::events`).
//!
//! Retention is bounded (`events_max` entries per tenant, and
//! `events_ttl_ms` after the last event; partition settings): a follower
//! that resumes from a position still retained misses nothing, one that
//! resumes from a trimmed position gets what is left.

use std::time::Duration;

use fred::prelude::*;

use super::{Queue, QueueError, job};
use crate::model::job_event::{EventId, JobEvent};

/// Where a follower of one tenant's stream stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cursor {
    /// The tenant.
    pub tenant: String,
    /// The last event it has.
    pub after: EventId,
}

/// Events read from one stream.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EventBatch {
    /// The events, oldest first.
    pub events: Vec<JobEvent>,
    /// The position of the last entry read, event or not (None: nothing
    /// read): resume after it, so an entry that is not an event (written by
    /// hand, or by a newer version in a shape this one cannot read) is
    /// skipped once rather than read again forever.
    pub last: Option<EventId>,
}

/// Events read for one tenant.
#[derive(Clone, Debug, PartialEq)]
pub struct TenantEvents {
    /// The tenant.
    pub tenant: String,
    /// What was read.
    pub batch: EventBatch,
}

impl Queue {
    /// The key of `tenant`'s event stream (in its partition).
    pub fn events_key(&self, tenant: &str) -> String {
        self.keys(self.partition_of(tenant))
            .key(&["events", tenant])
    }

    /// Up to `count` of `tenant`'s retained events after `after`, oldest first.
    pub async fn job_events_after(
        &self,
        tenant: &str,
        after: EventId,
        count: usize,
    ) -> Result<EventBatch, QueueError> {
        job::validate_name("tenant", tenant)?;
        let args: Vec<Value> = vec![
            self.events_key(tenant).into(),
            format!("({after}").into(),
            "+".into(),
            "COUNT".into(),
            count.max(1).to_string().into(),
        ];
        let reply: Value = self.client().custom(fred::cmd!("XRANGE"), args).await?;
        Ok(parse_entries(reply))
    }

    /// The position of `tenant`'s newest event ([`EventId::START`] when it
    /// has none retained): following from here gets only what comes next.
    pub async fn job_events_head(&self, tenant: &str) -> Result<EventId, QueueError> {
        job::validate_name("tenant", tenant)?;
        let args: Vec<Value> = vec![
            self.events_key(tenant).into(),
            "+".into(),
            "-".into(),
            "COUNT".into(),
            "1".into(),
        ];
        let reply: Value = self.client().custom(fred::cmd!("XREVRANGE"), args).await?;
        Ok(entry_ids(&reply)
            .into_iter()
            .next()
            .unwrap_or(EventId::START))
    }

    /// Publish a running attempt's progress report (`report`: JSON text,
    /// already bounded by the caller) as a `progress` event, and keep it on
    /// the job (field `progress`). Fenced by attempt: false when that
    /// attempt is no longer running, and nothing is written.
    pub async fn report_progress(
        &self,
        job_id: &str,
        attempt: u32,
        report: &str,
    ) -> Result<bool, QueueError> {
        let p = self.partition_of_job(job_id)?;
        let args = vec![job_id.to_string(), attempt.to_string(), report.to_string()];
        let v = self.call(super::ScriptName::Progress, p, args).await?;
        Ok(matches!(v, Value::Integer(1)))
    }

    /// Turn job events of `queue` on or off in every partition (on by
    /// default). Off, its jobs' state changes write nothing to the tenant
    /// streams: followers of its jobs see nothing, and long polls fall back
    /// to polling the job.
    pub async fn set_job_events(&self, queue: &str, on: bool) -> Result<(), QueueError> {
        job::validate_name("queue", queue)?;
        for p in 0..self.partitions() {
            let key = self.keys(p).key(&["qfeed"]);
            if on {
                let _: i64 = self.client().hdel(&key, queue).await?;
            } else {
                let _: i64 = self.client().hset(&key, (queue, "0")).await?;
            }
        }
        Ok(())
    }

    /// Whether `queue` publishes job events (read from partition 0; every
    /// partition is set alike).
    pub async fn job_events_on(&self, queue: &str) -> Result<bool, QueueError> {
        job::validate_name("queue", queue)?;
        let v: Option<String> = self
            .client()
            .hget(self.keys(0).key(&["qfeed"]), queue)
            .await?;
        Ok(v.as_deref() != Some("0"))
    }
}

/// Waits for new job events on a connection of its own.
pub struct EventReader {
    queue: Queue,
    client: Client,
}

impl EventReader {
    /// A reader for `queue`'s namespace, with its own connection (same URL
    /// forms and reconnect policy as the queue's).
    pub async fn connect(queue: &Queue) -> Result<EventReader, QueueError> {
        let cfg = queue.config();
        // A blocking read must not be cut short by the command timeout.
        let timeout = cfg.command_timeout.max(Duration::from_secs(30));
        let client = super::client_builder(&cfg.redis_url, timeout)?.build()?;
        client.init().await?;
        Ok(EventReader {
            queue: queue.clone(),
            client,
        })
    }

    /// Close its connection.
    pub async fn close(self) {
        if let Err(e) = self.client.quit().await {
            tracing::debug!(error = %e, "closing the job event reader's connection");
        }
    }

    /// Wait up to `block` for events after the cursors (tenants of one
    /// partition, `partition`), at most `count` per tenant. Returns as soon
    /// as any has some; empty when the wait ran out.
    pub async fn read(
        &self,
        partition: u32,
        cursors: &[Cursor],
        block: Duration,
        count: usize,
    ) -> Result<Vec<TenantEvents>, QueueError> {
        if cursors.is_empty() {
            tokio::time::sleep(block).await;
            return Ok(Vec::new());
        }
        let keys = self.queue.keys(partition);
        let mut args: Vec<Value> = vec![
            "COUNT".into(),
            count.max(1).to_string().into(),
            "BLOCK".into(),
            (block.as_millis() as u64).to_string().into(),
            "STREAMS".into(),
        ];
        let mut by_key = std::collections::HashMap::new();
        for c in cursors {
            let key = keys.key(&["events", &c.tenant]);
            by_key.insert(key.clone(), c.tenant.clone());
            args.push(key.into());
        }
        args.extend(cursors.iter().map(|c| Value::from(c.after.to_string())));
        // Routed by the partition's hash tag: every key shares it.
        let on = fred::types::ClusterHash::from(keys.base());
        let reply: Value = self
            .client
            .custom(fred::cmd!("XREAD", hash: on, blocking: true), args)
            .await?;
        Ok(parse_streams(reply)
            .into_iter()
            .filter_map(|(key, entries)| {
                Some(TenantEvents {
                    tenant: by_key.get(&key)?.clone(),
                    batch: parse_entries(entries),
                })
            })
            .collect())
    }
}

/// `[[key, entries], ...]` (RESP2) or `{key: entries}` (RESP3).
fn parse_streams(v: Value) -> Vec<(String, Value)> {
    match v {
        Value::Array(streams) => streams
            .into_iter()
            .filter_map(|s| match s {
                Value::Array(mut kv) if kv.len() == 2 => {
                    let entries = kv.pop()?;
                    Some((kv.pop()?.as_string()?, entries))
                }
                _ => None,
            })
            .collect(),
        Value::Map(m) => m
            .inner()
            .into_iter()
            .filter_map(|(k, v)| Some((k.as_str()?.to_string(), v)))
            .collect(),
        _ => Vec::new(),
    }
}

/// `[[id, [field, value, ...]], ...]` into events; entries that are not
/// events are skipped, but count in [`EventBatch::last`].
pub fn parse_entries(v: Value) -> EventBatch {
    let Value::Array(entries) = v else {
        return EventBatch::default();
    };
    let mut batch = EventBatch::default();
    for e in entries {
        let Value::Array(mut pair) = e else { continue };
        let (Some(fields), Some(id)) = (pair.pop(), pair.pop().and_then(|i| i.as_string())) else {
            continue;
        };
        if let Some(at) = EventId::parse(&id) {
            batch.last = Some(at);
        }
        let Value::Array(fields) = fields else {
            continue;
        };
        let text: Vec<String> = fields.iter().map(lossy).collect();
        let pairs = text.chunks_exact(2).map(|p| (p[0].as_str(), p[1].as_str()));
        batch.events.extend(JobEvent::from_fields(&id, pairs));
    }
    batch
}

fn entry_ids(v: &Value) -> Vec<EventId> {
    let Value::Array(entries) = v else {
        return Vec::new();
    };
    entries
        .iter()
        .filter_map(|e| match e {
            Value::Array(pair) => EventId::parse(&pair.first()?.as_string()?),
            _ => None,
        })
        .collect()
}

/// A field's text; bytes that are not UTF-8 replaced, never refused.
fn lossy(v: &Value) -> String {
    match v.as_bytes() {
        Some(b) => String::from_utf8_lossy(b).into_owned(),
        None => v.as_string().unwrap_or_default(),
    }
}
