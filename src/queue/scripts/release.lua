-- release.lua: hand running attempts back at once (graceful worker shutdown).
--
-- KEYS[1]  partition base, e.g. "{agentq:0}"
-- ARGV[1]  worker id
-- ARGV[2]  call id: the same call repeated (a retry after a lost reply)
--          returns the first reply and changes nothing ("" opts out)
-- ARGV[3]  reason, recorded as the attempt's error
-- ARGV[4..] triples: id, token, run_ms
-- Returns  { released, events }: attempts handed back to ready (stale
--          tokens, and attempts running for another worker, are skipped;
--          cancelled ones, below, are closed but not counted) and the
--          space-separated events they caused.
-- Invariant: like the reaper but without waiting for the lease to expire: the
--          slot is freed, a "lost" ledger record is written for the time used,
--          and the job is ready again at once; the interrupted attempt does
--          not count against max_attempts (B:job:<id>.base is raised). An
--          attempt cancelled while it ran (cancel.lua marked it) is not
--          handed back: it is closed as "cancelled" (record for the time
--          used, no retry, not dead-lettered), so it never runs again.

local worker, call, reason = ARGV[1], ARGV[2], ARGV[3]
local again = remembered(worker, 'release', call)
if again then return cjson.decode(again) end
local now = now_ms()
local released = 0
for i = 4, #ARGV - 2, 3 do
  local id, token = ARGV[i], ARGV[i + 1]
  local job = load_job(id)
  -- Fenced by attempt number and worker: after a failover the promoted
  -- replica may lack this worker's claim and have handed the job to
  -- another worker under the same attempt number (an unconfirmed claim
  -- handed back, README "Redis Sentinel"); that run is not ours to end.
  if job and job.state == 'running' and job.attempts == token and job.worker == worker then
    local cancelled = job.cancel == token
    if not cancelled then
      redis.call('HINCRBY', k('job', id), 'base', 1)
      job.base = (tonumber(job.base) or 0) + 1
      released = released + 1
    end
    -- a cancelled one closes as "cancelled" (finish_attempt, lib/attempt.lua)
    finish_attempt(id, job, {
      outcome = 'lost', permanent = false, error = reason,
      run_ms = tonumber(ARGV[i + 2]), backoff_ms = 0,
    }, now)
  end
end
finish()
local out = { released, table.concat(events, ' ') }
remember(worker, 'release', call, cjson.encode(out))
return out
