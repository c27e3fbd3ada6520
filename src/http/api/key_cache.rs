//! The API key cache: `agentq serve` checks keys against rows it holds in
//! memory, so enqueues (which need only Redis) go on through a PostgreSQL
//! outage.
//!
//! - **Miss**: the key's row (prefix, tenant, secret hash, revoked) is read
//!   from PostgreSQL (at most [`KeyCacheConfig::lookup_timeout`]) and kept;
//!   the secret is checked against the kept hash in constant time, as before.
//!   PostgreSQL failing on a miss is [`Unavailable`] (HTTP 503
//!   `auth_unavailable`), not a refusal.
//! - **Known keys** (revoked ones included) stay while PostgreSQL is down
//!   and are re-read all together every [`KeyCacheConfig::refresh`] while it
//!   is up, so a revocation made directly in SQL is seen within that time
//!   and a deleted row is forgotten. Their number is bounded by the table.
//! - **Unknown prefixes** are remembered for [`KeyCacheConfig::negative_ttl`],
//!   at most [`KeyCacheConfig::max_negative`] of them (oldest dropped first),
//!   so random prefixes neither reach PostgreSQL on every try nor grow memory.
//! - **Expiry**: a row keeps its `expires_at`, checked against the clock
//!   at every use, so a cached key stops working at its expiry with no
//!   refresh or message needed (and a PostgreSQL outage cannot extend it).
//! - **Revocations** ([`keys::revoke`], behind `agentq tenant key revoke`
//!   and `DELETE /v1/admin/keys/{prefix}`)
//!   are appended to a Redis stream, `{<namespace>:0}:api:revoked` (field
//!   `prefix`), which every serve reads every
//!   [`KeyCacheConfig::revocation_poll`] (250 ms) from the id it last read
//!   (`XRANGE key (<last> +`). A revoked prefix becomes a tombstone in the
//!   cache: refused from then on, also while PostgreSQL is down, and never
//!   turned back by a refresh or a miss that raced it.
//!
//! Why a polled stream and not pub/sub: pub/sub delivers only to whoever is
//! subscribed at that instant, so a serve whose subscription was dropping or
//! reconnecting would miss the message and keep accepting the key until its
//! next refresh. Stream ids are given by Redis, increase, and stay readable,
//! so a serve that was cut off reads what it missed from where it left off;
//! one `XRANGE` per 250 ms per serve costs Redis nothing measurable and keeps
//! propagation under a second (the poll interval plus one round trip), so a
//! pub/sub fast path would add a second mechanism for little. Entries older
//! than [`KeyCacheConfig::revocation_keep`] (a day) are trimmed at each
//! revocation (`XADD ... MINID ~`); a serve that could not read the stream
//! for half that long drops every cached key that is not revoked (they are
//! read again from PostgreSQL), so a trimmed entry is never missed.
//!
//! Built like a duty (see `crate::duties`): a config with documented
//! defaults and `validate()`, [`KeyCache::run_once`] (which tests call) and
//! [`KeyCache::run`], the loop `agentq serve` spawns.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use fred::prelude::*;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::keys::{self, KeyParts, KeyRow, Verified};
use crate::queue::{Queue, QueueError};

/// How the key cache works.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyCacheConfig {
    /// How often every known key is re-read from PostgreSQL while it is up
    /// (default 60 s): the longest a revocation made directly in SQL, not
    /// through `agentq tenant key revoke`, goes unseen.
    pub refresh: Duration,
    /// How long an unknown prefix is remembered (default 10 s).
    pub negative_ttl: Duration,
    /// Most unknown prefixes remembered (default 10,000; oldest dropped).
    pub max_negative: usize,
    /// Longest a PostgreSQL lookup on a miss may take before the request
    /// gets 503 `auth_unavailable` (default 3 s).
    pub lookup_timeout: Duration,
    /// How often the revocation stream is read (default 250 ms).
    pub revocation_poll: Duration,
    /// How long revocations stay in the stream (default 24 h).
    pub revocation_keep: Duration,
}

impl Default for KeyCacheConfig {
    fn default() -> Self {
        KeyCacheConfig {
            refresh: Duration::from_secs(60),
            negative_ttl: Duration::from_secs(10),
            max_negative: 10_000,
            lookup_timeout: Duration::from_secs(3),
            revocation_poll: Duration::from_millis(250),
            revocation_keep: Duration::from_secs(24 * 3600),
        }
    }
}

