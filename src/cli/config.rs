//! Connection settings: flags, then environment, then `agentq.toml`, then
//! defaults (README, "Command line").

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::model::limits::{self, LimitsUpdate, Tier};

/// Default Redis URL.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
/// Default PostgreSQL URL.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Settings shared by every command.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// Redis URL.
    pub redis_url: String,
    /// PostgreSQL URL.
    pub database_url: String,
    /// Key namespace in Redis (and schema-like prefix for tests).
    pub namespace: String,
    /// Number of Redis partitions tenants are spread over.
    pub partitions: u32,
    /// Tiers workers publish to Redis at start (from `[tiers.NAME]` in the
    /// file, else the built-in free, pro and enterprise).
    pub tiers: Vec<Tier>,
}

/// What the `agentq.toml` file may set.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSettings {
    /// Redis URL.
    pub redis_url: Option<String>,
    /// PostgreSQL URL.
    pub database_url: Option<String>,
    /// Namespace.
    pub namespace: Option<String>,
    /// Partitions.
    pub partitions: Option<u32>,
    /// Tiers by name.
    pub tiers: Option<BTreeMap<String, TierConfig>>,
}

/// One `[tiers.NAME]` table: limits and prices, in the CLI's units.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierConfig {
    /// Most jobs running at once per tenant.
    pub max_concurrency: Option<u64>,
    /// For example "30m".
    pub max_timeout: Option<String>,
    /// For example "2GiB".
    pub max_memory: Option<String>,
    /// Share of starts.
    pub weight: Option<u64>,
    /// For example "600/m" or "none".
    pub rate: Option<String>,
    /// Starts allowed at once above the rate.
    pub burst: Option<u64>,
    /// For example "500h/month" or "none".
    pub quota: Option<String>,
    /// Dollars per agent-minute.
    pub price_per_minute: Option<f64>,
    /// Dollars per 1,000 tokens.
    pub price_per_1k_tokens: Option<f64>,
    /// For example "200/m": twice this start rate raises an alert.
    pub expected_rate: Option<String>,
    /// Graduated price per agent-minute, for example
    /// "0.010, 0.008@10000m, 0.006@50000m" (README, "Volume pricing").
    pub price_steps: Option<String>,
    /// Graduated price per 1,000 tokens, for example "0.002, 0.0015@10M".
    pub token_price_steps: Option<String>,
    /// For example "$500/month" or "none".
    pub spend_cap: Option<String>,
}

impl TierConfig {
    /// Convert to a tier, with one-line errors naming the field.
    pub fn into_tier(self, name: &str) -> Result<Tier, ConfigError> {
        let bad =
            |field: &str, e: String| ConfigError::Invalid(format!("tiers.{name}.{field}: {e}"));
        let limits = LimitsUpdate {
            max_concurrency: self.max_concurrency,
            max_timeout: self
                .max_timeout
                .map(|v| {
                    crate::model::units::parse_duration(&v)
                        .map_err(|e| bad("max_timeout", e.to_string()))
                })
                .transpose()?,
            max_memory: self
                .max_memory
                .map(|v| {
                    crate::model::units::parse_size(&v)
                        .map_err(|e| bad("max_memory", e.to_string()))
                })
                .transpose()?,
            weight: self.weight,
            rate: self
                .rate
                .map(|v| limits::parse_rate(&v).map_err(|e| bad("rate", e)))
                .transpose()?,
            burst: self.burst,
            quota: self
                .quota
                .map(|v| limits::parse_quota(&v).map_err(|e| bad("quota", e)))
                .transpose()?,
            tier: None,
            price_per_minute: self.price_per_minute,
            price_per_1k_tokens: self.price_per_1k_tokens,
            expected_rate: self
                .expected_rate
                .map(|v| limits::parse_rate(&v).map_err(|e| bad("expected_rate", e)))
                .transpose()?,
            price_steps: self
                .price_steps
                .map(|v| {
                    limits::PriceSteps::parse(&v, limits::PriceUnit::Minutes)
                        .map_err(|e| bad("price_steps", e))
                })
                .transpose()?,
            token_price_steps: self
                .token_price_steps
                .map(|v| {
                    limits::PriceSteps::parse(&v, limits::PriceUnit::Tokens)
                        .map_err(|e| bad("token_price_steps", e))
                })
                .transpose()?,
            spend_cap: self
                .spend_cap
                .map(|v| limits::parse_spend_cap(&v).map_err(|e| bad("spend_cap", e)))
                .transpose()?,
        };
        limits
            .validate()
            .map_err(|e| bad("limits", e.to_string()))?;
        Ok(Tier {
            name: name.to_string(),
            limits,
        })
    }
}

/// Errors reading settings.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read or parsed.
    #[error("{path}: {msg}")]
    File {
        /// File path.
        path: String,
        /// What was wrong.
        msg: String,
    },
    /// A value is out of range.
    #[error("{0}")]
    Invalid(String),
}

