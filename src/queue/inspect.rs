//! Read-only views for operators: queue depth, tenant state, jobs.
//!
//! Everything here reads counters and bounded ranges, never scans all jobs,
//! so it is safe to run against production at any time.

use std::collections::{BTreeMap, HashMap};

use fred::prelude::*;
use serde::Serialize;

use super::{Queue, QueueError};

/// Per-queue counts, summed over partitions.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct QueueStats {
    /// Queue name.
    pub queue: String,
    /// Jobs ready to start.
    pub ready: i64,
    /// Jobs waiting for a delay or a retry backoff.
    pub delayed: i64,
    /// Jobs running now.
    pub running: i64,
    /// Dead jobs (kept until purged).
    pub dead: i64,
    /// Whether the queue is paused (no new starts).
    pub paused: bool,
}

/// Per-tenant state, summed over the selected queues.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TenantStats {
    /// Tenant name.
    pub tenant: String,
    /// Tier label, if set.
    pub tier: Option<String>,
    /// Ready jobs.
    pub ready: i64,
    /// Delayed jobs.
    pub delayed: i64,
    /// Running jobs (fleet-wide, all queues).
    pub running: i64,
    /// Concurrency cap.
    pub cap: u64,
    /// Weight.
    pub weight: u64,
    /// Dead jobs.
    pub dead: i64,
    /// Why ready work is not starting: `paused`, `cap`, `quota`, `rate`, or none.
    pub held: Option<String>,
    /// Agent time used this calendar month (UTC), ms.
    pub usage_ms: u64,
    /// Monthly quota, ms (0: none).
    pub quota_ms: u64,
}

/// The current calendar month (UTC) as the scripts key it, `YYYY-MM`, by
/// Redis's clock (the scripts' clock), not this machine's.
pub async fn current_month(q: &Queue) -> Result<String, QueueError> {
    Ok(q.server_time().await?.format("%Y-%m").to_string())
}

