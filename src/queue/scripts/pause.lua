-- pause.lua: pause or resume a queue, or one tenant on a queue.
--
-- KEYS[1]  partition base, e.g. "{agentq:0}"
-- ARGV[1]  queue name
-- ARGV[2]  tenant name, or "" for the whole queue
-- ARGV[3]  "1" to pause, "0" to resume
-- Returns  1 if the paused state changed, 0 if it already was as asked.
-- Invariant: a paused tenant, or every tenant of a paused queue, leaves the
--          queue's sched set (so claim never sees it) keeping what it owes;
--          on resume it enters again at the queue's virtual time, which the
--          pool's claims kept moving meanwhile, so the pause earns no
--          credit. Running jobs are not touched: pausing stops new starts
--          only.

local q, t, on = ARGV[1], ARGV[2], ARGV[3] == '1'
local member = (t == '') and ('q:' .. q) or ('qt:' .. q .. ':' .. t)
local changed
if on then
  changed = redis.call('SADD', k('paused'), member)
else
  changed = redis.call('SREM', k('paused'), member)
end
redis.call('SADD', k('queues'), q)
if t ~= '' then
  sync_tenant(t)
else
  -- O(tenants of the partition), an operator action.
  local all = redis.call('SMEMBERS', k('tenants'))
  prefetch(all)
  for _, name in ipairs(all) do
    if tenant_queues(name)[q] then sync_tenant(name) end
  end
end
finish()
if not on then redis.call('PUBLISH', k('wake'), '1') end
return changed
