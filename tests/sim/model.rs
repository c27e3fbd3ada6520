//! The plain Rust model of one namespace: what every script should do,
//! written from the scripts' headers and the README, not from their code.
//! It does not model the stride passes (which tenant a claim picks is the
//! scheduler's choice); it models everything that decides whether a pick is
//! allowed, and what every other script must answer.

use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Where a job is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum St {
    Ready,
    Delayed {
        run_at: i64,
    },
    Running,
    Succeeded,
    Dead {
        at: i64,
    },
    Cancelled,
    /// Deleted by a purge.
    Gone,
}

impl St {
    /// The `state` field of the job hash.
    pub fn name(&self) -> &'static str {
        match self {
            St::Ready => "ready",
            St::Delayed { .. } => "delayed",
            St::Running => "running",
            St::Succeeded => "succeeded",
            St::Dead { .. } => "dead",
            St::Cancelled => "cancelled",
            St::Gone => "gone",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Job {
    pub id: String,
    pub part: u32,
    pub tenant: String,
    pub queue: String,
    /// Rank in its tenant's ready set: priority, then age.
    pub score: i64,
    pub state: St,
    pub attempts: u32,
    /// Attempts not counted against max_attempts (releases, dead retries).
    pub base: u32,
    pub max_attempts: u32,
    pub enqueued: i64,
    /// While running: lease deadline, worker, start, last heartbeat (0: none).
    pub lease: i64,
    pub worker: String,
    pub started: i64,
    pub hb: i64,
    /// The attempt a cancel marked while it ran (0: none): it keeps its
    /// slot, and closes as "cancelled" (unless it succeeded) whoever closes
    /// it (completion, reaper, release).
    pub cancel: u32,
}

/// A tenant's own limit settings (None: the built-in value).
#[derive(Clone, Debug, Default)]
pub struct Own(pub BTreeMap<String, u64>);

/// Effective limits, as lib.lua resolves them (no tiers or defaults here).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub cap: u64,
    pub weight: u64,
    pub rate: u64,
    pub period: u64,
    pub burst: u64,
    pub quota: u64,
    pub max_timeout: u64,
}

/// The limit fields the simulation sets, with their built-in values.
pub const FIELDS: [(&str, u64); 7] = [
    ("max_concurrency", 10),
    ("weight", 1),
    ("rate", 0),
    ("rate_period_ms", 1000),
    ("burst", 0),
    ("quota_ms", 0),
    ("max_timeout_ms", 3_600_000),
];

impl Own {
    fn get(&self, f: &str) -> u64 {
        let builtin = FIELDS.iter().find(|(n, _)| *n == f).map_or(0, |x| x.1);
        self.0.get(f).copied().unwrap_or(builtin)
    }
    pub fn limits(&self) -> Limits {
        Limits {
            cap: self.get("max_concurrency"),
            weight: self.get("weight"),
            rate: self.get("rate"),
            period: self.get("rate_period_ms"),
            burst: self.get("burst"),
            quota: self.get("quota_ms"),
            max_timeout: self.get("max_timeout_ms"),
        }
    }
}

impl Limits {
    /// GCRA emission interval and tolerance. The simulation only sets rates
    /// whose interval is a whole number of ms, so this is exact.
    pub fn gcra(&self) -> (i64, i64) {
        let t = (self.period / self.rate) as i64;
        let burst = if self.burst > 0 {
            self.burst
        } else {
            self.rate
        } as i64;
        (t, (burst - 1) * t)
    }
    /// Pass advance per start: floor(1e6 / weight).
    pub fn stride(&self) -> i64 {
        (1_000_000 / self.weight.max(1)) as i64
    }
}

/// A job to enqueue, as the simulation generates it.
#[derive(Clone, Debug)]
pub struct NewJob {
    pub tenant: String,
    pub queue: String,
    pub delay_ms: u64,
    pub priority: i32,
    pub max_attempts: Option<u32>,
    pub idem: Option<String>,
    pub timeout_ms: Option<u64>,
}

/// One closed attempt: the outbox record it must leave.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Close {
    pub job: String,
    pub attempt: u32,
    pub outcome: String,
    pub run_ms: i64,
}

