//! One simulated run: a private namespace on the real Redis, scripts that
//! read the test's clock, the model beside it, and the steps that drive
//! both and compare every reply with what the model says it must be.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use agentq::executor::{Outcome, TaskUsage};
use agentq::model::limits::Target;
use agentq::queue::{
    AttemptKey, Call, CompleteStatus, Completion, Extended, HandBack, JobSpec, Queue, QueueConfig,
    QueueError,
};
use fred::prelude::*;

use super::model::{End, Model, NewJob, St, month_of};
use super::ops::{OUTCOMES, Op, Pick, Sizes, Spec};
use super::rng::Rng;
use super::snapshot::Snapshot;

/// A failed check: `kind` names the check (shrinking keeps a sequence only
/// if it still fails the same one), `detail` says what was seen.
#[derive(Clone, Debug)]
pub struct Failure {
    pub kind: String,
    pub detail: String,
}

pub fn fail(kind: &str, detail: String) -> Failure {
    Failure {
        kind: kind.to_string(),
        detail,
    }
}

/// Fail with `kind` unless `cond`.
macro_rules! ensure {
    ($cond:expr, $kind:expr, $($fmt:tt)*) => {
        {
            let ok: bool = $cond;
            if !ok {
                return Err($crate::world::fail($kind, format!($($fmt)*)));
            }
        }
    };
}
pub(crate) use ensure;

/// The names and starting time of a run, all from its seed.
#[derive(Clone, Debug)]
pub struct Setup {
    pub seed: u64,
    pub parts: u32,
    pub tenants: Vec<String>,
    pub queues: Vec<String>,
    pub workers: Vec<String>,
    /// Worker pools: the queues each serves, in its order. Fixed per run,
    /// as in a fleet, so a pool serving fewer queues moves their virtual
    /// time alone.
    pub pools: Vec<Vec<String>>,
    pub start_ms: i64,
    /// A busy fleet: mostly enqueue, claim and complete (`Op::generate`).
    pub busy: bool,
}

/// 2030-02-01T00:00:00Z: runs start up to three hours before it, so some
/// cross into a new month (quotas reset) and some do not.
const MONTH_START: i64 = 1_896_134_400_000;

impl Setup {
    pub fn from_seed(seed: u64) -> Setup {
        let mut rng = Rng::new(seed ^ 0x05ee_d5e7_u64);
        let names = |prefix: &str, n: usize| -> Vec<String> {
            (0..n).map(|i| format!("{prefix}{i}")).collect()
        };
        let parts = 1 + rng.below(3) as u32;
        let tenants = names("t", 3 + rng.below(3));
        let queues = names("q", 2 + rng.below(2));
        let pools = (0..1 + rng.below(3))
            .map(|_| {
                super::ops::pool(&mut rng, queues.len())
                    .into_iter()
                    .map(|i| queues[i].clone())
                    .collect()
            })
            .collect();
        Setup {
            seed,
            parts,
            tenants,
            queues,
            workers: names("w", 3),
            pools,
            start_ms: MONTH_START - rng.below(3 * 3_600_000) as i64,
            busy: rng.chance(40),
        }
    }

    pub fn sizes(&self) -> Sizes {
        Sizes {
            tenants: self.tenants.len(),
            queues: self.queues.len(),
            workers: self.workers.len(),
            parts: self.parts as usize,
            pools: self.pools.len(),
            busy: self.busy,
        }
    }
}

/// What a worker's last call of a kind answered (a repeat must match).
#[derive(Clone, Debug, PartialEq)]
enum Reply {
    Claim {
        jobs: Vec<(String, u32)>,
        weight: f64,
    },
    Complete(Vec<String>),
    Release(u64),
}

