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
}

pub(super) async fn serve(g: &Global, a: ServeArgs) -> CliResult {
    let addr: std::net::SocketAddr = a.listen.parse().map_err(|_| {
        CliError::Usage(format!(
            "--listen {:?} is not HOST:PORT, for example 127.0.0.1:8080",
            a.listen
        ))
    })?;
    let queue = g.queue().await?;
    let db = super::usage::database(g).await?;
    crate::ledger::migrate(&db)
        .await
        .map_err(|e| CliError::Runtime(e.into()))?;
    let stop = CancellationToken::new();
    super::cancel_on_signals(stop.clone())?;
    let cfg = crate::http::api::ApiConfig {
        tenant_rate: a.rate_limit,
        ..Default::default()
    };
    crate::http::api::serve(addr, queue, db, cfg, stop)
        .await
        .map_err(|e| CliError::Runtime(anyhow::anyhow!("cannot serve on {addr}: {e}")))
}

/// `agentq tenant key ...`.
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create an API key for a tenant; prints it once (only a hash is stored).
    Create {
        /// Tenant.
        tenant: String,
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
    let db = super::usage::database(g).await?;
    crate::ledger::migrate(&db)
        .await
        .map_err(|e| CliError::Runtime(e.into()))?;
    match c {
        KeyCommand::Create { tenant, json } => {
            crate::queue::job::validate_name("tenant", &tenant)?;
            let k = crate::http::api::keys::create(&db, &tenant)
                .await
                .map_err(|e| CliError::Runtime(e.into()))?;
            if json {
                output::json(&k);
            } else {
                println!("{}", k.key);
                eprintln!(
                    "created key {} for tenant {} (shown once: store it now)",
                    k.prefix, k.tenant
                );
            }
        }
        KeyCommand::Revoke { key } => match crate::http::api::keys::revoke(&db, &key)
            .await
            .map_err(|e| CliError::Runtime(e.into()))?
        {
            Some(t) => println!(
                "revoked key {} of tenant {t}",
                crate::http::api::keys::parse(&key).map_or(key.as_str(), |k| k.prefix)
            ),
            None => {
                return Err(CliError::Usage(format!(
                    "no active key {key:?}: give the prefix printed at creation"
                )));
            }
        },
    }
    Ok(())
}
