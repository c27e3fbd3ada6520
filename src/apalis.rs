//! The apalis 1.0 adapter (cargo feature `apalis`): an apalis [`Backend`]
//! over agentq's claim and completion scripts, so an apalis worker with its
//! tower layers runs handlers on an agentq queue with fairness, caps,
//! leases, fencing and the ledger unchanged.
//!
//! The core loop of `agentq worker` does not use this: apalis pulls one task
//! at a time and acknowledges later, while agentq claims in fair batches and
//! acks synchronously. The adapter bridges the two: [`AgentqBackend`] claims
//! small batches and hands tasks out one by one; [`AckLayer`] (installed by
//! the backend as its middleware) keeps each task's lease alive while the
//! handler runs and completes it, fenced by its attempt number, when the
//! handler returns: `Ok` is succeeded, `Err` is failed (retried with backoff
//! while attempts remain).
//!
//! In outline (the whole program, which `cargo test --all-features` builds,
//! is `examples/apalis_worker.rs`):
//!
//! ```text
//! let backend = AgentqBackend::<serde_json::Value>::new(queue, vec!["default".into()], "apalis-1");
//! WorkerBuilder::new("apalis-1").backend(backend).build(handle).run().await?;
//! ```

use std::collections::VecDeque;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use apalis_core::backend::{Backend, BackendConfig, finalize::Ephemeral};
use apalis_core::task::Task;
use apalis_core::task::builder::TaskBuilder;
use apalis_core::task::task_id::{RandomId, TaskId};
use apalis_core::worker::context::WorkerContext;
use serde::de::DeserializeOwned;

use crate::executor::{Outcome, TaskUsage};
use crate::queue::{AttemptKey, Call, Claimed, ClaimedJob, Completion, Queue, QueueError};

type ClaimFuture = Pin<Box<dyn Future<Output = Result<Claimed, QueueError>> + Send>>;

/// The lease of a task handed to apalis, stored in the task's data.
#[derive(Clone, Debug)]
pub struct Lease {
    /// Job id.
    pub id: String,
    /// Attempt number (fencing token).
    pub attempt: u32,
    /// Partition.
    pub partition: u32,
    /// Tenant.
    pub tenant: String,
}

/// An apalis backend reading jobs of `queues` whose payload decodes as `T`.
pub struct AgentqBackend<T> {
    queue: Queue,
    queues: Vec<String>,
    worker: String,
    lease: Duration,
    batch: usize,
    next_partition: u32,
    /// The call in flight, or to repeat after an error (same partition and
    /// id, so a claim whose reply was lost hands out its jobs again).
    call: Option<(u32, Call)>,
    buffer: VecDeque<Task<T>>,
    claim: Option<ClaimFuture>,
    idle: Option<Pin<Box<tokio::time::Sleep>>>,
    _args: PhantomData<fn() -> T>,
}

impl<T> AgentqBackend<T> {
    /// A backend claiming from `queues` as worker `worker` (recorded on jobs
    /// and ledger rows), with 30 s leases and batches of 4.
    pub fn new(queue: Queue, queues: Vec<String>, worker: impl Into<String>) -> Self {
        AgentqBackend {
            queue,
            queues,
            worker: worker.into(),
            lease: Duration::from_secs(30),
            batch: 4,
            next_partition: 0,
            call: None,
            buffer: VecDeque::new(),
            claim: None,
            idle: None,
            _args: PhantomData,
        }
    }

    /// Lease duration (extended every third of it while a handler runs).
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }
}

impl<T: DeserializeOwned + Send + 'static> AgentqBackend<T> {
    /// Turn a claimed job into an apalis task; a payload that does not decode
    /// as `T` is completed at once as a permanent failure.
    fn accept(&mut self, job: ClaimedJob) {
        match serde_json::from_str::<T>(&job.payload) {
            Ok(args) => {
                let lease = Lease {
                    id: job.id.clone(),
                    attempt: job.attempt,
                    partition: job.partition,
                    tenant: job.tenant.clone(),
                };
                let task = TaskBuilder::new(args)
                    .task_id(TaskId::from_string(job.id.clone()))
                    .attempt(job.attempt as usize)
                    .data(lease)
                    .build();
                self.buffer.push_back(task);
            }
            Err(e) => {
                let queue = self.queue.clone();
                let call = Call::new(self.worker.clone());
                let c = completion(
                    &job.id,
                    job.attempt,
                    Err(format!("payload does not decode for this handler: {e}")),
                    0,
                    true,
                );
                tokio::spawn(async move {
                    if let Err(e) = queue.complete(job.partition, &call, &[c]).await {
                        tracing::warn!(error = %e, "could not fail an undecodable job; its lease will expire");
                    }
                });
            }
        }
    }
}