/// What a claim answered that needs the state after it to judge.
#[derive(Clone, Debug)]
pub struct ClaimSeen {
    pub part: u32,
    pub pool: Vec<String>,
    /// Earliest delayed job left on the served queues (model), if any.
    pub delayed_due: Option<i64>,
    pub due_in: Option<Duration>,
    pub weight: f64,
    /// Each pick in order, with who could have been picked instead.
    pub picks: Vec<PickSeen>,
    /// Tenants the claim re-synced before picking: jobs of theirs came due,
    /// or their hold lapsed.
    pub woken: Vec<String>,
    /// At the start (after promotion): each tenant's queues with ready
    /// work, and whether it could start a job.
    pub start_ready: BTreeMap<String, Vec<String>>,
    pub start_ok: BTreeMap<String, bool>,
}

/// One pick of a claim: the tenant, the queue, and every (queue, tenant)
/// that could have been picked at that moment (admissible, unpaused, with
/// ready work, on a listed, unpaused queue).
#[derive(Clone, Debug)]
pub struct PickSeen {
    pub tenant: String,
    pub queue: String,
    pub eligible: Vec<(String, String)>,
    /// The pick took the tenant's last ready job on the queue.
    pub dry: bool,
}

pub struct World {
    pub setup: Setup,
    pub queue: Queue,
    pub model: Model,
    /// Every attempt handed out: (partition, id, attempt).
    handed: Vec<(u32, String, u32)>,
    calls: HashMap<(usize, u32, &'static str), (Call, Reply)>,
    /// The claim of the current step, if it was one.
    pub claim: Option<ClaimSeen>,
    /// The current step.
    pub last_op: Option<Op>,
}

fn status_name(s: CompleteStatus) -> &'static str {
    match s {
        CompleteStatus::Succeeded => "succeeded",
        CompleteStatus::Delayed => "delayed",
        CompleteStatus::Ready => "ready",
        CompleteStatus::Dead => "dead",
        CompleteStatus::Refused => "refused",
        CompleteStatus::Cancelled => "cancelled",
    }
}

impl World {
    pub async fn new(setup: Setup) -> World {
        let mut cfg = QueueConfig::new(crate::common::redis_url());
        cfg.namespace = crate::common::namespace("sim");
        cfg.partitions = setup.parts;
        let queue = Queue::connect_with_test_clock(cfg)
            .await
            .expect("connect to Redis (set AGENTQ_REDIS_URL)");
        let model = Model::new(
            setup.start_ms,
            setup.parts,
            setup.tenants.clone(),
            setup.queues.clone(),
        );
        let mut w = World {
            setup,
            queue,
            model,
            handed: Vec::new(),
            calls: HashMap::new(),
            claim: None,
            last_op: None,
        };
        w.set_clock().await;
        // The first queue keeps no succeeded jobs (BullMQ's removeOnComplete):
        // their hashes go in the completion, their records stay exact.
        let first = w.setup.queues[0].clone();
        w.queue
            .set_keep_completed(&first, Some(Duration::ZERO))
            .await
            .expect("keep_completed 0");
        w.model.keep_none.insert(first);
        w
    }

    pub async fn cleanup(&self) {
        self.queue
            .delete_namespace()
            .await
            .expect("delete namespace");
    }

    /// Write the model's time to every partition's test clock.
    async fn set_clock(&self) {
        for p in 0..self.setup.parts {
            let key = self.queue.keys(p).key(&["testclock"]);
            let _: () = self
                .queue
                .client()
                .set(key, self.model.now, None, None, false)
                .await
                .expect("set the test clock");
        }
    }

    fn part(&self, i: usize) -> u32 {
        (i % self.setup.parts as usize) as u32
    }

    /// The attempts `picks` name in partition `p`: live leases (by id) or
    /// attempts already closed.
    fn resolve(&self, p: u32, picks: &[Pick]) -> Vec<(String, u32)> {
        let mut live: Vec<(String, u32)> = self
            .model
            .jobs
            .iter()
            .filter(|j| j.part == p && j.state == St::Running)
            .map(|j| (j.id.clone(), j.attempts))
            .collect();
        live.sort();
        let stale: Vec<(String, u32)> = self
            .handed
            .iter()
            .filter(|(hp, id, a)| *hp == p && !self.model.live(id, *a))
            .map(|(_, id, a)| (id.clone(), *a))
            .collect();
        picks
            .iter()
            .filter_map(|pk| {
                let from = if pk.stale && !stale.is_empty() {
                    &stale
                } else {
                    &live
                };
                (!from.is_empty()).then(|| from[pk.sel as usize % from.len()].clone())
            })
            .collect()
    }

