-- usage_raise.lua: raise a tenant's usage counter for a month to at least a
-- value (agentq usage --reconcile, after Redis lost data), never lowering it.
--
-- KEYS[1]  partition base, e.g. "{agentq:0}"
-- ARGV[1]  tenant name
-- ARGV[2]  month, "YYYY-MM" (UTC)
-- ARGV[3]  agent ms the counter must reach
-- Returns  { before, after }
-- Invariant: atomic with completions (which add to the same counter), so a
--          completion between reading and writing is never overwritten; the
--          tenant's admission is re-checked at once (it may now be over its
--          quota).

local t, month, want = ARGV[1], ARGV[2], tonumber(ARGV[3])
local key = k('usage', t)
local before = tonumber(redis.call('HGET', key, month)) or 0
local after = before
if want and want > before then
  redis.call('HSET', key, month, want)
  after = want
  sync_tenant(t)
  finish()
end
return { before, after }
