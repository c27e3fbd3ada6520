//! The stride scheduler, replayed step by step from the state before each
//! step, and the fairness bound.
//!
//! **Replay.** From the sched sets, virtual times (`B:qvt`) and saved passes
//! (`B:q:<q>:pass`) before a step, the rules of README "Fairness and
//! limits" and claim.lua say exactly what they must be after it:
//! - a tenant entering q's set gets `clamp(saved, vt_q, vt_q + stride)`
//!   (`vt_q` without a saved pass), and its saved pass is dropped;
//! - a tenant leaving keeps its pass as its saved pass if it is ahead of
//!   `vt_q`;
//! - a claim first re-syncs the tenants it woke (jobs came due, holds
//!   lapsed); each pick is of a lowest pass among everyone who could be
//!   picked on the listed, unpaused queues (ties either way); a pick at pass
//!   `e` raises the virtual time of every listed queue to `e` and moves the
//!   tenant by its stride on every listed, unpaused queue where it waits;
//!   then the picked tenants that ran dry or hit a limit leave.
//!
//! A tenant whose last ready job on a queue was just picked stays in that
//! set until the script next finds its entry empty, so whether its later
//! picks elsewhere move its pass there depends on the order of entries:
//! its (saved) pass there is not predicted, only that it leaves. Passes of queues whose virtual time was never written (before their
//! first claim) are not predicted.
//!
//! **Fairness bound** ("within one round", README and tests/fairness.rs).
//! Take a tenant i in q's sched set, from its entry or its last pick on q,
//! at pass `P_i` (at most `vt_q + s_i`, `s = floor(1e6 / weight)`). Until
//! i is picked again, a claim that lists q picks another tenant u on a
//! queue q' only at a pass `<= P_i`; u's passes on q' start at or above
//! `vt_q'` (as it was then) and grow by `s_u` with each pick there. So the
//! check is: the picks of u on q' by claims listing q, while i waits, stay
//! at most `floor((P_i - vt_q') / s_u) + 1`. When q' is q, or a queue whose
//! virtual time is not behind q's, that is at most `floor(s_i / s_u) + 1`:
//! one round of u's share per round of i's, per queue u waits on. A pick
//! of i on another listed queue moves its pass on q without setting it
//! back to `vt_q`, and a weight change changes strides: i's count pauses
//! until its next pick on q.
//!
//! The bound lets u have more than one round when q' lags q: virtual time
//! is per queue, so a pool serving only q moves `vt_q` and leaves `vt_q'`
//! behind, and a pool serving both then picks tenants of q' first, for as
//! many picks as the gap allows. `Tracker::worst` records the largest
//! excess over one round seen (the simulation prints it), and
//! `AGENTQ_SIM_STRICT_FAIRNESS=1` makes any excess a failure, to shrink a
//! case or to check a fix (issue 12).

use std::collections::{BTreeMap, BTreeSet};

use super::model::Model;
use super::ops::Op;
use super::snapshot::Snapshot;
use super::world::{ClaimSeen, Failure, PickSeen, World, ensure};

/// Passes and saved passes of one partition (None: not predicted).
#[derive(Clone, Debug, Default)]
struct Sched {
    pass: BTreeMap<String, BTreeMap<String, Option<f64>>>,
    saved: BTreeMap<String, BTreeMap<String, Option<f64>>>,
    vt: BTreeMap<String, Option<f64>>,
    /// The highest pass a claim picked at, for each queue it listed.
    raised: BTreeMap<String, f64>,
}

fn num(v: &str) -> f64 {
    v.parse().expect("number")
}

impl Sched {
    fn load(m: &Model, s: &Snapshot) -> Sched {
        let qvt = s.hash("qvt");
        let mut out = Sched::default();
        for q in &m.queues {
            let pass = s
                .zset(&format!("q:{q}:sched"))
                .into_iter()
                .map(|(t, v)| (t, Some(v)))
                .collect();
            let saved = s
                .hash(&format!("q:{q}:pass"))
                .into_iter()
                .map(|(t, v)| (t, Some(num(&v))))
                .collect();
            out.pass.insert(q.clone(), pass);
            out.saved.insert(q.clone(), saved);
            out.vt.insert(q.clone(), qvt.get(q).map(|v| num(v)));
        }
        out
    }

    fn member(&self, q: &str, t: &str) -> bool {
        self.pass[q].contains_key(t)
    }

    fn enter(&mut self, q: &str, t: &str, stride: i64) {
        let owed = self.saved.get_mut(q).expect("queue").remove(t);
        let p = self.vt[q].and_then(|vt| match owed {
            None => Some(vt),
            Some(None) => None,
            Some(Some(o)) => Some(o.max(vt).min(vt + stride as f64)),
        });
        self.pass
            .get_mut(q)
            .expect("queue")
            .insert(t.to_string(), p);
    }