    /// Run one operation on Redis and on the model; Ok: what it did, in
    /// words (the lines a failure prints).
    pub async fn step(&mut self, op: &Op, before: &[Snapshot]) -> Result<String, Failure> {
        self.claim = None;
        self.last_op = Some(op.clone());
        self.model.closes.clear();
        match op {
            Op::Enqueue(specs) => self.enqueue(specs).await,
            Op::Claim {
                part,
                worker,
                pool,
                batch,
                lease_ms,
            } => {
                let pool = self.setup.pools[*pool].clone();
                let p = self.part(*part);
                self.claim(p, *worker, &pool, *batch, *lease_ms, &before[p as usize])
                    .await
            }
            Op::ClaimAgain { part, worker } => self.claim_again(self.part(*part), *worker).await,
            Op::Complete {
                part,
                worker,
                picks,
                outcome,
                permanent,
                backoff_ms,
                run_ms,
            } => {
                let p = self.part(*part);
                let attempts = self.resolve(p, picks);
                let end = End {
                    outcome: OUTCOMES[*outcome].to_string(),
                    permanent: *permanent,
                    backoff_ms: *backoff_ms,
                    run_ms: *run_ms as i64,
                };
                self.complete(p, *worker, &attempts, &end).await
            }
            Op::CompleteAgain { part, worker } => {
                self.repeat(self.part(*part), *worker, "complete").await
            }
            Op::Extend {
                part,
                picks,
                lease_ms,
            } => {
                let p = self.part(*part);
                let attempts = self.resolve(p, picks);
                self.extend(p, &attempts, *lease_ms).await
            }
            Op::Reap { part, max } => self.reap(self.part(*part), *max).await,
            Op::Release {
                part,
                worker,
                picks,
                run_ms,
            } => {
                let p = self.part(*part);
                let attempts = self.resolve(p, picks);
                self.release(p, *worker, &attempts, *run_ms).await
            }
            Op::ReleaseAgain { part, worker } => {
                self.repeat(self.part(*part), *worker, "release").await
            }
            Op::Pause { queue, tenant, on } => self.pause(*queue, *tenant, *on).await,
            Op::TenantSet { tenant, fields } => self.tenant_set(*tenant, fields).await,
            Op::Cancel { job } => self.cancel(*job).await,
            Op::Dead {
                retry,
                queue,
                tenant,
                jobs,
                older_ms,
            } => {
                self.dead(*retry, *queue, *tenant, jobs.as_deref(), *older_ms)
                    .await
            }
            Op::Purge { queue } => self.purge(*queue).await,
            Op::RaiseUsage { tenant, ms } => self.raise_usage(*tenant, *ms).await,
            Op::Advance { ms } => {
                self.model.now += *ms as i64;
                self.set_clock().await;
                Ok(format!(
                    "advance the clock {ms} ms (now {})",
                    self.model.now
                ))
            }
        }
    }