impl KeyCacheConfig {
    /// Check the ranges.
    pub fn validate(&self) -> Result<(), crate::duties::ConfigError> {
        let bad = |problem: &str| {
            Err(crate::duties::ConfigError {
                duty: "key_cache",
                problem: problem.into(),
            })
        };
        if self.refresh < Duration::from_secs(1) {
            return bad("refresh must be at least 1s");
        }
        if self.revocation_poll < Duration::from_millis(10) || self.revocation_poll > self.refresh {
            return bad("revocation_poll must be between 10ms and refresh");
        }
        if self.max_negative == 0 || self.negative_ttl.is_zero() {
            return bad("max_negative and negative_ttl must be above zero");
        }
        if self.lookup_timeout.is_zero() {
            return bad("lookup_timeout must be above zero");
        }
        if self.revocation_keep < Duration::from_secs(60) {
            return bad("revocation_keep must be at least 1m");
        }
        Ok(())
    }
}

/// PostgreSQL could not be asked about a key this server does not hold.
#[derive(Debug, thiserror::Error)]
#[error("cannot check the API key: {0}")]
pub struct Unavailable(pub String);

/// What one [`KeyCache::run_once`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pass {
    /// Revocations read from the stream.
    pub revocations: usize,
    /// Keys re-read from PostgreSQL (None: no refresh was due).
    pub refreshed: Option<usize>,
    /// What failed (retried at the next pass; cached keys are kept).
    pub errors: Vec<String>,
}

/// Sizes of what the cache holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheSizes {
    /// Known keys, revoked ones included.
    pub keys: usize,
    /// Unknown prefixes remembered.
    pub unknown: usize,
}

/// Unknown prefixes, oldest first (one TTL for all, so also soonest to expire).
#[derive(Default)]
struct Negative {
    order: VecDeque<(String, Instant)>,
    set: HashMap<String, Instant>,
}

impl Negative {
    fn contains(&self, prefix: &str, now: Instant) -> bool {
        self.set.get(prefix).is_some_and(|until| *until > now)
    }
    fn expire(&mut self, now: Instant, room_for: usize, max: usize) {
        while let Some((p, until)) = self.order.front() {
            if *until > now && self.set.len() + room_for <= max {
                break;
            }
            // Only drop the map entry this queue slot stands for.
            if self.set.get(p) == Some(until) {
                self.set.remove(p);
            }
            self.order.pop_front();
        }
    }
    fn insert(&mut self, prefix: &str, until: Instant, now: Instant, max: usize) {
        self.expire(now, 1, max);
        self.set.insert(prefix.to_string(), until);
        self.order.push_back((prefix.to_string(), until));
    }
}

/// The revocation stream's key in `queue`'s namespace (partition 0).
pub fn revocations_key(queue: &Queue) -> String {
    queue.keys(0).key(&["api", "revoked"])
}

/// Append `prefix` to the revocation stream (trimming entries older than
/// the default [`KeyCacheConfig::revocation_keep`]).
pub async fn announce_revocation(queue: &Queue, prefix: &str) -> Result<(), QueueError> {
    let keep = KeyCacheConfig::default().revocation_keep;
    let min_ms = chrono::Utc::now().timestamp_millis()
        - i64::try_from(keep.as_millis()).unwrap_or(i64::MAX / 2);
    let args: Vec<Value> = vec![
        revocations_key(queue).into(),
        "MINID".into(),
        "~".into(),
        min_ms.max(0).to_string().into(),
        "*".into(),
        "prefix".into(),
        prefix.into(),
    ];
    let _: Value = queue.client().custom(fred::cmd!("XADD"), args).await?;
    Ok(())
}

/// API keys held in memory; see the module documentation.
pub struct KeyCache {
    /// Its settings.
    pub config: KeyCacheConfig,
    queue: Queue,
    db: PgPool,
    keys: RwLock<HashMap<String, KeyRow>>,
    negative: Mutex<Negative>,
    /// Last stream id read, and when the stream was last read.
    read: Mutex<(String, Instant)>,
    last_refresh: Mutex<Instant>,
}

impl KeyCache {
    /// An empty cache over `db`, hearing revocations on `queue`'s namespace.
    pub fn new(queue: Queue, db: PgPool, config: KeyCacheConfig) -> KeyCache {
        let now = Instant::now();
        KeyCache {
            config,
            queue,
            db,
            keys: RwLock::new(HashMap::new()),
            negative: Mutex::new(Negative::default()),
            read: Mutex::new(("0-0".to_string(), now)),
            last_refresh: Mutex::new(now),
        }
    }

