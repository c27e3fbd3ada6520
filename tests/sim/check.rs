//! The invariants, checked against the whole Redis state of every
//! partition after every step (see the list in tests/sim.rs).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::model::{Job, Model, St};
use super::snapshot::Snapshot;
use super::world::{ClaimSeen, Failure, ensure, fail};

/// Where a job id appears among the partition's indexes: (index, score).
type Places = BTreeMap<String, Vec<(String, f64)>>;

/// Every index a job id can be in: ready sets, delayed, dead (queue-wide
/// and per tenant) and the leases.
fn places(s: &Snapshot) -> Places {
    let mut at: Places = BTreeMap::new();
    for (key, _) in s.keys.iter() {
        let parts: Vec<&str> = key.split(':').collect();
        let index = match parts.as_slice() {
            ["q", _, "t", _] | ["q", _, "delayed"] | ["q", _, "dead"] | ["q", _, "dt", _] => {
                key.clone()
            }
            ["leases"] => key.clone(),
            _ => continue,
        };
        for (id, score) in s.zset(key) {
            at.entry(id).or_default().push((index.clone(), score));
        }
    }
    at
}

/// The indexes (and scores) a job in this state must be in, and no other.
fn expected_places(j: &Job) -> Vec<(String, f64)> {
    let (q, t) = (&j.queue, &j.tenant);
    let mut v = match j.state {
        St::Ready => vec![(format!("q:{q}:t:{t}"), j.score as f64)],
        St::Delayed { run_at } => vec![(format!("q:{q}:delayed"), run_at as f64)],
        St::Running => vec![("leases".to_string(), j.lease as f64)],
        St::Dead { at } => vec![
            (format!("q:{q}:dead"), at as f64),
            (format!("q:{q}:dt:{t}"), at as f64),
        ],
        St::Succeeded | St::Cancelled | St::Gone => vec![],
    };
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn field_num(h: &BTreeMap<String, String>, f: &str) -> i64 {
    h.get(f).map_or(0, |v| v.parse().expect("integer field"))
}

/// Each job's hash says what the model says, and the job sits in exactly
/// the index of its state (so in exactly one state), with the right score.
pub fn jobs(m: &Model, p: u32, s: &Snapshot) -> Result<(), Failure> {
    let mut at = places(s);
    for j in m.jobs.iter().filter(|j| j.part == p) {
        let h = s.hash(&format!("job:{}", j.id));
        if j.state == St::Gone {
            ensure!(
                h.is_empty(),
                "job state",
                "{} was purged but its hash is {h:?}",
                j.id
            );
        } else {
            let state = h.get("state").map_or("(no hash)", |s| s.as_str());
            ensure!(
                state == j.state.name(),
                "job state",
                "{}: Redis says {state}, model {:?}",
                j.id,
                j.state
            );
            let (attempts, base) = (field_num(&h, "attempts"), field_num(&h, "base"));
            ensure!(
                attempts == i64::from(j.attempts) && base == i64::from(j.base),
                "job attempts",
                "{}: Redis attempts {attempts} base {base}, model {} {}",
                j.id,
                j.attempts,
                j.base
            );
            if j.state == St::Running {
                let w = h.get("worker").cloned().unwrap_or_default();
                ensure!(
                    w == j.worker,
                    "job worker",
                    "{}: worker {w}, model {}",
                    j.id,
                    j.worker
                );
                // A cancelled running attempt is marked on its hash.
                let mark = field_num(&h, "cancel");
                ensure!(
                    mark == i64::from(j.cancel),
                    "cancel mark",
                    "{}: cancel mark {mark}, model {}",
                    j.id,
                    j.cancel
                );
            }
        }
        let mut got = at.remove(&j.id).unwrap_or_default();
        got.sort_by(|a, b| a.0.cmp(&b.0));
        let want = expected_places(j);
        ensure!(
            got == want,
            "job in exactly one state",
            "{} ({:?}) is in {got:?}, want {want:?}",
            j.id,
            j.state
        );
    }
    ensure!(
        at.is_empty(),
        "job in exactly one state",
        "ids the model does not know in indexes: {at:?}"
    );
    // Every job id takes a sequence number: none was made behind the
    // model's back (the model reads only the job hashes it knows).
    let seq: u64 = s.string("seq").map_or(0, |v| v.parse().expect("seq"));
    ensure!(
        seq == m.seq(p),
        "job state",
        "B:seq = {seq}, the model numbered {}",
        m.seq(p)
    );
    Ok(())
}

/// B:running equals the live leases of each tenant; the queue counters
/// equal what they count; B:tq lists the queues with ready work.
pub fn counters(m: &Model, p: u32, s: &Snapshot) -> Result<(), Failure> {
    let running = s.hash("running");
    let mine: Vec<&String> = m.tenants.iter().filter(|t| m.part_of(t) == p).collect();
    for t in &mine {
        let r = field_num(&running, t);
        let live = m.running(t) as i64;
        ensure!(
            r == live,
            "running count",
            "B:running[{t}] = {r}, live leases {live}"
        );
    }
    let tq = s.hash("tq");
    for t in &mine {
        let got: BTreeSet<&str> = tq
            .get(*t)
            .map_or(BTreeSet::new(), |v| v.split(' ').collect());
        let want: BTreeSet<&str> = m
            .queues
            .iter()
            .filter(|q| !m.ready_of(q, t).is_empty())
            .map(|q| q.as_str())
            .collect();
        ensure!(
            got == want,
            "tenant queues",
            "B:tq[{t}] = {got:?}, ready work on {want:?}"
        );
    }
    for q in &m.queues {
        let stats = s.hash(&format!("q:{q}:stats"));
        let in_q: Vec<&Job> = m
            .jobs
            .iter()
            .filter(|j| j.part == p && &j.queue == q)
            .collect();
        let count = |f: &dyn Fn(&Job) -> bool| in_q.iter().filter(|j| f(j)).count() as i64;
        let mut want: BTreeMap<String, i64> = BTreeMap::new();
        want.insert("ready".into(), count(&|j| j.state == St::Ready));
        want.insert("running".into(), count(&|j| j.state == St::Running));
        want.insert(
            "delayed".into(),
            count(&|j| matches!(j.state, St::Delayed { .. })),
        );
        want.insert(
            "dead".into(),
            count(&|j| matches!(j.state, St::Dead { .. })),
        );
        for t in &mine {
            let delayed = count(&|j| &&j.tenant == t && matches!(j.state, St::Delayed { .. }));
            let dead = count(&|j| &&j.tenant == t && matches!(j.state, St::Dead { .. }));
            want.insert(format!("delayed:{t}"), delayed);
            want.insert(format!("dead:{t}"), dead);
        }
        for (f, w) in &want {
            let got = field_num(&stats, f);
            ensure!(
                got == *w,
                "queue counters",
                "B:q:{q}:stats {f} = {got}, the sets hold {w}"
            );
        }
    }
    Ok(())
}

/// A tenant is in a sched set exactly when it has ready work there, is not
/// paused there and may start a job (cap, quota, rate). Time alone only
/// lifts holds, and a claim re-admits tenants whose hold has lapsed: until
/// the partition's next claim, such a tenant waits in B:throttled with a
/// score that is due.
pub fn admission(m: &Model, p: u32, s: &Snapshot, claimed_here: bool) -> Result<(), Failure> {
    let held = s.hash("held");
    let throttled = s.zmap("throttled");
    let held_names: BTreeSet<&String> = held.keys().collect();
    let throttled_names: BTreeSet<&String> = throttled.keys().collect();
    ensure!(
        held_names == throttled_names,
        "holds",
        "B:held {held:?} vs B:throttled {throttled:?}"
    );
    let now = m.now as f64;
    for (t, reason) in &held {
        let until = throttled[t];
        ensure!(
            !(claimed_here && until <= now),
            "holds",
            "after a claim, {t} is still held ({reason}) until {until}, which is due (now {now})"
        );
        if until > now {
            let real = m.hold(t);
            ensure!(
                real == Some(reason.as_str()),
                "holds",
                "{t} held by {reason} until {until}, but the model says {real:?}"
            );
            let want = match reason.as_str() {
                "rate" => {
                    let (_, tau) = m.limits(t).gcra();
                    (m.tat.get(t.as_str()).copied().unwrap_or(0) - tau) as f64
                }
                _ => next_month(m.now) as f64,
            };
            ensure!(
                until == want,
                "holds",
                "{t} held by {reason} until {until}, want {want}"
            );
        }
    }
    for q in &m.queues {
        let sched = s.zmap(&format!("q:{q}:sched"));
        for t in sched.keys() {
            ensure!(
                m.tenants.contains(t) && m.part_of(t) == p,
                "sched membership",
                "stranger {t} in {q}'s sched set"
            );
        }
        for t in m.tenants.iter().filter(|t| m.part_of(t) == p) {
            let ready = !m.ready_of(q, t).is_empty();
            let paused = m.is_paused(p, q, t);
            let hold = m.hold(t);
            let want = ready && !paused && hold.is_none();
            let member = sched.contains_key(t);
            let lapsed = throttled.get(t).is_some_and(|&u| u <= now);
            ensure!(
                member == want || (want && lapsed),
                "sched membership",
                "{t} on {q}: in sched {member}, but ready {ready}, paused {paused}, held {hold:?} \
                 (B:held {:?}, running {}, limits {:?})",
                held.get(t),
                m.running(t),
                m.limits(t)
            );
        }
    }
    Ok(())
}

/// The start of the month after the one `ms` is in (UTC).
fn next_month(ms: i64) -> i64 {
    use chrono::{Datelike, TimeZone};
    let d = chrono::DateTime::from_timestamp_millis(ms).expect("time");
    let (y, mo) = if d.month() == 12 {
        (d.year() + 1, 1)
    } else {
        (d.year(), d.month() + 1)
    };
    chrono::Utc
        .with_ymd_and_hms(y, mo, 1, 0, 0, 0)
        .single()
        .expect("month start")
        .timestamp_millis()
}

/// B:qw is the weight of each sched set; scores never below the queue's
/// virtual time, which never goes back; saved passes only for tenants
/// outside the set. Steps other than claims move no score, and a tenant
/// they let in enters within one stride of the virtual time.
pub fn passes(m: &Model, s: &Snapshot, before: &Snapshot, claim: bool) -> Result<(), Failure> {
    let qw = s.hash("qw");
    let vt = s.hash("qvt");
    let vt_before = before.hash("qvt");
    for q in &m.queues {
        let sched = s.zmap(&format!("q:{q}:sched"));
        let weight: f64 = sched.keys().map(|t| m.limits(t).weight as f64).sum();
        let got: f64 = qw.get(q).map_or(0.0, |v| v.parse().expect("qw"));
        ensure!(
            (got - weight).abs() < 1e-6,
            "admissible weight",
            "B:qw[{q}] = {got}, sched set weighs {weight}"
        );
        let v: Option<f64> = vt.get(q).map(|x| x.parse().expect("qvt"));
        let v_before: Option<f64> = vt_before.get(q).map(|x| x.parse().expect("qvt"));
        if let (Some(a), Some(b)) = (v_before, v) {
            ensure!(
                b >= a,
                "virtual time",
                "{q}'s virtual time went back from {a} to {b}"
            );
        }
        // Outside a claim it may only be written for the first time, at the
        // value it was read as: the lowest pass then in the set, or 0.
        let head_before = before
            .zmap(&format!("q:{q}:sched"))
            .values()
            .copied()
            .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.min(x))))
            .unwrap_or(0.0);
        let first_write = v_before.is_none() && v == Some(head_before);
        ensure!(
            claim || v == v_before || first_write,
            "virtual time",
            "{q}'s virtual time moved from {v_before:?} to {v:?} outside a claim"
        );
        if let Some(v) = v {
            for (t, score) in &sched {
                ensure!(
                    *score >= v,
                    "pass below virtual time",
                    "{t} on {q} at {score}, below the virtual time {v}"
                );
            }
        }
        for t in s.hash(&format!("q:{q}:pass")).keys() {
            ensure!(
                !sched.contains_key(t),
                "saved pass",
                "{t} is in {q}'s sched set and has a saved pass"
            );
        }
        if claim {
            continue;
        }
        let old: HashMap<String, f64> = before.zmap(&format!("q:{q}:sched"));
        for (t, score) in &sched {
            match old.get(t) {
                Some(was) => ensure!(
                    was == score,
                    "pass moved",
                    "{t} on {q} moved from {was} to {score} outside a claim"
                ),
                None => {
                    let lo = v.unwrap_or(0.0);
                    let hi = v.map_or(f64::MAX, |v| v + m.limits(t).stride() as f64);
                    ensure!(
                        (lo..=hi).contains(score),
                        "entry pass",
                        "{t} entered {q} at {score}, outside [{lo}, {hi}] (virtual time {v:?})"
                    );
                }
            }
        }
    }
    Ok(())
}

