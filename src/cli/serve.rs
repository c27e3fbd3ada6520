//! `agentq serve` and `agentq tenant key create|revoke`.

use std::num::NonZeroU32;

use clap::{Args, Subcommand};
use tokio_util::sync::CancellationToken;

use super::{CliError, CliResult, Global, output};

/// `agentq serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// Requests per second allowed per tenant (burst: twice that).
    #[arg(long, default_value_t = NonZeroU32::new(100).unwrap_or(NonZeroU32::MIN))]
    rate_limit: NonZeroU32,
    /// Event streams (SSE, WebSocket) and long polls one tenant may hold
    /// open on this server at once; past it, 429 `too_many_streams`.
    #[arg(long, default_value_t = 100)]
    max_streams_per_tenant: usize,
    /// Replica confirmation of every enqueue (503 not_replicated without it).
    #[command(flatten)]
    ack: super::ReplicaAck,
    /// Serve Prometheus metrics, /healthz and /readyz on this address (for
    /// example 0.0.0.0:9464), or off.
    #[arg(long, default_value = "off")]
    metrics_addr: String,
    /// Tenant label values on serve's metrics: all or none ("other"); workers
    /// rank tenants for top:N, serve does not.
    #[arg(long, default_value = "none")]
    metrics_tenant_labels: crate::metrics::TenantLabels,
    /// JWT sign-in besides API keys (README, "Enqueueing from other services").
    #[command(flatten)]
    jwt: JwtArgs,
    /// Don't serve the web dashboard at /ui (README, "Dashboard").
    #[arg(long)]
    no_ui: bool,
    /// Mark the dashboard's session cookie Secure: serve is behind a TLS
    /// proxy (it is also marked so for requests with X-Forwarded-Proto: https).
    #[arg(long)]
    ui_secure_cookie: bool,
}

/// `agentq serve`'s JWT flags: with a JWKS (file or URL), bearer tokens
/// signed RS256 or ES256 are accepted besides API keys.
#[derive(Debug, Args)]
pub struct JwtArgs {
    /// JWKS file of the identity provider's public keys.
    #[arg(long, conflicts_with = "jwks_url")]
    jwks_file: Option<std::path::PathBuf>,
    /// JWKS URL (http:// or https://), fetched at start and re-read.
    #[arg(long)]
    jwks_url: Option<String>,
    /// Required `iss` of a JWT (required with a JWKS).
    #[arg(long)]
    jwt_issuer: Option<String>,
    /// Required `aud` of a JWT (required with a JWKS).
    #[arg(long)]
    jwt_audience: Option<String>,
    /// Claim holding the tenant: a top-level claim, else a dotted path (org.id).
    #[arg(long, default_value = "tenant")]
    jwt_tenant_claim: String,
    /// How often the JWKS is re-read.
    #[arg(long, default_value = "5m", value_parser = super::duration_arg)]
    jwks_refresh: std::time::Duration,
    /// Least time between two re-reads of the JWKS for unknown kids.
    #[arg(long, default_value = "30s", value_parser = super::duration_arg)]
    jwks_min_refetch: std::time::Duration,
}

impl JwtArgs {
    async fn start(&self) -> Result<Option<std::sync::Arc<crate::http::api::jwt::Jwt>>, CliError> {
        use crate::http::api::jwt::{JwksSource, JwtConfig};
        let source = match (&self.jwks_file, &self.jwks_url) {
            (Some(f), _) => JwksSource::File(f.clone()),
            (None, Some(u)) => JwksSource::Url(u.clone()),
            (None, None) => {
                if self.jwt_issuer.is_some() || self.jwt_audience.is_some() {
                    return Err(CliError::Usage(
                        "agentq serve: --jwt-issuer and --jwt-audience need --jwks-file or --jwks-url"
                            .into(),
                    ));
                }
                return Ok(None);
            }
        };
        let mut cfg = JwtConfig::new(
            source,
            self.jwt_issuer.as_deref().unwrap_or(""),
            self.jwt_audience.as_deref().unwrap_or(""),
        );
        cfg.tenant_claim = self.jwt_tenant_claim.clone();
        cfg.refresh = self.jwks_refresh;
        cfg.min_refetch = self.jwks_min_refetch;
        if let Err(e) = cfg.validate() {
            return Err(CliError::Usage(format!("agentq serve: {}", e.problem)));
        }
        crate::http::api::jwt::Jwt::start(cfg)
            .await
            .map(Some)
            .map_err(|e| CliError::Runtime(anyhow::anyhow!("agentq serve: {e}")))
    }
}

