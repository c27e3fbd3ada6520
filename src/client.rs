//! The typed Rust client: enqueue (one or a batch), status and cancel,
//! straight to Redis through the same scripts the workers use; and
//! following jobs through their events ([`Client::wait_until_finished`],
//! [`Client::events`], [`Client::tenant_events`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), agentq::queue::QueueError> {
//! use std::time::Duration;
//! use futures::StreamExt;
//! use agentq::{Client, queue::JobSpec};
//! let client = Client::connect("redis://127.0.0.1:6379").await?;
//! let id = client.enqueue(&JobSpec::new("acme", "default", "echo")).await?.id;
//! let mut events = client.events(&id);
//! while let Some(e) = events.next().await {
//!     println!("{:?}", e?.kind); // enqueued, started, ..., succeeded
//! }
//! let job = client.wait_until_finished(&id, Duration::from_secs(60)).await?;
//! println!("{}", job.state);
//! # Ok(()) }
//! ```
//!
//! Following shares one blocking reader per partition per [`Client`] (and
//! its clones): the same event hub `agentq serve` uses, so a service
//! waiting on a thousand jobs costs Redis one `XREAD` per partition. The
//! CLI's `agentq watch` and `agentq jobs --follow` are built on
//! [`JobFollow`] and [`Client::all_events`] here.
//!
//! Errors while following: an `Err` item is one failed read (Redis down, a
//! dropped connection). The stream goes on from where it stood after a
//! short pause (the connection reconnects by itself), so a caller that keeps
//! polling misses no event Redis still retains; drop the stream to stop.
//! Errors about the input (no such job, an invalid tenant name) end it.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use fred::interfaces::SetsInterface;
use futures::{Stream, StreamExt};
use tokio::time::Instant;

use crate::model::job_event::{EventId, JobEvent};
use crate::queue::hub::{EventHub, Follower};
use crate::queue::inspect::{self, JobInfo};
use crate::queue::{Enqueued, JobSpec, Queue, QueueConfig, QueueError};

/// How often a follower of one job re-reads the job record, so it ends even
/// when the job's queue publishes no events (`agentq job-events Q off`) or
/// its events were trimmed.
const RECHECK: Duration = Duration::from_secs(2);
/// Pause after a failed read before the next one, so a follower does not
/// spin while Redis is away.
const RETRY_PAUSE: Duration = Duration::from_secs(1);
/// How often [`Client::all_events`] looks for tenants it does not follow yet.
const RELIST: Duration = Duration::from_secs(3);
/// Entries per page when reading what a stream retains.
const PAGE: usize = 500;

/// A handle for services that enqueue and follow jobs. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    queue: Queue,
    hub: Arc<EventHub>,
}

impl Client {
    /// Connect with the default namespace and one partition.
    pub async fn connect(redis_url: &str) -> Result<Client, QueueError> {
        Self::with_config(QueueConfig::new(redis_url)).await
    }

    /// Connect with an explicit layout (namespace, partitions).
    pub async fn with_config(cfg: QueueConfig) -> Result<Client, QueueError> {
        Ok(Self::from_queue(Queue::connect(cfg).await?))
    }

