-- cancel.lua: cancel a job that has not finished: queued, or running.
--
-- KEYS[1]  partition base, e.g. "{agentq:0}"
-- ARGV[1]  job id
-- Returns  the job's state before: "ready", "delayed" or "running" (now
--          cancelled), anything else (succeeded, dead, cancelled) unchanged,
--          or "" when there is no such job.
-- Invariant: only a job that has not finished is cancelled; its counters and
--          its tenant's scheduling state stay consistent. A running job's
--          current attempt (the one B:job:<id>.attempts names, read in this
--          same atomic step: only that attempt) is closed here like a
--          completion with outcome "cancelled": its lease is dropped, the
--          tenant slot freed, the attempt charged and its one usage record
--          appended (run_ms up to now, Redis clock; the worker's CPU and peak
--          RSS are not known here, as for a reaped attempt), no retry, not
--          dead-lettered. Its worker's completion then finds the job not
--          running and is refused (complete.lua), so nothing is resurrected
--          or billed twice. The slot is freed at once rather than when the
--          worker reports: the worker hears "cancel <id> <attempt>" on the
--          partition's wake channel and kills the process group at once (its
--          next heartbeat, extend.lua, reports the attempt gone if the message
--          was missed), so the tenant's cap may be overrun by the sub-second
--          overlap of the dying process and a newly admitted job; holding the
--          slot for the worker's report would instead tie the slot to a
--          worker that may never report (crashed), leaving it to the reaper.

local id = ARGV[1]
local jk = k('job', id)
local v = redis.call('HMGET', jk, 'state', 'tenant', 'queue')
local state, t, q = v[1], v[2], v[3]
if not state then return '' end
if state == 'running' then
  local job = load_job(id)
  local now = now_ms()
  local started = tonumber(job.started_at) or now
  finish_attempt(id, job, {
    outcome = 'cancelled', permanent = true, error = 'cancelled while running',
    run_ms = math.max(0, now - started), backoff_ms = 0,
  }, now)
  finish()
  redis.call('PUBLISH', k('wake'), 'cancel ' .. id .. ' ' .. job.attempts)
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
