//! API keys: `aq_<prefix>_<secret>`, shown once at creation; the database
//! keeps the prefix, the tenant, the scope, the expiry and a SHA-256 of the
//! secret.
//!
//! A key's [`Scope`] is `tenant` (the tenant API, for its tenant) or
//! `admin` (the `/v1/admin` control plane only, stored with tenant
//! [`ADMIN_TENANT`], which no tenant can be named). A key past its
//! `expires_at` is refused like a revoked one, also when cached.

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use sqlx::PgPool;

use crate::ledger::LedgerError;
use crate::model::names::{InvalidInput, validate_name};

/// The tenant column of admin keys: not a valid tenant name (names start
/// with a letter or digit), so it can never collide with a tenant's.
pub const ADMIN_TENANT: &str = "*";

/// What a key may do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// The tenant API, as its tenant.
    #[default]
    Tenant,
    /// The operator API under `/v1/admin`, and nothing else.
    Admin,
}

impl Scope {
    /// As stored in `api_keys.scope`.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Tenant => "tenant",
            Scope::Admin => "admin",
        }
    }
    /// From `api_keys.scope` (a CHECK constraint allows only these two).
    fn from_db(s: &str) -> Scope {
        if s == "admin" {
            Scope::Admin
        } else {
            Scope::Tenant
        }
    }
}

/// A key creation or listing failed.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Bad input (tenant name, scope, expiry); nothing was written.
    #[error(transparent)]
    Invalid(#[from] InvalidInput),
    /// PostgreSQL failed.
    #[error(transparent)]
    Db(#[from] LedgerError),
}

impl From<sqlx::Error> for KeyError {
    fn from(e: sqlx::Error) -> Self {
        KeyError::Db(e.into())
    }
}

/// A key as printed once by `agentq tenant key create`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct NewKey {
    /// The tenant it belongs to ([`ADMIN_TENANT`] for an admin key).
    pub tenant: String,
    /// Public part, for listings and revocation.
    pub prefix: String,
    /// The whole key (give it to the tenant; it is not stored).
    pub key: String,
    /// What it may do.
    pub scope: Scope,
    /// When it stops working (None: never).
    pub expires_at: Option<DateTime<Utc>>,
}

/// What key to make: `agentq tenant key create` and `POST /v1/admin/keys`.
#[derive(Clone, Debug, Default)]
pub struct KeySpec {
    /// The tenant of a tenant key (an admin key takes none, or `*`).
    pub tenant: Option<String>,
    /// Its scope.
    pub scope: Scope,
    /// When it stops working (None: never).
    pub expires_at: Option<DateTime<Utc>>,
}

impl KeySpec {
    /// The tenant column to store, after checking the spec: a tenant key
    /// names a valid tenant, an admin key none, an expiry is in the future.
    pub fn stored_tenant(&self) -> Result<String, InvalidInput> {
        if let Some(at) = self.expires_at
            && at <= Utc::now()
        {
            return Err(InvalidInput(format!(
                "expiry {} is in the past: give a later time",
                at.to_rfc3339()
            )));
        }
        match (self.scope, self.tenant.as_deref()) {
            (Scope::Admin, None | Some(ADMIN_TENANT)) => Ok(ADMIN_TENANT.to_string()),
            (Scope::Admin, Some(t)) => Err(InvalidInput(format!(
                "an admin key belongs to no tenant: leave out the tenant ({t:?})"
            ))),
            (Scope::Tenant, None) => Err(InvalidInput(
                "a tenant key needs a tenant (or make an admin key)".into(),
            )),
            (Scope::Tenant, Some(t)) => {
                validate_name("tenant", t)?;
                Ok(t.to_string())
            }
        }
    }
}

