-- tenant_set.lua: change a tenant's limits, a tier's, or the partition
-- defaults, at run time.
--
-- KEYS[1]  partition base, e.g. "{agentq:0}"
-- ARGV[1]  a tenant name, "tier:<name>" for a tier, or "" for the defaults
-- ARGV[2..] pairs: field, value; value "" removes the field (back to the
--          next layer: tenant -> tier -> defaults -> built-in). Fields: the
--          LIMIT_FIELDS of lib.lua, and "tier" (text) on a tenant; defaults
--          also take max_payload, idem_ttl_ms, retention_ms,
--          default_max_attempts.
-- Returns  1
-- Invariant: limits are read by every claim, so a change is effective
--          fleet-wide on the next claim; tenants whose admissibility changed
--          enter or leave the sched sets here, atomically with the change.

local t = ARGV[1]
local tier = t:match('^tier:(.+)$')
local key = (t == '') and k('defaults') or (tier and k('tier', tier)) or k('tenant', t)
-- A tenant's weight may change while it waits: take its old weight out of
-- the admissible weight of its queues here, and put the new one back below.
local waiting = {}
if t ~= '' and not tier then
  for q in pairs(tenant_queues(t)) do
    if sched_score(q, t) then
      waiting[#waiting + 1] = q
      add_weight(q, -weight(t))
    end
  end
  limits_cache[t] = nil
end
for i = 2, #ARGV - 1, 2 do
  if ARGV[i + 1] == '' then
    redis.call('HDEL', key, ARGV[i])
  else
    redis.call('HSET', key, ARGV[i], ARGV[i + 1])
  end
end
if tier then redis.call('SADD', k('tiers'), tier) end
if t == '' or tier then
  -- O(tenants), an operator action: every tenant may have changed.
  for _, name in ipairs(redis.call('SMEMBERS', k('tenants'))) do sync_tenant(name) end
  finish()
  for _, q in ipairs(redis.call('SMEMBERS', k('queues'))) do recount_weight(q) end
else
  redis.call('SADD', k('tenants'), t)
  for _, q in ipairs(waiting) do add_weight(q, weight(t)) end
  sync_tenant(t)
  finish()
end
redis.call('PUBLISH', k('wake'), '1')
return 1
