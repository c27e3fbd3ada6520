//! Tenant limits: what the claim script enforces before a job starts.
//!
//! Limits live in Redis (`B:tenant:<t>`, falling back to `B:defaults`, then
//! to built-in values), so a change made with `agentq tenant set` holds for
//! the whole fleet from the next claim on, with no restart. The enforcement
//! itself (concurrency cap, weights, pauses) is in `src/queue/scripts/`.

use std::collections::HashMap;
use std::time::Duration;

use fred::prelude::*;
use serde::Serialize;

use crate::queue::{Queue, QueueError};

/// Built-in limits for tenants nobody configured (mirrors `lib.lua`).
pub const BUILTIN: Limits = Limits {
    max_concurrency: 10,
    max_timeout_ms: 3_600_000,
    max_memory: 4 << 30,
    weight: 1,
};

/// Valid ranges, checked before anything is written.
pub const MAX_CONCURRENCY_RANGE: std::ops::RangeInclusive<u64> = 1..=100_000;
/// Weight range (relative share of starts among backlogged tenants).
pub const WEIGHT_RANGE: std::ops::RangeInclusive<u64> = 1..=1000;
/// Timeout cap range.
pub const MAX_TIMEOUT_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(7 * 24 * 3600);
/// Memory cap range.
pub const MAX_MEMORY_RANGE: std::ops::RangeInclusive<u64> = (1 << 20)..=(1 << 40);

/// Effective limits of a tenant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Limits {
    /// Most jobs running at once, fleet-wide, across all queues.
    pub max_concurrency: u64,
    /// Longest timeout a job may request, ms.
    pub max_timeout_ms: u64,
    /// Largest memory cap a job may request, bytes.
    pub max_memory: u64,
    /// Share of starts relative to other backlogged tenants.
    pub weight: u64,
}

/// A change to a tenant's (or the defaults') limits; `None` leaves a field
/// alone. Build it, [`validate`](Self::validate) it, then [`apply`](Self::apply).
#[derive(Clone, Debug, Default)]
pub struct LimitsUpdate {
    /// New concurrency cap.
    pub max_concurrency: Option<u64>,
    /// New timeout cap.
    pub max_timeout: Option<Duration>,
    /// New memory cap, bytes.
    pub max_memory: Option<u64>,
    /// New weight.
    pub weight: Option<u64>,
    /// Tier name (label, billing; tiers' own limits come with the ledger).
    pub tier: Option<String>,
}

impl LimitsUpdate {
    /// Check every field's range; the error names the flag and the range.
    pub fn validate(&self) -> Result<(), QueueError> {
        let out_of = |what: &str, range: &str| {
            Err(QueueError::Invalid(format!(
                "{what} is out of range: use {range}"
            )))
        };
        if let Some(n) = self.max_concurrency
            && !MAX_CONCURRENCY_RANGE.contains(&n)
        {
            return out_of("--max-concurrency", "1..=100000");
        }
        if let Some(d) = self.max_timeout
            && !MAX_TIMEOUT_RANGE.contains(&d)
        {
            return out_of("--max-timeout", "1s..=7d");
        }
        if let Some(m) = self.max_memory
            && !MAX_MEMORY_RANGE.contains(&m)
        {
            return out_of("--max-memory", "1MiB..=1TiB");
        }
        if let Some(w) = self.weight
            && !WEIGHT_RANGE.contains(&w)
        {
            return out_of("--weight", "1..=1000");
        }
        if let Some(t) = &self.tier {
            crate::queue::job::validate_name("tier", t)?;
        }
        Ok(())
    }

    /// True if nothing would change.
    pub fn is_empty(&self) -> bool {
        self.max_concurrency.is_none()
            && self.max_timeout.is_none()
            && self.max_memory.is_none()
            && self.weight.is_none()
            && self.tier.is_none()
    }