    fn leave(&mut self, q: &str, t: &str) {
        let Some(s) = self.pass.get_mut(q).expect("queue").remove(t) else {
            return;
        };
        let saved = self.saved.get_mut(q).expect("queue");
        match (s, self.vt[q]) {
            (Some(s), Some(vt)) if s > vt => {
                saved.insert(t.to_string(), Some(s));
            }
            (Some(_), Some(_)) => {}
            _ => {
                saved.insert(t.to_string(), None);
            }
        }
    }

    /// Compare with the state Redis holds after the step.
    fn matches(&self, m: &Model, s: &Snapshot) -> Result<(), Failure> {
        let qvt = s.hash("qvt");
        for q in &m.queues {
            let got = s.zmap(&format!("q:{q}:sched"));
            let want = &self.pass[q];
            let (gk, wk): (BTreeSet<&String>, BTreeSet<&String>) =
                (got.keys().collect(), want.keys().collect());
            ensure!(
                gk == wk,
                "sched replay",
                "{q}'s sched set holds {gk:?}, the replay {wk:?}"
            );
            for (t, p) in want {
                ensure!(
                    p.is_none_or(|p| p == got[t]),
                    "sched replay",
                    "{t} on {q} has pass {}, the replay says {p:?} (vt {:?})",
                    got[t],
                    self.vt[q]
                );
            }
            if let Some(v) = self.vt[q] {
                let g = qvt.get(q).map(|x| num(x));
                ensure!(
                    g == Some(v),
                    "sched replay",
                    "{q}'s virtual time is {g:?}, the replay says {v}"
                );
            }
            // A saved pass not ahead of vt is the same as none (entry
            // clamps it up to vt, and vt never falls); the claim script may
            // save one mid-claim, when a tenant that ran dry leaves early.
            let vt_now = qvt.get(q).map(|x| num(x));
            let ahead = |v: f64| vt_now.is_none_or(|vt| v > vt);
            let saved: BTreeMap<String, f64> = s
                .hash(&format!("q:{q}:pass"))
                .into_iter()
                .map(|(t, v)| (t, num(&v)))
                .filter(|(_, v)| ahead(*v))
                .collect();
            for (t, g) in &saved {
                ensure!(
                    self.saved[q].contains_key(t),
                    "sched replay",
                    "{t} has a saved pass {g} on {q} the replay does not (vt {vt_now:?})"
                );
            }
            for (t, v) in &self.saved[q] {
                let g = saved.get(t).copied();
                ensure!(
                    v.is_none_or(|v| g == Some(v).filter(|v| ahead(*v))),
                    "sched replay",
                    "{t}'s saved pass on {q} is {g:?}, the replay says {v:?} (vt {vt_now:?})"
                );
            }
        }
        Ok(())
    }
}

/// After a claim, every queue it listed has a written virtual time at
/// least as high as the passes it picked at (README: a pick at pass e
/// raises the virtual time of every listed queue to e).
fn raised(s: &Sched, after: &Snapshot) -> Result<(), Failure> {
    let qvt = after.hash("qvt");
    for (q, e) in &s.raised {
        let got = qvt.get(q).map(|v| num(v));
        ensure!(
            got.is_some_and(|v| v >= *e),
            "virtual time raised",
            "the claim picked at pass {e} but {q}'s virtual time is {got:?}"
        );
    }
    Ok(())
}

/// The fairness count of one tenant i waiting on one queue (module doc).
#[derive(Clone, Debug, Default)]
struct Wait {
    /// i's pass on the queue since its entry or last pick there (None: not
    /// predicted, no bound).
    pass: Option<f64>,
    /// Every queue's virtual time at that moment (None: never written).
    vts: BTreeMap<String, Option<f64>>,
    /// Picks of each other tenant u on each queue q' since then.
    picks: BTreeMap<(String, String), i64>,
    /// False while the bound does not apply (see the module doc).
    active: bool,
}

/// The most picks past one round seen (see `Tracker::worst`).
#[derive(Clone, Debug, Default)]
pub struct Excess {
    pub picks: i64,
    pub what: String,
}

