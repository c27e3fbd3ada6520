//! `agentq webhook set|show|rm|test|dead`: tenants' alert webhooks, and the
//! worker's webhook delivery flags (README, "Tenant alerts").

use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::json;

use super::output;
use super::{CliError, CliResult, Global, duration_arg};
use crate::duties::webhooks::{Outcome, WebhooksConfig, send_test};
use crate::queue::alerts;

/// `agentq webhook ...`.
#[derive(Debug, Subcommand)]
pub enum WebhookCommand {
    /// Set (or replace) a tenant's webhook; prints a generated secret once.
    Set(SetArgs),
    /// Show a tenant's webhook (the secret is never shown) and its dead-lettered alerts.
    Show(ShowArgs),
    /// Remove a tenant's webhook (alerts not yet delivered are dropped).
    Rm(TenantArg),
    /// Send a test alert now and print the receiver's answer.
    Test(TestArgs),
    /// List alerts given up on (all tenants, or one).
    Dead(DeadArgs),
}

/// `agentq webhook set`.
#[derive(Debug, Args)]
pub struct SetArgs {
    /// The tenant.
    tenant: String,
    /// Where alerts are POSTed: http:// or https://.
    #[arg(long)]
    url: String,
    /// Signing secret, 16 to 256 bytes [default: generated, printed once].
    #[arg(long, env = "AGENTQ_WEBHOOK_SECRET")]
    secret: Option<String>,
    /// Alert kinds sent: some of quota,spend,rate,dead, or all.
    #[arg(long, default_value = "all")]
    events: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `agentq webhook show`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The tenant.
    tenant: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// A tenant argument.
#[derive(Debug, Args)]
pub struct TenantArg {
    /// The tenant.
    tenant: String,
}

/// `agentq webhook test`.
#[derive(Debug, Args)]
pub struct TestArgs {
    /// The tenant.
    tenant: String,
    /// Refuse a receiver at a non-public address.
    #[arg(long)]
    public_only: bool,
}

/// `agentq webhook dead`.
#[derive(Debug, Args)]
pub struct DeadArgs {
    /// Only this tenant's.
    #[arg(long)]
    tenant: Option<String>,
    /// The newest N.
    #[arg(long, default_value_t = 50)]
    limit: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `agentq worker`'s webhook delivery flags.
#[derive(Debug, Args)]
pub struct WebhookWorkerArgs {
    /// Refuse webhook receivers at loopback, private, link-local and other
    /// non-public addresses (checked on the address connected to).
    #[arg(long, env = "AGENTQ_WEBHOOK_PUBLIC_ONLY")]
    webhook_public_only: bool,
    /// Time for one webhook delivery.
    #[arg(long, value_parser = duration_arg, default_value = "5s")]
    webhook_timeout: Duration,
    /// First webhook retry delay (doubles per failed attempt, jittered, at most 10m).
    #[arg(long, value_parser = duration_arg, default_value = "5s")]
    webhook_retry_base: Duration,
    /// Failed attempts after which an alert is dead-lettered.
    #[arg(long, default_value_t = 15)]
    webhook_max_attempts: u64,
    /// Age after which a failing alert is dead-lettered.
    #[arg(long, value_parser = duration_arg, default_value = "24h")]
    webhook_max_age: Duration,
    /// Alerts held this long by a worker that stopped renewing them are taken over.
    #[arg(long, value_parser = duration_arg, default_value = "60s")]
    webhook_claim_idle: Duration,
    /// Webhook deliveries in flight at once (all tenants / per tenant).
    #[arg(long, default_value_t = 32)]
    webhook_concurrency: usize,
    /// Webhook deliveries in flight at once per tenant.
    #[arg(long, default_value_t = 2)]
    webhook_per_tenant: usize,
}

impl WebhookWorkerArgs {
    /// The duty's configuration these flags describe.
    pub fn config(&self) -> Result<WebhooksConfig, CliError> {
        let c = WebhooksConfig {
            public_only: self.webhook_public_only,
            timeout: self.webhook_timeout,
            retry_base: self.webhook_retry_base,
            retry_max: WebhooksConfig::default()
                .retry_max
                .max(self.webhook_retry_base),
            max_attempts: self.webhook_max_attempts,
            max_age: self.webhook_max_age,
            claim_idle: self.webhook_claim_idle,
            concurrency: self.webhook_concurrency,
            per_tenant: self.webhook_per_tenant,
            ..WebhooksConfig::default()
        };
        c.validate().map_err(|e| CliError::Usage(e.to_string()))?;
        Ok(c)
    }
}

pub(super) async fn webhook(g: &Global, c: WebhookCommand) -> CliResult {
    match c {
        WebhookCommand::Set(a) => set(g, a).await,
        WebhookCommand::Show(a) => show(g, a).await,
        WebhookCommand::Rm(a) => rm(g, a).await,
        WebhookCommand::Test(a) => test(g, a).await,
        WebhookCommand::Dead(a) => dead(g, a).await,
    }
}

async fn set(g: &Global, a: SetArgs) -> CliResult {
    let generated = a.secret.is_none();
    let secret = a.secret.unwrap_or_else(alerts::generate_secret);
    // Checked before touching the network: bad input is exit 2.
    let hook = alerts::check_webhook(&a.tenant, &a.url, &secret, &a.events)?;
    let q = g.queue().await?;
    alerts::set_webhook(&q, &hook).await?;
    if a.json {
        let mut v = json!({ "tenant": hook.tenant, "url": hook.url, "events": hook.events });
        if generated {
            v["secret"] = json!(secret);
        }
        output::json(&v);
    } else {
        println!(
            "webhook of tenant {}: {} ({})",
            hook.tenant,
            hook.url,
            hook.events.join(",")
        );
        if generated {
            println!("secret: {secret}");
            println!("(shown once: give it to the tenant to verify Agentq-Signature)");
        }
    }
    Ok(())
}

async fn show(g: &Global, a: ShowArgs) -> CliResult {
    crate::queue::job::validate_name("tenant", &a.tenant)?;
    let q = g.queue().await?;
    let Some(hook) = alerts::webhook(&q, &a.tenant).await? else {
        return Err(CliError::Usage(format!(
            "tenant {} has no webhook: agentq webhook set {} --url URL",
            a.tenant, a.tenant
        )));
    };
    let dead = alerts::dead_alerts(&q, Some(&a.tenant), 20).await?;
    if a.json {
        output::json(&json!({
            "tenant": hook.tenant, "url": hook.url, "events": hook.events, "dead": dead,
        }));
        return Ok(());
    }
    println!("tenant:  {}", hook.tenant);
    println!("url:     {}", hook.url);
    println!("events:  {}", hook.events.join(","));
    println!("secret:  set (not shown)");
    println!("dead-lettered alerts: {}", dead.len());
    print_dead(&dead);
    Ok(())
}

async fn rm(g: &Global, a: TenantArg) -> CliResult {
    crate::queue::job::validate_name("tenant", &a.tenant)?;
    let q = g.queue().await?;
    if alerts::remove_webhook(&q, &a.tenant).await? {
        println!("removed the webhook of tenant {}", a.tenant);
        Ok(())
    } else {
        Err(CliError::Usage(format!(
            "tenant {} has no webhook",
            a.tenant
        )))
    }
}

async fn test(g: &Global, a: TestArgs) -> CliResult {
    crate::queue::job::validate_name("tenant", &a.tenant)?;
    let q = g.queue().await?;
    let cfg = WebhooksConfig {
        public_only: a.public_only,
        ..WebhooksConfig::default()
    };
    match send_test(&q, &a.tenant, &cfg).await? {
        Outcome::Delivered(status) => {
            println!("test alert delivered: HTTP {status}");
            Ok(())
        }
        Outcome::Failed(e) => Err(CliError::Runtime(anyhow::anyhow!(
            "test alert not delivered: {e}"
        ))),
    }
}

async fn dead(g: &Global, a: DeadArgs) -> CliResult {
    let q = g.queue().await?;
    let dead = alerts::dead_alerts(&q, a.tenant.as_deref(), a.limit).await?;
    if a.json {
        output::json(&dead);
    } else {
        print_dead(&dead);
    }
    Ok(())
}

fn print_dead(dead: &[alerts::DeadAlert]) {
    if dead.is_empty() {
        return;
    }
    let rows: Vec<Vec<String>> = dead
        .iter()
        .map(|d| {
            vec![
                d.dead_at.clone(),
                d.tenant.clone(),
                d.kind.clone(),
                d.id.clone(),
                d.attempts.to_string(),
                d.reason.clone(),
                output::first_line(&Some(d.last_error.clone()), 60),
            ]
        })
        .collect();
    output::table(
        &[
            "DEAD AT",
            "TENANT",
            "KIND",
            "ID",
            "ATTEMPTS",
            "REASON",
            "LAST ERROR",
        ],
        &rows,
    );
}
