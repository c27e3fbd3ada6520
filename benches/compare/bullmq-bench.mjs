#!/usr/bin/env node
// BullMQ yardstick for agentq's benchmarks: the same throughput, peak,
// latency, flood and footprint scenarios, written as
// target/bench/bullmq-<scenario>.json (peak: bullmq-latency-peak.json) with
// the same keys as the agentq side (target/bench/agentq-<scenario>.json).
//
//   node benches/compare/bullmq-bench.mjs [throughput|peak|latency|flood|footprint|all]...
//
// BullMQ and ioredis are loaded from a scratch directory (BULLMQ_SCRATCH,
// default target/bench/bullmq-scratch/) and installed there with npm if
// missing, never into the repo tree. Each run uses its own key prefix on
// AGENTQ_REDIS_URL (default redis://127.0.0.1:6379), obliterates its queue
// and deletes any key left under that prefix; it never flushes the database.
//
// Knobs (env; names as on the agentq side where they mean the same):
//   JOBS (100000; QUICK 5000 for throughput, 10000 for footprint), TENANTS (50),
//   CHUNK (500 jobs per addBulk, as agentq's BATCH), CONCURRENCIES ("64,256"),
//   WORKERS (1: Worker instances sharing each concurrency),
//   LIGHT_RATE (200), LIGHT_SECS (15), HEAVY_PCT (80), HEAVY_SECS (10),
//   HEAVY_RATE (default HEAVY_PCT of the peak in bullmq-latency-peak.json,
//   else of the c=LATENCY_CONCURRENCY rate in bullmq-throughput.json),
//   LATENCY_CONCURRENCY (64), PEAK_SECS (5; QUICK 2),
//   FLOOD_A_JOBS (2000; QUICK 400), FLOOD_B_JOBS (10), FLOOD_TASK_MS (50),
//   FLOOD_CONCURRENCY (20), FOOTPRINT_REDIS (private|shared).
// QUICK=1 (or BENCH_QUICK=1) shrinks the defaults so a run takes seconds.

import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, writeFileSync, copyFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { availableParallelism } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { performance } from 'node:perf_hooks';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const REPO = path.resolve(HERE, '..', '..');
const OUT_DIR = process.env.BENCH_OUT_DIR || path.join(path.resolve(REPO, process.env.CARGO_TARGET_DIR || 'target'), 'bench');
const SCRATCH = process.env.BULLMQ_SCRATCH || path.join(REPO, 'target', 'bench', 'bullmq-scratch');
const REDIS_URL = process.env.AGENTQ_REDIS_URL || 'redis://127.0.0.1:6379';
const QUICK = process.env.QUICK === '1' || process.env.BENCH_QUICK === '1';
const SCENARIOS = ['throughput', 'peak', 'latency', 'flood', 'footprint'];

/** Reads a positive number from the environment, or the default. */
function envNum(name, fallback) {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return fallback;
  const n = Number(raw);
  if (!Number.isFinite(n) || n <= 0) {
    console.error(`${name}=${raw} is not a positive number; set it to e.g. ${fallback} or unset it`);
    process.exit(2);
  }
  return n;
}

const CFG = {
  jobs: envNum('JOBS', QUICK ? 5000 : 100000),
  tenants: envNum('TENANTS', 50),
  chunk: envNum('CHUNK', 500),
  concurrencies: (process.env.CONCURRENCIES || '64,256').split(',').map(Number),
  workers: envNum('WORKERS', 1),
  lightSeconds: envNum('LIGHT_SECS', QUICK ? 2 : 15),
  heavySeconds: envNum('HEAVY_SECS', QUICK ? 2 : 10),
  heavyPct: envNum('HEAVY_PCT', 80),
  footprintJobs: envNum('JOBS', QUICK ? 10000 : 100000),
  footprintRedis: process.env.FOOTPRINT_REDIS || 'private',
  latencyConcurrency: envNum('LATENCY_CONCURRENCY', 64),
  peakSeconds: envNum('PEAK_SECS', QUICK ? 2 : 5),
  lightRate: envNum('LIGHT_RATE', 200),
  floodJobs: envNum('FLOOD_A_JOBS', QUICK ? 400 : 2000),
  floodTaskMs: envNum('FLOOD_TASK_MS', 50),
  floodConcurrency: envNum('FLOOD_CONCURRENCY', 20),
  floodBJobs: envNum('FLOOD_B_JOBS', 10),
};

