#!/usr/bin/env node
// Side-by-side report of agentq's and BullMQ's benchmark results against
// issue 6's targets. Reads {agentq,bullmq}-<scenario>.json from COMPARE_IN
// (default target/bench, where `cargo bench` and bullmq-bench.mjs write),
// prints a table and one PASS/MISS line per target, and writes
// target/bench/compare.json and compare.md.
// A missing file shows as "not run"; it never fails the report.
//
//   node benches/compare/report.mjs

import { existsSync, readFileSync, writeFileSync, mkdirSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const REPO = path.resolve(HERE, '..', '..');
const OUT_DIR = process.env.BENCH_OUT_DIR || path.join(path.resolve(REPO, process.env.CARGO_TARGET_DIR || 'target'), 'bench');
// benches/compare/run points this at its own run dir; alone, the report reads target/bench.
const IN_DIR = process.env.COMPARE_IN || OUT_DIR;

/** Parsed target/bench/<side>-<name>.json, or null when absent or unreadable. */
function load(side, name) {
  const file = path.join(IN_DIR, `${side}-${name}.json`);
  if (!existsSync(file)) return null;
  try {
    return JSON.parse(readFileSync(file, 'utf8'));
  } catch (e) {
    console.error(`${file}: not valid JSON (${e.message}); rerun that bench`);
    return null;
  }
}

const A = Object.fromEntries(
  ['throughput', 'latency', 'flood', 'tenants', 'process', 'footprint'].map((n) => [n, load('agentq', n)]),
);
const B = Object.fromEntries(['throughput', 'latency', 'flood', 'footprint'].map((n) => [n, load('bullmq', n)]));

const num = (x) => (typeof x === 'number' && Number.isFinite(x) ? x : null);
const fmt = (x, unit = '') => {
  if (num(x) === null) return 'not run';
  const digits = Math.abs(x) >= 100 ? 0 : Math.abs(x) >= 10 ? 1 : 2;
  return x.toLocaleString('en-US', { maximumFractionDigits: digits }) + unit;
};
const ratio = (a, b) => (num(a) !== null && num(b) !== null && b !== 0 ? a / b : null);
const fmtRatio = (r) => (r === null ? '-' : `${r.toFixed(r < 0.1 ? 3 : 2)}x`);

/** Processing rate of one run, or null. */
function procRate(doc, concurrency, ledger) {
  const run = doc?.process?.find((p) => p.concurrency === concurrency && p.ledger === ledger);
  return num(run?.jobs_per_s);
}

// ---- side-by-side rows -------------------------------------------------
const rows = [];
const row = (metric, agentq, bullmq, unit = '', lowerIsBetter = false) =>
  rows.push({
    metric,
    agentq: num(agentq),
    bullmq: num(bullmq),
    unit,
    // "agentq / BullMQ" for rates; "BullMQ / agentq" where lower is better, so >1 always favours agentq.
    advantage: lowerIsBetter ? ratio(bullmq, agentq) : ratio(agentq, bullmq),
  });

row('batch enqueue (jobs/s)', A.throughput?.enqueue_per_s, B.throughput?.enqueue_per_s);
const concurrencies = [
  ...new Set([...(A.throughput?.process ?? []), ...(B.throughput?.process ?? [])].map((p) => p.concurrency)),
].sort((x, y) => x - y);
for (const c of concurrencies) {
  row(`processing c=${c}, ledger off (jobs/s)`, procRate(A.throughput, c, false), procRate(B.throughput, c, false));
  if (procRate(A.throughput, c, true) !== null) {
    row(`processing c=${c}, ledger on (jobs/s; BullMQ has none)`, procRate(A.throughput, c, true), procRate(B.throughput, c, false));
  }
}
for (const level of ['light', 'heavy']) {
  const a = A.latency?.[level];
  const b = B.latency?.[level];
  const rate = (x) => (num(x?.rate_per_s) === null ? '-' : `${fmt(x.rate_per_s)}/s`);
  const rates = `agentq ${rate(a)}, BullMQ ${rate(b)}`;
  for (const [key, label] of [['p50_ms', 'p50'], ['p99_ms', 'p99'], ['p999_ms', 'p99.9']]) {
    row(`latency ${level} ${label} (ms; ${rates})`, a?.[key], b?.[key], ' ms', true);
  }
}
row('flood: B mean wait (ms; agentq fair vs BullMQ FIFO)', A.flood?.fair?.b_mean_wait_ms, B.flood?.fifo?.b_mean_wait_ms, ' ms', true);
row('flood: B max wait (ms; agentq fair vs BullMQ FIFO)', A.flood?.fair?.b_max_wait_ms, B.flood?.fifo?.b_max_wait_ms, ' ms', true);
row('flood: drain (ms; agentq fair vs BullMQ FIFO)', A.flood?.fair?.drain_ms, B.flood?.fifo?.drain_ms, ' ms', true);
row('flood: drain (ms; agentq one-tenant FIFO vs BullMQ FIFO)', A.flood?.fifo?.drain_ms, B.flood?.fifo?.drain_ms, ' ms', true);
row('Redis bytes per queued job (used_memory)', A.footprint?.redis_bytes_per_job, B.footprint?.redis_bytes_per_job, ' B', true);
row(
  'Redis bytes per queued job (MEMORY USAGE of keys)',
  A.footprint?.redis_key_bytes_per_job,
  B.footprint?.redis_key_bytes_per_job,
  ' B',
  true,
);

// ---- targets -----------------------------------------------------------
const targets = [];
/** One target line: `value` measured, `need` a human threshold, `ok` null when not run. */
const target = (name, value, need, ok) =>
  targets.push({ target: name, value, need, verdict: ok === null ? 'not run' : ok ? 'PASS' : 'MISS' });
const check = (r, pred) => (r === null ? null : pred(r));

for (const c of concurrencies) {
  const base = procRate(B.throughput, c, false);
  const off = ratio(procRate(A.throughput, c, false), base);
  target(`processing c=${c}, ledger off vs BullMQ`, fmtRatio(off), '>= 2x', check(off, (r) => r >= 2));
  const on = ratio(procRate(A.throughput, c, true), base);
  target(`processing c=${c}, ledger on vs BullMQ (ledger-less)`, fmtRatio(on), '>= 1x', check(on, (r) => r >= 1));
}
if (!concurrencies.length) target('processing vs BullMQ', '-', '>= 2x off, >= 1x on', null);

const enq = ratio(A.throughput?.enqueue_per_s, B.throughput?.enqueue_per_s);
target('batch enqueue vs BullMQ addBulk', fmtRatio(enq), '>= 1.5x', check(enq, (r) => r >= 1.5));

const aP99 = num(A.latency?.light?.p99_ms);
const bP99 = num(B.latency?.light?.p99_ms);
target(
  'latency p99 at light load',
  aP99 === null || bP99 === null ? '-' : `${fmt(aP99)} ms vs ${fmt(bP99)} ms`,
  '<= BullMQ',
  aP99 === null || bP99 === null ? null : aP99 <= bP99,
);

const taskMs = num(A.flood?.task_ms);
const bMax = num(A.flood?.fair?.b_max_wait_ms);
target(
  "fairness: agentq B's max wait",
  bMax === null ? '-' : `${fmt(bMax)} ms (BullMQ FIFO ${fmt(B.flood?.fifo?.b_max_wait_ms, ' ms')})`,
  taskMs === null ? '<= 2 task durations' : `<= ${2 * taskMs} ms`,
  bMax === null || taskMs === null ? null : bMax <= 2 * taskMs,
);
const drain = ratio(A.flood?.fair?.drain_ms, A.flood?.fifo?.drain_ms);
target(
  'fairness: agentq fair drain vs agentq FIFO drain',
  drain === null ? '-' : `${((drain - 1) * 100).toFixed(1)}%`,
  '<= +5%',
  check(drain, (r) => r <= 1.05),
);

const runs = (A.tenants?.runs ?? []).filter((r) => num(r.jobs_per_s) !== null);
const few = runs.length ? runs.reduce((x, y) => (y.tenants < x.tenants ? y : x)) : null;
const many = runs.length ? runs.reduce((x, y) => (y.tenants > x.tenants ? y : x)) : null;
const tenantsRatio = few && many && few !== many ? ratio(many.jobs_per_s, few.jobs_per_s) : null;
target(
  few && many && few !== many ? `tenants: ${many.tenants} vs ${few.tenants} tenants` : 'tenants: 10,000 vs 10 tenants',
  tenantsRatio === null ? '-' : `${(tenantsRatio * 100).toFixed(1)}%`,
  '>= 85%',
  check(tenantsRatio, (r) => r >= 0.85),
);

const bare = Math.max(num(A.process?.bare_spawn_per_s) ?? -1, num(A.process?.bare_spawn_concurrent_per_s) ?? -1);
const echo = ratio(A.process?.queue_echo_per_s, bare > 0 ? bare : null);
target(
  'process path: queue echo vs best bare spawn',
  echo === null ? '-' : `${(echo * 100).toFixed(1)}%`,
  '>= 70%',
  check(echo, (r) => r >= 0.7),
);

const aBytes = num(A.footprint?.redis_bytes_per_job);
const bBytes = num(B.footprint?.redis_bytes_per_job);
target(
  'Redis bytes per queued job',
  aBytes === null || bBytes === null ? '-' : `${fmt(aBytes)} B vs ${fmt(bBytes)} B`,
  '<= BullMQ',
  aBytes === null || bBytes === null ? null : aBytes <= bBytes,
);

// ---- agentq-only figures and caveats ----------------------------------
const extras = [];
for (const r of runs) extras.push(`tenants=${r.tenants}: ${fmt(r.jobs_per_s)} jobs/s`);
if (A.process) {
  extras.push(
    `process path (c=${A.process.concurrency}): bare spawn ${fmt(A.process.bare_spawn_per_s)}/s, ` +
      `bare concurrent ${fmt(A.process.bare_spawn_concurrent_per_s)}/s, queue echo ${fmt(A.process.queue_echo_per_s)}/s`,
  );
}
if (A.footprint) {
  extras.push(
    `agentq worker RSS: idle ${fmt(A.footprint.worker_rss_idle_kb)} KiB, ` +
      `256 running ${fmt(A.footprint.worker_rss_c256_kb)} KiB`,
  );
}

const caveats = [];
const sizeCheck = (label, a, b) => {
  if (num(a) !== null && num(b) !== null && a !== b) caveats.push(`${label}: agentq ran ${a}, BullMQ ${b} (sizes differ)`);
};
sizeCheck('throughput jobs', A.throughput?.jobs, B.throughput?.jobs);
sizeCheck('footprint jobs', A.footprint?.jobs, B.footprint?.jobs);
sizeCheck('flood A jobs', A.flood?.a_jobs, B.flood?.a_jobs);
if (A.footprint?.redis && B.footprint?.redis && A.footprint.redis !== B.footprint.redis) {
  caveats.push(`footprint Redis: agentq ${A.footprint.redis}, BullMQ ${B.footprint.redis}`);
}
const machines = [
  ...Object.entries(A).map(([n, d]) => [`agentq-${n}`, d?.machine]),
  ...Object.entries(B).map(([n, d]) => [`bullmq-${n}`, d?.machine]),
]
  .filter(([, m]) => m)
  .map(([n, m]) => `${n}: ${m.replace(/^machine: /, '')}`);

// ---- output ------------------------------------------------------------
const pad = (s, n) => String(s).padEnd(n);
const padL = (s, n) => String(s).padStart(n);
const w = Math.max(...rows.map((r) => r.metric.length), 20);
console.log(`\n${pad('metric', w)}  ${padL('agentq', 12)}  ${padL('BullMQ', 12)}  ${padL('agentq adv.', 11)}`);
for (const r of rows) {
  console.log(
    `${pad(r.metric, w)}  ${padL(fmt(r.agentq), 12)}  ${padL(fmt(r.bullmq), 12)}  ${padL(fmtRatio(r.advantage), 11)}`,
  );
}
console.log('(agentq adv.: agentq/BullMQ for rates, BullMQ/agentq for times and bytes; above 1x favours agentq)\n');
const tw = Math.max(...targets.map((t) => t.target.length));
const vw = Math.max(...targets.map((t) => t.value.length), 5);
for (const t of targets) {
  console.log(`${pad(t.verdict, 7)} ${pad(t.target, tw)}  ${pad(t.value, vw)}  (target ${t.need})`);
}
for (const e of extras) console.log(`  ${e}`);
for (const c of caveats) console.log(`  caveat: ${c}`);
for (const m of machines) console.log(`  ${m}`);

const md = [
  `| metric | agentq | BullMQ ${B.throughput?.bullmq ?? ''} | agentq advantage |`.replace('  |', ' |'),
  '| --- | ---: | ---: | ---: |',
  ...rows.map((r) => `| ${r.metric} | ${fmt(r.agentq)} | ${fmt(r.bullmq)} | ${fmtRatio(r.advantage)} |`),
  '',
  '| target (issue 6) | measured | need | verdict |',
  '| --- | --- | --- | --- |',
  ...targets.map((t) => `| ${t.target} | ${t.value} | ${t.need} | ${t.verdict} |`),
  '',
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
      bullmq_version: B.throughput?.bullmq ?? null,
      rows,
      targets,
      extras,
      caveats,
      machines,
      agentq: A,
      bullmq: B,
    },
    null,
    2,
  ) + '\n',
);
writeFileSync(path.join(OUT_DIR, 'compare.md'), md);
console.log(`\nwrote ${path.join(OUT_DIR, 'compare.json')} and compare.md`);
