-- cancel.lua: cancel a job that has not finished: queued, or running.
--
-- KEYS[1]  partition base, e.g. "{agentq:0}"
-- ARGV[1]  job id
-- Returns  the job's state before: "ready" or "delayed" (now cancelled),
--          "running" (now being cancelled: its attempt is marked, see
--          below; a repeated cancel of it answers "running" again), anything
--          else (succeeded, dead, cancelled) unchanged, or "" when there is
--          no such job.
-- Invariant: only a job that has not finished is cancelled; its counters and
--          its tenant's scheduling state stay consistent. A running job is
--          not closed here: its current attempt (the one B:job:<id>.attempts
--          names, read in this same atomic step: only that attempt) is
--          marked (job field `cancel` = the attempt) and its worker told
--          "cancel <id> <attempt>" on the partition's wake channel. The
--          attempt keeps its lease and its tenant slot until it is closed, so
--          a tenant's cap is never overrun by a dying process: the worker
--          kills the process group and completes the attempt, and
--          complete.lua closes a marked attempt as "cancelled" (no retry, not
--          dead-lettered, one usage record with the worker's measured time,
--          CPU and peak RSS) unless it succeeded (it ended before the kill:
--          success stands). A worker that missed the message hears of the
--          mark from its next heartbeat (extend.lua); a dead worker's marked
--          attempt is closed as "cancelled" by the reaper (reap.lua), a
--          shutting-down worker's by release.lua. Nothing is billed twice:
--          the mark changes no counter and writes no record.

local id = ARGV[1]
local jk = k('job', id)
local v = redis.call('HMGET', jk, 'state', 'tenant', 'queue', 'attempts')
local state, t, q = v[1], v[2], v[3]
if not state then return '' end
if state == 'running' then
  -- Marking twice changes nothing; the message is said again (a worker may
  -- have missed the first).
  redis.call('HSET', jk, 'cancel', v[4])
  redis.call('PUBLISH', k('wake'), 'cancel ' .. id .. ' ' .. v[4])
  return state
end
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
feed(t, q, id, 'cancelled')
redis.call('PEXPIRE', jk, default('retention_ms'))
finish()
return state
