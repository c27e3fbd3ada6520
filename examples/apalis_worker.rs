//! An apalis 1.0 worker running a handler on an agentq queue:
//!
//!     cargo run --example apalis_worker --features apalis
//!     agentq enqueue --queue emails --tenant acme --kind email --payload '{"to":"a@example.com"}'
//!
//! Fairness, tenant caps, leases, fencing and the usage ledger work exactly
//! as for `agentq worker`: the handler runs inside agentq's lease and its
//! result is acknowledged through the same completion script.

use agentq::apalis::AgentqBackend;
use agentq::queue::{Queue, QueueConfig};
use apalis_core::error::BoxDynError;
use apalis_core::worker::builder::WorkerBuilder;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct Email {
    to: String,
}

async fn send_email(email: Email) -> Result<(), BoxDynError> {
    println!("sending an email to {}", email.to);
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("AGENTQ_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let queue = Queue::connect(QueueConfig::new(url)).await?;
    let backend = AgentqBackend::<Email>::new(queue, vec!["emails".into()], "apalis-example");
    WorkerBuilder::new("apalis-example")
        .backend(backend)
        .build(send_email)
        .run()
        .await?;
    Ok(())
}
