-- cancel.lua: cancel a job that has not started.
--
-- KEYS[1]  partition base, e.g. "{agentq:0}"
-- ARGV[1]  job id
-- Returns  the job's state before: "ready" or "delayed" (now cancelled),
--          anything else (running, succeeded, dead, cancelled) unchanged,
--          or "" when there is no such job.
-- Invariant: only a job that has not started is cancelled; its counters and
--          its tenant's scheduling state stay consistent.

local id = ARGV[1]
local jk = k('job', id)
local v = redis.call('HMGET', jk, 'state', 'tenant', 'queue')
local state, t, q = v[1], v[2], v[3]
if not state then return '' end
if state == 'ready' then
  redis.call('ZREM', k('q', q, 't', t), id)
  stat(q, t, 'ready', -1)
  if redis.call('EXISTS', k('q', q, 't', t)) == 0 then ready_ran_dry(q, t) end
  sync_tenant(t)
elseif state == 'delayed' then
  redis.call('ZREM', k('q', q, 'delayed'), id)
  stat(q, t, 'delayed', -1)
else
  return state
end
local now = now_ms()
redis.call('HSET', jk, 'state', 'cancelled', 'finished_at', now)
redis.call('PEXPIRE', jk, default('retention_ms'))
finish()
return state