/** Loads bullmq and ioredis from the scratch dir, installing them first if absent. */
function loadBullmq() {
  const req = createRequire(path.join(SCRATCH, 'package.json'));
  try {
    return { ...req('bullmq'), IORedis: req('ioredis').default ?? req('ioredis') };
  } catch {
    mkdirSync(SCRATCH, { recursive: true });
    copyFileSync(path.join(HERE, 'package.json'), path.join(SCRATCH, 'package.json'));
    console.error(`installing bullmq and ioredis into ${SCRATCH}`);
    const r = spawnSync('npm', ['install', '--no-audit', '--no-fund', '--loglevel=error'], {
      cwd: SCRATCH,
      stdio: 'inherit',
    });
    if (r.status !== 0) {
      console.error(`npm install in ${SCRATCH} failed; check that the npm registry is reachable`);
      process.exit(1);
    }
    return { ...req('bullmq'), IORedis: req('ioredis').default ?? req('ioredis') };
  }
}

const { Queue, Worker, IORedis } = loadBullmq();
const BULLMQ_VERSION = JSON.parse(
  readFileSync(path.join(SCRATCH, 'node_modules', 'bullmq', 'package.json'), 'utf8'),
).version;

/** Wall-clock milliseconds with sub-millisecond resolution. */
const nowMs = () => performance.timeOrigin + performance.now();
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** A fresh ioredis connection; BullMQ workers need maxRetriesPerRequest null. */
function connect(url = REDIS_URL) {
  return new IORedis(url, { maxRetriesPerRequest: null });
}

/** The machine's CPU count and load average, stored with each result (the machine is shared). */
function loadNote() {
  const load = readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ');
  return `machine: ${availableParallelism()} CPUs, load average ${load}`;
}

/** One queue under its own key prefix, with helpers to clean it away. */
class Bench {
  constructor(label, url = REDIS_URL) {
    this.url = url;
    this.prefix = `bullbench-${label}-${process.pid}-${Math.random().toString(16).slice(2, 8)}`;
    this.name = 'bench';
    this.admin = connect(url);
    this.queue = new Queue(this.name, {
      connection: connect(url),
      prefix: this.prefix,
      // Completed jobs are removed at once: agentq keeps no completed job bodies either.
      defaultJobOptions: { removeOnComplete: true, removeOnFail: true },
    });
    this.workers = [];
    Bench.live.add(this);
  }

  /** Starts `count` Worker instances that share `concurrency` between them. */
  startWorkers(processor, concurrency, count = CFG.workers) {
    const each = Math.max(1, Math.floor(concurrency / count));
    for (let i = 0; i < count; i++) {
      const w = new Worker(this.name, processor, {
        connection: connect(this.url),
        prefix: this.prefix,
        concurrency: i === count - 1 ? concurrency - each * (count - 1) : each,
        removeOnComplete: { count: 0 },
        removeOnFail: { count: 0 },
      });
      w.on('error', (e) => console.error(`worker error: ${e.message}`));
      this.workers.push(w);
    }
    return this.workers;
  }

  async stopWorkers() {
    await Promise.all(this.workers.map((w) => w.close(true)));
    this.workers = [];
  }

  /** Adds job data in addBulk chunks; returns the elapsed seconds. */
  async addBulk(datas, chunk = CFG.chunk) {
    const t0 = nowMs();
    for (let i = 0; i < datas.length; i += chunk) {
      await this.queue.addBulk(datas.slice(i, i + chunk).map((data) => ({ name: 'noop', data })));
    }
    return (nowMs() - t0) / 1000;
  }

