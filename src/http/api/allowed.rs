//! Per-tenant restrictions of the HTTP API: the queues and kinds a tenant
//! may enqueue to (`agentq tenant set T --allowed-queues a,b
//! --allowed-kinds echo,sleep`; unset or `*`: all).
//!
//! Stored in Redis beside the tenant's limits, in its own hash
//! `{<namespace>:<p>}:allowed:<tenant>` (fields `queues` and `kinds`,
//! comma-separated), not in the limits hash: the claim script reads that
//! one for every tenant it looks at and takes every field as a number.
//!
//! Enforced at the HTTP edge only (403 `forbidden_queue` /
//! `forbidden_kind`), for API keys and JWTs alike: the HTTP API is what
//! tenants reach; the published enqueue script is for services with full
//! Redis access, which are trusted anyway (they could write any key).
//!
//! `agentq serve` reads a tenant's restrictions with its first enqueue and
//! keeps them for [`AllowedCache::ttl`] (default 5 s), so a change is in
//! force everywhere within that; entries are dropped by the server's
//! pruning loop once expired, so the cache holds at most the tenants that
//! enqueued in the last `ttl`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fred::prelude::*;

use crate::model::names::{InvalidInput, validate_name};
use crate::queue::{Queue, QueueError};

/// What a tenant may enqueue (None: anything).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Allowed {
    /// Queues it may enqueue to.
    pub queues: Option<Vec<String>>,
    /// Kinds it may enqueue.
    pub kinds: Option<Vec<String>>,
}

impl Allowed {
    /// Whether `name` is in `list` (None: everything is).
    pub fn permits(list: &Option<Vec<String>>, name: &str) -> bool {
        list.as_ref().is_none_or(|l| l.iter().any(|x| x == name))
    }
}

/// Parse `a,b` (`*` or empty: None, meaning all), checking every name.
pub fn parse_list(what: &str, s: &str) -> Result<Option<Vec<String>>, InvalidInput> {
    let s = s.trim();
    if s.is_empty() || s == "*" {
        return Ok(None);
    }
    let mut v = Vec::new();
    for n in s.split(',').map(str::trim) {
        validate_name(what, n)?;
        if !v.iter().any(|x| x == n) {
            v.push(n.to_string());
        }
    }
    Ok(Some(v))
}

fn key(queue: &Queue, tenant: &str) -> String {
    queue
        .keys(queue.partition_of(tenant))
        .key(&["allowed", tenant])
}

/// Set a tenant's restrictions: `Some(None)` lifts one, `None` leaves it.
pub async fn set(
    queue: &Queue,
    tenant: &str,
    queues: Option<Option<Vec<String>>>,
    kinds: Option<Option<Vec<String>>>,
) -> Result<(), QueueError> {
    validate_name("tenant", tenant)?;
    let k = key(queue, tenant);
    for (field, value) in [("queues", queues), ("kinds", kinds)] {
        match value {
            None => {}
            Some(None) => {
                let _: i64 = queue.client().hdel(&k, field).await?;
            }
            Some(Some(list)) => {
                let _: i64 = queue.client().hset(&k, (field, list.join(","))).await?;
            }
        }
    }
    Ok(())
}

/// A tenant's restrictions as stored.
pub async fn read(queue: &Queue, tenant: &str) -> Result<Allowed, QueueError> {
    let h: HashMap<String, String> = queue.client().hgetall(key(queue, tenant)).await?;
    let list = |f: &str| {
        h.get(f)
            .map(|s| s.split(',').map(str::to_string).collect::<Vec<_>>())
            .filter(|v| !v.is_empty())
    };
    Ok(Allowed {
        queues: list("queues"),
        kinds: list("kinds"),
    })
}

/// Restrictions read recently, by tenant.
pub struct AllowedCache {
    queue: Queue,
    ttl: Duration,
    held: Mutex<HashMap<String, (Allowed, Instant)>>,
}

impl AllowedCache {
    /// A cache over `queue` keeping each read for `ttl`.
    pub fn new(queue: Queue, ttl: Duration) -> AllowedCache {
        AllowedCache {
            queue,
            ttl,
            held: Mutex::new(HashMap::new()),
        }
    }

    /// How long a read is kept.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// `tenant`'s restrictions, from the cache if read less than `ttl` ago.
    pub async fn get(&self, tenant: &str) -> Result<Allowed, QueueError> {
        if let Some((a, at)) = self
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(tenant)
            && at.elapsed() < self.ttl
        {
            return Ok(a.clone());
        }
        let a = read(&self.queue, tenant).await?;
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(tenant.to_string(), (a.clone(), Instant::now()));
        Ok(a)
    }

    /// Drop expired entries; how many are left.
    pub fn prune(&self) -> usize {
        let mut h = self.held.lock().unwrap_or_else(|e| e.into_inner());
        h.retain(|_, (_, at)| at.elapsed() < self.ttl);
        h.shrink_to_fit();
        h.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse() {
        assert_eq!(parse_list("queue", "*").expect("all"), None);
        assert_eq!(parse_list("queue", "").expect("all"), None);
        assert_eq!(
            parse_list("queue", "a, b,a").expect("list"),
            Some(vec!["a".to_string(), "b".to_string()])
        );
        assert!(parse_list("queue", "a,,b").is_err());
        assert!(Allowed::permits(&None, "x"));
        assert!(!Allowed::permits(&Some(vec!["a".into()]), "x"));
    }
}
