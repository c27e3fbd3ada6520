-- claim.lua: admit and lease up to `batch` jobs from the given queues, fairly.
--
-- KEYS[1]  partition base, e.g. "{agentq:0}"
-- ARGV[1]  worker id (recorded on the job, used in logs and the ledger)
-- ARGV[2]  call id: the same call repeated (a retry after a lost reply)
--          hands out the jobs the first one did, still running under their
--          leases, instead of claiming more ("" opts out)
-- ARGV[3]  batch size (free local slots)
-- ARGV[4]  lease duration in ms
-- ARGV[5..] queue names to claim from
-- Returns  { due_in_ms, events, weight, job1..., job2..., ... } where
--          due_in_ms is how long until the earliest delayed job or throttled
--          tenant becomes due, by this server's clock (at least 1; 0 if
--          none), so workers never compare Redis time with their own clock;
--          events is a space-separated list such as "rate_2x:acme" (may be
--          empty); weight is the admissible weight left on the requested
--          queues after this claim (workers split their slots across
--          partitions by it); and each job is 12 values: id, attempt (the
--          fencing token), tenant, queue, kind, payload, timeout_ms, memory,
--          enqueued_at, started_at, max_timeout_ms, max_memory.
--
-- Fairness: each queue's sched set holds the admissible tenants with ready
-- work, scored by pass. The tenant with the lowest pass across the requested
-- queues is served next (stride scheduling): its pass on that queue, and on
-- every other requested queue where it waits, advances by 1e6 / weight, so
-- backlogged tenants start jobs in proportion to their weights, counted
-- across all the queues a pool serves. Each requested queue's virtual time
-- rises to the pass picked, and tenants enter a queue at its virtual time
-- (see sched_enter in lib.lua): within one round of the tenants there.
-- Invariant: a tenant at its concurrency cap, over its monthly quota or
-- beyond its start rate (GCRA) is in no sched set, so it can never be
-- admitted past those limits, whichever worker runs this script.

local worker, call, batch, lease_ms = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local now = now_ms()
local now_s = tostring(now)

