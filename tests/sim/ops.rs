//! The operations the simulation runs, and their random generation.
//!
//! An operation names tenants, queues and workers by index into the run's
//! setup, and jobs and leases by raw selectors that are resolved against the
//! model when the step runs (`sel % candidates`): generation needs no state,
//! and a shrunk sequence (some steps removed) still runs, each step picking
//! among what exists then.

use super::rng::Rng;

/// A job of an enqueue batch.
#[derive(Clone, Debug)]
pub struct Spec {
    pub tenant: usize,
    pub queue: usize,
    pub delay_ms: u64,
    pub priority: i32,
    pub max_attempts: Option<u32>,
    pub idem: Option<u8>,
    pub timeout_ms: Option<u64>,
}

/// One attempt named by a completion, extension or release: a live lease
/// of the partition, or (`stale`) an attempt already closed.
#[derive(Clone, Copy, Debug)]
pub struct Pick {
    pub sel: u32,
    pub stale: bool,
}

#[derive(Clone, Debug)]
pub enum Op {
    Enqueue(Vec<Spec>),
    Claim {
        part: usize,
        worker: usize,
        /// One of the run's worker pools (`Setup::pools`).
        pool: usize,
        batch: usize,
        lease_ms: u64,
    },
    /// The worker's last claim on the partition, repeated with its call id
    /// (a retry after a lost reply).
    ClaimAgain {
        part: usize,
        worker: usize,
    },
    Complete {
        part: usize,
        worker: usize,
        picks: Vec<Pick>,
        outcome: usize,
        permanent: bool,
        backoff_ms: u64,
        run_ms: u64,
    },
    CompleteAgain {
        part: usize,
        worker: usize,
    },
    Extend {
        part: usize,
        picks: Vec<Pick>,
        lease_ms: u64,
    },
    Reap {
        part: usize,
        max: usize,
    },
    Release {
        part: usize,
        worker: usize,
        picks: Vec<Pick>,
        run_ms: u64,
    },
    ReleaseAgain {
        part: usize,
        worker: usize,
    },
    Pause {
        queue: usize,
        tenant: Option<usize>,
        on: bool,
    },
    /// Set (Some) or reset (None) limit fields of a tenant.
    TenantSet {
        tenant: usize,
        fields: Vec<(&'static str, Option<u64>)>,
    },
    Cancel {
        job: u32,
    },
    Dead {
        retry: bool,
        queue: usize,
        tenant: Option<usize>,
        /// Some: these dead jobs (selectors); None: all that match.
        jobs: Option<Vec<u32>>,
        older_ms: u64,
    },
    Purge {
        queue: usize,
    },
    RaiseUsage {
        tenant: usize,
        ms: u64,
    },
    Advance {
        ms: u64,
    },
}

/// Outcomes a completion may report (every one the executor knows).
pub const OUTCOMES: [&str; 5] = [
    "succeeded",
    "failed",
    "timed_out",
    "memory_exceeded",
    "lost",
];

/// Rates whose emission interval (period / rate) is a whole number of ms,
/// so the model's GCRA is exact: (rate, rate_period_ms); rate 0 = none.
const RATES: [(u64, u64); 5] = [(0, 1000), (1, 1000), (2, 1000), (5, 1000), (1, 5000)];

/// The shape of a run: how many of each name, picked by the run's seed.
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    pub tenants: usize,
    pub queues: usize,
    pub workers: usize,
    pub parts: usize,
    pub pools: usize,
    /// The run is a busy fleet (see `Op::generate`).
    pub busy: bool,
}

fn picks(rng: &mut Rng, most: usize, stale_pct: u64) -> Vec<Pick> {
    (0..1 + rng.below(most))
        .map(|_| Pick {
            sel: rng.sel(),
            stale: rng.chance(stale_pct),
        })
        .collect()
}

fn spec(rng: &mut Rng, s: Sizes) -> Spec {
    Spec {
        tenant: rng.below(s.tenants),
        queue: rng.below(s.queues),
        delay_ms: if rng.chance(25) {
            rng.pick(&[100, 1000, 30_000])
        } else {
            0
        },
        priority: if rng.chance(25) {
            rng.pick(&[-5, 10])
        } else {
            0
        },
        max_attempts: if rng.chance(50) {
            Some(rng.pick(&[1, 2, 5]))
        } else {
            None
        },
        idem: rng.chance(20).then(|| rng.below(3) as u8),
        timeout_ms: if rng.chance(10) {
            Some(rng.pick(&[1000, 7_200_000]))
        } else {
            None
        },
    }
}