/// How an attempt ends.
#[derive(Clone, Debug)]
pub struct End {
    pub outcome: String,
    pub permanent: bool,
    pub backoff_ms: u64,
    pub run_ms: i64,
}

impl End {
    /// An attempt that ended without a report (reaped, or handed back).
    fn lost(run_ms: i64) -> End {
        End {
            outcome: "lost".into(),
            permanent: false,
            backoff_ms: 0,
            run_ms,
        }
    }
}

pub struct Model {
    pub now: i64,
    pub parts: u32,
    pub tenants: Vec<String>,
    pub queues: Vec<String>,
    pub jobs: Vec<Job>,
    index: HashMap<String, usize>,
    seq: Vec<u64>,
    /// Members of each partition's B:paused.
    pub paused: Vec<BTreeSet<String>>,
    pub own: HashMap<String, Own>,
    /// GCRA theoretical arrival time per tenant.
    pub tat: HashMap<String, i64>,
    /// (tenant, "YYYY-MM") -> agent ms.
    pub usage: HashMap<(String, String), i64>,
    idem: HashMap<(String, String), String>,
    /// Attempts closed by the current step (outbox records it must add).
    pub closes: Vec<Close>,
    /// Starts per tenant since its rate settings last changed.
    pub starts: HashMap<String, Vec<i64>>,
    /// Queues that keep no succeeded jobs (keep_completed 0): a job that
    /// succeeds there is gone at once, its record in the outbox.
    pub keep_none: BTreeSet<String>,
}

/// "YYYY-MM" (UTC) of a ms timestamp, as lib.lua's month_of.
pub fn month_of(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .expect("time in range")
        .format("%Y-%m")
        .to_string()
}

impl Model {
    pub fn new(now: i64, parts: u32, tenants: Vec<String>, queues: Vec<String>) -> Model {
        Model {
            now,
            parts,
            tenants,
            queues,
            jobs: Vec::new(),
            index: HashMap::new(),
            seq: vec![0; parts as usize],
            paused: vec![BTreeSet::new(); parts as usize],
            own: HashMap::new(),
            tat: HashMap::new(),
            usage: HashMap::new(),
            idem: HashMap::new(),
            closes: Vec::new(),
            starts: HashMap::new(),
            keep_none: BTreeSet::new(),
        }
    }

    pub fn part_of(&self, tenant: &str) -> u32 {
        agentq::queue::partition_of(tenant, self.parts)
    }

    /// Every key of partition `p` the checks read (short names): each job
    /// the model created there, and each key of the layout for its names.
    pub fn keys_of(&self, p: u32) -> Vec<String> {
        let mut keys: Vec<String> = [
            "running",
            "tq",
            "held",
            "throttled",
            "qw",
            "qvt",
            "paused",
            "leases",
            "gcra",
            "seq",
        ]
        .iter()
        .map(|k| k.to_string())
        .collect();
        for q in &self.queues {
            for k in ["sched", "delayed", "dead", "stats", "pass"] {
                keys.push(format!("q:{q}:{k}"));
            }
            for t in &self.tenants {
                keys.push(format!("q:{q}:t:{t}"));
                keys.push(format!("q:{q}:dt:{t}"));
            }
        }
        for t in &self.tenants {
            keys.push(format!("usage:{t}"));
        }
        keys.extend(
            self.jobs
                .iter()
                .filter(|j| j.part == p)
                .map(|j| format!("job:{}", j.id)),
        );
        keys
    }

    /// The job sequence counter of partition `p` (B:seq).
    pub fn seq(&self, p: u32) -> u64 {
        self.seq[p as usize]
    }

