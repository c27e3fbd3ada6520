-- The usage ledger: one row per attempt, written by the ledger writer from
-- the Redis outbox stream. Partitioned by month of finished_at.
--
-- Uniqueness: a partitioned table's primary key must include the partition
-- key, so the key is (job_id, attempt, finished_at). An outbox record is
-- immutable, so a replayed record carries the same finished_at, lands in the
-- same partition and hits the same key: (job_id, attempt) is unique in
-- practice, and the writer's ON CONFLICT DO NOTHING makes replays harmless.
CREATE TABLE IF NOT EXISTS usage_ledger (
    job_id          text        NOT NULL,
    attempt         integer     NOT NULL CHECK (attempt >= 1),
    tenant          text        NOT NULL,
    queue           text        NOT NULL,
    kind            text        NOT NULL,
    outcome         text        NOT NULL
        CHECK (outcome IN ('succeeded', 'failed', 'timed_out', 'memory_exceeded', 'lost')),
    enqueued_at     timestamptz NOT NULL,
    started_at      timestamptz NOT NULL,
    finished_at     timestamptz NOT NULL,
    wait_ms         bigint      NOT NULL DEFAULT 0,
    run_ms          bigint      NOT NULL DEFAULT 0,
    cpu_ms          bigint      NOT NULL DEFAULT 0,
    peak_rss_bytes  bigint      NOT NULL DEFAULT 0,
    exit_code       integer,
    signal          integer,
    worker          text        NOT NULL DEFAULT '',
    api_calls       bigint      NOT NULL DEFAULT 0,
    input_tokens    bigint      NOT NULL DEFAULT 0,
    output_tokens   bigint      NOT NULL DEFAULT 0,
    error           text        NOT NULL DEFAULT '',
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, attempt, finished_at)
) PARTITION BY RANGE (finished_at);

-- Rows whose month has no partition yet land here rather than fail.
CREATE TABLE IF NOT EXISTS usage_ledger_default PARTITION OF usage_ledger DEFAULT;

CREATE INDEX IF NOT EXISTS usage_ledger_tenant_finished ON usage_ledger (tenant, finished_at);

-- Create the monthly partition containing `month` if it is missing.
CREATE OR REPLACE FUNCTION agentq_ensure_ledger_partition(month date) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    start_at date := date_trunc('month', month)::date;
    name text := 'usage_ledger_' || to_char(start_at, 'YYYY_MM');
BEGIN
    IF to_regclass(name) IS NULL THEN
        EXECUTE format(
            'CREATE TABLE IF NOT EXISTS %I PARTITION OF usage_ledger FOR VALUES FROM (%L) TO (%L)',
            name, start_at, (start_at + interval '1 month')::date);
    END IF;
END $$;

-- This month and the next two exist from the start; the writer keeps ahead.
SELECT agentq_ensure_ledger_partition((now() + make_interval(months => m))::date)
FROM generate_series(0, 2) AS m;