#[derive(Default)]
pub struct Tracker {
    /// (partition, queue, tenant) -> its count.
    waits: BTreeMap<(u32, String, String), Wait>,
    /// The largest count past `floor(s_i / s_u) + 1` on one queue: what
    /// virtual-time drift between queues cost a waiting tenant.
    pub worst: Excess,
    /// How many picks were counted against a waiting tenant's bound.
    pub counted: u64,
    /// Fail on any excess over one round: always for pools that do not
    /// overlap, where README promises the bound; for overlapping pools only
    /// with `AGENTQ_SIM_STRICT_FAIRNESS=1` (max-min across pools there).
    strict_fairness: bool,
    /// Check that a claim writes every listed queue's virtual time up to
    /// its picks, and count picks on queues without a written virtual time
    /// against the bound (always on since defect D1 was fixed).
    strict_vt: bool,
}

impl Tracker {
    pub fn new(strict_fairness: bool, strict_vt: bool) -> Tracker {
        Tracker {
            strict_fairness,
            strict_vt,
            ..Default::default()
        }
    }

    pub fn step(
        &mut self,
        w: &World,
        before: &[Snapshot],
        after: &[Snapshot],
    ) -> Result<(), Failure> {
        let m = &w.model;
        for p in 0..m.parts {
            let mut s = Sched::load(m, &before[p as usize]);
            self.refresh(p, &s);
            match w.claim.as_ref().filter(|c| c.part == p) {
                Some(c) => self.claim(m, p, c, &mut s)?,
                None => self.quiet(m, p, &mut s, &after[p as usize]),
            }
            s.matches(m, &after[p as usize])?;
            if self.strict_vt {
                raised(&s, &after[p as usize])?;
            }
            self.forget_left(p, &s);
        }
        if let Some(Op::TenantSet { fields, .. }) = &w.last_op
            && fields.iter().any(|(f, _)| *f == "weight")
        {
            for wait in self.waits.values_mut() {
                wait.active = false;
            }
        }
        Ok(())
    }

    /// A step that is not a claim only lets tenants in and out.
    fn quiet(&mut self, m: &Model, p: u32, s: &mut Sched, after: &Snapshot) {
        for q in &m.queues {
            let now: BTreeSet<String> = after.zmap(&format!("q:{q}:sched")).into_keys().collect();
            let was: Vec<String> = s.pass[q].keys().cloned().collect();
            for t in was.iter().filter(|t| !now.contains(*t)) {
                s.leave(q, t);
            }
            let new: Vec<&String> = now.iter().filter(|t| !s.member(q, t)).collect();
            for t in new {
                s.enter(q, t, m.limits(t).stride());
                self.start(p, q, t, s);
            }
        }
    }

    /// i's count on q starts over: it just entered or was picked there.
    fn start(&mut self, p: u32, q: &str, t: &str, s: &Sched) {
        let wait = Wait {
            pass: s.pass[q].get(t).copied().flatten(),
            vts: s.vt.clone(),
            picks: BTreeMap::new(),
            active: true,
        };
        self.waits.insert((p, q.to_string(), t.to_string()), wait);
    }

    /// A count that does not apply (paused, or its pass not predicted)
    /// starts over from the pass Redis holds now: the bound holds from any
    /// moment, as long as i is not picked and no stride changes.
    fn refresh(&mut self, p: u32, s: &Sched) {
        for (q, members) in &s.pass {
            for t in members.keys() {
                let key = (p, q.clone(), t.clone());
                if self
                    .waits
                    .get(&key)
                    .is_none_or(|w| !w.active || w.pass.is_none())
                {
                    self.start(p, q, t, s);
                }
            }
        }
    }

    fn forget_left(&mut self, p: u32, s: &Sched) {
        self.waits
            .retain(|(wp, q, t), _| *wp != p || s.member(q, t));
    }