  /** Adds `n` jobs of `tenant` in CHUNK-sized addBulk calls, each chunk stamped just before its call. */
  async addStamped(n, tenant) {
    for (let i = 0; i < n; i += CFG.chunk) {
      const t = nowMs();
      const len = Math.min(CFG.chunk, n - i);
      await this.queue.addBulk(Array.from({ length: len }, () => ({ name: 'noop', data: { tenant, t } })));
    }
  }

  async usedMemory() {
    const info = await this.admin.info('memory');
    return Number(/used_memory:(\d+)/.exec(info)[1]);
  }

  /** Keys under this run's prefix and the sum of their MEMORY USAGE. */
  async keyBytes() {
    let cursor = '0';
    let keys = 0;
    let bytes = 0;
    do {
      const [next, batch] = await this.admin.scan(cursor, 'MATCH', `${this.prefix}:*`, 'COUNT', 1000);
      cursor = next;
      if (batch.length) {
        const p = this.admin.pipeline();
        batch.forEach((k) => p.memory('USAGE', k, 'SAMPLES', 0));
        for (const [err, n] of await p.exec()) if (!err) bytes += Number(n) || 0;
        keys += batch.length;
      }
    } while (cursor !== '0');
    return { keys, bytes };
  }

  /** Stops workers, obliterates the queue and deletes any key left under the prefix. */
  async cleanup() {
    Bench.live.delete(this);
    await this.stopWorkers().catch(() => {});
    await this.queue.obliterate({ force: true }).catch((e) => console.error(`obliterate: ${e.message}`));
    await this.queue.close().catch(() => {});
    let cursor = '0';
    do {
      const [next, batch] = await this.admin.scan(cursor, 'MATCH', `${this.prefix}:*`, 'COUNT', 1000);
      cursor = next;
      if (batch.length) await this.admin.unlink(...batch);
    } while (cursor !== '0');
    this.admin.disconnect();
  }
}
Bench.live = new Set();

/** Resolves when `n` jobs have completed on the bench's workers. */
function completions(bench, n) {
  let done = 0;
  return new Promise((resolve) => {
    for (const w of bench.workers) {
      w.on('completed', () => {
        done += 1;
        if (done === n) resolve(nowMs());
      });
    }
  });
}

const tenantData = (n, tenants) => Array.from({ length: n }, (_, i) => ({ tenant: `tenant${i % tenants}` }));

function writeJson(name, value) {
  mkdirSync(OUT_DIR, { recursive: true });
  const file = path.join(OUT_DIR, `bullmq-${name}.json`);
  writeFileSync(file, JSON.stringify(value, null, 2) + '\n');
  console.log(`wrote ${path.relative(process.cwd(), file)}`);
}

const round = (x, digits = 1) => Math.round(x * 10 ** digits) / 10 ** digits;