    /// Validate and write: `tenant` None changes the defaults.
    pub async fn apply(&self, queue: &Queue, tenant: Option<&str>) -> Result<(), QueueError> {
        self.validate()?;
        let mut fields: Vec<(&str, Option<String>)> = Vec::new();
        if let Some(n) = self.max_concurrency {
            fields.push(("max_concurrency", Some(n.to_string())));
        }
        if let Some(d) = self.max_timeout {
            fields.push(("max_timeout_ms", Some(d.as_millis().to_string())));
        }
        if let Some(m) = self.max_memory {
            fields.push(("max_memory", Some(m.to_string())));
        }
        if let Some(w) = self.weight {
            fields.push(("weight", Some(w.to_string())));
        }
        if let Some(t) = &self.tier {
            fields.push(("tier", Some(t.clone())));
        }
        queue.set_tenant_fields(tenant, &fields).await
    }
}

/// A tenant's limits as configured and as in effect.
#[derive(Clone, Debug, Serialize)]
pub struct TenantSettings {
    /// Tenant name.
    pub tenant: String,
    /// Tier label, if set.
    pub tier: Option<String>,
    /// Limits in effect (own setting, else default, else built-in).
    pub limits: Limits,
    /// Fields the tenant sets itself (the rest are defaults).
    pub own: Vec<String>,
}

fn field(
    own: &HashMap<String, String>,
    defaults: &HashMap<String, String>,
    name: &str,
    builtin: u64,
) -> u64 {
    own.get(name)
        .or_else(|| defaults.get(name))
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or(builtin)
}

/// Read a tenant's settings (`tenant` None: the defaults of partition 0).
pub async fn settings(queue: &Queue, tenant: Option<&str>) -> Result<TenantSettings, QueueError> {
    let p = tenant.map_or(0, |t| queue.partition_of(t));
    let defaults = defaults(queue, p).await?;
    match tenant {
        Some(t) => tenant_settings(queue, t, &defaults).await,
        None => Ok(resolve("(defaults)", &defaults, &defaults)),
    }
}

/// The raw defaults hash of partition `p`.
pub async fn defaults(queue: &Queue, p: u32) -> Result<HashMap<String, String>, QueueError> {
    Ok(queue
        .client()
        .hgetall(queue.keys(p).key(&["defaults"]))
        .await?)
}

/// A tenant's settings given its partition's `defaults` (read once by
/// callers that list many tenants).
pub async fn tenant_settings(
    queue: &Queue,
    tenant: &str,
    defaults: &HashMap<String, String>,
) -> Result<TenantSettings, QueueError> {
    let key = queue
        .keys(queue.partition_of(tenant))
        .key(&["tenant", tenant]);
    let own: HashMap<String, String> = queue.client().hgetall(key).await?;
    Ok(resolve(tenant, &own, defaults))
}

fn resolve(
    tenant: &str,
    own: &HashMap<String, String>,
    defaults: &HashMap<String, String>,
) -> TenantSettings {
    let limits = Limits {
        max_concurrency: field(own, defaults, "max_concurrency", BUILTIN.max_concurrency),
        max_timeout_ms: field(own, defaults, "max_timeout_ms", BUILTIN.max_timeout_ms),
        max_memory: field(own, defaults, "max_memory", BUILTIN.max_memory),
        weight: field(own, defaults, "weight", BUILTIN.weight),
    };
    let mut own_fields: Vec<String> = own.keys().cloned().collect();
    own_fields.sort();
    TenantSettings {
        tenant: tenant.to_string(),
        tier: own.get("tier").cloned(),
        limits,
        own: own_fields,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_enforced_with_the_flag_named() {
        let bad = LimitsUpdate {
            max_concurrency: Some(0),
            ..Default::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("--max-concurrency")
        );
        let bad = LimitsUpdate {
            weight: Some(5000),
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("--weight"));
        let bad = LimitsUpdate {
            max_timeout: Some(Duration::from_millis(10)),
            ..Default::default()
        };
        assert!(bad.validate().is_err());
        let ok = LimitsUpdate {
            max_concurrency: Some(4),
            weight: Some(3),
            ..Default::default()
        };
        assert!(ok.validate().is_ok());
    }
}
