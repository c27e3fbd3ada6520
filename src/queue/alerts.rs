//! Tenant alerts in Redis: each tenant's webhook (`B:webhook:<t>`), the
//! partition's alert stream (`B:alerts`, written by the scripts in the step
//! that raises an alert, read by the webhook duty through the consumer group
//! [`GROUP`]), the failed-attempt counts (`B:alerts:tries`) and the alerts
//! given up on (`B:alerts:dead`).
//!
//! The scripts side is `scripts/lib/events.lua`: an event word
//! `<kind>:<tenant>` of a tenant whose webhook takes the kind's group, and a
//! job going dead, are appended to `B:alerts` atomically with the change
//! that raised them. Reading is at-least-once, as the outbox's
//! ([`super::outbox`]): an entry stays pending with the consumer that read
//! it until it is delivered ([`AlertReader::ack`]) or dead-lettered, and a
//! dead consumer's entries are taken over with `XAUTOCLAIM`.

use std::collections::HashMap;

use fred::prelude::*;
use serde::Serialize;

use super::{Queue, QueueError};
use crate::model::events::parse_alert_groups;
use crate::model::names::validate_name;

/// Consumer group of the webhook duty on every partition's `B:alerts`.
pub const GROUP: &str = "webhooks";

/// Dead-lettered alerts kept per partition (the oldest are trimmed).
pub const DEAD_KEPT: u64 = 10_000;

/// A tenant's webhook as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Webhook {
    /// The tenant.
    pub tenant: String,
    /// Where alerts are POSTed (http or https).
    pub url: String,
    /// The signing secret (never shown after it is set).
    #[serde(skip)]
    pub secret: String,
    /// The alert groups it takes: some of `quota`, `spend`, `rate`, `dead`.
    pub events: Vec<String>,
}

/// Check a webhook before anything is written: the tenant's name, the URL
/// (http or https, a host, no user or password), the secret (16 to 256
/// bytes) and the groups (`quota,spend,rate,dead`; `all`).
pub fn check_webhook(
    tenant: &str,
    url: &str,
    secret: &str,
    events: &str,
) -> Result<Webhook, QueueError> {
    validate_name("tenant", tenant)?;
    if url.len() > 2048 {
        return Err(QueueError::Invalid(
            "the webhook URL is longer than 2048 bytes".into(),
        ));
    }
    crate::net::check_url(url).map_err(|e| QueueError::Invalid(format!("webhook URL: {e}")))?;
    if !(16..=256).contains(&secret.len()) {
        return Err(QueueError::Invalid(
            "the webhook secret must be 16 to 256 bytes (leave it out to have one generated)"
                .into(),
        ));
    }
    let groups = parse_alert_groups(events).map_err(QueueError::Invalid)?;
    Ok(Webhook {
        tenant: tenant.to_string(),
        url: url.to_string(),
        secret: secret.to_string(),
        events: groups.split(',').map(str::to_string).collect(),
    })
}

/// A new signing secret: `whsec_` and 32 random bytes in hex.
pub fn generate_secret() -> String {
    format!("whsec_{}", hex::encode(rand::random::<[u8; 32]>()))
}

fn webhook_key(q: &Queue, tenant: &str) -> String {
    q.keys(q.partition_of(tenant)).key(&["webhook", tenant])
}

/// Store a checked webhook (replacing the tenant's previous one): alerts
/// raised from now on are recorded for it.
pub async fn set_webhook(q: &Queue, w: &Webhook) -> Result<(), QueueError> {
    let key = webhook_key(q, &w.tenant);
    let events = w.events.join(",");
    let _: i64 = q
        .client()
        .hset(
            &key,
            vec![
                ("url", w.url.as_str()),
                ("secret", w.secret.as_str()),
                ("events", events.as_str()),
            ],
        )
        .await?;
    Ok(())
}

