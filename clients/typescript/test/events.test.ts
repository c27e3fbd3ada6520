// Following jobs against a real `agentq serve` and a real `agentq worker`
// (the repository's echo and sleep tasks), on real Redis and PostgreSQL, in
// this file's own Redis namespace and PostgreSQL schema.
//   AGENTQ_BIN=../../target/debug/agentq npm test
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { createServer } from "node:net";
import { fileURLToPath } from "node:url";
import { AgentqClient, WaitTimeoutError, sseMessages, type JobEvent } from "../src/index.js";

const bin = process.env.AGENTQ_BIN ?? "../../target/debug/agentq";
const redisUrl = process.env.AGENTQ_REDIS_URL ?? "redis://127.0.0.1:6379";
const dbUrl = process.env.AGENTQ_DATABASE_URL ?? "postgres://postgres@127.0.0.1:5432/postgres";
// dist/test/ -> the repository's workers/
const workersDir = fileURLToPath(new URL("../../../../workers/", import.meta.url));
const tag = Math.random().toString(16).slice(2, 10);
const ns = `tsev-${tag}`;
const schema = `tsev_${tag}`;
const env = {
  ...process.env,
  AGENTQ_REDIS_URL: redisUrl,
  AGENTQ_DATABASE_URL: `${dbUrl}${dbUrl.includes("?") ? "&" : "?"}options[search_path]=${schema}`,
  AGENTQ_NAMESPACE: ns,
  AGENTQ_LOG: "warn",
  AGENTQ_WORKERS_DIR: workersDir,
};
let server: ChildProcess | undefined;
let worker: ChildProcess | undefined;
let port = 0;
let base = "";
const keys: Record<string, string> = {};

function run(cmd: string, args: string[]): string {
  const r = spawnSync(cmd, args, { env, encoding: "utf8" });
  assert.equal(r.status, 0, `${cmd} ${args.join(" ")}: ${r.stderr}`);
  return r.stdout;
}

async function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const s = createServer();
    s.listen(0, "127.0.0.1", () => {
      const p = (s.address() as { port: number }).port;
      s.close(() => resolve(p));
    });
  });
}

