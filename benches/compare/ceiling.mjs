#!/usr/bin/env node
// What one Redis thread can do on this machine: redis-benchmark against a
// private redis-server (a free port, no persistence, stopped at the end),
// for pipelined single commands and for a no-op Lua script call, with the
// server's own main-thread CPU time and INFO commandstats per operation.
// Writes BENCH_OUT_DIR/ceiling.json (default target/bench).
//
//   node benches/compare/ceiling.mjs
//
// Tests (each a separate redis-benchmark run, CEILING_CLIENTS connections):
//   SET, GET, INCR with CEILING_PIPELINE commands per round trip; SET one
//   per round trip; EVALSHA of `return 1` (loaded with SCRIPT LOAD, no keys)
//   one per round trip and pipelined.
// Per test: ops/s (redis-benchmark), µs per op (1e6 / ops/s: the wall time
// per op with the server saturated, or as near as one client thread gets
// it), the server's main-thread CPU µs per op (INFO cpu
// used_cpu_{user,sys}_main_thread delta / requests) and the command's
// INFO commandstats usec per call (time inside the command only).
//
// Knobs: CEILING_REQUESTS (1000000 pipelined; QUICK 200000; one-per-round-
// trip tests run a fifth of it), CEILING_CLIENTS (50), CEILING_PIPELINE (16).
// Needs redis-server and redis-benchmark on the PATH.

import { spawn, spawnSync } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { availableParallelism } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const REPO = path.resolve(HERE, '..', '..');
const OUT_DIR = process.env.BENCH_OUT_DIR || path.join(path.resolve(REPO, process.env.CARGO_TARGET_DIR || 'target'), 'bench');
const QUICK = process.env.QUICK === '1' || process.env.BENCH_QUICK === '1';

function envInt(name, fallback) {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return fallback;
  const n = Number(raw.replaceAll('_', ''));
  if (!Number.isInteger(n) || n <= 0) {
    console.error(`${name}=${raw} is not a positive whole number; set it to e.g. ${fallback} or unset it`);
    process.exit(2);
  }
  return n;
}

const REQUESTS = envInt('CEILING_REQUESTS', QUICK ? 200_000 : 1_000_000);
const CLIENTS = envInt('CEILING_CLIENTS', 50);
const PIPELINE = envInt('CEILING_PIPELINE', 16);

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const round = (x, d = 1) => Math.round(x * 10 ** d) / 10 ** d;

function loadNote() {
  const load = readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ');
  return `machine: ${availableParallelism()} CPUs, load average ${load}`;
}

function need(bin) {
  const r = spawnSync(bin, ['--version'], { encoding: 'utf8' });
  if (r.error || r.status !== 0) {
    console.error(`${bin} not found: install Redis (it brings redis-server and redis-benchmark)`);
    process.exit(1);
  }
  return r.stdout.trim();
}

