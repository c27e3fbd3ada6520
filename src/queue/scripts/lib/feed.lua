-- lib/feed.lua: job events, appended to the tenant's stream B:events:<t>.
--
-- Every script that changes a job's state says so here, in the same atomic
-- step, so a reader of the stream sees exactly the states the job went
-- through, in order. One entry per event: fields job, type, queue, and
-- whichever of attempt, outcome, error, result, progress, run_at apply.
-- Types: enqueued, started, progress, failed (an attempt failed; followed
-- by retrying or dead), retrying, succeeded, dead, cancelled.
--
-- Retention is bounded twice: MAXLEN ~ events_max entries per tenant, and
-- the stream expires events_ttl_ms after its last event (one PEXPIRE per
-- stream per call, by flush_feed), so an idle tenant's stream goes away.
-- A queue with B:qfeed field q = "0" publishes nothing (`agentq job-events
-- Q off`): its jobs cost no stream writes.

local feed_on_cache = {}
local function feed_on(q)
  local on = feed_on_cache[q]
  if on == nil then
    on = redis.call('HGET', k('qfeed'), q) ~= '0'
    feed_on_cache[q] = on
  end
  return on
end

local fed = {} -- stream keys written in this call
local feed_max = nil
-- Append one event of job `id` (tenant t, queue q); `...` are extra
-- field/value pairs (values already text or numbers).
local function feed(t, q, id, kind, ...)
  if not feed_on(q) then return end
  local key = k('events', t)
  if not feed_max then feed_max = tostring(default('events_max')) end
  redis.call('XADD', key, 'MAXLEN', '~', feed_max, '*', 'job', id, 'type', kind, 'queue', q, ...)
  fed[key] = true
end

-- Called by flush_state: one expiry per stream written.
local function flush_feed()
  if next(fed) == nil then return end
  local ttl = default('events_ttl_ms')
  for key in pairs(fed) do redis.call('PEXPIRE', key, ttl) end
  fed = {}
end