async function startServer(): Promise<void> {
  server = spawn(bin, ["serve", "--listen", `127.0.0.1:${port}`], { env, stdio: "inherit" });
  for (let i = 0; i < 200; i++) {
    try {
      if ((await fetch(`${base}/v1/openapi.json`)).ok) return;
    } catch {
      /* not up yet */
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error("agentq serve did not come up");
}

/** SIGKILL the server (no goodbye to open streams) and wait until it is gone. */
async function killServer(): Promise<void> {
  const s = server;
  if (!s || s.exitCode !== null) return;
  const gone = new Promise((r) => s.once("exit", r));
  s.kill("SIGKILL");
  await gone;
}

before(async () => {
  run("psql", [dbUrl, "-q", "-c", `CREATE SCHEMA ${schema}`]);
  for (const t of ["ev-a", "ev-b"]) keys[t] = JSON.parse(run(bin, ["tenant", "key", "create", t, "--json"])).key;
  port = await freePort();
  base = `http://127.0.0.1:${port}`;
  await startServer();
  worker = spawn(bin, ["worker", "--queues", "q", "--concurrency", "4", "--no-ledger", "--metrics-addr", "off"], {
    env,
    stdio: "inherit",
  });
});

after(async () => {
  worker?.kill("SIGKILL");
  await killServer();
  spawnSync("psql", [dbUrl, "-q", "-c", `DROP SCHEMA IF EXISTS ${schema} CASCADE`], { env });
  const found = spawnSync("redis-cli", ["-u", redisUrl, "--scan", "--pattern", `{${ns}:*`], { encoding: "utf8" });
  const names = found.stdout.split("\n").filter(Boolean);
  if (names.length) spawnSync("redis-cli", ["-u", redisUrl, "DEL", ...names]);
});

const client = (tenant: string) => new AgentqClient({ baseUrl: base, apiKey: keys[tenant] });

/** Stream ids in order: `<ms>-<seq>` compared as numbers. */
function ascending(events: JobEvent[]): boolean {
  const num = (id: string) => id.split("-").map(Number);
  return events.every((e, i) => {
    if (i === 0) return true;
    const [a, b] = [num(events[i - 1].id), num(e.id)];
    return a[0] < b[0] || (a[0] === b[0] && a[1] < b[1]);
  });
}

test("waitUntilFinished returns the succeeded job", async () => {
  const a = client("ev-a");
  const { id } = await a.enqueue({ queue: "q", kind: "echo", payload: { n: 1 } });
  const job = await a.waitUntilFinished(id, { timeout: 60_000 });
  assert.equal(job.id, id);
  assert.equal(job.state, "succeeded");
  assert.equal(job.attempts, 1);
});

test("waitUntilFinished throws WaitTimeoutError with the job as it stands", async () => {
  const a = client("ev-a");
  const { id } = await a.enqueue({ queue: "q", kind: "echo", delay: "1h" });
  const started = Date.now();
  await assert.rejects(a.waitUntilFinished(id, { timeout: 1500 }), (e: unknown) => {
    assert.ok(e instanceof WaitTimeoutError, `${e}`);
    assert.equal(e.job.id, id);
    assert.equal(e.job.state, "delayed");
    return true;
  });
  assert.ok(Date.now() - started >= 1400, "waited for the timeout");
});

test("events(id) yields enqueued, started, succeeded in order and ends", async () => {
  const a = client("ev-a");
  const { id } = await a.enqueue({ queue: "q", kind: "sleep", payload: { ms: 300 } });
  const seen: JobEvent[] = [];
  for await (const e of a.events(id)) seen.push(e);
  assert.deepEqual(
    seen.map((e) => e.type),
    ["enqueued", "started", "succeeded"],
  );
  assert.ok(seen.every((e) => e.job === id && e.queue === "q"));
  assert.ok(ascending(seen));
  assert.deepEqual(seen[2].result, { slept_ms: 300 });
});

test("events(id) resumes after the server is killed and restarted on the same port", async () => {
  const a = client("ev-a");
  const { id } = await a.enqueue({ queue: "q", kind: "sleep", payload: { ms: 2000 } });
  const seen: JobEvent[] = [];
  for await (const e of a.events(id, { retryMs: 100 })) {
    seen.push(e);
    if (seen.length === 1) {
      // The job starts and runs while no server listens.
      await killServer();
      await new Promise((r) => setTimeout(r, 500));
      await startServer();
    }
  }
  assert.deepEqual(
    seen.map((e) => e.type),
    ["enqueued", "started", "succeeded"],
    "nothing lost, nothing repeated",
  );
  assert.equal(new Set(seen.map((e) => e.id)).size, seen.length);
  assert.ok(ascending(seen));
});

test("a tenant's events() never shows another tenant's job", async () => {
  const [a, b] = [client("ev-a"), client("ev-b")];
  const first = await b.enqueue({ queue: "other", kind: "echo", delay: "1h" });
  const stop = new AbortController();
  // From the start of b's retained events: nothing is missed while connecting.
  const events = b.events(undefined, { after: "0", signal: stop.signal });
  const theirs = await a.enqueue({ queue: "other", kind: "echo", delay: "1h" });
  const last = await b.enqueue({ queue: "other", kind: "echo", delay: "1h" });
  const seen: JobEvent[] = [];
  for await (const e of events) {
    seen.push(e);
    if (e.job === last.id) break;
  }
  const jobs = seen.map((e) => e.job);
  assert.ok(jobs.includes(first.id) && jobs.includes(last.id), `${jobs}`);
  assert.ok(!jobs.includes(theirs.id), "ev-a's job is not in ev-b's events");
  const mine = new Set([first.id, last.id]);
  assert.ok(jobs.every((j) => mine.has(j)), `${jobs}`);
});

test("the SSE parser joins lines split across chunks and skips keep-alives", async () => {
  const enc = new TextEncoder();
  const chunks = [": keep-alive\n\nid: 1-0\nevent: started\r", "\ndata: {\"a\":", "1}\n\n", "data: x\ndata: y\n\n"];
  const body = new ReadableStream<Uint8Array>({
    start(c) {
      for (const ch of chunks) c.enqueue(enc.encode(ch));
      c.close();
    },
  });
  const got = [];
  for await (const m of sseMessages(body)) got.push(m);
  assert.deepEqual(got, [
    { id: "1-0", event: "started", data: '{"a":1}' },
    { data: "x\ny" },
  ]);
});
