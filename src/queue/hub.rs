//! The event hub: one blocking reader per partition fans every followed
//! tenant's job events out to all of a process's followers (`agentq
//! serve`'s SSE, WebSocket and long polls; the Rust client's streams), so a
//! thousand open streams cost Redis one `XREAD` per partition, not a
//! thousand. A reader stops, and closes its connection, once its hub is
//! dropped.
//!
//! A [`Follower`] never misses a retained event and never sees one twice:
//! it joins the tenant's broadcast first, then reads what is retained after
//! its position from Redis (catch-up), then takes broadcast events newer
//! than the last one it handed out. The reader's cursor for a newly
//! followed tenant starts at the stream's head when it joins, so together
//! the catch-up (up to a head read after joining) and the broadcast (after
//! the head read before joining) cover every event. A follower too slow for
//! the broadcast buffer (it lagged) goes back to catching up from Redis.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{Notify, broadcast};

use super::job_events::{Cursor, EventReader};
use super::{Queue, QueueError};
use crate::model::job_event::{EventId, JobEvent};

/// Events buffered per followed tenant for followers that fall behind.
const BROADCAST_BUFFER: usize = 1024;
/// Longest one blocking read waits: also how long a newly followed tenant
/// may wait for its first live event (its catch-up covers the gap).
const BLOCK: Duration = Duration::from_millis(500);
/// Entries read per tenant per read, and per catch-up page.
const PAGE: usize = 500;

/// Fans job events out to this process's followers.
pub struct EventHub {
    queue: Queue,
    parts: Vec<Arc<Part>>,
}

#[derive(Default)]
struct Part {
    feeds: Mutex<HashMap<String, Feed>>,
    /// Rung when the first tenant of an idle partition is followed.
    joined: Notify,
    running: std::sync::atomic::AtomicBool,
}

struct Feed {
    tx: broadcast::Sender<Arc<JobEvent>>,
    cursor: EventId,
}

impl EventHub {
    /// A hub over `queue`'s partitions; readers start on first use.
    pub fn new(queue: Queue) -> EventHub {
        let parts = (0..queue.partitions()).map(|_| Arc::default()).collect();
        EventHub { queue, parts }
    }

    /// Follow `tenant`'s events after `after` (None: from now on).
    pub async fn follow(
        &self,
        tenant: &str,
        after: Option<EventId>,
    ) -> Result<Follower, QueueError> {
        let head = self.queue.job_events_head(tenant).await?;
        let p = self.queue.partition_of(tenant);
        let part = &self.parts[p as usize];
        let rx = {
            let mut feeds = part.feeds.lock().unwrap_or_else(|e| e.into_inner());
            let feed = feeds.entry(tenant.to_string()).or_insert_with(|| Feed {
                tx: broadcast::channel(BROADCAST_BUFFER).0,
                cursor: head,
            });
            feed.tx.subscribe()
        };
        part.joined.notify_one();
        self.start_reader(p);
        Ok(Follower {
            queue: self.queue.clone(),
            tenant: tenant.to_string(),
            rx,
            last: after.unwrap_or(head),
            // Always: the reader may have broadcast events newer than
            // `head` before this follower subscribed.
            catching_up: true,
            backlog: VecDeque::new(),
        })
    }

    fn start_reader(&self, p: u32) {
        let part = &self.parts[p as usize];
        if part.running.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        let (queue, weak) = (self.queue.clone(), Arc::downgrade(part));
        tokio::spawn(async move {
            read_loop(queue, p, weak).await;
        });
    }
}

/// One partition's reader: runs while its hub lives, then closes its
/// connection.
async fn read_loop(queue: Queue, p: u32, part: Weak<Part>) {
    let mut reader: Option<EventReader> = None;
    read_while_followed(&queue, p, &part, &mut reader).await;
    if let Some(r) = reader {
        r.close().await;
    }
}

async fn read_while_followed(
    queue: &Queue,
    p: u32,
    part: &Weak<Part>,
    reader: &mut Option<EventReader>,
) {
    loop {
        let Some(cursors) = cursors(part) else {
            return;
        };
        if cursors.is_empty() {
            let Some(pt) = part.upgrade() else { return };
            let _ = tokio::time::timeout(Duration::from_secs(1), pt.joined.notified()).await;
            continue;
        }
        if reader.is_none() {
            match EventReader::connect(queue).await {
                Ok(r) => *reader = Some(r),
                Err(e) => {
                    tracing::warn!(error = %e, partition = p, "job event reader cannot connect; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
        }
        let Some(r) = reader.as_ref() else { continue };
        match r.read(p, &cursors, BLOCK, PAGE).await {
            Ok(read) => {
                let Some(pt) = part.upgrade() else { return };
                let mut feeds = pt.feeds.lock().unwrap_or_else(|e| e.into_inner());
                for t in read {
                    let Some(feed) = feeds.get_mut(&t.tenant) else {
                        continue;
                    };
                    for e in t.batch.events {
                        // no receiver left: dropped at the next cursors()
                        let _ = feed.tx.send(Arc::new(e));
                    }
                    if let Some(last) = t.batch.last {
                        feed.cursor = feed.cursor.max(last);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, partition = p, "reading job events failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// The cursors of the partition's followed tenants, dropping tenants
/// nobody follows any more; None when the hub is gone.
fn cursors(part: &Weak<Part>) -> Option<Vec<Cursor>> {
    let pt = part.upgrade()?;
    let mut feeds = pt.feeds.lock().unwrap_or_else(|e| e.into_inner());
    feeds.retain(|_, f| f.tx.receiver_count() > 0);
    Some(
        feeds
            .iter()
            .map(|(t, f)| Cursor {
                tenant: t.clone(),
                after: f.cursor,
            })
            .collect(),
    )
}

/// One follower of one tenant's events.
pub struct Follower {
    queue: Queue,
    tenant: String,
    rx: broadcast::Receiver<Arc<JobEvent>>,
    /// The last event handed out (or the starting position).
    last: EventId,
    catching_up: bool,
    backlog: VecDeque<JobEvent>,
}

impl Follower {
    /// The next event after the last one handed out; waits for it.
    pub async fn next(&mut self) -> Result<JobEvent, QueueError> {
        loop {
            if let Some(e) = self.backlog.pop_front() {
                return Ok(self.hand_out(e));
            }
            if self.catching_up {
                self.catch_up().await?;
                continue;
            }
            match self.rx.recv().await {
                Ok(e) => {
                    if EventId::parse(&e.id).is_some_and(|id| id > self.last) {
                        return Ok(self.hand_out((*e).clone()));
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => self.catching_up = true,
                Err(broadcast::error::RecvError::Closed) => {
                    return Err(QueueError::Protocol("the event hub stopped".into()));
                }
            }
        }
    }

    /// Where it stands: resume after this.
    pub fn position(&self) -> EventId {
        self.last
    }

    fn hand_out(&mut self, e: JobEvent) -> JobEvent {
        if let Some(id) = EventId::parse(&e.id) {
            self.last = self.last.max(id);
        }
        e
    }

    /// One page of what Redis retains after the last event handed out.
    async fn catch_up(&mut self) -> Result<(), QueueError> {
        let batch = self
            .queue
            .job_events_after(&self.tenant, self.last, PAGE)
            .await?;
        // Until a read finds nothing new: then the broadcast takes over.
        self.catching_up = batch.last.is_some();
        if let Some(l) = batch.last
            && batch.events.is_empty()
        {
            self.last = self.last.max(l); // only entries that are not events
        }
        self.backlog.extend(batch.events);
        Ok(())
    }
}
