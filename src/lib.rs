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
pub mod queue;
pub mod usage;
pub mod worker;

pub use client::Client;
// Older paths, kept while callers move to the layered ones.
#[doc(hidden)]
pub use agentq_servers as servers;
pub use http::api;
pub use model::{text, units};
#[doc(hidden)]
pub mod admission {
    //! Moved: values in [`crate::model::limits`], Redis in [`crate::queue::limits`].
    pub use crate::model::limits::*;
    pub use crate::queue::limits::*;
    /// Moved: [`crate::model::limits::TenantLimits`].
    pub type Limits = crate::model::limits::TenantLimits;
}