/// Rate and usage state: B:gcra as the model's GCRA, the usage counters as
/// the attempts charged, and over any run of starts since the tenant's rate
/// last changed, at most burst + W / interval starts in a window W.
pub fn limits(m: &Model, p: u32, s: &Snapshot) -> Result<(), Failure> {
    let gcra = s.hash("gcra");
    for t in m.tenants.iter().filter(|t| m.part_of(t) == p) {
        let got: Option<f64> = gcra.get(t).map(|v| v.parse().expect("tat"));
        let want = m.tat.get(t).map(|&v| v as f64);
        ensure!(
            got == want,
            "rate state",
            "B:gcra[{t}] = {got:?}, model {want:?}"
        );
        let usage = s.hash(&format!("usage:{t}"));
        for (month, v) in &usage {
            let want = m
                .usage
                .get(&(t.clone(), month.clone()))
                .copied()
                .unwrap_or(0);
            ensure!(
                field_num(&usage, month) == want,
                "usage",
                "B:usage:{t}[{month}] = {v}, model {want}"
            );
        }
        for ((ut, month), v) in &m.usage {
            ensure!(
                ut != t || field_num(&usage, month) == *v,
                "usage",
                "B:usage:{t}[{month}] missing, model {v}"
            );
        }
        let l = m.limits(t);
        let starts = m.starts.get(t).cloned().unwrap_or_default();
        if l.rate > 0
            && let Some(&last) = starts.last()
        {
            let (interval, tau) = l.gcra();
            let burst = tau / interval + 1;
            for (i, &s0) in starts.iter().enumerate() {
                let n = (starts.len() - i) as i64;
                ensure!(
                    n <= burst + (last - s0) / interval,
                    "rate exceeded",
                    "{t}: {n} starts in [{s0}, {last}] with rate {}/{} ms and burst {burst}",
                    l.rate,
                    l.period
                );
            }
        }
    }
    Ok(())
}