async function freePort() {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

let server = null;
function stopServer() {
  if (server && server.exitCode === null) server.kill('SIGTERM');
}
for (const sig of ['SIGINT', 'SIGTERM']) {
  process.on(sig, () => {
    stopServer();
    process.exit(130);
  });
}

/** `redis-cli -p port args...` output (throws on failure). */
function cli(port, ...args) {
  const r = spawnSync('redis-cli', ['-h', '127.0.0.1', '-p', String(port), ...args], { encoding: 'utf8' });
  if (r.error || r.status !== 0) throw new Error(`redis-cli ${args.join(' ')}: ${r.error?.message ?? r.stderr}`);
  return r.stdout;
}

function stats(port) {
  const cmds = new Map();
  for (const line of cli(port, 'INFO', 'commandstats').split('\n')) {
    const m = /^cmdstat_([^:]+):(.*)$/.exec(line.trim());
    if (!m) continue;
    const f = (k) => Number(new RegExp(`(?:^|,)${k}=(\\d+)`).exec(m[2])?.[1] ?? 0);
    cmds.set(m[1], { calls: f('calls'), usec: f('usec') });
  }
  const cpu = cli(port, 'INFO', 'cpu');
  const f = (k) => Number(new RegExp(`^${k}:([0-9.]+)`, 'm').exec(cpu)?.[1] ?? NaN);
  let cpuS = f('used_cpu_user_main_thread') + f('used_cpu_sys_main_thread');
  if (!Number.isFinite(cpuS)) cpuS = f('used_cpu_user') + f('used_cpu_sys');
  return { cmds, cpuS };
}

/** One redis-benchmark run: its CSV row plus the server's CPU and commandstats deltas. */
function bench(port, t) {
  const before = stats(port);
  const args = ['-h', '127.0.0.1', '-p', String(port), '-n', String(t.requests), '-c', String(CLIENTS), '--csv'];
  if (t.pipeline > 1) args.push('-P', String(t.pipeline));
  const r = spawnSync('redis-benchmark', [...args, ...t.args], { encoding: 'utf8', maxBuffer: 1 << 24 });
  if (r.error || r.status !== 0) throw new Error(`redis-benchmark ${t.args.join(' ')}: ${r.error?.message ?? r.stderr}`);
  const after = stats(port);
  const lines = r.stdout.trim().split('\n').filter((l) => l.startsWith('"') && !l.startsWith('"test"'));
  const cells = lines[lines.length - 1]?.split(',').map((c) => c.replaceAll('"', ''));
  const rps = Number(cells?.[1]);
  if (!Number.isFinite(rps) || rps <= 0) throw new Error(`redis-benchmark ${t.args.join(' ')}: no rate in ${r.stdout}`);
  const b = before.cmds.get(t.command) ?? { calls: 0, usec: 0 };
  const a = after.cmds.get(t.command) ?? { calls: 0, usec: 0 };
  const calls = a.calls - b.calls;
  return {
    test: t.name,
    command: t.command,
    pipeline: t.pipeline,
    clients: CLIENTS,
    requests: t.requests,
    ops_per_s: round(rps, 0),
    us_per_op: round(1e6 / rps, 3),
    redis_cpu_us_per_op: round(((after.cpuS - before.cpuS) * 1e6) / t.requests, 3),
    cmd_us_per_call: calls > 0 ? round((a.usec - b.usec) / calls, 3) : null,
    p50_ms: Number(cells[4]),
    p99_ms: Number(cells[6]),
  };
}

async function main() {
  const version = need('redis-server');
  need('redis-benchmark');
  const port = await freePort();
  server = spawn(
    'redis-server',
    ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--loglevel', 'warning'],
    { stdio: ['ignore', 'ignore', 'inherit'] },
  );
  let up = false;
  for (let i = 0; i < 100 && !up; i++) {
    await sleep(50);
    up = spawnSync('redis-cli', ['-h', '127.0.0.1', '-p', String(port), 'PING'], { encoding: 'utf8' }).stdout?.trim() === 'PONG';
  }
  if (!up) throw new Error(`redis-server on port ${port} did not answer PING within 5 s`);
  const sha = cli(port, 'SCRIPT', 'LOAD', 'return 1').trim();
  const single = Math.max(1000, Math.round(REQUESTS / 5));
  const tests = [
    { name: `SET, ${PIPELINE} per round trip`, command: 'set', pipeline: PIPELINE, requests: REQUESTS, args: ['-t', 'set'] },
    { name: `GET, ${PIPELINE} per round trip`, command: 'get', pipeline: PIPELINE, requests: REQUESTS, args: ['-t', 'get'] },
    { name: `INCR, ${PIPELINE} per round trip`, command: 'incr', pipeline: PIPELINE, requests: REQUESTS, args: ['-t', 'incr'] },
    { name: 'SET, one per round trip', command: 'set', pipeline: 1, requests: single, args: ['-t', 'set'] },
    { name: 'EVALSHA `return 1`, one per round trip', command: 'evalsha', pipeline: 1, requests: single, args: ['evalsha', sha, '0'] },
    {
      name: `EVALSHA \`return 1\`, ${PIPELINE} per round trip`,
      command: 'evalsha',
      pipeline: PIPELINE,
      requests: REQUESTS,
      args: ['evalsha', sha, '0'],
    },
  ];
  const results = [];
  for (const t of tests) {
    const r = bench(port, t);
    results.push(r);
    console.log(
      `ceiling: ${r.test}: ${r.ops_per_s.toLocaleString('en-US')} ops/s, ${r.us_per_op} µs/op, ` +
        `Redis CPU ${r.redis_cpu_us_per_op} µs/op, in command ${r.cmd_us_per_call} µs/call`,
    );
  }
  const out = {
    redis_version: /v=([\d.]+)/.exec(version)?.[1] ?? version,
    server: 'private redis-server (--save "" --appendonly no), its own port',
    clients: CLIENTS,
    pipeline: PIPELINE,
    tests: results,
    note:
      'us_per_op = 1e6 / ops_per_s; redis_cpu_us_per_op = main-thread CPU time / requests; cmd_us_per_call = INFO commandstats usec / calls (inside the command only). redis-benchmark shares the cores with the server.',
    machine: loadNote(),
  };
  mkdirSync(OUT_DIR, { recursive: true });
  const file = path.join(OUT_DIR, 'ceiling.json');
  writeFileSync(file, JSON.stringify(out, null, 2) + '\n');
  console.log(`wrote ${file}`);
}

main().then(
  () => {
    stopServer();
    process.exit(0);
  },
  (e) => {
    console.error(`ceiling failed: ${e.stack || e}`);
    stopServer();
    process.exit(1);
  },
);