fn hash_i64(h: &HashMap<String, String>, k: &str) -> i64 {
    h.get(k).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Queue names known in any partition, sorted.
pub async fn queue_names(q: &Queue) -> Result<Vec<String>, QueueError> {
    let mut names = std::collections::BTreeSet::new();
    for p in 0..q.partitions() {
        let v: Vec<String> = q.client().smembers(q.keys(p).key(&["queues"])).await?;
        names.extend(v);
    }
    Ok(names.into_iter().collect())
}

pub use super::outbox::backlog as outbox_backlog;

/// Depth of every queue.
pub async fn queue_stats(q: &Queue) -> Result<Vec<QueueStats>, QueueError> {
    let mut out: BTreeMap<String, QueueStats> = BTreeMap::new();
    for p in 0..q.partitions() {
        let keys = q.keys(p);
        let names: Vec<String> = q.client().smembers(keys.key(&["queues"])).await?;
        let paused: Vec<String> = q.client().smembers(keys.key(&["paused"])).await?;
        for name in names {
            let h: HashMap<String, String> =
                q.client().hgetall(keys.key(&["q", &name, "stats"])).await?;
            let s = out.entry(name.clone()).or_insert_with(|| QueueStats {
                queue: name.clone(),
                ..Default::default()
            });
            s.ready += hash_i64(&h, "ready");
            s.delayed += hash_i64(&h, "delayed");
            s.running += hash_i64(&h, "running");
            s.dead += hash_i64(&h, "dead");
            s.paused |= paused.iter().any(|m| m == &format!("q:{name}"));
        }
    }
    Ok(out.into_values().collect())
}

/// State of every tenant (optionally only counting one queue).
pub async fn tenant_stats(q: &Queue, queue: Option<&str>) -> Result<Vec<TenantStats>, QueueError> {
    let mut out: BTreeMap<String, TenantStats> = BTreeMap::new();
    for p in 0..q.partitions() {
        let keys = q.keys(p);
        let tenants: Vec<String> = q.client().smembers(keys.key(&["tenants"])).await?;
        let running: HashMap<String, String> = q.client().hgetall(keys.key(&["running"])).await?;
        let held: HashMap<String, String> = q.client().hgetall(keys.key(&["held"])).await?;
        let month = current_month(q).await?;
        let paused: Vec<String> = q.client().smembers(keys.key(&["paused"])).await?;
        let defaults = crate::queue::limits::defaults(q, p).await?;
        let queues: Vec<String> = match queue {
            Some(name) => vec![name.to_string()],
            None => q.client().smembers(keys.key(&["queues"])).await?,
        };
        let mut per_queue = Vec::new();
        for name in &queues {
            let h: HashMap<String, String> =
                q.client().hgetall(keys.key(&["q", name, "stats"])).await?;
            per_queue.push((name.clone(), h));
        }
        for t in tenants {
            let set = crate::queue::limits::tenant_settings(q, &t, &defaults).await?;
            let mut s = TenantStats {
                tenant: t.clone(),
                tier: set.tier,
                running: hash_i64(&running, &t),
                cap: set.limits.max_concurrency,
                weight: set.limits.weight,
                quota_ms: set.limits.quota_ms,
                ..Default::default()
            };
            let used: Option<u64> = q.client().hget(keys.key(&["usage", &t]), &month).await?;
            s.usage_ms = used.unwrap_or(0);
            let mut paused_with_work = false;
            for (name, h) in &per_queue {
                // ready per tenant is the size of its ready set (not counted in stats)
                let ready: i64 = q.client().zcard(keys.key(&["q", name, "t", &t])).await?;
                s.ready += ready;
                s.delayed += hash_i64(h, &format!("delayed:{t}"));
                s.dead += hash_i64(h, &format!("dead:{t}"));
                let is_paused = paused
                    .iter()
                    .any(|m| *m == format!("q:{name}") || *m == format!("qt:{name}:{t}"));
                paused_with_work |= is_paused && ready > 0;
            }
            s.held = if paused_with_work {
                Some("paused".into())
            } else if s.ready > 0 && s.running as u64 >= s.cap {
                Some("cap".into())
            } else if s.ready > 0 {
                held.get(&t).cloned()
            } else {
                None
            };
            out.insert(t, s);
        }
    }
    Ok(out.into_values().collect())
}

/// Every stored field of one job, with times as RFC 3339 (ms).
#[derive(Clone, Debug, Serialize)]
pub struct JobInfo {
    /// Job id.
    pub id: String,
    /// Tenant.
    pub tenant: String,
    /// Queue.
    pub queue: String,
    /// Kind.
    pub kind: String,
    /// ready, delayed, running, succeeded, dead.
    pub state: String,
    /// Attempts started so far.
    pub attempts: u64,
    /// Attempts allowed.
    pub max_attempts: u64,
    /// Outcome of the last finished attempt.
    pub outcome: Option<String>,
    /// Priority.
    pub priority: i64,
    /// Requested timeout, ms (0: kind default).
    pub timeout_ms: u64,
    /// Requested memory, bytes (0: kind default).
    pub memory: u64,
    /// Enqueue time.
    pub enqueued_at: Option<String>,
    /// Start of the last attempt.
    pub started_at: Option<String>,
    /// End of the last attempt.
    pub finished_at: Option<String>,
    /// When a delayed job becomes ready.
    pub run_at: Option<String>,
    /// Lease deadline of a running attempt.
    pub lease_until: Option<String>,
    /// Worker running it.
    pub worker: Option<String>,
    /// Error of the last failed attempt.
    pub last_error: Option<String>,
    /// Idempotency key.
    pub idempotency_key: Option<String>,
    /// Payload.
    pub payload: serde_json::Value,
    /// Result of a succeeded attempt.
    pub result: Option<serde_json::Value>,
    /// The latest progress report of a running attempt (`{"progress": ...}`
    /// lines of the task; kept after the attempt ends).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<serde_json::Value>,
    /// Enqueue time, ms since the epoch (Redis time): where the job's
    /// events begin in its tenant's stream.
    #[serde(skip)]
    pub enqueued_ms: Option<u64>,
}

impl JobInfo {
    /// Whether the job has ended: succeeded, dead or cancelled.
    pub fn is_final(&self) -> bool {
        matches!(self.state.as_str(), "succeeded" | "dead" | "cancelled")
    }

    /// The final event of a finished job, made from its record (for a
    /// follower whose stream holds none: its queue publishes no events, or
    /// they were trimmed), at position `at`.
    pub fn final_event(
        &self,
        at: crate::model::job_event::EventId,
    ) -> crate::model::job_event::JobEvent {
        crate::model::job_event::JobEvent {
            id: at.to_string(),
            job: self.id.clone(),
            kind: crate::model::job_event::JobEventType::parse(&self.state),
            queue: self.queue.clone(),
            at: at.ms,
            attempt: (self.attempts > 0).then_some(self.attempts),
            outcome: self.outcome.clone(),
            error: self.last_error.clone(),
            result: self.result.clone(),
            result_bytes: None,
            progress: None,
            run_at: None,
        }
    }
}

/// RFC 3339 with milliseconds, UTC.
pub fn rfc3339_ms(ms: i64) -> Option<String> {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

/// Read one job.
pub async fn job_info(q: &Queue, id: &str) -> Result<JobInfo, QueueError> {
    let p = q.partition_of_job(id)?;
    let keys = q.keys(p);
    let h: HashMap<String, String> = q.client().hgetall(keys.job(id)).await?;
    if h.is_empty() {
        return Err(QueueError::NotFound(id.to_string()));
    }
    let lease: Option<f64> = q.client().zscore(keys.key(&["leases"]), id).await?;
    let text = |k: &str| h.get(k).filter(|v| !v.is_empty()).cloned();
    let time = |k: &str| {
        h.get(k)
            .and_then(|v| v.parse::<i64>().ok())
            .and_then(rfc3339_ms)
    };
    // PlainJson: shown as stored, even an object keyed like serde_json's raw values.
    let json = |k: &str| {
        text(k).map(|v| match serde_json::from_str(&v) {
            Ok(crate::model::json::PlainJson(j)) => j,
            Err(_) => serde_json::Value::String(v),
        })
    };
    let state = text("state").unwrap_or_default();
    Ok(JobInfo {
        id: id.to_string(),
        tenant: text("tenant").unwrap_or_default(),
        queue: text("queue").unwrap_or_default(),
        kind: text("kind").unwrap_or_default(),
        attempts: hash_i64(&h, "attempts").max(0) as u64,
        max_attempts: hash_i64(&h, "max_attempts").max(0) as u64,
        outcome: text("outcome"),
        priority: hash_i64(&h, "priority"),
        timeout_ms: hash_i64(&h, "timeout_ms").max(0) as u64,
        memory: hash_i64(&h, "memory").max(0) as u64,
        enqueued_at: time("enqueued_at"),
        started_at: time("started_at"),
        finished_at: if state == "running" {
            None
        } else {
            time("finished_at")
        },
        run_at: if state == "delayed" {
            time("run_at")
        } else {
            None
        },
        lease_until: lease.and_then(|v| rfc3339_ms(v as i64)),
        worker: text("worker"),
        last_error: text("last_error"),
        idempotency_key: text("idem"),
        payload: json("payload").unwrap_or(serde_json::Value::Null),
        result: json("result"),
        progress: json("progress"),
        enqueued_ms: h.get("enqueued_at").and_then(|v| v.parse().ok()),
        state,
    })
}

/// One line of a job listing.
#[derive(Clone, Debug, Serialize)]
pub struct JobSummary {
    /// Job id.
    pub id: String,
    /// Tenant.
    pub tenant: String,
    /// Kind.
    pub kind: String,
    /// State.
    pub state: String,
    /// Attempts started.
    pub attempts: u64,
    /// Enqueue time.
    pub enqueued_at: Option<String>,
    /// Last error, if any.
    pub last_error: Option<String>,
    /// End of the last attempt (for dead jobs: when it died).
    pub finished_at: Option<String>,
}

/// Which jobs to list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobState {
    /// Waiting to start.
    Ready,
    /// Waiting for a delay or backoff.
    Delayed,
    /// Running.
    Running,
    /// Dead.
    Dead,
}

impl std::str::FromStr for JobState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "ready" => JobState::Ready,
            "delayed" => JobState::Delayed,
            "running" => JobState::Running,
            "dead" => JobState::Dead,
            other => {
                return Err(format!(
                    "unknown state {other:?}: use ready, delayed, running or dead"
                ));
            }
        })
    }
}

