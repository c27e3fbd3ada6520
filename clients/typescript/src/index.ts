/**
 * agentq HTTP API client. The tenant comes from the API key
 * (`agentq tenant key create T`), never from the request.
 *
 *   const client = new AgentqClient({ baseUrl: "http://127.0.0.1:8080", apiKey: process.env.AGENTQ_KEY! });
 *   const { id } = await client.enqueue({ queue: "default", kind: "agent-sim", payload: { prompt: "hi" } });
 *   const job = await client.get(id);
 *   for await (const e of client.events(id)) console.log(e.type);   // enqueued, started, ..., succeeded
 *   const done = await client.waitUntilFinished(id, { timeout: 60_000 });
 */

/** A job to enqueue. Durations read like "30s", sizes like "256MiB". */
export interface JobIn {
  queue: string;
  kind: string;
  payload?: unknown;
  timeout?: string;
  memory?: string;
  delay?: string;
  /** -100..100, higher first within the tenant. */
  priority?: number;
  max_attempts?: number;
  /** Per tenant: reusing it returns the first job (or a 409 if the job differs). */
  idempotency_key?: string;
}

export interface Enqueued {
  id: string;
  /** false when an idempotency key matched an earlier job. */
  created: boolean;
}

export interface Job {
  id: string;
  tenant: string;
  queue: string;
  kind: string;
  state: "ready" | "delayed" | "running" | "succeeded" | "dead" | "cancelled";
  attempts: number;
  outcome: string | null;
  enqueued_at: string | null;
  started_at: string | null;
  finished_at: string | null;
  last_error: string | null;
  payload: unknown;
  result: unknown;
  [field: string]: unknown;
}

/** What happened to a job (`unknown`: a type this client does not know yet). */
export type JobEventType =
  | "enqueued"
  | "started"
  | "progress"
  | "failed"
  | "retrying"
  | "succeeded"
  | "dead"
  | "cancelled"
  | "unknown";

/** One state change of one job, as `GET /v1/jobs/{id}/events` and `GET /v1/events` send it. */
export interface JobEvent {
  /** Its position in the tenant's stream (`<ms>-<seq>`): resume after it. */
  id: string;
  job: string;
  type: JobEventType;
  queue: string;
  /** Redis time, ms since the epoch. */
  at: number;
  attempt?: number;
  /** How the attempt ended (failed). */
  outcome?: string;
  error?: string;
  /** The task's result (succeeded). */
  result?: unknown;
  /** A result too large for the event (over 16 KiB): its size; read it with `get(id)`. */
  result_bytes?: number;
  /** The task's report (progress). */
  progress?: unknown;
  /** When the job runs (enqueued with a delay, retrying), ms since the epoch. */
  run_at?: number;
}

/** The types that end a job. */
export const FINAL_EVENT_TYPES: ReadonlySet<string> = new Set(["succeeded", "dead", "cancelled"]);

export interface EventsOptions {
  /** Start after this event id (`<ms>-<seq>`); default: a job's events from its enqueue, a tenant's from now. */
  after?: string;
  /** Stops the iteration (the iterator then throws the abort reason). */
  signal?: AbortSignal;
  /** First pause before reconnecting after a dropped connection, ms (default 250; doubles up to 5000). */
  retryMs?: number;
}

export interface WaitOptions {
  /** Give up after this many ms (default 60000). */
  timeout?: number;
}

export interface UsageDay {
  tenant: string;
  period: string;
  attempts: number;
  succeeded: number;
  agent_ms: number;
  cpu_ms: number;
  cost_micros: number;
  [field: string]: unknown;
}

/** An error answered by the API: status, a stable code, a one-line message. */
export class AgentqError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    /** Seconds to wait, on 429. */
    readonly retryAfter?: number,
  ) {
    super(message);
    this.name = "AgentqError";
  }
}

/** `waitUntilFinished` ran out of time; `job` is the job as it stood then. */
export class WaitTimeoutError extends Error {
  constructor(
    readonly job: Job,
    readonly timeoutMs: number,
  ) {
    super(`job ${job.id} did not finish within ${timeoutMs} ms (it is ${job.state})`);
    this.name = "WaitTimeoutError";
  }
}

