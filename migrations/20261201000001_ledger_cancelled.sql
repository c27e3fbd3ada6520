-- Outcome "cancelled": an attempt stopped by a cancel of its running job
-- (cancel.lua). The rest of the CHECK is as before.
ALTER TABLE usage_ledger DROP CONSTRAINT IF EXISTS usage_ledger_outcome_check;
ALTER TABLE usage_ledger ADD CONSTRAINT usage_ledger_outcome_check
    CHECK (outcome IN ('succeeded', 'failed', 'timed_out', 'memory_exceeded', 'lost', 'cancelled'));