    /// A client over an existing queue handle (shares its connection).
    pub fn from_queue(queue: Queue) -> Client {
        let hub = Arc::new(EventHub::new(queue.clone()));
        Client { queue, hub }
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

    /// Cancel a job that has not finished (queued, or running: its worker
    /// kills it and the attempt closes as `cancelled`); true if it is
    /// cancelled or being cancelled (also when it already was: a repeat is
    /// harmless), false if it had succeeded or died first.
    pub async fn cancel(&self, id: &str) -> Result<bool, QueueError> {
        Ok(matches!(
            self.queue.cancel(id).await?.as_str(),
            "ready" | "delayed" | "running" | "cancelled"
        ))
    }

    /// The underlying queue handle.
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// Wait until job `id` has ended (succeeded, dead or cancelled) and
    /// return its record; at most `timeout`.
    ///
    /// When the wait runs out the job is returned as it stands then, not
    /// final: check [`JobInfo::is_final`] (as `GET /v1/jobs/{id}?wait=`
    /// does). A dead or cancelled job is `Ok` too: check `state`. Redis
    /// errors while waiting are retried until the timeout; if Redis is
    /// still unreachable then, the error is returned. `Err(NotFound)` for
    /// an unknown id, and for a job that succeeded on a queue that keeps no
    /// succeeded jobs (`agentq keep-completed Q 0`). Follows the job's
    /// events, and re-reads the record every 2 s so it also ends when the
    /// queue publishes no events.
    pub async fn wait_until_finished(
        &self,
        id: &str,
        timeout: Duration,
    ) -> Result<JobInfo, QueueError> {
        let deadline = Instant::now() + timeout;
        let mut follow = JobFollow::new(self.clone(), id);
        let mut failure = None;
        // Runs until the job's final event, an input error, or the deadline.
        while let Ok(Some(item)) = tokio::time::timeout_at(deadline, follow.next()).await {
            match item {
                Ok(_) => failure = None,
                Err(e) if e.is_input() => return Err(e),
                Err(e) => failure = Some(e),
            }
        }
        match self.status(id).await {
            Ok(info) => Ok(info),
            Err(e) => Err(failure.unwrap_or(e)),
        }
    }

    /// Job `id`'s events from its enqueue, as they happen, ending after the
    /// final one (succeeded, dead or cancelled). If the job ends without a
    /// final event reaching the stream (its queue's events are off, or were
    /// trimmed), the last item is a final event made from the job record.
    /// See the module docs for `Err` items.
    pub fn events(
        &self,
        id: &str,
    ) -> impl Stream<Item = Result<JobEvent, QueueError>> + Send + Unpin + 'static {
        futures::stream::unfold(JobFollow::new(self.clone(), id), |mut f| async move {
            let item = f.next().await?;
            Some((item.map(|x| x.event), f))
        })
        .boxed()
    }

    /// Every event of `tenant`, after `after` (None: from now on). Never
    /// ends; see the module docs for `Err` items.
    pub fn tenant_events(
        &self,
        tenant: &str,
        after: Option<EventId>,
    ) -> impl Stream<Item = Result<JobEvent, QueueError>> + Send + Unpin + 'static {
        let follow = TenantFollow {
            client: self.clone(),
            tenant: tenant.to_string(),
            after,
            follower: None,
            pause: false,
            ended: false,
        };
        futures::stream::unfold(follow, |mut f| async move {
            let item = f.next().await?;
            Some((item, f))
        })
        .boxed()
    }

    /// Every event of every tenant in the namespace, as (tenant, event),
    /// after `after` (None: from now, by Redis's clock). Tenants are
    /// listed per partition at the start and every 3 s; one that appears
    /// later is followed from `after` too, so its first events are not
    /// missed. Never ends; see the module docs for `Err` items.
    pub fn all_events(
        &self,
        after: Option<EventId>,
    ) -> impl Stream<Item = Result<(String, JobEvent), QueueError>> + Send + Unpin + 'static {
        let follow = AllFollow {
            client: self.clone(),
            after,
            followers: Vec::new(),
            known: HashSet::new(),
            next_relist: Instant::now(),
            pause: false,
        };
        futures::stream::unfold(follow, |mut f| async move {
            let item = f.next().await;
            Some((item, f))
        })
        .boxed()
    }
}

/// Where a job's events begin in its tenant's stream: just before its
/// enqueue time.
pub fn job_start(info: &JobInfo) -> EventId {
    EventId {
        ms: info.enqueued_ms.unwrap_or(0).saturating_sub(1),
        seq: 0,
    }
}

/// One event of a followed job.
#[derive(Clone, Debug, PartialEq)]
pub struct Followed {
    /// The event.
    pub event: JobEvent,
    /// True for a final event made from the job record: the job ended
    /// without its final event reaching the follower (its queue's events
    /// are off, or were trimmed).
    pub from_record: bool,
}