impl<T: DeserializeOwned + Send + 'static> Backend for AgentqBackend<T> {
    type Task = Task<T>;
    type Error = QueueError;

    fn poll_ready(
        &mut self,
        cx: &mut Context<'_>,
        _worker: &WorkerContext,
    ) -> Poll<Result<(), QueueError>> {
        loop {
            if !self.buffer.is_empty() {
                return Poll::Ready(Ok(()));
            }
            if let Some(idle) = self.idle.as_mut() {
                ready!(idle.as_mut().poll(cx));
                self.idle = None;
            }
            if self.claim.is_none() {
                let (queue, queues) = (self.queue.clone(), self.queues.clone());
                let (batch, lease) = (self.batch, self.lease);
                let (p, call) = match self.call.take() {
                    Some(again) => again,
                    None => {
                        let p = self.next_partition;
                        self.next_partition = (p + 1) % queue.partitions();
                        (p, Call::new(self.worker.clone()))
                    }
                };
                self.call = Some((p, call.clone()));
                self.claim = Some(Box::pin(async move {
                    queue.claim(p, &call, batch, lease, &queues).await
                }));
            }
            let Some(claim) = self.claim.as_mut() else {
                continue;
            };
            let result = ready!(claim.as_mut().poll(cx));
            self.claim = None;
            if result.is_ok() {
                self.call = None;
            }
            match result {
                Ok(c) if c.jobs.is_empty() => {
                    self.idle = Some(Box::pin(tokio::time::sleep(Duration::from_millis(200))));
                }
                Ok(c) => c.jobs.into_iter().for_each(|j| self.accept(j)),
                Err(e) => {
                    tracing::warn!(error = %e, "agentq claim failed; retrying");
                    self.idle = Some(Box::pin(tokio::time::sleep(Duration::from_secs(1))));
                }
            }
        }
    }

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        worker: &WorkerContext,
    ) -> Poll<Option<Result<Task<T>, QueueError>>> {
        if let Some(task) = self.buffer.pop_front() {
            return Poll::Ready(Some(Ok(task)));
        }
        match ready!(self.poll_ready(cx, worker)) {
            Ok(()) => Poll::Ready(self.buffer.pop_front().map(Ok)),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn poll_close(
        &mut self,
        _cx: &mut Context<'_>,
        _worker: &WorkerContext,
    ) -> Poll<Result<(), QueueError>> {
        Poll::Ready(Ok(()))
    }
}

impl<T> BackendConfig for AgentqBackend<T> {
    type Args = T;
    type Id = RandomId;
    type Kind = Ephemeral;
    type Config = ();
    type Layer = AckLayer;

    fn config(&self) -> &() {
        &()
    }

    fn middleware(&mut self, _worker: &mut WorkerContext) -> AckLayer {
        AckLayer {
            queue: self.queue.clone(),
            worker: self.worker.clone(),
            lease: self.lease,
        }
    }
}

fn completion(
    id: &str,
    attempt: u32,
    result: Result<(), String>,
    run_ms: u64,
    permanent: bool,
) -> Completion {
    let failed = result.is_err();
    Completion {
        id: id.to_string(),
        attempt,
        outcome: if failed {
            Outcome::Failed
        } else {
            Outcome::Succeeded
        },
        permanent,
        error: result.err().unwrap_or_default(),
        result: None,
        exit_code: None,
        signal: None,
        run_ms,
        cpu_ms: 0,
        peak_rss: 0,
        usage: TaskUsage::default(),
        // As the native worker's defaults: from 1 s, doubling, at most 5 min.
        backoff_ms: if failed {
            crate::model::backoff::retry_delay(
                Duration::from_secs(1),
                Duration::from_secs(300),
                attempt,
            )
            .as_millis() as u64
        } else {
            0
        },
    }
}

/// Middleware installed by [`AgentqBackend`]: lease heartbeat while the
/// handler runs, fenced completion when it returns.
#[derive(Clone)]
pub struct AckLayer {
    queue: Queue,
    worker: String,
    lease: Duration,
}

impl<S> tower_layer::Layer<S> for AckLayer {
    type Service = AckService<S>;
    fn layer(&self, inner: S) -> AckService<S> {
        AckService {
            inner,
            queue: self.queue.clone(),
            worker: self.worker.clone(),
            lease: self.lease,
        }
    }
}

/// See [`AckLayer`].
#[derive(Clone)]
pub struct AckService<S> {
    inner: S,
    queue: Queue,
    worker: String,
    lease: Duration,
}

impl<S, T> tower_service::Service<Task<T>> for AckService<S>
where
    S: tower_service::Service<Task<T>>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: std::fmt::Display + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, task: Task<T>) -> Self::Future {
        let lease = task.data().get::<Lease>().cloned();
        let fut = self.inner.call(task);
        let (queue, every) = (self.queue.clone(), self.lease);
        let call = Call::new(self.worker.clone());
        Box::pin(async move {
            let Some(l) = lease else { return fut.await };
            let started = Instant::now();
            let mut fut = std::pin::pin!(fut);
            let result = loop {
                tokio::select! {
                    r = &mut fut => break r,
                    _ = tokio::time::sleep(every / 3) => {
                        if let Err(e) = queue.extend(l.partition, every, &[AttemptKey::new(l.id.clone(), l.attempt)]).await {
                            tracing::warn!(error = %e, job = %l.id, "lease extension failed");
                        }
                    }
                }
            };
            let outcome = result.as_ref().map(|_| ()).map_err(|e| e.to_string());
            let c = completion(
                &l.id,
                l.attempt,
                outcome,
                started.elapsed().as_millis() as u64,
                false,
            );
            // Bounded (the handler's caller waits on this future): after
            // the shared pacing's first attempts the lease lapses and the
            // reaper closes the attempt as lost.
            use backon::Retryable;
            let done = (|| queue.complete(l.partition, &call, std::slice::from_ref(&c)))
                .retry(crate::model::backoff::policy().with_max_times(8))
                .sleep(tokio::time::sleep)
                .notify(|e: &QueueError, _| {
                    tracing::warn!(error = %e, job = %l.id, "completion failed; retrying")
                })
                .await;
            match done {
                Ok(d) => {
                    crate::metrics::record_events(&d.events);
                    if d.statuses.first() == Some(&crate::queue::CompleteStatus::Refused) {
                        tracing::warn!(job = %l.id, "completion refused: the lease was lost");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, job = %l.id, "completion failed; its lease will lapse")
                }
            }
            result
        })
    }
}
