/**
 * agentq HTTP API client. The tenant comes from the API key
 * (`agentq tenant key create T`), never from the request.
 *
 *   const client = new AgentqClient({ baseUrl: "http://127.0.0.1:8080", apiKey: process.env.AGENTQ_KEY! });
 *   const { id } = await client.enqueue({ queue: "default", kind: "agent-sim", payload: { prompt: "hi" } });
 *   const job = await client.get(id);
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

  /** Cancel a job that has not finished: queued, or running (killed); 409 AgentqError once it has finished. */
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

  private async call<T>(method: string, path: string, body?: unknown): Promise<T> {
    const res = await fetch(this.base + path, {
      method,
      headers: {
        authorization: `Bearer ${this.opts.apiKey}`,
        ...(body === undefined ? {} : { "content-type": "application/json" }),
      },
      body: body === undefined ? undefined : JSON.stringify(body),
      signal: AbortSignal.timeout(this.opts.timeoutMs ?? 30_000),
    });
    const text = await res.text();
    let data: any = undefined;
    try {
      data = text ? JSON.parse(text) : undefined;
    } catch {
      data = undefined;
    }
    if (!res.ok) {
      const retry = res.headers.get("retry-after");
      throw new AgentqError(
        res.status,
        data?.error?.code ?? "http_error",
        data?.error?.message ?? `HTTP ${res.status}`,
        retry ? Number(retry) : undefined,
      );
    }
    return data as T;
  }
}