/// The first `n` members of a sorted set (lowest scores, or highest with `rev`).
async fn head(q: &Queue, key: String, n: usize, rev: bool) -> Result<Vec<String>, QueueError> {
    let stop = n.max(1) as i64 - 1;
    Ok(q.client()
        .zrange(key, 0, stop, None, rev, None, false)
        .await?)
}

/// List up to `limit` jobs of a queue in one state (all four when `state` is
/// None), optionally of one tenant. Bounded: reads at most `limit` ids per
/// structure.
pub async fn list_jobs(
    q: &Queue,
    queue: &str,
    tenant: Option<&str>,
    state: Option<JobState>,
    limit: usize,
) -> Result<Vec<JobSummary>, QueueError> {
    let states = match state {
        Some(s) => vec![s],
        None => vec![
            JobState::Running,
            JobState::Ready,
            JobState::Delayed,
            JobState::Dead,
        ],
    };
    let parts: Vec<u32> = match tenant {
        Some(t) => vec![q.partition_of(t)],
        None => (0..q.partitions()).collect(),
    };
    let mut ids = Vec::new();
    let window = (limit * 4).max(100);
    for p in parts {
        let keys = q.keys(p);
        for s in &states {
            let found: Vec<String> = match s {
                JobState::Ready => {
                    let tenants: Vec<String> = match tenant {
                        Some(t) => vec![t.to_string()],
                        None => q.client().smembers(keys.key(&["tenants"])).await?,
                    };
                    let mut v = Vec::new();
                    for t in tenants {
                        if v.len() >= limit {
                            break;
                        }
                        v.extend(head(q, keys.key(&["q", queue, "t", &t]), limit, false).await?);
                    }
                    v
                }
                JobState::Delayed => {
                    head(q, keys.key(&["q", queue, "delayed"]), window, false).await?
                }
                JobState::Running => head(q, keys.key(&["leases"]), window, false).await?,
                JobState::Dead => head(q, keys.key(&["q", queue, "dead"]), window, true).await?,
            };
            ids.extend(found);
        }
    }
    let mut out = Vec::new();
    for id in ids {
        if out.len() >= limit {
            break;
        }
        let p = q.partition_of_job(&id)?;
        let v: Vec<Option<String>> = q
            .client()
            .hmget(
                q.keys(p).job(&id),
                vec![
                    "tenant",
                    "queue",
                    "kind",
                    "state",
                    "attempts",
                    "enqueued_at",
                    "last_error",
                    "finished_at",
                ],
            )
            .await?;
        let get = |i: usize| v.get(i).cloned().flatten().filter(|s| !s.is_empty());
        if get(1).as_deref() != Some(queue) || (tenant.is_some() && get(0).as_deref() != tenant) {
            continue;
        }
        out.push(JobSummary {
            id,
            tenant: get(0).unwrap_or_default(),
            kind: get(2).unwrap_or_default(),
            state: get(3).unwrap_or_default(),
            attempts: get(4).and_then(|s| s.parse().ok()).unwrap_or(0),
            enqueued_at: get(5).and_then(|s| s.parse().ok()).and_then(rfc3339_ms),
            last_error: get(6),
            finished_at: get(7).and_then(|s| s.parse().ok()).and_then(rfc3339_ms),
        });
    }
    Ok(out)
}