function median(xs) {
  const s = [...xs].sort((a, b) => a - b);
  const m = Math.floor(s.length / 2);
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

function percentile(sorted, p) {
  if (!sorted.length) return null;
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[i];
}

/** INFO commandstats and the main thread's CPU time of the server behind `conn`. */
async function redisStats(conn) {
  const cmds = new Map();
  for (const line of (await conn.info('commandstats')).split('\n')) {
    const m = /^cmdstat_([^:]+):(.*)$/.exec(line.trim());
    if (!m) continue;
    const field = (k) => Number(new RegExp(`(?:^|,)${k}=(\\d+)`).exec(m[2])?.[1] ?? 0);
    cmds.set(m[1], { calls: field('calls'), usec: field('usec') });
  }
  const cpu = await conn.info('cpu');
  const f = (k) => {
    const m = new RegExp(`^${k}:([0-9.]+)`, 'm').exec(cpu);
    return m ? Number(m[1]) : null;
  };
  // Redis 7 reports the main thread apart; older servers only the process.
  const main = f('used_cpu_user_main_thread');
  const cpuS = main !== null ? main + f('used_cpu_sys_main_thread') : f('used_cpu_user') + f('used_cpu_sys');
  return { cmds, cpuS };
}

const SCRIPT_CMDS = new Set(['eval', 'evalsha', 'eval_ro', 'evalsha_ro', 'fcall', 'fcall_ro']);

/**
 * What the server did between two redisStats() per job, with the keys of
 * agentq's throughput bench: redis_us_per_job {all, scripts, cpu},
 * redis_calls_per_job {all, scripts}, redis_commands.
 */
function redisPerJob(before, after, jobs) {
  const r3 = (x) => Math.round(x * 1000) / 1000;
  const all = { calls: 0, usec: 0 };
  const scripts = { calls: 0, usec: 0 };
  const by = [];
  for (const [name, a] of after.cmds) {
    const b = before.cmds.get(name) ?? { calls: 0, usec: 0 };
    const calls = Math.max(0, a.calls - b.calls);
    const usec = Math.max(0, a.usec - b.usec);
    if (!calls) continue;
    all.calls += calls;
    all.usec += usec;
    if (SCRIPT_CMDS.has(name)) {
      scripts.calls += calls;
      scripts.usec += usec;
    }
    by.push([name, calls, usec]);
  }
  by.sort((x, y) => y[2] - x[2] || (x[0] < y[0] ? -1 : 1));
  return {
    redis_us_per_job: {
      all: r3(all.usec / jobs),
      scripts: r3(scripts.usec / jobs),
      cpu: r3((Math.max(0, after.cpuS - before.cpuS) * 1e6) / jobs),
    },
    redis_calls_per_job: { all: r3(all.calls / jobs), scripts: r3(scripts.calls / jobs) },
    redis_commands: Object.fromEntries(
      by
        .filter(([, c]) => c / jobs >= 0.001)
        .map(([n, c, u]) => [n, { calls_per_job: r3(c / jobs), us_per_job: r3(u / jobs) }]),
    ),
  };
}

/** Backlog of JOBS no-op jobs, drained once per concurrency. */
async function throughput() {
  const data = tenantData(CFG.jobs, CFG.tenants);
  const enqueueRates = [];
  const process_ = [];
  for (const concurrency of CFG.concurrencies) {
    const bench = new Bench('tp');
    try {
      const enqS = await bench.addBulk(data);
      enqueueRates.push(CFG.jobs / enqS);
      const before = await redisStats(bench.admin);
      bench.startWorkers(async () => {}, concurrency);
      const t0 = nowMs();
      const t1 = await completions(bench, CFG.jobs);
      const after = await redisStats(bench.admin);
      const rate = CFG.jobs / ((t1 - t0) / 1000);
      const redis = redisPerJob(before, after, CFG.jobs);
      process_.push({
        concurrency,
        ledger: false,
        jobs_per_s: round(rate),
        workers: bench.workers.length,
        ...redis,
      });
      console.log(
        `throughput: addBulk ${round(CFG.jobs / enqS)} jobs/s, process c=${concurrency} ` +
          `(${bench.workers.length} worker(s)) ${round(rate)} jobs/s, ` +
          `Redis ${redis.redis_us_per_job.cpu} µs CPU per job`,
      );
    } finally {
      await bench.cleanup();
    }
  }
  writeJson('throughput', {
    jobs: CFG.jobs,
    tenants: CFG.tenants,
    // Every run enqueues the same backlog; the median is the figure (as on the agentq side).
    enqueue_per_s: round(median(enqueueRates)),
    enqueue_runs_per_s: enqueueRates.map((r) => round(r)),
    enqueue_batch: CFG.chunk,
    process: process_,
    redis_note:
      "INFO commandstats and the main thread's CPU time of the whole server from the Worker's start to the last completion, per job: other clients count too; 'all' sums every command's usec (Redis 7 counts a script's inner commands in their own entries as well as in the script's)",
    bullmq: BULLMQ_VERSION,
    machine: loadNote(),
  });
}

/**
 * Open loop: single `add` calls at `rate` jobs/s for `seconds` (every 2 ms
 * tick sends the jobs now due, none waiting for a reply), each stamped just
 * before its call; records enqueue-to-start (processor invoked).
 */
async function latencyRun(rate, seconds) {
  const bench = new Bench('lat');
  const waits = [];
  const total = Math.round(rate * seconds);
  try {
    bench.startWorkers(async (job) => {
      waits.push(nowMs() - job.data.t);
    }, CFG.latencyConcurrency);
    await Promise.all(bench.workers.map((w) => w.waitUntilReady()));
    await bench.queue.waitUntilReady();
    // Let the worker connect and block for jobs first, as agentq's side does.
    await sleep(500);
    const done = completions(bench, total);
    const t0 = nowMs();
    let sent = 0;
    const pending = [];
    while (sent < total) {
      const due = Math.min(total, Math.floor(((nowMs() - t0) / 1000) * rate) + 1);
      for (; sent < due; sent++) {
        pending.push(bench.queue.add('noop', { tenant: `tenant${sent % CFG.tenants}`, t: nowMs() }));
      }
      await sleep(2);
    }
    const sendS = (nowMs() - t0) / 1000;
    await Promise.all(pending);
    await done;
    waits.sort((a, b) => a - b);
    const out = {
      rate_per_s: round(rate, 0),
      sent_per_s: round(total / sendS, 0),
      jobs: waits.length,
      p50_ms: round(percentile(waits, 50), 3),
      p99_ms: round(percentile(waits, 99), 3),
      p999_ms: round(percentile(waits, 99.9), 3),
      max_ms: round(waits[waits.length - 1], 3),
    };
    console.log(
      `latency @${out.rate_per_s}/s (sent ${out.sent_per_s}/s): ` +
        `p50 ${out.p50_ms} ms, p99 ${out.p99_ms} ms, p99.9 ${out.p999_ms} ms, max ${out.max_ms} ms`,
    );
    return out;
  } finally {
    await bench.cleanup();
  }
}

/**
 * HEAVY_RATE, else 80% (HEAVY_PCT) of BullMQ's peak from the peak scenario
 * (bullmq-latency-peak.json), else of its backlog processing rate at the
 * latency concurrency (bullmq-throughput.json).
 */
function heavyRate() {
  if (process.env.HEAVY_RATE) {
    const peak = num(Number(process.env.PEAK));
    return { rate: envNum('HEAVY_RATE', 1000), peak, source: 'HEAVY_RATE' };
  }
  const peakFile = path.join(OUT_DIR, 'bullmq-latency-peak.json');
  if (existsSync(peakFile)) {
    const peak = JSON.parse(readFileSync(peakFile, 'utf8')).peak_per_s;
    if (Number.isFinite(peak) && peak > 0) {
      return { rate: Math.round((peak * CFG.heavyPct) / 100), peak, source: 'bullmq-latency-peak.json' };
    }
  }
  const file = path.join(OUT_DIR, 'bullmq-throughput.json');
  if (existsSync(file)) {
    const tp = JSON.parse(readFileSync(file, 'utf8'));
    const same = tp.process.filter((p) => p.concurrency === CFG.latencyConcurrency);
    const peak = Math.max(...(same.length ? same : tp.process).map((p) => p.jobs_per_s));
    if (Number.isFinite(peak) && peak > 0) {
      return { rate: Math.round((peak * CFG.heavyPct) / 100), peak, source: 'bullmq-throughput.json' };
    }
  }
  console.error('latency: no bullmq-latency-peak.json or bullmq-throughput.json yet; run peak first or set HEAVY_RATE');
  process.exit(2);
}

const num = (x) => (Number.isFinite(x) && x > 0 ? x : null);

/**
 * Single `add` calls with 128 in flight (each loop sends its next job when
 * the previous add returns) into a running Worker at LATENCY_CONCURRENCY:
 * jobs completed per second over PEAK_SECS after a second of warm-up. The
 * same workload as the latency levels with the producer as fast as it can
 * go, as agentq's latency bench (PEAK_MODE=e2e) and the Rust port measure it.
 */
async function peak() {
  const bench = new Bench('peak');
  try {
    bench.startWorkers(async () => {}, CFG.latencyConcurrency);
    await Promise.all(bench.workers.map((w) => w.waitUntilReady()));
    await bench.queue.waitUntilReady();
    await sleep(500);
    let done = 0;
    for (const w of bench.workers) w.on('completed', () => (done += 1));
    let stop = false;
    let sent = 0;
    const loops = Array.from({ length: 128 }, async () => {
      while (!stop) {
        sent += 1;
        await bench.queue.add('noop', { tenant: `tenant${sent % CFG.tenants}`, t: nowMs() });
      }
    });
    await sleep(1000);
    const d0 = done;
    const t0 = nowMs();
    await sleep(CFG.peakSeconds * 1000);
    const rate = (done - d0) / ((nowMs() - t0) / 1000);
    stop = true;
    await Promise.all(loops);
    const until = nowMs() + 300_000;
    while (done < sent && nowMs() < until) await sleep(10);
    if (done < sent) throw new Error(`peak: only ${done} of ${sent} jobs completed`);
    console.log(`peak (e2e, c=${CFG.latencyConcurrency}): ${Math.round(rate)} jobs/s`);
    writeJson('latency-peak', {
      peak_per_s: Math.round(rate),
      peak_mode: 'e2e',
      peak_secs: CFG.peakSeconds,
      in_flight: 128,
      concurrency: CFG.latencyConcurrency,
      tenants: CFG.tenants,
      bullmq: BULLMQ_VERSION,
      machine: loadNote(),
    });
  } finally {
    await bench.cleanup();
  }
}

async function latency() {
  const heavy = heavyRate();
  const light = await latencyRun(CFG.lightRate, CFG.lightSeconds);
  const heavyOut = await latencyRun(heavy.rate, CFG.heavySeconds);
  writeJson('latency', {
    light,
    heavy: heavyOut,
    peak_per_s: heavy.peak,
    peak_source: heavy.source,
    concurrency: CFG.latencyConcurrency,
    tenants: CFG.tenants,
    start: 'processor invoked',
    machine: loadNote(),
  });
}

/**
 * Tenant A's backlog of slow jobs, then tenant B's few, into a running
 * worker: BullMQ serves FIFO, so B waits behind A's backlog. Waits run from
 * a stamp just before each addBulk call (chunks of CHUNK) to the processor
 * starting; drain from the first enqueue to the last task's end.
 */
async function flood() {
  const bench = new Bench('flood');
  const waits = { A: [], B: [] };
  let lastEnd = 0;
  try {
    bench.startWorkers(async (job) => {
      waits[job.data.tenant].push(nowMs() - job.data.t);
      await sleep(CFG.floodTaskMs);
      lastEnd = nowMs();
    }, CFG.floodConcurrency);
    await Promise.all(bench.workers.map((w) => w.waitUntilReady()));
    await bench.queue.waitUntilReady();
    await sleep(500);
    const total = CFG.floodJobs + CFG.floodBJobs;
    const done = completions(bench, total);
    const t0 = nowMs();
    await bench.addStamped(CFG.floodJobs, 'A');
    await bench.addStamped(CFG.floodBJobs, 'B');
    await done;
    const mean = (xs) => xs.reduce((a, b) => a + b, 0) / xs.length;
    const fifo = {
      b_mean_wait_ms: round(mean(waits.B)),
      b_max_wait_ms: round(Math.max(...waits.B)),
      a_mean_wait_ms: round(mean(waits.A)),
      drain_ms: Math.round(lastEnd - t0),
    };
    console.log(
      `flood: B mean wait ${fifo.b_mean_wait_ms} ms, max ${fifo.b_max_wait_ms} ms, ` +
        `A mean wait ${fifo.a_mean_wait_ms} ms, drain ${fifo.drain_ms} ms`,
    );
    writeJson('flood', {
      task_ms: CFG.floodTaskMs,
      a_jobs: CFG.floodJobs,
      b_jobs: CFG.floodBJobs,
      concurrency: CFG.floodConcurrency,
      fifo,
      machine: loadNote(),
    });
  } finally {
    await bench.cleanup();
  }
}

/** A private redis-server on a free port, so other users of the shared one cannot move used_memory. */
async function privateRedis() {
  const { createServer } = await import('node:net');
  const port = await new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port: p } = srv.address();
      srv.close(() => resolve(p));
    });
  });
  const child = spawn(
    'redis-server',
    ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--loglevel', 'warning'],
    { stdio: ['ignore', 'ignore', 'inherit'] },
  );
  child.once('error', (e) => console.error(`redis-server: ${e.message}; install Redis or set FOOTPRINT_REDIS=shared`));
  const url = `redis://127.0.0.1:${port}`;
  for (let i = 0; i < 100; i++) {
    const probe = new IORedis(url, { lazyConnect: true, maxRetriesPerRequest: 0, retryStrategy: () => null });
    probe.on('error', () => {});
    const ok = await probe.connect().then(() => probe.ping()).then(() => true, () => false);
    probe.disconnect();
    if (ok) return { url, stop: () => child.kill('SIGTERM') };
    await sleep(50);
  }
  child.kill('SIGTERM');
  throw new Error(`redis-server on port ${port} did not answer PING within 5 s`);
}

