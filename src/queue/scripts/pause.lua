-- pause.lua: pause or resume a queue, or one tenant on a queue.
--
-- KEYS[1]  partition base, e.g. "{agentq:0}"
-- ARGV[1]  queue name
-- ARGV[2]  tenant name, or "" for the whole queue
-- ARGV[3]  "1" to pause, "0" to resume
-- Returns  1 if the paused state changed, 0 if it already was as asked.
-- Invariant: a paused tenant leaves the queue's sched set (so claim never sees
--          it); a paused queue is skipped by claim. Running jobs are not
--          touched: pausing stops new starts only.

local q, t, on = ARGV[1], ARGV[2], ARGV[3] == '1'
local member = (t == '') and ('q:' .. q) or ('qt:' .. q .. ':' .. t)
local changed
if on then
  changed = redis.call('SADD', k('paused'), member)
else
  changed = redis.call('SREM', k('paused'), member)
end
redis.call('SADD', k('queues'), q)
if t ~= '' then sync_tenant(t) end
finish()
if not on then redis.call('PUBLISH', k('wake'), '1') end
return changed
