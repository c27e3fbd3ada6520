// Runs the client against a real `agentq serve` (started here) on real Redis
// and PostgreSQL, in its own Redis namespace and PostgreSQL schema.
//   AGENTQ_BIN=../../target/debug/agentq npm test
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { createServer } from "node:net";
import { AgentqClient, AgentqError } from "../src/index.js";

const bin = process.env.AGENTQ_BIN ?? "../../target/debug/agentq";
const redisUrl = process.env.AGENTQ_REDIS_URL ?? "redis://127.0.0.1:6379";
const dbUrl = process.env.AGENTQ_DATABASE_URL ?? "postgres://postgres@127.0.0.1:5432/postgres";
const tag = Math.random().toString(16).slice(2, 10);
const ns = `ts-${tag}`;
const schema = `ts_${tag}`;
const env = {
  ...process.env,
  AGENTQ_REDIS_URL: redisUrl,
  AGENTQ_DATABASE_URL: `${dbUrl}${dbUrl.includes("?") ? "&" : "?"}options[search_path]=${schema}`,
  AGENTQ_NAMESPACE: ns,
  AGENTQ_LOG: "warn",
};
let server: ChildProcess | undefined;
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
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
  });
}

before(async () => {
  run("psql", [dbUrl, "-q", "-c", `CREATE SCHEMA ${schema}`]);
  for (const t of ["ts-a", "ts-b"]) keys[t] = JSON.parse(run(bin, ["tenant", "key", "create", t, "--json"])).key;
  const port = await freePort();
  base = `http://127.0.0.1:${port}`;
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
});

after(() => {
  server?.kill("SIGTERM");
  spawnSync("psql", [dbUrl, "-q", "-c", `DROP SCHEMA IF EXISTS ${schema} CASCADE`], { env });
  const found = spawnSync("redis-cli", ["-u", redisUrl, "--scan", "--pattern", `{${ns}:*`], { encoding: "utf8" });
  const names = found.stdout.split("\n").filter(Boolean);
  if (names.length) spawnSync("redis-cli", ["-u", redisUrl, "DEL", ...names]);
});

test("enqueue, read, cancel, batch and usage for the key's tenant", async () => {
  const a = new AgentqClient({ baseUrl: base, apiKey: keys["ts-a"] });
  const { id, created } = await a.enqueue({ queue: "q", kind: "echo", payload: { hello: "ts" }, idempotency_key: "one" });
  assert.equal(created, true);
  assert.deepEqual(await a.enqueue({ queue: "q", kind: "echo", payload: { hello: "ts" }, idempotency_key: "one" }), { id, created: false });
  const job = await a.get(id);
  assert.equal(job.tenant, "ts-a");
  assert.equal(job.state, "ready");
  assert.deepEqual(job.payload, { hello: "ts" });
  await a.cancel(id);
  assert.equal((await a.get(id)).state, "cancelled");
  const batch = await a.enqueueBatch([{ queue: "q", kind: "echo" }, { queue: "q", kind: "echo", delay: "1h" }]);
  assert.equal(batch.length, 2);
  assert.deepEqual(await a.usage(), []);
});

test("errors carry status and code; other tenants' jobs are out of reach", async () => {
  const a = new AgentqClient({ baseUrl: base, apiKey: keys["ts-a"] });
  const b = new AgentqClient({ baseUrl: base, apiKey: keys["ts-b"] });
  const { id } = await a.enqueue({ queue: "q", kind: "echo" });
  await assert.rejects(b.get(id), (e: AgentqError) => e.status === 403 && e.code === "forbidden");
  await assert.rejects(b.cancel(id), (e: AgentqError) => e.status === 403);
  await assert.rejects(a.enqueue({ queue: "bad queue!", kind: "echo" }), (e: AgentqError) => e.status === 400);
  const nobody = new AgentqClient({ baseUrl: base, apiKey: "aq_00000000_" + "0".repeat(64) });
  await assert.rejects(nobody.get(id), (e: AgentqError) => e.status === 401 && e.code === "unauthorized");
});