fn tenant_fields(rng: &mut Rng, busy: bool) -> Vec<(&'static str, Option<u64>)> {
    let mut f = Vec::new();
    if busy {
        f.push(("weight", Some(rng.pick(&[1, 2, 3, 5]))));
        f.push(("max_concurrency", Some(rng.pick(&[3, 10, 50]))));
        return f;
    }
    let reset = |rng: &mut Rng| rng.chance(15);
    if rng.chance(50) {
        f.push((
            "max_concurrency",
            (!reset(rng)).then(|| rng.pick(&[1, 2, 3, 10])),
        ));
    }
    if rng.chance(50) {
        f.push(("weight", (!reset(rng)).then(|| rng.pick(&[1, 2, 3, 5]))));
    }
    if rng.chance(20) {
        let (rate, period) = rng.pick(&RATES);
        f.push(("rate", Some(rate)));
        f.push(("rate_period_ms", Some(period)));
    }
    if rng.chance(25) {
        f.push(("burst", (!reset(rng)).then(|| rng.pick(&[0, 1, 2, 4]))));
    }
    if rng.chance(15) {
        f.push((
            "quota_ms",
            (!reset(rng)).then(|| rng.pick(&[0, 500, 2000, 10_000])),
        ));
    }
    if rng.chance(15) {
        f.push((
            "max_timeout_ms",
            (!reset(rng)).then(|| rng.pick(&[1000, 7_200_000])),
        ));
    }
    if f.is_empty() {
        f.push(("max_concurrency", Some(rng.pick(&[1, 2, 3]))));
    }
    f
}

/// A nonempty list of distinct queues, in random order.
pub fn pool(rng: &mut Rng, queues: usize) -> Vec<usize> {
    let mut all: Vec<usize> = (0..queues).collect();
    for i in (1..all.len()).rev() {
        all.swap(i, rng.below(i + 1));
    }
    all.truncate(1 + rng.below(queues));
    all
}

impl Op {
    /// A random operation; the mix favours the busy paths (enqueue, claim,
    /// complete, time) and visits every script.
    pub fn generate(rng: &mut Rng, s: Sizes) -> Op {
        let part = rng.below(s.parts);
        let worker = rng.below(s.workers);
        let roll = if s.busy {
            // A busy fleet: enqueue (25%), claim (30%), complete (25%),
            // reap, weight and cap changes, time; long backlogs, many picks.
            rng.pick(&[
                0, 0, 0, 0, 0, 22, 22, 22, 22, 22, 22, 42, 42, 42, 42, 42, 62, 73, 90, 90,
            ])
        } else {
            rng.below(100)
        };
        match roll {
            0..=21 => Op::Enqueue((0..1 + rng.below(6)).map(|_| spec(rng, s)).collect()),
            22..=39 => Op::Claim {
                part,
                worker,
                pool: rng.below(s.pools),
                batch: rng.pick(&[0, 1, 1, 2, 3, 4]),
                lease_ms: rng.pick(&[1000, 5000, 30_000]),
            },
            40..=41 => Op::ClaimAgain { part, worker },
            42..=56 => Op::Complete {
                part,
                worker,
                picks: picks(rng, 3, 10),
                outcome: if rng.chance(60) { 0 } else { 1 + rng.below(4) },
                permanent: rng.chance(10),
                backoff_ms: rng.pick(&[0, 0, 100, 5000]),
                run_ms: rng.pick(&[0, 1, 50, 300, 1000]),
            },
            57 => Op::CompleteAgain { part, worker },
            58..=61 => Op::Extend {
                part,
                picks: picks(rng, 3, 10),
                lease_ms: rng.pick(&[1000, 5000, 30_000]),
            },
            62..=65 => Op::Reap {
                part,
                max: rng.pick(&[1, 2, 100]),
            },
            66..=67 => Op::Release {
                part,
                worker,
                picks: picks(rng, 2, 10),
                run_ms: rng.pick(&[0, 20, 400]),
            },
            68 => Op::ReleaseAgain { part, worker },
            69..=72 => Op::Pause {
                queue: rng.below(s.queues),
                tenant: rng.chance(50).then(|| rng.below(s.tenants)),
                on: rng.chance(35),
            },
            73..=78 => Op::TenantSet {
                tenant: rng.below(s.tenants),
                fields: tenant_fields(rng, s.busy),
            },
            79..=80 => Op::Cancel { job: rng.sel() },
            81..=83 => Op::Dead {
                retry: rng.chance(65),
                queue: rng.below(s.queues),
                tenant: rng.chance(40).then(|| rng.below(s.tenants)),
                jobs: rng
                    .chance(40)
                    .then(|| (0..1 + rng.below(2)).map(|_| rng.sel()).collect()),
                older_ms: rng.pick(&[0, 0, 1000]),
            },
            84 => Op::Purge {
                queue: rng.below(s.queues),
            },
            85 => Op::RaiseUsage {
                tenant: rng.below(s.tenants),
                ms: rng.pick(&[100, 1000, 20_000]),
            },
            _ => Op::Advance {
                ms: rng.pick(&[1, 50, 200, 1000, 1000, 5000, 60_000, 600_000, 3_600_000]),
            },
        }
    }
}
