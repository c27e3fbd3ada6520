-- purge.lua: delete the ready and delayed jobs of a queue (drain --purge).
--
-- KEYS[1]  partition base, e.g. "{agentq:0}"
-- ARGV[1]  queue name
-- ARGV[2]  most jobs to delete in this call
-- Returns  the tenant of each job deleted (fewer than ARGV[2]: done).
-- Invariant: running jobs are never touched; counters, the tenants' queue
--          sets and the sched set stay consistent with what is left.

local q, max = ARGV[1], tonumber(ARGV[2])
local out = {}
for _, t in ipairs(redis.call('SMEMBERS', k('tenants'))) do
  if #out >= max then break end
  local rk = k('q', q, 't', t)
  local ids = redis.call('ZRANGE', rk, 0, max - #out - 1)
  for _, id in ipairs(ids) do
    redis.call('ZREM', rk, id)
    redis.call('DEL', k('job', id))
    stat(q, t, 'ready', -1)
    out[#out + 1] = t
  end
  if #ids > 0 and redis.call('EXISTS', rk) == 0 then ready_ran_dry(q, t) end
end
local dk = k('q', q, 'delayed')
if #out < max then
  for _, id in ipairs(redis.call('ZRANGE', dk, 0, max - #out - 1)) do
    local t = redis.call('HGET', k('job', id), 'tenant') or ''
    redis.call('ZREM', dk, id)
    redis.call('DEL', k('job', id))
    if t ~= '' then stat(q, t, 'delayed', -1) end
    out[#out + 1] = t
  end
end
finish()
return out