    async fn enqueue(&mut self, specs: &[Spec]) -> Result<String, Failure> {
        let new: Vec<NewJob> = specs
            .iter()
            .map(|s| NewJob {
                tenant: self.setup.tenants[s.tenant].clone(),
                queue: self.setup.queues[s.queue].clone(),
                delay_ms: s.delay_ms,
                priority: s.priority,
                max_attempts: s.max_attempts,
                idem: s.idem.map(|k| format!("k{k}")),
                timeout_ms: s.timeout_ms,
            })
            .collect();
        let jobs: Vec<JobSpec> = new
            .iter()
            .map(|n| {
                let mut j = JobSpec::new(n.tenant.clone(), n.queue.clone(), "noop");
                j.delay = (n.delay_ms > 0).then(|| Duration::from_millis(n.delay_ms));
                j.priority = n.priority;
                j.max_attempts = n.max_attempts;
                j.idempotency_key = n.idem.clone();
                j.timeout = n.timeout_ms.map(Duration::from_millis);
                j
            })
            .collect();
        let said = format!("enqueue {new:?}");
        let want = self.model.enqueue(&new);
        let got = self.queue.enqueue_batch(&jobs).await;
        match (want, got) {
            (Ok(want), Ok(got)) => {
                let got: Vec<(String, bool)> = got.into_iter().map(|e| (e.id, e.created)).collect();
                ensure!(
                    got == want,
                    "enqueue reply",
                    "{said}: got {got:?}, model {want:?}"
                );
                Ok(format!("{said} -> {got:?}"))
            }
            (Err(p), Err(QueueError::OverCap(m))) => {
                Ok(format!("{said} -> refused in partition {p}: {m}"))
            }
            (want, got) => Err(fail(
                "enqueue reply",
                format!("{said}: got {got:?}, model {want:?}"),
            )),
        }
    }

    async fn claim(
        &mut self,
        p: u32,
        worker: usize,
        pool: &[String],
        batch: usize,
        lease_ms: u64,
        before: &Snapshot,
    ) -> Result<String, Failure> {
        let lease = Duration::from_millis(lease_ms);
        let call = Call::new(self.setup.workers[worker].clone());
        let got = self
            .queue
            .claim(p, &call, batch, lease, pool)
            .await
            .map_err(|e| fail("claim error", e.to_string()))?;
        let said = format!(
            "claim p{p} {} {pool:?} batch {batch} lease {lease_ms}",
            call.worker()
        );
        let mut woken = self.model.promote(p, pool);
        let lapsed = before.zset("throttled");
        woken.extend(
            lapsed
                .into_iter()
                .filter(|(_, u)| *u <= self.model.now as f64)
                .map(|(t, _)| t),
        );
        woken.sort();
        woken.dedup();
        let mine: Vec<String> = self
            .model
            .tenants
            .iter()
            .filter(|t| self.model.part_of(t) == p)
            .cloned()
            .collect();
        let start_ready = mine
            .iter()
            .map(|t| {
                let qs = self
                    .model
                    .queues
                    .iter()
                    .filter(|q| !self.model.ready_of(q, t).is_empty())
                    .cloned()
                    .collect();
                (t.clone(), qs)
            })
            .collect();
        let start_ok = mine
            .iter()
            .map(|t| (t.clone(), self.model.hold(t).is_none()))
            .collect();
        let mut picks = Vec::new();
        for j in &got.jobs {
            let eligible = self.eligible(p, pool);
            if let Some(why) = self.model.refuse_pick(p, pool, &j.id) {
                return Err(fail(
                    "claim pick",
                    format!("{said}: picked {why} (picks {:?})", ids(&got.jobs)),
                ));
            }
            let attempt = self.model.start(&j.id, call.worker(), lease_ms);
            let mj = self.model.job(&j.id).expect("known");
            ensure!(
                j.attempt == attempt
                    && j.tenant == mj.tenant
                    && j.queue == mj.queue
                    && j.started_at_ms == self.model.now
                    && j.enqueued_at_ms == mj.enqueued,
                "claim reply",
                "{said}: job {j:?} vs model attempt {attempt} {mj:?}"
            );
            self.handed.push((p, j.id.clone(), attempt));
            picks.push(PickSeen {
                tenant: j.tenant.clone(),
                queue: j.queue.clone(),
                eligible,
                dry: self.model.ready_of(&j.queue, &j.tenant).is_empty(),
            });
        }
        if got.jobs.len() < batch
            && let Some(left) = self.model.claimable(p, pool)
        {
            return Err(fail(
                "claim left work",
                format!(
                    "{said}: handed out {} but {left} could start",
                    got.jobs.len()
                ),
            ));
        }
        let delayed_due = self
            .model
            .jobs
            .iter()
            .filter(|j| j.part == p && pool.contains(&j.queue))
            .filter(|j| !self.model.paused[p as usize].contains(&format!("q:{}", j.queue)))
            .filter_map(|j| match j.state {
                St::Delayed { run_at } => Some(run_at),
                _ => None,
            })
            .min();
        let jobs: Vec<(String, u32)> = got.jobs.iter().map(|j| (j.id.clone(), j.attempt)).collect();
        self.claim = Some(ClaimSeen {
            part: p,
            pool: pool.to_vec(),
            delayed_due,
            due_in: got.due_in,
            weight: got.weight,
            picks,
            woken,
            start_ready,
            start_ok,
        });
        self.calls.insert(
            (worker, p, "claim"),
            (
                call,
                Reply::Claim {
                    jobs: jobs.clone(),
                    weight: got.weight,
                },
            ),
        );
        Ok(format!("{said} -> {:?}", ids(&got.jobs)))
    }