-- The jobs a repeated call handed out the first time: those still running
-- under that attempt for this worker (the others were reaped or handed back
-- meanwhile). Their leases are renewed from now: the worker counts its local
-- deadline from the repeat, and the write makes a WAIT behind this call
-- (--min-replicas-ack) cover the first call's claim too.
local function claimed_again(text)
  local first = cjson.decode(text)
  local out = { 0, '', first[1] }
  for i = 2, #first - 1, 2 do
    local id, attempt = first[i], first[i + 1]
    local v = redis.call('HMGET', k('job', id), 'state', 'attempts', 'worker', 'tenant', 'queue',
      'kind', 'payload', 'timeout_ms', 'memory', 'enqueued_at', 'started_at')
    if v[1] == 'running' and tonumber(v[2]) == attempt and v[3] == worker then
      lease_add(id, now + lease_ms)
      local l = limits(v[4])
      for _, x in ipairs({ id, attempt, v[4], v[5], v[6], v[7], tonumber(v[8]) or 0,
        tonumber(v[9]) or 0, tonumber(v[10]) or now, tonumber(v[11]) or now, l.max_timeout_ms,
        l.max_memory }) do
        out[#out + 1] = x
      end
    end
  end
  return out
end
local again = remembered(worker, 'claim', call)
if again then
  local out = claimed_again(again)
  flush_state()
  return out
end
-- The pool's queues: all of them keep its clock (virtual time), so a
-- paused one resumes in step; the unpaused ones are served.
local listed, queues = {}, {}
for i = 5, #ARGV do
  listed[#listed + 1] = ARGV[i]
  if not paused_member('q:' .. ARGV[i]) then
    queues[#queues + 1] = ARGV[i]
  end
end

-- Promote due delayed jobs (bounded per call) and find the next due time.
local next_due = 0
local woken = {}
for _, q in ipairs(queues) do
  local dk = k('q', q, 'delayed')
  local due = redis.call('ZRANGEBYSCORE', dk, '-inf', now, 'LIMIT', 0, 200)
  for _, id in ipairs(due) do
    redis.call('ZREM', dk, id)
    local v = redis.call('HMGET', k('job', id), 'tenant', 'score')
    if v[1] then
      stat(q, v[1], 'delayed', -1)
      redis.call('HSET', k('job', id), 'ready_at', now)
      redis.call('HDEL', k('job', id), 'run_at')
      make_ready(id, q, v[1], tonumber(v[2]))
      woken[v[1]] = true
    end
  end
  local first = redis.call('ZRANGE', dk, 0, 0, 'WITHSCORES')
  if first[2] then
    local due_at = tonumber(first[2])
    if next_due == 0 or due_at < next_due then next_due = due_at end
  end
end
-- Tenants held by rate or quota whose time has come are admissible again.
for _, t in ipairs(redis.call('ZRANGEBYSCORE', K_THROTTLED, '-inf', now, 'LIMIT', 0, 200)) do
  redis.call('ZREM', K_THROTTLED, t)
  woken[t] = true
end
for t in pairs(woken) do sync_tenant(t) end

-- Count a start against the tenant's rate (GCRA) and its expected rate.
local function count_start(t, l)
  if l.rate > 0 then
    local T = gcra(l)
    local tat = tonumber(redis.call('HGET', k('gcra'), t)) or 0
    redis.call('HSET', k('gcra'), t, math.max(tat, now) + T)
  end
  if l.expected_rate_per_min > 0 then
    local key = k('starts', t, tostring(math.floor(now / 60000)))
    local n = redis.call('INCR', key)
    if n == 1 then redis.call('PEXPIRE', key, 120000) end
    if n == 2 * l.expected_rate_per_min + 1 then event('rate_2x:' .. t) end
  end
end

-- Stride picks over a window of each sched set: the first batch+1 tenants
-- by pass are read once and kept sorted locally; the head is picked and
-- re-inserted at its new pass. A pick is exact while its pass is not above
-- the window's last score (every tenant outside the window has at least that
-- pass); past it the picks so far are written back and the window re-read.
local windows = {}  -- q -> { list = { {t=, pass=}... } sorted by pass, bound = score or nil }
local picked = {}   -- tenant -> true, for tenants picked in this call
local function load_window(q)
  flush_sched()
  local flat = redis.call('ZRANGE', k('q', q, 'sched'), 0, batch, 'WITHSCORES')
  local list, tenants = {}, {}
  for i = 1, #flat, 2 do
    local t, p = flat[i], tonumber(flat[i + 1])
    list[#list + 1] = { t = t, pass = p }
    sched_seen(q, t, p)
    tenants[#tenants + 1] = t
  end
  prefetch(tenants)
  local bound = nil
  if #list > batch then bound = list[#list].pass end
  windows[q] = { list = list, bound = bound }
end
local function window_head(q)
  local w = windows[q]
  if w == nil then
    load_window(q)
    w = windows[q]
  end
  local e = w.list[1]
  if e and w.bound and e.pass > w.bound then
    for t in pairs(picked) do sync_tenant(t) end
    load_window(q)
    e = windows[q].list[1]
  end
  return e
end
-- Insert entry e into a sorted list after every entry with the same pass
-- (so equal tenants take turns).
local function insert_sorted(list, e)
  local lo, hi = 1, #list + 1
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if list[mid].pass <= e.pass then lo = mid + 1 else hi = mid end
  end
  table.insert(list, lo, e)
end
-- A pick of tenant t on queue q moves it on by its stride on every other
-- requested queue where it waits (its share counts across the pool's
-- queues); with keep false it leaves their windows (no more picks now).
local function other_queues(q, t, step, keep)
  for _, oq in ipairs(queues) do
    local s = (oq ~= q) and sched_score(oq, t)
    if s then
      sched_set(oq, t, s + step)
      local w = windows[oq]
      for i, e in ipairs(w and w.list or {}) do
        if e.t == t then
          table.remove(w.list, i)
          if keep then
            e.pass = s + step
            insert_sorted(w.list, e)
          end
          break
        end
      end
    end
  end
end

local out = { next_due, '', '0' }
local claimed = 0
local touched = {} -- ready-set keys popped from: q, t
local guard = batch * 4 + 16
while claimed < batch and guard > 0 do
  guard = guard - 1
  local best_q, best = nil, nil
  for _, q in ipairs(queues) do
    local e = window_head(q)
    if e and (best == nil or e.pass < best.pass) then best_q, best = q, e end
  end
  if best_q == nil then break end
  local q, t, best_pass = best_q, best.t, best.pass
  table.remove(windows[q].list, 1)
  local tk = k('q', q, 't', t)
  local popped = redis.call('ZPOPMIN', tk)
  if not popped[1] then
    -- stale sched entry (no ready work left): repair it
    ready_ran_dry(q, t)
    sync_later(t)
  else
    local id = popped[1]
    local jk = k('job', id)
    local v = redis.call('HMGET', jk, 'kind', 'payload', 'timeout_ms', 'memory', 'enqueued_at',
      'attempts')
    local attempt = (tonumber(v[6]) or 0) + 1
    -- no 'hb' yet: the reaper reads a missing heartbeat as "none since the start"
    redis.call('HSET', jk, 'attempts', attempt, 'state', 'running', 'started_at', now_s,
      'worker', worker)
    lease_add(id, now + lease_ms)
    feed(t, q, id, 'started', 'attempt', attempt)
    add_running(t, 1)
    stat(q, t, 'ready', -1)
    stat(q, t, 'running', 1)
    local l = limits(t)
    local n = #out
    out[n + 1] = id
    out[n + 2] = attempt
    out[n + 3] = t
    out[n + 4] = q
    out[n + 5] = v[1]
    out[n + 6] = v[2]
    out[n + 7] = tonumber(v[3]) or 0
    out[n + 8] = tonumber(v[4]) or 0
    out[n + 9] = tonumber(v[5]) or now
    out[n + 10] = now
    out[n + 11] = l.max_timeout_ms
    out[n + 12] = l.max_memory
    claimed = claimed + 1
    for _, lq in ipairs(listed) do raise_vt(lq, best_pass) end
    local step = stride(t)
    sched_set(q, t, best_pass + step)
    count_start(t, l)
    picked[t] = true
    touched[tk] = { q, t }
    sync_later(t)
    -- at its cap, over its quota or beyond its rate: no more picks this call
    local admissible = hold_reason(t) == nil
    if admissible then
      best.pass = best_pass + step
      insert_sorted(windows[q].list, best)
    end
    if #queues > 1 then other_queues(q, t, step, admissible) end
  end
end
-- Tenants whose ready set ran dry leave their queue's sched set.
for tk, qt in pairs(touched) do
  if redis.call('EXISTS', tk) == 0 then ready_ran_dry(qt[1], qt[2]) end
end
finish()
-- Tenants throttled before or during this claim (written by finish) become
-- due at their score.
local first_throttled = redis.call('ZRANGE', K_THROTTLED, 0, 0, 'WITHSCORES')
if first_throttled[2] then
  local at = tonumber(first_throttled[2])
  if next_due == 0 or at < next_due then next_due = at end
end
out[1] = 0
if next_due > 0 then out[1] = math.max(1, next_due - now) end
out[2] = table.concat(events, ' ')
local weight_left = 0
if #queues > 0 then
  for _, w in ipairs(redis.call('HMGET', K_QW, unpack(queues))) do
    weight_left = weight_left + math.max(tonumber(w) or 0, 0)
  end
end
out[3] = tostring(weight_left)
local handed = { out[3] }
for i = 4, #out, 12 do
  handed[#handed + 1] = out[i]
  handed[#handed + 1] = out[i + 1]
end
remember(worker, 'claim', call, cjson.encode(handed))
return out