export interface ClientOptions {
  baseUrl: string;
  apiKey: string;
  /** Per-request timeout in ms (default 30000). */
  timeoutMs?: number;
}

export class AgentqClient {
  private readonly base: string;

  constructor(private readonly opts: ClientOptions) {
    this.base = opts.baseUrl.replace(/\/+$/, "");
  }

  /** Enqueue one job. */
  async enqueue(job: JobIn): Promise<Enqueued> {
    return this.call<Enqueued>("POST", "/v1/jobs", job);
  }

  /** Enqueue up to 1000 jobs in one request. */
  async enqueueBatch(jobs: JobIn[]): Promise<Enqueued[]> {
    const r = await this.call<{ jobs: Enqueued[] }>("POST", "/v1/jobs", { jobs });
    return r.jobs;
  }

  /** A job of the caller's tenant. */
  async get(id: string): Promise<Job> {
    return this.call<Job>("GET", `/v1/jobs/${encodeURIComponent(id)}`);
  }

  /**
   * Cancel a job that has not finished: queued, or running (its worker kills it; the job
   * shows `running` until that attempt closes as `cancelled`). Cancelling a cancelled job
   * again succeeds; a succeeded or dead job is refused with a 409 AgentqError.
   */
  async cancel(id: string): Promise<void> {
    await this.call("DELETE", `/v1/jobs/${encodeURIComponent(id)}`);
  }

  /** The caller's usage per UTC day; dates as YYYY-MM-DD. */
  async usage(since?: string, until?: string): Promise<UsageDay[]> {
    const q = new URLSearchParams();
    if (since) q.set("since", since);
    if (until) q.set("until", until);
    const qs = q.toString();
    const r = await this.call<{ days: UsageDay[] }>("GET", `/v1/usage${qs ? `?${qs}` : ""}`);
    return r.days;
  }

  /**
   * Wait until the job has ended (succeeded, dead or cancelled) and return it; a dead or
   * cancelled job is returned too (check `state`). Long-polls `GET /v1/jobs/{id}?wait=`
   * (at most 60 s a request) until then; throws `WaitTimeoutError` (with the job as it stood)
   * when `timeout` runs out first. A request that fails on the network or with a 5xx is
   * retried until the timeout; other API errors are thrown as `AgentqError`.
   */
  async waitUntilFinished(id: string, opts: WaitOptions = {}): Promise<Job> {
    const timeoutMs = opts.timeout ?? 60_000;
    const deadline = Date.now() + timeoutMs;
    const path = `/v1/jobs/${encodeURIComponent(id)}`;
    let job: Job | undefined;
    for (let left = timeoutMs; left > 0; left = deadline - Date.now()) {
      const wait = Math.min(left, 60_000);
      try {
        job = await this.call<Job>("GET", `${path}?wait=${wait}ms`, undefined, wait + this.requestTimeout());
      } catch (e) {
        if (!retryable(e)) throw e;
        await sleep(Math.min(500, Math.max(0, deadline - Date.now())));
        continue;
      }
      if (FINAL_EVENT_TYPES.has(job.state)) return job;
    }
    throw new WaitTimeoutError(job ?? (await this.get(id)), timeoutMs);
  }

  /**
   * Server-Sent Events as an async iterator. `events(id)`: the job's events from its
   * enqueue, ending after the final one (succeeded, dead, cancelled). `events()`: every
   * event of the caller's tenant from now on; never ends (break out of the loop, or abort
   * `signal`, to stop). A dropped connection is reopened with `Last-Event-ID`, so events
   * the server still retains are neither lost nor repeated (before the first event of
   * `events()`, a reconnect starts from now again). API errors other than 5xx/429 throw.
   */
  async *events(id?: string, opts: EventsOptions = {}): AsyncGenerator<JobEvent, void, undefined> {
    const path = id === undefined ? "/v1/events" : `/v1/jobs/${encodeURIComponent(id)}/events`;
    let last = opts.after;
    let pause = opts.retryMs ?? 250;
    while (true) {
      const stop = new AbortController();
      const onAbort = () => stop.abort(opts.signal?.reason);
      opts.signal?.addEventListener("abort", onAbort, { once: true });
      try {
        for await (const e of this.openEvents(path, last, stop.signal)) {
          last = e.id;
          pause = opts.retryMs ?? 250;
          yield e;
          if (id !== undefined && FINAL_EVENT_TYPES.has(e.type)) return;
        }
      } catch (e) {
        if (opts.signal?.aborted) throw opts.signal.reason;
        if (!retryable(e)) throw e;
      } finally {
        // Also when the caller breaks out of its loop: close the connection.
        opts.signal?.removeEventListener("abort", onAbort);
        stop.abort();
      }
      // The stream ended or dropped before the job's end: reconnect after `last`.
      await sleep(pause);
      pause = Math.min(pause * 2, 5_000);
    }
  }