    /// Who a claim on `p` over `pool` may pick now: (queue, tenant).
    fn eligible(&self, p: u32, pool: &[String]) -> Vec<(String, String)> {
        let m = &self.model;
        let mut v = Vec::new();
        for q in pool
            .iter()
            .filter(|q| !m.paused[p as usize].contains(&format!("q:{q}")))
        {
            for t in m.tenants.iter().filter(|t| m.part_of(t) == p) {
                if !m.is_paused(p, q, t) && m.hold(t).is_none() && !m.ready_of(q, t).is_empty() {
                    v.push((q.clone(), t.clone()));
                }
            }
        }
        v
    }

    async fn claim_again(&mut self, p: u32, worker: usize) -> Result<String, Failure> {
        let Some((call, Reply::Claim { jobs, weight })) =
            self.calls.get(&(worker, p, "claim")).cloned()
        else {
            return Ok(format!(
                "claim again p{p} w{worker}: no earlier claim (nothing sent)"
            ));
        };
        let renew = Duration::from_secs(1);
        let got = self
            .queue
            .claim(p, &call, 1, renew, &self.setup.queues)
            .await
            .map_err(|e| fail("claim error", e.to_string()))?;
        let want: Vec<(String, u32)> = jobs
            .into_iter()
            .filter(|(id, a)| {
                self.model.live(id, *a)
                    && self
                        .model
                        .job(id)
                        .is_some_and(|j| j.worker == call.worker())
            })
            .collect();
        let seen: Vec<(String, u32)> = got.jobs.iter().map(|j| (j.id.clone(), j.attempt)).collect();
        ensure!(
            seen == want && got.weight == weight && got.due_in.is_none(),
            "claim repeat",
            "claim again p{p} {}: got {seen:?} weight {} due {:?}, want {want:?} weight {weight}",
            call.worker(),
            got.weight,
            got.due_in
        );
        for (id, _) in &seen {
            self.model.renew_lease(id, renew.as_millis() as u64);
        }
        Ok(format!("claim again p{p} {} -> {seen:?}", call.worker()))
    }

