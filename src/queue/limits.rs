//! Tenant limits in Redis: write a [`LimitsUpdate`] to a tenant, a tier or
//! the defaults (the `tenant_set` script re-syncs admission atomically), and
//! read what is configured and in effect.

use std::collections::HashMap;

use fred::prelude::*;
use serde::Serialize;

use super::{Queue, QueueError};
use crate::model::limits::{LimitsUpdate, PriceSteps, Target, TenantLimits, Tier};
use crate::model::names::validate_name;

// The Redis side of a limits value (an inherent impl may live in any
// module of the crate: the value stays on the ground floor).
impl LimitsUpdate {
    /// Validate and write to `target` (tiers and defaults on every
    /// partition); from the next claim on it holds fleet-wide.
    pub async fn apply(&self, queue: &Queue, target: Target<'_>) -> Result<(), QueueError> {
        self.validate()?;
        let fields: Vec<(&str, Option<String>)> = self
            .fields()
            .into_iter()
            .map(|(k, v)| (k, Some(v)))
            .collect();
        queue.set_limit_fields(target, &fields).await
    }
}

/// Write tiers to Redis (every partition); tenants on them re-sync at once.
pub async fn publish_tiers(queue: &Queue, tiers: &[Tier]) -> Result<(), QueueError> {
    for t in tiers {
        validate_name("tier", &t.name)?;
        t.limits.apply(queue, Target::Tier(&t.name)).await?;
    }
    Ok(())
}

/// A tier as published in Redis.
#[derive(Clone, Debug, Serialize)]
pub struct PublishedTier {
    /// Tier name.
    #[serde(rename = "tier")]
    pub name: String,
    /// Its limits (own settings, else the defaults, else built-in).
    pub limits: TenantLimits,
    /// Graduated price per agent-minute (empty: flat).
    pub price_steps: PriceSteps,
    /// Graduated price per 1,000 tokens (empty: flat).
    pub token_price_steps: PriceSteps,
}

/// The tiers published in Redis, by name.
pub async fn published_tiers(queue: &Queue) -> Result<Vec<PublishedTier>, QueueError> {
    let keys = queue.keys(0);
    let mut names: Vec<String> = queue.client().smembers(keys.key(&["tiers"])).await?;
    names.sort();
    let defaults = defaults(queue, 0).await?;
    let mut out = Vec::new();
    for n in names {
        let own: HashMap<String, String> = queue.client().hgetall(keys.key(&["tier", &n])).await?;
        let (price_steps, token_price_steps) = resolve_steps(&[&own, &defaults]);
        out.push(PublishedTier {
            limits: TenantLimits::resolve(&[&own, &defaults]),
            name: n,
            price_steps,
            token_price_steps,
        });
    }
    Ok(out)
}

/// A tenant's limits as configured and as in effect.
#[derive(Clone, Debug, Serialize)]
pub struct TenantSettings {
    /// Tenant name.
    pub tenant: String,
    /// Tier, if set.
    pub tier: Option<String>,
    /// Limits in effect (own setting, else tier, else default, else built-in).
    pub limits: TenantLimits,
    /// Fields the tenant sets itself (the rest come from its tier or defaults).
    pub own: Vec<String>,
    /// Graduated price per agent-minute in effect (empty: flat).
    pub price_steps: PriceSteps,
    /// Graduated price per 1,000 tokens in effect (empty: flat).
    pub token_price_steps: PriceSteps,
}

/// The price schedules in effect: each from the first layer that sets it
/// (as the scripts resolve them; `none` in a layer stops the search).
pub fn resolve_steps(layers: &[&HashMap<String, String>]) -> (PriceSteps, PriceSteps) {
    let get = |f: &str| {
        layers
            .iter()
            .find_map(|l| l.get(f))
            .and_then(|v| PriceSteps::from_field(v))
            .unwrap_or_default()
    };
    (get("price_minute_steps"), get("price_ktok_steps"))
}

/// Read a tenant's settings (`tenant` None: the defaults of partition 0).
pub async fn settings(queue: &Queue, tenant: Option<&str>) -> Result<TenantSettings, QueueError> {
    let p = tenant.map_or(0, |t| queue.partition_of(t));
    let defaults = defaults(queue, p).await?;
    match tenant {
        Some(t) => tenant_settings(queue, t, &defaults).await,
        None => {
            let (price_steps, token_price_steps) = resolve_steps(&[&defaults]);
            Ok(TenantSettings {
                tenant: "(defaults)".into(),
                tier: None,
                limits: TenantLimits::resolve(&[&defaults]),
                own: sorted_keys(&defaults),
                price_steps,
                token_price_steps,
            })
        }
    }
}

/// The raw defaults hash of partition `p`.
pub async fn defaults(queue: &Queue, p: u32) -> Result<HashMap<String, String>, QueueError> {
    Ok(queue
        .client()
        .hgetall(queue.keys(p).key(&["defaults"]))
        .await?)
}

fn sorted_keys(h: &HashMap<String, String>) -> Vec<String> {
    let mut v: Vec<String> = h.keys().cloned().collect();
    v.sort();
    v
}

/// A tenant's settings given its partition's `defaults` (read once by
/// callers that list many tenants).
pub async fn tenant_settings(
    queue: &Queue,
    tenant: &str,
    defaults: &HashMap<String, String>,
) -> Result<TenantSettings, QueueError> {
    let keys = queue.keys(queue.partition_of(tenant));
    let own: HashMap<String, String> = queue
        .client()
        .hgetall(keys.key(&["tenant", tenant]))
        .await?;
    let tier = own.get("tier").cloned();
    let tier_fields: HashMap<String, String> = match &tier {
        Some(name) => queue.client().hgetall(keys.key(&["tier", name])).await?,
        None => HashMap::new(),
    };
    let (price_steps, token_price_steps) = resolve_steps(&[&own, &tier_fields, defaults]);
    Ok(TenantSettings {
        tenant: tenant.to_string(),
        tier,
        limits: TenantLimits::resolve(&[&own, &tier_fields, defaults]),
        own: sorted_keys(&own),
        price_steps,
        token_price_steps,
    })
}
