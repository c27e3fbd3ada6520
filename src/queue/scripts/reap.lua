-- reap.lua: return attempts whose lease expired (their worker died) to ready.
--
-- KEYS[1]  partition base, e.g. "{agentq:0}"
-- ARGV[1]  guard interval in ms: the reaper runs at most once per interval
--          across the whole fleet (SET NX PX on B:reaper)
-- ARGV[2]  maximum number of leases to reap in this call
-- Returns  { reaped, events }: the number of attempts reaped (-1 when another
--          worker holds the guard for this interval) and the space-separated
--          events (quota thresholds) the reaped attempts caused.
-- Invariant: an expired attempt is closed exactly once, like a completion: its
--          slot is freed, it gets a ledger record with outcome "lost" and run
--          time up to its last heartbeat, and the job goes back to ready (or
--          dead when its attempts are used up). An attempt cancelled while it
--          ran (cancel.lua marked it; its worker died before reporting) is
--          closed the same way but as "cancelled": not retried, not
--          dead-lettered (finish_attempt in lib/attempt.lua). A late
--          completion from the dead worker is then refused by complete.lua
--          (token mismatch).

local ok = redis.call('SET', k('reaper'), '1', 'NX', 'PX', tonumber(ARGV[1]))
if not ok then return { -1, '' } end
local now = now_ms()
local expired = redis.call('ZRANGEBYSCORE', k('leases'), '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
local reaped = 0
for _, id in ipairs(expired) do
  local job = load_job(id)
  if job and job.state == 'running' then
    -- a heartbeat older than this attempt's start is an earlier attempt's
    local started = tonumber(job.started_at) or now
    local hb = math.max(tonumber(redis.call('HGET', k('job', id), 'hb')) or started, started)
    local last = job.worker or 'unknown'
    finish_attempt(id, job, {
      outcome = 'lost', permanent = false,
      error = 'lease expired: worker ' .. last .. ' stopped renewing it (crashed or cut off)',
      run_ms = math.max(0, hb - (tonumber(job.started_at) or hb)), backoff_ms = 0,
    }, now)
    reaped = reaped + 1
  else
    lease_rem(id)
  end
end
finish()
return { reaped, table.concat(events, ' ') }