/// Follows one job's events from its enqueue until it ends: the
/// implementation behind [`Client::events`], [`Client::wait_until_finished`]
/// and `agentq watch`.
pub struct JobFollow {
    client: Client,
    id: String,
    tenant: String,
    follower: Option<Follower>,
    backlog: VecDeque<Followed>,
    next_check: Instant,
    pause: bool,
    ended: bool,
}

impl JobFollow {
    /// A follower of job `id`; nothing is read until [`JobFollow::next`].
    pub fn new(client: Client, id: &str) -> JobFollow {
        JobFollow {
            client,
            id: id.to_string(),
            tenant: String::new(),
            follower: None,
            backlog: VecDeque::new(),
            // At once: a job that has already ended with its events off
            // ends the stream without a wait.
            next_check: Instant::now(),
            pause: false,
            ended: false,
        }
    }

    /// The job's next event; None once the final one was handed out (or
    /// after an input error). An `Err` from Redis leaves the position
    /// where it was: call again to go on.
    pub async fn next(&mut self) -> Option<Result<Followed, QueueError>> {
        if self.ended {
            return None;
        }
        if std::mem::take(&mut self.pause) {
            tokio::time::sleep(RETRY_PAUSE).await;
        }
        match self.step().await {
            Ok(f) => {
                self.ended = f.event.kind.is_final();
                Some(Ok(f))
            }
            Err(e) => {
                self.ended = e.is_input();
                self.pause = !self.ended;
                Some(Err(e))
            }
        }
    }

    async fn step(&mut self) -> Result<Followed, QueueError> {
        loop {
            if let Some(f) = self.backlog.pop_front() {
                return Ok(f);
            }
            let check_at = self.next_check;
            let id = self.id.clone();
            let follower = self.follower().await?;
            match tokio::time::timeout_at(check_at, follower.next()).await {
                Ok(e) => {
                    let e = e?;
                    if e.job == id {
                        return Ok(Followed {
                            event: e,
                            from_record: false,
                        });
                    }
                }
                Err(_) => {
                    self.next_check = Instant::now() + RECHECK;
                    self.check_record().await?;
                }
            }
        }
    }

    /// The hub follower, joined on first use from the job's start.
    async fn follower(&mut self) -> Result<&mut Follower, QueueError> {
        let f = match self.follower.take() {
            Some(f) => f,
            None => {
                let info = self.client.status(&self.id).await?;
                let f = self
                    .client
                    .hub
                    .follow(&info.tenant, Some(job_start(&info)))
                    .await?;
                self.tenant = info.tenant;
                f
            }
        };
        Ok(self.follower.insert(f))
    }

    /// If the record says the job has ended, queue what is left of it in
    /// the stream, ending with its final event (from the record when the
    /// stream has none).
    async fn check_record(&mut self) -> Result<(), QueueError> {
        let info = match self.client.status(&self.id).await {
            Ok(info) if !info.is_final() => return Ok(()),
            Ok(info) => Some(info),
            // Removed as it succeeded (keep-completed 0), or purged: only
            // the stream can say how it ended.
            Err(QueueError::NotFound(_)) => None,
            Err(e) => return Err(e),
        };
        // State and event are written in one script: read after the record
        // said "ended", the stream has the final event if it was published.
        let (tail, at) = self.rest_of_job().await?;
        let final_at = tail.iter().position(|e| e.kind.is_final());
        let cut = final_at.map_or(tail.len(), |i| i + 1);
        self.backlog
            .extend(tail.into_iter().take(cut).map(|event| Followed {
                event,
                from_record: false,
            }));
        if final_at.is_some() {
            return Ok(());
        }
        match info {
            Some(info) => {
                self.backlog.push_back(Followed {
                    event: info.final_event(at),
                    from_record: true,
                });
                Ok(())
            }
            None => Err(QueueError::NotFound(self.id.clone())),
        }
    }