/// The tenant's webhook, if it has one.
pub async fn webhook(q: &Queue, tenant: &str) -> Result<Option<Webhook>, QueueError> {
    validate_name("tenant", tenant)?;
    let h: HashMap<String, String> = q.client().hgetall(webhook_key(q, tenant)).await?;
    let (Some(url), Some(secret)) = (h.get("url"), h.get("secret")) else {
        return Ok(None);
    };
    Ok(Some(Webhook {
        tenant: tenant.to_string(),
        url: url.clone(),
        secret: secret.clone(),
        events: h
            .get("events")
            .map(|e| {
                e.split(',')
                    .filter(|g| !g.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default(),
    }))
}

/// Remove the tenant's webhook; false if it had none. Alerts already
/// recorded are dropped by the duty (nobody to send them to).
pub async fn remove_webhook(q: &Queue, tenant: &str) -> Result<bool, QueueError> {
    validate_name("tenant", tenant)?;
    let n: i64 = q.client().del(webhook_key(q, tenant)).await?;
    Ok(n > 0)
}

/// One recorded alert.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alert {
    /// Its partition.
    pub partition: u32,
    /// Its stream entry id (`<ms>-<seq>`, Redis's clock).
    pub entry: String,
    /// The tenant.
    pub tenant: String,
    /// Its kind: `quota_80`, `quota_100`, `spend_80`, `spend_100`,
    /// `rate_2x`, `dead`, `test`, or a newer script's.
    pub kind: String,
    /// The other fields (a dead job's `job`, `queue`, `job_kind`,
    /// `attempts`, `error`).
    pub fields: Vec<(String, String)>,
}

impl Alert {
    /// The delivery id receivers deduplicate by: `<partition>-<entry id>`,
    /// the same on every retry and after a takeover.
    pub fn delivery_id(&self) -> String {
        format!("{}-{}", self.partition, self.entry)
    }

    /// When the alert was raised, ms since the epoch (Redis's clock).
    pub fn created_ms(&self) -> i64 {
        self.entry
            .split('-')
            .next()
            .and_then(|m| m.parse().ok())
            .unwrap_or(0)
    }

    /// The JSON body a webhook receives (README, "Tenant alerts").
    pub fn payload(&self) -> serde_json::Value {
        let mut data = serde_json::Map::new();
        for (k, v) in &self.fields {
            let value = match k.as_str() {
                "attempts" => v
                    .parse::<u64>()
                    .map_or_else(|_| v.clone().into(), Into::into),
                _ => v.clone().into(),
            };
            data.insert(k.clone(), value);
        }
        let group = crate::model::events::alert_group(&self.kind);
        if let Some(pct) = self
            .kind
            .strip_prefix(group)
            .and_then(|r| r.strip_prefix('_'))
            .and_then(|r| r.parse::<u64>().ok())
            && (group == "quota" || group == "spend")
        {
            data.insert("percent".into(), pct.into());
        }
        let created = chrono::DateTime::from_timestamp_millis(self.created_ms())
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
            .unwrap_or_default();
        serde_json::json!({
            "id": self.delivery_id(),
            "type": self.kind,
            "tenant": self.tenant,
            "created_at": created,
            "data": data,
        })
    }
}

/// An alert given up on, as kept in `B:alerts:dead`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeadAlert {
    /// The delivery id it had.
    pub id: String,
    /// The tenant.
    pub tenant: String,
    /// Its kind.
    pub kind: String,
    /// Delivery attempts made.
    pub attempts: u64,
    /// Why it was given up on.
    pub reason: String,
    /// The last failure (status or error).
    pub last_error: String,
    /// When it was given up on (RFC 3339).
    pub dead_at: String,
    /// The body it would have had.
    pub payload: serde_json::Value,
}

pub use super::group_reader::Read;

/// Reads and settles the alert streams as one consumer of [`GROUP`].
pub struct AlertReader {
    queue: Queue,
    reader: super::group_reader::GroupReader,
}

impl AlertReader {
    /// A reader named `consumer` (the worker id).
    pub fn new(queue: Queue, consumer: impl Into<String>) -> AlertReader {
        AlertReader {
            reader: super::group_reader::GroupReader::new(queue.clone(), GROUP, consumer.into()),
            queue,
        }
    }

    /// The consumer name.
    pub fn consumer(&self) -> &str {
        self.reader.consumer()
    }

    /// Partition `p`'s alert stream key.
    pub fn key(&self, p: u32) -> String {
        self.queue.keys(p).key(&["alerts"])
    }

    /// Up to `count` entries of partition `p`; entries whose body is gone
    /// (deleted after delivery by a consumer killed before its XACK) are
    /// acknowledged here and not returned.
    pub async fn read(&self, p: u32, from: Read, count: usize) -> Result<Vec<Alert>, QueueError> {
        let key = self.key(p);
        let entries = self.reader.read(&key, from, count).await?;
        let mut out = Vec::new();
        let mut gone = Vec::new();
        for e in entries {
            match e.fields {
                None => gone.push(e.id),
                Some(f) => out.push(alert_of(p, e.id, text_fields(f))),
            }
        }
        if !gone.is_empty() {
            let _: i64 = self.queue.client().xack(&key, GROUP, gone).await?;
        }
        Ok(out)
    }

    /// Keep holding `entries` of partition `p` (reset their idle time, so no
    /// other consumer takes them over while this one waits to retry);
    /// returns those it still holds.
    pub async fn renew(&self, p: u32, entries: &[String]) -> Result<Vec<String>, QueueError> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let key = self.key(p);
        let mut args: Vec<Value> = vec![
            key.as_str().into(),
            GROUP.into(),
            self.reader.consumer().into(),
            "0".into(),
        ];
        args.extend(entries.iter().map(|e| Value::from(e.as_str())));
        args.push("JUSTID".into());
        let reply: Value = self
            .queue
            .client()
            .custom(fred::cmd!("XCLAIM"), args)
            .await?;
        Ok(match reply {
            Value::Array(ids) => ids.iter().filter_map(Value::as_string).collect(),
            _ => Vec::new(),
        })
    }

    /// Delivered (or dropped): delete the entry, then acknowledge it, and
    /// forget its failed-attempt count.
    pub async fn ack(&self, a: &Alert) -> Result<(), QueueError> {
        let key = self.key(a.partition);
        let client = self.queue.client();
        let _: i64 = client.xdel(&key, a.entry.as_str()).await?;
        let _: i64 = client.xack(&key, GROUP, a.entry.as_str()).await?;
        let _: i64 = client
            .hdel(self.tries_key(a.partition), a.entry.as_str())
            .await?;
        Ok(())
    }

    fn tries_key(&self, p: u32) -> String {
        self.queue.keys(p).key(&["alerts", "tries"])
    }

    /// Count one more failed attempt of `a` (kept in Redis, so a worker
    /// that takes the alert over continues the count); returns the total.
    pub async fn failed(&self, a: &Alert) -> Result<u64, QueueError> {
        let n: i64 = self
            .queue
            .client()
            .hincrby(self.tries_key(a.partition), a.entry.as_str(), 1)
            .await?;
        Ok(n.max(0) as u64)
    }

    /// Failed attempts of `a` so far.
    pub async fn tries(&self, a: &Alert) -> Result<u64, QueueError> {
        let n: Option<u64> = self
            .queue
            .client()
            .hget(self.tries_key(a.partition), a.entry.as_str())
            .await?;
        Ok(n.unwrap_or(0))
    }

    /// Give up on `a`: keep it in `B:alerts:dead` (the newest
    /// [`DEAD_KEPT`]), then take it out of the stream.
    pub async fn dead_letter(
        &self,
        a: &Alert,
        attempts: u64,
        reason: &str,
        last_error: &str,
    ) -> Result<(), QueueError> {
        let key = self.queue.keys(a.partition).key(&["alerts", "dead"]);
        let payload = a.payload().to_string();
        let attempts = attempts.to_string();
        let id = a.delivery_id();
        let args: Vec<Value> = vec![
            key.as_str().into(),
            "MAXLEN".into(),
            "~".into(),
            DEAD_KEPT.to_string().into(),
            "*".into(),
            "id".into(),
            id.as_str().into(),
            "tenant".into(),
            a.tenant.as_str().into(),
            "kind".into(),
            a.kind.as_str().into(),
            "attempts".into(),
            attempts.as_str().into(),
            "reason".into(),
            reason.into(),
            "last_error".into(),
            last_error.into(),
            "payload".into(),
            payload.as_str().into(),
        ];
        let _: Value = self.queue.client().custom(fred::cmd!("XADD"), args).await?;
        self.ack(a).await
    }
}

