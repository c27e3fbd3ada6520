-- Operator keys and key expiry. A key's scope is 'tenant' (the tenant API,
-- as before) or 'admin' (the /v1/admin control plane only); admin keys are
-- stored with tenant '*', which no tenant can be named (names start with a
-- letter or digit), so an admin key can never be mistaken for a tenant's.
-- expires_at NULL: the key never expires; past it the key is refused like
-- a revoked one.
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS scope text NOT NULL DEFAULT 'tenant'
    CHECK (scope IN ('tenant', 'admin'));
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS expires_at timestamptz;
-- Admin keys, and only they, carry tenant '*'.
ALTER TABLE api_keys DROP CONSTRAINT IF EXISTS api_keys_admin_tenant;
ALTER TABLE api_keys ADD CONSTRAINT api_keys_admin_tenant
    CHECK ((scope = 'admin') = (tenant = '*'));