/// When a key expires, from a duration from now (`30d`, `12h`) or an RFC
/// 3339 time; at most one of them (None: never). One parser for the CLI's
/// `--expires-in/--expires-at` and the API's `expires_in/expires_at`.
pub fn expiry(
    expires_in: Option<&str>,
    expires_at: Option<&str>,
) -> Result<Option<DateTime<Utc>>, InvalidInput> {
    match (expires_in, expires_at) {
        (None, None) => Ok(None),
        (Some(_), Some(_)) => Err(InvalidInput(
            "give an expiry as a duration (expires-in) or a time (expires-at), not both".into(),
        )),
        (Some(d), None) => {
            let d = crate::model::units::parse_duration(d)
                .map_err(|e| InvalidInput(format!("expires-in: {e}")))?;
            let d = chrono::Duration::from_std(d)
                .ok()
                .filter(|d| *d > chrono::Duration::zero() && *d <= chrono::Duration::days(36_500))
                .ok_or_else(|| InvalidInput("expires-in must be above zero and at most 36500d".into()))?;
            Ok(Some(Utc::now() + d))
        }
        (None, Some(t)) => DateTime::parse_from_rfc3339(t.trim())
            .map(|t| Some(t.with_timezone(&Utc)))
            .map_err(|_| {
                InvalidInput(format!(
                    "expires-at {t:?} is not an RFC 3339 time: write for example 2026-12-31T23:59:59Z"
                ))
            }),
    }
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

/// Create a tenant key for `tenant` that never expires.
pub async fn create(pool: &PgPool, tenant: &str) -> Result<NewKey, KeyError> {
    let spec = KeySpec {
        tenant: Some(tenant.to_string()),
        ..KeySpec::default()
    };
    create_key(pool, &spec).await
}

/// Create a key as `spec` says (checked first: nothing is written if bad).
pub async fn create_key(pool: &PgPool, spec: &KeySpec) -> Result<NewKey, KeyError> {
    let tenant = spec.stored_tenant()?;
    let prefix = random_hex(4);
    let secret = random_hex(32);
    sqlx::query(
        "INSERT INTO api_keys (prefix, tenant, secret_hash, scope, expires_at) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(&prefix)
    .bind(&tenant)
    .bind(hash(&secret))
    .bind(spec.scope.as_str())
    .bind(spec.expires_at)
    .execute(pool)
    .await?;
    Ok(NewKey {
        tenant,
        key: format!("aq_{prefix}_{secret}"),
        prefix,
        scope: spec.scope,
        expires_at: spec.expires_at,
    })
}

/// A key as listed (never its secret or hash).
#[derive(Clone, Debug, serde::Serialize)]
pub struct KeyInfo {
    /// The key's prefix.
    pub prefix: String,
    /// Its tenant ([`ADMIN_TENANT`] for an admin key).
    pub tenant: String,
    /// What it may do.
    pub scope: Scope,
    /// When it was made.
    pub created_at: DateTime<Utc>,
    /// When it stops (stopped) working (None: never).
    pub expires_at: Option<DateTime<Utc>>,
    /// When it was revoked (None: it was not).
    pub revoked_at: Option<DateTime<Utc>>,
    /// Past its expiry.
    pub expired: bool,
    /// Revoked.
    pub revoked: bool,
}

type InfoRow = (
    String,
    String,
    String,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
);

/// Every key (of `tenant` only if given), newest first.
pub async fn list(pool: &PgPool, tenant: Option<&str>) -> Result<Vec<KeyInfo>, LedgerError> {
    let rows: Vec<InfoRow> = sqlx::query_as(
        "SELECT prefix, tenant, scope, created_at, expires_at, revoked_at FROM api_keys \
         WHERE ($1::text IS NULL OR tenant = $1) ORDER BY created_at DESC, prefix",
    )
    .bind(tenant)
    .fetch_all(pool)
    .await?;
    let now = Utc::now();
    Ok(rows
        .into_iter()
        .map(
            |(prefix, tenant, scope, created_at, expires_at, revoked_at)| KeyInfo {
                prefix,
                tenant,
                scope: Scope::from_db(&scope),
                created_at,
                expired: expires_at.is_some_and(|e| e <= now),
                revoked: revoked_at.is_some(),
                expires_at,
                revoked_at,
            },
        )
        .collect())
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
    /// What it may do.
    pub scope: Scope,
    /// When it stops working (None: never).
    pub expires_at: Option<DateTime<Utc>>,
}

/// Who a valid key speaks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// Its tenant ([`ADMIN_TENANT`] for an admin key).
    pub tenant: String,
    /// What it may do.
    pub scope: Scope,
    /// Its prefix (names the operator in the audit log).
    pub prefix: String,
}

impl KeyRow {
    /// Neither revoked nor expired at `now`.
    pub fn live(&self, now: DateTime<Utc>) -> bool {
        !self.revoked && self.expires_at.is_none_or(|e| now < e)
    }

    /// Who the key speaks for, if this row is live now and `secret`
    /// matches its hash (compared in constant time). The clock is read
    /// here, not when the row was cached, so an expired key is refused
    /// from the cache too.
    pub fn accepts(&self, secret: &str) -> Option<Verified> {
        (self.live(Utc::now()) && constant_time_eq(&self.secret_hash, &hash(secret))).then(|| {
            Verified {
                tenant: self.tenant.clone(),
                scope: self.scope,
                prefix: self.prefix.clone(),
            }
        })
    }
}

type LoadRow = (String, String, Vec<u8>, bool, String, Option<DateTime<Utc>>);

/// The rows of `prefixes` (revoked and expired ones included; unknown ones left out).
pub async fn load(pool: &PgPool, prefixes: &[String]) -> Result<Vec<KeyRow>, LedgerError> {
    let rows: Vec<LoadRow> = sqlx::query_as(
        "SELECT prefix, tenant, secret_hash, revoked_at IS NOT NULL, scope, expires_at \
         FROM api_keys WHERE prefix = ANY($1)",
    )
    .bind(prefixes)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(prefix, tenant, secret_hash, revoked, scope, expires_at)| KeyRow {
                prefix,
                tenant,
                secret_hash,
                revoked,
                scope: Scope::from_db(&scope),
                expires_at,
            },
        )
        .collect())
}

