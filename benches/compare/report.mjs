#!/usr/bin/env node
// Side-by-side report of agentq, BullMQ (Node) and BullMQ's Rust port
// against issue 14's targets, with the Redis ceiling of the machine.
//
// Reads the rounds benches/compare/run wrote (COMPARE_IN, default
// target/bench/compare-run: round-<n>/bench/{agentq,bullmq,bullmq-rs}-*.json
// and ceiling.json); a dir without round-<n> subdirs is read as one round
// (e.g. target/bench after `cargo bench` and bullmq-bench.mjs). Every
// figure is the median over the rounds, with the spread (min–max) when
// there are several; every ratio is taken within each round (agentq
// against the best peer of that round) and then summarised the same way,
// and a verdict is the median ratio's, with the number of rounds that
// passed. Prints the tables and writes target/bench/compare.json and
// compare.md. A missing file shows as "not run"; it never fails the report.
//
//   node benches/compare/report.mjs

import { existsSync, readFileSync, readdirSync, writeFileSync, mkdirSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const REPO = path.resolve(HERE, '..', '..');
const OUT_DIR = process.env.BENCH_OUT_DIR || path.join(path.resolve(REPO, process.env.CARGO_TARGET_DIR || 'target'), 'bench');
const IN_DIR =
  process.env.COMPARE_IN || (existsSync(path.join(OUT_DIR, 'compare-run')) ? path.join(OUT_DIR, 'compare-run') : OUT_DIR);

const SYSTEMS = [
  { key: 'agentq', prefix: 'agentq', label: 'agentq' },
  { key: 'node', prefix: 'bullmq', label: 'BullMQ (Node)' },
  { key: 'rust', prefix: 'bullmq-rs', label: 'BullMQ (Rust)' },
];
const PEERS = SYSTEMS.filter((s) => s.key !== 'agentq');
const SCENARIOS = {
  agentq: ['throughput', 'latency', 'latency-peak', 'flood', 'tenants', 'process', 'footprint'],
  node: ['throughput', 'latency', 'latency-peak', 'flood', 'footprint'],
  rust: ['throughput', 'latency', 'latency-peak', 'footprint'],
};

// ---- input ---------------------------------------------------------------

function loadFile(file) {
  if (!existsSync(file)) return null;
  try {
    return JSON.parse(readFileSync(file, 'utf8'));
  } catch (e) {
    console.error(`${file}: not valid JSON (${e.message}); rerun that bench`);
    return null;
  }
}

/** The round dirs under IN_DIR, or IN_DIR itself as one round. */
function roundDirs() {
  const names = existsSync(IN_DIR) ? readdirSync(IN_DIR) : [];
  const rounds = names
    .map((n) => /^round-(\d+)$/.exec(n))
    .filter(Boolean)
    .map((m) => ({ n: Number(m[1]), dir: path.join(IN_DIR, m[0], 'bench') }))
    .filter((r) => existsSync(r.dir))
    .sort((a, b) => a.n - b.n);
  if (rounds.length) return rounds;
  // The layout before rounds (compare-run/bench), or a plain results dir.
  const sub = path.join(IN_DIR, 'bench');
  return [{ n: 1, dir: existsSync(sub) && !existsSync(path.join(IN_DIR, 'agentq-throughput.json')) ? sub : IN_DIR }];
}

const ROUNDS = roundDirs()
  .map(({ n, dir }) => {
    const r = { n, dir, ceiling: loadFile(path.join(dir, 'ceiling.json')) };
    for (const s of SYSTEMS) {
      r[s.key] = Object.fromEntries(SCENARIOS[s.key].map((sc) => [sc, loadFile(path.join(dir, `${s.prefix}-${sc}.json`))]));
    }
    return r;
  })
  .filter((r) => r.ceiling || SYSTEMS.some((s) => Object.values(r[s.key]).some(Boolean)));

// ---- numbers ---------------------------------------------------------------

const num = (x) => (typeof x === 'number' && Number.isFinite(x) ? x : null);
const fmt = (x, unit = '') => {
  if (num(x) === null) return 'not run';
  const digits = Math.abs(x) >= 100 ? 0 : Math.abs(x) >= 10 ? 1 : 2;
  return x.toLocaleString('en-US', { maximumFractionDigits: digits }) + unit;
};
const fmtRatio = (r) => (num(r) === null ? '-' : `${r.toFixed(r < 0.1 ? 3 : 2)}x`);
const fmtPct = (r) => (num(r) === null ? '-' : `${(r * 100).toFixed(1)}%`);

function median(xs) {
  const s = [...xs].sort((a, b) => a - b);
  const m = Math.floor(s.length / 2);
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

/** {median, min, max, n, values} of the numbers in `xs` (nulls dropped). */
function stats(xs) {
  const v = xs.map(num).filter((x) => x !== null);
  if (!v.length) return { median: null, min: null, max: null, n: 0, values: [] };
  return { median: median(v), min: Math.min(...v), max: Math.max(...v), n: v.length, values: v };
}

/** "median (min–max)" when there are several rounds, the value alone otherwise. */
function fmtStats(st, f = fmt) {
  if (!st || st.n === 0) return f(null);
  if (st.n === 1 || st.min === st.max) return f(st.median);
  return `${f(st.median)} (${f(st.min)}–${f(st.max)})`;
}

// ---- figures from one round --------------------------------------------------

function procRun(doc, concurrency, ledger) {
  return doc?.process?.find((p) => p.concurrency === concurrency && p.ledger === ledger) ?? null;
}
const procRate = (doc, c, ledger) => num(procRun(doc, c, ledger)?.jobs_per_s);
const redisUs = (doc, c, ledger, key = 'cpu') => num(procRun(doc, c, ledger)?.redis_us_per_job?.[key]);
const peakOf = (S) => num(S['latency-peak']?.peak_per_s) ?? num(S.latency?.peak_per_s);

const concurrencies = [
  ...new Set(
    ROUNDS.flatMap((R) => SYSTEMS.flatMap((s) => (R[s.key].throughput?.process ?? []).map((p) => p.concurrency))),
  ),
].sort((x, y) => x - y);
const agentqHasLedger = ROUNDS.some((R) => (R.agentq.throughput?.process ?? []).some((p) => p.ledger === true));

// ---- side-by-side rows ---------------------------------------------------------

/**
 * A row: `get(S, R)` gives a system's figure from its files S in round R;
 * `only` limits it to some systems (the rest show n/a). Higher is better
 * unless `lower`. Ratios are agentq against the best peer of each round,
 * oriented so that above 1 favours agentq.
 */
const rows = [];
function row(metric, get, { lower = false, only = null, unit = '', peerGet = null } = {}) {
  const has = (key) => !only || only.includes(key);
  const per = Object.fromEntries(
    SYSTEMS.map((s) => [
      s.key,
      ROUNDS.map((R) => (has(s.key) ? ((s.key !== 'agentq' && peerGet) || get)(R[s.key], R) : null)),
    ]),
  );
  const better = (a, b) => (lower ? a < b : a > b);
  const ratios = ROUNDS.map((_, i) => {
    const a = num(per.agentq[i]);
    const peers = PEERS.map((p) => num(per[p.key][i])).filter((x) => x !== null);
    if (a === null || !peers.length) return null;
    const best = peers.reduce((x, y) => (better(y, x) ? y : x));
    if (lower) return a > 0 ? best / a : null;
    return best > 0 ? a / best : null;
  });
  const st = Object.fromEntries(SYSTEMS.map((s) => [s.key, stats(per[s.key])]));
  const peerMedians = PEERS.filter((p) => st[p.key].n > 0);
  const bestPeer = peerMedians.length
    ? peerMedians.reduce((x, y) => (better(st[y.key].median, st[x.key].median) ? y : x))
    : null;
  const r = {
    metric,
    unit,
    lower_is_better: lower,
    na: SYSTEMS.filter((s) => !has(s.key)).map((s) => s.key),
    ...st,
    best_peer: bestPeer?.label ?? null,
    ratio: stats(ratios),
    ratio_per_round: ratios,
  };
  rows.push(r);
  return r;
}

const T = {}; // rows the targets read
T.enqueue = row('batch enqueue (jobs/s)', (S) => num(S.throughput?.enqueue_per_s));
for (const c of concurrencies) {
  T[`off${c}`] = row(`processing c=${c}, ledger off (jobs/s)`, (S) => procRate(S.throughput, c, false));
  if (agentqHasLedger) {
    T[`on${c}`] = row(
      `processing c=${c}, ledger on (jobs/s; peers have no ledger: their ledger-less figure)`,
      (S) => procRate(S.throughput, c, true),
      { peerGet: (S) => procRate(S.throughput, c, false) },
    );
  }
}
for (const c of concurrencies) {
  row(`Redis CPU per processed job, c=${c}, ledger off (µs, main thread)`, (S) => redisUs(S.throughput, c, false), {
    lower: true,
  });
}
T.peak = row('latency peak: single enqueues, 128 in flight, c=64 (jobs/s)', (S) => peakOf(S));

const levelRate = (level) => {
  const rates = ROUNDS.flatMap((R) => SYSTEMS.map((s) => num(R[s.key].latency?.[level]?.rate_per_s))).filter(
    (x) => x !== null,
  );
  const st = stats(rates);
  if (!st.n) return '';
  return st.min === st.max ? `${fmt(st.median)}/s` : `${fmt(st.min)}–${fmt(st.max)}/s`;
};
for (const level of ['light', 'heavy']) {
  const rate = levelRate(level);
  const how = level === 'heavy' ? `${rate}, ${process.env.HEAVY_PCT || 80}% of the slowest peak` : rate;
  for (const [key, label] of [
    ['p50_ms', 'p50'],
    ['p99_ms', 'p99'],
    ['p999_ms', 'p99.9'],
  ]) {
    T[`${level}_${key}`] = row(`latency ${level} ${label} (ms; ${how || 'not run'})`, (S) => num(S.latency?.[level]?.[key]), {
      lower: true,
    });
  }
}
const flood = { only: ['agentq', 'node'], lower: true };
row('flood: B mean wait (ms; agentq fair vs BullMQ FIFO)', (S, R) => pickFlood(S, R, 'b_mean_wait_ms'), flood);
row('flood: B max wait (ms; agentq fair vs BullMQ FIFO)', (S, R) => pickFlood(S, R, 'b_max_wait_ms'), flood);
row('flood: drain (ms; agentq fair vs BullMQ FIFO)', (S, R) => pickFlood(S, R, 'drain_ms'), flood);
function pickFlood(S, R, key) {
  return num(S === R.agentq ? S.flood?.fair?.[key] : S.flood?.fifo?.[key]);
}
T.bytes = row('Redis bytes per queued job (used_memory)', (S) => num(S.footprint?.redis_bytes_per_job), { lower: true });
row('Redis bytes per queued job (MEMORY USAGE of keys)', (S) => num(S.footprint?.redis_key_bytes_per_job), {
  lower: true,
});

// ---- targets ---------------------------------------------------------------------

/**
 * A target: `perRound[i]` the measured value of round i (null: not run),
 * `pass(v)`, `show(v)` for the value. The verdict is the median's; with
 * several rounds, how many of them passed is given too.
 */
const targets = [];
function target(name, perRound, need, pass, show = fmtRatio, issue = 14, detail = '') {
  const st = stats(perRound);
  const passed = st.values.filter(pass).length;
  let verdict = st.n === 0 ? 'not run' : pass(st.median) ? 'PASS' : 'MISS';
  if (st.n > 1) verdict += ` (${passed}/${st.n} rounds)`;
  targets.push({
    target: name,
    value: fmtStats(st, show) + (st.n && detail ? `; ${detail}` : ''),
    need,
    verdict,
    issue,
    median: st.median,
    min: st.min,
    max: st.max,
    rounds: st.n,
    rounds_passed: passed,
  });
}
const vs = (r) => (r.best_peer ? `fastest peer (${r.best_peer})` : 'fastest peer');
/** "agentq's median vs the best peer's median" of a row, e.g. "19,188 vs 25,954 jobs/s". */
const medians = (r, unit = '') => {
  const peer = PEERS.find((p) => p.label === r.best_peer);
  return r.agentq.n && peer ? `${fmt(r.agentq.median)} vs ${fmt(r[peer.key].median)}${unit}` : '';
};

for (const c of concurrencies) {
  const off = T[`off${c}`];
  target(`processing c=${c}, ledger off vs ${vs(off)}`, off.ratio_per_round, '>= 1.5x', (r) => r >= 1.5, fmtRatio, 14, medians(off, ' jobs/s'));
}
for (const c of concurrencies) {
  const on = T[`on${c}`];
  if (on) {
    target(`processing c=${c}, ledger on vs ${vs(on)}, ledger-less`, on.ratio_per_round, '>= 1.0x', (r) => r >= 1, fmtRatio, 14, medians(on, ' jobs/s'));
  }
}
if (!concurrencies.length) target('processing vs fastest peer', [], '>= 1.5x off, >= 1.0x on', () => false);
target(
  `Redis bytes per queued job vs the leaner peer (${T.bytes.best_peer ?? 'BullMQ'}); ratio = its bytes / agentq's`,
  T.bytes.ratio_per_round,
  '>= 1.0x (agentq <= BullMQ)',
  (r) => r >= 1,
  fmtRatio,
  14,
  medians(T.bytes, ' B'),
);
const bareConc = ROUNDS.map((R) => {
  const p = R.agentq.process;
  const b = num(p?.bare_spawn_concurrent_per_s);
  const q = num(p?.queue_echo_per_s);
  return b && q !== null ? q / b : null;
});
const cg = ROUNDS.map((R) => R.agentq.process?.cgroup_parent).find(Boolean);
target(
  `process path: queue echo vs bare concurrent spawn${cg ? ` (cgroups: ${cg})` : ''}`,
  bareConc,
  '>= 70%',
  (r) => r >= 0.7,
  fmtPct,
);
for (const level of ['light', 'heavy']) {
  const r = T[`${level}_p99_ms`];
  const rate = levelRate(level);
  target(
    `latency p99 at ${level} load${rate ? ` (${rate})` : ''} vs the best peer (${r.best_peer ?? 'BullMQ'}); ratio = its p99 / agentq's`,
    r.ratio_per_round,
    '>= 1.0x (agentq <= BullMQ)',
    (x) => x >= 1,
    fmtRatio,
    14,
    medians(r, ' ms'),
  );
}
const tenantRatio = ROUNDS.map((R) => {
  const runs = (R.agentq.tenants?.runs ?? []).filter((r) => num(r.jobs_per_s) !== null);
  if (runs.length < 2) return null;
  const few = runs.reduce((x, y) => (y.tenants < x.tenants ? y : x));
  const many = runs.reduce((x, y) => (y.tenants > x.tenants ? y : x));
  return many.jobs_per_s / few.jobs_per_s;
});
const tenantCounts = ROUNDS.map((R) => (R.agentq.tenants?.runs ?? []).map((r) => r.tenants)).find((x) => x.length > 1);
target(
  tenantCounts ? `tenants: ${Math.max(...tenantCounts)} vs ${Math.min(...tenantCounts)} tenants` : 'tenants: 10,000 vs 10 tenants',
  tenantRatio,
  '>= 85%',
  (r) => r >= 0.85,
  fmtPct,
);
// Issue 6's other targets, still watched.
target(`batch enqueue vs ${vs(T.enqueue)}`, T.enqueue.ratio_per_round, '>= 1.5x', (r) => r >= 1.5, fmtRatio, 6, medians(T.enqueue, ' jobs/s'));
const taskMs = ROUNDS.map((R) => num(R.agentq.flood?.task_ms)).find((x) => x !== null) ?? 50;
target(
  "fairness: agentq B's max wait (ms)",
  ROUNDS.map((R) => num(R.agentq.flood?.fair?.b_max_wait_ms)),
  `<= ${2 * taskMs} ms`,
  (v) => v <= 2 * taskMs,
  (v) => fmt(v, ' ms'),
  6,
);
target(
  'fairness: agentq fair drain vs agentq FIFO drain',
  ROUNDS.map((R) => {
    const f = R.agentq.flood;
    return num(f?.fair?.drain_ms) !== null && num(f?.fifo?.drain_ms) ? f.fair.drain_ms / f.fifo.drain_ms - 1 : null;
  }),
  '<= +5%',
  (v) => v <= 0.05,
  (v) => (num(v) === null ? '-' : `${v >= 0 ? '+' : ''}${(v * 100).toFixed(1)}%`),
  6,
);

// ---- Redis: the ceiling, and what each system spends per job --------------------

const ceilingTests = [];
for (const R of ROUNDS) {
  for (const t of R.ceiling?.tests ?? []) if (!ceilingTests.includes(t.test)) ceilingTests.push(t.test);
}
const ceiling = ceilingTests.map((name) => {
  const per = ROUNDS.map((R) => R.ceiling?.tests?.find((t) => t.test === name) ?? null);
  return {
    test: name,
    ops_per_s: stats(per.map((t) => t?.ops_per_s)),
    us_per_op: stats(per.map((t) => t?.us_per_op)),
    redis_cpu_us_per_op: stats(per.map((t) => t?.redis_cpu_us_per_op)),
    cmd_us_per_call: stats(per.map((t) => t?.cmd_us_per_call)),
  };
});

const redisPerJob = [];
for (const s of SYSTEMS) {
  for (const c of concurrencies) {
    for (const ledger of s.key === 'agentq' ? [false, true] : [false]) {
      const runs = ROUNDS.map((R) => procRun(R[s.key].throughput, c, ledger));
      if (!runs.some(Boolean)) continue;
      const cpu = stats(runs.map((p) => p?.redis_us_per_job?.cpu));
      redisPerJob.push({
        system: s.label,
        run: `c=${c}${s.key === 'agentq' ? `, ledger ${ledger ? 'on' : 'off'}` : ''}`,
        cpu_us: cpu,
        cmd_all_us: stats(runs.map((p) => p?.redis_us_per_job?.all)),
        scripts_us: stats(runs.map((p) => p?.redis_us_per_job?.scripts)),
        script_calls: stats(runs.map((p) => p?.redis_calls_per_job?.scripts)),
        calls: stats(runs.map((p) => p?.redis_calls_per_job?.all)),
        // With Redis's main thread busy only with this: 1e6 / CPU µs per job.
        bound_per_s: stats(runs.map((p) => (num(p?.redis_us_per_job?.cpu) ? 1e6 / p.redis_us_per_job.cpu : null))),
        jobs_per_s: stats(runs.map((p) => p?.jobs_per_s)),
      });
    }
  }
}

// ---- extras, caveats, machines -----------------------------------------------------

const extras = [];
const tenantsBy = new Map();
for (const R of ROUNDS) for (const r of R.agentq.tenants?.runs ?? []) tenantsBy.set(r.tenants, [...(tenantsBy.get(r.tenants) ?? []), r.jobs_per_s]);
for (const [n, v] of [...tenantsBy].sort((a, b) => a[0] - b[0])) extras.push(`agentq tenants=${n}: ${fmtStats(stats(v))} jobs/s`);
const proc = (k) => stats(ROUNDS.map((R) => R.agentq.process?.[k]));
if (proc('queue_echo_per_s').n) {
  const c = ROUNDS.map((R) => R.agentq.process?.concurrency).find(Boolean);
  extras.push(
    `agentq process path (c=${c}, cgroup parent ${cg ?? '?'}): bare spawn ${fmtStats(proc('bare_spawn_per_s'))}/s, ` +
      `bare concurrent ${fmtStats(proc('bare_spawn_concurrent_per_s'))}/s, queue echo ${fmtStats(proc('queue_echo_per_s'))}/s`,
  );
}
const rss = (k) => stats(ROUNDS.map((R) => R.agentq.footprint?.[k]));
if (rss('worker_rss_idle_kb').n) {
  extras.push(`agentq worker RSS: idle ${fmtStats(rss('worker_rss_idle_kb'))} KiB, 256 running ${fmtStats(rss('worker_rss_c256_kb'))} KiB`);
}
for (const s of SYSTEMS) {
  const peaks = ROUNDS.map((R) => peakOf(R[s.key]));
  if (peaks.some((p) => p !== null)) extras.push(`${s.label} latency peak per round: ${peaks.map((p) => fmt(p)).join(', ')} jobs/s`);
}

const caveats = [];
for (const R of ROUNDS) {
  const tag = ROUNDS.length > 1 ? `round ${R.n}: ` : '';
  const sizes = (label, get) => {
    const v = SYSTEMS.map((s) => [s.label, num(get(R[s.key]))]).filter(([, x]) => x !== null);
    if (new Set(v.map(([, x]) => x)).size > 1) caveats.push(`${tag}${label} differ: ${v.map(([l, x]) => `${l} ${x}`).join(', ')}`);
  };
  sizes('throughput jobs', (S) => S.throughput?.jobs);
  sizes('footprint jobs', (S) => S.footprint?.jobs);
  sizes('heavy latency rates', (S) => S.latency?.heavy?.rate_per_s);
  const fp = SYSTEMS.map((s) => R[s.key].footprint?.redis).filter(Boolean);
  if (new Set(fp).size > 1) caveats.push(`${tag}footprint Redis differs (${fp.join(', ')})`);
  for (const level of ['light', 'heavy']) {
    if (R.agentq.latency?.[level]?.kept_up === false) {
      caveats.push(`${tag}agentq did not keep up at the ${level} level: those waits include queueing`);
    }
  }
}
if (process.env.COMPARE_REDIS) {
  caveats.push(
    process.env.COMPARE_REDIS === 'private'
      ? 'every system ran against one private redis-server of the run (no other clients)'
      : 'the systems ran against the shared AGENTQ_REDIS_URL: other clients count in the Redis per-job figures',
  );
}

const machines = [];
for (const s of SYSTEMS) {
  for (const sc of SCENARIOS[s.key]) {
    const notes = ROUNDS.map((R) => R[s.key][sc]?.machine).filter(Boolean);
    if (!notes.length) continue;
    const cpus = /(\d+) CPUs/.exec(notes[0])?.[1];
    const loads = notes.map((m) => /load average ([\d.]+)/.exec(m)?.[1] ?? '?');
    machines.push(`${s.prefix}-${sc}: ${cpus ?? '?'} CPUs, 1-min load ${loads.join(', ')}`);
  }
}
{
  const notes = ROUNDS.map((R) => R.ceiling?.machine).filter(Boolean);
  if (notes.length) machines.push(`ceiling: 1-min load ${notes.map((m) => /load average ([\d.]+)/.exec(m)?.[1] ?? '?').join(', ')}`);
}

const versions = {
  node: ROUNDS.map((R) => R.node.throughput?.bullmq ?? R.node['latency-peak']?.bullmq).find(Boolean) ?? null,
  rust: ROUNDS.map((R) => R.rust.throughput?.crate_version ?? R.rust.footprint?.crate_version).find(Boolean) ?? null,
  redis: ROUNDS.map((R) => R.ceiling?.redis_version).find(Boolean) ?? null,
};
const header = {
  agentq: 'agentq',
  node: `BullMQ (Node)${versions.node ? ` ${versions.node}` : ''}`,
  rust: `BullMQ (Rust)${versions.rust ? ` ${versions.rust}` : ''}`,
};

// ---- output ----------------------------------------------------------------------

const cell = (r, key) => (r.na.includes(key) ? 'n/a' : fmtStats(r[key]));
const n = ROUNDS.length;
const roundsNote =
  n > 1
    ? `${n} rounds: each figure is the median (min–max); each ratio is taken within a round (agentq vs the best peer of that round), then the median (min–max).`
    : 'One round: single-run figures on a shared machine; rerun with RUNS=3 before trusting a ratio near its target.';

const pad = (s, w) => String(s).padEnd(w);
const padL = (s, w) => String(s).padStart(w);
const cols = [
  ['metric', (r) => r.metric],
  [header.agentq, (r) => cell(r, 'agentq')],
  [header.node, (r) => cell(r, 'node')],
  [header.rust, (r) => cell(r, 'rust')],
  ['fastest peer', (r) => r.best_peer ?? '-'],
  ['agentq vs fastest peer', (r) => fmtStats(r.ratio, fmtRatio)],
];
const widths = cols.map(([h, f]) => Math.max(h.length, ...rows.map((r) => String(f(r)).length)));
console.log(`\n${roundsNote}`);
console.log(cols.map(([h], i) => (i ? padL(h, widths[i]) : pad(h, widths[i]))).join('  '));
for (const r of rows) console.log(cols.map(([, f], i) => (i ? padL(f(r), widths[i]) : pad(f(r), widths[i]))).join('  '));
console.log('(ratio: agentq/peer for rates, peer/agentq for times and bytes; above 1x favours agentq)\n');
const tw = Math.max(...targets.map((t) => t.target.length));
const vw = Math.max(...targets.map((t) => t.value.length), 5);
for (const t of targets) console.log(`${pad(t.verdict, 17)} ${pad(t.target, tw)}  ${pad(t.value, vw)}  (target ${t.need})`);
if (ceiling.length) {
  console.log('\nRedis ceiling (redis-benchmark, private redis-server):');
  for (const c of ceiling) {
    console.log(
      `  ${pad(c.test, 40)} ${padL(fmtStats(c.ops_per_s), 28)} ops/s  ${padL(fmtStats(c.us_per_op), 20)} µs/op  ` +
        `Redis CPU ${fmtStats(c.redis_cpu_us_per_op)} µs/op  in command ${fmtStats(c.cmd_us_per_call)} µs/call`,
    );
  }
}
if (redisPerJob.length) {
  console.log('\nRedis per processed job (throughput drains):');
  for (const r of redisPerJob) {
    console.log(
      `  ${pad(`${r.system} ${r.run}`, 32)} CPU ${fmtStats(r.cpu_us)} µs, commandstats ${fmtStats(r.cmd_all_us)} µs ` +
        `(scripts ${fmtStats(r.scripts_us)} µs in ${fmtStats(r.script_calls)} calls), ${fmtStats(r.calls)} commands; ` +
        `Redis-bound ${fmtStats(r.bound_per_s)} jobs/s`,
    );
  }
}
console.log('');
for (const e of extras) console.log(`  ${e}`);
for (const c of caveats) console.log(`  caveat: ${c}`);
for (const m of machines) console.log(`  ${m}`);

const noEvalsha = ceiling.find((c) => /EVALSHA/.test(c.test) && /one per round trip/.test(c.test));
const md = [
  roundsNote,
  '',
  `| metric | ${header.agentq} | ${header.node} | ${header.rust} | fastest peer | agentq vs fastest peer |`,
  '| --- | ---: | ---: | ---: | --- | ---: |',
  ...rows.map(
    (r) =>
      `| ${r.metric} | ${cell(r, 'agentq')} | ${cell(r, 'node')} | ${cell(r, 'rust')} | ${r.best_peer ?? '-'} | ${fmtStats(r.ratio, fmtRatio)} |`,
  ),
  '',
  '(ratio: agentq/peer for rates, peer/agentq for times and bytes; above 1x favours agentq)',
  '',
  '| target | measured | need | verdict |',
  '| --- | --- | --- | --- |',
  ...targets.map((t) => `| ${t.target}${t.issue === 6 ? ' (issue 6)' : ''} | ${t.value} | ${t.need} | ${t.verdict} |`),
  '',
  ...(ceiling.length
    ? [
        `Redis ceiling on this machine (redis-benchmark, ${ROUNDS.find((R) => R.ceiling)?.ceiling?.clients ?? 50} clients, private redis-server${versions.redis ? ` ${versions.redis}` : ''}):`,
        '',
        '| test | ops/s | µs/op (1e6 / ops/s) | Redis CPU µs/op | in-command µs/call |',
        '| --- | ---: | ---: | ---: | ---: |',
        ...ceiling.map(
          (c) =>
            `| ${c.test} | ${fmtStats(c.ops_per_s)} | ${fmtStats(c.us_per_op)} | ${fmtStats(c.redis_cpu_us_per_op)} | ${fmtStats(c.cmd_us_per_call)} |`,
        ),
        '',
      ]
    : []),
  ...(redisPerJob.length
    ? [
        'Redis per processed job (throughput drains; CPU = Redis main-thread CPU time; commandstats = sum of every command\'s usec, which counts a script\'s inner commands twice in Redis 7; Redis-bound = 1e6 / CPU µs):',
        '',
        '| system, run | jobs/s | Redis CPU µs/job | commandstats µs/job | scripts µs/job | script calls/job | commands/job | Redis-bound jobs/s |',
        '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |',
        ...redisPerJob.map(
          (r) =>
            `| ${r.system} ${r.run} | ${fmtStats(r.jobs_per_s)} | ${fmtStats(r.cpu_us)} | ${fmtStats(r.cmd_all_us)} | ${fmtStats(r.scripts_us)} | ${fmtStats(r.script_calls)} | ${fmtStats(r.calls)} | ${fmtStats(r.bound_per_s)} |`,
        ),
        ...(noEvalsha && noEvalsha.redis_cpu_us_per_op.n
          ? [
              '',
              `A no-op EVALSHA, one per round trip, costs Redis ${fmtStats(noEvalsha.redis_cpu_us_per_op)} µs of CPU: ` +
                redisPerJob
                  .filter((r) => r.cpu_us.n)
                  .map((r) => `${r.system} ${r.run} ${(r.cpu_us.median / noEvalsha.redis_cpu_us_per_op.median).toFixed(1)}x`)
                  .join(', ') +
                ' that per job.',
            ]
          : []),
        '',
      ]
    : []),
  ...extras.map((e) => `- ${e}`),
  ...caveats.map((c) => `- caveat: ${c}`),
  ...machines.map((m) => `- ${m}`),
  '',
].join('\n');

mkdirSync(OUT_DIR, { recursive: true });
writeFileSync(
  path.join(OUT_DIR, 'compare.json'),
  JSON.stringify(
    {
      generated: new Date().toISOString(),
      input: IN_DIR,
      rounds: ROUNDS.map((R) => R.n),
      versions,
      rows,
      targets,
      ceiling,
      redis_per_job: redisPerJob,
      extras,
      caveats,
      machines,
      data: ROUNDS.map((R) => ({ round: R.n, ceiling: R.ceiling, agentq: R.agentq, bullmq: R.node, bullmq_rs: R.rust })),
    },
    null,
    2,
  ) + '\n',
);
writeFileSync(path.join(OUT_DIR, 'compare.md'), md);
console.log(`\nwrote ${path.join(OUT_DIR, 'compare.json')} and compare.md`);
