-- lib/sched.lua: fair scheduling: sched sets, passes, virtual time,
-- admissible weight, and who may start now.

-- A tenant's weight (its share among backlogged tenants) and its stride:
-- each start moves its pass on by 1e6 / weight.
local function weight(t) return math.max(limits(t).weight, 0.001) end
local function stride(t) return math.floor(1000000 / weight(t)) end

-- Virtual time of queue q: the lowest pass picked so far by a claim that
-- serves q (B:qvt field q); never moves backwards. Picks take the lowest
-- pass, so every pass in q's sched set is at least q's virtual time.
-- One per queue, not per partition: a busy queue's picks must not move the
-- clock of a quiet queue served by another pool.
local vt_cache, vt_dirty = {}, {}
local function get_vt(q)
  local v = vt_cache[q]
  if v == nil then
    v = tonumber(redis.call('HGET', K_QVT, q))
    if v == nil then
      -- First use of the queue (or a namespace from before per-queue
      -- virtual time): start at its head, so nobody there gains or loses,
      -- and keep it (a later pick at that same pass would not raise it, and
      -- an unwritten virtual time would fall back to 0 once the set empties).
      v = tonumber(redis.call('ZRANGE', k('q', q, 'sched'), 0, 0, 'WITHSCORES')[2]) or 0
      vt_dirty[q] = true
    end
    vt_cache[q] = v
  end
  return v
end
local function raise_vt(q, p)
  if p > get_vt(q) then
    vt_cache[q] = p
    vt_dirty[q] = true
  end
end