/// Who a valid, live key speaks for, straight from PostgreSQL (the API
/// server goes through its [`KeyCache`](super::key_cache::KeyCache) instead).
pub async fn verify(pool: &PgPool, key: &str) -> Result<Option<Verified>, LedgerError> {
    let Some(KeyParts { prefix, secret }) = parse(key) else {
        return Ok(None);
    };
    let rows = load(pool, &[prefix.to_string()]).await?;
    Ok(rows.first().and_then(|r| r.accepts(secret)))
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

    #[test]
    fn expiries_parse_from_a_duration_or_a_time_not_both() {
        let now = chrono::Utc::now();
        let in_30d = super::expiry(Some("30d"), None)
            .expect("30d")
            .expect("some");
        assert!(
            (in_30d - now - chrono::Duration::days(30))
                .num_seconds()
                .abs()
                <= 5
        );
        let at = super::expiry(None, Some("2099-01-01T00:00:00+01:00")).expect("time");
        assert_eq!(
            at.map(|t| t.to_rfc3339()).as_deref(),
            Some("2098-12-31T23:00:00+00:00")
        );
        assert_eq!(super::expiry(None, None), Ok(None));
        for (d, t) in [
            (Some("1d"), Some("2099-01-01T00:00:00Z")),
            (Some("0s"), None),
            (Some("5"), None),
            (None, Some("soon")),
        ] {
            assert!(super::expiry(d, t).is_err(), "{d:?} {t:?}");
        }
    }

    #[test]
    fn a_spec_stores_admin_keys_under_star_and_refuses_mixups() {
        use super::{KeySpec, Scope};
        let spec = |tenant: Option<&str>, scope, secs: i64| KeySpec {
            tenant: tenant.map(str::to_string),
            scope,
            expires_at: Some(chrono::Utc::now() + chrono::Duration::seconds(secs)),
        };
        assert_eq!(
            spec(None, Scope::Admin, 60).stored_tenant().as_deref(),
            Ok("*")
        );
        assert_eq!(
            spec(Some("acme"), Scope::Tenant, 60)
                .stored_tenant()
                .as_deref(),
            Ok("acme")
        );
        assert!(
            spec(Some("acme"), Scope::Admin, 60)
                .stored_tenant()
                .is_err()
        );
        assert!(spec(None, Scope::Tenant, 60).stored_tenant().is_err());
        assert!(spec(Some("*"), Scope::Tenant, 60).stored_tenant().is_err());
        assert!(
            spec(Some("acme"), Scope::Tenant, -1)
                .stored_tenant()
                .is_err(),
            "already expired"
        );
    }

    #[test]
    fn an_expired_row_refuses_its_own_secret() {
        let secret = "0".repeat(64);
        let row = |expires_at| super::KeyRow {
            prefix: "a1b2c3d4".into(),
            tenant: "t".into(),
            secret_hash: super::hash(&secret),
            revoked: false,
            scope: super::Scope::Tenant,
            expires_at,
        };
        let later = chrono::Utc::now() + chrono::Duration::seconds(60);
        let earlier = chrono::Utc::now() - chrono::Duration::seconds(1);
        assert!(row(None).accepts(&secret).is_some());
        assert!(row(Some(later)).accepts(&secret).is_some());
        assert!(row(Some(earlier)).accepts(&secret).is_none());
    }
}