    /// This job's events retained after the follower's position, and the
    /// position of the last entry read.
    async fn rest_of_job(&mut self) -> Result<(Vec<JobEvent>, EventId), QueueError> {
        let mut at = self.follower().await?.position();
        let mut events = Vec::new();
        loop {
            let batch = self
                .client
                .queue
                .job_events_after(&self.tenant, at, PAGE)
                .await?;
            let Some(last) = batch.last else { break };
            at = last;
            events.extend(batch.events.into_iter().filter(|e| e.job == self.id));
        }
        Ok((events, at))
    }
}

/// Follows one tenant's stream ([`Client::tenant_events`]).
struct TenantFollow {
    client: Client,
    tenant: String,
    after: Option<EventId>,
    follower: Option<Follower>,
    pause: bool,
    ended: bool,
}

impl TenantFollow {
    async fn next(&mut self) -> Option<Result<JobEvent, QueueError>> {
        if self.ended {
            return None;
        }
        if std::mem::take(&mut self.pause) {
            tokio::time::sleep(RETRY_PAUSE).await;
        }
        let item = self.step().await;
        if let Err(e) = &item {
            self.ended = e.is_input();
            self.pause = !self.ended;
        }
        Some(item)
    }

    async fn step(&mut self) -> Result<JobEvent, QueueError> {
        let f = match self.follower.take() {
            Some(f) => f,
            None => self.client.hub.follow(&self.tenant, self.after).await?,
        };
        self.follower.insert(f).next().await
    }
}

/// Follows every tenant of the namespace ([`Client::all_events`]).
struct AllFollow {
    client: Client,
    after: Option<EventId>,
    followers: Vec<(String, Follower)>,
    known: HashSet<String>,
    next_relist: Instant,
    pause: bool,
}

impl AllFollow {
    async fn next(&mut self) -> Result<(String, JobEvent), QueueError> {
        if std::mem::take(&mut self.pause) {
            tokio::time::sleep(RETRY_PAUSE).await;
        }
        let item = self.step().await;
        self.pause = item.is_err();
        item
    }

    async fn step(&mut self) -> Result<(String, JobEvent), QueueError> {
        loop {
            if Instant::now() >= self.next_relist {
                self.relist().await?;
                self.next_relist = Instant::now() + RELIST;
            }
            if self.followers.is_empty() {
                tokio::time::sleep_until(self.next_relist).await;
                continue;
            }
            // The first follower with an event wins; the others' reads are
            // dropped unfinished, which loses nothing (a follower moves on
            // only when it hands an event out).
            let reads = self
                .followers
                .iter_mut()
                .map(|(t, f)| Box::pin(async move { (t.clone(), f.next().await) }));
            let relist =
                tokio::time::timeout_at(self.next_relist, futures::future::select_all(reads));
            if let Ok(((tenant, read), _, _)) = relist.await {
                return Ok((tenant, read?));
            }
        }
    }

    /// Follow the tenants that appeared since the last listing.
    async fn relist(&mut self) -> Result<(), QueueError> {
        let q = &self.client.queue;
        let after = match self.after {
            Some(a) => a,
            None => {
                let now = q.server_time().await?.timestamp_millis().max(0) as u64;
                *self.after.insert(EventId { ms: now, seq: 0 })
            }
        };
        for p in 0..q.partitions() {
            let tenants: Vec<String> = q.client().smembers(q.keys(p).key(&["tenants"])).await?;
            for t in tenants {
                if self.known.contains(&t) {
                    continue;
                }
                match self.client.hub.follow(&t, Some(after)).await {
                    Ok(f) => self.followers.push((t.clone(), f)),
                    // A name the scripts would never write: nothing to follow.
                    Err(e) if e.is_input() => {}
                    Err(e) => return Err(e),
                }
                self.known.insert(t);
            }
        }
        Ok(())
    }
}