/// Alerts waiting in every partition's stream (delivered ones are deleted).
pub async fn backlog(q: &Queue) -> Result<u64, QueueError> {
    let mut n = 0;
    for p in 0..q.partitions() {
        let len: u64 = q.client().xlen(q.keys(p).key(&["alerts"])).await?;
        n += len;
    }
    Ok(n)
}

/// The newest dead-lettered alerts (at most `limit`), of one tenant or all,
/// newest first.
pub async fn dead_alerts(
    q: &Queue,
    tenant: Option<&str>,
    limit: usize,
) -> Result<Vec<DeadAlert>, QueueError> {
    let parts: Vec<u32> = match tenant {
        Some(t) => {
            validate_name("tenant", t)?;
            vec![q.partition_of(t)]
        }
        None => (0..q.partitions()).collect(),
    };
    let mut out = Vec::new();
    for p in parts {
        let key = q.keys(p).key(&["alerts", "dead"]);
        let args: Vec<Value> = vec![
            key.as_str().into(),
            "+".into(),
            "-".into(),
            "COUNT".into(),
            // one tenant's among others': read a few more than asked
            (DEAD_KEPT as usize)
                .min(limit.saturating_mul(20).max(100))
                .to_string()
                .into(),
        ];
        let reply: Value = q.client().custom(fred::cmd!("XREVRANGE"), args).await?;
        for e in super::group_reader::parse_entries(reply) {
            let (entry, Some(f)) = (e.id, e.fields) else {
                continue;
            };
            let m: HashMap<String, String> = pairs(text_fields(f)).into_iter().collect();
            if tenant.is_some_and(|t| m.get("tenant").map(String::as_str) != Some(t)) {
                continue;
            }
            let ms: i64 = entry
                .split('-')
                .next()
                .and_then(|x| x.parse().ok())
                .unwrap_or(0);
            out.push(DeadAlert {
                id: m.get("id").cloned().unwrap_or_default(),
                tenant: m.get("tenant").cloned().unwrap_or_default(),
                kind: m.get("kind").cloned().unwrap_or_default(),
                attempts: m.get("attempts").and_then(|a| a.parse().ok()).unwrap_or(0),
                reason: m.get("reason").cloned().unwrap_or_default(),
                last_error: m.get("last_error").cloned().unwrap_or_default(),
                dead_at: chrono::DateTime::from_timestamp_millis(ms)
                    .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
                    .unwrap_or_default(),
                payload: m
                    .get("payload")
                    .and_then(|p| serde_json::from_str(p).ok())
                    .unwrap_or_default(),
            });
        }
    }
    out.sort_by(|a, b| b.dead_at.cmp(&a.dead_at));
    out.truncate(limit);
    Ok(out)
}