/// The new outbox records are exactly one per attempt the step closed.
pub fn outbox(m: &Model, p: u32, records: &[HashMap<String, String>]) -> Result<(), Failure> {
    let mut got: Vec<(String, u32, String, i64)> = records
        .iter()
        .map(|r| {
            let n = |f: &str| r.get(f).and_then(|v| v.parse::<i64>().ok()).unwrap_or(-1);
            (
                r["job"].clone(),
                n("attempt") as u32,
                r["outcome"].clone(),
                n("run_ms"),
            )
        })
        .collect();
    let mut want: Vec<(String, u32, String, i64)> = m
        .closes
        .iter()
        .filter(|c| m.job(&c.job).is_some_and(|j| j.part == p))
        .map(|c| (c.job.clone(), c.attempt, c.outcome.clone(), c.run_ms))
        .collect();
    got.sort();
    want.sort();
    ensure!(
        got == want,
        "one outbox record per attempt",
        "partition {p} outbox got {got:?}, attempts closed {want:?}"
    );
    Ok(())
}

/// The claim's "due in" and "weight left", judged by the state after it.
pub fn claim_reply(m: &Model, c: &ClaimSeen, s: &Snapshot) -> Result<(), Failure> {
    let throttled = s.zset("throttled");
    let first_held = throttled.iter().map(|(_, v)| *v as i64).min();
    let due = [c.delayed_due, first_held].into_iter().flatten().min();
    let want = due.map(|d| (d - m.now).max(1) as u64);
    let got = c.due_in.map(|d| d.as_millis() as u64);
    ensure!(
        got == want,
        "claim due",
        "claim said due in {got:?} ms, the state says {want:?}"
    );
    let qw = s.hash("qw");
    let paused = s.set("paused");
    let weight: f64 = c
        .pool
        .iter()
        .filter(|q| !paused.contains(&format!("q:{q}")))
        .map(|q| {
            qw.get(q)
                .map_or(0.0, |v| v.parse::<f64>().expect("qw"))
                .max(0.0)
        })
        .sum();
    ensure!(
        (c.weight - weight).abs() < 1e-6,
        "claim weight",
        "claim said weight {}, B:qw says {weight}",
        c.weight
    );
    Ok(())
}

/// B:paused holds what the model paused.
pub fn paused(m: &Model, p: u32, s: &Snapshot) -> Result<(), Failure> {
    let got = s.set("paused");
    let want = &m.paused[p as usize];
    if &got != want {
        return Err(fail(
            "paused",
            format!("B:paused = {got:?}, model {want:?}"),
        ));
    }
    Ok(())
}