/// Values given on the command line (None: not given).
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `--redis-url`.
    pub redis_url: Option<String>,
    /// `--database-url`.
    pub database_url: Option<String>,
    /// `--namespace`.
    pub namespace: Option<String>,
    /// `--partitions`.
    pub partitions: Option<u32>,
    /// `--config` (default `agentq.toml` if present).
    pub config: Option<String>,
}

fn env(names: &[&str]) -> Option<String> {
    names
        .iter()
        .find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()))
}

impl Settings {
    /// Resolve settings: flags, environment, file, defaults.
    pub fn resolve(o: &Overrides) -> Result<Settings, ConfigError> {
        let file = match &o.config {
            Some(p) => read_file(Path::new(p))?,
            None if Path::new("agentq.toml").exists() => read_file(Path::new("agentq.toml"))?,
            None => FileSettings::default(),
        };
        let partitions = match o.partitions {
            Some(p) => p,
            None => match env(&["AGENTQ_PARTITIONS"]) {
                Some(v) => v.parse().map_err(|_| {
                    ConfigError::Invalid(format!(
                        "AGENTQ_PARTITIONS={v:?} is not a number: use 1..=1024"
                    ))
                })?,
                None => file.partitions.unwrap_or(1),
            },
        };
        if !(1..=1024).contains(&partitions) {
            return Err(ConfigError::Invalid(format!(
                "partitions {partitions} out of range: use 1..=1024"
            )));
        }
        let tiers = match file.tiers {
            Some(map) => map
                .into_iter()
                .map(|(name, t)| t.into_tier(&name))
                .collect::<Result<Vec<_>, _>>()?,
            None => limits::builtin_tiers(),
        };
        Ok(Settings {
            tiers,
            redis_url: o
                .redis_url
                .clone()
                .or_else(|| env(&["AGENTQ_REDIS_URL", "REDIS_URL"]))
                .or(file.redis_url)
                .unwrap_or_else(|| DEFAULT_REDIS_URL.into()),
            database_url: o
                .database_url
                .clone()
                .or_else(|| env(&["AGENTQ_DATABASE_URL", "DATABASE_URL"]))
                .or(file.database_url)
                .unwrap_or_else(|| DEFAULT_DATABASE_URL.into()),
            namespace: o
                .namespace
                .clone()
                .or_else(|| env(&["AGENTQ_NAMESPACE"]))
                .or(file.namespace)
                .unwrap_or_else(|| "agentq".into()),
            partitions,
        })
    }

    /// True when neither URL came from a flag, the environment or a file.
    pub fn redis_is_default(&self) -> bool {
        self.redis_url == DEFAULT_REDIS_URL
    }

    /// True when the database URL is the built-in default.
    pub fn database_is_default(&self) -> bool {
        self.database_url == DEFAULT_DATABASE_URL
    }
}

fn read_file(path: &Path) -> Result<FileSettings, ConfigError> {
    let err = |msg: String| ConfigError::File {
        path: path.display().to_string(),
        msg,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    toml::from_str(&text).map_err(|e| err(e.message().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_come_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agentq.toml");
        std::fs::write(&path, "[tiers.gold]\nmax_concurrency = 7\nrate = \"20/s\"\nquota = \"50h/month\"\nprice_per_minute = 0.02\n").unwrap();
        let s = Settings::resolve(&Overrides {
            config: Some(path.display().to_string()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.tiers.len(), 1);
        assert_eq!(s.tiers[0].name, "gold");
        assert_eq!(s.tiers[0].limits.max_concurrency, Some(7));
        assert_eq!(
            s.tiers[0].limits.quota,
            Some(std::time::Duration::from_secs(50 * 3600))
        );
        std::fs::write(
            &path,
            "[tiers.gold]\nprice_steps = \"0.010, 0.008@10000m, 0.006@50000m\"\nspend_cap = \"$500/month\"\n",
        )
        .unwrap();
        let s = Settings::resolve(&Overrides {
            config: Some(path.display().to_string()),
            ..Default::default()
        })
        .unwrap();
        let l = &s.tiers[0].limits;
        assert_eq!(l.spend_cap, Some(500_000_000));
        assert_eq!(
            l.price_steps.as_ref().map(|p| p.to_field()),
            Some("0:10000,600000000:8000,3000000000:6000".to_string())
        );
        std::fs::write(
            &path,
            "[tiers.gold]\nprice_steps = \"0.01, 0.02@1h, 0.01@30m\"\n",
        )
        .unwrap();
        let e = Settings::resolve(&Overrides {
            config: Some(path.display().to_string()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("tiers.gold.price_steps"), "{e}");
        std::fs::write(&path, "[tiers.gold]\nrate = \"lots\"\n").unwrap();
        let e = Settings::resolve(&Overrides {
            config: Some(path.display().to_string()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("tiers.gold.rate"), "{e}");
    }
}