    async fn complete(
        &mut self,
        p: u32,
        worker: usize,
        attempts: &[(String, u32)],
        end: &End,
    ) -> Result<String, Failure> {
        if attempts.is_empty() {
            return Ok(format!("complete p{p}: no attempt to name (nothing sent)"));
        }
        let outcome: Outcome = end.outcome.parse().expect("known outcome");
        let done: Vec<Completion> = attempts
            .iter()
            .map(|(id, a)| Completion {
                id: id.clone(),
                attempt: *a,
                outcome,
                permanent: end.permanent,
                error: String::new(),
                result: None,
                exit_code: None,
                signal: None,
                run_ms: end.run_ms as u64,
                cpu_ms: 0,
                peak_rss: 0,
                usage: TaskUsage::default(),
                backoff_ms: end.backoff_ms,
            })
            .collect();
        let mut want: Vec<String> = Vec::new();
        let mut first: BTreeMap<(String, u32), String> = BTreeMap::new();
        for (id, a) in attempts {
            let s = match first.get(&(id.clone(), *a)) {
                Some(s) => s.clone(),
                None if self.model.live(id, *a) => self.model.finish(id, end).to_string(),
                None => "refused".to_string(),
            };
            first.entry((id.clone(), *a)).or_insert_with(|| s.clone());
            want.push(s);
        }
        let call = Call::new(self.setup.workers[worker].clone());
        let said = format!("complete p{p} {} {attempts:?} {end:?}", call.worker());
        let got: Vec<String> = self
            .queue
            .complete(p, &call, &done)
            .await
            .map_err(|e| fail("complete error", format!("{said}: {e}")))?
            .statuses
            .into_iter()
            .map(|s| status_name(s).to_string())
            .collect();
        ensure!(
            got == want,
            "complete reply",
            "{said}: got {got:?}, model {want:?}"
        );
        self.calls.insert(
            (worker, p, "complete"),
            (call, Reply::Complete(got.clone())),
        );
        Ok(format!("{said} -> {got:?}"))
    }

    /// Repeat a worker's last completion or release with its call id: the
    /// first reply again, and nothing changes.
    async fn repeat(
        &mut self,
        p: u32,
        worker: usize,
        kind: &'static str,
    ) -> Result<String, Failure> {
        let Some((call, first)) = self.calls.get(&(worker, p, kind)).cloned() else {
            return Ok(format!(
                "{kind} again p{p} w{worker}: no earlier call (nothing sent)"
            ));
        };
        let said = format!("{kind} again p{p} {}", call.worker());
        let got = match kind {
            "complete" => self.queue.complete(p, &call, &[]).await.map(|v| {
                Reply::Complete(
                    v.statuses
                        .into_iter()
                        .map(|s| status_name(s).to_string())
                        .collect(),
                )
            }),
            _ => self
                .queue
                .release(p, &call, "again", &[])
                .await
                .map(|r| Reply::Release(r.released)),
        }
        .map_err(|e| fail("repeat error", format!("{said}: {e}")))?;
        ensure!(
            got == first,
            "repeat reply",
            "{said}: got {got:?}, first {first:?}"
        );
        Ok(format!("{said} -> {got:?}"))
    }

    async fn extend(
        &mut self,
        p: u32,
        attempts: &[(String, u32)],
        lease_ms: u64,
    ) -> Result<String, Failure> {
        if attempts.is_empty() {
            return Ok(format!("extend p{p}: no attempt to name (nothing sent)"));
        }
        let mut want = Extended::default();
        for (id, a) in attempts {
            let key = AttemptKey::new(id.clone(), *a);
            if self.model.live(id, *a) {
                self.model.extend(id, lease_ms);
                // A cancelled attempt is renewed and named, to be killed.
                if self.model.marked(self.model.job(id).expect("live")) {
                    want.cancelled.push(key);
                }
            } else {
                want.lost.push(key);
            }
        }
        let keys: Vec<AttemptKey> = attempts
            .iter()
            .map(|(id, a)| AttemptKey::new(id.clone(), *a))
            .collect();
        let said = format!("extend p{p} {attempts:?} by {lease_ms}");
        let got = self
            .queue
            .extend(p, Duration::from_millis(lease_ms), &keys)
            .await
            .map_err(|e| fail("extend error", format!("{said}: {e}")))?;
        ensure!(
            got == want,
            "extend reply",
            "{said}: got {got:?}, model {want:?}"
        );
        Ok(format!("{said} -> {got:?}"))
    }

