-- Outbox entries the ledger writer could not store as they were, kept aside
-- raw, so that one bad record never stops the ledger and none is dropped
-- silently (docs/runbook.md#ledger-rejects).
--
-- reason: 'repaired'     PostgreSQL refused the record (a NUL byte, invalid
--                        UTF-8, ...); a copy with its text cleaned is in
--                        usage_ledger, with every figure.
--         'unrepairable' refused even cleaned (an outcome the CHECK does not
--                        allow, ...): not in usage_ledger.
--         'malformed'    not a usage record at all: not in usage_ledger.
-- fields: the stream entry's fields as received (name, value, name, value,
--         ...), bytea because they may hold NUL or invalid UTF-8.
-- job_id, attempt, tenant: cleaned, as far as the entry names them.
-- Unique per stream and entry id: a batch replayed after a crash between
-- insert and acknowledgement adds nothing.
CREATE TABLE IF NOT EXISTS usage_ledger_rejects (
    stream       text        NOT NULL,
    entry_id     text        NOT NULL,
    partition    integer     NOT NULL,
    reason       text        NOT NULL CHECK (reason IN ('repaired', 'unrepairable', 'malformed')),
    job_id       text,
    attempt      integer,
    tenant       text,
    error        text        NOT NULL,
    fields       bytea[]     NOT NULL,
    rejected_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream, entry_id)
);

CREATE INDEX IF NOT EXISTS usage_ledger_rejects_rejected_at ON usage_ledger_rejects (rejected_at);

-- The value of stream field `name` in a rejects row's `fields`, or NULL.
CREATE OR REPLACE FUNCTION agentq_outbox_field(fields bytea[], name text) RETURNS bytea
LANGUAGE sql IMMUTABLE AS $$
    SELECT fields[i + 1] FROM generate_subscripts(fields, 1) AS i
    WHERE (i - array_lower(fields, 1)) % 2 = 0 AND fields[i] = convert_to(name, 'UTF8')
    ORDER BY i LIMIT 1
$$;

-- Operators only: these rows hold raw task output of every tenant. The
-- tenant role gets no grant, and row-level security without a policy shows
-- other roles no row even if a grant is added by mistake (the owner, which
-- the writers and operators use, is not subject to it).
ALTER TABLE usage_ledger_rejects ENABLE ROW LEVEL SECURITY;
REVOKE ALL ON usage_ledger_rejects FROM PUBLIC;
REVOKE ALL ON usage_ledger_rejects FROM agentq_tenant;