pub(super) async fn serve(g: &Global, a: ServeArgs) -> CliResult {
    super::run::forbid_dumping()?;
    let addr: std::net::SocketAddr = a.listen.parse().map_err(|_| {
        CliError::Usage(format!(
            "--listen {:?} is not HOST:PORT, for example 127.0.0.1:8080",
            a.listen
        ))
    })?;
    let queue = g.queue_acked(&a.ack).await?;
    let db = database_lazily(g).await?;
    if matches!(
        a.metrics_tenant_labels,
        crate::metrics::TenantLabels::Top(_)
    ) {
        return Err(CliError::Usage(
            "agentq serve: --metrics-tenant-labels is all or none (top:N needs a worker's ranking)"
                .into(),
        ));
    }
    crate::metrics::set_tenant_labels(a.metrics_tenant_labels);
    let jwt = a.jwt.start().await?;
    let stop = CancellationToken::new();
    super::cancel_on_signals(stop.clone())?;
    super::run::serve_metrics(
        Some(&a.metrics_addr),
        crate::http::probes::Readiness {
            queue: queue.clone(),
            db: Some(db.clone()),
        },
        stop.clone(),
    )
    .await?;
    let cfg = crate::http::api::ApiConfig {
        tenant_rate: a.rate_limit,
        max_streams_per_tenant: a.max_streams_per_tenant,
        jwt,
        ui: crate::http::api::ui::UiConfig {
            enabled: !a.no_ui,
            secure_cookies: a.ui_secure_cookie,
            stop: stop.clone(),
            ..Default::default()
        },
        ..Default::default()
    };
    crate::http::api::serve(addr, queue, db, cfg, stop)
        .await
        .map_err(|e| CliError::Runtime(anyhow::anyhow!("cannot serve on {addr}: {e}")))
}

/// `agentq tenant key ...`.
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create an API key for a tenant, or an admin key; prints it once (only a hash is stored).
    Create {
        /// Tenant (none with --admin).
        #[arg(required_unless_present = "admin", conflicts_with = "admin")]
        tenant: Option<String>,
        /// An operator key for the /v1/admin routes only (no tenant).
        #[arg(long)]
        admin: bool,
        /// The key stops working after this long, e.g. 30d or 12h (default: never).
        #[arg(long, conflicts_with = "expires_at")]
        expires_in: Option<String>,
        /// The key stops working at this RFC 3339 time, e.g. 2026-12-31T23:59:59Z.
        #[arg(long)]
        expires_at: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by its prefix (the part after aq_) or the whole key.
    Revoke {
        /// Key prefix or key.
        key: String,
    },
}

