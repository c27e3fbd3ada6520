//! Connection settings: flags, then environment, then `agentq.toml`, then
//! defaults (DESIGN.md, "Command-line surface").

use std::path::Path;

use serde::Deserialize;

/// Default Redis URL.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
/// Default PostgreSQL URL.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Settings shared by every command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Redis URL.
    pub redis_url: String,
    /// PostgreSQL URL.
    pub database_url: String,
    /// Key namespace in Redis (and schema-like prefix for tests).
    pub namespace: String,
    /// Number of Redis partitions tenants are spread over.
    pub partitions: u32,
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
        Ok(Settings {
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
}

fn read_file(path: &Path) -> Result<FileSettings, ConfigError> {
    let err = |msg: String| ConfigError::File {
        path: path.display().to_string(),
        msg,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    toml::from_str(&text).map_err(|e| err(e.message().to_string()))
}

/// A URL with its password replaced by `***`, for logs and messages.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let Some((auth, host)) = rest.rsplit_once('@') else {
        return url.to_string();
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact_url("redis://:secret@h:1/0"), "redis://:***@h:1/0");
        assert_eq!(redact_url("postgres://u:p@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact_url("redis://h:1"), "redis://h:1");
    }
}