    fn claim(&mut self, m: &Model, p: u32, c: &ClaimSeen, s: &mut Sched) -> Result<(), Failure> {
        let open: Vec<&String> = c
            .pool
            .iter()
            .filter(|q| !m.paused[p as usize].contains(&format!("q:{q}")))
            .collect();
        for t in &c.woken {
            let ok = c.start_ok.get(t).copied().unwrap_or(false);
            for q in c.start_ready.get(t).into_iter().flatten() {
                if ok && !m.is_paused(p, q, t) {
                    if !s.member(q, t) {
                        s.enter(q, t, m.limits(t).stride());
                        self.start(p, q, t, s);
                    }
                } else {
                    s.leave(q, t);
                }
            }
        }
        for (n, pk) in c.picks.iter().enumerate() {
            let (q, t) = (&pk.queue, &pk.tenant);
            let Some(e) = s.pass[q].get(t).copied() else {
                return Err(super::world::fail(
                    "sched replay",
                    format!("pick {n}: {t} on {q} is not in the sched set"),
                ));
            };
            if let Some(e) = e {
                for (eq, u) in &pk.eligible {
                    let pu = s.pass[eq].get(u).copied();
                    ensure!(
                        pu.is_some(),
                        "sched replay",
                        "pick {n}: {u} could start on {eq} but is not in its sched set"
                    );
                    ensure!(
                        pu.flatten().is_none_or(|pu| e <= pu),
                        "lowest pass first",
                        "pick {n} took {t} on {q} at pass {e}, but {u} waits on {eq} at {pu:?}"
                    );
                }
            }
            for lq in &c.pool {
                if let Some(e) = e {
                    let r = s.raised.entry(lq.clone()).or_insert(e);
                    *r = r.max(e);
                }
                let vt = s.vt.get_mut(lq).expect("queue");
                *vt = match (*vt, e) {
                    (Some(v), Some(e)) => Some(v.max(e)),
                    _ => None,
                };
            }
            let stride = m.limits(t).stride() as f64;
            for lq in &open {
                if let Some(p) = s.pass.get_mut(lq.as_str()).expect("queue").get_mut(t) {
                    *p = p.map(|p| p + stride);
                }
            }
            if pk.dry {
                // It stays in the set without work until the script finds
                // the entry empty, at a moment the replay does not predict
                // (picks of it elsewhere may or may not move it here).
                s.pass
                    .get_mut(q.as_str())
                    .expect("queue")
                    .insert(t.clone(), None);
            }
            self.count_pick(m, p, &open, pk, s)?;
        }
        let picked: BTreeSet<(&String, &String)> =
            c.picks.iter().map(|pk| (&pk.queue, &pk.tenant)).collect();
        for (q, t) in &picked {
            if m.ready_of(q, t).is_empty() {
                s.leave(q, t);
            }
        }
        for (_, t) in &picked {
            if m.hold(t).is_some() {
                for q in &m.queues {
                    s.leave(q, t);
                }
            }
        }
        Ok(())
    }

    /// The fairness count for a pick of `t` on `q` by a claim over `open`
    /// (after the replay applied it to `s`).
    fn count_pick(
        &mut self,
        m: &Model,
        p: u32,
        open: &[&String],
        pk: &PickSeen,
        s: &Sched,
    ) -> Result<(), Failure> {
        let (q, t) = (pk.queue.as_str(), pk.tenant.as_str());
        let s_u = m.limits(t).stride() as f64;
        let mut restart = false;
        for ((wp, wq, i), wait) in self.waits.iter_mut() {
            if *wp != p || !open.contains(&wq) {
                continue;
            }
            if i == t {
                // A pick elsewhere moves i's pass here past vt + s_i.
                wait.active = false;
                restart |= wq == q;
                continue;
            }
            // Only while i could be picked (a pick may have just put it at
            // its cap or rate; it leaves the set when the claim ends).
            let could = pk.eligible.iter().any(|(eq, et)| eq == wq && et == i);
            let (true, true, Some(p_i)) = (wait.active, could, wait.pass) else {
                continue;
            };
            // A queue whose virtual time was never written (before D1's
            // fix, picks at its head's pass left it so) is left out only
            // when the strict check is off.
            let written = wait.vts.get(q).copied().flatten();
            if written.is_none() && !self.strict_vt {
                continue;
            }
            self.counted += 1;
            let n = *wait
                .picks
                .entry((t.to_string(), q.to_string()))
                .and_modify(|n| *n += 1)
                .or_insert(1);
            let vt = written.unwrap_or(0.0);
            let bound = ((p_i - vt) / s_u).floor() as i64 + 1;
            ensure!(
                n <= bound,
                "fairness: within one round",
                "{i} has waited on {wq} (pass {p_i}) while {t} was picked {n} times on {q} (virtual time {vt} \
                 then): the bound is floor((pass - vt) / s_{t}) + 1 = {bound}; picks waited through: {:?}",
                wait.picks
            );
            // Past what u would get with its passes on q itself: picks
            // owed to q' lagging behind q.
            let own = wait.vts.get(wq).copied().flatten().unwrap_or(0.0);
            let round = ((p_i - own) / s_u).floor() as i64 + 1;
            ensure!(
                !self.strict_fairness || n <= round,
                "fairness: one round (strict)",
                "{i} has waited on {wq} (pass {p_i}, virtual time {own}) while {t} was picked {n} times \
                 on {q} (virtual time {vt}): more than the {round} its passes on {wq} would allow"
            );
            if n - round > self.worst.picks {
                self.worst = Excess {
                    picks: n - round,
                    what: format!(
                        "{i} waiting on {wq} at pass {p_i} saw {t} picked {n} times on {q}, \
                         {round} by {wq}'s virtual time {own}; {q}'s was {vt}"
                    ),
                };
            }
        }
        if restart {
            self.start(p, q, t, s);
        }
        Ok(())
    }
}