    pub fn job(&self, id: &str) -> Option<&Job> {
        self.index.get(id).map(|&i| &self.jobs[i])
    }

    fn job_mut(&mut self, id: &str) -> &mut Job {
        let i = self.index[id];
        &mut self.jobs[i]
    }

    pub fn limits(&self, t: &str) -> Limits {
        self.own.get(t).cloned().unwrap_or_default().limits()
    }

    pub fn used(&self, t: &str) -> i64 {
        let key = (t.to_string(), month_of(self.now));
        self.usage.get(&key).copied().unwrap_or(0)
    }

    pub fn running(&self, t: &str) -> usize {
        self.jobs
            .iter()
            .filter(|j| j.tenant == t && j.state == St::Running)
            .count()
    }

    /// Why `t` may not start a job now (cap, quota, rate), as the README
    /// defines the limits.
    pub fn hold(&self, t: &str) -> Option<&'static str> {
        let l = self.limits(t);
        if self.running(t) as u64 >= l.cap {
            return Some("cap");
        }
        if l.quota > 0 && self.used(t) >= l.quota as i64 {
            return Some("quota");
        }
        if l.rate > 0 {
            let (_, tau) = l.gcra();
            if self.tat.get(t).copied().unwrap_or(0) - self.now > tau {
                return Some("rate");
            }
        }
        None
    }

    pub fn is_paused(&self, p: u32, q: &str, t: &str) -> bool {
        let set = &self.paused[p as usize];
        set.contains(&format!("q:{q}")) || set.contains(&format!("qt:{q}:{t}"))
    }

    /// Ready jobs of (q, t), best first (the order the tenant's ready set
    /// hands them out: priority, then age).
    pub fn ready_of(&self, q: &str, t: &str) -> Vec<&Job> {
        let mut v: Vec<&Job> = self
            .jobs
            .iter()
            .filter(|j| j.queue == q && j.tenant == t && j.state == St::Ready)
            .collect();
        v.sort_by_key(|j| j.score);
        v
    }

    /// Enqueue a batch as `Queue::enqueue_batch` does: one all-or-nothing
    /// script call per partition, in partition order, stopping at the first
    /// refused one. Ok: (id, created) per job; Err: the refused partition.
    pub fn enqueue(&mut self, specs: &[NewJob]) -> Result<Vec<(String, bool)>, u32> {
        let mut by_part: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for (i, s) in specs.iter().enumerate() {
            by_part.entry(self.part_of(&s.tenant)).or_default().push(i);
        }
        let mut out = vec![(String::new(), false); specs.len()];
        for (p, idx) in by_part {
            let over = idx.iter().any(|&i| {
                let s = &specs[i];
                s.timeout_ms.unwrap_or(0) > self.limits(&s.tenant).max_timeout
            });
            if over {
                return Err(p);
            }
            let mut seq = self.seq[p as usize];
            self.seq[p as usize] += idx.len() as u64;
            for i in idx {
                out[i] = self.enqueue_one(p, &specs[i], &mut seq);
            }
        }
        Ok(out)
    }

    fn enqueue_one(&mut self, p: u32, s: &NewJob, seq: &mut u64) -> (String, bool) {
        let idem_key = s.idem.as_ref().map(|k| (s.tenant.clone(), k.clone()));
        if let Some(id) = idem_key.as_ref().and_then(|k| self.idem.get(k)) {
            return (id.clone(), false);
        }
        *seq += 1;
        let id = format!("{p}-{:x}{:06x}", self.now, *seq % 16_777_216);
        if let Some(k) = idem_key {
            self.idem.insert(k, id.clone());
        }
        let state = if s.delay_ms > 0 {
            St::Delayed {
                run_at: self.now + s.delay_ms as i64,
            }
        } else {
            St::Ready
        };
        let job = Job {
            id: id.clone(),
            part: p,
            tenant: s.tenant.clone(),
            queue: s.queue.clone(),
            score: (100 - i64::from(s.priority)) * (1 << 40) + *seq as i64,
            state,
            attempts: 0,
            base: 0,
            max_attempts: s.max_attempts.unwrap_or(3),
            enqueued: self.now,
            lease: 0,
            worker: String::new(),
            started: 0,
            hb: 0,
            cancel: 0,
        };
        self.index.insert(id.clone(), self.jobs.len());
        self.jobs.push(job);
        (id, true)
    }

    /// What a claim does before picking: due delayed jobs of the listed,
    /// unpaused queues become ready (at most 200 per queue and call).
    /// Returns their tenants.
    pub fn promote(&mut self, p: u32, pool: &[String]) -> Vec<String> {
        let mut woken = Vec::new();
        for q in pool {
            if self.paused[p as usize].contains(&format!("q:{q}")) {
                continue;
            }
            let mut due: Vec<(i64, String)> = self
                .jobs
                .iter()
                .filter(|j| j.part == p && &j.queue == q)
                .filter_map(|j| match j.state {
                    St::Delayed { run_at } if run_at <= self.now => Some((run_at, j.id.clone())),
                    _ => None,
                })
                .collect();
            due.sort();
            for (_, id) in due.into_iter().take(200) {
                let j = self.job_mut(&id);
                j.state = St::Ready;
                woken.push(j.tenant.clone());
            }
        }
        woken
    }

    /// Why a claim on partition `p` over `pool` may not hand out `id` now
    /// (None: it may). A pick must be the best ready job of an admissible,
    /// unpaused tenant of that partition on a listed, unpaused queue.
    pub fn refuse_pick(&self, p: u32, pool: &[String], id: &str) -> Option<String> {
        let Some(j) = self.job(id) else {
            return Some(format!("{id} is no job the model knows"));
        };
        if j.part != p || !pool.contains(&j.queue) {
            return Some(format!("{id} is not in partition {p} on {pool:?}"));
        }
        if j.state != St::Ready {
            return Some(format!("{id} is {:?}, not ready", j.state));
        }
        if self.is_paused(p, &j.queue, &j.tenant) {
            return Some(format!("{id}: {} is paused on {}", j.tenant, j.queue));
        }
        if let Some(why) = self.hold(&j.tenant) {
            return Some(format!("{id}: tenant {} is held by {why}", j.tenant));
        }
        let best = self.ready_of(&j.queue, &j.tenant)[0].id.clone();
        (best != id).then(|| {
            format!(
                "{id} is not {}'s next job on {} ({best} is)",
                j.tenant, j.queue
            )
        })
    }

    /// A claim started `id` for `worker`.
    pub fn start(&mut self, id: &str, worker: &str, lease_ms: u64) -> u32 {
        let now = self.now;
        let t = self.job(id).expect("known job").tenant.clone();
        let l = self.limits(&t);
        if l.rate > 0 {
            let (interval, _) = l.gcra();
            let tat = self.tat.entry(t.clone()).or_insert(0);
            *tat = (*tat).max(now) + interval;
        }
        self.starts.entry(t).or_default().push(now);
        let j = self.job_mut(id);
        j.attempts += 1;
        j.state = St::Running;
        j.lease = now + lease_ms as i64;
        j.worker = worker.to_string();
        j.started = now;
        j.hb = 0;
        j.attempts
    }

    /// After a claim that handed out fewer jobs than asked: a tenant it
    /// could still have started (None: there is none).
    pub fn claimable(&self, p: u32, pool: &[String]) -> Option<String> {
        for q in pool {
            for t in &self.tenants {
                if self.part_of(t) == p
                    && !self.is_paused(p, q, t)
                    && self.hold(t).is_none()
                    && !self.ready_of(q, t).is_empty()
                {
                    return Some(format!("{t} on {q}"));
                }
            }
        }
        None
    }

    /// Whether attempt `attempt` of `id` holds its lease now.
    pub fn live(&self, id: &str, attempt: u32) -> bool {
        self.job(id)
            .is_some_and(|j| j.state == St::Running && j.attempts == attempt)
    }

    /// Close the running attempt of `id` (completion, reaper or release):
    /// charge its time, leave one outbox record, route the job. Returns the
    /// job's new state name.
    pub fn finish(&mut self, id: &str, end: &End) -> &'static str {
        let now = self.now;
        let month = month_of(now);
        let j = self.job(id).expect("known job").clone();
        // A cancelled attempt closes as cancelled, unless it succeeded.
        let cancelled = End {
            outcome: "cancelled".into(),
            permanent: true,
            backoff_ms: 0,
            run_ms: end.run_ms,
        };
        let end = if self.marked(&j) && end.outcome != "succeeded" {
            &cancelled
        } else {
            end
        };
        *self.usage.entry((j.tenant.clone(), month)).or_insert(0) += end.run_ms;
        self.closes.push(Close {
            job: id.to_string(),
            attempt: j.attempts,
            outcome: end.outcome.clone(),
            run_ms: end.run_ms,
        });
        let used = j.attempts - j.base;
        let state = if end.outcome == "succeeded" {
            St::Succeeded
        } else if end.outcome == "cancelled" {
            St::Cancelled
        } else if end.permanent || used >= j.max_attempts {
            St::Dead { at: now }
        } else if end.backoff_ms > 0 {
            St::Delayed {
                run_at: now + end.backoff_ms as i64,
            }
        } else {
            St::Ready
        };
        let name = state.name();
        let removed = state == St::Succeeded && self.keep_none.contains(&j.queue);
        let j = self.job_mut(id);
        j.state = if removed { St::Gone } else { state };
        j.worker.clear();
        name
    }

    /// Extend the lease of a live attempt.
    /// A repeated claim (same call id) renews the leases of the jobs it
    /// hands out again, from now, without a heartbeat (claim.lua).
    pub fn renew_lease(&mut self, id: &str, lease_ms: u64) {
        let now = self.now;
        self.job_mut(id).lease = now + lease_ms as i64;
    }

    pub fn extend(&mut self, id: &str, lease_ms: u64) {
        let now = self.now;
        let j = self.job_mut(id);
        j.lease = now + lease_ms as i64;
        j.hb = now;
    }

    /// The reaper: up to `max` expired leases of partition `p`, earliest
    /// first, each closed as "lost" with its run time up to its last
    /// heartbeat. Returns how many.
    pub fn reap(&mut self, p: u32, max: usize) -> usize {
        let mut expired: Vec<(i64, String)> = self
            .jobs
            .iter()
            .filter(|j| j.part == p && j.state == St::Running && j.lease <= self.now)
            .map(|j| (j.lease, j.id.clone()))
            .collect();
        expired.sort();
        expired.truncate(max);
        for (_, id) in &expired {
            let j = self.job(id).expect("known");
            let run_ms = (j.hb.max(j.started) - j.started).max(0);
            self.finish(id, &End::lost(run_ms));
        }
        expired.len()
    }

    /// A worker hands a live attempt back: not counted against its
    /// attempts. A cancelled one is closed as cancelled instead, and not
    /// counted as handed back (returns false).
    pub fn release(&mut self, id: &str, run_ms: i64) -> bool {
        let marked = self.marked(self.job(id).expect("known"));
        if !marked {
            self.job_mut(id).base += 1;
        }
        self.finish(id, &End::lost(run_ms));
        !marked
    }

    /// Whether the running attempt of `j` was cancelled (marked).
    pub fn marked(&self, j: &Job) -> bool {
        j.cancel > 0 && j.cancel == j.attempts
    }

    /// Pause or resume; whether B:paused of some partition changed.
    pub fn pause(&mut self, q: &str, t: Option<&str>, on: bool) -> bool {
        let (parts, member): (Vec<u32>, String) = match t {
            Some(t) => (vec![self.part_of(t)], format!("qt:{q}:{t}")),
            None => ((0..self.parts).collect(), format!("q:{q}")),
        };
        let mut changed = false;
        for p in parts {
            let set = &mut self.paused[p as usize];
            changed |= if on {
                set.insert(member.clone())
            } else {
                set.remove(&member)
            };
        }
        changed
    }

    /// Set (Some) or reset (None) limit fields of a tenant.
    pub fn tenant_set(&mut self, t: &str, fields: &[(String, Option<u64>)]) {
        let own = self.own.entry(t.to_string()).or_default();
        for (f, v) in fields {
            match v {
                Some(v) => own.0.insert(f.clone(), *v),
                None => own.0.remove(f),
            };
        }
        if fields
            .iter()
            .any(|(f, _)| f.starts_with("rate") || f == "burst")
        {
            self.starts.remove(t);
        }
    }

    /// Cancel: the job's state before (cancelled if it was ready or
    /// delayed; a running one's attempt is marked, keeps its slot and
    /// lease, and closes as "cancelled" when it is completed, reaped or
    /// released, unless it succeeded); None when there is no such job.
    pub fn cancel(&mut self, id: &str) -> Option<String> {
        let j = self.job(id)?;
        let before = j.state.clone();
        match before {
            St::Gone => return None,
            St::Ready | St::Delayed { .. } => self.job_mut(id).state = St::Cancelled,
            St::Running => {
                let j = self.job_mut(id);
                j.cancel = j.attempts;
            }
            _ => {}
        }
        Some(before.name().to_string())
    }

    /// Dead jobs of queue `q` a dead retry|purge acts on, per partition, in
    /// the order the script takes them.
    pub fn dead_targets(
        &self,
        q: &str,
        tenant: Option<&str>,
        older_ms: i64,
        ids: Option<&[String]>,
    ) -> Vec<String> {
        let ok = |j: &Job| match j.state {
            St::Dead { at } => {
                j.queue == q && tenant.is_none_or(|t| j.tenant == t) && at <= self.now - older_ms
            }
            _ => false,
        };
        match ids {
            Some(ids) => {
                let mut seen = BTreeSet::new();
                ids.iter()
                    .filter(|id| self.job(id).is_some_and(ok) && seen.insert(id.to_string()))
                    .cloned()
                    .collect()
            }
            None => self
                .jobs
                .iter()
                .filter(|j| ok(j))
                .map(|j| j.id.clone())
                .collect(),
        }
    }

    /// Retry or purge dead jobs; counts per tenant.
    pub fn dead(&mut self, retry: bool, ids: &[String]) -> BTreeMap<String, u64> {
        let mut counts = BTreeMap::new();
        for id in ids {
            let j = self.job_mut(id);
            *counts.entry(j.tenant.clone()).or_default() += 1;
            if retry {
                j.base = j.attempts;
                j.state = St::Ready;
            } else {
                j.state = St::Gone;
            }
        }
        counts
    }

    /// Delete every ready and delayed job of `q`; counts per tenant.
    pub fn purge(&mut self, q: &str) -> BTreeMap<String, u64> {
        let mut counts = BTreeMap::new();
        for j in self.jobs.iter_mut().filter(|j| j.queue == q) {
            if matches!(j.state, St::Ready | St::Delayed { .. }) {
                j.state = St::Gone;
                *counts.entry(j.tenant.clone()).or_default() += 1;
            }
        }
        counts
    }

    /// Raise this month's usage of `t` to at least `ms`: (before, after).
    pub fn raise_usage(&mut self, t: &str, ms: i64) -> (i64, i64) {
        let key = (t.to_string(), month_of(self.now));
        let before = self.usage.get(&key).copied().unwrap_or(0);
        let after = before.max(ms);
        if after > before {
            self.usage.insert(key, after);
        }
        (before, after)
    }
}
