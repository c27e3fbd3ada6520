//! The typed Rust client: enqueue (one or a batch), status and cancel,
//! straight to Redis through the same scripts the workers use.
//!
//! ```no_run
//! # async fn demo() -> Result<(), agentq::queue::QueueError> {
//! use agentq::{Client, queue::JobSpec};
//! let client = Client::connect("redis://127.0.0.1:6379").await?;
//! let id = client.enqueue(&JobSpec::new("acme", "default", "echo")).await?.id;
//! println!("{}", client.status(&id).await?.state);
//! # Ok(()) }
//! ```

use crate::queue::inspect::{self, JobInfo};
use crate::queue::{Enqueued, JobSpec, Queue, QueueConfig, QueueError};

/// A handle for services that enqueue and follow jobs. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    queue: Queue,
}

impl Client {
    /// Connect with the default namespace and one partition.
    pub async fn connect(redis_url: &str) -> Result<Client, QueueError> {
        Self::with_config(QueueConfig::new(redis_url)).await
    }

    /// Connect with an explicit layout (namespace, partitions).
    pub async fn with_config(cfg: QueueConfig) -> Result<Client, QueueError> {
        Ok(Client {
            queue: Queue::connect(cfg).await?,
        })
    }

    /// Enqueue one job.
    pub async fn enqueue(&self, job: &JobSpec) -> Result<Enqueued, QueueError> {
        self.queue.enqueue(job).await
    }

    /// Enqueue many jobs in one round trip per partition (all or nothing per partition).
    pub async fn enqueue_batch(&self, jobs: &[JobSpec]) -> Result<Vec<Enqueued>, QueueError> {
        self.queue.enqueue_batch(jobs).await
    }

    /// Every field of a job.
    pub async fn status(&self, id: &str) -> Result<JobInfo, QueueError> {
        inspect::job_info(&self.queue, id).await
    }

    /// Cancel a job that has not finished (queued or running); true if it
    /// was cancelled, false if it had already finished.
    pub async fn cancel(&self, id: &str) -> Result<bool, QueueError> {
        Ok(matches!(
            self.queue.cancel(id).await?.as_str(),
            "ready" | "delayed" | "running"
        ))
    }

    /// The underlying queue handle.
    pub fn queue(&self) -> &Queue {
        &self.queue
    }
}
