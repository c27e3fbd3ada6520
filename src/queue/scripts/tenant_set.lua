-- tenant_set.lua: change a tenant's limits (or the partition defaults) at run time.
--
-- KEYS[1]  partition base, e.g. "{agentq:0}"
-- ARGV[1]  tenant name, or "" to change the defaults for unconfigured fields
-- ARGV[2..] pairs: field, value; value "" removes the field (back to default).
--          Fields: max_concurrency, max_timeout_ms, max_memory, weight,
--          tier (text); defaults also take max_payload, idem_ttl_ms,
--          retention_ms, default_max_attempts.
-- Returns  1
-- Invariant: limits are read by every claim, so a change is effective
--          fleet-wide on the next claim; tenants whose admissibility changed
--          enter or leave the sched sets here, atomically with the change.

local t = ARGV[1]
local key = (t == '') and k('defaults') or k('tenant', t)
for i = 2, #ARGV - 1, 2 do
  if ARGV[i + 1] == '' then
    redis.call('HDEL', key, ARGV[i])
  else
    redis.call('HSET', key, ARGV[i], ARGV[i + 1])
  end
end
if t == '' then
  for _, name in ipairs(redis.call('SMEMBERS', k('tenants'))) do sync_tenant(name) end
else
  redis.call('SADD', k('tenants'), t)
  sync_tenant(t)
end
redis.call('PUBLISH', k('wake'), '1')
return 1