fn alert_of(partition: u32, entry: String, fields: Vec<String>) -> Alert {
    let mut tenant = String::new();
    let mut kind = String::new();
    let mut rest = Vec::new();
    for (k, v) in pairs(fields) {
        match k.as_str() {
            "tenant" => tenant = v,
            "kind" => kind = v,
            _ => rest.push((k, v)),
        }
    }
    Alert {
        partition,
        entry,
        tenant,
        kind,
        fields: rest,
    }
}

fn pairs(f: Vec<String>) -> Vec<(String, String)> {
    let mut it = f.into_iter();
    let mut out = Vec::new();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    out
}

/// A stream entry's fields as text (invalid UTF-8 replaced: alerts are
/// written by agentq's own scripts from validated names and numbers).
fn text_fields(f: Vec<Vec<u8>>) -> Vec<String> {
    f.into_iter()
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_shape() {
        let a = Alert {
            partition: 0,
            entry: "1700000000123-4".into(),
            tenant: "acme".into(),
            kind: "quota_80".into(),
            fields: vec![],
        };
        let p = a.payload();
        assert_eq!(p["id"], "0-1700000000123-4");
        assert_eq!(p["type"], "quota_80");
        assert_eq!(p["data"]["percent"], 80);
        assert_eq!(p["created_at"], "2023-11-14T22:13:20.123Z");
    }

    #[test]
    fn webhook_checks() {
        assert!(check_webhook("acme", "https://h.example/x", "0123456789abcdef", "all").is_ok());
        assert!(check_webhook("acme", "ftp://h.example/x", "0123456789abcdef", "all").is_err());
        assert!(check_webhook("acme", "https://h.example/x", "short", "all").is_err());
        assert!(check_webhook("acme", "https://h.example/x", "0123456789abcdef", "nope").is_err());
    }
}
