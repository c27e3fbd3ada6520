-- Cost per attempt, the daily rollup billing reads, tenants and tiers, and
-- tenant isolation for tenant-facing reads.

ALTER TABLE usage_ledger ADD COLUMN IF NOT EXISTS cost_micros bigint NOT NULL DEFAULT 0;

-- One row per tenant and UTC day, maintained by the ledger writer in the same
-- statement that inserts ledger rows (only rows actually inserted count, so
-- replays never double-count).
CREATE TABLE IF NOT EXISTS usage_daily (
    tenant           text    NOT NULL,
    day              date    NOT NULL,
    attempts         bigint  NOT NULL DEFAULT 0,
    succeeded        bigint  NOT NULL DEFAULT 0,
    failed           bigint  NOT NULL DEFAULT 0,
    timed_out        bigint  NOT NULL DEFAULT 0,
    memory_exceeded  bigint  NOT NULL DEFAULT 0,
    lost             bigint  NOT NULL DEFAULT 0,
    agent_ms         bigint  NOT NULL DEFAULT 0,
    cpu_ms           bigint  NOT NULL DEFAULT 0,
    peak_rss_bytes   bigint  NOT NULL DEFAULT 0,
    api_calls        bigint  NOT NULL DEFAULT 0,
    input_tokens     bigint  NOT NULL DEFAULT 0,
    output_tokens    bigint  NOT NULL DEFAULT 0,
    cost_micros      bigint  NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, day)
);

-- Tiers as published by workers, and tenants seen by the ledger (the Redis
-- side holds the live limits; these are for billing joins and reports).
CREATE TABLE IF NOT EXISTS tiers (
    name        text PRIMARY KEY,
    settings    jsonb NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS tenants (
    name        text PRIMARY KEY,
    first_seen  timestamptz NOT NULL DEFAULT now()
);

-- Tenant-facing reads run as role agentq_tenant with the session setting
-- agentq.tenant; row-level security shows them only that tenant's rows.
-- Roles are cluster-wide: create it once, tolerate a concurrent creator.
DO $$
BEGIN
    CREATE ROLE agentq_tenant NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;
END $$;

ALTER TABLE usage_ledger ENABLE ROW LEVEL SECURITY;
ALTER TABLE usage_daily ENABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS tenant_isolation ON usage_ledger;
CREATE POLICY tenant_isolation ON usage_ledger TO agentq_tenant
    USING (tenant = current_setting('agentq.tenant', true));
DROP POLICY IF EXISTS tenant_isolation ON usage_daily;
CREATE POLICY tenant_isolation ON usage_daily TO agentq_tenant
    USING (tenant = current_setting('agentq.tenant', true));

-- Only the parent tables: partitions are not readable directly, so every
-- tenant read goes through the policy.
DO $$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO agentq_tenant', current_schema());
END $$;
GRANT SELECT ON usage_ledger, usage_daily TO agentq_tenant;