  /** One SSE connection: its events until it ends or drops. */
  private async *openEvents(path: string, after: string | undefined, signal: AbortSignal): AsyncGenerator<JobEvent> {
    const res = await fetch(this.base + path, {
      headers: {
        authorization: `Bearer ${this.opts.apiKey}`,
        accept: "text/event-stream",
        ...(after === undefined ? {} : { "last-event-id": after }),
      },
      signal,
    });
    if (!res.ok || !res.body) throw await apiError(res);
    for await (const m of sseMessages(res.body)) {
      if (m.data === "") continue;
      yield JSON.parse(m.data) as JobEvent;
    }
  }

  private requestTimeout(): number {
    return this.opts.timeoutMs ?? 30_000;
  }

  private async call<T>(method: string, path: string, body?: unknown, timeoutMs?: number): Promise<T> {
    const res = await fetch(this.base + path, {
      method,
      headers: {
        authorization: `Bearer ${this.opts.apiKey}`,
        ...(body === undefined ? {} : { "content-type": "application/json" }),
      },
      body: body === undefined ? undefined : JSON.stringify(body),
      signal: AbortSignal.timeout(timeoutMs ?? this.requestTimeout()),
    });
    if (!res.ok) throw await apiError(res);
    const text = await res.text();
    return parseJson(text) as T;
  }
}

function parseJson(text: string): any {
  try {
    return text ? JSON.parse(text) : undefined;
  } catch {
    return undefined;
  }
}

/** The API's error reply as an AgentqError. */
async function apiError(res: Response): Promise<AgentqError> {
  const data = parseJson(await res.text().catch(() => ""));
  const retry = res.headers.get("retry-after");
  return new AgentqError(
    res.status,
    data?.error?.code ?? "http_error",
    data?.error?.message ?? `HTTP ${res.status}`,
    retry ? Number(retry) : undefined,
  );
}

/** Worth trying again: the network failed (server restarting), or the server said 5xx or 429. */
function retryable(e: unknown): boolean {
  if (e instanceof AgentqError) return e.status >= 500 || e.status === 429;
  return e instanceof TypeError || (e instanceof Error && /terminated|ECONNRESET|socket|aborted|timeout/i.test(`${e.name} ${e.message}`));
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** One Server-Sent Events message. */
export interface SseMessage {
  id?: string;
  event?: string;
  data: string;
}

/** Parse an SSE body (text/event-stream) into messages; comments (keep-alives) are skipped. */
export async function* sseMessages(body: ReadableStream<Uint8Array>): AsyncGenerator<SseMessage> {
  const decoder = new TextDecoder();
  let buffer = "";
  let msg: SseMessage = { data: "" };
  let hasData = false;
  for await (const chunk of body as unknown as AsyncIterable<Uint8Array>) {
    buffer += decoder.decode(chunk, { stream: true });
    let nl: number;
    while ((nl = buffer.search(/\r\n|\n|\r/)) >= 0) {
      // A "\r" ending the chunk may be the first half of "\r\n": wait for the next chunk.
      if (nl === buffer.length - 1 && buffer[nl] === "\r") break;
      const line = buffer.slice(0, nl);
      buffer = buffer.slice(nl + (buffer.startsWith("\r\n", nl) ? 2 : 1));
      if (line === "") {
        if (hasData) yield msg;
        msg = { data: "" };
        hasData = false;
        continue;
      }
      if (line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "data") {
        msg.data = hasData ? `${msg.data}\n${value}` : value;
        hasData = true;
      } else if (field === "id") msg.id = value;
      else if (field === "event") msg.event = value;
    }
  }
}
