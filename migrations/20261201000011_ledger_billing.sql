-- Volume pricing (README, "Volume pricing"): how each attempt of a tenant
-- with price steps was priced, as charge() (lib/attempt.lua) wrote it in the
-- outbox record's field b: the month's usage before the attempt (u<ms>,
-- k<tokens>) and, per price step the attempt used, the quantity and amount
-- billed there (m|t<from>:<micros>:<qty>:<amount>). Empty for tenants
-- priced flat. Invoices (agentq invoice) read their step lines from it; a
-- row keeps the price it was billed at.
ALTER TABLE usage_ledger ADD COLUMN IF NOT EXISTS billing text NOT NULL DEFAULT '';