/**
 * Redis memory per queued (waiting) job: used_memory after a backlog of
 * JOBS no-op jobs over TENANTS minus before, over JOBS; also the sum of
 * MEMORY USAGE over the queue's keys. On a private redis-server unless
 * FOOTPRINT_REDIS=shared.
 */
async function footprint() {
  const priv = CFG.footprintRedis === 'shared' ? null : await privateRedis();
  const bench = new Bench('fp', priv ? priv.url : REDIS_URL);
  try {
    await bench.queue.waitUntilReady();
    // A first job loads the scripts and creates the queue's fixed keys (meta, id counter, events stream).
    await bench.queue.add('noop', { tenant: 'tenant0' });
    const before = await bench.usedMemory();
    const keysBefore = await bench.keyBytes();
    await bench.addBulk(tenantData(CFG.footprintJobs, CFG.tenants));
    const after = await bench.usedMemory();
    const keysAfter = await bench.keyBytes();
    const out = {
      jobs: CFG.footprintJobs,
      tenants: CFG.tenants,
      redis_bytes_per_job: Math.round((after - before) / CFG.footprintJobs),
      redis_key_bytes_per_job: Math.round((keysAfter.bytes - keysBefore.bytes) / CFG.footprintJobs),
      redis_keys_per_job: round((keysAfter.keys - keysBefore.keys) / CFG.footprintJobs, 3),
      redis_used_memory_before: before,
      redis_used_memory_after: after,
      redis: priv ? 'private' : 'shared',
      machine: loadNote(),
    };
    console.log(
      `footprint (${out.redis} redis): ${out.redis_bytes_per_job} B/job (used_memory delta), ` +
        `${out.redis_key_bytes_per_job} B/job (MEMORY USAGE of the queue's keys)`,
    );
    writeJson('footprint', out);
  } finally {
    await bench.cleanup();
    if (priv) priv.stop();
  }
}

async function main() {
  let wanted = process.argv.slice(2);
  if (!wanted.length || wanted.includes('all')) wanted = SCENARIOS;
  const bad = wanted.filter((s) => !SCENARIOS.includes(s));
  if (bad.length) {
    console.error(`unknown scenario ${bad.join(', ')}; choose from ${SCENARIOS.join(', ')} or all`);
    process.exit(2);
  }
  const run = { throughput, peak, latency, flood, footprint };
  // Peak before latency: the heavy latency rate is 80% of it (unless HEAVY_RATE is set).
  for (const s of SCENARIOS.filter((x) => wanted.includes(x))) await run[s]();
}

for (const sig of ['SIGINT', 'SIGTERM']) {
  process.on(sig, async () => {
    await Promise.all([...Bench.live].map((b) => b.cleanup().catch(() => {})));
    process.exit(130);
  });
}

main().then(
  () => process.exit(0),
  async (e) => {
    console.error(`bullmq bench failed: ${e.stack || e}`);
    await Promise.all([...Bench.live].map((b) => b.cleanup().catch(() => {})));
    process.exit(1);
  },
);