pub(super) async fn key(g: &Global, c: KeyCommand) -> CliResult {
    let db = database_lazily(g).await?;
    match c {
        KeyCommand::Create {
            tenant,
            admin,
            expires_in,
            expires_at,
            json,
        } => create_key(&db, tenant, admin, expires_in, expires_at, json).await?,
        KeyCommand::Revoke { key } => {
            // The revocation is announced in the namespace, so every
            // `agentq serve` on it drops the key from its cache at once.
            // Redis being unreachable does not stop the revocation itself.
            let queue = g.queue().await;
            match crate::http::api::keys::revoke(&db, queue.as_ref().ok(), &key)
                .await
                .map_err(|e| CliError::Runtime(e.into()))?
            {
                Some(r) => {
                    println!("revoked key {} of tenant {}", r.prefix, r.tenant);
                    let why = queue.err().map(|e| e.to_string());
                    if let Some(e) = why.or(r.not_announced) {
                        return Err(CliError::Runtime(anyhow::anyhow!(
                            "key {} is revoked in PostgreSQL, but running `agentq serve` processes \
                             could not be told through Redis ({e}): they refuse it within 60s \
                             (their key cache refresh)",
                            r.prefix
                        )));
                    }
                }
                None => {
                    return Err(CliError::Usage(format!(
                        "no active key {key:?}: give the prefix printed at creation"
                    )));
                }
            }
        }
    }
    Ok(())
}

/// `agentq tenant key create`: the spec is checked before anything is written.
async fn create_key(
    db: &sqlx::PgPool,
    tenant: Option<String>,
    admin: bool,
    expires_in: Option<String>,
    expires_at: Option<String>,
    json: bool,
) -> CliResult {
    use crate::http::api::keys::{self, KeyError, KeySpec, Scope};
    let spec = KeySpec {
        tenant,
        scope: if admin { Scope::Admin } else { Scope::Tenant },
        expires_at: keys::expiry(expires_in.as_deref(), expires_at.as_deref())?,
    };
    let k = keys::create_key(db, &spec).await.map_err(|e| match e {
        KeyError::Invalid(e) => CliError::from(e),
        KeyError::Db(e) => CliError::Runtime(e.into()),
    })?;
    if json {
        output::json(&k);
        return Ok(());
    }
    println!("{}", k.key);
    let whose = match k.scope {
        Scope::Admin => "admin key (the /v1/admin routes only)".to_string(),
        Scope::Tenant => format!("for tenant {}", k.tenant),
    };
    let until = k
        .expires_at
        .map_or(String::new(), |t| format!(", expires {}", t.to_rfc3339()));
    eprintln!(
        "created key {} {whose}{until} (shown once: store it now)",
        k.prefix
    );
    Ok(())
}

/// The API's PostgreSQL pool, connected on first use: `serve` starts while
/// PostgreSQL is down (a restart during an outage must not take enqueues
/// down; keys it has not seen get 503 `auth_unavailable` until PostgreSQL
/// answers). Migrations are applied when PostgreSQL answers at start; an
/// unreachable server is a warning, any other migration failure an error.
async fn database_lazily(g: &Global) -> Result<sqlx::PgPool, CliError> {
    let url = g.settings()?.database_url;
    let shown = crate::model::redact::redact_url(&url);
    let db = crate::ledger::connect_lazy(&url)
        .map_err(|e| CliError::Usage(format!("database URL {shown} is not valid: {e}")))?;
    match crate::ledger::migrate(&db).await {
        Ok(()) => {}
        Err(e) if unreachable(&e) => tracing::warn!(
            database = %shown,
            error = %e,
            "PostgreSQL is unreachable: serving anyway; API keys not yet cached get 503 \
             auth_unavailable until it answers (migrations: run `agentq migrate` then)"
        ),
        Err(e) => return Err(CliError::Runtime(e.into())),
    }
    Ok(db)
}

/// PostgreSQL did not answer, or the connection broke before it could
/// (a reset during the TLS or startup exchange reads as a protocol error),
/// as opposed to PostgreSQL refusing a migration (a database error) or the
/// migrations not matching the database (the other migrate errors).
fn unreachable(e: &crate::ledger::LedgerError) -> bool {
    use crate::ledger::LedgerError;
    let sql = match e {
        LedgerError::Db(s) => s,
        LedgerError::Migrate(sqlx::migrate::MigrateError::Execute(s)) => s,
        _ => return false,
    };
    matches!(
        sql,
        sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
    )
}
