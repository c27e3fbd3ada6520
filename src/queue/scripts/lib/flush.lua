-- lib/flush.lua: writing a call's changes back once, at its end.

-- Every script that changes jobs ends with this: re-sync the tenants it
-- touched, write the summed counters, and tell idle workers (subscribed to
-- B:wake) if a tenant became claimable, so a busy fleet is not woken by
-- every completion.
local function flush_state()
  flush_sched()
  flush_tq()
  -- absolute values: this call read each count before changing it
  nh_flush(RUNNING)
  flush_saved()
  for q in pairs(vt_dirty) do redis.call('HSET', K_QVT, q, vt_cache[q]) end
  vt_dirty = {}
  for q, d in pairs(qw_delta) do
    if d ~= 0 then redis.call('HINCRBYFLOAT', K_QW, q, d) end
  end
  qw_delta = {}
  if #lease_rems > 0 then call_chunked('ZREM', K_LEASES, lease_rems) end
  if #lease_adds > 0 then call_chunked('ZADD', K_LEASES, lease_adds) end
  lease_adds, lease_rems = {}, {}
  for i = 1, #removed_jobs, 1000 do
    redis.call('DEL', unpack(removed_jobs, i, math.min(i + 999, #removed_jobs)))
  end
  removed_jobs = {}
  if next(usage_delta) then
    local month = month_of(now_ms())
    for t, ms in pairs(usage_delta) do redis.call('HINCRBY', k('usage', t), month, ms) end
  end
  usage_delta = {}
  for q, fields in pairs(pending_stats) do
    local key = k('q', q, 'stats')
    for f, delta in pairs(fields) do
      if delta ~= 0 then redis.call('HINCRBY', key, f, delta) end
    end
  end
  pending_stats = {}
  flush_feed()
end

local function finish()
  for t in pairs(pending_sync) do sync_tenant(t) end
  pending_sync = {}
  flush_state()
  if entered_any then redis.call('PUBLISH', k('wake'), '1') end
end