    /// Who `key` speaks for if it is valid, unrevoked and unexpired (the
    /// expiry is checked against the clock at every use, so a cached key
    /// stops working at its expiry); None if it is not; [`Unavailable`] if
    /// PostgreSQL had to be asked and could not be.
    pub async fn verify(&self, key: &str) -> Result<Option<Verified>, Unavailable> {
        let Some(KeyParts { prefix, secret }) = keys::parse(key) else {
            return Ok(None);
        };
        if let Some(row) = self.read_keys().get(prefix) {
            return Ok(row.accepts(secret));
        }
        let now = Instant::now();
        if self.negative().contains(prefix, now) {
            return Ok(None);
        }
        let wanted = [prefix.to_string()];
        let rows =
            match tokio::time::timeout(self.config.lookup_timeout, keys::load(&self.db, &wanted))
                .await
            {
                Ok(Ok(rows)) => rows,
                Ok(Err(e)) => return Err(Unavailable(e.to_string())),
                Err(_) => {
                    return Err(Unavailable(format!(
                        "PostgreSQL did not answer within {:?}",
                        self.config.lookup_timeout
                    )));
                }
            };
        let Some(row) = rows.into_iter().next() else {
            let until = Instant::now() + self.config.negative_ttl;
            self.negative()
                .insert(prefix, until, Instant::now(), self.config.max_negative);
            return Ok(None);
        };
        let mut held = self.write_keys();
        let row = held
            .entry(prefix.to_string())
            .and_modify(|r| merge(r, row.clone()))
            .or_insert(row);
        Ok(row.accepts(secret))
    }

    /// One pass: read new revocations; re-read every known key from
    /// PostgreSQL if a refresh is due; drop expired unknown prefixes.
    pub async fn run_once(&self) -> Pass {
        let mut pass = Pass::default();
        match self.poll_revocations().await {
            Ok(n) => pass.revocations = n,
            Err(e) => pass.errors.push(format!("revocations: {e}")),
        }
        let due = self
            .last_refresh
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed()
            >= self.config.refresh;
        if due {
            match self.refresh().await {
                Ok(n) => pass.refreshed = Some(n),
                Err(e) => pass.errors.push(format!("refresh: {e}")),
            }
        }
        self.prune();
        pass
    }

    /// Loop [`run_once`](Self::run_once) every `revocation_poll` until `shutdown`.
    pub async fn run(&self, shutdown: CancellationToken) {
        let mut failing = false;
        loop {
            let pass = self.run_once().await;
            if pass.errors.is_empty() {
                failing = false;
            } else if !failing {
                // Once per outage, not four times a second.
                failing = true;
                tracing::warn!(errors = ?pass.errors, "API key cache: kept what it holds; retrying");
            }
            if crate::duties::pause(self.config.revocation_poll, &shutdown).await {
                return;
            }
        }
    }

    /// Read the revocation stream from where the last read stopped; each
    /// prefix read becomes a tombstone. Returns how many were read.
    pub async fn poll_revocations(&self) -> Result<usize, QueueError> {
        let (mut last, last_ok) = self.read.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let key = revocations_key(&self.queue);
        let mut seen = 0;
        loop {
            let args: Vec<Value> = vec![
                key.as_str().into(),
                format!("({last}").into(),
                "+".into(),
                "COUNT".into(),
                "1000".into(),
            ];
            let reply: Value = self
                .queue
                .client()
                .custom(fred::cmd!("XRANGE"), args)
                .await?;
            let entries = parse_entries(reply);
            if last_ok.elapsed() >= self.config.revocation_keep / 2 {
                // Cut off long enough that trimmed entries may be missed:
                // forget every key that is not revoked (read again on use).
                self.write_keys().retain(|_, r| r.revoked);
            }
            let full = entries.len() >= 1000;
            for (id, prefix) in entries {
                if let Some(p) = prefix {
                    self.tombstone(&p);
                    seen += 1;
                }
                last = id;
            }
            *self.read.lock().unwrap_or_else(|e| e.into_inner()) = (last.clone(), Instant::now());
            if !full {
                return Ok(seen);
            }
        }
    }

