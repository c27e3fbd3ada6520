//! agentq: a durable, multi-tenant job-queue worker runtime.
//!
//! Services enqueue tenant-tagged tasks into Redis; workers claim them fairly
//! across tenants inside each tenant's limits, hold them under leases, run
//! each attempt as its own process under hard caps, and write one usage row
//! per attempt to PostgreSQL. The README documents the contract (task
//! protocol, key layout, guarantees); `docs/architecture.md` draws the
//! layers and follows one job from enqueue to ledger row.
//!
//! The modules are layers; every import points down:
//!
//! | layer | modules |
//! |---|---|
//! | command line | [`cli`] (one file per command group, the demo included) |
//! | surfaces | [`worker`], [`http`], [`client`], [`apalis`] |
//! | reports | [`usage`] (usage and cost from the ledger, quota reconcile) |
//! | background duties | [`duties`] (heartbeat, reaper, ledger writer, sampler, tier publisher), [`lease`] (the attempts a worker holds) |
//! | stores and processes | [`queue`] (Redis and its scripts), [`ledger`] (PostgreSQL), [`executor`] (task processes), [`net`] (outbound HTTP: JWKS, webhooks) |
//! | observability sink | [`metrics`] |
//! | ground floor | [`model`] (plain types and pure functions) |
//!
//! ```no_run
//! # async fn demo() -> Result<(), agentq::queue::QueueError> {
//! use agentq::queue::{JobSpec, Queue, QueueConfig};
//! let queue = Queue::connect(QueueConfig::new("redis://127.0.0.1:6379")).await?;
//! let job = JobSpec::new("acme", "default", "echo").payload(&serde_json::json!({"hello": "world"}));
//! let enqueued = queue.enqueue(&job).await?;
//! println!("{}", enqueued.id);
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

#[cfg(feature = "apalis")]
pub mod apalis;
pub mod cli;
pub mod client;
pub mod duties;
pub mod executor;
pub mod http;
pub mod lease;
pub mod ledger;
pub mod metrics;
pub mod model;
pub mod net;
pub mod queue;
pub mod usage;
pub mod worker;

pub use client::Client;
