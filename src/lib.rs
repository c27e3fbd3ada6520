//! agentq: a durable, multi-tenant job-queue worker runtime.
//!
//! Services enqueue tenant-tagged tasks into Redis ([`queue`]); workers
//! ([`worker`]) claim them fairly across tenants inside each tenant's limits
//! ([`admission`]), hold them under leases ([`lease`]), and run each attempt
//! as its own process under hard caps ([`executor`]). The contract is
//! `DESIGN.md`; the README documents the key layout and the task protocol.
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

pub mod admission;
#[cfg(feature = "apalis")]
pub mod apalis;
pub mod api;
pub mod cli;
pub mod client;
pub mod config;
pub mod demo;
pub mod executor;
pub mod lease;
pub mod ledger;
pub mod metrics;
pub mod model;
pub mod queue;
pub mod servers;
pub mod usage;
pub mod worker;

pub use client::Client;
// Older paths of ground-floor modules.
pub use model::{text, units};
