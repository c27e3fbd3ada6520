-- lib/tenants.lua: per-call state of tenants and queues: running counts,
-- the queues where each tenant has ready work, pauses, holds, counters.

-- Per-call state. A script call is atomic, so what it reads stays true until
-- it changes it itself; these caches read each value once and finish()
-- writes each change back once, however many jobs of a batch touched it.
-- A number field of a hash per tenant (running count, pass): each field is
-- read once (nh_get, or many at once by prefetch), changes are marked in
-- `dirty`, and nh_flush writes them back with one HSET.
local function number_hash(key) return { key = key, vals = {}, dirty = {} } end
local function nh_get(h, f)
  local v = h.vals[f]
  if v == nil then
    v = tonumber(redis.call('HGET', h.key, f)) or 0
    h.vals[f] = v
  end
  return v
end
local function nh_flush(h)
  local args = {}
  for f in pairs(h.dirty) do
    args[#args + 1] = f
    args[#args + 1] = h.vals[f]
    h.dirty[f] = nil
  end
  if #args > 0 then call_chunked('HSET', h.key, args) end
end

-- The accessors below run several times per job: they read the value
-- tables directly and call nh_get only on a miss.
local RUNNING = number_hash(K_RUNNING)
local run_vals, run_dirty = RUNNING.vals, RUNNING.dirty
local function running(t) return run_vals[t] or nh_get(RUNNING, t) end
local function add_running(t, d)
  run_vals[t] = running(t) + d
  run_dirty[t] = true
end

-- The queues where tenant t has ready work: field t of hash B:tq, the queue
-- names joined by spaces (names never hold one). One hash, not a set per
-- tenant, so a call reads the queues of all its tenants with one HMGET
-- (prefetch) and writes the changes back with one HSET/HDEL (finish).
local K_TQ = k('tq')
local tq_cache, tq_dirty = {}, {}
local function parse_queues(s)
  local qs = {}
  if s then
    for q in string.gmatch(s, '%S+') do qs[q] = true end
  end
  return qs
end
local function tenant_queues(t)
  local qs = tq_cache[t]
  if qs == nil then
    qs = parse_queues(redis.call('HGET', K_TQ, t))
    tq_cache[t] = qs
  end
  return qs
end
local function tq_add(t, q)
  local qs = tenant_queues(t)
  if not qs[q] then
    qs[q] = true
    tq_dirty[t] = true
  end
end
local function tq_rem(t, q)
  local qs = tenant_queues(t)
  if qs[q] then
    qs[q] = nil
    tq_dirty[t] = true
  end
end
local function flush_tq()
  local sets, dels = {}, {}
  for t in pairs(tq_dirty) do
    local names = {}
    for q in pairs(tq_cache[t]) do names[#names + 1] = q end
    if #names > 0 then
      sets[#sets + 1] = t
      sets[#sets + 1] = table.concat(names, ' ')
    else
      dels[#dels + 1] = t
    end
  end
  tq_dirty = {}
  if #sets > 0 then call_chunked('HSET', K_TQ, sets) end
  if #dels > 0 then call_chunked('HDEL', K_TQ, dels) end
end

-- Read running counts and queues of many tenants with one HMGET each.
local function prefetch(tenants)
  local need = {}
  for _, t in ipairs(tenants) do
    if run_vals[t] == nil then need[#need + 1] = t end
  end
  each_chunk(need, 500, function(part)
    local r = redis.call('HMGET', K_RUNNING, unpack(part))
    local qs = redis.call('HMGET', K_TQ, unpack(part))
    for j, t in ipairs(part) do
      run_vals[t] = tonumber(r[j]) or 0
      if tq_cache[t] == nil then tq_cache[t] = parse_queues(qs[j]) end
    end
  end)
end

-- Members of B:paused ("q:<queue>" and "qt:<queue>:<tenant>"), read once.
local paused_cache = nil
local function paused_member(m)
  if paused_cache == nil then
    paused_cache = {}
    for _, x in ipairs(redis.call('SMEMBERS', K_PAUSED)) do paused_cache[x] = true end
  end
  return paused_cache[m] == true
end

-- Whether B:held may hold anyone (so a tenant's HDEL can be skipped if not).
local held_any = nil
local function any_held()
  if held_any == nil then held_any = redis.call('HLEN', K_HELD) > 0 end
  return held_any
end


-- Queue counters change many times per batch; they are only read outside
-- scripts, so changes are summed here and written once per field by finish().
local pending_stats = {} -- queue -> { field -> delta }
local function stat(q, t, state, delta)
  local fields = sub(pending_stats, q)
  fields[state] = (fields[state] or 0) + delta
  -- Per-tenant ready and running counts are ZCARD of the tenant's ready set
  -- and B:running, so only the rarer states are counted per tenant.
  if state == 'delayed' or state == 'dead' then
    local per = state .. ':' .. t
    fields[per] = (fields[per] or 0) + delta
  end
end