    /// Re-read every known key from PostgreSQL: rows gone are forgotten,
    /// newly revoked ones marked (a revocation is never undone). Returns
    /// how many keys were re-read; on failure everything is kept.
    pub async fn refresh(&self) -> Result<usize, crate::ledger::LedgerError> {
        let prefixes: Vec<String> = self.read_keys().keys().cloned().collect();
        let mut fresh: HashMap<String, KeyRow> = HashMap::with_capacity(prefixes.len());
        for chunk in prefixes.chunks(10_000) {
            for row in keys::load(&self.db, chunk).await? {
                fresh.insert(row.prefix.clone(), row);
            }
        }
        let mut held = self.write_keys();
        for p in &prefixes {
            match fresh.remove(p) {
                Some(row) => {
                    if let Some(r) = held.get_mut(p) {
                        merge(r, row);
                    }
                }
                None => {
                    held.remove(p);
                }
            }
        }
        drop(held);
        *self.last_refresh.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        Ok(prefixes.len())
    }

    /// Drop expired unknown prefixes.
    pub fn prune(&self) {
        self.negative()
            .expire(Instant::now(), 0, self.config.max_negative);
    }

    /// What the cache holds.
    pub fn sizes(&self) -> CacheSizes {
        CacheSizes {
            keys: self.read_keys().len(),
            unknown: self.negative().set.len(),
        }
    }

    /// Refuse `prefix` from now on.
    fn tombstone(&self, prefix: &str) {
        let mut held = self.write_keys();
        match held.get_mut(prefix) {
            Some(r) => r.revoked = true,
            None => {
                held.insert(
                    prefix.to_string(),
                    KeyRow {
                        prefix: prefix.to_string(),
                        tenant: String::new(),
                        secret_hash: Vec::new(),
                        revoked: true,
                        scope: keys::Scope::Tenant,
                        expires_at: None,
                    },
                );
            }
        }
    }

    fn read_keys(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, KeyRow>> {
        self.keys.read().unwrap_or_else(|e| e.into_inner())
    }
    fn write_keys(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, KeyRow>> {
        self.keys.write().unwrap_or_else(|e| e.into_inner())
    }
    fn negative(&self) -> std::sync::MutexGuard<'_, Negative> {
        self.negative.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Take a newer read of a row, keeping a revocation already known.
fn merge(held: &mut KeyRow, newer: KeyRow) {
    let revoked = held.revoked || newer.revoked;
    *held = newer;
    held.revoked = revoked;
}

/// `[[id, [field, value, ...]], ...]` -> (id, the `prefix` field).
fn parse_entries(v: Value) -> Vec<(String, Option<String>)> {
    let Value::Array(entries) = v else {
        return Vec::new();
    };
    entries
        .into_iter()
        .filter_map(|e| {
            let Value::Array(mut pair) = e else {
                return None;
            };
            if pair.len() != 2 {
                return None;
            }
            let fields = pair.pop()?;
            let id = pair.pop()?.as_string()?;
            let fields: Vec<String> = match fields {
                Value::Array(f) => f.into_iter().filter_map(|x| x.as_string()).collect(),
                Value::Map(m) => m
                    .inner()
                    .into_iter()
                    .flat_map(|(k, v)| [k.as_str().map(|s| s.to_string()), v.as_string()])
                    .flatten()
                    .collect(),
                _ => Vec::new(),
            };
            let prefix = fields
                .chunks(2)
                .find(|kv| kv.first().is_some_and(|k| k == "prefix"))
                .and_then(|kv| kv.get(1).cloned());
            Some((id, prefix))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_prefixes_stay_bounded_and_expire() {
        let mut n = Negative::default();
        let now = Instant::now();
        for i in 0..1000 {
            n.insert(&format!("{i:08x}"), now + Duration::from_secs(10), now, 50);
            assert!(n.set.len() <= 50 && n.order.len() <= 50);
        }
        assert!(n.contains("000003e7", now));
        assert!(!n.contains("00000000", now));
        n.expire(now + Duration::from_secs(11), 0, 50);
        assert!(n.set.is_empty() && n.order.is_empty());
    }

    #[test]
    fn a_revocation_is_never_undone_by_a_later_read() {
        let row = |revoked| KeyRow {
            prefix: "a1b2c3d4".into(),
            tenant: "t".into(),
            secret_hash: vec![1],
            revoked,
            scope: keys::Scope::Tenant,
            expires_at: None,
        };
        let mut held = row(true);
        merge(&mut held, row(false));
        assert!(held.revoked);
        let mut held = row(false);
        merge(&mut held, row(true));
        assert!(held.revoked);
    }

    #[test]
    fn defaults_are_valid() {
        assert!(KeyCacheConfig::default().validate().is_ok());
    }
}
