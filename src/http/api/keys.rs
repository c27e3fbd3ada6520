//! Tenant API keys: `aq_<prefix>_<secret>`, shown once at creation; the
//! database keeps the prefix, the tenant and a SHA-256 of the secret.

use sha2::{Digest, Sha256};
use sqlx::PgPool;

use crate::ledger::LedgerError;

/// A key as printed once by `agentq tenant key create`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct NewKey {
    /// The tenant it belongs to.
    pub tenant: String,
    /// Public part, for listings and revocation.
    pub prefix: String,
    /// The whole key (give it to the tenant; it is not stored).
    pub key: String,
}

fn random_hex(bytes: usize) -> String {
    let v: Vec<u8> = (0..bytes).map(|_| rand::random::<u8>()).collect();
    hex::encode(v)
}

fn hash(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// The two parts of an API key `aq_<prefix>_<secret>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyParts<'a> {
    /// 8 hex digits: names the key in logs and listings (not secret).
    pub prefix: &'a str,
    /// 64 hex digits: only its SHA-256 is stored.
    pub secret: &'a str,
}

/// Split `aq_<prefix>_<secret>`; None if it is not shaped like a key.
pub fn parse(key: &str) -> Option<KeyParts<'_>> {
    let rest = key.strip_prefix("aq_")?;
    let (prefix, secret) = rest.split_once('_')?;
    let hexy = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hexy(prefix, 8) && hexy(secret, 64)).then_some(KeyParts { prefix, secret })
}

/// Create a key for `tenant`.
pub async fn create(pool: &PgPool, tenant: &str) -> Result<NewKey, LedgerError> {
    let prefix = random_hex(4);
    let secret = random_hex(32);
    sqlx::query("INSERT INTO api_keys (prefix, tenant, secret_hash) VALUES ($1, $2, $3)")
        .bind(&prefix)
        .bind(tenant)
        .bind(hash(&secret))
        .execute(pool)
        .await?;
    Ok(NewKey {
        tenant: tenant.to_string(),
        key: format!("aq_{prefix}_{secret}"),
        prefix,
    })
}

/// A revocation done by [`revoke`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revocation {
    /// The tenant the key belonged to.
    pub tenant: String,
    /// The key's prefix.
    pub prefix: String,
    /// Why running `agentq serve` processes could not be told through Redis
    /// (None: told). They still stop accepting the key within their cache
    /// refresh (see [`KeyCacheConfig::refresh`](super::key_cache::KeyCacheConfig)).
    pub not_announced: Option<String>,
}

/// Revoke a key by its prefix (or whole key) in PostgreSQL, then announce
/// the prefix on the namespace's revocation stream in Redis, so every
/// `agentq serve` drops it from its key cache within a second (see
/// [`key_cache`](super::key_cache)). None if there is no active key so named.
/// `queue` None (Redis unreachable): revoked all the same, not announced.
pub async fn revoke(
    pool: &PgPool,
    queue: Option<&crate::queue::Queue>,
    key_or_prefix: &str,
) -> Result<Option<Revocation>, LedgerError> {
    let prefix = parse(key_or_prefix).map_or(key_or_prefix, |k| k.prefix);
    let tenant: Option<(String,)> =
        sqlx::query_as("UPDATE api_keys SET revoked_at = now() WHERE prefix = $1 AND revoked_at IS NULL RETURNING tenant")
            .bind(prefix)
            .fetch_optional(pool)
            .await?;
    let Some((tenant,)) = tenant else {
        return Ok(None);
    };
    let not_announced = match queue {
        Some(q) => super::key_cache::announce_revocation(q, prefix)
            .await
            .err()
            .map(|e| e.to_string()),
        None => Some("no connection to Redis".to_string()),
    };
    Ok(Some(Revocation {
        tenant,
        prefix: prefix.to_string(),
        not_announced,
    }))
}

/// A key's row: what the key cache keeps (never the secret itself).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRow {
    /// The key's prefix.
    pub prefix: String,
    /// The tenant it belongs to.
    pub tenant: String,
    /// SHA-256 of its secret.
    pub secret_hash: Vec<u8>,
    /// Revoked (in PostgreSQL, or announced through Redis).
    pub revoked: bool,
}

impl KeyRow {
    /// The tenant, if this row is unrevoked and `secret` matches its hash
    /// (compared in constant time).
    pub fn accepts(&self, secret: &str) -> Option<&str> {
        (!self.revoked && constant_time_eq(&self.secret_hash, &hash(secret)))
            .then_some(self.tenant.as_str())
    }
}

/// The rows of `prefixes` (revoked ones included; unknown ones left out).
pub async fn load(pool: &PgPool, prefixes: &[String]) -> Result<Vec<KeyRow>, LedgerError> {
    let rows: Vec<(String, String, Vec<u8>, bool)> = sqlx::query_as(
        "SELECT prefix, tenant, secret_hash, revoked_at IS NOT NULL FROM api_keys WHERE prefix = ANY($1)",
    )
    .bind(prefixes)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(prefix, tenant, secret_hash, revoked)| KeyRow {
            prefix,
            tenant,
            secret_hash,
            revoked,
        })
        .collect())
}

/// The tenant of a valid, unrevoked key, straight from PostgreSQL (the API
/// server goes through its [`KeyCache`](super::key_cache::KeyCache) instead).
pub async fn verify(pool: &PgPool, key: &str) -> Result<Option<String>, LedgerError> {
    let Some(KeyParts { prefix, secret }) = parse(key) else {
        return Ok(None);
    };
    let rows = load(pool, &[prefix.to_string()]).await?;
    Ok(rows
        .first()
        .and_then(|r| r.accepts(secret))
        .map(str::to_string))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    #[test]
    fn keys_parse() {
        let k = format!("aq_{}_{}", "a1b2c3d4", "0".repeat(64));
        let zeros = "0".repeat(64);
        assert_eq!(
            super::parse(&k),
            Some(super::KeyParts {
                prefix: "a1b2c3d4",
                secret: &zeros
            })
        );
        assert!(super::parse("aq_zz_00").is_none());
        assert!(super::parse("Bearer x").is_none());
    }
}