-- What a tenant still owes on a queue it left (its pass there, when that
-- was ahead of the queue's virtual time): hash B:q:<q>:pass, tenant ->
-- pass, read and written once per call.
local saved_cache, saved_dirty = {}, {}
local function saved_pass(q, t)
  local c = sub(saved_cache, q)
  local v = c[t]
  if v == nil then
    v = tonumber(redis.call('HGET', k('q', q, 'pass'), t)) or false
    c[t] = v
  end
  return v
end
local function set_saved(q, t, v)
  sub(saved_cache, q)[t] = v
  sub(saved_dirty, q)[t] = true
end
local function flush_saved()
  for q, d in pairs(saved_dirty) do
    local sets, dels = {}, {}
    for t in pairs(d) do
      local v = saved_cache[q][t]
      if v then
        sets[#sets + 1] = t
        sets[#sets + 1] = v
      else
        dels[#dels + 1] = t
      end
    end
    if #sets > 0 then call_chunked('HSET', k('q', q, 'pass'), sets) end
    if #dels > 0 then call_chunked('HDEL', k('q', q, 'pass'), dels) end
  end
  saved_dirty = {}
end

-- Changes to the admissible weight of each queue (B:qw), summed per call.
local qw_delta = {}
local function add_weight(q, d) qw_delta[q] = (qw_delta[q] or 0) + d end

-- Scores in the sched sets as this call knows them (false: not a member),
-- and whether each tenant was a member in Redis (so flush_sched knows who
-- joined or left, for the admissible weight).
local sched_cache, sched_orig = {}, {}
local function sched_seen(q, t, s)
  sub(sched_cache, q)[t] = s
  sub(sched_orig, q)[t] = s ~= false
end
local function sched_score(q, t)
  local s = sub(sched_cache, q)[t]
  if s == nil then
    s = tonumber(redis.call('ZSCORE', k('q', q, 'sched'), t)) or false
    sched_seen(q, t, s)
  end
  return s
end
-- Changes to sched sets are written by flush_sched(), one ZADD and one ZREM
-- per queue, before anything reads a sched set from Redis and by finish().
local sched_dirty = {}
local function sched_set(q, t, p)
  sched_cache[q][t] = p
  sub(sched_dirty, q)[t] = true
end
local function flush_sched()
  for q, d in pairs(sched_dirty) do
    local adds, rems = {}, {}
    local orig = sub(sched_orig, q)
    for t in pairs(d) do
      local p = sched_cache[q][t]
      if p then
        adds[#adds + 1] = p
        adds[#adds + 1] = t
      else
        rems[#rems + 1] = t
      end
      local member = p ~= false
      if orig[t] ~= member then
        add_weight(q, member and weight(t) or -weight(t))
        orig[t] = member
      end
    end
    if #adds > 0 then call_chunked('ZADD', k('q', q, 'sched'), adds) end
    if #rems > 0 then call_chunked('ZREM', k('q', q, 'sched'), rems) end
  end
  sched_dirty = {}
end
-- Read the sched scores of many tenants on queue q with one ZMSCORE.
local function prefetch_sched(q, tenants)
  local c = sub(sched_cache, q)
  local need = {}
  for _, t in ipairs(tenants) do
    if c[t] == nil then need[#need + 1] = t end
  end
  each_chunk(need, 500, function(part)
    local scores = redis.call('ZMSCORE', k('q', q, 'sched'), unpack(part))
    for j, t in ipairs(part) do sched_seen(q, t, tonumber(scores[j]) or false) end
  end)
end

-- Tenant t enters q's sched set: at q's virtual time, or later by what it
-- still owes there (its saved pass), but never more than one stride later.
-- So time away (idle, at its cap, held by rate or quota, paused) earns no
-- credit, and nothing that happened on other queues pushes it behind the
-- tenants here: it is picked within one round of them. Returns true if it
-- entered.
local function sched_enter(q, t)
  if sched_score(q, t) ~= false then return false end
  local vt = get_vt(q)
  local p = vt
  local owed = saved_pass(q, t)
  if owed then
    p = math.min(math.max(owed, vt), vt + stride(t))
    set_saved(q, t, false)
  end
  sched_set(q, t, p)
  return true
end
-- Tenant t leaves q's sched set, keeping what it owes (a pass ahead of q's
-- virtual time) for when it comes back.
local function sched_leave(q, t)
  local s = sched_score(q, t)
  if s == false then return end
  if s > get_vt(q) then set_saved(q, t, s) end
  sched_set(q, t, false)
end

-- Why tenant t may not start a job now ('cap', 'quota', 'spend', 'rate'), or
-- nil; for quota, spend and rate also when it may start again (ms).
local function hold_reason(t)
  local l = limits(t)
  if running(t) >= l.max_concurrency then return 'cap', nil end
  local now = now_ms()
  if l.quota_ms > 0 then
    local used = tonumber(redis.call('HGET', k('usage', t), month_of(now))) or 0
    if used >= l.quota_ms then return 'quota', next_month_ms(now) end
  end
  if l.spend_cap_micros > 0 then
    -- the month's spend, added to by charge() (lib/attempt.lua)
    local spent = tonumber(redis.call('HGET', k('usage', t), month_of(now) .. ':cost')) or 0
    if spent >= l.spend_cap_micros then return 'spend', next_month_ms(now) end
  end
  if l.rate > 0 then
    local tat = tonumber(redis.call('HGET', k('gcra'), t)) or 0
    local T, tau = gcra(l)
    if tat - now > tau then return 'rate', math.ceil(tat - tau) end
  end
  return nil, nil
end

-- Tenants whose admission must be re-checked before the script ends (once
-- each, however many of their attempts the script closed).
local pending_sync = {}
local function sync_later(t) pending_sync[t] = true end

-- Whether queue q, or tenant t on it, is paused.
local function paused_on(q, t)
  return paused_member('q:' .. q) or paused_member('qt:' .. q .. ':' .. t)
end

-- Set when a tenant entered a sched set in this call; see finish().
local entered_any = false

-- Recompute tenant t's membership in the sched set of every queue where it has
-- ready work (see sched_enter for where it enters). Returns true if it
-- entered any set (callers wake idle workers then).
local function sync_tenant(t)
  local qs = tenant_queues(t)
  local has_work = next(qs) ~= nil
  local reason, until_ms = nil, nil
  if has_work then reason, until_ms = hold_reason(t) end
  if reason == 'quota' or reason == 'rate' or reason == 'spend' then
    redis.call('ZADD', K_THROTTLED, until_ms, t)
    redis.call('HSET', K_HELD, t, reason)
    held_any = true
  elseif any_held() and redis.call('HDEL', K_HELD, t) == 1 then
    redis.call('ZREM', K_THROTTLED, t)
  end
  if not has_work then return false end
  local admissible = reason == nil
  local entering = false
  for q in pairs(qs) do
    if admissible and not paused_on(q, t) then
      if sched_enter(q, t) then entering = true end
    else
      sched_leave(q, t)
    end
  end
  if entering then entered_any = true end
  return entering
end

-- Tenant t has no ready job left in queue q.
local function ready_ran_dry(q, t)
  tq_rem(t, q)
  sched_leave(q, t)
end

-- Recount q's admissible weight from its sched set (after a tier or the
-- defaults changed many tenants' weights at once).
local function recount_weight(q)
  local sum = 0
  for _, t in ipairs(redis.call('ZRANGE', k('q', q, 'sched'), 0, -1)) do sum = sum + weight(t) end
  redis.call('HSET', K_QW, q, sum)
  qw_delta[q] = nil
end

-- Index job id (its hash already says state "ready") in its tenant's ready set.
local function index_ready(id, q, t, score)
  redis.call('ZADD', k('q', q, 't', t), score, id)
  tq_add(t, q)
  stat(q, t, 'ready', 1)
end

-- Put job id (fields already in its hash) into its tenant's ready set.
local function make_ready(id, q, t, score)
  redis.call('HSET', k('job', id), 'state', 'ready')
  index_ready(id, q, t, score)
end
