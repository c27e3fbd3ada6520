-- Tenant API keys for the HTTP API. Only a SHA-256 of the secret is stored
-- (keys are 256-bit random, so a fast hash is enough: there is nothing to
-- brute-force offline); the prefix identifies a key in listings and logs.
CREATE TABLE IF NOT EXISTS api_keys (
    prefix      text PRIMARY KEY,
    tenant      text NOT NULL,
    secret_hash bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
CREATE INDEX IF NOT EXISTS api_keys_tenant ON api_keys (tenant);