    async fn reap(&mut self, p: u32, max: usize) -> Result<String, Failure> {
        // The guard (one reaper run per interval, fleet-wide) runs on real
        // time; the simulation reaps whenever it likes.
        let guard = self.queue.keys(p).key(&["reaper"]);
        let _: i64 = self.queue.client().del(guard).await.expect("del guard");
        let want = self.model.reap(p, max) as u64;
        let got = self
            .queue
            .reap(p, Duration::from_millis(1), max)
            .await
            .map_err(|e| fail("reap error", e.to_string()))?;
        let got = got.ran.then_some(got.reaped);
        ensure!(
            got == Some(want),
            "reap reply",
            "reap p{p} max {max}: got {got:?}, model {want}"
        );
        Ok(format!("reap p{p} max {max} -> {want}"))
    }

    async fn release(
        &mut self,
        p: u32,
        worker: usize,
        attempts: &[(String, u32)],
        run_ms: u64,
    ) -> Result<String, Failure> {
        if attempts.is_empty() {
            return Ok(format!("release p{p}: no attempt to name (nothing sent)"));
        }
        let mut want = 0;
        let me = self.setup.workers[worker].clone();
        for (id, a) in attempts {
            // Fenced by attempt and worker: another worker's run is not
            // this one's to hand back.
            let mine = self.model.job(id).is_some_and(|j| j.worker == me);
            if self.model.live(id, *a) && mine && self.model.release(id, run_ms as i64) {
                want += 1;
            }
        }
        let call = Call::new(me);
        let held: Vec<HandBack> = attempts
            .iter()
            .map(|(id, a)| HandBack {
                key: AttemptKey::new(id.clone(), *a),
                run_ms,
            })
            .collect();
        let said = format!("release p{p} {} {attempts:?} run {run_ms}", call.worker());
        let got = self
            .queue
            .release(p, &call, "shutdown", &held)
            .await
            .map_err(|e| fail("release error", format!("{said}: {e}")))?
            .released;
        ensure!(
            got == want,
            "release reply",
            "{said}: got {got}, model {want}"
        );
        self.calls
            .insert((worker, p, "release"), (call, Reply::Release(got)));
        Ok(format!("{said} -> {got}"))
    }

    async fn pause(
        &mut self,
        queue: usize,
        tenant: Option<usize>,
        on: bool,
    ) -> Result<String, Failure> {
        let q = self.setup.queues[queue].clone();
        let t = tenant.map(|i| self.setup.tenants[i].clone());
        let want = self.model.pause(&q, t.as_deref(), on);
        let said = format!("{} {q} {t:?}", if on { "pause" } else { "resume" });
        let got = self
            .queue
            .set_paused(&q, t.as_deref(), on)
            .await
            .map_err(|e| fail("pause error", format!("{said}: {e}")))?;
        ensure!(
            got == want,
            "pause reply",
            "{said}: changed {got}, model {want}"
        );
        Ok(format!("{said} -> changed {got}"))
    }

    async fn tenant_set(
        &mut self,
        tenant: usize,
        fields: &[(&'static str, Option<u64>)],
    ) -> Result<String, Failure> {
        let t = self.setup.tenants[tenant].clone();
        let wire: Vec<(&str, Option<String>)> = fields
            .iter()
            .map(|(f, v)| (*f, v.map(|v| v.to_string())))
            .collect();
        let model: Vec<(String, Option<u64>)> =
            fields.iter().map(|(f, v)| (f.to_string(), *v)).collect();
        self.model.tenant_set(&t, &model);
        let said = format!("tenant set {t} {fields:?}");
        self.queue
            .set_limit_fields(Target::Tenant(&t), &wire)
            .await
            .map_err(|e| fail("tenant set error", format!("{said}: {e}")))?;
        Ok(said)
    }

    async fn cancel(&mut self, sel: u32) -> Result<String, Failure> {
        if self.model.jobs.is_empty() {
            return Ok("cancel: no job yet (nothing sent)".into());
        }
        // Every other cancel aims at a running job when there is one (most
        // jobs picked at random have finished).
        let running: Vec<&str> = self
            .model
            .jobs
            .iter()
            .filter(|j| j.state == St::Running)
            .map(|j| j.id.as_str())
            .collect();
        let id = if sel % 2 == 1 && !running.is_empty() {
            running[(sel / 2) as usize % running.len()].to_string()
        } else {
            self.model.jobs[sel as usize % self.model.jobs.len()]
                .id
                .clone()
        };
        let want = self.model.cancel(&id);
        let got = match self.queue.cancel(&id).await {
            Ok(s) => Some(s),
            Err(QueueError::NotFound(_)) => None,
            Err(e) => return Err(fail("cancel error", format!("cancel {id}: {e}"))),
        };
        ensure!(
            got == want,
            "cancel reply",
            "cancel {id}: got {got:?}, model {want:?}"
        );
        Ok(format!("cancel {id} -> {got:?}"))
    }

    async fn dead(
        &mut self,
        retry: bool,
        queue: usize,
        tenant: Option<usize>,
        sels: Option<&[u32]>,
        older_ms: u64,
    ) -> Result<String, Failure> {
        let q = self.setup.queues[queue].clone();
        let t = tenant.map(|i| self.setup.tenants[i].clone());
        let ids: Option<Vec<String>> = match sels {
            None => None,
            Some(sels) => {
                let mut dead: Vec<String> = self
                    .model
                    .jobs
                    .iter()
                    .filter(|j| matches!(j.state, St::Dead { .. }))
                    .map(|j| j.id.clone())
                    .collect();
                dead.sort();
                if dead.is_empty() {
                    return Ok("dead jobs by id: none is dead (nothing sent)".into());
                }
                Some(
                    sels.iter()
                        .map(|s| dead[*s as usize % dead.len()].clone())
                        .collect(),
                )
            }
        };
        let targets = self
            .model
            .dead_targets(&q, t.as_deref(), older_ms as i64, ids.as_deref());
        let want = self.model.dead(retry, &targets);
        let said = format!(
            "dead {} {q} tenant {t:?} jobs {ids:?} older {older_ms}",
            if retry { "retry" } else { "purge" }
        );
        let got = self
            .queue
            .dead_jobs(
                retry,
                &q,
                t.as_deref(),
                Duration::from_millis(older_ms),
                ids.as_deref().unwrap_or(&[]),
            )
            .await
            .map_err(|e| fail("dead error", format!("{said}: {e}")))?;
        ensure!(
            got == want,
            "dead reply",
            "{said}: got {got:?}, model {want:?}"
        );
        Ok(format!("{said} -> {got:?}"))
    }

    async fn purge(&mut self, queue: usize) -> Result<String, Failure> {
        let q = self.setup.queues[queue].clone();
        let want = self.model.purge(&q);
        let got = self
            .queue
            .purge_waiting(&q)
            .await
            .map_err(|e| fail("purge error", format!("purge {q}: {e}")))?;
        ensure!(
            got == want,
            "purge reply",
            "purge {q}: got {got:?}, model {want:?}"
        );
        Ok(format!("purge {q} -> {got:?}"))
    }

    async fn raise_usage(&mut self, tenant: usize, ms: u64) -> Result<String, Failure> {
        let t = self.setup.tenants[tenant].clone();
        let month = month_of(self.model.now);
        let want = self.model.raise_usage(&t, ms as i64);
        let got = self
            .queue
            .raise_usage(&t, &month, ms)
            .await
            .map_err(|e| fail("usage error", format!("raise usage {t}: {e}")))?;
        let got = (got.before_ms as i64, got.after_ms as i64);
        ensure!(
            got == want,
            "usage reply",
            "raise usage {t} {month} to {ms}: got {got:?}, model {want:?}"
        );
        Ok(format!("raise usage {t} {month} to {ms} -> {got:?}"))
    }
}

fn ids(jobs: &[agentq::queue::ClaimedJob]) -> Vec<String> {
    jobs.iter()
        .map(|j| format!("{} ({})", j.id, j.tenant))
        .collect()
}
